"""`load_weights(model, path)`: weights from a file, by its format.

With `build`, the models package's second entry point: `build` makes the
network, `load_weights` fills it from a checkpoint, whatever the file.
"""

from __future__ import annotations

import os
import zipfile

import keras
import numpy as np

from funmatch_keras.models.bit_weights import load_bit_npz, load_timm_bit

FORMATS = (".npz", ".safetensors", ".weights.h5", ".keras")


def _has_bit_names(path: str) -> bool:
    """Whether an `.npz` uses the official BiT names (`resnet/...`), not timm's."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return any(name.startswith("resnet/") for name in arrays.files)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile):
        return True  # not a plain npz: load_bit_npz says why


def load_weights(model: keras.Model, path: str | os.PathLike,
                 head: bool | str = "auto", new_head: bool | str = False) -> keras.Model:
    """Loads a checkpoint into `model`, choosing the reader by the file's name.

    - `.npz` with official BiT names (`resnet/...`): `load_bit_npz`;
    - other `.npz` (a timm state dict) and `.safetensors`: `load_timm_bit`;
    - `.weights.h5` and `.keras`: Keras's own `model.load_weights`.

    Args:
        model: keras.Model. For `.npz`/`.safetensors`, a BiT ResNetV2 built by
            `models.build` (or `bit_resnet`).
        path: str or PathLike. The checkpoint file.
        head: "auto", True or False. For BiT/timm files: whether to load the
            classifier head. "auto" and True load it, and a head of another
            class count is an error that names both shapes. Defaults to
            `"auto"`. Keras files always load everything.
        new_head: False, True or "if_needed". For BiT/timm files: True loads
            the backbone only and keeps the model's zero-initialised head, to
            fine-tune it with labels (e.g. from the 21,843-class BiT-M);
            "if_needed" does so only when the checkpoint's head does not fit.
            Warns: such a model predicts nothing until trained, so it cannot
            teach yet. Defaults to `False`.

    Returns:
        The same `model`, with its weights assigned in place.

    Raises:
        FileNotFoundError: if `path` does not exist.
        ValueError: for another extension, a truncated or corrupt file, a head
            of another class count (without `new_head=True`), or a file that
            does not fit `model`.

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
        return load_timm_bit(model, path, head=head, new_head=new_head)
    if path.endswith(".npz"):
        reader = load_bit_npz if _has_bit_names(path) else load_timm_bit
        return reader(model, path, head=head, new_head=new_head)
    if path.endswith((".weights.h5", ".keras")):
        if new_head is True or head is False:
            raise ValueError(
                f"{path!r} is a Keras file, which always loads every weight, head "
                f"included: new_head and head=False apply to BiT/timm .npz and "
                f".safetensors files. Received: head={head!r}, new_head={new_head!r}")
        _check_readable_keras_file(path)
        model.load_weights(path)
        return model
    raise ValueError(f"Unknown weights format {path!r}: expected one of "
                     f"{', '.join(FORMATS)}.")


def _check_readable_keras_file(path: str) -> None:
    """Raises a clear error for a truncated `.keras` (zip) or `.weights.h5` (HDF5)."""
    if path.endswith(".keras"):
        readable = zipfile.is_zipfile(path)
        kind = "a .keras file (a zip archive written by `model.save`)"
    else:
        with open(path, "rb") as f:
            readable = f.read(8) == b"\x89HDF\r\n\x1a\n"
        kind = "a .weights.h5 file (HDF5, written by `model.save_weights`)"
        if readable:
            import h5py

            try:
                with h5py.File(path, "r"):
                    pass
            except OSError:
                readable = False
    if not readable:
        raise ValueError(
            f"{path!r} ({os.path.getsize(path)} bytes) is not a readable {kind}: it "
            "is probably truncated or corrupt (an interrupted copy or save?). Save "
            "or copy it again.")
