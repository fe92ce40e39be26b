"""Shared by the export and ship tests: a tiny CNN student trained on digits at 32 px."""

import keras
import numpy as np
import pytest
from sklearn.datasets import load_digits

SIZE = 32


def tiny_student(input_size=SIZE) -> keras.Model:
    inputs = keras.Input((input_size, input_size, 3), name="images")
    x = inputs
    for filters in (16, 32, 64):
        x = keras.layers.Conv2D(filters, 3, 2, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization(momentum=0.9)(x)
        x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x), name="tiny_student")


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
    model = tiny_student()
    model.compile(
        keras.optimizers.Adam(3e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x_train, y_train, epochs=6, batch_size=64, verbose=0)
    return model
