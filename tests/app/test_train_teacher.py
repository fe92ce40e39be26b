import os
import subprocess
import sys

import keras
import pytest

from funmatch_keras import configs
from funmatch_keras.app import distill as train
from funmatch_keras.app import train_teacher as supervised
from funmatch_keras.training.checkpoint import CheckpointManager


@pytest.mark.parametrize("step, expected", [
    (0, 0.0), (50, 0.5 * 0.006), (100, 0.006), (299, 0.006), (300, 0.0006),
    (599, 0.0006), (600, 0.00006), (900, 0.000006), (999, 0.000006)])
def test_bit_hyperrule_schedule(step, expected):
    # batch 1024 doubles the base rate 0.003 (per 512 examples); warmup 10% of 1000.
    optimizer = supervised.bit_hyperrule_optimizer(batch_size=1024, total_steps=1000)
    schedule = optimizer._learning_rate  # the schedule object, not its current value
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-5, abs=1e-12)
    assert optimizer.momentum == 0.9


def test_bit_hyperrule_schedule_length_by_dataset_size():
    assert [supervised.bit_hyperrule_steps(n) for n in (1_000, 19_999, 20_000, 499_999,
                                                        500_000)] == [500, 500, 10_000,
                                                                      10_000, 20_000]


@pytest.mark.slow
def test_train_teacher_then_distill_from_its_file(tmp_path, smoke_config):
    config = smoke_config(epochs=3, steps_per_epoch=4)
    path = supervised.train_teacher(config, str(tmp_path / "teacher"), verbose=0)
    teacher = keras.saving.load_model(path, safe_mode=True)
    assert teacher.output_shape == (None, 10)
    # A shipped model holds no training state; the training is in its checkpoints.
    assert getattr(teacher, "optimizer", None) is None
    checkpoints = CheckpointManager(str(tmp_path / "teacher" / "teacher_checkpoints"),
                                    clean_temp=False)
    assert max(checkpoints.all_steps()) == 12  # 3 epochs of 4 steps
    distill = configs.apply_overrides(config, {"teacher": path, "teacher_epochs": "None"})
    report = train.run(distill, str(tmp_path / "student"), verbose=0)
    # The teacher came from the file: nothing was trained with labels in the new workdir.
    assert not os.path.exists(tmp_path / "student" / "teacher.keras")
    assert 0.0 <= report["agreement"] <= 1.0


@pytest.mark.slow
def test_quickstart_example_runs(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "quickstart.py")
    env = dict(os.environ, FUNMATCH_SMOKE="1", TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, script], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "student_top1" in out.stdout
    # It runs clean: no "Your input ran out of data" at its end, no Python warning.
    assert "ran out of data" not in out.stdout + out.stderr
    assert "Warning:" not in out.stderr
    assert (tmp_path / "quickstart_student.keras").exists()
