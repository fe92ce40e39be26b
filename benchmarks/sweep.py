"""A sweep's cost with and without a teacher store: 4 runs (T = 1, 2, 5, 10), one teacher pass.

On the paper's pair, BiT-R152x2 -> BiT-R50x1 (random weights, the teacher's
weight standardization folded as `funmatch distill` does), function matching on
the bundled digits resized to `--size`, every run the same `--steps` at
`--batch`, in one process:

- `live`: 4 runs, each running the teacher at every step;
- `store`: a teacher-only pass (`TeacherStore.fill`) into a fresh store, then the
  same 4 runs replaying it (`TeacherStore.replay`);
- a second live T=1 run: the weight difference of a deterministic live rerun,
  against which the replayed run's difference is judged.

Two clocks. The ratios that answer the issue's targets are over steady-state steps:
each run's median step after its first (which compiles), times the run's steps, and
for the teacher pass its median batch after the first (teacher forward and the chunk
write). A patient run has thousands of steps, so that is what a sweep pays; a short
benchmark run would otherwise measure building BiT models and tracing. Each run's
whole wall time (build, compile, train) is reported beside it (`*_whole_s`).
TensorFlow op determinism is on. The last line is JSON: `live_s`, `store_s`,
`sweep_ratio` (store over live), `replay_run_ratio` (one replayed run over one live
run), `first_run_overhead` (teacher pass plus one replayed run over one live run),
`bytes_per_step`, `max_abs_weight_diff` (replayed vs live, T=1),
`rerun_max_abs_weight_diff` (live vs live), and the CPU flags.

    python benchmarks/sweep.py --quick   # under 10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks import common  # noqa: E402
from funmatch_keras import configs, models  # noqa: E402
from funmatch_keras.app import build  # noqa: E402
from funmatch_keras.data import pipelines as data  # noqa: E402
from funmatch_keras.data.teacher_store import (  # noqa: E402
    TeacherStore,
    fingerprint,
    teacher_function,
)
from funmatch_keras.distiller import Distiller  # noqa: E402
from funmatch_keras.optim import optimizers as optim  # noqa: E402

TEMPERATURES = (1.0, 2.0, 5.0, 10.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="--size 64 --batch 8 --steps 10")
    parser.add_argument("--teacher", default="bit_r152x2")
    parser.add_argument("--student", default="bit_r50x1")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    if args.quick:
        args.size, args.batch, args.steps = 64, 8, 10
    print(common.machine_line(), flush=True)
    tf.config.experimental.enable_op_determinism()
    # The digits config's pipeline (function matching, its crops and flips) at this
    # size and batch, built as `funmatch distill` builds it.
    config = configs.apply_overrides(configs.load_config("digits"), {
        "batch_size": str(args.batch), "student_size": str(args.size), "seed": "0"})
    source = build.source(config, "train")
    classes = source.num_classes

    def make_dataset(step):
        return data.train_pipeline(source, **build.pipeline_kwargs(config, source,
                                                                  start_step=step))

    keras.utils.set_random_seed(1)
    teacher = models.fold_if_standardized(models.build(args.teacher, classes, args.size))

    class StepClock(keras.callbacks.Callback):
        """Wall time of each training step (batch end to batch end; the first from
        the start of the fit)."""

        def on_train_begin(self, logs=None):
            self.times = [time.perf_counter()]

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter())

        def steady_s(self) -> float:
            steps = np.diff(self.times)[1:]  # the first step compiles
            return float(np.median(steps)) * args.steps

    def run(temperature, store=None):
        start = time.perf_counter()
        keras.utils.set_random_seed(0)  # every run's student starts from the same weights
        student = models.build(args.student, classes, args.size)
        distiller = Distiller(teacher, student, temperature=temperature)
        distiller.compile(optimizer=optim.adamw(1e-3, 1e-5, args.steps, 1), jit_compile=False)
        ds = make_dataset(0)
        if store is not None:
            ds = store.replay(ds, 0, args.steps)
        clock = StepClock()
        distiller.fit(ds.take(args.steps), epochs=1, steps_per_epoch=args.steps, verbose=0,
                      callbacks=[clock])
        return clock.steady_s(), student.get_weights(), time.perf_counter() - start

    live = [run(t) for t in TEMPERATURES]
    rerun_s, rerun_weights, _ = run(TEMPERATURES[0])
    with tempfile.TemporaryDirectory() as directory:
        fill_start = time.perf_counter()
        store = TeacherStore.open(directory, fingerprint([teacher], seed=0, size=args.size),
                                  num_classes=classes, batch_size=args.batch)
        distiller = Distiller(teacher, models.build("cnn:4", classes, args.size))
        compute = teacher_function(distiller)
        batch_times = []

        def timed(x):  # each batch's teacher forward, and (on the next call) its write
            batch_times.append(time.perf_counter())
            return compute(x)

        store.fill(timed, make_dataset, 0, args.steps)
        batch_times.append(time.perf_counter())
        fill_whole_s = batch_times[-1] - fill_start
        fill_s = float(np.median(np.diff(batch_times)[1:])) * args.steps
        replayed = [run(t, store) for t in TEMPERATURES]
        stored_bytes = sum(os.path.getsize(os.path.join(directory, n))
                           for n in os.listdir(directory) if n.endswith(".npy"))

    def max_diff(a, b):
        return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))

    live_s = sum(r[0] for r in live)
    store_s = fill_s + sum(r[0] for r in replayed)
    live_whole_s = sum(r[2] for r in live)
    store_whole_s = fill_whole_s + sum(r[2] for r in replayed)
    report = {
        "teacher": args.teacher, "student": args.student, "size": args.size,
        "batch": args.batch, "steps": args.steps, "quick": args.quick,
        "live_runs_s": [round(r[0], 2) for r in live],
        "replayed_runs_s": [round(r[0], 2) for r in replayed],
        "teacher_pass_s": round(fill_s, 2), "live_rerun_s": round(rerun_s, 2),
        "live_whole_s": round(live_whole_s, 2), "store_whole_s": round(store_whole_s, 2),
        "sweep_ratio_whole": round(store_whole_s / live_whole_s, 3),
        "live_s": round(live_s, 2), "store_s": round(store_s, 2),
        "sweep_ratio": round(store_s / live_s, 3),
        "replay_run_ratio": round(replayed[0][0] / live[0][0], 3),
        "first_run_overhead": round((fill_s + replayed[0][0]) / live[0][0], 3),
        "bytes_per_step": args.batch * classes * 4,
        "stored_bytes_per_step": stored_bytes / args.steps,
        "max_abs_weight_diff": max_diff(replayed[0][1], live[0][1]),
        "rerun_max_abs_weight_diff": max_diff(rerun_weights, live[0][1]),
        **common.machine(),
    }
    print(f"live {live_s:.1f} s, store {store_s:.1f} s (teacher pass {fill_s:.1f} s): "
          f"sweep ratio {report['sweep_ratio']}, replayed run / live run "
          f"{report['replay_run_ratio']}, first run overhead {report['first_run_overhead']}")
    common.print_result(report)


if __name__ == "__main__":
    main()
