"""Per-example views: decoding, the teaching modes' crops and flips, eval views.

Every function here maps one example's image (encoded bytes or a decoded
`[H, W, 3]` array, see `funmatch_keras.data.sources`) to float32 views in `[-1, 1]`,
and runs the same eagerly and inside `tf.data.Dataset.map`. Randomness comes
from an explicit stateless `seed`; `funmatch_keras.data.pipelines` derives one per example.
"""

from __future__ import annotations

from typing import Any, Callable

import tensorflow as tf

from funmatch_keras.data import augment


def decode(image: tf.Tensor, encoded: bool) -> tf.Tensor:
    """`[H, W, 3]` uint8 from JPEG/PNG/GIF/BMP bytes (RGBA, gray -> RGB).

    A decoded image (`encoded=False`) is returned as is; it must be uint8 or
    float with values in `[0, 255]` (any other dtype is an error naming the fix).

    Example:
    >>> png = tf.io.encode_png(tf.zeros([5, 7, 1], tf.uint8))
    >>> decode(png, encoded=True).shape
    TensorShape([5, 7, 3])
    >>> decode(tf.zeros([2, 2, 3], tf.uint16), encoded=False)
    Traceback (most recent call last):
    ...
    ValueError: Decoded images must be uint8 (or float in [0, 255]), not uint16: ...
    """
    if not encoded:
        return check_decoded(image)
    return tf.ensure_shape(
        tf.io.decode_image(image, channels=3, expand_animations=False), [None, None, 3])


def check_decoded(image: tf.Tensor) -> tf.Tensor:
    """`image` if its dtype is one the pipeline reads as `[0, 255]` pixels, else raises.

    A static check (free at run time): uint8 and float pass; uint16, int32, ...
    would be read as if 255 were white. `sources.array_source` checks values
    and ranges once, when the source is built.

    Example:
    >>> check_decoded(tf.zeros([2, 2, 3], tf.uint8)).dtype
    tf.uint8
    """
    if image.dtype != tf.uint8 and not image.dtype.is_floating:
        raise ValueError(
            f"Decoded images must be uint8 (or float in [0, 255]), not "
            f"{image.dtype.name}: build the source with "
            "`sources.array_source(images, labels, value_range=(low, high))`, which "
            "maps any range to [0, 255] and checks it once, or convert the images "
            "to uint8.")
    return image


def train_view_fn(
    mode: str, student_size: int, teacher_size: int | list[int], encoded: bool,
    area_range: tuple[float, float] = augment.DEFAULT_AREA_RANGE, flip: bool = True,
) -> Callable[[tf.Tensor, tf.Tensor], Any]:
    """`fn(image, seed) -> views` for a teaching mode: crops, flips, `[-1, 1]`.

    The views are one tensor (both models see it), or `{"student", "teacher"}`:
    two independent crops in the `independent` mode, or one crop resized to
    each model's size when the sizes differ (cross-resolution). A list of
    teacher sizes (an ensemble) makes `"teacher"` a tuple, one view per size.
    `fixed_teacher` gives the student's view alone.

    Example:
    >>> fn = train_view_fn("independent", 16, 24, encoded=False)
    >>> views = fn(tf.zeros([30, 40, 3], tf.uint8), tf.constant([0, 1], tf.int64))
    >>> views["student"].shape, views["teacher"].shape
    (TensorShape([16, 16, 3]), TensorShape([24, 24, 3]))
    """
    # Each group is one crop (+ flip) of the original image, resized to each of
    # its (name, size) entries: cross-resolution views share a crop, the
    # independent mode's views do not. Ensemble views are named "teacher/<i>"
    # here and returned as a tuple under "teacher".
    ensemble = isinstance(teacher_size, (list, tuple))
    teacher_views = ([(f"teacher/{i}", t) for i, t in enumerate(teacher_size)] if ensemble
                     else [("teacher", teacher_size)])
    if mode == "independent":
        groups = [[("student", student_size)]] + [[view] for view in teacher_views]
    elif (ensemble or teacher_size != student_size) and mode != "fixed_teacher":
        groups = [[("student", student_size)] + teacher_views]
    else:
        groups = [[("image", student_size)]]

    def view_fn(image, seed):
        seeds = tf.random.experimental.stateless_split(seed, 2 * len(groups))
        crop_list = crops(image, [seeds[2 * g] for g in range(len(groups))], encoded,
                          area_range)
        views = {}
        for g, (crop, group) in enumerate(zip(crop_list, groups)):
            if flip:
                crop = augment.random_flip(crop, seed=seeds[2 * g + 1])
            for name, size in group:
                views[name] = augment.value_range(augment.resize(crop, size))
        if ensemble and "image" not in views:
            views["teacher"] = tuple(views.pop(name) for name, _ in teacher_views)
        return views.get("image", views)

    return view_fn


def crops(
    image: tf.Tensor, seeds: list[tf.Tensor], encoded: bool,
    area_range: tuple[float, float] = augment.DEFAULT_AREA_RANGE,
) -> list[tf.Tensor]:
    """One uint8 Inception crop of `image` per seed; JPEGs decode only the crop.

    Example:
    >>> seeds = [tf.constant([0, i], tf.int64) for i in range(2)]
    >>> len(crops(tf.zeros([30, 40, 3], tf.uint8), seeds, encoded=False))
    2
    """
    def window(shape, seed):
        return augment.inception_crop_window(shape, area_range, seed=seed)

    def slice_crops(full):
        windows = [window(tf.shape(full), s) for s in seeds]
        return [full[w[0]:w[0] + w[2], w[1]:w[1] + w[3]] for w in windows]

    if not encoded:
        return slice_crops(check_decoded(image))

    def jpeg_crops():
        shape = tf.image.extract_jpeg_shape(image)
        return [
            tf.image.decode_and_crop_jpeg(image, window(shape, s), channels=3)
            for s in seeds
        ]

    return tf.cond(tf.io.is_jpeg(image), jpeg_crops,
                   lambda: slice_crops(decode(image, encoded)))


def eval_views(
    image: tf.Tensor, encoded: bool, size: int,
    teacher_size: int | list[int] | None = None,
) -> Any:
    """The eval view (short-side resize, central crop) of one image, `[-1, 1]`.

    With a `teacher_size` other than `size`, `{"student": ..., "teacher": ...}`,
    both from the same image; a list of teacher sizes (an ensemble) makes
    `"teacher"` a tuple, one view per size.

    Example:
    >>> eval_views(tf.zeros([30, 40, 3], tf.uint8), False, 16).shape
    TensorShape([16, 16, 3])
    """
    image = decode(image, encoded)
    if teacher_size in (None, size):
        return augment.eval_preprocess(image, size)
    views = {"student": augment.eval_preprocess(image, size)}
    if isinstance(teacher_size, (list, tuple)):
        # A tuple, not a list: tf.data would stack a list into one tensor.
        views["teacher"] = tuple(augment.eval_preprocess(image, t) for t in teacher_size)
    else:
        views["teacher"] = augment.eval_preprocess(image, teacher_size)
    return views
