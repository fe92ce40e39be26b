"""Checkpoint storage: atomic, verified saves and restores of student + optimizer state.

A checkpoint is a directory `ckpt-<step:09d>/` holding

- `student.weights.h5`: `student.save_weights` (the student alone);
- `optimizer.npz`: every `optimizer.variables` array, keyed `v00000`, `v00001`, ...;
- `state.json`: step, epoch, user metadata, and the paths, shapes and dtypes of
  the student's and the optimizer's variables (checked before restoring).

It is written into `.tmp-ckpt-<step>-<pid>/`, its files fsynced, then renamed into
place, so a crash mid-write never leaves a half checkpoint where `latest()` looks;
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

import json
import math
import os
import re
import shutil
import time
from typing import Any

import keras
import numpy as np
from absl import logging

STUDENT_FILE = "student.weights.h5"
OPTIMIZER_FILE = "optimizer.npz"
STATE_FILE = "state.json"
FORMAT_VERSION = 1
_CKPT_RE = re.compile(r"^ckpt-(\d+)$")
# In-progress writes and replaced checkpoints; never visible to `latest()`.
_TEMP_PREFIXES = (".tmp-ckpt-", ".old-ckpt-")


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
        step = int(step)
        if step < 0:
            raise ValueError(f"`step` must be >= 0. Received: step={step}")
        if not optimizer.built:
            raise ValueError(
                "The optimizer is not built, so it has no state to save: call "
                "`optimizer.build(student.trainable_variables)` or train first."
            )
        optimizer_arrays = [_to_numpy(v) for v in optimizer.variables]
        _check_finite(student.weights, [_to_numpy(w) for w in student.weights], step)
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

        final = self.path_for(step)
        temp = os.path.join(self.directory, f".tmp-ckpt-{step}-{os.getpid()}")
        shutil.rmtree(temp, ignore_errors=True)
        os.makedirs(temp)
        try:
            student.save_weights(os.path.join(temp, STUDENT_FILE))
            with open(os.path.join(temp, OPTIMIZER_FILE), "wb") as f:
                np.savez(f, **{f"v{i:05d}": a for i, a in enumerate(optimizer_arrays)})
            # state.json last: `all_steps` requires it, marking a complete checkpoint.
            with open(os.path.join(temp, STATE_FILE), "w") as f:
                f.write(state_text)
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
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        self._prune()
        return final

    def _prune(self) -> None:
        for step in self.all_steps()[: -self.keep]:
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

        Returns:
            The state dict: `step`, `epoch`, `metadata`, variable descriptions.

        Raises:
            FileNotFoundError: no checkpoint.
            ValueError: the checkpoint does not match the student or optimizer.
        """
        if path is None:
            latest = self.latest()
            if latest is None:
                raise FileNotFoundError(f"No checkpoint in {self.directory!r}.")
            path = latest[1]
        return restore(student, optimizer, path)


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
    raise ValueError(
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
        state = json.load(f)
    _check_match("student", state["student_variables"], student.weights, path)
    arrays = None
    if optimizer is not None:
        if not optimizer.built:
            optimizer.build(student.trainable_variables)
        _check_match("optimizer", state["optimizer_variables"], optimizer.variables, path)
        with np.load(os.path.join(path, OPTIMIZER_FILE), allow_pickle=False) as npz:
            arrays = [npz[f"v{i:05d}"] for i in range(len(optimizer.variables))]
    student.load_weights(os.path.join(path, STUDENT_FILE))
    if arrays is not None:
        for variable, array in zip(optimizer.variables, arrays):
            variable.assign(array)
    return state
