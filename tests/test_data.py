import logging
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from funmatch_keras import augment, data, sources

SIZE, TEACHER_SIZE = 16, 24


def _arrays(n=10, h=20, w=24, seed=0):
    return np.random.default_rng(seed).integers(0, 256, [n, h, w, 3], dtype=np.uint8)


def _constant_images(values, h=20, w=24):
    """Image i is constant `values[i]`: crops, flips and resizes keep the value."""
    return np.broadcast_to(np.asarray(values, np.uint8)[:, None, None, None],
                           (len(values), h, w, 3)).copy()


def _jpeg(image: np.ndarray) -> bytes:
    return tf.io.encode_jpeg(image).numpy()


def _png(image: np.ndarray) -> bytes:
    return tf.io.encode_png(image).numpy()


def _write_tfrecords(directory, images, labels, corrupt=(), shards=2, encode=_jpeg):
    """Writes `class`/`image` Examples, example i to shard `i % shards`; images
    at indices in `corrupt` are cut."""
    writers = [tf.io.TFRecordWriter(os.path.join(directory, f"train-{s:05d}"))
               for s in range(shards)]
    for i, (image, label) in enumerate(zip(images, labels)):
        encoded = encode(image)
        if i in corrupt:
            encoded = encoded[: len(encoded) // 2]  # Valid header, truncated data.
        example = tf.train.Example(features=tf.train.Features(feature={
            "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded])),
            "class": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
        }))
        writers[i % shards].write(example.SerializeToString())
    for w in writers:
        w.close()
    return os.path.join(directory, "train-*")


def _rgba_png(rng):
    return tf.io.encode_png(rng.integers(0, 256, [18, 22, 4], dtype=np.uint8)).numpy()


def _gray_png(rng):
    return tf.io.encode_png(rng.integers(0, 256, [21, 17, 1], dtype=np.uint8)).numpy()


@pytest.fixture
def image_folder(tmp_path):
    """b_cats: 2 JPEGs + corrupt; a_dogs: gray PNG, RGBA PNG, upper-case .JPG."""
    rng = np.random.default_rng(0)
    files = {
        "b_cats/1.jpg": _jpeg(_arrays(1, 30, 40)[0]),
        "b_cats/2.jpeg": _jpeg(_arrays(1, 25, 20, seed=1)[0]),
        "b_cats/broken.jpg": b"\xff\xd8\xff\xe0 this is not a jpeg",
        "b_cats/notes.txt": b"ignored",
        "a_dogs/gray.png": _gray_png(rng),
        "a_dogs/rgba.png": _rgba_png(rng),
        "a_dogs/UPPER.JPG": _jpeg(_arrays(1, 22, 26, seed=2)[0]),
    }
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(content)
    return str(tmp_path)


def _take(ds, n):
    return [tf.nest.map_structure(lambda x: x.numpy(), b) for b in ds.take(n)]


def _check_images(x, batch, size):
    assert x.shape == (batch, size, size, 3) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0


# ---------------------------------------------------------------- sources


@pytest.mark.parametrize("preset,num_classes", [
    ("pets37", 37), ("flowers102", 102), ("food101", 101), ("sun397", 397),
    ("imagenet2012", 1000),
])
def test_tfds_presets_load_under_mock_data(preset, num_classes, tmp_path):
    with tfds.testing.mock_data(num_examples=6):
        src = data.tfds_source(preset, "train", data_dir=str(tmp_path))
        assert (src.num_examples, src.num_classes) == (6, num_classes)
        for role in sources.SPLIT_ROLES:
            split = data.tfds_source(preset, role, data_dir=str(tmp_path))
            assert split.num_examples == 6 and split.encoded
        (batch,) = _take(data.train_pipeline(src, batch_size=4, student_size=SIZE,
                                             seed=0, epochs=1), 1)
        _check_images(batch, 4, SIZE)
        images, labels = _take(data.eval_pipeline(src, size=SIZE, batch_size=6), 1)[0]
        _check_images(images, 6, SIZE)
        assert labels.dtype == np.int32
        assert ((0 <= labels) & (labels < num_classes)).all()


def test_split_names_of_presets():
    assert data.split_names("food101") == {
        "train": "train[:90%]", "validation": "train[90%:]", "test": "validation"}
    assert data.split_names("imagenet2012")["validation"] == "train[98%:]"
    with pytest.raises(ValueError, match="pets37"):
        data.split_names("cifar11")


def test_tfds_dataset_not_prepared_explains_how(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"oxford_flowers102.*tfds build"):
        data.tfds_source("flowers102", "train", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"downloads/manual"):
        data.tfds_source("imagenet2012", "validation", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="Unknown tfds dataset"):
        data.tfds_source("no_such_dataset_xyz", data_dir=str(tmp_path))


def test_tfrecords_load_and_corrupt_jpeg_is_counted(tmp_path, caplog):
    images = _arrays(7, 40, 50)
    labels = [0, 1, 2, 0, 1, 2, 4]
    pattern = _write_tfrecords(str(tmp_path), images, labels, corrupt={3})
    src = data.tfrecord_source(pattern)
    assert (src.num_examples, src.num_classes, src.is_files) == (7, 5, True)
    with caplog.at_level(logging.WARNING):
        batches = _take(data.train_pipeline(src, batch_size=2, student_size=SIZE,
                                            seed=0, epochs=1), 10)
    assert len(batches) == 3  # 6 decodable images, batches of 2.
    assert "Skipped 1 of 7 examples" in caplog.text
    labels = np.concatenate([y for _, y in _take(
        data.eval_pipeline(src, size=SIZE, batch_size=4), 10)])
    np.testing.assert_array_equal(labels, [0, 1, 2, 1, 2, 4])  # Shard-interleaved.
    options = data.train_pipeline(src, batch_size=2, student_size=SIZE).options()
    assert options.experimental_distribute.auto_shard_policy == (
        tf.data.experimental.AutoShardPolicy.DATA)  # global batches; per-worker: OFF


def test_resume_is_exact_with_corrupt_images(tmp_path):
    """A corrupt record's place is filled by the next good example, so step k has
    the same batch whether the pipeline starts at 0 or at k, in any epoch."""
    n, corrupt = 9, {2, 3, 7}
    images = _constant_images(10 * np.arange(n), h=12, w=14)
    src = data.tfrecord_source(_write_tfrecords(
        str(tmp_path), images, np.arange(n) % 3, corrupt=corrupt, shards=1))
    kw = dict(mode="consistent", batch_size=3, student_size=8, seed=5,
              area_range=(1.0, 1.0), flip=False)
    run = _take(data.train_pipeline(src, **kw), 9)  # 3 epochs of 9 records
    ids = [_written_ids(b) for b in run]
    for epoch in range(3):
        epoch_ids = sum(ids[3 * epoch:3 * epoch + 3], [])
        assert set(epoch_ids) <= set(range(n)) - corrupt  # never a corrupt one
        assert len(epoch_ids) == n  # places kept: 3 copies fill the 3 holes
    for step in (1, 2, 4, 8):
        (resumed,) = _take(data.train_pipeline(src, start_step=step, **kw), 1)
        np.testing.assert_array_equal(resumed, run[step], err_msg=f"step {step}")


def test_image_folder_png_gray_rgba_and_corrupt(image_folder, caplog):
    src = data.folder_source(image_folder)
    assert (src.num_examples, src.num_classes) == (6, 2)  # notes.txt ignored.
    with caplog.at_level(logging.WARNING):
        out = _take(data.eval_pipeline(src, size=SIZE, batch_size=8), 1)
        (batch,) = _take(data.train_pipeline(src, batch_size=5, student_size=SIZE,
                                             seed=1, epochs=1), 1)
    images, labels = out[0]
    _check_images(images, 5, SIZE)
    _check_images(batch, 5, SIZE)
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1])  # Sorted: a_dogs first.
    assert "Skipped 1 of 6 examples" in caplog.text


