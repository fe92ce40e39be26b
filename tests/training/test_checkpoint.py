"""Tests for funmatch_keras.training.checkpoint: round trips, pruning, atomicity, NaN, resume."""

import errno
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import funmatch_keras as fm
from funmatch_keras.optim import optimizers as optim
from funmatch_keras.training import checkpoint_format, loop
from funmatch_keras.training.checkpoint import CheckpointManager
from funmatch_keras.training.checkpoint_callback import CheckpointCallback

BATCH = 4


def make_student(seed: int = 0, width: int = 3) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(6, activation="relu"), keras.layers.Dense(width)]
    )


@pytest.fixture(scope="module")
def teacher() -> keras.Model:
    keras.utils.set_random_seed(123)
    # A hidden width (7) that no student variable has, to spot teacher weights in files.
    return keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(7, activation="tanh"), keras.layers.Dense(3)]
    )


def data(num_batches: int = 4) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(num_batches * BATCH, 4)).astype("float32")


def make_distiller(teacher, student, optimizer) -> fm.Distiller:
    distiller = fm.Distiller(teacher, student, temperature=2.0)
    distiller.compile(optimizer=optimizer)
    return distiller


def adamw() -> keras.optimizers.Optimizer:
    return optim.adamw(lr=1e-2, weight_decay=1e-3, total_steps=8, warmup_steps=2)


def sgd() -> keras.optimizers.Optimizer:
    return keras.optimizers.SGD(learning_rate=0.1, momentum=0.9)


def numpy_vars(variables) -> list[np.ndarray]:
    return [keras.ops.convert_to_numpy(v) for v in variables]


def trained(teacher, epochs: int = 1, optimizer_fn=adamw):
    student = make_student()
    distiller = make_distiller(teacher, student, optimizer_fn())
    distiller.fit(data(), batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0)
    return student, distiller.optimizer


def test_save_restore_round_trip_without_teacher(tmp_path, teacher):
    student, optimizer = trained(teacher)
    manager = CheckpointManager(str(tmp_path))
    path = manager.save(4, student, optimizer, {"config": "digits"}, epoch=1)
    assert os.path.basename(path) == "ckpt-000000004"
    assert sorted(os.listdir(path)) == ["optimizer.npz", "state.json", "student.npz"]

    fresh, fresh_optimizer = make_student(seed=7), adamw()
    state = manager.restore(fresh, fresh_optimizer)
    assert (state["step"], state["epoch"], state["metadata"]) == (4, 1, {"config": "digits"})
    for a, b in zip(numpy_vars(student.weights), numpy_vars(fresh.weights)):
        np.testing.assert_array_equal(a, b)
    assert len(fresh_optimizer.variables) == len(optimizer.variables)
    for a, b in zip(numpy_vars(optimizer.variables), numpy_vars(fresh_optimizer.variables)):
        np.testing.assert_array_equal(a, b)
    assert int(keras.ops.convert_to_numpy(fresh_optimizer.iterations)) == 4

    # The teacher is not in the checkpoint: only the student's variables are.
    with np.load(os.path.join(path, "student.npz"), allow_pickle=False) as npz:
        shapes = [npz[k].shape for k in npz.files]
    assert shapes == [tuple(w.shape) for w in student.weights]
    with np.load(os.path.join(path, "optimizer.npz"), allow_pickle=False) as npz:
        shapes += [npz[k].shape for k in npz.files]
    teacher_shapes = {tuple(w.shape) for w in teacher.weights}
    student_shapes = {tuple(w.shape) for w in student.weights}
    assert not (teacher_shapes - student_shapes) & set(shapes)
    with open(os.path.join(path, "state.json")) as f:
        state_text = f.read()
    assert all(w.path not in state_text for w in teacher.weights)


def test_keep_last_k(tmp_path):
    student = make_student()
    optimizer = sgd()
    optimizer.build(student.trainable_variables)
    manager = CheckpointManager(str(tmp_path), keep=2)
    for step in (1, 2, 3, 5, 8):
        manager.save(step, student, optimizer)
    assert manager.all_steps() == [5, 8]
    assert manager.latest() == (8, manager.path_for(8))
    assert sorted(os.listdir(tmp_path)) == ["ckpt-000000005", "ckpt-000000008"]


