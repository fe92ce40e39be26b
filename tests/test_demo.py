import json

import keras
import numpy as np
import pytest

from funmatch_keras import cli, data, sources


@pytest.mark.slow
def test_demo_command_writes_table_student_plot_and_honest_report(tmp_path, capsys):
    workdir = tmp_path / "demo"
    assert cli.main(["demo", f"--workdir={workdir}", "--epochs=2", "--teacher_epochs=2",
                     "--verbose=0"]) == 0
    out = capsys.readouterr().out
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


def test_demo_rejects_unknown_options(tmp_path):
    from funmatch_keras.demo import run_demo

    with pytest.raises(ValueError, match="Unknown config field 'epochz'"):
        run_demo(str(tmp_path), epochz=3)
