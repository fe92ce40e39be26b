"""A sweep's teacher pass: `funmatch teacher-store` and `funmatch distill
--config.teacher_store=DIR`, each step in a fresh process. Processes filling one store
at once end with a complete store and compute each chunk once; two runs recording one
store at once write each chunk once, and a replay of it ends where they ended; a run
that records its own steps, killed while writing a chunk and again while training,
resumes, replays from the right step and ends where a live run ends; a hole and a
truncated chunk are recomputed before a replay, a chunk with a flipped bit when it is
replayed (with a warning for each damaged one);
another seed or encoding is refused; two workers (`TF_CONFIG`) are refused before
anything is trained or written.
"""

import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

pytestmark = pytest.mark.slow

# `funmatch ARGS` with stores of 8-step chunks, killed (SIGKILL, by itself) at the NTH
# chunk write ("chunk") or checkpoint save ("checkpoint"); "none" never.
_FUNMATCH = """
import os, signal, sys
from funmatch_keras.app import cli
from funmatch_keras.data import teacher_store
from funmatch_keras.training import checkpoint

teacher_store.DEFAULT_STEPS_PER_CHUNK = 8
phase, nth = sys.argv[1], int(sys.argv[2])
counts = []

def dying(original):
    def call(*args, **kwargs):
        counts.append(1)
        if len(counts) == nth:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
    return call

if phase == "chunk":
    teacher_store.TeacherStore.write_chunk = dying(teacher_store.TeacherStore.write_chunk)
if phase == "checkpoint":
    checkpoint.CheckpointManager.save = dying(checkpoint.CheckpointManager.save)
sys.exit(cli.main(sys.argv[3:]))
"""

TEACHER = """
import keras
from funmatch_keras import models
keras.utils.set_random_seed(7)
models.build("cnn:32,64,128", 10, 16).save("teacher.keras")
"""


def _args(tmp_path, epochs=4):
    return ["--config=digits:smoke=True", f"--config.teacher={tmp_path / 'teacher.keras'}",
            f"--config.epochs={epochs}", "--config.steps_per_epoch=8",
            "--config.checkpoint_every_steps=8", "--config.deterministic=True"]


def _weights(path):
    return keras.saving.load_model(path, safe_mode=True).get_weights()


def _chunks(store):
    return sorted(n for n in os.listdir(store) if n.endswith(".npy"))


@pytest.fixture
def funmatch(shell, tmp_path):
    shell.python(TEACHER)
    script = tmp_path / "funmatch_dies.py"
    script.write_text(_FUNMATCH)

    def run(*args, phase="none", nth=0, expect=0):
        result = shell.run([sys.executable, str(script), phase, str(nth), *args], expect=expect)
        return result.stdout + result.stderr

    return run


