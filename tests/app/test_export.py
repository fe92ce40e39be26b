"""Tests for funmatch_keras.app.export: `funmatch export` of a workdir's student.

The writers and their parity targets are tested in tests/export/test_formats.py; these
check the workdir side: finding the student, the config's images, the report.
"""

import json
import re

import keras
import pytest

from funmatch_keras import configs
from funmatch_keras.app import export as ship
from funmatch_keras.export import formats as fx

SIZE = 32  # the input size of tests/conftest.py's `tiny_student` and `student`

# Under pytest-xdist (`make test`), the tests sharing this module's fixtures
# run in one worker, so the fixtures are built once.
pytestmark = pytest.mark.xdist_group("ship")


def test_run_export_without_student(tmp_path):
    with pytest.raises(FileNotFoundError, match="no trained student at .*\\.keras"):
        ship.run_export(tmp_path, ["keras"])


def test_run_export_takes_images_from_the_workdir_config(tmp_path, tiny_student):
    tiny_student().save(tmp_path / "student.keras")
    config = configs.from_json(json.dumps({"dataset": "digits", "student_size": SIZE}))
    (tmp_path / "config.json").write_text(configs.to_json(config))
    test_images, train_images = ship.workdir_images(tmp_path, 20)
    assert test_images.shape == train_images.shape == (20, SIZE, SIZE, 3)
    assert test_images.min() >= -1.0 and test_images.max() <= 1.0
    report = ship.run_export(tmp_path, ["keras"], num_images=20)
    assert "eval_data" not in report and report["num_eval_images"] == 20
    assert report["image_size"] == SIZE


@pytest.mark.slow
def test_run_export_from_workdir(student, digits, tmp_path):
    student.save(tmp_path / "student.keras")
    eval_images = digits[2][:32]
    report = ship.run_export(tmp_path, ["keras", "tflite_fp32"], eval_images=eval_images)
    assert (tmp_path / "export" / "student_fp32.tflite").is_file()
    assert (tmp_path / "export" / fx.REPORT_NAME).is_file()
    assert report["artifacts"]["tflite_fp32"]["agreement"] == 1.0
    with pytest.raises(FileExistsError, match="--overwrite"):
        ship.run_export(tmp_path, ["tflite_fp32"], eval_images=eval_images)
    report = ship.run_export(tmp_path, ["tflite_fp32"], overwrite=True)
    assert report["eval_data"] == "synthetic"
    on_disk = json.loads((tmp_path / "export" / fx.REPORT_NAME).read_text())
    assert on_disk == report


def test_num_images_must_be_positive(tmp_path, capsys, tiny_student):
    from funmatch_keras.app import cli

    tiny_student().save(tmp_path / "student.keras")
    with pytest.raises(ValueError, match=r"num_images must be a positive.*--num_images=500"):
        ship.run_export(tmp_path, ["keras"], num_images=0)
    with pytest.raises(SystemExit) as exit:
        cli.main(["export", f"--workdir={tmp_path}", "--num_images=0"])
    assert exit.value.code == 2
    assert "--num_images: must be at least 1" in capsys.readouterr().err


