"""The paper's teaching-mode ablation (Fig. 3) at small scale, on bundled digits.

Beyer et al. (CVPR 2022, arXiv 2106.05237, Sec. 3.2 and Fig. 3) compare four
ways of presenting images to teacher and student:

- fixed teacher: the teacher's logits are computed once (on the central view)
  and reused while the student sees random crops;
- independent noise: teacher and student see two independent crops;
- consistent: both see the very same crop;
- function matching: consistent + batch mixup.

and find that function matching is best at long schedules and keeps improving,
while the fixed teacher reaches the lowest training loss but a worse test
accuracy (it overfits its cached targets).

This script runs the same ablation on scikit-learn's 8x8 digits with the
`digits` config (teacher `cnn:32,64,128` trained with labels, student
`cnn:16,32,64`, 16 px, batch 64, crop area >= 25%, no flips, T = 1, the paper's
AdamW + warmup/cosine), one teacher for all cells, the same student
initialization and data seed in every cell, at a short and a long schedule.

Per cell it reports the student's test top-1, its test agreement with the
teacher, the last epoch's mean training loss (each mode's own objective: on
mixed images for function matching, against cached logits for the fixed
teacher) and the KL to the teacher on the un-augmented training images (a
loss comparable across modes), and it writes a PNG of test top-1 and training
loss per epoch.

Usage:
    python benchmarks/paper_findings.py --quick            # 1 and 2 epochs, no XLA
    python benchmarks/paper_findings.py                    # 10 and 80 epochs
    python benchmarks/paper_findings.py --teacher demo_out/teacher.keras

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import common  # noqa: E402  (benchmarks/common.py)
import keras  # noqa: E402
import numpy as np  # noqa: E402

from funmatch_keras import configs, losses
from funmatch_keras.app import build
from funmatch_keras.app import train_teacher as supervised
from funmatch_keras.data import pipelines as data
from funmatch_keras.data import teacher_cache
from funmatch_keras.data.sources import digits_source  # noqa: E402
from funmatch_keras.distiller import Distiller  # noqa: E402
from funmatch_keras.optim import optimizers as optim
from funmatch_keras.training import distribute
from funmatch_keras.training.steplog import TestSetTracker

MODES = ("fixed_teacher", "independent", "consistent", "function_matching")
LABELS = {"fixed_teacher": "fixed teacher", "independent": "independent noise",
          "consistent": "consistent", "function_matching": "function matching"}


def predict(model: keras.Model, images: np.ndarray) -> np.ndarray:
    return np.asarray(model.predict(images, batch_size=512, verbose=0), np.float32)


def eval_arrays(split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    source = digits_source(split)
    ds = data.eval_pipeline(source, size=size, batch_size=source.num_examples)
    return next(iter(ds.as_numpy_iterator()))


def run_cell(mode: str, epochs: int, config, teacher, train_source, workdir: str,
             eval_sets: dict, jit: bool, eval_every: int) -> dict:
    """Distills one student in `mode` for `epochs`; returns its scores and curve."""
    steps = data.steps_per_epoch(train_source, config.batch_size)
    total = steps * epochs
    keras.utils.set_random_seed(config.seed + 1)  # the same student init in every cell
    student = build.student(config, train_source.num_classes)
    logits = None
    if mode == "fixed_teacher":
        logits = teacher_cache.teacher_logits(train_source, teacher, config.student_size,
                                              workdir)
    ds = data.train_pipeline(train_source, **build.pipeline_kwargs(
        config, train_source, mode=mode, teacher_logits=logits))
    distiller = Distiller(teacher, student, temperature=config.temperature)
    distiller.compile(optimizer=optim.adamw(config.lr, config.weight_decay, total,
                                            min(config.warmup_steps, total - 1)),
                      jit_compile=jit)
    test_x, test_y, teacher_test_top1 = eval_sets["test"]
    curve = TestSetTracker(student, test_x, test_y, teacher_test_top1, eval_every, epochs)
    start = time.time()
    history = distiller.fit(ds, steps_per_epoch=steps, epochs=epochs, callbacks=[curve],
                            verbose=0)
    seconds = time.time() - start
    train_x, _, _ = eval_sets["train"]
    clean_kl = losses.kl_divergence_from_logits(
        eval_sets["train_teacher_logits"], predict(student, train_x), config.temperature)
    last = curve.points[-1]
    return {
        "mode": mode, "epochs": epochs, "steps": total,
        "test_top1": last["test_top1"], "agreement": last["agreement"],
        "train_loss": float(history.history["loss"][-1]),
        "train_kl_clean": float(np.mean(keras.ops.convert_to_numpy(clean_kl))),
        "seconds": round(seconds, 1),
        "curve": curve.points,
        "loss_per_epoch": [float(v) for v in history.history["loss"]],
    }


def format_table(cells: list[dict], short: int, long: int, teacher_top1: float) -> str:
    lines = [f"teacher test top-1 {teacher_top1:.2%}",
             f"{'mode':<20}{'epochs':>7}{'test top-1':>12}{'agreement':>11}"
             f"{'train loss':>12}{'clean KL':>10}{'time s':>8}"]
    for schedule in (short, long):
        for c in cells:
            if c["epochs"] == schedule:
                lines.append(
                    f"{LABELS[c['mode']]:<20}{c['epochs']:>7}{c['test_top1']:>12.2%}"
                    f"{c['agreement']:>11.2%}{c['train_loss']:>12.4f}"
                    f"{c['train_kl_clean']:>10.4f}{c['seconds']:>8.0f}")
    return "\n".join(lines)


def plot(cells: list[dict], long: int, teacher_top1: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, mode in enumerate(MODES):
        for c in cells:
            if c["mode"] != mode:
                continue
            style = "-" if c["epochs"] == long else ":"
            label = f"{LABELS[mode]} ({c['epochs']} ep)"
            epochs = [p["epoch"] for p in c["curve"]]
            acc_ax.plot(epochs, [p["test_top1"] for p in c["curve"]], style, marker=".",
                        color=f"C{i}", label=label)
            loss_ax.plot(np.arange(1, len(c["loss_per_epoch"]) + 1), c["loss_per_epoch"],
                         style, color=f"C{i}", label=label)
    acc_ax.axhline(teacher_top1, color="k", lw=1, label="teacher")
    lowest_final = min(c["curve"][-1]["test_top1"] for c in cells)
    acc_ax.set_ylim(max(0.0, lowest_final - 0.1), min(1.0, teacher_top1 + 0.02))
    acc_ax.set(xlabel="epoch", ylabel="student test top-1", title="Test top-1 (digits)")
    loss_ax.set(xlabel="epoch", ylabel="training loss (own objective)", yscale="log",
                title="Training loss")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Teaching modes (paper Fig. 3) on digits: solid = long, dotted = short")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="1 and 2 epochs, teacher trained 2 epochs")
    parser.add_argument("--short", type=int, help="short schedule epochs (default 10)")
    parser.add_argument("--long", type=int, help="long schedule epochs (default 80)")
    parser.add_argument("--teacher", help="a .keras teacher to reuse (e.g. "
                        "demo_out/teacher.keras); default: train one with labels")
    parser.add_argument("--teacher-epochs", type=int,
                        help="epochs of label training for the teacher (default: the "
                             "digits config's 20; quick 2)")
    parser.add_argument("--workdir", help="teacher.keras, cached logits, the PNG and "
                        "report.json (default: a temp dir; the PNG then goes to the cwd)")
    parser.add_argument("--png", help="where to write the plot "
                        "(default: <workdir>/paper_findings.png)")
    parser.add_argument("--jit", action=argparse.BooleanOptionalAction, default=None,
                        help="jit_compile (default: on, off with --quick, where XLA "
                             "compile time outweighs the few steps)")
    args = parser.parse_args()
    short = args.short or (1 if args.quick else 10)
    long = args.long or (2 if args.quick else 80)
    if not 0 < short < long:
        parser.error(f"need 0 < short < long. Received: short={short}, long={long}")
    workdir = args.workdir or tempfile.mkdtemp(prefix="paper_findings_")
    os.makedirs(workdir, exist_ok=True)
    png = args.png or os.path.join(args.workdir or ".", "paper_findings.png")
    jit = (not args.quick) if args.jit is None else args.jit
    start = time.time()
    print(common.machine_line(), flush=True)

    config = configs.load_config("digits")
    overrides = {}
    if args.teacher:
        overrides["teacher"] = args.teacher
    if args.teacher_epochs or args.quick:
        overrides["teacher_epochs"] = str(args.teacher_epochs or 2)
    config = configs.apply_overrides(config, overrides)
    configs.validate(config)
    train_source = digits_source("train")
    keras.utils.set_random_seed(config.seed)
    supervised.train_missing_teachers(config, workdir, train_source,
                                      distribute.replication("default"), verbose=0)
    (teacher,) = build.teachers(config, train_source.num_classes, workdir)
    teacher.trainable = False

    eval_sets = {}
    for split in ("train", "test"):
        x, y = eval_arrays(split, config.student_size)
        logits = predict(teacher, x)
        eval_sets[split] = (x, y, logits.argmax(-1))
        if split == "train":
            eval_sets["train_teacher_logits"] = logits
    teacher_top1 = float(np.mean(eval_sets["test"][2] == eval_sets["test"][1]))
    print(f"digits: {train_source.num_examples} train / {len(eval_sets['test'][1])} test; "
          f"teacher {config.teacher} test top-1 {teacher_top1:.2%}; student "
          f"{config.student}; schedules {short} and {long} epochs; jit_compile={jit}",
          flush=True)

    cells = []
    for epochs in (short, long):
        eval_every = max(1, epochs // 16)
        for mode in MODES:
            cell = run_cell(mode, epochs, config, teacher, train_source, workdir, eval_sets,
                            jit, eval_every)
            cells.append(cell)
            print(f"  {LABELS[mode]:<18} {epochs:>4} ep: test top-1 {cell['test_top1']:.2%}, "
                  f"agreement {cell['agreement']:.2%}, train loss {cell['train_loss']:.4f}, "
                  f"clean KL {cell['train_kl_clean']:.4f} ({cell['seconds']:.0f} s)",
                  flush=True)

    print()
    print(format_table(cells, short, long, teacher_top1))
    long_cells = {c["mode"]: c for c in cells if c["epochs"] == long}
    short_cells = {c["mode"]: c for c in cells if c["epochs"] == short}
    best_long = max(MODES, key=lambda m: (long_cells[m]["test_top1"], long_cells[m]["agreement"]))
    fm_curve = long_cells["function_matching"]["curve"]
    tail = [p["test_top1"] for p in fm_curve[-max(2, len(fm_curve) // 4):]]
    findings = {
        "function_matching_best_at_long": best_long == "function_matching",
        "best_mode_at_long": best_long,
        "function_matching_improves_short_to_long": (
            long_cells["function_matching"]["test_top1"]
            >= short_cells["function_matching"]["test_top1"]),
        "function_matching_last_quarter_gain": float(tail[-1] - tail[0]),
        "fixed_teacher_lowest_train_loss_at_long": min(
            MODES, key=lambda m: long_cells[m]["train_loss"]) == "fixed_teacher",
        "fixed_teacher_lowest_clean_kl_at_long": min(
            MODES, key=lambda m: long_cells[m]["train_kl_clean"]) == "fixed_teacher",
        "fixed_teacher_worse_test_than_function_matching_at_long": (
            long_cells["fixed_teacher"]["test_top1"]
            < long_cells["function_matching"]["test_top1"]),
    }
    for key, value in findings.items():
        print(f"  {key}: {value}")
    plot(cells, long, teacher_top1, png)
    result = {
        "benchmark": "paper_findings", "dataset": "digits",
        "machine": common.machine(), "keras": keras.__version__,
        "date": time.strftime("%Y-%m-%d"), "teacher": config.teacher,
        "student": config.student, "teacher_test_top1": teacher_top1,
        "schedules": {"short": short, "long": long}, "jit_compile": jit,
        "cells": [{k: v for k, v in c.items() if k not in ("curve", "loss_per_epoch")}
                  for c in cells],
        "curves": {f"{c['mode']}@{c['epochs']}": c["curve"] for c in cells},
        "findings": findings, "png": os.path.abspath(png),
        "wall_s": round(time.time() - start, 1),
    }
    with open(os.path.join(workdir, "paper_findings.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {png}; {result['wall_s']:.0f} s in all", flush=True)
    common.print_result(result)


if __name__ == "__main__":
    main()
