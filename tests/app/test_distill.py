import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from funmatch_keras import configs
from funmatch_keras.app import build, cli
from funmatch_keras.app import distill as train
from funmatch_keras.app import workdir as workdirs
from funmatch_keras.data import pipelines as data
from funmatch_keras.data import sources
from funmatch_keras.training import loop
from funmatch_keras.training.checkpoint import CheckpointManager


@pytest.mark.slow
def test_distill_writes_student_logs_and_an_honest_report(tmp_path, smoke_config):
    workdir = str(tmp_path / "run")
    config = smoke_config(epochs=2, steps_per_epoch=3)
    report = train.run(config, workdir, verbose=0)
    for name in ("student.keras", "report.json", "report.png", "metrics.jsonl", "config.json",
                 "teacher.keras"):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    history = workdirs.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    # Logged every step (a short run), evaluated every epoch (3 steps), in user units.
    assert [(h["step"], h["images"]) for h in history] == [(s, 16 * s) for s in range(1, 7)]
    assert [h["epoch"] for h in history] == pytest.approx([s / 3 for s in range(1, 7)], abs=1e-4)
    assert all("learning_rate" in h for h in history)
    assert [h["step"] for h in history if "val_agreement" in h] == [3, 6]
    assert report["images_per_s"] > 0 and report["epochs"] == 2
    # The report's accuracy is the saved student's, recomputed here.
    student = keras.saving.load_model(os.path.join(workdir, "student.keras"), safe_mode=True)
    test = sources.digits_source("test")
    images, labels = next(data.eval_pipeline(test, size=config.student_size,
                                             batch_size=1000).as_numpy_iterator())
    top1 = np.mean(student.predict(images, verbose=0).argmax(-1) == labels)
    assert report["student_top1"] == pytest.approx(top1, abs=1e-6)
    assert json.load(open(os.path.join(workdir, "report.json")))["steps"] == 6
    # `funmatch evaluate` reads the same workdir back.
    logs = __import__("funmatch_keras.app.evaluate", fromlist=["x"]).evaluate_workdir(workdir)
    assert logs["student_top1"] == pytest.approx(top1, abs=1e-6)


@pytest.mark.parametrize("setting,expected", [("None", False), ("False", False), ("True", True)])
def test_jit_compile_follows_the_config(tmp_path, monkeypatch, setting, expected, smoke_config):
    compiled = []
    original = keras.Model.compile

    def spy(self, *args, **kwargs):
        compiled.append((type(self).__name__, kwargs.get("jit_compile")))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "compile", spy)
    config = configs.apply_overrides(smoke_config(epochs=1, steps_per_epoch=1),
                                     {"jit_compile": setting})
    report = train.run(config, str(tmp_path / "run"), verbose=0)
    assert report["images_per_s"] > 0  # a run of one step still reports its speed
    # The teacher is trained with labels first, then the Distiller; None means
    # Keras's "auto" (no XLA on this CPU) for a run too short to time the paths.
    assert [name for name, _ in compiled][-1] == "Distiller" and len(compiled) >= 2
    assert {jit for _, jit in compiled} == {expected}, compiled


class _Killed(Exception):
    """Stands in for a kill right after a checkpoint was written."""


@pytest.mark.slow
def test_teacher_training_inside_distill_resumes_after_a_kill(tmp_path, monkeypatch, capsys,
                                                              smoke_config):
    from funmatch_keras.training.checkpoint_callback import CheckpointCallback

    config = smoke_config(epochs=1, steps_per_epoch=1, checkpoint_every_steps=2,
                          log_every_steps=1, deterministic=True)
    teacher_steps = sources.digits_source("train").num_examples // config.batch_size
    original_save = CheckpointCallback._save

    def save_then_die(self, epoch):
        original_save(self, epoch)
        if self.last_saved_step == 4:
            raise _Killed

    with monkeypatch.context() as patch:
        patch.setattr(CheckpointCallback, "_save", save_then_die)
        with pytest.raises(_Killed):
            train.run(config, str(tmp_path / "killed"), verbose=0)
    assert not os.path.exists(tmp_path / "killed" / "teacher.keras")
    capsys.readouterr()
    train.run(config, str(tmp_path / "killed"), verbose=0)
    assert (f"Resuming teacher training from step 4 of {teacher_steps}"
            in capsys.readouterr().out)
    train.run(config, str(tmp_path / "whole"), verbose=0)
    resumed, whole = (keras.saving.load_model(str(tmp_path / run / "teacher.keras"))
                      for run in ("killed", "whole"))
    for a, b in zip(resumed.get_weights(), whole.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_workdir_of_another_config_is_refused(tmp_path, smoke_config):
    workdir = str(tmp_path)
    workdirs.prepare(workdir, smoke_config(), overwrite=False)
    workdirs.prepare(workdir, smoke_config(), overwrite=False)  # same config: fine
    with pytest.raises(ValueError, match="different config.*lr.*--overwrite"):
        workdirs.prepare(workdir, smoke_config(lr=0.5), overwrite=False)
    workdirs.prepare(workdir, smoke_config(lr=0.5), overwrite=True)


def test_unwritable_workdir_is_a_clear_error(tmp_path, smoke_config):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="not writable"):
        workdirs.prepare(str(blocker / "run"), smoke_config(), overwrite=False)


