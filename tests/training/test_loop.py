"""The resumable loop: checkpoint cadence in steps and minutes, preemption signals."""

import os
import re
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from funmatch_keras.app import cli
from funmatch_keras.training import checkpoint_callback, loop
from funmatch_keras.training.checkpoint import CheckpointManager


def _model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    return model


def _data(step):
    return tf.data.Dataset.from_tensors((np.ones((2, 2)), np.ones((2, 1)))).repeat()


def _count_writes(monkeypatch):
    written = []
    original = CheckpointManager._write

    def write(self, snapshot):
        written.append(snapshot.step)
        return original(self, snapshot)

    monkeypatch.setattr(CheckpointManager, "_write", write)
    return written


def test_two_step_epochs_checkpoint_on_the_step_cadence_and_at_the_end(tmp_path, monkeypatch):
    written = _count_writes(monkeypatch)
    loop.fit_with_checkpoints(_model(), _data, checkpoint_dir=str(tmp_path), every_steps=5,
                              keep=10, steps_per_epoch=2, epochs=7, log_every_steps=1,
                              verbose=0)
    # 7 epochs of 2 steps: never at the 7 epoch ends, only at 5, 10 and the end (14).
    assert written == [5, 10, 14]


def test_checkpoints_land_on_the_log_steps(tmp_path, monkeypatch):
    written = _count_writes(monkeypatch)
    loop.fit_with_checkpoints(_model(), _data, checkpoint_dir=str(tmp_path), every_steps=5,
                              keep=10, steps_per_epoch=2, epochs=10, log_every_steps=4,
                              verbose=0)
    # Log steps 4, 8, ..., 20: the first at or past 5, 10, 15, and the end.
    assert written == [8, 12, 16, 20]


