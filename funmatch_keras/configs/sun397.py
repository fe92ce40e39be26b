r"""Distil BiT-R152x2 into BiT-R50x1 on SUN397, 128 px.

Paper: Beyer et al., "Knowledge distillation: A good teacher is patient and
consistent", CVPR 2022 (arXiv 2106.05237), Table 4. Function matching, Adam with
decoupled weight decay, batch 512, 1,500 warmup steps, then cosine decay.

Expected student top-1 on the test set (teacher: 74.22):
  fast      100 epochs, T=10, lr 1e-2, wd 1e-3: 68.28
  medium  1,000 epochs, T=10, lr 1e-3, wd 1e-4: 73.46
  long    3,000 epochs, T=10, lr 1e-2, wd 3e-5: 74.26

Command line (bring your fine-tuned teacher):
  funmatch distill --config=sun397:variant=fast --workdir=/tmp/sun397 \
      --config.teacher_weights=/path/bit_r152x2_sun397.npz
Smoke run: `--config=sun397:variant=fast,smoke=True`.
"""

from __future__ import annotations

import ml_collections

from funmatch_keras.configs.common import Variant, small_dataset_config

# Paper Table 4: epochs, temperature, lr, weight decay; student top-1 (%).
VARIANTS = {
    "fast": Variant(100, 10.0, 1e-2, 1e-3, top1=68.28),
    "medium": Variant(1_000, 10.0, 1e-3, 1e-4, top1=73.46),
    "long": Variant(3_000, 10.0, 1e-2, 3e-5, top1=74.26),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the SUN397 config.

    Args:
        arg: `variant=fast|medium|long` (default `medium`), `smoke=True`.
    """
    return small_dataset_config("sun397", VARIANTS, arg)
