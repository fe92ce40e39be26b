"""A config → a distilled student in a workdir, resumable after any kill.

`run(config, workdir)` is what `funmatch distill` and the notebooks call: it
builds data, teacher(s), student and optimizer from the config, restores the
last checkpoint of the workdir if there is one, runs `Distiller.fit`, and writes
`student.keras`, `metrics.jsonl`, TensorBoard scalars, `report.json` and
`report.png`. Teachers are frozen and never checkpointed.

Workdir layout:
    config.json         the run's config; a different config is refused
    checkpoints/        student + optimizer state every N steps (atomic, last k)
    teacher.keras       a teacher trained with labels (when no teacher file is given;
                        teacher-<i>.keras for the i-th teacher of an ensemble)
    student.keras       the final student
    metrics.jsonl       one JSON line per epoch (train and validation metrics)
    tensorboard/        scalars
    report.json, report.png
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import keras
import ml_collections
import numpy as np
from absl import logging

from funmatch_keras import configs, data, distribute, loop, models, optim, sources
from funmatch_keras.distiller import Distiller
from funmatch_keras.loop import TrainingError  # noqa: F401  (re-exported)


# A teacher trained here with labels sees milder crops than the student: labels
# no longer describe a crop of a few percent of the image (unlike the teacher's
# soft outputs, which the student matches on any crop).
TEACHER_CROP_AREA_MIN = 0.5


# --------------------------------------------------------------------- workdir


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict, overwrite: bool) -> None:
    """Creates the workdir and stores the config; refuses a workdir of another config."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as error:
        raise ValueError(f"The workdir {workdir!r} is not writable ({error}). "
                         "Pick another --workdir.") from None
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path) and not overwrite:
        with open(path) as f:
            stored = configs.from_json(f.read())
        changes = configs.diff(stored, config)
        if changes:
            listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in
                               sorted(changes.items())[:8])
            raise ValueError(
                f"The workdir {workdir!r} holds a run of a different config ({listed}). "
                "Use a new --workdir, or pass --overwrite to start this config there "
                "(its checkpoints are then replaced as the new run saves)."
            )
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(configs.to_json(config))
    os.replace(tmp, path)


# ---------------------------------------------------------------------- models


