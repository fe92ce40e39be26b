"""Labelled image sources: the `Source` type, tfds datasets, arrays, digits.

A `Source` knows its size and class count and yields, in a fixed order, dicts
`{"image", "label": int32, "index": int64}` where `index` is the example's stable
position (the key of cached teacher logits). `image` is either encoded bytes
(JPEG/PNG, `encoded=True`; the train pipeline then decodes only the crop) or a
decoded `[H, W, 3]` array with pixel values in `[0, 255]`.

TFRecord shards and image folders are in `funmatch_keras.data.file_sources`.
Decoding happens in `funmatch_keras.data.views`, and corrupt images are counted in
`funmatch_keras.data.stream`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Callable

import numpy as np
import tensorflow as tf
from absl import logging

from funmatch_keras.data import array_checks
from funmatch_keras.recipe import DIGITS, PRESETS, SPLIT_ROLES, split_names


@dataclasses.dataclass(frozen=True)
class Source:
    """A labelled image collection with a stable example order.

    Attributes:
        name: str. Identifies the data (part of the teacher-logits cache key).
        num_examples: int. Number of examples (records), corrupt ones included.
        num_classes: int. Labels lie in `[0, num_classes)`.
        encoded: bool. `image` is JPEG/PNG bytes (else a decoded uint8/float array).
        make_dataset: callable returning a `tf.data.Dataset` of
            `{"image", "label"}` (and optionally `"index"`, else the position is
            the index) in a deterministic order.
        num_files: int. Files the examples are read from (0: not file based).
        shard_by_file: callable `(num_shards, shard_index) -> Source` reading
            only that shard's files (see `shard`), or None.
        make_fingerprint: callable returning a digest of the examples' identity
            (see `fingerprint`), or None: the name is one (it hashes the arrays).
    """

    name: str
    num_examples: int
    num_classes: int
    encoded: bool
    make_dataset: Callable[[], tf.data.Dataset] = dataclasses.field(repr=False)
    num_files: int = 0
    shard_by_file: Callable[[int, int], "Source"] | None = dataclasses.field(
        default=None, repr=False)
    make_fingerprint: Callable[[], str] | None = dataclasses.field(default=None, repr=False)

    def fingerprint(self) -> str:
        """A digest that changes whenever an example is added, removed, moved or rewritten.

        The key of cached teacher logits (`teacher_cache`): an image folder hashes
        its files' relative paths, sizes and modification times, TFRecord shards
        their paths, sizes and times, a tfds split its dataset, split and version,
        and arrays their bytes (in the name).

        Example:
        >>> src = array_source(np.zeros([2, 4, 4], np.uint8), [0, 1])
        >>> src.fingerprint() == src.name
        True
        """
        return self.name if self.make_fingerprint is None else self.make_fingerprint()

    def dataset(self) -> tf.data.Dataset:
        """Examples as `{"image", "label": int32, "index": int64}`, labels checked.

        Example:
        >>> src = array_source(np.zeros([4, 8, 8], np.uint8), np.arange(4))
        >>> sorted(next(iter(src.dataset())))
        ['image', 'index', 'label']
        """
        num_classes = self.num_classes

        def check_label(example):
            label = tf.cast(example["label"], tf.int32)
            index = tf.cast(example["index"], tf.int64)
            in_range = tf.logical_and(label >= 0, label < num_classes)
            check = tf.debugging.Assert(
                in_range,
                [f"Label out of range [0, {num_classes}) at example index", index,
                 "label", label],
            )
            with tf.control_dependencies([check]):
                label = tf.identity(label)
            return {"image": example["image"], "label": label, "index": index}

        return self._indexed().map(check_label)

    def shard(self, num_shards: int, shard_index: int) -> Source:
        """The part of the examples that input pipeline `shard_index` reads.

        File sources with at least `num_shards` files are split by file, like
        tf.data's `AutoShardPolicy.FILE`: shard `i` reads only files `i`,
        `i + num_shards`, ... Other sources are split by example (shard `i`
        gets the examples whose index is `i` modulo `num_shards`), before any
        image is decoded. Example indices stay those of the whole source.

        Example:
        >>> src = array_source(np.zeros([5, 8, 8], np.uint8), np.arange(5))
        >>> part = src.shard(2, 1)
        >>> part.num_examples, [int(ex["index"]) for ex in part.dataset()]
        (2, [1, 3])
        """
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"Expected 0 <= shard_index < num_shards. Received: "
                             f"{shard_index=}, {num_shards=}")
        if num_shards == 1:
            return self
        if self.shard_by_file is not None and self.num_files >= num_shards:
            return self.shard_by_file(num_shards, shard_index)
        if self.shard_by_file is not None:
            logging.warning(
                "%s has %d files for %d input pipelines: sharding by example instead "
                "of by file (every pipeline reads every file).",
                self.name, self.num_files, num_shards)

        def make_dataset():
            return self._indexed().filter(lambda ex: tf.equal(
                tf.cast(ex["index"], tf.int64) % num_shards, shard_index))

        return Source(
            name=f"{self.name}[{shard_index}::{num_shards}]",
            num_examples=len(range(shard_index, self.num_examples, num_shards)),
            num_classes=self.num_classes,
            encoded=self.encoded,
            make_dataset=make_dataset,
            make_fingerprint=lambda: f"{self.fingerprint()}[{shard_index}::{num_shards}]",
        )

    def _indexed(self) -> tf.data.Dataset:
        """`make_dataset()` with an `"index"` (the position, unless it has one)."""
        ds = self.make_dataset()
        if "index" not in ds.element_spec:
            ds = ds.enumerate().map(lambda index, ex: {**ex, "index": index})
        return ds


def tfds_source(
    name_or_preset: str, split: str | None = None, data_dir: str | None = None,
    *, preset_splits: bool = True,
) -> Source:
    """A tfds dataset (already prepared on disk; never downloads).

    Args:
        name_or_preset: str. A preset of `PRESETS` (e.g. `"pets37"`) or any tfds
            name with an `image` and a `label` feature (e.g. `"cifar10"`).
        split: str. `"train"`, `"validation"` or `"test"` pick the preset's split;
            any other string is a raw tfds split (`"train[:10%]"`). Defaults to
            `"train"`.
        data_dir: str. tfds data directory. Defaults to tfds's default.
        preset_splits: bool. False: `split` is a tfds split even when it reads
            `"validation"` (and `name_or_preset` a tfds name, e.g. `"food101"`,
            whose preset trains on `"train[:90%]"`). Defaults to True.

    Returns:
        A `Source` of encoded images.

    Example:
    >>> src = tfds_source("flowers102", "validation", data_dir="~/tensorflow_datasets")
    ... # doctest: +SKIP
    """
    import tensorflow_datasets as tfds  # Heavy import; only needed here.

    preset = PRESETS.get(name_or_preset) if preset_splits else None
    split = split or "train"
    if preset is not None:
        tfds_name = preset.tfds_name
        split = split_names(name_or_preset).get(split, split)
    else:
        tfds_name = name_or_preset
    try:
        builder = tfds.builder(tfds_name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(
            f"Unknown tfds dataset {tfds_name!r}; presets: {sorted(PRESETS)}."
        ) from e
    # Decode nothing here, and read only the two features we use: other features
    # (boxes, masks) cost parsing time and break tfds's mock data.
    decoders = tfds.decode.PartialDecoding(
        {"image": True, "label": True}, decoders={"image": tfds.decode.SkipDecoding()}
    )

    def make_dataset():
        try:
            return builder.as_dataset(
                split=split, decoders=decoders, shuffle_files=False)
        except AssertionError as e:  # tfds's "could not find data" error.
            raise FileNotFoundError(_not_prepared_message(tfds_name, builder)) from e

    num_classes = check_num_classes(
        builder.info.features["label"].num_classes, f"The tfds dataset {tfds_name!r} has",
        "pick a dataset whose `label` feature has at least 2 classes")
    ds = make_dataset()
    num_examples = int(ds.cardinality())
    if num_examples < 0:
        num_examples = _count(ds)
    if num_examples == 0:
        raise ValueError(f"Split {split!r} of tfds dataset {tfds_name!r} is empty.")
    return Source(
        name=f"{name_or_preset}:{split}",
        num_examples=num_examples,
        num_classes=num_classes,
        encoded=True,
        make_dataset=make_dataset,
        make_fingerprint=lambda: f"tfds:{tfds_name}:{split}:{builder.info.version}",
    )


def check_num_classes(num_classes: int, what: str, fix: str) -> int:
    """`num_classes`, or a ValueError saying that `what` has fewer than 2 classes, and `fix`.

    Example:
    >>> check_num_classes(1, "The labels have", "pass num_classes=10")
    Traceback (most recent call last):
    ...
    ValueError: The labels have 1 class, but distillation needs at least 2 ...
    """
    if num_classes < 2:
        raise ValueError(
            f"{what} {num_classes} class{'es' * (num_classes != 1)}, but distillation needs at "
            f"least 2 (the softmax of a single class is always 1: nothing to learn): {fix}.")
    return num_classes


def _not_prepared_message(tfds_name: str, builder) -> str:
    data_dir = os.path.dirname(os.path.dirname(builder.data_dir))
    how = f"prepare it with `tfds build {tfds_name} --data_dir={data_dir}`"
    if tfds_name.startswith("imagenet2012"):
        how = (
            "download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar by hand "
            f"into {data_dir}/downloads/manual, then " + how
        )
    return f"tfds dataset {tfds_name!r} is not prepared in {data_dir}: {how}."


def array_source(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int | None = None,
    in_max: float | None = None,
    name: str = "arrays",
    value_range: tuple[float, float] | None = None,
) -> Source:
    """In-memory images, e.g. scikit-learn's digits, checked once here.

    The pipeline takes decoded pixels in `[0, 255]` (`augment.value_range` then
    maps them to `[-1, 1]`). uint8 images are taken as they are; any other
    dtype needs its `value_range`, which is mapped linearly to `[0, 255]`
    (float32). Images outside their stated range, non-finite pixels and labels
    that are not class indices are errors. Float labels are accepted when every
    one is a whole number (converted to int64).

    Args:
        images: array `[N, H, W]` (grayscale) or `[N, H, W, C]` with C in {1, 3}:
            uint8 (0..255), or float/integer with `value_range`.
        labels: array `[N]` of integer class indices.
        num_classes: int. Defaults to `max(labels) + 1`.
        in_max: float. Shorthand for `value_range=(0, in_max)` (e.g. `16` for
            `load_digits`). Defaults to None.
        name: str. Identifies the data in the teacher-logits cache key.
        value_range: `(low, high)`: the pixel values meaning black and white,
            e.g. `(0, 1)` or `(0, 255)` for float images, `(0, 65535)` for
            uint16. Required for every dtype but uint8. Defaults to None.

    Returns:
        A `Source` of decoded `[H, W, 3]` images with values in `[0, 255]`.

    Raises:
        ValueError: bad shapes, a dtype without `value_range`, pixels outside
            it or not finite, or labels that are not class indices.

    Example:
    >>> from sklearn.datasets import load_digits
    >>> d = load_digits()
    >>> array_source(d.images, d.target, in_max=16).num_classes
    10
    >>> floats = np.random.default_rng(0).uniform(0, 1, [4, 8, 8, 3])
    >>> src = array_source(floats, [0, 1, 0, 1], value_range=(0, 1))
    >>> float(np.max([ex["image"].numpy().max() for ex in src.dataset()])) > 200
    True
    >>> array_source(floats, [0, 1, 0, 1])
    Traceback (most recent call last):
    ...
    ValueError: images are float64, so their value range is needed: ...
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            "Expected images [N, H, W] or [N, H, W, C] with C in {1, 3}. "
            f"Received: images.shape={images.shape}"
        )
    if len(images) == 0:
        raise ValueError("array_source got no images.")
    if labels.shape != (len(images),):
        raise ValueError(f"Expected labels of shape ({len(images)},). "
                         f"Received: labels.shape={labels.shape}")
    if num_classes is not None:
        check_num_classes(num_classes, "num_classes says the task has",
                          "pass the task's number of classes")
    labels, num_classes = array_checks.class_indices(labels, num_classes)
    check_num_classes(num_classes, f"The labels (largest {int(labels.max())}) have", (
        "pass num_classes=<the task's number of classes> when these images hold only "
        "some of them (e.g. a small validation set), else labels of at least 2 classes"))
    images = array_checks.pixels_0_255(
        images, array_checks.stated_range(images.dtype, value_range, in_max))

    def make_dataset():
        ds = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})
        if images.shape[-1] == 1:
            ds = ds.map(
                lambda ex: {**ex, "image": tf.image.grayscale_to_rgb(ex["image"])})
        return ds

    # A content hash: different arrays must not share cached teacher logits.
    digest = hashlib.sha256(np.ascontiguousarray(images).data)
    digest.update(np.ascontiguousarray(labels).data)
    return Source(
        name=f"{name}:{digest.hexdigest()[:12]}",
        num_examples=len(images),
        num_classes=num_classes,
        encoded=False,
        make_dataset=make_dataset,
    )


