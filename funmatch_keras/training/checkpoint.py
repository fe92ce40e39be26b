"""Checkpoint management: save (in the foreground or a background thread), list, prune, restore.

`CheckpointManager` keeps the `ckpt-<step>` directories of one run (their
format is `funmatch_keras.training.checkpoint_format`'s): it writes new ones atomically,
optionally from a thread while training goes on, keeps the newest `keep`
intact ones, and restores the newest one that loads, skipping damaged ones.
Leftover temporary directories of interrupted writes are removed when a manager
starts. The teacher is frozen and never stored: "since we don't ever modify
them, we don't store them in checkpoints" (big_vision).

Example:
>>> import tempfile
>>> import keras
>>> student = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
>>> optimizer = keras.optimizers.Adam()
>>> optimizer.build(student.trainable_variables)
>>> manager = CheckpointManager(tempfile.mkdtemp(), keep=2)
>>> path = manager.save(10, student, optimizer, {"note": "hi"})
>>> manager.restore(student, optimizer)["metadata"]
{'note': 'hi'}
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import zipfile
from typing import Any

import keras
from absl import logging

from funmatch_keras.training import checkpoint_format
from funmatch_keras.training.checkpoint_format import CheckpointMismatchError

_CKPT_RE = re.compile(r"^ckpt-(\d+)$")


class CheckpointManager:
    """Saves, lists, prunes and restores student + optimizer checkpoints in a directory.

    Args:
        directory: str. Where `ckpt-<step>` directories live (created if needed).
        keep: int. How many checkpoints (the highest steps) to keep. Defaults to `3`.
        clean_temp: bool. Remove leftover temporary directories of interrupted
            saves now. Pass `False` on non-chief workers that share the directory
            with a chief that may be writing. Defaults to `True`.

    Example:
    >>> import tempfile
    >>> manager = CheckpointManager(tempfile.mkdtemp())
    >>> manager.latest() is None
    True
    """

    def __init__(self, directory: str, keep: int = 3, clean_temp: bool = True):
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"`keep` must be an int >= 1. Received: keep={keep!r}")
        self.directory = os.fspath(directory)
        self.keep = keep
        os.makedirs(self.directory, exist_ok=True)
        self._writer: threading.Thread | None = None
        self._write_error: BaseException | None = None
        if clean_temp:
            self.clean_temp()

    # -- listing ---------------------------------------------------------------

    def path_for(self, step: int) -> str:
        """The directory of the checkpoint at `step`."""
        return os.path.join(self.directory, checkpoint_format.checkpoint_name(step))

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending.

        Example:
        >>> import tempfile
        >>> CheckpointManager(tempfile.mkdtemp()).all_steps()
        []
        """
        steps = []
        for name in os.listdir(self.directory):
            match = _CKPT_RE.match(name)
            if match and os.path.isfile(
                    os.path.join(self.directory, name, checkpoint_format.STATE_FILE)):
                steps.append(int(match.group(1)))
        return sorted(steps)

    def latest(self) -> tuple[int, str] | None:
        """`(step, path)` of the newest complete checkpoint, or None."""
        steps = self.all_steps()
        return (steps[-1], self.path_for(steps[-1])) if steps else None

    def clean_temp(self) -> list[str]:
        """Removes temporary directories left by interrupted saves; returns their names."""
        removed = []
        for name in os.listdir(self.directory):
            if name.startswith(checkpoint_format.TEMP_PREFIXES):
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
                removed.append(name)
        if removed:
            logging.info("Removed unfinished checkpoint writes: %s", removed)
        return removed

    # -- saving ----------------------------------------------------------------

    def save(
        self,
        step: int,
        student: keras.Model,
        optimizer: keras.optimizers.Optimizer,
        metadata: dict | None = None,
        epoch: int | None = None,
        background: bool = False,
    ) -> str:
        """Atomically writes the checkpoint of `step`, then prunes old ones.

        The state is copied to host memory (and checked finite) now. With
        `background=True`, the write, fsync, rename and pruning happen in a
        thread while training goes on: one write is in flight at a time (a save
        waits for the previous one), and a write's error (e.g. a full disk) is
        raised by the next `save` or `wait`. A crash mid-write leaves only a
        temporary directory, so the previous checkpoint stays the latest.

        Args:
            step: int. Global training step (the optimizer's `iterations`).
            student: `keras.Model`. Its weights are saved (the teacher never is).
            optimizer: built `keras.optimizers.Optimizer`. All its variables are saved.
            metadata: JSON-serializable dict stored in `state.json`. Defaults to `{}`.
            epoch: int or None. Epochs completed at `step` (informational; resume
                from `step`). Defaults to `None`.
            background: bool. Write from a thread; call `wait()` before relying
                on the files. Defaults to False.

        Returns:
            The checkpoint's directory (once written, for a background save).

        Raises:
            NonFiniteWeightsError (a `ValueError`): a student weight or an
                optimizer variable is NaN/inf; nothing is written, so a diverged
                run never replaces good checkpoints.
            CheckpointWriteError (an `OSError`): the disk is full.

        Example:
        >>> import tempfile
        >>> student = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        >>> optimizer = keras.optimizers.SGD()
        >>> optimizer.build(student.trainable_variables)
        >>> manager = CheckpointManager(tempfile.mkdtemp())
        >>> os.path.basename(manager.save(7, student, optimizer))
        'ckpt-000000007'
        >>> _ = manager.save(9, student, optimizer, background=True)
        >>> manager.wait()
        >>> manager.all_steps()
        [7, 9]
        """
        content = checkpoint_format.snapshot(step, student, optimizer, metadata, epoch)
        self.wait()
        if not background:
            return self._write(content)
        self._writer = threading.Thread(target=self._write_recording_errors, args=(content,),
                                        name=f"checkpoint-{content.step}",
                                        daemon=True)  # an exit mid-write leaves a temp dir
        self._writer.start()
        return self.path_for(content.step)

    def wait(self) -> None:
        """Blocks until a background write is done; raises its error if it failed."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        error, self._write_error = self._write_error, None
        if error is not None:
            raise error

    def _write_recording_errors(self, content: checkpoint_format.Snapshot) -> None:
        try:
            self._write(content)
        except BaseException as error:  # raised in the training thread by `wait`
            self._write_error = error

    def _write(self, content: checkpoint_format.Snapshot) -> str:
        path = checkpoint_format.write(content, self.directory)
        self._prune()
        return path

    def _prune(self) -> None:
        # Counted in intact checkpoints: a newer damaged one never costs a good one.
        steps = self.all_steps()
        intact = [step for step in steps if checkpoint_format.intact(self.path_for(step))]
        if len(intact) <= self.keep:
            return
        oldest_kept = intact[-self.keep]
        for step in steps:
            if step < oldest_kept:
                shutil.rmtree(self.path_for(step), ignore_errors=True)

    # -- restoring -------------------------------------------------------------

    def restore(
        self,
        student: keras.Model,
        optimizer: keras.optimizers.Optimizer | None = None,
        path: str | None = None,
    ) -> dict[str, Any]:
        """Loads a checkpoint into `student` (and `optimizer`); returns its `state.json`.

        Both are checked against the stored variable counts and shapes before
        anything is loaded, so a mismatch leaves the models untouched. Under a
        `tf.distribute` strategy, call it inside `strategy.scope()`.

        Args:
            student: `keras.Model` of the architecture that was saved.
            optimizer: `keras.optimizers.Optimizer` or None (student only). Built
                on `student.trainable_variables` first if it is not built.
            path: str. A checkpoint directory. Defaults to `latest()`.

        Without `path`, the newest checkpoint that loads is used: a damaged one
        (a truncated file, a broken `state.json`) is skipped with a warning that
        says why, and left in place.

        Returns:
            The state dict: `step`, `epoch`, `metadata`, variable descriptions,
            and `path`, the checkpoint restored.

        Raises:
            FileNotFoundError: no checkpoint, or none that loads.
            CheckpointMismatchError (a `ValueError`): the checkpoint does not
                match the student or optimizer.
        """
        if path is not None:
            return checkpoint_format.restore(student, optimizer, path)
        problems = []
        for step in reversed(self.all_steps()):
            candidate = self.path_for(step)
            try:
                state = checkpoint_format.restore(student, optimizer, candidate)
            except CheckpointMismatchError:
                raise
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
                problems.append(f"{os.path.basename(candidate)}: {error}")
                logging.warning("Checkpoint %s is damaged (%s); trying the one before.",
                                candidate, error)
                print(f"Skipping damaged checkpoint {candidate} ({error}).", flush=True)
                continue
            return state
        if not problems:
            raise FileNotFoundError(f"No checkpoint in {self.directory!r}.")
        raise FileNotFoundError(
            f"No checkpoint in {self.directory!r} loads ({'; '.join(problems)}). Move the "
            "checkpoints directory aside to start this run over.")
