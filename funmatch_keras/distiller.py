"""`Distiller`: a frozen teacher (or ensemble) teaching a student by function matching."""

from __future__ import annotations

import inspect
from typing import Sequence

import keras
from keras import ops

from funmatch_keras.losses import DistillationKL, check_temperature, kl_divergence_from_logits
from funmatch_keras.models import checks
from funmatch_keras.training import compat

# Keys a dict batch may carry. Anything else is a typo we report.
STUDENT_KEY = "student"
TEACHER_KEY = "teacher"
TEACHER_LOGITS_KEY = "teacher_logits"
_BATCH_KEYS = (STUDENT_KEY, TEACHER_KEY, TEACHER_LOGITS_KEY)
# Metrics that evaluation reports besides the loss: with labels only, and always.
_LABEL_METRICS = ("student_top1", "teacher_top1")
_TEACHER_METRICS = ("agreement", "kl")
_EVAL_METRICS = _LABEL_METRICS + _TEACHER_METRICS


# What `save` (and a `ModelCheckpoint` saving the whole model) says instead.
_SAVE_INSTEAD = (
    "A Distiller is not saved as one .keras file: it holds its teachers, which must "
    "never ship inside a student checkpoint. Save the student, "
    "distiller.student.save('student.keras'). To checkpoint training so that it can "
    "resume, use fm.loop.fit_with_checkpoints(distiller, ..., saved=distiller.student), "
    "or keras.callbacks.ModelCheckpoint(..., save_weights_only=True) (the Distiller's "
    "weights, teachers included, for distiller.load_weights).")


