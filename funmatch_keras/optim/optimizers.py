"""The paper's optimizers: Adam or Shampoo, decoupled weight decay, warmup and cosine decay."""

from __future__ import annotations

import keras

from funmatch_keras.optim.shampoo_optimizer import Shampoo

__all__ = ["Shampoo", "adamw", "shampoo", "warmup_cosine"]

# Decay only conv/dense kernels (names ending in "kernel", incl. depthwise ones),
# never GroupNorm scale/offset or biases (docs/design.md §2.4). Keras matches this regex
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


def adamw(lr: float, weight_decay: float, total_steps: int, warmup_steps: int = 0,
          clipnorm: float | None = 1.0) -> keras.optimizers.AdamW:
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
    return _decoupled(keras.optimizers.AdamW, lr, weight_decay, total_steps, warmup_steps,
                      clipnorm, beta_1=0.9, beta_2=0.999)


def shampoo(
    lr: float, weight_decay: float, total_steps: int, warmup_steps: int = 0,
    clipnorm: float | None = 1.0,
    *,
    block_size: int = 128,
    beta2: float = 0.999,
    precondition_every: int = 10,
    statistics_every: int = 1,
    start_preconditioning_step: int = 10,
    nesterov: bool = True,
    root_method: str = "auto",
) -> Shampoo:
    """Shampoo grafted to Adam, with `adamw`'s schedule, decay and clipping conventions.

    The paper's alternative to Adam: ImageNet distillation reaches at 1,200
    epochs what Adam reaches at 4,800 (warmup 1,800 steps, Nesterov, blocks of
    at most 128×128, wd 3.75e-4; docs/design.md §2.6). As in `adamw`, the update is
    `Δw = −s(t)·(lr·direction + wd·w)`: the decay is scaled by the schedule but
    not by the learning rate, only kernels are decayed, and gradients are
    clipped by global norm. Layer-wise grafting gives every kernel Adam's step
    size, so Adam's learning rate is the place to start. See `shampoo.Shampoo`
    for the algorithm.

    Args:
        lr, weight_decay, total_steps, warmup_steps, clipnorm: as in `adamw`.
        block_size: int. Largest preconditioner block side. Defaults to `128`.
        beta2: float in (0, 1]. EMA of the statistics and of Adam's second
            moment. Defaults to `0.999`.
        precondition_every: int. Steps between inverse-root recomputations.
            Defaults to `10`.
        statistics_every: int. Steps between updates of the Kronecker
            statistics (half the optimizer's work). Defaults to `1`.
        start_preconditioning_step: int. First step with Shampoo's direction
            (Adam's before). Defaults to `10`.
        nesterov: bool. Nesterov momentum (β1 = 0.9). Defaults to `True`.
        root_method: str. `"auto"`, `"eigh"` or `"newton"`. Defaults to `"auto"`.

    Returns:
        A `funmatch_keras.optim.shampoo_optimizer.Shampoo`.

    Example:
    >>> opt = shampoo(lr=1e-2, weight_decay=1e-5, total_steps=1000, warmup_steps=100)
    >>> round(opt.weight_decay, 6), opt.block_size, opt.nesterov
    (0.001, 128, True)
    """
    return _decoupled(Shampoo, lr, weight_decay, total_steps, warmup_steps, clipnorm,
                      beta1=0.9, beta2=beta2, block_size=block_size,
                      precondition_every=precondition_every,
                      statistics_every=statistics_every,
                      start_preconditioning_step=start_preconditioning_step,
                      nesterov=nesterov, root_method=root_method)


def _decoupled(optimizer_class, lr: float, weight_decay: float, total_steps: int,
               warmup_steps: int, clipnorm: float | None, **kwargs):
    """`optimizer_class` with the paper's schedule, decoupled kernel-only decay and clipping.

    Keras multiplies `weight_decay` by the current learning rate `lr·s(t)`;
    passing `weight_decay / lr` leaves the decay scaled by the schedule only.
    """
    if lr <= 0:
        raise ValueError(f"`lr` must be > 0. Received: lr={lr}")
    if weight_decay < 0:
        raise ValueError(f"`weight_decay` must be >= 0. Received: weight_decay={weight_decay}")
    optimizer = optimizer_class(
        learning_rate=warmup_cosine(lr, total_steps, warmup_steps),
        weight_decay=weight_decay / lr,
        epsilon=1e-8,
        global_clipnorm=clipnorm,
        **kwargs,
    )
    optimizer.exclude_from_weight_decay(var_names=[_NOT_A_KERNEL])
    return optimizer


def global_step(optimizer: keras.optimizers.Optimizer) -> int:
    """The optimizer's `iterations` as a Python int: the run's global step.

    It survives restarts (checkpoints hold it), so cadences are counted on it.

    Example:
    >>> global_step(keras.optimizers.SGD())
    0
    """
    return int(keras.ops.convert_to_numpy(optimizer.iterations))
