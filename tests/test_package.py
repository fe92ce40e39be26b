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


# -- the architecture (README, "What is in the box") ---------------------------
_PACKAGE = _ROOT / "funmatch_keras"
# The app layer: config + workdir. Everything else is library and never imports it.
_APP = {"configs", "build", "compute_path", "workdir", "workdir_lock", "supervised", "train", "evaluate",
        "ship", "demo", "cli"}


def _modules():
    """`(name, path)` of every module; a subpackage counts as its top-level name."""
    for path in sorted(_PACKAGE.rglob("*.py")):
        parts = path.relative_to(_PACKAGE).with_suffix("").parts
        if parts != ("__init__",):
            yield parts[0], path


def _imported_package_modules(path):
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("funmatch_keras"):
            parts = node.module.split(".")
            names |= {a.name for a in node.names} if len(parts) == 1 else {parts[1]}
    return names


def test_every_module_is_under_400_lines_with_a_one_line_job():
    for _, path in _modules():
        text = path.read_text()
        assert len(text.splitlines()) < 400, f"{path.name}: {len(text.splitlines())} lines"
        if not path.name.startswith("__"):
            first = text.lstrip().splitlines()[0]
            assert first.lstrip("r").startswith('"""') and len(first) > 10, (path, first)


def test_library_modules_never_import_the_app_layer():
    for name, path in _modules():
        if name not in _APP:
            assert not _imported_package_modules(path) & _APP, (
                path, _imported_package_modules(path) & _APP)


def test_readme_module_table_names_every_module():
    import re

    listed = set()
    for line in (_ROOT / "README.md").read_text().splitlines():
        if line.startswith("| `funmatch_keras."):
            first_cell = line.split("|")[1]
            listed |= {name.removeprefix("funmatch_keras.")
                       for name in re.findall(r"`([\w.]+)`", first_cell)}
    missing = {name for name, _ in _modules()} - listed
    assert not missing, f"modules missing from the README's module table: {missing}"