def _count(ds: tf.data.Dataset) -> int:
    return int(ds.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1))


# The bundled offline dataset: scikit-learn's 1,797 8x8 digits (values 0..16).
DIGITS_TEST_FRACTION = 0.3
DIGITS_IMAGE_SIZE = 20  # stored upscaled, so crops are finer than 8x8 pixels


def digits_source(split: str = "train", image_size: int = DIGITS_IMAGE_SIZE,
                  seed: int = 0) -> Source:
    """scikit-learn's bundled digits as a `Source`: no download, ever.

    A stratified 70/30 train/test split fixed by `seed`; digits have no separate
    validation split, so `"validation"` is the test split. Images are upscaled
    bilinearly to `image_size` and scaled to `[0, 255]`.

    Args:
        split: str. `"train"`, `"validation"` or `"test"`.
        image_size: int. Side of the stored images. Defaults to 20.
        seed: int. Seed of the split. Defaults to 0.

    Returns:
        A `Source` of decoded `[image_size, image_size, 3]` images, 10 classes.

    Example:
    >>> digits_source("test").num_examples
    540
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in SPLIT_ROLES:
        raise ValueError(f"Unknown digits split. Expected one of {SPLIT_ROLES}. "
                         f"Received: split={split!r}")
    digits = load_digits()
    train_x, test_x, train_y, test_y = train_test_split(
        digits.images, digits.target, test_size=DIGITS_TEST_FRACTION,
        random_state=seed, stratify=digits.target)
    images, labels = (train_x, train_y) if split == "train" else (test_x, test_y)
    images = tf.image.resize(images[..., None] * (255.0 / 16.0), [image_size] * 2).numpy()
    return array_source(np.clip(images, 0, 255).astype(np.uint8), labels, num_classes=10,
                        name=f"digits-{split}")


def source_for(dataset: str, split: str, data_dir: str | None = None) -> Source:
    """The `Source` a config's `dataset` names: `"digits"` or a tfds preset/name.

    Example:
    >>> source_for("digits", "test").num_examples
    540
    """
    if dataset == DIGITS:
        return digits_source(split)
    return tfds_source(dataset, split=split, data_dir=data_dir)