def test_saving_a_step_again_replaces_it(tmp_path):
    student = make_student()
    optimizer = sgd()
    optimizer.build(student.trainable_variables)
    manager = CheckpointManager(str(tmp_path))
    manager.save(3, student, optimizer, {"try": 1})
    manager.save(3, student, optimizer, {"try": 2})
    assert manager.all_steps() == [3]
    assert manager.restore(student, optimizer)["metadata"] == {"try": 2}
    assert sorted(os.listdir(tmp_path)) == ["ckpt-000000003"]


def test_crash_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    student = make_student()
    optimizer = sgd()
    optimizer.build(student.trainable_variables)
    manager = CheckpointManager(str(tmp_path))
    manager.save(2, student, optimizer)

    # A process killed mid-write leaves its temporary directory behind.
    leftover = tmp_path / ".tmp-ckpt-4-99999"
    leftover.mkdir()
    (leftover / "student.weights.h5").write_bytes(b"half written")
    assert manager.latest()[0] == 2
    restarted = CheckpointManager(str(tmp_path))
    assert not leftover.exists()
    assert restarted.all_steps() == [2]

    # An error during a save cleans its own temporary directory.
    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_format.np, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        restarted.save(4, student, optimizer)
    assert sorted(os.listdir(tmp_path)) == ["ckpt-000000002"]


def test_a_format_1_checkpoint_still_restores(tmp_path, teacher):
    student, optimizer = trained(teacher)
    path = CheckpointManager(str(tmp_path)).save(4, student, optimizer)
    # Format 1 stored the student with `save_weights` instead of student.npz.
    os.remove(os.path.join(path, "student.npz"))
    student.save_weights(os.path.join(path, "student.weights.h5"))
    fresh, fresh_optimizer = make_student(seed=7), adamw()
    assert CheckpointManager(str(tmp_path)).restore(fresh, fresh_optimizer)["step"] == 4
    for a, b in zip(numpy_vars(student.weights), numpy_vars(fresh.weights)):
        np.testing.assert_array_equal(a, b)


def test_background_save_copies_the_state_before_training_goes_on(tmp_path, monkeypatch):
    student = make_student()
    optimizer = sgd()
    optimizer.build(student.trainable_variables)
    expected = numpy_vars(student.weights)
    manager = CheckpointManager(str(tmp_path), keep=2)
    started, release = __import__("threading").Event(), __import__("threading").Event()
    original = checkpoint_format.np.savez

    def slow_savez(*args, **kwargs):
        started.set()
        release.wait(10)
        return original(*args, **kwargs)

    monkeypatch.setattr(checkpoint_format.np, "savez", slow_savez)
    manager.save(5, student, optimizer, background=True)
    assert started.wait(10)
    for w in student.weights:  # "training" changes the weights mid-write
        w.assign(np.full(w.shape, 7.0, "float32"))
    assert manager.all_steps() == []  # not visible until complete
    release.set()
    manager.wait()
    assert manager.all_steps() == [5]
    fresh = make_student(seed=9)
    manager.restore(fresh)
    for a, b in zip(expected, numpy_vars(fresh.weights)):
        np.testing.assert_array_equal(a, b)


def test_a_failed_background_write_is_raised_and_keeps_the_previous(tmp_path, monkeypatch):
    student = make_student()
    optimizer = sgd()
    optimizer.build(student.trainable_variables)
    manager = CheckpointManager(str(tmp_path))
    manager.save(2, student, optimizer)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_format.np, "savez", full)
    manager.save(4, student, optimizer, background=True)
    with pytest.raises(OSError, match="No space left"):
        manager.wait()
    assert sorted(os.listdir(tmp_path)) == ["ckpt-000000002"]
    manager.wait()  # the error is raised once


