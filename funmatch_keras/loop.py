"""`fit_resumably`: Keras `fit` that can start in the middle of an epoch.

A run killed at global step `s` restarts from its last checkpoint; `fit` only
starts at epoch boundaries, so the rest of the interrupted epoch is run first,
as a short epoch, then whole epochs. The dataset is rebuilt at each start step
(the data pipelines skip to any step deterministically), so the batches seen
are exactly those of an uninterrupted run.
"""

from __future__ import annotations

from typing import Callable, Sequence

import keras
import tensorflow as tf


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
