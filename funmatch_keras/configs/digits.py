r"""Function matching on scikit-learn's 8x8 digits: the offline, CPU-sized demo.

Paper: Beyer et al., "Knowledge distillation: A good teacher is patient and
consistent", CVPR 2022 (arXiv 2106.05237). The recipe of Table 4 scaled down to
1,797 bundled images (no download): a small CNN teacher (trained with labels
for `teacher_epochs` when no teacher file is given) teaches a CNN with a quarter
of its parameters, by function matching, on 16 px upscaled digits.

Departures from the paper's augmentation, because an 8x8 digit is neither
flip-invariant (a mirrored 2 is no 2) nor recognizable from a 5% crop: no flips,
and crops cover at least 25% of the image. Expected accuracy: the paper has no
number for digits; the student should approach its teacher's test accuracy, and
the run takes minutes on a CPU.

Command line:
  funmatch distill --config=digits --workdir=/tmp/digits
Smoke run: `--config=digits:smoke=True`.
"""

from __future__ import annotations

import ml_collections

from funmatch_keras.configs.common import base_config, parse_arg, shrink_for_smoke


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the digits config. `arg`: `smoke=True` for a seconds-long run."""
    opts = parse_arg(arg, smoke=False)
    config = base_config(
        dataset="digits",
        mode="function_matching",
        teacher="cnn:32,64,128",
        teacher_epochs=20,
        student="cnn:16,32,64",
        student_size=16,
        crop_area_min=0.25,
        flip=False,
        batch_size=64,
        epochs=60,
        lr=1e-2,
        weight_decay=1e-5,
        temperature=1.0,
        warmup_steps=19,  # One epoch: the ~1,250 training digits / 64.
        checkpoint_every_steps=200,
    )
    return shrink_for_smoke(config) if opts.smoke else config
