"""keras-hub presets as teachers and students (`keras_hub:<preset>`), loaded offline.

Every preset here is a tiny random-weight keras-hub classifier written with
`save_to_preset` into a temporary directory: nothing is downloaded, and a test
that would reach for the network has the sockets blocked.
"""

import importlib.util
import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest

from funmatch_keras import configs, models
from funmatch_keras.app import distill as train
from funmatch_keras.distiller import Distiller
from funmatch_keras.models import hub

keras_hub = pytest.importorskip("keras_hub")

# ImageNet-style per-channel normalisation, so a wrong value range cannot pass.
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def save_preset(directory, num_classes, seed=0, size=32):
    """A tiny ResNet classifier with a mean/std image converter, saved as a preset."""
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64],
        stackwise_num_blocks=[1], stackwise_num_strides=[1], block_type="basic_block")
    converter = keras_hub.layers.ResNetImageConverter(
        image_size=(size, size), scale=[1 / (255 * s) for s in STD],
        offset=[-m / s for m, s in zip(MEAN, STD)])
    classifier = keras_hub.models.ResNetImageClassifier(
        backbone=backbone, num_classes=num_classes,
        preprocessor=keras_hub.models.ResNetImageClassifierPreprocessor(converter))
    # A head with weights, so that logits differ between images.
    for weight in classifier.trainable_weights:
        if "dense" in weight.path or "predictions" in weight.path:
            weight.assign(np.random.default_rng(seed).normal(0, 0.5, weight.shape))
    classifier.save_to_preset(str(directory))
    return classifier


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hub") / "preset_3"
    save_preset(directory, num_classes=3)
    return str(directory)


def test_the_spec_feeds_the_preset_the_value_range_its_converter_expects(preset):
    model = models.build("keras_hub:" + preset, num_classes=3, image_size=32)
    pixels = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3)).astype("float32")
    # keras-hub's own path: raw [0, 255] pixels through the preset's preprocessor.
    reference = keras_hub.models.ImageClassifier.from_preset(preset)
    expected = reference.predict(pixels, verbose=0)
    # Ours: the pipeline's [-1, 1] images.
    actual = keras.ops.convert_to_numpy(model(pixels / 127.5 - 1.0))
    np.testing.assert_allclose(actual, expected, atol=2e-4)
    # What the graph computes, by hand: x -> (x + 1) * 127.5 -> * 1/(255 std) - mean/std.
    layer = model.get_layer("preset_scale_offset")
    np.testing.assert_allclose(layer.scale, [1 / (255 * s) for s in STD], rtol=1e-6)
    np.testing.assert_allclose(layer.offset, [-m / s for m, s in zip(MEAN, STD)], rtol=1e-6)


def test_harness_as_teacher_and_student(preset, tmp_path, harness):
    # .keras round trip (safe_mode), one Distiller step (teacher frozen, student
    # moves), mixed_bfloat16 logits in float32, SavedModel export.
    harness.run_model_spec_test("keras_hub:" + preset, tmp_path, num_classes=3, image_size=32)


def test_a_student_gets_a_new_head_and_keeps_the_preset_backbone(preset, tmp_path):
    student = models.build("keras_hub:" + preset, num_classes=5, image_size=32, new_head=True)
    assert student.output_shape == (None, 5)
    original = keras_hub.models.ImageClassifier.from_preset(preset)
    kernel = original.backbone.weights[0]
    loaded = [w for w in student.weights if w.path.endswith(kernel.path.split("/", 1)[-1])]
    assert loaded, kernel.path
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded[0]),
                                  keras.ops.convert_to_numpy(kernel))
    teacher = models.build("cnn:8", num_classes=5, image_size=32)
    teacher.trainable = False
    distiller = Distiller(teacher, student, temperature=2.0)
    distiller.compile(optimizer=keras.optimizers.Adam(1e-3), run_eagerly=True)
    images = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)).astype("float32")
    before = [np.array(w) for w in student.trainable_weights]
    history = distiller.fit(images, epochs=1, batch_size=4, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert any(not np.allclose(a, np.array(b)) for a, b in
               zip(before, student.trainable_weights))
    path = str(tmp_path / "student.keras")
    student.save(path)
    reloaded = models.load_keras_file(path)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(reloaded(images)),
                               keras.ops.convert_to_numpy(student(images)), atol=1e-5)


def test_a_reheaded_hub_student_exports_with_parity(preset, tmp_path):
    from funmatch_keras.export import formats as export

    student = models.build("keras_hub:" + preset, num_classes=4, image_size=32, new_head=True)
    images = np.random.default_rng(0).uniform(-1, 1, (8, 32, 32, 3)).astype("float32")
    formats = ["keras", "saved_model", "tflite_fp32"]
    if importlib.util.find_spec("tf2onnx") is not None:
        formats.append("onnx")
    report = export.export_all(student, tmp_path, formats, eval_images=images)
    for fmt in formats:
        row = report["artifacts"][fmt]
        assert row["agreement"] == 1.0 and row["max_abs_logit_diff"] < 1e-4, (fmt, row)


