"""Sources read from files: TFRecord shards and image folders, sharded by file.

Both yield encoded images (`Source.encoded`), and `Source.shard` splits them by
file, so each input pipeline of a multi-worker run reads only its own files.
Example indices number the examples in sorted file order, whatever the read
order or sharding.
"""

from __future__ import annotations

import hashlib
import os
import re

import numpy as np
import tensorflow as tf

from funmatch_keras.data.sources import Source, check_num_classes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_MAX_LISTED = 20


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

    Raises:
        ValueError: no files match; they hold no records; a file is truncated
            or corrupt (the error names it); or the first record has no
            `image_key` bytes / `label_key` int64 feature (the error lists the
            keys it has).

    Example:
    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "train-00000")
    >>> feature = {
    ...     "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(
    ...         value=[tf.io.encode_png(tf.zeros([4, 4, 3], tf.uint8)).numpy()])),
    ...     "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[1]))}
    >>> with tf.io.TFRecordWriter(path) as writer:
    ...     writer.write(tf.train.Example(features=tf.train.Features(
    ...         feature=feature)).SerializeToString())
    >>> src = tfrecord_source(path, image_key="image/encoded",
    ...                       label_key="image/class/label")
    >>> src.num_examples, src.num_classes
    (1, 2)
    >>> tfrecord_source(path)  # the default keys: the error lists the keys found
    Traceback (most recent call last):
    ...
    ValueError: The records of '...' have no feature 'image', ... Keys found: ...
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
    try:
        counts = np.fromiter(counts.as_numpy_iterator(), np.int64, len(files))
    except tf.errors.OpError as error:  # DataLossError: truncated or corrupt
        raise _unreadable_file(files, pattern, error) from error
    if counts.sum() == 0:
        raise ValueError(f"The TFRecord files matching {pattern!r} hold no records.")
    _check_features(files[int(np.flatnonzero(counts)[0])], image_key, label_key)
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
        check_num_classes(num_classes, f"The labels of {pattern!r} (largest "
                          f"{int(max_label)}) have", "pass num_classes=<the task's number "
                          "of classes> when these records hold only some of them, else "
                          "records of at least 2 classes")
    else:
        check_num_classes(num_classes, "num_classes says the task has",
                          "pass the task's number of classes")

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
            make_fingerprint=lambda: files_fingerprint([files[i] for i in file_ids]),
        )

    return source(np.arange(len(files)), f"tfrecord:{pattern}")


def files_fingerprint(paths, root: str = "") -> str:
    """A digest of the files' paths (relative to `root`), sizes and modification times.

    In order: moving, adding, removing or rewriting a file changes it (one
    `stat` a file; the same files under another `root` give the same digest).

    Example:
    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> with open(os.path.join(root, "a.jpg"), "wb") as f:
    ...     _ = f.write(b"x")
    >>> before = files_fingerprint([os.path.join(root, "a.jpg")], root)
    >>> os.makedirs(os.path.join(root, "b"))
    >>> os.rename(os.path.join(root, "a.jpg"), os.path.join(root, "b", "a.jpg"))
    >>> before == files_fingerprint([os.path.join(root, "b", "a.jpg")], root)
    False
    """
    digest = hashlib.sha256()
    for path in paths:
        stat = tf.io.gfile.stat(path)
        name = os.path.relpath(path, root) if root else path
        digest.update(f"{name}\0{stat.length}\0{stat.mtime_nsec}\n".encode())
    return digest.hexdigest()


def _op_message(error: tf.errors.OpError) -> str:
    """The reason of a TensorFlow error, without its function and iterator prefixes."""
    message = re.sub(r"\{\{[^}]*\}\}|\[Op:\w+\]( name:)?", "", error.message)
    return re.sub(r"^.*Iterator::[\w:]+: ", "", message, flags=re.S).strip()


def _unreadable_file(files: list[str], pattern: str, error: tf.errors.OpError
                     ) -> ValueError:
    """The error naming the first TFRecord file of `files` that cannot be read."""
    for path in files:  # one by one: the parallel pass does not say which failed
        try:
            tf.data.TFRecordDataset(path).reduce(np.int64(0), lambda n, _: n + 1)
        except tf.errors.OpError as file_error:
            return ValueError(
                f"The TFRecord file {path!r} is truncated or corrupt "
                f"({_op_message(file_error)}): re-create or re-download it, or leave "
                f"it out of the pattern {pattern!r}. (Compressed files, e.g. GZIP, "
                "are not read: decompress them.)")
    return ValueError(f"Reading the TFRecord files matching {pattern!r} failed: "
                      f"{_op_message(error)}")


def _check_features(path: str, image_key: str, label_key: str) -> None:
    """Checks the first record of `path` has the image (bytes) and label (int64)."""
    from google.protobuf.message import DecodeError

    record = next(iter(tf.data.TFRecordDataset(path).take(1))).numpy()
    try:
        example = tf.train.Example.FromString(record)
    except DecodeError as error:
        raise ValueError(
            f"The first record of {path!r} is not a tf.train.Example ({error}): "
            "tfrecord_source reads Examples with an encoded image and an int64 "
            "label.") from None
    kinds = {key: example.features.feature[key].WhichOneof("kind")
             for key in sorted(example.features.feature)}
    names = {"bytes_list": "bytes", "int64_list": "int64", "float_list": "float",
             None: "empty"}
    listed = ", ".join(f"{key!r} ({names[kind]})"
                       for key, kind in list(kinds.items())[:_MAX_LISTED])
    if len(kinds) > _MAX_LISTED:
        listed += f", ... ({len(kinds)} in all)"
    problems = []
    for key, kind, arg, role in ((image_key, "bytes_list", "image_key", "the encoded image"),
                                 (label_key, "int64_list", "label_key", "the class index")):
        if kinds.get(key) == kind:
            continue
        candidates = [k for k, found in kinds.items() if found == kind]
        def a(kind):
            return ("an " if names[kind][0] in "aeiou" else "a ") + names[kind]

        what = (f"no feature {key!r}" if key not in kinds else
                f"{key!r} as {a(kinds[key])} feature")
        problems.append(
            f"{what}, but {role} must be {a(kind)} feature: pass {arg}=<its key>"
            + (f" ({names[kind]} features: {', '.join(map(repr, candidates))})"
               if candidates else ""))
    if problems:
        raise ValueError(
            f"The records of {path!r} have " + "; and ".join(problems)
            + f". Keys found: {listed or 'none'}.")


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
    layout = (f"one sub-folder per class holding its images, e.g. {root}/<class_name>/"
              f"1.jpg ({', '.join(IMAGE_EXTENSIONS)})")
    if not tf.io.gfile.exists(root):
        raise ValueError(f"Image folder {root!r} does not exist.")
    if not tf.io.gfile.isdir(root):
        raise ValueError(
            f"{root!r} is a file, not a folder: pass the folder above the class folders, "
            f"which holds {layout}.")
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
    check_num_classes(len(classes), f"The image folder {root!r} ({', '.join(classes)}) has",
                      f"it must hold {layout}, at least 2 class folders")
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
            make_fingerprint=lambda: files_fingerprint(paths[ids], root),
        )

    return source(np.arange(len(paths), dtype=np.int64), f"folder:{root}")
