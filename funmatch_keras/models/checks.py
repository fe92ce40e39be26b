"""The checks of teachers, students and batches, shared by the CLI and `Distiller`.

A teacher that cannot teach often still trains a student without an error: one
that outputs probabilities (a final softmax) makes the distillation softmax
flatten them, one with broken weights outputs NaN, one that is the student
teaches nothing. Other misuse ends in a raw graph error, sometimes after a
whole epoch. Each check here raises a `ValueError` (a `TypeError` for a wrong
type) that names the problem, echoes what it received, and names the fix.

- `check_models(teachers, student)`: what the models tell before any data
  (a `Distiller` calls it when it is made): types, a teacher that is (or
  shares weights with) the student, outputs that are not one logits tensor,
  class counts, probabilities or non-finite values on one random input.
- `check_teacher(model, image_size)`: the same output checks at the size the
  CLI gives the teacher, and that its fixed input size is that size.
- `check_input_fits`, `check_single_output`, `check_same_classes`,
  `check_labels`: what a `Distiller` checks on its first batch, from static
  shapes (models of unknown shapes are checked here instead).
"""

from __future__ import annotations

from typing import Any, Sequence

import keras
import numpy as np

# Rows of non-negative outputs summing to 1 within this are probabilities
# (loose enough for a bfloat16 softmax; logits essentially never do this).
_PROBABILITY_ATOL = 1e-2
# The fix when one tensor feeds models of different input sizes.
_DICT_BATCH_FIX = (
    'For a teacher and a student of different input sizes, pass dict batches '
    '{"student": student_images, "teacher": teacher_images}, each at its model\'s size '
    '(README: "Batches the Distiller accepts"; data.train_pipeline(teacher_size=...) '
    "makes them).")


def teacher_label(model: Any, index: int = 0, count: int = 1) -> str:
    """How an error names a teacher: `The teacher 'name'`, or `Teacher 1 'name'` of several."""
    name = getattr(model, "name", type(model).__name__)
    return f"The teacher {name!r}" if count == 1 else f"Teacher {index} {name!r}"


def check_models(teachers: Sequence[Any], student: Any) -> None:
    """Raises if `teachers` (a list, maybe empty) cannot teach `student` in a `Distiller`.

    Checks what the models tell before any data: both are Keras models, no
    teacher is the student or shares weights with it, each outputs one tensor
    (not a dict or a list), all over the same number of classes, and no model
    ends in a softmax. A teacher whose single input has a known shape is run
    once on a random input in [-1, 1]: it must output finite logits, not
    probabilities. Shapes a model does not know yet (an unbuilt or subclassed
    model) are checked at the first batch instead.

    Raises:
        TypeError: a teacher or student that is not a Keras model.
        ValueError: naming the problem and the fix.

    Example:
    >>> student = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)], name="s")
    >>> teacher = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)], name="t")
    >>> check_models([teacher], student)  # fine
    >>> try:
    ...     check_models([student], student)
    ... except ValueError as error:
    ...     print(error)
    The teacher 's' is the student: a model cannot teach itself ...
    """
    _check_type(student, "student", "`student` must be a keras.Model")
    labels = [teacher_label(model, i, len(teachers)) for i, model in enumerate(teachers)]
    for i, (model, label) in enumerate(zip(teachers, labels)):
        _check_type(model, "teacher" if len(teachers) == 1 else f"teacher[{i}]",
                    "`teacher` must be a keras.Model, a list of them, or None")
        _check_not_the_student(model, student, label)
    student_outputs = _symbolic_outputs(student)
    check_single_output(student_outputs, "The student")
    _check_no_softmax(student, "The student")
    for model, label in zip(teachers, labels):
        sample = _random_input(model)
        outputs = (_symbolic_outputs(model) if sample is None
                   else model(sample, training=False))
        check_single_output(outputs, label)
        check_same_classes(label, num_classes(outputs), "the student", num_classes(student_outputs))
        _check_no_softmax(model, label)
        if sample is not None:
            _check_logit_values(_numpy(outputs), label)


