"""A teacher store: the teacher's logits of every training step, computed once for a sweep.

With one data seed, every run of a sweep (over lr, wd, T, or students) feeds its
teacher the same images at each global step: the same crops, flips and mixup
partners (`data.train_pipeline` is seeded and resumes exactly). A store records
the teacher's logits of step k once (float32 by default, exactly; or a cheaper
encoding, see `encode_logits`): by the first run itself, as it trains
(`StoreRecorder`), or by a teacher-only pass ahead (`TeacherStore.fill`). Every
later run that shares the fingerprint and the encoding replays them as
`{"student": x, "teacher_logits": l}` batches and never runs the teacher in its
step; `check_step` refuses a run whose batches are not the recorded ones.

Layout of the directory:
- `store.json`: format version, fingerprint, encoding, steps per chunk, classes,
  and the teacher compute path the logits were computed on;
- `chunk-<k>-<sha256>.npy`: the logits of global steps `[k*C, k*C + rows)`
  (`C` steps per chunk) in the store's encoding (`encode_logits`): an array
  `[rows, batch, classes]` (float32, float16, or bfloat16 as uint16 bits) or,
  for `"top<K>"`, `[rows, batch, 2K + 1]`; written atomically, named by the
  sha256 of its bytes. Which chunks a store holds is read from the names and
  the `.npy` headers (`stored_rows`: a truncated file is not held), so that a
  run's start does not read the store; the bytes are checked when a chunk is
  read. A chunk that fails either check is never fed to the loss: it is
  deleted, with a warning, and recomputed. Reading decodes it to float32
  `[rows, batch, classes]` (`decode_logits`);
- `chunk-<k>.claim`: held (O_EXCL) by the process computing chunk k, so that
  processes sharing a store compute each chunk once; a claim whose process
  died is taken over.

Example:
>>> import tempfile
>>> store = TeacherStore.open(tempfile.mkdtemp(), {"seed": 0}, num_classes=3,
...                           batch_size=2, steps_per_chunk=4)
>>> store.write_chunk(0, np.ones([4, 2, 3], np.float32))
>>> store.read_chunk(0).shape, store.missing(0, 6)
((4, 2, 3), [1])
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import socket
import time
from typing import Any, Callable, Iterator, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from funmatch_keras import atomic
from funmatch_keras.distiller import STUDENT_KEY, TEACHER_LOGITS_KEY
from funmatch_keras.recipe import store_encoding_k

FORMAT_VERSION = 1
META_FILE = "store.json"
# 64 steps of Flowers102's batch 512 x 102 classes: 13 MB a chunk in float32.
DEFAULT_STEPS_PER_CHUNK = 64
_CHUNK = re.compile(r"^chunk-(\d{7})-([0-9a-f]{64})\.npy$")
_WAIT_S = 0.2  # polling interval for a chunk another process computes


class StoreMismatchError(ValueError):
    """The store was recorded for other teacher outputs (its fingerprint differs),
    or in another encoding."""


def check_encoding(encoding: str, num_classes: int) -> int | None:
    """Validates a store encoding for `num_classes` logits; returns its K (None: a float one).

    >>> check_encoding("top5", 10), check_encoding("float16", 10)
    (5, None)
    """
    k = store_encoding_k(encoding)
    if k is not None and k >= num_classes:
        raise ValueError(
            f"The teacher store encoding {encoding!r} keeps {k} logits per example, but "
            f"there are {num_classes} classes: K must be below {num_classes}. Use a smaller "
            "K, or 'float32' (exact) to keep every logit.")
    return k


def check_same_encoding(directory: str, recorded: str, asked: str) -> None:
    """Refuses a run that asks a store for another encoding than it holds.

    Raises:
        StoreMismatchError: naming both, and the fix.
    """
    if recorded != asked:
        raise StoreMismatchError(
            f"The teacher store {directory!r} holds {recorded!r} logits, and this run asks "
            f"for {asked!r}. Replay it with its encoding "
            f"(--config.teacher_store_encoding={recorded}, or leave the flag out), or "
            f"record {asked!r} in another --config.teacher_store directory.")


def encode_logits(logits: np.ndarray, encoding: str) -> np.ndarray:
    """Float32 logits `[..., classes]` as a store chunk holds them in `encoding`.

    - `"float32"`: unchanged, exact (the default);
    - `"float16"`: rounded to nearest even (|logit| <= 65504, else refused);
    - `"bfloat16"`: rounded to nearest even to 8 significant bits, stored as
      the upper 16 bits of the float32 (uint16: `.npy` has no bfloat16);
    - `"top<K>"`: float32 `[..., 2K + 1]`: each example's K largest logits
      (in descending order), their class indices (exact in float32 below 2^24
      classes), and one tail value `t = logsumexp(other logits) - log(C - K)`.

    `decode_logits` puts the K logits back at their classes and `t` at every
    other class. So softmax at T=1 of the decoded logits gives exactly the
    top-K probabilities and the same total tail mass (spread evenly over the
    other classes); at other temperatures the tail's mass is approximate.

    Example (the tail: log((1 + e + 1) / 3)):
    >>> z = np.array([[2.0, 0.0, 1.0, 0.0]], np.float32)
    >>> encode_logits(z, "top1").round(4)
    array([[2.    , 0.    , 0.4528]], dtype=float32)
    >>> decode_logits(encode_logits(z, "top1"), "top1", 4).round(4)
    array([[2.    , 0.4528, 0.4528, 0.4528]], dtype=float32)
    """
    logits = np.asarray(logits, np.float32)
    k = check_encoding(encoding, logits.shape[-1])
    if encoding == "float32":
        return logits
    if encoding == "float16":
        with np.errstate(over="ignore"):
            encoded = logits.astype(np.float16)
        overflow = np.isinf(encoded) & np.isfinite(logits)
        if overflow.any():
            raise ValueError(
                f"Teacher logits up to {np.max(np.abs(logits[overflow])):g} are beyond "
                "float16's range (65504): use the 'bfloat16' or 'float32' encoding.")
        return encoded
    if encoding == "bfloat16":
        bits = np.ascontiguousarray(logits).view(np.uint32)
        # Round to nearest, ties to even: add 0x7FFF plus the lowest kept bit,
        # then drop the lower 16 bits. A NaN keeps its sign and stays a NaN.
        rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16
        return np.where(np.isnan(logits), (bits >> 16) | 0x40, rounded).astype(np.uint16)
    classes = logits.shape[-1]
    # The K largest by partition (no sort of all C logits), then in descending
    # order, equal logits by class: the same logits give the same bytes.
    chosen = np.sort(np.argpartition(-logits, k - 1, axis=-1)[..., :k], axis=-1)
    by_value = np.argsort(-np.take_along_axis(logits, chosen, -1), axis=-1, kind="stable")
    order = np.take_along_axis(chosen, by_value, axis=-1)
    top = np.take_along_axis(logits, order, axis=-1)
    rest = logits.copy()
    np.put_along_axis(rest, order, -np.inf, axis=-1)
    high = np.max(rest, axis=-1, keepdims=True)
    high = np.where(np.isfinite(high), high, 0.0)
    with np.errstate(divide="ignore"):  # every other logit -inf: the tail is -inf
        total = np.sum(np.exp(rest - high), axis=-1, keepdims=True, dtype=np.float64)
        tail = high + np.log(total) - np.log(classes - k)
    return np.concatenate([top, order.astype(np.float32), tail.astype(np.float32)], axis=-1)


def decode_logits(encoded: np.ndarray, encoding: str, num_classes: int) -> np.ndarray:
    """Float32 logits `[..., num_classes]` from `encode_logits(logits, encoding)`.

    >>> z = np.array([[1.0, -2.0, 3.0]], np.float32)
    >>> decode_logits(encode_logits(z, "bfloat16"), "bfloat16", 3)
    array([[ 1., -2.,  3.]], dtype=float32)
    """
    k = check_encoding(encoding, num_classes)
    encoded = np.asarray(encoded)
    if encoding == "bfloat16":
        return (encoded.astype(np.uint32) << 16).view(np.float32)
    if k is None:
        return encoded.astype(np.float32)
    index = encoded[..., k:2 * k].astype(np.int64)
    logits = np.repeat(encoded[..., 2 * k:], num_classes, axis=-1).astype(np.float32)
    np.put_along_axis(logits, index, encoded[..., :k].astype(np.float32), axis=-1)
    return logits


def encoded_layout(encoding: str, num_classes: int) -> tuple[np.dtype, int]:
    """The dtype and last dimension of a chunk's array in `encoding`.

    Bytes per example: `dtype.itemsize * width`, e.g. 4 * (2K + 1) for top-K.

    >>> encoded_layout("top5", 1000), encoded_layout("bfloat16", 1000)
    ((dtype('float32'), 11), (dtype('uint16'), 1000))
    """
    k = check_encoding(encoding, num_classes)
    if k is not None:
        return np.dtype(np.float32), 2 * k + 1
    dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[encoding]
    return np.dtype(dtype), num_classes


def weights_digest(model: keras.Model) -> str:
    """sha256 of a model's weights (shapes, dtypes and values), in order.

    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> len(weights_digest(model))
    64
    """
    digest = hashlib.sha256()
    for weight in model.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
        digest.update(f"{value.shape}{value.dtype}".encode())
        digest.update(value.data)
    return digest.hexdigest()


def fingerprint(teachers: Sequence[keras.Model], **settings: Any) -> dict[str, Any]:
    """What determines the teacher's logits of each step, as a flat JSON-able dict.

    Args:
        teachers: the teacher models (their weights are hashed, their
            architecture summarized by class, layer count and output shape).
        **settings: everything else that decides the batches and the teacher's
            numbers: data identity, seed, batch size, mode, augmentation, sizes,
            compute path... Values must be JSON-able.

    >>> t = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
    >>> sorted(fingerprint([t], seed=0))
    ['seed', 'teacher_0_model', 'teacher_0_weights']
    """
    values = json.loads(json.dumps(settings))
    for i, model in enumerate(teachers):
        values[f"teacher_{i}_model"] = (f"{type(model).__name__}, {len(model.layers)} layers, "
                                        f"input {model.input_shape}, output {model.output_shape}")
        values[f"teacher_{i}_weights"] = weights_digest(model)
    return values


def differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The fields whose values differ, `"name: recorded -> current"`.

    >>> differences({"seed": 0, "mode": "consistent"}, {"seed": 1, "mode": "consistent"})
    ['seed: 0 -> 1']
    """
    names = sorted(set(recorded) | set(current))
    missing = "(absent)"
    return [f"{n}: {recorded.get(n, missing)} -> {current.get(n, missing)}"
            for n in names if recorded.get(n, missing) != current.get(n, missing)]