def test_source_of_only_corrupt_images_raises(tmp_path):
    (tmp_path / "c").mkdir()
    for i in range(3):
        (tmp_path / "c" / f"{i}.jpg").write_bytes(b"garbage")
    src = data.folder_source(str(tmp_path))
    with pytest.raises(tf.errors.InvalidArgumentError, match="failed to decode"):
        _take(data.train_pipeline(src, batch_size=1, student_size=SIZE, seed=0), 1)


def test_array_source_grayscale_and_digits_range():
    from sklearn.datasets import load_digits

    digits = load_digits()
    src = data.array_source(digits.images[:8], digits.target[:8], in_max=16)
    assert src.num_classes == 8 and not src.encoded
    images, labels = _take(data.eval_pipeline(src, size=8, batch_size=8), 1)[0]
    _check_images(images, 8, 8)
    assert images.max() > 0.9 and images.min() < -0.9  # Full range, not 0..16/255.
    np.testing.assert_array_equal(labels, digits.target[:8])
    np.testing.assert_array_equal(images[..., 0], images[..., 2])  # Gray -> RGB.


def test_bad_labels_name_the_example_index(tmp_path):
    with pytest.raises(ValueError, match="index 2"):
        data.array_source(_arrays(4), [0, 1, 7, 1], num_classes=3)
    with pytest.raises(ValueError, match="index 1"):
        data.array_source(_arrays(3), [0, -1, 1])
    pattern = _write_tfrecords(str(tmp_path), _arrays(4), [0, 1, 9, 1], shards=1)
    src = data.tfrecord_source(pattern, num_classes=3)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"example index\] \[2\]"):
        _take(data.eval_pipeline(src, size=SIZE, batch_size=4), 1)


