"""Image augmentation ops of the function-matching recipe, as pure TensorFlow ops.

Every op works eagerly and inside `tf.data.Dataset.map`. Random ops take an
optional stateless `seed` (a shape-[2] integer tensor, as `tf.random.stateless_*`
take); with a seed the result is reproducible, without one TF's global RNG is used.

Reference: Beyer et al., "Knowledge distillation: A good teacher is patient and
consistent", CVPR 2022 (arXiv 2106.05237), Sec. 3 and appendix.
"""

from __future__ import annotations

from typing import Any, Sequence

import tensorflow as tf

# The paper's Inception crop: area (5%, 100%) of the image, aspect ratio 3/4..4/3.
DEFAULT_AREA_RANGE = (0.05, 1.0)
DEFAULT_ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)


def inception_crop_window(
    image_shape: tf.Tensor,
    area_range: Sequence[float] = DEFAULT_AREA_RANGE,
    aspect_ratio_range: Sequence[float] = DEFAULT_ASPECT_RATIO_RANGE,
    seed: tf.Tensor | None = None,
) -> tf.Tensor:
    """Samples an Inception-style crop window for an image of `image_shape`.

    Separate from `inception_crop` so JPEG pipelines can pass the window to
    `tf.image.decode_and_crop_jpeg` and decode only the crop.

    Args:
        image_shape: 1-D int tensor `[height, width, channels]`.
        area_range: tuple. Fraction of the image area the crop covers.
        aspect_ratio_range: tuple. Allowed width/height ratios of the crop.
        seed: optional shape-[2] int tensor for a reproducible draw.

    Returns:
        int32 tensor `[offset_y, offset_x, crop_height, crop_width]`.

    Example:
    >>> window = inception_crop_window(tf.constant([100, 80, 3]), seed=[1, 2])
    >>> window.shape
    TensorShape([4])
    """
    kwargs = dict(
        image_size=image_shape,
        # No box: the whole image is the object, so any crop qualifies.
        bounding_boxes=tf.zeros([0, 0, 4], tf.float32),
        min_object_covered=0.0,
        area_range=tuple(area_range),
        aspect_ratio_range=tuple(aspect_ratio_range),
        max_attempts=100,
        use_image_if_no_bounding_boxes=True,
    )
    if seed is None:
        begin, size, _ = tf.image.sample_distorted_bounding_box(**kwargs)
    else:
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            seed=seed, **kwargs
        )
    return tf.cast(tf.stack([begin[0], begin[1], size[0], size[1]]), tf.int32)


def resize(image: tf.Tensor, size: int | Sequence[int]) -> tf.Tensor:
    """Bilinear resize to `size` (int for a square, or (height, width)); float32 out."""
    if isinstance(size, int):
        size = (size, size)
    return tf.image.resize(tf.cast(image, tf.float32), size, method="bilinear")


def inception_crop(
    image: tf.Tensor,
    size: int | Sequence[int],
    area_range: Sequence[float] = DEFAULT_AREA_RANGE,
    aspect_ratio_range: Sequence[float] = DEFAULT_ASPECT_RATIO_RANGE,
    seed: tf.Tensor | None = None,
) -> tf.Tensor:
    """Random-resized (Inception) crop of one image, resized bilinearly to `size`.

    Args:
        image: `[H, W, C]` image tensor (any numeric dtype, values kept as is).
        size: int or `(height, width)`. Output size.
        area_range: tuple. Fraction of the image area the crop covers.
            Defaults to `(0.05, 1.0)` as in the paper.
        aspect_ratio_range: tuple. Defaults to `(3/4, 4/3)`.
        seed: optional shape-[2] int tensor for a reproducible crop.

    Returns:
        float32 tensor `[size, size, C]` in the input's value range.

    Example:
    >>> img = tf.random.uniform([60, 40, 3], maxval=255)
    >>> inception_crop(img, 32, seed=[0, 1]).shape
    TensorShape([32, 32, 3])
    """
    window = inception_crop_window(tf.shape(image), area_range, aspect_ratio_range, seed)
    crop = tf.slice(image, [window[0], window[1], 0], [window[2], window[3], -1])
    return resize(crop, size)


def random_flip(image: tf.Tensor, seed: tf.Tensor | None = None) -> tf.Tensor:
    """Flips an image (or a batch) left-right with probability 0.5.

    Example:
    >>> random_flip(tf.zeros([8, 8, 3]), seed=[0, 0]).shape
    TensorShape([8, 8, 3])
    """
    if seed is None:
        return tf.image.random_flip_left_right(image)
    return tf.image.stateless_random_flip_left_right(image, seed=seed)


