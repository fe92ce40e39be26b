"""README "Kill it any time": `funmatch distill` killed with SIGKILL in each of its phases
(training the teacher with labels, distilling, writing the report) finishes when the same
command is run again, trains nothing twice from scratch, and ends where an uninterrupted
run ends (`--config.deterministic=True`).

The kill is a real SIGKILL that the process sends itself at a chosen point (the n-th
checkpoint save of a phase, or the final report), so the test needs no race with a
watcher to land inside a phase.
"""

import json
import sys

import keras
import numpy as np
import pytest

pytestmark = pytest.mark.slow

ARGS = ["distill", "--config=digits:smoke=True", "--config.teacher_epochs=1",
        "--config.epochs=3", "--config.steps_per_epoch=4", "--config.checkpoint_every_steps=2",
        "--config.deterministic=True", "--verbose=0"]
TOTAL_STEPS = 12

# `funmatch distill ARGS`, killed (SIGKILL, by itself) at PHASE: the NTH checkpoint save of
# the teacher's label training or of distillation, or the final report.
_KILLED_AT = """
import os, signal, sys
from funmatch_keras.app import cli, workdir as workdirs
from funmatch_keras.training import checkpoint

phase, nth = sys.argv[1], int(sys.argv[2])
saves = []

def kill():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)

save = checkpoint.CheckpointManager.save
def save_then_maybe_die(self, *args, **kwargs):
    folder = os.path.basename(self.directory)
    if folder == {"teacher": "teacher_checkpoints", "distillation": "checkpoints"}.get(phase):
        saves.append(1)
        if len(saves) == nth:  # the saves before it are complete: one write in flight
            kill()
    return save(self, *args, **kwargs)
checkpoint.CheckpointManager.save = save_then_maybe_die

if phase == "report":
    workdirs.write_report = lambda *args, **kwargs: kill()
sys.exit(cli.main(sys.argv[3:]))
"""


def _weights(path):
    return keras.saving.load_model(path).get_weights()


def test_a_run_killed_in_every_phase_finishes_as_an_uninterrupted_one(shell, tmp_path):
    killer = tmp_path / "killed_at.py"
    killer.write_text(_KILLED_AT)
    run = tmp_path / "run"

    def killed_at(phase, nth=2):
        result = shell.run([sys.executable, str(killer), phase, str(nth), *ARGS,
                            f"--workdir={run}"], expect=-9)
        return result.stdout + result.stderr

    # 1. Killed while training the teacher with labels: nothing of it is final yet.
    killed_at("teacher")
    assert (run / "teacher_checkpoints").is_dir()
    assert not (run / "teacher.keras").exists()

    # 2. The same command resumes the teacher's training; killed while distilling.
    out = killed_at("distillation")
    assert "Resuming teacher training from step" in out, out[-3000:]
    assert "Resuming teacher training from step 0 " not in out
    teacher_written = (run / "teacher.keras").stat().st_mtime_ns
    assert not (run / "student.keras").exists()

    # 3. Resumes distillation, not the teacher; killed while writing the report.
    out = killed_at("report")
    assert "Resuming distillation from step" in out, out[-3000:]
    assert "Resuming distillation from step 0 " not in out
    assert "teacher training" not in out
    assert (run / "teacher.keras").stat().st_mtime_ns == teacher_written
    assert not (run / "report.json").exists()

    # 4. The plain command finishes the run without training a step.
    out = shell.funmatch(*ARGS, f"--workdir={run}")
    assert f"Resuming distillation from step {TOTAL_STEPS} of {TOTAL_STEPS}" in out.stdout
    report = json.loads((run / "report.json").read_text())
    assert report["steps"] == TOTAL_STEPS
    assert (run / "teacher.keras").stat().st_mtime_ns == teacher_written

    # The same student as a run never killed.
    reference = tmp_path / "reference"
    shell.funmatch(*ARGS, f"--workdir={reference}")
    for got, want in zip(_weights(run / "student.keras"), _weights(reference / "student.keras")):
        np.testing.assert_allclose(got, want, atol=1e-6)
    for got, want in zip(_weights(run / "teacher.keras"), _weights(reference / "teacher.keras")):
        np.testing.assert_allclose(got, want, atol=1e-6)
    reference_report = json.loads((reference / "report.json").read_text())
    assert report["agreement"] == pytest.approx(reference_report["agreement"], abs=1e-6)
