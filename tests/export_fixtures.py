"""The export and ship tests' tiny CNN student at 32 px (their fixtures: tests/conftest.py)."""

import keras

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