def test_export_to_output_dir_when_the_workdir_cannot_be_written(tmp_path, monkeypatch,
                                                                 capsys, tiny_student):
    from funmatch_keras.app import cli

    workdir = tmp_path / "run"
    workdir.mkdir()
    tiny_student().save(workdir / "student.keras")
    (workdir / "export").write_text("not a directory")  # the default cannot be made
    with pytest.raises(PermissionError, match=r"run/export.*--output_dir="):
        ship.run_export(workdir, ["keras"])
    assert cli.main(["export", f"--workdir={workdir}", "--formats=keras"]) == 2
    assert "--output_dir=" in capsys.readouterr().err
    out = tmp_path / "elsewhere"
    assert cli.main(["export", f"--workdir={workdir}", "--formats=keras",
                     f"--output_dir={out}"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [fx.REPORT_NAME, "student.keras"]

    def read_only(*args, **kwargs):  # as a read-only mount does, even for root
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(ship.tempfile, "mkstemp", read_only)
    with pytest.raises(PermissionError, match=r"Permission denied.*--output_dir"):
        ship.run_export(workdir, ["keras"], out_dir=tmp_path / "other")


def test_truncated_student_is_named_not_missing(tmp_path, tiny_student):
    tiny_student().save(tmp_path / "student.keras")
    data = (tmp_path / "student.keras").read_bytes()
    (tmp_path / "student.keras").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"student\.keras.*truncated or corrupt"):
        ship.run_export(tmp_path, ["keras"])


def _digits_workdir(path, model):
    model.save(path / "student.keras")
    config = configs.from_json(json.dumps({"dataset": "digits", "student_size": SIZE}))
    (path / "config.json").write_text(configs.to_json(config))


@pytest.mark.parametrize("classes, size, says", [
    (3, SIZE, r"outputs \[\(None, 3\)\], config.json says 10 classes \(dataset 'digits'\)"),
    (10, 24, r"takes 24 px images, config.json says student_size=32"),
])
def test_a_student_that_does_not_match_config_json(tmp_path, capsys, classes, size, says,
                                                   tiny_student):
    from funmatch_keras.app import cli
    from funmatch_keras.app.evaluate import evaluate_workdir

    model = tiny_student(input_size=size)
    if classes != 10:
        model = keras.Model(model.input, keras.layers.Dense(classes)(model.layers[-2].output))
    _digits_workdir(tmp_path, model)
    fix = r"student\.keras does not match the config\.json.*Put back the student\.keras"
    with pytest.raises(ValueError, match=f"{fix}") as error:
        ship.run_export(tmp_path, ["keras"])
    assert re.search(says, str(error.value)), error.value
    with pytest.raises(ValueError, match=says):
        evaluate_workdir(str(tmp_path))
    assert cli.main(["export", f"--workdir={tmp_path}", "--formats=keras"]) == 2
    assert re.search(says, capsys.readouterr().err)
    assert not (tmp_path / "export").exists()  # nothing to refuse a rerun


def test_no_formats_given(tmp_path, capsys, tiny_student):
    from funmatch_keras.app import cli

    tiny_student().save(tmp_path / "student.keras")
    assert cli.main(["export", f"--workdir={tmp_path}", "--formats="]) == 2
    assert "error: No export formats given; choose from keras, saved_model" in (
        capsys.readouterr().err)
    assert not (tmp_path / "export").exists()


def test_two_exports_keep_both_records(tmp_path, capsys, tiny_student):
    from funmatch_keras.app import cli

    tiny_student().save(tmp_path / "student.keras")
    assert cli.main(["export", f"--workdir={tmp_path}", "--formats=keras,saved_model"]) == 0
    report_path = tmp_path / "export" / fx.REPORT_NAME
    first = json.loads(report_path.read_text())["artifacts"]
    capsys.readouterr()
    assert cli.main(["export", f"--workdir={tmp_path}", "--formats=tflite_fp32"]) == 0
    report = json.loads(report_path.read_text())["artifacts"]
    assert sorted(report) == ["keras", "saved_model", "tflite_fp32"]
    assert {f: report[f] for f in first} == first
    table = capsys.readouterr().out  # lists every record, too
    assert all(re.search(f"^{f} ", table, re.M) for f in report), table


def test_a_failed_conversion_is_an_error_message_and_changes_nothing(tmp_path, capsys,
                                                                     monkeypatch, tiny_student):
    import tensorflow as tf

    from funmatch_keras.app import cli

    class FailingConverter:
        target_spec = type("Spec", (), {})()

        def convert(self):
            raise RuntimeError("'tf.Igamma' op is neither a custom op nor a flex op")

    tiny_student().save(tmp_path / "student.keras")
    monkeypatch.setattr(tf.lite.TFLiteConverter, "from_saved_model",
                        lambda *a, **k: FailingConverter())
    assert cli.main(["export", f"--workdir={tmp_path}", "--formats=keras,tflite_fp32"]) == 2
    assert "error: TFLite conversion (fp32) failed; ops with no TFLite built-in kernel: " \
           "tf.Igamma" in capsys.readouterr().err
    assert not (tmp_path / "export").exists()
    monkeypatch.undo()  # the same command, rerun, exports
    assert cli.main(["export", f"--workdir={tmp_path}", "--formats=keras,tflite_fp32"]) == 0


def test_a_student_keras_with_a_lambda_gets_a_fix_not_safe_mode(tmp_path, capsys):
    from funmatch_keras.app import cli

    inputs = keras.Input((SIZE, SIZE, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Lambda(lambda x: x)(inputs))
    keras.Model(inputs, keras.layers.Dense(3)(pooled)).save(tmp_path / "student.keras")
    assert cli.main(["export", f"--workdir={tmp_path}", "--formats=keras"]) == 2
    err = capsys.readouterr().err
    assert "student.keras' holds a Python lambda" in err and "safe_mode" not in err
    assert "register_keras_serializable" in err
    assert not (tmp_path / "export").exists()