def test_checkpoint_every_minutes_with_an_injected_clock(tmp_path):
    now = [0.0]

    class Tick(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            now[0] += 25.0  # each step "takes" 25 s

    manager = CheckpointManager(str(tmp_path), keep=20)
    callback = checkpoint_callback.CheckpointCallback(manager, every_steps=1000, student=None,
                                       every_minutes=1.0, clock=lambda: now[0])
    model = _model()
    callback.student = model
    model.fit(_data(0), steps_per_epoch=2, epochs=5, verbose=0, callbacks=[Tick(), callback])
    # Checked at epoch ends (50 s apart): once 60 s have passed (steps 4, 8), and at the end.
    assert manager.all_steps() == [4, 8, 10]


def test_a_stop_request_saves_at_that_step_and_raises_preempted(tmp_path):
    class SignalAtStep(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if int(self.model.optimizer.iterations.numpy()) == 7:
                os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    # Mid-interval (logs every 5): the step in flight ends, then the save.
    with pytest.raises(loop.Preempted, match="SIGTERM at step 7 of 20.*Rerun"):
        loop.fit_with_checkpoints(_model(), _data, checkpoint_dir=str(tmp_path),
                                  every_steps=100, keep=3, steps_per_epoch=4, epochs=5,
                                  log_every_steps=5, callbacks=[SignalAtStep()], verbose=0)
    assert CheckpointManager(str(tmp_path)).all_steps() == [7]
    assert signal.getsignal(signal.SIGTERM) == before  # handlers restored


@pytest.mark.parametrize("start", [0, 3, 7])
def test_virtual_epochs_cover_exactly_the_run_from_any_start(start):
    model = _model()
    model.optimizer.build(model.trainable_variables)
    model.optimizer.iterations.assign(start)
    seen = []

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append((epoch, int(self.model.optimizer.iterations.numpy())))

    step = loop.fit_resumably(model, _data, steps_per_epoch=3, epochs=4, start_step=start,
                              log_every_steps=4, callbacks=[Record()], verbose=0)
    assert step == 12
    # Virtual epochs end on multiples of 4 and at the end (12), from wherever it starts.
    assert seen == [(e, s) for e, s in [(0, 4), (1, 8), (2, 12)] if s > start]


@pytest.mark.parametrize("start, spe, epochs, interval, headers", [
    # A resume mid-interval: Keras's own header read "Epoch 3/6" here (intervals).
    (5, 4, 3, 2, ["Epoch 2/3, step 6 of 12", "Epoch 2/3, steps 7-8 of 12",
                  "Epoch 3/3, steps 9-10 of 12", "Epoch 3/3, steps 11-12 of 12"]),
    # Intervals longer than an epoch, then a short last one: Keras said "Epoch 1/1".
    (0, 2, 5, 4, ["Epochs 1-2/5, steps 1-4 of 10", "Epochs 3-4/5, steps 5-8 of 10",
                  "Epoch 5/5, steps 9-10 of 10"]),
])
def test_progress_headers_count_the_runs_epochs_and_steps(capsys, start, spe, epochs,
                                                          interval, headers):
    model = _model()
    model.optimizer.build(model.trainable_variables)
    model.optimizer.iterations.assign(start)
    loop.fit_resumably(model, _data, steps_per_epoch=spe, epochs=epochs, start_step=start,
                       log_every_steps=interval, verbose=1)
    lines = [line for line in capsys.readouterr().out.splitlines() if "Epoch" in line]
    assert lines == headers


def test_steps_per_execution_4_logs_checkpoints_and_resumes_exactly(tmp_path):
    def compiled(per_call):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        model.compile(optimizer="adam", loss="mse", steps_per_execution=per_call)
        return model

    def data(step):
        x = np.arange(60, dtype="float32").reshape(30, 2) / 60.0
        ds = tf.data.Dataset.from_tensor_slices((x, x[:, :1] * 3.0 - 1.0)).batch(2)
        return ds.repeat().skip(step)

    logged = []

    class Log(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logged.append(int(self.model.optimizer.iterations.numpy()))

    reference = compiled(1)
    loop.fit_resumably(reference, data, steps_per_epoch=5, epochs=3, log_every_steps=4,
                       verbose=0)

    # 15 steps in calls of 4: logs at 4, 8, 12 and 15; checkpoints at 8 and 15.
    first = compiled(4)
    ckpt = str(tmp_path / "ckpt")
    loop.fit_with_checkpoints(first, data, checkpoint_dir=ckpt, every_steps=8, keep=5,
                              steps_per_epoch=5, epochs=3, log_every_steps=4,
                              callbacks=[Log()], verbose=0)
    assert logged == [4, 8, 12, 15]
    assert CheckpointManager(ckpt).all_steps() == [8, 15]
    np.testing.assert_allclose(first.get_weights()[0], reference.get_weights()[0], atol=1e-6)

    # Resume from step 8 in a fresh model: the same end.
    import shutil
    shutil.rmtree(os.path.join(ckpt, "ckpt-000000015"))
    resumed = compiled(4)
    logged.clear()
    loop.fit_with_checkpoints(resumed, data, checkpoint_dir=ckpt, every_steps=8, keep=5,
                              steps_per_epoch=5, epochs=3, log_every_steps=4,
                              callbacks=[Log()], verbose=0)
    assert logged == [12, 15]
    for a, b in zip(resumed.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_steps_per_execution_4_stops_on_nan_at_the_log_step(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse", steps_per_execution=4)
    x = np.ones((12, 2, 2), "float32")
    x[5] = np.nan  # step 6

    def data(step):
        return tf.data.Dataset.from_tensor_slices((x, x[:, :, :1])).repeat().skip(step)

    with pytest.raises(loop.TrainingError,
                       match="loss became NaN by step 8; the last good checkpoint is step 4"):
        loop.fit_with_checkpoints(model, data, checkpoint_dir=str(tmp_path), every_steps=4,
                                  keep=5, steps_per_epoch=12, epochs=1, log_every_steps=4,
                                  verbose=0)
    assert CheckpointManager(str(tmp_path)).all_steps() == [4]


def test_log_every_steps_must_be_a_multiple_of_steps_per_execution():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse", steps_per_execution=4)
    with pytest.raises(ValueError, match="multiple of the model's steps_per_execution"):
        loop.fit_resumably(model, _data, steps_per_epoch=2, epochs=3, log_every_steps=6)


RUN_ARGS = ["--config=digits:smoke=True", "--config.epochs=4", "--config.steps_per_epoch=10",
            "--config.checkpoint_every_steps=3", "--config.log_every_steps=1",
            "--config.deterministic=True",
            "--config.keep_checkpoints=20", "--verbose=0"]


def _distill(workdir):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.Popen([sys.executable, "-m", "funmatch_keras.app.cli", "distill",
                             f"--workdir={workdir}", *RUN_ARGS], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _student_weights(workdir):
    model = keras.saving.load_model(os.path.join(workdir, "student.keras"), safe_mode=True)
    return model.get_weights()


@pytest.fixture(scope="module")
def uninterrupted_weights(tmp_path_factory):
    """The student of the run below, never interrupted (shared by both signals)."""
    clean = tmp_path_factory.mktemp("clean")
    run = _distill(clean)
    out, _ = run.communicate(timeout=300)
    assert run.returncode == 0, out[-3000:]
    return _student_weights(clean)


@pytest.mark.slow
@pytest.mark.xdist_group("signals")  # one worker builds `uninterrupted_weights`
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_exits_4_and_the_rerun_resumes_exactly(tmp_path, sig,
                                                            uninterrupted_weights):
    stopped = tmp_path / "stopped"
    run = _distill(stopped)
    checkpoints = stopped / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not (checkpoints / "ckpt-000000003").exists():
        assert run.poll() is None, run.stdout.read()[-3000:]
        time.sleep(0.02)
    run.send_signal(sig)
    out, _ = run.communicate(timeout=120)
    assert run.returncode == cli.EXIT_PREEMPTED, out[-3000:]
    step = int(re.search(rf"{sig.name} at step (\d+) of 40", out).group(1))
    assert 3 <= step < 40
    assert CheckpointManager(str(checkpoints)).latest()[0] == step
    assert not (stopped / "student.keras").exists()

    out, _ = _distill(stopped).communicate(timeout=300)
    assert f"Resuming distillation from step {step} of 40" in out
    for a, b in zip(_student_weights(stopped), uninterrupted_weights, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_a_second_ctrl_c_exits_at_once(tmp_path):
    # The first SIGINT asks for a save and a stop; the handler then gives the
    # signals back, so a second Ctrl-C is Python's KeyboardInterrupt, at once.
    callback = checkpoint_callback.CheckpointCallback(
        CheckpointManager(str(tmp_path)), every_steps=100, student=None)
    # Python's own handler, as in `funmatch` (a pytest-xdist worker ignores SIGINT).
    runner = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with checkpoint_callback.stop_on_signals(callback):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)  # the handler runs between bytecodes
                assert callback.stop_requested == "SIGINT"
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, runner)