def test_two_processes_fill_one_store_each_chunk_once(funmatch, tmp_path, fresh_env):
    store = tmp_path / "store"
    command = [sys.executable, str(tmp_path / "funmatch_dies.py"), "none", "0",
               "teacher-store", *_args(tmp_path, epochs=10), f"--store={store}"]
    processes = [subprocess.Popen(command, cwd=tmp_path, env=fresh_env(), text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    computed = [int(re.search(r"(\d+) chunk\(s\) computed here, 0 missing", out).group(1))
                for out, _ in outputs]
    assert sum(computed) == 10  # 80 steps in chunks of 8: none computed twice
    assert len(_chunks(store)) == 10
    assert sorted(os.listdir(store)) == sorted(_chunks(store) + ["store.json"])  # no leftovers
    # A second pass finds everything valid.
    out = funmatch("teacher-store", *_args(tmp_path, epochs=10), f"--store={store}")
    assert "0 chunk(s) computed here, 0 missing" in out


def test_two_runs_recording_one_store_at_once_write_each_chunk_once(funmatch, tmp_path,
                                                                     fresh_env):
    store = tmp_path / "store"
    runs = {t: [sys.executable, str(tmp_path / "funmatch_dies.py"), "none", "0", "distill",
                *_args(tmp_path), f"--config.teacher_store={store}",
                f"--config.temperature={t}", f"--workdir={tmp_path / f't{t}'}"]
            for t in ("1.0", "2.0")}
    processes = [subprocess.Popen(command, cwd=tmp_path, env=fresh_env(), text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for command in runs.values()]
    outputs = [p.communicate(timeout=600) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    written = [re.findall(r"recorded \(chunk (\d)\)", out) for out, _ in outputs]
    assert sorted(sum(written, [])) == ["0", "1", "2", "3"], written  # each chunk once
    assert sorted(os.listdir(store)) == sorted(_chunks(store) + ["store.json"])
    # What either run wrote is what the T=1 run's loss saw: a replay ends where it ended.
    out = funmatch("distill", *_args(tmp_path), f"--config.teacher_store={store}",
                   f"--workdir={tmp_path / 'replayed'}")
    assert "32 step(s) replayed, 0 run live" in out and "computing" not in out
    for got, want in zip(_weights(tmp_path / "replayed" / "student.keras"),
                         _weights(tmp_path / "t1.0" / "student.keras")):
        np.testing.assert_array_equal(got, want)


def test_killed_while_recording_a_resumed_run_and_a_replay_end_as_a_live_one(
        funmatch, tmp_path):
    store, run = tmp_path / "store", tmp_path / "run"
    distill = ["distill", *_args(tmp_path), f"--config.teacher_store={store}",
               f"--workdir={run}"]
    # The first run records its own steps. Killed while writing its third chunk (after
    # step 24; checkpoints at the log steps 9 and 18, every 3 steps here): two whole
    # chunks, no partial one.
    out = funmatch(*distill, phase="chunk", nth=3, expect=-9)
    assert "0 step(s) replayed, 32 run live and recorded" in out, out[-3000:]
    assert len(_chunks(store)) == 2
    # Resumed at step 18, in the middle of chunk 2 (steps 16-23), which it cannot
    # record; it saves a checkpoint at step 27 (8 steps on, at a log step), records
    # chunk 3 (steps 24-31), then dies at its second checkpoint save (step 32).
    out = funmatch(*distill, phase="checkpoint", nth=2, expect=-9)
    assert "Resuming distillation from step 18 of 32" in out, out[-3000:]
    assert len(_chunks(store)) == 3 and not _chunks(store)[2].startswith("chunk-0000002-")
    # Resumed at step 27, in the middle of the stored chunk 3: the rest is replayed.
    out = funmatch(*distill)
    assert "Resuming distillation from step 27 of 32" in out, out[-3000:]
    assert "5 step(s) replayed, 0 run live" in out
    live = tmp_path / "live"
    funmatch("distill", *_args(tmp_path), f"--workdir={live}", "--verbose=0")
    want = _weights(live / "student.keras")
    for got, expected in zip(_weights(run / "student.keras"), want):
        np.testing.assert_array_equal(got, expected)
    report = json.loads((run / "report.json").read_text())
    assert report["teacher_path"]["reason"].startswith("read from the teacher store")
    # A whole replay: the hole (chunk 2, the killed process's claim still on it) and a
    # chunk truncated meanwhile (chunk 0, found from its header) are computed before
    # training; a chunk with a flipped bit (chunk 1: its header and size intact) is found
    # when replayed and computed then. Neither damaged one is fed to the loss.
    truncated, flipped = store / _chunks(store)[0], store / _chunks(store)[1]
    truncated.write_bytes(truncated.read_bytes()[:-8])
    original = flipped.read_bytes()
    flipped.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    out = funmatch("distill", *_args(tmp_path), f"--config.teacher_store={store}",
                   f"--workdir={tmp_path / 'replayed'}")
    assert "computing 2 chunk(s) of 8 steps before training" in out, out[-3000:]
    assert f"{truncated.name} is damaged (truncated" in out
    assert f"{flipped.name} is damaged (its sha256" in out
    assert "32 step(s) replayed, 0 run live" in out, out[-3000:]
    assert flipped.read_bytes() == original  # recomputed: the same logits, bit for bit
    assert sorted(os.listdir(store)) == sorted(_chunks(store) + ["store.json"])  # no claims
    assert len(_chunks(store)) == 4
    for got, expected in zip(_weights(tmp_path / "replayed" / "student.keras"), want):
        np.testing.assert_array_equal(got, expected)


def test_a_store_filled_ahead_is_replayed_and_another_seed_is_refused(funmatch, tmp_path):
    store = tmp_path / "store"
    # Two processes, one half of the run each.
    funmatch("teacher-store", *_args(tmp_path), f"--store={store}", "--steps=0:16")
    funmatch("teacher-store", *_args(tmp_path), f"--store={store}", "--steps=16:32")
    filled = {name: (store / name).stat().st_mtime_ns for name in _chunks(store)}
    out = funmatch("distill", *_args(tmp_path), f"--config.teacher_store={store}",
                   "--config.temperature=2.0", f"--workdir={tmp_path / 'replayed'}")
    assert "32 step(s) replayed, 0 run live" in out and "computing" not in out
    assert {name: (store / name).stat().st_mtime_ns for name in _chunks(store)} == filled
    live = tmp_path / "live"
    funmatch("distill", *_args(tmp_path), "--config.temperature=2.0", f"--workdir={live}",
             "--verbose=0")
    for got, want in zip(_weights(tmp_path / "replayed" / "student.keras"),
                         _weights(live / "student.keras")):
        np.testing.assert_array_equal(got, want)
    out = funmatch("distill", *_args(tmp_path), f"--config.teacher_store={store}",
                   "--config.seed=1", f"--workdir={tmp_path / 'other'}", expect=2)
    assert "seed: 0 -> 1" in out and "teacher_store" in out


def test_a_top_k_store_replays_in_its_encoding_and_refuses_another(funmatch, tmp_path):
    store = tmp_path / "store"
    top3 = "--config.teacher_store_encoding=top3"
    funmatch("teacher-store", *_args(tmp_path), f"--store={store}", top3)
    assert json.loads((store / "store.json").read_text())["encoding"] == "top3"
    # 32 steps of batch 16: 4 (2K + 1) = 28 bytes per example, not float32's 40.
    assert [np.load(store / name).shape for name in _chunks(store)] == [(8, 16, 7)] * 4
    # A run that names no encoding takes the store's; one that names another is refused.
    out = funmatch("distill", *_args(tmp_path), f"--config.teacher_store={store}",
                   f"--workdir={tmp_path / 'replayed'}")
    assert "32 step(s) replayed, 0 run live" in out and "computing" not in out
    assert (tmp_path / "replayed" / "student.keras").is_file()
    out = funmatch("distill", *_args(tmp_path), f"--config.teacher_store={store}",
                   "--config.teacher_store_encoding=float32",
                   f"--workdir={tmp_path / 'float32'}", expect=2)
    assert "holds 'top3' logits, and this run asks for 'float32'" in out
    assert "--config.teacher_store_encoding=top3, or leave the flag out" in out


def test_two_workers_are_refused_before_the_teacher_trains_or_a_file_is_written(
        workers, tmp_path):
    store, run = tmp_path / "store", tmp_path / "run"
    # The config's teacher has no weights: a refusal that came late would train it first.
    distill = ["distill", "--config=digits:smoke=True", f"--config.teacher_store={store}",
               f"--workdir={run}"]
    cluster = workers.funmatch(distill, distill, name="store")
    assert cluster.wait(timeout=120) == [2, 2], cluster.explain()  # bad input, no hang
    for index in (0, 1):
        log = cluster.log(index)
        assert "--config.teacher_store does not support multi-worker training yet " \
               "(2 workers)" in log, cluster.explain()
        assert "Train on one worker (MirroredStrategy works), or drop " \
               "--config.teacher_store." in log, cluster.explain()
    assert not store.exists()  # no store.json, no chunk, no claim
    # No teacher, checkpoint or config.json: the same command without the flag can run there.
    assert not run.exists()
