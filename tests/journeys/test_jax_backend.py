"""Journey: the README's commands under the JAX backend, then the student under TensorFlow.

    KERAS_BACKEND=jax funmatch train-teacher --config=digits:smoke=True --workdir=teacher
    KERAS_BACKEND=jax funmatch distill --config=digits:smoke=True --workdir=run
    KERAS_BACKEND=jax funmatch evaluate --workdir=run
    KERAS_BACKEND=jax funmatch export --workdir=run --formats=<every format>

then, under the TensorFlow backend, the exported `student.keras` in plain Keras and
the SavedModel in plain TensorFlow give the same logits, and `funmatch export` of the
same workdir works too.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from funmatch_keras.export.formats import FORMATS

FILES = {"keras": "student.keras", "saved_model": "saved_model/saved_model.pb",
         "tflite_fp32": "student_fp32.tflite", "tflite_fp16": "student_fp16.tflite",
         "tflite_dynamic": "student_dynamic.tflite", "tflite_int8": "student_int8.tflite",
         "onnx": "student.onnx"}
SIZE = 16  # the digits config's student_size

# Digits-like images in [-1, 1], and the logits of the SavedModel on them, in plain
# TensorFlow (no Keras, no funmatch_keras).
SAVED_MODEL_LOGITS = """
import numpy as np, tensorflow as tf
images = np.random.default_rng(0).uniform(-1, 1, (16, {size}, {size}, 3)).astype("float32")
serve = tf.saved_model.load("{saved_model}").signatures["serving_default"]
np.save("images.npy", images)
np.save("{out}", serve(images=tf.constant(images))["logits"].numpy())
"""
KERAS_LOGITS = """
import numpy as np
import keras, funmatch_keras
assert keras.backend.backend() == "tensorflow"
model = keras.saving.load_model("run/export/student.keras")
np.save("keras_logits.npy", keras.ops.convert_to_numpy(model(np.load("images.npy"))))
"""


@pytest.mark.slow
def test_distill_evaluate_export_under_jax_then_load_under_tensorflow(shell):
    jax = {"KERAS_BACKEND": "jax"}
    shell.funmatch("train-teacher", "--config=digits:smoke=True", "--workdir=teacher",
                   "--verbose=0", **jax)
    assert (shell.cwd / "teacher" / "teacher.keras").is_file()
    # The teacher it wrote loads under TensorFlow, in plain Keras.
    shell.python("import keras; keras.saving.load_model('teacher/teacher.keras')")
    shell.funmatch("distill", "--config=digits:smoke=True", "--workdir=run", "--verbose=0",
                   **jax)
    assert (shell.cwd / "run" / "student.keras").is_file()
    evaluated = shell.funmatch("evaluate", "--workdir=run", **jax)
    assert "student_top1=" in evaluated.stdout

    shell.funmatch("export", "--workdir=run", f"--formats={','.join(FORMATS)}",
                   "--num_images=64", **jax)
    export = shell.cwd / "run" / "export"
    for fmt, name in FILES.items():
        assert (export / name).is_file(), fmt
    assert not [p.name for p in export.iterdir() if p.name.startswith(".")]
    report = json.loads((export / "export_report.json").read_text())
    assert list(report["artifacts"]) == list(FORMATS)
    for fmt, row in report["artifacts"].items():
        assert "failed" not in row, (fmt, row)
        assert row["num_images"] == 64 and row["keras_backend"] == "jax"
        assert row["agreement"] >= (1.0 if fmt in ("keras", "saved_model", "tflite_fp32",
                                                   "onnx") else 0.95), (fmt, row)
    for fmt in ("keras", "saved_model", "tflite_fp32", "onnx"):
        assert report["artifacts"][fmt]["max_abs_logit_diff"] < 1e-4, fmt
    assert report["backend"]["name"] == "jax"
    assert report["backend"]["max_abs_logit_diff_vs_tensorflow"] < 1e-4

    # Under TensorFlow: plain Keras loads the student, plain TensorFlow serves the
    # SavedModel, and they agree.
    shell.python(SAVED_MODEL_LOGITS.format(size=SIZE, saved_model="run/export/saved_model",
                                           out="saved_model_logits.npy"))
    shell.python(KERAS_LOGITS)
    keras_logits = np.load(shell.cwd / "keras_logits.npy")
    saved_model_logits = np.load(shell.cwd / "saved_model_logits.npy")
    assert keras_logits.shape == (16, 10)
    assert np.max(np.abs(keras_logits - saved_model_logits)) < 1e-4

    # The same workdir exports under TensorFlow too, to the same SavedModel logits.
    shell.funmatch("export", "--workdir=run", "--output_dir=tf_export",
                   "--formats=saved_model", "--num_images=16")
    tf_report = json.loads((shell.cwd / "tf_export" / "export_report.json").read_text())
    assert tf_report["artifacts"]["saved_model"]["keras_backend"] == "tensorflow"
    shell.python(SAVED_MODEL_LOGITS.format(size=SIZE, saved_model="tf_export/saved_model",
                                           out="tf_saved_model_logits.npy"))
    tf_logits = np.load(shell.cwd / "tf_saved_model_logits.npy")
    assert np.max(np.abs(tf_logits - saved_model_logits)) < 1e-4
