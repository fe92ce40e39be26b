"""keras-hub image classifiers as teachers and students: `keras_hub:<preset>` specs.

A spec is `keras_hub:` followed by a keras-hub preset: a built-in name
(`"keras_hub:mobilenet_v3_small_100_imagenet"`), a Kaggle or Hugging Face handle
(`"keras_hub:hf://timm/resnet50.a1_in1k"`) or a local directory written by
`save_to_preset`. `:new_head` at the end gives the classifier a new, randomly
initialised head of the data's class count (a teacher re-headed this way is
trained with labels first; students always get one when the counts differ).

The pipeline feeds images in [-1, 1]; a preset expects what its image converter
is given, raw [0, 255] pixels, which the converter scales and offsets
(`x * scale + offset`, per channel: e.g. ImageNet mean/std). The built model
does exactly that in its graph, with the converter's own `scale` and `offset`,
so no value range is guessed. keras-hub is an optional extra
(`pip install "funmatch-keras[hub]"`), imported only when such a spec is built.
"""

from __future__ import annotations

import os
import re
from typing import Any

import keras

PREFIX = "keras_hub:"
NEW_HEAD = ":new_head"
_EXTRA_HINT = ('keras-hub is not installed: install the extra, pip install '
               '"funmatch-keras[hub]" (or pip install "keras-hub>=0.32").')


def is_hub_spec(spec: Any) -> bool:
    """Whether `spec` names a keras-hub preset.

    Example:
    >>> is_hub_spec("keras_hub:resnet_50_imagenet"), is_hub_spec("bit_r50x1")
    (True, False)
    """
    return isinstance(spec, str) and spec.startswith(PREFIX)


def parse_spec(spec: str) -> tuple[str, bool]:
    """`(preset, new_head)` of a `keras_hub:<preset>[:new_head]` spec.

    Example:
    >>> parse_spec("keras_hub:hf://timm/resnet50.a1_in1k:new_head")
    ('hf://timm/resnet50.a1_in1k', True)
    >>> parse_spec("keras_hub:/presets/teacher")
    ('/presets/teacher', False)
    """
    if not is_hub_spec(spec):
        raise ValueError(f"A keras-hub spec starts with {PREFIX!r}. Received: spec={spec!r}")
    preset = spec[len(PREFIX):]
    new_head = preset.endswith(NEW_HEAD)
    if new_head:
        preset = preset[: -len(NEW_HEAD)]
    if not preset:
        raise ValueError(
            "A keras-hub spec names a preset after 'keras_hub:', e.g. "
            "'keras_hub:mobilenet_v3_small_100_imagenet' or 'keras_hub:/path/to/preset'. "
            f"Received: spec={spec!r}")
    return os.path.expanduser(preset), new_head


def import_keras_hub():
    """`import keras_hub`, or an `ImportError` naming the `[hub]` extra."""
    try:
        import keras_hub
    except ImportError as error:
        raise ImportError(f"keras_hub: specs need keras-hub. {_EXTRA_HINT}") from error
    return keras_hub


def hub_classifier(spec: str, num_classes: int, image_size: int, dtype: Any = None,
                   new_head: bool = False) -> keras.Model:
    """A keras-hub `ImageClassifier` from a preset, taking [-1, 1] images, giving logits.

    Args:
        spec: str. `"keras_hub:<preset>"`, optionally ending in `":new_head"`.
        num_classes: int. The data's class count.
        image_size: int. Square input side (the pipeline resizes to it).
        dtype: str or None. Dtype policy of the classifier (`"mixed_bfloat16"`);
            the logits stay float32. Defaults to `None` (the preset's).
        new_head: bool. Replace the head when the preset's class count is not
            `num_classes` (students; `":new_head"` in the spec does the same).
            Defaults to `False`: a different count is an error.

    Returns:
        A `keras.Model` from `(batch, image_size, image_size, 3)` images in
        [-1, 1] to `(batch, num_classes)` float32 logits: `[0, 255]` pixels,
        then the preset converter's `x * scale + offset`, then the classifier.

    Raises:
        ImportError: keras-hub is not installed (names the `[hub]` extra).
        FileNotFoundError: a local preset directory that is missing or holds
            no `config.json`.
        ValueError: a preset that cannot be loaded (not downloaded, unknown),
            one without an image converter, or of another class count without
            a new head.

    Example (a tiny random-weight classifier saved as a local preset):
    >>> import tempfile, numpy as np, keras_hub
    >>> backbone = keras_hub.models.ResNetBackbone(
    ...     input_conv_filters=[64], input_conv_kernel_sizes=[3],
    ...     stackwise_num_filters=[64], stackwise_num_blocks=[1],
    ...     stackwise_num_strides=[1], block_type="basic_block")
    >>> converter = keras_hub.layers.ResNetImageConverter(image_size=(32, 32), scale=1 / 255)
    >>> preprocessor = keras_hub.models.ResNetImageClassifierPreprocessor(converter)
    >>> classifier = keras_hub.models.ResNetImageClassifier(
    ...     backbone=backbone, num_classes=4, preprocessor=preprocessor)
    >>> preset = os.path.join(tempfile.mkdtemp(), "preset")
    >>> classifier.save_to_preset(preset)
    >>> teacher = hub_classifier("keras_hub:" + preset, num_classes=4, image_size=32)
    >>> teacher.output_shape
    (None, 4)
    >>> student = hub_classifier("keras_hub:" + preset, num_classes=10, image_size=32,
    ...                          new_head=True)
    >>> student.output_shape
    (None, 10)
    """
    preset, spec_new_head = parse_spec(spec)
    new_head = bool(new_head) or spec_new_head
    keras_hub = import_keras_hub()
    classifier = _load(keras_hub, spec, preset, dtype)
    converter = getattr(classifier.preprocessor, "image_converter", None)
    if converter is None:
        raise ValueError(
            f"The keras-hub preset of {spec!r} has no image converter, so the value "
            "range it expects is unknown. Save the classifier with its preprocessor "
            "(an ImageClassifierPreprocessor with an ImageConverter giving scale and "
            "offset) before `save_to_preset`.")
    preset_classes = _num_classes(classifier)
    if preset_classes != num_classes:
        if not new_head:
            raise ValueError(
                f"The keras-hub preset of {spec!r} classifies {preset_classes} classes "
                f"but the data has {num_classes}. A teacher must be trained on the "
                f"data's classes: give it a new head with '{spec}{NEW_HEAD}' and "
                "train it with labels (--config.teacher_epochs, or `funmatch "
                "train-teacher`), or use a preset fine-tuned on this dataset. "
                f"Received: num_classes={num_classes}")
        classifier = _load(keras_hub, spec, preset, dtype, num_classes=num_classes)
    return _with_value_range(classifier, converter, image_size, dtype,
                             name=_model_name(preset))


