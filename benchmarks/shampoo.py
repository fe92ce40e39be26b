"""Shampoo vs AdamW for function matching on digits: epochs, wall time, step overhead.

The paper (docs/design.md §2.6): with Shampoo, ImageNet distillation reaches at 1,200
epochs what Adam reaches at 4,800. This measures the same question at demo
scale, with the demo's teacher and student (`configs/digits.py`: a CNN teacher
trained with labels for 20 epochs teaches `cnn:16,32,64` at 16 px, batch 64,
function matching, lr 1e-2, wd 1e-5, warmup 19 steps, XLA as `build.jit_compile`):

1. per seed, one student initialization, used by every run of that seed;
2. AdamW (`optim.adamw`) with full warmup + cosine schedules of each length
   in `--adamw-epochs`; the final test agreement with the teacher (and test
   top-1), mean over seeds, is the target. The reference is the longest
   AdamW run, unless it *saturates*: its mean agreement curve reaches its
   final value before half of its epochs. Then the next shorter AdamW run is
   the reference (digits saturates by ~30 epochs: the demo's 60 are more
   than it needs). Both comparisons are printed and in the JSON;
3. Shampoo (`optim.shampoo`, same lr, wd, warmup, data and initialization)
   with full schedules of each length in `--shampoo-epochs`; the shortest one
   whose mean final agreement reaches the target is the answer (the paper
   also compares full schedules of different lengths);
4. step times, round-robin (one AdamW step, one Shampoo step, ... on the same
   batch, so that load from other processes hits both alike): the median
   step, the median of the steps that recompute Shampoo's inverse roots
   (reported on their own) and the mean (amortized) step; for the digits
   distiller and for a larger student (`--overhead-model`, default
   `bit_r50x1` at 32 px, batch 8, trained with labels, without XLA).

Ratios are Shampoo / AdamW: `epochs_ratio` (epochs to reach the reference's
final agreement), `wall_ratio` (training seconds of those runs, evaluation
excluded) and `step_overhead` (amortized digits step). Target: `epochs_ratio
<= 0.5` at `step_overhead <= 1.3`.

Usage:
    python benchmarks/shampoo.py --quick   # 1 seed, 1-2 epochs, a small second model: < 3 min
    python benchmarks/shampoo.py           # 3 seeds; AdamW 20/60, Shampoo 8/10/15/30 epochs
                                           # (~25 min on 2 shared cores)
    python benchmarks/shampoo.py --adamw-epochs 20 --shampoo-epochs 8,10,15  # ~15 min

The last line printed is one JSON object with every measurement.
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
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from funmatch_keras import configs, models
from funmatch_keras.app import build
from funmatch_keras.app import train_teacher as supervised
from funmatch_keras.data import pipelines as data
from funmatch_keras.data.sources import digits_source  # noqa: E402
from funmatch_keras.distiller import Distiller  # noqa: E402
from funmatch_keras.optim import optimizers as optim
from funmatch_keras.training import distribute
from funmatch_keras.training.steplog import TestSetTracker, predict_classes
from funmatch_keras.tuning import timing


class Recorder(TestSetTracker):
    """Step times, and test top-1 / agreement with the teacher after each epoch."""

    def __init__(self, student, images, labels, teacher_predictions):
        super().__init__(student, images, labels, teacher_predictions)
        self.seconds: list[float] = []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def make_optimizer(name: str, lr: float, weight_decay: float, total_steps: int,
                   warmup_steps: int, args):
    warmup = min(warmup_steps, total_steps - 1)
    if name == "adamw":
        return optim.adamw(lr, weight_decay, total_steps, warmup)
    return optim.shampoo(lr, weight_decay, total_steps, warmup, block_size=args.block_size,
                         precondition_every=args.precondition_every,
                         statistics_every=args.statistics_every,
                         start_preconditioning_step=args.start_preconditioning_step)


def train_data(config, seed: int, epochs: int | None):
    train_source = digits_source("train")
    return data.train_pipeline(train_source, **build.pipeline_kwargs(
        config, train_source, mode="function_matching", seed=seed, epochs=epochs))


def distill(name: str, epochs: int, seed: int, initial: list, teacher, config, test, args):
    """One function-matching run from `initial`; returns its final scores and times."""
    steps = data.steps_per_epoch(digits_source("train"), config.batch_size)
    student = build.student(config, 10)
    student.set_weights(initial)
    distiller = Distiller(teacher, student, temperature=config.temperature)
    distiller.compile(optimizer=make_optimizer(name, config.lr, config.weight_decay,
                                               steps * epochs, config.warmup_steps, args),
                      jit_compile=args.jit_compile)
    recorder = Recorder(student, *test)
    distiller.fit(train_data(config, seed, epochs), epochs=epochs, steps_per_epoch=steps,
                  callbacks=[recorder], shuffle=False, verbose=0)
    row = {"optimizer": name, "epochs": epochs, "seed": seed,
           "agreement": recorder.agreement[-1], "top1": recorder.top1[-1],
           "agreement_curve": [round(a, 4) for a in recorder.agreement],
           # Training seconds; the first step (tracing + compiling) is left out.
           "train_s": round(sum(recorder.seconds[1:]), 2)}
    print(f"  {name:7s} {epochs:3d} epochs, seed {seed}: agreement {row['agreement']:.4f}, "
          f"top-1 {row['top1']:.4f}, {row['train_s']:.1f} s", flush=True)
    return row


def summary(seconds: list[float], optimizer=None) -> dict:
    """Median step, median root-recomputing step (Shampoo), mean step, in ms.

    `seconds[i]` is optimizer step `i + 2`: the untimed first call was step 1.
    """
    special = set()
    if isinstance(optimizer, optim.Shampoo):
        start, every = optimizer.start_preconditioning_step, optimizer.precondition_every
        special = {i for i in range(len(seconds))
                   if i + 2 >= start and (i + 2 - start) % every == 0}
    regular = [s for i, s in enumerate(seconds) if i not in special]
    roots = [s for i, s in enumerate(seconds) if i in special]
    return {"median_ms": round(common.median_ms(regular), 2),
            "root_step_median_ms": round(common.median_ms(roots), 2) if roots else None,
            "mean_ms": round(1e3 * statistics.fmean(seconds), 2), "steps": len(seconds)}


def step_overhead(build_step, rounds: int) -> dict:
    """Round-robin step times of AdamW and Shampoo; `build_step(name)` → (step, optimizer)."""
    built = {name: build_step(name) for name in ("adamw", "shampoo")}
    for step, _ in built.values():
        step()  # trace and compile
    seconds = timing.round_robin({name: timing.timed(step) for name, (step, _) in built.items()},
                                 rounds)
    result = {name: summary(seconds[name], built[name][1]) for name in built}
    result["median_ratio"] = common.ratio(result["shampoo"]["median_ms"],
                                          result["adamw"]["median_ms"])
    result["amortized_ratio"] = common.ratio(result["shampoo"]["mean_ms"],
                                             result["adamw"]["mean_ms"])
    return result


def digits_overhead(teacher, initial, config, args) -> dict:
    batch = next(iter(train_data(config, seed=0, epochs=None)))

    def build_step(name):
        student = build.student(config, 10)
        student.set_weights(initial)
        distiller = Distiller(teacher, student, temperature=config.temperature)
        optimizer = make_optimizer(name, config.lr, config.weight_decay, 10_000,
                                   config.warmup_steps, args)
        distiller.compile(optimizer=optimizer, jit_compile=args.jit_compile)
        return (lambda: distiller.train_on_batch(batch)), optimizer

    return step_overhead(build_step, args.step_rounds)


def model_overhead(args) -> dict:
    size, batch = args.overhead_size, args.overhead_batch
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (batch, size, size, 3)).astype("float32")
    y = rng.integers(0, 10, batch)

    def build_step(name):
        keras.utils.set_random_seed(0)
        model = models.build(args.overhead_model, 10, size)
        optimizer = make_optimizer(name, 1e-3, 1e-5, 10_000, 10, args)
        model.compile(optimizer=optimizer, jit_compile=False,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return (lambda: model.train_on_batch(x, y)), optimizer

    result = step_overhead(build_step, args.overhead_rounds)
    result.update(model=args.overhead_model, size=size, batch=batch, jit_compile=False,
                  params=models.build(args.overhead_model, 10, size).count_params())
    return result


def compare(rows, reference: int, shampoo_epochs: list[int]) -> dict:
    """Shampoo vs the AdamW run of `reference` epochs (means over seeds)."""
    def runs(name, epochs):
        return [r for r in rows if r["optimizer"] == name and r["epochs"] == epochs]

    def mean(group, key):
        return statistics.fmean(r[key] for r in group)

    adamw = runs("adamw", reference)
    target, target_top1 = mean(adamw, "agreement"), mean(adamw, "top1")
    table = [{"epochs": e, "agreement": round(mean(runs("shampoo", e), "agreement"), 4),
              "top1": round(mean(runs("shampoo", e), "top1"), 4),
              "train_s": round(mean(runs("shampoo", e), "train_s"), 2)} for e in shampoo_epochs]
    best = next((t for t in table if t["agreement"] >= target), None)
    best_top1 = next((t for t in table if t["top1"] >= target_top1), None)
    return {
        "adamw_epochs": reference, "target_agreement": round(target, 4),
        "target_top1": round(target_top1, 4), "adamw_train_s": round(mean(adamw, "train_s"), 2),
        "shampoo_epochs": best and best["epochs"],
        "epochs_ratio": best and common.ratio(best["epochs"], reference),
        "wall_ratio": best and common.ratio(best["train_s"], mean(adamw, "train_s")),
        "top1_epochs_ratio": best_top1 and common.ratio(best_top1["epochs"], reference),
        "shampoo": table,
    }


def saturates(rows, epochs: int) -> tuple[bool, int]:
    """Whether AdamW's mean curve reaches its final agreement before half its epochs."""
    curve = np.mean([r["agreement_curve"] for r in rows
                     if r["optimizer"] == "adamw" and r["epochs"] == epochs], axis=0)
    first = int(np.argmax(curve >= curve[-1])) + 1
    return first <= epochs // 2, first