def check_teacher(model: keras.Model, image_size: int, name: str | None = None,
                  size_flag: str = "--config.teacher_size") -> None:
    """Raises if `model` cannot teach at `image_size`: input size, logits, finiteness.

    Checks that a fixed input size of `model` is `image_size` (a model taking
    any size passes) and that it does not end in a softmax layer, then runs it
    once on one random image in [-1, 1] and checks the outputs as
    `check_models` does: one tensor, finite, logits and not probabilities
    (non-negative rows summing to 1, the sign of a final softmax).

    Args:
        model: keras.Model. The teacher, mapping images to `(batch, classes)`.
        image_size: int. The square input size the teacher will be given.
        name: str. How the error names the teacher. Defaults to `model.name`.
        size_flag: str. The setting that the size error tells to change.
            Defaults to `"--config.teacher_size"`.

    Raises:
        ValueError: naming the problem and the fix.

    Example:
    >>> def net(activation=None, size=16):
    ...     inputs = keras.Input((size, size, 3))
    ...     x = keras.layers.GlobalAveragePooling2D()(inputs)
    ...     return keras.Model(inputs, keras.layers.Dense(4, activation=activation)(x))
    >>> check_teacher(net(), 16)  # logits: fine
    >>> try:
    ...     check_teacher(net("softmax"), 16, name="t.keras")
    ... except ValueError as error:
    ...     print(error)
    The teacher 't.keras' ends in a softmax (layer ...): it outputs probabilities, not logits: ...
    >>> try:
    ...     check_teacher(net(size=24), 16, name="t.keras")
    ... except ValueError as error:
    ...     print(str(error)[:92])
    The teacher 't.keras' takes 24x24 images but is given 16x16: set --config.teacher_size to 24
    """
    label = f"The teacher {name or model.name!r}"
    _check_input_size(model, image_size, label, size_flag)
    _check_no_softmax(model, label)
    image = np.random.default_rng(0).uniform(-1, 1, (1, image_size, image_size, 3))
    outputs = model(image.astype("float32"), training=False)
    check_single_output(outputs, label)
    _check_logit_values(_numpy(outputs), label)


def check_single_output(outputs: Any, label: str) -> None:
    """Raises unless `outputs` (a model's, or None: unknown) is one tensor, not a dict or list.

    Example:
    >>> try:
    ...     check_single_output({"logits": np.zeros((1, 3))}, "The student 's'")
    ... except ValueError as error:
    ...     print(str(error)[:60])
    The student 's' returns a dict with keys ['logits'], not one
    """
    if outputs is None or not isinstance(outputs, (dict, list, tuple)):
        return
    if isinstance(outputs, dict):
        what, pick = f"a dict with keys {sorted(outputs)}", "model.output['<key>']"
    else:
        what, pick = (f"a {type(outputs).__name__} of {len(outputs)} tensors",
                      "model.outputs[<index>]")
    raise ValueError(
        f"{label} returns {what}, not one tensor: a Distiller's teachers and student "
        "must each map their inputs to one logits tensor of shape (batch, classes). "
        f"Pass a model that returns the logits alone, e.g. keras.Model(model.input, {pick}).")


def check_same_classes(label: str, classes: int | None, other_label: str,
                       other_classes: int | None) -> None:
    """Raises if two known class counts (None: unknown) differ.

    Example:
    >>> check_same_classes("The teacher 't'", 10, "the student", None)  # unknown: passes
    >>> try:
    ...     check_same_classes("The teacher 't'", 10, "the student", 5)
    ... except ValueError as error:
    ...     print(str(error)[:64])
    The teacher 't' outputs 10 classes but the student outputs 5: th
    """
    if None in (classes, other_classes) or classes == other_classes:
        return
    raise ValueError(
        f"{label} outputs {classes} classes but {other_label} outputs {other_classes}: the "
        "teachers and the student must predict the same classes. Give every model a head "
        f"for the same classes (e.g. build the student with num_classes={classes}).")


