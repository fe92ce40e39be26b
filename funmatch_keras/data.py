"""Input pipelines for distillation: teaching-mode views, eval views, batching.

Train pipelines yield only what `funmatch_keras.Distiller` consumes:

| mode                | batch                                             |
|---------------------|---------------------------------------------------|
| `function_matching` | one crop per image, fed to both models, + mixup   |
| `consistent`        | one crop per image, fed to both models            |
| `independent`       | `{"student": crop_a, "teacher": crop_b}`          |
| `fixed_teacher`     | `{"student": crop, "teacher_logits": cached}`     |

With `teacher_size != student_size` (cross-resolution), `function_matching` and
`consistent` batches are `{"student": s, "teacher": t}`: one crop of the original
image, resized to each model's size. Eval pipelines yield `(images, labels)`.

Randomness is stateless: each example's crop and flip come from
`(seed, epoch, index)`, each batch's mixup ratio from `(seed, step)`, each
epoch's shuffle from `(seed, epoch)`. A seeded pipeline is therefore
reproducible whatever the map parallelism, and `start_step=k` resumes exactly at
batch k by skipping still-encoded examples of the current epoch only.

Reference: Beyer et al., "Knowledge distillation: A good teacher is patient and
consistent", CVPR 2022 (arXiv 2106.05237), Sec. 3-4.
"""

from __future__ import annotations

import hashlib
import os
import random
from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from funmatch_keras import augment
from funmatch_keras.sources import (  # noqa: F401  (re-exported)
    PRESETS,
    Source,
    array_source,
    folder_source,
    split_names,
    tfds_source,
    tfrecord_source,
)

MODES = ("function_matching", "consistent", "independent", "fixed_teacher")
DEFAULT_SHUFFLE_BUFFER = 50_000  # The paper's (big_vision's) buffer size.
AUTOTUNE = tf.data.AUTOTUNE
# Independent streams of randomness derived from the one user seed.
_EXAMPLE_STREAM, _MIXUP_STREAM, _SHUFFLE_STREAM = 0, 1, 2


