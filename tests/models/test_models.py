"""Tests for funmatch_keras.models: BiT ResNetV2, its checkpoints, `build`, `load_weights`.

Every spec of `models.list_models()` also goes through the shared harness
(tests/model_harness.py): `.keras` and SavedModel round trips, one Distiller
step, mixed_bfloat16 logits.

NumPy references here are written independently of the implementation and pin
the numerics that must match the released checkpoints (weight-standardization
eps, GroupNorm eps, explicit padding).
"""

from __future__ import annotations

import os
import pickle
import re
import warnings

import keras
import numpy as np
import pytest

from funmatch_keras import models
from funmatch_keras.models import (
    StdConv2D,
    bit_r50x1,
    fold_weight_standardization,
    load_bit_npz,
    load_timm_bit,
    save_bit_npz,
)

SIZE = 64
CLASSES = 5


# ----------------------------------------------------------------- helpers ---
def _randomize(model: keras.Model, seed: int = 0) -> keras.Model:
    """Random, non-trivial weights (GroupNorm gammas near 1, non-zero head)."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        shape = tuple(variable.shape)
        if variable.path.endswith("gamma"):
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        elif len(shape) == 1:
            value = 0.1 * rng.standard_normal(shape)
        else:
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
        variable.assign(value.astype(np.float32))
    return model


def _images(size: int = SIZE, batch: int = 2, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)


def _np_standardize(w: np.ndarray) -> np.ndarray:
    w = w.astype(np.float64)
    mean = w.mean(axis=(0, 1, 2), keepdims=True)
    var = ((w - mean) ** 2).mean(axis=(0, 1, 2), keepdims=True)
    return (w - mean) / np.sqrt(var + 1e-10)


def _np_conv(x: np.ndarray, w: np.ndarray, stride: int = 1) -> np.ndarray:
    """'valid' NHWC x HWIO convolution."""
    kh, kw = w.shape[:2]
    oh = (x.shape[1] - kh) // stride + 1
    ow = (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], oh, ow, w.shape[3]))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i:i + stride * oh:stride, j:j + stride * ow:stride, :]
            out += patch @ w[i, j]
    return out


def _np_std_conv(x, layer, stride=1):
    return _np_conv(x, _np_standardize(layer.get_weights()[0]), stride)


def _np_group_norm(x: np.ndarray, layer, groups: int = 32) -> np.ndarray:
    gamma, beta = layer.get_weights()
    n, h, w, c = x.shape
    g = x.reshape(n, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    g = (g - mean) / np.sqrt(var + 1e-5)
    return g.reshape(n, h, w, c) * gamma + beta


def _pad(x: np.ndarray, p: int) -> np.ndarray:
    return np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))


def _np_unit(x: np.ndarray, model: keras.Model, name: str, stride: int) -> np.ndarray:
    relu = lambda v: np.maximum(v, 0.0)  # noqa: E731
    layer = model.get_layer
    preact = relu(_np_group_norm(x, layer(f"{name}_a_norm")))
    try:
        shortcut = _np_std_conv(preact, layer(f"{name}_a_proj"), stride)
    except ValueError:
        shortcut = x
    y = _np_std_conv(preact, layer(f"{name}_a_conv"))
    y = relu(_np_group_norm(y, layer(f"{name}_b_norm")))
    y = _np_std_conv(_pad(y, 1), layer(f"{name}_b_conv"), stride)
    y = relu(_np_group_norm(y, layer(f"{name}_c_norm")))
    return shortcut + _np_std_conv(y, layer(f"{name}_c_conv"))


def _assert_close(actual, expected, tol: float = 1e-5) -> None:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(1.0, np.abs(expected).max())
    assert np.abs(actual - expected).max() <= tol * scale


def _bit_to_timm(name: str) -> str:
    """BiT checkpoint name -> timm `resnetv2_*_bit` state-dict name."""
    name = name.removeprefix("resnet/")
    leaf = {"gamma": "weight", "beta": "bias", "kernel": "weight", "bias": "bias"}
    fixed = {
        "root_block/standardized_conv2d/kernel": "stem.conv.weight",
        "group_norm/gamma": "norm.weight",
        "group_norm/beta": "norm.bias",
        "head/conv2d/kernel": "head.fc.weight",
        "head/conv2d/bias": "head.fc.bias",
    }
    if name in fixed:
        return fixed[name]
    match = re.fullmatch(r"block(\d)/unit(\d+)/([abc])/(.+)", name)
    block, unit, part, rest = match.groups()
    prefix = f"stages.{int(block) - 1}.blocks.{int(unit) - 1}."
    index = "abc".index(part) + 1
    if rest.startswith("proj/"):
        return prefix + "downsample.conv.weight"
    module = "norm" if rest.startswith("group_norm") else "conv"
    return prefix + f"{module}{index}." + leaf[rest.rsplit("/", 1)[1]]


def _oihw(value: np.ndarray) -> np.ndarray:
    """HWIO -> OIHW for kernels; contiguous, as safetensors ignores strides."""
    if value.ndim == 4:
        value = value.transpose(3, 2, 0, 1)
    return np.ascontiguousarray(value)


@pytest.fixture(scope="module")
def model() -> keras.Model:
    return _randomize(bit_r50x1(CLASSES, image_size=SIZE))


@pytest.fixture(scope="module")
def bit_npz(model, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("bit") / "r50x1.npz")
    save_bit_npz(model, path)
    return path


def _fresh(num_classes: int = CLASSES) -> keras.Model:
    return bit_r50x1(num_classes, image_size=SIZE)


# ------------------------------------------------------------ architecture ---
def test_parameter_counts():
    assert bit_r50x1(1000).count_params() == 25_549_352
    assert models.bit_r101x1(1000).count_params() == 44_541_480


@pytest.mark.slow
def test_parameter_count_r152x2():
    assert models.bit_r152x2(1000).count_params() == 236_335_208


def test_unit_weight_shapes(model):
    def shapes(name):
        return [tuple(w.shape) for w in model.get_layer(name).weights]

    assert shapes("root_conv") == [(7, 7, 3, 64)]
    assert shapes("block2_unit01_a_norm") == [(256,), (256,)]
    assert shapes("block2_unit01_a_proj") == [(1, 1, 256, 512)]
    assert shapes("block2_unit01_a_conv") == [(1, 1, 256, 128)]
    assert shapes("block2_unit01_b_conv") == [(3, 3, 128, 128)]
    assert shapes("block2_unit01_c_norm") == [(128,), (128,)]
    assert shapes("block2_unit01_c_conv") == [(1, 1, 128, 512)]
    assert shapes("head_logits") == [(2048, CLASSES), (CLASSES,)]
    names = {layer.name for layer in model.layers}
    assert "block1_unit01_a_proj" in names  # channels change 64 -> 256
    assert "block2_unit02_a_proj" not in names
    assert sum(isinstance(layer, StdConv2D) for layer in model.layers) == 53


def test_head_is_zero_initialized():
    logits = _fresh()(_images())
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(logits), 0.0)


def test_std_conv_matches_numpy():
    layer = StdConv2D(8, 3, strides=2)
    x = _images(size=9)
    y = layer(x)
    w = layer.get_weights()[0]
    layer.set_weights([w * 3.0 + 0.5])  # standardization removes scale and shift
    _assert_close(layer(x), y)
    _assert_close(y, _np_conv(x, _np_standardize(w), 2))


def test_std_conv_config_roundtrip():
    layer = StdConv2D(4, 1, name="c")
    clone = StdConv2D.from_config(layer.get_config())
    assert clone.epsilon == 1e-10 and not clone.use_bias
    with pytest.raises(ValueError, match="use_bias"):
        StdConv2D(4, 1, use_bias=True)


def test_root_and_units_match_numpy(model):
    x = _images()
    relu_root = keras.Model(model.input, model.get_layer("root_pool").output)
    root = _np_std_conv(_pad(x.astype(np.float64), 3), model.get_layer("root_conv"), 2)
    root = _pad(root, 1)
    pooled = np.full((2, 16, 16, 64), -np.inf)
    for i in range(3):
        for j in range(3):
            pooled = np.maximum(pooled, root[:, i:i + 32:2, j:j + 32:2, :])
    _assert_close(relu_root(x), pooled)

    for name, stride in [("block1_unit01", 1), ("block2_unit01", 2),
                         ("block2_unit02", 1)]:
        unit = keras.Model(model.get_layer(f"{name}_a_norm").input,
                           model.get_layer(f"{name}_add").output)
        h = np.random.default_rng(2).standard_normal(
            (2,) + tuple(unit.input.shape[1:])
        ).astype(np.float32)
        _assert_close(unit(h), _np_unit(h.astype(np.float64), model, name, stride))


def test_any_input_size():
    net = _randomize(bit_r50x1(3))
    assert net.input_shape == (None, None, None, 3)
    assert tuple(net(_images(32)).shape) == (2, 3)
    assert tuple(net(_images(80)).shape) == (2, 3)


@pytest.mark.parametrize("dtype", ["mixed_bfloat16", "bfloat16"])
def test_bfloat16_policies_give_float32_logits(dtype, model, bit_npz):
    net = load_bit_npz(bit_r50x1(CLASSES, image_size=SIZE, dtype=dtype), bit_npz)
    assert net.get_layer("block1_unit01_b_conv").compute_dtype == "bfloat16"
    logits = net(_images())
    assert logits.dtype == "float32"
    reference = keras.ops.convert_to_numpy(model(_images()))
    assert np.abs(keras.ops.convert_to_numpy(logits) - reference).max() < 0.25 * (
        1 + np.abs(reference).max()
    )


def test_fold_weight_standardization(model):
    folded = fold_weight_standardization(model)
    assert not any(isinstance(layer, StdConv2D) for layer in folded.layers)
    conv = folded.get_layer("block3_unit01_b_conv")
    assert type(conv) is keras.layers.Conv2D and not conv.use_bias
    _assert_close(folded(_images()), model(_images()))
    bf16 = fold_weight_standardization(bit_r50x1(3, SIZE, dtype="mixed_bfloat16"))
    assert bf16.get_layer("root_conv").dtype_policy.name == "mixed_bfloat16"


# ----------------------------------------------------------------- weights ---
def test_bit_npz_roundtrip_is_exact(model, bit_npz):
    with np.load(bit_npz) as data:
        assert data["resnet/head/conv2d/kernel"].shape == (1, 1, 2048, CLASSES)
        assert data["resnet/block1/unit02/a/group_norm/gamma"].shape == (256,)
        assert data["resnet/block1/unit02/a/standardized_conv2d/kernel"].shape == (
            1, 1, 256, 64)
        assert data["resnet/block1/unit01/a/proj/standardized_conv2d/kernel"].shape == (
            1, 1, 64, 256)
    fresh = load_bit_npz(_fresh(), bit_npz)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(fresh(_images())),
        keras.ops.convert_to_numpy(model(_images())),
    )


def test_timm_checkpoint_matches_bit_npz(model, bit_npz, tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(3)
    with np.load(bit_npz) as data:
        bit = {k: rng.standard_normal(data[k].shape).astype(np.float32) for k in data}
    timm = {_bit_to_timm(k): _oihw(v) for k, v in bit.items()}
    assert timm["head.fc.weight"].shape == (CLASSES, 2048, 1, 1)
    assert timm["stages.0.blocks.0.downsample.conv.weight"].shape == (256, 64, 1, 1)
    np.savez(tmp_path / "bit.npz", **bit)
    save_file(timm, str(tmp_path / "timm.safetensors"))
    np.savez(tmp_path / "timm.npz", **timm)

    expected = load_bit_npz(_fresh(), tmp_path / "bit.npz")
    unit = expected.get_layer("block1_unit02_a_norm")  # a = pre-activation norm
    np.testing.assert_array_equal(
        unit.get_weights()[0], bit["resnet/block1/unit02/a/group_norm/gamma"])
    expected_logits = keras.ops.convert_to_numpy(expected(_images()))
    for name in ("timm.safetensors", "timm.npz"):
        loaded = load_timm_bit(_fresh(), tmp_path / name)
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(loaded(_images())), expected_logits)


def test_missing_misshaped_and_unused_tensors(bit_npz, tmp_path):
    with np.load(bit_npz) as data:
        arrays = dict(data)
    missing = dict(arrays)
    del missing["resnet/block3/unit02/b/standardized_conv2d/kernel"]
    np.savez(tmp_path / "missing.npz", **missing)
    with pytest.raises(ValueError, match=r"unit02/b/standardized_conv2d.*missing"):
        load_bit_npz(_fresh(), tmp_path / "missing.npz")

    wrong = dict(arrays)
    wrong["resnet/group_norm/gamma"] = np.ones(7, np.float32)
    np.savez(tmp_path / "wrong.npz", **wrong)
    with pytest.raises(ValueError, match=r"gamma: expected \(2048,\), found \(7,\)"):
        load_bit_npz(_fresh(), tmp_path / "wrong.npz")

    extra = dict(arrays)
    extra.update({"resnet/extra/a": np.zeros(1), "resnet/extra/b": np.zeros(1)})
    np.savez(tmp_path / "extra.npz", **extra)
    with pytest.warns(UserWarning, match="2 tensor"):
        load_bit_npz(_fresh(), tmp_path / "extra.npz")

    with pytest.raises(FileNotFoundError):
        load_bit_npz(_fresh(), tmp_path / "absent.npz")


def test_pickled_npz_is_refused(tmp_path):
    path = tmp_path / "pickled.npz"
    np.savez(path, **{"resnet/group_norm/gamma": np.array([{"x": 1}], dtype=object)})
    with pytest.raises(ValueError, match="pickle"):
        load_bit_npz(_fresh(), path)
    raw = tmp_path / "raw.npz"
    with open(raw, "wb") as f:
        pickle.dump({"resnet/group_norm/gamma": np.ones(3)}, f)
    with pytest.raises(ValueError, match="pickle"):
        load_bit_npz(_fresh(), raw)


def test_head_auto_refuses_other_class_count_unless_new_head(model, bit_npz):
    with pytest.raises(ValueError, match=r"5-class head .*7 classes.*new_head=True"):
        load_bit_npz(_fresh(num_classes=7), bit_npz)  # head="auto"
    with pytest.warns(UserWarning, match="trained with labels"):
        other = load_bit_npz(_fresh(num_classes=7), bit_npz, new_head=True)
    np.testing.assert_array_equal(other.get_layer("head_logits").get_weights()[0], 0.0)
    np.testing.assert_array_equal(
        other.get_layer("root_conv").get_weights()[0],
        model.get_layer("root_conv").get_weights()[0])
    with pytest.raises(ValueError, match="head/conv2d/kernel"):
        load_bit_npz(_fresh(num_classes=7), bit_npz, head=True)
    with pytest.warns(UserWarning, match="zero-initialised"):
        same = load_bit_npz(_fresh(), bit_npz, head=False)
    np.testing.assert_array_equal(same.get_layer("head_logits").get_weights()[0], 0.0)
    with pytest.raises(ValueError, match="head"):
        load_bit_npz(_fresh(), bit_npz, head="yes")


# A stand-in for a BiT model with the two layers the name map needs (a stem conv
# and the head): checkpoint handling in milliseconds instead of an R50's seconds.
def _mini_bit(num_classes: int = 10) -> keras.Model:
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, use_bias=False, name="root_conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    logits = keras.layers.Dense(num_classes, kernel_initializer="zeros", name="head_logits")(x)
    return keras.Model(inputs, logits, name="mini_bit")


def _mini_timm(tmp_path, num_classes=7, head=True, name="timm.safetensors"):
    """A timm-named `.safetensors` for `_mini_bit` (OIHW kernels, 1x1-conv head)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    state = {"stem.conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32)}
    if head:
        state["head.fc.weight"] = rng.standard_normal((num_classes, 4, 1, 1)).astype(
            np.float32)
        state["head.fc.bias"] = np.zeros(num_classes, np.float32)
    save_file(state, str(tmp_path / name))
    return tmp_path / name


def test_timm_head_of_another_class_count_names_shapes_and_fix(tmp_path):
    seven = _mini_timm(tmp_path)  # the bug: a 7-class teacher used for 10 classes
    for load in (models.load_weights, load_timm_bit):
        with pytest.raises(ValueError) as error:
            load(_mini_bit(10), seven)
        message = str(error.value)
        assert "timm.safetensors" in message and "7-class head" in message
        assert "(7, 4, 1, 1)" in message and "(10, 4, 1, 1)" in message
        assert "10 classes" in message and "new_head=True" in message
    matching = models.load_weights(_mini_bit(7), seven)
    assert np.abs(matching.get_layer("head_logits").get_weights()[0]).max() > 0
    headless = _mini_timm(tmp_path, head=False, name="headless.safetensors")
    with pytest.raises(ValueError, match="has no classifier head.*new_head=True"):
        models.load_weights(_mini_bit(10), headless)


def test_new_head_is_explicit_and_warns_that_the_model_must_be_trained(tmp_path):
    seven = _mini_timm(tmp_path)
    with pytest.warns(UserWarning, match="zero-initialised 10-class head.*train"):
        model = models.load_weights(_mini_bit(10), seven, new_head=True)
    np.testing.assert_array_equal(model.get_layer("head_logits").get_weights()[0], 0.0)
    np.testing.assert_array_equal(  # the backbone is loaded (OIHW -> HWIO)
        model.get_layer("root_conv").get_weights()[0],
        _safetensor(seven, "stem.conv.weight").transpose(2, 3, 1, 0))
    with pytest.raises(ValueError, match="head=True.*new_head"):
        models.load_weights(_mini_bit(10), seven, head=True, new_head=True)
    with pytest.raises(ValueError, match="'if_needed'"):
        models.load_weights(_mini_bit(10), seven, new_head="yes")
    # "if_needed" (fine-tuning code): the checkpoint's head when it fits, else new.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fits = models.load_weights(_mini_bit(7), seven, new_head="if_needed")
    assert np.abs(fits.get_layer("head_logits").get_weights()[0]).max() > 0
    with pytest.warns(UserWarning, match="zero-initialised 10-class head"):
        models.load_weights(_mini_bit(10), seven, new_head="if_needed")
    _mini_bit(10).save_weights(tmp_path / "mini.weights.h5")
    with pytest.raises(ValueError, match="Keras file.*new_head"):
        models.load_weights(_mini_bit(10), tmp_path / "mini.weights.h5", new_head=True)


def _safetensor(path, name):
    from safetensors.numpy import load_file

    return load_file(str(path))[name]


def _truncate(path, keep=0.5):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])
    return path


