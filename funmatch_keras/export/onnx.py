"""ONNX export through Keras's `model.export(format="onnx")`, checked for ops it left unconverted.

Two files, as the SavedModel has two signatures:

- `student.onnx`: float32 images `[N, S, S, 3]` in [-1, 1] → `logits`
  (`serving_default`);
- `student_images.onnx`: uint8 images `[N, H, W, 3]` of any size → `logits`,
  with the evaluation preprocessing (`augment.eval_preprocess`: resize of the
  short side, central crop, value range) inside the graph (`serve_images`).

Keras converts with tf2onnx. For an op it cannot convert, tf2onnx logs an error
and leaves the TensorFlow op in the graph, which then fails only when
onnxruntime loads it; `to_onnx` finds such ops and raises `OnnxExportError`
naming them, and `export.export_all` reports the format as failed while the
other formats still export. Needs the `[onnx]` extra (tf2onnx, onnx, onnxruntime).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import keras
import numpy as np
import tensorflow as tf

from funmatch_keras.data import augment
from funmatch_keras.export.artifacts import (
    ExportError,
    atomic_output,
    check_writable,
    static_image_size,
)
from funmatch_keras.export.verify import INPUT_NAME, verify

OUTPUT_NAME = "logits"
IMAGES_SUFFIX = "_images"
_PACKAGES = ("tf2onnx", "onnx", "onnxruntime")
# The ONNX operator domains whose schemas `onnx.defs` knows.
_ONNX_DOMAINS = ("", "ai.onnx")


class OnnxExportError(ExportError):
    """An ONNX conversion failed; `ops` are the TensorFlow ops it could not convert."""

    def __init__(self, message: str, ops: Sequence[str] = (), summary: str | None = None):
        super().__init__(message)
        self.ops = list(ops)
        self.summary = summary or message.splitlines()[0]


def require() -> None:
    """Raises an `ImportError` naming the `[onnx]` extra if a package of it is missing.

    Example:
    >>> require()  # installed here
    """
    missing = [name for name in _PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"ONNX export needs {', '.join(missing)}: install the extra, pip install "
            '"funmatch-keras[onnx]" (tf2onnx, onnx, onnxruntime), or leave onnx out of '
            "--formats.")


def images_path(path: str | os.PathLike) -> Path:
    """Where `to_onnx` writes the uint8-input graph beside `path`.

    Example:
    >>> images_path("export/student.onnx").as_posix()
    'export/student_images.onnx'
    """
    path = Path(path)
    return path.with_name(path.stem + IMAGES_SUFFIX + path.suffix)


class _ServeImages(keras.Model):
    """uint8 images of any size → eval preprocessing → the student (export only)."""

    def __init__(self, student: keras.Model, size: int, **kwargs):
        super().__init__(**kwargs)
        self.student = student
        self.size = size

    def call(self, images):
        return self.student(augment.eval_preprocess(images, self.size), training=False)


def to_onnx(model: keras.Model, path: str | os.PathLike, overwrite: bool = False,
            image_size: int | None = None, serve_images: bool = True) -> Path:
    """Exports `model` with `model.export(format="onnx")` and checks every op converted.

    Args:
        model: keras.Model. The student (float32), images to logits.
        path: str. Destination `.onnx` file.
        overwrite: bool. Replace existing files. Defaults to `False`.
        image_size: int. The input size S when the model's is not static.
            Defaults to `None` (read from the model).
        serve_images: bool. Also write `images_path(path)`, taking uint8
            images of any size. Defaults to `True`.

    Returns:
        The `Path` written. Nothing is written if a conversion fails.

    Raises:
        OnnxExportError: an op could not be converted (named in the message
            and in `.ops`), or the converter failed.
        ImportError: the `[onnx]` extra is missing.

    Example:
    >>> import onnxruntime
    >>> from funmatch_keras.models import small_cnn
    >>> student = small_cnn([8], num_classes=3, image_size=16)
    >>> path = to_onnx(student, os.path.join(tempfile.mkdtemp(), "student.onnx"))
    >>> session = onnxruntime.InferenceSession(str(path))
    >>> [(i.name, i.type) for i in session.get_inputs()], session.get_outputs()[0].name
    ([('images', 'tensor(float)')], 'logits')
    >>> images = onnxruntime.InferenceSession(str(images_path(path)))
    >>> images.run(None, {"images": np.zeros((2, 40, 30, 3), np.uint8)})[0].shape
    (2, 3)
    """
    require()
    size = image_size or static_image_size(model)
    if size is None:
        raise ValueError("Cannot read a static square image size from the model's input "
                         "shape; pass `image_size=`.")
    path = Path(path)
    targets = [path] + ([images_path(path)] if serve_images else [])
    for target in targets:
        check_writable(target, overwrite)
    # A model loaded from .keras must have been called before Keras exports it.
    model(np.zeros((1, size, size, 3), np.float32), training=False)
    with tempfile.TemporaryDirectory(prefix="funmatch_onnx_") as tmp:
        converted = [Path(tmp) / "student.onnx"]
        _convert(model, converted[0], tf.TensorSpec([None, size, size, 3], tf.float32,
                                                    INPUT_NAME))
        if serve_images:
            wrapper = _ServeImages(model, size, name="serve_images")
            wrapper(tf.zeros([1, size, size, 3], tf.uint8))
            converted.append(Path(tmp) / "student_images.onnx")
            _convert(wrapper, converted[1], tf.TensorSpec([None, None, None, 3], tf.uint8,
                                                          INPUT_NAME))
        for source, target in zip(converted, targets):  # both converted: move them in
            with atomic_output(target, overwrite) as out:
                shutil.copyfile(source, out)
    return path


def _convert(model: keras.Model, path: Path, spec: tf.TensorSpec) -> None:
    import onnx

    try:
        model.export(str(path), format="onnx", verbose=False, input_signature=[spec])
    except Exception as error:  # tf2onnx raises many kinds
        first = (str(error).splitlines() or [""])[0]
        raise OnnxExportError(f"ONNX conversion failed ({type(error).__name__}: {first}).",
                              summary=f"converter error: {type(error).__name__}") from error
    graph = onnx.load(str(path))
    unconverted = sorted({node.op_type for node in graph.graph.node
                          if node.domain in _ONNX_DOMAINS
                          and not onnx.defs.has(node.op_type, node.domain)})
    if unconverted:
        names = ", ".join(unconverted)
        import tf2onnx

        raise OnnxExportError(
            f"ONNX conversion (tf2onnx {tf2onnx.__version__}) failed: TensorFlow ops with "
            f"no ONNX conversion: {names}. Replace them in the model (the other formats "
            "are not affected).", ops=unconverted, summary=f"unsupported ops: {names}")
    _name_output(graph, OUTPUT_NAME)
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))


def _name_output(graph, name: str) -> None:
    """Renames the graph's one output (tf2onnx calls it `Identity:0`) to `name`."""
    old = graph.graph.output[0].name
    for node in graph.graph.node:
        for i, output in enumerate(node.output):
            if output == old:
                node.output[i] = name
    graph.graph.output[0].name = name


