import json
import logging
import math
import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from funmatch_keras import configs, models
from funmatch_keras.app import distill as train
from funmatch_keras.app import teacher_store as teacher_store_run
from funmatch_keras.data import pipelines as data
from funmatch_keras.data import sources
from funmatch_keras.data import teacher_store as teacher_store_module
from funmatch_keras.data.teacher_store import (
    StoreMismatchError,
    StoreRecorder,
    TeacherStore,
    decode_logits,
    encode_logits,
)
from funmatch_keras.distiller import Distiller


def _store(path, **kwargs):
    kwargs = {"num_classes": 3, "batch_size": 2, "steps_per_chunk": 4, **kwargs}
    return TeacherStore.open(str(path), {"seed": 0, "mode": "consistent"}, **kwargs)


def _logits(rows, seed=0):
    return np.random.default_rng(seed).normal(size=[rows, 2, 3]).astype(np.float32)


def test_chunks_read_back_bit_for_bit_and_short_ones_count_as_missing(tmp_path):
    store = _store(tmp_path)
    store.write_chunk(0, _logits(4))
    store.write_chunk(1, _logits(2, seed=1))  # a run of 6 steps ends mid-chunk
    np.testing.assert_array_equal(store.read_chunk(0), _logits(4))
    assert store.missing(0, 6) == []
    # A longer run needs all of chunk 1 and chunk 2: the store extends.
    assert store.missing(0, 10) == [1, 2]
    assert list(store.chunks(3, 9)) == [0, 1, 2]


def test_a_damaged_chunk_is_never_read_and_is_deleted_with_a_warning(tmp_path, caplog):
    store = _store(tmp_path)
    store.write_chunk(0, _logits(4))
    [path] = tmp_path.glob("*.npy")
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1  # one flipped bit in the last logit
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING):
        assert store.read_chunk(0) is None
    assert "damaged" in caplog.text and not path.exists()
    # A truncated one too.
    store.write_chunk(0, _logits(4))
    [path] = tmp_path.glob("*.npy")
    path.write_bytes(path.read_bytes()[:100])
    assert store.missing(0, 4) == [0]


def test_what_a_store_holds_is_read_from_names_and_headers_and_bytes_when_replayed(
        tmp_path, monkeypatch, caplog):
    """A run's start reads no logits (ImageNet's float32 store is 6 TB): `missing`
    looks at names and `.npy` headers; a chunk altered in place is found when read."""
    store = _store(tmp_path)
    store.write_chunk(0, _logits(4))
    store.write_chunk(1, _logits(2, seed=1))
    [path] = tmp_path.glob("chunk-0000000-*.npy")
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1  # one flipped bit in the last logit: header and size intact
    path.write_bytes(bytes(raw))

    def no_reading(*args):
        raise AssertionError("missing() read a chunk's logits")

    with monkeypatch.context() as patch:
        patch.setattr(TeacherStore, "_decode", no_reading)
        assert store.missing(0, 6) == [] and store.missing(0, 8) == [1]
        assert [store.stored_rows(k) for k in range(3)] == [4, 2, 0]
    with caplog.at_level(logging.WARNING):
        assert store.read_chunk(0) is None  # found when read, then deleted
    assert "damaged" in caplog.text and not path.exists()
    assert store.missing(0, 6) == [0]
    # A header declaring another layout (same size: [4, 3, 2]) is not held either.
    store.write_chunk(2, _logits(4, seed=2))
    [mine] = tmp_path.glob("chunk-0000002-*.npy")
    mine.write_bytes(mine.read_bytes().replace(b"(4, 2, 3)", b"(4, 3, 2)", 1))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert store.stored_rows(2) == 0
    assert "damaged" in caplog.text and not mine.exists()


def test_another_fingerprint_is_refused_naming_the_fields_that_differ(tmp_path):
    _store(tmp_path)
    with pytest.raises(StoreMismatchError, match=r"seed: 0 -> 1") as error:
        TeacherStore.open(str(tmp_path), {"seed": 1, "mode": "consistent"}, num_classes=3,
                          batch_size=4)
    assert "batch_size: 2 -> 4" in str(error.value) and "mode" not in str(error.value)
    assert _store(tmp_path).meta["fingerprint"] == {"seed": 0, "mode": "consistent"}


