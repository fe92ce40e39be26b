"""A sweep's cost with and without a teacher store: 4 runs (T = 1, 2, 5, 10), one teacher pass.

On the paper's pair, BiT-R152x2 -> BiT-R50x1 (random weights, the teacher's
weight standardization folded as `funmatch distill` does), function matching on
the bundled digits resized to `--size`, every run the same `--steps` at
`--batch`, in one process:

- `live`: 4 runs, each running the teacher at every step, and a live T=1 rerun
  (the weight difference of a deterministic rerun, against which the replayed
  run's is judged);
- `store`: the T=1 run records its own steps into a fresh store as it trains
  (`StoreRecorder`, what `funmatch distill --config.teacher_store` does), and
  the T=2, 5, 10 runs replay it; a replayed T=1 run is timed for
  `replay_run_ratio` and its weights compared with the live run's;
- the other way to fill a store: a teacher-only pass ahead (`TeacherStore.fill`,
  what `funmatch teacher-store` does), for `first_run_overhead_ahead`;
- where a replayed step's time goes: the same student step fed from batches held
  in memory (no input pipeline, no store; not with `--quick`), and the replayed
  input alone (pipeline and store reading, no training).

Two clocks. The ratios that answer the issue's targets are over steady-state steps:
each run's median step after its first (which compiles), times the run's steps, plus
the time its chunk writes took, and for the teacher pass its median batch after the
first plus its writes. A patient run has thousands of steps, so that is what a sweep
pays; a short benchmark run would otherwise measure building BiT models and tracing.
Each run's whole wall time (build, compile, train) is reported beside it (`*_whole_s`).
TensorFlow op determinism is on. The last line is JSON: `live_s`, `store_s`,
`sweep_ratio` (store over live), `replay_run_ratio` (one replayed run over one live
run), `first_run_overhead` (the recording run over one live run),
`first_run_overhead_ahead` (teacher pass plus one replayed run over one live run),
`bytes_per_step`, `max_abs_weight_diff` (replayed vs live, T=1),
`rerun_max_abs_weight_diff` (live vs live), the step breakdown and the CPU flags.

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
    StoreRecorder,
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

        def step_s(self) -> float:
            return float(np.median(np.diff(self.times)[1:]))  # the first step compiles

    writes = []  # seconds of each chunk write, by the recorder or the teacher pass
    original_write = TeacherStore.write_chunk

    def timed_write(store, *args, **kwargs):
        start = time.perf_counter()
        original_write(store, *args, **kwargs)
        writes.append(time.perf_counter() - start)

    TeacherStore.write_chunk = timed_write

    def run(temperature, dataset=None, record_into=None):
        """One run: (steady seconds, student weights, whole seconds, median step)."""
        start = time.perf_counter()
        keras.utils.set_random_seed(0)  # every run's student starts from the same weights
        student = models.build(args.student, classes, args.size)
        distiller = Distiller(teacher, student, temperature=temperature)
        distiller.compile(optimizer=optim.adamw(1e-3, 1e-5, args.steps, 1), jit_compile=False)
        clock, callbacks = StepClock(), []
        if record_into is not None:
            callbacks.append(StoreRecorder(record_into, distiller, args.steps))
        del writes[:]
        ds = make_dataset(0) if dataset is None else dataset
        distiller.fit(ds.take(args.steps), epochs=1, steps_per_epoch=args.steps, verbose=0,
                      callbacks=[clock, *callbacks])
        for callback in callbacks:
            callback.close()
        step = clock.step_s()
        return (step * args.steps + sum(writes), student.get_weights(),
                time.perf_counter() - start, step)

    def new_store(directory):
        return TeacherStore.open(directory, fingerprint([teacher], seed=0, size=args.size),
                                 num_classes=classes, batch_size=args.batch)

    live = [run(t) for t in TEMPERATURES]
    rerun_s, rerun_weights, _, _ = run(TEMPERATURES[0])
    with tempfile.TemporaryDirectory() as recorded, tempfile.TemporaryDirectory() as ahead:
        store = new_store(recorded)
        first = run(TEMPERATURES[0], record_into=store)
        assert not store.missing(0, args.steps), "the recording run left steps out"
        replayed = [run(t, store.replay(make_dataset(0), 0, args.steps)) for t in TEMPERATURES]
        stored_bytes = sum(os.path.getsize(os.path.join(recorded, n))
                           for n in os.listdir(recorded) if n.endswith(".npy"))
        # Where a replayed step's time goes: the input alone, then the step alone.
        batches, input_times = [], [time.perf_counter()]
        for batch in store.replay(make_dataset(0), 0, args.steps):
            batches.append(batch)
            input_times.append(time.perf_counter())
        input_step_s = float(np.median(np.diff(input_times)[1:]))
        student_step_s = None  # --quick leaves this run out, to stay within 10 minutes
        if not args.quick:
            in_memory = tf.data.Dataset.from_tensor_slices(
                tf.nest.map_structure(lambda *x: tf.stack(x), *batches))
            student_step_s = round(run(TEMPERATURES[0], in_memory)[3], 3)
        # The other way: a teacher-only pass fills a store ahead.
        fill_store = new_store(ahead)
        distiller = Distiller(teacher, models.build("cnn:4", classes, args.size))
        compute = teacher_function(distiller)
        batch_times = []

        def timed(x):  # each batch's teacher forward
            batch_times.append(time.perf_counter())
            return compute(x)

        del writes[:]
        fill_start = time.perf_counter()
        fill_store.fill(timed, make_dataset, 0, args.steps)
        fill_whole_s = time.perf_counter() - fill_start
        teacher_pass_step_s = float(np.median(np.diff(batch_times)[1:]))
        fill_s = teacher_pass_step_s * args.steps + sum(writes)

    def max_diff(a, b):
        return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))

    live_s = sum(r[0] for r in live)
    store_s = first[0] + sum(r[0] for r in replayed[1:])
    live_whole_s = sum(r[2] for r in live)
    store_whole_s = first[2] + sum(r[2] for r in replayed[1:])
    report = {
        "teacher": args.teacher, "student": args.student, "size": args.size,
        "batch": args.batch, "steps": args.steps, "quick": args.quick,
        "live_runs_s": [round(r[0], 2) for r in live],
        "recording_run_s": round(first[0], 2),
        "replayed_runs_s": [round(r[0], 2) for r in replayed],
        "teacher_pass_s": round(fill_s, 2), "live_rerun_s": round(rerun_s, 2),
        "live_whole_s": round(live_whole_s, 2), "store_whole_s": round(store_whole_s, 2),
        "teacher_pass_whole_s": round(fill_whole_s, 2),
        "sweep_ratio_whole": round(store_whole_s / live_whole_s, 3),
        "live_s": round(live_s, 2), "store_s": round(store_s, 2),
        "sweep_ratio": round(store_s / live_s, 3),
        "replay_run_ratio": round(replayed[0][0] / live[0][0], 3),
        "first_run_overhead": round(first[0] / live[0][0], 3),
        "first_run_overhead_ahead": round((fill_s + replayed[0][0]) / live[0][0], 3),
        # Medians of one step, in seconds.
        "live_step_s": round(live[0][3], 3), "recording_step_s": round(first[3], 3),
        "replayed_step_s": round(replayed[0][3], 3),
        "student_step_in_memory_s": student_step_s,
        "replayed_input_s": round(input_step_s, 4),
        "teacher_pass_step_s": round(teacher_pass_step_s, 3),
        "bytes_per_step": args.batch * classes * 4,
        "stored_bytes_per_step": stored_bytes / args.steps,
        "max_abs_weight_diff": max_diff(replayed[0][1], live[0][1]),
        "recorded_run_max_abs_weight_diff": max_diff(first[1], live[0][1]),
        "rerun_max_abs_weight_diff": max_diff(rerun_weights, live[0][1]),
        **common.machine(),
    }
    print(f"live {live_s:.1f} s, store {store_s:.1f} s: sweep ratio {report['sweep_ratio']}, "
          f"replayed run / live run {report['replay_run_ratio']}, first run overhead "
          f"{report['first_run_overhead']} (recording) / "
          f"{report['first_run_overhead_ahead']} (teacher pass ahead); steps: live "
          f"{report['live_step_s']} s, replayed {report['replayed_step_s']} s, the student "
          f"step on batches in memory {report['student_step_in_memory_s']} s, the replayed "
          f"input alone {report['replayed_input_s']} s")
    common.print_result(report)


if __name__ == "__main__":
    main()
