"""Model zoo: `build(spec, ...)` makes a model, `load_weights(model, path)` fills it.

Also: BiT ResNetV2 (`bit_*`, with its checkpoint readers), a small CNN,
keras-hub presets (`hub`, the `[hub]` extra, imported only when used), and
`list_models()`, the specs `build` knows by name.
"""

from funmatch_keras.models import hub
from funmatch_keras.models.bit import (
    StdConv2D,
    bit_r50x1,
    bit_r50x3,
    bit_r101x1,
    bit_r101x3,
    bit_r152x2,
    bit_r152x4,
    bit_resnet,
    fold_if_standardized,
    fold_weight_standardization,
    is_weight_standardized,
)
from funmatch_keras.models.bit_weights import load_bit_npz, load_timm_bit, save_bit_npz
from funmatch_keras.models.checks import check_teacher
from funmatch_keras.models.cnn import small_cnn
from funmatch_keras.models.weights import load_weights
from funmatch_keras.models.zoo import build, list_models, load_keras_file, save_keras_file

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
    "check_teacher",
    "fold_if_standardized",
    "fold_weight_standardization",
    "hub",
    "is_weight_standardized",
    "list_models",
    "load_bit_npz",
    "load_keras_file",
    "load_timm_bit",
    "load_weights",
    "save_bit_npz",
    "save_keras_file",
    "small_cnn",
]
