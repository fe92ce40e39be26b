"""Chooses the teacher's compute path (XLA, bfloat16) by timing it, guarded by agreement.

The frozen teacher is most of a distillation step, and whether XLA or a
bfloat16 teacher pays depends on the machine and the image size (README,
"Teacher compute path on the paper's workloads"). So `teacher_path` times a
few steps of each candidate `TeacherPath`, after compilation, and keeps the
fastest one whose teacher predicts what the float32 teacher predicts (top-1
agreement and KL on a few hundred images). Logits reach the loss in float32 on every path.

Example:
>>> import numpy as np
>>> from funmatch_keras import Distiller
>>> teacher = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
>>> student = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
>>> distiller = Distiller(teacher, student)
>>> distiller.compile(optimizer="adam")
>>> result = teacher_path(distiller, np.random.rand(4, 8).astype("float32"), log=None)
>>> result.choice in result.candidates, len(result.table) == len(result.candidates)
(True, True)
>>> distiller = apply(distiller, result.choice)  # then distiller.fit(...)
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable, Iterable

import keras
import numpy as np
from keras import ops

from funmatch_keras.distiller import Distiller
from funmatch_keras.losses import kl_divergence_from_logits
from funmatch_keras.tuning import timing
from funmatch_keras.tuning.teacher_paths import (  # noqa: F401 (the public API of tuning)
    BFLOAT16,
    TeacherPath,
    apply,
    candidates,
    default_path,
    dtype_of,
    with_dtype,
)

AGREEMENT_MIN = 0.995
KL_MAX = 0.01  # nats, mean over the agreement images; a flip of 0.5% costs far less
MAX_ROUNDS = 15  # timed rounds at most, when the budget allows more than `steps`
# Leave the first (untuned) path only for a clear win: candidates within a few percent
# are a coin toss on shared cores (7 ms CNN steps of identical paths measured 5%
# apart), and a bf16 teacher is not worth its rounding for less.
MIN_SPEEDUP = 1.05


@dataclasses.dataclass
class TuneResult:
    """`teacher_path`'s answer: the `choice`, and one `table` row per candidate."""

    choice: TeacherPath
    candidates: list[TeacherPath]
    table: list[dict[str, Any]]
    seconds: float
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"choice": self.choice.to_dict(), "name": self.choice.name,
                "table": self.table, "seconds": round(self.seconds, 1), "note": self.note}


def teacher_path(
    distiller: Distiller,
    batch,
    agreement_data: Iterable | None = None,
    *,
    paths: list[TeacherPath] | None = None,
    steps: int = 3,
    agreement_min: float = AGREEMENT_MIN,
    kl_max: float = KL_MAX,
    min_speedup: float = MIN_SPEEDUP,
    budget_steps: float | None = None,
    agreement_teachers: list[keras.Model] | None = None,
    log: Callable[[str], None] | None = print,
) -> TuneResult:
    """Times each candidate path's train step and picks the fastest that agrees.

    Each candidate is compiled and run once, then timed for `steps` rounds of
    one step each (bursts of steps shorter than 0.1 s), round-robin over the
    candidates, and for more rounds (up to 15) while they fit in half of
    `budget_steps`; the median counts. A candidate must beat the first path
    by `min_speedup` to be chosen. They run on `batch`, with a copy of the
    distiller's optimizer; the
    student's weights are restored afterwards, so `distiller` trains as if
    nothing happened. From the fastest down, a candidate whose teacher
    computes differently from the distiller's own teachers without XLA
    (another dtype, or under XLA) must agree with them on `agreement_min` of
    the top-1 predictions over `agreement_data`, with a mean KL of at most
    `kl_max` nats; the first that does is the choice (if none does, the first
    candidate).

    Args:
        distiller: a compiled `Distiller` with teacher models.
        batch: one training batch as `fit` gets it (`x` or `(x, y)`).
        agreement_data: batches `x` or `(x, y, ...)` of images the teacher
            judges, e.g. the first 512 validation images. None: `batch`.
        paths: the candidates, the untuned one first (`candidates()` unless given).
        steps: timed rounds per candidate, at least.
        agreement_min, kl_max: the agreement guard.
        min_speedup: a candidate other than the first is chosen only if the
            first path's median step is at least this many times its own.
        budget_steps: stop timing further candidates once the time spent
            exceeds this many steps of the first candidate. None: no limit.
        agreement_teachers: models that stand in for the teachers in the
            agreement check, each path's dtype and XLA setting applied to
            them; None: the distiller's own teachers. For benchmarks whose
            teacher has random weights, whose small margins any rounding flips.
        log: where the table is printed; None for silence.

    Returns:
        `TuneResult`. Apply its choice with `apply(distiller, result.choice)`.
    """
    if not distiller.teachers:
        raise ValueError("teacher_path needs a Distiller with teacher models; with "
                         "precomputed teacher logits the teacher costs nothing per step.")
    start = time.perf_counter()
    teacher_dtype = dtype_of(distiller.teachers[0])
    paths = list(paths or candidates(teacher_dtype))
    reference = TeacherPath(False, teacher_dtype)  # the teachers as given, no XLA
    x, y = _split(batch)
    weights = distiller.student.get_weights()
    rows = {path: {"path": path.name, "ms": None} for path in paths}
    built: dict[TeacherPath, Distiller] = {}
    seconds: dict[TeacherPath, list[float]] = {}
    step_s = 0.0  # the untuned path's first timed step, once measured
    try:
        for path in paths:  # compile each, and one step
            if built and budget_steps is not None and (
                    time.perf_counter() - start > budget_steps * step_s):
                rows[path]["note"] = "not timed: budget spent"
                continue
            built[path] = _timing_copy(distiller, path)
            rows[path]["first_s"] = round(_run_step(built[path], x, y), 2)
            seconds[path] = [_run_step(built[path], x, y)]
            step_s = seconds[paths[0]][0]
        burst = timing.burst_size(step_s)

        def timer(path):
            return lambda: sum(_run_step(built[path], x, y) for _ in range(burst)) / burst

        def more(done: int, round_s: float) -> bool:
            # Candidates 10% apart need more rounds on shared cores: take them while
            # they fit in half the budget.
            return (budget_steps is not None and done < MAX_ROUNDS
                    and time.perf_counter() - start + round_s < budget_steps * step_s / 2)

        timed = timing.round_robin({path: timer(path) for path in built}, max(1, steps), more)
        for path, times in timed.items():
            seconds[path] += times
    finally:
        distiller.student.set_weights(weights)
    for path, times in seconds.items():
        rows[path]["ms"] = round(1e3 * statistics.median(times[1:]), 2)
        rows[path]["rounds"] = len(times) - 1

    images = list(_images(agreement_data if agreement_data is not None else [batch]))
    reference_logits = None
    choice = paths[0]
    first_ms = rows[paths[0]]["ms"]
    for path in sorted((p for p in paths if rows[p]["ms"] is not None),
                       key=lambda p: rows[p]["ms"]):
        if path != paths[0] and rows[path]["ms"] * min_speedup > first_ms:
            rows[path]["note"] = f"not chosen: less than {min_speedup:g}x the first path"
            continue
        if path.teacher_numerics == reference.teacher_numerics:
            rows[path].update(agreement=1.0, kl=0.0)
            choice = path
            break
        student = distiller.student
        if reference_logits is None:
            reference_logits = _path_logits(agreement_teachers or distiller.teachers, student,
                                            images, reference)
        logits = _path_logits(agreement_teachers or built[path].teachers, student, images, path)
        agreement = float(np.mean(logits.argmax(-1) == reference_logits.argmax(-1)))
        kl = float(np.mean(ops.convert_to_numpy(
            kl_divergence_from_logits(reference_logits, logits))))
        rows[path].update(agreement=round(agreement, 5), kl=kl)
        if agreement >= agreement_min and kl <= kl_max:
            choice = path
            break
        rows[path]["note"] = (f"refused: agreement {agreement:.2%} < {agreement_min:.2%}"
                              if agreement < agreement_min else f"refused: KL {kl:.3g} > {kl_max}")
    for row in rows.values():
        if row["ms"]:
            row["speedup"] = round(first_ms / row["ms"], 3)
    note = "" if reference_logits is None else (
        f"agreement on {len(reference_logits)} images")
    result = TuneResult(choice, paths, [rows[p] for p in paths],
                        time.perf_counter() - start, note)
    if log:
        log(format_table(result))
    return result