def _load(keras_hub, spec: str, preset: str, dtype: Any, **kwargs) -> keras.Model:
    looks_local = os.path.isabs(preset) or preset.startswith(".") or (
        os.sep in preset and "://" not in preset)
    if looks_local or os.path.isdir(preset):
        if not os.path.isdir(preset):
            raise FileNotFoundError(
                f"No keras-hub preset directory at {preset!r} (spec {spec!r}). A local "
                "preset is a directory written by `classifier.save_to_preset(dir)`.")
        if not os.path.isfile(os.path.join(preset, "config.json")):
            raise FileNotFoundError(
                f"{preset!r} (spec {spec!r}) is not a keras-hub preset: it has no "
                "config.json. Write one with `classifier.save_to_preset(dir)`.")
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        return keras_hub.models.ImageClassifier.from_preset(preset, **kwargs)
    except Exception as error:  # kagglehub / huggingface_hub / unknown-preset errors
        raise ValueError(
            f"Cannot load the keras-hub preset of {spec!r} ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). Hub presets (names, "
            "kaggle:// and hf:// handles) need a download: run once where the network "
            "is reachable (keras-hub caches it, see KAGGLEHUB_CACHE / HF_HOME), or "
            "save it to a local directory with `save_to_preset(dir)` and pass "
            "'keras_hub:<dir>'. Nothing is downloaded where there is no network."
        ) from error


def _num_classes(classifier: keras.Model) -> int:
    count = getattr(classifier, "num_classes", None)
    return int(count) if count is not None else int(classifier.outputs[0].shape[-1])


def _with_value_range(classifier: keras.Model, converter, image_size: int, dtype: Any,
                      name: str) -> keras.Model:
    """[-1, 1] → [0, 255] → `x * scale + offset` of the preset's converter → logits."""
    inputs = keras.Input((image_size, image_size, 3), name="images")
    # What keras-hub's ImageConverter is fed: raw pixels in [0, 255].
    x = keras.layers.Rescaling(127.5, offset=127.5, name="pixels_0_255")(inputs)
    scale, offset = converter.scale, converter.offset
    if scale is not None or offset is not None:
        x = keras.layers.Rescaling(1.0 if scale is None else _plain(scale),
                                   offset=0.0 if offset is None else _plain(offset),
                                   name="preset_scale_offset")(x)
    logits = classifier(x)
    if dtype is not None:  # logits in float32 whatever the compute dtype (docs/design.md §4.2)
        logits = keras.layers.Activation("linear", dtype="float32",
                                         name="logits_float32")(logits)
    return keras.Model(inputs, logits, name=name)


def _plain(value: Any) -> float | list[float]:
    """A converter's scale or offset as a float or a list of floats (serializable)."""
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    try:
        return float(value)
    except TypeError:
        return [float(v) for v in keras.ops.convert_to_numpy(value).reshape(-1)]


def _model_name(preset: str) -> str:
    base = os.path.basename(preset.rstrip("/")) or preset
    return "keras_hub_" + (re.sub(r"\W+", "_", base).strip("_") or "preset")
