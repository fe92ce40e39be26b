import json
import logging
import os
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
from funmatch_keras.data.teacher_store import StoreMismatchError, TeacherStore
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


@pytest.fixture
def teacher_file(tmp_path):
    keras.utils.set_random_seed(7)
    path = str(tmp_path / "teacher.keras")
    models.build("cnn:32,64,128", 10, 16).save(path)
    return path


def _student(workdir):
    return keras.saving.load_model(os.path.join(workdir, "student.keras"),
                                   safe_mode=True).get_weights()


def _max_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


@pytest.mark.slow
def test_a_replayed_run_ends_where_a_live_run_ends(tmp_path, teacher_file):
    """32 steps of function matching: live, live again, recorded, replayed."""
    live = _config(teacher_file)
    train.run(live, str(tmp_path / "live"), verbose=0)
    train.run(live, str(tmp_path / "live_again"), verbose=0)
    store = str(tmp_path / "store")
    recorded = _config(teacher_file, teacher_store=store)
    train.run(recorded, str(tmp_path / "recorded"), verbose=0)
    meta = teacher_store_run.recorded_meta(store)
    assert meta["fingerprint"]["mode"] == "function_matching"
    # Another temperature and lr replay the same logits: no training step runs the teacher.
    steps = []
    original = Distiller.compute_loss

    def spy(self, x=None, *args, training=True, **kwargs):
        if training:
            steps.append(isinstance(x, dict) and "teacher_logits" in x)
        return original(self, x, *args, training=training, **kwargs)

    Distiller.compute_loss = spy
    try:
        replayed = _config(teacher_file, teacher_store=store)
        train.run(replayed, str(tmp_path / "replayed"), verbose=0)
        train.run(_config(teacher_file, teacher_store=store, temperature="5.0", lr="0.003"),
                  str(tmp_path / "other_t"), verbose=0)
    finally:
        Distiller.compute_loss = original
    assert steps and all(steps)
    rerun = _max_diff(_student(tmp_path / "live"), _student(tmp_path / "live_again"))
    for name in ("recorded", "replayed"):
        diff = _max_diff(_student(tmp_path / "live"), _student(tmp_path / name))
        assert diff <= rerun, (name, diff, rerun)
    assert _max_diff(_student(tmp_path / "live"), _student(tmp_path / "other_t")) > 0
    # A different seed is refused, naming it.
    with pytest.raises(StoreMismatchError, match="seed: 0 -> 1"):
        train.run(_config(teacher_file, teacher_store=store, seed="1"),
                  str(tmp_path / "other_seed"), verbose=0)


@pytest.mark.slow
def test_mirrored_strategy_replays_what_it_recorded(tmp_path, teacher_file, two_cpu_strategy):
    """Two replicas: the store holds global batches, each replica replays its half.

    The store is filled on one device over the global batch, while a live
    mirrored step runs the teacher on each replica's half: equal up to float32
    summation order, so the bound is the single-device test's rerun level or 1e-6.
    """
    def run(name, **overrides):
        config = _config(teacher_file, epochs="2", steps_per_epoch="4", **overrides)
        train.run(config, str(tmp_path / name), verbose=0, strategy=two_cpu_strategy)
        return _student(tmp_path / name)

    live = run("live")
    store = str(tmp_path / "store")
    steps = []
    original = Distiller.compute_loss

    def spy(self, x=None, *args, training=True, **kwargs):
        if training:
            steps.append(isinstance(x, dict) and "teacher_logits" in x)
        return original(self, x, *args, training=training, **kwargs)

    Distiller.compute_loss = spy
    try:  # fills the store with a teacher-only pass, then trains on it
        replayed = run("replayed", teacher_store=store)
    finally:
        Distiller.compute_loss = original
    assert steps and all(steps)  # no replica ran the teacher in a training step
    meta = teacher_store_run.recorded_meta(store)
    assert meta["batch_size"] == 16 and len(list((tmp_path / "store").glob("*.npy"))) == 1
    assert np.load(next((tmp_path / "store").glob("*.npy"))).shape == (8, 16, 10)
    diff = _max_diff(live, replayed)
    print(f"replayed vs live under MirroredStrategy: max |dw| {diff}")
    assert diff <= 1e-6, diff