def _as_list(value) -> list:
    if value is None:
        return [None]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def load_weights(model: keras.Model, path: str) -> None:
    """Loads `.npz` (BiT naming, else timm state dict) or `.safetensors` weights."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"No weights file at {path!r}.")
    if path.endswith(".safetensors"):
        models.load_timm_bit(model, path)
    elif path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as f:
            bit_naming = any(name.startswith("resnet/") for name in f.files)
        (models.load_bit_npz if bit_naming else models.load_timm_bit)(model, path)
    elif path.endswith(".weights.h5"):
        model.load_weights(path)
    else:
        raise ValueError(f"Unknown weights format {path!r}: expected .npz, .safetensors "
                         "or .weights.h5.")


def build_student(config, num_classes: int) -> keras.Model:
    student = models.build(config.student, num_classes, config.student_size, dtype=config.dtype)
    if config.student_weights:
        load_weights(student, config.student_weights)
    return student


def build_teachers(config, num_classes: int, workdir: str, train_source,
                   verbose: int = 1, num_replicas: int = 1) -> list[keras.Model]:
    """The frozen teacher(s): built from specs/files, or trained with labels first.

    Call it inside the replication scope (`distribute.Replication.scope`).
    """
    specs = _as_list(config.teacher)
    sizes = _as_list(config.teacher_size)
    weights = _as_list(config.teacher_weights)
    sizes = sizes * len(specs) if len(sizes) == 1 else sizes
    weights = weights * len(specs) if len(weights) == 1 else weights
    dtype = config.teacher_dtype or config.dtype
    teachers = []
    for spec, size, weight_file in zip(specs, sizes, weights):
        size = size or config.student_size
        teacher = models.build(spec, num_classes, size, dtype=dtype)
        if weight_file:
            load_weights(teacher, weight_file)
        elif _is_fresh(spec):
            name = "teacher.keras" if len(specs) == 1 else f"teacher-{len(teachers)}.keras"
            teacher = _trained_teacher(teacher, config, os.path.join(workdir, name),
                                       train_source, size, verbose, num_replicas)
        if any(isinstance(layer, models.StdConv2D) for layer in teacher.layers):
            # Frozen: standardize the kernels once instead of every step.
            teacher = models.fold_weight_standardization(teacher)
        teachers.append(teacher)
    return teachers


def teacher_input_size(config) -> int | list[int]:
    """The teachers' input side; a list when an ensemble's teachers differ (224+384)."""
    sizes = [s or config.student_size for s in _as_list(config.teacher_size)]
    return sizes[0] if len(set(sizes)) == 1 else sizes


def _is_fresh(spec: str) -> bool:
    """A spec that builds randomly initialized weights (not a file)."""
    return not (spec.endswith(".keras") or os.path.isdir(spec))


def _trained_teacher(teacher, config, path, train_source, size, verbose, num_replicas=1):
    if not config.teacher_epochs:
        raise ValueError(
            f"The teacher {config.teacher!r} has no weights: set --config.teacher_weights "
            "to a checkpoint, --config.teacher to a .keras file, or "
            "--config.teacher_epochs > 0 to train it with labels first."
        )
    if os.path.exists(path):
        logging.info("Using the teacher trained earlier: %s", path)
        return keras.saving.load_model(path, safe_mode=True)
    logging.info("Training the teacher %s with labels for %d epochs.", config.teacher,
                 config.teacher_epochs)
    steps = data.steps_per_epoch(train_source, config.batch_size)
    compile_with_labels(teacher, steps, config.teacher_epochs, config.lr, config.weight_decay,
                        jit_compile=config.jit_compile)

    def make_dataset(step):
        return data.train_pipeline(
            train_source, mode="consistent", batch_size=config.batch_size, student_size=size,
            seed=config.seed + 1, shuffle_buffer=min(train_source.num_examples, 50_000),
            area_range=(max(config.crop_area_min, TEACHER_CROP_AREA_MIN), 1.0),
            flip=config.flip, with_labels=True, start_step=step, num_replicas=num_replicas)

    loop.fit_with_checkpoints(
        teacher, make_dataset, checkpoint_dir=os.path.join(os.path.dirname(path),
                                                           "teacher_checkpoints"),
        every_steps=config.checkpoint_every_steps, keep=config.keep_checkpoints,
        steps_per_epoch=steps, epochs=config.teacher_epochs, name="teacher training",
        verbose=verbose)
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.getpid()}-{os.path.basename(path)}")
    teacher.save(tmp)
    os.replace(tmp, path)
    return teacher


def compile_with_labels(model: keras.Model, steps_per_epoch: int, epochs: int, lr: float,
                        weight_decay: float, jit_compile: bool | None = None) -> keras.Model:
    """Compiles for cross-entropy training with the paper's optimizer and schedule
    (one epoch of warmup)."""
    total = steps_per_epoch * epochs
    model.compile(
        optimizer=optim.adamw(lr, weight_decay, total, min(steps_per_epoch, total - 1)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=_jit_compile(jit_compile),
    )
    return model


def fit_with_labels(model: keras.Model, train_ds, steps_per_epoch: int, epochs: int, lr: float,
                    weight_decay: float, callbacks=(), verbose: int = 1,
                    jit_compile: bool | None = None) -> keras.Model:
    """Cross-entropy training with the paper's optimizer and schedule (1 epoch warmup)."""
    compile_with_labels(model, steps_per_epoch, epochs, lr, weight_decay, jit_compile)
    model.fit(train_ds, steps_per_epoch=steps_per_epoch, epochs=epochs,
              callbacks=list(callbacks), verbose=verbose)
    return model


def _jit_compile(setting: bool | None = None) -> bool:
    """`setting` if given, else XLA on one device (TensorFlow) and on JAX."""
    if setting is not None:
        return setting
    # XLA measured faster for these convnets on CPU at the paper's 128 px and
    # slower for BiT at 64 px (README benchmarks); Keras's "auto" resolves to
    # False on CPU (DESIGN §5). Not under a tf.distribute strategy (TPUStrategy
    # compiles anyway): the step then holds cross-replica gradient
    # aggregation, and XLA there is unmeasured.
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return not tf.distribute.has_strategy()
    return backend == "jax"


