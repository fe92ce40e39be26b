"""Run exported artifacts the way they will be deployed, compare them with Keras, report.

`verify` loads a `.keras` file, a SavedModel, a `.tflite` file (through
ai-edge-litert) or an `.onnx` file (through onnxruntime), runs it one image per
call and reports top-1 agreement, the largest logit difference and the latency
against the Keras model it came from. `funmatch_keras.export.formats` writes the
artifacts and calls `verify` on each; `format_report` renders the parity table.

Example (a tiny untrained student, converted to float32 TFLite):
>>> import tempfile
>>> from funmatch_keras.export.formats import to_tflite
>>> from funmatch_keras.models import small_cnn
>>> student = small_cnn([8, 16], num_classes=5, image_size=32)
>>> val_images = np.random.default_rng(0).uniform(-1, 1, (8, 32, 32, 3))
>>> path = os.path.join(tempfile.mkdtemp(), "student.tflite")
>>> path = to_tflite(student, path, "fp32")
>>> result = verify(path, student, val_images)
>>> result["kind"], result["num_images"], result["agreement"]
('tflite', 8, 1.0)
>>> result["max_abs_logit_diff"] < 1e-4, result["median_latency_ms"] > 0
(True, True)
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import keras
import numpy as np
import tensorflow as tf

ARTIFACT_KINDS = ("keras", "saved_model", "tflite", "onnx")
# The input name of the SavedModel's `serving_default` signature, and so of the
# TFLite signature converted from it; `export.to_saved_model` writes it.
INPUT_NAME = "images"


def verify(
    artifact_path: str | os.PathLike,
    reference_model: keras.Model,
    images: Any,
    kind: str | None = None,
) -> dict[str, Any]:
    """Runs an exported artifact one image at a time and compares it with Keras.

    Args:
        artifact_path: str. A `.keras` file, a SavedModel directory, a
            `.tflite` file or an `.onnx` file.
        reference_model: keras.Model. The model the artifact was made from.
        images: float images `[N, S, S, 3]` in [-1, 1] (array, tensor, dataset
            or iterable of batches).
        kind: str. `"keras"`, `"saved_model"`, `"tflite"` or `"onnx"`.
            Defaults to `None` (inferred from the path).

    Returns:
        dict with `agreement` (top-1 agreement with `reference_model`, a
        fraction), `max_abs_logit_diff`, `median_latency_ms` (per image, on this
        machine), `size_bytes`, `num_images` and `kind`.

    Example:
    >>> import tempfile
    >>> from funmatch_keras.export.formats import to_saved_model
    >>> from funmatch_keras.models import small_cnn
    >>> student = small_cnn([8], num_classes=3, image_size=16)
    >>> path = to_saved_model(student, os.path.join(tempfile.mkdtemp(), "saved_model"))
    >>> images = np.random.default_rng(0).uniform(-1, 1, (4, 16, 16, 3))
    >>> result = verify(path, student, images)
    >>> sorted(result)
    ['agreement', 'kind', 'max_abs_logit_diff', 'median_latency_ms', 'num_images',
     'size_bytes']
    >>> result["kind"], result["agreement"], result["max_abs_logit_diff"] < 1e-5
    ('saved_model', 1.0, True)
    """
    path = Path(artifact_path)
    kind = kind or _infer_kind(path)
    if kind not in _RUNNERS:
        raise ValueError(
            f"`kind` must be one of {ARTIFACT_KINDS}. Received: kind={kind!r}"
        )
    images = np.stack(list(iter_images(images)))
    predict = _RUNNERS[kind](path)
    predict(images[:1])  # warm-up: tracing, allocation
    logits, latencies = [], []
    for image in images:
        start = time.perf_counter()
        logits.append(predict(image[None]))
        latencies.append(time.perf_counter() - start)
    logits = np.concatenate(logits).astype(np.float32)
    expected = keras_logits(reference_model, images)
    return {
        "kind": kind,
        "num_images": int(len(images)),
        "agreement": float(np.mean(logits.argmax(-1) == expected.argmax(-1))),
        "max_abs_logit_diff": float(np.max(np.abs(logits - expected))),
        "median_latency_ms": 1000.0 * statistics.median(latencies),
        "size_bytes": _size_bytes(path),
    }


def keras_logits(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """The model's float32 logits on `images`, 64 at a time, on any backend."""
    chunks = [
        keras.ops.convert_to_numpy(model(images[i : i + 64], training=False))
        for i in range(0, len(images), 64)
    ]
    return np.concatenate(chunks).astype(np.float32)


# A runner loads an artifact and returns `predict(images[1, S, S, 3]) -> logits`.
Runner = Callable[[np.ndarray], np.ndarray]


def _keras_runner(path: Path) -> Runner:
    model = load_keras_model(path)
    # Compiled by the backend (tf.function, jax.jit): any backend loads a .keras file.
    return lambda x: np.asarray(model.predict_on_batch(np.asarray(x, np.float32)))


def _saved_model_runner(path: Path) -> Runner:
    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    return lambda x: serve(**{INPUT_NAME: tf.constant(x, tf.float32)})["logits"].numpy()


def _tflite_runner(path: Path) -> Runner:
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(path)).get_signature_runner("serving_default")
    [(input_name, input_details)] = runner.get_input_details().items()
    output_details = runner.get_output_details()["logits"]

    def predict(x: np.ndarray) -> np.ndarray:
        q = quantize(x, input_details)
        return dequantize(runner(**{input_name: q})["logits"], output_details)

    return predict


def _onnx_runner(path: Path) -> Runner:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    [input_name] = [i.name for i in session.get_inputs()]
    [output_name] = [o.name for o in session.get_outputs()]
    return lambda x: session.run([output_name], {input_name: np.asarray(x, np.float32)})[0]


