"""Every class the package registers with Keras loads in a fresh `import keras, funmatch_keras`.

The registered names are read from Keras after importing the whole package, so a
class registered tomorrow is parametrized here tomorrow, and fails until it has a
factory below that saves a model using it.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

import funmatch_keras as fm
from funmatch_keras import keras_objects

_ROOT = Path(__file__).resolve().parents[2]
_SIZE, _CLASSES = 32, 5


def _all_package_modules() -> list[str]:
    names = ["funmatch_keras"]
    for info in pkgutil.walk_packages(fm.__path__, "funmatch_keras."):
        names.append(info.name)
    return names


def _registered_names() -> list[str]:
    for name in _all_package_modules():
        importlib.import_module(name)
    return sorted(keras_objects.registered())


def _fresh_python(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    environment.update(PYTHONPATH=str(_ROOT), TF_CPP_MIN_LOG_LEVEL="2", **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=_ROOT,
                          env=environment, capture_output=True, text=True, timeout=300)


def _images(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (4, _SIZE, _SIZE, 3)).astype("float32")


def _small_model() -> keras.Model:
    return fm.models.small_cnn([4, 8], num_classes=_CLASSES, image_size=_SIZE)


def _trained_one_step(model: keras.Model, optimizer, loss="sparse_categorical_crossentropy"):
    model.compile(optimizer=optimizer, loss=loss)
    labels = np.arange(4) % _CLASSES
    model.fit(_images(1), labels, batch_size=4, epochs=1, verbose=0)
    return model


# Registered name -> a model that uses the object, saved as a user would save it.
# Each returns the model; `expect` (optional) describes what the fresh process checks.
def _std_conv2d():
    return fm.models.build("bit_r50x1", _CLASSES, _SIZE), {}


def _distillation_kl():
    model = _small_model()
    model.compile(optimizer="adam", loss=fm.DistillationKL(temperature=3.0))
    return model, {"loss": ["DistillationKL", {"temperature": 3.0}]}


def _shampoo():
    optimizer = fm.optim.shampoo(1e-2, 1e-5, total_steps=10, block_size=16,
                                 precondition_every=1, start_preconditioning_step=1)
    return _trained_one_step(_small_model(), optimizer), {"optimizer": "Shampoo"}


def _bit_hyperrule_schedule():
    from funmatch_keras.app.train_teacher import bit_hyperrule_optimizer

    optimizer = bit_hyperrule_optimizer(batch_size=512, total_steps=100)
    model = _trained_one_step(_small_model(), optimizer)
    # 0.003 at batch 512, warmed up by step 10, divided by 10 once from step 30.
    return model, {"optimizer": "SGD", "schedule": "BitHyperRuleSchedule", "lr_at_40": 3e-4}


FACTORIES = {
    "funmatch_keras>StdConv2D": _std_conv2d,
    "funmatch_keras>DistillationKL": _distillation_kl,
    "funmatch_keras>Shampoo": _shampoo,
    "funmatch_keras>BitHyperRuleSchedule": _bit_hyperrule_schedule,
}

_LOAD_ALL = """
import json, sys
import keras, funmatch_keras
import numpy as np
out = {}
for name, path in json.loads(sys.argv[1]).items():
    model = keras.saving.load_model(path)  # compile=True, safe_mode=True: Keras's defaults
    record = {"logits": np.asarray(model(np.load(path + ".x.npy"))).tolist()}
    if getattr(model, "optimizer", None) is not None and model.compiled:
        record["optimizer"] = type(model.optimizer).__name__
        schedule = model.optimizer._learning_rate
        if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
            record["schedule"] = type(schedule).__name__
            record["lr_at_40"] = float(schedule(40))
    loss = getattr(model, "loss", None)
    if loss is not None and not isinstance(loss, str):
        record["loss"] = [type(loss).__name__, {"temperature": loss.temperature}]
    out[name] = record
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    """Saves one model per registered object here; loads all in one fresh process."""
    folder = tmp_path_factory.mktemp("keras_objects")
    paths, expected = {}, {}
    for name, factory in FACTORIES.items():
        model, expect = factory()
        path = str(folder / (name.split(">")[1] + ".keras"))
        model.save(path)
        x = _images()
        np.save(path + ".x.npy", x)
        paths[name] = path
        expected[name] = dict(expect, logits=np.asarray(model(x)))
    loaded = _fresh_python(_LOAD_ALL.replace("sys.argv[1]", repr(json.dumps(paths))))
    assert loaded.returncode == 0, loaded.stderr[-4000:]
    results = json.loads(loaded.stdout.split("RESULT", 1)[1])
    return expected, results


@pytest.mark.xdist_group("keras_objects")
@pytest.mark.parametrize("name", _registered_names())
def test_a_model_using_it_loads_in_a_fresh_process(name, round_trip):
    assert name in FACTORIES, (
        f"{name} is registered with Keras but has no factory in {__file__}: add one that "
        "saves a model using it, so its fresh-process load is tested.")
    expected, results = round_trip
    got = results[name]
    np.testing.assert_allclose(np.asarray(got.pop("logits")), expected[name].pop("logits"),
                               rtol=0, atol=1e-5)
    for field, value in expected[name].items():
        assert got.get(field) == pytest.approx(value) if isinstance(value, float) \
            else got.get(field) == value, (field, got)


def test_the_factories_cover_only_registered_names():
    # A factory for a name no longer registered would test nothing.
    assert set(FACTORIES) == set(_registered_names())


@pytest.mark.slow
def test_registration_lives_in_the_listed_modules():
    result = _fresh_python("""
        import importlib, pkgutil
        import keras, funmatch_keras
        from funmatch_keras import keras_objects
        before = set(keras_objects.registered())
        for info in pkgutil.walk_packages(funmatch_keras.__path__, "funmatch_keras."):
            importlib.import_module(info.name)
        after = set(keras_objects.registered())
        print(sorted(before), sorted(after - before))
        assert before and after == before, sorted(after - before)
    """)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]


# Whatever a user imports first, the classes are registered once Keras is loaded.
_ORDERS = [
    "import funmatch_keras; import keras",
    "import keras; import funmatch_keras",
    "import funmatch_keras.optim.shampoo_optimizer; import keras",
    "import funmatch_keras.optim.matrix_roots; import keras",
    "from funmatch_keras.optim.optimizers import adamw",
    "from funmatch_keras.models import bit_r50x1",
    "from funmatch_keras.app import cli; import keras",
]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_registered_in_any_import_order(backend):
    if backend == "jax":
        pytest.importorskip("jax")
    # On JAX, the orders where Keras is first imported by another module than ours.
    for order in _ORDERS if backend == "tensorflow" else _ORDERS[:2]:
        result = _fresh_python(order + "\nfrom funmatch_keras import keras_objects\n"
                               "print('REGISTERED', sorted(keras_objects.registered()))",
                               KERAS_BACKEND=backend)
        assert result.returncode == 0, (order, result.stderr[-3000:])
        assert f"REGISTERED {sorted(FACTORIES)}" in result.stdout, (order, result.stdout)
