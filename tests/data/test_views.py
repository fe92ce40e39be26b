"""Per-example views: the same eagerly and in tf.data, JPEG crop decoding."""

import numpy as np
import pytest
import tensorflow as tf

from funmatch_keras.data import views

SIZE, TEACHER_SIZE = 16, 24


@pytest.mark.parametrize("encoded", [False, True])
def test_train_views_are_the_same_eagerly_and_in_dataset_map(encoded, imgs):
    image = imgs.arrays(1, 40, 30)[0]
    image = tf.constant(imgs.jpeg(image)) if encoded else tf.constant(image)
    view_fn = views.train_view_fn("independent", SIZE, TEACHER_SIZE, encoded)
    seed = tf.constant([4, 2], tf.int64)
    eager = view_fn(image, seed)
    in_map = next(iter(tf.data.Dataset.from_tensors((image, seed)).map(view_fn)))
    for name, size in (("student", SIZE), ("teacher", TEACHER_SIZE)):
        imgs.check_images(eager[name].numpy()[None], 1, size)
        np.testing.assert_allclose(eager[name], in_map[name], atol=1e-5)


def test_jpeg_crop_decode_matches_full_decode_then_slice(imgs):
    image = imgs.arrays(1, 40, 30)[0]
    encoded = tf.constant(imgs.jpeg(image))
    seeds = [tf.constant([1, i], tf.int64) for i in range(3)]
    from_jpeg = views.crops(encoded, seeds, encoded=True)
    decoded = tf.io.decode_jpeg(encoded)
    from_pixels = views.crops(decoded, seeds, encoded=False)
    for a, b in zip(from_jpeg, from_pixels):
        assert a.shape == b.shape
        assert np.abs(a.numpy().astype(int) - b.numpy().astype(int)).max() <= 2
