"""Fixed-teacher logits: the eval view's logits, cached once per teacher."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from funmatch_keras.data import augment, file_sources, sources, teacher_cache
from funmatch_keras.data import pipelines as data

SIZE, TEACHER_SIZE = 16, 24


class CountingTeacher:
    """Wraps a Keras model and counts calls (the pipeline must not re-run it)."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    @property
    def weights(self):
        return self.model.weights

    def __call__(self, images, training=False):
        self.calls += 1
        return self.model(images, training=training)


def _small_teacher(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input([TEACHER_SIZE, TEACHER_SIZE, 3]),
                             keras.layers.Conv2D(4, 3, strides=4),
                             keras.layers.Flatten(), keras.layers.Dense(5)])


def _cache_files(directory):
    return sorted(p.name for p in directory.glob("teacher_logits_*.npy"))


def test_fixed_teacher_logits_match_eval_view_and_are_cached(tmp_path, imgs):
    images = imgs.arrays(6, 30, 30)
    src = sources.array_source(images, np.arange(6) % 2)
    teacher = CountingTeacher(_small_teacher(0))
    logits = teacher_cache.teacher_logits(src, teacher, TEACHER_SIZE, str(tmp_path),
                                          batch_size=4)
    eval_views = augment.eval_preprocess(tf.constant(images), TEACHER_SIZE)
    expected = teacher.model(eval_views).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-5)  # row i = example i
    kw = dict(mode="fixed_teacher", batch_size=3, student_size=SIZE,
              teacher_size=TEACHER_SIZE, seed=0, teacher_logits=logits)
    (batch,) = imgs.take(data.train_pipeline(src, **kw), 1)
    imgs.check_images(batch["student"], 3, SIZE)
    # Each row is the logits of one example's eval view.
    distances = np.abs(batch["teacher_logits"][:, None] - expected[None]).max(-1)
    assert (distances.min(1) < 1e-5).all()
    assert len(_cache_files(tmp_path)) == 1
    calls = teacher.calls
    again = teacher_cache.teacher_logits(src, teacher, TEACHER_SIZE, str(tmp_path))
    assert teacher.calls == calls  # Second run reads the cache.
    np.testing.assert_array_equal(again, logits)
    other = CountingTeacher(_small_teacher(1))
    teacher_cache.teacher_logits(src, other, TEACHER_SIZE, str(tmp_path))
    assert other.calls > 0 and len(_cache_files(tmp_path)) == 2
    fewer = sources.array_source(images[:5], np.arange(5) % 2)  # other data: own file
    fewer_logits = teacher_cache.teacher_logits(fewer, teacher, TEACHER_SIZE, str(tmp_path))
    # Computed in other batch shapes: equal up to float32 rounding.
    np.testing.assert_allclose(fewer_logits, logits[:5], rtol=0, atol=1e-6)
    assert len(_cache_files(tmp_path)) == 3


def test_cache_written_before_the_move_is_found_without_the_teacher(tmp_path):
    """The cache name is `teacher_logits_<key>.npy` with the key of the releases
    that computed it in `funmatch_keras.data.pipelines`: their workdirs must keep working.
    The key below was computed by that code for this source and teacher."""
    images = np.arange(4 * 6 * 6 * 3, dtype=np.uint8).reshape(4, 6, 6, 3)
    src = sources.array_source(images, np.array([0, 1, 2, 1], np.int32), name="pinned")
    assert src.name == "pinned:06edf81c442b"
    teacher = CountingTeacher(keras.Sequential([
        keras.Input([8, 8, 3]), keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(3, kernel_initializer="ones", bias_initializer="zeros")]))
    written = np.arange(12, dtype=np.float32).reshape(4, 3)  # not what it computes
    np.save(tmp_path / "teacher_logits_c9f6e8f4d02d07eea938.npy", written)
    assert teacher_cache.cache_path(src, teacher, 8, str(tmp_path)) == str(
        tmp_path / "teacher_logits_c9f6e8f4d02d07eea938.npy")
    logits = teacher_cache.teacher_logits(src, teacher, 8, str(tmp_path))
    np.testing.assert_array_equal(logits, written)
    assert teacher.calls == 0


def test_corrupt_images_get_zero_rows_and_a_stale_cache_is_recomputed(tmp_path, imgs):
    good = [imgs.jpeg(image) for image in imgs.arrays(3, 30, 30)]
    encoded = np.array([good[0], b"\xff\xd8 not a jpeg", good[1], good[2]], object)
    src = sources.Source(
        name="jpegs", num_examples=4, num_classes=2, encoded=True,
        make_dataset=lambda: tf.data.Dataset.from_tensor_slices(
            {"image": encoded, "label": np.array([0, 1, 0, 1])}))
    teacher = CountingTeacher(_small_teacher(0))
    cache = tmp_path / "cache"  # created on first use
    path = teacher_cache.cache_path(src, teacher, TEACHER_SIZE, str(cache))
    logits = teacher_cache.teacher_logits(src, teacher, TEACHER_SIZE, str(cache))
    assert logits.shape == (4, 5)
    np.testing.assert_array_equal(logits[1], 0)  # corrupt: no logits
    assert np.all(np.abs(logits[[0, 2, 3]]).max(1) > 0)
    np.save(path, np.zeros([2, 5], np.float32))  # a cache of another size: not used
    calls = teacher.calls
    np.testing.assert_array_equal(
        teacher_cache.teacher_logits(src, teacher, TEACHER_SIZE, str(cache)), logits)
    assert teacher.calls > calls


def test_a_teacher_without_weights_is_refused(tmp_path, imgs):
    src = sources.array_source(imgs.arrays(2), [0, 1])
    with pytest.raises(ValueError, match="has none. Received: teacher="):
        teacher_cache.teacher_logits(src, lambda x, training: x, 8, str(tmp_path))


def test_moving_an_image_to_another_class_folder_recomputes_the_logits(tmp_path, imgs):
    """The cache was keyed by the folder's path and image count: an image moved to its
    right class folder reordered the examples, and the cache gave another image's logits."""
    root = tmp_path / "images"
    for i, image in enumerate(imgs.arrays(6, 30, 30)):
        folder = root / ("a" if i < 3 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.png").write_bytes(imgs.png(image))
    teacher = _small_teacher(0)

    def logits(cache):
        return teacher_cache.teacher_logits(file_sources.folder_source(str(root)), teacher,
                                            TEACHER_SIZE, str(cache))

    before = logits(tmp_path / "cache")
    (root / "a" / "0.png").rename(root / "b" / "0.png")  # same count, new order
    after = logits(tmp_path / "cache")
    fresh = logits(tmp_path / "fresh")
    np.testing.assert_array_equal(after, fresh)
    # Now a/1, a/2, b/0, b/3...: each row follows its image.
    np.testing.assert_allclose(after[[0, 1, 2]], before[[1, 2, 0]], rtol=0, atol=1e-6)
    assert len(_cache_files(tmp_path / "cache")) == 2
    np.testing.assert_array_equal(logits(tmp_path / "cache"), fresh)  # read back
