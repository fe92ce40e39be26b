"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Each write goes to a temporary name beside the target (same directory, so the
same filesystem), then `os.replace` moves it into place in one step. A crash
mid-write leaves the previous file and a `.tmp-*` leftover, never a truncated
target. The temporary name keeps the target's suffix, since some writers pick
the format from it (`model.save` needs `.keras`).

Example:
>>> import json, os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "report.json")
>>> write_text(path, json.dumps({"top1": 0.9}))
>>> json.load(open(path))
{'top1': 0.9}
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

TEMP_PREFIX = ".tmp-"


def temp_path(path: str) -> str:
    """Where `atomic_write` writes before the rename (keeps the suffix).

    Example:
    >>> temp_path("/run/student.keras").startswith("/run/.tmp-")
    True
    """
    directory, name = os.path.split(os.fspath(path))
    return os.path.join(directory, f"{TEMP_PREFIX}{os.getpid()}-{name}")


def atomic_write(path: str, write: Callable[[str], Any]) -> str:
    """Calls `write(tmp)` to write the file at a temporary path, then renames it to `path`.

    Args:
        path: str. The file to (re)place.
        write: callable taking the temporary path, e.g. `model.save`.

    Returns:
        `path`.

    Example:
    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "x.txt")
    >>> atomic_write(path, lambda tmp: open(tmp, "w").write("hi")) == path
    True
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_text(path: str, text: str) -> None:
    """Atomically writes `text` to `path`."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def write_json(path: str, value: Any) -> None:
    """Atomically writes `value` as indented JSON to `path`."""
    write_text(path, json.dumps(value, indent=2))
