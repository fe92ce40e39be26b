"""`funmatch demo`: the whole recipe, offline, on scikit-learn's bundled digits.

1. trains a teacher CNN with labels;
2. distills a smaller student by function matching (same crop for both models,
   batch mixup, no labels);
3. trains the same student architecture from labels, same steps and schedule,
   as the baseline;
4. prints test top-1 and agreement with the teacher for all three beside the
   3-seed figures of the README (`REFERENCE`, from `benchmarks/demo_seeds.py`),
   so a user sees whether their run is typical; saves the distilled student as
   `student.keras` and plots test top-1 and agreement per epoch (`demo.png`).
"""

from __future__ import annotations

import json
import os
import shutil
import time

import keras
import numpy as np

from funmatch_keras import atomic, configs
from funmatch_keras.app import build, workdir_lock
from funmatch_keras.app import train_teacher as supervised
from funmatch_keras.app import workdir as workdirs
from funmatch_keras.data import pipelines as data
from funmatch_keras.data.sources import digits_source
from funmatch_keras.distiller import Distiller
from funmatch_keras.training import distribute, loop, steplog
from funmatch_keras.training.steplog import TestSetTracker, predict_classes

DISTILL_CHECKPOINTS = "checkpoints"
BASELINE_CHECKPOINTS = "baseline_checkpoints"
ROWS = ("teacher", "label-trained student", "distilled student")
CONFIG = "digits:variant=demo"  # the demo's setting: configs/digits.py says why

# The README's demo table: `benchmarks/demo_seeds.py --seeds 0,1,2` on the demo's
# default setting, test top-1 and agreement with the teacher as (mean, std) over
# the seeds, and the distilled-minus-label gap (mean, worst seed). The demo prints
# its own single run beside these; tests/app/test_demo.py checks the README says the same.
REFERENCE = {
    "seeds": (0, 1, 2),
    "machine": "Intel(R) Xeon(R) Processor, 2 cores, avx2 avx512_bf16 amx_bf16",
    "top1": {"teacher": (0.98827, 0.00283), "label-trained student": (0.97099, 0.00107),
             "distilled student": (0.98457, 0.00283)},
    "agreement": {"teacher": (1.0, 0.0), "label-trained student": (0.97346, 0.00107),
                  "distilled student": (0.98765, 0.00855)},
    "gap": (0.01358, 0.00926),
}


def run_demo(workdir: str, verbose: int = 1, **overrides) -> dict:
    """Runs the demo and returns its report (also written to `workdir/report.json`).

    The fits go through the same checkpointed loops as `funmatch distill`. A
    rerun resumes an interrupted teacher training, but always trains both
    students anew (their checkpoints from an earlier demo are removed first),
    so the curves cover every epoch; `funmatch distill` resumes students too.

    Args:
        workdir: str. Output directory.
        verbose: int. Keras verbosity. Defaults to 1.
        **overrides: fields of the config (`CONFIG`), e.g. `epochs=10`.

    Example:
    >>> report = run_demo("/tmp/funmatch_demo", epochs=2, teacher_epochs=1)  # doctest: +SKIP
    """
    os.makedirs(workdir, exist_ok=True)
    with workdir_lock.hold(workdir):  # one demo per workdir at a time
        return _run_demo(workdir, verbose, **overrides)


