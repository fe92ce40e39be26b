"""The paper's named choices: teaching modes, dataset presets, teacher store encodings.

Plain Python data, importable without TensorFlow or Keras (configs read it to
validate fields). `funmatch_keras.data.pipelines` implements the modes and
`funmatch_keras.data.sources` reads the presets.

Reference: Beyer et al., "Knowledge distillation: A good teacher is patient and
consistent", CVPR 2022 (arXiv 2106.05237), Sec. 3-4.

Example:
>>> from funmatch_keras import recipe
>>> recipe.PRESETS["flowers102"].tfds_name
'oxford_flowers102'
"""

from __future__ import annotations

import dataclasses
import re

# Sec. 3: how the teacher and the student see each image.
MODES = ("function_matching", "consistent", "independent", "fixed_teacher")


@dataclasses.dataclass(frozen=True)
class Preset:
    """A tfds dataset of the paper with its train / validation / test splits."""

    tfds_name: str
    train: str
    validation: str
    test: str


# Paper Sec. 4 / big_vision configs: 10% of train is the validation set where the
# dataset has no separate one; SUN397's "tfds" config ships its own 70/10/20 split.
PRESETS: dict[str, Preset] = {
    "pets37": Preset("oxford_iiit_pet", "train[:90%]", "train[90%:]", "test"),
    "flowers102": Preset("oxford_flowers102", "train", "validation", "test"),
    "food101": Preset("food101", "train[:90%]", "train[90%:]", "validation"),
    "sun397": Preset("sun397/tfds", "train", "validation", "test"),
    "imagenet2012": Preset("imagenet2012", "train[:98%]", "train[98%:]", "validation"),
}
SPLIT_ROLES = ("train", "validation", "test")
# scikit-learn's bundled 8x8 digits: the offline dataset (`sources.digits_source`).
DIGITS = "digits"
# Every dataset a config may name: the offline digits, then the presets.
DATASETS = (DIGITS, *PRESETS)


def split_names(preset: str) -> dict[str, str]:
    """The tfds split strings a preset uses for training, validation and test.

    Example:
    >>> split_names("pets37")["validation"]
    'train[90%:]'
    """
    if preset not in PRESETS:
        raise ValueError(
            f"Unknown preset. Expected one of {sorted(PRESETS)}. Received: {preset=}"
        )
    return {role: getattr(PRESETS[preset], role) for role in SPLIT_ROLES}


# How a teacher store (`data.teacher_store`) keeps the logits: float32 exactly,
# rounded to 16 bits, or each example's K largest logits and one tail value
# ("top<K>", TinyViT's choice).
STORE_ENCODINGS = ("float32", "float16", "bfloat16", "top<K>")
_TOP_K = re.compile(r"top([1-9][0-9]*)")


def store_encoding_k(encoding: str) -> int | None:
    """K of a `"top<K>"` teacher store encoding; None for float32, float16, bfloat16.

    Raises:
        ValueError: neither form (K < 1 included); the message lists the valid forms.

    Example:
    >>> store_encoding_k("top5"), store_encoding_k("bfloat16")
    (5, None)
    """
    if encoding in STORE_ENCODINGS[:-1]:
        return None
    match = _TOP_K.fullmatch(encoding) if isinstance(encoding, str) else None
    if match is None:
        raise ValueError(
            f"Unknown teacher store encoding {encoding!r}. Valid: 'float32' (exact, the "
            "default), 'float16', 'bfloat16', or 'top<K>' with K >= 1 (each example's K "
            "largest logits, e.g. 'top5').")
    return int(match.group(1))