def test_a_live_claim_is_respected_and_a_dead_ones_is_taken_over(tmp_path):
    store = _store(tmp_path)
    assert store.claim(0)
    assert not store.claim(0)  # held: a second claim is refused
    store.release(0)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          check=True, capture_output=True, text=True).stdout.strip()
    for chunk, pid in ((1, os.getppid()), (2, int(dead))):
        with open(os.path.join(tmp_path, f"chunk-{chunk:07d}.claim"), "w") as f:
            json.dump({"pid": pid, "host": __import__("socket").gethostname()}, f)
    assert not store.claim(1)  # a live process (our parent) holds it
    assert store.claim(2)  # its process is gone


def test_fill_computes_what_is_missing_and_replay_feeds_it_step_by_step(tmp_path):
    store = _store(tmp_path)
    calls = []

    def make_dataset(step):
        calls.append(step)
        return tf.data.Dataset.range(step, 1000).map(
            lambda s: tf.fill([2, 3], tf.cast(s, tf.float32)))

    def teacher(batch):
        return batch * 10.0

    assert store.fill(teacher, make_dataset, 0, 6) == 2
    assert store.fill(teacher, make_dataset, 0, 6) == 0  # nothing recomputed
    assert calls == [0]  # contiguous chunks share one pass over the pipeline
    replayed = list(store.replay(make_dataset(5), 5, 6))  # resumed at step 5
    assert len(replayed) == 1
    np.testing.assert_array_equal(replayed[0]["teacher_logits"], np.full([2, 3], 50.0))
    np.testing.assert_array_equal(replayed[0]["student"], np.full([2, 3], 5.0))


def _recording_run(store, start_step=0, end_step=10):
    """A Dense teacher and student, 2 steps per call of the training function, from
    `start_step` to `end_step` (batches of 2), recorded into `store`; returns each
    step's batch."""
    keras.utils.set_random_seed(0)
    teacher = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    distiller = Distiller(teacher, keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]))
    distiller.compile(optimizer="sgd", steps_per_execution=2)
    distiller.optimizer.build(distiller.student.trainable_variables)
    distiller.optimizer.iterations.assign(start_step)  # as a restored checkpoint sets it
    x = np.random.default_rng(1).normal(size=[end_step, 2, 4]).astype(np.float32)
    recorder = StoreRecorder(store, distiller, end_step)
    ds = tf.data.Dataset.from_tensor_slices(x[start_step:])
    distiller.fit(ds, epochs=1, steps_per_epoch=end_step - start_step, verbose=0,
                  shuffle=False, callbacks=[recorder])
    recorder.close()
    return teacher, x


