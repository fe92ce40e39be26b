r"""Distil BiT-R152x2 into BiT-R50x1 on Food-101, 128 px.

Paper: Beyer et al., "Knowledge distillation: A good teacher is patient and
consistent", CVPR 2022 (arXiv 2106.05237), Table 4. Function matching, Adam with
decoupled weight decay, batch 512, 1,500 warmup steps, then cosine decay.

Expected student top-1 on the test set (the tfds `validation` split; teacher: 86.24):
  fast      100 epochs, T=10, lr 1e-2, wd 1e-3: 83.29
  medium  1,000 epochs, T=10, lr 1e-3, wd 3e-4: 86.64
  long    3,000 epochs, T=5,  lr 1e-2, wd 1e-4: 87.20

Command line (bring your fine-tuned teacher):
  funmatch distill --config=food101:variant=fast --workdir=/tmp/food \
      --config.teacher_weights=/path/bit_r152x2_food.npz
Smoke run: `--config=food101:variant=fast,smoke=True`.
"""

from __future__ import annotations

import ml_collections

from funmatch_keras.configs.common import Variant, small_dataset_config

# Paper Table 4: epochs, temperature, lr, weight decay; student top-1 (%).
VARIANTS = {
    "fast": Variant(100, 10.0, 1e-2, 1e-3, top1=83.29),
    "medium": Variant(1_000, 10.0, 1e-3, 3e-4, top1=86.64),
    "long": Variant(3_000, 5.0, 1e-2, 1e-4, top1=87.20),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the Food-101 config.

    Args:
        arg: `variant=fast|medium|long` (default `medium`), `smoke=True`.
    """
    return small_dataset_config("food101", VARIANTS, arg)
