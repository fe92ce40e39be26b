"""Models by name: `build(spec, num_classes, image_size)` and `list_models()`.

A spec is a BiT name (`"bit_r50x1"`), a Keras application
(`"keras:MobileNetV2"`), a small CNN (`"cnn:16,32,64"`), a keras-hub preset
(`"keras_hub:<preset>"`, `models.hub`), a `.keras` file, or a SavedModel
directory (teachers only: it is wrapped, not trainable).
"""

from __future__ import annotations

import os
import zipfile
from typing import Any, Callable

import keras

from funmatch_keras.models import bit, hub
from funmatch_keras.models.cnn import small_cnn

BIT_MODELS: dict[str, Callable[..., keras.Model]] = {
    "bit_r50x1": bit.bit_r50x1,
    "bit_r50x3": bit.bit_r50x3,
    "bit_r101x1": bit.bit_r101x1,
    "bit_r101x3": bit.bit_r101x3,
    "bit_r152x2": bit.bit_r152x2,
    "bit_r152x4": bit.bit_r152x4,
}
_KERAS_PREFIX = "keras:"
_CNN_PREFIX = "cnn:"
# `cnn:<widths>` takes any widths; `list_models` names it by the digits student's.
_CNN_EXAMPLE = "cnn:16,32,64"


def keras_applications() -> list[str]:
    """The constructors of `keras.applications` that `"keras:<name>"` builds.

    Example:
    >>> "MobileNetV2" in keras_applications()
    True
    """
    return sorted(name for name in dir(keras.applications)
                  if name[:1].isupper() and callable(getattr(keras.applications, name)))


def list_models(kind: str | None = None) -> list[str]:
    """The model specs `build` knows by name (files and SavedModels aside).

    Args:
        kind: str or None. `"bit"`, `"keras"` or `"cnn"` for one family.
            Defaults to all.

    Returns:
        list of str: the BiT names, `"keras:<Application>"` for every Keras
        application, and `"cnn:16,32,64"` for the small CNN (which takes any
        widths).

    Example:
    >>> list_models("bit")
    ['bit_r50x1', 'bit_r50x3', 'bit_r101x1', 'bit_r101x3', 'bit_r152x2', 'bit_r152x4']
    >>> "keras:MobileNetV2" in list_models()
    True
    """
    families = {
        "bit": list(BIT_MODELS),
        "keras": [_KERAS_PREFIX + name for name in keras_applications()],
        "cnn": [_CNN_EXAMPLE],
    }
    if kind is None:
        return [spec for specs in families.values() for spec in specs]
    if kind not in families:
        raise ValueError(f"Unknown model kind. Expected one of {sorted(families)}. "
                         f"Received: kind={kind!r}")
    return families[kind]


def _keras_application(name: str, num_classes: int, image_size: int,
                       dtype: Any) -> keras.Model:
    constructor = getattr(keras.applications, name, None)
    if not callable(constructor) or not name[:1].isupper():
        raise ValueError(
            f"Unknown Keras application {name!r}; expected a constructor of "
            f"keras.applications such as 'MobileNetV2'. Received: spec='keras:{name}'"
        )
    # keras.applications take no dtype: build under the policy (restored after;
    # Keras keeps it per thread), so that every layer gets it, including those
    # of nested models (ConvNeXt's stem) that a clone_model pass would miss.
    previous = keras.config.dtype_policy()
    if dtype is not None:
        keras.config.set_dtype_policy(dtype)
    try:
        model = constructor(
            weights=None, classifier_activation=None, classes=num_classes,
            input_shape=(image_size, image_size, 3),
        )
    finally:
        keras.config.set_dtype_policy(previous)
    if dtype is None:
        return model
    # Logits in float32 whatever the compute dtype (docs/design.md §4.2). MobileNetV3
    # already has a layer named "logits".
    taken = {layer.name for layer in model.layers}
    name = "logits" if "logits" not in taken else "logits_float32"
    logits = keras.layers.Activation("linear", dtype="float32", name=name)(model.output)
    return keras.Model(model.input, logits, name=model.name)


def _num_outputs(model: keras.Model) -> int | None:
    return model.outputs[0].shape[-1] if len(model.outputs) == 1 else None


