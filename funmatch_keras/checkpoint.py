"""Checkpoint storage: atomic, verified saves and restores of student + optimizer state.

A checkpoint is a directory `ckpt-<step:09d>/` holding

- `student.npz`: every `student.weights` array, keyed `v00000`, `v00001`, ...
  (format 1 had `student.weights.h5` from `save_weights`; both are restored);
- `optimizer.npz`: every `optimizer.variables` array, keyed the same way;
- `state.json`: step, epoch, user metadata, and the paths, shapes and dtypes of
  the student's and the optimizer's variables (checked before restoring).

The state is copied to host memory first, so the files can be written by a
background thread (`save_in_background`) while training goes on. It is written
into `.tmp-ckpt-<step>-<pid>/`, its files fsynced, then renamed into place, so a crash mid-write never leaves a half checkpoint where `latest()` looks;
leftover temporary directories are removed when a manager starts. Only plain
Keras APIs and NumPy are used, so checkpoints work under the TensorFlow and JAX
backends alike. The teacher is frozen and never stored: "since we don't ever
modify them, we don't store them in checkpoints" (big_vision).

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

import errno
import json
import math
import os
import re
import shutil
import threading
import time
import zipfile
from typing import Any, NamedTuple

import keras
import numpy as np
from absl import logging

STUDENT_ARRAYS_FILE = "student.npz"
STUDENT_FILE = "student.weights.h5"  # format 1; still restored
OPTIMIZER_FILE = "optimizer.npz"
STATE_FILE = "state.json"
FORMAT_VERSION = 2
_CKPT_RE = re.compile(r"^ckpt-(\d+)$")
# In-progress writes and replaced checkpoints; never visible to `latest()`.
_TEMP_PREFIXES = (".tmp-ckpt-", ".old-ckpt-")


class _Snapshot(NamedTuple):
    """A checkpoint's content in host memory, ready to be written."""

    step: int
    student_arrays: list
    optimizer_arrays: list
    state_text: str

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (*self.student_arrays, *self.optimizer_arrays))


class NonFiniteWeightsError(ValueError):
    """Raised by `CheckpointManager.save` when a weight is NaN or infinite."""


def _to_numpy(variable) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(variable))


