"""Computing and storing fixed-teacher logits: one teacher pass, cached on disk.

The paper's "fixed teacher" baseline trains the student on the teacher's
logits for the eval view of each image, computed once. `teacher_logits`
returns them as an array for `data.train_pipeline(..., mode="fixed_teacher",
teacher_logits=...)`, and stores them in `cache_dir` under a key of the
teacher's weights, the input size and the examples (`Source.fingerprint`), so
a rerun reads them back, and neither a different teacher nor changed examples
(an image moved to another class folder) ever read stale ones.

Reference: Beyer et al., "Knowledge distillation: A good teacher is patient and
consistent", CVPR 2022 (arXiv 2106.05237), Sec. 3.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from funmatch_keras.data.sources import Source
from funmatch_keras.data.stream import AUTOTUNE, try_map
from funmatch_keras.data.views import eval_views

# Part of the cache key. Version 2: TFRecord example indices count records file
# by file. Changing the key orphans every cache already written.
_KEY_VERSION = "2"


def teacher_logits(
    source: Source,
    teacher: keras.Model,
    size: int,
    cache_dir: str,
    batch_size: int = 128,
) -> np.ndarray:
    """The teacher's logits on every example's eval view, computed once and cached.

    The cache file `<cache_dir>/teacher_logits_<key>.npy` is keyed by the
    teacher's weights, `size` and the examples (`source.fingerprint()`). Rows of
    corrupt examples are zero (they are skipped in training).

    Args:
        source: `Source`. Examples, indexed by `index`: pass the whole source,
            not a shard.
        teacher: keras model (anything with `weights`), called as
            `teacher(images, training=False)`.
        size: int. Side of the teacher's input (eval preprocessing).
        cache_dir: str. Directory for the cache file (created if missing; any
            `tf.io.gfile` path).
        batch_size: int. Teacher batch size. Defaults to 128.

    Returns:
        float32 array `[num_examples, num_teacher_outputs]`, row i = example i.

    Example:
    >>> import contextlib, io, tempfile
    >>> from funmatch_keras.data.sources import array_source
    >>> src = array_source(np.zeros([6, 8, 8, 3], np.uint8), np.arange(6) % 2)
    >>> teacher = keras.Sequential([keras.Input([8, 8, 3]),
    ...                             keras.layers.GlobalAveragePooling2D(),
    ...                             keras.layers.Dense(2)])
    >>> with contextlib.redirect_stdout(io.StringIO()):  # hides the progress bar
    ...     logits = teacher_logits(src, teacher, 8, tempfile.mkdtemp())
    >>> logits.shape
    (6, 2)
    """
    path = cache_path(source, teacher, size, cache_dir)
    if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path, "rb") as f:
            logits = np.load(f, allow_pickle=False)
        if logits.shape[0] == source.num_examples:
            logging.info("Loaded cached teacher logits from %s.", path)
            return logits
    logging.info("Computing teacher logits for %d examples of %s.",
                 source.num_examples, source.name)

    def make_view(example):
        return eval_views(example["image"], source.encoded, size), example["index"]

    ds = try_map(source.dataset(), make_view, True)
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


def cache_path(source: Source, teacher: Any, size: int, cache_dir: str) -> str:
    """Where `teacher_logits` stores the logits of `teacher` at `size` on `source`.

    Example:
    >>> from funmatch_keras.data.sources import array_source
    >>> src = array_source(np.zeros([2, 4, 4, 3], np.uint8), np.arange(2))
    >>> teacher = keras.Sequential([keras.Input([3]), keras.layers.Dense(2)])
    >>> os.path.basename(cache_path(src, teacher, 8, "/tmp/run"))  # doctest: +ELLIPSIS
    'teacher_logits_....npy'
    """
    key = _teacher_key(source, teacher, size)
    return os.path.join(cache_dir, f"teacher_logits_{key}.npy")


def _teacher_key(source: Source, teacher: Any, size: int) -> str:
    """Hash of the teacher's weights, the input size and the examples (`Source.fingerprint`)."""
    weights = getattr(teacher, "weights", None)
    if not weights:
        raise ValueError(
            "fixed_teacher caches logits under a hash of the teacher's weights, but "
            f"the teacher has none. Received: teacher={teacher!r}")
    # The fingerprint, not the name: a folder whose images moved keeps its name.
    digest = hashlib.sha256(
        f"{_KEY_VERSION}|{source.fingerprint()}|{source.num_examples}|{size}".encode())
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