def test_cli_reports_config_typos(tmp_path, capsys):
    code = cli.main(["distill", "--config=digits:smoke=True", f"--workdir={tmp_path}",
                     "--config.epoch=3"])
    assert code == 2
    assert "Did you mean 'epochs'" in capsys.readouterr().err


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, smoke_config):
    workdir = str(tmp_path)
    # A sane first run trains the teacher and leaves checkpoints up to step 4.
    train.run(smoke_config(epochs=1, steps_per_epoch=4, checkpoint_every_steps=1), workdir,
              verbose=0)
    # Continued with a learning rate this large, the student blows up at once.
    config = smoke_config(lr=1e12, epochs=3, steps_per_epoch=4, checkpoint_every_steps=1,
                          warmup_steps=0, weight_decay=0.0)
    os.remove(os.path.join(workdir, "student.keras"))
    # Not --overwrite, which would delete the checkpoints: forget the stored config.
    os.remove(os.path.join(workdir, "config.json"))
    with pytest.raises(loop.TrainingError, match="NaN.*last good checkpoint is step"):
        train.run(config, workdir, verbose=0)
    manager = CheckpointManager(os.path.join(workdir, "checkpoints"))
    assert manager.latest() is not None
    with np.load(os.path.join(manager.latest()[1], "student.npz"), allow_pickle=False) as npz:
        arrays = [npz[k] for k in npz.files]
    assert arrays and all(np.all(np.isfinite(a)) for a in arrays)
    assert not os.path.exists(os.path.join(workdir, "student.keras"))


RESUME_ARGS = ["--config=digits:smoke=True", "--config.epochs=4", "--config.steps_per_epoch=10",
               "--config.checkpoint_every_steps=3", "--config.log_every_steps=1",
               "--config.deterministic=True",
               "--config.keep_checkpoints=20", "--verbose=0"]