class Distiller(keras.Model):
    """A student trained to match a frozen teacher's function (no labels in the loss).

    The loss is `T² · KL(teacher ‖ student)` (`losses.DistillationKL`),
    computed in `compute_loss`, the backend-agnostic Keras 3 hook, so the same
    code trains under TensorFlow (including `tf.distribute`) and JAX. `call` is
    the student alone, so `distiller.predict` and `distiller.evaluate` serve the
    student.

    Teachers are frozen (`trainable=False`), run with `training=False`, their
    logits cast to float32 and stopped from gradients; an ensemble (a list of
    teachers) averages the logits. `teacher=None` is allowed when batches carry
    precomputed `"teacher_logits"` (the paper's "fixed teacher" baseline).

    Batches (the `x` of `fit`/`evaluate`, optionally with labels as `(x, y)`):
    - an image tensor: both models see it (consistent / function matching);
    - `{"student": s, "teacher": t}`: per-model views (independent noise,
      cross-resolution); `t` may be a list with one view per teacher;
    - `{"student": s, "teacher_logits": l}`: precomputed teacher outputs.

    Labels never enter the loss. With labels (integer class indices),
    `evaluate` and validation report `student_top1`, `teacher_top1`,
    `agreement` (same argmax) and `kl` (KL(teacher ‖ student) at T=1), besides
    `loss`.

    Mistakes are refused with the fix, by the checks that the CLI runs too
    (`models.checks`): when the Distiller is made (a teacher that is the
    student, ends in a softmax or outputs non-finite values; outputs that are
    not one tensor; other class counts), and at the first batch, from static
    shapes (what unbuilt models did not tell; one-hot labels; one image tensor
    for models of different input sizes). The Distiller is not saved whole
    (`save` says what to save instead: the student).

    Args:
        teacher: `keras.Model`, list of them, or `None`. Outputs logits.
        student: `keras.Model` outputting logits over the same classes.
        temperature: float > 0, finite. Defaults to `1.0`.
        teacher_jit_compile: bool. Run the teachers' forward pass as its own
            XLA computation (TensorFlow; a step that is XLA-compiled as a whole
            includes it anyway). `tune.teacher_path` measures whether it pays.
            Defaults to `False`.

    Example:
    >>> import numpy as np
    >>> teacher = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> student = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> distiller = Distiller(teacher, student, temperature=2.0)
    >>> distiller.compile(optimizer="adam")
    >>> history = distiller.fit(np.random.rand(8, 4), epochs=1, verbose=0)
    >>> sorted(history.history)
    ['loss']
    """

    def __init__(
        self,
        teacher: keras.Model | Sequence[keras.Model] | None,
        student: keras.Model,
        temperature: float = 1.0,
        teacher_jit_compile: bool = False,
        name: str = "distiller",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        self.temperature = check_temperature(temperature)
        self.teacher_jit_compile = bool(teacher_jit_compile)
        self._compiled_teachers = None  # the XLA teacher forward, made on first use
        self._teacher_logits_recorder = None  # see `record_teacher_logits`
        if teacher is None:
            teachers = []
        elif isinstance(teacher, (list, tuple)):
            teachers = list(teacher)
            if not teachers:
                raise ValueError(
                    "`teacher` is an empty list: pass a model, a list of models or None.")
        else:
            teachers = [teacher]
        checks.check_models(teachers, student)
        for model in teachers:
            # A teacher called inside compute_loss would otherwise be trained (docs/design.md §5).
            model.trainable = False
        self.teachers = teachers
        self.student = student
        self.distillation_loss = DistillationKL(temperature=self.temperature)
        self.student_top1 = keras.metrics.SparseCategoricalAccuracy(name="student_top1")
        self.teacher_top1 = keras.metrics.SparseCategoricalAccuracy(name="teacher_top1")
        self.agreement = keras.metrics.Mean(name="agreement")
        self.kl = keras.metrics.Mean(name="kl")

    @property
    def teacher(self) -> keras.Model | list[keras.Model] | None:
        if not self.teachers:
            return None
        return self.teachers[0] if len(self.teachers) == 1 else list(self.teachers)

    # -- batch routing -------------------------------------------------------

    @staticmethod
    def _check_keys(x: dict) -> None:
        unknown = sorted(set(x) - set(_BATCH_KEYS))
        if unknown:
            raise ValueError(
                f"Unknown batch keys {unknown}; a dict batch may only hold {list(_BATCH_KEYS)}."
            )

    def _student_input(self, x):
        if not isinstance(x, dict):
            return x
        self._check_keys(x)
        if STUDENT_KEY not in x:
            raise ValueError(
                f"The batch dict has keys {sorted(x)} but no '{STUDENT_KEY}' images for the "
                "student. Add them, or pass one image tensor that both models see."
            )
        return x[STUDENT_KEY]

    def teacher_logits(self, x):
        """Float32 teacher logits for a batch `x` (precomputed or by running the teachers)."""
        if isinstance(x, dict) and TEACHER_LOGITS_KEY in x:
            return ops.stop_gradient(ops.cast(x[TEACHER_LOGITS_KEY], "float32"))
        if not self.teachers:
            raise ValueError(
                "The Distiller has teacher=None, so every batch must be a dict with "
                f"'{TEACHER_LOGITS_KEY}' (precomputed teacher outputs). Pass a teacher model, "
                "or use data.train_pipeline(mode='fixed_teacher')."
            )
        if isinstance(x, dict):
            if TEACHER_KEY not in x:
                raise ValueError(
                    f"The batch dict has keys {sorted(x)} but neither '{TEACHER_KEY}' images "
                    f"nor '{TEACHER_LOGITS_KEY}' for the teacher. Add one, or pass one image "
                    "tensor that both models see."
                )
            views = x[TEACHER_KEY]
        else:
            views = x
        if not isinstance(views, (list, tuple)):
            views = [views] * len(self.teachers)
        if len(views) != len(self.teachers):
            raise ValueError(
                f"The batch holds {len(views)} teacher views for {len(self.teachers)} teachers; "
                "pass one tensor (shared) or one per teacher."
            )
        for label, model, view in zip(self._teacher_labels(), self.teachers, views):
            checks.check_input_fits(model, view, label, shared=not isinstance(x, dict))
        return ops.stop_gradient(self._teacher_forward(list(views)))

    def _teacher_labels(self) -> list[str]:
        return [checks.teacher_label(model, i, len(self.teachers))
                for i, model in enumerate(self.teachers)]

    def _teacher_forward(self, views: list):
        if not (self.teacher_jit_compile and keras.backend.backend() == "tensorflow"):
            return self._mean_teacher_logits(views)
        if self._compiled_teachers is None:
            import tensorflow as tf

            self._compiled_teachers = tf.function(self._mean_teacher_logits, jit_compile=True)
        return self._compiled_teachers(views)

    def _mean_teacher_logits(self, views: list):
        labels, logits = self._teacher_labels(), []
        for label, model, view in zip(labels, self.teachers, views):
            outputs = model(view, training=False)
            checks.check_single_output(outputs, label)
            if logits:  # an ensemble: every teacher over teacher 0's classes
                checks.check_same_classes(label, checks.num_classes(outputs),
                                          labels[0], checks.num_classes(logits[0]))
            logits.append(ops.cast(outputs, "float32"))
        return logits[0] if len(logits) == 1 else ops.mean(ops.stack(logits), axis=0)

    def record_teacher_logits(self, recorder) -> None:
        """Has each training step hand the teachers' logits to `recorder`, or stops (None).

        `recorder(logits)` is called inside the (traced) training step on the
        float32 `[batch, classes]` logits exactly as they reach the loss (an
        ensemble's mean), in every step that runs the teachers; steps fed
        precomputed `"teacher_logits"` do not call it. Under a
        `tf.distribute` strategy it is called in each replica on its part of
        the batch. It returns nothing and may only update state (TensorFlow
        variables): `data.teacher_store.LogitsRecorder` is one. The next `fit`
        retraces the step.

        Example:
        >>> import numpy as np, tensorflow as tf
        >>> teacher = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> student = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> distiller = Distiller(teacher, student)
        >>> distiller.compile(optimizer="adam")
        >>> last = tf.Variable(tf.zeros([8, 3]))
        >>> distiller.record_teacher_logits(last.assign)
        >>> x = np.random.rand(8, 4).astype("float32")
        >>> _ = distiller.fit(x, batch_size=8, epochs=1, shuffle=False, verbose=0)
        >>> bool(np.allclose(last.numpy(), teacher(x)))
        True
        """
        self._teacher_logits_recorder = recorder
        self.train_function = None  # traced again, with or without the recorder

    # -- keras.Model hooks -------------------------------------------------

    def compile(self, *args, **kwargs):
        """`keras.Model.compile`; under a `MultiWorkerMirroredStrategy`, also patches Keras.

        Keras 3 cannot `fit` across workers (`compat.patch_keras_for_multi_worker`).
        """
        super().compile(*args, **kwargs)
        if keras.backend.backend() == "tensorflow":
            compat.patch_for_strategy(self.distribute_strategy)

    def call(self, inputs, training=False):
        images = self._student_input(inputs)
        student_shape = checks.input_shape(self.student)
        # One tensor for models of different input sizes: the fix is a dict batch.
        shared = not isinstance(inputs, dict) and any(
            shape not in (None, student_shape) for shape in map(checks.input_shape, self.teachers))
        checks.check_input_fits(self.student, images, "The student", shared=shared)
        outputs = self.student(images, training=training)
        checks.check_single_output(outputs, "The student")
        return outputs

    def fit(self, *args, **kwargs):
        """`keras.Model.fit`; refuses a `ModelCheckpoint` that would save the whole Distiller."""
        callbacks = inspect.signature(super().fit).bind(*args, **kwargs).arguments.get(
            "callbacks") or []
        for callback in callbacks:
            if (isinstance(callback, keras.callbacks.ModelCheckpoint)
                    and not callback.save_weights_only):
                raise ValueError(f"keras.callbacks.ModelCheckpoint(save_weights_only=False) "
                                 f"would save the Distiller: {_SAVE_INSTEAD}")
        return super().fit(*args, **kwargs)

    def save(self, *args, **kwargs):
        """Refused: says what to save instead (the student; checkpoints to resume)."""
        raise NotImplementedError(_SAVE_INSTEAD)

    def get_config(self):
        raise NotImplementedError(_SAVE_INSTEAD)

    # Metrics, on every backend with public hooks only. `compute_loss` is the one
    # hook told whether Keras trains or evaluates (`training`), so it updates the
    # evaluation metrics when `training=False` (under JAX, Keras carries those
    # updates as state). `compute_metrics` reports, from `self.metrics`, the loss
    # and the evaluation metrics, the label-based ones only when it is given
    # labels (`y`). `train_step` keeps only the loss of its logs, so `fit` logs
    # `loss` alone: no flag passes between the hooks, and what each step returns
    # is fixed when it is traced.

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        teacher_logits = self.teacher_logits(x)
        # Static shapes: checked once per trace (the first batch), before any step runs.
        if isinstance(x, dict) and TEACHER_LOGITS_KEY in x:
            source = f"The batch's '{TEACHER_LOGITS_KEY}'"
        else:
            source = self._teacher_labels()[0] if len(self.teachers) == 1 else "The teachers"
        checks.check_same_classes(source, checks.num_classes(teacher_logits),
                                  "the student", checks.num_classes(y_pred))
        if y is not None:
            checks.check_labels(y, y_pred)
        loss = self.distillation_loss(teacher_logits, y_pred)
        if self.losses:  # regularizers of the student, if any
            loss = loss + ops.sum(self.losses)
        recorder = self._teacher_logits_recorder
        if training and recorder is not None and not (
                isinstance(x, dict) and TEACHER_LOGITS_KEY in x):
            recorder(teacher_logits)
        if not training:
            self._update_eval_metrics(y, teacher_logits, y_pred)
        return loss

    def _update_eval_metrics(self, labels, teacher_logits, student_logits):
        student_logits = ops.cast(student_logits, "float32")
        if labels is not None:
            self.student_top1.update_state(labels, student_logits)
            self.teacher_top1.update_state(labels, teacher_logits)
        same = ops.equal(ops.argmax(student_logits, axis=-1), ops.argmax(teacher_logits, axis=-1))
        self.agreement.update_state(ops.cast(same, "float32"))
        self.kl.update_state(kl_divergence_from_logits(teacher_logits, student_logits))

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        names = ("loss",) + (_LABEL_METRICS if y is not None else ()) + _TEACHER_METRICS
        return {m.name: m.result() for m in self.metrics if m.name in names}

    def train_step(self, *args, **kwargs):
        # TensorFlow and torch return the logs, JAX `(logs, state)`.
        outputs = super().train_step(*args, **kwargs)
        if isinstance(outputs, tuple):
            logs, state = outputs
            return _training_logs(logs), state
        return _training_logs(outputs)


def _training_logs(logs: dict) -> dict:
    """What `fit` logs: the loss (the evaluation metrics are not updated in training)."""
    return {name: value for name, value in logs.items() if name not in _EVAL_METRICS}