# ------------------------------------------------------------------- logging


class MetricsLogger(keras.callbacks.Callback):
    """Adds the learning rate to the logs and appends each epoch to metrics.jsonl."""

    def __init__(self, path: str, steps_per_epoch: int):
        super().__init__()
        self.path, self.steps_per_epoch = path, steps_per_epoch
        self.start = time.time()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        optimizer = self.model.optimizer
        step = int(optimizer.iterations.numpy() if hasattr(optimizer.iterations, "numpy")
                   else optimizer.iterations)
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(
            optimizer.learning_rate))
        record = {"epoch": epoch + 1, "step": step,
                  **{k: float(v) for k, v in logs.items()},
                  "wall_time_s": round(time.time() - self.start, 2)}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------------ run


def run(config: ml_collections.ConfigDict, workdir: str, overwrite: bool = False,
        verbose: int = 1, strategy: Any = None) -> dict[str, Any]:
    """Distills a student as the config says, resuming from the workdir's checkpoints.

    Models, optimizer and `Distiller` are built and trained inside the
    replication scope (`distribute.replication`); `config.batch_size` is the
    global batch, split over the replicas. Under multi-worker training every
    worker shares `workdir`, but only the chief writes checkpoints, reports and
    `student.keras` there; the others write their student and logs to
    `workdir/workertemp_<task>/`.

    Args:
        config: `ml_collections.ConfigDict` from `funmatch_keras.configs`.
        workdir: str. Where checkpoints, logs, the student and the report go.
        overwrite: bool. Allow a workdir that holds another config. Defaults to False.
        verbose: int. Keras verbosity. Defaults to 1.
        strategy: a `tf.distribute.Strategy`, a kind for `distribute.replication`
            (`"auto"`, `"mirrored"`, `"multi_worker"`, `"tpu"`, `"default"`; JAX:
            `"auto"`, `"data_parallel"`, `"default"`) or None: the
            `FUNMATCH_STRATEGY` environment variable, else `"auto"`.

    Returns:
        The report dict (also written to `workdir/report.json`).

    Example:
    >>> from funmatch_keras import configs
    >>> report = run(configs.load_config("digits:smoke=True"), "/tmp/fm")  # doctest: +SKIP
    """
    configs.validate(config)
    # First: MultiWorkerMirroredStrategy must exist before TensorFlow runs any op.
    replicas = distribute.replication(strategy)
    distribute.check_batch_size(config.batch_size, replicas.num_replicas)
    if verbose and replicas.num_replicas > 1:
        print(f"Training on {replicas.num_replicas} replicas ({replicas.kind}, "
              f"{replicas.task}).", flush=True)
    # Non-chief workers keep their own files apart; checkpoints are the chief's.
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    if not replicas.is_chief:
        workdir = distribute.worker_dir(workdir, replicas.task)
    prepare_workdir(workdir, config, overwrite)
    with replicas.scope():
        return _run(config, workdir, checkpoint_dir, replicas, verbose)