def export_and_verify(model: keras.Model, path: str | os.PathLike, eval_images: Any,
                      overwrite: bool = False, image_size: int | None = None) -> dict:
    """`to_onnx`, then the parity check of `verify` on onnxruntime (one report row).

    Returns:
        `{"path", **verify(...), "serve_images": {"path", "size_bytes",
        "max_abs_logit_diff"}}`: the uint8 graph against the student on the
        same images through `augment.eval_preprocess`.

    Raises:
        OnnxExportError: the conversion failed, or onnxruntime cannot load it.
    """
    size = image_size or static_image_size(model)
    path = to_onnx(model, path, overwrite, size)
    try:
        result = {"path": str(path), **verify(path, model, eval_images)}
    except Exception as error:  # onnxruntime refuses the graph
        for written in (path, images_path(path)):
            written.unlink(missing_ok=True)
        raise OnnxExportError(f"onnxruntime cannot run {path.name}: {error}",
                              summary=f"onnxruntime: {str(error).splitlines()[0]}") from error
    served = images_path(path)
    result["serve_images"] = {"path": str(served), "size_bytes": served.stat().st_size,
                              "max_abs_logit_diff": serve_images_difference(served, model,
                                                                            size)}
    return result


def serve_images_difference(path: str | os.PathLike, model: keras.Model, size: int) -> float:
    """Largest |logit difference| of the uint8 graph vs the student on eval-preprocessed
    random images of two shapes (one wider, one taller than S)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    worst = 0.0
    for shape in [(2, size + 24, size + 7, 3), (1, size, 2 * size, 3)]:
        images = rng.integers(0, 256, shape, dtype=np.uint8)
        expected = keras.ops.convert_to_numpy(
            model(augment.eval_preprocess(tf.constant(images), size), training=False))
        (actual,) = session.run([OUTPUT_NAME], {INPUT_NAME: images})
        worst = max(worst, float(np.max(np.abs(actual - expected))))
    return worst
