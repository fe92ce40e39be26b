"""Distill-step throughput and teacher agreement: float32 vs bfloat16.

Three settings, same models, batch and data, one process:

- `float32`:       teacher float32, student float32;
- `bf16 teacher`:  teacher `bfloat16` (frozen, inference only), student float32;
- `bf16 both`:     teacher `bfloat16`, student `mixed_bfloat16`.

Each teacher is folded (`fold_weight_standardization`) as `build.teachers`
does for BiT. A step is `Distiller.train_on_batch` on a function-matching batch
of the bundled digits (upscaled), compiled as `train.run` compiles it; images/s
is the batch size over the median step time after warmup.

Agreement: with random weights a BiT teacher's zero-initialized head gives all
zero logits, so its argmax means nothing. The teacher's head is therefore fit
(ridge regression on one-hot labels) to its float32 features of digits training
images: a real classifier on random-feature BiT features. Then float32 and
bfloat16 teachers (the same weights) classify the digits test images (eval
preprocessing at the benchmark size): top-1 agreement, each one's accuracy, and
the largest logit difference.

Usage:
    python benchmarks/precision.py --quick   # bit_r50x1 -> cnn at 64 px, ~1-2 min
    python benchmarks/precision.py           # bit_r101x1 -> bit_r50x1 at 128 px, batch 16

The last line printed is a JSON object with every measurement.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import common  # noqa: E402  (benchmarks/common.py)
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from funmatch_keras import models  # noqa: E402
from funmatch_keras.app import build
from funmatch_keras.data import pipelines as data
from funmatch_keras.data import sources
from funmatch_keras.distiller import Distiller  # noqa: E402
from funmatch_keras.optim import optimizers as optim
from funmatch_keras.tuning import timing

SETTINGS = (  # name, teacher dtype, student dtype
    ("float32", "float32", "float32"),
    ("bf16 teacher", "bfloat16", "float32"),
    ("bf16 both", "bfloat16", "mixed_bfloat16"),
)
NUM_CLASSES = 10


def teacher(spec: str, size: int, dtype: str, weights: list | None) -> keras.Model:
    model = models.build(spec, NUM_CLASSES, size, dtype=dtype)
    if weights is not None:
        model.set_weights(weights)
    return models.fold_if_standardized(model)


def fit_head(spec: str, size: int, num_train: int, seed: int) -> list:
    """Float32 teacher weights whose head is a ridge classifier on its own features."""
    keras.utils.set_random_seed(seed)
    model = models.build(spec, NUM_CLASSES, size, dtype="float32")
    head = model.layers[-1]
    features_model = keras.Model(model.input, head.input)
    ds = data.eval_pipeline(sources.digits_source("train"), size=size, batch_size=64)
    features, labels = [], []
    for images, y in ds.take(-(-num_train // 64)):
        features.append(features_model.predict_on_batch(images))
        labels.append(y.numpy())
    x, y = np.concatenate(features)[:num_train], np.concatenate(labels)[:num_train]
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / std
    targets = np.eye(NUM_CLASSES)[y] * 10.0 - 5.0  # margins like a trained head's
    w = np.linalg.solve(z.T @ z + 1.0 * np.eye(z.shape[1]), z.T @ targets)
    kernel = (w / std[:, None]).astype(np.float32)
    bias = (-(mean / std) @ w).astype(np.float32)
    head.set_weights([kernel, bias])
    return model.get_weights()


def agreement(spec: str, size: int, weights: list, num_test: int) -> dict:
    ds = data.eval_pipeline(sources.digits_source("test"), size=size, batch_size=64)
    logits = {}
    for dtype in ("float32", "bfloat16"):
        model = teacher(spec, size, dtype, weights)
        forward = tf.function(lambda x, m=model: m(x, training=False))
        outs, labels = [], []
        for images, y in ds.take(-(-num_test // 64)):
            outs.append(forward(images).numpy())
            labels.append(y.numpy())
        logits[dtype] = np.concatenate(outs)[:num_test]
        labels = np.concatenate(labels)[:num_test]
    f32, bf16 = logits["float32"].argmax(-1), logits["bfloat16"].argmax(-1)
    return dict(
        images=int(len(labels)),
        agreement=float(np.mean(f32 == bf16)),
        top1_float32=float(np.mean(f32 == labels)),
        top1_bfloat16=float(np.mean(bf16 == labels)),
        max_logit_diff=float(np.abs(logits["float32"] - logits["bfloat16"]).max()),
        logits_dtype=str(logits["bfloat16"].dtype),
    )


def step_images_per_s(args, teacher_dtype: str, student_dtype: str, weights: list,
                      batch: tf.Tensor) -> tuple[float, str]:
    keras.utils.set_random_seed(args.seed)
    t = teacher(args.teacher, args.size, teacher_dtype, weights)
    student = models.build(args.student, NUM_CLASSES, args.student_size or args.size,
                           dtype=student_dtype)
    distiller = Distiller(t, student, temperature=1.0)
    distiller.compile(optimizer=optim.adamw(1e-3, 1e-5, 1000, 10),
                      jit_compile=build.jit_compile() and args.jit)
    out_dtype = str(keras.ops.convert_to_numpy(student(batch[:1])).dtype)
    for _ in range(args.warmup):
        distiller.train_on_batch(batch)
    # train_on_batch returns numbers: it waits for the step.
    step = timing.timed(lambda: distiller.train_on_batch(batch))
    seconds = [step() for _ in range(args.repeats)]
    return args.batch * 1e3 / common.median_ms(seconds), out_dtype


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="bit_r50x1 -> cnn:16,32,64 at 64 px, 3 repeats, 200 test images")
    parser.add_argument("--teacher", default="bit_r101x1")
    parser.add_argument("--student", default="bit_r50x1")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--student-size", type=int, default=None)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--train-images", type=int, default=512,
                        help="digits training images the teacher's head is fit on")
    parser.add_argument("--test-images", type=int, default=540)
    parser.add_argument("--no-jit", dest="jit", action="store_false",
                        help="no XLA (train.run uses XLA on one device)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.teacher, args.student, args.size = "bit_r50x1", "cnn:16,32,64", 64
        args.repeats, args.train_images, args.test_images = 3, 256, 200

    print(common.machine_line(), flush=True)
    print(f"tf {tf.__version__}  keras {keras.__version__}  teacher {args.teacher} -> "
          f"student {args.student}  size {args.size}  batch {args.batch}  jit {args.jit}")
    weights = fit_head(args.teacher, args.size, args.train_images, args.seed)
    source = sources.digits_source("train")
    batch = next(iter(data.train_pipeline(source, batch_size=args.batch,
                                          student_size=args.size, seed=args.seed,
                                          epochs=1, shuffle_buffer=256)))
    results = []
    print(f"{'setting':<14} {'teacher':<9} {'student':<15} {'images/s':>9} {'speed-up':>9}")
    for name, teacher_dtype, student_dtype in SETTINGS:
        ips, out_dtype = step_images_per_s(args, teacher_dtype, student_dtype, weights, batch)
        base = results[0]["images_per_s"] if results else ips
        print(f"{name:<14} {teacher_dtype:<9} {student_dtype:<15} {ips:>9.2f} "
              f"{ips / base:>8.2f}x", flush=True)
        results.append(dict(setting=name, teacher_dtype=teacher_dtype,
                            student_dtype=student_dtype, images_per_s=round(ips, 3),
                            speedup=common.ratio(ips, base), student_logits_dtype=out_dtype))
        keras.backend.clear_session()
    agree = agreement(args.teacher, args.size, weights, args.test_images)
    print(f"teacher top-1 agreement float32 vs bfloat16 on {agree['images']} digits test "
          f"images: {agree['agreement']:.2%} (top-1 {agree['top1_float32']:.2%} vs "
          f"{agree['top1_bfloat16']:.2%}, max logit diff {agree['max_logit_diff']:.3g})")
    common.print_result(dict(benchmark="precision", teacher=args.teacher, student=args.student,
                             size=args.size, batch=args.batch, repeats=args.repeats,
                             warmup=args.warmup, jit=args.jit, machine=common.machine(),
                             results=results, agreement=agree))


if __name__ == "__main__":
    main()