def check_input_fits(model: Any, shape: Any, label: str, shared: bool) -> None:
    """Raises if a batch of static `shape` does not fit `model`'s single input.

    Unknown dimensions (None) on either side pass, as does a model whose input
    shape is unknown. `shared`: the tensor is the one image tensor that the
    student and the teachers all see, so the fix is the dict batch.

    Example:
    >>> model = keras.Sequential([keras.Input((9,)), keras.layers.Dense(3)])
    >>> check_input_fits(model, (None, 9), "The teacher 't'", shared=True)
    >>> try:
    ...     check_input_fits(model, (8, 6), "The teacher 't'", shared=True)
    ... except ValueError as error:
    ...     print(error)
    The teacher 't' takes inputs of shape (None, 9), but the batch is one tensor of shape
    (8, 6), which the student and the teachers all see. For a teacher and a student ...
    """
    expected, received = input_shape(model), static_shape(shape)
    if expected is None or received is None or _fits(expected, received):
        return
    if shared:
        raise ValueError(
            f"{label} takes inputs of shape {expected}, but the batch is one tensor of "
            f"shape {received}, which the student and the teachers all see. {_DICT_BATCH_FIX}")
    raise ValueError(f"{label} takes inputs of shape {expected}, but is given a tensor of "
                     f"shape {received}. Give it inputs of its shape.")


def check_labels(labels: Any, logits: Any) -> None:
    """Raises if `labels` look one-hot (one value per class) rather than class indices.

    Example:
    >>> check_labels(np.zeros((8,)), np.zeros((8, 5)))  # class indices: fine
    >>> try:
    ...     check_labels(np.zeros((8, 5)), np.zeros((8, 5)))
    ... except ValueError as error:
    ...     print(str(error)[:56])
    The labels have shape (8, 5), one value per class (one-h
    """
    label_shape, logit_shape = static_shape(labels), static_shape(logits)
    if (label_shape is None or logit_shape is None or len(label_shape) != len(logit_shape)
            or label_shape[-1] in (None, 1)):
        return
    raise ValueError(
        f"The labels have shape {label_shape}, one value per class (one-hot), but the "
        "Distiller's metrics (student_top1, teacher_top1) take integer class indices of "
        "shape (batch,). Pass the class indices: y = argmax(y, axis=-1), e.g. "
        "np.argmax(y, axis=-1) or dataset.map(lambda x, y: (x, tf.argmax(y, axis=-1))).")


def input_shape(model: Any) -> tuple | None:
    """The shape of `model`'s single input, or None (unbuilt, subclassed, several inputs)."""
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return None
    if not isinstance(inputs, (list, tuple)) or len(inputs) != 1:
        return None
    return static_shape(inputs[0])


def static_shape(tensor: Any) -> tuple | None:
    """The static shape of a tensor (or a shape tuple) as ints and None; None if unknown."""
    shape = tensor.shape if hasattr(tensor, "shape") else tensor
    if not isinstance(shape, (tuple, list)) and not hasattr(tensor, "shape"):
        return None
    try:
        return tuple(None if side is None else int(side) for side in shape)
    except (TypeError, ValueError):  # an unknown rank
        return None


def _fits(expected: tuple, received: tuple) -> bool:
    # The batch dimension (first) is free.
    return len(expected) == len(received) and all(
        a is None or b is None or a == b for a, b in zip(expected[1:], received[1:]))


def _check_type(model: Any, argument: str, requirement: str) -> None:
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"{requirement}. Received: {argument}={model!r:.80} "
                        f"(a {type(model).__name__})")


