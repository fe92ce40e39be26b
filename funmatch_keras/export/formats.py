"""Write a student as .keras, SavedModel, TFLite and ONNX artifacts, each verified.

`export_all` writes every artifact into a staging folder and renames them into
place only when all of them exported, so a failed export leaves no partial one.
It checks each artifact with `funmatch_keras.export.verify.verify`, which runs it the
way it will be deployed. Under the JAX backend it converts through the
TensorFlow backend in a subprocess (the `.keras` file is backend-agnostic).
ONNX is `funmatch_keras.export.onnx` (the `[onnx]` extra); an ONNX export that
fails is a failed row of the report, and the other formats still export.
Plain arguments only: `funmatch export` (a workdir's student) is
`funmatch_keras.app.export`. The example of `export_all` shows the whole round.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

import keras
import numpy as np
import tensorflow as tf

from funmatch_keras.data import augment
from funmatch_keras.export.artifacts import (  # noqa: F401
    ExportError,
    atomic_output,
    check_writable,
    remove_path,
    static_image_size,
)
from funmatch_keras.export.verify import (  # noqa: F401
    INPUT_NAME,
    format_report,
    iter_images,
    keras_logits,
    lambda_message,
    load_keras_model,
    verify,
)
from funmatch_keras.models import save_keras_file

TFLITE_MODES = ("fp32", "fp16", "dynamic", "int8")
FORMATS = (("keras", "saved_model") + tuple(f"tflite_{m}" for m in TFLITE_MODES)
           + ("onnx",))
REPORT_NAME = "export_report.json"

_ARTIFACT_NAMES = {"keras": "student.keras", "saved_model": "saved_model",
                   **{f"tflite_{m}": f"student_{m}.tflite" for m in TFLITE_MODES},
                   "onnx": "student.onnx"}


def to_keras(model: keras.Model, path: str | os.PathLike,
             overwrite: bool = False) -> Path:
    """Saves `model` in the native Keras format.

    Args:
        model: keras.Model. The student.
        path: str. Destination, ending in `.keras`.
        overwrite: bool. Replace an existing file. Defaults to `False`.

    Returns:
        The `Path` written.

    Example:
    >>> from funmatch_keras.models import small_cnn
    >>> student = small_cnn([8], num_classes=3, image_size=16)
    >>> path = to_keras(student, os.path.join(tempfile.mkdtemp(), "student.keras"))
    >>> from funmatch_keras.export.verify import load_keras_model
    >>> path.name, load_keras_model(path).output_shape
    ('student.keras', (None, 3))
    >>> to_keras(student, path)
    Traceback (most recent call last):
    FileExistsError: ...student.keras already exists; pass --overwrite ...
    """
    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"The path must end in `.keras`. Received: path={path}")
    with atomic_output(path, overwrite) as tmp:
        save_keras_file(model, tmp)
    return path


def to_saved_model(model: keras.Model, path: str | os.PathLike, overwrite: bool = False,
                   image_size: int | None = None) -> Path:
    """Exports `model` as a SavedModel with two serving signatures.

    - `serving_default(images)`: float32 `[None, S, S, 3]`, already in [-1, 1].
    - `serve_images(images)`: uint8 `[None, None, None, 3]` of any size; applies
      the evaluation preprocessing (`augment.eval_preprocess`) in the graph.

    Both return `{"logits": ..., "probabilities": softmax(logits)}`.

    Args:
        model: keras.Model. The student, mapping `[B, S, S, 3]` images to logits.
        path: str. Destination directory.
        overwrite: bool. Replace an existing directory. Defaults to `False`.
        image_size: int. The student's input size S; only needed when the model's
            input shape is not static. Defaults to `None` (read from the model).

    Returns:
        The `Path` written.

    Example:
    >>> from funmatch_keras.models import small_cnn
    >>> student = small_cnn([8], num_classes=3, image_size=16)
    >>> path = to_saved_model(student, os.path.join(tempfile.mkdtemp(), "saved_model"))
    >>> sm = tf.saved_model.load(str(path))
    >>> sorted(sm.signatures)
    ['serve_images', 'serving_default']
    >>> out = sm.signatures["serve_images"](images=tf.zeros([1, 300, 200, 3], tf.uint8))
    >>> {name: tuple(value.shape) for name, value in sorted(out.items())}
    {'logits': (1, 3), 'probabilities': (1, 3)}
    """
    size = image_size or static_image_size(model)
    if size is None:
        shape = tuple(model.inputs[0].shape) if model.inputs else None
        raise ValueError(
            "Cannot read a static square image size from the model's input shape; "
            f"pass `image_size=`. Received: input shape {shape}")

    def serve(images: tf.Tensor) -> dict[str, tf.Tensor]:
        # Logits in float32 even for a mixed-precision student.
        logits = tf.cast(model(images, training=False), tf.float32)
        return {"logits": logits, "probabilities": tf.nn.softmax(logits, axis=-1)}

    def serve_images(images: tf.Tensor) -> dict[str, tf.Tensor]:
        return serve(augment.eval_preprocess(images, size))

    archive = keras.export.ExportArchive()
    # No `archive.track(model)`: it stores every weight a second time next to
    # the ones the endpoints capture (keras-team/keras#23553), doubling the
    # SavedModel on disk and in memory. The cost: the loaded object has no
    # `.variables` attribute, which serving does not use.
    float_spec = tf.TensorSpec([None, size, size, 3], tf.float32, INPUT_NAME)
    archive.add_endpoint("serving_default", serve, input_signature=[float_spec])
    uint8_spec = tf.TensorSpec([None, None, None, 3], tf.uint8, INPUT_NAME)
    archive.add_endpoint("serve_images", serve_images, input_signature=[uint8_spec])
    path = Path(path)
    with atomic_output(path, overwrite) as tmp:
        archive.write_out(str(tmp), verbose=False)
    return path


def to_tflite(model_or_saved_model_path: keras.Model | str | os.PathLike,
              path: str | os.PathLike, mode: str, representative_data: Any = None,
              num_calibration: int = 200, overwrite: bool = False) -> Path:
    """Converts the `serving_default` signature to TFLite (built-in ops only).

    Modes: `"fp32"`; `"fp16"` (float16 weights); `"dynamic"` (int8 weights,
    float activations); `"int8"` (full integer: int8 weights, activations,
    input and output, calibrated on `representative_data`).

    Args:
        model_or_saved_model_path: keras.Model, or the directory of a SavedModel
            written by `to_saved_model`. A model is exported to a temporary
            SavedModel first (it needs a static input size; otherwise call
            `to_saved_model(..., image_size=S)` and pass its directory).
        path: str. Destination `.tflite` file.
        mode: str. One of `"fp32"`, `"fp16"`, `"dynamic"`, `"int8"`.
        representative_data: `tf.data.Dataset`, array or iterable of float image
            batches in [-1, 1] (`(images, labels)` tuples are fine). Required
            for `"int8"`. Defaults to `None`.
        num_calibration: int. Images used for int8 calibration, fed one at a
            time. Defaults to `200`.
        overwrite: bool. Replace an existing file. Defaults to `False`.

    Returns:
        The `Path` written.

    Raises:
        ExportError: the converter failed; the message names the blocking ops.

    Example:
    >>> from funmatch_keras.models import small_cnn
    >>> student = small_cnn([8], num_classes=3, image_size=16)
    >>> out = tempfile.mkdtemp()
    >>> saved_model = to_saved_model(student, os.path.join(out, "saved_model"))
    >>> train_images = np.random.default_rng(0).uniform(-1, 1, (8, 16, 16, 3))
    >>> path = to_tflite(saved_model, os.path.join(out, "student_int8.tflite"), "int8",
    ...                  representative_data=train_images)
    >>> from ai_edge_litert.interpreter import Interpreter
    >>> runner = Interpreter(model_path=str(path)).get_signature_runner()
    >>> runner.get_input_details()["images"]["dtype"].__name__
    'int8'
    """
    if mode not in TFLITE_MODES:
        raise ValueError(
            f"`mode` must be one of {TFLITE_MODES}. Received: mode={mode!r}")
    if mode == "int8" and representative_data is None:
        raise ValueError(
            "int8 quantization needs calibration images: pass `representative_data` "
            "(a few hundred training images in [-1, 1]). "
            "Received: representative_data=None")
    path = Path(path)
    check_writable(path, overwrite)
    with _as_saved_model(model_or_saved_model_path) as saved_model_dir:
        converter = tf.lite.TFLiteConverter.from_saved_model(
            str(saved_model_dir), signature_keys=["serving_default"])
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if mode != "fp32":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if mode == "fp16":
            converter.target_spec.supported_types = [tf.float16]
        if mode == "int8":
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
            # A list, so the converter may iterate it more than once.
            calibration = list(iter_images(representative_data, num_calibration))
            converter.representative_dataset = lambda: ([x[None]] for x in calibration)
        try:
            flatbuffer = converter.convert()
        except Exception as err:  # ConverterError, or a RuntimeError from MLIR
            raise ExportError(_conversion_message(mode, str(err))) from err
    with atomic_output(path, overwrite) as tmp:
        tmp.write_bytes(flatbuffer)
    return path


def _conversion_message(mode: str, message: str) -> str:
    ops = set(re.findall(r"'(tf\.\w+)'", message))
    for listed in re.findall(r"(?:TF Select ops|Custom ops): ([\w, ]+)", message):
        ops.update(f"tf.{op.strip()}" for op in listed.split(",") if op.strip())
    blocked = ", ".join(sorted(ops)) or "unknown (see the converter message below)"
    return (
        f"TFLite conversion ({mode}) failed; ops with no TFLite built-in kernel: "
        f"{blocked}. Replace them in the model (SELECT_TF_OPS is not used).\n"
        f"Converter message (first lines):\n" + "\n".join(message.splitlines()[:20])
    )


@contextlib.contextmanager
def _as_saved_model(source: keras.Model | str | os.PathLike,
                    image_size: int | None = None) -> Iterator[Path]:
    """Yields a SavedModel directory: `source` itself, or a temporary export."""
    if not isinstance(source, keras.Model):
        source = Path(source)
        if not (source / "saved_model.pb").exists():
            raise FileNotFoundError(f"No SavedModel at {source} (no saved_model.pb).")
        yield source
        return
    with tempfile.TemporaryDirectory(prefix="funmatch_export_") as tmp:
        yield to_saved_model(source, Path(tmp) / "saved_model", image_size=image_size)


def check_formats(formats: Iterable[str]) -> list[str]:
    """The requested formats in canonical order; `ValueError` naming the valid ones.

    The SavedModel (if asked for) comes before the TFLite files, which are
    converted from it.

    Example:
    >>> check_formats(["tflite_fp32", "keras"])
    ['keras', 'tflite_fp32']
    >>> check_formats([])
    Traceback (most recent call last):
    ValueError: No export formats given; choose from keras, saved_model, ...
    """
    formats = list(formats)
    valid = ", ".join(FORMATS)
    if not formats:
        raise ValueError(f"No export formats given; choose from {valid} "
                         "(e.g. --formats=keras,saved_model).")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"Unknown export format(s) {unknown}; valid: {valid}.")
    return [f for f in FORMATS if f in formats]


def export_all(model: keras.Model, out_dir: str | os.PathLike, formats: Iterable[str],
               *, eval_images: Any, representative_data: Any = None,
               overwrite: bool = False, num_calibration: int = 200,
               report_fields: dict[str, Any] | None = None) -> dict[str, Any]:
    """Exports `model` in several formats, verifies each and writes a report.

    All or nothing: the artifacts are written and verified in a staging folder
    inside `out_dir` and moved into place only when every format succeeded, so
    a failure leaves `out_dir` as it was. The report keeps the records of
    formats exported by earlier calls into the same `out_dir`. Under a backend
    other than TensorFlow (JAX), the model is saved as `.keras` and converted
    and verified by a TensorFlow-backend subprocess (`_export_with_tensorflow`).

    Args:
        model: keras.Model. The student.
        out_dir: str. Output directory (created if missing).
        formats: list of str, from `FORMATS`: `keras`, `saved_model`,
            `tflite_fp32`, `tflite_fp16`, `tflite_dynamic`, `tflite_int8`,
            `onnx` (`student.onnx` and `student_images.onnx`, see
            `export_onnx.to_onnx`; needs the `[onnx]` extra).
        eval_images: float images `[N, S, S, 3]` in [-1, 1] for the parity check.
        representative_data: calibration images for `tflite_int8` (see
            `to_tflite`). Defaults to `None`; never taken from `eval_images`,
            so the parity check is not measured on the calibration set.
        overwrite: bool. Replace existing artifacts. Defaults to `False`.
        num_calibration: int. int8 calibration images. Defaults to `200`.
        report_fields: dict. Extra top-level report entries, such as where the
            eval images came from. Defaults to `None`.

    Returns:
        The report: `{"model", "image_size", "num_eval_images", "artifacts":
        {format: {"path", "size_bytes", "agreement", "max_abs_logit_diff",
        "median_latency_ms", "num_images", "exported_at", "keras_backend"}},
        **report_fields}`,
        also written (atomically) to `<out_dir>/export_report.json`. `artifacts`
        also holds the records of formats an earlier call exported there
        (each with its own `exported_at`, UTC). A failed ONNX export is
        `{"path", "failed", "unsupported_ops"}` and writes no file. Under JAX,
        `backend` records the check of the TensorFlow copy against the model.

    Raises:
        ValueError: unknown or no formats, or `tflite_int8` without
            calibration images.
        FileExistsError: an artifact exists and `overwrite` is `False`.
        ExportError: a conversion or its verification failed.

    Example (a tiny untrained student; any `keras.Model` of images works):
    >>> from funmatch_keras.models import small_cnn
    >>> student = small_cnn([8, 16], num_classes=5, image_size=32)
    >>> rng = np.random.default_rng(0)
    >>> val_images, train_images = rng.random((2, 8, 32, 32, 3), np.float32) * 2 - 1
    >>> out = tempfile.mkdtemp()
    >>> report = export_all(student, out, ["keras", "tflite_fp16", "tflite_int8"],
    ...                     eval_images=val_images, representative_data=train_images)
    >>> sorted(os.listdir(out))
    ['export_report.json', 'student.keras', 'student_fp16.tflite',
     'student_int8.tflite']
    >>> report["num_eval_images"], report["artifacts"]["keras"]["agreement"]
    (8, 1.0)
    >>> report["artifacts"]["tflite_fp16"]["max_abs_logit_diff"] < 0.01
    True
    >>> print(format_report(report))
    format              size  agreement  max|dlogit|  latency ms  path
    keras ... 100.00% ...
    tflite_fp16 ...
    tflite_int8 ...
    (8 eval images at 32 px; latency per image on this CPU)
    """
    formats = check_formats(formats)
    if "tflite_int8" in formats and representative_data is None:
        raise ValueError(
            "`tflite_int8` needs calibration images: pass `representative_data` "
            "(a few hundred training images in [-1, 1]) or drop `tflite_int8`.")
    _check_no_lambda(model)
    out_dir = Path(out_dir)
    for path in _artifact_paths(out_dir, formats):  # fail before spending minutes
        check_writable(path, overwrite)
    if "onnx" in formats:
        from funmatch_keras.export import onnx as export_onnx

        export_onnx.require()  # the [onnx] extra, before any other export
    eval_images = np.stack(list(iter_images(eval_images)))
    size = static_image_size(model) or int(eval_images.shape[1])
    if "tflite_int8" in formats:  # an array: it may cross to another process
        representative_data = np.stack(list(iter_images(representative_data,
                                                        num_calibration)))
    report_fields = dict(report_fields or {})

    with removed_if_new(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".export-staging-", dir=out_dir))
        try:
            if keras.backend.backend() == "tensorflow":
                artifacts = _export_formats(model, stage, formats, eval_images,
                                            representative_data, num_calibration, size)
            else:
                artifacts, report_fields["backend"] = _export_with_tensorflow(
                    model, stage, formats, eval_images, representative_data,
                    num_calibration, size)
            made = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            artifacts = {f: {**_relocated(a, stage, out_dir), "exported_at": made,
                             "keras_backend": keras.backend.backend()}
                         for f, a in artifacts.items()}
            merged = {**_previous_artifacts(out_dir), **artifacts}
            report = {"model": model.name, "image_size": size,
                      "num_eval_images": int(len(eval_images)),
                      "artifacts": {f: merged[f] for f in FORMATS if f in merged},
                      **report_fields}
            (stage / REPORT_NAME).write_text(json.dumps(report, indent=2))
            _move_into_place(stage, out_dir)
        finally:
            remove_path(stage)
    return report


def _check_no_lambda(model: keras.Model) -> None:
    """Refuses a model that a `.keras` file of it could not be loaded back from safely."""
    with warnings.catch_warnings():  # Keras warns of the lambda; the error says more
        warnings.simplefilter("ignore")
        try:
            config = keras.saving.serialize_keras_object(model)
        except Exception:  # e.g. no get_config: the formats that need one say so
            return
    if '"__lambda__"' in json.dumps(config, default=str):
        raise ValueError(lambda_message(f"The model {model.name!r}"))


def _artifact_paths(out_dir: Path, formats: Iterable[str]) -> list[Path]:
    """Every file or folder that exporting `formats` into `out_dir` writes."""
    paths = [out_dir / _ARTIFACT_NAMES[f] for f in formats]
    if "onnx" in formats:
        paths.append(out_dir / "student_images.onnx")  # export_onnx.images_path
    return paths


def _export_formats(model: keras.Model, out_dir: Path, formats: list[str],
                    eval_images: np.ndarray, representative_data: Any,
                    num_calibration: int, size: int) -> dict[str, dict[str, Any]]:
    """Writes and verifies each format in the empty `out_dir` (TensorFlow backend)."""
    artifacts = {}
    with contextlib.ExitStack() as stack:
        saved_model = None  # every TFLite variant is converted from one SavedModel
        for fmt in formats:
            path = out_dir / _ARTIFACT_NAMES[fmt]
            if fmt == "keras":
                to_keras(model, path)
            elif fmt == "saved_model":
                saved_model = to_saved_model(model, path, image_size=size)
            elif fmt == "onnx":
                from funmatch_keras.export import onnx as export_onnx

                try:
                    artifacts[fmt] = export_onnx.export_and_verify(
                        model, path, eval_images, image_size=size)
                except export_onnx.OnnxExportError as error:
                    artifacts[fmt] = {"path": str(path), "failed": error.summary,
                                      "unsupported_ops": error.ops}
                continue
            else:
                if saved_model is None:
                    saved_model = stack.enter_context(_as_saved_model(model, size))
                to_tflite(saved_model, path, fmt[len("tflite_"):], representative_data,
                          num_calibration)
            artifacts[fmt] = {"path": str(path), **verify(path, model, eval_images)}
    return artifacts


def _relocated(record: Any, stage: Path, out_dir: Path) -> Any:
    """`record` with the paths under `stage` made paths under `out_dir`."""
    if isinstance(record, dict):
        return {k: _relocated(v, stage, out_dir) for k, v in record.items()}
    if isinstance(record, str) and record.startswith(str(stage) + os.sep):
        return str(out_dir / Path(record).relative_to(stage))
    return record


def _previous_artifacts(out_dir: Path) -> dict[str, Any]:
    """The records of an earlier report in `out_dir` (none if it is unreadable)."""
    try:
        artifacts = json.loads((out_dir / REPORT_NAME).read_text())["artifacts"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return artifacts if isinstance(artifacts, dict) else {}


def _move_into_place(stage: Path, out_dir: Path) -> None:
    """Renames every entry of `stage` into `out_dir`, replacing old ones; the report last."""
    for entry in sorted(stage.iterdir(), key=lambda p: (p.name == REPORT_NAME, p.name)):
        target = out_dir / entry.name
        remove_path(target)
        os.replace(entry, target)


@contextlib.contextmanager
def removed_if_new(directory: Path) -> Iterator[None]:
    """Removes `directory` on an exception if it did not exist before and is empty."""
    existed = directory.exists()
    try:
        yield
    except BaseException:
        if not existed and directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
        raise


# Exceptions the TensorFlow subprocess re-raises here as themselves (for the
# CLI's exit codes); any other one becomes an `ExportError`.
_CHILD_ERRORS = {e.__name__: e for e in (ValueError, FileExistsError, FileNotFoundError,
                                         PermissionError, ImportError, ExportError)}


def _export_with_tensorflow(model: keras.Model, stage: Path, formats: list[str],
                            eval_images: np.ndarray, representative_data: Any,
                            num_calibration: int, size: int
                            ) -> tuple[dict[str, Any], dict[str, Any]]:
    """`_export_formats` in a TensorFlow-backend subprocess, for a model of another backend.

    The SavedModel, TFLite and ONNX writers trace TensorFlow graphs, so they
    need the TensorFlow backend; a `.keras` file is backend-agnostic. The
    subprocess loads the model from one, exports into `stage` and returns its
    logits, which must match this model's: the artifacts are then the model's.

    Returns:
        (artifact records, the `backend` entry of the report).
    """
    with tempfile.TemporaryDirectory(prefix="funmatch_export_tf_") as job:
        job = Path(job)
        save_keras_file(model, job / "model.keras")
        np.save(job / "eval_images.npy", eval_images)
        if representative_data is not None:
            np.save(job / "calibration.npy", representative_data)
        (job / "job.json").write_text(json.dumps({
            "stage": str(stage), "formats": formats, "num_calibration": num_calibration,
            "image_size": size}))
        package_root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "KERAS_BACKEND": "tensorflow",
               "PYTHONPATH": os.pathsep.join(filter(None, [package_root,
                                                           os.environ.get("PYTHONPATH")])),
               # CPU only: the parent backend may hold the accelerator's memory.
               "CUDA_VISIBLE_DEVICES": "-1"}
        code = ("import sys; from funmatch_keras.export import formats; "
                "formats._tensorflow_job(sys.argv[1])")
        result = subprocess.run([sys.executable, "-c", code, str(job)], env=env,
                                capture_output=True, text=True, stdin=subprocess.DEVNULL)
        outcome_path = job / "outcome.json"
        outcome = json.loads(outcome_path.read_text()) if outcome_path.exists() else {}
        if "error" in outcome:
            error = _CHILD_ERRORS.get(outcome["error"])
            if error is not None:
                raise error(outcome["message"])
            raise ExportError(f"Exporting through the TensorFlow backend failed "
                              f"({outcome['error']}: {outcome['message']}).")
        if result.returncode != 0 or "artifacts" not in outcome:
            raise ExportError(
                f"The TensorFlow-backend export process exited with {result.returncode} "
                f"(the {keras.backend.backend()} backend exports through it). Its output, "
                "last lines:\n" + "\n".join(result.stderr.splitlines()[-20:]))
        tf_logits = np.load(job / "reference_logits.npy")
    logits = keras_logits(model, eval_images)
    diff = float(np.max(np.abs(logits - tf_logits)))
    # float32 backends agree to rounding; lower-precision compute to its epsilon.
    tolerance = (1e-3 if model.compute_dtype == "float32" else 5e-2) * max(
        1.0, float(np.max(np.abs(logits))))
    if not diff <= tolerance:
        raise ExportError(
            f"The model loaded under the TensorFlow backend (which writes the artifacts) "
            f"disagrees with the {keras.backend.backend()} model: max |logit difference| "
            f"{diff:.3g} > {tolerance:.3g}. A layer computes differently on the two "
            "backends; export under KERAS_BACKEND=tensorflow to ship what it computes.")
    return outcome["artifacts"], {"name": keras.backend.backend(),
                                  "converted_with": "tensorflow",
                                  "max_abs_logit_diff_vs_tensorflow": diff}


def _tensorflow_job(job: str) -> None:
    """The subprocess of `_export_with_tensorflow`: writes `outcome.json` in `job`."""
    job = Path(job)
    try:
        spec = json.loads((job / "job.json").read_text())
        model = load_keras_model(job / "model.keras")
        eval_images = np.load(job / "eval_images.npy")
        calibration = (np.load(job / "calibration.npy")
                       if (job / "calibration.npy").exists() else None)
        artifacts = _export_formats(model, Path(spec["stage"]), spec["formats"], eval_images,
                                    calibration, spec["num_calibration"], spec["image_size"])
        np.save(job / "reference_logits.npy", keras_logits(model, eval_images))
        outcome = {"artifacts": artifacts}
    except Exception as error:  # re-raised by the parent, which has the user's attention
        traceback.print_exc()
        outcome = {"error": type(error).__name__, "message": str(error)}
    (job / "outcome.json").write_text(json.dumps(outcome))
