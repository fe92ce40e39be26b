"""Replication: tf.distribute strategies and JAX DataParallel, on real engines (CPU).

The 2-replica tests run in this process on the two logical CPUs of conftest;
multi-worker and JAX runs are `funmatch distill` subprocesses.
"""

import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from funmatch_keras import models
from funmatch_keras.app import build
from funmatch_keras.app import distill as train
from funmatch_keras.app import workdir as workdirs
from funmatch_keras.data import pipelines as data
from funmatch_keras.data import sources
from funmatch_keras.distiller import Distiller
from funmatch_keras.training import distribute

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))




# ------------------------------------------------------------- detection


class _FakeResolver:
    def __init__(self, tpu=None):
        if tpu is None and "TPU_NAME" not in os.environ:
            raise ValueError("Please provide a TPU Name to connect to.")
        self.tpu = tpu or os.environ["TPU_NAME"]


def test_auto_picks_tpu_when_the_resolver_finds_one(monkeypatch):
    calls = []
    monkeypatch.setenv("TPU_NAME", "my-tpu")
    monkeypatch.setattr(tf.distribute.cluster_resolver, "TPUClusterResolver", _FakeResolver)
    monkeypatch.setattr(tf.config, "experimental_connect_to_cluster",
                        lambda r: calls.append(("connect", r.tpu)))
    monkeypatch.setattr(tf.tpu.experimental, "initialize_tpu_system",
                        lambda r: calls.append(("initialize", r.tpu)))
    class FakeTPUStrategy:
        num_replicas_in_sync = 8

        def __init__(self, resolver):
            calls.append(("strategy", resolver.tpu))

    monkeypatch.setattr(tf.distribute, "TPUStrategy", FakeTPUStrategy)
    assert isinstance(distribute.strategy("auto"), FakeTPUStrategy)
    assert calls == [("connect", "my-tpu"), ("initialize", "my-tpu"), ("strategy", "my-tpu")]


def test_tpu_vm_chips_use_the_local_resolver(monkeypatch):
    monkeypatch.delenv("TPU_NAME", raising=False)
    monkeypatch.setattr(tf.distribute.cluster_resolver, "TPUClusterResolver", _FakeResolver)
    real_list = tf.config.list_physical_devices
    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda kind=None: ["TPU:0"] if kind == "TPU" else real_list(kind))
    assert distribute._tpu_resolver().tpu == "local"


def test_without_tpu_gpus_or_tf_config_auto_is_the_default_strategy(monkeypatch):
    monkeypatch.delenv("TPU_NAME", raising=False)
    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.setattr(tf.distribute.cluster_resolver, "TPUClusterResolver", _FakeResolver)
    chosen = distribute.strategy("auto")
    assert chosen is tf.distribute.get_strategy() and chosen.num_replicas_in_sync == 1
    with pytest.raises(ValueError, match="no TPU was found"):
        distribute.strategy("tpu")
    with pytest.raises(ValueError, match="Unknown strategy kind.*'mirror'"):
        distribute.strategy("mirror")


def test_tf_config_cluster_and_chief_rules(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert distribute._tf_config_cluster() is None
    cluster = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster,
                                                "task": {"type": "worker", "index": 1}}))
    assert distribute._tf_config_cluster() == cluster
    assert distribute._is_chief_task("worker", 0, cluster)
    assert not distribute._is_chief_task("worker", 1, cluster)
    with_chief = {"chief": ["a:1"], **cluster}
    assert distribute._is_chief_task("chief", 0, with_chief)
    assert not distribute._is_chief_task("worker", 0, with_chief)
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG is not a JSON object"):
        distribute._tf_config_cluster()


def test_replication_of_a_strategy_and_from_the_environment(monkeypatch, two_cpu_strategy):
    replicas = distribute.replication(two_cpu_strategy)
    assert (replicas.kind, replicas.num_replicas, replicas.is_chief) == (
        "MirroredStrategy", 2, True)
    with replicas.scope():
        assert tf.distribute.get_strategy() is replicas.strategy
    monkeypatch.setenv(distribute.ENV_VAR, "default")
    assert distribute.replication().num_replicas == 1


