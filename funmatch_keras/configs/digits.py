r"""Function matching on scikit-learn's 8x8 digits: the offline, CPU-sized demo.

Paper: Beyer et al., "Knowledge distillation: A good teacher is patient and
consistent", CVPR 2022 (arXiv 2106.05237). The recipe of Table 4 scaled down to
1,797 bundled images (no download): a small CNN teacher (trained with labels
for `teacher_epochs` when no teacher file is given) teaches a smaller CNN by
function matching, on 16 px crops of digits upscaled to 20 px.

Variants (`digits:variant=...`):
  default  student `cnn:16,32,64` (a quarter of the teacher's parameters), crops
           of >= 25% of the image, T = 1, 60 epochs: the setting of the benchmarks
           (`paper_findings.py`, `shampoo.py`, `loop.py`).
  demo     what `funmatch demo` runs: student `cnn:8,16,32` (1/15 of the
           teacher's parameters), crops of >= 10% of the image, T = 5 (the
           paper's T for its short runs is 5-10), 80 epochs. A crop that misses
           most of the digit still carries the digit's label in label training;
           the teacher describes it as it is, and the distilled student beats
           the same student trained from labels on the same crops (README,
           `benchmarks/demo_seeds.py`). With longer schedules label training
           catches up on digits (README).

Departures from the paper's augmentation: no flips (a mirrored 2 is no 2), and
in the default variant crops cover at least 25% of the image. Expected
accuracy: the paper has no number for digits; the README's demo table has ours.

Command line:
  funmatch distill --config=digits --workdir=/tmp/digits
  funmatch distill --config=digits:variant=demo --config.teacher_epochs=20 ...
Smoke run: `--config=digits:smoke=True`.
"""

from __future__ import annotations

import ml_collections

from funmatch_keras.configs.common import base_config, parse_arg, shrink_for_smoke

# variant: (student, crop_area_min, temperature, epochs)
VARIANTS = {
    "default": ("cnn:16,32,64", 0.25, 1.0, 60),
    "demo": ("cnn:8,16,32", 0.1, 5.0, 80),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the digits config.

    Args:
        arg: str or None. `variant=default|demo` (default `default`), and
            `smoke=True` for a seconds-long run.

    Example:
    >>> config = get_config("variant=demo")
    >>> config.student, config.crop_area_min, config.temperature, config.epochs
    ('cnn:8,16,32', 0.1, 5.0, 80)
    """
    opts = parse_arg(arg, variant="default", smoke=False)
    if opts.variant not in VARIANTS:
        raise ValueError(f"Unknown digits variant. Expected one of {sorted(VARIANTS)}. "
                         f"Received: variant={opts.variant!r}")
    student, crop_area_min, temperature, epochs = VARIANTS[opts.variant]
    config = base_config(
        dataset="digits",
        mode="function_matching",
        teacher="cnn:32,64,128",
        teacher_epochs=20,
        student=student,
        student_size=16,
        crop_area_min=crop_area_min,
        flip=False,
        batch_size=64,
        epochs=epochs,
        lr=1e-2,
        weight_decay=1e-5,
        temperature=temperature,
        warmup_steps=19,  # One epoch: the ~1,250 training digits / 64.
        checkpoint_every_steps=200,
    )
    return shrink_for_smoke(config) if opts.smoke else config
