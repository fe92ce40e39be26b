"""funmatch_keras.optim.matrix_roots: both root methods against a float64 NumPy reference."""

import numpy as np
import pytest
import tensorflow as tf

from funmatch_keras.optim import matrix_roots


def _spd(rng, batch, size, condition):
    """Random symmetric matrices with eigenvalues spread over `condition`."""
    q, _ = np.linalg.qr(rng.standard_normal((batch, size, size)))
    eigenvalues = np.geomspace(1.0, 1.0 / condition, size) * rng.uniform(0.5, 2.0)
    return (q * eigenvalues[None, None, :]) @ np.swapaxes(q, -1, -2)


@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_inverse_fourth_root_matches_float64(method, inverse_fourth_root):
    rng = np.random.default_rng(0)
    matrices = _spd(rng, batch=3, size=24, condition=1e3)
    ridge = 1e-6
    root = np.asarray(matrix_roots.matrix_inverse_root(
        matrices.astype("float32"), 0.25, ridge, method))
    for matrix, got in zip(matrices, root):
        expected = inverse_fourth_root(matrix, ridge)
        assert np.abs(got - expected).max() <= 2e-3 * np.abs(expected).max()
        # and it is a root: R^4 (A + ridge·λmax·I) = I
        damped = matrix + ridge * np.linalg.eigvalsh(matrix).max() * np.eye(len(matrix))
        product = np.linalg.matrix_power(got.astype(np.float64), 4) @ damped
        assert np.abs(product - np.eye(len(matrix))).max() < 1e-2


def test_rank_deficient_statistics_do_not_blow_up_the_null_space(inverse_fourth_root):
    # B·Bᵀ of a 2-column block is rank 2 in 8 dimensions: the 6 zero eigenvalues
    # must map to (ridge·λmax)^(-1/4), not to float32 noise^(-1/4).
    block = np.random.default_rng(1).standard_normal((8, 2))
    stats = (block @ block.T).astype("float32")
    ridge = 1e-6
    root = np.asarray(matrix_roots.matrix_inverse_root(stats, 0.25, ridge, "eigh"))
    expected = inverse_fourth_root(stats.astype(np.float64), ridge)
    assert np.abs(root - expected).max() <= 1e-2 * np.abs(expected).max()


def test_auto_uses_newton_only_inside_a_tensorflow_xla_compilation():
    seen = {}

    def probe(jit):
        seen[jit] = matrix_roots._in_tensorflow_xla()
        return tf.constant(0.0)

    tf.function(lambda: probe(True), jit_compile=True)()
    tf.function(lambda: probe(False), jit_compile=False)()
    assert seen == {True: True, False: False}
    assert matrix_roots._in_tensorflow_xla() is False  # eager


def test_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        matrix_roots.matrix_inverse_root(np.eye(2, dtype="float32"), method="svd")
    with pytest.raises(ValueError, match="integer p"):
        matrix_roots.matrix_inverse_root(np.eye(2, dtype="float32"), 0.3, method="newton")
