"""Shared test setup: quiet TensorFlow, two logical CPUs for tf.distribute tests."""

import functools
import os

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


@functools.lru_cache(maxsize=None)
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


# -- the export and ship tests: a tiny CNN student trained on digits at 32 px -----------


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
    from tests.export_fixtures import tiny_student

    model = tiny_student()
    model.compile(
        keras.optimizers.Adam(3e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x_train, y_train, epochs=6, batch_size=64, verbose=0)
    return model