def test_truncated_checkpoints_say_so_and_name_the_file(tmp_path):
    seven = _truncate(_mini_timm(tmp_path, num_classes=10))
    for load in (models.load_weights, load_timm_bit):
        with pytest.raises(ValueError, match=r"timm\.safetensors.*truncated or corrupt"):
            load(_mini_bit(10), seven)
    state = {"stem.conv.weight": np.zeros((4, 3, 3, 3), np.float32)}
    np.savez(tmp_path / "timm.npz", **state)
    with pytest.raises(ValueError, match=r"timm\.npz.*truncated or corrupt.*again"):
        models.load_weights(_mini_bit(10), _truncate(tmp_path / "timm.npz"))
    _mini_bit(10).save_weights(tmp_path / "mini.weights.h5")
    with pytest.raises(ValueError, match=r"mini\.weights\.h5.*truncated or corrupt"):
        models.load_weights(_mini_bit(10), _truncate(tmp_path / "mini.weights.h5"))


def test_truncated_keras_file_is_not_reported_as_missing(tmp_path):
    path = tmp_path / "teacher.keras"
    _mini_bit(3).save(path)
    _truncate(path)
    for load in (lambda: models.build(str(path), 3, 8), lambda: models.load_keras_file(path),
                 lambda: models.load_weights(_mini_bit(3), path)):
        with pytest.raises(ValueError, match=r"teacher\.keras.*truncated or corrupt") as error:
            load()
        assert "not found" not in str(error.value).lower()
    with pytest.raises(FileNotFoundError, match="absent.keras"):
        models.load_keras_file(tmp_path / "absent.keras")