@pytest.mark.parametrize("is_chief", [True, False])
def test_values_from_the_chief_arrive_exactly_in_every_dtype(is_chief, two_cpu_strategy):
    # Two local replicas stand for two workers' replicas: only the chief's first
    # one contributes to the sum, so every worker receives the chief's values.
    replicas = dataclasses.replace(distribute.replication(two_cpu_strategy),
                                   is_chief=is_chief, num_workers=2)
    values = [np.array([[1 / 3, -2e-30], [7.0, np.pi]], "float32"),
              np.array([1 / 3], "float64"), np.array(2**40 + 3, "int64"),
              np.array([True, False]), np.array([1 / 3, 65504], "float16"),
              np.array([1 / 3, 3e38], tf.bfloat16.as_numpy_dtype)]
    received = replicas._from_chief(values)
    for value, got in zip(values, received):
        assert got.dtype == value.dtype and got.shape == value.shape
        expected = value if is_chief else np.zeros_like(value)
        np.testing.assert_array_equal(got, expected)  # bit for bit
    variable = keras.Variable(np.ones((2, 3), "float32"))
    replicas.broadcast_from_chief([variable])
    np.testing.assert_array_equal(variable.numpy(), np.full((2, 3), float(is_chief)))
    assert replicas.chief_value(True) == int(is_chief)


# --------------------------------------------------------------- bad input


def test_batch_not_divisible_by_replicas_fails_before_training(tmp_path, monkeypatch,
                                                               smoke_config, two_cpu_strategy):
    built = []
    for name in ("source", "teachers", "student", "optimizer"):
        monkeypatch.setattr(build, name, lambda *args, name=name, **kwargs: built.append(name))
    config = smoke_config(batch_size=15)
    with pytest.raises(ValueError, match=r"batch_size=15 must be a multiple of the 2 replicas"):
        train.run(config, str(tmp_path / "run"), verbose=0, strategy=two_cpu_strategy)
    assert built == []  # no data read, no model built, nothing trained
    assert not os.path.exists(tmp_path / "run")  # nothing written


# ------------------------------------------------- one step, 1 vs 2 replicas


# BiT ResNetV2 with one bottleneck unit per stage: the layers of BiT-R50x1
# (StdConv2D, GroupNorm, pre-activation units, zero-init head) in a graph that
# traces in seconds; R50x1 itself takes ~110 s here, mostly tracing the
# 2-replica step on this 2-core CPU.
_MINI_BIT_DEPTH, _MINI_BIT_UNITS = 14, (1, 1, 1, 1)


@pytest.fixture
def mini_bit(monkeypatch):
    monkeypatch.setitem(models.bit.UNITS_PER_STAGE, _MINI_BIT_DEPTH, _MINI_BIT_UNITS)
    return lambda: models.bit_resnet(_MINI_BIT_DEPTH, 1, num_classes=5, image_size=32)


def _one_distill_step(strategy, make_model, weights, batch):
    with strategy.scope():
        teacher, student = make_model(), make_model()
        teacher.set_weights(weights["teacher"])
        student.set_weights(weights["student"])
        teacher = models.fold_weight_standardization(teacher)  # as build.teachers
        distiller = Distiller(teacher, student, temperature=2.0)
        # SGD, not Adam: Adam's step is invariant to the gradients' scale, so it
        # would hide a loss not divided by the replica count.
        distiller.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=False)
    history = distiller.fit(tf.data.Dataset.from_tensors(batch), epochs=1, verbose=0)
    return [np.array(w) for w in student.get_weights()], history.history["loss"][0]


