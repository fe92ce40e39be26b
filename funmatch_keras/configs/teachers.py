"""The teachers of a config, in one normalised form (`TeacherSpec` per teacher).

A config names its teachers in one of two ways:

- big_vision style, `config.teachers = [{"model": ..., "weights": ..., "size": ...}]`,
  one dict per teacher (`weights` and `size` may be left out);
- the shorthand fields `teacher`, `teacher_weights` and `teacher_size`, each
  a value for one teacher or a list with one entry per teacher of an ensemble.

Everything downstream reads `teacher_specs(config)`, never the raw fields.

Example:
>>> import ml_collections
>>> config = ml_collections.ConfigDict(dict(
...     teachers=None, teacher=["cnn:16", "cnn:32"], teacher_weights=None,
...     teacher_size=[32, 48], student_size=32))
>>> [(t.model, t.size) for t in teacher_specs(config)]
[('cnn:16', 32), ('cnn:32', 48)]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import ml_collections

TEACHER_KEYS = ("model", "weights", "size")
# The shorthand fields that `teachers` replaces.
SHORTHAND_FIELDS = ("teacher", "teacher_weights", "teacher_size")


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
    """One teacher: a `models.build` spec, its weights file or None, its input side."""

    model: str
    weights: str | None
    size: int


def _per_teacher(value: Any, count: int) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value] * count


def _raw_teachers(config: ml_collections.ConfigDict) -> list[dict]:
    """The teachers as dicts, from `teachers` or the shorthand, not yet checked."""
    if config.get("teachers") is not None:
        return [dict(t) if isinstance(t, dict) or hasattr(t, "items") else t
                for t in config.teachers]
    models = _per_teacher(config.teacher, 1)
    weights = _per_teacher(config.teacher_weights, len(models))
    sizes = _per_teacher(config.teacher_size, len(models))
    return [{"model": m, "weights": w, "size": s} for m, w, s in zip(models, weights, sizes)]


def teacher_specs(config: ml_collections.ConfigDict) -> list[TeacherSpec]:
    """The config's teachers, one `TeacherSpec` each (size defaults to `student_size`).

    Call `configs.validate` first: this assumes well-formed fields.

    Args:
        config: a config with the fields of `configs.common.FIELDS`.

    Returns:
        A list of `TeacherSpec`, one per teacher (several: an ensemble).
    """
    return [TeacherSpec(t["model"], t.get("weights"), t.get("size") or config.student_size)
            for t in _raw_teachers(config)]


def teacher_sizes(config: ml_collections.ConfigDict) -> int | list[int]:
    """The teachers' input side; a list when an ensemble's teachers differ (224+384).

    Example:
    >>> import ml_collections
    >>> teacher_sizes(ml_collections.ConfigDict(dict(
    ...     teachers=[{"model": "a"}, {"model": "b", "size": 384}], student_size=224)))
    [224, 384]
    """
    sizes = [spec.size for spec in teacher_specs(config)]
    return sizes[0] if len(set(sizes)) == 1 else sizes


def canonical(config: ml_collections.ConfigDict) -> dict:
    """The config as a dict whose teachers are always a `teachers` list.

    Two configs that name the same teachers in different forms (shorthand or
    `teachers`) give the same dict, so a workdir written with one resumes with
    the other.
    """
    values = config.to_dict()
    values["teachers"] = [{"model": t["model"], "weights": t.get("weights"),
                           "size": t.get("size") or config.student_size}
                          for t in _raw_teachers(config)]
    for name in SHORTHAND_FIELDS:
        values.pop(name, None)
    return values


def check_teachers(config: ml_collections.ConfigDict,
                   check: Callable[[bool, str, str], None],
                   positive_int: Callable[[Any], bool]) -> None:
    """Adds the errors of the teacher fields through `check(ok, message, name)`."""
    if config.get("teachers") is not None:
        _check_teachers_list(config, check, positive_int)
        return
    teachers = config.teacher if isinstance(config.teacher, list) else [config.teacher]
    check(bool(teachers) and all(isinstance(t, str) and t for t in teachers),
          "must be a model spec or a non-empty list of them", "teacher")
    per_teacher = "must have one entry per teacher (teacher is a list of {})"
    sizes = config.teacher_size
    if isinstance(sizes, list):
        check(len(sizes) == len(teachers) and isinstance(config.teacher, list),
              per_teacher.format(len(teachers)), "teacher_size")
        check(all(positive_int(s) for s in sizes), "must hold positive ints", "teacher_size")
    else:
        check(sizes is None or positive_int(sizes), "must be a positive int or None",
              "teacher_size")
    weights = config.teacher_weights
    if isinstance(weights, list):
        check(len(weights) == len(teachers) and isinstance(config.teacher, list),
              per_teacher.format(len(teachers)), "teacher_weights")
        check(all(w is None or isinstance(w, str) for w in weights),
              "must hold paths or None", "teacher_weights")


def _check_teachers_list(config, check, positive_int) -> None:
    teachers = config.teachers
    example = '[{"model": "bit_r152x2", "weights": "/path/t.npz", "size": 224}]'
    if not isinstance(teachers, (list, tuple)) or not teachers:
        check(False, f"must be a non-empty list of dicts like {example}", "teachers")
        return
    for i, teacher in enumerate(teachers):
        if not hasattr(teacher, "keys"):
            check(False, f"must hold dicts like {example} (entry {i} is not)", "teachers")
            continue
        unknown = sorted(set(teacher.keys()) - set(TEACHER_KEYS))
        check(not unknown, f"entry {i} has unknown keys {unknown}; the keys are "
              f"{list(TEACHER_KEYS)}", "teachers")
        model, weights, size = (teacher.get(k) for k in TEACHER_KEYS)
        check(isinstance(model, str) and bool(model),
              f"entry {i} needs a 'model' spec (a string)", "teachers")
        check(weights is None or isinstance(weights, str),
              f"entry {i}: 'weights' must be a path or None", "teachers")
        check(size is None or positive_int(size),
              f"entry {i}: 'size' must be a positive int or None", "teachers")
    for name in ("teacher_weights", "teacher_size"):
        check(config[name] is None, "must be None when `teachers` is given (set each "
              "teacher's 'weights' and 'size' in `teachers`)", name)