# ------------------------------------------------------------------- build ---
def test_build_bit_and_keras_application():
    bit = models.build("bit_r50x1", num_classes=4, image_size=32)
    assert bit.name == "bit_r50x1" and bit.output_shape == (None, 4)
    mobile = models.build("keras:MobileNetV2", num_classes=4, image_size=32)
    assert mobile.input_shape == (None, 32, 32, 3) and mobile.output_shape == (None, 4)
    assert mobile.layers[-1].activation in (None, keras.activations.linear)


def _tiny(num_classes: int = 3) -> keras.Model:
    inputs = keras.Input((32, 32, 3), name="images")
    x = keras.layers.Conv2D(4, 3)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes)(x))


def test_build_from_keras_file(tmp_path):
    tiny = _tiny()
    path = str(tmp_path / "tiny.keras")
    tiny.save(path)
    loaded = models.build(path, num_classes=3, image_size=32)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(loaded(_images(32))),
        keras.ops.convert_to_numpy(tiny(_images(32))))
    with pytest.raises(ValueError, match="num_classes=5"):
        models.build(path, num_classes=5, image_size=32)


def _exported_tiny(tmp_path) -> tuple[keras.Model, str]:
    tiny = _tiny()
    path = str(tmp_path / "teacher")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny.export(path, format="tf_saved_model", verbose=False)
    return tiny, path


