"""Model zoo: BiT ResNetV2 (with checkpoint loading) and `build(spec, ...)`."""

from funmatch_keras.models.bit import (
    StdConv2D,
    bit_r50x1,
    bit_r50x3,
    bit_r101x1,
    bit_r101x3,
    bit_r152x2,
    bit_r152x4,
    bit_resnet,
    fold_weight_standardization,
)
from funmatch_keras.models.bit_weights import load_bit_npz, load_timm_bit, save_bit_npz
from funmatch_keras.models.cnn import small_cnn
from funmatch_keras.models.zoo import build

__all__ = [
    "StdConv2D",
    "bit_r50x1",
    "bit_r50x3",
    "bit_r101x1",
    "bit_r101x3",
    "bit_r152x2",
    "bit_r152x4",
    "bit_resnet",
    "build",
    "fold_weight_standardization",
    "load_bit_npz",
    "load_timm_bit",
    "save_bit_npz",
    "small_cnn",
]
