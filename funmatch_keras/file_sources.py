"""Sources read from files: TFRecord shards and image folders, sharded by file.

Both yield encoded images (`Source.encoded`), and `Source.shard` splits them by
file, so each input pipeline of a multi-worker run reads only its own files.
Example indices number the examples in sorted file order, whatever the read
order or sharding.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from funmatch_keras.sources import Source

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def tfrecord_source(
    pattern: str,
    image_key: str = "image",
    label_key: str = "class",
    num_classes: int | None = None,
) -> Source:
    """TFRecord shards of `tf.train.Example`s holding encoded images and int labels.

    Counts the records of each file once (a parallel pass that decodes no
    image). Example indices number the records file by file, in sorted file
    order, so they do not depend on the read order or on sharding by file.

    Args:
        pattern: str. Glob of the shard files, e.g. `"/data/train-*"`.
        image_key: str. Feature with the JPEG/PNG bytes. Defaults to `"image"`.
        label_key: str. int64 feature with the class index. Defaults to `"class"`.
        num_classes: int. Defaults to the largest label + 1 (one more cheap pass).

    Returns:
        A `Source` of encoded images, split by file when sharded.

    Example:
    >>> src = tfrecord_source("/data/pets/train-*", num_classes=37)  # doctest: +SKIP
    """
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise ValueError(f"No TFRecord files match {pattern!r}.")
    features = {
        # Defaults turn a missing image into a counted decode failure and a
        # missing label into a label error naming the example.
        image_key: tf.io.FixedLenFeature([], tf.string, default_value=""),
        label_key: tf.io.FixedLenFeature([], tf.int64, default_value=-1),
    }
    counts = tf.data.Dataset.from_tensor_slices(files).map(
        lambda f: tf.data.TFRecordDataset(f).reduce(np.int64(0), lambda n, _: n + 1),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    counts = np.fromiter(counts.as_numpy_iterator(), np.int64, len(files))
    if counts.sum() == 0:
        raise ValueError(f"The TFRecord files matching {pattern!r} hold no records.")
    first_index = np.cumsum(counts) - counts

    def records(file_ids: np.ndarray) -> tf.data.Dataset:
        """`(index, serialized record)` of the given files."""
        def read(path, first):
            return tf.data.TFRecordDataset(path).enumerate(start=first)

        # Fixed cycle length and deterministic order: reproducible runs.
        return tf.data.Dataset.from_tensor_slices(
            ([files[i] for i in file_ids], first_index[file_ids])).interleave(
                read, cycle_length=min(8, len(file_ids)),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    if num_classes is None:
        label_feature = {label_key: features[label_key]}
        labels = records(np.arange(len(files))).map(lambda i, r: r).batch(1024).map(
            lambda r: tf.io.parse_example(r, label_feature)[label_key])
        max_label = labels.reduce(tf.constant(-1, tf.int64),
                                  lambda m, x: tf.maximum(m, tf.reduce_max(x)))
        num_classes = int(max_label) + 1

    def source(file_ids: np.ndarray, name: str) -> Source:
        def make_dataset():
            def parse(index, record):
                ex = tf.io.parse_single_example(record, features)
                return {"image": ex[image_key], "label": ex[label_key], "index": index}

            return records(file_ids).map(parse, num_parallel_calls=tf.data.AUTOTUNE,
                                         deterministic=True)

        return Source(
            name=name,
            num_examples=int(counts[file_ids].sum()),
            num_classes=num_classes,
            encoded=True,
            make_dataset=make_dataset,
            num_files=len(file_ids),
            shard_by_file=lambda n, i: source(file_ids[i::n], f"{name}[{i}::{n}]"),
        )

    return source(np.arange(len(files)), f"tfrecord:{pattern}")


def folder_source(root: str) -> Source:
    """Images in `root/<class_name>/*.{jpg,jpeg,png}`; classes sorted by name.

    Grayscale, RGBA and palette PNGs are converted to RGB when decoded.

    Args:
        root: str. Directory with one sub-directory per class.

    Returns:
        A `Source` of encoded images, ordered by class name then file name
        (split by file when sharded).

    Example:
    >>> src = folder_source("/data/my_flowers")  # doctest: +SKIP
    >>> src.num_classes  # doctest: +SKIP
    5
    """
    if not tf.io.gfile.isdir(root):
        raise ValueError(f"Image folder {root!r} does not exist.")
    classes = sorted(
        d.rstrip("/") for d in tf.io.gfile.listdir(root)
        if tf.io.gfile.isdir(os.path.join(root, d))
    )
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(tf.io.gfile.listdir(os.path.join(root, name)))
        for f in files:
            if f.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(os.path.join(root, name, f))
                labels.append(label)
    if not paths:
        raise ValueError(
            f"No images ({', '.join(IMAGE_EXTENSIONS)}) found in {root}/<class>/."
        )
    paths, labels = np.array(paths), np.array(labels, np.int32)

    def source(ids: np.ndarray, name: str) -> Source:
        def make_dataset():
            ds = tf.data.Dataset.from_tensor_slices((ids, paths[ids], labels[ids]))
            return ds.map(
                lambda i, p, y: {"image": tf.io.read_file(p), "label": y, "index": i},
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

        return Source(
            name=name,
            num_examples=len(ids),
            num_classes=len(classes),
            encoded=True,
            make_dataset=make_dataset,
            num_files=len(ids),
            shard_by_file=lambda n, i: source(ids[i::n], f"{name}[{i}::{n}]"),
        )

    return source(np.arange(len(paths), dtype=np.int64), f"folder:{root}")