def test_build_from_saved_model(tmp_path):
    tiny, path = _exported_tiny(tmp_path)
    teacher = models.build(path, num_classes=3, image_size=32)
    assert not teacher.trainable
    _assert_close(teacher(_images(32)), tiny(_images(32)), tol=1e-6)


def test_build_rejects_bad_specs(tmp_path):
    with pytest.raises(ValueError, match="bit_r50x1"):
        models.build("resnet9000", num_classes=3, image_size=32)
    with pytest.raises(ValueError, match="NotAModel"):
        models.build("keras:NotAModel", num_classes=3, image_size=32)
    with pytest.raises(FileNotFoundError):
        models.build(str(tmp_path / "absent.keras"), num_classes=3, image_size=32)
    with pytest.raises(FileNotFoundError):
        models.build(os.path.join(str(tmp_path), "no", "dir"), 3, 32)
    with pytest.raises(ValueError, match="SavedModel"):
        models.build(str(tmp_path), num_classes=3, image_size=32)


def test_build_small_cnn_spec():
    cnn = models.build("cnn:4,8", num_classes=5, image_size=16)
    assert cnn.output_shape == (None, 5)
    assert [layer.filters for layer in cnn.layers if hasattr(layer, "filters")] == [4, 8]
    with pytest.raises(ValueError, match="cnn:16,32,64"):
        models.build("cnn:4,x", num_classes=5, image_size=16)


