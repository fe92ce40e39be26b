"""Pixels and labels are checked once, when a source is built; TFRecord errors name files.

Each case once went through silently: uint16 images read as values up to 65535
(`[-1, 1]` views up to ~500), float images in [0, 1] read as almost black, NaN
pixels that made the weights NaN, float labels truncated to int, a corrupt
TFRecord shard reported without its name, and a wrong feature key reported as
"corrupt images?".
"""

import numpy as np
import pytest
import tensorflow as tf

from funmatch_keras.data import file_sources, sources
from funmatch_keras.data import pipelines as data

SIZE = 8


def _eval_images(src):
    batches = data.eval_pipeline(src, size=SIZE, batch_size=8).take(4)
    return np.concatenate([x.numpy() for x, _ in batches])


def _pixels(src):
    """The source's decoded images, as the pipeline reads them ([0, 255])."""
    return np.stack([ex["image"].numpy() for ex in src.dataset()])


def _floats(n=4, high=1.0):
    return np.random.default_rng(0).uniform(0, high, [n, 10, 10, 3])


def test_uint16_images_need_their_range(imgs):
    images = (imgs.arrays(4, 10, 10).astype(np.uint16) * 257)  # 16-bit, up to 65535
    with pytest.raises(ValueError, match=r"uint16.*value_range=\(0, 65535\).*uint8"):
        sources.array_source(images, np.arange(4))
    pixels = _pixels(sources.array_source(images, np.arange(4), value_range=(0, 65535)))
    np.testing.assert_allclose(pixels, imgs.arrays(4, 10, 10), atol=1e-3)  # in [0, 255]


def test_float_images_need_a_stated_range_mapped_to_the_pipeline():
    floats = _floats()
    with pytest.raises(ValueError, match=r"float64.*value_range=\(0, 1\).*\(0, 255\)"):
        sources.array_source(floats, np.arange(4))
    views = _eval_images(sources.array_source(floats, np.arange(4), value_range=(0, 1)))
    assert views.min() < -0.8 and views.max() > 0.8  # full range, not almost black
    same = _pixels(sources.array_source(floats * 255, np.arange(4), value_range=(0, 255)))
    np.testing.assert_allclose(same, floats * 255, atol=1e-3)
    with pytest.raises(ValueError, match=r"outside value_range=\(0, 1\).*\(0, 255\)"):
        sources.array_source(floats * 255, np.arange(4), value_range=(0, 1))
    with pytest.raises(ValueError, match="not both"):
        sources.array_source(floats, np.arange(4), in_max=1, value_range=(0, 1))
    with pytest.raises(ValueError, match="low < high"):
        sources.array_source(floats, np.arange(4), value_range=(1, 0))


