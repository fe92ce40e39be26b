"""A config's run with a teacher store: `--config.teacher_store=DIR` and `funmatch teacher-store`.

`for_config` opens a config's store (its fingerprint from the config, its
teacher compute path fixed by the store), `serve` plans a run over it (the
stored steps replayed, the missing ones run live and recorded), and
`fill_for_config` is the teacher-only pass of `funmatch teacher-store`. The
store itself is `funmatch_keras.data.teacher_store`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Sequence

import keras
import tensorflow as tf

from funmatch_keras import configs
from funmatch_keras.app import build, compute_path
from funmatch_keras.data import pipelines as data
from funmatch_keras.data.teacher_store import (
    META_FILE,
    StoreRecorder,
    TeacherStore,
    check_same_encoding,
    fingerprint,
    teacher_function,
)
from funmatch_keras.distiller import Distiller
from funmatch_keras.tuning import tune


def config_fingerprint(config: Any, teachers: Sequence[keras.Model], train_source: Any,
                       teacher_dtype: str, teacher_xla: bool,
                       input_pipelines: int = 1) -> dict[str, Any]:
    """`fingerprint` of a config's run: what its teachers see and how they compute.

    Student, student size (the teacher's crop does not depend on it, see
    `views.train_view_fn`), lr, weight decay, temperature, optimizer, epochs
    and steps per epoch are left out: runs that differ only in those share
    the teacher's logits.
    """
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
    """Refuses the runs a store cannot serve, naming what is missing, and a run that asks
    an existing store for another encoding: before anything is trained or written."""
    if config.mode == "fixed_teacher":
        raise ValueError("--config.teacher_store is for the modes that run the teacher at "
                         "every step; mode='fixed_teacher' computes its logits once and keeps "
                         "them in the workdir already. Drop --config.teacher_store.")
    if num_workers > 1:
        raise ValueError(f"--config.teacher_store does not support multi-worker training yet "
                         f"({num_workers} workers): the store holds global batches, and "
                         "per-worker input pipelines would need a shard of it each. Train on "
                         "one worker (MirroredStrategy works), or drop --config.teacher_store.")
    meta = recorded_meta(config.teacher_store) if config.teacher_store else None
    if meta and config.teacher_store_encoding:
        check_same_encoding(config.teacher_store, meta["encoding"], config.teacher_store_encoding)


def recorded_meta(directory: str) -> dict[str, Any] | None:
    """The `store.json` of `directory`, or None if there is none yet."""
    path = os.path.join(directory, META_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        text = f.read()
    return json.loads(text) if text else None


def store_encoding(config: Any, meta: dict[str, Any] | None) -> str:
    """The encoding a config's run asks of its store: the config's, else the store's
    (`meta`, its `store.json`), else float32.

    >>> store_encoding(configs.load_config("digits"), {"encoding": "top5"})
    'top5'
    """
    return config.teacher_store_encoding or (meta or {}).get("encoding", "float32")


def for_config(config: Any, distiller: Any, train_source: Any, num_classes: int, *,
               choose: Callable[[], tuple[Any, dict[str, Any]]], num_workers: int = 1,
               directory: str | None = None) -> tuple[TeacherStore, Any, dict[str, Any]]:
    """The store of a config's run, and its distiller on the store's teacher path.

    A store that exists fixes the teacher compute path (no tuning: the run takes
    the path its logits were computed on); a new one records the path that
    `choose()` (`compute_path.choose`) picks.

    Returns:
        `(store, distiller, teacher_path_info)`.
    """
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
                              encoding=store_encoding(config, meta),
                              extra={"teacher_path": path.to_dict()})
    return store, distiller, info


@dataclasses.dataclass
class Serving:
    """How a run with a store gets its teacher's logits (`serve`).

    Attributes:
        make_dataset: `fn(step) -> dataset`: replayed batches before
            `record_from`, live ones (the teacher runs) from it on.
        record_from: the step from which the teacher runs live: the first of
            the store's missing chunks at the end of the run (the run's end if
            the store holds everything).
        boundaries: steps where a `fit` call must end (`loop.fit_with_checkpoints`).
        callbacks: the `StoreRecorder` writing the live steps, if any.
    """

    make_dataset: Callable[[int], Any]
    record_from: int
    boundaries: list[int]
    callbacks: list[Any]

    def close(self) -> None:
        """Stops recording (releases the chunk being recorded)."""
        for callback in self.callbacks:
            callback.close()


def serve(store: TeacherStore, distiller: Any, make_dataset: Callable[[int], Any],
          start_step: int, total_steps: int, verbose: int = 1) -> Serving:
    """Plans a run's steps `[start_step, total_steps)` over a store.

    The steps the store holds are replayed. The store's missing chunks at the
    end of the run are computed live, by the run's own steps, and recorded as
    it trains (TensorFlow; the recording costs no teacher pass). Missing
    chunks before stored ones (a hole left by a killed run or a damaged
    chunk), and everything missing under another backend, are filled first by
    a teacher-only pass (`TeacherStore.fill`).
    """
    xla = _path_of(store).teacher_numerics[1]
    teacher = teacher_function(distiller, jit_compile=xla)
    log = (lambda line: print(line, flush=True)) if verbose else None
    chunks = list(store.chunks(start_step, total_steps))
    missing = set(store.missing(start_step, total_steps))
    suffix = len(chunks)
    if keras.backend.backend() == "tensorflow":
        while suffix and chunks[suffix - 1] in missing:
            suffix -= 1
    record_from = (total_steps if suffix == len(chunks)
                   else chunks[suffix] * store.steps_per_chunk)

    def fill_chunk(chunk: int) -> None:  # by a teacher pass: a hole, or a damaged chunk
        first = chunk * store.steps_per_chunk
        store.fill(teacher, make_dataset, first, min(total_steps, first + store.steps_per_chunk),
                   log=log)

    ahead = [chunk for chunk in chunks[:suffix] if chunk in missing]
    if ahead and verbose:
        print(f"Teacher store {store.directory}: computing {len(ahead)} chunk(s) of "
              f"{store.steps_per_chunk} steps before training.", flush=True)
    for chunk in ahead:
        fill_chunk(chunk)
    if verbose:
        live = total_steps - max(start_step, record_from)
        print(f"Teacher store {store.directory}: {total_steps - start_step - live} step(s) "
              f"replayed, {live} run live and recorded.", flush=True)

    checked = []

    def dataset(step: int):
        if step >= record_from:
            return make_dataset(step)
        # The first replayed batch of this process is checked against the teacher once.
        check = None if checked else teacher
        checked.append(step)
        return store.replay(make_dataset(step), step, record_from, fill_chunk,
                            check_with=check)

    callbacks = []
    if record_from < total_steps:
        callbacks.append(StoreRecorder(store, distiller, total_steps, log=log))
    boundaries = [record_from] if start_step < record_from < total_steps else []
    return Serving(dataset, record_from, boundaries, callbacks)


def _path_of(store: TeacherStore) -> Any:
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

    def make_dataset(step):  # the very batches `funmatch distill` feeds
        return data.train_pipeline(source, **build.pipeline_kwargs(config, source,
                                                                  start_step=step))

    teacher = teacher_function(distiller, jit_compile=_path_of(store).teacher_numerics[1])
    log = (lambda line: print(line, flush=True)) if verbose else None
    computed = store.fill(teacher, make_dataset, begin, end, log=log)
    return {"store": directory, "steps": [begin, end], "chunks_computed": computed,
            "chunks_missing": len(store.missing(begin, end))}


def _distiller(teachers, student, config):
    return Distiller(teachers if len(teachers) > 1 else teachers[0], student,
                     temperature=config.temperature)
