"""A config → the library's objects: sources, student, teachers, optimizer, compile settings.

Nothing here trains: a teacher that must first learn from labels is trained by
`supervised.train_missing_teachers`, and `teachers` then takes it as that returns it
(or loads it from the workdir like any other teacher file).

Example:
>>> from funmatch_keras import configs
>>> config = configs.load_config("digits")
>>> steps_per_epoch(config, source(config, "train"))
19
"""

from __future__ import annotations

import os
from typing import Any, Callable

import keras
import ml_collections
from absl import logging

from funmatch_keras import configs, models, recipe
from funmatch_keras.app import workdir as workdirs
from funmatch_keras.configs import TeacherSpec
from funmatch_keras.data import pipelines as data
from funmatch_keras.data import sources
from funmatch_keras.optim import optimizers as optim
from funmatch_keras.tuning import tune


def source(config: ml_collections.ConfigDict, split: str) -> sources.Source:
    """The config's dataset split (`"train"`, `"validation"` or `"test"`).

    `config.<split>_split` (e.g. `train_split="train[:80%]"`) is the tfds split
    to read; None takes the preset's (`recipe.split_names`). A `dataset` that
    is not a preset is a tfds name and needs all three split fields.

    Raises:
        ValueError: an unknown split role, or a tfds dataset without its split.

    Example:
    >>> config = configs.apply_overrides(configs.load_config("pets37"), {
    ...     "dataset": "cifar10", "train_split": "train[:90%]"})
    >>> source(config, "test")
    Traceback (most recent call last):
    ...
    ValueError: dataset='cifar10' is not a preset (...): set --config.test_split to its ...
    """
    if split not in recipe.SPLIT_ROLES:
        raise ValueError(f"Unknown split. Expected one of {recipe.SPLIT_ROLES}. "
                         f"Received: split={split!r}")
    field = f"{split}_split"
    tfds_split = config.get(field)
    if tfds_split is None:
        if config.dataset == recipe.DIGITS or config.dataset in recipe.PRESETS:
            return sources.source_for(config.dataset, split, config.data_dir)
        raise ValueError(
            f"dataset={config.dataset!r} is not a preset ({', '.join(recipe.DATASETS)}): "
            f"set --config.{field} to its tfds {split} split (e.g. 'train[90%:]' or 'test').")
    preset = recipe.PRESETS.get(config.dataset)
    tfds_name = preset.tfds_name if preset is not None else config.dataset
    return sources.tfds_source(tfds_name, tfds_split, config.data_dir, preset_splits=False)


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
    # A keras-hub preset of another class count gets a new head (random: it learns).
    model = models.build(config.student, num_classes, config.student_size, dtype=config.dtype,
                         new_head=True)
    if config.student_weights:
        models.load_weights(model, config.student_weights, new_head="if_needed")
    return model


def teacher_dtype(config: ml_collections.ConfigDict) -> str:
    return config.teacher_dtype or config.dtype


def needs_labels(spec: TeacherSpec) -> bool:
    """A teacher spec that builds random weights (no weights file, not a model file).

    A keras-hub preset comes with its weights, unless it is given a new head
    (`keras_hub:<preset>:new_head`), which must learn the data's classes.

    Example:
    >>> needs_labels(TeacherSpec("keras_hub:resnet_50_imagenet", None, 224))
    False
    >>> needs_labels(TeacherSpec("keras_hub:resnet_50_imagenet:new_head", None, 224))
    True
    """
    if models.hub.is_hub_spec(spec.model):
        return not spec.weights and models.hub.parse_spec(spec.model)[1]
    return not spec.weights and not (spec.model.endswith(".keras") or os.path.isdir(spec.model))


def untrained_teacher(config: ml_collections.ConfigDict, spec: TeacherSpec,
                      num_classes: int) -> keras.Model:
    """The teacher of `spec`, built (weights loaded if it names them), not yet frozen."""
    model = models.build(spec.model, num_classes, spec.size, dtype=teacher_dtype(config))
    if spec.weights:
        models.load_weights(model, spec.weights, new_head="if_needed")
    return model


