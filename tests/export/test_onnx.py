"""ONNX export (`funmatch_keras.export.onnx`): Keras's own `model.export(format="onnx")`,
run in onnxruntime, in the same parity report as TFLite; a failed conversion is a
failed row and the other formats still export.

The parity of a trained student on digits is in tests/export/test_formats.py (`onnx` is one of
`export.FORMATS`, so `test_format_meets_parity_target[onnx]` covers it).
"""

import importlib.util
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from funmatch_keras.app import export as ship
from funmatch_keras.data import augment
from funmatch_keras.export import formats as fx
from funmatch_keras.export import onnx as export_onnx

SIZE = 32  # the input size of tests/conftest.py's `tiny_student` and `student`

onnxruntime = pytest.importorskip("onnxruntime")


def _loaded_student(tmp_path, tiny_student):
    """A student as `funmatch export` gets it: loaded from .keras, never called."""
    keras.utils.set_random_seed(0)
    path = tmp_path / "student.keras"
    tiny_student().save(path)
    return keras.saving.load_model(path, safe_mode=True)


def test_both_graphs_match_the_keras_student(tmp_path, tiny_student):
    student = _loaded_student(tmp_path, tiny_student)
    path = export_onnx.to_onnx(student, tmp_path / "out" / "student.onnx")
    session = onnxruntime.InferenceSession(str(path))
    (given,) = session.get_inputs()
    assert (given.name, given.type, given.shape[1:]) == ("images", "tensor(float)",
                                                         [SIZE, SIZE, 3])
    assert [o.name for o in session.get_outputs()] == ["logits"]
    images = np.random.default_rng(1).uniform(-1, 1, (5, SIZE, SIZE, 3)).astype("float32")
    (logits,) = session.run(None, {"images": images})
    np.testing.assert_allclose(logits, student(images), atol=1e-4)
    # The serve_images graph: uint8 of any size, eval preprocessing inside.
    served = onnxruntime.InferenceSession(str(export_onnx.images_path(path)))
    assert served.get_inputs()[0].type == "tensor(uint8)"
    pixels = np.random.default_rng(2).integers(0, 256, (2, 57, 41, 3), dtype=np.uint8)
    expected = student(augment.eval_preprocess(tf.constant(pixels), SIZE))
    np.testing.assert_allclose(served.run(None, {"images": pixels})[0], expected, atol=1e-4)
    assert sorted(p.name for p in path.parent.iterdir()) == ["student.onnx",
                                                             "student_images.onnx"]
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_onnx.to_onnx(student, path)


def test_the_report_has_an_onnx_row_like_tflite(tmp_path, tiny_student):
    student = _loaded_student(tmp_path, tiny_student)
    images = np.random.default_rng(0).uniform(-1, 1, (6, SIZE, SIZE, 3)).astype("float32")
    report = fx.export_all(student, tmp_path / "out", ["tflite_fp32", "onnx"],
                           eval_images=images)
    row = report["artifacts"]["onnx"]
    assert row["kind"] == "onnx" and row["num_images"] == 6 and row["agreement"] == 1.0
    assert row["max_abs_logit_diff"] < 1e-4 and row["median_latency_ms"] > 0
    assert row["size_bytes"] == (tmp_path / "out" / "student.onnx").stat().st_size
    assert row["serve_images"]["max_abs_logit_diff"] < 1e-4
    table = fx.format_report(report).splitlines()
    assert table[1].startswith("tflite_fp32") and table[2].startswith("onnx ")
    assert "100.00%" in table[2] and table[2].endswith("student.onnx")


class Igamma(keras.layers.Layer):
    def call(self, x):
        return tf.math.igamma(tf.abs(x) + 1.0, tf.abs(x) + 1.0)


def test_an_op_tf2onnx_cannot_convert_is_a_failed_row_and_the_rest_exports(tmp_path):
    # A real op, not an injected failure: tf2onnx 1.17 has no conversion for Igamma
    # (it logs "Unsupported ops" and leaves the TensorFlow op in the graph).
    inputs = keras.Input((8, 8, 3), name="images")
    x = keras.layers.GlobalAveragePooling2D()(Igamma()(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2)(x))
    images = np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 3)).astype("float32")
    out = tmp_path / "out"
    report = fx.export_all(model, out, ["saved_model", "onnx"], eval_images=images)
    failed = report["artifacts"]["onnx"]
    assert failed["unsupported_ops"] == ["Igamma"]
    assert failed["failed"] == "unsupported ops: Igamma"
    assert report["artifacts"]["saved_model"]["agreement"] == 1.0  # still exported
    assert sorted(p.name for p in out.iterdir()) == ["export_report.json", "saved_model"]
    assert json.loads((out / fx.REPORT_NAME).read_text()) == report
    assert "onnx           FAILED: unsupported ops: Igamma" in fx.format_report(report)
    with pytest.raises(export_onnx.OnnxExportError, match="no ONNX conversion: Igamma"):
        export_onnx.to_onnx(model, tmp_path / "direct.onnx")


def test_without_the_extra_the_error_names_it_before_anything_is_written(tmp_path,
                                                                         monkeypatch, tiny_student):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tf2onnx" else real(name, *a))
    with pytest.raises(ImportError, match=r'tf2onnx: install the extra.*funmatch-keras\[onnx\]'):
        fx.export_all(tiny_student(), tmp_path / "out", ["keras", "onnx"],
                      eval_images=np.zeros((1, SIZE, SIZE, 3), np.float32))
    assert not (tmp_path / "out").exists()


def test_funmatch_export_writes_onnx_from_a_workdir(tmp_path, tiny_student):
    workdir = tmp_path / "run"
    workdir.mkdir()
    fx.to_keras(tiny_student(), workdir / "student.keras")
    report = ship.run_export(workdir, ["onnx"])
    assert report["artifacts"]["onnx"]["max_abs_logit_diff"] < 1e-4
    assert (workdir / "export" / "student_images.onnx").is_file()
