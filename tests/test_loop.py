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

from funmatch_keras import cli, loop
from funmatch_keras.checkpoint import CheckpointManager


def _model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    return model


def _data(step):
    return tf.data.Dataset.from_tensors((np.ones((2, 2)), np.ones((2, 1)))).repeat()


def _count_saves(monkeypatch):
    saved = []
    original = CheckpointManager.save

    def save(self, step, *args, **kwargs):
        saved.append(int(step))
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(CheckpointManager, "save", save)
    return saved


def test_two_step_epochs_checkpoint_on_the_step_cadence_and_at_the_end(tmp_path, monkeypatch):
    saved = _count_saves(monkeypatch)
    loop.fit_with_checkpoints(_model(), _data, checkpoint_dir=str(tmp_path), every_steps=5,
                              keep=10, steps_per_epoch=2, epochs=7, verbose=0)
    # 7 epochs of 2 steps: never at the 7 epoch ends, only at 5, 10 and the end (14).
    assert saved == [5, 10, 14]


def test_checkpoint_every_minutes_with_an_injected_clock(tmp_path):
    now = [0.0]

    class Tick(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            now[0] += 25.0  # each step "takes" 25 s

    manager = CheckpointManager(str(tmp_path), keep=20)
    callback = loop.CheckpointCallback(manager, every_steps=1000, student=None,
                                       every_minutes=1.0, clock=lambda: now[0])
    model = _model()
    callback.student = model
    model.fit(_data(0), steps_per_epoch=2, epochs=5, verbose=0, callbacks=[Tick(), callback])
    # A save once 60 s have passed since the last one (steps 3, 6, 9), and at the end.
    assert manager.all_steps() == [3, 6, 9, 10]


def test_a_stop_request_saves_at_that_step_and_raises_preempted(tmp_path):
    class SignalAtStep(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if int(self.model.optimizer.iterations.numpy()) == 7:
                os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    # Sent after the checkpoint callback saw step 7: the save is at the next step end.
    with pytest.raises(loop.Preempted, match="SIGTERM at step 8 of 20.*Rerun"):
        loop.fit_with_checkpoints(_model(), _data, checkpoint_dir=str(tmp_path),
                                  every_steps=100, keep=3, steps_per_epoch=4, epochs=5,
                                  callbacks=[SignalAtStep()], verbose=0)
    assert CheckpointManager(str(tmp_path)).all_steps() == [8]
    assert signal.getsignal(signal.SIGTERM) == before  # handlers restored


RUN_ARGS = ["--config=digits:smoke=True", "--config.epochs=4", "--config.steps_per_epoch=10",
            "--config.checkpoint_every_steps=3", "--config.deterministic=True",
            "--config.keep_checkpoints=20", "--verbose=0"]


def _distill(workdir):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.Popen([sys.executable, "-m", "funmatch_keras.cli", "distill",
                             f"--workdir={workdir}", *RUN_ARGS], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _student_weights(workdir):
    model = keras.saving.load_model(os.path.join(workdir, "student.keras"), safe_mode=True)
    return model.get_weights()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_exits_4_and_the_rerun_resumes_exactly(tmp_path, sig):
    stopped, clean = tmp_path / "stopped", tmp_path / "clean"
    uninterrupted = _distill(clean)
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
    out_clean, _ = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, out_clean[-3000:]
    for a, b in zip(_student_weights(stopped), _student_weights(clean), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
