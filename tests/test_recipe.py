"""The paper's named choices: presets' splits, and no TensorFlow or Keras import."""

import subprocess
import sys
from pathlib import Path

import pytest

from funmatch_keras import recipe

_ROOT = Path(__file__).resolve().parents[1]


def test_split_names_of_presets():
    assert recipe.split_names("food101") == {
        "train": "train[:90%]", "validation": "train[90%:]", "test": "validation"}
    assert recipe.split_names("imagenet2012")["validation"] == "train[98%:]"
    with pytest.raises(ValueError, match="pets37"):
        recipe.split_names("cifar11")


def test_datasets_are_digits_then_the_presets():
    assert recipe.DATASETS == (
        "digits", "pets37", "flowers102", "food101", "sun397", "imagenet2012")
    assert set(recipe.MODES) == {
        "function_matching", "consistent", "independent", "fixed_teacher"}


def test_import_loads_neither_tensorflow_nor_keras():
    code = ("import sys, funmatch_keras.recipe; "
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, "
            "sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras'))")
    result = subprocess.run([sys.executable, "-c", code], cwd=_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_store_encodings_parse_k_for_top_k_only():
    assert [recipe.store_encoding_k(e) for e in ("float32", "float16", "bfloat16")] == [None] * 3
    assert recipe.store_encoding_k("top1") == 1 and recipe.store_encoding_k("top128") == 128
    for wrong in ("top0", "top05", "Top5", "top5 ", "float", None):
        with pytest.raises(ValueError, match=r"'top<K>' with K >= 1"):
            recipe.store_encoding_k(wrong)
