"""Shampoo: a NumPy reference of the update, convergence, decay, resume, replicas, JAX, configs."""

import copy
import math
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from funmatch_keras import configs
from funmatch_keras.app import build
from funmatch_keras.optim import optimizers as optim
from funmatch_keras.optim.shampoo_optimizer import Shampoo, block_layout
from funmatch_keras.training.checkpoint import CheckpointManager

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# -- the NumPy reference, written from the papers' formulas -------------------


def even_split(size, block):
    """[(start, stop)] of ceil(size / block) nearly equal blocks (the last one smaller)."""
    count = -(-size // block)
    step = -(-size // count)
    return [(i, min(i + step, size)) for i in range(0, size, step)]


def reference_shampoo(weights, gradients, inverse_fourth_root, lr, beta1, beta2, eps, ridge,
                      block, start, every, nesterov=True, statistics_every=1):
    """Blocked Shampoo, layer-wise grafted to Adam; yields the weights after each step.

    The statistics are updated at steps 1, 1 + statistics_every, ...
    """
    shape = weights.shape
    rows, cols = math.prod(shape[:-1]), shape[-1]
    row_blocks, col_blocks = even_split(rows, block), even_split(cols, block)
    w = weights.astype(np.float64).reshape(rows, cols)
    m, v = np.zeros_like(w), np.zeros_like(w)
    stats, roots = {}, {}
    for r in row_blocks:
        for c in col_blocks:
            stats[r, c] = [np.zeros((r[1] - r[0],) * 2), np.zeros((c[1] - c[0],) * 2)]
            roots[r, c] = [np.eye(r[1] - r[0]), np.eye(c[1] - c[0])]
    for t, g in enumerate(gradients, start=1):
        g = g.astype(np.float64).reshape(rows, cols)
        v = beta2 * v + (1 - beta2) * g**2
        adam = g / (np.sqrt(v / (1 - beta2**t)) + eps)
        shampoo = np.zeros_like(g)
        for (r, c), (left, right) in stats.items():
            b = g[r[0]:r[1], c[0]:c[1]]
            if (t - 1) % statistics_every == 0:
                left[:] = beta2 * left + (1 - beta2) * b @ b.T
                right[:] = beta2 * right + (1 - beta2) * b.T @ b
            if t >= start and (t - start) % every == 0:
                roots[r, c] = [inverse_fourth_root(left, ridge), inverse_fourth_root(right, ridge)]
            shampoo[r[0]:r[1], c[0]:c[1]] = roots[r, c][0] @ b @ roots[r, c][1]
        direction = adam
        if t >= start:
            direction = shampoo * np.linalg.norm(adam) / np.linalg.norm(shampoo)
        m = beta1 * m + (1 - beta1) * direction
        w = w - lr * ((beta1 * m + (1 - beta1) * direction) if nesterov else m)
        yield w.reshape(shape)


CASES = {
    # 300x200 with blocks of at most 128: 3 x 2 blocks of 100x100.
    "dense_300x200": dict(shape=(300, 200), block=128),
    # A conv kernel is the matrix (3·3·8, 16) = (72, 16); at most 32 rows per
    # block: 3 blocks of 24 rows. At most 10: blocks of 9 rows and 8 columns.
    "conv_3x3x8x16": dict(shape=(3, 3, 8, 16), block=32),
    "conv_3x3x8x16_b10": dict(shape=(3, 3, 8, 16), block=10),
}


@pytest.mark.parametrize("case, compiled", [
    ("dense_300x200", False), ("conv_3x3x8x16", False), ("conv_3x3x8x16_b10", False),
    ("conv_3x3x8x16", True),
], ids=["dense_300x200-eager_eigh", "conv_3x3x8x16-eager_eigh", "conv_3x3x8x16_b10-eager_eigh",
        "conv_3x3x8x16-xla_newton"])
def test_update_matches_numpy_reference(case, compiled, rng, inverse_fourth_root):
    # Steps 1-4 are the Adam graft; 5 computes the roots; 6 reuses them; 7 recomputes.
    # Four gradients before the first root make every block's statistics full
    # rank and well enough conditioned for float32 to agree with float64 to 1e-5.
    _check_against_reference(case, compiled, rng, inverse_fourth_root, steps=7, start=5, every=2)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager_eigh", "xla_newton"])
def test_statistics_every_n_steps_match_numpy_reference(compiled, rng, inverse_fourth_root):
    # Statistics at steps 1, 4, 7, 10; roots at 7 (from three gradients) and 9;
    # steps 8-10 precondition with roots of statistics older than the gradient.
    _check_against_reference("conv_3x3x8x16_b10", compiled, rng, inverse_fourth_root, steps=10,
                             start=7, every=2, statistics_every=3)


def _check_against_reference(case, compiled, rng, inverse_fourth_root, steps, start, every,
                             statistics_every=1):
    shape, block = CASES[case]["shape"], CASES[case]["block"]
    hyper = dict(lr=0.1, beta1=0.9, beta2=0.9, eps=1e-8, ridge=1e-6, block=block,
                 start=start, every=every, statistics_every=statistics_every)
    weights = rng.normal(size=shape).astype("float32")
    gradients = [rng.normal(size=shape).astype("float32") for _ in range(steps)]
    variable = keras.Variable(weights)
    optimizer = Shampoo(learning_rate=hyper["lr"], beta1=hyper["beta1"], beta2=hyper["beta2"],
                        epsilon=hyper["eps"], matrix_epsilon=hyper["ridge"], block_size=block,
                        start_preconditioning_step=hyper["start"],
                        precondition_every=hyper["every"], statistics_every=statistics_every)
    optimizer.build([variable])

    def step(gradient):
        optimizer.apply([gradient], [variable])

    if compiled:  # auto: Newton iterations under XLA
        step = tf.function(step, jit_compile=True)
    expected = reference_shampoo(weights, gradients, inverse_fourth_root, **hyper)
    for t, (gradient, want) in enumerate(zip(gradients, expected), start=1):
        step(tf.constant(gradient))
        delta, want_delta = variable.numpy() - weights, want - weights
        scale = np.abs(want_delta).max()
        np.testing.assert_allclose(delta, want_delta, rtol=1e-5, atol=1e-5 * scale,
                                   err_msg=f"step {t}")


def test_block_split_of_a_300x200_matrix():
    layout = block_layout((300, 200), 128)
    assert (layout.num_row_blocks, layout.block_rows) == (3, 100)
    assert (layout.num_col_blocks, layout.block_cols) == (2, 100)
    assert even_split(300, 128) == [(0, 100), (100, 200), (200, 300)]
    assert even_split(201, 128) == [(0, 101), (101, 201)]  # padded by one row inside
    variable = keras.Variable(np.zeros((300, 200), "float32"))
    optimizer = Shampoo(block_size=128)
    optimizer.build([variable])
    # momentum, velocity, then left/right statistics and roots per block grid.
    shapes = [tuple(v.shape) for v in optimizer.variables[2:]]
    assert shapes == [(300, 200), (300, 200)] + [(3, 2, 100, 100)] * 4
    np.testing.assert_array_equal(optimizer.variables[-1].numpy()[2, 1], np.eye(100))


def test_biases_and_norms_use_the_adam_graft_only():
    inputs = keras.Input((6,))
    x = keras.layers.Dense(4)(inputs)
    model = keras.Model(inputs, keras.layers.GroupNormalization(groups=2)(x))
    optimizer = Shampoo()
    optimizer.build(model.trainable_variables)
    # kernel: 2 + 4 variables; bias, gamma, beta: momentum and velocity only.
    assert len(optimizer.variables) == 2 + 6 + 3 * 2


# -- convergence ---------------------------------------------------------------


def steps_to_threshold(make_optimizer, x, y, threshold, max_steps):
    w = keras.Variable(np.zeros((x.shape[1], y.shape[1]), "float32"))
    optimizer = make_optimizer()

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(x @ w - y))
        optimizer.apply(tape.gradient(loss, [w]), [w])
        return loss

    for i in range(max_steps):
        if float(step()) < threshold:
            return i
    return max_steps


def test_ill_conditioned_least_squares_needs_far_fewer_steps_than_adam(rng):
    n, d, k = 256, 32, 8
    q1, _ = np.linalg.qr(rng.normal(size=(n, d)))
    q2, _ = np.linalg.qr(rng.normal(size=(d, d)))
    singular = np.logspace(0, -2, d)  # rotated, so a diagonal method cannot undo it
    x = (q1 * singular) @ q2.T * np.sqrt(n)
    assert np.linalg.cond(x.T @ x) >= 1e3
    y = x @ rng.normal(size=(d, k))
    x, y = tf.constant(x, tf.float32), tf.constant(y, tf.float32)
    threshold = 1e-4 * float(tf.reduce_mean(tf.square(y)))
    adam = min(steps_to_threshold(lambda: keras.optimizers.Adam(lr), x, y, threshold, 600)
               for lr in (1.0, 0.3))
    shampoo = min(steps_to_threshold(
        lambda: Shampoo(lr, beta2=0.99, start_preconditioning_step=1, precondition_every=1),
        x, y, threshold, 600) for lr in (1.0, 0.3))
    assert shampoo * 3 <= adam, (shampoo, adam)


# -- weight decay --------------------------------------------------------------


def test_weight_decay_only_on_kernels_and_not_multiplied_by_lr():
    lr, wd = 1e-2, 1e-3
    inputs = keras.Input((3, 3, 2))
    x = keras.layers.Conv2D(4, 2, bias_initializer="ones")(inputs)
    x = keras.layers.GroupNormalization(groups=2, gamma_initializer="ones",
                                        beta_initializer="ones")(x)
    model = keras.Model(inputs, keras.layers.Dense(3, bias_initializer="ones")(x))
    optimizer = optim.shampoo(lr=lr, weight_decay=wd, total_steps=100, warmup_steps=0)
    before = {v.path: v.numpy().copy() for v in model.trainable_variables}
    zeros = [tf.zeros_like(v) for v in model.trainable_variables]
    for _ in range(2):
        optimizer.apply_gradients(zip(zeros, model.trainable_variables))
    schedule = optim.warmup_cosine(lr, 100, 0)
    factor = (1 - wd * float(schedule(0)) / lr) * (1 - wd * float(schedule(1)) / lr)
    for v in model.trainable_variables:
        if v.path.endswith("kernel"):
            np.testing.assert_allclose(v.numpy(), before[v.path] * factor, rtol=1e-6)
        else:  # biases, GroupNorm gamma and beta
            np.testing.assert_array_equal(v.numpy(), before[v.path])


# -- checkpoints, replicas, JAX -------------------------------------------------


def small_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(8, 3, activation="relu"),  # kernel (18, 8): 2 blocks of 9 rows
        keras.layers.GroupNormalization(groups=2),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(3),
    ])