def test_another_class_count_without_a_new_head_is_refused(preset):
    with pytest.raises(ValueError, match=r"classifies 3 classes but the data has 5") as info:
        models.build("keras_hub:" + preset, num_classes=5, image_size=32)
    assert ":new_head" in str(info.value) and "teacher_epochs" in str(info.value)
    # The spec's own ":new_head" re-heads it.
    model = models.build(f"keras_hub:{preset}:new_head", num_classes=5, image_size=32)
    assert model.output_shape == (None, 5)


def test_a_missing_local_preset_names_the_spec(tmp_path):
    spec = f"keras_hub:{tmp_path}/no_such_preset"
    with pytest.raises(FileNotFoundError, match="No keras-hub preset directory") as info:
        models.build(spec, num_classes=3, image_size=32)
    assert spec in str(info.value) and "save_to_preset" in str(info.value)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        models.build(f"keras_hub:{tmp_path}", num_classes=3, image_size=32)


def test_a_hub_preset_not_downloaded_says_it_needs_a_download_or_a_local_dir(monkeypatch,
                                                                              tmp_path):
    def no_network(*args, **kwargs):
        raise OSError("network unreachable (blocked by the test)")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kaggle_cache"))  # an empty cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for spec in ("keras_hub:mobilenet_v3_small_100_imagenet",
                 "keras_hub:hf://timm/mobilenetv3_small_100.lamb_in1k",
                 "keras_hub:not_a_preset_name"):
        with pytest.raises(ValueError, match="need a download") as info:
            models.build(spec, num_classes=3, image_size=32)
        message = str(info.value)
        assert repr(spec) in message and "local directory" in message, message


def test_without_keras_hub_the_error_names_the_extra(monkeypatch, preset, tmp_path):
    path = str(tmp_path / "hub.keras")
    models.build("keras_hub:" + preset, num_classes=3, image_size=32).save(path)
    monkeypatch.setitem(sys.modules, "keras_hub", None)  # as if not installed
    with pytest.raises(ImportError, match=r'funmatch-keras\[hub\]'):
        models.build("keras_hub:" + preset, num_classes=3, image_size=32)
    assert hub.is_hub_spec("keras_hub:x")  # parsing needs no keras-hub
    # Loading the .keras file where keras-hub cannot be imported (a fresh process:
    # this one has its classes registered already).
    code = ("import sys; sys.modules['keras_hub'] = None\n"
            "from funmatch_keras import models\n"
            f"models.load_keras_file({path!r})\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=root)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError:") and "holds a keras-hub model" in last, last
    assert 'pip install "funmatch-keras[hub]"' in last, last


def test_bad_specs():
    with pytest.raises(ValueError, match="names a preset"):
        models.build("keras_hub:", num_classes=3, image_size=32)
    assert hub.parse_spec("keras_hub:~/p:new_head") == (os.path.expanduser("~/p"), True)


@pytest.mark.slow
def test_distill_a_hub_teacher_into_a_reheaded_hub_student(tmp_path, smoke_config):
    # digits: 10 classes. The teacher preset has 10 (used as it is), the student's 3
    # (re-headed to 10). Offline, through the config and `funmatch distill`'s run.
    teacher_dir, student_dir = tmp_path / "teacher_preset", tmp_path / "student_preset"
    save_preset(teacher_dir, num_classes=10, seed=1, size=16)
    save_preset(student_dir, num_classes=3, seed=2, size=16)
    config = smoke_config(
        teacher=f"keras_hub:{teacher_dir}", teacher_epochs=None, teacher_size=16,
        student=f"keras_hub:{student_dir}", student_size=16, epochs=1, steps_per_epoch=2)
    report = train.run(config, str(tmp_path / "run"), verbose=0)
    assert 0.0 <= report["agreement"] <= 1.0
    student = models.load_keras_file(report["student"])
    assert student.output_shape == (None, 10)
    # A preset of another class count as the teacher, without ":new_head": refused.
    wrong = configs.apply_overrides(config, {"teacher": f"keras_hub:{student_dir}"})
    with pytest.raises(ValueError, match="classifies 3 classes but the data has 10"):
        train.run(wrong, str(tmp_path / "wrong"), verbose=0)
    # With ":new_head" it is re-headed, trained with labels, saved, then teaches.
    reheaded = configs.apply_overrides(config, {
        "teacher": f"keras_hub:{student_dir}:new_head", "teacher_epochs": "1"})
    report = train.run(reheaded, str(tmp_path / "reheaded"), verbose=0)
    teacher = models.load_keras_file(str(tmp_path / "reheaded" / "teacher.keras"))
    assert teacher.output_shape == (None, 10) and 0.0 <= report["agreement"] <= 1.0
