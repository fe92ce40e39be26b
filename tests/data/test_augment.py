import numpy as np
import pytest
import tensorflow as tf

from funmatch_keras.data import augment


def run_eager_and_in_dataset(fn, *args):
    """big_vision's advice: test ops eagerly and inside tf.data.Dataset.map."""
    eager = fn(*args)
    ds = tf.data.Dataset.from_tensors(args).map(lambda *a: fn(*a))
    in_graph = next(iter(ds))
    return eager, in_graph


def test_inception_crop_shape_and_range_eager_and_in_dataset():
    image = tf.random.stateless_uniform([60, 90, 3], seed=[0, 0], maxval=255.0)
    fn = lambda img: augment.inception_crop(img, 32, seed=tf.constant([3, 4]))  # noqa: E731
    eager, in_graph = run_eager_and_in_dataset(fn, image)
    for out in (eager, in_graph):
        assert out.shape == (32, 32, 3) and out.dtype == tf.float32
        assert float(tf.reduce_min(out)) >= 0.0 and float(tf.reduce_max(out)) <= 255.0
    np.testing.assert_allclose(eager.numpy(), in_graph.numpy(), atol=1e-4)


def test_crop_area_fraction_within_area_range():
    shape = tf.constant([200, 200, 3])
    area_range = (0.05, 1.0)
    fractions, ratios = [], []
    for i in range(400):
        y, x, h, w = augment.inception_crop_window(shape, area_range, seed=[i, 7]).numpy()
        assert 0 <= y and y + h <= 200 and 0 <= x and x + w <= 200
        fractions.append(h * w / (200 * 200))
        ratios.append(w / h)
    fractions = np.array(fractions)
    # Integer rounding of the window can move the area a hair outside the range.
    assert fractions.min() >= area_range[0] * 0.9 and fractions.max() <= 1.0
    # The distribution covers the range, not a single scale.
    assert fractions.min() < 0.15 and fractions.max() > 0.75 and 0.3 < np.median(fractions) < 0.7
    ratios = np.array(ratios)[fractions < 0.9]  # full-image fallbacks keep the image's ratio
    assert ratios.min() >= 0.7 and ratios.max() <= 1.4


def test_crop_is_reproducible_with_seed_and_varies_without():
    image = tf.random.stateless_uniform([50, 50, 3], seed=[1, 1], maxval=255.0)
    a = augment.inception_crop(image, 16, seed=[5, 5])
    b = augment.inception_crop(image, 16, seed=[5, 5])
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    unseeded = [augment.inception_crop(image, 16).numpy() for _ in range(4)]
    assert any(not np.array_equal(unseeded[0], u) for u in unseeded[1:])


def test_random_flip_flips_or_keeps():
    image = tf.reshape(tf.range(2 * 3 * 1, dtype=tf.float32), [2, 3, 1])
    outs = {augment.random_flip(image, seed=[i, 0]).numpy().tobytes() for i in range(20)}
    assert outs == {image.numpy().tobytes(), image.numpy()[:, ::-1].tobytes()}


def test_value_range_maps_0_255_to_minus1_1():
    out = augment.value_range(tf.constant([0, 127.5, 255.0]))
    np.testing.assert_allclose(out.numpy(), [-1.0, 0.0, 1.0], atol=1e-6)
    assert augment.value_range(tf.constant([0, 255], tf.uint8)).dtype == tf.float32


def test_resize_small_and_central_crop():
    image = tf.reshape(tf.range(40 * 100, dtype=tf.float32), [40, 100, 1])
    small = augment.resize_small(image, 20)
    assert small.shape == (20, 50, 1)
    crop = augment.central_crop(tf.ones([7, 11, 3]) * tf.range(11, dtype=tf.float32)[:, None], 5)
    assert crop.shape == (5, 5, 3)
    np.testing.assert_array_equal(crop.numpy()[0, :, 0], [3, 4, 5, 6, 7])
    eager, in_graph = run_eager_and_in_dataset(
        lambda img: augment.eval_preprocess(img, 32), tf.zeros([50, 70, 3], tf.uint8)
    )
    assert eager.shape == in_graph.shape == (32, 32, 3)
    np.testing.assert_allclose(eager.numpy(), -1.0)


def crafted_batch(n=6, size=4):
    """Example i is the constant image i+1, so a mix reveals ratio and partner."""
    values = tf.range(1, n + 1, dtype=tf.float32)
    return tf.ones([n, size, size, 3]) * values[:, None, None, None]


def test_mixup_one_ratio_and_partner_is_previous_example():
    x = crafted_batch()
    mixed, ratio = augment.mixup(x, seed=tf.constant([1, 2]), return_ratio=True)
    v = np.arange(1, 7, dtype=np.float32)
    partner = np.roll(v, 1)  # partner of 0 is the last example
    assert partner[0] == 6
    out = mixed.numpy()[:, 0, 0, 0]
    recovered = (out - partner) / (v - partner)  # a = (m - x[i-1]) / (x[i] - x[i-1])
    np.testing.assert_allclose(recovered, recovered[0], atol=1e-5)
    assert recovered[0] >= 0.5
    np.testing.assert_allclose(recovered[0], float(ratio), atol=1e-5)
    # Every pixel of an example gets the same mix.
    np.testing.assert_allclose(mixed.numpy(), out[:, None, None, None] * np.ones_like(x.numpy()))


def test_mixup_seeded_is_reproducible_and_applies_to_nests():
    x = crafted_batch()
    a = augment.mixup(x, seed=[9, 9])
    b = augment.mixup(x, seed=[9, 9])
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    ratios = {float(augment.mixup(x, seed=[i, 0], return_ratio=True)[1]) for i in range(20)}
    assert len(ratios) > 10 and min(ratios) >= 0.5
    nest = {"student": x, "teacher": tf.image.resize(x, [8, 8])}
    mixed = augment.mixup(nest, seed=[3, 3])
    np.testing.assert_allclose(
        mixed["student"].numpy()[:, 0, 0], mixed["teacher"].numpy()[:, 0, 0], atol=1e-5
    )


def test_mixup_in_dataset_map():
    ds = tf.data.Dataset.from_tensors(crafted_batch()).map(lambda b: augment.mixup(b, seed=[9, 9]))
    np.testing.assert_allclose(next(iter(ds)).numpy(),
                               augment.mixup(crafted_batch(), seed=[9, 9]).numpy())


@pytest.mark.parametrize("size", [1, 5])
def test_crop_handles_tiny_images(size):
    out = augment.inception_crop(tf.ones([size, size, 3]), 8, seed=[0, 0])
    assert out.shape == (8, 8, 3)
