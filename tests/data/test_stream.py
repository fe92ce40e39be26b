"""Seeded example streams: per-epoch permutations, offsets, corrupt-element skipping."""

import logging

import numpy as np
import pytest
import tensorflow as tf

from funmatch_keras.data import sources, stream


def _indices_and_epochs(ds):
    return [(int(ex["epoch"]), int(ex["index"])) for ex in ds]


@pytest.mark.parametrize("shuffle_buffer", [3, 100])
def test_example_stream_permutes_each_epoch_and_resumes_at_an_offset(shuffle_buffer, imgs):
    src = sources.array_source(imgs.arrays(7, 4, 4), np.arange(7) % 2)
    run = _indices_and_epochs(stream.example_stream(src, 5, 3, shuffle_buffer))
    assert [e for e, _ in run] == [0] * 7 + [1] * 7 + [2] * 7
    orders = [[i for e, i in run if e == epoch] for epoch in range(3)]
    assert all(sorted(order) == list(range(7)) for order in orders)
    assert orders[0] != orders[1]  # reshuffled
    if shuffle_buffer == 3:  # blocks of 3 examples are permuted within themselves
        assert sorted(orders[0][:3]) == [0, 1, 2] and sorted(orders[0][3:6]) == [3, 4, 5]
    for offset in (1, 7, 10):
        resumed = stream.example_stream(src, 5, 3, shuffle_buffer, offset=offset)
        assert _indices_and_epochs(resumed) == run[offset:]
    other_seed = _indices_and_epochs(stream.example_stream(src, 6, 1, shuffle_buffer))
    assert [i for _, i in other_seed] != orders[0]


def test_fold_in_gives_distinct_reproducible_seeds():
    key = stream.stream_key(3, stream.EXAMPLE_STREAM)
    seeds = {tuple(stream.fold_in(key, e, i).numpy()) for e in range(3) for i in range(3)}
    assert len(seeds) == 9
    np.testing.assert_array_equal(stream.fold_in(key, 1, 2), stream.fold_in(key, 1, 2))
    assert tuple(stream.stream_key(3, stream.MIXUP_STREAM).numpy()) == (3, 1)


def _numbers(texts):
    """`try_map` of string -> number: entries that are not numbers fail."""
    return stream.try_map(tf.data.Dataset.from_tensor_slices(texts), tf.strings.to_number)


def test_try_map_flags_failures_one_output_per_input():
    out = [(bool(e["ok"]), float(e["value"])) for e in _numbers(["1", "x", "3", "?"])]
    assert out == [(True, 1.0), (False, 0.0), (True, 3.0), (False, 0.0)]


def test_skip_corrupt_drops_or_fills_and_logs_per_epoch(caplog, imgs):
    src = sources.array_source(imgs.arrays(4, 2, 2), np.arange(4))  # epochs of 4 elements
    two_epochs = ["1", "x", "y", "4", "5", "6", "7", "z"]
    with caplog.at_level(logging.WARNING):
        kept = [float(v) for v in stream.skip_corrupt(_numbers(two_epochs), src)]
    assert kept == [1.0, 4.0, 5.0, 6.0, 7.0]
    assert caplog.text.count("Skipped 2 of 4 examples") == 1
    assert caplog.text.count("Skipped 1 of 4 examples") == 1
    # Places kept: each good element also fills the failed places before it.
    filled = stream.skip_corrupt(_numbers(two_epochs), src, keep_positions=True)
    assert [float(v) for v in filled] == [1.0, 4.0, 4.0, 4.0, 5.0, 6.0, 7.0]
    # Resumed 3 elements into an epoch: it ends after 1 more, here a failed one,
    # which is not an epoch of failures: its place goes to the next epoch's first.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        resumed = stream.skip_corrupt(_numbers(["x", "1", "2", "3", "4"]), src,
                                      first_epoch_done=3, keep_positions=True)
        assert [float(v) for v in resumed] == [1.0, 1.0, 2.0, 3.0, 4.0]
    assert "Skipped 1 of 1 examples" in caplog.text


def test_skip_corrupt_raises_when_a_whole_epoch_fails(imgs):
    src = sources.array_source(imgs.arrays(2, 2, 2), np.arange(2))
    with pytest.raises(tf.errors.InvalidArgumentError, match="failed to decode"):
        list(stream.skip_corrupt(_numbers(["1", "2", "x", "y"]), src))