def load_keras_file(path: str | os.PathLike) -> keras.Model:
    """Loads a `.keras` file with `safe_mode=True`, saying clearly why one cannot be.

    Keras reports a truncated or corrupt `.keras` file (a zip archive) as "File
    not found"; this says what is wrong with it and how to fix it.

    Args:
        path: str or PathLike. A `.keras` file written by `model.save`.

    Returns:
        The loaded `keras.Model` (the package's layers are registered).

    Raises:
        FileNotFoundError: nothing is at `path`.
        ValueError: the file is truncated or corrupt, or not a `.keras` file.

    Example:
    >>> import tempfile
    >>> from funmatch_keras.models import small_cnn
    >>> path = os.path.join(tempfile.mkdtemp(), "m.keras")
    >>> small_cnn([4], num_classes=3, image_size=16).save(path)
    >>> load_keras_file(path).output_shape
    (None, 3)
    >>> with open(path, "r+b") as f:
    ...     _ = f.truncate(os.path.getsize(path) // 2)
    >>> try:
    ...     load_keras_file(path)
    ... except ValueError as error:
    ...     print(str(error).split(": ")[1].split(". ")[0])
    it is truncated or corrupt (not a complete zip archive)
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No .keras file at {path!r}.")
    if not path.endswith(".keras"):
        raise ValueError(f"{path!r} is not a .keras file (the name must end in "
                         "'.keras', as `model.save` writes it).")
    corrupt = (f"{path!r} ({os.path.getsize(path)} bytes) cannot be loaded: it is "
               "truncated or corrupt")
    fix = ("Save or copy it again (a .keras file is the zip archive `model.save` "
           "writes; an interrupted copy or save leaves it incomplete).")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{corrupt} (not a complete zip archive). {fix}")
    try:
        # compile=False: an optimizer the file may hold is training state, not the model.
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except (zipfile.BadZipFile, EOFError) as error:
        raise ValueError(f"{corrupt} ({type(error).__name__}: {error}). {fix}") from error
    except Exception:
        _check_keras_hub_importable(path)  # a keras-hub model needs the [hub] extra
        raise


def save_keras_file(model: keras.Model, path: str | os.PathLike) -> None:
    """Saves `model` to a `.keras` file for inference: architecture and weights only.

    A compiled model's optimizer (a schedule, Adam's moments, Shampoo's statistics)
    is training state: it would triple the file of a BiT student, and a file that
    names it needs the optimizer's classes to load. Resumable training state lives
    in checkpoints instead.

    Example:
    >>> import tempfile
    >>> from funmatch_keras.models import small_cnn
    >>> model = small_cnn([4], num_classes=3, image_size=16)
    >>> model.compile(optimizer="adam", loss="mse")
    >>> path = os.path.join(tempfile.mkdtemp(), "m.keras")
    >>> save_keras_file(model, path)
    >>> with zipfile.ZipFile(path) as archive:
    ...     b"optimizer" in archive.read("config.json"), model.optimizer is not None
    (False, True)
    """
    optimizer, compiled = getattr(model, "optimizer", None), getattr(model, "compiled", False)
    model.optimizer, model.compiled = None, False  # Keras 3's save has no include_optimizer
    try:
        model.save(os.fspath(path))
    finally:
        model.optimizer, model.compiled = optimizer, compiled


def _check_keras_hub_importable(path: str) -> None:
    with zipfile.ZipFile(path) as archive:
        names_keras_hub = b'"keras_hub' in archive.read("config.json")
    if names_keras_hub:
        try:
            hub.import_keras_hub()
        except ImportError as error:
            raise ImportError(f"{path!r} holds a keras-hub model: {error}") from error


def _keras_file(path: str, num_classes: int) -> keras.Model:
    model = load_keras_file(path)
    if _num_outputs(model) != num_classes:
        raise ValueError(
            f"{path!r} outputs {[tuple(t.shape) for t in model.outputs]}, not "
            f"{num_classes} logits. Received: num_classes={num_classes}"
        )
    return model


def _saved_model(path: str, num_classes: int, image_size: int) -> keras.Model:
    layer = keras.layers.TFSMLayer(path, call_endpoint="serving_default",
                                   name="saved_model")
    inputs = keras.Input(shape=(image_size, image_size, 3), name="images")
    outputs = layer(inputs)
    if isinstance(outputs, dict):
        if "logits" in outputs:
            outputs = outputs["logits"]
        elif len(outputs) == 1:
            outputs = next(iter(outputs.values()))
        else:
            raise ValueError(
                f"SavedModel {path!r} returns several outputs {sorted(outputs)} and "
                "none is named 'logits'."
            )
    if outputs.shape[-1] not in (None, num_classes):
        raise ValueError(
            f"SavedModel {path!r} outputs {tuple(outputs.shape)}, not {num_classes} "
            f"logits. Received: num_classes={num_classes}"
        )
    model = keras.Model(inputs, outputs, name=os.path.basename(path.rstrip("/")))
    model.trainable = False
    return model


def _parse_widths(spec: str) -> list[int]:
    try:
        return [int(w) for w in spec[len(_CNN_PREFIX):].split(",")]
    except ValueError:
        raise ValueError(
            f"A cnn spec lists channel widths, e.g. 'cnn:16,32,64'. Received: spec={spec!r}"
        ) from None


def build(spec: str, num_classes: int, image_size: int,
          dtype: Any = None, new_head: bool = False) -> keras.Model:
    """Builds or loads a classifier from a spec.

    Args:
        spec: str. One of:
            - a BiT name: `"bit_r50x1"`, `"bit_r50x3"`, `"bit_r101x1"`,
              `"bit_r101x3"`, `"bit_r152x2"`, `"bit_r152x4"`;
            - `"keras:<Application>"`, e.g. `"keras:MobileNetV2"`, built with
              random weights and a logits (no softmax) head;
            - `"cnn:<widths>"`, e.g. `"cnn:16,32,64"`: a small plain CNN
              (`models.cnn.small_cnn`) for quick offline runs;
            - `"keras_hub:<preset>"`: a keras-hub `ImageClassifier` from a
              preset name, a `kaggle://` or `hf://` handle, or a local preset
              directory, with the preset's value range applied in the graph
              (`models.hub`; needs the `[hub]` extra). `":new_head"` at the
              end gives it a new head of `num_classes`;
            - a path to a `.keras` file (loaded with `safe_mode=True`);
            - a path to a SavedModel directory, wrapped with
              `keras.layers.TFSMLayer` (inference only, for teachers).
        num_classes: int. Number of logits; checked for loaded models.
        image_size: int. Square input size in pixels.
        dtype: str or None. Layer dtype policy (e.g. `"mixed_bfloat16"`) for
            BiT, Keras applications and keras-hub presets; ignored for files.
            Defaults to `None`.
        new_head: bool. keras-hub presets only: a new, random head when the
            preset's class count is not `num_classes` (students). Defaults to
            `False` (a different count is an error).

    Returns:
        A `keras.Model` from images `(batch, image_size, image_size, 3)` in
        [-1, 1] to logits `(batch, num_classes)`.

    Raises:
        ValueError: for an unknown spec or a class-count mismatch.
        FileNotFoundError: for a path that does not exist.

    Example:
        >>> student = build("bit_r50x1", num_classes=37, image_size=128)
        >>> small = build("keras:MobileNetV2", num_classes=37, image_size=128)
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"spec must be a non-empty string. Received: spec={spec!r}")
    if spec in BIT_MODELS:
        return BIT_MODELS[spec](num_classes, image_size=image_size, dtype=dtype)
    if spec.startswith(_CNN_PREFIX):
        return small_cnn(_parse_widths(spec), num_classes, image_size, dtype=dtype)
    if hub.is_hub_spec(spec):
        return hub.hub_classifier(spec, num_classes, image_size, dtype, new_head)
    if spec.startswith(_KERAS_PREFIX):
        return _keras_application(spec[len(_KERAS_PREFIX):], num_classes,
                                  image_size, dtype)
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "saved_model.pb")):
            raise ValueError(f"{spec!r} is a directory but not a SavedModel "
                             "(no saved_model.pb).")
        return _saved_model(path, num_classes, image_size)
    if os.path.isfile(path) and path.endswith(".keras"):
        return _keras_file(path, num_classes)
    if os.sep in spec or spec.endswith(".keras") or os.path.exists(path):
        raise FileNotFoundError(
            f"No .keras file or SavedModel directory at {spec!r}."
        )
    raise ValueError(
        f"Unknown model spec {spec!r}. Valid: {', '.join(BIT_MODELS)}, "
        "'keras:<Application>' (e.g. 'keras:MobileNetV2'), 'cnn:<widths>' (e.g. "
        "'cnn:16,32,64'), 'keras_hub:<preset>', a .keras file or a "
        "SavedModel directory."
    )
