"""A run's workdir: its layout, its config, metrics logging, the report and its plot.

Layout (`funmatch distill`; `train-teacher` and `demo` write parts of it):
    config.json             the run's config; a different one is refused (but for
                            `configs.RESUMABLE_CHANGES`)
    checkpoints/            student + optimizer state (atomic, last k kept)
    teacher.keras           a teacher trained with labels when no teacher file is
                            given (teacher-<i>.keras for the i-th of an ensemble)
    teacher_checkpoints/    its training checkpoints (teacher-<i>_checkpoints/)
    teacher_logits_*.npy    cached fixed-teacher logits (`teacher_cache`)
    teacher_path.json       the teacher compute path chosen at the start (`compute_path`)
    student.keras           the final student
    metrics.jsonl           one JSON line per logged interval
    tensorboard/            scalars
    report.json, report.png
Every file is written atomically (`funmatch_keras.atomic`).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
import time
from typing import Iterable, Iterator

import keras
import ml_collections

from funmatch_keras import atomic, configs
from funmatch_keras.app import workdir_lock
from funmatch_keras.models import save_keras_file
from funmatch_keras.training.steplog import read_metrics  # noqa: F401  (part of the layout API)

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
REPORT_FILE = "report.json"
STUDENT_FILE = "student.keras"
CHECKPOINTS = "checkpoints"
TEACHER_PATH_FILE = "teacher_path.json"  # the tuned teacher compute path (compute_path)


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


# What a run writes in its workdir (the layout above), as `glob` patterns:
# `--overwrite` moves these aside. Not `.lock` (`workdir_lock`), not the
# non-chief workers' `workertemp_*/` (written by live workers), nor any other file.
RUN_ENTRIES = (CHECKPOINTS, TEACHER_PATH_FILE, "teacher*.keras", "teacher*_checkpoints",
               "teacher_logits_*.npy", STUDENT_FILE, METRICS_FILE, "tensorboard", REPORT_FILE,
               "report.png", CONFIG_FILE)  # config.json last: a crash mid-way still refuses
               # another config
REPLACED_PREFIX = ".replaced-"


@contextlib.contextmanager
def started(workdir: str, config: ml_collections.ConfigDict, overwrite: bool, replicas,
            prepared: str | None) -> Iterator[None]:
    """A run's start in `workdir`, for a `with` block that holds the whole run.

    The chief holds the workdir's lock (one run per workdir: a second process
    refuses, naming the holder), each process `prepare`s the directory
    `prepared` it writes to (`workdir` for the chief, or a worker's own; None:
    none), and then every worker of `replicas` (a `distribute.Replication`)
    waits for all, so that none restores a checkpoint the chief's `overwrite`
    is about to move aside.
    """
    with workdir_lock.hold(workdir, enabled=replicas.is_chief):
        if prepared is not None:
            prepare(prepared, config, overwrite)
        replicas.barrier()
        yield


def prepare(workdir: str, config: ml_collections.ConfigDict, overwrite: bool) -> None:
    """Creates the workdir and stores the config; refuses a workdir of another config.

    A resume may change the fields of `configs.RESUMABLE_CHANGES` (cadences,
    checkpoints kept, evaluation batch size): it says so, and stores the new config.

    With `overwrite`, the run starts from nothing: the previous run's entries
    (`RUN_ENTRIES`: config, checkpoints, trained teachers, cached logits,
    student, metrics, report) are first moved into `<workdir>/.replaced-<time>/`,
    one rename each, then that folder is deleted after a printed line says so.
    A crash in between leaves every old entry in place or in that folder, and
    nothing of the new run yet. Files the config itself names (e.g.
    `--config.teacher=<workdir>/teacher.keras`) are kept.

    Example:
    >>> import tempfile
    >>> workdir = tempfile.mkdtemp()
    >>> config = configs.load_config("digits:smoke=True")
    >>> prepare(workdir, config, overwrite=False)
    >>> os.makedirs(os.path.join(workdir, CHECKPOINTS, "ckpt-000000002"))
    >>> prepare(workdir, config, overwrite=True)  # doctest: +ELLIPSIS
    --overwrite: moved the previous run (checkpoints/, config.json) to ...; deleting it.
    >>> sorted(os.listdir(workdir))
    ['config.json']
    """
    try:
        os.makedirs(workdir, exist_ok=True)
        atomic.write_text(os.path.join(workdir, ".write_test"), "ok")
        os.remove(os.path.join(workdir, ".write_test"))
    except OSError as error:
        raise ValueError(f"The workdir {workdir!r} is not writable ({error}). "
                         "Pick another --workdir.") from None
    path = os.path.join(workdir, CONFIG_FILE)
    if overwrite:
        _replace_previous_run(workdir, config)
    elif os.path.exists(path):
        changes = configs.diff(read_config(workdir), config)
        refused = {k: v for k, v in changes.items() if k not in configs.RESUMABLE_CHANGES}
        if refused:
            listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in
                               sorted(refused.items())[:8])
            raise ValueError(
                f"The workdir {workdir!r} holds a run of a different config ({listed}). "
                "Use a new --workdir, or pass --overwrite to delete that run (checkpoints, "
                "trained teacher, logs, report) and start this config there from nothing. "
                "(A resume may change only "
                f"{', '.join(sorted(configs.RESUMABLE_CHANGES))}.)")
        if changes:
            # Always said: the stored config changes under a resumed run.
            print("Resuming with changed fields: " + ", ".join(
                f"{k} {old!r} -> {new!r}" for k, (old, new) in sorted(changes.items()))
                + f" (none changes what is trained; {CONFIG_FILE} updated).", flush=True)
    atomic.write_text(path, configs.to_json(config))


def previous_run(workdir: str, keep: Iterable[str] = ()) -> list[str]:
    """The names of `RUN_ENTRIES` present in the workdir, in moving order, less `keep`.

    Example:
    >>> import tempfile
    >>> workdir = tempfile.mkdtemp()
    >>> for name in ("config.json", "teacher-1.keras", "notes.txt", ".lock"):
    ...     open(os.path.join(workdir, name), "w").close()
    >>> previous_run(workdir)
    ['teacher-1.keras', 'config.json']
    """
    kept = {os.path.abspath(path) for path in keep}
    names = []
    for pattern in RUN_ENTRIES:
        for found in sorted(glob.glob(os.path.join(glob.escape(workdir), pattern))):
            name = os.path.basename(found)
            if name not in names and not _holds_any(found, kept):
                names.append(name)
    return names


def _holds_any(path: str, kept: set[str]) -> bool:
    """Whether `path` is, or is a folder above, one of the `kept` paths."""
    path = os.path.abspath(path)
    return any(k == path or k.startswith(path + os.sep) for k in kept)


def _config_paths(config: ml_collections.ConfigDict) -> list[str]:
    """The files and folders a config names (teachers, weights, data_dir)."""
    named = [config.get("student_weights"), config.get("data_dir"), config.get("student")]
    try:
        for spec in configs.teacher_specs(config):
            named += [spec.model, spec.weights]
    except (ValueError, KeyError, AttributeError, TypeError):
        pass
    return [os.path.expanduser(p) for p in named if isinstance(p, str) and p]


def _replace_previous_run(workdir: str, config: ml_collections.ConfigDict) -> None:
    """`--overwrite`: moves the previous run aside (one rename per entry), then deletes it."""
    leftovers = sorted(glob.glob(os.path.join(glob.escape(workdir), REPLACED_PREFIX + "*")))
    names = previous_run(workdir, keep=_config_paths(config))
    aside = None
    if names:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = tempfile.mkdtemp(prefix=f"{REPLACED_PREFIX}{stamp}-", dir=workdir)
        for name in names:
            try:
                os.rename(os.path.join(workdir, name), os.path.join(aside, name))
            except OSError as error:
                raise ValueError(
                    f"--overwrite could not move {name} of the previous run aside ({error}); "
                    f"what was moved is in {aside}, the rest is in place. Fix the cause and "
                    "rerun, or use a new --workdir.") from None
        listed = ", ".join(name + ("/" if os.path.isdir(os.path.join(aside, name)) else "")
                           for name in names)
        also = f" (and {', '.join(leftovers)}, left by an interrupted --overwrite)" if (
            leftovers) else ""
        print(f"--overwrite: moved the previous run ({listed}) to {aside}; deleting it{also}.",
              flush=True)
    elif leftovers:
        print(f"--overwrite: deleting {', '.join(leftovers)}, left by an interrupted "
              "--overwrite.", flush=True)
    for folder in ([aside] if aside else []) + leftovers:
        shutil.rmtree(folder, ignore_errors=True)
        if os.path.exists(folder):
            print(f"--overwrite: could not delete all of {folder}; delete it by hand.",
                  flush=True)


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The config stored in a workdir (fields added since get their defaults)."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"No {CONFIG_FILE} in {workdir!r}: is this a workdir of `funmatch distill`?")
    with open(path) as f:
        return configs.from_json(f.read())


def save_model(model: keras.Model, path: str) -> str:
    """`models.save_keras_file(model, path)` (no optimizer), atomically."""
    return atomic.atomic_write(path, lambda tmp: save_keras_file(model, tmp))


# ------------------------------------------------------------------ metrics


def metrics_path(workdir: str) -> str:
    """The run's metrics.jsonl (written by `steplog.StepLogger`, read by `read_metrics`)."""
    return os.path.join(workdir, METRICS_FILE)


