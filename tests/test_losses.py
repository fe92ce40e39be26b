import numpy as np
import pytest
import tensorflow as tf

from funmatch_keras.losses import DistillationKL


def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0, 10.0])
def test_matches_numpy_reference(rng, temperature, numpy_kl):
    teacher = rng.normal(scale=4.0, size=(16, 37)).astype(np.float32)
    student = rng.normal(scale=4.0, size=(16, 37)).astype(np.float32)
    loss = DistillationKL(temperature=temperature)
    expected = numpy_kl(teacher, student, temperature)
    np.testing.assert_allclose(float(loss(teacher, student)), expected.mean(), rtol=1e-6, atol=1e-6)
    per_example = DistillationKL(temperature=temperature, reduction=None)(teacher, student)
    np.testing.assert_allclose(np.asarray(per_example), expected, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(per_example) >= 0)


def test_zero_for_identical_logits_and_extreme_values(rng):
    logits = rng.normal(scale=50.0, size=(8, 10)).astype(np.float32)
    assert float(DistillationKL(2.0)(logits, logits)) == pytest.approx(0.0, abs=1e-6)
    # Log-softmax keeps huge logits finite where clipped probabilities would not.
    huge = np.array([[1e4, 0.0, -1e4]], np.float32)
    assert np.isfinite(float(DistillationKL()(huge, -huge)))


def test_bfloat16_inputs_are_computed_in_float32(rng):
    teacher = rng.normal(size=(4, 5)).astype(np.float32)
    student = rng.normal(size=(4, 5)).astype(np.float32)
    loss = DistillationKL(3.0)
    value = loss(tf.cast(teacher, tf.bfloat16), tf.cast(student, tf.bfloat16))
    assert value.dtype == tf.float32


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_gradient_is_t_times_softmax_difference(rng, temperature):
    teacher = rng.normal(size=(6, 7)).astype(np.float32)
    student = tf.Variable(rng.normal(size=(6, 7)).astype(np.float32))
    with tf.GradientTape() as tape:
        value = DistillationKL(temperature)(teacher, student)
    grad = tape.gradient(value, student).numpy()
    s = student.numpy()
    expected = temperature * (softmax(s / temperature) - softmax(teacher / temperature)) / len(s)
    np.testing.assert_allclose(grad, expected, atol=1e-6)


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_rejects_non_positive_temperature(bad):
    with pytest.raises(ValueError, match=f"temperature={bad}"):
        DistillationKL(temperature=bad)


def test_serialization_roundtrip():
    import keras

    loss = DistillationKL(temperature=5.0)
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(restored, DistillationKL) and restored.temperature == 5.0
