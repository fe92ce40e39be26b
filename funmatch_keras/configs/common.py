"""Every config field with its default, type and meaning, and the shared builders.

`FIELDS` is the one place where fields are declared: `base_config` builds a
`ConfigDict` holding all of them, and a dataset config only states what differs
(`base_config(dataset="pets37", epochs=1000, ...)`). `parse_arg` turns the
`name:arg` part of `--config=pets37:variant=fast,smoke=True` into typed options.
`small_dataset_config` is the recipe shared by the Table 4 datasets, and
`shrink_for_smoke` is the final block every config applies under `smoke=True`.

Reference: Beyer et al., "Knowledge distillation: A good teacher is patient and
consistent", CVPR 2022 (arXiv 2106.05237).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import ml_collections

from funmatch_keras.recipe import DATASETS, MODES

DTYPES = ("float32", "bfloat16", "float16", "mixed_bfloat16", "mixed_float16")
OPTIMIZERS = ("adamw", "shampoo")

NoneType = type(None)


@dataclasses.dataclass(frozen=True)
class Field:
    """A config field: its default, the types it accepts and what it means."""

    default: Any
    types: tuple[type, ...]
    doc: str

    @property
    def nullable(self) -> bool:
        return NoneType in self.types


FIELDS: dict[str, Field] = {
    # -- data --
    "dataset": Field("digits", (str,), f"Data preset, one of {DATASETS}."),
    "data_dir": Field(None, (str, NoneType), "tfds data_dir. None: the tfds default."),
    "train_split": Field(
        None, (str, NoneType),
        "tfds split to train on, e.g. 'train[:90%]'. None: the preset's. `dataset` may be "
        "any tfds name with `image` and `label` features when the three splits are set.",
    ),
    "validation_split": Field(
        None, (str, NoneType), "tfds split evaluated during training. None: the preset's."
    ),
    "test_split": Field(
        None, (str, NoneType), "tfds split of the final report. None: the preset's."
    ),
    "num_classes": Field(None, (int, NoneType), "None: taken from the dataset."),
    "crop_area_min": Field(
        0.05, (float,), "Inception crop: smallest crop area, as a fraction of the image."
    ),
    "flip": Field(True, (bool,), "Random left-right flips in training."),
    # -- teaching --
    "mode": Field("function_matching", (str,), f"Teaching mode, one of {MODES}."),
    "teachers": Field(
        None,
        (list, NoneType),
        "The teachers, big_vision style: a list of {'model': spec, 'weights': path or "
        "None, 'size': px or None} dicts (several: an ensemble, logits averaged). "
        "None: one teacher from the `teacher`, `teacher_weights` and `teacher_size` "
        "shorthand fields (ignored when `teachers` is given).",
    ),
    "teacher": Field(
        "bit_r152x2",
        (str, list),
        "Model spec for `models.build` (name, 'keras:<App>', .keras file or "
        "SavedModel dir), or a list of specs for an ensemble (logits averaged).",
    ),
    "teacher_weights": Field(
        None, (str, list, NoneType), "Weights (.npz/.safetensors) to load, one per teacher."
    ),
    "teacher_size": Field(
        None, (int, list, NoneType), "Teacher input side (list: per teacher). None: student_size."
    ),
    "teacher_dtype": Field(None, (str, NoneType), "Teacher dtype policy. None (auto): "
                           "`dtype`, or bf16 if timed faster and agreeing (`tune`)."),
    "teacher_epochs": Field(
        None,
        (int, NoneType),
        "Epochs of supervised teacher training when the teacher has no weights "
        "(None: a teacher without weights is an error).",
    ),
    "temperature": Field(1.0, (float,), "Distillation temperature T (> 0)."),
    "teacher_store": Field(
        None, (str, NoneType),
        "Directory of the teacher's recorded logits per step (`teacher_store`): a sweep's "
        "runs with the same data, seed, batch and teachers compute the teacher once. "
        "None: the teacher runs at every step.",
    ),
    "teacher_store_encoding": Field(
        None, (str, NoneType),
        "How a new teacher store keeps the logits: 'float32' (exact), 'float16', "
        "'bfloat16' (half the disk), or 'top<K>' (each example's K largest logits and one "
        "tail value, 4 * (2K + 1) bytes; e.g. 'top5'). None: an existing store's encoding, "
        "'float32' for a new one. Given, an existing store's must match it.",
    ),
    # -- student --
    "student": Field("bit_r50x1", (str,), "Student model spec for `models.build`."),
    "student_weights": Field(None, (str, NoneType), "Initial student weights, or None."),
    "student_size": Field(128, (int,), "Student input side in pixels."),
    "dtype": Field("float32", (str,), f"Student compute dtype policy, one of {DTYPES}."),
    # -- schedule and optimizer --
    "epochs": Field(1000, (int,), "Training epochs (the paper's patience)."),
    "steps_per_epoch": Field(
        None, (int, NoneType), "None: dataset size // batch_size; an int overrides (smoke runs)."
    ),
    "batch_size": Field(512, (int,), "Global batch size."),
    "lr": Field(1e-2, (float,), "Peak learning rate of the warmup + cosine schedule."),
    "weight_decay": Field(
        1e-5, (float,), "Decoupled weight decay on kernels, not multiplied by lr."
    ),
    "optimizer": Field(
        "adamw", (str,),
        f"One of {OPTIMIZERS}: the paper's Adam with decoupled weight decay, or "
        "Shampoo grafted to Adam (`optim.shampoo`; the paper's ImageNet runs need "
        "4x fewer epochs with it).",
    ),
    "shampoo_block_size": Field(
        128, (int,), "Shampoo: largest preconditioner block side (the paper: 128)."
    ),
    "shampoo_beta2": Field(
        0.999, (float,),
        "Shampoo: EMA of the Kronecker statistics and of the Adam graft's second moment.",
    ),
    "shampoo_precondition_every": Field(
        10, (int,), "Shampoo: steps between recomputations of the inverse 4th roots."
    ),
    "shampoo_statistics_every": Field(
        1, (int,), "Shampoo: steps between updates of the Kronecker statistics (the paper: 1)."
    ),
    "shampoo_start_preconditioning_step": Field(
        10, (int,), "Shampoo: first step with Shampoo's direction (the Adam graft before)."
    ),
    "warmup_steps": Field(1500, (int,), "Linear warmup steps."),
    "seed": Field(0, (int,), "Seed of the data pipeline and model initialization."),
    "deterministic": Field(
        False, (bool,), "TensorFlow op determinism: a resumed run ends bit-identical."
    ),
    "jit_compile": Field(
        None,
        (bool, NoneType),
        "XLA-compile the train step. None (auto): timed at the start of a long run "
        "with the teacher's other paths (`tune.teacher_path`: the whole step, the "
        "teacher alone, or neither under XLA); short runs take Keras's "
        "jit_compile='auto' (no XLA on a CPU). README Benchmarks.",
    ),
    "teacher_path_budget": Field(0.015, (float,), "Share of a run that choosing the "
                                 "teacher path may take (runs too short skip it; 0: never)."),
    "teacher_agreement_min": Field(0.995, (float,), "Top-1 agreement a teacher path must "
                                   "have with the float32 teacher without XLA."),
    "teacher_agreement_images": Field(512, (int,), "Validation images it is measured on."),
    # -- checkpoints and evaluation --
    "checkpoint_every_steps": Field(1000, (int,), "Save a checkpoint every N steps."),
    "checkpoint_every_minutes": Field(
        10.0, (float, NoneType),
        "Also save when this many minutes passed since the last checkpoint (None: "
        "steps only). Checkpoints are never tied to dataset epochs, which last 2 "
        "steps on Flowers102.",
    ),
    "keep_checkpoints": Field(3, (int,), "Number of most recent checkpoints kept."),
    "eval_every_epochs": Field(
        None, (int, NoneType),
        "Evaluate every N epochs (or use eval_every_steps). None: about 20 evaluations per run.",
    ),
    "eval_every_steps": Field(
        None, (int, NoneType),
        "Evaluate every N steps (rounded up to the log cadence); overrides eval_every_epochs.",
    ),
    "log_every_steps": Field(
        None, (int, NoneType),
        "Steps between training logs (progress line, metrics.jsonl, TensorBoard; the NaN "
        "check reads the loss then). None: every 50 steps, or about 10 logs in shorter runs.",
    ),
    "steps_per_execution": Field(
        1, (int,),
        "Train steps per compiled call (`compile(steps_per_execution=...)`; Keras "
        "recommends more than 1 on TPU). log_every_steps must be a multiple of it.",
    ),
    "eval_batch_size": Field(256, (int,), "Evaluation batch size."),
}

# The paper's per-dataset image sizes (Sec. 4).
SMALL_DATASET_SIZE = 128


def base_config(**values: Any) -> ml_collections.ConfigDict:
    """Returns a locked `ConfigDict` with every field of `FIELDS`, `values` overriding defaults.

    The dict is locked, so a misspelled attribute (`config.epoch = 3`) raises
    instead of silently adding a field; use `with config.unlocked():` to add one.
    Field types follow the values given here (a field left at None accepts any
    type later).

    Args:
        **values: field values that differ from the defaults.

    Returns:
        A locked `ml_collections.ConfigDict`.

    Example:
    >>> config = base_config(dataset="pets37", epochs=3)
    >>> config.epochs, config.batch_size
    (3, 512)
    """
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ValueError(f"Unknown config fields {unknown}. Valid fields: {sorted(FIELDS)}.")
    fields = {}
    for name, field in FIELDS.items():
        value = values.get(name, field.default)
        # ConfigDict types a field by its first value: keep float fields float
        # even when written as `temperature=5`, so "2.5" can override them later.
        if float in field.types and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        fields[name] = value
    config = ml_collections.ConfigDict(fields)
    config.lock()
    return config


def parse_bool(text: str) -> bool:
    """`true/false` (also `1/0`, `yes/no`, `y/n`, `on/off`, any case) as a bool."""
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "y", "on"):
        return True
    if lowered in ("false", "0", "no", "n", "off"):
        return False
    raise ValueError(f"expected a bool (true/false), got {text!r}")


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses a config argument `key=value,key=value` into options typed like `defaults`.

    A bare `key` means `key=True` for bool options. Values are converted to the
    type of the default (bool, int, float or str).

    Args:
        arg: str or None. The part after `:` in `--config=name:arg`.
        **defaults: the options the config accepts, with their defaults.

    Returns:
        A `ConfigDict` holding every option.

    Example:
    >>> opts = parse_arg("variant=fast,smoke", variant="medium", smoke=False)
    >>> opts.variant, opts.smoke
    ('fast', True)
    """
    options = dict(defaults)
    for item in (arg or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, has_value, text = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(
                f"Unknown config argument {key!r}. Valid arguments: {sorted(defaults)}. "
                f"Received: arg={arg!r}"
            )
        default = defaults[key]
        try:
            if isinstance(default, bool):
                options[key] = parse_bool(text) if has_value else True
            elif not has_value:
                raise ValueError("missing '=value'")
            elif isinstance(default, int):
                options[key] = int(text)
            elif isinstance(default, float):
                options[key] = float(text)
            else:
                options[key] = text
        except ValueError as error:
            raise ValueError(
                f"Config argument {key!r} expects {type(default).__name__}: {error}. "
                f"Received: arg={arg!r}"
            ) from None
    return ml_collections.ConfigDict(options)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One column of the paper's Table 4: training length and hyper-parameters.

    `top1` is the student top-1 (%) the paper reports, for the docs and logs.
    """

    epochs: int
    temperature: float
    lr: float
    weight_decay: float
    top1: float


def pick_variant(variants: Mapping[str, Variant], name: str) -> Variant:
    """Returns `variants[name]`, or a `ValueError` listing the variants."""
    if name not in variants:
        raise ValueError(f"Unknown variant. Expected one of {list(variants)}. Received: {name!r}")
    return variants[name]


def small_dataset_config(
    dataset: str, variants: Mapping[str, Variant], arg: str | None
) -> ml_collections.ConfigDict:
    """The paper's recipe on a Table 4 dataset: BiT-R152x2 teaches BiT-R50x1 at 128 px.

    Args:
        dataset: str. Data preset name (e.g. `"pets37"`).
        variants: mapping from variant name to the Table 4 `Variant`.
        arg: str or None. `variant=<name>` (default `medium`) and `smoke=True`.

    Returns:
        A locked `ConfigDict`. `teacher_weights` is None: users pass their own
        fine-tuned teacher (`--config.teacher=/path/teacher.keras` or
        `--config.teacher_weights=/path/bit_r152x2_pets.npz`).

    Example:
    >>> table = {"fast": Variant(10, 2.0, 1e-2, 1e-3, top1=0.0)}
    >>> small_dataset_config("pets37", table, "variant=fast").epochs
    10
    """
    opts = parse_arg(arg, variant="medium", smoke=False)
    variant = pick_variant(variants, opts.variant)
    config = base_config(
        dataset=dataset,
        teacher="bit_r152x2",
        student="bit_r50x1",
        student_size=SMALL_DATASET_SIZE,
        epochs=variant.epochs,
        temperature=variant.temperature,
        lr=variant.lr,
        weight_decay=variant.weight_decay,
    )
    return shrink_for_smoke(config) if opts.smoke else config


# Tiny CNNs for smoke runs; `cnn:<widths>` is a model-zoo spec.
SMOKE_TEACHER = "cnn:16,32"
SMOKE_STUDENT = "cnn:8,16"
SMOKE_SIZE = 32


def shrink_for_smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The final block of every config under `smoke=True`: a run of seconds on a CPU.

    Keeps the teaching mode and the structure of the teacher (single, cross-
    resolution or ensemble) but uses tiny models, a few steps and small batches.
    Large models get a small CNN teacher trained for one epoch with labels, since
    the real teacher file is not needed to check the plumbing.

    Args:
        config: a config from `base_config`.

    Returns:
        The same `ConfigDict`, modified.

    Example:
    >>> shrink_for_smoke(base_config()).steps_per_epoch
    2
    """
    config.epochs = 2
    config.steps_per_epoch = 2
    config.batch_size = 16
    config.eval_batch_size = 16
    config.warmup_steps = 1
    config.checkpoint_every_steps = 2
    config.keep_checkpoints = 2
    config.eval_every_epochs = 1
    config.teacher_epochs = 1
    if not str(config.student).startswith("cnn:"):
        config.student = SMOKE_STUDENT
        config.student_size = SMOKE_SIZE
        config.student_weights = None
        config.teacher_weights = None
        if config.teachers is not None:
            config.teachers = [
                {"model": SMOKE_TEACHER, "weights": None,
                 "size": t.get("size") and _smoke_teacher_size(t["size"])}
                for t in config.teachers]
        if isinstance(config.teacher, list):
            config.teacher = [SMOKE_TEACHER] * len(config.teacher)
        else:
            config.teacher = SMOKE_TEACHER
        sizes = config.teacher_size
        if isinstance(sizes, list):
            config.teacher_size = [_smoke_teacher_size(size) for size in sizes]
        elif sizes is not None:
            config.teacher_size = _smoke_teacher_size(sizes)
    return config


def _smoke_teacher_size(size: int) -> int:
    # Scales 224 -> SMOKE_SIZE and keeps a larger teacher input larger
    # (384 -> 55), so cross-resolution runs stay cross-resolution.
    return max(SMOKE_SIZE, round(SMOKE_SIZE * size / 224))