def compiled(model, clipnorm=1.0, jit_compile=False):
    # Roots at steps 7 and 10: six steps of statistics make every block's well
    # conditioned. (From rank-deficient statistics, the float32 eigh turns the
    # all-reduce's different summation order into differences of up to ~3e-6.)
    optimizer = optim.shampoo(lr=0.05, weight_decay=1e-4, total_steps=20, warmup_steps=2,
                              clipnorm=clipnorm, block_size=16, precondition_every=3,
                              start_preconditioning_step=7)
    model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile)
    return model


def batches(rng, count, size=8):
    return [(rng.normal(size=(size, 6, 6, 2)).astype("float32"),
             rng.normal(size=(size, 3)).astype("float32")) for _ in range(count)]


@pytest.mark.parametrize("jit_compile", [
    False, pytest.param(True, marks=pytest.mark.slow)], ids=["graph", "xla"])
def test_resume_from_checkpoint_is_exact(tmp_path, rng, jit_compile):
    data = batches(rng, 12)
    straight = compiled(small_model(), jit_compile=jit_compile)
    for x, y in data:
        straight.train_on_batch(x, y)

    first = compiled(small_model(), jit_compile=jit_compile)
    for x, y in data[:8]:  # stops between two root recomputations (steps 7 and 10)
        first.train_on_batch(x, y)
    manager = CheckpointManager(str(tmp_path))
    manager.save(8, first, first.optimizer)

    resumed = compiled(small_model(seed=99), jit_compile=jit_compile)
    assert manager.restore(resumed, resumed.optimizer)["step"] == 8
    assert int(resumed.optimizer.iterations) == 8
    for x, y in data[8:]:
        resumed.train_on_batch(x, y)
    for a, b in zip(straight.weights, resumed.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-6, atol=1e-6)
    for a, b in zip(straight.optimizer.variables, resumed.optimizer.variables):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-6)


