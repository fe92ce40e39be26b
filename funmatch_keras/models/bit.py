"""BiT ResNetV2: pre-activation ResNets with GroupNorm and weight standardization.

The models of Big Transfer (BiT), which Beyer et al. use as teacher (R152x2) and
student (R50x1). Layers carry explicit names (`root_conv`,
`block1_unit01_a_norm`, `block1_unit01_a_proj`, ..., `head_logits`) so that the
checkpoint map in `bit_weights.py` stays readable.

Reference:
    Kolesnikov et al., "Big Transfer (BiT): General Visual Representation
    Learning", ECCV 2020 (arXiv 1912.11370).
    Beyer et al., "Knowledge distillation: A good teacher is patient and
    consistent", CVPR 2022 (arXiv 2106.05237).
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

# Weight standardization divides by sqrt(var + eps). BiT's official code uses
# 1e-10 (population variance); the released checkpoints were trained with it, so
# loading them with another eps (timm uses 1e-8) shifts the activations slightly.
WS_EPSILON = 1e-10
# GroupNorm as in BiT: 32 groups, eps 1e-5 (the TF/PyTorch BiT default).
GN_GROUPS = 32
GN_EPSILON = 1e-5

UNITS_PER_STAGE = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
STAGE_STRIDES = (1, 2, 2, 2)


def standardize_kernel(kernel: Any, epsilon: float = WS_EPSILON) -> Any:
    """Standardizes a HWIO kernel per output channel over (H, W, in).

    Args:
        kernel: tensor of shape `(H, W, in, out)`.
        epsilon: float. Added to the population variance. Defaults to
            `WS_EPSILON` (1e-10, as in BiT).

    Returns:
        A tensor of the same shape and dtype with zero mean and unit variance
        per output channel (statistics computed in float32).

    Example:
        >>> k = standardize_kernel(np.random.randn(3, 3, 8, 4).astype("float32"))
    """
    dtype = kernel.dtype
    kernel = ops.cast(kernel, "float32")
    mean = ops.mean(kernel, axis=(0, 1, 2), keepdims=True)
    var = ops.var(kernel, axis=(0, 1, 2), keepdims=True)
    return ops.cast((kernel - mean) * ops.rsqrt(var + epsilon), dtype)


@keras.saving.register_keras_serializable(package="funmatch_keras")
class StdConv2D(keras.layers.Conv2D):
    """Conv2D with a weight-standardized kernel and no bias (BiT's conv).

    Each output channel's kernel is standardized over (H, W, in) with the
    population variance before every convolution:
    `(w - mean) / sqrt(var + 1e-10)`. The statistics are computed in float32
    even under a bfloat16 policy.

    Args:
        filters: int. Number of output channels.
        kernel_size: int or tuple. Size of the convolution window.
        strides: int or tuple. Defaults to `1`.
        padding: `"valid"` or `"same"`. Defaults to `"valid"` (BiT pads
            explicitly with `ZeroPadding2D`).
        epsilon: float. Added to the variance. Defaults to `1e-10`.
        **kwargs: other `keras.layers.Conv2D` arguments; `use_bias` must be False.

    Example:
        >>> layer = StdConv2D(16, 3, name="conv")
        >>> y = layer(np.zeros((1, 8, 8, 3), "float32"))  # shape (1, 6, 6, 16)
    """

    def __init__(
        self,
        filters: int,
        kernel_size: int | tuple[int, int],
        strides: int | tuple[int, int] = 1,
        padding: str = "valid",
        epsilon: float = WS_EPSILON,
        **kwargs: Any,
    ) -> None:
        if kwargs.pop("use_bias", False):
            raise ValueError("StdConv2D has no bias. Received: use_bias=True")
        super().__init__(
            filters, kernel_size, strides=strides, padding=padding, use_bias=False,
            **kwargs,
        )
        self.epsilon = float(epsilon)

    def convolution_op(self, inputs: Any, kernel: Any) -> Any:
        return super().convolution_op(inputs, standardize_kernel(kernel, self.epsilon))

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["epsilon"] = self.epsilon
        return config


def _group_norm(name: str, dtype: Any) -> keras.layers.Layer:
    return keras.layers.GroupNormalization(
        groups=GN_GROUPS, epsilon=GN_EPSILON, dtype=dtype, name=name
    )


def _root(x: Any, filters: int, dtype: Any) -> Any:
    # Keras "same" padding is asymmetric at stride 2 (more on the bottom/right)
    # and would not reproduce the checkpoints: pad symmetrically, then "valid".
    x = keras.layers.ZeroPadding2D(3, dtype=dtype, name="root_pad")(x)
    x = StdConv2D(filters, 7, strides=2, dtype=dtype, name="root_conv")(x)
    # Zero (not -inf) padding before the max-pool, as in BiT: after the conv
    # activations can be negative, so this is not the same as "same" pooling.
    x = keras.layers.ZeroPadding2D(1, dtype=dtype, name="root_pool_pad")(x)
    return keras.layers.MaxPooling2D(3, strides=2, dtype=dtype, name="root_pool")(x)


def _unit(x: Any, mid: int, stride: int, name: str, dtype: Any) -> Any:
    """One pre-activation bottleneck unit; `name` like `block1_unit01`."""
    out = 4 * mid
    preact = _group_norm(f"{name}_a_norm", dtype)(x)
    preact = keras.layers.ReLU(dtype=dtype, name=f"{name}_a_relu")(preact)
    if stride > 1 or x.shape[-1] != out:
        projection = StdConv2D(out, 1, strides=stride, dtype=dtype,
                               name=f"{name}_a_proj")
        shortcut = projection(preact)
    else:
        shortcut = x
    y = StdConv2D(mid, 1, dtype=dtype, name=f"{name}_a_conv")(preact)
    y = _group_norm(f"{name}_b_norm", dtype)(y)
    y = keras.layers.ReLU(dtype=dtype, name=f"{name}_b_relu")(y)
    y = keras.layers.ZeroPadding2D(1, dtype=dtype, name=f"{name}_b_pad")(y)
    y = StdConv2D(mid, 3, strides=stride, dtype=dtype, name=f"{name}_b_conv")(y)
    y = _group_norm(f"{name}_c_norm", dtype)(y)
    y = keras.layers.ReLU(dtype=dtype, name=f"{name}_c_relu")(y)
    y = StdConv2D(out, 1, dtype=dtype, name=f"{name}_c_conv")(y)
    return keras.layers.Add(dtype=dtype, name=f"{name}_add")([shortcut, y])


def bit_resnet(
    depth: int,
    width: int,
    num_classes: int,
    image_size: int | None = None,
    dtype: Any = None,
    name: str | None = None,
) -> keras.Model:
    """Builds a BiT ResNetV2 (pre-activation, GroupNorm, StdConv) classifier.

    Args:
        depth: int. 50, 101 or 152.
        width: int. Width factor (1, 2, 3, 4 in BiT): root 64w channels,
            bottleneck widths 64w/128w/256w/512w.
        num_classes: int. Number of logits.
        image_size: int or None. Square input size; None accepts any size.
            Defaults to `None`.
        dtype: str, `keras.DTypePolicy` or None. Policy for every layer
            (e.g. `"mixed_bfloat16"`); the logits are float32 regardless.
            Defaults to `None` (the global policy).
        name: str or None. Model name. Defaults to `"bit_r{depth}x{width}"`.

    Returns:
        A functional `keras.Model` mapping images in [-1, 1] of shape
        `(batch, H, W, 3)` to float32 logits `(batch, num_classes)`. The head is
        zero-initialized, as in BiT fine-tuning.

    Example:
        >>> model = bit_resnet(50, 1, num_classes=10, image_size=64)
        >>> logits = model(np.zeros((2, 64, 64, 3), "float32"))  # (2, 10)
    """
    if depth not in UNITS_PER_STAGE:
        raise ValueError(
            f"depth must be one of {sorted(UNITS_PER_STAGE)}. Received: depth={depth}"
        )
    if int(width) != width or width < 1:
        raise ValueError(f"width must be a positive integer. Received: width={width}")
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(
            "num_classes must be a positive integer. "
            f"Received: num_classes={num_classes}"
        )
    if image_size is not None and image_size < 32:
        raise ValueError(
            f"image_size must be None or >= 32. Received: image_size={image_size}"
        )

    inputs = keras.Input(shape=(image_size, image_size, 3), name="images")
    x = _root(inputs, 64 * width, dtype)
    for block, (units, stride) in enumerate(
        zip(UNITS_PER_STAGE[depth], STAGE_STRIDES), start=1
    ):
        mid = 64 * width * 2 ** (block - 1)
        for unit in range(1, units + 1):
            unit_stride = stride if unit == 1 else 1
            x = _unit(x, mid, unit_stride, f"block{block}_unit{unit:02d}", dtype)
    x = _group_norm("head_norm", dtype)(x)
    x = keras.layers.ReLU(dtype=dtype, name="head_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(dtype=dtype, name="head_pool")(x)
    # The classifier runs in float32 under any policy so logits (and the
    # distillation softmax on them) keep full precision.
    logits = keras.layers.Dense(
        num_classes, kernel_initializer="zeros", bias_initializer="zeros",
        dtype="float32", name="head_logits",
    )(x)
    return keras.Model(inputs, logits, name=name or f"bit_r{depth}x{width}")


def bit_r50x1(num_classes: int, image_size: int | None = None, dtype: Any = None):
    """BiT-R50x1 (25.5M parameters with 1000 classes); see `bit_resnet`."""
    return bit_resnet(50, 1, num_classes, image_size, dtype)


def bit_r50x3(num_classes: int, image_size: int | None = None, dtype: Any = None):
    """BiT-R50x3; see `bit_resnet`."""
    return bit_resnet(50, 3, num_classes, image_size, dtype)


def bit_r101x1(num_classes: int, image_size: int | None = None, dtype: Any = None):
    """BiT-R101x1 (44.5M parameters with 1000 classes); see `bit_resnet`."""
    return bit_resnet(101, 1, num_classes, image_size, dtype)


def bit_r101x3(num_classes: int, image_size: int | None = None, dtype: Any = None):
    """BiT-R101x3; see `bit_resnet`."""
    return bit_resnet(101, 3, num_classes, image_size, dtype)


def bit_r152x2(num_classes: int, image_size: int | None = None, dtype: Any = None):
    """BiT-R152x2, the paper's teacher (236M parameters); see `bit_resnet`."""
    return bit_resnet(152, 2, num_classes, image_size, dtype)


def bit_r152x4(num_classes: int, image_size: int | None = None, dtype: Any = None):
    """BiT-R152x4; see `bit_resnet`."""
    return bit_resnet(152, 4, num_classes, image_size, dtype)


def fold_weight_standardization(model: keras.Model) -> keras.Model:
    """Returns an inference copy with weight standardization folded into kernels.

    Every `StdConv2D` becomes a plain `keras.layers.Conv2D(use_bias=False)` whose
    kernel is the standardized kernel, so inference skips the per-call
    statistics. Other layers, names and dtype policies are kept; the input
    model is unchanged. Do not train the copy: it is no longer standardized.

    Args:
        model: keras.Model. A functional model containing `StdConv2D` layers.

    Returns:
        A new functional `keras.Model` with the same outputs (to ~1e-5).

    Example:
        >>> model = bit_r50x1(10, image_size=64)
        >>> fast = fold_weight_standardization(model)
    """
    if not isinstance(model, keras.Model):
        raise ValueError(
            "fold_weight_standardization expects a functional keras.Model. "
            f"Received: {type(model).__name__}"
        )

    def clone_layer(layer: keras.layers.Layer) -> keras.layers.Layer:
        config = layer.get_config()
        if isinstance(layer, StdConv2D):
            config.pop("epsilon")
            return keras.layers.Conv2D.from_config(config)
        return layer.__class__.from_config(config)

    folded = keras.models.clone_model(model, clone_function=clone_layer)
    for layer in model.layers:
        if not layer.weights:
            continue
        weights = layer.get_weights()
        if isinstance(layer, StdConv2D):
            # Same float32 ops as the layer's call, so the kernels are identical.
            kernel = ops.convert_to_tensor(np.asarray(weights[0], np.float32))
            weights[0] = ops.convert_to_numpy(standardize_kernel(kernel, layer.epsilon))
        folded.get_layer(layer.name).set_weights(weights)
    return folded


def is_weight_standardized(model: keras.Model) -> bool:
    """Whether `model` has a `StdConv2D` layer (a BiT model), which folding speeds up."""
    return any(isinstance(layer, StdConv2D) for layer in model.layers)


def fold_if_standardized(model: keras.Model) -> keras.Model:
    """`fold_weight_standardization(model)` for a BiT model; any other, unchanged.

    How a frozen teacher is computed (`build.teachers`, the benchmarks).

    Example:
    >>> cnn = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(2, 3)])
    >>> fold_if_standardized(cnn) is cnn
    True
    """
    return fold_weight_standardization(model) if is_weight_standardized(model) else model
