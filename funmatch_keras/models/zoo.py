"""Models by name: `build(spec, num_classes, image_size)`.

A spec is a BiT name (`"bit_r50x1"`), a Keras application
(`"keras:MobileNetV2"`), a `.keras` file, or a SavedModel directory (teachers
only: it is wrapped, not trainable).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import keras

from funmatch_keras.models import bit
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


def _keras_application(name: str, num_classes: int, image_size: int,
                       dtype: Any) -> keras.Model:
    constructor = getattr(keras.applications, name, None)
    if not callable(constructor) or not name[:1].isupper():
        raise ValueError(
            f"Unknown Keras application {name!r}; expected a constructor of "
            f"keras.applications such as 'MobileNetV2'. Received: spec='keras:{name}'"
        )
    model = constructor(
        weights=None, classifier_activation=None, classes=num_classes,
        input_shape=(image_size, image_size, 3),
    )
    if dtype is None:
        return model

    # keras.applications take no dtype: rebuild the graph with the policy on
    # every layer (instead of touching the global policy), logits in float32.
    def with_policy(layer: keras.layers.Layer) -> keras.layers.Layer:
        config = layer.get_config()
        if not isinstance(layer, keras.layers.InputLayer):
            config["dtype"] = dtype
        return layer.__class__.from_config(config)

    clone = keras.models.clone_model(model, clone_function=with_policy)
    clone.set_weights(model.get_weights())
    logits = keras.layers.Activation("linear", dtype="float32", name="logits")(
        clone.output
    )
    return keras.Model(clone.input, logits, name=model.name)


def _num_outputs(model: keras.Model) -> int | None:
    return model.outputs[0].shape[-1] if len(model.outputs) == 1 else None


def _keras_file(path: str, num_classes: int) -> keras.Model:
    model = keras.saving.load_model(path, safe_mode=True)
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
          dtype: Any = None) -> keras.Model:
    """Builds or loads a classifier from a spec.

    Args:
        spec: str. One of:
            - a BiT name: `"bit_r50x1"`, `"bit_r50x3"`, `"bit_r101x1"`,
              `"bit_r101x3"`, `"bit_r152x2"`, `"bit_r152x4"`;
            - `"keras:<Application>"`, e.g. `"keras:MobileNetV2"`, built with
              random weights and a logits (no softmax) head;
            - `"cnn:<widths>"`, e.g. `"cnn:16,32,64"`: a small plain CNN
              (`models.cnn.small_cnn`) for quick offline runs;
            - a path to a `.keras` file (loaded with `safe_mode=True`);
            - a path to a SavedModel directory, wrapped with
              `keras.layers.TFSMLayer` (inference only, for teachers).
        num_classes: int. Number of logits; checked for loaded models.
        image_size: int. Square input size in pixels.
        dtype: str or None. Layer dtype policy (e.g. `"mixed_bfloat16"`) for
            BiT and Keras applications; ignored for files. Defaults to `None`.

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
        "'cnn:16,32,64'), a .keras file or a "
        "SavedModel directory."
    )