def test_mirrored_strategy_matches_one_device(rng, two_cpu_strategy):
    x, y = (np.concatenate(parts) for parts in zip(*batches(rng, 12)))
    initial = small_model().get_weights()
    results = []
    for strategy in (tf.distribute.OneDeviceStrategy("/cpu:0"), two_cpu_strategy):
        with strategy.scope():
            model = small_model()
            model.set_weights(initial)
            # Keras clips each replica's gradients before summing them, so
            # clipping would differ from one device; the schedule and decay do not.
            compiled(model, clipnorm=None)
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        results.append(model.get_weights())
    for one, two in zip(*results):
        np.testing.assert_allclose(two, one, rtol=1e-6, atol=1e-6)


JAX_SCRIPT = textwrap.dedent(
    """
    import keras, numpy as np
    assert keras.backend.backend() == "jax"
    from funmatch_keras import optim
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(8, 3),
                              keras.layers.GroupNormalization(groups=2),
                              keras.layers.Flatten(), keras.layers.Dense(3)])
    x = rng.normal(size=(64, 6, 6, 2)).astype("float32")
    y = x.reshape(64, -1)[:, :3] * 2.0
    model.compile(optimizer=optim.shampoo(lr=0.03, weight_decay=1e-4, total_steps=80,
                                          warmup_steps=5, block_size=16,
                                          precondition_every=5,
                                          start_preconditioning_step=3), loss="mse")
    history = model.fit(x, y, batch_size=16, epochs=20, verbose=0).history["loss"]
    print("LOSS", history[0], history[-1])
    """
)


