"""Saving during `fit`: the checkpoint callback (step and time cadence, NaN stop), signals.

`CheckpointCallback` writes the student and optimizer through a
`CheckpointManager` at Keras epoch ends, which `loop.fit_resumably` makes the
log steps; `stop_on_signals` turns SIGTERM/SIGINT into "save, then stop".
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from typing import Callable, Iterator

import keras
from absl import logging

from funmatch_keras.optim.optimizers import global_step
from funmatch_keras.training.checkpoint import CheckpointManager
from funmatch_keras.training.checkpoint_format import NonFiniteWeightsError
from funmatch_keras.training.steplog import StepCadence, crossed_multiple

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


class CheckpointCallback(StepCadence):
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
            memory (`CheckpointManager.save(..., background=True)`); call
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
        super().__init__(steps_per_epoch=steps_per_epoch, total_steps=total_steps, clock=clock)
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
        latest = manager.latest()
        self.last_saved_step = latest[0] if latest else None
        self.stopped_reason: str | None = None
        self.stop_requested: str | None = None  # e.g. "SIGTERM", set by `request_stop`
        self._last_save_time = clock()
        self._epoch = 0

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
        try:
            # Read through `self.model`: under JAX, accessing it syncs the training
            # state back into the variables before we read them.
            self.manager.save(step, self.student, self.model.optimizer, metadata,
                              epoch=epoch, background=self.background)
        except NonFiniteWeightsError:
            self._stop(f"weights became NaN/inf at step {step}")
            return
        self.last_saved_step = step
        self._last_save_time = self.clock()

    def on_train_begin(self, logs: dict | None = None) -> None:
        super().on_train_begin(logs)
        self.stopped_reason = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch + 1  # completed: a save at the end records it
        previous, step = self._advance()
        loss = (logs or {}).get("loss")  # the interval's mean: NaN if any step was
        if loss is not None and not math.isfinite(float(loss)):
            self._stop(f"loss became NaN by step {step}")
            return
        if self.stop_requested:
            return  # saved at training end, once `fit` has stopped
        due = crossed_multiple(previous, step, self.every_steps)
        if not due and self.every_seconds is not None:
            due = self.clock() - self._last_save_time >= self.every_seconds
        if due:
            self._save(step)

    def on_train_end(self, logs: dict | None = None) -> None:
        step = global_step(self.model.optimizer)
        if self.total_steps is None or step >= self.total_steps or self.stop_requested:
            self._save(step)
