"""Training with labels: the one path for teachers and label-trained baselines.

`fit_with_labels` trains any model with cross-entropy from labelled crops,
under the run's replication, checkpointed and resumable like distillation. It
serves `funmatch train-teacher` (`train_teacher`, the BiT-HyperRule below), a
teacher that `funmatch distill` or the demo must train first
(`train_missing_teachers`, the paper's AdamW), and the demo's baseline.

The paper's teachers are BiT models fine-tuned on each dataset with the
BiT-HyperRule (Kolesnikov et al., "Big Transfer (BiT)", ECCV 2020): SGD with
momentum 0.9, learning rate 0.003 · batch/512, a schedule whose length depends
on the dataset size (500 steps under 20k examples, 10k under 500k, else 20k),
a linear warmup of 500 steps (capped at 10% of the run here, for tiny runs),
and decays by 10× at 30%, 60% and 90% of it. The teacher is saved as
`<workdir>/teacher.keras`, which `funmatch distill --config.teacher=...` takes.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import keras
import ml_collections
from absl import logging

from funmatch_keras import configs, models
from funmatch_keras.app import build
from funmatch_keras.app import workdir as workdirs
from funmatch_keras.configs import TeacherSpec
from funmatch_keras.data import pipelines as data
from funmatch_keras.optim.schedules import BitHyperRuleSchedule
from funmatch_keras.training import distribute, loop, steplog

# A teacher trained here with labels sees milder crops than the student: labels
# no longer describe a crop of a few percent of the image (unlike the teacher's
# soft outputs, which the student matches on any crop).
TEACHER_CROP_AREA_MIN = 0.5

BIT_BASE_LR = 0.003  # per 512 examples
BIT_MOMENTUM = 0.9
BIT_WARMUP_STEPS = 500


def bit_hyperrule_steps(num_examples: int) -> int:
    """Schedule length of the BiT-HyperRule for a dataset of `num_examples`.

    Example:
    >>> bit_hyperrule_steps(3_680), bit_hyperrule_steps(75_750), bit_hyperrule_steps(10**6)
    (500, 10000, 20000)
    """
    if num_examples < 20_000:
        return 500
    if num_examples < 500_000:
        return 10_000
    return 20_000


def bit_hyperrule_optimizer(batch_size: int, total_steps: int) -> keras.optimizers.SGD:
    """SGD with momentum 0.9 on the BiT-HyperRule schedule for `batch_size`."""
    warmup = min(BIT_WARMUP_STEPS, total_steps // 10)
    schedule = BitHyperRuleSchedule(BIT_BASE_LR * batch_size / 512, total_steps, warmup)
    return keras.optimizers.SGD(learning_rate=schedule, momentum=BIT_MOMENTUM)


def fit_with_labels(
    model: keras.Model,
    config: ml_collections.ConfigDict,
    source,
    *,
    size: int,
    optimizer: keras.optimizers.Optimizer,
    steps_per_epoch: int,
    epochs: int,
    checkpoint_dir: str,
    replicas: distribute.Replication,
    seed: int,
    area_range: tuple[float, float],
    name: str,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    validation_data: Any = None,
    evaluations: int = 5,
    log_every_steps: int | None = None,
    verbose: int = 1,
) -> keras.Model:
    """Cross-entropy training on consistent crops, resuming from `checkpoint_dir`.

    Call it inside `replicas.scope()`, where `model` and `optimizer` were
    built. Batches come from `replicas.train_dataset`, so several workers each
    read their own shard. `config` gives the batch size, flips, the log and
    checkpoint cadence (`configs.cadence` over this schedule),
    `steps_per_execution` and `jit_compile`. `validation_data` is evaluated
    `evaluations` times over the run; `log_every_steps` overrides the cadence's
    (the demo logs every epoch).

    Returns:
        `model`, trained.
    """
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], jit_compile=build.jit_compile(config.jit_compile),
                  steps_per_execution=config.steps_per_execution)
    cadence = configs.cadence(config, steps_per_epoch, epochs)
    log_every = log_every_steps or cadence.log_every_steps
    fit_verbose, log_verbose = steplog.progress_output(cadence.total_steps, verbose)
    logger = steplog.StepLogger(
        batch_size=config.batch_size, steps_per_epoch=steps_per_epoch,
        total_steps=cadence.total_steps, validation_data=validation_data,
        eval_every_steps=max(1, cadence.total_steps // evaluations), verbose=log_verbose)

    # Labelled crops of the teacher's size, as consistent views (no teacher to match).
    make_dataset = build.train_datasets(
        config, source, replicas, mode="consistent", student_size=size, teacher_size=None,
        seed=seed, area_range=area_range, with_labels=True)

    loop.fit_with_checkpoints(
        model, make_dataset, checkpoint_dir=checkpoint_dir,
        every_steps=cadence.checkpoint_every_steps, keep=config.keep_checkpoints,
        every_minutes=config.checkpoint_every_minutes, log_every_steps=log_every,
        steps_per_epoch=steps_per_epoch, epochs=epochs, name=name,
        replicas=replicas, callbacks=[logger, *callbacks], verbose=fit_verbose)
    return model


def epoch_warmup_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int,
                           epochs: int) -> keras.optimizers.Optimizer:
    """The paper's AdamW + cosine for label training, warmed up over one epoch."""
    return build.optimizer(config, steps_per_epoch * epochs, warmup_steps=steps_per_epoch)


