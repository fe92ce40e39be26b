r"""Distil BiT-R152x2 into BiT-R50x1 on ImageNet-1k (ILSVRC-2012), 224 px.

Paper: Beyer et al., "Knowledge distillation: A good teacher is patient and
consistent", CVPR 2022 (arXiv 2106.05237), Sec. 5. Function matching, T=1, Adam
with decoupled weight decay (lr 0.03, wd 3e-4), batch 4,096, 5,000 warmup steps
then cosine decay, 1,200 epochs by default. The paper's best ResNet-50, 82.8%
top-1, comes from 9,600 epochs with an ensemble of a 224 px and a 384 px teacher.

Arguments (`--config=imagenet:<arg>`):
  teacher_res=384  one teacher at 384 px; the student stays at 224 px (the crop is
                   taken once on the original image, then resized per model).
  ensemble=True    two teachers, at 224 and 384 px, their logits averaged.
                   `teacher` and `teacher_size` are then lists with one entry
                   per teacher (and `teacher_weights`, when given, too).
  epochs=N         training length (1,200 by default; the paper goes to 9,600).
  optimizer=shampoo  the paper's Shampoo run: at 1,200 epochs it matches Adam at
                   4,800. Warmup 1,800 steps, Nesterov, blocks of at most
                   128x128, weight decay 3.75e-4 (`SHAMPOO`); the learning
                   rate stays Adam's 0.03, which the layer-wise graft to Adam
                   keeps meaningful (the paper gives no other).
  smoke=True       a seconds-long run with tiny models.

Command lines (imagenet2012 must be prepared in tfds, see `--config.data_dir`):
  funmatch distill --config=imagenet --workdir=/tmp/imagenet \
      --config.teacher_weights=/path/bit_r152x2_224.npz
  funmatch distill --config=imagenet:ensemble=True,epochs=9600 --workdir=/tmp/in \
      --config.teacher_weights="['/path/r152x2_224.npz','/path/r152x2_384.npz']"
  funmatch distill --config=imagenet:optimizer=shampoo --workdir=/tmp/in_shampoo \
      --config.teacher_weights=/path/bit_r152x2_224.npz
"""

from __future__ import annotations

import ml_collections

from funmatch_keras.configs.common import base_config, parse_arg, shrink_for_smoke

IMAGE_SIZE = 224
TEACHER = "bit_r152x2"
# The paper's Shampoo run on ImageNet (docs/design.md §2.6): fields that differ from Adam's.
SHAMPOO = {"optimizer": "shampoo", "warmup_steps": 1800, "weight_decay": 3.75e-4,
           "shampoo_block_size": 128}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the ImageNet config. See the module docstring for `arg`."""
    opts = parse_arg(arg, teacher_res=IMAGE_SIZE, ensemble=False, epochs=1200,
                     optimizer="adamw", smoke=False)
    if opts.optimizer not in ("adamw", "shampoo"):
        raise ValueError("`optimizer` must be 'adamw' or 'shampoo'. "
                         f"Received: optimizer={opts.optimizer!r}")
    if opts.ensemble:
        teacher, teacher_size = [TEACHER, TEACHER], [IMAGE_SIZE, 384]
        if opts.teacher_res != IMAGE_SIZE:
            raise ValueError(
                "`ensemble=True` already uses teachers at 224 and 384 px; drop "
                f"`teacher_res`. Received: teacher_res={opts.teacher_res}"
            )
    else:
        teacher = TEACHER
        teacher_size = None if opts.teacher_res == IMAGE_SIZE else opts.teacher_res
    fields = dict(
        dataset="imagenet2012",
        teacher=teacher,
        teacher_size=teacher_size,
        student="bit_r50x1",
        student_size=IMAGE_SIZE,
        epochs=opts.epochs,
        batch_size=4096,
        lr=0.03,
        weight_decay=3e-4,
        temperature=1.0,
        warmup_steps=5000,
    )
    if opts.optimizer == "shampoo":
        fields.update(SHAMPOO)
    config = base_config(**fields)
    return shrink_for_smoke(config) if opts.smoke else config
