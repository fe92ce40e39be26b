"""Checks of in-memory image and label arrays for `sources.array_source`, with fixes in the errors.

Example:
>>> labels, num_classes = class_indices(np.array([0.0, 2.0, 1.0]))
>>> labels.dtype, num_classes
(dtype('int64'), 3)
>>> pixels_0_255(np.array([[0.0, 0.5]]), stated_range(np.dtype("float64"), (0, 1), None))
array([[  0. , 127.5]], dtype=float32)
"""

from __future__ import annotations

import numpy as np


def class_indices(labels: np.ndarray, num_classes: int | None = None
                  ) -> tuple[np.ndarray, int]:
    """`(labels, num_classes)`: labels checked to be class indices in `[0, num_classes)`.

    Whole-number float labels become int64. Integer labels keep their dtype:
    the source's name (the teacher-logits cache key) hashes them, and caches
    written before this check must still be found. `num_classes` defaults to
    `max(labels) + 1`.
    """
    labels = _as_integers(labels)
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise ValueError(
            f"Label out of range [0, {num_classes}) at example index {bad[0]}: "
            f"label={labels[bad[0]]}."
        )
    return labels, num_classes


def _as_integers(labels: np.ndarray) -> np.ndarray:
    if labels.dtype.kind in "iu":
        if labels.dtype.kind == "u" and labels.size and labels.max() > np.iinfo(np.int64).max:
            raise ValueError(f"Labels up to {labels.max()} are not class indices.")
        return labels
    if labels.dtype.kind == "f":
        whole = np.isfinite(labels) & (labels == np.round(labels))
        bad = np.flatnonzero(~whole)
        if bad.size:
            raise ValueError(
                f"Labels must be integer class indices; the {labels.dtype} label at "
                f"example index {bad[0]} is {labels[bad[0]].item()!r}. Pass class indices "
                "(0, 1, 2, ...): round or map them yourself, array_source does not "
                "truncate.")
        return labels.astype(np.int64)
    raise ValueError(
        f"Labels must be integer class indices. Received: labels.dtype={labels.dtype}. "
        "Map class names to indices first, e.g. "
        "`names, labels = np.unique(labels, return_inverse=True)`.")


def stated_range(dtype: np.dtype, value_range, in_max) -> tuple[float, float]:
    """The `(low, high)` pixel range of images of `dtype`, as the caller states it."""
    if in_max is not None:
        if value_range is not None:
            raise ValueError("Pass value_range or in_max (= value_range=(0, in_max)), "
                             f"not both. Received: {value_range=}, {in_max=}")
        value_range = (0.0, in_max)
    if dtype.kind not in "uif":
        raise ValueError(
            f"images must be numbers (uint8, or float/int with value_range). "
            f"Received: images.dtype={dtype}")
    if value_range is None:
        if dtype == np.uint8:
            return 0.0, 255.0
        if dtype.kind == "f":
            raise ValueError(
                f"images are {dtype}, so their value range is needed: pass "
                "value_range=(0, 1) for images in [0, 1] or value_range=(0, 255) "
                "for [0, 255] (or convert them to uint8). The pipeline maps it to "
                "its [0, 255] pixels.")
        raise ValueError(
            f"images are {dtype} (values up to {np.iinfo(dtype).max}), not uint8: "
            f"pass value_range=(0, {np.iinfo(dtype).max}) (or the range your "
            "pixels use), or convert them to uint8 (e.g. `images // 257` for "
            "16-bit images).")
    try:
        low, high = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise ValueError(f"value_range must be (low, high). Received: {value_range=}"
                         ) from None
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise ValueError(f"value_range must be finite with low < high. Received: "
                         f"{value_range=}")
    return low, high


def pixels_0_255(images: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """Checks `images` lie in `value_range` and maps them to the pipeline's [0, 255]."""
    low, high = value_range
    if images.dtype == np.uint8 and value_range == (0.0, 255.0):
        return images
    if images.dtype.kind == "f":
        finite = np.isfinite(images)
        if not finite.all():
            bad = int(np.flatnonzero(~finite.reshape(len(images), -1).all(axis=1))[0])
            raise ValueError(
                f"images hold NaN or infinite pixels (first at example index {bad}): "
                "they would make the weights NaN. Fix or drop those images.")
    found_low, found_high = float(images.min()), float(images.max())
    slack = 1e-6 * (high - low)
    if found_low < low - slack or found_high > high + slack:
        hint = (" They look like [0, 255] pixels: pass value_range=(0, 255)."
                if found_high > 1.0 and high <= 1.0 and found_high <= 255 else "")
        raise ValueError(
            f"images hold values in [{found_low:g}, {found_high:g}], outside "
            f"value_range=({low:g}, {high:g}): pass the range the pixels are in.{hint}")
    scaled = (images.astype(np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
    return np.clip(scaled, 0.0, 255.0)
