"""Loading and saving BiT ResNetV2 weights: official BiT `.npz` and timm files.

One explicit name map (`_name_map`) pairs each Keras variable of a model built
by `bit.bit_resnet` with its name in the official BiT checkpoints and in timm's
`resnetv2_*_bit` state dicts; layout conversion lives in `_to_file_layout` and
`_from_file_layout` only. Keras and BiT store conv kernels as HWIO, timm
(PyTorch) as OIHW. In BiT naming the norm under `a`/`b`/`c` precedes the conv
under the same letter (`a/group_norm` is the unit's pre-activation norm).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import warnings
import zipfile
from typing import Any

import keras
import numpy as np

logger = logging.getLogger(__name__)

_BIT_PREFIX = "resnet/"
_CONV = "standardized_conv2d/kernel"
_UNIT_LAYER = re.compile(r"^block(\d+)_unit(\d+)_([abc])_(norm|conv|proj)$")
_HEAD_KINDS = ("head_kernel", "head_bias")
_MAX_LISTED = 5


@dataclasses.dataclass(frozen=True)
class _Slot:
    """One model variable and its names in the two checkpoint formats."""

    variable: Any
    bit: str
    timm: str
    kind: str  # "conv" (HWIO kernel), "vector", "head_kernel" or "head_bias"


def _norm_slots(layer: Any, bit: str, timm: str) -> list[_Slot]:
    return [
        _Slot(layer.gamma, f"{bit}/gamma", f"{timm}.weight", "vector"),
        _Slot(layer.beta, f"{bit}/beta", f"{timm}.bias", "vector"),
    ]


def _name_map(model: keras.Model) -> list[_Slot]:
    """Maps the variables of a `bit_resnet` model to BiT and timm names."""
    slots: list[_Slot] = []
    for layer in model.layers:
        name = layer.name
        if name == "root_conv":
            slots.append(
                _Slot(layer.kernel, f"root_block/{_CONV}", "stem.conv.weight", "conv")
            )
        elif name == "head_norm":
            slots += _norm_slots(layer, "group_norm", "norm")
        elif name == "head_logits":
            slots.append(_Slot(layer.kernel, "head/conv2d/kernel", "head.fc.weight",
                               "head_kernel"))
            slots.append(_Slot(layer.bias, "head/conv2d/bias", "head.fc.bias",
                               "head_bias"))
        elif match := _UNIT_LAYER.match(name):
            block, unit, part, kind = match.groups()
            bit = f"block{block}/unit{unit}/{part}"
            timm = f"stages.{int(block) - 1}.blocks.{int(unit) - 1}"
            index = "abc".index(part) + 1  # a/b/c <-> norm1,conv1 / 2 / 3
            if kind == "norm":
                slots += _norm_slots(layer, f"{bit}/group_norm", f"{timm}.norm{index}")
            elif kind == "conv":
                slots.append(_Slot(layer.kernel, f"{bit}/{_CONV}",
                                   f"{timm}.conv{index}.weight", "conv"))
            else:
                slots.append(_Slot(layer.kernel, f"{bit}/proj/{_CONV}",
                                   f"{timm}.downsample.conv.weight", "conv"))
    if not any(slot.bit.startswith("root_block") for slot in slots):
        raise ValueError(
            f"Model {model.name!r} is not a BiT ResNetV2 built by `bit_resnet` "
            "(no layer named 'root_conv')."
        )
    return [dataclasses.replace(s, bit=_BIT_PREFIX + s.bit) for s in slots]


def _to_file_layout(value: np.ndarray, slot: _Slot, fmt: str) -> np.ndarray:
    """Keras layout -> file layout (`fmt` is "bit" or "timm")."""
    if slot.kind == "head_kernel":
        value = value.reshape((1, 1) + value.shape)  # Dense (C, N) -> 1x1 conv
    if fmt == "timm" and value.ndim == 4:
        value = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    return value


def _from_file_layout(array: np.ndarray, slot: _Slot, fmt: str) -> np.ndarray:
    """File layout -> Keras layout; the inverse of `_to_file_layout`."""
    if fmt == "timm" and array.ndim == 4:
        array = array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if slot.kind == "head_kernel":
        array = array.reshape(array.shape[2:])
    return array


def _expected_shape(slot: _Slot, fmt: str) -> tuple[int, ...]:
    zeros = np.zeros(tuple(slot.variable.shape), dtype=np.uint8)
    return tuple(_to_file_layout(zeros, slot, fmt).shape)


def _unreadable(path: str | os.PathLike, kind: str, error: BaseException) -> ValueError:
    """The error for a checkpoint that exists but cannot be parsed."""
    size = os.path.getsize(path)
    return ValueError(
        f"{os.fspath(path)!r} ({size} bytes) is not a readable {kind} file: it is "
        f"probably truncated or corrupt (an interrupted download or copy?). Download "
        f"or copy it again. ({type(error).__name__}: {error})"
    )


def _read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads every array of an `.npz`, refusing pickled (object) arrays."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"Checkpoint not found: {os.fspath(path)!r}")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError(f"{os.fspath(path)!r} is a single array, not an .npz.")
        with data:
            return {key: data[key] for key in data.files}
    except ValueError as error:
        if "pickle" not in str(error):
            raise
        raise ValueError(
            f"Refusing to load {os.fspath(path)!r}: it contains pickled (object) "
            "arrays, which can run arbitrary code. Re-save it with plain numeric "
            f"arrays. ({error})"
        ) from error
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        raise _unreadable(path, ".npz", error) from error


def _read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads every tensor of a `.safetensors` file (no code runs: plain tensors)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"Checkpoint not found: {os.fspath(path)!r}")
    from safetensors.numpy import load_file

    try:
        return load_file(os.fspath(path))
    except Exception as error:  # safetensors raises its own SafetensorError
        raise _unreadable(path, ".safetensors", error) from error


def _num_classes(shape: tuple[int, ...], fmt: str) -> int | None:
    """The class count of a head kernel of `shape` in the file layout of `fmt`."""
    if len(shape) != 4:
        return None
    return shape[0] if fmt == "timm" else shape[-1]  # OIHW / HWIO


def _head_wanted(head: bool | str, new_head: bool | str, slots: list[_Slot],
                 arrays: dict, fmt: str, model: keras.Model, source: str) -> bool:
    if head not in ("auto", True, False):
        raise ValueError(f"head must be 'auto', True or False. Received: head={head!r}")
    if not (new_head is True or new_head is False or new_head == "if_needed"):
        raise ValueError("new_head must be False, True or 'if_needed'. "
                         f"Received: new_head={new_head!r}")
    if new_head and head is True:
        raise ValueError("head=True loads the checkpoint's head and new_head starts "
                         "a new one: pass one of them.")
    kernel = next(s for s in slots if s.kind == "head_kernel")
    expected = _expected_shape(kernel, fmt)
    classes = _num_classes(expected, fmt)
    found = arrays.get(getattr(kernel, fmt))
    fits = found is not None and found.shape == expected
    if new_head is True or head is False or (new_head == "if_needed" and not fits):
        message = (
            f"Not loading the classifier head of {source!r}: model {model.name!r} "
            f"keeps its zero-initialised {classes}-class head, so it predicts nothing "
            "until it is trained with labels. Train it before using it as a teacher "
            "(`funmatch train-teacher`, or `--config.teacher_epochs`)."
        )
        logger.warning(message)
        warnings.warn(message, UserWarning, stacklevel=4)
        return False
    if head is True or fits:
        return True
    found_text = ("has no classifier head" if found is None else
                  f"has a {_num_classes(found.shape, fmt)}-class head "
                  f"({getattr(kernel, fmt)} {tuple(found.shape)})")
    raise ValueError(
        f"{source!r} {found_text} but model {model.name!r} has {classes} classes "
        f"(expected {getattr(kernel, fmt)} {expected}). To use it as a teacher, pass "
        f"weights fine-tuned on your {classes} classes (or build the model with the "
        "checkpoint's class count). To start a new head from this backbone and "
        "train it with labels, pass new_head=True (`funmatch train-teacher`)."
    )


def _load(model: keras.Model, arrays: dict[str, np.ndarray], fmt: str,
          head: bool | str, source: str, new_head: bool | str = False) -> None:
    slots = _name_map(model)
    load_head = _head_wanted(head, new_head, slots, arrays, fmt, model, source)
    wanted = [s for s in slots if load_head or s.kind not in _HEAD_KINDS]
    problems = []
    for slot in wanted:
        name, expected = getattr(slot, fmt), _expected_shape(slot, fmt)
        if name not in arrays:
            problems.append(f"{name}: expected {expected}, missing")
        elif arrays[name].shape != expected:
            problems.append(f"{name}: expected {expected}, found {arrays[name].shape}")
    if problems:
        raise ValueError(
            f"{len(problems)} tensor(s) of {source!r} missing or mis-shaped for "
            f"model {model.name!r}: " + "; ".join(problems[:_MAX_LISTED])
            + (" ..." if len(problems) > _MAX_LISTED else "")
        )
    for slot in wanted:
        value = _from_file_layout(arrays[getattr(slot, fmt)], slot, fmt)
        slot.variable.assign(value.astype(np.float32))
    known = {getattr(slot, fmt) for slot in slots}
    unused = sorted(set(arrays) - known)
    if unused:
        warnings.warn(
            f"{len(unused)} tensor(s) in {source!r} were not used, e.g. "
            f"{unused[:_MAX_LISTED]}",
            stacklevel=3,
        )


def load_bit_npz(model: keras.Model, path: str | os.PathLike,
                 head: bool | str = "auto", new_head: bool | str = False) -> keras.Model:
    """Loads an official BiT `.npz` checkpoint (HWIO kernels) into `model`.

    Args:
        model: keras.Model. Built by `bit_resnet` (or a named constructor).
        path: str or PathLike. The `.npz` file, e.g. `BiT-M-R50x1.npz`.
        head: "auto", True or False. Whether to load `resnet/head/conv2d/*`:
            "auto" and True load it and raise if its class count differs from
            the model's (a head that does not fit is never silently dropped);
            False is `new_head=True`. Defaults to `"auto"`.
        new_head: False, True or "if_needed". True: load the backbone only and
            keep the model's zero-initialised head, to fine-tune it with labels
            (from a checkpoint of another class count, e.g. the 21,843-class
            BiT-M); "if_needed": the same unless the checkpoint's head fits (for
            fine-tuning code that takes either). Warns loudly when the head is
            new: such a model must be trained before it can teach. Defaults to
            `False`.

    Returns:
        The same `model`, with its weights assigned in place.

    Raises:
        FileNotFoundError: if `path` does not exist.
        ValueError: on pickled arrays, a truncated or corrupt file, a head of
            another class count (unless `new_head=True`), or missing /
            mis-shaped tensors (nothing is assigned then). Unused tensors only
            produce a warning.

    Example (a round trip through `save_bit_npz`):
        >>> import tempfile
        >>> from funmatch_keras.models import bit_r50x1
        >>> model = bit_r50x1(num_classes=10)
        >>> weights = model.get_weights()
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     save_bit_npz(model, os.path.join(tmp, "r50x1.npz"))
        ...     model.set_weights([np.zeros_like(w) for w in weights])
        ...     loaded = load_bit_npz(model, os.path.join(tmp, "r50x1.npz"))
        >>> loaded is model
        True
        >>> all(np.array_equal(a, b) for a, b in zip(weights, model.get_weights()))
        True

        A head of another class count is an error, unless a new head is asked
        for (the model must then be trained with labels before it can teach):

        >>> other = bit_r50x1(num_classes=3)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     save_bit_npz(model, os.path.join(tmp, "r50x1.npz"))
        ...     try:
        ...         load_bit_npz(other, os.path.join(tmp, "r50x1.npz"))
        ...     except ValueError as error:
        ...         print(str(error)[str(error).index("has a"):].split(" but")[0])
        ...     with warnings.catch_warnings():
        ...         warnings.simplefilter("ignore")
        ...         _ = load_bit_npz(other, os.path.join(tmp, "r50x1.npz"), new_head=True)
        has a 10-class head (resnet/head/conv2d/kernel (1, 1, 2048, 10))
        >>> head = keras.ops.convert_to_numpy(other.get_layer("head_logits").kernel)
        >>> float(np.abs(head).max())
        0.0
    """
    arrays = _read_npz(path)
    _load(model, arrays, "bit", head, os.fspath(path), new_head)
    return model


def save_bit_npz(model: keras.Model, path: str | os.PathLike) -> None:
    """Saves `model`'s weights as a BiT `.npz` (official names, HWIO, float32).

    Args:
        model: keras.Model. Built by `bit_resnet` (or a named constructor).
        path: str or PathLike. Destination; NumPy appends `.npz` if missing.

    Example:
        >>> import tempfile
        >>> from funmatch_keras.models import bit_r50x1
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     save_bit_npz(bit_r50x1(10, image_size=64), os.path.join(tmp, "r50x1"))
        ...     with np.load(os.path.join(tmp, "r50x1.npz")) as npz:
        ...         print(len(npz.files), npz["resnet/head/conv2d/kernel"].shape)
        153 (1, 1, 2048, 10)
    """
    arrays = {
        slot.bit: _to_file_layout(
            np.asarray(keras.ops.convert_to_numpy(slot.variable), np.float32), slot,
            "bit",
        )
        for slot in _name_map(model)
    }
    np.savez(path, **arrays)


def load_timm_bit(model: keras.Model, path: str | os.PathLike,
                  head: bool | str = "auto", new_head: bool | str = False) -> keras.Model:
    """Loads timm `resnetv2_*_bit` weights (`.safetensors` or state-dict `.npz`).

    timm names: `stem.conv.weight`, `stages.{i}.blocks.{j}.norm{1,2,3}.*`,
    `stages.{i}.blocks.{j}.conv{1,2,3}.weight`,
    `stages.{i}.blocks.{j}.downsample.conv.weight`, `norm.*`, `head.fc.*`
    (a 1x1 conv). PyTorch OIHW kernels are transposed to HWIO.

    Args:
        model: keras.Model. Built by `bit_resnet` (or a named constructor).
        path: str or PathLike. A `.safetensors` file (read with
            `safetensors.numpy`) or an `.npz` of the state dict.
        head: "auto", True or False. As in `load_bit_npz`. Defaults to "auto".
        new_head: False, True or "if_needed". As in `load_bit_npz`: keep a
            zero head to train. Defaults to `False`.

    Returns:
        The same `model`, with its weights assigned in place.

    Raises:
        FileNotFoundError: if `path` does not exist.
        ValueError: on pickled arrays, a truncated or corrupt file, a head of
            another class count (unless `new_head=True`), or missing /
            mis-shaped tensors.

    Example (a downloaded timm checkpoint):
        >>> from funmatch_keras.models import bit_r152x2
        >>> model = bit_r152x2(num_classes=1000, image_size=224)  # doctest: +SKIP
        >>> path = "resnetv2_152x2_bit/model.safetensors"
        >>> load_timm_bit(model, path)  # doctest: +SKIP

        A runnable round trip: write `model`'s weights as a timm state dict
        (timm names, OIHW kernels), zero the model, and load them back:

        >>> import tempfile
        >>> from funmatch_keras.models import bit_r50x1
        >>> model = bit_r50x1(num_classes=10)
        >>> weights = model.get_weights()
        >>> state = {s.timm: _to_file_layout(keras.ops.convert_to_numpy(s.variable),
        ...                                  s, "timm") for s in _name_map(model)}
        >>> state["stem.conv.weight"].shape  # Keras holds it as (7, 7, 3, 64)
        (64, 3, 7, 7)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     np.savez(os.path.join(tmp, "model.npz"), **state)
        ...     model.set_weights([np.zeros_like(w) for w in weights])
        ...     loaded = load_timm_bit(model, os.path.join(tmp, "model.npz"))
        >>> all(np.array_equal(a, b) for a, b in zip(weights, loaded.get_weights()))
        True
    """
    if os.fspath(path).endswith(".safetensors"):
        arrays = _read_safetensors(path)
    else:
        arrays = _read_npz(path)
    _load(model, arrays, "timm", head, os.fspath(path), new_head)
    return model
