"""The run's teacher compute path: tuned once at the start, kept in the workdir, reused on resume.

`config.jit_compile` and `config.teacher_dtype` left at None mean "choose":
a run long enough to pay for it times the candidate paths (`tune`) within
`config.teacher_path_budget` of its planned time, and writes the choice and
its table to `teacher_path.json`. A resumed run reads that file back, so it
neither re-tunes nor changes path; a run too short to pay (the demo, smoke
runs), one on several replicas, or one resumed from a workdir written before
this file existed takes `tune.default_path`. Explicit settings are used as
given.

Example:
>>> from funmatch_keras import configs
>>> config = configs.load_config("digits:smoke=True")
>>> decision(config, total_steps=4, num_replicas=1, resumed=False)[1]  # doctest: +ELLIPSIS
'run too short to tune: teacher_path_budget 0.015 of 4 steps is 0.06, tuning takes ...'
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable

import ml_collections
import tensorflow as tf

from funmatch_keras import atomic
from funmatch_keras.app import build
from funmatch_keras.app import workdir as workdirs
from funmatch_keras.data import pipelines as data
from funmatch_keras.distiller import Distiller
from funmatch_keras.tuning import tune

PATH_FILE = workdirs.TEACHER_PATH_FILE
TIMED_STEPS = 3  # per candidate, after one untimed step that compiles
# What a compilation costs, in steps, as a floor: about 3 for BiT-R152x2 at 128 px,
# about 170 for the demo's small CNNs (whose runs, of 1,520 steps, are not tuned).
COMPILE_STEPS = 20
# Tuning pays once the default path and one alternative fit in the budget: the
# candidates are ordered cheapest compilation first, and the tuner's own budget
# leaves the rest untimed. (All six on an AMX CPU would keep a 6,500-step Pets
# run, 1,000 epochs at batch 512, from the 1.9x of a bfloat16 teacher.)
MIN_CANDIDATES = 2


def decision(config: ml_collections.ConfigDict, total_steps: int, num_replicas: int,
             resumed: bool) -> tuple[tune.TeacherPath | None, str]:
    """The path to take without timing anything, and why; `(None, why)` means tune."""
    default = tune.default_path(build.teacher_dtype(config))
    if config.jit_compile is not None:
        default = dataclasses.replace(default, jit_compile=config.jit_compile)
        if config.teacher_dtype is not None:
            return default, "set in the config"
    if config.mode == "fixed_teacher":
        return default, "fixed teacher: its logits are computed once, not per step"
    if num_replicas > 1:
        return default, f"not tuned on {num_replicas} replicas"
    needed = (min(len(_candidates(config)), MIN_CANDIDATES)
              * (COMPILE_STEPS + TIMED_STEPS + 1))
    if config.teacher_path_budget * total_steps < needed:
        return default, (f"run too short to tune: teacher_path_budget "
                         f"{config.teacher_path_budget:g} of {total_steps} steps is "
                         f"{config.teacher_path_budget * total_steps:.3g}, tuning takes {needed}")
    # Only a run that tunes writes the file: the reasons above hold on resume as well.
    if resumed:
        return default, (f"resumed run without {PATH_FILE}: its workdir was written "
                         "before runs kept their tuned path")
    return None, "tuned"


def choose(config: ml_collections.ConfigDict, distiller: Distiller, workdir: str, *,
           total_steps: int, num_replicas: int, resumed: bool, is_chief: bool,
           sample_batch: Callable[[], Any], agreement_data: Callable[[], Any],
           verbose: int = 1) -> tuple[Distiller, dict[str, Any]]:
    """The distiller on the run's path, and what `report.json` says of it.

    `sample_batch()` gives one training batch and `agreement_data()` the
    agreement images; both are called only when the run tunes.
    """
    path_file = os.path.join(workdir, PATH_FILE)
    if os.path.exists(path_file):
        with open(path_file) as f:
            saved = json.load(f)
        path = tune.TeacherPath.from_dict(saved["choice"])
        saved["reason"] = f"read from {PATH_FILE}"
        _say(verbose, f"Teacher path {path.name}, {saved['reason']}.")
        return tune.apply(distiller, path), saved
    path, reason = decision(config, total_steps, num_replicas, resumed)
    if path is not None:
        _say(verbose, f"Teacher path {path.name} ({reason}).")
        return tune.apply(distiller, path), {"choice": path.to_dict(), "name": path.name,
                                             "reason": reason}
    result = tune.teacher_path(
        distiller, sample_batch(), agreement_data(), paths=_candidates(config),
        steps=TIMED_STEPS, agreement_min=config.teacher_agreement_min,
        budget_steps=config.teacher_path_budget * total_steps,
        log=print if verbose else None)
    info = result.to_dict() | {"reason": reason}
    if is_chief:
        atomic.write_json(path_file, info)
    return tune.apply(distiller, result.choice), info


def agreement_dataset(config: ml_collections.ConfigDict, source,
                      teacher_size) -> tf.data.Dataset:
    """The first `config.teacher_agreement_images` validation images, as eval batches."""
    count = config.teacher_agreement_images
    batch = min(config.eval_batch_size, count)
    ds = data.eval_pipeline(source, size=config.student_size, batch_size=batch,
                            teacher_size=teacher_size)
    return ds.take(math.ceil(count / batch))


def _candidates(config: ml_collections.ConfigDict) -> list[tune.TeacherPath]:
    """`tune.candidates`, restricted to the setting the config fixes, if one."""
    paths = tune.candidates(build.teacher_dtype(config))
    if config.jit_compile is not None:
        paths = [p for p in paths if p.jit_compile == config.jit_compile]
    if config.teacher_dtype is not None:
        paths = [p for p in paths if p.teacher_dtype == config.teacher_dtype]
    return paths


def _say(verbose: int, line: str) -> None:
    if verbose:
        print(line, flush=True)
