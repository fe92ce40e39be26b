import contextlib
import io
import json

import keras
import numpy as np
import pytest

from funmatch_keras.app import cli
from funmatch_keras.data import pipelines as data
from funmatch_keras.data import sources

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
    from funmatch_keras.app.demo import run_demo

    with pytest.raises(ValueError, match="Unknown config field 'epochz'"):
        run_demo(str(tmp_path), epochz=3)


def _report(teacher, label, distilled, epochs=3):
    """A demo report with the given test top-1 per row, and flat curves."""
    rows = {"teacher": teacher, "label-trained student": label, "distilled student": distilled}
    return {"results": {name: {"top1": top1, "agreement": top1, "params": 100}
                        for name, top1 in rows.items()},
            "gap": distilled - label, "steps": 30, "wall_time_s": 12.0,
            "curves": {f"{key}_{metric}": [value] * epochs
                       for key, value in (("distilled", distilled), ("baseline", label))
                       for metric in ("top1", "agreement")}}


def test_demo_table_prints_this_run_beside_the_reference_figures():
    from funmatch_keras.app.demo import format_table

    reference = {"seeds": (0, 1, 2), "machine": "a test CPU",
                 "top1": {"teacher": (0.9901, 0.0021), "label-trained student": (0.9500, 0.004),
                          "distilled student": (0.9650, 0.003)},
                 "agreement": {"teacher": (1.0, 0.0), "label-trained student": (0.95, 0.004),
                               "distilled student": (0.97, 0.002)},
                 "gap": (0.015, 0.011)}
    table = format_table(_report(0.99, 0.9444, 0.9611), reference)
    teacher_line = next(line for line in table.splitlines() if line.startswith("teacher"))
    assert "99.00%" in teacher_line and "99.01% ± 0.21%" in teacher_line
    assert "+1.67 points this run" in table  # 96.11 − 94.44
    assert "+1.50 mean, +1.10 worst seed" in table and "a test CPU" in table


def test_demo_reference_is_the_readme_table():
    import pathlib

    from funmatch_keras.app.demo import REFERENCE

    readme = (pathlib.Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("## The demo", 1)[1].split("\n## ", 1)[0]
    for name, (mean, std) in REFERENCE["top1"].items():
        line = next(line for line in section.splitlines() if line.startswith(f"| {name} |"))
        assert f"{mean:.2%} ± {std:.2%}" in line, (name, line)
    gap_mean, gap_worst = REFERENCE["gap"]
    assert f"{gap_mean:+.2%} mean, {gap_worst:+.2%} worst seed" in section
    assert REFERENCE["machine"] in section


def test_demo_teacher_ensemble_predicts_from_averaged_logits():
    from funmatch_keras.app.demo import predict_classes

    def fixed_logits(values):
        model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(3, use_bias=True)])
        model.layers[-1].set_weights([np.zeros((1, 3)), np.array(values, "float32")])
        return model

    # Each model alone picks class 0 or 2; the mean of their logits picks class 1.
    a, b = fixed_logits([5.0, 4.0, -9.0]), fixed_logits([-9.0, 4.0, 5.0])
    images = np.zeros((2, 1), "float32")
    assert predict_classes(a, images).tolist() == [0, 0]
    assert predict_classes([a, b], images).tolist() == [1, 1]


def test_demo_plot_is_a_png_with_top1_and_agreement_panels(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from funmatch_keras.app.demo import plot_curves

    saved = []  # the figure, kept open for inspection instead of closed
    monkeypatch.setattr(plt, "close", saved.append)
    report = _report(0.99, 0.95, 0.97)
    plot_curves(report, str(tmp_path / "demo.png"))
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (fig,) = saved
    top1_ax, agree_ax = fig.axes
    assert "top-1" in top1_ax.get_ylabel() and "agreement" in agree_ax.get_ylabel()
    labels = [text.get_text() for text in top1_ax.get_legend().get_texts()]
    assert labels[0] == "teacher (99.0%)"  # the teacher is a line at its test top-1
    assert any("97.0%" in label for label in labels) and any("95.0%" in label for label in labels)
    assert "+2.0 points" in top1_ax.get_title()


def test_demo_runs_the_digits_demo_variant_and_the_benchmarks_keep_the_default():
    from funmatch_keras import configs
    from funmatch_keras.app.demo import CONFIG

    demo, default = configs.load_config(CONFIG), configs.load_config("digits")
    # Only the student, the crops, the temperature and the length differ; the
    # teacher, the optimizer and the batch are the same.
    assert set(configs.diff(default, demo)) == {
        "student", "crop_area_min", "temperature", "epochs"}
    assert (demo.crop_area_min, default.crop_area_min) == (0.1, 0.25)
    with pytest.raises(ValueError, match="Unknown digits variant"):
        configs.load_config("digits:variant=fast")
