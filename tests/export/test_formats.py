"""Tests for funmatch_keras.export.formats: every format round-trips with parity.

A tiny conv net is trained for a few seconds on scikit-learn's digits (8x8,
upscaled to 32x32), so that top-1 agreement measures something real.
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from funmatch_keras.data import augment
from funmatch_keras.export import formats as fx
from funmatch_keras.export import verify as fv

SIZE = 32  # the input size of tests/conftest.py's `tiny_student` and `student`

# Under pytest-xdist (`make test`), the tests sharing this module's fixtures
# run in one worker, so the fixtures are built once.
pytestmark = pytest.mark.xdist_group("export")
BLANK = np.zeros([1, SIZE, SIZE, 3], np.float32)
# format -> (minimum top-1 agreement, maximum |logit difference| or None)
TARGETS = {
    "keras": (1.0, 1e-4),
    "saved_model": (1.0, 1e-4),
    "tflite_fp32": (1.0, 1e-4),
    "tflite_fp16": (0.995, None),
    "tflite_dynamic": (0.99, None),
    "tflite_int8": (0.98, None),
    "onnx": (1.0, 1e-4),  # onnxruntime
}
# A converter message as TF 2.21 prints it for ops without a builtin kernel.
CONVERTER_MESSAGE = (
    "Could not translate MLIR to FlatBuffer.<unknown>:0: error: loc(...): "
    "'tf.Igamma' op is neither a custom op nor a flex op\n"
    "TF Select ops: MatrixDeterminant\n"
)




@pytest.fixture(scope="module")
def exported(student, digits, tmp_path_factory):
    """All formats exported once; returns (report, out_dir)."""
    x_train, _, x_eval = digits
    out_dir = tmp_path_factory.mktemp("export")
    report = fx.export_all(
        student,
        out_dir,
        fx.FORMATS,
        eval_images=x_eval,
        representative_data=tf.data.Dataset.from_tensor_slices(x_train).batch(32),
        num_calibration=200,
    )
    return report, out_dir


@pytest.mark.slow
@pytest.mark.parametrize("fmt", fx.FORMATS)
def test_format_meets_parity_target(exported, fmt):
    report, out_dir = exported
    result = report["artifacts"][fmt]
    min_agreement, max_diff = TARGETS[fmt]
    assert result["agreement"] >= min_agreement, result
    if max_diff is not None:
        assert result["max_abs_logit_diff"] <= max_diff, result
    assert result["size_bytes"] > 0 and result["median_latency_ms"] > 0
    assert result["num_images"] == 200


@pytest.mark.slow
def test_report_file_and_table(exported):
    report, out_dir = exported
    assert json.loads((out_dir / fx.REPORT_NAME).read_text()) == report
    table = fx.format_report(report)
    for fmt in fx.FORMATS:
        assert fmt in table
    # Quantized files are smaller than the float32 one.
    sizes = {f: a["size_bytes"] for f, a in report["artifacts"].items()}
    assert sizes["tflite_int8"] < sizes["tflite_fp16"] < sizes["tflite_fp32"]


@pytest.mark.slow
def test_saved_model_stores_weights_once(exported, student):
    _, out_dir = exported
    data = out_dir / "saved_model" / "variables" / "variables.data-00000-of-00001"
    # float32 weights, plus the checkpoint's small per-tensor overhead.
    assert data.stat().st_size < 1.2 * 4 * student.count_params()


@pytest.mark.slow
def test_serve_images_preprocesses_any_size(exported):
    _, out_dir = exported
    loaded = tf.saved_model.load(str(out_dir / "saved_model"))
    serve_images = loaded.signatures["serve_images"]
    serving_default = loaded.signatures["serving_default"]
    assert list(serving_default.structured_input_signature[1]) == ["images"]
    rng = np.random.default_rng(0)
    for shape in [(2, 40, 52, 3), (1, 70, 36, 3)]:
        raw = tf.constant(rng.integers(0, 256, shape), tf.uint8)
        manual = augment.eval_preprocess(raw, SIZE)
        got = serve_images(images=raw)
        want = serving_default(images=manual)
        np.testing.assert_allclose(got["logits"], want["logits"], atol=1e-5)
        np.testing.assert_allclose(np.sum(got["probabilities"], -1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_int8_verify_applies_quantization(exported, student, digits):
    from ai_edge_litert.interpreter import Interpreter

    _, out_dir = exported
    path = out_dir / "student_int8.tflite"
    image = digits[2][:1]
    runner = Interpreter(model_path=str(path)).get_signature_runner("serving_default")
    inp = runner.get_input_details()["images"]
    out = runner.get_output_details()["logits"]
    assert inp["dtype"] == np.int8 and out["dtype"] == np.int8
    (in_scale, in_zp), (out_scale, out_zp) = inp["quantization"], out["quantization"]
    assert in_scale > 0 and out_scale > 0
    q = np.clip(np.round(image / in_scale) + in_zp, -128, 127).astype(np.int8)
    logits = (runner(images=q)["logits"].astype(np.float32) - out_zp) * out_scale
    expected = keras.ops.convert_to_numpy(student(image, training=False))
    result = fv.verify(path, student, image)
    assert result["max_abs_logit_diff"] == pytest.approx(
        np.max(np.abs(logits - expected)), abs=1e-5
    )
    assert result["agreement"] == float(logits.argmax() == expected.argmax())


@pytest.fixture
def untrained(tiny_student):
    return tiny_student()


def test_unknown_format_lists_valid_ones(untrained, tmp_path):
    with pytest.raises(ValueError, match="tflite_int8"):
        fx.export_all(untrained, tmp_path, ["coreml"], eval_images=BLANK)


def test_int8_without_representative_data(untrained, tmp_path):
    with pytest.raises(ValueError, match="representative_data"):
        fx.export_all(untrained, tmp_path, ["tflite_int8"], eval_images=BLANK)
    with pytest.raises(ValueError, match="representative_data"):
        fx.to_tflite(untrained, tmp_path / "m.tflite", "int8")
    assert not any(tmp_path.iterdir())


def test_existing_path_needs_overwrite(untrained, tmp_path):
    path = tmp_path / "student.keras"
    fx.to_keras(untrained, path)
    with pytest.raises(FileExistsError, match="--overwrite"):
        fx.to_keras(untrained, path)
    with pytest.raises(FileExistsError, match="--overwrite"):
        fx.export_all(untrained, tmp_path, ["keras"], eval_images=BLANK)
    fx.to_keras(untrained, path, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["student.keras"]


def test_dynamic_input_needs_image_size(tmp_path, tiny_student):
    model = tiny_student(input_size=None)
    with pytest.raises(ValueError, match="image_size"):
        fx.to_saved_model(model, tmp_path / "sm")
    fx.to_saved_model(model, tmp_path / "sm", image_size=SIZE)
    # export_all takes the size from its eval images.
    fx.export_all(model, tmp_path / "all", ["saved_model"], eval_images=BLANK)
    for path in (tmp_path / "sm", tmp_path / "all" / "saved_model"):
        signature = tf.saved_model.load(str(path)).signatures["serving_default"]
        spec = signature.structured_input_signature[1]["images"]
        assert spec.shape.as_list() == [None, SIZE, SIZE, 3]


def test_failed_conversion_leaves_no_file(untrained, tmp_path, monkeypatch):
    class FailingConverter:
        target_spec = type("Spec", (), {})()

        def convert(self):
            raise RuntimeError(CONVERTER_MESSAGE)

    monkeypatch.setattr(
        tf.lite.TFLiteConverter, "from_saved_model", lambda *a, **k: FailingConverter()
    )
    out = tmp_path / "out"
    with pytest.raises(fx.ExportError, match="tf.Igamma, tf.MatrixDeterminant"):
        fx.to_tflite(untrained, out / "student.tflite", "fp32")
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_real_conversion_failure_names_blocking_op(tmp_path):
    class Igamma(keras.layers.Layer):
        def call(self, x):
            return tf.math.igamma(tf.abs(x) + 1.0, tf.abs(x) + 1.0)

    inputs = keras.Input((8, 8, 3), name="images")
    x = keras.layers.GlobalAveragePooling2D()(Igamma()(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2)(x))
    with pytest.raises(fx.ExportError, match="tf.Igamma"):
        fx.to_tflite(model, tmp_path / "bad.tflite", "fp32")
    assert not any(tmp_path.iterdir())


def _failing_converter(monkeypatch):
    class FailingConverter:
        target_spec = type("Spec", (), {})()

        def convert(self):
            raise RuntimeError(CONVERTER_MESSAGE)

    monkeypatch.setattr(
        tf.lite.TFLiteConverter, "from_saved_model", lambda *a, **k: FailingConverter()
    )


def _listing(directory):
    return {p.relative_to(directory).as_posix(): p.stat().st_mtime_ns
            for p in sorted(directory.rglob("*"))}


def test_a_failed_format_leaves_the_export_as_it_was(untrained, tmp_path, monkeypatch):
    # A new folder: nothing of it remains, not even the folder.
    _failing_converter(monkeypatch)
    with pytest.raises(fx.ExportError, match="tf.Igamma"):
        fx.export_all(untrained, tmp_path / "new", ["keras", "saved_model", "tflite_fp32"],
                      eval_images=BLANK)
    assert not (tmp_path / "new").exists()
    # A folder of an earlier export: not a file of it changes.
    out = tmp_path / "out"
    monkeypatch.undo()
    fx.export_all(untrained, out, ["tflite_fp16"], eval_images=BLANK)
    before = _listing(out)
    _failing_converter(monkeypatch)
    with pytest.raises(fx.ExportError):
        fx.export_all(untrained, out, ["keras", "tflite_fp32"], eval_images=BLANK)
    assert _listing(out) == before
    # So the same export runs again without --overwrite.
    monkeypatch.undo()
    report = fx.export_all(untrained, out, ["keras", "tflite_fp32"], eval_images=BLANK)
    assert sorted(report["artifacts"]) == ["keras", "tflite_fp16", "tflite_fp32"]


def test_the_report_keeps_the_records_of_earlier_exports(untrained, tmp_path):
    images = np.random.default_rng(0).uniform(-1, 1, (4, SIZE, SIZE, 3))
    first = fx.export_all(untrained, tmp_path, ["keras", "saved_model"], eval_images=images)
    second = fx.export_all(untrained, tmp_path, ["tflite_fp32"], eval_images=images[:2])
    on_disk = json.loads((tmp_path / fx.REPORT_NAME).read_text())
    assert on_disk == second
    assert list(on_disk["artifacts"]) == ["keras", "saved_model", "tflite_fp32"]
    for fmt in ("keras", "saved_model"):
        assert on_disk["artifacts"][fmt] == first["artifacts"][fmt]
        assert on_disk["artifacts"][fmt]["num_images"] == 4
    assert on_disk["artifacts"]["tflite_fp32"]["num_images"] == 2
    for record in on_disk["artifacts"].values():
        assert record["exported_at"].endswith("Z") and record["keras_backend"] == "tensorflow"
        assert (tmp_path / record["path"]).exists()
    # A format exported again replaces its own record only.
    third = fx.export_all(untrained, tmp_path, ["keras"], eval_images=images[:3],
                          overwrite=True)
    assert third["artifacts"]["keras"]["num_images"] == 3
    assert third["artifacts"]["saved_model"] == first["artifacts"]["saved_model"]


def test_no_formats_is_not_an_unknown_format(untrained, tmp_path):
    with pytest.raises(ValueError, match=r"^No export formats given; choose from keras, "
                                         r"saved_model, tflite_fp32.*onnx"):
        fx.export_all(untrained, tmp_path / "out", [], eval_images=BLANK)
    assert not (tmp_path / "out").exists()


@keras.saving.register_keras_serializable(package="tests_export")
def doubled(x):
    return x * 2.0


def test_a_lambda_is_refused_with_a_fix_a_user_can_apply(tmp_path):
    def model_with(function):
        inputs = keras.Input((SIZE, SIZE, 3), name="images")
        x = keras.layers.GlobalAveragePooling2D()(keras.layers.Lambda(function)(inputs))
        return keras.Model(inputs, keras.layers.Dense(3)(x))

    with pytest.raises(ValueError) as error:
        fx.export_all(model_with(lambda x: x * 2.0), tmp_path / "out", ["keras"],
                      eval_images=BLANK)
    message = str(error.value)
    assert "safe_mode=False" not in message
    assert message.startswith("The model 'functional")  # a user's name, not a temporary file
    assert "register_keras_serializable" in message
    assert not (tmp_path / "out").exists()
    # The fix the message gives exports.
    report = fx.export_all(model_with(doubled), tmp_path / "out", ["keras"],
                           eval_images=BLANK)
    assert report["artifacts"]["keras"]["max_abs_logit_diff"] < 1e-5


JAX_EXPORT = """
import json, os, sys
import keras, numpy as np
from funmatch_keras import export as fx
SIZE = 32
assert keras.backend.backend() == "jax"
images = np.random.default_rng(0).uniform(-1, 1, (4, SIZE, SIZE, 3)).astype("float32")
inputs = keras.Input((SIZE, SIZE, 3), name="images")
x = keras.layers.BatchNormalization()(keras.layers.Conv2D(16, 3, 2, use_bias=False)(inputs))
x = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(x))
student = keras.Model(inputs, keras.layers.Dense(10)(x), name="tiny_student")
report = fx.export_all(student, "ok", ["keras", "tflite_int8"], eval_images=images,
                       representative_data=images)
print(json.dumps(report))
inputs = keras.Input((SIZE, SIZE, 3))
pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Lambda(lambda x: x * 2)(inputs))
try:  # the TensorFlow subprocess refuses it; its error is raised here as itself
    fx.export_all(keras.Model(inputs, keras.layers.Dense(3)(pooled)), "bad", ["keras"],
                  eval_images=images)
except ValueError as error:
    print("ValueError:", error, file=sys.stderr)
"""


@pytest.mark.slow
def test_export_under_jax_converts_through_tensorflow_all_or_nothing(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", JAX_EXPORT], env=env, cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == [
        fx.REPORT_NAME, "student.keras", "student_int8.tflite"]
    assert report["backend"]["name"] == "jax"
    assert report["backend"]["max_abs_logit_diff_vs_tensorflow"] < 1e-4
    assert report["artifacts"]["keras"]["max_abs_logit_diff"] < 1e-4
    assert report["artifacts"]["tflite_int8"]["keras_backend"] == "jax"
    assert "ValueError: The model 'functional" in result.stderr  # no temporary path
    assert "register_keras_serializable" in result.stderr
    assert not (tmp_path / "bad").exists()
