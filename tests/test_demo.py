import contextlib
import io
import json

import keras
import numpy as np
import pytest

from funmatch_keras import cli, data, sources

# Under pytest-xdist (`make test`), the tests sharing this module's fixtures
# run in one worker, so the fixtures are built once.
pytestmark = pytest.mark.xdist_group("demo")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One short `funmatch demo` run shared by the tests below: (workdir, stdout)."""
    workdir = tmp_path_factory.mktemp("demo") / "out"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["demo", f"--workdir={workdir}", "--epochs=2", "--teacher_epochs=2",
                         "--verbose=0"])
    assert code == 0
    return workdir, out.getvalue()


@pytest.mark.slow
def test_demo_command_writes_table_student_plot_and_honest_report(demo_run):
    workdir, out = demo_run
    for row in ("teacher", "label-trained student", "distilled student"):
        assert row in out
    assert (workdir / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((workdir / "report.json").read_text())
    assert len(report["curves"]["distilled_top1"]) == 2
    # The reported accuracy is the saved student's, recomputed independently.
    student = keras.saving.load_model(workdir / "student.keras", safe_mode=True)
    test = data.eval_pipeline(sources.digits_source("test"), size=16, batch_size=600)
    images, labels = next(iter(test.as_numpy_iterator()))
    top1 = np.mean(student.predict(images, verbose=0).argmax(-1) == labels)
    assert report["results"]["distilled student"]["top1"] == pytest.approx(top1)
    assert report["distillation_beats_baseline"] == (
        report["results"]["distilled student"]["top1"]
        >= report["results"]["label-trained student"]["top1"])
    assert json.loads((workdir / "config.json").read_text())["dataset"] == "digits"


@pytest.mark.slow
def test_export_command_on_a_demo_workdir_uses_its_test_and_train_images(demo_run, capsys):
    workdir, _ = demo_run
    assert cli.main(["export", f"--workdir={workdir}", "--formats=tflite_fp32,tflite_int8",
                     "--num_images=64"]) == 0
    report = json.loads((workdir / "export" / "export_report.json").read_text())
    assert report.get("eval_data") != "synthetic" and report["num_eval_images"] == 64
    assert report["artifacts"]["tflite_fp32"]["agreement"] == 1.0
    assert report["artifacts"]["tflite_fp32"]["max_abs_logit_diff"] <= 1e-4
    # A second export without --overwrite refuses and names the fix.
    assert cli.main(["export", f"--workdir={workdir}", "--formats=tflite_fp32"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_demo_rejects_unknown_options(tmp_path):
    from funmatch_keras.demo import run_demo

    with pytest.raises(ValueError, match="Unknown config field 'epochz'"):
        run_demo(str(tmp_path), epochz=3)
