r"""Distil BiT-R152x2 into BiT-R50x1 on Oxford Flowers-102, 128 px.

Paper: Beyer et al., "Knowledge distillation: A good teacher is patient and
consistent", CVPR 2022 (arXiv 2106.05237), Table 4. Function matching, Adam with
decoupled weight decay, batch 512, 1,500 warmup steps, then cosine decay. The
paper's showcase of patience: function matching keeps improving up to 1M epochs
and never overfits (1,000 epochs give only 77.51).

Expected student top-1 on the test set (teacher: 97.82):
  fast       10,000 epochs, T=10, lr 3e-3, wd 3e-4: 92.83
  medium    100,000 epochs, T=1,  lr 1e-3, wd 1e-4: 95.54
  long    1,000,000 epochs, T=1,  lr 3e-4, wd 1e-5: 96.93

Command line (bring your fine-tuned teacher):
  funmatch distill --config=flowers102:variant=fast --workdir=/tmp/flowers \
      --config.teacher_weights=/path/bit_r152x2_flowers.npz
Smoke run: `--config=flowers102:variant=fast,smoke=True`.
"""

from __future__ import annotations

import ml_collections

from funmatch_keras.configs.common import Variant, small_dataset_config

# Paper Table 4: epochs, temperature, lr, weight decay; student top-1 (%).
VARIANTS = {
    "fast": Variant(10_000, 10.0, 3e-3, 3e-4, top1=92.83),
    "medium": Variant(100_000, 1.0, 1e-3, 1e-4, top1=95.54),
    "long": Variant(1_000_000, 1.0, 3e-4, 1e-5, top1=96.93),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the Flowers config.

    Args:
        arg: `variant=fast|medium|long` (default `medium`), `smoke=True`.
    """
    return small_dataset_config("flowers102", VARIANTS, arg)