def _check_not_the_student(teacher: keras.Model, student: keras.Model, label: str) -> None:
    if teacher is student:
        raise ValueError(
            f"{label} is the student: a model cannot teach itself (its outputs are already "
            "matched, so nothing is learned, and freezing the teacher would freeze the "
            "student). Pass another model as the teacher, e.g. one trained with labels.")
    student_weights = {id(weight) for weight in student.weights}
    shared = [weight.path for weight in teacher.weights if id(weight) in student_weights]
    if shared:
        raise ValueError(
            f"{label} shares {len(shared)} weights with the student (e.g. {shared[0]!r}): "
            "the teacher is frozen, so the shared layers would not train in the student. "
            "Give the student its own layers, e.g. keras.models.clone_model(...) of the "
            "shared part.")


def _symbolic_outputs(model: keras.Model) -> Any:
    """A built Functional or Sequential model's output structure; None if unknown."""
    try:
        return model.output  # a Functional model's, as it returns it
    except (AttributeError, ValueError):
        pass
    try:
        outputs = model.outputs  # a Sequential model's (one tensor, in a list)
    except (AttributeError, ValueError):
        return None
    return outputs[0] if isinstance(outputs, list) and len(outputs) == 1 else outputs


def _random_input(model: keras.Model) -> np.ndarray | None:
    """One random input in [-1, 1] for `model`'s single float input of known shape, or None."""
    shape = input_shape(model)
    if shape is None or None in shape[1:] or not keras.backend.is_float_dtype(
            model.inputs[0].dtype):
        return None
    sample = np.random.default_rng(0).uniform(-1, 1, (shape[0] or 1,) + shape[1:])
    return sample.astype("float32")


def num_classes(outputs: Any) -> int | None:
    """The last dimension of one output tensor; None if unknown (or not one tensor)."""
    if outputs is None or isinstance(outputs, (dict, list, tuple)):
        return None
    shape = static_shape(outputs)
    return shape[-1] if shape else None


def _check_no_softmax(model: keras.Model, label: str) -> None:
    """Raises if a Sequential or Functional model's last layer is a softmax.

    (A subclassed model's layers need not be in call order: its outputs are
    checked, where it can be run.)
    """
    if not (isinstance(model, keras.Sequential) or input_shape(model) is not None):
        return
    last = model.layers[-1] if model.layers else None
    if isinstance(last, keras.layers.Softmax) or (
            getattr(last, "activation", None) is keras.activations.softmax):
        raise ValueError(_probabilities_message(
            label, f"ends in a softmax (layer {last.name!r}): it outputs probabilities"))


def _check_logit_values(values: np.ndarray, label: str) -> None:
    if not np.all(np.isfinite(values)):
        raise ValueError(
            f"{label} outputs non-finite values (NaN or inf) on a random input: its "
            "weights are broken (a diverged training run or a corrupt file). Use "
            "another checkpoint.")
    if (values.ndim == 2 and values.shape[-1] > 1 and np.all(values >= 0)
            and np.allclose(values.sum(axis=-1), 1.0, atol=_PROBABILITY_ATOL)):
        raise ValueError(_probabilities_message(
            label, "outputs probabilities (non-negative, each row summing to 1)"))


def _probabilities_message(label: str, what: str) -> str:
    return (
        f"{label} {what}, not logits: distillation applies its own softmax (at "
        "temperature T) to logits. Pass the model without its final softmax / use logits: "
        "e.g. keras.Model(model.input, model.layers[-2].output) (the layer before the "
        "softmax), or build keras.applications with classifier_activation=None.")


def _numpy(tensor: Any) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(tensor), np.float64)


def _check_input_size(model: keras.Model, image_size: int, label: str,
                      size_flag: str) -> None:
    if len(model.inputs) != 1:
        return
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4:
        return
    fixed = [side for side in shape[1:3] if side is not None]
    if all(side == image_size for side in fixed):
        return
    taken = "x".join("?" if side is None else str(side) for side in shape[1:3])
    raise ValueError(
        f"{label} takes {taken} images but is given {image_size}x{image_size}: set "
        f"{size_flag} to {fixed[0]} (the size it was built and trained at), or "
        f"rebuild it at {image_size}. The student's size may differ from the "
        "teacher's.")
