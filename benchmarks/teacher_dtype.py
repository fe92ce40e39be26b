"""The frozen teacher's forward pass in float32, `mixed_bfloat16` and `bfloat16`.

`tune` gives a bfloat16 teacher its weights in bfloat16 (`teacher_dtype=
"bfloat16"`) rather than `mixed_bfloat16`, whose float32 variables are cast at
every call. This times the three, folded (BiT's weight standardization in the
kernels, as `funmatch distill` runs its teacher), round-robin in one process,
and prints their medians and their largest logit difference to float32 (with a
random head, so the logits are not all zero).

Usage:
    python benchmarks/teacher_dtype.py                        # BiT-R152x2, 128 px, batch 8
    python benchmarks/teacher_dtype.py --teacher cnn:8 --size 16 --rounds 3   # seconds

The last line printed is one JSON object.
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
from funmatch_keras.tuning import timing

DTYPES = ("float32", "mixed_bfloat16", "bfloat16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="bit_r152x2")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    print(common.machine_line(), flush=True)
    keras.utils.set_random_seed(0)
    weights = models.build(args.teacher, 10, args.size).get_weights()
    weights[-2] = np.random.default_rng(1).normal(0, 0.05, weights[-2].shape)  # the head
    images = tf.constant(np.random.default_rng(0).uniform(
        -1, 1, (args.batch, args.size, args.size, 3)), tf.float32)
    forwards = {}
    for dtype in DTYPES:
        model = models.build(args.teacher, 10, args.size,
                             dtype=None if dtype == "float32" else dtype)
        model.set_weights(weights)
        model = models.fold_if_standardized(model)
        forwards[dtype] = tf.function(
            lambda x, model=model: tf.cast(model(x, training=False), tf.float32))
    logits = {dtype: forward(images).numpy() for dtype, forward in forwards.items()}
    seconds = timing.round_robin(
        {dtype: timing.timed(lambda f=forward: f(images).numpy())
         for dtype, forward in forwards.items()}, args.rounds)
    ms = {dtype: common.median_ms(seconds[dtype]) for dtype in DTYPES}
    for dtype in DTYPES:
        print(f"{dtype:<16}{ms[dtype]:9.1f} ms  {ms['float32'] / ms[dtype]:5.2f}x  "
              f"max|dlogit| {np.abs(logits[dtype] - logits['float32']).max():.3g}")
    common.print_result({
        "benchmark": "teacher_dtype", "teacher": args.teacher, "size": args.size,
        "batch": args.batch, "rounds": args.rounds, "machine": common.machine(),
        "ms": {k: round(v, 1) for k, v in ms.items()},
        "speedup_vs_float32": {k: common.ratio(ms["float32"], v) for k, v in ms.items()},
        "max_abs_logit_diff": {k: float(np.abs(v - logits["float32"]).max())
                               for k, v in logits.items()}})


if __name__ == "__main__":
    main()
