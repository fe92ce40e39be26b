"""A small plain CNN, for quick offline runs (the bundled digits demo and tests)."""

from __future__ import annotations

from typing import Sequence

import keras


def small_cnn(
    widths: Sequence[int],
    num_classes: int,
    image_size: int | None = None,
    dtype: str | None = None,
    name: str = "small_cnn",
) -> keras.Model:
    """Conv3x3 → GroupNorm → ReLU stages (max-pool between them) → GAP → Dense.

    GroupNorm rather than BatchNorm, as in BiT: no batch statistics, so the
    model behaves the same in training and inference and under mixup.

    Args:
        widths: sequence of int. Channels of each stage.
        num_classes: int. Number of output logits.
        image_size: int or None. Square input size; None accepts any size.
        dtype: str or None. Keras dtype policy, e.g. `"mixed_bfloat16"`.
        name: str. Model name.

    Returns:
        A functional `keras.Model` mapping images in [-1, 1] to float32 logits.

    Example:
    >>> model = small_cnn([8, 16], num_classes=10, image_size=16)
    >>> model.output_shape
    (None, 10)
    """
    if not widths or any(int(w) <= 0 for w in widths):
        raise ValueError(f"`widths` must be positive channel counts. Received: widths={widths}")
    inputs = keras.Input((image_size, image_size, 3), name="images")
    x = inputs
    for i, width in enumerate(widths):
        x = keras.layers.Conv2D(
            width, 3, padding="same", use_bias=False, dtype=dtype, name=f"stage{i}_conv"
        )(x)
        x = keras.layers.GroupNormalization(
            groups=max(1, min(8, width // 4)), dtype=dtype, name=f"stage{i}_norm"
        )(x)
        x = keras.layers.ReLU(dtype=dtype, name=f"stage{i}_relu")(x)
        if i < len(widths) - 1:
            x = keras.layers.MaxPool2D(dtype=dtype, name=f"stage{i}_pool")(x)
    x = keras.layers.GlobalAveragePooling2D(dtype=dtype, name="pool")(x)
    # Logits in float32 whatever the compute dtype (docs/design.md §4.2).
    logits = keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)
    return keras.Model(inputs, logits, name=name)
