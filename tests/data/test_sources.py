"""Sources: tfds presets (under mock data), arrays, digits, sharding by example."""

import logging

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from funmatch_keras import recipe
from funmatch_keras.data import file_sources, sources
from funmatch_keras.data import pipelines as data

SIZE = 16


@pytest.mark.parametrize("preset,num_classes", [
    ("pets37", 37), ("flowers102", 102), ("food101", 101), ("sun397", 397),
    ("imagenet2012", 1000),
])
def test_tfds_presets_load_under_mock_data(preset, num_classes, tmp_path, imgs):
    with tfds.testing.mock_data(num_examples=6):
        src = sources.tfds_source(preset, "train", data_dir=str(tmp_path))
        assert (src.num_examples, src.num_classes) == (6, num_classes)
        # The teacher-logit cache key: the data's name, split and version.
        name = recipe.PRESETS[preset].tfds_name
        version = tfds.builder(name, data_dir=str(tmp_path)).info.version
        split = recipe.split_names(preset)["train"]
        assert src.fingerprint() == f"tfds:{name}:{split}:{version}"
        for role in recipe.SPLIT_ROLES:
            split = sources.tfds_source(preset, role, data_dir=str(tmp_path))
            assert split.num_examples == 6 and split.encoded
        (batch,) = imgs.take(data.train_pipeline(src, batch_size=4, student_size=SIZE,
                                            seed=0, epochs=1), 1)
        imgs.check_images(batch, 4, SIZE)
        images, labels = imgs.take(data.eval_pipeline(src, size=SIZE, batch_size=6), 1)[0]
        imgs.check_images(images, 6, SIZE)
        assert labels.dtype == np.int32
        assert ((0 <= labels) & (labels < num_classes)).all()


def test_tfds_dataset_not_prepared_explains_how(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"oxford_flowers102.*tfds build"):
        sources.tfds_source("flowers102", "train", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"downloads/manual"):
        sources.tfds_source("imagenet2012", "validation", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="Unknown tfds dataset"):
        sources.tfds_source("no_such_dataset_xyz", data_dir=str(tmp_path))


def test_array_source_grayscale_and_digits_range(imgs):
    from sklearn.datasets import load_digits

    digits = load_digits()
    src = sources.array_source(digits.images[:8], digits.target[:8], in_max=16)
    assert src.num_classes == 8 and not src.encoded
    images, labels = imgs.take(data.eval_pipeline(src, size=8, batch_size=8), 1)[0]
    imgs.check_images(images, 8, 8)
    assert images.max() > 0.9 and images.min() < -0.9  # Full range, not 0..16/255.
    np.testing.assert_array_equal(labels, digits.target[:8])
    np.testing.assert_array_equal(images[..., 0], images[..., 2])  # Gray -> RGB.


def test_bad_labels_name_the_example_index(tmp_path, imgs):
    with pytest.raises(ValueError, match="index 2"):
        sources.array_source(imgs.arrays(4), [0, 1, 7, 1], num_classes=3)
    with pytest.raises(ValueError, match="index 1"):
        sources.array_source(imgs.arrays(3), [0, -1, 1])
    pattern = imgs.write_tfrecords(str(tmp_path), imgs.arrays(4), [0, 1, 9, 1], shards=1)
    src = file_sources.tfrecord_source(pattern, num_classes=3)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"example index\] \[2\]"):
        imgs.take(data.eval_pipeline(src, size=SIZE, batch_size=4), 1)


def test_empty_array_source_raises():
    with pytest.raises(ValueError, match="no images"):
        sources.array_source(np.zeros([0, 8, 8], np.uint8), np.zeros([0], int))


def test_digits_source_is_offline_and_split_is_stratified():
    train, test = sources.digits_source("train"), sources.digits_source("test")
    assert (train.num_examples, test.num_examples, train.num_classes) == (1257, 540, 10)
    labels = np.concatenate([y.numpy() for _, y in data.eval_pipeline(test, size=SIZE,
                                                                      batch_size=600)])
    assert np.all(np.bincount(labels, minlength=10) >= 50)
    with pytest.raises(ValueError, match="Unknown digits split"):
        sources.digits_source("trian")


def test_sources_without_enough_files_shard_by_example(tmp_path, caplog, imgs):
    src = sources.array_source(imgs.arrays(7), np.arange(7) % 2)
    assert src.num_files == 0  # in memory: nothing to split by file
    assert [[int(ex["index"]) for ex in src.shard(3, w).dataset()] for w in range(3)] == [
        [0, 3, 6], [1, 4], [2, 5]]
    assert src.shard(1, 0) is src
    two_files = imgs.constant_tfrecords(str(tmp_path), n=6, shards=2)
    with caplog.at_level(logging.WARNING):
        part = two_files.shard(3, 1)
    assert "sharding by example instead of by file" in caplog.text
    assert sorted(int(ex["index"]) for ex in part.dataset()) == [1, 4]
    with pytest.raises(ValueError, match="shard_index"):
        src.shard(2, 2)


def test_build_source_reads_any_tfds_dataset_with_the_splits_of_the_config(tmp_path, smoke_config):
    from funmatch_keras.app import build

    config = smoke_config(dataset="cifar10", data_dir=str(tmp_path), train_split="train[:90%]",
                          validation_split="train[90%:]", test_split="test")
    with tfds.testing.mock_data(num_examples=6):
        names = {role: build.source(config, role).name for role in recipe.SPLIT_ROLES}
        train = build.source(config, "train")
    assert names == {"train": "cifar10:train[:90%]", "validation": "cifar10:train[90%:]",
                     "test": "cifar10:test"}
    assert (train.num_classes, train.encoded) == (10, True)
    with pytest.raises(ValueError, match=r"set --config\.test_split"):
        build.source(smoke_config(dataset="cifar10", train_split="train"), "test")
    with pytest.raises(ValueError, match="Unknown split"):
        build.source(config, "trian")


def test_build_source_split_fields_override_a_preset_verbatim(tmp_path, smoke_config):
    from funmatch_keras.app import build

    # food101's tfds name is its preset name: "validation" must stay the tfds split
    # (the preset's validation role is "train[90%:]").
    with tfds.testing.mock_data(num_examples=6):
        overridden = build.source(smoke_config(dataset="food101", data_dir=str(tmp_path),
                                               validation_split="validation"), "validation")
        preset = build.source(smoke_config(dataset="food101", data_dir=str(tmp_path)),
                              "validation")
        pets = build.source(smoke_config(dataset="pets37", data_dir=str(tmp_path),
                                         test_split="test[:50%]"), "test")
    assert (overridden.name, preset.name) == ("food101:validation", "food101:train[90%:]")
    assert (pets.name, pets.num_classes) == ("oxford_iiit_pet:test[:50%]", 37)
