"""`load_weights(model, path)`: weights from a file, by its format.

With `build`, the models package's second entry point: `build` makes the
network, `load_weights` fills it from a checkpoint, whatever the file.
"""

from __future__ import annotations

import os

import keras
import numpy as np

from funmatch_keras.models.bit_weights import load_bit_npz, load_timm_bit

FORMATS = (".npz", ".safetensors", ".weights.h5", ".keras")


def _has_bit_names(path: str) -> bool:
    """Whether an `.npz` uses the official BiT names (`resnet/...`), not timm's."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return any(name.startswith("resnet/") for name in arrays.files)
    except (ValueError, OSError):
        return True  # not a plain npz: load_bit_npz says why


def load_weights(model: keras.Model, path: str | os.PathLike,
                 head: bool | str = "auto") -> keras.Model:
    """Loads a checkpoint into `model`, choosing the reader by the file's name.

    - `.npz` with official BiT names (`resnet/...`): `load_bit_npz`;
    - other `.npz` (a timm state dict) and `.safetensors`: `load_timm_bit`;
    - `.weights.h5` and `.keras`: Keras's own `model.load_weights`.

    Args:
        model: keras.Model. For `.npz`/`.safetensors`, a BiT ResNetV2 built by
            `models.build` (or `bit_resnet`).
        path: str or PathLike. The checkpoint file.
        head: "auto", True or False. For BiT/timm files: whether to load the
            classifier head ("auto": when its class count matches). Defaults to
            `"auto"`. Keras files always load everything.

    Returns:
        The same `model`, with its weights assigned in place.

    Raises:
        FileNotFoundError: if `path` does not exist.
        ValueError: for another extension, or a file that does not fit `model`.

    Example:
    >>> import os, tempfile
    >>> from funmatch_keras import models
    >>> model = models.build("cnn:4,8", num_classes=3, image_size=16)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = os.path.join(tmp, "cnn.weights.h5")
    ...     model.save_weights(path)
    ...     loaded = load_weights(models.build("cnn:4,8", 3, 16), path)
    >>> all(np.array_equal(a, b) for a, b in zip(model.get_weights(), loaded.get_weights()))
    True
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No weights file at {path!r}.")
    if path.endswith(".safetensors"):
        return load_timm_bit(model, path, head=head)
    if path.endswith(".npz"):
        reader = load_bit_npz if _has_bit_names(path) else load_timm_bit
        return reader(model, path, head=head)
    if path.endswith((".weights.h5", ".keras")):
        model.load_weights(path)
        return model
    raise ValueError(f"Unknown weights format {path!r}: expected one of "
                     f"{', '.join(FORMATS)}.")
