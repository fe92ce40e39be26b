"""Input pipeline vs. distillation step throughput (images/s).

Measures, on this machine:
1. the function-matching train pipeline (`funmatch_keras.data.pipelines.train_pipeline`)
   reading ~400x500 JPEG TFRecords it writes to a temp dir, at 128 px;
2. one distillation step (BiT-R50x1 student, BiT-R101x1 teacher, 128 px, Adam)
   on a batch already in memory.

The pipeline should deliver at least 3x the step's images/s so that training is
never input-bound. The two are measured one after the other (in training they
share the host CPUs). The final line is one JSON object.

Usage:
    python benchmarks/pipeline.py [--quick] [--batch-size 32] [--num-images 512]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import common  # noqa: E402  (benchmarks/common.py)
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import funmatch_keras as fm  # noqa: E402
from funmatch_keras import models  # noqa: E402
from funmatch_keras.data import file_sources
from funmatch_keras.data import pipelines as data

SIZE = 128
NUM_CLASSES = 37


def write_jpeg_tfrecords(directory: str, num_images: int, shards: int = 4) -> str:
    """Photo-like JPEGs (smooth shapes + noise, 400-500 px sides) as TFRecords."""
    rng = np.random.default_rng(0)
    names = [f"train-{s:05d}-of-{shards:05d}" for s in range(shards)]
    writers = [tf.io.TFRecordWriter(os.path.join(directory, n)) for n in names]
    for i in range(num_images):
        h, w = rng.integers(375, 500), rng.integers(400, 500)
        coarse = rng.uniform(0, 255, [6, 8, 3]).astype(np.float32)
        image = tf.image.resize(coarse, [h, w], method="bicubic")
        image += rng.normal(0, 12, [h, w, 3]).astype(np.float32)
        jpeg = tf.io.encode_jpeg(tf.cast(tf.clip_by_value(image, 0, 255), tf.uint8),
                                 quality=90).numpy()
        example = tf.train.Example(features=tf.train.Features(feature={
            "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[jpeg])),
            "class": tf.train.Feature(int64_list=tf.train.Int64List(
                value=[i % NUM_CLASSES])),
        }))
        writers[i % shards].write(example.SerializeToString())
    for w in writers:
        w.close()
    return os.path.join(directory, "train-*")


def pipeline_images_per_second(pattern: str, batch_size: int, batches: int,
                               repeats: int) -> list[float]:
    source = file_sources.tfrecord_source(pattern, num_classes=NUM_CLASSES)
    ds = data.train_pipeline(source, batch_size=batch_size, student_size=SIZE, seed=0)
    it = iter(ds)
    for _ in range(3):  # Warm up: tracing, thread pools, first block read.
        next(it)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        rates.append(batches * batch_size / (time.perf_counter() - start))
    return rates


def step_images_per_second(batch_size: int, steps: int) -> list[float]:
    teacher = models.bit_r101x1(NUM_CLASSES, SIZE)
    student = models.bit_r50x1(NUM_CLASSES, SIZE)
    distiller = fm.Distiller(teacher=teacher, student=student, temperature=1.0)
    distiller.compile(optimizer=keras.optimizers.Adam(1e-3))
    images = tf.random.uniform([batch_size, SIZE, SIZE, 3], -1.0, 1.0)
    distiller.train_on_batch(images)  # Warm up: tracing.
    rates = []
    for _ in range(steps):
        start = time.perf_counter()
        distiller.train_on_batch(images)
        rates.append(batch_size / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a shorter run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-images", type=int, default=512)
    args = parser.parse_args()
    batches, repeats, steps = (4, 3, 3) if args.quick else (16, 5, 8)
    print(common.machine_line(), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        pattern = write_jpeg_tfrecords(tmp, args.num_images)
        pipeline = pipeline_images_per_second(
            pattern, args.batch_size, batches, repeats)
    pipeline_rate = statistics.median(pipeline)
    print(f"pipeline: median {pipeline_rate:.1f} images/s over {repeats} runs of "
          f"{batches} batches of {args.batch_size} ({[round(r, 1) for r in pipeline]})")
    step = step_images_per_second(args.batch_size, steps)
    step_rate = statistics.median(step)
    print(f"distill step (R50x1 <- R101x1, {SIZE}px): median {step_rate:.1f} images/s "
          f"over {steps} steps ({[round(r, 1) for r in step]})")
    ratio = common.ratio(pipeline_rate, step_rate, digits=2)
    print(f"ratio pipeline/step: {ratio:.2f} (target >= 3)")
    common.print_result({
        "device": tf.config.list_physical_devices("GPU") and "gpu" or "cpu",
        "machine": common.machine(), "batch_size": args.batch_size, "image_size": SIZE,
        "pipeline_images_per_s": round(pipeline_rate, 1),
        "step_images_per_s": round(step_rate, 1), "ratio": ratio,
        "target_met": ratio >= 3.0,
    })


if __name__ == "__main__":
    main()