def format_table(result: TuneResult) -> str:
    """The candidates as an aligned text table, the choice marked."""
    lines = [f"Teacher path: {result.choice.name} (tuned in {result.seconds:.0f} s"
             f"{'; ' + result.note if result.note else ''})",
             f"  {'path':<26}{'ms/step':>9}{'speedup':>9}{'agree':>9}{'KL':>10}  note"]
    for row in result.table:
        mark = "*" if row["path"] == result.choice.name else " "
        ms = "" if row.get("ms") is None else f"{row['ms']:.1f}"
        speed = "" if row.get("speedup") is None else f"{row['speedup']:.2f}x"
        agree = "" if row.get("agreement") is None else f"{row['agreement']:.2%}"
        kl = "" if row.get("kl") is None else f"{row['kl']:.2g}"
        lines.append(f"{mark} {row['path']:<26}{ms:>9}{speed:>9}{agree:>9}{kl:>10}  "
                     f"{row.get('note', '')}")
    return "\n".join(lines)


# ----------------------------------------------------------------- helpers


def _split(batch):
    if isinstance(batch, tuple) and len(batch) in (2, 3):
        return batch[0], batch[1]
    return batch, None


def _images(data: Iterable):
    for batch in data:
        yield _split(batch)[0]


def _timing_copy(distiller: Distiller, path: TeacherPath) -> Distiller:
    """`apply` with a fresh copy of the optimizer, so timing leaves the real one alone."""
    optimizer = distiller.optimizer
    copy = apply(distiller, path)
    copy.compile(optimizer=type(optimizer).from_config(optimizer.get_config()),
                 jit_compile=path.jit_compile)
    return copy


def _run_step(distiller: Distiller, x, y) -> float:
    """Seconds of one train step (the loss comes back to the host, so it has run)."""
    start = time.perf_counter()
    distiller.train_on_batch(x, y)
    return time.perf_counter() - start


def _path_logits(teachers: list[keras.Model], student: keras.Model, images: list,
                 path: TeacherPath) -> np.ndarray:
    """The mean float32 logits of `teachers` on `images`, computed as `path` does."""
    teachers = [with_dtype(t, path.teacher_dtype) for t in teachers]
    distiller = Distiller(teachers if len(teachers) > 1 else teachers[0], student,
                          teacher_jit_compile=path.teacher_jit_compile)
    return _teacher_logits(distiller, images, path)


def _teacher_logits(distiller: Distiller, images: list, path: TeacherPath) -> np.ndarray:
    """The teachers' float32 logits as `path` computes them (JAX: op by op, each op XLA)."""
    forward = distiller.teacher_logits
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        forward = tf.function(forward, jit_compile=path.jit_compile)
    return np.concatenate([ops.convert_to_numpy(forward(x)) for x in images])