def steps_per_epoch(source: Source, batch_size: int) -> int:
    """Full batches per epoch (`num_examples // batch_size`, remainder dropped).

    Example:
    >>> src = array_source(np.zeros([10, 8, 8], np.uint8), np.zeros(10, int))
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
    teacher: keras.Model | None = None,
    workdir: str | None = None,
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
        mode: str. One of `MODES`. Defaults to `"function_matching"`.
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
        teacher: keras model (`fixed_teacher` only): called as
            `teacher(images, training=False)` once per example.
        workdir: str (`fixed_teacher` only). Where the teacher logits are cached.
        start_step: int. Global step to resume at: the first batch is the one an
            uninterrupted pipeline with the same seed yields at this step.
        num_replicas: int. Replicas the global batch is split over.
        area_range: tuple. Inception-crop area range. Defaults to the paper's
            `(0.05, 1.0)`.
        flip: bool. Random left-right flips. Defaults to `True`.
        with_labels: bool. Yield `(views, labels)` for supervised training
            (a teacher, a label-trained baseline); not with mixup or cached
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
    >>> src = array_source(np.zeros([8, 24, 24, 3], np.uint8), np.arange(8) % 2)
    >>> ds = train_pipeline(src, batch_size=4, student_size=16, seed=0, epochs=1)
    >>> next(iter(ds)).shape
    TensorShape([4, 16, 16, 3])
    """
    _check_train_args(mode, batch_size, num_replicas, start_step, teacher, workdir)
    if with_labels and mode in ("function_matching", "fixed_teacher"):
        raise ValueError(
            f"with_labels=True needs a mode without mixup or cached logits, e.g. "
            f"'consistent'. Received: {mode=}"
        )
    num_pipelines, pipeline_id, replica_batch = _input_sharding(
        input_context, batch_size, num_replicas, epochs)
    local_batch = batch_size // num_pipelines
    deterministic = seed is not None
    seed = random.randrange(2**31) if seed is None else seed
    teacher_size = teacher_size or student_size
    if mode == "fixed_teacher" and isinstance(teacher_size, (list, tuple)):
        raise ValueError("mode='fixed_teacher' caches one teacher's logits: pass one "
                         f"teacher_size. Received: {teacher_size=}")
    view_fn = _train_view_fn(mode, student_size, teacher_size, source.encoded,
                             tuple(area_range), flip)
    logits = None
    if mode == "fixed_teacher":  # for the whole source: indices are global
        logits = tf.constant(teacher_logits(source, teacher, teacher_size, workdir))
    example_key = _stream_key(seed, _EXAMPLE_STREAM)

    def make_views(example):
        example_seed = _fold_in(example_key, example["epoch"], example["index"])
        views = view_fn(example["image"], example_seed)
        if logits is not None:
            cached = tf.gather(logits, example["index"])
            return {"student": views, "teacher_logits": cached}
        return (views, example["label"]) if with_labels else views

    shard = source.shard(num_pipelines, pipeline_id)
    # Each pipeline yields its part of every global batch, so at global step k
    # it has consumed k local batches.
    offset = start_step * local_batch
    ds = _example_stream(shard, seed, epochs, shuffle_buffer, offset)
    ds = _try_map(ds, make_views, deterministic)
    ds = _skip_corrupt(ds, shard, first_epoch_done=offset % shard.num_examples,
                       keep_positions=True)
    ds = ds.batch(local_batch, drop_remainder=True, num_parallel_calls=AUTOTUNE,
                  deterministic=deterministic)
    if mode == "function_matching":
        mixup_key = _stream_key(seed, _MIXUP_STREAM)
        if num_pipelines > 1:  # each pipeline mixes its own part of the batch
            mixup_key = _fold_in(mixup_key, pipeline_id)
        ds = ds.enumerate(start=start_step).map(
            lambda step, images: augment.mixup(images, seed=_fold_in(mixup_key, step)),
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
    >>> src = array_source(np.zeros([5, 24, 24, 3], np.uint8), np.arange(5))
    >>> [x.shape[0] for x, y in eval_pipeline(src, size=16, batch_size=4)]
    [4, 1]
    """
    cross = teacher_size not in (None, size)

    def make_views(example):
        image = _decode(example["image"], source.encoded)
        if not cross:
            return augment.eval_preprocess(image, size), example["label"]
        views = {"student": augment.eval_preprocess(image, size)}
        if isinstance(teacher_size, (list, tuple)):  # an ensemble, one view per teacher
            # A tuple, not a list: tf.data would stack a list into one tensor.
            views["teacher"] = tuple(augment.eval_preprocess(image, t) for t in teacher_size)
        else:
            views["teacher"] = augment.eval_preprocess(image, teacher_size)
        return views, example["label"]

    ds = _skip_corrupt(_try_map(source.dataset(), make_views, True), source)
    ds = ds.batch(batch_size, num_parallel_calls=AUTOTUNE, deterministic=True)
    return ds.prefetch(AUTOTUNE).with_options(_options(True))


def teacher_logits(
    source: Source,
    teacher: keras.Model,
    size: int,
    workdir: str,
    batch_size: int = 128,
) -> np.ndarray:
    """The teacher's logits on every example's eval view, computed once and cached.

    The cache file `<workdir>/teacher_logits_<key>.npy` is keyed by the teacher's
    weights, `size` and the source, so a different teacher never reads stale
    logits. Rows of corrupt examples are zero (they are skipped in training).

    Args:
        source: `Source`. Examples, indexed by `index`.
        teacher: keras model, called as `teacher(images, training=False)`.
        size: int. Side of the teacher's input (eval preprocessing).
        workdir: str. Directory for the cache file.
        batch_size: int. Teacher batch size. Defaults to 128.

    Returns:
        float32 array `[num_examples, num_teacher_outputs]`, row i = example i.

    Example:
    >>> logits = teacher_logits(src, teacher, 128, "/tmp/run")  # doctest: +SKIP
    """
    key = _teacher_key(source, teacher, size)
    path = os.path.join(workdir, f"teacher_logits_{key}.npy")
    if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path, "rb") as f:
            logits = np.load(f, allow_pickle=False)
        if logits.shape[0] == source.num_examples:
            logging.info("Loaded cached teacher logits from %s.", path)
            return logits
    logging.info("Computing teacher logits for %d examples of %s.",
                 source.num_examples, source.name)

    def make_view(example):
        image = augment.eval_preprocess(_decode(example["image"], source.encoded), size)
        return image, example["index"]

    ds = _try_map(source.dataset(), make_view, True)
    ds = ds.batch(batch_size).prefetch(AUTOTUNE)
    logits, num_corrupt = None, 0
    progbar = keras.utils.Progbar(source.num_examples, unit_name="image")
    for batch in ds:
        (images, index), ok = batch["value"], batch["ok"].numpy()
        out = keras.ops.convert_to_numpy(teacher(images, training=False))
        if logits is None:
            logits = np.zeros([source.num_examples, out.shape[-1]], np.float32)
        logits[index.numpy()[ok]] = out[ok]
        num_corrupt += int((~ok).sum())
        progbar.add(len(ok))
    if num_corrupt:
        logging.warning("%d corrupt examples of %s have no teacher logits.",
                        num_corrupt, source.name)
    _save_atomically(path, logits)
    return logits


def _check_train_args(mode, batch_size, num_replicas, start_step, teacher, workdir):
    if mode not in MODES:
        raise ValueError(f"Unknown mode. Expected one of {MODES}. Received: {mode=}")
    if batch_size <= 0 or num_replicas <= 0 or batch_size % num_replicas:
        raise ValueError(
            "batch_size must be a positive multiple of num_replicas. "
            f"Received: batch_size={batch_size}, num_replicas={num_replicas}"
        )
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0. Received: {start_step=}")
    if mode == "fixed_teacher" and (teacher is None or workdir is None):
        raise ValueError(
            "mode='fixed_teacher' needs `teacher` and `workdir` (to cache the "
            f"teacher's logits). Received: teacher={teacher!r}, workdir={workdir!r}"
        )


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


def _train_view_fn(
    mode: str, student_size: int, teacher_size: int, encoded: bool,
    area_range: tuple[float, float] = augment.DEFAULT_AREA_RANGE, flip: bool = True,
) -> Callable[[tf.Tensor, tf.Tensor], Any]:
    """Returns `fn(image, seed) -> views` for a mode: crops, flips, [-1, 1]."""
    # Each group is one crop (+ flip) of the original image, resized to each of
    # its (name, size) entries: cross-resolution views share a crop, the
    # independent mode's views do not.
    # A list of teacher sizes (an ensemble at several resolutions) gives one view
    # per teacher, named "teacher/<i>" here and returned as a tuple under "teacher".
    ensemble = isinstance(teacher_size, (list, tuple))
    teacher_views = ([(f"teacher/{i}", t) for i, t in enumerate(teacher_size)] if ensemble
                     else [("teacher", teacher_size)])
    if mode == "independent":
        groups = [[("student", student_size)]] + [[view] for view in teacher_views]
    elif (ensemble or teacher_size != student_size) and mode != "fixed_teacher":
        groups = [[("student", student_size)] + teacher_views]
    else:
        groups = [[("image", student_size)]]

    def view_fn(image, seed):
        seeds = tf.random.experimental.stateless_split(seed, 2 * len(groups))
        crops = _crops(image, [seeds[2 * g] for g in range(len(groups))], encoded,
                       area_range)
        views = {}
        for g, (crop, group) in enumerate(zip(crops, groups)):
            if flip:
                crop = augment.random_flip(crop, seed=seeds[2 * g + 1])
            for name, size in group:
                views[name] = augment.value_range(augment.resize(crop, size))
        if ensemble and "image" not in views:
            views["teacher"] = tuple(views.pop(name) for name, _ in teacher_views)
        return views.get("image", views)

    return view_fn


def _crops(
    image: tf.Tensor, seeds: list[tf.Tensor], encoded: bool,
    area_range: tuple[float, float] = augment.DEFAULT_AREA_RANGE,
) -> list[tf.Tensor]:
    """One Inception crop of `image` per seed; JPEGs decode only the crop."""
    def window(shape, seed):
        return augment.inception_crop_window(shape, area_range, seed=seed)

    def slice_crops(full):
        windows = [window(tf.shape(full), s) for s in seeds]
        return [full[w[0]:w[0] + w[2], w[1]:w[1] + w[3]] for w in windows]

    if not encoded:
        return slice_crops(image)

    def jpeg_crops():
        shape = tf.image.extract_jpeg_shape(image)
        return [
            tf.image.decode_and_crop_jpeg(image, window(shape, s), channels=3)
            for s in seeds
        ]

    return tf.cond(tf.io.is_jpeg(image), jpeg_crops,
                   lambda: slice_crops(_decode(image, encoded)))


def _decode(image: tf.Tensor, encoded: bool) -> tf.Tensor:
    """`[H, W, 3]` uint8 from JPEG/PNG/GIF/BMP bytes (RGBA, gray -> RGB)."""
    if not encoded:
        return image
    return tf.ensure_shape(
        tf.io.decode_image(image, channels=3, expand_animations=False), [None, None, 3])


def _example_stream(
    source: Source, seed: int, epochs: int | None, shuffle_buffer: int, offset: int
) -> tf.data.Dataset:
    """Shuffled, still-encoded examples with their epoch, from the `offset`-th on.

    Each epoch permutes consecutive blocks of `shuffle_buffer` examples (the whole
    epoch when it fits) by stateless random keys of `(seed, epoch, block)`. Unlike
    `Dataset.shuffle`, this does not depend on TF's global seed, and a resumed
    run starts at its epoch instead of replaying all earlier ones.
    """
    first_epoch, skip = divmod(offset, source.num_examples)
    shuffle_key = _stream_key(seed, _SHUFFLE_STREAM)
    examples = source.dataset()

    def one_epoch(epoch):
        def permute(block_index, block):
            block_seed = _fold_in(shuffle_key, epoch, block_index)
            keys = tf.random.stateless_uniform(tf.shape(block["index"]), block_seed)
            order = tf.argsort(keys)
            return {**tf.nest.map_structure(lambda x: tf.gather(x, order), block),
                    "epoch": tf.fill(tf.shape(order), epoch)}

        # prefetch(1): the next block is read while this one is decoded.
        blocks = examples.batch(shuffle_buffer).enumerate().map(permute).prefetch(1)
        return blocks.unbatch()

    if epochs is None:
        epoch_ds = tf.data.Dataset.counter(first_epoch)
    else:
        epoch_ds = tf.data.Dataset.range(first_epoch, epochs)
    return epoch_ds.flat_map(one_epoch).skip(skip)


def _try_map(ds: tf.data.Dataset, fn: Callable, deterministic: bool) -> tf.data.Dataset:
    """Maps `fn` in parallel; yields `{"value": fn(x), "ok": True}`, or zeros and
    `ok=False` where `fn` fails (a corrupt image), one output per input."""
    spec = ds.map(fn).element_spec
    fallback = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), spec)

    def one(example):
        # ignore_errors on a one-element dataset drops the element if fn fails;
        # the fallback behind it then takes its place, flagged.
        done = tf.data.Dataset.from_tensors(example).map(
            lambda ex: {"value": fn(ex), "ok": True}).ignore_errors()
        failed = tf.data.Dataset.from_tensors({"value": fallback, "ok": False})
        return done.concatenate(failed).take(1)

    return ds.interleave(one, num_parallel_calls=AUTOTUNE, deterministic=deterministic)


def _skip_corrupt(
    ds: tf.data.Dataset, source: Source, first_epoch_done: int = 0,
    keep_positions: bool = False,
) -> tf.data.Dataset:
    """Drops failed elements of `_try_map`, logging their number once per epoch.

    An epoch ends after `num_examples` elements (`first_epoch_done` of the first
    epoch were skipped when resuming). An epoch where every image failed raises.

    With `keep_positions`, each skipped example's place is taken by a copy of
    the next good one, so the k-th element out is always the k-th in: a run
    resumed at step s (which skips `s * batch_size` still-encoded examples)
    continues exactly where the killed run was, however many images are corrupt.
    """
    n, name = source.num_examples, source.name

    def log(bad, seen):
        logging.warning("Skipped %d of %d examples of %s: corrupt images.",
                        int(bad), int(seen), name)
        return np.int64(0)

    def count(state, element):
        position, seen = state["position"] + 1, state["seen"] + 1
        ok = element["ok"]
        bad = state["bad"] + tf.cast(tf.logical_not(ok), tf.int64)
        epoch_end = tf.equal(position, n)
        all_bad = tf.debugging.Assert(
            tf.logical_not(tf.logical_and(epoch_end, tf.equal(bad, seen))),
            [f"All examples of {name} in an epoch failed to decode (corrupt "
             "images?); examples seen:", seen])
        logged = tf.cond(tf.logical_and(epoch_end, bad > 0),
                         lambda: tf.py_function(log, [bad, seen], tf.int64),
                         lambda: tf.constant(0, tf.int64))
        with tf.control_dependencies([all_bad, logged]):
            zero = tf.constant(0, tf.int64)
            # A good element fills its own place and those of the failed ones
            # before it ("pending"); a failed one fills none.
            copies = tf.where(ok, state["pending"] + 1, zero)
            state = {"position": tf.where(epoch_end, zero, position),
                     "seen": tf.where(epoch_end, zero, seen),
                     "bad": tf.where(epoch_end, zero, bad),
                     "pending": tf.where(ok, zero, state["pending"] + 1)}
        return state, (element["value"], copies)

    start = {"position": tf.constant(first_epoch_done, tf.int64),
             "seen": tf.constant(0, tf.int64), "bad": tf.constant(0, tf.int64),
             "pending": tf.constant(0, tf.int64)}
    def fill(value, copies):
        return tf.data.Dataset.from_tensors(value).repeat(copies)

    def is_ok(value, copies):
        return copies > 0

    def drop_copies(value, copies):
        return value

    ds = ds.scan(start, count)
    if keep_positions:
        return ds.flat_map(fill)
    return ds.filter(is_ok).map(drop_copies)


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


def _stream_key(seed: int, stream: int) -> tf.Tensor:
    return tf.constant([seed, stream], tf.int64)


def _fold_in(key: tf.Tensor, *data: tf.Tensor) -> tf.Tensor:
    for d in data:
        key = tf.random.experimental.stateless_fold_in(key, tf.cast(d, tf.int64))
    return key


def _teacher_key(source: Source, teacher: Any, size: int) -> str:
    """Hash of the teacher's weights, the input size and the source identity."""
    weights = getattr(teacher, "weights", None)
    if not weights:
        raise ValueError(
            "fixed_teacher caches logits under a hash of the teacher's weights, but "
            f"the teacher has none. Received: teacher={teacher!r}")
    # Version 2: TFRecord example indices count records file by file.
    digest = hashlib.sha256(f"2|{source.name}|{source.num_examples}|{size}".encode())
    for weight in weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
        digest.update(f"{value.shape}{value.dtype}".encode())
        digest.update(value.data)
    return digest.hexdigest()[:20]


def _save_atomically(path: str, array: np.ndarray) -> None:
    tf.io.gfile.makedirs(os.path.dirname(path) or ".")
    tmp = f"{path}.tmp-{os.getpid()}"
    with tf.io.gfile.GFile(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    tf.io.gfile.rename(tmp, path, overwrite=True)
