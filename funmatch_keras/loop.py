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

import contextlib
import math
import os
import signal
import threading
import time
from typing import Callable, Iterator, Sequence

import keras
import tensorflow as tf
from absl import logging

from funmatch_keras.checkpoint import CheckpointManager, NonFiniteWeightsError


class TrainingError(RuntimeError):
    """Training stopped early (e.g. a NaN loss); checkpoints are intact."""


class Preempted(RuntimeError):
    """Training stopped on SIGTERM or SIGINT after saving a checkpoint; rerun to resume."""


# Sent before a machine is taken away (cloud VMs, spot instances) and by Ctrl-C.
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def stop_on_signals(callback: "CheckpointCallback") -> Iterator[None]:
    """While inside, SIGTERM and SIGINT ask `callback` to save and stop.

    The first signal is handled (the step in flight finishes, a checkpoint is
    saved, `fit` returns); the default handlers are then back, so a second
    Ctrl-C exits at once, leaving the last complete checkpoint intact (writes
    are atomic). Outside the main thread signals cannot be caught: no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in PREEMPTION_SIGNALS}

    def handle(signum, frame):
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        name = signal.Signals(signum).name
        print(f"Received {name}: saving a checkpoint after this step "
              "(send it again to stop at once).", flush=True)
        callback.request_stop(name)

    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, handle)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def fit_resumably(
    model: keras.Model,
    make_dataset: Callable[[int], tf.data.Dataset],
    *,
    steps_per_epoch: int,
    epochs: int,
    start_step: int = 0,
    log_every_steps: int | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    should_stop: Callable[[], bool] = lambda: False,
    **fit_kwargs,
) -> int:
    """Runs `model.fit` from global step `start_step` to `epochs * steps_per_epoch`.

    `fit` runs over virtual epochs of `log_every_steps` steps, aligned on the
    global step, so Keras's epoch end (metrics read, callbacks, validation) is
    the log step, whatever the dataset's epoch length (2 steps on Flowers102).
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
    for begin, end in _intervals(start_step, total, interval):
        if should_stop():
            break
        length = min(end - begin, interval)
        before = _global_step(model.optimizer)
        model.fit(_first_steps(make_dataset(begin), end - begin, per_call),
                  initial_epoch=begin // interval,
                  epochs=begin // interval + (end - begin) // length,
                  steps_per_epoch=length, callbacks=list(callbacks),
                  shuffle=False,  # the pipelines shuffle; Keras would warn otherwise
                  **fit_kwargs)
        step = begin + _global_step(model.optimizer) - before
        if model.stop_training:  # a NaN or a signal
            break
    return step


