"""The Colab notebook runs top to bottom (nbclient, a real kernel) in its smoke mode.

`FUNMATCH_SMOKE=1` shrinks the run to seconds; `FUNMATCH_SKIP_INSTALL=1` makes the
install cell a no-op (this environment has the package, and tests have no network).
tfds reads `tfds.testing.mock_data` in the kernel: the test puts one setup cell in
front of the notebook's own cells, which all run unchanged.
"""

import json
import os

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "examples", "funmatch_tpu.ipynb")
MOCK_TFDS = (
    "import tensorflow_datasets as tfds\n"
    "_mock_tfds = tfds.testing.mock_data(num_examples=48)  # offline, random images\n"
    "_mock_tfds.__enter__()"
)
REPORTS = "import json\nprint('REPORTS ' + json.dumps({'train': report, "\
          "'export': {k: sorted(v) for k, v in export_report['artifacts'].items()}}))"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tpu_notebook_runs_top_to_bottom_in_smoke_mode(tmp_path, monkeypatch):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    install = "".join(notebook.cells[1].source)
    # The install cell installs from the repository (no package index has it).
    assert "funmatch-keras[onnx] @ {source}" in install and "FUNMATCH_SKIP_INSTALL" in install
    own_cells = len(notebook.cells)
    notebook.cells.insert(0, nbformat.v4.new_code_cell(MOCK_TFDS))
    notebook.cells.append(nbformat.v4.new_code_cell(REPORTS))
    monkeypatch.setenv("FUNMATCH_SMOKE", "1")
    monkeypatch.setenv("FUNMATCH_SKIP_INSTALL", "1")
    monkeypatch.setenv("FUNMATCH_WORKDIR", str(tmp_path / "pets"))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    monkeypatch.delenv("FUNMATCH_TEACHER", raising=False)
    client = nbclient.NotebookClient(notebook, timeout=240, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on any cell's error
    executed = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in executed)
    assert len(notebook.cells) == own_cells + 2
    outputs = "".join(o.get("text", "") for o in executed[1].outputs)
    assert "FUNMATCH_SKIP_INSTALL=1" in outputs  # the install cell did nothing
    last = "".join(o.get("text", "") for o in executed[-1].outputs)
    reports = json.loads(last.split("REPORTS ", 1)[1])
    assert 0.0 <= reports["train"]["agreement"] <= 1.0
    assert set(reports["export"]) == {"saved_model", "tflite_fp16", "onnx"}
    assert "max_abs_logit_diff" in reports["export"]["onnx"]
    assert (tmp_path / "pets" / "export" / "student.onnx").is_file()
