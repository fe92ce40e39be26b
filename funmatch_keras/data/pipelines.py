"""Input pipelines for distillation: train batches per teaching mode, eval batches.

Train pipelines yield only what `funmatch_keras.Distiller` consumes:

| mode                | batch                                             |
|---------------------|---------------------------------------------------|
| `function_matching` | one crop per image, fed to both models, + mixup   |
| `consistent`        | one crop per image, fed to both models            |
| `independent`       | `{"student": crop_a, "teacher": crop_b}`          |
| `fixed_teacher`     | `{"student": crop, "teacher_logits": given}`      |

With `teacher_size != student_size` (cross-resolution), `function_matching` and
`consistent` batches are `{"student": s, "teacher": t}`: one crop of the original
image, resized to each model's size. Eval pipelines yield `(images, labels)`.
The views come from `funmatch_keras.data.views`, the seeded example order and the
skipping of corrupt images from `funmatch_keras.data.stream`, and the fixed teacher's
logits from `funmatch_keras.data.teacher_cache` (this module never runs a model).

Randomness is stateless: each example's crop and flip come from
`(seed, epoch, index)`, each batch's mixup ratio from `(seed, step)`, each
epoch's shuffle from `(seed, epoch)`. A seeded pipeline is therefore
reproducible whatever the map parallelism, and `start_step=k` resumes exactly at
batch k by skipping still-encoded examples of the current epoch only.

Reference: Beyer et al., "Knowledge distillation: A good teacher is patient and
consistent", CVPR 2022 (arXiv 2106.05237), Sec. 3-4.
"""

from __future__ import annotations

import random

import numpy as np
import tensorflow as tf

from funmatch_keras.data import augment
from funmatch_keras.data.sources import Source
from funmatch_keras.data.stream import (
    AUTOTUNE,
    EXAMPLE_STREAM,
    MIXUP_STREAM,
    example_stream,
    fold_in,
    skip_corrupt,
    stream_key,
    try_map,
)
from funmatch_keras.data.views import eval_views, train_view_fn
from funmatch_keras.recipe import MODES

DEFAULT_SHUFFLE_BUFFER = 50_000  # The paper's (big_vision's) buffer size.


def steps_per_epoch(source: Source, batch_size: int) -> int:
    """Full batches per epoch (`num_examples // batch_size`, remainder dropped).

    Example:
    >>> from funmatch_keras.data.sources import array_source
    >>> src = array_source(np.zeros([10, 8, 8], np.uint8), np.arange(10) % 2)
    >>> steps_per_epoch(src, 4)
    2
    """
    steps = source.num_examples // batch_size
    if steps == 0:
        raise ValueError(
            f"batch_size={batch_size} exceeds the {source.num_examples} examples "
            f"of {source.name}."
        )
    return steps