def teachers(config: ml_collections.ConfigDict, num_classes: int, workdir: str,
             trained: dict[int, keras.Model] | None = None) -> list[keras.Model]:
    """The config's frozen teachers, ready for a `Distiller`.

    A teacher without weights is the one `supervised.train_missing_teachers`
    trained with labels: given in `trained` (by index; what it returns), else
    loaded from the workdir, where it saved it.
    A teacher's weights file must hold a head for `num_classes` classes (a head
    of another class count is an error, never a silently zero head). BiT
    teachers get their weight standardization folded into the kernels (frozen:
    standardized once instead of at every step). Each teacher is then checked
    once: a fixed input size must be its configured `size` (`teacher_size`),
    and, run on one random image, it must output finite logits, not
    probabilities. Call it inside the replication scope.

    Raises:
        FileNotFoundError: a teacher that needs labels was not trained yet.
        ValueError: a teacher whose weights do not fit (another class count, a
            truncated file), whose fixed input size is not its configured size,
            or that outputs probabilities (a final softmax) or non-finite values.

    Example (a `.keras` teacher; one with a final softmax is refused):
    >>> import tempfile
    >>> workdir = tempfile.mkdtemp()
    >>> path = os.path.join(workdir, "teacher.keras")
    >>> models.build("cnn:8", num_classes=10, image_size=16).save(path)
    >>> config = configs.apply_overrides(configs.load_config("digits"), {"teacher": path})
    >>> [t.output_shape for t in teachers(config, 10, workdir)]
    [(None, 10)]
    """
    specs = configs.teacher_specs(config)
    built = []
    for index, spec in enumerate(specs):
        if needs_labels(spec) and index in (trained or {}):
            model, origin = trained[index], f"the teacher {spec.model!r} trained with labels"
        elif needs_labels(spec):
            path = workdirs.trained_teacher_path(workdir, index, len(specs))
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"The teacher {spec.model!r} has no weights and the workdir {workdir!r} "
                    f"has no trained {os.path.basename(path)}: run `funmatch distill` with "
                    "--config.teacher_epochs > 0 there first, or give the teacher weights.")
            logging.info("Using the teacher trained with labels: %s", path)
            model, origin = models.load_keras_file(path), path
        else:
            model = models.build(spec.model, num_classes, spec.size, dtype=teacher_dtype(config))
            origin = spec.weights or spec.model
            if spec.weights:
                # Explicitly strict: a teacher distils with the head it was trained
                # with; a zero head would "teach" uniform outputs (10% top-1).
                models.load_weights(model, spec.weights, head="auto", new_head=False)
        model = models.fold_if_standardized(model)
        flag = ("--config.teacher_size" if len(specs) == 1 else
                f"the size of teacher {index} (its 'size' in --config.teachers, or "
                "its entry of --config.teacher_size)")
        models.check_teacher(model, spec.size, name=origin, size_flag=flag)
        built.append(model)
    return built


def pipeline_kwargs(config: ml_collections.ConfigDict, train_source: sources.Source,
                    **overrides: Any) -> dict[str, Any]:
    """The `data.train_pipeline` arguments of `config`, as `funmatch distill` passes them.

    `overrides` replace or add arguments: the resumed `start_step`, cached
    `teacher_logits`, or a label training's mode, size, seed and crops.

    Example:
    >>> config = configs.load_config("digits")
    >>> kwargs = pipeline_kwargs(config, source(config, "train"), start_step=3)
    >>> kwargs["mode"], kwargs["student_size"], kwargs["shuffle_buffer"], kwargs["start_step"]
    ('function_matching', 16, 1257, 3)
    """
    return {
        "mode": config.mode, "batch_size": config.batch_size,
        "student_size": config.student_size, "teacher_size": configs.teacher_sizes(config),
        "seed": config.seed,
        "shuffle_buffer": min(train_source.num_examples, data.DEFAULT_SHUFFLE_BUFFER),
        "area_range": (config.crop_area_min, 1.0), "flip": config.flip,
        **overrides,
    }


def train_datasets(config: ml_collections.ConfigDict, train_source: sources.Source, replicas,
                   verbose: int = 0, **overrides: Any) -> Callable[[int], Any]:
    """`make_dataset(step)` for `loop.fit_with_checkpoints`: `pipeline_kwargs`, replicated.

    Each input pipeline of `replicas` (a `distribute.Replication`) reads its
    own shard of `train_source`; with `verbose`, it says which.
    """
    def make_dataset(step: int):
        def pipeline(input_context):
            if input_context is not None and verbose:
                n, i = input_context.num_input_pipelines, input_context.input_pipeline_id
                part = train_source.shard(n, i)
                print(f"Input pipeline {i + 1} of {n} reads {part.name}: "
                      f"{part.num_examples} examples.", flush=True)
            return data.train_pipeline(
                train_source, **pipeline_kwargs(config, train_source, **overrides),
                start_step=step, num_replicas=replicas.num_replicas,
                input_context=input_context)

        return replicas.train_dataset(pipeline)

    return make_dataset


def optimizer(config: ml_collections.ConfigDict, total_steps: int,
              warmup_steps: int | None = None) -> keras.optimizers.Optimizer:
    """`config.optimizer` (AdamW or Shampoo), warmup + cosine (`config.warmup_steps` unless given).

    Example:
    >>> config = configs.apply_overrides(configs.load_config("digits"), {"optimizer": "shampoo"})
    >>> type(optimizer(config, total_steps=100)).__name__
    'Shampoo'
    """
    warmup = min(config.warmup_steps if warmup_steps is None else warmup_steps, total_steps - 1)
    if config.optimizer == "shampoo":
        return optim.shampoo(
            config.lr, config.weight_decay, total_steps, warmup,
            block_size=config.shampoo_block_size, beta2=config.shampoo_beta2,
            precondition_every=config.shampoo_precondition_every,
            statistics_every=config.shampoo_statistics_every,
            start_preconditioning_step=config.shampoo_start_preconditioning_step)
    if config.optimizer != "adamw":
        raise ValueError("`optimizer` must be 'adamw' or 'shampoo'. "
                         f"Received: optimizer={config.optimizer!r}")
    return optim.adamw(config.lr, config.weight_decay, total_steps, warmup)


def jit_compile(setting: bool | None = None) -> bool:
    """`setting` if given, else Keras's `jit_compile="auto"` (`tune.default_path`).

    Without XLA on a CPU, where XLA wins or loses with the model and the image
    size (README, "Distillation step"): a run that distills long enough times
    both (`compute_path`).

    Example:
    >>> jit_compile(False)
    False
    """
    return tune.default_path().jit_compile if setting is None else setting
