"""Journey: `funmatch distill` on two workers (MultiWorkerMirroredStrategy) on one machine.

The default digits config has no teacher weights, so each run first trains its
teacher with labels, then distils. The two workers are two local processes with a
`TF_CONFIG` each, as on two machines: (a) sharing one workdir, (b) each with its
own workdir, where neither can read the other's disk. A worker killed with `kill -9`
(during the teacher's training, during distillation) is restarted with its peer,
and the run ends as an uninterrupted one: same steps, same student on both workers.
One uninterrupted run (separate workdirs) is the reference of both layouts' restarted
runs: the layout changes where files go, not what is trained.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

# One xdist worker runs both tests: they share the module's uninterrupted run.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multi_worker")]

TOTAL_STEPS = 60  # of distillation; the teacher trains for one epoch (78 steps)
EVERY = 6  # log and checkpoint interval, of the teacher's training and distillation
DISTILL = ("distill", "--config=digits", "--config.batch_size=16", "--config.teacher_epochs=1",
           "--config.epochs=1", f"--config.steps_per_epoch={TOTAL_STEPS}",
           f"--config.log_every_steps={EVERY}", f"--config.checkpoint_every_steps={EVERY}",
           f"--config.eval_every_steps={TOTAL_STEPS}", "--verbose=2")


def _start(workers, workdirs: list[Path], name: str):
    return workers.funmatch(*[[*DISTILL, f"--workdir={w}"] for w in workdirs], name=name)


def _finish(cluster) -> None:
    assert cluster.wait() == [0, 0], cluster.explain()


def _steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def _student(workdir: Path):
    import keras

    import funmatch_keras  # noqa: F401  (registers the package's classes)

    return keras.saving.load_model(workdir / "student.keras", safe_mode=True).get_weights()


def _assert_same_weights(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)


def _check_run(chief: Path, worker: Path) -> list:
    """The chief's report and both workers' metrics end at the last step; the students agree."""
    report = json.loads((chief / "report.json").read_text())
    assert report["steps"] == TOTAL_STEPS
    assert os.path.exists(chief / "teacher.keras")
    assert _steps(chief / "metrics.jsonl")[-1] == TOTAL_STEPS
    assert _steps(worker / "metrics.jsonl")[-1] == TOTAL_STEPS
    students = _student(chief), _student(worker)
    _assert_same_weights(*students)
    return students[0]


def _ckpts(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("ckpt-*")) if folder.is_dir() else []


@pytest.fixture(scope="module")
def uninterrupted(module_workers, tmp_path_factory) -> list:
    """The student of an uninterrupted run, each worker with its own workdir."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    chief, other = folder / "chief", folder / "other"
    _finish(_start(module_workers, [chief, other], "uninterrupted"))
    return _check_run(chief, other / "workertemp_worker_1")


def test_shared_workdir_and_a_chief_killed_while_the_teacher_trains(workers, tmp_path,
                                                                    uninterrupted):
    # (a) One workdir for both: the chief writes there, worker 1 in its workertemp_worker_1/.
    # The chief is lost while the teacher trains (a checkpoint of it exists); both restart.
    killed = tmp_path / "killed"
    cluster = _start(workers, [killed, killed], "killed")
    cluster.wait_for(lambda: _ckpts(killed / "teacher_checkpoints"))
    cluster.kill(0)
    cluster.kill_all()  # its peer, if it has not stopped on its own
    assert not (killed / "teacher.keras").exists(), "killed after the teacher was trained"
    restarted = _start(workers, [killed, killed], "restarted")
    _finish(restarted)
    for index in (0, 1):  # each continues: neither trains from scratch
        assert "Resuming teacher training from step" in restarted.log(index), restarted.explain()
    resumed = _check_run(killed, killed / "workertemp_worker_1")
    _assert_same_weights(resumed, uninterrupted)


def test_separate_workdirs_and_a_worker_killed_while_distilling(workers, tmp_path,
                                                                uninterrupted):
    # (b) Each worker its own workdir: no worker can read the other's files.
    # Worker 1 is lost during distillation, after a checkpoint; both restart.
    chief, other = tmp_path / "chief", tmp_path / "other"
    cluster = _start(workers, [chief, other], "killed")
    cluster.wait_for(lambda: _ckpts(chief / "checkpoints"))
    cluster.kill(1)
    cluster.kill_all()
    assert not (chief / "report.json").exists(), "killed after the run ended"
    restarted = _start(workers, [chief, other], "restarted")
    _finish(restarted)
    for index in (0, 1):  # each continues: neither trains from scratch
        assert "Resuming distillation from step" in restarted.log(index), restarted.explain()
    resumed = _check_run(chief, other / "workertemp_worker_1")
    _assert_same_weights(resumed, uninterrupted)
