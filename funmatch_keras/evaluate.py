"""`funmatch evaluate`: a workdir's student (and teacher) on a split."""

from __future__ import annotations

import glob
import os

import keras

from funmatch_keras import configs, data, sources, train
from funmatch_keras.distiller import Distiller


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
    config_path = os.path.join(workdir, "config.json")
    student_path = os.path.join(workdir, "student.keras")
    for path, fix in ((config_path, "is this a workdir of `funmatch distill`?"),
                      (student_path, "run `funmatch distill` (or `funmatch demo`) first")):
        if not os.path.exists(path):
            raise FileNotFoundError(f"No {os.path.basename(path)} in {workdir!r}: {fix}.")
    with open(config_path) as f:
        config = configs.from_json(f.read())
    student = keras.saving.load_model(student_path, safe_mode=True)
    source = sources.source_for(config.dataset, split, config.data_dir)
    if train._is_fresh(str(train._as_list(config.teacher)[0])) and not config.teacher_weights \
            and not glob.glob(os.path.join(workdir, "teacher*.keras")):
        raise FileNotFoundError(f"The workdir {workdir!r} has no trained teacher.keras.")
    teachers = train.build_teachers(config, source.num_classes, workdir, source, verbose=0)
    distiller = Distiller(teachers if len(teachers) > 1 else teachers[0], student,
                          temperature=config.temperature)
    distiller.compile()
    ds = data.eval_pipeline(source, size=config.student_size,
                            batch_size=config.eval_batch_size,
                            teacher_size=train.teacher_input_size(config))
    return {k: float(v) for k, v in distiller.evaluate(ds, verbose=0, return_dict=True).items()}
