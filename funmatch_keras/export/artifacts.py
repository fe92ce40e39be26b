"""What every export format's writer shares: its error, and how an artifact reaches disk.

An artifact (a file or a directory) is written under a temporary sibling name and
renamed into place, so a reader sees the old artifact or the new one, never half.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

import keras


class ExportError(RuntimeError):
    """An export or conversion failed; the message says why and what blocked it."""


def static_image_size(model: keras.Model) -> int | None:
    """The model's square input size S, or `None` if its input shape is not static.

    Example:
    >>> from funmatch_keras.models import small_cnn
    >>> static_image_size(small_cnn([8], num_classes=3, image_size=16))
    16
    """
    shape = tuple(model.inputs[0].shape) if model.inputs else ()
    if len(shape) != 4 or shape[1] is None or shape[1] != shape[2]:
        return None
    return int(shape[1])


def check_writable(path: Path, overwrite: bool) -> None:
    """Raises `FileExistsError` naming `--overwrite` if `path` exists and may not be replaced."""
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} already exists; pass --overwrite (overwrite=True) to replace it.")


@contextlib.contextmanager
def atomic_output(path: Path, overwrite: bool) -> Iterator[Path]:
    """Yields a temporary sibling of `path` (file or directory), renamed on success."""
    check_writable(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        yield tmp
        remove_path(path)
        os.replace(tmp, path)
    finally:
        remove_path(tmp)


def remove_path(path: Path) -> None:
    """Deletes a file or a directory tree, if it exists."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