def plot_agreement(rows, path: str, title: str = "") -> str:
    """Mean test agreement (over seeds) against epoch, one line per run length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    for name, style in (("adamw", "-"), ("shampoo", "--")):
        for epochs in sorted({r["epochs"] for r in rows if r["optimizer"] == name}):
            curves = [r["agreement_curve"] for r in rows
                      if r["optimizer"] == name and r["epochs"] == epochs]
            mean = 100 * np.mean(curves, axis=0)
            axes.plot(np.arange(1, len(mean) + 1), mean, style, marker=".",
                      label=f"{'AdamW' if name == 'adamw' else 'Shampoo'}, {epochs} epochs "
                            f"({len(curves)} seed{'s' * (len(curves) > 1)})")
    axes.set(xlabel="epoch", ylabel="test agreement with the teacher (%)", title=title)
    low = min(100 * min(r["agreement_curve"][len(r["agreement_curve"]) // 4:]) for r in rows)
    axes.set_ylim(max(0.0, low - 2), 100)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 1-2 epochs, < 3 min")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--adamw-epochs", default="20,60", help="AdamW schedule lengths")
    parser.add_argument("--shampoo-epochs", default="8,10,15,30",
                        help="Shampoo schedule lengths")
    parser.add_argument("--teacher-epochs", type=int, default=20)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--precondition-every", type=int, default=10)
    parser.add_argument("--statistics-every", type=int, default=1,
                        help="steps between Kronecker statistics updates (1: the paper's)")
    parser.add_argument("--start-preconditioning-step", type=int, default=10)
    parser.add_argument("--overhead-only", action="store_true",
                        help="only the larger student's step times (no teacher, no digits runs)")
    parser.add_argument("--jit-compile", choices=("auto", "true", "false"), default="auto",
                        help="XLA for the digits runs; auto: build.jit_compile (on, one CPU)")
    parser.add_argument("--step-rounds", type=int, default=60)
    parser.add_argument("--overhead-model", default="bit_r50x1")
    parser.add_argument("--overhead-size", type=int, default=32)
    parser.add_argument("--overhead-batch", type=int, default=8)
    parser.add_argument("--overhead-rounds", type=int, default=10,
                        help="timed steps of the larger student; 0 skips it")
    parser.add_argument("--workdir", default=None, help="keeps the trained teacher")
    parser.add_argument("--plot", default=None,
                        help="writes agreement against epoch here (PNG; default: none)")
    args = parser.parse_args()
    tf.get_logger().setLevel("ERROR")  # Keras retraces predict for every new student
    if args.quick:
        args.seeds, args.adamw_epochs, args.shampoo_epochs = 1, "2", "1"
        args.teacher_epochs, args.jit_compile, args.step_rounds = 1, "false", 12
        args.overhead_model, args.overhead_rounds = "cnn:32,64,128", 6
        args.precondition_every, args.start_preconditioning_step = 3, 3
    args.jit_compile = {"auto": build.jit_compile(None), "true": True, "false": False}[
        args.jit_compile]
    adamw_epochs = sorted(int(e) for e in args.adamw_epochs.split(","))
    shampoo_epochs = sorted(int(e) for e in args.shampoo_epochs.split(","))
    started = time.time()
    print(common.machine_line(), flush=True)
    if args.overhead_only:
        big = model_overhead(args)
        print(f"  {big['model']} {big['size']} px, batch {big['batch']}, statistics every "
              f"{args.statistics_every}: {big}")
        common.print_result({"step_overhead": big["amortized_ratio"], "overhead_model": big,
                             "statistics_every": args.statistics_every,
                             "machine": common.machine()})
        return

    config = configs.apply_overrides(configs.load_config("digits"),
                                     {"teacher_epochs": str(args.teacher_epochs)})
    configs.validate(config)
    workdir = args.workdir or tempfile.mkdtemp(prefix="shampoo_bench_")
    keras.utils.set_random_seed(config.seed)
    test_source = digits_source("test")
    print(f"[teacher] {config.teacher}, {config.teacher_epochs} epochs with labels ({workdir})")
    supervised.train_missing_teachers(config, workdir, digits_source("train"),
                                      distribute.replication("default"), verbose=0)
    (teacher,) = build.teachers(config, 10, workdir)
    images, labels = next(iter(data.eval_pipeline(
        test_source, size=config.student_size,
        batch_size=test_source.num_examples).as_numpy_iterator()))
    teacher_predictions = predict_classes(teacher, images)
    teacher_top1 = float(np.mean(teacher_predictions == labels))
    print(f"[teacher] test top-1 {teacher_top1:.4f}")

    rows, initials = [], []
    for seed in range(args.seeds):
        print(f"[seed {seed}]", flush=True)
        keras.utils.set_random_seed(seed + 1)
        initials.append(build.student(config, 10).get_weights())  # shared by the seed's runs
        for name, lengths in (("adamw", adamw_epochs), ("shampoo", shampoo_epochs)):
            for epochs in lengths:
                rows.append(distill(name, epochs, seed, initials[-1], teacher, config,
                                    (images, labels, teacher_predictions), args))

    comparisons = [compare(rows, e, shampoo_epochs) for e in reversed(adamw_epochs)]
    reference = comparisons[0]
    for comparison in comparisons:
        saturated, first = saturates(rows, comparison["adamw_epochs"])
        comparison.update(saturated=saturated, adamw_reaches_final_at_epoch=first)
    for comparison in comparisons:
        reference = comparison
        if not comparison["saturated"]:
            break
    for c in comparisons:
        print(f"\nAdamW {c['adamw_epochs']} epochs (mean of {args.seeds} seeds): agreement "
              f"{c['target_agreement']:.4f}, top-1 {c['target_top1']:.4f}, "
              f"{c['adamw_train_s']:.1f} s; its mean curve reaches that agreement at epoch "
              f"{c['adamw_reaches_final_at_epoch']}" + (" (saturated)" if c["saturated"] else ""))
        print(f"Shampoo reaches it in {c['shampoo_epochs']} epochs: epochs ratio "
              f"{c['epochs_ratio']}, wall ratio {c['wall_ratio']}")
    print("| Shampoo epochs | agreement | top-1 | train s |\n|---|---|---|---|")
    for t in comparisons[0]["shampoo"]:
        print(f"| {t['epochs']} | {t['agreement']:.4f} | {t['top1']:.4f} | {t['train_s']:.1f} |")

    if args.plot:
        print(f"[plot] {plot_agreement(rows, args.plot, 'Function matching on digits')}")
    print("[step times, round-robin]", flush=True)
    digits = digits_overhead(teacher, initials[0], config, args)
    print(f"  digits distiller: {digits}", flush=True)
    big = model_overhead(args) if args.overhead_rounds else None
    if big:
        print(f"  {big['model']} {big['size']} px: {big}")
    report = {
        "epochs_ratio": reference["epochs_ratio"], "wall_ratio": reference["wall_ratio"],
        "step_overhead": digits["amortized_ratio"],
        "reference_adamw_epochs": reference["adamw_epochs"],
        "comparisons": comparisons, "digits_steps": digits, "overhead_model": big,
        "teacher_top1": round(teacher_top1, 4), "jit_compile": args.jit_compile,
        "settings": {"block_size": args.block_size, "precondition_every": args.precondition_every,
                     "start_preconditioning_step": args.start_preconditioning_step,
                     "statistics_every": args.statistics_every,
                     "seeds": args.seeds, "adamw_epochs": adamw_epochs,
                     "shampoo_epochs": shampoo_epochs},
        "runs": rows, "machine": common.machine(),
        "wall_s": round(time.time() - started, 1),
    }
    common.print_result(report)


if __name__ == "__main__":
    main()