def train_missing_teachers(config: ml_collections.ConfigDict, workdir: str, source,
                           replicas: distribute.Replication,
                           verbose: int = 1) -> dict[int, keras.Model]:
    """Trains with labels each teacher of the config that has no weights yet.

    Each is saved where `build.teachers` loads it (`workdir.trained_teacher_path`);
    one trained by an earlier run is kept. Across workers the chief's workdir
    decides (a worker may have a disk of its own): every worker trains, resumes
    from the chief's checkpoints or receives the chief's `teacher.keras` weights,
    and only the chief saves. Call it outside `replicas.scope()`: it trains
    inside, and saves outside (saving creates variables, which every worker
    would have to create too).

    Returns:
        The teachers trained with labels, by index in `configs.teacher_specs`,
        with the chief's weights on every worker: for `build.teachers(trained=)`.
        On one worker, one trained by an earlier run is left to `build.teachers`.

    Raises:
        ValueError: a teacher without weights and `config.teacher_epochs` unset.
    """
    specs = configs.teacher_specs(config)
    trained = {}
    for index, spec in enumerate(specs):
        path = workdirs.trained_teacher_path(workdir, index, len(specs))
        if not build.needs_labels(spec):
            continue
        if replicas.chief_value(os.path.exists(path)):
            if replicas.num_workers > 1:
                trained[index] = _chief_teacher(config, spec, path, source, replicas)
            continue
        if not config.teacher_epochs:
            raise ValueError(
                f"The teacher {spec.model!r} has no weights: set --config.teacher_weights "
                "to a checkpoint, --config.teacher to a .keras file, or "
                "--config.teacher_epochs > 0 to train it with labels first."
            )
        trained[index] = _train_for_distillation(config, spec, index, path, source, replicas,
                                                 verbose)
        if replicas.is_chief:
            workdirs.save_model(trained[index], path)
    return trained


def _chief_teacher(config, spec: TeacherSpec, path: str, source, replicas) -> keras.Model:
    """The teacher the chief trained in an earlier run (its `path`), on every worker."""
    weights = None
    if replicas.is_chief:  # loaded outside the scope: no variables that only it creates
        weights = models.load_keras_file(path).get_weights()
    with replicas.scope():
        teacher = build.untrained_teacher(config, spec, build.num_classes(config, source))
    if weights is not None:
        teacher.set_weights(weights)
    replicas.broadcast_from_chief(teacher.weights)
    return teacher


