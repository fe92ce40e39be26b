"""`build.teachers`: teachers that cannot teach are refused when they are built.

Each case once trained a student without an error: a zero head kept from a
checkpoint of another class count, a final softmax, NaN weights, or a fixed
input size that is not the configured `teacher_size` (found only at step one).
"""

import keras
import numpy as np
import pytest

from funmatch_keras import configs, models
from funmatch_keras.app import build


def _config(teacher: str, **overrides):
    values = {"teacher": teacher, **{k: str(v) for k, v in overrides.items()}}
    return configs.apply_overrides(configs.load_config("digits:smoke=True"), values)


def _keras_teacher(path, size=16, classes=10, activation=None, nan=False, any_size=False):
    inputs = keras.Input((None, None, 3) if any_size else (size, size, 3))
    x = keras.layers.Conv2D(4, 3)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    dense = keras.layers.Dense(classes, activation=activation)
    model = keras.Model(inputs, dense(x))
    if nan:
        kernel = dense.get_weights()[0]
        dense.set_weights([np.full_like(kernel, np.nan), dense.get_weights()[1]])
    model.save(path)
    return str(path)


def test_a_logits_teacher_passes(tmp_path):
    path = _keras_teacher(tmp_path / "teacher.keras")
    (teacher,) = build.teachers(_config(path), 10, str(tmp_path))
    assert teacher.output_shape == (None, 10)
    any_size = _keras_teacher(tmp_path / "any.keras", any_size=True)
    (teacher,) = build.teachers(_config(any_size, teacher_size=24), 10, str(tmp_path))


def test_a_softmax_teacher_is_refused_with_the_fix(tmp_path):
    path = _keras_teacher(tmp_path / "softmax.keras", activation="softmax")
    with pytest.raises(ValueError, match=r"softmax\.keras.*probabilities") as error:
        build.teachers(_config(path), 10, str(tmp_path))
    assert "without its final softmax" in str(error.value)
    assert "logits" in str(error.value)


def test_a_teacher_with_nan_weights_is_refused(tmp_path):
    path = _keras_teacher(tmp_path / "nan.keras", nan=True)
    with pytest.raises(ValueError, match="non-finite"):
        build.teachers(_config(path), 10, str(tmp_path))


def test_a_fixed_input_size_other_than_teacher_size_names_teacher_size(tmp_path):
    path = _keras_teacher(tmp_path / "t24.keras", size=24)
    with pytest.raises(ValueError, match=r"takes 24x24 images but is given 16x16.*"
                                         r"--config\.teacher_size to 24"):
        build.teachers(_config(path), 10, str(tmp_path))
    (teacher,) = build.teachers(_config(path, teacher_size=24), 10, str(tmp_path))
    small = _keras_teacher(tmp_path / "t16.keras", size=16)
    ensemble = _config(f"['{small}', '{path}']", teacher_size="[16, 16]")
    with pytest.raises(ValueError, match=r"size of teacher 1 .* to 24"):
        build.teachers(ensemble, 10, str(tmp_path))


def test_a_truncated_trained_teacher_in_the_workdir_is_named(tmp_path):
    config = _config("cnn:8")  # no weights: loaded from the workdir once trained
    path = tmp_path / "teacher.keras"
    models.build("cnn:8", 10, 16).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"teacher\.keras.*truncated or corrupt"):
        build.teachers(config, 10, str(tmp_path))


@pytest.mark.slow
def test_a_timm_teacher_with_a_7_class_head_for_10_classes_is_refused(tmp_path):
    from safetensors.numpy import save_file

    from funmatch_keras.models import bit_weights

    seven = models.bit_r50x1(7, image_size=32)
    state = {slot.timm: np.ascontiguousarray(bit_weights._to_file_layout(
        keras.ops.convert_to_numpy(slot.variable), slot, "timm"))
        for slot in bit_weights._name_map(seven)}
    path = str(tmp_path / "model.safetensors")
    save_file(state, path)
    config = _config("bit_r50x1", teacher_weights=path, teacher_size=32)
    with pytest.raises(ValueError, match=r"model\.safetensors.* 7-class head.*10 classes"):
        build.teachers(config, 10, str(tmp_path))
