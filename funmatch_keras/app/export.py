"""`funmatch export`: a workdir's student to deployable artifacts, verified.

The app side of `funmatch_keras.export.formats`: `run_export` loads
`<workdir>/student.keras`, takes parity and int8 calibration images from the
dataset named in `<workdir>/config.json` (`workdir_images`) and hands them to
`export.export_all`, which writes `<workdir>/export/` and its report.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from funmatch_keras import configs
from funmatch_keras.app import build
from funmatch_keras.app import workdir as workdirs
from funmatch_keras.data import pipelines as data
from funmatch_keras.export import formats as export
from funmatch_keras.export.verify import load_keras_model

EXPORT_DIR = "export"
# Random parity images when the workdir names no dataset: enough for the logit
# differences to mean something, though the agreement does not.
NUM_SYNTHETIC_IMAGES = 64


def run_export(
    workdir: str | os.PathLike,
    formats: Iterable[str],
    overwrite: bool = False,
    eval_images: Any = None,
    representative_data: Any = None,
    out_dir: str | os.PathLike | None = None,
    num_images: int = 500,
) -> dict[str, Any]:
    """The `funmatch export` entry point: exports `<workdir>/student.keras`.

    When the workdir has a `config.json` (written by `funmatch demo` and
    `funmatch distill`), parity is measured on `num_images` eval-preprocessed
    images of the dataset's test split and int8 is calibrated on as many images
    of its train split (eval preprocessing), unless images are passed.

    Args:
        workdir: str. A training workdir holding `student.keras`.
        formats: list of str. See `export.export_all`.
        overwrite: bool. Replace existing artifacts. Defaults to `False`.
        eval_images: float images in [-1, 1] for the parity check. Defaults to
            `None`: the workdir's test images, else 64 random images, so the
            logit differences are meaningful but the agreement is not (the
            report marks `eval_data: synthetic`).
        representative_data: int8 calibration images. Defaults to `None`.
        out_dir: str. Where the artifacts go (`funmatch export --output_dir`),
            e.g. when the workdir cannot be written. Defaults to
            `<workdir>/export`.
        num_images: int >= 1. Eval and calibration images drawn from the
            workdir's dataset. Defaults to 500.

    Returns:
        The report of `export.export_all`.

    Raises:
        FileNotFoundError: the workdir has no `student.keras`.
        ValueError: `num_images` < 1, no or unknown formats, a truncated
            `student.keras`, or one that does not match `config.json`.
        ExportError: a conversion or its check failed.

    Nothing is written unless every format exports (see `export.export_all`).
        PermissionError: `out_dir` cannot be created or written (the message
            names `--output_dir`).

    Example (a workdir with only `student.keras`, so the parity check uses
    random images):
    >>> import os, tempfile
    >>> from funmatch_keras.export.formats import to_keras
    >>> from funmatch_keras.models import small_cnn
    >>> workdir = tempfile.mkdtemp()
    >>> _ = to_keras(small_cnn([8], num_classes=3, image_size=16),
    ...              os.path.join(workdir, "student.keras"))
    >>> report = run_export(workdir, ["saved_model", "tflite_fp32"])
    >>> report["eval_data"], report["num_eval_images"], sorted(report["artifacts"])
    ('synthetic', 64, ['saved_model', 'tflite_fp32'])
    >>> sorted(os.listdir(os.path.join(workdir, "export")))
    ['export_report.json', 'saved_model', 'student_fp32.tflite']
    """
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(
            "num_images must be a positive number of images for the parity check "
            f"and int8 calibration: pass --num_images=500 (the default) or another "
            f"count >= 1. Received: num_images={num_images!r}")
    formats = export.check_formats(formats)  # before minutes of loading and exporting
    workdir = Path(workdir)
    student_path = workdir / workdirs.STUDENT_FILE
    if not student_path.is_file():
        raise FileNotFoundError(
            f"no trained student at {student_path}: run `funmatch distill` or "
            f"`funmatch demo` first"
        )
    out_dir = Path(out_dir) if out_dir is not None else workdir / EXPORT_DIR
    with export.removed_if_new(out_dir):
        check_writable_dir(out_dir)
        model = load_keras_model(student_path)
        if (workdir / workdirs.CONFIG_FILE).is_file():
            config = workdirs.read_config(str(workdir))
            # The dataset is read only when the images come from it.
            check_student(model, student_path, config, None if eval_images is not None
                          else build.source(config, "test").num_classes)
            if eval_images is None:
                eval_images, calibration = workdir_images(workdir, num_images)
                if representative_data is None:
                    representative_data = calibration
        report_fields = {}
        if eval_images is None:
            size = export.static_image_size(model)
            if size is None:
                raise ValueError(
                    "The student has no static input size, so synthetic eval images "
                    "cannot be made: pass `eval_images`."
                )
            rng = np.random.default_rng(0)
            shape = (NUM_SYNTHETIC_IMAGES, size, size, 3)
            eval_images = rng.uniform(-1, 1, shape).astype(np.float32)
            report_fields["eval_data"] = "synthetic"
        return export.export_all(
            model,
            out_dir,
            formats,
            eval_images=eval_images,
            representative_data=representative_data,
            overwrite=overwrite,
            report_fields=report_fields,
        )


def check_student(model: Any, path: str | os.PathLike, config: Any,
                  num_classes: int | None) -> None:
    """Raises `ValueError` if `model` does not fit the workdir's `config.json`.

    The student of a workdir takes `config.student_size` px images and outputs
    one logit per class: `config.num_classes` if set, else `num_classes` (the
    dataset's; `None`: not checked).

    Example:
    >>> from funmatch_keras.models import small_cnn
    >>> config = configs.from_json('{"dataset": "digits", "student_size": 16}')
    >>> check_student(small_cnn([4], num_classes=10, image_size=16), "s.keras", config, 10)
    >>> student = small_cnn([4], num_classes=3, image_size=24)
    >>> check_student(student, "s.keras", config, 10)
    Traceback (most recent call last):
    ValueError: s.keras does not match the config.json beside it: the model takes 24 px ...
    """
    classes = config.num_classes or num_classes
    size = export.static_image_size(model)
    outputs = model.outputs[0].shape[-1] if len(model.outputs) == 1 else None
    found, expected = [], []
    if size is not None and size != config.student_size:
        found.append(f"takes {size} px images")
        expected.append(f"student_size={config.student_size}")
    if classes is not None and outputs != classes:
        found.append(f"outputs {[tuple(t.shape) for t in model.outputs]}")
        expected.append(f"{classes} classes (dataset {config.dataset!r})")
    if found:
        raise ValueError(
            f"{os.fspath(path)} does not match the config.json beside it: the model "
            f"{' and '.join(found)}, config.json says {' and '.join(expected)}. Put back "
            "the student.keras that `funmatch distill` wrote with this config (rerunning the "
            "same `funmatch distill` command writes it again), or move this model to a "
            "workdir of its own, where `funmatch export` needs only student.keras.")


def check_writable_dir(directory: str | os.PathLike) -> None:
    """Creates `directory` if needed and checks a file can be written in it.

    Raises:
        PermissionError: it cannot be created or written; the message names
            `--output_dir` (`run_export(out_dir=...)`).

    Example:
    >>> import tempfile
    >>> check_writable_dir(os.path.join(tempfile.mkdtemp(), "export"))
    >>> blocker = tempfile.mkstemp()[1]  # a file where a directory should be
    >>> check_writable_dir(os.path.join(blocker, "export"))
    Traceback (most recent call last):
    ...
    PermissionError: Cannot write the export to ...: pass --output_dir=... (run_export(...)).
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=directory)
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        raise PermissionError(
            f"Cannot write the export to {directory} ({error.strerror or error}): "
            "pass --output_dir=<a writable directory> (run_export(out_dir=...))."
        ) from error