def test_saved_model_teacher_inside_distiller(tmp_path):
    from funmatch_keras import Distiller

    tiny, path = _exported_tiny(tmp_path)
    teacher = models.build(path, num_classes=3, image_size=32)
    keras.utils.set_random_seed(0)
    student = _tiny()
    # A student far from the teacher, so that matching it shows in the loss.
    kernel = student.layers[-1].kernel
    kernel.assign(kernel * 50.0)
    distiller = Distiller(teacher, student, temperature=2.0)
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
    images = np.random.default_rng(0).uniform(-1, 1, (8, 32, 32, 3)).astype("float32")
    logs = distiller.evaluate(images, verbose=0, return_dict=True)
    distiller.fit(images, epochs=40, batch_size=8, verbose=0)
    after = distiller.evaluate(images, verbose=0, return_dict=True)
    assert after["loss"] < 0.5 * logs["loss"]
    # The SavedModel teacher's outputs are unchanged by training.
    _assert_close(teacher(images), tiny(images), tol=1e-6)


def test_list_models_names_every_family():
    specs = models.list_models()
    assert specs[:6] == list(models.zoo.BIT_MODELS)
    assert "keras:MobileNetV2" in specs and "cnn:16,32,64" in specs
    assert models.list_models("cnn") == ["cnn:16,32,64"]
    assert len(specs) == len(set(specs))
    with pytest.raises(ValueError, match="kind='vit'"):
        models.list_models("vit")


