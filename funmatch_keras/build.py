"""A config → the library's objects: sources, student, teachers, optimizer, compile settings.

Nothing here trains: a teacher that must first learn from labels is trained by
`supervised.train_missing_teachers`, and `teachers` then loads it from the
workdir like any other teacher file.

Example:
>>> from funmatch_keras import configs
>>> config = configs.load_config("digits")
>>> steps_per_epoch(config, source(config, "train"))
19
"""

from __future__ import annotations

import os

import keras
import ml_collections
from absl import logging

from funmatch_keras import configs, data, models, optim, sources, workdir as workdirs
from funmatch_keras.configs import TeacherSpec


def source(config: ml_collections.ConfigDict, split: str) -> sources.Source:
    """The config's dataset split (`"train"`, `"validation"` or `"test"`)."""
    return sources.source_for(config.dataset, split, config.data_dir)


def num_classes(config: ml_collections.ConfigDict, train_source: sources.Source) -> int:
    """`config.num_classes`, checked against the data, or the data's class count."""
    count = config.num_classes or train_source.num_classes
    if count != train_source.num_classes:
        raise ValueError(f"The config says num_classes={count} but {config.dataset} "
                         f"has {train_source.num_classes} classes.")
    return count


def steps_per_epoch(config: ml_collections.ConfigDict, train_source: sources.Source) -> int:
    """`config.steps_per_epoch`, or full batches per pass over the training data."""
    return config.steps_per_epoch or data.steps_per_epoch(train_source, config.batch_size)


def student(config: ml_collections.ConfigDict, num_classes: int) -> keras.Model:
    """The student of the config, with its initial weights if it names them."""
    model = models.build(config.student, num_classes, config.student_size, dtype=config.dtype)
    if config.student_weights:
        models.load_weights(model, config.student_weights)
    return model


def teacher_dtype(config: ml_collections.ConfigDict) -> str:
    return config.teacher_dtype or config.dtype


def needs_labels(spec: TeacherSpec) -> bool:
    """A teacher spec that builds random weights (no weights file, not a model file)."""
    return not spec.weights and not (spec.model.endswith(".keras") or os.path.isdir(spec.model))


def untrained_teacher(config: ml_collections.ConfigDict, spec: TeacherSpec,
                      num_classes: int) -> keras.Model:
    """The teacher of `spec`, built (weights loaded if it names them), not yet frozen."""
    model = models.build(spec.model, num_classes, spec.size, dtype=teacher_dtype(config))
    if spec.weights:
        models.load_weights(model, spec.weights)
    return model


def teachers(config: ml_collections.ConfigDict, num_classes: int,
             workdir: str) -> list[keras.Model]:
    """The config's frozen teachers, ready for a `Distiller`.

    A teacher without weights is loaded from the workdir, where
    `supervised.train_missing_teachers` saved it after training it with labels.
    BiT teachers get their weight standardization folded into the kernels
    (frozen: standardized once instead of at every step). Call it inside the
    replication scope.

    Raises:
        FileNotFoundError: a teacher that needs labels was not trained yet.
    """
    specs = configs.teacher_specs(config)
    built = []
    for index, spec in enumerate(specs):
        if needs_labels(spec):
            path = workdirs.trained_teacher_path(workdir, index, len(specs))
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"The teacher {spec.model!r} has no weights and the workdir {workdir!r} "
                    f"has no trained {os.path.basename(path)}: run `funmatch distill` with "
                    "--config.teacher_epochs > 0 there first, or give the teacher weights.")
            logging.info("Using the teacher trained with labels: %s", path)
            model = keras.saving.load_model(path, safe_mode=True)
        else:
            model = untrained_teacher(config, spec, num_classes)
        if any(isinstance(layer, models.StdConv2D) for layer in model.layers):
            model = models.fold_weight_standardization(model)
        built.append(model)
    return built


def optimizer(config: ml_collections.ConfigDict, total_steps: int,
              warmup_steps: int | None = None) -> keras.optimizers.Optimizer:
    """The paper's AdamW on warmup + cosine (`config.warmup_steps` unless given)."""
    warmup = config.warmup_steps if warmup_steps is None else warmup_steps
    return optim.adamw(config.lr, config.weight_decay, total_steps,
                       min(warmup, total_steps - 1))


def jit_compile(setting: bool | None = None) -> bool:
    """`setting` if given, else XLA on one device (TensorFlow) and on JAX.

    Example:
    >>> jit_compile(False)
    False
    """
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
