r"""Distil BiT-R152x2 into BiT-R50x1 on Oxford-IIIT Pets (37 classes), 128 px.

Paper: Beyer et al., "Knowledge distillation: A good teacher is patient and
consistent", CVPR 2022 (arXiv 2106.05237), Table 4. Function matching, Adam with
decoupled weight decay, batch 512, 1,500 warmup steps, then cosine decay.

Expected student top-1 on the test set (teacher: 91.03):
  fast    1,000 epochs, T=5,  lr 1e-2, wd 1e-3: 88.01
  medium  3,000 epochs, T=10, lr 3e-3, wd 3e-4: 90.08
  long   30,000 epochs, T=2,  lr 3e-3, wd 1e-5: 91.06

Command line (bring your fine-tuned teacher):
  funmatch distill --config=pets37:variant=fast --workdir=/tmp/pets \
      --config.teacher_weights=/path/bit_r152x2_pets.npz
Smoke run: `--config=pets37:variant=fast,smoke=True`.
"""

from __future__ import annotations

import ml_collections

from funmatch_keras.configs.common import Variant, small_dataset_config

# Paper Table 4: epochs, temperature, lr, weight decay; student top-1 (%).
VARIANTS = {
    "fast": Variant(1_000, 5.0, 1e-2, 1e-3, top1=88.01),
    "medium": Variant(3_000, 10.0, 3e-3, 3e-4, top1=90.08),
    "long": Variant(30_000, 2.0, 3e-3, 1e-5, top1=91.06),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the Pets config.

    Args:
        arg: `variant=fast|medium|long` (default `medium`), `smoke=True`.
    """
    return small_dataset_config("pets37", VARIANTS, arg)