def train_pipeline(
    source: Source,
    *,
    mode: str = "function_matching",
    batch_size: int,
    student_size: int,
    teacher_size: int | None = None,
    seed: int | None = None,
    epochs: int | None = None,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    teacher_logits: np.ndarray | None = None,
    start_step: int = 0,
    num_replicas: int = 1,
    area_range: tuple[float, float] = augment.DEFAULT_AREA_RANGE,
    flip: bool = True,
    with_labels: bool = False,
    input_context: tf.distribute.InputContext | None = None,
) -> tf.data.Dataset:
    """Training batches for `Distiller.fit` in one of the paper's teaching modes.

    Batches are formed across epoch boundaries with the remainder dropped, so the
    pipeline yields `epochs * num_examples // batch_size` batches (forever if
    `epochs` is None). Corrupt images are skipped and counted (logged once per
    epoch); the place of each is taken by a copy of the next good example, so
    batch k holds the same examples whether or not the run was resumed. A
    source whose every image is corrupt raises an error.

    Across workers, give each worker its own input pipeline with
    `strategy.distribute_datasets_from_function(lambda ctx: train_pipeline(...,
    input_context=ctx))`: worker `i` then reads only its shard of the source
    (`Source.shard`: by file for TFRecords and image folders, by example
    otherwise) and yields per-replica batches. Without `input_context` the
    pipeline yields global batches, for `experimental_distribute_dataset` (what
    `fit` does with a plain dataset), sharded by element (`AutoShardPolicy.DATA`).

    Args:
        source: `Source`. Training examples.
        mode: str. One of `recipe.MODES`. Defaults to `"function_matching"`.
        batch_size: int. Global batch size.
        student_size: int. Side of the student's square input.
        teacher_size: int, or a list of ints for an ensemble of teachers at
            several resolutions (one view each, from the same crop; the batch's
            `"teacher"` is then a list). Defaults to `student_size`;
            a different value gives cross-resolution batches.
        seed: int. Makes the pipeline reproducible (and deterministic in order).
            Defaults to a random seed.
        epochs: int. Passes over the data. Defaults to `None` (repeat forever).
        shuffle_buffer: int. Examples are shuffled in consecutive blocks of this
            many (a full shuffle of datasets that fit). Defaults to 50,000.
        teacher_logits: float array `[source.num_examples, classes]`, row i the
            teacher's logits on example index i (`fixed_teacher` only, and
            required there): compute them with
            `funmatch_keras.data.teacher_cache.teacher_logits(...)`.
        start_step: int. Global step to resume at: the first batch is the one an
            uninterrupted pipeline with the same seed yields at this step.
        num_replicas: int. Replicas the global batch is split over.
        area_range: tuple. Inception-crop area range. Defaults to the paper's
            `(0.05, 1.0)`.
        flip: bool. Random left-right flips. Defaults to `True`.
        with_labels: bool. Yield `(views, labels)` for supervised training
            (a teacher, a label-trained baseline); not with mixup or given
            teacher logits. Defaults to `False`.
        input_context: `tf.distribute.InputContext` or None. This worker's
            input pipeline: read its shard of `source`, mix up its part of each
            global batch (`batch_size / num_input_pipelines` examples, with
            its own mixup ratio), and yield per-replica batches. The pipeline
            then repeats forever (`epochs` must be None: shards may differ in
            size, so bound training by steps). Defaults to None.

    Returns:
        A `tf.data.Dataset` of float32 image batches in `[-1, 1]`, or dicts of
        them (see the module docstring); labels only with `with_labels`.

    Example:
    >>> from funmatch_keras.data.sources import array_source
    >>> src = array_source(np.zeros([8, 24, 24, 3], np.uint8), np.arange(8) % 2)
    >>> ds = train_pipeline(src, batch_size=4, student_size=16, seed=0, epochs=1)
    >>> next(iter(ds)).shape
    TensorShape([4, 16, 16, 3])
    """
    _check_train_args(mode, batch_size, num_replicas, start_step)
    logits = _check_teacher_logits(mode, teacher_logits, source, teacher_size)
    if with_labels and mode in ("function_matching", "fixed_teacher"):
        raise ValueError(
            f"with_labels=True needs a mode without mixup or teacher logits, e.g. "
            f"'consistent'. Received: {mode=}"
        )
    num_pipelines, pipeline_id, replica_batch = _input_sharding(
        input_context, batch_size, num_replicas, epochs)
    local_batch = batch_size // num_pipelines
    deterministic = seed is not None
    seed = random.randrange(2**31) if seed is None else seed
    teacher_size = teacher_size or student_size
    view_fn = train_view_fn(mode, student_size, teacher_size, source.encoded,
                            tuple(area_range), flip)
    example_key = stream_key(seed, EXAMPLE_STREAM)

    def make_views(example):
        example_seed = fold_in(example_key, example["epoch"], example["index"])
        views = view_fn(example["image"], example_seed)
        if logits is not None:
            row = tf.gather(logits, example["index"])
            return {"student": views, "teacher_logits": row}
        return (views, example["label"]) if with_labels else views

    shard = source.shard(num_pipelines, pipeline_id)
    # Each pipeline yields its part of every global batch, so at global step k
    # it has consumed k local batches.
    offset = start_step * local_batch
    ds = example_stream(shard, seed, epochs, shuffle_buffer, offset)
    ds = try_map(ds, make_views, deterministic)
    ds = skip_corrupt(ds, shard, first_epoch_done=offset % shard.num_examples,
                      keep_positions=True)
    ds = ds.batch(local_batch, drop_remainder=True, num_parallel_calls=AUTOTUNE,
                  deterministic=deterministic)
    if mode == "function_matching":
        mixup_key = stream_key(seed, MIXUP_STREAM)
        if num_pipelines > 1:  # each pipeline mixes its own part of the batch
            mixup_key = fold_in(mixup_key, pipeline_id)
        ds = ds.enumerate(start=start_step).map(
            lambda step, images: augment.mixup(images, seed=fold_in(mixup_key, step)),
            num_parallel_calls=AUTOTUNE, deterministic=deterministic,
        )
    if replica_batch != local_batch:
        ds = ds.rebatch(replica_batch, drop_remainder=True)
    return ds.prefetch(AUTOTUNE).with_options(
        _options(deterministic, sharded=input_context is not None))