@pytest.mark.slow
def test_trains_under_jax_backend(tmp_path):
    pytest.importorskip("jax")
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", JAX_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(line for line in out.stdout.splitlines() if line.startswith("LOSS"))
    first, last = (float(value) for value in line.split()[1:])
    assert last < 0.3 * first, (first, last)


# -- arguments, serialization, configs ------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_size=0), "block_size=0"),
    (dict(block_size=2.5), "block_size=2.5"),
    (dict(beta2=0.0), r"beta2=0.0"),
    (dict(beta2=1.5), r"beta2=1.5"),
    (dict(precondition_every=0), "precondition_every=0"),
    (dict(statistics_every=0), "statistics_every=0"),
    (dict(start_preconditioning_step=0), "start_preconditioning_step=0"),
    (dict(beta1=1.0), r"beta1=1.0"),
    (dict(root_method="svd"), "root_method='svd'"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Shampoo(**kwargs)
    if "beta1" not in kwargs:  # the factory fixes beta1 = 0.9
        with pytest.raises(ValueError, match=match):
            optim.shampoo(1e-3, 0.0, 10, **kwargs)


def test_config_round_trip():
    optimizer = optim.shampoo(lr=3e-3, weight_decay=1e-4, total_steps=100, warmup_steps=10,
                              block_size=64, precondition_every=5, beta2=0.99,
                              statistics_every=4,
                              start_preconditioning_step=7, nesterov=False, root_method="eigh")
    config = optimizer.get_config()
    again = Shampoo.from_config(copy.deepcopy(config))
    assert again.get_config() == config
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert isinstance(restored, Shampoo) and restored.get_config() == config
    assert (restored.block_size, restored.precondition_every, restored.beta2,
            restored.start_preconditioning_step, restored.nesterov,
            restored.statistics_every) == (64, 5, 0.99, 7, False, 4)


def test_config_optimizer_reaches_build():
    config = configs.load_config("digits")
    assert isinstance(build.optimizer(config, 100), keras.optimizers.AdamW)
    config = configs.apply_overrides(config, {"optimizer": "shampoo",
                                              "shampoo_block_size": "64",
                                              "shampoo_precondition_every": "4"})
    configs.validate(config)
    optimizer = build.optimizer(config, 100)
    assert isinstance(optimizer, Shampoo)
    assert (optimizer.block_size, optimizer.precondition_every) == (64, 4)
    assert optimizer.weight_decay == pytest.approx(config.weight_decay / config.lr)


@pytest.mark.parametrize("overrides, match", [
    ({"optimizer": "sgd"}, "optimizer='sgd'"),
    ({"shampoo_block_size": "0"}, "shampoo_block_size=0"),
    ({"shampoo_beta2": "1.5"}, "shampoo_beta2=1.5"),
    ({"shampoo_precondition_every": "0"}, "shampoo_precondition_every=0"),
    ({"shampoo_statistics_every": "0"}, "shampoo_statistics_every=0"),
])
def test_config_validation(overrides, match):
    config = configs.apply_overrides(configs.load_config("digits"), overrides)
    with pytest.raises(ValueError, match=match):
        configs.validate(config)


def test_imagenet_shampoo_variant():
    config = configs.load_config("imagenet:optimizer=shampoo")
    configs.validate(config)
    assert (config.optimizer, config.epochs, config.warmup_steps, config.weight_decay,
            config.shampoo_block_size) == ("shampoo", 1200, 1800, 3.75e-4, 128)
    assert configs.load_config("imagenet").optimizer == "adamw"
    with pytest.raises(ValueError, match="optimizer='lamb'"):
        configs.load_config("imagenet:optimizer=lamb")