def _describe(variables) -> list[dict[str, Any]]:
    return [
        {"path": v.path, "shape": list(v.shape), "dtype": str(v.dtype)} for v in variables
    ]


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. directories cannot be opened on Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        return os.path.join(self.directory, f"ckpt-{step:09d}")

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
            if match and os.path.isfile(os.path.join(self.directory, name, STATE_FILE)):
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
            if name.startswith(_TEMP_PREFIXES):
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
    ) -> str:
        """Atomically writes the checkpoint of `step`, then prunes old ones.

        Args:
            step: int. Global training step (the optimizer's `iterations`).
            student: `keras.Model`. Its weights are saved (the teacher never is).
            optimizer: built `keras.optimizers.Optimizer`. All its variables are saved.
            metadata: JSON-serializable dict stored in `state.json`. Defaults to `{}`.
            epoch: int or None. Epochs completed at `step` (informational; resume
                from `step`). Defaults to `None`.

        Returns:
            The checkpoint's directory.

        Raises:
            NonFiniteWeightsError (a `ValueError`): a student weight or an
                optimizer variable is NaN/inf; nothing is written, so a diverged
                run never replaces good checkpoints.

        Example:
        >>> import tempfile
        >>> student = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        >>> optimizer = keras.optimizers.SGD()
        >>> optimizer.build(student.trainable_variables)
        >>> os.path.basename(CheckpointManager(tempfile.mkdtemp()).save(7, student, optimizer))
        'ckpt-000000007'
        """
        self.wait()
        return self._write(self._snapshot(step, student, optimizer, metadata, epoch))

    def save_in_background(
        self,
        step: int,
        student: keras.Model,
        optimizer: keras.optimizers.Optimizer,
        metadata: dict | None = None,
        epoch: int | None = None,
    ) -> str:
        """`save`, with the files written by a thread while training goes on.

        The state is copied to host memory (and checked finite) now; the write,
        fsync, rename and pruning happen in the thread. One write is in flight at
        a time: a save waits for the previous one. A write's error (e.g. a full
        disk) is raised by the next `save*` or `wait`. A crash mid-write leaves
        only a temporary directory, so the previous checkpoint stays the latest.

        Returns:
            The directory the checkpoint will have.

        Example:
        >>> import tempfile
        >>> student = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        >>> optimizer = keras.optimizers.SGD()
        >>> optimizer.build(student.trainable_variables)
        >>> manager = CheckpointManager(tempfile.mkdtemp())
        >>> _ = manager.save_in_background(3, student, optimizer)
        >>> manager.wait()
        >>> manager.all_steps()
        [3]
        """
        snapshot = self._snapshot(step, student, optimizer, metadata, epoch)
        self.wait()
        self._writer = threading.Thread(target=self._write_recording_errors, args=(snapshot,),
                                        name=f"checkpoint-{snapshot.step}",
                                        daemon=True)  # an exit mid-write leaves a temp dir
        self._writer.start()
        return self.path_for(snapshot.step)

    def wait(self) -> None:
        """Blocks until a background write is done; raises its error if it failed."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        error, self._write_error = self._write_error, None
        if error is not None:
            raise error

    def _write_recording_errors(self, snapshot: "_Snapshot") -> None:
        try:
            self._write(snapshot)
        except BaseException as error:  # raised in the training thread by `wait`
            self._write_error = error

    def _snapshot(self, step, student, optimizer, metadata, epoch) -> "_Snapshot":
        step = int(step)
        if step < 0:
            raise ValueError(f"`step` must be >= 0. Received: step={step}")
        if not optimizer.built:
            raise ValueError(
                "The optimizer is not built, so it has no state to save: call "
                "`optimizer.build(student.trainable_variables)` or train first."
            )
        # np.array copies: the training thread keeps updating the variables.
        student_arrays = [np.array(_to_numpy(w)) for w in student.weights]
        optimizer_arrays = [np.array(_to_numpy(v)) for v in optimizer.variables]
        _check_finite(student.weights, student_arrays, step)
        _check_finite(optimizer.variables, optimizer_arrays, step)
        state = {
            "format": FORMAT_VERSION,
            "step": step,
            "epoch": epoch,
            "metadata": metadata or {},
            "saved_at": time.time(),
            "student_variables": _describe(student.weights),
            "optimizer_variables": _describe(optimizer.variables),
        }
        state_text = json.dumps(state, indent=2)  # fails early if metadata is not JSON
        return _Snapshot(step, student_arrays, optimizer_arrays, state_text)

    def _write(self, snapshot: "_Snapshot") -> str:
        step = snapshot.step
        final = self.path_for(step)
        temp = os.path.join(self.directory, f".tmp-ckpt-{step}-{os.getpid()}")
        shutil.rmtree(temp, ignore_errors=True)
        os.makedirs(temp)
        try:
            for name, arrays in ((STUDENT_ARRAYS_FILE, snapshot.student_arrays),
                                 (OPTIMIZER_FILE, snapshot.optimizer_arrays)):
                with open(os.path.join(temp, name), "wb") as f:
                    np.savez(f, **{f"v{i:05d}": a for i, a in enumerate(arrays)})
            # state.json last: `all_steps` requires it, marking a complete checkpoint.
            with open(os.path.join(temp, STATE_FILE), "w") as f:
                f.write(snapshot.state_text)
            for name in os.listdir(temp):
                _fsync_file(os.path.join(temp, name))
            _fsync_dir(temp)
            if os.path.exists(final):  # Saving a step again replaces it.
                old = os.path.join(self.directory, f".old-ckpt-{step}-{os.getpid()}")
                os.replace(final, old)
                os.replace(temp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(temp, final)
            _fsync_dir(self.directory)
        except OSError as error:
            shutil.rmtree(temp, ignore_errors=True)
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            free = shutil.disk_usage(self.directory).free
            raise CheckpointWriteError(
                error.errno,
                f"No space left to write checkpoint {step} in {self.directory!r} "
                f"({free / 2**20:,.0f} MiB free; one checkpoint needs about "
                f"{snapshot.nbytes / 2**20:,.0f} MiB). Nothing half-written was left and "
                "the older checkpoints are intact: free some space (or lower "
                "keep_checkpoints) and rerun the same command to resume.") from None
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        self._prune()
        return final

    def _prune(self) -> None:
        # Counted in intact checkpoints: a newer damaged one never costs a good one.
        steps = self.all_steps()
        intact = [step for step in steps if _intact(self.path_for(step))]
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
            return restore(student, optimizer, path)
        problems = []
        for step in reversed(self.all_steps()):
            candidate = self.path_for(step)
            try:
                state = restore(student, optimizer, candidate)
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


class CheckpointMismatchError(ValueError):
    """A checkpoint holds variables of another architecture or optimizer."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. the disk is full); older ones are intact."""