def _run(config, workdir, checkpoint_dir, replicas, verbose) -> dict[str, Any]:
    start = time.time()
    keras.utils.set_random_seed(config.seed)
    if config.deterministic and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    train_source = sources.source_for(config.dataset, "train", config.data_dir)
    val_source = sources.source_for(config.dataset, "validation", config.data_dir)
    num_classes = config.num_classes or train_source.num_classes
    if num_classes != train_source.num_classes:
        raise ValueError(f"The config says num_classes={num_classes} but {config.dataset} "
                         f"has {train_source.num_classes} classes.")
    teachers = build_teachers(config, num_classes, workdir, train_source, verbose,
                              replicas.num_replicas)
    student = build_student(config, num_classes)
    steps_per_epoch = config.steps_per_epoch or data.steps_per_epoch(
        train_source, config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    optimizer = optim.adamw(config.lr, config.weight_decay, total_steps,
                            min(config.warmup_steps, total_steps - 1))
    distiller = Distiller(teachers if len(teachers) > 1 else teachers[0], student,
                          temperature=config.temperature)
    distiller.compile(optimizer=optimizer, jit_compile=_jit_compile(config.jit_compile))

    teacher_size = teacher_input_size(config)
    val_ds = data.eval_pipeline(val_source, size=config.student_size,
                                batch_size=config.eval_batch_size, teacher_size=teacher_size)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    callbacks = [
        MetricsLogger(metrics_path, steps_per_epoch),
        keras.callbacks.TensorBoard(os.path.join(workdir, "tensorboard"), write_graph=False),
    ]

    def make_dataset(step: int):
        def pipeline(input_context):
            if input_context is not None and verbose:
                n, i = input_context.num_input_pipelines, input_context.input_pipeline_id
                part = train_source.shard(n, i)
                print(f"Input pipeline {i + 1} of {n} reads {part.name}: "
                      f"{part.num_examples} examples.", flush=True)
            return data.train_pipeline(
                train_source, mode=config.mode, batch_size=config.batch_size,
                student_size=config.student_size, teacher_size=teacher_size,
                seed=config.seed,
                shuffle_buffer=min(train_source.num_examples, data.DEFAULT_SHUFFLE_BUFFER),
                teacher=teachers[0] if config.mode == "fixed_teacher" else None,
                workdir=workdir, start_step=step, area_range=(config.crop_area_min, 1.0),
                flip=config.flip, num_replicas=replicas.num_replicas,
                input_context=input_context)

        return replicas.train_dataset(pipeline)

    loop.fit_with_checkpoints(
        distiller, make_dataset, checkpoint_dir=checkpoint_dir,
        every_steps=config.checkpoint_every_steps, keep=config.keep_checkpoints,
        steps_per_epoch=steps_per_epoch, epochs=config.epochs, name="distillation",
        saved=student, is_chief=replicas.is_chief, callbacks=callbacks,
        validation_data=val_ds, validation_freq=configs.eval_every_epochs(config),
        verbose=verbose)

    student_path = os.path.join(workdir, "student.keras")
    tmp = os.path.join(workdir, f".student-{os.getpid()}.keras")
    student.save(tmp)
    os.replace(tmp, student_path)
    test_source = sources.source_for(config.dataset, "test", config.data_dir)
    test_ds = data.eval_pipeline(test_source, size=config.student_size,
                                 batch_size=config.eval_batch_size, teacher_size=teacher_size)
    test = distiller.evaluate(test_ds, verbose=0, return_dict=True)
    history = read_metrics(metrics_path)
    wall = time.time() - start
    report = {
        "config": json.loads(configs.to_json(config)),
        "test": {k: float(v) for k, v in test.items()},
        "student_top1": float(test.get("student_top1", math.nan)),
        "teacher_top1": float(test.get("teacher_top1", math.nan)),
        "agreement": float(test["agreement"]),
        "steps": total_steps,
        "wall_time_s": round(wall, 1),
        "images_per_s": _images_per_s(history, config.batch_size),
        "student": student_path,
    }
    if not replicas.is_chief:
        return report
    _write_json(os.path.join(workdir, "report.json"), report)
    plot_report(history, report, os.path.join(workdir, "report.png"))
    if verbose:
        print(f"Test: student top-1 {report['student_top1']:.2%}, teacher top-1 "
              f"{report['teacher_top1']:.2%}, agreement {report['agreement']:.2%}. "
              f"Wrote {student_path} and report.json.", flush=True)
    return report


def _images_per_s(history: list[dict], batch_size: int) -> float | None:
    """Training throughput over the logged epochs (wall time includes evaluation)."""
    if len(history) < 2:
        return None
    first, last = history[0], history[-1]
    seconds = last["wall_time_s"] - first["wall_time_s"]
    steps = last["step"] - first["step"]
    return round(steps * batch_size / seconds, 1) if seconds > 0 else None


def _write_json(path: str, value: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
    os.replace(tmp, path)


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
    fig.savefig(path, dpi=110)
    plt.close(fig)
