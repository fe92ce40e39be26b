"""The function-matching distillation loss."""

from __future__ import annotations

import math

import keras
from keras import ops


def check_temperature(temperature: float) -> float:
    """Returns `temperature` as a float, or raises unless it is a finite number > 0.

    Shared by `DistillationKL` and `Distiller`, so both reject the same values
    with the same message. (An infinite T makes every softmax uniform, and the
    T² factor of the loss makes the weights NaN.)

    Raises:
        TypeError: not a number (e.g. a string, or a bool).
        ValueError: NaN, infinite, or not > 0.

    Example:
    >>> check_temperature(2)
    2.0
    """
    try:
        value = None if isinstance(temperature, (str, bytes, bool)) else float(temperature)
    except (TypeError, ValueError):
        value = None
    if value is None:
        raise TypeError("`temperature` must be a number > 0 (the paper sweeps 1, 2, 5, 10). "
                        f"Received: temperature={temperature!r} (a {type(temperature).__name__})")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            "`temperature` must be a finite number > 0 (the paper sweeps 1, 2, 5, 10). "
            f"Received: temperature={temperature}"
        )
    return value


def kl_divergence_from_logits(
    teacher_logits, student_logits, temperature: float = 1.0
):
    """Per-example `KL(softmax(t/T) || softmax(s/T))`, from log-softmax in float32."""
    t = ops.cast(teacher_logits, "float32") / temperature
    s = ops.cast(student_logits, "float32") / temperature
    log_p_teacher = ops.log_softmax(t, axis=-1)
    log_p_student = ops.log_softmax(s, axis=-1)
    p_teacher = ops.exp(log_p_teacher)
    return ops.sum(p_teacher * (log_p_teacher - log_p_student), axis=-1)


@keras.saving.register_keras_serializable(package="funmatch_keras")
class DistillationKL(keras.losses.Loss):
    """`T² · KL(softmax(t/T) ‖ softmax(s/T))` per example; Keras reduces it.

    Called as `loss(teacher_logits, student_logits)` (the teacher takes the
    place of `y_true`). Computed from log-softmax in float32, so it is exact for
    any logits (no clipped probabilities) and bfloat16 models lose nothing.
    Reduction is Keras's, which also divides by the replica count under
    `tf.distribute`. The `T²` factor keeps gradient magnitudes comparable across
    temperatures (Hinton et al., 2015).

    Args:
        temperature: float > 0. Softmax temperature T. Defaults to `1.0`.
        reduction: str. Keras loss reduction. Defaults to `"sum_over_batch_size"`.
        name: str. Defaults to `"distillation_kl"`.

    Example:
    >>> import numpy as np
    >>> loss = DistillationKL(temperature=2.0)
    >>> t = np.array([[1.0, 2.0, 3.0]])
    >>> float(loss(t, t))
    0.0

    Reference: Beyer et al., "Knowledge distillation: A good teacher is patient
    and consistent", CVPR 2022.
    """

    def __init__(
        self,
        temperature: float = 1.0,
        reduction: str = "sum_over_batch_size",
        name: str = "distillation_kl",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.temperature = check_temperature(temperature)

    def call(self, y_true, y_pred):
        kl = kl_divergence_from_logits(y_true, y_pred, self.temperature)
        return kl * (self.temperature**2)

    def get_config(self):
        config = super().get_config()
        config["temperature"] = self.temperature
        return config
