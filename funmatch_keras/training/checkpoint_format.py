"""One checkpoint directory on disk: snapshot the state, write it atomically, check, read.

A checkpoint is a directory `ckpt-<step:09d>/` holding

- `student.npz`: every `student.weights` array, keyed `v00000`, `v00001`, ...
  (format 1 had `student.weights.h5` from `save_weights`; both are restored);
- `optimizer.npz`: every `optimizer.variables` array, keyed the same way;
- `state.json`: step, epoch, user metadata, and the paths, shapes and dtypes of
  the student's and the optimizer's variables (checked before restoring).

`snapshot` copies the state to host memory, so `write` may run in another
thread while training goes on. `write` fills `.tmp-ckpt-<step>-<pid>/`, fsyncs
its files, then renames it into place, so a crash mid-write never leaves a half
checkpoint under a `ckpt-*` name. Only plain Keras APIs and NumPy are used, so
checkpoints work under the TensorFlow and JAX backends alike. Listing, pruning
and background writes are `funmatch_keras.training.checkpoint.CheckpointManager`'s.

Example:
>>> import tempfile
>>> student = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
>>> optimizer = keras.optimizers.SGD()
>>> optimizer.build(student.trainable_variables)
>>> path = write(snapshot(5, student, optimizer), tempfile.mkdtemp())
>>> os.path.basename(path), intact(path), restore(student, optimizer, path)["step"]
('ckpt-000000005', True, 5)
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
import zipfile
from typing import Any, NamedTuple

import keras
import numpy as np

STUDENT_ARRAYS_FILE = "student.npz"
STUDENT_FILE = "student.weights.h5"  # format 1; still restored
OPTIMIZER_FILE = "optimizer.npz"
STATE_FILE = "state.json"
FORMAT_VERSION = 2
# In-progress writes and replaced checkpoints; never taken for checkpoints.
TEMP_PREFIXES = (".tmp-ckpt-", ".old-ckpt-")


class NonFiniteWeightsError(ValueError):
    """Raised by `snapshot` (so by every save) when a weight is NaN or infinite."""


class CheckpointMismatchError(ValueError):
    """A checkpoint holds variables of another architecture or optimizer."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. the disk is full); older ones are intact."""


class Snapshot(NamedTuple):
    """A checkpoint's content in host memory, ready to be written."""

    step: int
    student_arrays: list
    optimizer_arrays: list
    state_text: str

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (*self.student_arrays, *self.optimizer_arrays))


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint at `step`.

    >>> checkpoint_name(12)
    'ckpt-000000012'
    """
    return f"ckpt-{step:09d}"


def snapshot(step: int, student: keras.Model, optimizer: keras.optimizers.Optimizer,
             metadata: dict | None = None, epoch: int | None = None) -> Snapshot:
    """Copies the student's weights and the optimizer's variables to host memory.

    Raises:
        NonFiniteWeightsError (a `ValueError`): a value is NaN/inf, so a
            diverged run never replaces good checkpoints.
        ValueError: `step < 0`, an unbuilt optimizer, or metadata that is not JSON.
    """
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
    return Snapshot(step, student_arrays, optimizer_arrays, state_text)


def write(content: Snapshot, directory: str) -> str:
    """Writes `content` as `directory/ckpt-<step>` atomically; returns that path.

    An existing checkpoint of the same step is replaced.

    Raises:
        CheckpointWriteError (an `OSError`): the disk or quota is full; nothing
            half-written is left.
    """
    step = content.step
    final = os.path.join(directory, checkpoint_name(step))
    temp = os.path.join(directory, f"{TEMP_PREFIXES[0]}{step}-{os.getpid()}")
    shutil.rmtree(temp, ignore_errors=True)
    os.makedirs(temp)
    try:
        for name, arrays in ((STUDENT_ARRAYS_FILE, content.student_arrays),
                             (OPTIMIZER_FILE, content.optimizer_arrays)):
            with open(os.path.join(temp, name), "wb") as f:
                np.savez(f, **{f"v{i:05d}": a for i, a in enumerate(arrays)})
        # state.json last: listing requires it, marking a complete checkpoint.
        with open(os.path.join(temp, STATE_FILE), "w") as f:
            f.write(content.state_text)
        for name in os.listdir(temp):
            _fsync_file(os.path.join(temp, name))
        _fsync_dir(temp)
        if os.path.exists(final):  # Saving a step again replaces it.
            old = os.path.join(directory, f"{TEMP_PREFIXES[1]}{step}-{os.getpid()}")
            os.replace(final, old)
            os.replace(temp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temp, final)
        _fsync_dir(directory)
    except OSError as error:
        shutil.rmtree(temp, ignore_errors=True)
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        free = shutil.disk_usage(directory).free
        raise CheckpointWriteError(
            error.errno,
            f"No space left to write checkpoint {step} in {directory!r} "
            f"({free / 2**20:,.0f} MiB free; one checkpoint needs about "
            f"{content.nbytes / 2**20:,.0f} MiB). Nothing half-written was left and "
            "the older checkpoints are intact: free some space (or lower "
            "keep_checkpoints) and rerun the same command to resume.") from None
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return final


def intact(path: str) -> bool:
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


def restore(
    student: keras.Model,
    optimizer: keras.optimizers.Optimizer | None,
    path: str,
) -> dict[str, Any]:
    """Loads the checkpoint directory `path` into `student` (and `optimizer`).

    Both are checked against the stored variable counts and shapes, and every
    file is read, before anything is assigned: a mismatch or a damaged file
    leaves the models untouched.

    Returns:
        The state dict, with `path` added.

    Raises:
        FileNotFoundError: `path` has no `state.json`.
        CheckpointMismatchError (a `ValueError`): another architecture or optimizer.
        ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile: damaged files.
    """
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


def _to_numpy(variable) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(variable))


def _describe(variables) -> list[dict[str, Any]]:
    return [
        {"path": v.path, "shape": list(v.shape), "dtype": str(v.dtype)} for v in variables
    ]


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