@pytest.mark.slow
def test_mirrored_step_matches_one_device(mini_bit, two_cpu_strategy):
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    teacher, student = mini_bit(), mini_bit()

    def randomized(model):
        # The BiT head is zero-initialized: give both heads values so that every
        # layer of the student gets a gradient.
        return [rng.normal(0, 0.05, w.shape).astype("float32") if "head_logits" in w.path
                else np.array(w) for w in model.weights]

    weights = {"teacher": randomized(teacher), "student": randomized(student)}
    source = sources.digits_source("train")
    batch = next(iter(data.train_pipeline(source, batch_size=8, student_size=32, seed=0,
                                          epochs=1, shuffle_buffer=64, num_replicas=2)))
    one, one_loss = _one_distill_step(tf.distribute.get_strategy(), mini_bit, weights, batch)
    two, two_loss = _one_distill_step(two_cpu_strategy, mini_bit, weights, batch)
    moved = [np.abs(a - b).max() for a, b in zip(one, weights["student"])]
    diff = [np.abs(a - b).max() for a, b in zip(one, two)]
    print(f"loss {one_loss} vs {two_loss}; moved min {min(moved)}; diff max {max(diff)}")
    assert one_loss > 0.01
    assert two_loss == pytest.approx(one_loss, abs=1e-6)
    assert min(moved) > 0  # every student weight got a gradient
    assert max(moved) > 1e-3
    assert max(diff) <= 1e-6


@pytest.mark.slow
def test_run_with_a_mirrored_strategy(tmp_path, teacher_file, smoke_config, two_cpu_strategy):
    workdir = str(tmp_path / "run")
    report = train.run(smoke_config(teacher=teacher_file), workdir, verbose=0,
                       strategy=two_cpu_strategy)
    assert report["steps"] == 4 and 0 <= report["agreement"] <= 1
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [
        "ckpt-000000002", "ckpt-000000004"]
    assert not any(name.startswith("workertemp") for name in os.listdir(workdir))


# ------------------------------------------------------------- subprocesses


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory, smoke_config):
    """A small random-weight CNN teacher, so subprocess runs skip teacher training."""
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.keras")
    keras.utils.set_random_seed(1)
    config = smoke_config()
    teacher = models.build("cnn:16,32", 10, config.student_size)
    rng = np.random.default_rng(1)
    teacher.get_layer("logits").set_weights(
        [rng.normal(0, 0.3, w.shape).astype("float32") for w in
         teacher.get_layer("logits").get_weights()])
    teacher.save(path)
    return path


def _distill_command(workdir, *overrides):
    return [sys.executable, "-m", "funmatch_keras.app.cli", "distill",
            "--config=digits:smoke=True", f"--workdir={workdir}", "--verbose=0", *overrides]


