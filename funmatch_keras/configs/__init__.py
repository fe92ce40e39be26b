"""Experiment configs, big_vision style: one `get_config(arg)` program per experiment.

`--config=pets37:variant=fast` runs `configs/pets37.py`'s `get_config("variant=fast")`;
`--config=/path/my_config.py:arg` runs a file of your own. Command-line overrides
(`--config.epochs=10`) are applied with `apply_overrides`, then `validate` checks
the result. Every field, its default and its meaning are declared once, in
`common.FIELDS`.

Example:
>>> config = load_config("pets37:variant=fast")
>>> config = apply_overrides(config, {"epochs": "10", "steps_per_epoch": "5"})
>>> validate(config)
>>> config.epochs, config.temperature, config.steps_per_epoch
(10, 5.0, 5)
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import pkgutil
from typing import Any, Mapping, NamedTuple

import ml_collections

from funmatch_keras.configs.common import DATASETS, DTYPES, FIELDS, MODES
from funmatch_keras.configs.overrides import apply_overrides, has_type, type_names
from funmatch_keras.configs.teachers import (
    TeacherSpec,
    canonical,
    check_teachers,
    teacher_sizes,
    teacher_specs,
)
from funmatch_keras.recipe import DIGITS, SPLIT_ROLES, store_encoding_k

__all__ = [
    "TeacherSpec",
    "apply_overrides",
    "diff",
    "Cadence",
    "RESUMABLE_CHANGES",
    "cadence",
    "from_json",
    "list_configs",
    "load_config",
    "teacher_sizes",
    "teacher_specs",
    "to_json",
    "validate",
]

# Modules of this package that are helpers, not configs.
_NOT_CONFIGS = ("common", "overrides", "teachers")
# Evaluations per run when neither `eval_every_steps` nor `eval_every_epochs` is set.
_DEFAULT_EVALS_PER_RUN = 20
# big_vision logs training metrics every 50 steps in most of its configs.
_DEFAULT_LOG_EVERY_STEPS = 50
# Fields that a resume may change (`workdir.prepare`): they say when a run logs,
# evaluates and checkpoints, and how it batches evaluation, never what it trains:
# batches follow the global step whatever the log intervals (`loop`). Everything
# else (data, models, teachers and their path, optimizer, steps, seed) must match.
RESUMABLE_CHANGES = frozenset({
    "eval_batch_size", "keep_checkpoints", "log_every_steps", "checkpoint_every_steps",
    "checkpoint_every_minutes", "eval_every_epochs", "eval_every_steps"})


def list_configs() -> list[str]:
    """Names of the shipped configs (modules of `funmatch_keras.configs`).

    Returns:
        Sorted names, e.g. `["digits", "flowers102", ...]`.

    Example:
    >>> "pets37" in list_configs()
    True
    """
    return sorted(
        info.name
        for info in pkgutil.iter_modules(__path__)
        if not info.name.startswith("_") and info.name not in _NOT_CONFIGS
    )


def _split_spec(spec: str) -> tuple[str, str | None, bool]:
    """`spec` → (name or path, arg, is_path)."""
    if spec.endswith(".py"):
        return spec, None, True
    if ".py:" in spec:
        path, _, arg = spec.partition(".py:")
        return path + ".py", arg, True
    name, has_arg, arg = spec.partition(":")
    return name, (arg if has_arg else None), False


def _module_from_file(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Config file not found. Received: {path!r}")
    module_name = "funmatch_user_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Builds a config from `name[:arg]` (a shipped config) or `path.py[:arg]`.

    The config is not validated here: apply overrides first, then `validate`.

    Args:
        spec: str. `"pets37"`, `"pets37:variant=fast"`, `"/path/mine.py"` or
            `"/path/mine.py:variant=fast"`; a file must define
            `get_config(arg=None)` returning a `ConfigDict`.

    Returns:
        The `ml_collections.ConfigDict` returned by `get_config(arg)`.

    Raises:
        ValueError: unknown config name (the message lists the shipped ones), or
            a file without `get_config`.
        FileNotFoundError: a `.py` path that does not exist.

    Example:
    >>> load_config("imagenet:ensemble=True").teacher_size
    [224, 384]
    """
    target, arg, is_path = _split_spec(spec.strip())
    if is_path:
        module = _module_from_file(target)
    else:
        if target not in list_configs():
            raise ValueError(
                f"Unknown config {target!r}. Available configs: {list_configs()}, or a "
                f"path to a .py file defining get_config(arg). Received: spec={spec!r}"
            )
        module = importlib.import_module(f"{__name__}.{target}")
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ValueError(
            f"Config {target!r} defines no `get_config(arg=None)` function. "
            f"Received: spec={spec!r}"
        )
    config = get_config(arg)
    if not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(
            f"get_config() of {target!r} must return an ml_collections.ConfigDict. "
            f"Received: {type(config).__name__}"
        )
    return config


