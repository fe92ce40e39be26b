"""Shared test setup and fixtures: quiet TensorFlow, two logical CPUs for tf.distribute
tests, the digits smoke config, a NumPy reference of the loss, toy and tiny models.

Fixtures are found by pytest, never imported: a folder's own `conftest.py` holds those
only its tests use (tests/data/conftest.py: images and TFRecords; tests/optim/conftest.py).
"""

import os
import types

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

# Must happen before TensorFlow initializes its devices: MirroredStrategy tests
# need two replicas, and this machine has one physical CPU device.
_cpus = tf.config.list_physical_devices("CPU")
try:
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
    )
except RuntimeError:  # already initialized by an earlier import
    pass


@pytest.fixture(scope="session")
def two_cpu_strategy() -> tf.distribute.MirroredStrategy:
    """The session's one 2-replica MirroredStrategy over the two logical CPUs.

    Shared: two MirroredStrategy objects in one process collide on collective
    instance keys ("Shape mismatch in the collective instance").
    """
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    if len(devices) < 2:
        pytest.skip("two logical CPU devices are not available")
    return tf.distribute.MirroredStrategy(devices)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _op_determinism_stays_in_its_test():
    """`train.run(deterministic=True)` turns TF op determinism on for the process;
    Keras then silently drops `jit_compile=True`, which would change what later
    tests on the same xdist worker measure."""
    from tensorflow.python.framework import config as tf_config

    was_on = tf_config.is_op_determinism_enabled()
    yield
    if tf_config.is_op_determinism_enabled() and not was_on:
        tf_config.disable_op_determinism()


def _smoke_config(**overrides):
    """The digits smoke config, with `--config.FIELD=VALUE` overrides (any value, as text)."""
    from funmatch_keras import configs

    config = configs.load_config("digits:smoke=True")
    return configs.apply_overrides(config, {k: str(v) for k, v in overrides.items()})


@pytest.fixture(scope="session")
def smoke_config():
    """`smoke_config(epochs=2, lr=0.5)`: the digits smoke config with those overrides."""
    return _smoke_config


def _numpy_distillation_kl(teacher, student, temperature):
    """Independent reference: T² · KL(softmax(t/T) ‖ softmax(s/T)), per example."""

    def log_softmax(z):
        z = z - z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))

    log_p = log_softmax(teacher.astype(np.float64) / temperature)
    log_q = log_softmax(student.astype(np.float64) / temperature)
    return temperature**2 * (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)


@pytest.fixture(scope="session")
def numpy_kl():
    """`numpy_kl(teacher_logits, student_logits, temperature)`: the loss per example, float64."""
    return _numpy_distillation_kl


# -- the Distiller tests: a toy task of 5 classes, small MLPs ---------------------------

_TOY_CLASSES = 5


def _mlp(input_dim=6, num_classes=_TOY_CLASSES, seed=0, hidden=8):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((input_dim,)), keras.layers.Dense(hidden, activation="relu"),
         keras.layers.Dense(num_classes)]
    )


def _toy_data(rng, n=16, dim=6):
    return rng.normal(size=(n, dim)).astype(np.float32), rng.integers(0, _TOY_CLASSES, n)


@pytest.fixture(scope="session")
def toy():
    """`toy.mlp(seed=1)`, `toy.data(rng)` -> (x, y), over `toy.NUM_CLASSES` classes."""
    return types.SimpleNamespace(NUM_CLASSES=_TOY_CLASSES, mlp=_mlp, data=_toy_data)


# -- the export tests: a tiny CNN student trained on digits at 32 px ---------------------


def _tiny_student(input_size=32) -> keras.Model:
    inputs = keras.Input((input_size, input_size, 3), name="images")
    x = inputs
    for filters in (16, 32, 64):
        x = keras.layers.Conv2D(filters, 3, 2, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization(momentum=0.9)(x)
        x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x), name="tiny_student")


@pytest.fixture(scope="session")
def tiny_student():
    """`tiny_student(input_size=32)`: a new untrained tiny CNN of 10 classes."""
    return _tiny_student


@pytest.fixture(scope="module")
def digits():
    """(train images, train labels, eval images): 32x32x3 floats in [-1, 1]."""
    data = load_digits()
    images = data.images.astype(np.float32) / 8.0 - 1.0  # 0..16 -> [-1, 1]
    images = images.repeat(4, axis=1).repeat(4, axis=2)[..., None].repeat(3, axis=-1)
    return images[:1400], data.target[:1400], images[1400:1600]


@pytest.fixture(scope="module")
def student(digits):
    x_train, y_train, _ = digits
    keras.utils.set_random_seed(0)
    model = _tiny_student()
    model.compile(
        keras.optimizers.Adam(3e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x_train, y_train, epochs=6, batch_size=64, verbose=0)
    return model


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """`--dist loadgroup`: the `xdist_group` suffix on node ids, which pytest-xdist 3.8 sets
    on `item._nodeid`, a name pytest 9 no longer reads (without it no group stays together)."""
    if not getattr(config.option, "loadgroup", False):
        return
    try:
        from _pytest.nodeid import coerce_node_id  # pytest >= 9.2, which reads `_id`
    except ImportError:
        return  # an older pytest reads the `_nodeid` that pytest-xdist writes

    for item in items:
        groups = sorted({str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
                         for mark in item.iter_markers("xdist_group")})
        if groups and "@" not in item.nodeid:
            item._id = coerce_node_id(f"{item.nodeid}@{'_'.join(groups)}")