class TeacherStore:
    """A directory of per-step teacher logits (see the module docstring).

    Open one with `TeacherStore.open`; `fill` computes the chunks it lacks,
    `replay` turns a training dataset into one of stored logits.
    """

    def __init__(self, directory: str, meta: dict[str, Any]):
        self.directory = directory
        self.meta = meta
        self.steps_per_chunk = int(meta["steps_per_chunk"])
        self.batch_size = int(meta["batch_size"])
        self.num_classes = int(meta["num_classes"])
        self.encoding = meta["encoding"]
        self._dtype, self._width = encoded_layout(self.encoding, self.num_classes)

    @classmethod
    def open(cls, directory: str, fingerprint: dict[str, Any], *, num_classes: int,
             batch_size: int, steps_per_chunk: int | None = None,
             encoding: str = "float32", extra: dict[str, Any] | None = None) -> TeacherStore:
        """The store at `directory`, created if new, refused if its fingerprint differs.

        Args:
            directory: str. The store's directory.
            fingerprint: dict from `fingerprint` (or any JSON-able dict).
            num_classes: int. Logits per example.
            batch_size: int. Global batch size (rows of one step's logits).
            steps_per_chunk: int. Steps per chunk file, for a new store.
                Defaults to `DEFAULT_STEPS_PER_CHUNK`.
            encoding: str. How chunks keep the logits (`encode_logits`):
                "float32" (exact), "float16", "bfloat16" or "top<K>". A store
                keeps the encoding it was created with; another is refused.
            extra: dict. More to record in a new store (e.g. its teacher path).

        Raises:
            StoreMismatchError: the store holds another fingerprint (the
                message names the differing fields) or another encoding.
        """
        check_encoding(encoding, num_classes)
        path = os.path.join(directory, META_FILE)
        if not os.path.exists(path):
            if os.path.isdir(directory) and any(_CHUNK.match(n) for n in os.listdir(directory)):
                raise ValueError(f"The teacher store {directory!r} holds chunks but no "
                                 f"{META_FILE}: it is not a store to extend. Pick a new "
                                 "directory.")
            meta = {"format_version": FORMAT_VERSION, "fingerprint": fingerprint,
                    "num_classes": num_classes, "batch_size": batch_size,
                    "steps_per_chunk": steps_per_chunk or DEFAULT_STEPS_PER_CHUNK,
                    "encoding": encoding, **(extra or {})}
            os.makedirs(directory, exist_ok=True)
            try:  # two processes creating one store: the first one's file stands
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.close(fd)
                atomic.write_json(path, meta)
        for _ in range(50):  # another process may be writing it this moment
            with open(path) as f:
                text = f.read()
            if text:
                break
            time.sleep(0.1)
        if not text:
            raise ValueError(f"{path} is empty: a process that created the store died before "
                             "writing it. Delete that file (the store holds no chunks yet).")
        meta = json.loads(text)
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"The teacher store {directory!r} has format version "
                             f"{meta.get('format_version')}; this version reads "
                             f"{FORMAT_VERSION}. Use a new directory.")
        check_same_encoding(directory, meta["encoding"], encoding)
        diff = differences(meta["fingerprint"], fingerprint)
        diff += [f"{name}: {meta[name]} -> {value}" for name, value in
                 (("num_classes", num_classes), ("batch_size", batch_size))
                 if meta[name] != value]
        if diff:
            raise StoreMismatchError(
                f"The teacher store {directory!r} was recorded for other teacher outputs; "
                f"these differ: {'; '.join(diff)}. Use another --config.teacher_store "
                "directory for these settings (student, lr, weight decay, temperature, "
                "optimizer and epochs may differ; these may not).")
        return cls(directory, meta)

    # -- chunks --------------------------------------------------------------

    def chunks(self, begin: int, end: int) -> range:
        """The chunk indices that hold steps `[begin, end)`."""
        return range(begin // self.steps_per_chunk, -(-end // self.steps_per_chunk))

    def _files(self, chunk: int) -> list[str]:
        prefix = f"chunk-{chunk:07d}-"
        return sorted(os.path.join(self.directory, name) for name in os.listdir(self.directory)
                      if name.startswith(prefix) and _CHUNK.match(name))

    def read_chunk(self, chunk: int, min_rows: int = 0) -> np.ndarray | None:
        """Chunk `chunk`'s logits, decoded to float32 `[rows, batch, classes]`, or None.

        None when the chunk is absent, holds fewer than `min_rows` steps, or
        fails its checksum (then it is deleted, with a warning: it is never fed
        to the loss).
        """
        found = None
        for path in self._files(chunk):
            with contextlib.suppress(FileNotFoundError):
                with open(path, "rb") as f:
                    raw = f.read()
                logits = self._decode(raw, path)
                if logits is None:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path)
                elif found is None or len(logits) > len(found):
                    found = logits
        return found if found is not None and len(found) >= min_rows else None

    def _decode(self, raw: bytes, path: str) -> np.ndarray | None:
        expected = _CHUNK.match(os.path.basename(path)).group(2)
        if hashlib.sha256(raw).hexdigest() != expected:
            logging.warning("The teacher store chunk %s is damaged (its sha256 does not "
                            "match its name): it is recomputed and rewritten.", path)
            return None
        encoded = np.load(io.BytesIO(raw), allow_pickle=False)
        if (encoded.ndim != 3 or encoded.shape[1:] != (self.batch_size, self._width)
                or encoded.dtype != self._dtype):
            logging.warning("The teacher store chunk %s holds %s %s, not %s [steps, %d, %d] "
                            "(encoding %r): it is recomputed and rewritten.", path,
                            encoded.dtype, encoded.shape, self._dtype, self.batch_size,
                            self._width, self.encoding)
            return None
        return decode_logits(encoded, self.encoding, self.num_classes)

    def write_chunk(self, chunk: int, logits: np.ndarray) -> None:
        """Writes chunk `chunk` (float32 `[rows, batch, classes]`) in the store's
        encoding, atomically, named by the sha256 of its bytes."""
        logits = np.asarray(logits)
        if logits.ndim != 3 or logits.shape[1:] != (self.batch_size, self.num_classes):
            raise ValueError(f"Expected teacher logits [steps, {self.batch_size}, "
                             f"{self.num_classes}]. Received: shape {logits.shape}")
        buffer = io.BytesIO()
        np.save(buffer, encode_logits(logits, self.encoding), allow_pickle=False)
        raw = buffer.getvalue()
        name = f"chunk-{chunk:07d}-{hashlib.sha256(raw).hexdigest()}.npy"
        path = os.path.join(self.directory, name)

        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(raw)
                f.flush()
                os.fsync(f.fileno())

        atomic.atomic_write(path, write)
        for old in self._files(chunk):  # a shorter or damaged version it replaces
            if old != path:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(old)

    def rows_needed(self, chunk: int, end: int) -> int:
        """Steps chunk `chunk` must hold for a run of `end` steps."""
        return min(self.steps_per_chunk, end - chunk * self.steps_per_chunk)

    def stored_rows(self, chunk: int) -> int:
        """Steps chunk `chunk` holds (0 if none), from its files' names and `.npy` headers.

        Reads no logits: a file whose size is not what its header declares (a
        truncated copy) or whose layout is not the store's is deleted, with a
        warning. Its bytes are checked against its name when it is read
        (`read_chunk`).
        """
        rows = 0
        for path in self._files(chunk):
            with contextlib.suppress(FileNotFoundError):
                held = self._header_rows(path)
                if held is None:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path)
                rows = max(rows, held or 0)
        return rows

    def _header_rows(self, path: str) -> int | None:
        with open(path, "rb") as f:
            try:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran_order, dtype = read_header(f)
                size = os.fstat(f.fileno()).st_size
                complete = size == f.tell() + int(np.prod(shape)) * dtype.itemsize
            except (ValueError, SyntaxError, EOFError):  # not an .npy header
                shape, fortran_order, dtype, complete = (), False, None, False
        if (complete and not fortran_order and len(shape) == 3
                and shape[1:] == (self.batch_size, self._width) and dtype == self._dtype):
            return shape[0]
        logging.warning("The teacher store chunk %s is damaged (truncated, or not %s "
                        "[steps, %d, %d]): it is recomputed and rewritten.", path,
                        self._dtype, self.batch_size, self._width)
        return None

    def missing(self, begin: int, end: int) -> list[int]:
        """The chunks of steps `[begin, end)` that are absent, short or truncated.

        From file names and headers only (`stored_rows`): a chunk whose bytes
        were altered in place is found when it is read, and recomputed then.
        """
        return [k for k in self.chunks(begin, end)
                if self.stored_rows(k) < self.rows_needed(k, end)]

    # -- claims --------------------------------------------------------------

    def _claim_path(self, chunk: int) -> str:
        return os.path.join(self.directory, f"chunk-{chunk:07d}.claim")

    def claim(self, chunk: int) -> bool:
        """Claims chunk `chunk` for this process; False if a live process holds it."""
        path = self._claim_path(chunk)
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if not self._stale(path):
                    return False
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(record)
            return True
        return False

    def release(self, chunk: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._claim_path(chunk))

    @staticmethod
    def _stale(path: str) -> bool:
        try:
            with open(path) as f:
                text = f.read()
            age = time.time() - os.path.getmtime(path)
        except FileNotFoundError:
            return True
        try:
            holder = json.loads(text)
        except ValueError:  # empty: being written now, or its writer died doing so
            return age > 10
        if holder.get("host") != socket.gethostname():
            return False  # another machine's: its process cannot be checked from here
        return holder.get("pid") != os.getpid() and not _pid_alive(int(holder.get("pid", 0)))


    # -- filling and replaying -----------------------------------------------

    def fill(self, teacher_logits: Callable[[Any], Any],
             make_dataset: Callable[[int], tf.data.Dataset], begin: int, end: int,
             log: Callable[[str], None] | None = None) -> int:
        """Computes the chunks of steps `[begin, end)` that the store lacks.

        Chunks another live process claims are waited for, not recomputed.

        Args:
            teacher_logits: `fn(batch) -> [batch, classes]` logits, as they reach
                the loss (e.g. a `tf.function` of `Distiller.teacher_logits`).
            make_dataset: `fn(step) -> tf.data.Dataset` of training batches from
                global step `step` on (the seeded pipeline of the runs).
            begin, end: int. The steps needed.
            log: callable for progress lines, or None.

        Returns:
            The number of chunks this process computed.
        """
        todo, computed = self.missing(begin, end), 0
        while todo:
            waiting = []
            iterator, position = None, None
            for chunk in todo:
                if not self.claim(chunk):
                    waiting.append(chunk)
                    continue
                try:
                    rows = self.rows_needed(chunk, end)
                    if self.stored_rows(chunk) >= rows:  # written meanwhile
                        continue
                    first = chunk * self.steps_per_chunk
                    if position != first:
                        iterator, position = iter(make_dataset(first)), first
                    out = []
                    for _ in range(rows):
                        out.append(keras.ops.convert_to_numpy(teacher_logits(next(iterator))))
                    position += rows
                    self.write_chunk(chunk, np.stack(out).astype(np.float32))
                    computed += 1
                    if log:
                        log(f"Teacher store: steps {first}-{first + rows - 1} written "
                            f"(chunk {chunk}).")
                finally:
                    self.release(chunk)
            todo = []
            for chunk in waiting:
                rows = self.rows_needed(chunk, end)
                while (self.stored_rows(chunk) < rows
                       and os.path.exists(self._claim_path(chunk))
                       and not self._stale(self._claim_path(chunk))):
                    time.sleep(_WAIT_S)
                if self.stored_rows(chunk) < rows:
                    todo.append(chunk)  # its holder died or gave up: ours now
        return computed

    def logits_from(self, start: int, end: int,
                    recompute: Callable[[int], None] | None = None) -> Iterator[np.ndarray]:
        """The stored `[batch, classes]` logits of steps `start`, `start + 1`, ... `end - 1`.

        A chunk that is absent or damaged when read is recomputed by
        `recompute(chunk)` (which must write it), or raises without one.
        """
        step = start
        while step < end:
            chunk = step // self.steps_per_chunk
            rows = self.rows_needed(chunk, end)
            logits = self.read_chunk(chunk, rows)
            if logits is None and recompute is not None:
                recompute(chunk)
                logits = self.read_chunk(chunk, rows)
            if logits is None:
                raise FileNotFoundError(
                    f"The teacher store {self.directory!r} lacks steps "
                    f"{chunk * self.steps_per_chunk}-{chunk * self.steps_per_chunk + rows - 1}"
                    " (chunk missing or damaged): fill it first (`funmatch teacher-store`).")
            yield from logits[step - chunk * self.steps_per_chunk:rows]
            step = chunk * self.steps_per_chunk + rows

    def check_step(self, step: int, teacher_logits: Any) -> None:
        """Refuses a run whose batch at `step` is not the one the store was recorded on.

        `teacher_logits` are the teacher's logits of this run's batch at `step`,
        computed now. The stored ones must agree within 5% of their largest
        magnitude (compute paths differ by far less: XLA or not, bfloat16
        rounding); for a top-K store, at the K stored classes. Batches from an
        unseeded shuffle or augmentation differ by far more, and would
        otherwise be replayed against the wrong images without a sign.

        Raises:
            StoreMismatchError: naming the step and the difference.
        """
        chunk = step // self.steps_per_chunk
        stored = self.read_chunk(chunk, step - chunk * self.steps_per_chunk + 1)
        if stored is None:
            return  # nothing stored to compare with: it is computed live
        stored = stored[step - chunk * self.steps_per_chunk]
        live = np.asarray(keras.ops.convert_to_numpy(teacher_logits), np.float32)
        k = store_encoding_k(self.encoding)
        if k is not None:  # the K largest stored logits are the recorded top K
            kept = np.argsort(-stored, axis=-1, kind="stable")[..., :k]
            stored, live = (np.take_along_axis(a, kept, -1) for a in (stored, live))
        error = float(np.max(np.abs(live - stored)) / (np.max(np.abs(stored)) + 1e-3))
        if not error <= 0.05:
            raise StoreMismatchError(
                f"The teacher's logits of this run's batch at step {step} differ from the "
                f"ones the store {self.directory!r} holds for it (largest difference "
                f"{error:.0%} of the largest logit): this run's batches are not the ones it "
                "was recorded on. Every run that shares a store must see the same batches at "
                "each step: seed the shuffle and the augmentation (fm.data.train_pipeline "
                "with seed=...), or use another store directory.")

    def replay(self, dataset: tf.data.Dataset, start_step: int, end_step: int,
               recompute: Callable[[int], None] | None = None,
               check_with: Callable[[Any], Any] | None = None) -> tf.data.Dataset:
        """`dataset` (batches from `start_step` on) with the stored logits as the teacher's.

        Each element `x` (an image tensor or a `{"student", "teacher"}` dict,
        optionally `(x, y)`) becomes `{"student": ..., "teacher_logits": stored}`
        for `Distiller.fit`; its teacher views are dropped. The result ends at
        `end_step`. With `check_with` (e.g. `distiller.teacher_logits`), the
        teacher first runs once on the first batch, and a dataset that is not
        the recorded one is refused (`check_step`).
        """
        if check_with is not None:
            first = next(iter(dataset.take(1)))
            self.check_step(start_step, check_with(first[0] if isinstance(first, tuple)
                                                   else first))
        logits = tf.data.Dataset.from_generator(
            lambda: self.logits_from(start_step, end_step, recompute),
            output_signature=tf.TensorSpec([self.batch_size, self.num_classes], tf.float32))

        def merge(element, teacher_logits):
            labels = None
            if isinstance(element, tuple):
                element, labels = element
            student = element[STUDENT_KEY] if isinstance(element, dict) else element
            batch = {STUDENT_KEY: student, TEACHER_LOGITS_KEY: teacher_logits}
            return batch if labels is None else (batch, labels)

        zipped = tf.data.Dataset.zip((dataset, logits.prefetch(2)))
        return zipped.map(merge, num_parallel_calls=tf.data.AUTOTUNE,
                          deterministic=True).prefetch(tf.data.AUTOTUNE)


