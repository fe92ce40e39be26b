"""A teacher store: the teacher's logits of every training step, computed once for a sweep.

With one data seed, every run of a sweep (over lr, wd, T, or students) feeds its
teacher the same images at each global step: the same crops, flips and mixup
partners (`data.train_pipeline` is seeded and resumes exactly). A store records
the teacher's float32 logits of step k once; every later run that shares the
fingerprint replays them as `{"student": x, "teacher_logits": l}` batches and
never runs the teacher in its step.

Layout of the directory:
- `store.json`: format version, fingerprint, encoding, steps per chunk, classes,
  and the teacher compute path the logits were computed on;
- `chunk-<k>-<sha256>.npy`: the logits of global steps `[k*C, k*C + rows)`
  (`C` steps per chunk), an array `[rows, batch, classes]` written atomically,
  named by the sha256 of its bytes. A chunk whose bytes do not match its name
  is never read: it is recomputed and rewritten, with a warning;
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

FORMAT_VERSION = 1
META_FILE = "store.json"
# 64 steps of Flowers102's batch 512 x 102 classes: 13 MB a chunk in float32.
DEFAULT_STEPS_PER_CHUNK = 64
ENCODINGS = ("float32", "float16")
_CHUNK = re.compile(r"^chunk-(\d{7})-([0-9a-f]{64})\.npy$")
_WAIT_S = 0.2  # polling interval for a chunk another process computes


class StoreMismatchError(ValueError):
    """The store was recorded for other teacher outputs (its fingerprint differs)."""


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

    @classmethod
    def open(cls, directory: str, fingerprint: dict[str, Any], *, num_classes: int,
             batch_size: int, steps_per_chunk: int | None = None,
             encoding: str = "float32", extra: dict[str, Any] | None = None) -> "TeacherStore":
        """The store at `directory`, created if new, refused if its fingerprint differs.

        Args:
            directory: str. The store's directory.
            fingerprint: dict from `fingerprint` (or any JSON-able dict).
            num_classes: int. Logits per example.
            batch_size: int. Global batch size (rows of one step's logits).
            steps_per_chunk: int. Steps per chunk file, for a new store.
                Defaults to `DEFAULT_STEPS_PER_CHUNK`.
            encoding: str. One of `ENCODINGS`, for a new store.
            extra: dict. More to record in a new store (e.g. its teacher path).

        Raises:
            StoreMismatchError: the store holds another fingerprint; the
                message names the differing fields.
        """
        if encoding not in ENCODINGS:
            raise ValueError(f"Unknown teacher store encoding {encoding!r}: one of {ENCODINGS}.")
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
        """Chunk `chunk`'s float32 logits `[rows, batch, classes]`, or None.

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
        logits = np.load(io.BytesIO(raw), allow_pickle=False)
        if logits.ndim != 3 or logits.shape[1:] != (self.batch_size, self.num_classes):
            logging.warning("The teacher store chunk %s has shape %s, not [steps, %d, %d]: "
                            "it is recomputed and rewritten.", path, logits.shape,
                            self.batch_size, self.num_classes)
            return None
        return logits.astype(np.float32)

    def write_chunk(self, chunk: int, logits: np.ndarray) -> None:
        """Writes chunk `chunk` (`[rows, batch, classes]`) atomically, named by its sha256."""
        logits = np.asarray(logits)
        if logits.ndim != 3 or logits.shape[1:] != (self.batch_size, self.num_classes):
            raise ValueError(f"Expected teacher logits [steps, {self.batch_size}, "
                             f"{self.num_classes}]. Received: shape {logits.shape}")
        buffer = io.BytesIO()
        np.save(buffer, logits.astype(self.encoding), allow_pickle=False)
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

    def missing(self, begin: int, end: int) -> list[int]:
        """The chunks of steps `[begin, end)` that are absent, short or damaged."""
        return [k for k in self.chunks(begin, end)
                if self.read_chunk(k, self.rows_needed(k, end)) is None]

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
        from funmatch_keras.workdir_lock import _pid_alive

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
                    if self.read_chunk(chunk, rows) is not None:  # written meanwhile
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
                while (self.read_chunk(chunk, self.rows_needed(chunk, end)) is None
                       and os.path.exists(self._claim_path(chunk))
                       and not self._stale(self._claim_path(chunk))):
                    time.sleep(_WAIT_S)
                if self.read_chunk(chunk, self.rows_needed(chunk, end)) is None:
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
            for row in logits[step - chunk * self.steps_per_chunk:rows]:
                yield row
            step = chunk * self.steps_per_chunk + rows

    def replay(self, dataset: tf.data.Dataset, start_step: int, end_step: int,
               recompute: Callable[[int], None] | None = None) -> tf.data.Dataset:
        """`dataset` (batches from `start_step` on) with the stored logits as the teacher's.

        Each element `x` (an image tensor or a `{"student", "teacher"}` dict,
        optionally `(x, y)`) becomes `{"student": ..., "teacher_logits": stored}`
        for `Distiller.fit`; its teacher views are dropped. The result ends at
        `end_step`.
        """
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


def teacher_function(distiller: Any, jit_compile: bool = False) -> Callable[[Any], Any]:
    """`Distiller.teacher_logits` as one compiled function, for `TeacherStore.fill`."""
    if keras.backend.backend() != "tensorflow":
        return distiller.teacher_logits
    return tf.function(distiller.teacher_logits, jit_compile=jit_compile)


# -- a config's run (`funmatch distill --config.teacher_store=DIR`) -----------

def config_fingerprint(config: Any, teachers: Sequence[keras.Model], train_source: Any,
                       teacher_dtype: str, teacher_xla: bool,
                       input_pipelines: int = 1) -> dict[str, Any]:
    """`fingerprint` of a config's run: what its teachers see and how they compute.

    Student, student size (the teacher's crop does not depend on it, see
    `views.train_view_fn`), lr, weight decay, temperature, optimizer, epochs
    and steps per epoch are left out: runs that differ only in those share
    the teacher's logits.
    """
    from funmatch_keras import configs, data

    return fingerprint(
        teachers,
        data=train_source.fingerprint(), data_name=train_source.name,
        num_examples=train_source.num_examples, seed=config.seed,
        batch_size=config.batch_size, mode=config.mode,
        teacher_sizes=configs.teacher_sizes(config),
        teacher_specs=[spec.model for spec in configs.teacher_specs(config)],
        crop_area_min=config.crop_area_min, flip=config.flip,
        shuffle_buffer=min(train_source.num_examples, data.DEFAULT_SHUFFLE_BUFFER),
        teacher_dtype=teacher_dtype, teacher_xla=bool(teacher_xla),
        input_pipelines=input_pipelines, backend=keras.backend.backend())


def check_supported(config: Any, num_workers: int = 1) -> None:
    """Refuses the runs a store cannot serve, naming what is missing."""
    if config.mode == "fixed_teacher":
        raise ValueError("--config.teacher_store is for the modes that run the teacher at "
                         "every step; mode='fixed_teacher' computes its logits once and keeps "
                         "them in the workdir already. Drop --config.teacher_store.")
    if num_workers > 1:
        raise ValueError(f"--config.teacher_store does not support multi-worker training yet "
                         f"({num_workers} workers): the store holds global batches, and "
                         "per-worker input pipelines would need a shard of it each. Train on "
                         "one worker (MirroredStrategy works), or drop --config.teacher_store.")


def recorded_meta(directory: str) -> dict[str, Any] | None:
    """The `store.json` of `directory`, or None if there is none yet."""
    path = os.path.join(directory, META_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        text = f.read()
    return json.loads(text) if text else None


def for_config(config: Any, distiller: Any, train_source: Any, num_classes: int, *,
               choose: Callable[[], tuple[Any, dict[str, Any]]], num_workers: int = 1,
               directory: str | None = None) -> tuple["TeacherStore", Any, dict[str, Any]]:
    """The store of a config's run, and its distiller on the store's teacher path.

    A store that exists fixes the teacher compute path (no tuning: the run takes
    the path its logits were computed on); a new one records the path that
    `choose()` (`compute_path.choose`) picks.

    Returns:
        `(store, distiller, teacher_path_info)`.
    """
    from funmatch_keras import tune

    check_supported(config, num_workers)
    directory = directory or config.teacher_store
    meta = recorded_meta(directory)
    if meta and "teacher_path" in meta:
        path = tune.TeacherPath.from_dict(meta["teacher_path"])
        distiller = tune.apply(distiller, path)
        info = {"choice": path.to_dict(), "name": path.name,
                "reason": f"read from the teacher store {directory}"}
    else:
        distiller, info = choose()
        path = tune.TeacherPath.from_dict(info["choice"])
    dtype, xla = path.teacher_numerics
    # A config that pins the path must agree with the store's.
    if config.teacher_dtype is not None:
        dtype = config.teacher_dtype
    if config.jit_compile is not None and config.jit_compile != path.jit_compile:
        xla = config.jit_compile or path.teacher_jit_compile
    current = config_fingerprint(config, distiller.teachers, train_source, dtype, xla,
                                 num_workers)
    store = TeacherStore.open(directory, current, num_classes=num_classes,
                              batch_size=config.batch_size,
                              extra={"teacher_path": path.to_dict()})
    return store, distiller, info


def replaying(store: TeacherStore, distiller: Any, make_dataset: Callable[[int], Any],
              start_step: int, total_steps: int,
              verbose: int = 1) -> Callable[[int], tf.data.Dataset]:
    """Fills the store's missing steps `[start_step, total_steps)`, then returns the
    `make_dataset` of a run that replays them (`fn(step) -> dataset`)."""
    dtype, xla = _path_of(store).teacher_numerics
    teacher = teacher_function(distiller, jit_compile=xla)
    log = (lambda line: print(line, flush=True)) if verbose else None
    missing = len(store.missing(start_step, total_steps))
    if missing and verbose:
        print(f"Teacher store {store.directory}: computing {missing} chunk(s) of "
              f"{store.steps_per_chunk} steps before training.", flush=True)
    store.fill(teacher, make_dataset, start_step, total_steps, log=log)

    def recompute(chunk: int) -> None:
        first = chunk * store.steps_per_chunk
        store.fill(teacher, make_dataset, first, min(total_steps, first + store.steps_per_chunk),
                   log=log)

    return lambda step: store.replay(make_dataset(step), step, total_steps, recompute)


def _path_of(store: TeacherStore) -> Any:
    from funmatch_keras import tune

    return tune.TeacherPath.from_dict(store.meta.get("teacher_path", {}))


def parse_steps(text: str | None, total_steps: int) -> tuple[int, int]:
    """`"A:B"` (either side may be empty) as steps `(A, B)` within `[0, total_steps]`.

    >>> parse_steps("100:", 300), parse_steps(None, 300)
    ((100, 300), (0, 300))
    """
    if not text:
        return 0, total_steps
    first, sep, last = text.partition(":")
    try:
        begin, end = int(first or 0), int(last or total_steps)
    except ValueError:
        begin, end = -1, -1
    if not sep or not 0 <= begin < end <= total_steps:
        raise ValueError(f"--steps must be A:B with 0 <= A < B <= {total_steps} (the run's "
                         f"steps), e.g. --steps=0:{total_steps // 2}. Received: {text!r}")
    return begin, end


def fill_for_config(config: Any, directory: str, steps: str | None = None,
                    verbose: int = 1) -> dict[str, Any]:
    """`funmatch teacher-store`: a teacher-only pass over a config's run, into a store.

    Computes the chunks of the steps `steps` (`"A:B"`, default the whole run)
    that the store lacks, exactly as `funmatch distill
    --config.teacher_store=DIRECTORY` would before training. Several processes
    may fill one store at once (each claims the chunks it computes).

    Returns:
        `{"store", "steps", "chunks_computed", "chunks_missing"}`.
    """
    from funmatch_keras import build, compute_path, configs, data, tune

    configs.validate(config)
    check_supported(config)
    keras.utils.set_random_seed(config.seed)
    if config.deterministic and keras.backend.backend() == "tensorflow":
        tf.config.experimental.enable_op_determinism()
    untrained = [spec.model for spec in configs.teacher_specs(config) if build.needs_labels(spec)]
    if untrained:
        raise ValueError(f"The teacher(s) {untrained} have no weights. Train them first "
                         "(`funmatch train-teacher --workdir=W`), then pass "
                         "--config.teacher=W/teacher.keras.")
    source = build.source(config, "train")
    num_classes = build.num_classes(config, source)
    teachers = build.teachers(config, num_classes, directory)
    distiller = _distiller(teachers, build.student(config, num_classes), config)
    total = configs.cadence(config, build.steps_per_epoch(config, source)).total_steps
    begin, end = parse_steps(steps, total)

    def default_path():
        path, reason = compute_path.decision(config, total, 1, resumed=False)
        path = path or tune.default_path(build.teacher_dtype(config))
        reason = reason if reason != "tuned" else "teacher-only pass: the untuned path"
        return tune.apply(distiller, path), {"choice": path.to_dict(), "name": path.name,
                                             "reason": reason}

    store, distiller, _ = for_config(config, distiller, source, num_classes,
                                     choose=default_path, directory=directory)
    teacher_size = configs.teacher_sizes(config)

    def make_dataset(step):
        return data.train_pipeline(
            source, mode=config.mode, batch_size=config.batch_size,
            student_size=config.student_size, teacher_size=teacher_size, seed=config.seed,
            shuffle_buffer=min(source.num_examples, data.DEFAULT_SHUFFLE_BUFFER),
            start_step=step, area_range=(config.crop_area_min, 1.0), flip=config.flip)

    teacher = teacher_function(distiller, jit_compile=_path_of(store).teacher_numerics[1])
    log = (lambda line: print(line, flush=True)) if verbose else None
    computed = store.fill(teacher, make_dataset, begin, end, log=log)
    return {"store": directory, "steps": [begin, end], "chunks_computed": computed,
            "chunks_missing": len(store.missing(begin, end))}


def _distiller(teachers, student, config):
    from funmatch_keras.distiller import Distiller

    return Distiller(teachers if len(teachers) > 1 else teachers[0], student,
                     temperature=config.temperature)