def test_non_finite_pixels_are_refused_naming_the_example():
    floats = _floats()
    floats[2, 3, 4, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite pixels.*index 2"):
        sources.array_source(floats, np.arange(4), value_range=(0, 1))


def test_labels_must_be_class_indices(imgs):
    images = imgs.arrays(4, 10, 10)
    with pytest.raises(ValueError, match=r"index 1 is 1\.5.*does not\s+truncate"):
        sources.array_source(images, [0.0, 1.5, 2.0, 1.0])
    with pytest.raises(ValueError, match="index 3"):
        sources.array_source(images, [0.0, 1.0, 2.0, np.nan])
    whole = sources.array_source(images, np.array([0.0, 1.0, 2.0, 1.0]))
    assert whole.num_classes == 3
    assert [int(ex["label"]) for ex in whole.dataset()] == [0, 1, 2, 1]
    with pytest.raises(ValueError, match="np.unique"):
        sources.array_source(images, np.array(["cat", "dog", "cat", "dog"]))


def test_decoded_images_of_another_dtype_fail_when_the_pipeline_is_built():
    def make_dataset():
        return tf.data.Dataset.from_tensor_slices(
            {"image": np.full([2, 10, 10, 3], 600, np.uint16), "label": [0, 1]})

    src = sources.Source(name="uint16", num_examples=2, num_classes=2, encoded=False,
                         make_dataset=make_dataset)
    with pytest.raises(ValueError, match="not uint16.*value_range"):
        data.eval_pipeline(src, size=SIZE, batch_size=2)
    with pytest.raises(ValueError, match="not uint16"):
        data.train_pipeline(src, batch_size=2, student_size=SIZE, seed=0, epochs=1)


def test_a_corrupt_tfrecord_shard_is_named(tmp_path, imgs):
    pattern = imgs.write_tfrecords(str(tmp_path), imgs.arrays(4), [0, 1, 2, 1], shards=2)
    shard = tmp_path / "train-00001"
    content = shard.read_bytes()
    shard.write_bytes(content[:-30])
    with pytest.raises(ValueError, match=r"train-00001' is truncated or corrupt.*"
                                         r"truncated record.*re-create"):
        file_sources.tfrecord_source(pattern)
    broken = bytearray(content)
    broken[5] ^= 0xFF  # the length's checksum
    shard.write_bytes(bytes(broken))
    with pytest.raises(ValueError, match=r"train-00001' is truncated or corrupt"):
        file_sources.tfrecord_source(pattern)


def test_a_wrong_feature_key_lists_the_keys_found(tmp_path, imgs):
    pattern = imgs.write_tfrecords(str(tmp_path), imgs.arrays(4), [0, 1, 2, 1], shards=1)
    with pytest.raises(ValueError) as error:
        file_sources.tfrecord_source(pattern, image_key="image/encoded")
    message = str(error.value)
    assert "no feature 'image/encoded'" in message and "image_key=" in message
    assert "Keys found: 'class' (int64), 'image' (bytes)" in message
    assert "corrupt" not in message
    with pytest.raises(ValueError, match=r"'label'.*label_key=.*int64 features: 'class'"):
        file_sources.tfrecord_source(pattern, label_key="label")
    with pytest.raises(ValueError, match="'class' as an int64 feature.*bytes"):
        file_sources.tfrecord_source(pattern, image_key="class", label_key="class")


def test_one_class_data_is_refused_by_every_source(tmp_path, imgs):
    """Configs refuse num_classes < 2; the sources did not: a one-class source trained."""
    with pytest.raises(ValueError, match=r"labels \(largest 0\) have 1 class.*at least 2"
                                         r".*pass num_classes="):
        sources.array_source(imgs.arrays(3), [0, 0, 0])
    with pytest.raises(ValueError, match="num_classes says the task has 1 class"):
        sources.array_source(imgs.arrays(3), [0, 0, 0], num_classes=1)
    # A validation set holding only some of the classes is fine with the task's count.
    assert sources.array_source(imgs.arrays(3), [0, 0, 0], num_classes=5).num_classes == 5
    pattern = imgs.write_tfrecords(str(tmp_path), imgs.arrays(3), [0, 0, 0], shards=1)
    with pytest.raises(ValueError, match=r"labels of .*train-\*' \(largest 0\) have 1 class"):
        file_sources.tfrecord_source(pattern)
    assert file_sources.tfrecord_source(pattern, num_classes=2).num_classes == 2
    with pytest.raises(ValueError, match="num_classes says the task has 1 class"):
        file_sources.tfrecord_source(pattern, num_classes=1)
    root = tmp_path / "folder"
    (root / "cats").mkdir(parents=True)
    (root / "cats" / "1.jpg").write_bytes(imgs.jpeg(imgs.arrays(1)[0]))
    with pytest.raises(ValueError, match=r"image folder .* \(cats\) has 1 class.*<class_name>"):
        file_sources.folder_source(str(root))
    (root / "dogs").mkdir()
    assert file_sources.folder_source(str(root)).num_classes == 2


def test_a_file_given_as_the_folder_root_is_named_a_file(tmp_path, imgs):
    image = tmp_path / "1.jpg"
    image.write_bytes(imgs.jpeg(imgs.arrays(1)[0]))
    with pytest.raises(ValueError, match=r"1.jpg' is a file, not a folder: pass the folder "
                                         r"above the class folders.*<class_name>/"):
        file_sources.folder_source(str(image))
    with pytest.raises(ValueError, match="does not exist"):
        file_sources.folder_source(str(tmp_path / "missing"))
