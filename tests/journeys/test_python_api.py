"""README "Your own models and data (Python)": the block runs as written, and its student
loads in a fresh process and agrees with the SavedModel it exported."""

import json
import re

import numpy as np
import pytest

pytestmark = pytest.mark.slow

_CHECK = """
import json, keras, numpy as np, tensorflow as tf
images = np.random.default_rng(0).uniform(-1, 1, (16, 32, 32, 3)).astype("float32")
student = keras.saving.load_model("student.keras")
serve = tf.saved_model.load("student_savedmodel").signatures["serving_default"]
print("RESULT", json.dumps({
    "keras": student.predict(images, verbose=0).tolist(),
    "saved_model": serve(tf.constant(images))["logits"].numpy().tolist()}))
"""


def test_the_readme_python_block_distills_saves_and_exports(shell, readme):
    block = readme.text.split("## Your own models and data (Python)", 1)[1]
    code = block.split("```python\n", 1)[1].split("```", 1)[0]
    result = shell.python(code)
    # The evaluation the block prints: the Distiller's metrics on the user's labels.
    metrics = json.loads(re.findall(r"\{.*\}", result.stdout)[-1].replace("'", '"'))
    assert {"student_top1", "teacher_top1", "agreement", "kl"} <= set(metrics), metrics
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("student_top1", "teacher_top1", "agreement"))
    assert "ran out of data" not in result.stdout + result.stderr
    assert (shell.cwd / "student.keras").is_file()

    check = shell.python(_CHECK)
    logits = json.loads(check.stdout.split("RESULT", 1)[1])
    keras_logits, saved_logits = np.array(logits["keras"]), np.array(logits["saved_model"])
    assert keras_logits.shape == (16, 10)
    np.testing.assert_allclose(saved_logits, keras_logits, atol=1e-4)
