"""Inverse p-th roots of symmetric PSD matrices in float32, by eigendecomposition or coupled Newton.

Shampoo's preconditioners are `(L + e·λmax(L)·I)^(-1/4)`; the ridge `e` is
relative to the largest eigenvalue, so the statistics' scale never matters.
With eigh, eigenvalues below `e·λmax` count as 0: in float32 they are rounding
noise of that size, and a rank-deficient matrix would otherwise amplify that
noise into its null space by `e^(-1/4)`.

Methods: `"eigh"` (eigendecomposition, `keras.ops.eigh`) or
`"newton"` (the coupled Newton iteration, matmuls only, Higham 2008, eq. 7.18).
`"auto"` (the default) uses Newton inside a TensorFlow XLA compilation, whose
CPU eigh is a Jacobi solver many times slower than Newton, and eigh everywhere
else, where it is the faster and the more accurate. JAX's CPU eigh calls
LAPACK, which slows down badly when other processes share the cores: pass
`"newton"` there if yours are shared.
"""

from __future__ import annotations

import math

import keras
from keras import ops

# The timings and float32 errors behind "auto": README, Shampoo, "Inverse roots"
# (16 blocks of 128×128, condition number 1e4).
ROOT_METHODS = ("auto", "eigh", "newton")
# The coupled Newton iteration stops when max|M − I| is below this (float32
# reaches ~2e-7 on 128×128 blocks) or after this many iterations (~20 suffice
# for the condition number 1e6 that the 1e-6 relative ridge allows).
_NEWTON_TOLERANCE = 1e-5
_NEWTON_MAX_ITERATIONS = 100
# A Newton root whose final error is above this is treated as failed (the
# previous root is kept), like distributed_shampoo's inverse_failure_threshold.
_NEWTON_FAILURE = 0.1
# Power-iteration steps estimating λmax for Newton's relative ridge.
_POWER_ITERATIONS = 20


def _eigh_inverse_root(matrix, exponent: float, ridge: float):
    eigenvalues, eigenvectors = ops.eigh(matrix)
    largest = ops.max(eigenvalues, axis=-1, keepdims=True)
    floor = ridge * largest
    # Eigenvalues under the ridge are float32 rounding noise: count them as 0.
    signal = ops.where(eigenvalues > floor, eigenvalues, 0.0)
    powers = ops.power(signal + floor, -exponent)
    return ops.matmul(eigenvectors * ops.expand_dims(powers, -2),
                      ops.swapaxes(eigenvectors, -1, -2))


def _newton_inverse_root(matrix, exponent: float, ridge: float):
    # Coupled Newton for A^(-1/p): X₀ = z^(1/p)·I, M₀ = z·A with z = (1+p)/(2‖A‖_F),
    # then T = ((p+1)·I − M)/p, X ← X·T, M ← T^p·M; M → I and X → A^(-1/p).
    p = round(1.0 / exponent)
    size = matrix.shape[-1]
    eye = ops.eye(size, dtype="float32")
    vector = ops.ones(tuple(matrix.shape[:-1]) + (1,), "float32")
    for _ in range(_POWER_ITERATIONS):
        vector = ops.matmul(matrix, vector)
        vector = vector / (ops.sqrt(ops.sum(vector * vector, axis=-2, keepdims=True)) + 1e-30)
    largest = ops.sum(vector * ops.matmul(matrix, vector), axis=-2, keepdims=True)
    damped = matrix + ridge * largest * eye
    z = (1.0 + p) / (2.0 * ops.sqrt(ops.sum(damped * damped, axis=(-2, -1), keepdims=True)))

    def keep_going(i, m, x, error):
        return ops.logical_and(i < _NEWTON_MAX_ITERATIONS, error > _NEWTON_TOLERANCE)

    def step(i, m, x, error):
        t = (1.0 + 1.0 / p) * eye - m / p
        m = ops.matmul(_matrix_power(t, p), m)
        return i + 1, m, ops.matmul(x, t), ops.max(ops.abs(m - eye))

    start = (ops.convert_to_tensor(0), damped * z, eye * ops.power(z, 1.0 / p),
             ops.convert_to_tensor(1.0, "float32"))
    _, m, root, _ = ops.while_loop(keep_going, step, start)
    failed = ops.max(ops.abs(m - eye), axis=(-2, -1), keepdims=True) > _NEWTON_FAILURE
    return ops.where(failed, float("nan"), root)


def _matrix_power(matrix, power: int):
    """`matrix^power` by repeated squaring (2 matmuls for Shampoo's 4th power)."""
    result, square = None, matrix
    while power:
        if power & 1:
            result = square if result is None else ops.matmul(result, square)
        power >>= 1
        if power:
            square = ops.matmul(square, square)
    return result


def _in_tensorflow_xla() -> bool:
    """Whether a TensorFlow XLA compilation (`jit_compile=True`) is being traced."""
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf  # only on this backend: optim must import without TF
    from tensorflow.python.ops import control_flow_util

    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def matrix_inverse_root(matrix, exponent: float = 0.25, ridge: float = 1e-6,
                        method: str = "auto"):
    """`(A + ridge·λmax(A)·I)^(-exponent)` of symmetric PSD matrices `(..., n, n)`, in float32.

    Args:
        matrix: tensor `(..., n, n)`, symmetric positive semi-definite.
        exponent: float. The root: `0.25` is Shampoo's `-1/4`. Must be `1/p`
            for an integer `p` with `method="newton"`. Defaults to `0.25`.
        ridge: float. Ridge relative to the largest eigenvalue. Defaults to `1e-6`.
        method: str. `"eigh"`, `"newton"` or `"auto"` (Newton under TensorFlow
            XLA, eigh otherwise; see the module docstring). Defaults to `"auto"`.

    Returns:
        A float32 tensor like `matrix`; not finite for a matrix of zeros (and,
        with Newton, NaN where the iteration did not converge).

    Raises:
        ValueError: an unknown `method`, or Newton with an `exponent` that is
            not `1/p`.

    Example:
    >>> import numpy as np
    >>> root = matrix_inverse_root(np.diag([16.0, 1.0]).astype("float32"), ridge=0.0)
    >>> np.round(np.asarray(root), 4).tolist()
    [[0.5, 0.0], [0.0, 1.0]]
    """
    if method not in ROOT_METHODS:
        raise ValueError(f"`method` must be one of {ROOT_METHODS}. Received: method={method!r}")
    if method == "newton" and not math.isclose(1.0 / exponent, round(1.0 / exponent)):
        raise ValueError("Newton's iteration computes roots 1/p for an integer p. "
                         f"Received: exponent={exponent}")
    matrix = ops.cast(matrix, "float32")
    matrix = (matrix + ops.swapaxes(matrix, -1, -2)) / 2.0
    if method == "newton" or (method == "auto" and _in_tensorflow_xla()):
        return _newton_inverse_root(matrix, exponent, ridge)
    return _eigh_inverse_root(matrix, exponent, ridge)
