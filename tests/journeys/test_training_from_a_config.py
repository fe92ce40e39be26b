"""README "Training from a config": train-teacher → distill → evaluate → export, offline.

The commands are the README's own block; each runs in a fresh process. Then the files
are used as a user would: `student.keras` and `teacher.keras` in plain Keras, the
SavedModel in plain TensorFlow.
"""

import json

import numpy as np
import pytest

pytestmark = pytest.mark.slow

MARKER = "The same four commands offline, on the bundled digits"
FORMATS = {"keras", "saved_model", "tflite_fp32", "tflite_fp16", "tflite_dynamic",
           "tflite_int8", "onnx"}

# Plain Keras and plain TensorFlow: no funmatch_keras import. The images are the test
# split as `funmatch evaluate` sees it, made by the user-facing data API in a process
# of its own.
_TEST_IMAGES = """
import numpy as np
import funmatch_keras as fm
from funmatch_keras import configs
from funmatch_keras.app import build
config = configs.load_config("digits:smoke=True")
images, labels = zip(*fm.data.eval_pipeline(build.source(config, "test"), size=16,
                                            batch_size=1000).as_numpy_iterator())
np.save("test_images.npy", np.concatenate(images))
np.save("test_labels.npy", np.concatenate(labels))
"""
_PLAIN_KERAS = """
import json, keras, numpy as np
images = np.load("test_images.npy")
student = keras.saving.load_model("runs/digits/student.keras")
teacher = keras.saving.load_model("runs/digits_teacher/teacher.keras")
np.save("student_logits.npy", student.predict(images, verbose=0))
np.save("teacher_logits.npy", teacher.predict(images, verbose=0))
"""
_PLAIN_TENSORFLOW = """
import numpy as np, tensorflow as tf
serve = tf.saved_model.load("runs/digits/export/saved_model").signatures["serving_default"]
np.save("savedmodel_logits.npy", serve(tf.constant(np.load("test_images.npy")))["logits"])
"""


def test_the_readme_commands_train_evaluate_and_export(shell, readme):
    commands = readme.commands_after(MARKER)
    assert [c[:2] for c in commands] == [["funmatch", "train-teacher"], ["funmatch", "distill"],
                                         ["funmatch", "evaluate"], ["funmatch", "export"]]
    outputs = [shell.funmatch(*command[1:]) for command in commands]

    root = shell.cwd / "runs"
    assert (root / "digits_teacher" / "teacher.keras").is_file()
    report = json.loads((root / "digits" / "report.json").read_text())
    assert report["steps"] == 4 and report["epochs"] == 2  # smoke: 2 epochs of 2 steps
    evaluated = dict(item.split("=") for item in outputs[2].stdout.split()
                     if item.count("=") == 1)
    assert float(evaluated["agreement"]) == pytest.approx(report["agreement"], abs=1e-4)

    export = json.loads((root / "digits" / "export" / "export_report.json").read_text())
    rows = export["artifacts"]
    assert FORMATS <= set(rows), sorted(rows)
    for name in FORMATS - {"tflite_dynamic", "tflite_int8"}:
        assert rows[name]["agreement"] == pytest.approx(1.0), (name, rows[name])

    shell.python(_TEST_IMAGES)
    shell.python(_PLAIN_KERAS)
    shell.python(_PLAIN_TENSORFLOW)
    student = np.load(shell.cwd / "student_logits.npy")
    teacher = np.load(shell.cwd / "teacher_logits.npy")
    saved_model = np.load(shell.cwd / "savedmodel_logits.npy")
    labels = np.load(shell.cwd / "test_labels.npy")
    assert student.shape == teacher.shape == (len(labels), 10)
    np.testing.assert_allclose(saved_model, student, atol=1e-4)
    # What `funmatch distill` reported is what the files compute.
    agreement = np.mean(student.argmax(1) == teacher.argmax(1))
    assert agreement == pytest.approx(report["agreement"], abs=1e-6)
    assert np.mean(student.argmax(1) == labels) == pytest.approx(report["student_top1"],
                                                                  abs=1e-6)
