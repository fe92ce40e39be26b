"""`funmatch evaluate`: a workdir's student (and teacher) on a split."""

from __future__ import annotations

import os

from funmatch_keras import configs
from funmatch_keras.app import build
from funmatch_keras.app import workdir as workdirs
from funmatch_keras.app.export import check_student
from funmatch_keras.data import pipelines as data
from funmatch_keras.distiller import Distiller
from funmatch_keras.export.verify import load_keras_model
from funmatch_keras.training import steplog


def evaluate_workdir(workdir: str, split: str = "test") -> dict[str, float]:
    """Top-1 of student and teacher, their agreement and KL(teacher ‖ student) on a split.

    Args:
        workdir: str. A workdir of `funmatch distill` (or `funmatch demo`).
        split: str. `"train"`, `"validation"` or `"test"`. Defaults to `"test"`.

    Returns:
        Dict with `student_top1`, `teacher_top1`, `agreement`, `kl` and `loss`.

    Example:
    >>> evaluate_workdir("demo_out")  # doctest: +SKIP
    {'agreement': 0.99, 'kl': 0.01, 'loss': 0.01, 'student_top1': 0.98, 'teacher_top1': 0.99}
    """
    config = workdirs.read_config(workdir)
    student_path = os.path.join(workdir, workdirs.STUDENT_FILE)
    if not os.path.exists(student_path):
        raise FileNotFoundError(f"No {workdirs.STUDENT_FILE} in {workdir!r}: run "
                                "`funmatch distill` (or `funmatch demo`) first.")
    student = load_keras_model(student_path)  # safe_mode; clear if truncated
    source = build.source(config, split)
    check_student(student, student_path, config, source.num_classes)
    teachers = build.teachers(config, source.num_classes, workdir)
    distiller = Distiller(teachers if len(teachers) > 1 else teachers[0], student,
                          temperature=config.temperature)
    distiller.compile()
    ds = data.eval_pipeline(source, size=config.student_size,
                            batch_size=config.eval_batch_size,
                            teacher_size=configs.teacher_sizes(config))
    return steplog.evaluate(distiller, ds)
