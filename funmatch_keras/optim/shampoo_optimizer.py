"""Shampoo: blocked Kronecker-factored preconditioning, grafted to Adam, as a Keras 3 optimizer.

The paper's second optimizer: with Shampoo, ImageNet distillation reaches at
1,200 epochs what Adam reaches at 4,800 (docs/design.md §2.6). Keras has no Shampoo, so
this is one written from the formulas of Gupta et al. (2018) and Anil et al.
(2020), on `keras.ops` only: it runs on TensorFlow (eagerly, in `tf.function`,
under XLA and `tf.distribute`) and on JAX, and every piece of its state is an
optimizer variable, so checkpoints restore it exactly.

For a kernel (a conv kernel `(H, W, in, out)` is seen as the matrix
`(H·W·in, out)`) with gradient `G`, at step `t` (1-based):

1. Adam's direction, the graft: `v ← β2·v + (1−β2)·G²`,
   `A = G / (sqrt(v / (1−β2^t)) + ε)`.
2. The matrix is cut into blocks of at most `block_size` rows and columns,
   as even as possible (300 rows at 128: three blocks of 100, not 128 + 128
   + 44; the last block is smaller when the split is not exact). Per block `B`,
   every `statistics_every` steps (steps 1, 1 + n, ...; optax's
   `statistics_compute_steps`): `L ← β2·L + (1−β2)·B·Bᵀ`, `R ← β2·R + (1−β2)·Bᵀ·B`.
   These two matmuls are half the optimizer's work per step: updating them
   every 10 steps instead of every step costs little (the EMA averages over
   1/(1−β2) = 1,000 steps) where the optimizer's share of the step is large.
3. Every `precondition_every` steps from `start_preconditioning_step` on, in
   float32: `P_L = (L + e·λmax(L)·I)^(-1/4)` and the same for `R`; the ridge
   `e` (`matrix_epsilon`) is relative to the largest eigenvalue, so the
   statistics' scale never matters. With eigh, eigenvalues below `e·λmax`
   count as 0: in float32 they are rounding noise of that size, and a
   rank-deficient block (early steps, or blocks much wider than tall) would
   otherwise amplify that noise into its null space by `e^(-1/4)`. A root
   that comes out non-finite keeps the previous one (identity at first).
4. Shampoo's direction `S = P_L·B·P_R` per block, reassembled, then grafted
   layer-wise: `D = S·‖A‖/‖S‖` (Adam's step size, Shampoo's direction). Before
   `start_preconditioning_step`, and always for 1-D variables (biases,
   GroupNorm), `D = A`.
5. Momentum `m ← β1·m + (1−β1)·D`; the step is `−lr·(β1·m + (1−β1)·D)`
   with Nesterov, `−lr·m` without.

Weight decay, gradient clipping and the learning-rate schedule come from the
Keras base optimizer; `optim.shampoo` sets them up the paper's way.

Inverse roots are `funmatch_keras.optim.matrix_roots`'s (eigh, or the coupled Newton
iteration under TensorFlow XLA).

References:
    Gupta, Koren, Singer, "Shampoo: Preconditioned Stochastic Tensor
    Optimization", ICML 2018 (arXiv 1802.09568). Anil, Gupta, Koren, Regan,
    Singer, "Scalable Second Order Optimization for Deep Learning" (arXiv
    2002.09018): blocking, grafting, relative ridge, coupled Newton.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import keras
from keras import ops

# A module import, not names: see keras_objects (this module registers a class).
from funmatch_keras.optim import matrix_roots


class BlockLayout(NamedTuple):
    """How a variable is seen as a `rows × cols` matrix cut into `nr × nc` blocks."""

    rows: int
    cols: int
    block_rows: int
    num_row_blocks: int
    block_cols: int
    num_col_blocks: int


def block_layout(shape, block_size: int) -> BlockLayout:
    """The matrix and block split Shampoo uses for a variable of `shape` (rank >= 2).

    Each side is cut into `ceil(n / block_size)` blocks of (nearly) equal size:
    balanced blocks cost less to invert than a full one plus a sliver, and a
    sliver's statistics (few rows, many columns) are the worst conditioned.

    Example:
    >>> block_layout((300, 200), 128)  # doctest: +NORMALIZE_WHITESPACE
    BlockLayout(rows=300, cols=200, block_rows=100, num_row_blocks=3,
                block_cols=100, num_col_blocks=2)
    >>> block_layout((3, 3, 16, 32), 128)  # a conv kernel is the matrix (3·3·16, 32)
    BlockLayout(rows=144, cols=32, block_rows=72, num_row_blocks=2, block_cols=32, num_col_blocks=1)
    """
    rows, cols = math.prod(int(d) for d in shape[:-1]), int(shape[-1])
    num_row_blocks, num_col_blocks = -(-rows // block_size), -(-cols // block_size)
    return BlockLayout(rows, cols, -(-rows // num_row_blocks), num_row_blocks,
                       -(-cols // num_col_blocks), num_col_blocks)


def _to_blocks(x, layout: BlockLayout):
    """`(..., out)` → `(nr, nc, br, bc)`; the last blocks are zero-padded.

    Zero padding is exact: padded rows and columns of a block add nothing to its
    statistics, its root is block-diagonal, and padded entries of the
    preconditioned block stay zero.
    """
    x = ops.reshape(x, (layout.rows, layout.cols))
    pad_rows = layout.block_rows * layout.num_row_blocks - layout.rows
    pad_cols = layout.block_cols * layout.num_col_blocks - layout.cols
    if pad_rows or pad_cols:
        x = ops.pad(x, ((0, pad_rows), (0, pad_cols)))
    x = ops.reshape(x, (layout.num_row_blocks, layout.block_rows,
                        layout.num_col_blocks, layout.block_cols))
    return ops.transpose(x, (0, 2, 1, 3))


def _from_blocks(blocks, layout: BlockLayout, shape):
    x = ops.transpose(blocks, (0, 2, 1, 3))
    x = ops.reshape(x, (layout.num_row_blocks * layout.block_rows,
                        layout.num_col_blocks * layout.block_cols))
    x = ops.slice(x, (0, 0), (layout.rows, layout.cols))
    return ops.reshape(x, shape)


def _batched_identity(shape, dtype=None):
    return ops.broadcast_to(ops.eye(shape[-1], dtype=dtype), shape)


@keras.saving.register_keras_serializable(package="funmatch_keras")
class Shampoo(keras.optimizers.Optimizer):
    """Blocked Shampoo with layer-wise grafting to Adam and Nesterov momentum.

    The algorithm is in the module docstring. State per variable, created in
    `build` in the order of the variables: momentum and Adam's second moment
    (like the variable), then for variables of rank >= 2 the left and right
    statistics and their inverse roots, each `(row blocks, col blocks, b, b)`.

    Args:
        learning_rate: float or schedule. Defaults to `1e-3`.
        beta1: float. Momentum. Defaults to `0.9`.
        beta2: float in (0, 1]. EMA of the statistics and of Adam's second
            moment; `1.0` sums them (AdaGrad-style). Defaults to `0.999`.
        epsilon: float. Adam's ε in the graft. Defaults to `1e-8`.
        matrix_epsilon: float. Ridge of the inverse roots, relative to the
            largest eigenvalue. Defaults to `1e-6`.
        block_size: int. Largest block side. Defaults to `128`.
        precondition_every: int. Steps between inverse-root recomputations.
            Defaults to `10`.
        statistics_every: int. Steps between updates of the statistics `L`
            and `R`. Defaults to `1` (every step, as in the paper).
        start_preconditioning_step: int. First (1-based) step that uses
            Shampoo's direction and computes the roots; earlier steps use Adam's.
            Defaults to `10`.
        nesterov: bool. Nesterov momentum. Defaults to `True`.
        root_method: str. `"auto"`, `"eigh"` or `"newton"`. Defaults to `"auto"`.
        **kwargs: the base optimizer's arguments (`weight_decay`,
            `global_clipnorm`, `name`, ...).

    Example:
    >>> import numpy as np
    >>> w = keras.Variable(np.ones((4, 3), "float32"))
    >>> opt = Shampoo(learning_rate=0.1, start_preconditioning_step=1)
    >>> opt.apply([np.full((4, 3), 0.5, "float32")], [w])
    >>> [tuple(v.shape) for v in opt.variables[2:]]
    [(4, 3), (4, 3), (1, 1, 4, 4), (1, 1, 3, 3), (1, 1, 4, 4), (1, 1, 3, 3)]
    >>> round(float(w.numpy()[0, 0]), 4)  # Adam's first step size, lr·(1+β1)·(1−β1)
    0.981
    """

    def __init__(self, learning_rate=1e-3, beta1: float = 0.9, beta2: float = 0.999,
                 epsilon: float = 1e-8, matrix_epsilon: float = 1e-6, block_size: int = 128,
                 precondition_every: int = 10, start_preconditioning_step: int = 10,
                 nesterov: bool = True, root_method: str = "auto", name: str = "shampoo",
                 statistics_every: int = 1, **kwargs):
        _check_int("block_size", block_size, 1)
        _check_int("precondition_every", precondition_every, 1)
        _check_int("statistics_every", statistics_every, 1)
        _check_int("start_preconditioning_step", start_preconditioning_step, 1)
        if not 0.0 <= beta1 < 1.0:
            raise ValueError(f"`beta1` must be in [0, 1). Received: beta1={beta1}")
        if not 0.0 < beta2 <= 1.0:
            raise ValueError(f"`beta2` must be in (0, 1]. Received: beta2={beta2}")
        if not epsilon >= 0.0:
            raise ValueError(f"`epsilon` must be >= 0. Received: epsilon={epsilon}")
        if not matrix_epsilon >= 0.0:
            raise ValueError(
                f"`matrix_epsilon` must be >= 0. Received: matrix_epsilon={matrix_epsilon}")
        if root_method not in matrix_roots.ROOT_METHODS:
            raise ValueError(f"`root_method` must be one of {matrix_roots.ROOT_METHODS}. "
                             f"Received: root_method={root_method!r}")
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.epsilon, self.matrix_epsilon = float(epsilon), float(matrix_epsilon)
        self.block_size = block_size
        self.precondition_every = precondition_every
        self.statistics_every = statistics_every
        self.start_preconditioning_step = start_preconditioning_step
        self.nesterov = bool(nesterov)
        self.root_method = root_method

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._momentums, self._velocities, self._blocks, self._layouts = [], [], [], []
        for variable in variables:
            if self._overwrite_variable_with_gradient(variable):
                for store in (self._momentums, self._velocities, self._blocks, self._layouts):
                    store.append(None)
                continue
            self._momentums.append(self.add_variable_from_reference(variable, "momentum"))
            self._velocities.append(self.add_variable_from_reference(variable, "velocity"))
            if len(variable.shape) < 2:
                self._blocks.append(None)
                self._layouts.append(None)
                continue
            layout = block_layout(variable.shape, self.block_size)
            grid = (layout.num_row_blocks, layout.num_col_blocks)
            left = grid + (layout.block_rows,) * 2
            right = grid + (layout.block_cols,) * 2
            prefix = getattr(variable, "path", variable.name).replace("/", "_").replace(":", "_")
            self._blocks.append([
                self.add_variable(shape, initializer, dtype="float32", name=f"{prefix}_{what}")
                for what, shape, initializer in (
                    ("stats_left", left, "zeros"), ("stats_right", right, "zeros"),
                    ("root_left", left, _batched_identity),
                    ("root_right", right, _batched_identity))])
            self._layouts.append(layout)

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        momentum, velocity = self._momentums[index], self._velocities[index]
        step_int = self.iterations + 1
        step = ops.cast(step_int, "float32")
        grad = ops.cast(gradient, "float32")
        beta2 = self.beta2
        new_weight = 1.0 if beta2 == 1.0 else 1.0 - beta2  # beta2 = 1 sums, like AdaGrad

        new_velocity = beta2 * ops.cast(velocity, "float32") + new_weight * grad * grad
        self.assign(velocity, new_velocity)
        if beta2 < 1.0:
            new_velocity = new_velocity / (1.0 - ops.power(beta2, step))
        direction = grad / (ops.sqrt(new_velocity) + self.epsilon)

        if self._blocks[index] is not None:
            direction = self._shampoo_direction(grad, direction, step_int, index, variable.shape)

        new_momentum = self.beta1 * ops.cast(momentum, "float32") + (1.0 - self.beta1) * direction
        self.assign(momentum, new_momentum)
        update = (self.beta1 * new_momentum + (1.0 - self.beta1) * direction
                  if self.nesterov else new_momentum)
        lr = ops.cast(learning_rate, "float32")
        self.assign_sub(variable, ops.cast(lr * update, variable.dtype))

    def _shampoo_direction(self, grad, adam_direction, step_int, index, shape):
        layout = self._layouts[index]
        stats_left, stats_right, root_left, root_right = self._blocks[index]
        blocks = _to_blocks(grad, layout)
        new_weight = 1.0 if self.beta2 == 1.0 else 1.0 - self.beta2

        def fresh_statistics():
            transposed = ops.swapaxes(blocks, -1, -2)
            return (self.beta2 * ops.convert_to_tensor(stats_left)
                    + new_weight * ops.matmul(blocks, transposed),
                    self.beta2 * ops.convert_to_tensor(stats_right)
                    + new_weight * ops.matmul(transposed, blocks))

        if self.statistics_every == 1:
            new_left, new_right = fresh_statistics()
            self.assign(stats_left, new_left)
            self.assign(stats_right, new_right)
        else:
            new_left, new_right = self._assign_when(
                ops.equal((step_int - 1) % self.statistics_every, 0),
                (stats_left, stats_right), fresh_statistics)

        since_start = step_int - self.start_preconditioning_step
        recompute = ops.logical_and(since_start >= 0,
                                    ops.equal(since_start % self.precondition_every, 0))
        old_left, old_right = ops.convert_to_tensor(root_left), ops.convert_to_tensor(root_right)

        def fresh_roots():
            return (self._safe_root(new_left, old_left), self._safe_root(new_right, old_right))

        new_root_left, new_root_right = self._assign_when(
            recompute, (root_left, root_right), fresh_roots)
        preconditioned = _from_blocks(
            ops.matmul(ops.matmul(new_root_left, blocks), new_root_right), layout, shape)
        # Layer-wise grafting: Shampoo's direction with the norm of Adam's.
        graft = ops.sqrt(ops.sum(adam_direction * adam_direction))
        norm = ops.sqrt(ops.sum(preconditioned * preconditioned))
        grafted = preconditioned * (graft / (norm + 1e-16))
        return ops.where(since_start >= 0, grafted, adam_direction)

    def _assign_when(self, condition, variables, compute):
        """Assigns `compute()` to `variables` if `condition`, computing nothing
        otherwise; returns the variables' values after it."""
        if keras.backend.backend() == "tensorflow":
            # TensorFlow graphs allow assignments inside a branch, which saves
            # copying the state on the steps that do not recompute it.
            def assign():
                for variable, value in zip(variables, compute()):
                    self.assign(variable, value)
                return ops.convert_to_tensor(True)

            ops.cond(condition, assign, lambda: ops.convert_to_tensor(False))
            return tuple(ops.convert_to_tensor(variable) for variable in variables)
        # JAX traces pure functions: select the value, assign outside.
        old = tuple(ops.convert_to_tensor(variable) for variable in variables)
        values = ops.cond(condition, compute, lambda: old)
        for variable, value in zip(variables, values):
            self.assign(variable, value)
        return tuple(values)

    def _safe_root(self, statistics, previous):
        # Exponent −1/(2·rank) = −1/4 for the matrix view. A block without
        # gradient yet (all zeros), or a failed root, keeps the previous root.
        root = matrix_roots.matrix_inverse_root(statistics, 0.25, self.matrix_epsilon,
                                                self.root_method)
        finite = ops.all(ops.isfinite(root), axis=(-2, -1), keepdims=True)
        return ops.where(finite, root, previous)

    def get_config(self):
        config = super().get_config()
        config.update({
            "beta1": self.beta1, "beta2": self.beta2, "epsilon": self.epsilon,
            "matrix_epsilon": self.matrix_epsilon, "block_size": self.block_size,
            "precondition_every": self.precondition_every,
            "statistics_every": self.statistics_every,
            "start_preconditioning_step": self.start_preconditioning_step,
            "nesterov": self.nesterov, "root_method": self.root_method,
        })
        return config


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}. Received: {name}={value!r}")
