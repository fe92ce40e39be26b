"""Train and eval pipelines: teaching modes, seeding, resume, input contexts."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from funmatch_keras.data import augment, file_sources, sources
from funmatch_keras.data import pipelines as data

SIZE, TEACHER_SIZE = 16, 24


def test_resume_is_exact_with_corrupt_images(tmp_path, imgs):
    """A corrupt record's place is filled by the next good example, so step k has
    the same batch whether the pipeline starts at 0 or at k, in any epoch."""
    n, corrupt = 9, {2, 3, 7}
    images = imgs.constant_images(10 * np.arange(n), h=12, w=14)
    src = file_sources.tfrecord_source(imgs.write_tfrecords(
        str(tmp_path), images, np.arange(n) % 3, corrupt=corrupt, shards=1))
    kw = dict(mode="consistent", batch_size=3, student_size=8, seed=5,
              area_range=(1.0, 1.0), flip=False)
    run = imgs.take(data.train_pipeline(src, **kw), 9)  # 3 epochs of 9 records
    ids = [imgs.written_ids(b) for b in run]
    for epoch in range(3):
        epoch_ids = sum(ids[3 * epoch:3 * epoch + 3], [])
        assert set(epoch_ids) <= set(range(n)) - corrupt  # never a corrupt one
        assert len(epoch_ids) == n  # places kept: 3 copies fill the 3 holes
    for step in (1, 2, 4, 8):
        (resumed,) = imgs.take(data.train_pipeline(src, start_step=step, **kw), 1)
        np.testing.assert_array_equal(resumed, run[step], err_msg=f"step {step}")


def test_source_of_only_corrupt_images_raises(tmp_path, imgs):
    (tmp_path / "c").mkdir()
    (tmp_path / "d").mkdir()  # a second class: one-class data is refused
    for i in range(3):
        (tmp_path / "c" / f"{i}.jpg").write_bytes(b"garbage")
    src = file_sources.folder_source(str(tmp_path))
    with pytest.raises(tf.errors.InvalidArgumentError, match="failed to decode"):
        imgs.take(data.train_pipeline(src, batch_size=1, student_size=SIZE, seed=0), 1)


def test_bad_arguments_raise(imgs):
    src = sources.array_source(imgs.arrays(4), [0, 1, 0, 1])
    with pytest.raises(ValueError, match="batch_size=10, num_replicas=4"):
        data.train_pipeline(src, batch_size=10, student_size=SIZE, num_replicas=4)
    with pytest.raises(ValueError, match="function_matching.*fixed_teacher"):
        data.train_pipeline(src, mode="mixup", batch_size=2, student_size=SIZE)
    with pytest.raises(ValueError, match=r"teacher_logits.*teacher_cache\.teacher_logits"):
        data.train_pipeline(src, mode="fixed_teacher", batch_size=2, student_size=SIZE)
    assert data.steps_per_epoch(src, 3) == 1
    with pytest.raises(ValueError, match="batch_size=5"):
        data.steps_per_epoch(src, 5)


# ---------------------------------------------------------------- modes


def test_consistent_and_function_matching_give_one_tensor(imgs):
    src = sources.array_source(imgs.arrays(8), np.arange(8) % 3)
    for mode in ("consistent", "function_matching"):
        (batch,) = imgs.take(data.train_pipeline(src, mode=mode, batch_size=4,
                                            student_size=SIZE, seed=0), 1)
        imgs.check_images(batch, 4, SIZE)  # A plain tensor: both models see it.


def test_independent_mode_gives_two_crops_of_the_same_example(imgs):
    # Channel 0 identifies the example; channel 1 is a gradient that tells crops apart.
    n, h, w = 8, 32, 32
    images = np.zeros([n, h, w, 3], np.uint8)
    images[..., 0] = (np.arange(n) * 30)[:, None, None]
    images[..., 1] = np.linspace(0, 255, h * w).reshape(h, w).astype(np.uint8)
    src = sources.array_source(images, np.zeros(n, int), num_classes=2)
    (batch,) = imgs.take(data.train_pipeline(src, mode="independent", batch_size=8,
                                        student_size=SIZE, seed=3), 1)
    s, t = batch["student"], batch["teacher"]
    same_example = np.abs(s[..., 0].mean((1, 2)) - t[..., 0].mean((1, 2)))
    assert same_example.max() < 1e-5
    differs = np.abs(s[..., 1] - t[..., 1]).mean((1, 2)) > 1e-2
    assert differs.sum() >= 6  # Independent crops (a rare full-image pair may match).


def test_cross_resolution_views_share_one_crop(imgs):
    h, w = 48, 64
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    smooth = np.stack([255 * yy, 255 * xx, 255 * yy * xx], -1).astype(np.uint8)
    images = np.stack([smooth, smooth[::-1], smooth[:, ::-1], smooth[::-1, ::-1]])
    src = sources.array_source(images, np.zeros(4, int), num_classes=2)
    (batch,) = imgs.take(data.train_pipeline(
        src, mode="consistent", batch_size=4, student_size=SIZE,
        teacher_size=TEACHER_SIZE, seed=5), 1)
    s, t = batch["student"], batch["teacher"]
    imgs.check_images(s, 4, SIZE)
    imgs.check_images(t, 4, TEACHER_SIZE)
    t_small = augment.resize(t, SIZE).numpy()
    diff = np.abs(t_small - s).mean()
    assert 0 < diff < 0.03, diff


def test_mixup_uses_one_ratio_per_batch_for_both_views(imgs):
    values = np.arange(8) * 30 + 10  # Distinct constants: mixing is exactly linear.
    src = sources.array_source(imgs.constant_images(values), np.zeros(8, int), num_classes=2)
    kw = dict(batch_size=8, student_size=SIZE, teacher_size=TEACHER_SIZE, seed=11)
    (plain,) = imgs.take(data.train_pipeline(src, mode="consistent", **kw), 1)
    (mixed,) = imgs.take(data.train_pipeline(src, mode="function_matching", **kw), 1)
    ratios = {}
    for view in ("student", "teacher"):
        x, m = plain[view].mean((1, 2, 3)), mixed[view].mean((1, 2, 3))
        partner = np.roll(x, 1)  # The paper's partner: the previous example.
        ratios[view] = (m - partner) / (x - partner)
    a = ratios["student"][0]
    assert 0.5 <= a <= 1.0
    np.testing.assert_allclose(ratios["student"], a, atol=1e-4)
    np.testing.assert_allclose(ratios["teacher"], a, atol=1e-4)


def test_crop_area_flip_and_labels_options(imgs):
    # A left-to-right gradient: a flip reverses it, a crop narrows its span.
    gradient = np.broadcast_to(np.linspace(0, 255, 40, dtype=np.float32)[None, :, None],
                               (40, 40, 3))
    src = sources.array_source(np.stack([gradient] * 8).astype(np.uint8), np.arange(8) % 2)
    batches = imgs.take(data.train_pipeline(src, mode="consistent", batch_size=8,
                                       student_size=SIZE, seed=0, flip=False,
                                       area_range=(0.9, 1.0), with_labels=True), 3)
    for images, labels in batches:
        assert sorted(labels) == [0] * 4 + [1] * 4  # one epoch per batch, labels kept
        assert np.all(images[:, :, -1, 0] > images[:, :, 0, 0])  # never flipped
        # >= 90% of the area keeps most of the gradient's span.
        assert np.all(images[:, 0, -1, 0] - images[:, 0, 0, 0] > 1.2)
    flipped = imgs.take(data.train_pipeline(src, mode="consistent", batch_size=8,
                                       student_size=SIZE, seed=0), 3)
    assert any(np.any(b[:, 0, -1, 0] < b[:, 0, 0, 0]) for b in flipped)
    with pytest.raises(ValueError, match="with_labels=True needs a mode without mixup"):
        data.train_pipeline(src, batch_size=8, student_size=SIZE, with_labels=True)


def test_ensemble_teacher_sizes_give_one_view_each_from_one_crop(imgs):
    src = sources.array_source(imgs.arrays(8, 40, 48), np.arange(8) % 2)
    batch = imgs.take(data.train_pipeline(src, mode="consistent", batch_size=4, student_size=16,
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
                            teacher_size=[24, 32], teacher_logits=np.zeros([8, 2]))


def test_fixed_teacher_batches_carry_each_examples_own_logits(imgs):
    values = np.arange(8) * 30 + 10  # constant images: the value names the example
    src = sources.array_source(imgs.constant_images(values), np.zeros(8, int), num_classes=2)
    # Row i: example i's value and its square, as a teacher's logits would be.
    logits = np.stack([values, values**2], 1).astype(np.float32)
    batches = imgs.take(data.train_pipeline(src, mode="fixed_teacher", batch_size=4,
                                       student_size=SIZE, seed=1,
                                       teacher_logits=logits), 4)
    seen = []
    for batch in batches:
        assert set(batch) == {"student", "teacher_logits"}
        imgs.check_images(batch["student"], 4, SIZE)
        value = np.rint((batch["student"].mean((1, 2, 3)) + 1) * 127.5)
        np.testing.assert_array_equal(batch["teacher_logits"],
                                      np.stack([value, value**2], 1))
        seen += value.tolist()
    assert sorted(seen[:8]) == sorted(values)  # one epoch of shuffled examples


def test_teacher_logits_are_checked(imgs):
    src = sources.array_source(imgs.arrays(4), [0, 1, 0, 1])
    kw = dict(batch_size=2, student_size=SIZE)
    with pytest.raises(ValueError, match=r"only read in mode='fixed_teacher'.*'consistent'"):
        data.train_pipeline(src, mode="consistent", teacher_logits=np.zeros([4, 2]), **kw)
    kw["mode"] = "fixed_teacher"
    with pytest.raises(ValueError, match=r"shape \[4, classes\].*shape=\(3, 2\)"):
        data.train_pipeline(src, teacher_logits=np.zeros([3, 2]), **kw)
    with pytest.raises(ValueError, match=r"shape=\(4,\)"):
        data.train_pipeline(src, teacher_logits=np.zeros(4), **kw)


# ---------------------------------------------------------------- seeding and resume


@pytest.mark.parametrize("teacher_size,shuffle_buffer", [(None, 64), (TEACHER_SIZE, 4)])
def test_seeded_pipeline_is_reproducible_and_resumes_at_a_step(
    teacher_size, shuffle_buffer, imgs
):
    src = sources.array_source(imgs.arrays(10), np.arange(10) % 3)
    kw = dict(batch_size=4, student_size=SIZE, teacher_size=teacher_size, seed=7,
              shuffle_buffer=shuffle_buffer)
    run = imgs.take(data.train_pipeline(src, **kw), 4)
    again = imgs.take(data.train_pipeline(src, **kw), 4)
    tf.nest.map_structure(np.testing.assert_array_equal, run, again)
    other = imgs.take(data.train_pipeline(src, **{**kw, "seed": 8}), 1)
    assert not np.allclose(tf.nest.flatten(other[0])[0], tf.nest.flatten(run[0])[0])
    # Step 3 starts in the second epoch (12 examples in): a resume skips the first
    # epoch entirely and 2 still-encoded examples of the second.
    (resumed,) = imgs.take(data.train_pipeline(src, **kw, start_step=3), 1)
    tf.nest.map_structure(np.testing.assert_array_equal, resumed, run[3])


@pytest.mark.parametrize("shuffle_buffer", [4, 100])
def test_each_epoch_is_a_seeded_permutation(shuffle_buffer, imgs):
    values = np.arange(10) * 20 + 5
    src = sources.array_source(imgs.constant_images(values), np.zeros(10, int), num_classes=2)
    kw = dict(mode="consistent", batch_size=10, student_size=SIZE, seed=2,
              shuffle_buffer=shuffle_buffer)
    epochs = imgs.take(data.train_pipeline(src, **kw), 2)
    seen = [np.rint((b.mean((1, 2, 3)) + 1) * 127.5).astype(int) for b in epochs]
    for order in seen:
        np.testing.assert_array_equal(np.sort(order), values)
    assert not np.array_equal(seen[0], seen[1])  # Reshuffled each epoch.
    # TF's global seed (set by keras.utils.set_random_seed) changes nothing.
    keras.utils.set_random_seed(0)
    tf.nest.map_structure(np.testing.assert_array_equal,
                          imgs.take(data.train_pipeline(src, **kw), 2), epochs)


def test_epochs_bound_the_number_of_batches(imgs):
    src = sources.array_source(imgs.arrays(10), np.arange(10) % 3)
    ds = data.train_pipeline(src, batch_size=4, student_size=SIZE, seed=0, epochs=3)
    assert len(imgs.take(ds, 100)) == 30 // 4


# ------------------------------------------------- sharding across workers


def _context(pipelines, pipeline_id, replicas):
    return tf.distribute.InputContext(num_input_pipelines=pipelines,
                                      input_pipeline_id=pipeline_id,
                                      num_replicas_in_sync=replicas)


def test_input_context_pipelines_read_their_files_and_resume(tmp_path, imgs):
    """2 workers x 2 replicas, global batch 8: each worker yields per-replica
    batches of 2 from its own files, covering them once per (local) epoch."""
    n, shards = 23, 5
    src = imgs.constant_tfrecords(str(tmp_path), n, shards)
    kw = dict(mode="consistent", batch_size=8, student_size=8, seed=3,
              area_range=(1.0, 1.0), flip=False, shuffle_buffer=100)
    for worker in range(2):
        ds = data.train_pipeline(src, input_context=_context(2, worker, 4), **kw)
        assert ds.options().experimental_distribute.auto_shard_policy == (
            tf.data.experimental.AutoShardPolicy.OFF)
        own = [i for i in range(n) if (i % shards) % 2 == worker]
        batches = imgs.take(ds, 2 * len(own))  # several local epochs
        assert {b.shape for b in batches} == {(2, 8, 8, 3)}
        ids = sum((imgs.written_ids(b) for b in batches), [])
        assert sorted(ids[:len(own)]) == own  # one epoch of its shard first
        assert set(ids) == set(own)
        # Global step 3 = this worker's per-replica batches 6 and 7.
        resumed = imgs.take(data.train_pipeline(
            src, input_context=_context(2, worker, 4), start_step=3, **kw), 2)
        np.testing.assert_array_equal(np.stack(resumed), np.stack(batches[6:8]))


def test_input_context_mixup_and_argument_checks(imgs):
    src = sources.array_source(imgs.arrays(12), np.arange(12) % 3)
    kw = dict(batch_size=8, student_size=SIZE, seed=0)
    # One pipeline over 4 replicas: the global batch, mixed, then split in 4.
    whole = imgs.take(data.train_pipeline(src, **kw), 2)
    split = imgs.take(data.train_pipeline(src, input_context=_context(1, 0, 4), **kw), 8)
    np.testing.assert_allclose(np.concatenate(split[:4]), whole[0], atol=1e-6)
    np.testing.assert_allclose(np.concatenate(split[4:]), whole[1], atol=1e-6)
    with pytest.raises(ValueError, match="epochs=None"):
        data.train_pipeline(src, input_context=_context(2, 0, 2), epochs=1, **kw)
    with pytest.raises(ValueError, match="num_replicas_in_sync=3"):
        data.train_pipeline(src, input_context=_context(1, 0, 3), **kw)