def _intervals(start: int, total: int, interval: int) -> list[tuple[int, int]]:
    """`fit` calls as `(begin, end)` steps: the rest of a started interval, whole
    intervals, then a short last one.

    >>> _intervals(3, 20, 4)
    [(3, 4), (4, 20)]
    >>> _intervals(0, 10, 4)
    [(0, 8), (8, 10)]
    """
    calls, step = [], start
    if step % interval and step < total:
        calls.append((step, min(total, step - step % interval + interval)))
        step = calls[-1][1]
    whole = total - total % interval
    if step < whole:
        calls.append((step, whole))
        step = whole
    if step < total:
        calls.append((step, total))
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
    background: bool = True,
    name: str = "training",
    saved: keras.Model | None = None,
    is_chief: bool = True,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    **fit_kwargs,
) -> int:
    """`fit_resumably` from the latest checkpoint in `checkpoint_dir`, saving more.

    The model and its optimizer are restored from the latest checkpoint if there
    is one (the rerun says so), then trained to `epochs * steps_per_epoch`.
    Checkpoints are written at the log steps where `every_steps` or
    `every_minutes` is due, at the end, and on SIGTERM/SIGINT, from a
    background thread (one write in flight; `CheckpointManager.save_in_background`).

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
        background: bool. Write checkpoints from a thread. Defaults to True.
        name: str. What is trained, for the resume message.
        saved: keras.Model. What the checkpoints hold besides the optimizer
            (e.g. the student of a `Distiller`). Defaults to `model`.
        is_chief: bool. Whether this process writes checkpoints.
        callbacks: more Keras callbacks.
        **fit_kwargs: passed to `fit` (verbose...).

    Returns:
        The global step reached.

    Raises:
        TrainingError: training stopped early (a NaN loss); the message names the
            last good checkpoint.
        Preempted: a SIGTERM/SIGINT stopped training after saving.

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
        state = manager.restore(saved, model.optimizer)  # the newest that loads
        start = int(state["step"])
        # Always said, whatever the verbosity: a resumed run must be visible in the log.
        print(f"Resuming {name} from step {start} of {steps_per_epoch * epochs} "
              f"({state['path']}).", flush=True)
    checkpoints = CheckpointCallback(manager, every_steps, saved, is_chief=is_chief,
                                     every_minutes=every_minutes, background=background,
                                     steps_per_epoch=steps_per_epoch,
                                     total_steps=steps_per_epoch * epochs)
    try:
        with stop_on_signals(checkpoints):
            step = fit_resumably(
                model, make_dataset, steps_per_epoch=steps_per_epoch, epochs=epochs,
                start_step=start, log_every_steps=log_every_steps,
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


def _global_step(optimizer: keras.optimizers.Optimizer) -> int:
    return int(keras.ops.convert_to_numpy(optimizer.iterations))


class CheckpointCallback(keras.callbacks.Callback):
    """Saves the student and optimizer on a step and a wall-clock cadence, and at the end.

    It acts at Keras epoch ends, which `fit_resumably` makes the log steps
    (virtual epochs of `log_every_steps`), so it adds no host-device sync per
    step, and works with any `steps_per_execution`. A checkpoint is written at
    the first epoch end at or past each multiple of `every_steps`, when
    `every_minutes` have passed since the last one, when training ends, and
    after `request_stop` (a preemption signal; the batch in flight finishes,
    `fit` returns, the save happens at training end). Never merely because a
    dataset epoch ended: the paper's small datasets have epochs of 2 steps.
    The global step is the optimizer's `iterations`, so counting survives
    restarts. A step is never saved twice. When the interval's loss is NaN/inf,
    or the weights became non-finite, training stops without saving, and the
    log says which checkpoint is the last good one.

    Args:
        manager: `CheckpointManager`.
        every_steps: int. Save when the global step crosses a multiple of it.
        student: `keras.Model`. The model saved (e.g. `distiller.student`).
        get_metadata: callable returning a JSON-serializable dict stored with
            each checkpoint (e.g. the config and data position). Defaults to None.
        is_chief: bool. Only the chief writes; other workers do nothing.
            Defaults to `True`.
        every_minutes: float or None. Also save when this much wall time has
            passed since the last save. Defaults to None (steps only).
        background: bool. Write from a thread after copying the state to host
            memory (`CheckpointManager.save_in_background`); call
            `manager.wait()` before relying on the files. Defaults to False.
        steps_per_epoch: int or None. Records completed dataset epochs in each
            checkpoint (informational). Defaults to None (Keras epochs).
        total_steps: int or None. When set, the save at training end happens
            only at this step or after a stop request (`fit_resumably` splits a
            run into several `fit` calls). Defaults to None: every training end.
        clock: callable returning seconds (tests inject one). Defaults to
            `time.monotonic`.

    Example:
    >>> import tempfile
    >>> import numpy as np
    >>> student = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> student.compile(optimizer="sgd", loss="mse")
    >>> manager = CheckpointManager(tempfile.mkdtemp(), keep=5)
    >>> callback = CheckpointCallback(manager, every_steps=6, student=student)
    >>> _ = student.fit(np.ones((8, 2)), np.ones((8, 1)), batch_size=2, epochs=4,
    ...                 callbacks=[callback], verbose=0)
    >>> manager.all_steps()  # epoch ends at or past 6 and 12, and the end; not 4
    [8, 12, 16]
    """

    def __init__(
        self,
        manager: CheckpointManager,
        every_steps: int,
        student: keras.Model,
        get_metadata: Callable[[], dict] | None = None,
        is_chief: bool = True,
        every_minutes: float | None = None,
        background: bool = False,
        steps_per_epoch: int | None = None,
        total_steps: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        super().__init__()
        if not isinstance(every_steps, int) or every_steps < 1:
            raise ValueError(
                f"`every_steps` must be an int >= 1. Received: every_steps={every_steps!r}"
            )
        if every_minutes is not None and not every_minutes > 0:
            raise ValueError(f"`every_minutes` must be > 0 or None. Received: "
                             f"every_minutes={every_minutes!r}")
        self.manager = manager
        self.every_steps = every_steps
        self.every_seconds = None if every_minutes is None else 60.0 * every_minutes
        self.student = student
        self.get_metadata = get_metadata
        self.is_chief = is_chief
        self.background = background
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps
        self.clock = clock
        latest = manager.latest()
        self.last_saved_step = latest[0] if latest else None
        self.stopped_reason: str | None = None
        self.stop_requested: str | None = None  # e.g. "SIGTERM", set by `request_stop`
        self._last_save_time = clock()
        self._epoch = 0
        self._step = 0

    def request_stop(self, reason: str) -> None:
        """Stop after the batch in flight and save (safe in a signal handler)."""
        self.stop_requested = reason
        if self.model is not None:
            self.model.stop_training = True  # Keras checks it after every call

    def _stop(self, reason: str) -> None:
        self.manager.wait()
        latest = self.manager.latest()
        good = f"step {latest[0]}" if latest else "none (no checkpoint was saved)"
        self.stopped_reason = f"{reason}; the last good checkpoint is {good}"
        logging.error("%s", self.stopped_reason)
        self.model.stop_training = True

    def _save(self, step: int) -> None:
        if not self.is_chief or self.stopped_reason or step == self.last_saved_step:
            return
        metadata = self.get_metadata() if self.get_metadata else {}
        epoch = step // self.steps_per_epoch if self.steps_per_epoch else self._epoch
        save = self.manager.save_in_background if self.background else self.manager.save
        try:
            # Read through `self.model`: under JAX, accessing it syncs the training
            # state back into the variables before we read them.
            save(step, self.student, self.model.optimizer, metadata, epoch=epoch)
        except NonFiniteWeightsError:
            self._stop(f"weights became NaN/inf at step {step}")
            return
        self.last_saved_step = step
        self._last_save_time = self.clock()

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.stopped_reason = None
        self._step = _global_step(self.model.optimizer)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch + 1  # completed: a save at the end records it
        previous, self._step = self._step, _global_step(self.model.optimizer)
        loss = (logs or {}).get("loss")  # the interval's mean: NaN if any step was
        if loss is not None and not math.isfinite(float(loss)):
            self._stop(f"loss became NaN by step {self._step}")
            return
        if self.stop_requested:
            return  # saved at training end, once `fit` has stopped
        # `//` rather than `%`: epoch ends need not fall on multiples.
        due = self._step // self.every_steps > previous // self.every_steps
        if not due and self.every_seconds is not None:
            due = self.clock() - self._last_save_time >= self.every_seconds
        if due:
            self._save(self._step)

    def on_train_end(self, logs: dict | None = None) -> None:
        step = _global_step(self.model.optimizer)
        if self.total_steps is None or step >= self.total_steps or self.stop_requested:
            self._save(step)
