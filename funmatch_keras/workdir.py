"""A run's workdir: its layout, its config, metrics logging, the report and its plot.

Layout (`funmatch distill`; `train-teacher` and `demo` write parts of it):
    config.json             the run's config; a different config is refused
    checkpoints/            student + optimizer state (atomic, last k kept)
    teacher.keras           a teacher trained with labels when no teacher file is
                            given (teacher-<i>.keras for the i-th of an ensemble)
    teacher_checkpoints/    its training checkpoints (teacher-<i>_checkpoints/)
    teacher_logits_*.npy    cached fixed-teacher logits (`teacher_cache`)
    student.keras           the final student
    metrics.jsonl           one JSON line per logged interval
    tensorboard/            scalars
    report.json, report.png
Every file is written atomically (`funmatch_keras.atomic`).
"""

from __future__ import annotations

import json
import os
import time

import keras
import ml_collections

from funmatch_keras import atomic, configs

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
REPORT_FILE = "report.json"
STUDENT_FILE = "student.keras"
CHECKPOINTS = "checkpoints"


def trained_teacher_path(workdir: str, index: int, count: int) -> str:
    """Where the `index`-th of `count` teachers is saved after training with labels.

    Example:
    >>> trained_teacher_path("/run", 0, 1), trained_teacher_path("/run", 1, 2)
    ('/run/teacher.keras', '/run/teacher-1.keras')
    """
    name = "teacher" if count == 1 else f"teacher-{index}"
    return os.path.join(workdir, f"{name}.keras")


def teacher_checkpoint_dir(workdir: str, index: int = 0) -> str:
    """Checkpoints of the `index`-th teacher's label training.

    Example:
    >>> teacher_checkpoint_dir("/run"), teacher_checkpoint_dir("/run", 1)
    ('/run/teacher_checkpoints', '/run/teacher-1_checkpoints')
    """
    name = "teacher" if index == 0 else f"teacher-{index}"
    return os.path.join(workdir, f"{name}_checkpoints")


def prepare(workdir: str, config: ml_collections.ConfigDict, overwrite: bool) -> None:
    """Creates the workdir and stores the config; refuses a workdir of another config."""
    try:
        os.makedirs(workdir, exist_ok=True)
        atomic.write_text(os.path.join(workdir, ".write_test"), "ok")
        os.remove(os.path.join(workdir, ".write_test"))
    except OSError as error:
        raise ValueError(f"The workdir {workdir!r} is not writable ({error}). "
                         "Pick another --workdir.") from None
    path = os.path.join(workdir, CONFIG_FILE)
    if os.path.exists(path) and not overwrite:
        changes = configs.diff(read_config(workdir), config)
        if changes:
            listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in
                               sorted(changes.items())[:8])
            raise ValueError(
                f"The workdir {workdir!r} holds a run of a different config ({listed}). "
                "Use a new --workdir, or pass --overwrite to start this config there "
                "(its checkpoints are then replaced as the new run saves)."
            )
    atomic.write_text(path, configs.to_json(config))


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The config stored in a workdir (fields added since get their defaults)."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"No {CONFIG_FILE} in {workdir!r}: is this a workdir of `funmatch distill`?")
    with open(path) as f:
        return configs.from_json(f.read())


def save_model(model: keras.Model, path: str) -> str:
    """`model.save(path)`, atomically."""
    return atomic.atomic_write(path, model.save)


# ------------------------------------------------------------------ metrics


class MetricsLogger(keras.callbacks.Callback):
    """Adds the learning rate to the logs and appends each epoch to metrics.jsonl."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.start = time.time()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        optimizer = self.model.optimizer
        step = int(keras.ops.convert_to_numpy(optimizer.iterations))
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        record = {"epoch": epoch + 1, "step": step,
                  **{k: float(v) for k, v in logs.items()},
                  "wall_time_s": round(time.time() - self.start, 2)}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl file (empty if there is none)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def images_per_s(history: list[dict], batch_size: int) -> float | None:
    """Training throughput over the logged epochs (wall time includes evaluation)."""
    if len(history) < 2:
        return None
    first, last = history[0], history[-1]
    seconds = last["wall_time_s"] - first["wall_time_s"]
    steps = last["step"] - first["step"]
    return round(steps * batch_size / seconds, 1) if seconds > 0 else None


# ------------------------------------------------------------------- report


def write_report(workdir: str, report: dict, history: list[dict]) -> None:
    """Writes `report.json` and `report.png` (the plot of `history`)."""
    atomic.write_json(os.path.join(workdir, REPORT_FILE), report)
    atomic.atomic_write(os.path.join(workdir, "report.png"),
                        lambda tmp: plot_report(history, report, tmp))


def plot_report(history: list[dict], report: dict, path: str) -> None:
    """Student top-1 and agreement per evaluated epoch; the teacher's top-1 as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluated = [h for h in history if "val_agreement" in h]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if evaluated:
        epochs = [h["epoch"] for h in evaluated]
        if "val_student_top1" in evaluated[0]:
            ax.plot(epochs, [h["val_student_top1"] for h in evaluated], "o-",
                    label="student top-1 (validation)")
            ax.axhline(evaluated[-1]["val_teacher_top1"], color="k", lw=1,
                       label="teacher top-1 (validation)")
        ax.plot(epochs, [h["val_agreement"] for h in evaluated], "s--",
                label="agreement with teacher")
    ax.set(xlabel="epoch", ylabel="fraction", title=(
        f"{report['config']['dataset']}: test student top-1 {report['student_top1']:.2%}"))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
