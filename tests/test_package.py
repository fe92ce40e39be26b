"""The package namespace: lazy submodules, public names, no TensorFlow on import."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import funmatch_keras as fm

_ROOT = Path(__file__).resolve().parents[1]


def _run_jax(code: str) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter on the JAX backend, package importable."""
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          cwd=_ROOT, capture_output=True, text=True, timeout=300)


def test_import_does_not_load_tensorflow():
    pytest.importorskip("jax")
    result = _run_jax("""
        import funmatch_keras, sys
        from funmatch_keras import Distiller, models
        assert 'tensorflow' not in sys.modules
    """)
    assert result.returncode == 0, result.stderr[-3000:]


def test_models_distiller_optim_do_not_load_tensorflow():
    # What benchmarks/gpu_check.py needs on a machine without TensorFlow.
    pytest.importorskip("jax")
    result = _run_jax("""
        import sys
        import funmatch_keras as fm
        import funmatch_keras.distiller, funmatch_keras.models, funmatch_keras.optim
        assert fm.DistillationKL is fm.losses.DistillationKL
        assert callable(fm.models.bit_r50x1) and callable(fm.models.load_timm_bit)
        loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow')
        assert not loaded, loaded[:5]
    """)
    assert result.returncode == 0, result.stderr[-3000:]


def test_public_names_reachable():
    assert fm.__version__ == "0.1.0"
    assert sorted(fm.data.MODES) == [
        "consistent", "fixed_teacher", "function_matching", "independent"]
    assert fm.Distiller is fm.distiller.Distiller
    for name in fm.__all__:
        assert getattr(fm, name) is not None
        assert name in dir(fm)
    from funmatch_keras import DistillationKL, Distiller, data  # noqa: F401


def test_unknown_attribute_raises():
    with pytest.raises(AttributeError, match="no_such_thing"):
        fm.no_such_thing  # noqa: B018