def _run_demo(workdir: str, verbose: int, **overrides) -> dict:
    config = configs.load_config(CONFIG)
    config = configs.apply_overrides(config, {k: str(v) for k, v in overrides.items()})
    configs.validate(config)
    os.makedirs(workdir, exist_ok=True)
    stale_teacher = workdirs.trained_teacher_path(workdir, 0, 1)
    if os.path.exists(stale_teacher):  # rebuilt from its checkpoints or trained anew
        os.remove(stale_teacher)
    for stale in (DISTILL_CHECKPOINTS, BASELINE_CHECKPOINTS):
        shutil.rmtree(os.path.join(workdir, stale), ignore_errors=True)
    start = time.time()
    keras.utils.set_random_seed(config.seed)
    size, batch_size = config.student_size, config.batch_size
    train_source, test_source = digits_source("train"), digits_source("test")
    test_images, test_labels = next(iter(
        data.eval_pipeline(test_source, size=size, batch_size=test_source.num_examples)
        .as_numpy_iterator()))
    steps = data.steps_per_epoch(train_source, batch_size)
    total_steps = steps * config.epochs
    replicas = distribute.replication("default")
    area_range = (config.crop_area_min, 1.0)

    _log(verbose, f"[1/3] Teacher {config.teacher}, trained with labels.")
    supervised.train_missing_teachers(config, workdir, train_source, replicas, verbose)
    teachers = build.teachers(config, 10, workdir)
    teacher = teachers[0] if len(teachers) == 1 else teachers
    teacher_predictions = predict_classes(teacher, test_images)

    _log(verbose, f"[2/3] Student {config.student}, distilled by function matching.")
    keras.utils.set_random_seed(config.seed + 1)
    student = build.student(config, 10)
    distiller = Distiller(teacher, student, temperature=config.temperature)
    distiller.compile(optimizer=build.optimizer(config, total_steps),
                      jit_compile=build.jit_compile(config.jit_compile))
    distilled_curve = TestSetTracker(student, test_images, test_labels, teacher_predictions)

    def distill_data(step):
        return data.train_pipeline(train_source, **build.pipeline_kwargs(
            config, train_source, mode="function_matching", start_step=step))

    loop.fit_with_checkpoints(
        distiller, distill_data, checkpoint_dir=os.path.join(workdir, DISTILL_CHECKPOINTS),
        every_steps=config.checkpoint_every_steps, keep=config.keep_checkpoints,
        every_minutes=config.checkpoint_every_minutes,
        steps_per_epoch=steps, epochs=config.epochs, name="distillation", saved=student,
        callbacks=[steplog.StepLogger(batch_size=batch_size, steps_per_epoch=steps,
                                      total_steps=total_steps, verbose=verbose),
                   distilled_curve], verbose=0)

    _log(verbose, "[3/3] Baseline: the same student architecture trained with labels.")
    keras.utils.set_random_seed(config.seed + 1)  # same initial weights as the student
    baseline = build.student(config, 10)
    baseline_curve = TestSetTracker(baseline, test_images, test_labels, teacher_predictions)
    supervised.fit_with_labels(
        baseline, config, train_source, size=size,
        optimizer=supervised.epoch_warmup_optimizer(config, steps, config.epochs),
        steps_per_epoch=steps, epochs=config.epochs,
        checkpoint_dir=os.path.join(workdir, BASELINE_CHECKPOINTS), replicas=replicas,
        seed=config.seed, area_range=area_range, name="baseline training",
        callbacks=[baseline_curve], log_every_steps=steps, verbose=verbose)

    rows = {name: _scores(model, test_images, test_labels, teacher_predictions)
            for name, model in zip(ROWS, (teacher, baseline, student))}
    workdirs.save_model(student, os.path.join(workdir, workdirs.STUDENT_FILE))
    # What `funmatch export` needs to find eval and calibration images.
    atomic.write_text(os.path.join(workdir, workdirs.CONFIG_FILE), configs.to_json(config))
    report = {
        "dataset": "digits", "num_train": train_source.num_examples,
        "num_test": test_source.num_examples, "steps": total_steps,
        "config": json.loads(configs.to_json(config)),
        "results": rows, "wall_time_s": round(time.time() - start, 1),
        "curves": {"distilled_top1": distilled_curve.top1,
                   "distilled_agreement": distilled_curve.agreement,
                   "baseline_top1": baseline_curve.top1,
                   "baseline_agreement": baseline_curve.agreement},
    }
    distilled, base = rows["distilled student"]["top1"], rows["label-trained student"]["top1"]
    report["gap"] = distilled - base
    report["distillation_beats_baseline"] = distilled >= base
    report["reference"] = REFERENCE
    atomic.write_json(os.path.join(workdir, workdirs.REPORT_FILE), report)
    atomic.atomic_write(os.path.join(workdir, "demo.png"),
                        lambda tmp: plot_curves(report, tmp))
    print(format_table(report))
    return report


