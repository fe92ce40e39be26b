"""Tests for funmatch_keras.app.cli: `--help` answers without importing TensorFlow.

The commands themselves run in app/test_demo.py, app/test_distill.py and
training/test_distribute.py.
"""

import os
import subprocess
import sys

HELP_ARGVS = [["--help"]] + [
    [command, "--help"]
    for command in ("demo", "distill", "train-teacher", "evaluate", "export")
]
HEAVY = ("tensorflow", "keras", "jax")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Runs `cli.main(argv)` for every help argv in one fresh interpreter and prints
# the heavy top-level modules that got imported. `{stub}` replaces the package's
# __init__ by an empty package, to test cli.py on its own.
_SCRIPT = """
import importlib.util, sys, types
if {stub}:
    spec = importlib.util.find_spec("funmatch_keras")
    package = types.ModuleType("funmatch_keras")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["funmatch_keras"] = package
from funmatch_keras.app import cli
for argv in {argvs!r}:
    try:
        cli.main(argv)
    except SystemExit as exit:
        assert exit.code == 0, (argv, exit.code)
print(sorted({{m.split(".")[0] for m in sys.modules}} & set({heavy!r})))
"""


def _heavy_imports(stub: bool) -> str:
    script = _SCRIPT.format(stub=stub, argvs=HELP_ARGVS, heavy=HEAVY)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("usage: funmatch") == len(HELP_ARGVS)
    return done.stdout.strip().splitlines()[-1]


def test_cli_module_imports_nothing_heavy_for_help():
    assert _heavy_imports(stub=True) == "[]"


def test_funmatch_help_does_not_import_tensorflow():
    assert _heavy_imports(stub=False) == "[]"


def test_a_full_disk_exits_with_its_own_code(monkeypatch, capsys, tmp_path):
    from funmatch_keras.app import cli
    from funmatch_keras.app import distill as train
    from funmatch_keras.training import checkpoint_format

    def full(*args, **kwargs):
        raise checkpoint_format.CheckpointWriteError(28, "No space left to write checkpoint 6")

    monkeypatch.setattr(train, "run", full)
    code = cli.main(["distill", "--config=digits:smoke=True", f"--workdir={tmp_path}"])
    assert code == cli.EXIT_NO_SPACE == 5
    assert "No space left to write checkpoint 6" in capsys.readouterr().err


def _funmatch(*args: str, cwd) -> subprocess.CompletedProcess:
    """`funmatch ARGS` in a fresh interpreter that imports this checkout."""
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "funmatch_keras.app.cli", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def test_an_override_without_equals_exits_2_and_writes_the_fix(tmp_path):
    done = _funmatch("distill", "--config=digits", "--config.epochs", "3",
                     f"--workdir={tmp_path / 'run'}", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "--config.epochs has no value: write it with '=', as --config.epochs=3" in (
        done.stderr)
    assert not (tmp_path / "run").exists()  # nothing was started
    done = _funmatch("train-teacher", f"--workdir={tmp_path / 'run'}", "--config=digits",
                     "--config.epochs", cwd=tmp_path)
    assert done.returncode == 2 and "--config.epochs=VALUE" in done.stderr