def test_a_live_run_records_whole_chunks_as_the_loss_saw_them(tmp_path):
    store = _store(tmp_path / "store")
    # Chunk 1 (steps 4-7) is being computed by another live process (the parent).
    (tmp_path / "store" / "chunk-0000001.claim").write_text(
        json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    teacher, x = _recording_run(store)
    expected = teacher.predict(x.reshape(-1, 4), verbose=0).reshape(10, 2, 3)
    np.testing.assert_allclose(store.read_chunk(0), expected[0:4], rtol=1e-6, atol=1e-6)
    assert store.read_chunk(1) is None  # left to the process that claims it
    np.testing.assert_allclose(store.read_chunk(2), expected[8:10], rtol=1e-6, atol=1e-6)
    assert sorted(n for n in os.listdir(store.directory) if n.endswith(".claim")) == [
        "chunk-0000001.claim"]  # its own claims released


def test_a_run_resumed_mid_chunk_records_from_the_next_chunk(tmp_path):
    store = _store(tmp_path / "store")
    teacher, x = _recording_run(store, start_step=5)  # steps 5-9: chunk 1 lacks 4
    assert store.missing(0, 10) == [0, 1]
    expected = teacher.predict(x[8:].reshape(-1, 4), verbose=0).reshape(2, 2, 3)
    np.testing.assert_allclose(store.read_chunk(2), expected, rtol=1e-6, atol=1e-6)


def test_a_replay_of_other_batches_than_the_recorded_ones_is_refused(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, [40, 12, 12, 3], dtype=np.uint8)
    source = sources.array_source(images, np.arange(40) % 3)
    teacher = models.build("cnn:8", 3, 12)
    distiller = Distiller(teacher, models.build("cnn:4", 3, 12))

    def batches(seed):
        return data.train_pipeline(source, batch_size=2, student_size=12, seed=seed)

    for encoding in ("float32", "top1"):
        store = _store(tmp_path / encoding, encoding=encoding)
        store.fill(distiller.teacher_logits, lambda step: batches(0).skip(step), 0, 4)
        replayed = store.replay(batches(0).skip(1), 1, 4, check_with=distiller.teacher_logits)
        assert len(list(replayed)) == 3
        with pytest.raises(StoreMismatchError, match="at step 1 differ .* seed the shuffle"):
            store.replay(batches(1).skip(1), 1, 4, check_with=distiller.teacher_logits)


def test_replay_recomputes_a_chunk_damaged_after_the_fill(tmp_path):
    store = _store(tmp_path)

    def make_dataset(step):
        return tf.data.Dataset.range(step, 1000).map(
            lambda s: tf.fill([2, 3], tf.cast(s, tf.float32)))

    store.fill(lambda b: b + 1.0, make_dataset, 0, 8)
    for path in tmp_path.glob("chunk-0000001-*"):
        path.write_bytes(b"garbage")
    redone = []

    def recompute(chunk):
        redone.append(chunk)
        store.fill(lambda b: b + 1.0, make_dataset, 4 * chunk, 4 * chunk + 4)

    steps = [float(b["teacher_logits"][0, 0]) for b in
             store.replay(make_dataset(0), 0, 8, recompute)]
    assert steps == [s + 1.0 for s in range(8)] and redone == [1]


def _round_trip(logits, encoding):
    return decode_logits(encode_logits(logits, encoding), encoding, logits.shape[-1])


def _spread_logits(shape, seed=0):
    """Logits over many binades (1e-4 to 1e3), both signs, plus zeros."""
    rng = np.random.default_rng(seed)
    values = rng.choice([-1.0, 1.0], shape) * 10.0 ** rng.uniform(-4, 3, shape)
    values.flat[:3] = [0.0, -0.0, 1.0]
    return values.astype(np.float32)


def test_float32_encoding_is_bit_exact_through_a_store(tmp_path):
    logits = _spread_logits([4, 2, 3])
    store = _store(tmp_path, encoding="float32")
    store.write_chunk(0, logits)
    np.testing.assert_array_equal(store.read_chunk(0).view(np.uint32), logits.view(np.uint32))


# Rounding to nearest keeps p significant bits (the implicit one included): a
# normal x in [2^e, 2^(e+1)) is on a grid of spacing 2^(e-p+1), so its error is at
# most half of that, 2^(e-p) <= 2^-p * |x|. float16 has p = 11, bfloat16 p = 8.
# float16's subnormals (|x| < 2^-14) have a fixed spacing 2^-24: error <= 2^-25.
@pytest.mark.parametrize("encoding, p, subnormal_error", [("float16", 11, 2.0 ** -25),
                                                          ("bfloat16", 8, 0.0)])
def test_16_bit_encodings_round_within_half_an_ulp(tmp_path, encoding, p, subnormal_error):
    logits = _spread_logits([4, 2, 500])
    store = _store(tmp_path, num_classes=500, encoding=encoding)
    store.write_chunk(0, logits)
    decoded = store.read_chunk(0)
    assert decoded.dtype == np.float32 and decoded.shape == logits.shape
    error = np.abs(decoded.astype(np.float64) - logits)
    bound = 2.0 ** -p * np.abs(logits.astype(np.float64)) + subnormal_error
    assert np.all(error <= bound)
    # Rounding, not truncation: truncation errs up to twice the bound.
    normal = np.abs(logits) >= 2.0 ** -14
    assert np.max(error[normal] / np.abs(logits[normal])) > 0.9 * 2.0 ** -p


def test_bfloat16_equals_tensorflows_cast_bit_for_bit():
    f32 = np.finfo(np.float32)
    ties = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x3F807FFF, 0x3F808001],
                    np.uint32).view(np.float32)  # halfway with even / odd kept bits
    special = np.array([np.inf, -np.inf, f32.max, -f32.max, f32.tiny, f32.tiny / 3, 1e-45,
                        -0.0, 0.0, 65504.0, 3.0e38], np.float32)
    logits = np.concatenate([_spread_logits([2000]), ties, special])
    ours = _round_trip(logits, "bfloat16")
    tf_cast = tf.cast(tf.cast(logits, tf.bfloat16), tf.float32).numpy()
    np.testing.assert_array_equal(ours.view(np.uint32), tf_cast.view(np.uint32))
    nan = np.array([np.nan, -np.nan], np.float32)
    assert np.all(np.isnan(_round_trip(nan, "bfloat16")))
    # Stored as the float32's upper 16 bits, in a plain .npy.
    assert encode_logits(np.float32([1.0]), "bfloat16").tolist() == [0x3F80]