def _scores(model, images, labels, teacher_predictions) -> dict:
    predictions = predict_classes(model, images)
    models = model if isinstance(model, (list, tuple)) else [model]
    return {"top1": float(np.mean(predictions == labels)),
            "agreement": float(np.mean(predictions == teacher_predictions)),
            "params": sum(int(m.count_params()) for m in models)}


def _log(verbose, message):
    if verbose:
        print(message, flush=True)


def format_table(report: dict, reference: dict | None = None) -> str:
    """The demo's table: this run beside the README's 3-seed mean ± std (`REFERENCE`).

    Example:
    >>> row = {"top1": 0.95, "agreement": 0.96, "params": 1000}
    >>> report = {"results": {name: dict(row) for name in ROWS}, "gap": 0.0,
    ...           "steps": 10, "wall_time_s": 1.0}
    >>> "this run" in format_table(report)
    True
    """
    ref = REFERENCE if reference is None else reference
    seeds = len(ref["seeds"])
    readme = f"(README, {seeds} seeds)"
    lines = [f"{'model':<24}{'params':>9}  {'test top-1':>10} {readme:>22}"
             f"  {'agreement':>9} {'(README)':>17}"]
    for name in ROWS:
        row = report["results"][name]
        (top1, top1_std), (agree, agree_std) = ref["top1"][name], ref["agreement"][name]
        lines.append(f"{name:<24}{row['params']:>9,}  {row['top1']:>10.2%} "
                     f"{top1:>14.2%} ± {top1_std:.2%}  {row['agreement']:>9.2%} "
                     f"{agree:>9.2%} ± {agree_std:.2%}")
    gap_mean, gap_worst = ref["gap"]
    lines += [
        f"distilled − label-trained: {report['gap'] * 100:+.2f} points this run; "
        f"README ({seeds} seeds, {ref['machine']}): {gap_mean * 100:+.2f} mean, "
        f"{gap_worst * 100:+.2f} worst seed.",
        f"{report['steps']} steps per student, {report['wall_time_s']:.0f} s in all."]
    return "\n".join(lines)


def plot_curves(report: dict, path: str) -> None:
    """Writes `demo.png`: test top-1 (left) and agreement with the teacher (right) per epoch.

    The teacher, fixed while the students train, is a horizontal line; each
    student's final value is in its legend.
    """
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves, results = report["curves"], report["results"]
    epochs = np.arange(1, len(curves["distilled_top1"]) + 1)
    students = (("distilled", "distilled student", "function matching", "C0"),
                ("baseline", "label-trained student", "trained with labels", "C1"))
    fig, (top1_ax, agree_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    teacher = results["teacher"]["top1"]
    top1_ax.axhline(teacher, color="k", lw=1.5, label=f"teacher ({teacher:.1%})")
    for key, row, how, color in students:
        final = results[row]["top1"]
        top1_ax.plot(epochs, curves[f"{key}_top1"], color=color,
                     label=f"student, {how} ({final:.1%})")
        agree_ax.plot(epochs, curves[f"{key}_agreement"], color=color,
                      label=f"student, {how} ({results[row]['agreement']:.1%})")
    late = [v for key, *_ in students for v in curves[f"{key}_top1"][len(epochs) // 4:]]
    low = min([teacher, *late]) if late else teacher
    top1_ax.set(xlabel="epoch", ylabel="test top-1", ylim=(max(0.0, low - 0.02), 1.0),
                title=f"Test top-1: distilled − label-trained = "
                      f"{report['gap'] * 100:+.1f} points")
    agree_ax.set(xlabel="epoch", ylabel="agreement with the teacher (test)",
                 ylim=(max(0.0, low - 0.02), 1.0), title="Agreement with the teacher")
    for ax in (top1_ax, agree_ax):
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle("Function matching on digits: the same student architecture, "
                 "init, steps and crops")
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
