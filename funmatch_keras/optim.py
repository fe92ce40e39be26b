"""The paper's optimizer: Adam with decoupled weight decay, warmup and cosine decay."""

from __future__ import annotations

import keras

# Decay only conv/dense kernels (names ending in "kernel", incl. depthwise ones),
# never GroupNorm scale/offset or biases (DESIGN §2). Keras matches this regex
# against each variable's name and *excludes* the variables it finds. Under
# TensorFlow, Keras matches the underlying tf.Variable, named e.g. "kernel:0".
_NOT_A_KERNEL = r"^(?!.*kernel(:\d+)?$)"


def warmup_cosine(lr: float, total_steps: int, warmup_steps: int):
    """Linear warmup from 0 to `lr` over `warmup_steps`, then cosine to 0 at `total_steps`.

    Example:
    >>> schedule = warmup_cosine(1e-2, total_steps=100, warmup_steps=10)
    >>> round(float(schedule(5)), 6), round(float(schedule(100)), 6)
    (0.005, 0.0)
    """
    if total_steps <= 0:
        raise ValueError(f"`total_steps` must be > 0. Received: total_steps={total_steps}")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(
            "`warmup_steps` must be in [0, total_steps). "
            f"Received: warmup_steps={warmup_steps}, total_steps={total_steps}"
        )
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_steps else lr,
        decay_steps=total_steps - warmup_steps,
        alpha=0.0,
        warmup_target=lr if warmup_steps else None,
        warmup_steps=warmup_steps,
    )


def adamw(
    lr: float,
    weight_decay: float,
    total_steps: int,
    warmup_steps: int = 0,
    clipnorm: float | None = 1.0,
) -> keras.optimizers.AdamW:
    """Adam + decoupled weight decay with the paper's semantics, as a Keras `AdamW`.

    The update is `Δw = −s(t)·(lr·adam_direction + wd·w)`: the decay is scaled
    by the schedule `s(t)` but *not* by the learning rate (big_vision /
    optax convention). Keras's `AdamW` multiplies its `weight_decay` by the
    current learning rate `lr·s(t)`, so it gets `weight_decay / lr`. Only
    kernels are decayed; gradients are clipped by global norm; Adam's ε is 1e-8.

    Args:
        lr: float. Peak learning rate.
        weight_decay: float. Decay per step at the peak, not multiplied by lr.
        total_steps: int. Length of the schedule (the lr reaches 0 there).
        warmup_steps: int. Linear warmup steps. Defaults to `0`.
        clipnorm: float or None. Global gradient-norm clip. Defaults to `1.0`.

    Returns:
        A `keras.optimizers.AdamW`.

    Example:
    >>> opt = adamw(lr=1e-2, weight_decay=1e-5, total_steps=1000, warmup_steps=100)
    >>> round(opt.weight_decay, 6)
    0.001
    """
    if lr <= 0:
        raise ValueError(f"`lr` must be > 0. Received: lr={lr}")
    if weight_decay < 0:
        raise ValueError(f"`weight_decay` must be >= 0. Received: weight_decay={weight_decay}")
    optimizer = keras.optimizers.AdamW(
        learning_rate=warmup_cosine(lr, total_steps, warmup_steps),
        weight_decay=weight_decay / lr,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-8,
        global_clipnorm=clipnorm,
    )
    optimizer.exclude_from_weight_decay(var_names=[_NOT_A_KERNEL])
    return optimizer
