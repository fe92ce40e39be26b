"""The teacher compute paths a distillation step can take, and a Distiller on one.

A `TeacherPath` says whether XLA compiles the whole train step, the teachers'
forward pass alone, or nothing, and the teachers' dtype policy. `candidates`
lists those worth timing on this device (`tune.teacher_path` times them);
`apply` gives back a Distiller that runs on one.

Example:
>>> TeacherPath(jit_compile=False, teacher_dtype=BFLOAT16).name
'no_xla_bf16_teacher'
>>> candidates(native_bfloat16=False)[0] == default_path()  # the untuned path first
True
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras

from funmatch_keras.distiller import Distiller
from funmatch_keras.tuning import hardware

# The frozen teacher's weights are stored in bf16, not cast from float32 at every
# step as "mixed_bfloat16" would: BiT-R152x2's forward pass at 128 px went from 583 to
# 479 ms a batch of 8 on an AMX CPU (README, benchmarks/teacher_dtype.py), in half the
# memory. GroupNormalization still computes its statistics in float32 (Keras upcasts),
# and logits reach the loss in float32.
BFLOAT16 = "bfloat16"


@dataclasses.dataclass(frozen=True)
class TeacherPath:
    """How a distillation step runs its teacher.

    Attributes:
        jit_compile: the whole train step under XLA (`Model.compile(jit_compile=)`).
        teacher_dtype: the teachers' dtype policy (`"float32"`, `"mixed_bfloat16"`).
        teacher_jit_compile: the teachers' forward pass as its own XLA
            computation inside a step that is not XLA-compiled.
    """

    jit_compile: bool = False
    teacher_dtype: str = "float32"
    teacher_jit_compile: bool = False

    @property
    def name(self) -> str:
        step = "step_xla" if self.jit_compile else (
            "teacher_xla" if self.teacher_jit_compile else "no_xla")
        return f"{step}_{'bf16' if 'bfloat16' in self.teacher_dtype else 'fp32'}_teacher"

    @property
    def teacher_numerics(self) -> tuple[str, bool]:
        """What decides the teacher's logits: its dtype, and whether XLA computes it."""
        return self.teacher_dtype, self.jit_compile or self.teacher_jit_compile

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TeacherPath":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in fields})


def default_path(teacher_dtype: str = "float32") -> TeacherPath:
    """The untuned path: no XLA on a CPU, as Keras's `jit_compile="auto"` (and
    `keras.distillation`) decide, else the whole step under XLA.

    It is the path `keras.distillation.Distiller` runs, with a teacher in
    `teacher_dtype`, so it is never slower than that (README Benchmarks).
    """
    return TeacherPath(jit_compile=_keras_auto_jit(), teacher_dtype=teacher_dtype)


def candidates(teacher_dtype: str = "float32",
               native_bfloat16: bool | None = None) -> list[TeacherPath]:
    """The paths worth timing here, `default_path` first.

    XLA for the whole step or for the teacher alone (TensorFlow; JAX always
    compiles the step), each with the teacher in `teacher_dtype` and, where
    the device has native bfloat16 and the teacher is float32, in bfloat16.
    With TensorFlow op determinism on, Keras runs no step under XLA, so no
    XLA path is offered.

    >>> [p.name for p in candidates(native_bfloat16=False)]  # doctest: +SKIP
    ['no_xla_fp32_teacher', 'teacher_xla_fp32_teacher', 'step_xla_fp32_teacher']
    """
    if native_bfloat16 is None:
        native_bfloat16 = hardware.native_bfloat16()
    dtypes = [teacher_dtype] + ([BFLOAT16] if native_bfloat16 and teacher_dtype == "float32"
                                else [])
    if keras.backend.backend() == "jax":
        compiles = [(True, False)]
    elif _op_determinism():
        compiles = [(False, False)]
    else:
        compiles = [(False, False), (False, True), (True, False)]
    # Cheapest compilations first: when the budget runs out, the XLA paths go untimed.
    paths = [TeacherPath(step, dtype, alone) for step, alone in compiles for dtype in dtypes]
    first = default_path(teacher_dtype)
    return [first] + [p for p in paths if p != first]


def with_dtype(model: keras.Model, dtype: str) -> keras.Model:
    """A copy of a functional or Sequential `model` whose layers compute in `dtype`.

    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> with_dtype(model, "mixed_bfloat16").layers[-1].compute_dtype
    'bfloat16'
    """
    if dtype_of(model) == dtype:
        return model

    def clone_layer(layer):
        config = layer.get_config()
        config["dtype"] = dtype
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone_layer)
    copy.set_weights(model.get_weights())
    copy.trainable = model.trainable
    return copy


def dtype_of(model: keras.Model) -> str:
    """The dtype policy a model computes in: that of its first layer with weights."""
    layer = next((layer for layer in model.layers if layer.weights), model)
    return layer.dtype_policy.name


def apply(distiller: Distiller, path: TeacherPath) -> Distiller:
    """A `Distiller` with the same student and teachers that runs on `path`.

    The teachers are copied into `path.teacher_dtype` when it differs; the
    result is compiled with `distiller`'s optimizer, `steps_per_execution`
    and `path.jit_compile` (other `compile` arguments are not carried over:
    the Distiller's loss and metrics are its own). Call it before `fit`.
    """
    teachers = [with_dtype(t, path.teacher_dtype) for t in distiller.teachers]
    tuned = Distiller(teachers if len(teachers) > 1 else (teachers[0] if teachers else None),
                      distiller.student, temperature=distiller.temperature,
                      teacher_jit_compile=path.teacher_jit_compile)
    optimizer = getattr(distiller, "optimizer", None)
    tuned.compile(optimizer=optimizer if optimizer is not None else "adam",
                  jit_compile=path.jit_compile,
                  steps_per_execution=getattr(distiller, "steps_per_execution", 1) or 1)
    return tuned


def _keras_auto_jit() -> bool:
    """What `Model.compile(jit_compile="auto")` resolves to (Keras 3.15's
    `Trainer._resolve_auto_jit_compile`): XLA, except with torch, and under
    TensorFlow on a CPU-only machine or a tf.distribute strategy."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        accelerators = [d for d in tf.config.list_physical_devices() if d.device_type != "CPU"]
        return bool(accelerators) and not tf.distribute.has_strategy()
    return backend != "torch"


def _op_determinism() -> bool:
    """TensorFlow's op determinism, under which Keras drops `jit_compile=True`."""
    if keras.backend.backend() != "tensorflow":
        return False
    from tensorflow.python.framework import config as tf_config

    return tf_config.is_op_determinism_enabled()