# ----------------------------------------------------------- load_weights ---
def test_load_weights_dispatches_by_format(model, bit_npz, tmp_path):
    from safetensors.numpy import save_file

    expected = keras.ops.convert_to_numpy(model(_images()))
    with np.load(bit_npz) as data:
        timm = {_bit_to_timm(k): _oihw(data[k]) for k in data}
    save_file(timm, str(tmp_path / "timm.safetensors"))
    np.savez(tmp_path / "timm.npz", **timm)
    model.save_weights(str(tmp_path / "bit.weights.h5"))
    model.save(str(tmp_path / "bit.keras"))
    fresh = _fresh()
    for path in (bit_npz, tmp_path / "timm.npz", tmp_path / "timm.safetensors",
                 tmp_path / "bit.weights.h5", tmp_path / "bit.keras"):
        fresh.set_weights([np.zeros_like(w) for w in fresh.get_weights()])
        assert models.load_weights(fresh, path) is fresh
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(fresh(_images())), expected,
                                      err_msg=str(path))


def test_load_weights_passes_head_and_names_bad_files(model, bit_npz, tmp_path):
    with pytest.raises(ValueError, match="new_head=True"):
        models.load_weights(_fresh(num_classes=7), bit_npz)  # head="auto"
    with pytest.warns(UserWarning, match="trained with labels"):
        other = models.load_weights(_fresh(num_classes=7), bit_npz, new_head=True)
    np.testing.assert_array_equal(other.get_layer("head_logits").get_weights()[0], 0.0)
    with pytest.raises(ValueError, match="head/conv2d/kernel"):
        models.load_weights(_fresh(num_classes=7), bit_npz, head=True)
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        models.load_weights(_fresh(), tmp_path / "absent.npz")
    (tmp_path / "weights.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"Unknown weights format.*\.safetensors"):
        models.load_weights(_fresh(), tmp_path / "weights.pt")
    raw = tmp_path / "raw.npz"
    with open(raw, "wb") as f:
        pickle.dump({"resnet/group_norm/gamma": np.ones(3)}, f)
    with pytest.raises(ValueError, match="pickle"):
        models.load_weights(_fresh(), raw)


# ---------------------------------------------------------------- harness ---
# Every registered spec goes through the harness, in `make test` and CI. The
# fast specs and one spec of each family (its smallest member; a `keras:`
# family is the keras.applications module that defines it, BiT and the CNN are
# one builder each) run all its checks in the test process. The larger members
# of a family (the same builder with more blocks or channels) run in a process
# each, since TensorFlow keeps a freed model's memory, and those of more than
# 200M parameters on one xdist worker, one at a time. They get the checks of
# what differs between members, the logits and a Distiller step as a teacher
# (`family_checks=False`): the round trips, mixed_bfloat16 and training as a
# student exercise the builder's layers, which their family's spec checks, and
# CI has 30 minutes on 2 cores. `pytest -m heavy` runs every check on them.
# BiT-R152x4 (936M parameters) alone stays out of CI: its checks peak at 20 GB
# in one process, and CI has 24 GB for two workers (`pytest -m heavy
# tests/models/test_models.py`).
FAST_SPECS = ("cnn:16,32,64", "bit_r50x1", "keras:MobileNetV2")
FAMILY_SPECS = tuple(f"keras:{name}" for name in (
    "ConvNeXtTiny", "DenseNet121", "EfficientNetB0", "EfficientNetV2B0", "InceptionResNetV2",
    "InceptionV3", "MobileNet", "MobileNetV3Small", "NASNetMobile", "ResNet50", "ResNet50V2",
    "VGG16", "VGG19", "Xception"))
BIG_SPECS = ("bit_r50x3", "bit_r101x3", "bit_r152x2", "keras:ConvNeXtLarge",
             "keras:ConvNeXtXLarge")  # over 200M parameters
TOO_BIG_FOR_CI = ("bit_r152x4",)


def _family(spec: str) -> str:
    if spec.startswith("keras:"):
        return getattr(keras.applications, spec.removeprefix("keras:")).__module__
    return re.split(r"[_:]", spec)[0]  # "bit", "cnn"


def _spec_marks(spec) -> tuple:
    if spec in FAST_SPECS:
        return ()
    if spec in TOO_BIG_FOR_CI:
        return (pytest.mark.slow, pytest.mark.heavy)
    if spec in BIG_SPECS:
        return (pytest.mark.slow, pytest.mark.xdist_group("big_model_specs"))
    return (pytest.mark.slow,)


@pytest.mark.parametrize("spec", [
    pytest.param(spec, marks=_spec_marks(spec)) for spec in models.list_models()
])
def test_model_spec(spec, tmp_path, harness):
    if spec in FAST_SPECS + FAMILY_SPECS:
        harness.run_model_spec_test(spec, tmp_path)
    else:
        harness.run_model_spec_test_in_subprocess(spec, tmp_path, family_checks=False)


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.parametrize("spec", [
    spec for spec in models.list_models() if spec not in FAST_SPECS + FAMILY_SPECS])
def test_larger_family_members_pass_every_check(spec, tmp_path, harness):
    harness.run_model_spec_test_in_subprocess(spec, tmp_path, family_checks=True)


def test_every_model_family_has_a_spec_in_ci():
    in_ci = {_family(spec) for spec in FAST_SPECS + FAMILY_SPECS}
    assert in_ci == {_family(spec) for spec in models.list_models()}
    assert set(FAMILY_SPECS) <= set(models.list_models())
    assert set(BIG_SPECS + TOO_BIG_FOR_CI) <= set(models.list_models())


def test_every_model_spec_but_the_largest_runs_in_ci():
    heavy = {spec for spec in models.list_models()
             if any(mark.name == "heavy" for mark in _spec_marks(spec))}
    assert heavy == set(TOO_BIG_FOR_CI)
