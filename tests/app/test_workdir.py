"""workdir.prepare: `--overwrite` starts from nothing, and a crash mid-way loses nothing."""

import os
import re
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from funmatch_keras.app import cli
from funmatch_keras.app import distill as train
from funmatch_keras.app import train_teacher as supervised
from funmatch_keras.app import workdir as workdirs
from funmatch_keras.training import loop

# A previous run's entries, as `funmatch distill` and `train-teacher` leave them.
OLD_RUN = ["config.json", "checkpoints/ckpt-000000004/student.weights.h5", "teacher.keras",
           "teacher_checkpoints/ckpt-000000078/x", "teacher-1.keras",
           "teacher-1_checkpoints/ckpt-000000001/x", "teacher_logits_abc.npy", "student.keras",
           "metrics.jsonl", "tensorboard/train/events", "report.json", "report.png"]
# Not the run's: kept by --overwrite.
OTHERS = [".lock", "workertemp_worker_1/metrics.jsonl", "notes.txt"]


def _files(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


def _old_run(workdir, config):
    workdirs.prepare(str(workdir), config, overwrite=False)
    for name in OLD_RUN[1:] + OTHERS:
        (workdir / name).parent.mkdir(parents=True, exist_ok=True)
        (workdir / name).write_text("old")


def test_overwrite_moves_the_previous_run_aside_then_deletes_it(tmp_path, capsys, smoke_config):
    _old_run(tmp_path, smoke_config())
    workdirs.prepare(str(tmp_path), smoke_config(lr=0.5), overwrite=True)
    assert _files(tmp_path) == {"config.json", *OTHERS}
    assert workdirs.read_config(str(tmp_path)).lr == 0.5
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("--overwrite: moved the previous run (checkpoints/, teacher-1.keras")
    assert "config.json) to " + str(tmp_path / ".replaced-") in line and "deleting it" in line
    # Again: only the config is there to replace.
    workdirs.prepare(str(tmp_path), smoke_config(lr=0.5), overwrite=True)
    assert "the previous run (config.json) to" in capsys.readouterr().out
    # An empty workdir: nothing to say.
    workdirs.prepare(str(tmp_path / "new"), smoke_config(), overwrite=True)
    assert capsys.readouterr().out == "" and _files(tmp_path / "new") == {"config.json"}


def test_overwrite_keeps_files_the_config_names(tmp_path, smoke_config):
    _old_run(tmp_path, smoke_config())
    teacher = str(tmp_path / "teacher.keras")
    workdirs.prepare(str(tmp_path), smoke_config(teacher=teacher), overwrite=True)
    assert _files(tmp_path) == {"config.json", "teacher.keras", *OTHERS}


def test_a_crash_mid_overwrite_loses_neither_run(tmp_path, monkeypatch, capsys, smoke_config):
    _old_run(tmp_path, smoke_config())
    moved, rename = [], os.rename

    def crash_on_the_third(src, dst):
        if len(moved) == 2:
            raise OSError("disk gone")
        moved.append(os.path.basename(src))
        rename(src, dst)

    monkeypatch.setattr(os, "rename", crash_on_the_third)
    with pytest.raises(ValueError, match=r"could not move .*disk gone.*\.replaced-"):
        workdirs.prepare(str(tmp_path), smoke_config(lr=0.5), overwrite=True)
    monkeypatch.undo()
    (aside,) = [n for n in os.listdir(tmp_path) if n.startswith(".replaced-")]
    in_place = _files(tmp_path) - {f for f in _files(tmp_path) if f.startswith(aside)}
    assert _files(tmp_path / aside) | in_place == {
        *OLD_RUN, *OTHERS}
    # config.json moves last, so the half-moved run still refuses another config...
    assert workdirs.read_config(str(tmp_path)).lr == smoke_config().lr
    with pytest.raises(ValueError, match="different config"):
        workdirs.prepare(str(tmp_path), smoke_config(lr=0.5), overwrite=False)
    # ...and --overwrite again finishes the job, leftover folder included.
    workdirs.prepare(str(tmp_path), smoke_config(lr=0.5), overwrite=True)
    assert _files(tmp_path) == {"config.json", *OTHERS}
    assert "left by an interrupted --overwrite" in capsys.readouterr().out


def _fit(workdir, lr):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    data = tf.data.Dataset.from_tensors((np.ones((2, 1)),) * 2).repeat()
    loop.fit_with_checkpoints(model, lambda step: data, every_steps=2, keep=1, epochs=1,
                              checkpoint_dir=os.path.join(workdir, workdirs.CHECKPOINTS),
                              steps_per_epoch=2, verbose=0)


def test_a_rerun_with_overwrite_does_not_resume(tmp_path, capsys, smoke_config):
    workdir = str(tmp_path)
    workdirs.prepare(workdir, smoke_config(), overwrite=False)
    _fit(workdir, 0.1)
    workdirs.prepare(workdir, smoke_config(), overwrite=False)  # same config: resumes
    _fit(workdir, 0.1)
    assert "Resuming training from step 2" in capsys.readouterr().out
    workdirs.prepare(workdir, smoke_config(lr=0.5), overwrite=True)
    assert not os.path.exists(os.path.join(workdir, workdirs.CHECKPOINTS))
    _fit(workdir, 0.5)
    assert "Resuming" not in capsys.readouterr().out


@pytest.mark.parametrize("command,module,function", [
    ("distill", train, "run"), ("train-teacher", supervised, "train_teacher")])
def test_the_cli_passes_overwrite(tmp_path, monkeypatch, command, module, function):
    calls = []
    monkeypatch.setattr(module, function, lambda *args, **kwargs: calls.append(kwargs))
    argv = [command, "--config=digits:smoke=True", f"--workdir={tmp_path}"]
    assert cli.main(argv) == 0 and cli.main(argv + ["--overwrite"]) == 0
    assert [kwargs["overwrite"] for kwargs in calls] == [False, True]


def test_report_png_has_the_training_loss_beside_the_eval_curves(tmp_path):
    history = [{"step": 2, "epoch": 1.0, "loss": 2.5},
               {"step": 4, "epoch": 2.0, "loss": 1.5, "val_agreement": 0.6,
                "val_student_top1": 0.5, "val_teacher_top1": 0.9},
               {"step": 6, "epoch": 3.0, "loss": 0.5, "val_agreement": 0.8,
                "val_student_top1": 0.7, "val_teacher_top1": 0.9}]
    report = {"config": {"dataset": "digits"}, "student_top1": 0.7}
    fig = workdirs.report_figure(history, report)
    loss_ax, eval_ax = fig.axes
    assert loss_ax.get_ylabel() == "training loss" and loss_ax.get_xlabel() == "epoch"
    (loss_line,) = loss_ax.lines
    assert list(loss_line.get_xdata()) == [1.0, 2.0, 3.0]
    assert list(loss_line.get_ydata()) == [2.5, 1.5, 0.5]
    curves = {line.get_label(): list(line.get_ydata()) for line in eval_ax.lines}
    assert curves["agreement with teacher"] == [0.6, 0.8]
    assert curves["student top-1 (validation)"] == [0.5, 0.7]
    workdirs.write_report(str(tmp_path), report, history)
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(str(tmp_path / "report.png")).shape
    assert width > 1.5 * height  # two panels side by side


def _distill(workdir, *overrides):
    """`funmatch distill` of a digits smoke run, in a fresh interpreter of this checkout."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=repo, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, "-m", "funmatch_keras.app.cli", "distill", "--config=digits:smoke=True",
         f"--workdir={workdir}", *overrides], env=env, capture_output=True, text=True,
        timeout=600)


# Keras's own header, which counted log intervals, not the run's epochs.
_KERAS_EPOCH_LINE = re.compile(r"^Epoch \d+/\d+$", re.M)


@pytest.mark.slow
def test_a_resume_may_change_cadences_but_not_what_is_trained(tmp_path):
    workdir = tmp_path / "run"
    first = _distill(workdir)
    assert first.returncode == 0, first.stderr[-3000:]
    # Every progress bar is headed by the run's epochs and steps (teacher training too).
    assert not _KERAS_EPOCH_LINE.search(first.stdout)
    assert re.search(r"^Epoch 1/1, steps 1-\d+ of \d+$", first.stdout, re.M)  # the teacher
    assert "Epoch 1/2, step 1 of 4\n" in first.stdout
    # As if killed after step 2's checkpoint: the rerun resumes mid-run.
    shutil.rmtree(workdir / "checkpoints" / "ckpt-000000004")
    resumed = _distill(workdir, "--config.eval_batch_size=8", "--config.keep_checkpoints=3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = resumed.stdout
    assert ("Resuming with changed fields: eval_batch_size 16 -> 8, keep_checkpoints 2 -> 3"
            in out)
    assert "Resuming distillation from step 2 of 4" in out
    assert "Epoch 2/2, step 3 of 4\n" in out and "Epoch 2/2, step 4 of 4\n" in out
    assert not _KERAS_EPOCH_LINE.search(out) and "Epoch 1/2" not in out
    # A run too short to tune never wrote teacher_path.json, and says so on resume too.
    assert "(run too short to tune" in out and "before" not in out
    assert workdirs.read_config(str(workdir)).eval_batch_size == 8
    refused = _distill(workdir, "--config.eval_batch_size=8", "--config.keep_checkpoints=3",
                       "--config.lr=0.5")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert re.search(r"different config \(lr: 0.01 -> 0.5\).*--overwrite.*A resume may "
                     r"change only.*eval_batch_size", refused.stderr)
    assert "Resuming" not in refused.stdout
    assert workdirs.read_config(str(workdir)).lr == 0.01