def test_empty_sources_raise(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        data.array_source(np.zeros([0, 8, 8], np.uint8), np.zeros([0], int))
    with pytest.raises(ValueError, match="No images"):
        data.folder_source(str(tmp_path))
    with pytest.raises(ValueError, match="No TFRecord files"):
        data.tfrecord_source(str(tmp_path / "missing-*"))
    tf.io.TFRecordWriter(str(tmp_path / "empty-0")).close()
    with pytest.raises(ValueError, match="no records"):
        data.tfrecord_source(str(tmp_path / "empty-*"))


def test_bad_arguments_raise():
    src = data.array_source(_arrays(4), [0, 1, 0, 1])
    with pytest.raises(ValueError, match="batch_size=10, num_replicas=4"):
        data.train_pipeline(src, batch_size=10, student_size=SIZE, num_replicas=4)
    with pytest.raises(ValueError, match="function_matching.*fixed_teacher"):
        data.train_pipeline(src, mode="mixup", batch_size=2, student_size=SIZE)
    with pytest.raises(ValueError, match="teacher.*workdir"):
        data.train_pipeline(src, mode="fixed_teacher", batch_size=2, student_size=SIZE)
    assert data.steps_per_epoch(src, 3) == 1
    with pytest.raises(ValueError, match="batch_size=5"):
        data.steps_per_epoch(src, 5)


# ---------------------------------------------------------------- modes


def test_consistent_and_function_matching_give_one_tensor():
    src = data.array_source(_arrays(8), np.arange(8) % 3)
    for mode in ("consistent", "function_matching"):
        (batch,) = _take(data.train_pipeline(src, mode=mode, batch_size=4,
                                             student_size=SIZE, seed=0), 1)
        _check_images(batch, 4, SIZE)  # A plain tensor: both models see it.


def test_independent_mode_gives_two_crops_of_the_same_example():
    # Channel 0 identifies the example; channel 1 is a gradient that tells crops apart.
    n, h, w = 8, 32, 32
    images = np.zeros([n, h, w, 3], np.uint8)
    images[..., 0] = (np.arange(n) * 30)[:, None, None]
    images[..., 1] = np.linspace(0, 255, h * w).reshape(h, w).astype(np.uint8)
    src = data.array_source(images, np.zeros(n, int))
    (batch,) = _take(data.train_pipeline(src, mode="independent", batch_size=8,
                                         student_size=SIZE, seed=3), 1)
    s, t = batch["student"], batch["teacher"]
    same_example = np.abs(s[..., 0].mean((1, 2)) - t[..., 0].mean((1, 2)))
    assert same_example.max() < 1e-5
    differs = np.abs(s[..., 1] - t[..., 1]).mean((1, 2)) > 1e-2
    assert differs.sum() >= 6  # Independent crops (a rare full-image pair may match).


def test_cross_resolution_views_share_one_crop():
    h, w = 48, 64
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    smooth = np.stack([255 * yy, 255 * xx, 255 * yy * xx], -1).astype(np.uint8)
    images = np.stack([smooth, smooth[::-1], smooth[:, ::-1], smooth[::-1, ::-1]])
    src = data.array_source(images, np.zeros(4, int))
    (batch,) = _take(data.train_pipeline(
        src, mode="consistent", batch_size=4, student_size=SIZE,
        teacher_size=TEACHER_SIZE, seed=5), 1)
    s, t = batch["student"], batch["teacher"]
    _check_images(s, 4, SIZE)
    _check_images(t, 4, TEACHER_SIZE)
    t_small = augment.resize(t, SIZE).numpy()
    diff = np.abs(t_small - s).mean()
    assert 0 < diff < 0.03, diff


def test_mixup_uses_one_ratio_per_batch_for_both_views():
    values = np.arange(8) * 30 + 10  # Distinct constants: mixing is exactly linear.
    src = data.array_source(_constant_images(values), np.zeros(8, int))
    kw = dict(batch_size=8, student_size=SIZE, teacher_size=TEACHER_SIZE, seed=11)
    (plain,) = _take(data.train_pipeline(src, mode="consistent", **kw), 1)
    (mixed,) = _take(data.train_pipeline(src, mode="function_matching", **kw), 1)
    ratios = {}
    for view in ("student", "teacher"):
        x, m = plain[view].mean((1, 2, 3)), mixed[view].mean((1, 2, 3))
        partner = np.roll(x, 1)  # The paper's partner: the previous example.
        ratios[view] = (m - partner) / (x - partner)
    a = ratios["student"][0]
    assert 0.5 <= a <= 1.0
    np.testing.assert_allclose(ratios["student"], a, atol=1e-4)
    np.testing.assert_allclose(ratios["teacher"], a, atol=1e-4)


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


def test_fixed_teacher_logits_match_eval_view_and_are_cached(tmp_path):
    images = _arrays(6, 30, 30)
    src = data.array_source(images, np.arange(6) % 2)
    teacher = CountingTeacher(_small_teacher(0))
    kw = dict(mode="fixed_teacher", batch_size=3, student_size=SIZE,
              teacher_size=TEACHER_SIZE, seed=0, teacher=teacher, workdir=str(tmp_path))
    (batch,) = _take(data.train_pipeline(src, **kw), 1)
    _check_images(batch["student"], 3, SIZE)
    eval_views = augment.eval_preprocess(tf.constant(images), TEACHER_SIZE)
    expected = teacher.model(eval_views).numpy()
    # Each row is the logits of one example's eval view.
    distances = np.abs(batch["teacher_logits"][:, None] - expected[None]).max(-1)
    assert (distances.min(1) < 1e-5).all()
    assert len(list(tmp_path.glob("teacher_logits_*.npy"))) == 1
    calls = teacher.calls
    _take(data.train_pipeline(src, **kw), 1)
    assert teacher.calls == calls  # Second run reads the cache.
    other = CountingTeacher(_small_teacher(1))
    _take(data.train_pipeline(src, **{**kw, "teacher": other}), 1)
    assert other.calls > 0 and len(list(tmp_path.glob("teacher_logits_*.npy"))) == 2


# ---------------------------------------------------------------- seeding and resume


@pytest.mark.parametrize("teacher_size,shuffle_buffer", [(None, 64), (TEACHER_SIZE, 4)])
def test_seeded_pipeline_is_reproducible_and_resumes_at_a_step(
    teacher_size, shuffle_buffer
):
    src = data.array_source(_arrays(10), np.arange(10) % 3)
    kw = dict(batch_size=4, student_size=SIZE, teacher_size=teacher_size, seed=7,
              shuffle_buffer=shuffle_buffer)
    run = _take(data.train_pipeline(src, **kw), 4)
    again = _take(data.train_pipeline(src, **kw), 4)
    tf.nest.map_structure(np.testing.assert_array_equal, run, again)
    other = _take(data.train_pipeline(src, **{**kw, "seed": 8}), 1)
    assert not np.allclose(tf.nest.flatten(other[0])[0], tf.nest.flatten(run[0])[0])
    # Step 3 starts in the second epoch (12 examples in): a resume skips the first
    # epoch entirely and 2 still-encoded examples of the second.
    (resumed,) = _take(data.train_pipeline(src, **kw, start_step=3), 1)
    tf.nest.map_structure(np.testing.assert_array_equal, resumed, run[3])


@pytest.mark.parametrize("shuffle_buffer", [4, 100])
def test_each_epoch_is_a_seeded_permutation(shuffle_buffer):
    values = np.arange(10) * 20 + 5
    src = data.array_source(_constant_images(values), np.zeros(10, int))
    kw = dict(mode="consistent", batch_size=10, student_size=SIZE, seed=2,
              shuffle_buffer=shuffle_buffer)
    epochs = _take(data.train_pipeline(src, **kw), 2)
    seen = [np.rint((b.mean((1, 2, 3)) + 1) * 127.5).astype(int) for b in epochs]
    for order in seen:
        np.testing.assert_array_equal(np.sort(order), values)
    assert not np.array_equal(seen[0], seen[1])  # Reshuffled each epoch.
    # TF's global seed (set by keras.utils.set_random_seed) changes nothing.
    keras.utils.set_random_seed(0)
    tf.nest.map_structure(np.testing.assert_array_equal,
                          _take(data.train_pipeline(src, **kw), 2), epochs)


def test_epochs_bound_the_number_of_batches():
    src = data.array_source(_arrays(10), np.arange(10) % 3)
    ds = data.train_pipeline(src, batch_size=4, student_size=SIZE, seed=0, epochs=3)
    assert len(_take(ds, 100)) == 30 // 4


# ---------------------------------------------------------------- ops eager vs tf.data


@pytest.mark.parametrize("encoded", [False, True])
def test_train_views_are_the_same_eagerly_and_in_dataset_map(encoded):
    image = _arrays(1, 40, 30)[0]
    image = tf.constant(_jpeg(image)) if encoded else tf.constant(image)
    view_fn = data._train_view_fn("independent", SIZE, TEACHER_SIZE, encoded)
    seed = tf.constant([4, 2], tf.int64)
    eager = view_fn(image, seed)
    in_map = next(iter(tf.data.Dataset.from_tensors((image, seed)).map(view_fn)))
    for name, size in (("student", SIZE), ("teacher", TEACHER_SIZE)):
        _check_images(eager[name].numpy()[None], 1, size)
        np.testing.assert_allclose(eager[name], in_map[name], atol=1e-5)


def test_jpeg_crop_decode_matches_full_decode_then_slice():
    image = _arrays(1, 40, 30)[0]
    encoded = tf.constant(_jpeg(image))
    seeds = [tf.constant([1, i], tf.int64) for i in range(3)]
    from_jpeg = data._crops(encoded, seeds, encoded=True)
    decoded = tf.io.decode_jpeg(encoded)
    from_pixels = data._crops(decoded, seeds, encoded=False)
    for a, b in zip(from_jpeg, from_pixels):
        assert a.shape == b.shape
        assert np.abs(a.numpy().astype(int) - b.numpy().astype(int)).max() <= 2


def test_crop_area_flip_and_labels_options():
    # A left-to-right gradient: a flip reverses it, a crop narrows its span.
    gradient = np.broadcast_to(np.linspace(0, 255, 40, dtype=np.float32)[None, :, None],
                               (40, 40, 3))
    src = data.array_source(np.stack([gradient] * 8).astype(np.uint8), np.arange(8) % 2)
    batches = _take(data.train_pipeline(src, mode="consistent", batch_size=8,
                                        student_size=SIZE, seed=0, flip=False,
                                        area_range=(0.9, 1.0), with_labels=True), 3)
    for images, labels in batches:
        assert sorted(labels) == [0] * 4 + [1] * 4  # one epoch per batch, labels kept
        assert np.all(images[:, :, -1, 0] > images[:, :, 0, 0])  # never flipped
        # >= 90% of the area keeps most of the gradient's span.
        assert np.all(images[:, 0, -1, 0] - images[:, 0, 0, 0] > 1.2)
    flipped = _take(data.train_pipeline(src, mode="consistent", batch_size=8,
                                        student_size=SIZE, seed=0), 3)
    assert any(np.any(b[:, 0, -1, 0] < b[:, 0, 0, 0]) for b in flipped)
    with pytest.raises(ValueError, match="with_labels=True needs a mode without mixup"):
        data.train_pipeline(src, batch_size=8, student_size=SIZE, with_labels=True)


def test_digits_source_is_offline_and_split_is_stratified():
    train, test = sources.digits_source("train"), sources.digits_source("test")
    assert (train.num_examples, test.num_examples, train.num_classes) == (1257, 540, 10)
    labels = np.concatenate([y.numpy() for _, y in data.eval_pipeline(test, size=SIZE,
                                                                      batch_size=600)])
    assert np.all(np.bincount(labels, minlength=10) >= 50)
    with pytest.raises(ValueError, match="Unknown digits split"):
        sources.digits_source("trian")


def test_ensemble_teacher_sizes_give_one_view_each_from_one_crop():
    src = data.array_source(_arrays(8, 40, 48), np.arange(8) % 2)
    batch = _take(data.train_pipeline(src, mode="consistent", batch_size=4, student_size=16,
                                      teacher_size=[24, 32], seed=0), 1)[0]
    small, large = batch["teacher"]
    assert small.shape == (4, 24, 24, 3) and large.shape == (4, 32, 32, 3)
    # Same crop: each teacher view resized to the student's size is close to it
    # (resampling noise), much closer than to another example's view.
    for view in (small, large):
        resized = tf.image.resize(view, [16, 16]).numpy()
        same = np.abs(resized - batch["student"]).mean()
        other = np.abs(resized - np.roll(batch["student"], 1, axis=0)).mean()
        assert same < 0.2 and other > 2 * same
    images, _ = next(iter(data.eval_pipeline(src, size=16, batch_size=4, teacher_size=[24, 32])))
    assert [t.shape[1] for t in images["teacher"]] == [24, 32]
    with pytest.raises(ValueError, match="fixed_teacher"):
        data.train_pipeline(src, mode="fixed_teacher", batch_size=4, student_size=16,
                            teacher_size=[24, 32], teacher=object(), workdir="/tmp")


# ------------------------------------------------- sharding across workers


def _written_ids(batch):
    """Example ids of `_constant_tfrecords` images: the constant pixel value."""
    return np.rint((batch[:, 0, 0, 0] + 1.0) * 127.5 / 10).astype(int).tolist()


def _constant_tfrecords(directory, n=23, shards=5):
    """Lossless PNG records; example i (constant pixel 10 * i) goes to shard i % 5."""
    images = _constant_images(10 * np.arange(n), h=12, w=14)
    return data.tfrecord_source(_write_tfrecords(
        directory, images, np.arange(n) % 3, shards=shards, encode=_png))


def test_file_sources_shard_by_file_with_global_indices(tmp_path, image_folder):
    n, shards = 23, 5
    src = _constant_tfrecords(str(tmp_path), n, shards)
    assert (src.num_files, src.is_files) == (shards, True)
    # Index = records of earlier files + position in the file (files sorted).
    counts = [len(range(s, n, shards)) for s in range(shards)]
    index_of = {i: sum(counts[:i % shards]) + i // shards for i in range(n)}
    kw = dict(mode="consistent", batch_size=1, student_size=8, seed=0, epochs=1,
              area_range=(1.0, 1.0), flip=False)
    seen = []
    for worker in range(2):
        part = src.shard(2, worker)
        # Worker w reads exactly the files s with s % 2 == w.
        expected = [i for i in range(n) if (i % shards) % 2 == worker]
        assert part.num_examples == len(expected) and part.num_files == len(
            range(worker, shards, 2))
        assert sorted(int(ex["index"]) for ex in part.dataset()) == sorted(
            index_of[i] for i in expected)
        ids = sum((_written_ids(b) for b in _take(data.train_pipeline(part, **kw), n)), [])
        assert sorted(ids) == expected
        seen += ids
    assert sorted(seen) == list(range(n))  # disjoint, and together everything

    folder = data.folder_source(image_folder)
    parts = [folder.shard(3, w) for w in range(3)]
    assert [p.num_examples for p in parts] == [2, 2, 2] and all(p.is_files for p in parts)
    indices = [sorted(int(ex["index"]) for ex in p.dataset()) for p in parts]
    assert indices == [[0, 3], [1, 4], [2, 5]]


def test_sources_without_enough_files_shard_by_example(tmp_path, caplog):
    src = data.array_source(_arrays(7), np.arange(7) % 2)
    assert not src.is_files
    assert [[int(ex["index"]) for ex in src.shard(3, w).dataset()] for w in range(3)] == [
        [0, 3, 6], [1, 4], [2, 5]]
    assert src.shard(1, 0) is src
    two_files = _constant_tfrecords(str(tmp_path), n=6, shards=2)
    with caplog.at_level(logging.WARNING):
        part = two_files.shard(3, 1)
    assert "sharding by example instead of by file" in caplog.text
    assert sorted(int(ex["index"]) for ex in part.dataset()) == [1, 4]
    with pytest.raises(ValueError, match="shard_index"):
        src.shard(2, 2)


def _context(pipelines, pipeline_id, replicas):
    return tf.distribute.InputContext(num_input_pipelines=pipelines,
                                      input_pipeline_id=pipeline_id,
                                      num_replicas_in_sync=replicas)


def test_input_context_pipelines_read_their_files_and_resume(tmp_path):
    """2 workers x 2 replicas, global batch 8: each worker yields per-replica
    batches of 2 from its own files, covering them once per (local) epoch."""
    n, shards = 23, 5
    src = _constant_tfrecords(str(tmp_path), n, shards)
    kw = dict(mode="consistent", batch_size=8, student_size=8, seed=3,
              area_range=(1.0, 1.0), flip=False, shuffle_buffer=100)
    for worker in range(2):
        ds = data.train_pipeline(src, input_context=_context(2, worker, 4), **kw)
        assert ds.options().experimental_distribute.auto_shard_policy == (
            tf.data.experimental.AutoShardPolicy.OFF)
        own = [i for i in range(n) if (i % shards) % 2 == worker]
        batches = _take(ds, 2 * len(own))  # several local epochs
        assert {b.shape for b in batches} == {(2, 8, 8, 3)}
        ids = sum((_written_ids(b) for b in batches), [])
        assert sorted(ids[:len(own)]) == own  # one epoch of its shard first
        assert set(ids) == set(own)
        # Global step 3 = this worker's per-replica batches 6 and 7.
        resumed = _take(data.train_pipeline(
            src, input_context=_context(2, worker, 4), start_step=3, **kw), 2)
        np.testing.assert_array_equal(np.stack(resumed), np.stack(batches[6:8]))


def test_input_context_mixup_and_argument_checks():
    src = data.array_source(_arrays(12), np.arange(12) % 3)
    kw = dict(batch_size=8, student_size=SIZE, seed=0)
    # One pipeline over 4 replicas: the global batch, mixed, then split in 4.
    whole = _take(data.train_pipeline(src, **kw), 2)
    split = _take(data.train_pipeline(src, input_context=_context(1, 0, 4), **kw), 8)
    np.testing.assert_allclose(np.concatenate(split[:4]), whole[0], atol=1e-6)
    np.testing.assert_allclose(np.concatenate(split[4:]), whole[1], atol=1e-6)
    with pytest.raises(ValueError, match="epochs=None"):
        data.train_pipeline(src, input_context=_context(2, 0, 2), epochs=1, **kw)
    with pytest.raises(ValueError, match="num_replicas_in_sync=3"):
        data.train_pipeline(src, input_context=_context(1, 0, 3), **kw)
