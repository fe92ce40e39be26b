"""README "Your own models and data (Python)": the block runs as written, and its student
loads in a fresh process and agrees with the SavedModel it exported. README "Sweeps: one
teacher pass", its Python block: the first run records a store, the other three replay it."""

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


_REPLAYED = """
import json, keras, numpy as np, tensorflow as tf
from funmatch_keras.data.teacher_store import TeacherStore
store = TeacherStore(store_dir := "sweep_store", json.load(open(store_dir + "/store.json")))
print("RESULT", json.dumps({"missing": store.missing(0, 24),
                            "shape": list(store.read_chunk(0).shape)}))
"""


def test_the_readme_sweep_block_records_once_and_replays(shell, readme):
    block = readme.text.split("## Sweeps: one teacher pass", 1)[1]
    code = block.split("```python\n", 1)[1].split("```", 1)[0]
    result = shell.python(code)
    losses = re.findall(r"T=(\d+\.\d): loss (\d+\.\d+)", result.stdout)
    assert [t for t, _ in losses] == ["1.0", "2.0", "5.0", "10.0"], result.stdout
    # Each temperature trains its own student. With this untrained teacher the final
    # losses lie within ~1e-3 of each other, so the block prints six decimals (four
    # made two temperatures print the same loss in CI).
    assert len({loss for _, loss in losses}) == 4, losses
    check = shell.python(_REPLAYED)
    stored = json.loads(check.stdout.split("RESULT", 1)[1])
    assert stored == {"missing": [], "shape": [24, 32, 10]}