def _distill(workdir, **popen):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.Popen([sys.executable, "-m", "funmatch_keras.app.cli", "distill",
                             f"--workdir={workdir}", *RESUME_ARGS], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _student_weights(workdir):
    model = keras.saving.load_model(os.path.join(workdir, "student.keras"), safe_mode=True)
    return model.get_weights()


@pytest.mark.slow
def test_sigkill_mid_epoch_then_rerun_resumes_and_matches_uninterrupted(tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    uninterrupted = _distill(clean)
    run = _distill(killed)
    checkpoints = killed / "checkpoints"
    deadline = time.time() + 240
    # Kill as soon as a mid-epoch checkpoint (step 3 of a 10-step epoch) lands.
    while time.time() < deadline and not (checkpoints / "ckpt-000000003").exists():
        assert run.poll() is None, run.stdout.read()[-3000:]
        time.sleep(0.02)
    os.kill(run.pid, signal.SIGKILL)
    run.wait(timeout=30)
    assert not (killed / "student.keras").exists()
    done = sorted(int(p.name.split("-")[1]) for p in checkpoints.glob("ckpt-*"))
    assert done and done[-1] < 40

    out, _ = _distill(killed).communicate(timeout=300)
    assert f"Resuming distillation from step {done[-1]} of 40" in out
    out_clean, _ = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, out_clean[-3000:]
    for a, b in zip(_student_weights(killed), _student_weights(clean)):
        np.testing.assert_allclose(a, b, atol=1e-6)


SHIPPED = [f"{name}:smoke=True" for name in configs.list_configs()] + [
    f"{name}:variant={variant},smoke=True" for name in ("pets37", "flowers102", "food101",
                                                       "sun397")
    for variant in ("fast", "medium", "long")] + [
    "imagenet:teacher_res=384,smoke=True", "imagenet:ensemble=True,smoke=True"]


@pytest.mark.parametrize("spec", SHIPPED)
def test_every_shipped_config_builds_its_pipelines_under_mock_data(spec):
    import tensorflow_datasets as tfds

    config = configs.load_config(spec)
    configs.validate(config)
    with tfds.testing.mock_data(num_examples=40):
        train_source = sources.source_for(config.dataset, "train", config.data_dir)
        teacher_size = configs.teacher_sizes(config)
        ds = data.train_pipeline(train_source, **build.pipeline_kwargs(
            config, train_source, epochs=1, shuffle_buffer=64),
        ) if config.mode != "fixed_teacher" else None
        if ds is not None:
            batch = next(iter(ds))
            student = batch["student"] if isinstance(batch, dict) else batch
            assert student.shape == (config.batch_size, config.student_size,
                                     config.student_size, 3)
            if isinstance(teacher_size, list):  # the ensemble: one view per teacher
                assert [t.shape[1] for t in batch["teacher"]] == teacher_size
        for split in ("validation", "test"):
            source = sources.source_for(config.dataset, split, config.data_dir)
            images, labels = next(iter(data.eval_pipeline(
                source, size=config.student_size, batch_size=4, teacher_size=teacher_size)))
            assert int(labels.numpy().max()) < train_source.num_classes


@pytest.mark.slow
def test_imagenet_ensemble_of_two_resolutions_distills(tmp_path):
    import tensorflow_datasets as tfds

    config = configs.load_config("imagenet:ensemble=True,smoke=True")
    assert isinstance(config.teacher_size, list) and len(set(config.teacher_size)) == 2
    with tfds.testing.mock_data(num_examples=48):
        report = train.run(config, str(tmp_path), verbose=0)
    assert 0.0 <= report["agreement"] <= 1.0
    assert os.path.exists(tmp_path / "student.keras")


def test_cli_exit_code_3_when_training_stops_early(tmp_path, monkeypatch, capsys):
    def stopped(*args, **kwargs):
        raise loop.TrainingError("Training stopped: loss became NaN at step 5; the last "
                                  "good checkpoint is step 4.")

    monkeypatch.setattr(train, "run", stopped)
    assert cli.main(["distill", "--config=digits:smoke=True", f"--workdir={tmp_path}"]) == 3
    assert "last good checkpoint is step 4" in capsys.readouterr().err


@pytest.mark.slow
def test_a_workdir_written_before_the_layout_change_still_resumes(tmp_path, monkeypatch, capsys,
                                                                  smoke_config):
    """config.json without the newer fields (`teachers`), checkpoints, teacher.keras."""
    from funmatch_keras.training.checkpoint_callback import CheckpointCallback

    config = smoke_config(epochs=2, steps_per_epoch=2, checkpoint_every_steps=2)
    run_dir = tmp_path / "old"
    original_save = CheckpointCallback._save

    def save_then_die(self, epoch):
        original_save(self, epoch)
        distilling = os.path.basename(self.manager.directory) == "checkpoints"
        if distilling and self.last_saved_step == 2:
            raise _Killed

    with monkeypatch.context() as patch:
        patch.setattr(CheckpointCallback, "_save", save_then_die)
        with pytest.raises(_Killed):
            train.run(config, str(run_dir), verbose=0)
    assert CheckpointManager(str(run_dir / "checkpoints")).all_steps()[-1] == 2
    stored = json.loads((run_dir / "config.json").read_text())
    del stored["teachers"]  # as the previous version wrote it
    (run_dir / "config.json").write_text(json.dumps(stored, sort_keys=True, indent=2))
    capsys.readouterr()
    report = train.run(config, str(run_dir), verbose=0)
    assert "Resuming distillation from step 2 of 4" in capsys.readouterr().out
    assert report["steps"] == 4 and os.path.exists(run_dir / "student.keras")