def eval_pipeline(
    source: Source, *, size: int, batch_size: int, teacher_size: int | None = None
) -> tf.data.Dataset:
    """Evaluation batches `(images, labels)`: short-side resize, central crop.

    Keeps the last, smaller batch. Corrupt images are skipped and counted.

    Args:
        source: `Source`. Examples to evaluate on, in source order.
        size: int. Side of the (student's) square input.
        batch_size: int. Batch size.
        teacher_size: int. If given and different from `size`, images are
            `{"student": ..., "teacher": ...}`, both from the same original image.

    Returns:
        A `tf.data.Dataset` of `(images, labels)`, images float32 in `[-1, 1]`,
        labels int32.

    Example:
    >>> from funmatch_keras.data.sources import array_source
    >>> src = array_source(np.zeros([5, 24, 24, 3], np.uint8), np.arange(5))
    >>> [x.shape[0] for x, y in eval_pipeline(src, size=16, batch_size=4)]
    [4, 1]
    """
    def make_views(example):
        views = eval_views(example["image"], source.encoded, size, teacher_size)
        return views, example["label"]

    ds = skip_corrupt(try_map(source.dataset(), make_views, True), source)
    ds = ds.batch(batch_size, num_parallel_calls=AUTOTUNE, deterministic=True)
    return ds.prefetch(AUTOTUNE).with_options(_options(True))


def _check_train_args(mode, batch_size, num_replicas, start_step):
    if mode not in MODES:
        raise ValueError(f"Unknown mode. Expected one of {MODES}. Received: {mode=}")
    if batch_size <= 0 or num_replicas <= 0 or batch_size % num_replicas:
        raise ValueError(
            "batch_size must be a positive multiple of num_replicas. "
            f"Received: batch_size={batch_size}, num_replicas={num_replicas}"
        )
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0. Received: {start_step=}")


def _check_teacher_logits(mode, teacher_logits, source, teacher_size):
    """`teacher_logits` as a float32 constant for `fixed_teacher`, else None."""
    if mode != "fixed_teacher":
        if teacher_logits is not None:
            raise ValueError(
                "teacher_logits are only read in mode='fixed_teacher' (the other modes "
                "run the teacher on each view): drop them, or pass that mode. "
                f"Received: {mode=}")
        return None
    if teacher_logits is None:
        raise ValueError(
            "mode='fixed_teacher' needs teacher_logits [num_examples, classes]: "
            "compute them with funmatch_keras.data.teacher_cache.teacher_logits(...). "
            "Received: teacher_logits=None")
    if isinstance(teacher_size, (list, tuple)):
        raise ValueError("mode='fixed_teacher' reads one teacher's precomputed logits: "
                         f"pass one teacher_size (or None). Received: {teacher_size=}")
    logits = np.asarray(teacher_logits, np.float32)
    # For the whole source, not a shard: example indices are global.
    if logits.ndim != 2 or logits.shape[0] != source.num_examples:
        raise ValueError(
            f"Expected teacher_logits of shape [{source.num_examples}, classes], one "
            f"row per example of {source.name}. Received: "
            f"teacher_logits.shape={logits.shape}")
    return tf.constant(logits)


def _input_sharding(input_context, batch_size, num_replicas, epochs):
    """`(num_pipelines, pipeline_id, per-yield batch size)` for `train_pipeline`."""
    if input_context is None:
        return 1, 0, batch_size
    pipelines = input_context.num_input_pipelines
    replicas = input_context.num_replicas_in_sync
    if batch_size % replicas or num_replicas not in (1, replicas):
        raise ValueError(
            "batch_size must be a multiple of the replicas in sync (and num_replicas, if "
            f"given, equal to them). Received: batch_size={batch_size}, "
            f"num_replicas_in_sync={replicas}, num_replicas={num_replicas}")
    if pipelines > 1 and epochs is not None:
        raise ValueError(
            f"With {pipelines} input pipelines the pipeline repeats forever (their "
            f"shards may differ in size): pass epochs=None and bound training by steps "
            f"(fit's steps_per_epoch). Received: {epochs=}")
    return pipelines, input_context.input_pipeline_id, batch_size // replicas


def _options(deterministic: bool, sharded: bool = False) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = deterministic
    # A pipeline of one input context already reads only its shard (by file for
    # file sources, see `Source.shard`): OFF. A global pipeline is sharded by
    # element: tf.data's FILE policy cannot find the files, which are read
    # inside the per-epoch flat_map ("Found an unshardable source dataset").
    policy = tf.data.experimental.AutoShardPolicy
    options.experimental_distribute.auto_shard_policy = (
        policy.OFF if sharded else policy.DATA)
    return options