_RUNNERS: dict[str, Callable[[Path], Runner]] = {
    "keras": _keras_runner,
    "saved_model": _saved_model_runner,
    "tflite": _tflite_runner,
    "onnx": _onnx_runner,
}


def quantize(x: np.ndarray, details: dict[str, Any]) -> np.ndarray:
    """Maps floats to a TFLite tensor's dtype: `round(x / scale) + zero_point`, clipped.

    A float tensor (scale 0) gets `x` unchanged, cast to its dtype.
    """
    dtype = np.dtype(details["dtype"])
    scale, zero_point = details["quantization"]
    if not np.issubdtype(dtype, np.integer) or scale == 0:
        return np.asarray(x, dtype)
    info = np.iinfo(dtype)
    q = np.round(np.asarray(x, np.float32) / scale) + zero_point
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, details: dict[str, Any]) -> np.ndarray:
    """Maps a TFLite tensor back to float32: `(q - zero_point) * scale`."""
    scale, zero_point = details["quantization"]
    if not np.issubdtype(np.dtype(details["dtype"]), np.integer) or scale == 0:
        return np.asarray(q, np.float32)
    return ((q.astype(np.float32) - zero_point) * scale).astype(np.float32)


def _infer_kind(path: Path) -> str:
    if path.suffix == ".keras":
        return "keras"
    if path.suffix == ".tflite":
        return "tflite"
    if path.suffix == ".onnx":
        return "onnx"
    if (path / "saved_model.pb").exists():
        return "saved_model"
    raise ValueError(
        f"Cannot tell the artifact kind of {path}: expected a `.keras`, `.tflite` or "
        f"`.onnx` file or a SavedModel directory; pass `kind=` explicitly."
    )


def load_keras_model(path: str | Path) -> keras.Model:
    """Loads a `.keras` file with `safe_mode`, the package's layers registered.

    Example (a model with the package's `StdConv2D` layer):
    >>> import tempfile
    >>> from funmatch_keras.models import StdConv2D
    >>> model = keras.Sequential([keras.Input((8, 8, 3)), StdConv2D(4, 3)])
    >>> path = os.path.join(tempfile.mkdtemp(), "student.keras")
    >>> model.save(path)
    >>> type(load_keras_model(path).layers[0]).__name__
    'StdConv2D'
    """
    # Loading with safe_mode needs the package's serializable layers (StdConv2D,
    # ...) registered, which happens when their modules are imported; a
    # truncated file gets a clear error there, not Keras's "File not found".
    from funmatch_keras.models import load_keras_file

    try:
        return load_keras_file(path)
    except ValueError as error:
        if "safe_mode=False" not in str(error):
            raise
        # Keras advises safe_mode=False, which no funmatch command (rightly) accepts.
        raise ValueError(lambda_message(repr(os.fspath(path)))) from error


def lambda_message(holder: str) -> str:
    """Why a model with a Python lambda cannot ship, and the fix (`holder`: what holds it)."""
    return (
        f"{holder} holds a Python lambda (e.g. `keras.layers.Lambda(lambda x: ...)`): its "
        ".keras file loads only with Keras's safe mode off, which no funmatch command does "
        "and no user of the file should have to. Replace the lambda with a named function "
        "decorated with "
        "`@keras.saving.register_keras_serializable()` (or a Layer subclass) in a module "
        "that is imported before loading, save the model again and rerun.")


def iter_images(data: Any, limit: int | None = None) -> Iterator[np.ndarray]:
    """Yields single float32 images `[S, S, 3]` from arrays, datasets or batches."""
    if isinstance(data, (np.ndarray, tf.Tensor)):
        data = [data]
    count = 0
    for batch in data:
        if isinstance(batch, (tuple, list)):  # (images, labels)
            batch = batch[0]
        batch = np.asarray(batch, np.float32)
        for image in batch if batch.ndim == 4 else batch[None]:
            if limit is not None and count >= limit:
                return
            count += 1
            yield image


def format_report(report: dict[str, Any]) -> str:
    """Renders an `export.export_all` report as a plain-text table (failed formats too).

    Example:
    >>> report = {"image_size": 128, "num_eval_images": 500, "artifacts": {
    ...     "tflite_int8": {"path": "student_int8.tflite", "size_bytes": 25700,
    ...                     "agreement": 0.995, "max_abs_logit_diff": 0.31,
    ...                     "median_latency_ms": 0.05},
    ...     "onnx": {"path": "student.onnx", "failed": "unsupported ops: Igamma"}}}
    >>> print(format_report(report))
    format              size  agreement  max|dlogit|  latency ms  path
    tflite_int8       25.1KB     99.50%      3.1e-01       0.050  student_int8.tflite
    onnx           FAILED: unsupported ops: Igamma
    (500 eval images at 128 px; latency per image on this CPU)
    """
    lines = [f"{'format':<15}{'size':>9}{'agreement':>11}{'max|dlogit|':>13}"
             f"{'latency ms':>12}  path"]
    for fmt, a in report["artifacts"].items():
        if "failed" in a:
            lines.append(f"{fmt:<15}FAILED: {a['failed']}")
            continue
        lines.append(
            f"{fmt:<15}{_human_size(a['size_bytes']):>9}{a['agreement']:>11.2%}"
            f"{a['max_abs_logit_diff']:>13.1e}{a['median_latency_ms']:>12.3f}"
            f"  {a['path']}"
        )
    n, size = report["num_eval_images"], report["image_size"]
    lines.append(f"({n} eval images at {size} px; latency per image on this CPU)")
    return "\n".join(lines)


def _human_size(n: int) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}GB"


def _size_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size