def workdir_images(
    workdir: str | os.PathLike, num_images: int
) -> tuple[np.ndarray, np.ndarray]:
    """(test images, train images for calibration) of a workdir's dataset, eval views.

    The dataset, its `data_dir` and the student's input size come from the
    workdir's `config.json`.

    Example (a workdir of the bundled digits):
    >>> import os, tempfile
    >>> workdir = tempfile.mkdtemp()
    >>> config = configs.from_json('{"dataset": "digits", "student_size": 16}')
    >>> with open(os.path.join(workdir, "config.json"), "w") as f:
    ...     _ = f.write(configs.to_json(config))
    >>> test_images, train_images = workdir_images(workdir, 10)
    >>> test_images.shape, train_images.shape, test_images.dtype.name
    ((10, 16, 16, 3), (10, 16, 16, 3), 'float32')
    """
    config_path = Path(workdir) / workdirs.CONFIG_FILE
    config = configs.from_json(config_path.read_text())

    def images(split: str) -> np.ndarray:
        source = build.source(config, split)  # the config's splits, tfds or digits
        batches = data.eval_pipeline(source, size=config.student_size, batch_size=256)
        batches = batches.take(-(-num_images // 256)).as_numpy_iterator()
        return np.concatenate([x for x, _ in batches])[:num_images]

    return images("test"), images("train")
