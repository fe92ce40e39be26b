"""The data tests' fixtures: tiny images, TFRecord shards and image folders they write."""

import os
import types

import numpy as np
import pytest
import tensorflow as tf

from funmatch_keras.data import file_sources
from funmatch_keras.distiller import TEACHER_LOGITS_KEY, Distiller


def arrays(n=10, h=20, w=24, seed=0):
    return np.random.default_rng(seed).integers(0, 256, [n, h, w, 3], dtype=np.uint8)


def constant_images(values, h=20, w=24):
    """Image i is constant `values[i]`: crops, flips and resizes keep the value."""
    return np.broadcast_to(np.asarray(values, np.uint8)[:, None, None, None],
                           (len(values), h, w, 3)).copy()


def jpeg(image: np.ndarray) -> bytes:
    return tf.io.encode_jpeg(image).numpy()


def png(image: np.ndarray) -> bytes:
    return tf.io.encode_png(image).numpy()


def write_tfrecords(directory, images, labels, corrupt=(), shards=2, encode=jpeg):
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


def write_image_folder(root):
    """b_cats: 2 JPEGs + corrupt; a_dogs: gray PNG, RGBA PNG, upper-case .JPG."""
    rng = np.random.default_rng(0)
    files = {
        "b_cats/1.jpg": jpeg(arrays(1, 30, 40)[0]),
        "b_cats/2.jpeg": jpeg(arrays(1, 25, 20, seed=1)[0]),
        "b_cats/broken.jpg": b"\xff\xd8\xff\xe0 this is not a jpeg",
        "b_cats/notes.txt": b"ignored",
        "a_dogs/gray.png": png(rng.integers(0, 256, [21, 17, 1], dtype=np.uint8)),
        "a_dogs/rgba.png": png(rng.integers(0, 256, [18, 22, 4], dtype=np.uint8)),
        "a_dogs/UPPER.JPG": jpeg(arrays(1, 22, 26, seed=2)[0]),
    }
    for name, content in files.items():
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_bytes(content)
    return str(root)


def take(ds, n):
    return [tf.nest.map_structure(lambda x: x.numpy(), b) for b in ds.take(n)]


def check_images(x, batch, size):
    assert x.shape == (batch, size, size, 3) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0


def written_ids(batch):
    """Example ids of `constant_tfrecords` images: the constant pixel value."""
    return np.rint((batch[:, 0, 0, 0] + 1.0) * 127.5 / 10).astype(int).tolist()


def constant_tfrecords(directory, n=23, shards=5):
    """Lossless PNG records; example i (constant pixel 10 * i) goes to shard i % 5."""
    images = constant_images(10 * np.arange(n), h=12, w=14)
    return file_sources.tfrecord_source(write_tfrecords(
        directory, images, np.arange(n) % 3, shards=shards, encode=png))


@pytest.fixture(scope="session")
def imgs() -> types.SimpleNamespace:
    """The helpers above: `imgs.arrays(...)`, `imgs.write_tfrecords(...)`, `imgs.take(...)`."""
    return types.SimpleNamespace(
        arrays=arrays, constant_images=constant_images, jpeg=jpeg, png=png,
        write_tfrecords=write_tfrecords, write_image_folder=write_image_folder, take=take,
        check_images=check_images, written_ids=written_ids,
        constant_tfrecords=constant_tfrecords)


@pytest.fixture
def traced_steps_on_stored_logits(monkeypatch):
    """For each training step `Distiller` traces from now on: whether its batch carried
    stored teacher logits (True) or ran the teacher (False). Clear it to start over."""
    traced = []
    original = Distiller.compute_loss

    def spy(self, x=None, *args, training=True, **kwargs):
        if training:
            traced.append(isinstance(x, dict) and TEACHER_LOGITS_KEY in x)
        return original(self, x, *args, training=training, **kwargs)

    monkeypatch.setattr(Distiller, "compute_loss", spy)
    return traced