def test_float16_refuses_logits_beyond_its_range():
    with pytest.raises(ValueError, match=r"beyond float16's range.*'bfloat16' or 'float32'"):
        encode_logits(np.float32([[1.0, 7e4]]), "float16")


def test_top_k_keeps_k_logits_and_one_tail_value_on_a_hand_made_example():
    z = np.array([[3.0, -1.0, 0.5, 2.0, -2.0]], np.float32)
    decoded = _round_trip(z, "top2")
    # The others' logsumexp, spread over the 3 other classes.
    tail = math.log((math.exp(-1.0) + math.exp(0.5) + math.exp(-2.0)) / 3)
    assert decoded[0, 0] == 3.0 and decoded[0, 3] == 2.0  # exactly
    np.testing.assert_allclose(decoded[0, [1, 2, 4]], [tail] * 3, rtol=1e-6)
    # At T=1 the top-2 probabilities and the tail's total mass are the original's.
    p, q = _softmax(z, 1.0), _softmax(decoded, 1.0)
    np.testing.assert_allclose(q[0, [0, 3]], p[0, [0, 3]], rtol=1e-6)
    np.testing.assert_allclose(q[0, [1, 2, 4]].sum(), p[0, [1, 2, 4]].sum(), rtol=1e-6)
    # At T=10 the tail is an approximation (Jensen: the evened-out tail weighs more).
    p10, q10 = _softmax(z, 10.0), _softmax(decoded, 10.0)
    assert q10[0, [1, 2, 4]].sum() > p10[0, [1, 2, 4]].sum() + 1e-3
    # Kept logits in descending order, equal ones by class.
    ties = encode_logits(np.array([[0.0, 1.0, 1.0, 1.0, 3.0]], np.float32), "top3")
    assert ties[0, :4].tolist() == [3.0, 1.0, 1.0, 4.0]
    assert ties[0, 4] < ties[0, 5] and {ties[0, 4], ties[0, 5]} < {1.0, 2.0, 3.0}


def test_top_k_on_random_logits_keeps_the_top_probabilities_at_t1(tmp_path):
    logits = (3 * np.random.default_rng(1).normal(size=[4, 2, 10])).astype(np.float32)
    store = _store(tmp_path, num_classes=10, encoding="top3")
    store.write_chunk(0, logits)
    decoded = store.read_chunk(0)
    top = np.argsort(-logits, axis=-1)[..., :3]
    np.testing.assert_array_equal(np.take_along_axis(decoded, top, -1),
                                  np.take_along_axis(logits, top, -1))
    p, q = _softmax(logits, 1.0), _softmax(decoded, 1.0)
    np.testing.assert_allclose(np.take_along_axis(q, top, -1), np.take_along_axis(p, top, -1),
                               rtol=1e-5)
    tail_p = 1 - np.take_along_axis(p, top, -1).sum(-1)
    tail_q = 1 - np.take_along_axis(q, top, -1).sum(-1)
    np.testing.assert_allclose(tail_q, tail_p, rtol=1e-4, atol=1e-7)


