"""File sources: TFRecord shards and image folders, corrupt files, sharding by file."""

import logging

import numpy as np
import pytest
import tensorflow as tf

from funmatch_keras.data import file_sources
from funmatch_keras.data import pipelines as data

SIZE = 16


@pytest.fixture
def image_folder(tmp_path, imgs):
    return imgs.write_image_folder(tmp_path)


def test_tfrecords_load_and_corrupt_jpeg_is_counted(tmp_path, caplog, imgs):
    images = imgs.arrays(7, 40, 50)
    labels = [0, 1, 2, 0, 1, 2, 4]
    pattern = imgs.write_tfrecords(str(tmp_path), images, labels, corrupt={3})
    src = file_sources.tfrecord_source(pattern)
    assert (src.num_examples, src.num_classes, src.num_files) == (7, 5, 2)
    with caplog.at_level(logging.WARNING):
        batches = imgs.take(data.train_pipeline(src, batch_size=2, student_size=SIZE,
                                           seed=0, epochs=1), 10)
    assert len(batches) == 3  # 6 decodable images, batches of 2.
    assert "Skipped 1 of 7 examples" in caplog.text
    labels = np.concatenate([y for _, y in imgs.take(
        data.eval_pipeline(src, size=SIZE, batch_size=4), 10)])
    np.testing.assert_array_equal(labels, [0, 1, 2, 1, 2, 4])  # Shard-interleaved.
    options = data.train_pipeline(src, batch_size=2, student_size=SIZE).options()
    assert options.experimental_distribute.auto_shard_policy == (
        tf.data.experimental.AutoShardPolicy.DATA)  # global batches; per-worker: OFF


def test_image_folder_png_gray_rgba_and_corrupt(image_folder, caplog, imgs):
    src = file_sources.folder_source(image_folder)
    assert (src.num_examples, src.num_classes) == (6, 2)  # notes.txt ignored.
    with caplog.at_level(logging.WARNING):
        out = imgs.take(data.eval_pipeline(src, size=SIZE, batch_size=8), 1)
        (batch,) = imgs.take(data.train_pipeline(src, batch_size=5, student_size=SIZE,
                                            seed=1, epochs=1), 1)
    images, labels = out[0]
    imgs.check_images(images, 5, SIZE)
    imgs.check_images(batch, 5, SIZE)
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1])  # Sorted: a_dogs first.
    assert "Skipped 1 of 6 examples" in caplog.text


def test_file_sources_shard_by_file_with_global_indices(tmp_path, image_folder, imgs):
    n, shards = 23, 5
    src = imgs.constant_tfrecords(str(tmp_path), n, shards)
    assert src.num_files == shards
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
        ids = sum((imgs.written_ids(b) for b in imgs.take(data.train_pipeline(part, **kw), n)), [])
        assert sorted(ids) == expected
        seen += ids
    assert sorted(seen) == list(range(n))  # disjoint, and together everything

    folder = file_sources.folder_source(image_folder)
    parts = [folder.shard(3, w) for w in range(3)]
    assert [p.num_examples for p in parts] == [2, 2, 2]
    assert [p.num_files for p in parts] == [2, 2, 2]  # each reads only its own files
    indices = [sorted(int(ex["index"]) for ex in p.dataset()) for p in parts]
    assert indices == [[0, 3], [1, 4], [2, 5]]


def test_empty_file_sources_raise(tmp_path):
    with pytest.raises(ValueError, match="No images"):
        file_sources.folder_source(str(tmp_path))
    with pytest.raises(ValueError, match="No TFRecord files"):
        file_sources.tfrecord_source(str(tmp_path / "missing-*"))
    tf.io.TFRecordWriter(str(tmp_path / "empty-0")).close()
    with pytest.raises(ValueError, match="no records"):
        file_sources.tfrecord_source(str(tmp_path / "empty-*"))
