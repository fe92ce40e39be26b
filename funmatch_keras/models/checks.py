"""`check_teacher(model, image_size)`: a teacher is checked once, before it teaches.

A teacher that cannot teach often still trains a student without an error: one
that outputs probabilities (a final softmax) makes the distillation softmax
flatten them, one with broken weights outputs NaN, and one built for another
input size fails only at the first step. `check_teacher` finds these when the
teachers are built, by its input shape and one forward pass on a random image.
"""

from __future__ import annotations

import keras
import numpy as np

# Rows of non-negative outputs summing to 1 within this are probabilities
# (loose enough for a bfloat16 softmax; logits essentially never do this).
_PROBABILITY_ATOL = 1e-2


def check_teacher(model: keras.Model, image_size: int, name: str | None = None,
                  size_flag: str = "--config.teacher_size") -> None:
    """Raises if `model` cannot teach at `image_size`: input size, logits, finiteness.

    Checks that a fixed input size of `model` is `image_size` (a model taking
    any size passes), then runs it once on one random image in [-1, 1] and
    checks that its outputs are finite and are logits, not probabilities
    (non-negative rows summing to 1, the sign of a final softmax).

    Args:
        model: keras.Model. The teacher, mapping images to `(batch, classes)`.
        image_size: int. The square input size the teacher will be given.
        name: str. How the error names the teacher. Defaults to `model.name`.
        size_flag: str. The setting that the size error tells to change.
            Defaults to `"--config.teacher_size"`.

    Raises:
        ValueError: naming the problem and the fix.

    Example:
    >>> def net(activation=None, size=16):
    ...     inputs = keras.Input((size, size, 3))
    ...     x = keras.layers.GlobalAveragePooling2D()(inputs)
    ...     return keras.Model(inputs, keras.layers.Dense(4, activation=activation)(x))
    >>> check_teacher(net(), 16)  # logits: fine
    >>> try:
    ...     check_teacher(net("softmax"), 16, name="t.keras")
    ... except ValueError as error:
    ...     print(str(error)[:57])
    The teacher 't.keras' outputs probabilities (non-negative
    >>> try:
    ...     check_teacher(net(size=24), 16, name="t.keras")
    ... except ValueError as error:
    ...     print(str(error)[:92])
    The teacher 't.keras' takes 24x24 images but is given 16x16: set --config.teacher_size to 24
    """
    label = f"The teacher {name or model.name!r}"
    _check_input_size(model, image_size, label, size_flag)
    image = np.random.default_rng(0).uniform(-1, 1, (1, image_size, image_size, 3))
    outputs = keras.tree.flatten(model(image.astype("float32"), training=False))
    if len(outputs) != 1:
        return  # several outputs: the Distiller says which one it needs
    values = np.asarray(keras.ops.convert_to_numpy(outputs[0]), np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError(
            f"{label} outputs non-finite values (NaN or inf) on a random image: its "
            "weights are broken (a diverged training run or a corrupt file). Use "
            "another checkpoint.")
    if (values.ndim == 2 and values.shape[-1] > 1 and np.all(values >= 0)
            and np.allclose(values.sum(axis=-1), 1.0, atol=_PROBABILITY_ATOL)):
        raise ValueError(
            f"{label} outputs probabilities (non-negative, each row summing to 1), "
            "not logits: distillation applies its own softmax (at temperature T) to "
            "logits. Pass the model without its final softmax / use logits: e.g. "
            "save keras.Model(model.input, model.layers[-2].output) (the layer "
            "before the softmax), or build keras.applications with "
            "classifier_activation=None.")


def _check_input_size(model: keras.Model, image_size: int, label: str,
                      size_flag: str) -> None:
    if len(model.inputs) != 1:
        return
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4:
        return
    fixed = [side for side in shape[1:3] if side is not None]
    if all(side == image_size for side in fixed):
        return
    taken = "x".join("?" if side is None else str(side) for side in shape[1:3])
    raise ValueError(
        f"{label} takes {taken} images but is given {image_size}x{image_size}: set "
        f"{size_flag} to {fixed[0]} (the size it was built and trained at), or "
        f"rebuild it at {image_size}. The student's size may differ from the "
        "teacher's.")