def _softmax(logits, temperature):
    z = logits.astype(np.float64) / temperature
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("encoding", ["top0", "top3", "top10", "top-1", "topk", "top05",
                                      "float64", "bf16"])
def test_an_encoding_out_of_range_or_unknown_is_refused(tmp_path, encoding):
    in_range = encoding in ("top3", "top10")
    message = "K must be below 3" if in_range else r"Valid: 'float32'.*'top<K>'"
    with pytest.raises(ValueError, match=message):
        _store(tmp_path, encoding=encoding)
    with pytest.raises(ValueError, match=message):
        encode_logits(np.zeros([1, 3], np.float32), encoding)
    assert not (tmp_path / "store.json").exists()


def test_encoded_chunks_shrink_by_the_expected_factor(tmp_path):
    classes, batch, rows = 200, 16, 4
    logits = _spread_logits([rows, batch, classes])
    sizes = {}
    for encoding in ("float32", "float16", "bfloat16", "top5"):
        store = _store(tmp_path / encoding, num_classes=classes, batch_size=batch,
                       encoding=encoding)
        store.write_chunk(0, logits)
        [path] = (tmp_path / encoding).glob("chunk-*.npy")
        sizes[encoding] = path.stat().st_size
    # Bytes per example: 4 C, 2 C, 2 C, 4 (2K + 1); plus one .npy header each.
    per_example = {"float32": 4 * classes, "float16": 2 * classes, "bfloat16": 2 * classes,
                   "top5": 4 * 11}
    for encoding, size in sizes.items():
        assert 0 < size - rows * batch * per_example[encoding] <= 256, encoding
    assert abs(sizes["float16"] / sizes["float32"] - 0.5) < 0.01
    assert sizes["bfloat16"] == sizes["float16"]
    assert abs(sizes["top5"] / sizes["float32"] - 11 / classes) < 0.01


def test_a_float16_store_replays_the_decoded_logits(tmp_path):
    store = _store(tmp_path, encoding="float16")

    def make_dataset(step):
        return tf.data.Dataset.range(step, 1000).map(
            lambda s: tf.fill([2, 3], tf.cast(s, tf.float32)))

    store.fill(lambda batch: batch / 3.0 + 0.1, make_dataset, 0, 6)
    replayed = [b["teacher_logits"].numpy() for b in store.replay(make_dataset(0), 0, 6)]
    exact = np.stack([np.full([2, 3], s / 3.0 + 0.1, np.float32) for s in range(6)])
    np.testing.assert_array_equal(np.stack(replayed),
                                  exact.astype(np.float16).astype(np.float32))
    assert np.any(np.stack(replayed) != exact)  # float16 did round them


def test_opening_a_store_with_another_encoding_is_refused_naming_both(tmp_path):
    _store(tmp_path, encoding="bfloat16")
    with pytest.raises(StoreMismatchError, match=r"holds 'bfloat16' logits.*asks for 'top2'"
                                                 r".*teacher_store_encoding=bfloat16"):
        _store(tmp_path, encoding="top2")
    assert _store(tmp_path, encoding="bfloat16").encoding == "bfloat16"


def test_fixed_teacher_and_multi_worker_are_refused_with_the_reason():
    config = configs.load_config("digits:smoke=True")
    with config.unlocked():
        config.mode = "fixed_teacher"
    with pytest.raises(ValueError, match="fixed_teacher"):
        teacher_store_run.check_supported(config)
    config.mode = "consistent"
    with pytest.raises(ValueError, match="multi-worker"):
        teacher_store_run.check_supported(config, num_workers=2)


