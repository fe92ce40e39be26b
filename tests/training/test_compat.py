"""The Keras multi-worker patch (tensorflow#72388): what it relies on, when it applies."""

import inspect
import os
import subprocess
import sys
import textwrap

import keras
import pytest
import tensorflow as tf

from funmatch_keras.distiller import Distiller
from funmatch_keras.training import compat, distribute

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def unpatched(monkeypatch):
    """Keras's TF trainer as shipped, restored (patched or not) after the test."""
    trainer = compat._trainer_module()
    reduce = trainer.reduce_per_replica
    build = trainer.TensorFlowTrainer.__dict__["_maybe_symbolic_build"]
    monkeypatch.setattr(trainer, "reduce_per_replica", getattr(reduce, "__wrapped__", reduce))
    monkeypatch.setattr(trainer.TensorFlowTrainer, "_maybe_symbolic_build",
                        getattr(build, "__wrapped__", build))
    return trainer


class FakeMultiWorker:
    """Stands in for a MultiWorkerMirroredStrategy (a real one must start the process)."""

    num_replicas_in_sync = 2
    cluster_resolver = None


@pytest.fixture
def calls(monkeypatch):
    """Records calls of `patch_keras_for_multi_worker` instead of patching."""
    recorded = []
    monkeypatch.setattr(tf.distribute, "MultiWorkerMirroredStrategy", FakeMultiWorker)
    monkeypatch.setattr(compat, "patch_keras_for_multi_worker",
                        lambda: recorded.append("patch") or True)
    return recorded


def test_patched_functions_have_the_signatures_the_patch_relies_on(unpatched):
    # If this fails after a Keras upgrade, read the new trainer before changing
    # PATCHED_SIGNATURES (and compat._apply with it).
    assert tuple(inspect.signature(unpatched.reduce_per_replica).parameters) == (
        compat.PATCHED_SIGNATURES["reduce_per_replica"])
    build = unpatched.TensorFlowTrainer._maybe_symbolic_build
    assert tuple(inspect.signature(build).parameters) == (
        compat.PATCHED_SIGNATURES["TensorFlowTrainer._maybe_symbolic_build"])
    assert compat.signatures_match()
    # The installed Keras still has the faulty reduction, so the gate is open.
    assert compat.has_faulty_reduction()
    assert compat.needs_patch() == compat.in_patched_range()


def test_gate_is_the_known_faulty_versions(monkeypatch, unpatched):
    assert compat.in_patched_range("3.0.0") and compat.in_patched_range("3.15.1")
    assert not compat.in_patched_range("2.15.0")
    assert not compat.in_patched_range("3.16.0") and not compat.in_patched_range("4.0.0")
    monkeypatch.setattr(keras, "version", lambda: "3.16.0")
    with pytest.warns(UserWarning, match="has not been checked"):
        assert compat.patch_keras_for_multi_worker() is False
    assert not compat.is_patched()
    # A trainer without the faulty line (e.g. fixed by a vendor) is left alone.
    monkeypatch.setattr(keras, "version", lambda: "3.15.1")
    monkeypatch.setattr(compat, "has_faulty_reduction", lambda: False)
    assert compat.patch_keras_for_multi_worker() is False and not compat.is_patched()


def test_patch_is_idempotent_and_changes_nothing_on_one_worker(unpatched, two_cpu_strategy):
    original = unpatched.reduce_per_replica
    assert not compat.is_patched()
    assert compat.patch_keras_for_multi_worker() is True
    patched = unpatched.reduce_per_replica
    assert compat.is_patched() and patched is not original and patched.__wrapped__ is original
    assert compat.patch_keras_for_multi_worker() is True
    assert unpatched.reduce_per_replica is patched  # not wrapped twice
    assert compat.has_faulty_reduction()  # still reads Keras's own source
    # Off a multi-worker cluster, the patched function is Keras's.
    value = tf.constant(3.0)
    assert float(patched(value, tf.distribute.get_strategy(), "auto")) == 3.0
    strategy = two_cpu_strategy
    per_replica = strategy.run(lambda: tf.constant(2.0))
    assert float(patched(per_replica, strategy, "mean")) == 2.0


def test_replication_of_a_multi_worker_strategy_applies_it(calls, two_cpu_strategy):
    replicas = distribute.replication(FakeMultiWorker())
    assert calls == ["patch"]
    assert (replicas.kind, replicas.num_replicas, replicas.is_chief) == (
        "MultiWorkerMirroredStrategy", 2, True)
    distribute.replication(two_cpu_strategy)
    distribute.replication("default")
    assert calls == ["patch"]  # other strategies are left alone


def test_distiller_compiled_under_a_multi_worker_strategy_applies_it(calls, monkeypatch):
    def distiller():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        return Distiller(model, keras.models.clone_model(model))

    distiller().compile(optimizer="sgd")
    assert calls == []
    monkeypatch.setattr(Distiller, "distribute_strategy",
                        property(lambda self: FakeMultiWorker()))
    distiller().compile(optimizer="sgd")
    assert calls == ["patch"]


def test_patch_for_strategy_is_a_no_op_for_none_and_other_strategies(calls):
    assert compat.patch_for_strategy(None) is False
    compat.patch_for_strategy(tf.distribute.get_strategy())
    assert calls == []
    assert compat.patch_for_strategy(FakeMultiWorker()) is True and calls == ["patch"]


REAL_STRATEGY = textwrap.dedent(
    """
    import numpy as np, keras, tensorflow as tf
    from funmatch_keras import compat, distribute
    from funmatch_keras.distiller import Distiller
    strategy = tf.distribute.MultiWorkerMirroredStrategy()  # one worker: no TF_CONFIG
    assert not compat.is_patched()
    with strategy.scope():  # built and compiled by the user, no funmatch helper
        teacher = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        student = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        distiller = Distiller(teacher, student)
        distiller.compile(optimizer="sgd")
    assert compat.is_patched()
    assert distribute.replication(strategy).kind == "MultiWorkerMirroredStrategy"
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    y = np.arange(8) % 3
    history = distiller.fit(x, y, batch_size=4, epochs=1, verbose=0)
    logs = distiller.evaluate(x, y, batch_size=4, verbose=0, return_dict=True)
    assert sorted(history.history) == ["loss"], history.history
    assert sorted(logs) == ["agreement", "kl", "loss", "student_top1", "teacher_top1"]
    print("OK")
    """
)


def test_a_real_multi_worker_strategy_built_by_the_user():
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "XLA_FLAGS")}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow",
               PYTHONPATH=os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", REAL_STRATEGY], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
