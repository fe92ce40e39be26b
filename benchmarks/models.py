"""Forward throughput of the BiT models: float32 vs bfloat16, folded or not.

Measures images/s of a `tf.function` forward (inference mode) of `bit_r152x2`
(the paper's teacher) and `bit_r50x1` (its student) at 128 px, as the median
over timed repeats after warmup. "folded" means `fold_weight_standardization`
(plain Conv2D with pre-standardized kernels), which is what a frozen teacher
can use. Weights are random: throughput does not depend on their values.

Usage:
    python benchmarks/models.py --quick          # r50x1 only, few repeats
    python benchmarks/models.py                  # r50x1 and r152x2
    python benchmarks/models.py --jit            # XLA (jit_compile=True)
    python benchmarks/models.py --bf16-policy bfloat16

The last line printed is a JSON object with every measurement.
"""

from __future__ import annotations

import argparse
import os
import platform

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import common  # noqa: E402  (benchmarks/common.py)
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from funmatch_keras.models import build, fold_weight_standardization  # noqa: E402
from funmatch_keras.tuning import timing


def images_per_second(model: keras.Model, images: tf.Tensor, repeats: int,
                      warmup: int, jit: bool) -> float:
    """Median images/s of `model(images)` over `repeats` timed calls.

    Args:
        model: keras.Model. The model to run in inference mode.
        images: tf.Tensor. One batch `(B, H, W, 3)`.
        repeats: int. Timed calls.
        warmup: int. Untimed calls first (the first one traces/compiles).
        jit: bool. Passed to `tf.function(jit_compile=...)`.

    Returns:
        Batch size divided by the median seconds per call.
    """
    forward = tf.function(lambda x: model(x, training=False), jit_compile=jit)
    for _ in range(warmup):
        forward(images).numpy()
    call = timing.timed(lambda: forward(images).numpy())  # .numpy() waits for the result
    seconds = [call() for _ in range(repeats)]
    return int(images.shape[0]) * 1e3 / common.median_ms(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="bit_r50x1 only, 3 repeats")
    parser.add_argument("--models", default="bit_r50x1,bit_r152x2")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--jit", action="store_true", help="jit_compile=True")
    parser.add_argument("--bf16-policy", default="mixed_bfloat16",
                        choices=["mixed_bfloat16", "bfloat16"])
    args = parser.parse_args()
    names = ["bit_r50x1"] if args.quick else args.models.split(",")
    repeats = 3 if args.quick else args.repeats

    rng = np.random.default_rng(0)
    images = tf.constant(
        rng.uniform(-1, 1, (args.batch, args.size, args.size, 3)).astype(np.float32)
    )
    device = tf.config.list_physical_devices("GPU") or [platform.processor() or "CPU"]
    print(common.machine_line(), flush=True)
    print(f"device: {device}  tf {tf.__version__}  keras {keras.__version__}  "
          f"batch {args.batch}  size {args.size}  jit {args.jit}")
    print(f"{'model':<12} {'dtype':<15} {'folded':<7} {'images/s':>10}")
    results = []
    for name in names:
        for dtype in ("float32", args.bf16_policy):
            model = build(name, num_classes=1000, image_size=args.size, dtype=dtype)
            for folded in (False, True):
                net = fold_weight_standardization(model) if folded else model
                ips = images_per_second(net, images, repeats, args.warmup, args.jit)
                print(f"{name:<12} {dtype:<15} {str(folded):<7} {ips:>10.2f}",
                      flush=True)
                results.append(dict(model=name, dtype=dtype, folded=folded,
                                    images_per_s=round(ips, 3)))
            del model, net
            keras.backend.clear_session()
    common.print_result(dict(benchmark="models", batch=args.batch, size=args.size,
                             jit=args.jit, repeats=repeats, device=str(device),
                             machine=common.machine(), results=results))


if __name__ == "__main__":
    main()
