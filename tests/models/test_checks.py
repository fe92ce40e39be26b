"""The checks a `Distiller` makes, at construction or on its first batch (`models/checks.py`).

Each mistake here once trained without an error (a softmax teacher, an
infinite temperature, the student as its own teacher) or failed with a raw
graph error, sometimes after a whole epoch. The CLI runs the same checks: one
test makes the same mistake through `funmatch distill` and through the Python
API and compares the messages.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from funmatch_keras import DistillationKL, Distiller, configs
from funmatch_keras.app import build
from funmatch_keras.models import checks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _fit(distiller, *args, **kwargs):
    distiller.compile(optimizer="sgd")
    return distiller.fit(*args, epochs=1, verbose=0, **kwargs)


def _image_teacher(path, activation=None, nan=False):
    """A 16x16 teacher for the digits config (10 classes), saved to `path`."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inputs))
    head = keras.layers.Dense(10, activation=activation)
    model = keras.Model(inputs, head(x))
    if nan:
        kernel, bias = head.get_weights()
        head.set_weights([np.full_like(kernel, np.nan), bias])
    model.save(path)
    return str(path)


def _without_label(message, label):
    assert message.startswith(label), (message, label)
    return message[len(label):]


@pytest.mark.parametrize("teacher_file", ["softmax", "nan"])
def test_the_cli_and_the_python_api_refuse_a_teacher_with_the_same_message(
        tmp_path, teacher_file):
    path = _image_teacher(tmp_path / f"{teacher_file}.keras",
                          activation="softmax" if teacher_file == "softmax" else None,
                          nan=teacher_file == "nan")
    # The CLI: `funmatch distill` in a fresh process exits 2 (bad input) with the message.
    done = subprocess.run(
        [sys.executable, "-m", "funmatch_keras.app.cli", "distill", "--config=digits:smoke=True",
         f"--config.teacher={path}", f"--workdir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT))
    assert done.returncode == 2, done.stderr[-3000:]
    prefix = "funmatch distill: error: "
    cli_message = next(line for line in done.stderr.splitlines() if line.startswith(prefix))
    cli_message = _without_label(cli_message[len(prefix):], f"The teacher {path!r}")
    # The Python API: the same file, loaded by hand and given to a Distiller.
    teacher = keras.saving.load_model(path)
    student = build.student(configs.load_config("digits:smoke=True"), 10)
    with pytest.raises(ValueError) as python_error:
        Distiller(teacher, student)
    python_message = _without_label(str(python_error.value), f"The teacher {teacher.name!r}")
    assert cli_message == python_message
    expected = "probabilities" if teacher_file == "softmax" else "non-finite values"
    assert expected in python_message


def test_a_softmax_teacher_is_refused_when_the_distiller_is_made(toy):
    # A final softmax layer, seen in the model's layers (even unbuilt).
    for teacher in (toy.mlp(seed=1), keras.Sequential([keras.layers.Dense(toy.NUM_CLASSES)])):
        teacher.layers[-1].activation = keras.activations.softmax
        with pytest.raises(ValueError, match=r"ends in a softmax .*probabilities, not logits"
                                             r".*classifier_activation=None"):
            Distiller(teacher, toy.mlp(seed=2))
    # A softmax hidden in a nested head: seen in the outputs of one forward pass.
    inputs = keras.Input((6,))
    head = keras.Sequential([keras.layers.Dense(toy.NUM_CLASSES, activation="softmax")])
    hidden = keras.Model(inputs, head(keras.layers.Dense(8)(inputs)), name="hidden")
    with pytest.raises(ValueError, match=r"The teacher 'hidden' outputs probabilities "
                                         r"\(non-negative, each row summing to 1\)"):
        Distiller(hidden, toy.mlp(seed=2))


@pytest.mark.parametrize("temperature", [float("inf"), float("nan"), -1.0, 0])
def test_a_temperature_that_is_not_finite_and_positive_is_refused(temperature, toy):
    message = rf"finite number > 0 .*Received: temperature={temperature}"
    with pytest.raises(ValueError, match=message):
        Distiller(toy.mlp(seed=1), toy.mlp(seed=2), temperature=temperature)
    with pytest.raises(ValueError, match=message):
        DistillationKL(temperature=temperature)


def test_a_temperature_that_is_not_a_number_is_a_type_error(toy):
    for temperature in ("2", True, [1.0, 2.0]):
        with pytest.raises(TypeError, match=r"must be a number > 0.*Received: temperature="):
            Distiller(toy.mlp(seed=1), toy.mlp(seed=2), temperature=temperature)
    assert Distiller(toy.mlp(seed=1), toy.mlp(seed=2), temperature=np.float32(2)).temperature == 2.0


def test_the_student_as_its_own_teacher_is_refused(toy):
    student = toy.mlp(seed=2)
    with pytest.raises(ValueError, match=r"The teacher '\w+' is the student: a model cannot "
                                         r"teach itself.*Pass another model as the teacher"):
        Distiller(student, student)
    with pytest.raises(ValueError, match=r"Teacher 1 '\w+' is the student"):
        Distiller([toy.mlp(seed=1), student], student)
    assert student.trainable  # refused before the teacher was frozen
    # A student built on the teacher's layers would be frozen with it.
    teacher = toy.mlp(seed=1)
    head = keras.layers.Dense(toy.NUM_CLASSES)
    shared = keras.Model(teacher.inputs, head(teacher.layers[0].output))
    with pytest.raises(ValueError, match=r"shares 2 weights with the student .*clone_model"):
        Distiller(teacher, shared)


class SubclassedNet(keras.Model):
    """A subclassed model: no shapes are known until it is called."""

    def __init__(self, num_classes, outputs="tensor", **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(8, activation="relu")
        self.head = keras.layers.Dense(num_classes)
        self.outputs_as = outputs

    def call(self, x):
        logits = self.head(self.hidden(x))
        return {"logits": logits, "features": x} if self.outputs_as == "dict" else logits


def test_unbuilt_models_of_other_class_counts_are_refused_at_the_first_batch(rng, toy):
    x, _ = toy.data(rng)
    message = r"The teacher 'ten' outputs 10 classes but the student outputs 5.*num_classes=10"
    with pytest.raises(ValueError, match=message):
        _fit(Distiller(SubclassedNet(10, name="ten"), SubclassedNet(toy.NUM_CLASSES)), x)
    with pytest.raises(ValueError, match=message):  # Sequential without an Input
        _fit(Distiller(keras.Sequential([keras.layers.Dense(10)], name="ten"),
                       keras.Sequential([keras.layers.Dense(toy.NUM_CLASSES)])), x)
    with pytest.raises(ValueError, match=r"Teacher 1 'ten' outputs 10 classes but "
                                         r"Teacher 0 '\w+' outputs 5"):
        _fit(Distiller([SubclassedNet(toy.NUM_CLASSES), SubclassedNet(10, name="ten")],
                       SubclassedNet(toy.NUM_CLASSES)), x)
    with pytest.raises(ValueError, match=r"The batch's 'teacher_logits' outputs 7 classes"):
        _fit(Distiller(None, toy.mlp()), {"student": x, "teacher_logits": np.zeros((16, 7))})


def test_unbuilt_models_of_the_same_classes_still_train(rng, toy):
    x, y = toy.data(rng)
    teacher, student = SubclassedNet(toy.NUM_CLASSES), SubclassedNet(toy.NUM_CLASSES)
    history = _fit(Distiller(teacher, student), x, y[:, None], validation_data=(x, y))
    assert np.isfinite(history.history["loss"][0])
    assert set(history.history) >= {"val_student_top1", "val_teacher_top1"}


def test_a_model_that_returns_a_dict_or_a_list_is_refused(rng, toy):
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8)(inputs)
    logits = keras.layers.Dense(toy.NUM_CLASSES)(hidden)
    as_dict = keras.Model(inputs, {"logits": logits, "features": hidden}, name="as_dict")
    as_list = keras.Model(inputs, [logits, hidden], name="as_list")
    fix = r"one logits tensor of shape \(batch, classes\).*keras.Model\(model.input, "
    with pytest.raises(ValueError, match=r"The teacher 'as_dict' returns a dict with keys "
                                         rf"\['features', 'logits'\], not one tensor.*{fix}"):
        Distiller(as_dict, toy.mlp())
    with pytest.raises(ValueError, match=rf"The student returns a dict with keys.*{fix}"):
        Distiller(toy.mlp(), as_dict)
    with pytest.raises(ValueError, match=r"The teacher 'as_list' returns a list of 2 tensors"):
        Distiller(as_list, toy.mlp())
    # Unbuilt: refused at the first batch.
    x, _ = toy.data(rng)
    with pytest.raises(ValueError, match=r"The teacher 'd' returns a dict with keys"):
        _fit(Distiller(SubclassedNet(toy.NUM_CLASSES, outputs="dict", name="d"), toy.mlp()), x)


def test_one_hot_labels_are_refused_before_a_step(rng, toy):
    x, y = toy.data(rng)
    one_hot = np.eye(toy.NUM_CLASSES, dtype="float32")[y]
    distiller = Distiller(toy.mlp(seed=1), toy.mlp(seed=2))
    distiller.compile(optimizer="sgd")
    message = (r"The labels have shape \(None, 5\), one value per class \(one-hot\).*integer "
               r"class indices.*argmax\(y, axis=-1\)")
    with pytest.raises(ValueError, match=message):
        distiller.evaluate(x, one_hot, verbose=0)
    with pytest.raises(ValueError, match=message):
        distiller.fit(x, y, validation_data=(x, one_hot), epochs=1, verbose=0)
    assert distiller.evaluate(x, y, verbose=0, return_dict=True)["student_top1"] >= 0


def test_one_tensor_for_models_of_different_input_sizes_names_the_dict_batch(rng, toy):
    xs, _ = toy.data(rng, dim=6)
    xt, _ = toy.data(rng, dim=9)
    dict_fix = (r'pass dict batches \{"student": student_images, "teacher": teacher_images\}'
                r'.*"Batches the Distiller accepts"')
    distiller = Distiller(toy.mlp(input_dim=9, seed=1), toy.mlp(input_dim=6, seed=2))
    with pytest.raises(ValueError, match=r"The teacher '\w+' takes inputs of shape \(None, 9\), "
                                         r"but the batch is one tensor of shape \(None, 6\).*"
                                         + dict_fix):
        _fit(distiller, xs)
    with pytest.raises(ValueError, match=r"The student takes inputs of shape \(None, 6\), but "
                                         r"the batch is one tensor of shape \(None, 9\).*"
                                         + dict_fix):
        _fit(distiller, xt)
    _fit(distiller, {"student": xs, "teacher": xt})  # the fix works


def test_save_says_what_to_save_instead(rng, tmp_path, toy):
    x, y = toy.data(rng)
    distiller = Distiller(toy.mlp(seed=1), toy.mlp(seed=2))
    _fit(distiller, x, y)
    instead = (r"distiller\.student\.save\('student\.keras'\).*"
               r"fm\.loop\.fit_with_checkpoints\(distiller, \.\.\., saved=distiller\.student\)")
    with pytest.raises(NotImplementedError, match=instead):
        distiller.save(tmp_path / "distiller.keras")
    assert not os.listdir(tmp_path)  # nothing half-written
    with pytest.raises(NotImplementedError, match=instead):
        distiller.to_json()  # what keras.saving.save_model calls


def test_a_model_checkpoint_of_the_whole_distiller_is_refused_before_training(rng, tmp_path, toy):
    x, y = toy.data(rng)
    distiller = Distiller(toy.mlp(seed=1), toy.mlp(seed=2))
    before = [w.copy() for w in distiller.student.get_weights()]
    whole = keras.callbacks.ModelCheckpoint(str(tmp_path / "distiller.keras"))
    with pytest.raises(ValueError, match=r"ModelCheckpoint\(save_weights_only=False\) would save "
                                         r"the Distiller.*distiller\.student\.save"):
        _fit(distiller, x, y, callbacks=[whole])
    for a, b in zip(before, distiller.student.get_weights()):
        np.testing.assert_array_equal(a, b)  # refused before the first step
    assert not os.listdir(tmp_path)
    # Weights only: saved, and a new Distiller of the same models reads them back.
    path = str(tmp_path / "distiller.weights.h5")
    _fit(distiller, x, y, callbacks=[keras.callbacks.ModelCheckpoint(path,
                                                                     save_weights_only=True)])
    copy = Distiller(toy.mlp(seed=3), toy.mlp(seed=4))
    copy(x[:1])  # built, as Keras asks before load_weights
    copy.load_weights(path)
    for a, b in zip(distiller.student.get_weights(), copy.student.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_check_models_is_what_the_distiller_runs(toy):
    # The construction checks are models.checks.check_models: called alone, the same error.
    student = toy.mlp(seed=2)
    with pytest.raises(ValueError) as direct:
        checks.check_models([student], student)
    with pytest.raises(ValueError) as through_distiller:
        Distiller(student, student)
    assert str(direct.value) == str(through_distiller.value)
    with pytest.raises(TypeError, match=r"`teacher` must be a keras.Model.*Received: "
                                        r"teacher='teacher.keras' \(a str\)"):
        Distiller("teacher.keras", student)
    with pytest.raises(TypeError, match=r"`student` must be a keras.Model.*Received: "
                                        r"student=None"):
        Distiller(toy.mlp(seed=1), None)