def _run_processes(commands_and_envs, timeout):
    """Starts the processes, waits for all (killing all on timeout or error)."""
    procs = []
    try:
        for command, env, log in commands_and_envs:
            procs.append(subprocess.Popen(command, env=env, cwd=REPO, stdout=log,
                                          stderr=subprocess.STDOUT))
        deadline = time.time() + timeout
        for proc in procs:
            proc.wait(timeout=max(1, deadline - time.time()))
        return [proc.returncode for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CONFIG", "XLA_FLAGS", distribute.ENV_VAR)}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO, **extra)
    return env


def _read(path):
    with open(path, errors="replace") as f:
        return f.read()


def _tail(path):
    return _read(path)[-3000:]


# Runs `funmatch distill` with the chief's `--overwrite` slowed down: a worker
# that restored before the chief moved the old run aside would resume it.
_SLOW_CHIEF_OVERWRITE = """
import sys, time
from funmatch_keras.app import cli, workdir as workdirs
prepare = workdirs.prepare
def slow_prepare(workdir, config, overwrite):
    if overwrite and "workertemp_" not in workdir:  # the chief, on the shared workdir
        time.sleep(8)
    return prepare(workdir, config, overwrite)
workdirs.prepare = slow_prepare
sys.exit(cli.main(sys.argv[1:]))
"""


def _run_two_workers(tmp_path, workdir, name, overrides, script=None) -> list[str]:
    """Runs a 2-worker `funmatch distill`; returns the two logs' paths."""
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    jobs, logs = [], []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        logs.append(str(tmp_path / f"{name}{index}.log"))
        command = _distill_command(workdir, *overrides, "--verbose=2")
        if script is not None:
            command = [sys.executable, "-c", script, *command[3:]]
        jobs.append((command, _env(TF_CONFIG=json.dumps(tf_config), KERAS_BACKEND="tensorflow"),
                     open(logs[-1], "w")))
    try:
        codes = _run_processes(jobs, timeout=150)
    except subprocess.TimeoutExpired:
        pytest.fail("multi-worker run timed out:\n" + "\n".join(_tail(p) for p in logs))
    finally:
        for _, _, log in jobs:
            log.close()
    assert codes == [0, 0], "\n".join(_tail(p) for p in logs)
    return logs


def _chief_and_worker_students(workdir):
    chief = keras.saving.load_model(os.path.join(workdir, "student.keras"))
    worker = keras.saving.load_model(
        os.path.join(workdir, "workertemp_worker_1", "student.keras"))
    return chief.get_weights(), worker.get_weights()


@pytest.mark.slow
def test_multi_worker_run_on_two_processes(tmp_path, teacher_file):
    workdir = str(tmp_path / "run")
    logs = _run_two_workers(tmp_path, workdir, "worker", [
        f"--config.teacher={teacher_file}", "--config.epochs=1",
        "--config.checkpoint_every_steps=1"])

    # The chief (worker 0) wrote the checkpoints and the report into the workdir...
    for name in ("student.keras", "report.json", "metrics.jsonl", "config.json"):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [
        "ckpt-000000001", "ckpt-000000002"]
    # ...worker 1 only its own student and logs, in its temp dir.
    other = os.path.join(workdir, "workertemp_worker_1")
    assert sorted(os.listdir(other)) == ["config.json", "metrics.jsonl", "student.keras",
                                         "tensorboard"]
    assert sorted(os.listdir(workdir)) == [
        "checkpoints", "config.json", "metrics.jsonl", "report.json", "report.png",
        "student.keras", "tensorboard", "workertemp_worker_1"]
    first_chief, first_worker = _chief_and_worker_students(workdir)
    for a, b in zip(first_chief, first_worker):
        np.testing.assert_array_equal(a, b)
    history = workdirs.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    assert [h["step"] for h in history] == [1, 2]  # a 2-step run logs every step
    assert "Training on 2 replicas (MultiWorkerMirroredStrategy, worker_1)" in _read(logs[1])
    # Each worker has its own input pipeline over its half of the 1,257 digits.
    assert re.search(r"Input pipeline 1 of 2 reads digits-train\S*\[0::2\]: 629 examples",
                     _read(logs[0]))
    assert re.search(r"Input pipeline 2 of 2 reads digits-train\S*\[1::2\]: 628 examples",
                     _read(logs[1]))

    # --overwrite with another lr, the chief slow to move the finished run aside:
    # no worker resumes the old checkpoints; both train the new config from step 0.
    logs = _run_two_workers(tmp_path, workdir, "overwrite", [
        f"--config.teacher={teacher_file}", "--config.epochs=1", "--config.lr=0.003",
        "--config.checkpoint_every_steps=1", "--overwrite"], script=_SLOW_CHIEF_OVERWRITE)
    for log in logs:
        assert "Resuming" not in _read(log), _tail(log)
    assert "--overwrite: moved the previous run" in _read(logs[0])
    chief, worker = _chief_and_worker_students(workdir)
    for a, b in zip(chief, worker):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, old) for a, old in zip(chief, first_chief))
    assert workdirs.read_config(workdir).lr == 0.003


@pytest.mark.slow
def test_jax_data_parallel_run_on_two_host_devices(tmp_path, teacher_file):
    workdir = str(tmp_path / "run")
    log = str(tmp_path / "jax.log")
    env = _env(KERAS_BACKEND="jax", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    command = _distill_command(workdir, f"--config.teacher={teacher_file}",
                               "--config.epochs=3", "--config.steps_per_epoch=4",
                               "--config.log_every_steps=4", "--verbose=1")
    with open(log, "w") as f:
        try:
            codes = _run_processes([(command, env, f)], timeout=150)
        except subprocess.TimeoutExpired:
            pytest.fail("JAX run timed out:\n" + _tail(log))
    assert codes == [0], _tail(log)
    assert "Training on 2 replicas (DataParallel, chief)" in _read(log)
    losses = [h["loss"] for h in workdirs.read_metrics(os.path.join(workdir, "metrics.jsonl"))]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    assert os.path.exists(os.path.join(workdir, "checkpoints", "ckpt-000000012"))