def _intact(path: str) -> bool:
    """Cheap check: state.json parses and each .npz's zip directory reads."""
    try:
        with open(os.path.join(path, STATE_FILE)) as f:
            json.load(f)
        for name in (STUDENT_ARRAYS_FILE, OPTIMIZER_FILE):
            file = os.path.join(path, name)
            if os.path.exists(file):
                with zipfile.ZipFile(file) as archive:
                    archive.namelist()
    except (OSError, ValueError, zipfile.BadZipFile):
        return False
    return True


def _check_finite(variables, arrays, step: int) -> None:
    for variable, array in zip(variables, arrays):
        if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
            raise NonFiniteWeightsError(
                f"Refusing to save step {step}: {variable.path!r} holds NaN or inf "
                "values (training diverged). The previous checkpoints are kept."
            )


def _check_match(what: str, stored: list[dict], variables, path: str) -> None:
    stored_shapes = [tuple(v["shape"]) for v in stored]
    shapes = [tuple(v.shape) for v in variables]
    if stored_shapes == shapes:
        return
    if len(stored_shapes) != len(shapes):
        detail = f"it holds {len(stored_shapes)} {what} variables, the model {len(shapes)}"
    else:
        i = next(i for i, (a, b) in enumerate(zip(stored_shapes, shapes)) if a != b)
        detail = (
            f"{what} variable {i} ({variables[i].path!r}) has shape {shapes[i]} "
            f"but the checkpoint's ({stored[i]['path']!r}) has {stored_shapes[i]}"
        )
    raise CheckpointMismatchError(
        f"Checkpoint {path!r} does not match: {detail}. It was saved from a "
        "different architecture or optimizer; build the same student (spec, "
        "num_classes, image size) and optimizer, or use another workdir."
    )


def restore(
    student: keras.Model,
    optimizer: keras.optimizers.Optimizer | None,
    path: str,
) -> dict[str, Any]:
    """Loads the checkpoint directory `path`; see `CheckpointManager.restore`."""
    state_path = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state_path):
        raise FileNotFoundError(f"{path!r} is not a complete checkpoint (no {STATE_FILE}).")
    with open(state_path) as f:
        try:
            state = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{STATE_FILE} is not valid JSON ({error})") from None
    _check_match("student", state["student_variables"], student.weights, path)
    if optimizer is not None:
        if not optimizer.built:
            optimizer.build(student.trainable_variables)
        _check_match("optimizer", state["optimizer_variables"], optimizer.variables, path)
    # Everything is read before anything is assigned: a damaged file leaves the
    # models untouched (and `CheckpointManager.restore` tries an older checkpoint).
    assignments = []
    if optimizer is not None:
        assignments += zip(optimizer.variables,
                           _read_arrays(os.path.join(path, OPTIMIZER_FILE),
                                        len(optimizer.variables)))
    student_arrays = os.path.join(path, STUDENT_ARRAYS_FILE)
    if os.path.isfile(student_arrays):
        assignments += zip(student.weights, _read_arrays(student_arrays, len(student.weights)))
    else:  # format 1
        student.load_weights(os.path.join(path, STUDENT_FILE))
    for variable, array in assignments:
        variable.assign(array)
    state["path"] = path
    return state


def _read_arrays(path: str, count: int) -> list[np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return [npz[f"v{i:05d}"] for i in range(count)]