# ------------------------------------------------------------------- report


def write_report(workdir: str, report: dict, history: list[dict]) -> None:
    """Writes `report.json` and `report.png` (the plot of `history`)."""
    atomic.write_json(os.path.join(workdir, REPORT_FILE), report)
    atomic.atomic_write(os.path.join(workdir, "report.png"),
                        lambda tmp: plot_report(history, report, tmp))


def plot_report(history: list[dict], report: dict, path: str) -> None:
    """Writes `report_figure(history, report)` to `path` as a PNG."""
    import matplotlib.pyplot as plt

    fig = report_figure(history, report)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def report_figure(history: list[dict], report: dict):
    """Training loss per logged step beside the eval curves (student top-1, agreement).

    Left: the training loss of each log interval (the interval's mean) against the
    epoch; right: student top-1 and agreement per evaluation, the teacher's top-1
    as a line.

    Returns:
        A matplotlib `Figure` with the two axes (`fig.axes`).

    Example:
    >>> history = [{"epoch": 1.0, "loss": 2.0}, {"epoch": 2.0, "loss": 1.0,
    ...             "val_agreement": 0.5, "val_student_top1": 0.4, "val_teacher_top1": 0.9}]
    >>> fig = report_figure(history, {"config": {"dataset": "digits"}, "student_top1": 0.4})
    >>> [ax.get_ylabel() for ax in fig.axes]
    ['training loss', 'fraction']
    >>> fig.axes[0].lines[0].get_ydata().tolist()
    [2.0, 1.0]
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    trained = [h for h in history if "loss" in h]
    if trained:
        loss_ax.plot([h["epoch"] for h in trained], [h["loss"] for h in trained], "-",
                     label="training loss (log interval mean)")
        loss_ax.legend(loc="upper right")
    loss_ax.set(xlabel="epoch", ylabel="training loss", title="training loss")
    loss_ax.grid(alpha=0.3)
    evaluated = [h for h in history if "val_agreement" in h]
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
    if evaluated:
        ax.legend(loc="lower right")
    fig.tight_layout()
    return fig
