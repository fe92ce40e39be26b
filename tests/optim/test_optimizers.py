import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from funmatch_keras.optim import optimizers as optim


def paper_schedule(step, lr, total, warmup):
    """big_vision's linear warmup + cosine-to-zero, written out independently."""
    if step < warmup:
        return lr * step / warmup
    progress = (step - warmup) / (total - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


@pytest.mark.parametrize("step", [0, 1, 50, 99, 100, 101, 400, 777, 999, 1000])
def test_learning_rate_follows_warmup_cosine(step):
    schedule = optim.warmup_cosine(3e-3, total_steps=1000, warmup_steps=100)
    assert float(schedule(step)) == pytest.approx(paper_schedule(step, 3e-3, 1000, 100), abs=1e-9)


def test_no_warmup_starts_at_peak():
    schedule = optim.warmup_cosine(1e-2, total_steps=10, warmup_steps=0)
    assert float(schedule(0)) == pytest.approx(1e-2)


def test_weight_decay_not_multiplied_by_lr_and_only_on_kernels():
    lr, wd = 1e-2, 1e-3
    inputs = keras.Input((3,))
    x = keras.layers.Dense(4, bias_initializer="ones")(inputs)
    x = keras.layers.GroupNormalization(groups=2, gamma_initializer="ones")(x)
    model = keras.Model(inputs, x)
    # warmup_steps=0 so step 0 runs at the peak lr, where s(t) = 1.
    optimizer = optim.adamw(lr=lr, weight_decay=wd, total_steps=100, warmup_steps=0)
    before = {v.path: v.numpy().copy() for v in model.trainable_variables}
    zeros = [tf.zeros_like(v) for v in model.trainable_variables]
    optimizer.apply_gradients(zip(zeros, model.trainable_variables))
    for v in model.trainable_variables:
        if v.path.endswith("kernel"):
            # Δw = −s(t)·wd·w with zero gradient (Adam's direction is 0).
            np.testing.assert_allclose(v.numpy(), before[v.path] * (1 - wd), rtol=1e-6)
        else:
            np.testing.assert_array_equal(v.numpy(), before[v.path])


def test_clipping_and_epsilon():
    optimizer = optim.adamw(lr=1e-3, weight_decay=0.0, total_steps=10)
    assert optimizer.global_clipnorm == 1.0 and optimizer.epsilon == 1e-8


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=0, weight_decay=0, total_steps=10), "lr=0"),
    (dict(lr=1e-3, weight_decay=-1, total_steps=10), "weight_decay=-1"),
    (dict(lr=1e-3, weight_decay=0, total_steps=10, warmup_steps=10), "warmup_steps=10"),
    (dict(lr=1e-3, weight_decay=0, total_steps=0), "total_steps=0"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optim.adamw(**kwargs)
