"""Seeded example streams: stateless shuffling by epoch, and corrupt-image skipping.

`example_stream` yields a `Source`'s still-encoded examples, each epoch in an
order drawn from `(seed, epoch)` alone, from any offset (an exact resume).
`try_map` and `skip_corrupt` apply a per-example function that may fail (a
corrupt image) and drop the failures, counting them. `stream_key` and `fold_in`
derive independent stateless seeds from one user seed.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import tensorflow as tf
from absl import logging

from funmatch_keras.data.sources import Source

AUTOTUNE = tf.data.AUTOTUNE
# Independent streams of randomness derived from the one user seed.
EXAMPLE_STREAM, MIXUP_STREAM, SHUFFLE_STREAM = 0, 1, 2


def stream_key(seed: int, stream: int) -> tf.Tensor:
    """The stateless seed of one stream of randomness (`*_STREAM`) of `seed`.

    Example:
    >>> stream_key(7, MIXUP_STREAM).numpy()
    array([7, 1])
    """
    return tf.constant([seed, stream], tf.int64)


def fold_in(key: tf.Tensor, *data: tf.Tensor) -> tf.Tensor:
    """A new stateless seed from `key` and each of `data` (e.g. epoch, index).

    Example:
    >>> key = stream_key(0, EXAMPLE_STREAM)
    >>> bool((fold_in(key, 1, 2).numpy() == fold_in(key, 1, 2).numpy()).all())
    True
    """
    for d in data:
        key = tf.random.experimental.stateless_fold_in(key, tf.cast(d, tf.int64))
    return key


def example_stream(
    source: Source, seed: int, epochs: int | None, shuffle_buffer: int, offset: int = 0
) -> tf.data.Dataset:
    """Shuffled, still-encoded examples with their `"epoch"`, from the `offset`-th on.

    Each epoch permutes consecutive blocks of `shuffle_buffer` examples (the whole
    epoch when it fits) by stateless random keys of `(seed, epoch, block)`. Unlike
    `Dataset.shuffle`, this does not depend on TF's global seed, and a resumed
    run starts at its epoch instead of replaying all earlier ones.

    Example:
    >>> from funmatch_keras.data.sources import array_source
    >>> src = array_source(np.zeros([4, 2, 2], np.uint8), np.arange(4))
    >>> sorted(int(ex["index"]) for ex in example_stream(src, 0, 1, 100))
    [0, 1, 2, 3]
    """
    first_epoch, skip = divmod(offset, source.num_examples)
    shuffle_key = stream_key(seed, SHUFFLE_STREAM)
    examples = source.dataset()

    def one_epoch(epoch):
        def permute(block_index, block):
            block_seed = fold_in(shuffle_key, epoch, block_index)
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


def try_map(ds: tf.data.Dataset, fn: Callable, deterministic: bool = True
            ) -> tf.data.Dataset:
    """Maps `fn` in parallel; yields `{"value": fn(x), "ok": True}`, or zeros and
    `ok=False` where `fn` fails (a corrupt image), one output per input.

    Example:
    >>> ds = tf.data.Dataset.from_tensor_slices([b"1", b"x", b"3"])
    >>> [bool(e["ok"]) for e in try_map(ds, tf.strings.to_number)]
    [True, False, True]
    """
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


def skip_corrupt(
    ds: tf.data.Dataset, source: Source, first_epoch_done: int = 0,
    keep_positions: bool = False,
) -> tf.data.Dataset:
    """Drops failed elements of `try_map`, logging their number once per epoch.

    An epoch ends after `source.num_examples` elements (`first_epoch_done` of
    the first epoch were skipped when resuming). A whole epoch where every image
    failed raises (the rest of a resumed one may fail: its places are filled
    from the next epoch).

    With `keep_positions`, each skipped example's place is taken by a copy of
    the next good one, so the k-th element out is always the k-th in: a run
    resumed at step s (which skips `s * batch_size` still-encoded examples)
    continues exactly where the killed run was, however many images are corrupt.

    Example:
    >>> from funmatch_keras.data.sources import array_source
    >>> src = array_source(np.zeros([3, 2, 2], np.uint8), np.arange(3))
    >>> ds = try_map(tf.data.Dataset.from_tensor_slices([b"1", b"x", b"3"]),
    ...              tf.strings.to_number)
    >>> [float(v) for v in skip_corrupt(ds, src)]
    [1.0, 3.0]
    >>> [float(v) for v in skip_corrupt(ds, src, keep_positions=True)]
    [1.0, 3.0, 3.0]
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
            tf.logical_not(tf.logical_and(epoch_end, tf.equal(bad, n))),
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
