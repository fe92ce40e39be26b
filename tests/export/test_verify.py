"""Tests for funmatch_keras.export.verify: quantization maths and the artifact runners.

Every format is verified end to end against a trained student in
tests/export/test_formats.py; these are the fast checks.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from funmatch_keras.export import verify as fv

SIZE = 16


def _tiny_model() -> keras.Model:
    inputs = keras.Input((SIZE, SIZE, 3), name="images")
    x = keras.layers.Conv2D(8, 3, 2, padding="same")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(4)(x), name="tiny")


def test_quantize_rounds_offsets_and_clips():
    details = {"dtype": np.int8, "quantization": (0.5, -3)}
    q = fv.quantize(np.array([0.0, 1.1, 1e3, -1e3]), details)
    np.testing.assert_array_equal(q, np.array([-3, -1, 127, -128], np.int8))
    np.testing.assert_allclose(fv.dequantize(q[:2], details), [0.0, 1.0])
    float_details = {"dtype": np.float32, "quantization": (0.0, 0)}
    assert fv.quantize(np.array([0.25]), float_details).dtype == np.float32


def test_iter_images_flattens_batches_and_labels():
    batches = tf.data.Dataset.from_tensor_slices(
        (np.zeros([5, SIZE, SIZE, 3]), np.zeros([5]))
    ).batch(2)
    assert len(list(fv.iter_images(batches))) == 5
    assert len(list(fv.iter_images(np.zeros([5, SIZE, SIZE, 3]), limit=3))) == 3
    [image] = fv.iter_images(np.zeros([SIZE, SIZE, 3]))
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.float32


def test_verify_keras_file_matches_its_model(tmp_path):
    model = _tiny_model()
    path = tmp_path / "tiny.keras"
    model.save(path)
    images = np.random.default_rng(0).uniform(-1, 1, (3, SIZE, SIZE, 3))
    result = fv.verify(path, model, images)
    assert result["kind"] == "keras" and result["num_images"] == 3
    assert result["agreement"] == 1.0 and result["max_abs_logit_diff"] < 1e-5
    assert result["size_bytes"] == path.stat().st_size


def test_verify_rejects_unknown_artifacts(tmp_path):
    with pytest.raises(ValueError, match="Cannot tell the artifact kind"):
        fv.verify(tmp_path / "model.mlmodel", _tiny_model(), np.zeros([1, SIZE, SIZE, 3]))
    with pytest.raises(ValueError, match="Received: kind='coreml'"):
        fv.verify(tmp_path, _tiny_model(), np.zeros([1, SIZE, SIZE, 3]), kind="coreml")


def test_verify_keras_file_under_jax(tmp_path):
    # A fresh process: the backend is chosen once, when Keras is first imported.
    script = f"""
import numpy as np, keras
from funmatch_keras import verify as fv
assert keras.backend.backend() == "jax"
inputs = keras.Input(({SIZE}, {SIZE}, 3))
x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(8, 3)(inputs))
model = keras.Model(inputs, keras.layers.Dense(4)(x))
model.save("{tmp_path}/m.keras")
result = fv.verify("{tmp_path}/m.keras", model, np.zeros([2, {SIZE}, {SIZE}, 3]) + 0.5)
assert result["agreement"] == 1.0 and result["max_abs_logit_diff"] < 1e-5, result
print("verified")
"""
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, cwd=tmp_path)
    assert result.returncode == 0 and "verified" in result.stdout, result.stderr[-3000:]
