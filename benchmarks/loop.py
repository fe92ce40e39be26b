"""The training loop's overhead at the paper's epoch structures: `train.run` vs bare `fit`.

The paper's small datasets have tiny epochs (Flowers102: 2 steps at batch 512;
Pets37: about 6), run for thousands of epochs, so any per-epoch cost is paid
thousands of times. This compares, in one process and alternating:

- `train.run` (`funmatch distill`) with the default log, evaluation and
  checkpoint settings: its steady-state training images/s from metrics.jsonl
  (each process's first log interval, which holds compilation, left out;
  evaluation time left out, checkpoint writes at log steps included);
- a bare `Distiller.fit(ds, steps_per_epoch=total_steps)` on the same models,
  data pipeline and compiled step, timed after as many warm-up steps as
  `train.run`'s first log interval.

for epochs of 2, 6 and 100 steps. The student is `bit_r50x1` so that a
checkpoint has its real size (student + Adam state); the teacher is a small
CNN file, so the student and the loop dominate. It also times one checkpoint
write (`CheckpointManager.save`), the part of it that blocks training when
written in the background (`save(..., background=True)`: the copy to host memory),
and the share of the run the default cadence gives them.
Target: a ratio >= 0.95 for every epoch structure. The last line is JSON.

Usage:
    python benchmarks/loop.py [--quick] [--steps 60] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import common  # noqa: E402  (benchmarks/common.py)
import keras  # noqa: E402

from funmatch_keras import configs, models
from funmatch_keras.app import build
from funmatch_keras.app import distill as train
from funmatch_keras.app import workdir as workdirs
from funmatch_keras.data import pipelines as data
from funmatch_keras.distiller import Distiller  # noqa: E402
from funmatch_keras.training import steplog
from funmatch_keras.training.checkpoint import CheckpointManager  # noqa: E402

STRUCTURES = (2, 6, 100)  # steps per epoch: Flowers102, Pets37, a large dataset


def make_config(teacher_file: str, steps_per_epoch: int, total_steps: int, args):
    return configs.apply_overrides(configs.load_config("digits"), {
        "teacher": teacher_file, "teacher_epochs": "None", "student": args.student,
        "student_size": str(args.size), "batch_size": str(args.batch_size),
        "eval_batch_size": "64", "steps_per_epoch": str(steps_per_epoch),
        "epochs": str(total_steps // steps_per_epoch), "warmup_steps": "1",
        "jit_compile": str(args.jit),
    })


def run_images_per_s(config, workdir: str) -> float:
    train.run(config, workdir, verbose=0)
    history = steplog.read_metrics(workdirs.metrics_path(workdir))
    return steplog.throughput(history, config.batch_size)


def bare_images_per_s(config, warmup_steps: int) -> float:
    source = build.source(config, "train")
    (teacher,) = build.teachers(config, 10, "")
    distiller = Distiller(teacher, build.student(config, 10))
    total = config.steps_per_epoch * config.epochs
    distiller.compile(optimizer=build.optimizer(config, total),
                      jit_compile=build.jit_compile(config.jit_compile))
    ds = data.train_pipeline(source, **build.pipeline_kwargs(config, source))  # as distill's
    timer = _SteadyStateTimer(warmup_steps)
    distiller.fit(ds, steps_per_epoch=total, epochs=1, verbose=0, callbacks=[timer],
                  shuffle=False)  # as `loop.fit_resumably` calls it
    return (total - warmup_steps) * config.batch_size / (timer.end - timer.start)


class _SteadyStateTimer(keras.callbacks.Callback):
    """Times a `fit` from the end of its first `warmup_steps` (compilation, the
    shuffle buffer's first fill) to its end, as `train.run`'s first log interval is
    left out."""

    def __init__(self, warmup_steps: int):
        super().__init__()
        self.warmup_steps = warmup_steps
        self.start = self.end = None

    def on_train_batch_end(self, batch, logs=None):
        if batch + 1 == self.warmup_steps:
            self.start = time.perf_counter()

    def on_train_end(self, logs=None):
        self.end = time.perf_counter()


def checkpoint_seconds(config, directory: str, repeats: int) -> tuple[float, float]:
    student = build.student(config, 10)
    optimizer = build.optimizer(config, 100)
    optimizer.build(student.trainable_variables)
    manager = CheckpointManager(directory, keep=2)
    save, blocking = [], []
    for step in range(1, repeats + 1):
        start = time.perf_counter()
        manager.save(step, student, optimizer)
        save.append(time.perf_counter() - start)
        start = time.perf_counter()
        manager.save(100 + step, student, optimizer, background=True)
        blocking.append(time.perf_counter() - start)
        manager.wait()
    return statistics.median(save), statistics.median(blocking)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="Steps per run (all structures).")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--jit", action="store_true", help="XLA-compile the step.")
    parser.add_argument("--student", default="bit_r50x1",
                        help="Student spec (bit_r50x1: checkpoints of the real size).")
    parser.add_argument("--structures", default=",".join(map(str, STRUCTURES)),
                        help="Steps per epoch to compare, comma-separated.")
    parser.add_argument("--quick", action="store_true", help="20 steps, 1 repeat.")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats = 20, 1
    total = args.steps - args.steps % 2  # 2-step epochs must divide it
    tmp = tempfile.mkdtemp(prefix="loop_bench_")
    teacher_file = os.path.join(tmp, "teacher.keras")
    models.build(configs.common.SMOKE_TEACHER, 10, args.size).save(teacher_file)

    rows = []
    for steps_per_epoch in [int(n) for n in args.structures.split(",")]:
        epochs = max(1, round(total / steps_per_epoch))
        config = make_config(teacher_file, steps_per_epoch, epochs * steps_per_epoch, args)
        cadence = configs.cadence(config, steps_per_epoch)
        runs, bares = [], []
        for repeat in range(args.repeats):
            workdir = os.path.join(tmp, f"run_{steps_per_epoch}_{repeat}")
            runs.append(run_images_per_s(config, workdir))
            bares.append(bare_images_per_s(config, cadence.log_every_steps))
        row = {"steps_per_epoch": steps_per_epoch, "steps": cadence.total_steps,
               "log_every_steps": cadence.log_every_steps,
               "run_images_per_s": round(statistics.median(runs), 2),
               "bare_images_per_s": round(statistics.median(bares), 2),
               "ratio": round(statistics.median(r / b for r, b in zip(runs, bares)), 3)}
        rows.append(row)
        print(f"{steps_per_epoch:>4} steps/epoch, {row['steps']} steps, log every "
              f"{row['log_every_steps']}: train.run {row['run_images_per_s']:.1f} images/s, "
              f"bare fit {row['bare_images_per_s']:.1f}, ratio {row['ratio']:.3f}", flush=True)

    save_s, blocking_s = checkpoint_seconds(config, os.path.join(tmp, "ckpt"), 3)
    step_s = args.batch_size / rows[-1]["bare_images_per_s"]
    default = configs.load_config("digits")
    between_s = min(default.checkpoint_every_steps * step_s,
                    60 * default.checkpoint_every_minutes)
    print(f"{args.student} checkpoint (student + Adam): {save_s:.2f} s written in the training "
          f"thread = {save_s / step_s:.1f} steps; {blocking_s:.2f} s blocking when written "
          f"in the background. At the default cadence (every {between_s:.0f} s here) that is "
          f"{save_s / between_s:.2%} of the run in the thread, {blocking_s / between_s:.2%} "
          "in the background.")
    print(f"{common.machine_line()}; TF backend, jit_compile={args.jit}, "
          f"batch {args.batch_size}, {args.size} px.")
    common.print_result({f"ratio_{r['steps_per_epoch']}": r["ratio"] for r in rows}
                        | {"checkpoint_s": round(save_s, 3),
                           "checkpoint_blocking_s": round(blocking_s, 3)})


if __name__ == "__main__":
    keras.utils.set_random_seed(0)
    main()