def _train_for_distillation(config, spec: TeacherSpec, index: int, path: str, source,
                            replicas, verbose: int) -> keras.Model:
    logging.info("Training the teacher %s with labels for %d epochs.", spec.model,
                 config.teacher_epochs)
    num_classes = build.num_classes(config, source)
    steps = data.steps_per_epoch(source, config.batch_size)
    with replicas.scope():
        teacher = build.untrained_teacher(config, spec, num_classes)
        fit_with_labels(
            teacher, config, source, size=spec.size,
            optimizer=epoch_warmup_optimizer(config, steps, config.teacher_epochs),
            steps_per_epoch=steps, epochs=config.teacher_epochs,
            checkpoint_dir=workdirs.teacher_checkpoint_dir(os.path.dirname(path), index),
            replicas=replicas, seed=config.seed + 1 + index,  # ensemble members: own crops
            area_range=(max(config.crop_area_min, TEACHER_CROP_AREA_MIN), 1.0),
            name="teacher training", verbose=verbose)
    # Mirrored training keeps the workers' copies equal; this makes sure of it.
    replicas.broadcast_from_chief(teacher.weights)
    return teacher


def train_teacher(config: ml_collections.ConfigDict, workdir: str, verbose: int = 1,
                  overwrite: bool = False, strategy: Any = None) -> str:
    """Fine-tunes the config's (first) teacher on the dataset's labels, BiT-HyperRule.

    Args:
        config: a config from `funmatch_keras.configs` (the teacher fields are used).
        workdir: str. Checkpoints go to `workdir/teacher_checkpoints`, the
            result to `workdir/teacher.keras`.
        verbose: int. Keras verbosity. Defaults to 1.
        overwrite: bool. Start from nothing in a workdir that holds a run.
        strategy: as for `train.run`. Defaults to None (`FUNMATCH_STRATEGY`, else auto).

    Returns:
        The path of the saved teacher.

    Example:
    >>> train_teacher(configs.load_config("pets37:smoke=True"), "/tmp/t")  # doctest: +SKIP
    """
    configs.validate(config)
    replicas = distribute.replication(strategy)
    distribute.check_batch_size(config.batch_size, replicas.num_replicas)
    # Only the chief writes here: the other workers prepare nothing.
    with workdirs.started(workdir, config, overwrite, replicas,
                          prepared=workdir if replicas.is_chief else None):
        return _train_teacher(config, workdir, verbose, replicas)


def _train_teacher(config, workdir: str, verbose: int, replicas) -> str:
    keras.utils.set_random_seed(config.seed)
    source = build.source(config, "train")
    spec = configs.teacher_specs(config)[0]
    steps_per_epoch = build.steps_per_epoch(config, source)
    total_steps = bit_hyperrule_steps(source.num_examples)
    if config.steps_per_epoch:  # smoke runs: the config's tiny schedule wins
        total_steps = steps_per_epoch * config.epochs
    epochs = max(1, -(-total_steps // steps_per_epoch))
    val = data.eval_pipeline(build.source(config, "validation"), size=spec.size,
                             batch_size=config.eval_batch_size)
    with replicas.scope():
        # A pretrained backbone; a head of another class count stays zero.
        teacher = build.untrained_teacher(config, spec, build.num_classes(config, source))
        fit_with_labels(
            teacher, config, source, size=spec.size,
            optimizer=bit_hyperrule_optimizer(config.batch_size, total_steps),
            steps_per_epoch=steps_per_epoch, epochs=epochs,
            checkpoint_dir=workdirs.teacher_checkpoint_dir(workdir), replicas=replicas,
            seed=config.seed, area_range=(config.crop_area_min, 1.0),
            name="teacher training", validation_data=val, verbose=verbose)
    path = os.path.join(workdir, "teacher.keras")
    if replicas.is_chief:
        workdirs.save_model(teacher, path)
    if verbose:
        print(f"Wrote {path}: use --config.teacher={path} with `funmatch distill`.")
    return path