class LogitsRecorder:
    """Keeps the teacher's logits of a run's last training steps, for `StoreRecorder`.

    Called by the training step (`Distiller.record_teacher_logits`) on each
    replica's `[batch / replicas, classes]` logits, it writes them into a ring
    of `slots` steps held in TensorFlow variables (one copy per replica, so
    no replica's logits overwrite another's); `take()` returns the global
    `[steps, batch, classes]` logits of the steps since the last call. A
    step's logits are read after the step, so `slots` must cover the steps of
    one call of the training function (`steps_per_execution`).

    Example:
    >>> recorder = LogitsRecorder(tf.distribute.get_strategy(), slots=2,
    ...                           batch_size=1, num_classes=2)
    >>> recorder(tf.constant([[1.0, -1.0]]))
    >>> recorder(tf.constant([[2.0, -2.0]]))
    >>> recorder.take()[:, 0, 0], recorder.take().shape
    (array([1., 2.], dtype=float32), (0, 1, 2))
    """

    def __init__(self, strategy: tf.distribute.Strategy, slots: int, batch_size: int,
                 num_classes: int):
        replicas = strategy.num_replicas_in_sync
        if batch_size % replicas:
            raise ValueError(f"The global batch ({batch_size}) must split evenly over the "
                             f"{replicas} replicas to record the teacher's logits.")
        self.slots = int(slots)
        sync = dict(trainable=False, synchronization=tf.VariableSynchronization.ON_READ,
                    aggregation=tf.VariableAggregation.NONE)
        with strategy.scope():
            self._ring = tf.Variable(tf.zeros([self.slots, batch_size // replicas, num_classes]),
                                     name="recorded_teacher_logits", **sync)
            self._count = tf.Variable(tf.constant(0, tf.int64), name="recorded_steps", **sync)
        self._strategy = strategy
        self._taken = 0

    def __call__(self, logits) -> None:
        # The ring shifts by one step, newest last: a whole assign, which a
        # replica's copy supports (its scatter updates are not implemented).
        step = tf.cast(logits, tf.float32)[None]
        self._ring.assign(step if self.slots == 1 else tf.concat([self._ring[1:], step], 0))
        self._count.assign_add(1)

    def take(self) -> np.ndarray:
        """Float32 `[steps, batch, classes]`: every step recorded since the last `take`."""
        count = int(self._strategy.experimental_local_results(self._count)[0].numpy())
        new = count - self._taken
        if new > self.slots:
            raise RuntimeError(
                f"{new} steps ran since the teacher's logits were last taken, and the ring "
                f"holds {self.slots}: take them after every call of the training function "
                "(a callback's on_train_batch_end), with slots >= steps_per_execution.")
        self._taken = count
        # The replicas' parts of a global batch, in replica order, as the strategy split it.
        parts = [ring.numpy()[self.slots - new:] for ring in
                 self._strategy.experimental_local_results(self._ring)]
        return np.concatenate(parts, axis=1)


class StoreRecorder(keras.callbacks.Callback):
    """Writes the teacher's logits of a live run's steps into a store, as it trains.

    The first run of a sweep fills the store at no extra teacher cost: its
    `Distiller` hands each step's logits (as they reach the loss) to a
    `LogitsRecorder`, and this callback writes each whole chunk of steps to
    `store` (claimed first, so that processes sharing the store write it
    once). Steps are numbered by the optimizer's `iterations` (the global step,
    restored on resume). A chunk that the store holds already, that another
    live process claims, or whose first steps this process did not run (a
    resume in its middle) is not written. A run killed mid-chunk loses that
    chunk's rows: a later run computes it again. `close()` stops recording.

    Args:
        store: the `TeacherStore`.
        distiller: the `Distiller` (TensorFlow backend) whose steps are recorded.
        end_step: int. The run's last step + 1 (its last chunk may be short).
        log: callable for progress lines, or None.
    """

    def __init__(self, store: TeacherStore, distiller: Any, end_step: int,
                 log: Callable[[str], None] | None = None):
        super().__init__()
        self.store, self.end_step, self.log = store, end_step, log
        self.recorder = LogitsRecorder(distiller.distribute_strategy,
                                       getattr(distiller, "steps_per_execution", 1) or 1,
                                       store.batch_size, store.num_classes)
        distiller.record_teacher_logits(self.recorder)
        self._distiller = distiller
        self._chunk, self._next, self._rows, self._claimed = None, None, [], False
        self.chunks_written = 0

    def on_train_batch_end(self, batch, logs=None):
        logits = self.recorder.take()
        if not len(logits):  # replayed steps
            return
        end = int(keras.ops.convert_to_numpy(self._distiller.optimizer.iterations))
        for step, row in zip(range(end - len(logits), end), logits):
            self._add(step, row)

    def _add(self, step: int, logits: np.ndarray) -> None:
        chunk = step // self.store.steps_per_chunk
        if chunk != self._chunk or step != self._next:
            self._release()
            self._chunk = chunk
            self._claimed = (step == chunk * self.store.steps_per_chunk and step < self.end_step
                             and self.store.stored_rows(chunk) < self._rows_needed()
                             and self.store.claim(chunk))
        self._next = step + 1
        if not self._claimed:
            return
        self._rows.append(logits)
        if len(self._rows) == self._rows_needed():
            self.store.write_chunk(chunk, np.stack(self._rows))
            self.chunks_written += 1
            if self.log:
                first = chunk * self.store.steps_per_chunk
                self.log(f"Teacher store: steps {first}-{first + len(self._rows) - 1} "
                         f"recorded (chunk {chunk}).")
            self._release()

    def _rows_needed(self) -> int:
        return self.store.rows_needed(self._chunk, self.end_step)

    def _release(self) -> None:
        if self._claimed:
            self.store.release(self._chunk)
        self._claimed, self._rows = False, []

    def close(self) -> None:
        """Releases the chunk being recorded and stops the Distiller's recording."""
        self._release()
        self._chunk = None
        self._distiller.record_teacher_logits(None)


def teacher_function(distiller: Any, jit_compile: bool = False) -> Callable[[Any], Any]:
    """`Distiller.teacher_logits` as one compiled function, for `TeacherStore.fill`."""
    if keras.backend.backend() != "tensorflow":
        return distiller.teacher_logits
    return tf.function(distiller.teacher_logits, jit_compile=jit_compile)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's: it exists
        return True
    return pid > 0
