"""Files the version before the layout change wrote (commit 5347cdf) work with this one.

`tests/files/written_by_5347cdf/` holds what that version wrote (its
`write_files.py` says how): a `.keras` file per class the package registers,
with the logits that version computed, and a `funmatch distill` workdir killed
right after its step-2 checkpoint. Nothing here is rewritten by this version:
the loaders meet the earlier module paths and config as users' files hold them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

FILES = Path(__file__).resolve().parents[1] / "files" / "written_by_5347cdf"
REGISTERED = ("StdConv2D", "DistillationKL", "Shampoo", "BitHyperRuleSchedule")


def test_every_registered_class_loads_from_a_file_the_earlier_version_saved(shell):
    code = f"""
    import json, sys
    import keras, funmatch_keras  # a user's import order
    import numpy as np
    folder = {str(FILES)!r}
    x = np.load(folder + "/x.npy")
    out = {{}}
    for name in {REGISTERED!r}:
        model = keras.saving.load_model(f"{{folder}}/{{name}}.keras")  # Keras's defaults
        out[name] = {{"logits": np.asarray(model(x)).tolist(),
                     "optimizer": type(getattr(model, "optimizer", None)).__name__}}
    print("RESULT" + json.dumps(out))
    """
    result = shell.python(code)
    loaded = json.loads(result.stdout.split("RESULT", 1)[1])
    for name in REGISTERED:
        expected = np.load(FILES / f"{name}.logits.npy")
        np.testing.assert_allclose(loaded[name]["logits"], expected, atol=1e-6, err_msg=name)
    assert loaded["Shampoo"]["optimizer"] == "Shampoo"
    assert loaded["BitHyperRuleSchedule"]["optimizer"] == "SGD"


def test_all_registered_classes_have_a_file():
    """A class registered later has no earlier file: this list must not shrink."""
    from funmatch_keras import keras_objects

    names = {name.split(">", 1)[1] for name in keras_objects.registered()}
    assert set(REGISTERED) <= names


@pytest.mark.slow
def test_a_workdir_the_earlier_version_left_after_a_kill_resumes(shell, tmp_path):
    workdir = tmp_path / "workdir"
    shutil.copytree(FILES / "workdir", workdir)
    command = json.loads((FILES / "command.json").read_text())
    result = shell.funmatch("distill", *command, f"--workdir={workdir}")
    output = result.stdout + result.stderr
    assert "Resuming distillation from step 2 of 4" in output, output[-3000:]
    report = json.loads((workdir / "report.json").read_text())
    assert report["steps"] == 4 and (workdir / "student.keras").exists()
    # The teacher the earlier version trained is the one used, not retrained.
    assert (workdir / "teacher.keras").read_bytes() == (
        FILES / "workdir" / "teacher.keras").read_bytes()
