"""`funmatch demo`: the whole recipe, offline, on scikit-learn's bundled digits.

1. trains a teacher CNN with labels;
2. distills a smaller student by function matching (same crop for both models,
   batch mixup, no labels);
3. trains the same student architecture from labels, same steps and schedule,
   as the baseline;
4. prints test top-1 and agreement with the teacher for all three, saves the
   distilled student as `student.keras` and plots accuracy/agreement per epoch.
"""

from __future__ import annotations

import json
import os
import time

import keras
import numpy as np

from funmatch_keras import configs, data, optim, train
from funmatch_keras.distiller import Distiller
from funmatch_keras.sources import digits_source


class TestSetTracker(keras.callbacks.Callback):
    """Records test top-1 and agreement with the teacher after every epoch."""

    def __init__(self, student: keras.Model, images: np.ndarray, labels: np.ndarray,
                 teacher_predictions: np.ndarray):
        super().__init__()
        self.student, self.images, self.labels = student, images, labels
        self.teacher_predictions = teacher_predictions
        self.top1: list[float] = []
        self.agreement: list[float] = []

    def on_epoch_end(self, epoch, logs=None):
        predictions = predict_classes(self.student, self.images)
        self.top1.append(float(np.mean(predictions == self.labels)))
        self.agreement.append(float(np.mean(predictions == self.teacher_predictions)))


def predict_classes(model: keras.Model, images: np.ndarray) -> np.ndarray:
    return np.asarray(model.predict(images, batch_size=256, verbose=0)).argmax(-1)


def run_demo(workdir: str, verbose: int = 1, **overrides) -> dict:
    """Runs the demo and returns its report (also written to `workdir/report.json`).

    Args:
        workdir: str. Output directory.
        verbose: int. Keras verbosity. Defaults to 1.
        **overrides: fields of the `digits` config, e.g. `epochs=10`.

    Example:
    >>> report = run_demo("/tmp/funmatch_demo", epochs=2, teacher_epochs=1)  # doctest: +SKIP
    """
    config = configs.load_config("digits")
    config = configs.apply_overrides(config, {k: str(v) for k, v in overrides.items()})
    configs.validate(config)
    os.makedirs(workdir, exist_ok=True)
    stale_teacher = os.path.join(workdir, "teacher.keras")
    if os.path.exists(stale_teacher):  # the demo always trains its teacher anew
        os.remove(stale_teacher)
    start = time.time()
    keras.utils.set_random_seed(config.seed)
    size, batch_size = config.student_size, config.batch_size
    train_source, test_source = digits_source("train"), digits_source("test")
    test_images, test_labels = next(iter(
        data.eval_pipeline(test_source, size=size, batch_size=test_source.num_examples)
        .as_numpy_iterator()))
    steps = data.steps_per_epoch(train_source, batch_size)
    total_steps = steps * config.epochs

    def pipeline(mode, with_labels=False):
        return data.train_pipeline(
            train_source, mode=mode, batch_size=batch_size, student_size=size,
            seed=config.seed, shuffle_buffer=train_source.num_examples,
            area_range=(config.crop_area_min, 1.0), flip=config.flip, with_labels=with_labels)

    _log(verbose, f"[1/3] Teacher {config.teacher}, trained with labels.")
    (teacher,) = train.build_teachers(config, 10, workdir, train_source, verbose)
    teacher_predictions = predict_classes(teacher, test_images)

    _log(verbose, f"[2/3] Student {config.student}, distilled by function matching.")
    keras.utils.set_random_seed(config.seed + 1)
    student = train.build_student(config, 10)
    distiller = Distiller(teacher, student, temperature=config.temperature)
    distiller.compile(
        optimizer=optim.adamw(config.lr, config.weight_decay, total_steps,
                              min(config.warmup_steps, total_steps - 1)),
        jit_compile=train._jit_compile(config.jit_compile),
    )
    distilled_curve = TestSetTracker(student, test_images, test_labels, teacher_predictions)
    distiller.fit(pipeline("function_matching"), steps_per_epoch=steps, epochs=config.epochs,
                  callbacks=[distilled_curve], verbose=verbose)

    _log(verbose, "[3/3] Baseline: the same student architecture trained with labels.")
    keras.utils.set_random_seed(config.seed + 1)  # same initial weights as the student
    baseline = train.build_student(config, 10)
    baseline_curve = TestSetTracker(baseline, test_images, test_labels, teacher_predictions)
    train.fit_with_labels(baseline, pipeline("consistent", with_labels=True), steps,
                          config.epochs, config.lr, config.weight_decay, [baseline_curve],
                          verbose, jit_compile=config.jit_compile)

    rows = {
        "teacher": _scores(teacher, test_images, test_labels, teacher_predictions),
        "label-trained student": _scores(baseline, test_images, test_labels, teacher_predictions),
        "distilled student": _scores(student, test_images, test_labels, teacher_predictions),
    }
    student.save(os.path.join(workdir, "student.keras"))
    # What `funmatch export` needs to find eval and calibration images.
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(configs.to_json(config))
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
    report["distillation_beats_baseline"] = distilled >= base
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    plot_curves(report, os.path.join(workdir, "demo.png"))
    print(format_table(report))
    return report


def _scores(model, images, labels, teacher_predictions) -> dict:
    predictions = predict_classes(model, images)
    return {"top1": float(np.mean(predictions == labels)),
            "agreement": float(np.mean(predictions == teacher_predictions)),
            "params": int(model.count_params())}


def _log(verbose, message):
    if verbose:
        print(message, flush=True)


def format_table(report: dict) -> str:
    lines = [f"{'model':<24}{'params':>10}{'test top-1':>12}{'agreement':>12}"]
    for name, row in report["results"].items():
        lines.append(f"{name:<24}{row['params']:>10,}{row['top1']:>12.2%}{row['agreement']:>12.2%}")
    verdict = ("Function matching matches or beats label training at this budget."
               if report["distillation_beats_baseline"] else
               "Function matching did NOT beat label training at this budget.")
    lines += [verdict, f"{report['steps']} steps per student, {report['wall_time_s']:.0f} s in all."]
    return "\n".join(lines)


def plot_curves(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = report["curves"]
    epochs = np.arange(1, len(curves["distilled_top1"]) + 1)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(epochs, curves["distilled_top1"], label="distilled: test top-1", color="C0")
    ax.plot(epochs, curves["distilled_agreement"], "--", label="distilled: agreement", color="C0")
    ax.plot(epochs, curves["baseline_top1"], label="label-trained: test top-1", color="C1")
    ax.plot(epochs, curves["baseline_agreement"], "--", label="label-trained: agreement", color="C1")
    ax.axhline(report["results"]["teacher"]["top1"], color="k", lw=1, label="teacher: test top-1")
    ax.set(xlabel="epoch", ylabel="fraction", ylim=(0.8, 1.0),
           title="Function matching on digits (test split)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