@pytest.mark.slow
def test_sigkill_mid_background_write_leaves_the_previous_checkpoint(tmp_path):
    script = textwrap.dedent(
        f"""
        import os, time
        import keras, numpy as np
        from funmatch_keras import checkpoint_format
        from funmatch_keras.training.checkpoint import CheckpointManager

        student = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        optimizer = keras.optimizers.Adam()
        optimizer.build(student.trainable_variables)
        manager = CheckpointManager({str(tmp_path)!r})
        manager.save(1, student, optimizer)
        original = checkpoint_format.np.savez

        def slow_savez(f, **arrays):
            original(f, **arrays)
            f.flush()
            print("WRITING", flush=True)
            time.sleep(60)  # killed here, half of the checkpoint on disk

        checkpoint_format.np.savez = slow_savez
        manager.save(2, student, optimizer, background=True)
        manager.wait()
        """
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    process = subprocess.Popen([sys.executable, "-c", script], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in process.stdout:
        if "WRITING" in line:
            break
    process.kill()
    process.wait(timeout=30)
    assert any(name.startswith(".tmp-ckpt-2-") for name in os.listdir(tmp_path))
    manager = CheckpointManager(str(tmp_path))  # a restart cleans the half write
    assert manager.all_steps() == [1]
    assert sorted(os.listdir(tmp_path)) == ["ckpt-000000001"]
    student = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    assert manager.restore(student, keras.optimizers.Adam())["step"] == 1


def test_restore_into_a_different_architecture_fails_clearly(tmp_path, teacher):
    student, optimizer = trained(teacher)
    manager = CheckpointManager(str(tmp_path))
    manager.save(4, student, optimizer)
    other = make_student(width=5)
    before = numpy_vars(other.weights)
    with pytest.raises(ValueError, match="different architecture"):
        manager.restore(other, adamw())
    for a, b in zip(before, numpy_vars(other.weights)):  # left untouched
        np.testing.assert_array_equal(a, b)
    deeper = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="holds 4 student variables, the model 2"):
        manager.restore(deeper)
    with pytest.raises(ValueError, match="optimizer variables"):
        manager.restore(make_student(), keras.optimizers.SGD())  # no momentum slots


def test_restore_without_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        CheckpointManager(str(tmp_path)).restore(make_student())


def test_nan_weights_refuse_to_save(tmp_path):
    student = make_student()
    optimizer = sgd()
    optimizer.build(student.trainable_variables)
    manager = CheckpointManager(str(tmp_path))
    manager.save(1, student, optimizer)
    kernel = student.layers[0].kernel
    kernel.assign(np.full(kernel.shape, np.nan, "float32"))
    with pytest.raises(ValueError, match="NaN"):
        manager.save(2, student, optimizer)
    assert manager.all_steps() == [1]
    assert sorted(os.listdir(tmp_path)) == ["ckpt-000000001"]


def test_callback_saves_every_steps_and_at_the_end_not_at_epoch_ends(tmp_path, teacher):
    student = make_student()
    distiller = make_distiller(teacher, student, adamw())
    manager = CheckpointManager(str(tmp_path), keep=10)
    callback = CheckpointCallback(
        manager, every_steps=5, student=student, get_metadata=lambda: {"run": "a"}
    )
    distiller.fit(data(), batch_size=BATCH, epochs=4, shuffle=False, verbose=0,
                  callbacks=[callback])
    # Epochs of 4 steps end at 4, 8, 12, 16: saved at the first end past 5, 10,
    # 15 (and the end), never at 4.
    assert manager.all_steps() == [8, 12, 16]
    with open(os.path.join(manager.path_for(8), "state.json")) as f:
        state = json.load(f)
    assert (state["step"], state["epoch"], state["metadata"]) == (8, 2, {"run": "a"})
    with open(os.path.join(manager.path_for(16), "state.json")) as f:
        assert json.load(f)["epoch"] == 4


def test_callback_non_chief_writes_nothing(tmp_path, teacher):
    student = make_student()
    distiller = make_distiller(teacher, student, adamw())
    manager = CheckpointManager(str(tmp_path))
    callback = CheckpointCallback(manager, every_steps=1, student=student, is_chief=False)
    distiller.fit(data(), batch_size=BATCH, epochs=1, verbose=0, callbacks=[callback])
    assert manager.all_steps() == []


def test_callback_stops_on_nan_loss_keeping_last_good(tmp_path, teacher):
    x = data(num_batches=6)
    x[4 * BATCH : 5 * BATCH] = np.nan  # the 5th batch poisons the run
    student = make_student()
    distiller = make_distiller(teacher, student, adamw())
    manager = CheckpointManager(str(tmp_path), keep=10)
    callback = CheckpointCallback(manager, every_steps=2, student=student)

    def make_dataset(step):
        return tf.data.Dataset.from_tensor_slices(x).batch(BATCH).repeat().skip(step)

    # The loss is read at the log steps (2, 4, 6): the interval ending at 6 holds the NaN.
    loop.fit_resumably(distiller, make_dataset, steps_per_epoch=6, epochs=3,
                       log_every_steps=2, callbacks=[callback], verbose=0)
    assert manager.all_steps() == [2, 4]
    assert callback.stopped_reason == (
        "loss became NaN by step 6; the last good checkpoint is step 4"
    )
    assert int(keras.ops.convert_to_numpy(distiller.optimizer.iterations)) == 6
    restored = make_student(seed=3)
    assert manager.restore(restored, adamw())["step"] == 4
    assert all(np.isfinite(w).all() for w in numpy_vars(restored.weights))


def test_callback_stops_when_weights_become_nan(tmp_path, teacher):
    student = make_student()
    distiller = make_distiller(teacher, student, adamw())
    manager = CheckpointManager(str(tmp_path))
    callback = CheckpointCallback(manager, every_steps=100, student=student)
    distiller.fit(data(), batch_size=BATCH, epochs=1, verbose=0, callbacks=[callback])
    assert manager.all_steps() == [4]
    # A loss can still be finite when an update makes weights non-finite: the
    # next save (here the one at the end of training) must refuse and stop training.
    kernel = student.layers[-1].kernel
    kernel.assign(np.full(kernel.shape, np.inf, "float32"))
    distiller.optimizer.iterations.assign(5)
    callback.on_train_end()
    assert manager.all_steps() == [4]
    assert distiller.stop_training
    assert callback.stopped_reason == (
        "weights became NaN/inf at step 5; the last good checkpoint is step 4"
    )


@pytest.mark.parametrize("optimizer_fn", [adamw, sgd], ids=["adamw", "sgd"])
def test_resume_matches_uninterrupted_training(tmp_path, teacher, optimizer_fn):
    uninterrupted, uninterrupted_opt = trained(teacher, epochs=2, optimizer_fn=optimizer_fn)

    # Train one epoch with checkpoints, "crash", then resume in fresh objects.
    student = make_student()
    manager = CheckpointManager(str(tmp_path))
    make_distiller(teacher, student, optimizer_fn()).fit(
        data(), batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
        callbacks=[CheckpointCallback(manager, every_steps=100, student=student)],
    )
    resumed, resumed_opt = make_student(seed=42), optimizer_fn()
    state = CheckpointManager(str(tmp_path)).restore(resumed, resumed_opt)
    assert (state["step"], state["epoch"]) == (4, 1)
    make_distiller(teacher, resumed, resumed_opt).fit(
        data(), batch_size=BATCH, epochs=2, initial_epoch=state["epoch"], shuffle=False,
        verbose=0,
    )
    for a, b in zip(numpy_vars(uninterrupted.weights), numpy_vars(resumed.weights)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    for a, b in zip(numpy_vars(uninterrupted_opt.variables), numpy_vars(resumed_opt.variables)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_jax_backend_round_trip(tmp_path):
    pytest.importorskip("jax")
    script = textwrap.dedent(
        f"""
        import os
        os.environ["KERAS_BACKEND"] = "jax"
        import keras, numpy as np
        import funmatch_keras as fm
        from funmatch_keras import optim
        from funmatch_keras.training.checkpoint import CheckpointManager
        from funmatch_keras.training.checkpoint_callback import CheckpointCallback

        def student(seed):
            keras.utils.set_random_seed(seed)
            return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])

        teacher = student(1)
        s = student(0)
        d = fm.Distiller(teacher, s, temperature=2.0)
        d.compile(optimizer=optim.adamw(1e-2, 1e-3, total_steps=8, warmup_steps=2))
        manager = CheckpointManager({str(tmp_path)!r}, keep=10)
        x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
        d.fit(x, batch_size=4, epochs=2, shuffle=False, verbose=0,
              callbacks=[CheckpointCallback(manager, every_steps=3, student=s)])
        assert manager.all_steps() == [4, 8], manager.all_steps()  # epoch ends past 3, 6
        fresh, opt = student(5), optim.adamw(1e-2, 1e-3, total_steps=8, warmup_steps=2)
        assert manager.restore(fresh, opt)["step"] == 8
        for a, b in zip(s.weights, fresh.weights):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(d.optimizer.variables, opt.variables):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        print("JAX OK")
        """
    )
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "JAX OK" in result.stdout


# -- damaged checkpoints and write faults ---------------------------------------


def _tiny_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    return model


def _tiny_data(step):
    return tf.data.Dataset.from_tensors((np.ones((2, 2)), np.ones((2, 1)))).repeat()


def _fit(directory, epochs):
    return loop.fit_with_checkpoints(_tiny_model(), _tiny_data, checkpoint_dir=directory,
                                     every_steps=2, keep=5, steps_per_epoch=2, epochs=epochs,
                                     verbose=0)


@pytest.mark.parametrize("damage", ["truncated npz", "broken state.json"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_that_loads(tmp_path, capsys,
                                                                         damage):
    directory = str(tmp_path)
    _fit(directory, epochs=3)  # checkpoints 2, 4, 6
    latest = os.path.join(directory, "ckpt-000000006")
    if damage == "truncated npz":
        file = os.path.join(latest, "optimizer.npz")
        with open(file, "r+b") as f:
            f.truncate(os.path.getsize(file) // 2)
    else:
        with open(os.path.join(latest, "state.json"), "w") as f:
            f.write('{"step": 6, "stud')
    capsys.readouterr()
    _fit(directory, epochs=4)
    out = capsys.readouterr().out
    assert "Skipping damaged checkpoint" in out and "ckpt-000000006" in out
    assert "Resuming training from step 4 of 8" in out
    # The damaged one is kept for inspection (then replaced by the new step 6).
    assert CheckpointManager(directory).all_steps() == [2, 4, 6, 8]


def test_when_no_checkpoint_loads_the_error_says_why_and_keeps_them(tmp_path):
    directory = str(tmp_path)
    _fit(directory, epochs=1)
    with open(os.path.join(directory, "ckpt-000000002", "state.json"), "w") as f:
        f.write("not json")
    with pytest.raises(FileNotFoundError, match="loads.*ckpt-000000002.*not valid JSON"):
        _fit(directory, epochs=2)
    assert os.path.isdir(os.path.join(directory, "ckpt-000000002"))


def test_pruning_counts_intact_checkpoints_only(tmp_path):
    student = make_student()
    optimizer = sgd()
    optimizer.build(student.trainable_variables)
    manager = CheckpointManager(str(tmp_path), keep=2)
    manager.save(2, student, optimizer)
    manager.save(4, student, optimizer)
    with open(os.path.join(manager.path_for(4), "state.json"), "w") as f:
        f.write("{broken")
    manager.save(6, student, optimizer)
    # Keeping 2 means 2 that load: step 2 survives the damaged step 4.
    assert manager.all_steps() == [2, 4, 6]
    manager.save(8, student, optimizer)
    assert manager.all_steps() == [6, 8]


class _Crash(BaseException):
    """A process dying between writing a checkpoint and renaming it into place."""


@pytest.mark.parametrize("fault", ["ENOSPC", "crash before the rename"])
def test_a_write_fault_leaves_the_newest_intact_checkpoint_to_resume_from(tmp_path, capsys,
                                                                          monkeypatch, fault):
    directory = str(tmp_path)
    _fit(directory, epochs=2)  # checkpoints 2, 4
    with monkeypatch.context() as patch:
        if fault == "ENOSPC":
            def full(*args, **kwargs):
                raise OSError(errno.ENOSPC, "No space left on device")

            patch.setattr(checkpoint_format.np, "savez", full)
            expected = pytest.raises(checkpoint_format.CheckpointWriteError,
                                     match=r"No space left.*MiB free.*rerun the same command")
        else:
            real_replace = os.replace

            def crash(source, target):
                if ".tmp-ckpt-" in str(source):
                    raise _Crash
                return real_replace(source, target)

            patch.setattr(checkpoint_format.os, "replace", crash)
            expected = pytest.raises(_Crash)
        with expected:
            _fit(directory, epochs=4)
    assert CheckpointManager(directory, clean_temp=False).all_steps() == [2, 4]
    capsys.readouterr()
    _fit(directory, epochs=4)
    assert "Resuming training from step 4 of 8" in capsys.readouterr().out
    assert sorted(os.listdir(directory)) == [f"ckpt-00000000{s}" for s in (2, 4, 6, 8)]