def test_the_teachers_crop_does_not_depend_on_the_students_size():
    """Cross-resolution: a student of another size must not move the teacher's stream."""
    source = sources.digits_source("train")

    def teacher_views(student_size):
        ds = data.train_pipeline(source, mode="function_matching", batch_size=8,
                                 student_size=student_size, teacher_size=16, seed=3,
                                 start_step=2)
        batch = next(iter(ds))
        return batch["teacher"] if isinstance(batch, dict) else batch

    np.testing.assert_array_equal(teacher_views(16), teacher_views(24))
    np.testing.assert_array_equal(teacher_views(16), teacher_views(12))


def _config(teacher_path, **overrides):
    config = configs.load_config("digits:smoke=True")
    values = {"teacher": teacher_path, "epochs": "4", "steps_per_epoch": "8",
              "checkpoint_every_steps": "16", "deterministic": "True", **overrides}
    return configs.apply_overrides(config, values)


def _saved_teacher(path, spec, size, seed):
    keras.utils.set_random_seed(seed)
    models.build(spec, 10, size).save(str(path))
    return str(path)


@pytest.fixture
def teacher_file(tmp_path):
    return _saved_teacher(tmp_path / "teacher.keras", "cnn:32,64,128", 16, seed=7)


def _student(workdir):
    return keras.saving.load_model(os.path.join(workdir, "student.keras"),
                                   safe_mode=True).get_weights()


def _max_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


@pytest.mark.slow
def test_a_replayed_run_ends_where_a_live_run_ends(tmp_path, teacher_file, monkeypatch,
                                                  traced_steps_on_stored_logits):
    """32 steps of function matching: live, live again, recorded, replayed, half of each."""
    live = _config(teacher_file)
    train.run(live, str(tmp_path / "live"), verbose=0)
    train.run(live, str(tmp_path / "live_again"), verbose=0)
    store = str(tmp_path / "store")
    recorded = _config(teacher_file, teacher_store=store)
    steps = traced_steps_on_stored_logits
    steps.clear()
    train.run(recorded, str(tmp_path / "recorded"), verbose=0)
    assert steps and not any(steps)  # the first run records its own live steps
    meta = teacher_store_run.recorded_meta(store)
    assert meta["fingerprint"]["mode"] == "function_matching"
    # Another temperature and lr replay the same logits: no training step runs the teacher.
    steps.clear()
    replayed = _config(teacher_file, teacher_store=store)
    train.run(replayed, str(tmp_path / "replayed"), verbose=0)
    train.run(_config(teacher_file, teacher_store=store, temperature="5.0", lr="0.003"),
              str(tmp_path / "other_t"), verbose=0)
    assert steps and all(steps)
    rerun = _max_diff(_student(tmp_path / "live"), _student(tmp_path / "live_again"))
    for name in ("recorded", "replayed"):
        diff = _max_diff(_student(tmp_path / "live"), _student(tmp_path / name))
        assert diff <= rerun, (name, diff, rerun)
    assert _max_diff(_student(tmp_path / "live"), _student(tmp_path / "other_t")) > 0
    # A store holding the first half (chunks of 8 steps): the run replays it, then
    # runs the rest live and records it, in the same run.
    monkeypatch.setattr(teacher_store_module, "DEFAULT_STEPS_PER_CHUNK", 8)
    half = str(tmp_path / "half")
    teacher_store_run.fill_for_config(_config(teacher_file), half, steps="0:16", verbose=0)
    steps.clear()
    train.run(_config(teacher_file, teacher_store=half), str(tmp_path / "extended"), verbose=0)
    assert True in steps and False in steps
    assert TeacherStore(half, teacher_store_run.recorded_meta(half)).missing(0, 32) == []
    diff = _max_diff(_student(tmp_path / "live"), _student(tmp_path / "extended"))
    assert diff <= rerun, ("extended", diff, rerun)
    # A different seed is refused, naming it.
    with pytest.raises(StoreMismatchError, match="seed: 0 -> 1"):
        train.run(_config(teacher_file, teacher_store=store, seed="1"),
                  str(tmp_path / "other_seed"), verbose=0)