def value_range(image: tf.Tensor, in_max: float = 255.0) -> tf.Tensor:
    """Maps pixel values from `[0, in_max]` to `[-1, 1]` as float32 (`x/127.5 - 1`).

    Example:
    >>> value_range(tf.constant([0.0, 255.0])).numpy()
    array([-1.,  1.], dtype=float32)
    """
    return tf.cast(image, tf.float32) * (2.0 / in_max) - 1.0


def resize_small(image: tf.Tensor, size: int) -> tf.Tensor:
    """Aspect-preserving resize so that the shorter side equals `size` (bilinear).

    Example:
    >>> resize_small(tf.zeros([100, 200, 3]), 50).shape
    TensorShape([50, 100, 3])
    """
    shape = tf.shape(image)
    height, width = tf.cast(shape[-3], tf.float32), tf.cast(shape[-2], tf.float32)
    scale = tf.cast(size, tf.float32) / tf.minimum(height, width)
    # Round, and never let the short side fall below `size` through rounding.
    new_h = tf.maximum(tf.cast(tf.round(height * scale), tf.int32), size)
    new_w = tf.maximum(tf.cast(tf.round(width * scale), tf.int32), size)
    return tf.image.resize(tf.cast(image, tf.float32), [new_h, new_w], method="bilinear")


def central_crop(image: tf.Tensor, size: int | Sequence[int]) -> tf.Tensor:
    """Crops the central `size` x `size` (or `(height, width)`) window.

    Example:
    >>> central_crop(tf.zeros([50, 100, 3]), 32).shape
    TensorShape([32, 32, 3])
    """
    if isinstance(size, int):
        size = (size, size)
    shape = tf.shape(image)
    top = (shape[-3] - size[0]) // 2
    left = (shape[-2] - size[1]) // 2
    crop = image[..., top : top + size[0], left : left + size[1], :]
    return tf.ensure_shape(crop, crop.shape[:-3].concatenate([size[0], size[1], None]))


def eval_preprocess(image: tf.Tensor, size: int, resize_to: int | None = None) -> tf.Tensor:
    """Evaluation view: resize the short side, central crop, map to [-1, 1].

    `resize_to` defaults to `size * 160 / 128` (the paper's 160 -> 128 and
    256 -> 224 pairs round to the same rule within a few pixels).

    Example:
    >>> eval_preprocess(tf.zeros([64, 80, 3], tf.uint8), 32).shape
    TensorShape([32, 32, 3])
    """
    if resize_to is None:
        resize_to = eval_resize_size(size)
    return value_range(central_crop(resize_small(image, resize_to), size))


def eval_resize_size(size: int) -> int:
    """Short-side size before the central crop: 128 -> 160, 224 -> 256, else 1.25x."""
    return {128: 160, 224: 256}.get(size, int(round(size * 1.25)))


def mixup(
    images: Any, seed: tf.Tensor | None = None, return_ratio: bool = False
) -> Any:
    """The paper's batch mixup: ONE ratio for the batch, partner = previous example.

    `a ~ U(0, 1)`, `a = max(a, 1 - a)`, `out[i] = a * x[i] + (1 - a) * x[i - 1]`
    (a roll by one on the batch axis). `images` may be a tensor or a nested
    structure of tensors (e.g. `{"student": s, "teacher": t}` in cross-resolution
    mode); every tensor gets the same ratio and the same partner.

    Args:
        images: `[B, ...]` float tensor or nest of them with the same batch size.
        seed: optional shape-[2] int tensor for a reproducible ratio.
        return_ratio: bool. Also return the ratio `a`. Defaults to `False`.

    Returns:
        The mixed images (same structure), and the ratio if `return_ratio`.

    Example:
    >>> x = tf.reshape(tf.range(4, dtype=tf.float32), [4, 1])
    >>> mixed, a = mixup(x, seed=[1, 2], return_ratio=True)
    >>> bool(a >= 0.5)
    True
    """
    if seed is None:
        ratio = tf.random.uniform([], dtype=tf.float32)
    else:
        ratio = tf.random.stateless_uniform([], seed=seed, dtype=tf.float32)
    ratio = tf.maximum(ratio, 1.0 - ratio)

    def _mix(x):
        x = tf.convert_to_tensor(x)
        a = tf.cast(ratio, x.dtype)
        return a * x + (1.0 - a) * tf.roll(x, shift=1, axis=0)

    mixed = tf.nest.map_structure(_mix, images)
    return (mixed, ratio) if return_ratio else mixed
