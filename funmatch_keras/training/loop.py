"""The resumable training loop: checkpointed Keras `fit` that restarts at any step.

`fit_resumably`: Keras `fit` that can start in the middle of an epoch;
`fit_with_checkpoints`: that, checkpointed, resuming from the last checkpoint.

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

from funmatch_keras.optim.optimizers import global_step
from funmatch_keras.training.checkpoint import CheckpointManager
from funmatch_keras.training.checkpoint_callback import CheckpointCallback, stop_on_signals
from funmatch_keras.training.distribute import Replication


class TrainingError(RuntimeError):
    """Training stopped early (e.g. a NaN loss); checkpoints are intact."""


class Preempted(RuntimeError):
    """Training stopped on SIGTERM or SIGINT after saving a checkpoint; rerun to resume."""


def fit_resumably(
    model: keras.Model,
    make_dataset: Callable[[int], tf.data.Dataset],
    *,
    steps_per_epoch: int,
    epochs: int,
    start_step: int = 0,
    log_every_steps: int | None = None,
    boundaries: Sequence[int] = (),
    callbacks: Sequence[keras.callbacks.Callback] = (),
    should_stop: Callable[[], bool] = lambda: False,
    **fit_kwargs,
) -> int:
    """Runs `model.fit` from global step `start_step` to `epochs * steps_per_epoch`.

    `fit` runs over virtual epochs of `log_every_steps` steps, aligned on the
    global step, so Keras's epoch end (metrics read, callbacks, validation) is
    the log step, whatever the dataset's epoch length (2 steps on Flowers102).
    With `verbose`, each interval's bar is headed by the run's epoch and steps
    (`RunProgress`), not by Keras's count of intervals.
    A start in the middle of an interval first finishes that interval; a total
    that is not a multiple of it ends with a short one. Each `fit` call gets
    `make_dataset(step)` cut to its length, so `steps_per_execution > 1` never
    runs past the end.

    Args:
        model: a compiled `keras.Model` (its optimizer restored to `start_step`).
        make_dataset: `fn(step) -> tf.data.Dataset` yielding batches from `step` on.
        steps_per_epoch: int. Steps of a whole (dataset) epoch.
        epochs: int. Total epochs of the run.
        start_step: int. Global step to start at. Defaults to 0.
        log_every_steps: int or None. Steps of a virtual epoch. Defaults to
            `steps_per_epoch` (Keras epochs are dataset epochs).
        boundaries: global steps where a `fit` call must end, because the
            batches change form there (e.g. from replayed teacher logits to a
            live teacher): `make_dataset(step)` is never read across one.
        callbacks: Keras callbacks, shared by the `fit` calls.
        should_stop: callable. Checked between `fit` calls (e.g. NaN stop).
        **fit_kwargs: passed to `fit` (verbose...).

    Returns:
        The global step reached.

    Example:
    >>> import numpy as np
    >>> model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> make = lambda step: tf.data.Dataset.from_tensors((np.ones((2, 1)),) * 2).repeat()
    >>> fit_resumably(model, make, steps_per_epoch=4, epochs=2, start_step=3,
    ...               log_every_steps=2, verbose=0)
    8
    """
    total = steps_per_epoch * epochs
    interval = log_every_steps or steps_per_epoch
    per_call = getattr(model, "steps_per_execution", 1) or 1
    if interval % per_call:
        raise ValueError(f"`log_every_steps` ({interval}) must be a multiple of the model's "
                         f"steps_per_execution ({per_call}).")
    step = start_step
    progress = RunProgress(steps_per_epoch, epochs)
    for begin, end in _intervals(start_step, total, interval, boundaries):
        if should_stop():
            break
        length = min(end - begin, interval)
        before = global_step(model.optimizer)
        progress.fit_starts(begin, begin // interval)
        model.fit(_first_steps(make_dataset(begin), end - begin, per_call),
                  initial_epoch=begin // interval,
                  epochs=begin // interval + (end - begin) // length,
                  steps_per_epoch=length, callbacks=[progress, *callbacks],
                  shuffle=False,  # the pipelines shuffle; Keras would warn otherwise
                  **fit_kwargs)
        step = begin + global_step(model.optimizer) - before
        if model.stop_training:  # a NaN or a signal
            break
    return step


class RunProgress(keras.callbacks.ProgbarLogger):
    """Keras's progress bar, headed by the run's epochs and steps.

    `fit_resumably`'s `fit` calls count log intervals as their epochs, so
    Keras's own header read "Epoch 1/10" in a 20-epoch run, and "11/11" after a
    resume. This one says where the interval lies in the whole run.

    Example:
    >>> progress = RunProgress(steps_per_epoch=10, epochs=20)
    >>> progress.fit_starts(step=15, initial_epoch=3)
    >>> progress.target = 5  # Keras sets it: the steps of one interval
    >>> progress.header(epoch=4)
    'Epoch 3/20, steps 21-25 of 200'
    """

    def __init__(self, steps_per_epoch: int, epochs: int):
        super().__init__()
        self.steps_per_epoch, self.total_epochs = steps_per_epoch, epochs
        self._begin, self._initial_epoch = 0, 0

    def fit_starts(self, step: int, initial_epoch: int) -> None:
        """The global step and Keras epoch at which the next `fit` call starts."""
        self._begin, self._initial_epoch = step, initial_epoch

    def header(self, epoch: int) -> str:
        """The line above the bar of Keras epoch `epoch` (a log interval)."""
        first = self._begin + (epoch - self._initial_epoch) * self.target
        last = first + self.target  # 1-based: steps first + 1 .. last
        epochs = [first // self.steps_per_epoch + 1, (last - 1) // self.steps_per_epoch + 1]
        which = (f"Epoch {epochs[0]}" if epochs[0] == epochs[1] else
                 f"Epochs {epochs[0]}-{epochs[1]}")
        steps = f"step {last}" if last == first + 1 else f"steps {first + 1}-{last}"
        return f"{which}/{self.total_epochs}, {steps} of {self.steps_per_epoch * self.total_epochs}"

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs = 1  # Keras prints its "Epoch k/N" only when N > 1
        super().on_epoch_begin(epoch, logs)
        if self.verbose:
            print(self.header(epoch), flush=True)


def _intervals(start: int, total: int, interval: int,
               boundaries: Sequence[int] = ()) -> list[tuple[int, int]]:
    """`fit` calls as `(begin, end)` steps: the rest of a started interval, whole
    intervals, then a short last one; a boundary ends a call (and starts one).

    >>> _intervals(3, 20, 4)
    [(3, 4), (4, 20)]
    >>> _intervals(0, 10, 4)
    [(0, 8), (8, 10)]
    >>> _intervals(0, 20, 4, boundaries=[10])
    [(0, 8), (8, 10), (10, 12), (12, 20)]
    """
    stops = sorted({b for b in boundaries if start < b < total} | {total})
    calls, step = [], start
    for stop in stops:
        if step % interval and step < stop:
            calls.append((step, min(stop, step - step % interval + interval)))
            step = calls[-1][1]
        whole = stop - stop % interval
        if step < whole:
            calls.append((step, whole))
            step = whole
        if step < stop:
            calls.append((step, stop))
            step = stop
    return calls


def _first_steps(dataset, steps: int, per_call: int):
    if isinstance(dataset, tf.data.Dataset):
        return dataset.take(steps)
    if steps % per_call:  # a distributed dataset cannot be cut
        raise ValueError(
            f"A run whose length ({steps} steps here) is not a multiple of "
            f"steps_per_execution ({per_call}) needs a tf.data.Dataset input, not "
            f"{type(dataset).__name__}: change epochs or steps_per_execution.")
    return dataset


def fit_with_checkpoints(
    model: keras.Model,
    make_dataset: Callable[[int], tf.data.Dataset],
    *,
    checkpoint_dir: str,
    every_steps: int,
    keep: int,
    steps_per_epoch: int,
    epochs: int,
    every_minutes: float | None = None,
    log_every_steps: int | None = None,
    boundaries: Sequence[int] = (),
    background: bool = True,
    name: str = "training",
    saved: keras.Model | None = None,
    replicas: Replication | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    **fit_kwargs,
) -> int:
    """`fit_resumably` from the latest checkpoint in `checkpoint_dir`, saving more.

    The model and its optimizer are restored from the latest checkpoint if there
    is one (the rerun says so), then trained to `epochs * steps_per_epoch`.
    Across workers the chief's checkpoints are the run's: the chief restores and
    sends the state to the others, which may not see its disk.
    Checkpoints are written at the log steps where `every_steps` or
    `every_minutes` is due, at the end, and on SIGTERM/SIGINT, from a
    background thread (one write in flight; `CheckpointManager.save`).

    Args:
        model: a compiled `keras.Model`; its weights and optimizer are saved.
        make_dataset: `fn(step) -> tf.data.Dataset` yielding batches from `step` on.
        checkpoint_dir: str. Where the checkpoints are.
        every_steps: int. Steps between checkpoints.
        keep: int. Most recent checkpoints kept.
        steps_per_epoch: int. Steps of a whole epoch.
        epochs: int. Total epochs of the run.
        every_minutes: float or None. Wall-clock minutes between checkpoints.
        log_every_steps: int or None. Steps between log steps (virtual epochs,
            where checkpoints and the NaN check happen). Defaults to `steps_per_epoch`.
        boundaries: global steps where a `fit` call ends (see `fit_resumably`).
        background: bool. Write checkpoints from a thread. Defaults to True.
        name: str. What is trained, for the resume message.
        saved: keras.Model. What the checkpoints hold besides the optimizer
            (e.g. the student of a `Distiller`). Defaults to `model`.
        replicas: `distribute.Replication` or None (one process, the chief). Only
            its chief writes and restores checkpoints.
        callbacks: more Keras callbacks.
        **fit_kwargs: passed to `fit` (verbose...).

    Returns:
        The global step reached.

    Raises:
        TrainingError: training stopped early (a NaN loss); the message names the
            last good checkpoint.
        Preempted: a SIGTERM/SIGINT stopped training after saving.

    Example:
    >>> import os, tempfile, numpy as np
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
    is_chief = replicas is None or replicas.is_chief
    manager = CheckpointManager(checkpoint_dir, keep=keep, clean_temp=is_chief)
    start = _restore(manager, model, saved, replicas, name, steps_per_epoch * epochs)
    checkpoints = CheckpointCallback(manager, every_steps, saved, is_chief=is_chief,
                                     every_minutes=every_minutes, background=background,
                                     steps_per_epoch=steps_per_epoch,
                                     total_steps=steps_per_epoch * epochs)
    try:
        with stop_on_signals(checkpoints):
            step = fit_resumably(
                model, make_dataset, steps_per_epoch=steps_per_epoch, epochs=epochs,
                start_step=start, log_every_steps=log_every_steps, boundaries=boundaries,
                callbacks=[checkpoints, *callbacks],
                should_stop=lambda: bool(checkpoints.stopped_reason or
                                         checkpoints.stop_requested),
                **fit_kwargs)
    except KeyboardInterrupt:  # a second Ctrl-C: go now; a cut write is never the latest
        raise
    except BaseException:
        manager.wait()
        raise
    manager.wait()  # the last write lands (or its error is raised) before we go on
    if checkpoints.stopped_reason:
        raise TrainingError(f"{name.capitalize()} stopped: {checkpoints.stopped_reason}.")
    if checkpoints.stop_requested:
        saved_at = checkpoints.last_saved_step
        raise Preempted(
            f"{name.capitalize()} stopped by {checkpoints.stop_requested} at step "
            f"{saved_at} of {steps_per_epoch * epochs}; checkpoint "
            f"{manager.path_for(saved_at)} saved. Rerun the same command to resume.")
    return step


def _restore(manager: CheckpointManager, model: keras.Model, saved: keras.Model,
             replicas: Replication | None, name: str, total: int) -> int:
    """Restores the chief's latest checkpoint on every worker; returns its step (0: none)."""
    is_chief = replicas is None or replicas.is_chief
    found = is_chief and manager.latest() is not None
    if replicas is not None:
        found = bool(replicas.chief_value(found))
    if not found:
        return 0
    where = "the chief's checkpoint"
    if is_chief:
        where = manager.restore(saved, model.optimizer)["path"]  # the newest that loads
    elif not model.optimizer.built:  # as the chief's restore builds it
        model.optimizer.build(saved.trainable_variables)
    if replicas is not None:
        replicas.broadcast_from_chief([*saved.weights, *model.optimizer.variables])
    start = global_step(model.optimizer)
    # Always said, whatever the verbosity: a resumed run must be visible in the log.
    print(f"Resuming {name} from step {start} of {total} ({where}).", flush=True)
    return start
