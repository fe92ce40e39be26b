"""Journeys: each test walks one path a user walks, as the user walks it.

Every step runs in a fresh interpreter (the `funmatch` command, or a Python script of
the README's code), so a class that only one process registered, a file that only
one command wrote, or a state that only one worker holds shows up as it would for a
user. The assertions are what a user would check: exit codes, files, the numbers in
`report.json`, a loaded model's predictions.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[2]

# Variables a journey must not inherit from the test process or the developer's shell.
_SCRUBBED = ("TF_CONFIG", "XLA_FLAGS", "FUNMATCH_DISTRIBUTE", "KERAS_BACKEND")


def fresh_env(**extra: str) -> dict[str, str]:
    """The environment of a new shell with the checkout importable."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["KERAS_BACKEND"] = "tensorflow"
    env.update(extra)
    return env


def _explain(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout ---\n{result.stdout[-4000:]}" \
           f"\n--- stderr ---\n{result.stderr[-6000:]}"


class Shell:
    """Runs the commands of one journey, each in a fresh process, in one folder."""

    def __init__(self, cwd: Path):
        self.cwd = cwd

    def funmatch(self, *args: str, expect: int = 0, timeout: float = 600,
                 **env: str) -> subprocess.CompletedProcess:
        """`funmatch ARGS` (the installed command's entry point); asserts its exit code."""
        return self.run([sys.executable, "-m", "funmatch_keras.app.cli", *args],
                        expect=expect, timeout=timeout, **env)

    def python(self, code: str, expect: int = 0, timeout: float = 600,
               **env: str) -> subprocess.CompletedProcess:
        """Runs a Python script (the README's code) in a fresh interpreter."""
        script = self.cwd / f"script_{abs(hash(code))}.py"
        script.write_text(textwrap.dedent(code))
        return self.run([sys.executable, str(script)], expect=expect, timeout=timeout, **env)

    def run(self, command: list[str], expect: int | None = 0, timeout: float = 600,
            **env: str) -> subprocess.CompletedProcess:
        result = subprocess.run(command, cwd=self.cwd, env=fresh_env(**env),
                                capture_output=True, text=True, timeout=timeout,
                                stdin=subprocess.DEVNULL)
        if expect is not None:
            assert result.returncode == expect, _explain(result)
        return result


@pytest.fixture
def shell(tmp_path: Path) -> Shell:
    """A user's shell in a fresh folder."""
    return Shell(tmp_path)


@pytest.fixture
def explain() -> Callable[[subprocess.CompletedProcess], str]:
    return _explain


class Readme:
    """The README's command blocks, so that a README that drifts from the code fails."""

    def __init__(self, text: str):
        self.text = text

    def commands_after(self, marker: str) -> list[list[str]]:
        """The commands of the first ```bash block after the line holding `marker`."""
        start = self.text.index(marker)
        block = self.text.index("```bash\n", start) + len("```bash\n")
        return _split_commands(self.text[block:self.text.index("```", block)])


def _split_commands(body: str) -> list[list[str]]:
    """A bash block's commands, continuation lines joined, split as a shell would."""
    import shlex

    return [shlex.split(line, comments=True)
            for line in body.replace("\\\n", " ").splitlines() if line.strip()]


@pytest.fixture(scope="session")
def readme() -> Readme:
    return Readme((REPO / "README.md").read_text())


def _funmatch_commands(text: str) -> list[list[str]]:
    return [command for block in text.split("```bash\n")[1:]
            for command in _split_commands(block.split("```", 1)[0])
            if command and command[0] == "funmatch"]


@pytest.fixture(scope="session")
def readme_funmatch_commands(readme) -> list[list[str]]:
    """Every `funmatch ...` command of the README's bash blocks, split as a shell would."""
    return _funmatch_commands(readme.text)
def _free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now (held together, so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Cluster:
    """The processes of one multi-worker run: worker `i` runs `commands[i]`."""

    def __init__(self, cwd: Path, name: str, commands: list[list[str]], env: dict[str, str]):
        workers = [f"127.0.0.1:{port}" for port in _free_ports(len(commands))]
        self.logs = [cwd / f"{name}-worker{i}.log" for i in range(len(commands))]
        self.procs = []
        for index, (command, log) in enumerate(zip(commands, self.logs)):
            tf_config = {"cluster": {"worker": workers},
                         "task": {"type": "worker", "index": index}}
            with open(log, "w") as out:
                self.procs.append(subprocess.Popen(
                    command, cwd=cwd, env=fresh_env(TF_CONFIG=json.dumps(tf_config), **env),
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))

    def log(self, index: int) -> str:
        return self.logs[index].read_text(errors="replace")

    def explain(self) -> str:
        return "\n".join(f"--- worker {i} (exit {p.poll()}) ---\n{self.log(i)[-5000:]}"
                         for i, p in enumerate(self.procs))

    def wait(self, timeout: float = 300) -> list[int]:
        """Every worker's exit code; all are killed if one is still running at `timeout`."""
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill_all()
                pytest.fail(f"the workers ran past {timeout} s\n{self.explain()}")
        return [proc.returncode for proc in self.procs]

    def wait_for(self, condition: Callable[[], bool], timeout: float = 300,
                 poll_s: float = 0.05) -> None:
        """Polls `condition` until it holds; fails if every worker exits first, or at `timeout`."""
        deadline = time.monotonic() + timeout
        while not condition():
            if all(p.poll() is not None for p in self.procs) or time.monotonic() > deadline:
                self.kill_all()
                pytest.fail(f"the awaited state never came\n{self.explain()}")
            time.sleep(poll_s)

    def kill(self, index: int) -> None:
        """`kill -9` of worker `index`, as a lost machine."""
        self.procs[index].send_signal(signal.SIGKILL)
        self.procs[index].wait()

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


class Workers:
    """Starts commands as the workers of one local cluster (`TF_CONFIG` on free ports)."""

    def __init__(self, cwd: Path):
        self.cwd = cwd
        self.clusters: list[Cluster] = []

    def funmatch(self, *commands: list[str], name: str = "run", **env: str) -> Cluster:
        """Worker `i` runs `funmatch commands[i]`; returns at once."""
        cluster = Cluster(self.cwd, f"{name}{len(self.clusters)}",
                          [[sys.executable, "-m", "funmatch_keras.app.cli", *args]
                           for args in commands], env)
        self.clusters.append(cluster)
        return cluster


def _workers_in(folder: Path):
    started = Workers(folder)
    yield started
    for cluster in started.clusters:
        cluster.kill_all()


@pytest.fixture
def workers(tmp_path: Path):
    """Runs multi-worker `funmatch` commands as local processes; none outlives the test."""
    yield from _workers_in(tmp_path)


@pytest.fixture(scope="module")
def module_workers(tmp_path_factory):
    """`workers` for a module-scoped fixture: none outlives the module's tests."""
    yield from _workers_in(tmp_path_factory.mktemp("workers"))


@pytest.fixture(name="fresh_env")
def fresh_env_fixture() -> Callable[..., dict[str, str]]:
    """`fresh_env(**extra)`: the environment of a new shell with the checkout importable."""
    return fresh_env
