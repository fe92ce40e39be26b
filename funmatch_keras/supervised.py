"""`funmatch train-teacher`: fine-tune a teacher with labels by the BiT-HyperRule.

The paper's teachers are BiT models fine-tuned on each dataset with the
BiT-HyperRule (Kolesnikov et al., "Big Transfer (BiT)", ECCV 2020): SGD with
momentum 0.9, learning rate 0.003 · batch/512, a schedule whose length depends
on the dataset size (500 steps under 20k examples, 10k under 500k, else 20k),
a linear warmup of 500 steps (capped at 10% of the run here, for tiny runs),
and decays by 10× at 30%, 60% and 90% of it. The teacher is saved as
`<workdir>/teacher.keras`, which `funmatch distill --config.teacher=...` takes.
The run checkpoints and resumes like `funmatch distill`.
"""

from __future__ import annotations

import os

import keras
import ml_collections

from funmatch_keras import configs, data, loop, models, sources

BIT_BASE_LR = 0.003  # per 512 examples
BIT_MOMENTUM = 0.9
BIT_WARMUP_STEPS = 500
BIT_DECAY_POINTS = (0.3, 0.6, 0.9)


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


@keras.saving.register_keras_serializable(package="funmatch_keras")
class BitHyperRuleSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to `lr`, then ÷10 at 30%, 60% and 90% of `total_steps`.

    Example:
    >>> schedule = BitHyperRuleSchedule(0.003, total_steps=1000, warmup_steps=100)
    >>> [round(float(schedule(s)), 6) for s in (50, 200, 400, 700, 950)]
    [0.0015, 0.003, 0.0003, 3e-05, 3e-06]
    """

    def __init__(self, lr: float, total_steps: int, warmup_steps: int):
        self.lr, self.total_steps, self.warmup_steps = lr, total_steps, warmup_steps

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        warmup = keras.ops.minimum(1.0, (step + 0.0) / max(self.warmup_steps, 1))
        decays = sum(keras.ops.cast(step >= point * self.total_steps, "float32")
                     for point in BIT_DECAY_POINTS)
        return self.lr * warmup * keras.ops.power(0.1, decays)

    def get_config(self):
        return {"lr": self.lr, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps}


def bit_hyperrule_optimizer(batch_size: int, total_steps: int) -> keras.optimizers.SGD:
    """SGD with momentum 0.9 on the BiT-HyperRule schedule for `batch_size`."""
    warmup = min(BIT_WARMUP_STEPS, total_steps // 10)
    schedule = BitHyperRuleSchedule(BIT_BASE_LR * batch_size / 512, total_steps, warmup)
    return keras.optimizers.SGD(learning_rate=schedule, momentum=BIT_MOMENTUM)


def train_teacher(config: ml_collections.ConfigDict, workdir: str, verbose: int = 1,
                  overwrite: bool = False) -> str:
    """Fine-tunes `config.teacher` (from `config.teacher_weights`) on the dataset's labels.

    Args:
        config: a config from `funmatch_keras.configs` (the teacher fields are used).
        workdir: str. Checkpoints go to `workdir/teacher_checkpoints`, the
            result to `workdir/teacher.keras`.
        verbose: int. Keras verbosity. Defaults to 1.
        overwrite: bool. Allow a workdir that holds another config.

    Returns:
        The path of the saved teacher.

    Example:
    >>> train_teacher(configs.load_config("pets37:smoke=True"), "/tmp/t")  # doctest: +SKIP
    """
    from funmatch_keras import train  # train imports this module's users; keep it lazy

    configs.validate(config)
    train.prepare_workdir(workdir, config, overwrite)
    keras.utils.set_random_seed(config.seed)
    source = sources.source_for(config.dataset, "train", config.data_dir)
    num_classes = config.num_classes or source.num_classes
    spec = train._as_list(config.teacher)[0]
    size = train._as_list(config.teacher_size)[0] or config.student_size
    teacher = models.build(spec, num_classes, size, dtype=config.teacher_dtype or config.dtype)
    weights = train._as_list(config.teacher_weights)[0]
    if weights:  # pretrained backbone; a head of another class count stays zero
        train.load_weights(teacher, weights)
    steps_per_epoch = config.steps_per_epoch or data.steps_per_epoch(source, config.batch_size)
    total_steps = bit_hyperrule_steps(source.num_examples)
    if config.steps_per_epoch:  # smoke runs: the config's tiny schedule wins
        total_steps = steps_per_epoch * config.epochs
    epochs = max(1, -(-total_steps // steps_per_epoch))
    teacher.compile(optimizer=bit_hyperrule_optimizer(config.batch_size, total_steps),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    metrics=["accuracy"])
    def make_dataset(step):
        return data.train_pipeline(
            source, mode="consistent", batch_size=config.batch_size, student_size=size,
            seed=config.seed, start_step=step, with_labels=True,
            shuffle_buffer=min(source.num_examples, data.DEFAULT_SHUFFLE_BUFFER),
            area_range=(config.crop_area_min, 1.0), flip=config.flip)

    val = data.eval_pipeline(sources.source_for(config.dataset, "validation", config.data_dir),
                             size=size, batch_size=config.eval_batch_size)
    loop.fit_with_checkpoints(
        teacher, make_dataset, checkpoint_dir=os.path.join(workdir, "teacher_checkpoints"),
        every_steps=config.checkpoint_every_steps, keep=config.keep_checkpoints,
        steps_per_epoch=steps_per_epoch, epochs=epochs, name="teacher training",
        validation_data=val, validation_freq=max(1, epochs // 5), verbose=verbose)
    path = os.path.join(workdir, "teacher.keras")
    tmp = os.path.join(workdir, f".teacher-{os.getpid()}.keras")
    teacher.save(tmp)
    os.replace(tmp, path)
    if verbose:
        print(f"Wrote {path}: use --config.teacher={path} with `funmatch distill`.")
    return path