@pytest.mark.slow
def test_mirrored_strategy_replays_what_it_recorded(tmp_path, teacher_file, two_cpu_strategy,
                                                    traced_steps_on_stored_logits):
    """Two replicas: the store holds global batches, each replica replays its half.

    The first run records each replica's logits of its half while training on
    its teacher's live logits; the second replays them and must end where the
    first did (bound: the single-device test's rerun level or 1e-6). Halves
    recorded in the wrong order would feed each replica the other's logits.
    That a recording run ends where a live run does is the single-device test's
    (`test_a_replayed_run_ends_where_a_live_run_ends`); two mirrored runs only,
    as a mirrored run on oversubscribed cores can stall for a minute in
    tracing (see the README's Development notes).
    """
    traced = traced_steps_on_stored_logits

    def run(name, **overrides):
        traced.clear()
        config = _config(teacher_file, epochs="2", steps_per_epoch="4", **overrides)
        train.run(config, str(tmp_path / name), verbose=0, strategy=two_cpu_strategy)
        return _student(tmp_path / name)

    store = tmp_path / "store"
    recorded = run("recorded", teacher_store=str(store))
    assert traced and not any(traced)  # the teacher ran in every step, and was recorded
    assert teacher_store_run.recorded_meta(str(store))["batch_size"] == 16
    [chunk] = store.glob("*.npy")
    assert np.load(chunk).shape == (8, 16, 10)
    replayed = run("replayed", teacher_store=str(store))
    assert traced and all(traced)  # no replica ran the teacher in a training step
    diff = _max_diff(recorded, replayed)
    print(f"replayed vs recorded under MirroredStrategy: max |dw| {diff}")
    assert diff <= 1e-6, diff


@pytest.fixture
def second_teacher_file(tmp_path):  # another architecture and size, for an ensemble
    return _saved_teacher(tmp_path / "teacher2.keras", "cnn:16,32", 20, seed=8)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["consistent", "independent", "cross_resolution",
                                     "ensemble"])
def test_every_mode_replays_what_its_first_run_recorded(tmp_path, teacher_file,
                                                        second_teacher_file, variant,
                                                        traced_steps_on_stored_logits):
    """The recording run runs its teacher(s) live; the replay runs none and ends equal."""
    overrides = {"consistent": {"mode": "consistent"},
                 "independent": {"mode": "independent"},
                 "cross_resolution": {"student_size": "12", "teacher_size": "16"},
                 "ensemble": {"teacher": json.dumps([teacher_file, second_teacher_file]),
                              "teacher_size": "[16, 20]"}}[variant]
    store, steps = str(tmp_path / "store"), traced_steps_on_stored_logits
    students = []
    for name, replays in (("recorded", False), ("replayed", True)):
        steps.clear()
        config = _config(teacher_file, epochs="2", steps_per_epoch="4", teacher_store=store,
                         **overrides)
        train.run(config, str(tmp_path / name), verbose=0)
        assert steps and all(s == replays for s in steps), (name, steps)
        students.append(_student(tmp_path / name))
    assert _max_diff(*students) == 0.0


def test_the_configs_encoding_reaches_the_store_and_a_replay_takes_or_names_it(
        tmp_path, teacher_file, traced_steps_on_stored_logits):
    store = str(tmp_path / "store")
    done = teacher_store_run.fill_for_config(
        _config(teacher_file, teacher_store_encoding="top3"), store, steps="0:8", verbose=0)
    assert done["chunks_missing"] == 0
    assert teacher_store_run.recorded_meta(store)["encoding"] == "top3"
    [chunk] = [n for n in os.listdir(store) if n.endswith(".npy")]
    assert np.load(os.path.join(store, chunk), allow_pickle=False).shape == (8, 16, 7)
    with pytest.raises(StoreMismatchError, match=r"holds 'top3'.*asks for 'float32'"):
        train.run(_config(teacher_file, teacher_store=store, teacher_store_encoding="float32"),
                  str(tmp_path / "run"), verbose=0)
    # Without one, the run takes the store's and replays it. The refusal came before
    # anything was written, so the same workdir takes the corrected run.
    steps = traced_steps_on_stored_logits
    report = train.run(_config(teacher_file, teacher_store=store, epochs="1"),
                       str(tmp_path / "run"), verbose=0)
    assert report["steps"] == 8 and steps and all(steps)