# -- validation --------------------------------------------------------------


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks a config's fields and values; raises one error listing every problem.

    Args:
        config: `ml_collections.ConfigDict` with the fields of `common.FIELDS`.

    Raises:
        ValueError: missing fields, wrong types or invalid values, e.g.
            `temperature must be > 0. Received: temperature=0.0`.

    Example:
    >>> validate(load_config("digits"))  # passes silently
    """
    errors = []
    for name, field in FIELDS.items():
        if name not in config:
            errors.append(f"missing field {name!r} (build configs with common.base_config)")
        elif not has_type(config[name], field.types):
            errors.append(
                f"{name} must be {type_names(field.types)}. Received: {name}={config[name]!r}"
            )
    if errors:
        raise ValueError("Invalid config:\n  " + "\n  ".join(errors))

    # inf and nan pass `lr > 0` (inf) or fail with a misleading message (nan):
    # every float field must be finite first.
    not_finite = [name for name, field in FIELDS.items() if float in field.types
                  and isinstance(config[name], float) and not math.isfinite(config[name])]
    for name in not_finite:
        errors.append(f"{name} must be a finite number, not {config[name]!r}. "
                      f"Set --config.{name} to a finite value (default {FIELDS[name].default!r})")

    def check(ok: bool, message: str, name: str) -> None:
        if not ok and name not in not_finite:
            errors.append(f"{name} {message}. Received: {name}={config[name]!r}")

    check(config.mode in MODES, f"must be one of {MODES}", "mode")
    _check_dataset(config, errors)
    for name in ("student_size", "batch_size", "epochs", "eval_batch_size",
                 "checkpoint_every_steps", "keep_checkpoints"):
        check(_positive_int(config[name]), "must be a positive int", name)
    check(_positive_int(config.steps_per_execution), "must be a positive int",
          "steps_per_execution")
    check(config.log_every_steps is None or (
        _positive_int(config.log_every_steps) and _positive_int(config.steps_per_execution)
        and config.log_every_steps % config.steps_per_execution == 0),
        "must be None or a positive multiple of steps_per_execution "
        f"({config.steps_per_execution})", "log_every_steps")
    for name in ("steps_per_epoch", "eval_every_epochs", "eval_every_steps",
                 "teacher_epochs"):
        check(config[name] is None or _positive_int(config[name]),
              "must be a positive int or None", name)
    check(config.num_classes is None or (_positive_int(config.num_classes)
                                         and config.num_classes >= 2),
          "must be an int >= 2 or None", "num_classes")
    check(config.warmup_steps >= 0, "must be >= 0", "warmup_steps")
    check(config.checkpoint_every_minutes is None or config.checkpoint_every_minutes > 0,
          "must be > 0 or None", "checkpoint_every_minutes")
    check(config.temperature > 0, "must be > 0", "temperature")
    check(config.lr > 0, "must be > 0", "lr")
    check(config.weight_decay >= 0, "must be >= 0", "weight_decay")
    from funmatch_keras.configs.common import OPTIMIZERS  # noqa: PLC0415

    check(config.optimizer in OPTIMIZERS, f"must be one of {OPTIMIZERS}", "optimizer")
    for name in ("shampoo_block_size", "shampoo_precondition_every",
                 "shampoo_statistics_every", "shampoo_start_preconditioning_step"):
        check(_positive_int(config[name]), "must be a positive int", name)
    check(0 < config.shampoo_beta2 <= 1, "must be in (0, 1]", "shampoo_beta2")
    check(0 < config.crop_area_min <= 1, "must be in (0, 1]", "crop_area_min")
    check(config.dtype in DTYPES, f"must be one of {DTYPES}", "dtype")
    check(config.teacher_dtype is None or config.teacher_dtype in DTYPES,
          f"must be None or one of {DTYPES}", "teacher_dtype")
    check(0 <= config.teacher_path_budget < 1, "must be in [0, 1)", "teacher_path_budget")
    check(0 < config.teacher_agreement_min <= 1, "must be in (0, 1]", "teacher_agreement_min")
    check(_positive_int(config.teacher_agreement_images), "must be a positive int",
          "teacher_agreement_images")
    try:
        if config.teacher_store_encoding is not None:
            store_encoding_k(config.teacher_store_encoding)
    except ValueError as error:
        errors.append(f"teacher_store_encoding: {error}")
    check_teachers(config, check, _positive_int)
    if errors:
        raise ValueError("Invalid config:\n  " + "\n  ".join(errors))


def _check_dataset(config: ml_collections.ConfigDict, errors: list[str]) -> None:
    """A preset (its splits unless `<role>_split` is set), or any tfds name with all three."""
    fields = [f"{role}_split" for role in SPLIT_ROLES]
    given = [name for name in fields if config[name] is not None]
    for name in given:
        if not config[name].strip():
            errors.append(f"{name} must be a tfds split such as 'train[:90%]', or None for "
                          f"the preset's. Received: {name}={config[name]!r}")
    if not config.dataset.strip():
        errors.append(f"dataset must be one of {DATASETS} or a tfds dataset name. "
                      f"Received: dataset={config.dataset!r}")
    elif config.dataset == DIGITS:
        if given:
            errors.append(f"dataset='digits' has fixed splits (70/30 of the bundled digits): "
                          f"leave {', '.join(given)} None, or name a tfds dataset")
    elif config.dataset not in DATASETS:
        missing = [name for name in fields if config[name] is None]
        if missing:
            errors.append(
                f"dataset={config.dataset!r} is not a preset ({', '.join(DATASETS)}), so it "
                f"is read from tfds and needs its splits: set {', '.join(missing)}, e.g. "
                "--config.train_split='train[:90%]' --config.validation_split='train[90%:]' "
                "--config.test_split=test")


class Cadence(NamedTuple):
    """Steps between logs, evaluations and checkpoints of a run (all global steps)."""

    total_steps: int
    log_every_steps: int
    eval_every_steps: int
    checkpoint_every_steps: int


def cadence(config: ml_collections.ConfigDict, steps_per_epoch: int,
            epochs: int | None = None) -> Cadence:
    """The run's step cadence: `epochs` sets the total; logs, evals and checkpoints in steps.

    Logs are every `log_every_steps` (None: 50, or a tenth of a shorter run),
    a multiple of `steps_per_execution`. Evaluations and checkpoints land on
    log steps, so their intervals are rounded up to a multiple of it.
    Evaluations: `eval_every_steps`, else `eval_every_epochs` epochs, else
    about 20 per run.

    `epochs` overrides `config.epochs` (a teacher's label training).

    Example:
    >>> cadence(load_config("pets37:variant=fast"), steps_per_epoch=6)
    Cadence(total_steps=6000, log_every_steps=50, eval_every_steps=300, checkpoint_every_steps=1000)
    """
    total = steps_per_epoch * (config.epochs if epochs is None else epochs)
    per_call = config.steps_per_execution
    log = config.log_every_steps
    if log is None:
        log = _round_up(min(_DEFAULT_LOG_EVERY_STEPS, max(1, total // 10)), per_call)
    if config.eval_every_steps is not None:
        evaluate = config.eval_every_steps
    elif config.eval_every_epochs is not None:
        evaluate = config.eval_every_epochs * steps_per_epoch
    else:
        evaluate = max(1, total // _DEFAULT_EVALS_PER_RUN)
    return Cadence(total, log, _round_up(evaluate, log),
                   _round_up(config.checkpoint_every_steps, log))


def _round_up(steps: int, multiple: int) -> int:
    return max(multiple, -(-steps // multiple) * multiple)


# -- storage -----------------------------------------------------------------


def to_json(config: ml_collections.ConfigDict) -> str:
    """Serializes a config to JSON (sorted keys: equal configs give equal text).

    Example:
    >>> from_json(to_json(load_config("digits"))).epochs
    60
    """
    return json.dumps(config.to_dict(), sort_keys=True, indent=2)


def from_json(text: str) -> ml_collections.ConfigDict:
    """Rebuilds a locked config from `to_json` text.

    Fields added to the package after the text was written get their defaults,
    so the config of an older workdir still loads, validates and resumes.

    Example:
    >>> config = from_json('{"epochs": 3}')
    >>> config.epochs, config.keep_checkpoints
    (3, 3)
    """
    values = json.loads(text)
    for name, field in FIELDS.items():
        values.setdefault(name, field.default)
    config = ml_collections.ConfigDict(values)
    config.lock()
    return config


def diff(old: ml_collections.ConfigDict, new: ml_collections.ConfigDict) -> dict[str, tuple]:
    """Fields that differ between two configs, as `{name: (old, new)}` (dotted names).

    Useful to explain why a workdir's stored config does not match this run's.
    Teachers are compared in their `teachers` form (`teachers.canonical`), so
    the shorthand fields and an equal `teachers` list do not differ.

    Example:
    >>> a = load_config("pets37:variant=fast")
    >>> diff(a, apply_overrides(a, {"epochs": "3"}))
    {'epochs': (1000, 3)}
    """
    def flat(config: ml_collections.ConfigDict) -> dict[str, Any]:
        return {key: value for key, value in _flatten(canonical(config))}

    before, after = flat(old), flat(new)
    return {
        key: (before.get(key), after.get(key))
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key) or (key in before) != (key in after)
    }


def _flatten(tree: Mapping[str, Any], prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value
