"""`fit_resumably`: Keras `fit` that can start in the middle of an epoch;
`fit_with_checkpoints`: that, checkpointed, resuming from the last checkpoint.

A run killed at global step `s` restarts from its last checkpoint; `fit` only
starts at epoch boundaries, so the rest of the interrupted epoch is run first,
as a short epoch, then whole epochs. The dataset is rebuilt at each start step
(the data pipelines skip to any step deterministically), so the batches seen
are exactly those of an uninterrupted run.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import keras
import tensorflow as tf

from funmatch_keras.checkpoint import CheckpointCallback, CheckpointManager


class TrainingError(RuntimeError):
    """Training stopped early (e.g. a NaN loss); checkpoints are intact."""


def fit_resumably(
    model: keras.Model,
    make_dataset: Callable[[int], tf.data.Dataset],
    *,
    steps_per_epoch: int,
    epochs: int,
    start_step: int = 0,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    should_stop: Callable[[], bool] = lambda: False,
    **fit_kwargs,
) -> int:
    """Runs `model.fit` from global step `start_step` to `epochs * steps_per_epoch`.

    Args:
        model: a compiled `keras.Model` (its optimizer restored to `start_step`).
        make_dataset: `fn(step) -> tf.data.Dataset` yielding batches from `step` on.
        steps_per_epoch: int. Steps of a whole epoch.
        epochs: int. Total epochs of the run.
        start_step: int. Global step to start at. Defaults to 0.
        callbacks: Keras callbacks, shared by both `fit` calls.
        should_stop: callable. Checked between the two `fit` calls (e.g. NaN stop).
        **fit_kwargs: passed to `fit` (validation_data, validation_freq, verbose...).

    Returns:
        The global step reached.

    Example:
    >>> import numpy as np
    >>> model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> make = lambda step: tf.data.Dataset.from_tensors((np.ones((2, 1)),) * 2).repeat()
    >>> fit_resumably(model, make, steps_per_epoch=4, epochs=2, start_step=3, verbose=0)
    8
    """
    total = steps_per_epoch * epochs
    step = start_step
    offset = step % steps_per_epoch
    if offset and step < total:  # killed mid-epoch: finish that epoch first
        model.fit(make_dataset(step), initial_epoch=step // steps_per_epoch,
                  epochs=step // steps_per_epoch + 1, steps_per_epoch=steps_per_epoch - offset,
                  callbacks=list(callbacks), **fit_kwargs)
        step += steps_per_epoch - offset
    if step < total and not should_stop():
        model.fit(make_dataset(step), initial_epoch=step // steps_per_epoch, epochs=epochs,
                  steps_per_epoch=steps_per_epoch, callbacks=list(callbacks), **fit_kwargs)
        step = total
    return step


def fit_with_checkpoints(
    model: keras.Model,
    make_dataset: Callable[[int], tf.data.Dataset],
    *,
    checkpoint_dir: str,
    every_steps: int,
    keep: int,
    steps_per_epoch: int,
    epochs: int,
    name: str = "training",
    saved: keras.Model | None = None,
    is_chief: bool = True,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    **fit_kwargs,
) -> int:
    """`fit_resumably` from the latest checkpoint in `checkpoint_dir`, saving more.

    The model and its optimizer are restored from the latest checkpoint if there
    is one (the rerun says so), then trained to `epochs * steps_per_epoch`,
    checkpointed every `every_steps` steps and at each epoch end.

    Args:
        model: a compiled `keras.Model`; its weights and optimizer are saved.
        make_dataset: `fn(step) -> tf.data.Dataset` yielding batches from `step` on.
        checkpoint_dir: str. Where the checkpoints are.
        every_steps: int. Steps between checkpoints.
        keep: int. Most recent checkpoints kept.
        steps_per_epoch: int. Steps of a whole epoch.
        epochs: int. Total epochs of the run.
        name: str. What is trained, for the resume message.
        saved: keras.Model. What the checkpoints hold besides the optimizer
            (e.g. the student of a `Distiller`). Defaults to `model`.
        is_chief: bool. Whether this process writes checkpoints.
        callbacks: more Keras callbacks.
        **fit_kwargs: passed to `fit` (validation_data, verbose...).

    Returns:
        The global step reached.

    Raises:
        TrainingError: training stopped early (a NaN loss); the message names the
            last good checkpoint.

    Example:
    >>> import tempfile, numpy as np
    >>> model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> make = lambda step: tf.data.Dataset.from_tensors((np.ones((2, 1)),) * 2).repeat()
    >>> d = tempfile.mkdtemp()
    >>> fit_with_checkpoints(model, make, checkpoint_dir=d, every_steps=2, keep=1,
    ...                      steps_per_epoch=3, epochs=1, verbose=0)
    3
    >>> sorted(os.listdir(d))
    ['ckpt-000000003']
    """
    saved = model if saved is None else saved
    manager = CheckpointManager(checkpoint_dir, keep=keep, clean_temp=is_chief)
    start = 0
    if manager.latest() is not None:
        start = int(manager.restore(saved, model.optimizer)["step"])
        # Always said, whatever the verbosity: a resumed run must be visible in the log.
        print(f"Resuming {name} from step {start} of {steps_per_epoch * epochs} "
              f"({manager.latest()[1]}).", flush=True)
    checkpoints = CheckpointCallback(manager, every_steps, saved, is_chief=is_chief)
    step = fit_resumably(model, make_dataset, steps_per_epoch=steps_per_epoch, epochs=epochs,
                         start_step=start, callbacks=[checkpoints, *callbacks],
                         should_stop=lambda: bool(checkpoints.stopped_reason), **fit_kwargs)
    if checkpoints.stopped_reason:
        raise TrainingError(f"{name.capitalize()} stopped: {checkpoints.stopped_reason}.")
    return step
