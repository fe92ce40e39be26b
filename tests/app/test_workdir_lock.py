"""workdir_lock: one process per workdir; stale locks of dead processes are taken over."""

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from funmatch_keras.app import workdir_lock
from funmatch_keras.app.workdir_lock import WorkdirLockedError, hold

# A second process trying the same workdir; prints the error and exits 2 if refused.
_SECOND = """
import sys
from funmatch_keras.app import workdir_lock
try:
    with workdir_lock.hold(sys.argv[1]):
        print("acquired")
except workdir_lock.WorkdirLockedError as error:
    print(error)
    sys.exit(2)
"""


def _second_process(workdir) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _SECOND, str(workdir)], capture_output=True,
                          text=True, timeout=60)


def _write_lock(workdir, **record):
    with open(os.path.join(workdir, ".lock"), "w") as f:
        json.dump(record, f)


def _dead_pid() -> int:
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


def test_a_second_process_is_refused_and_told_who_holds_the_workdir(tmp_path):
    with hold(str(tmp_path)) as path:
        assert path == str(tmp_path / ".lock")
        record = json.loads((tmp_path / ".lock").read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        refused = _second_process(tmp_path)
        assert refused.returncode == 2, refused.stderr
        message = refused.stdout
        for part in (f"process {os.getpid()}", socket.gethostname(), record["started"],
                     "Wait for that run to end", "another --workdir", str(tmp_path / ".lock")):
            assert part in message, (part, message)
    assert not (tmp_path / ".lock").exists()
    assert _second_process(tmp_path).stdout.strip() == "acquired"


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    dead = _dead_pid()
    _write_lock(tmp_path, pid=dead, host=socket.gethostname(), started="2020-01-01T00:00:00+00:00")
    with caplog.at_level(logging.WARNING), hold(str(tmp_path)):
        assert workdir_lock.holder(str(tmp_path))["pid"] == os.getpid()
    assert "stale lock" in caplog.text and str(dead) in caplog.text
    assert not (tmp_path / ".lock").exists()


def test_a_reused_pid_makes_the_lock_stale(tmp_path):
    # The parent process runs, but it started long after this lock was written.
    _write_lock(tmp_path, pid=os.getppid(), host=socket.gethostname(),
                started="1971-01-01T00:00:00+00:00")
    if workdir_lock._process_start(os.getppid()) is None:
        pytest.skip("no /proc start times here")
    with hold(str(tmp_path)):
        assert workdir_lock.holder(str(tmp_path))["pid"] == os.getpid()


def test_live_and_foreign_locks_are_refused_and_kept(tmp_path):
    _write_lock(tmp_path, pid=os.getppid(), host=socket.gethostname(),
                started=workdir_lock._now())
    with pytest.raises(WorkdirLockedError, match=f"process {os.getppid()} on host"):
        with hold(str(tmp_path)):
            pass
    _write_lock(tmp_path, pid=_dead_pid(), host="other-machine", started="2020-01-01")
    with pytest.raises(ValueError, match=r"other-machine.*another host.*delete .*\.lock"):
        with hold(str(tmp_path)):
            pass
    assert workdir_lock.holder(str(tmp_path))["host"] == "other-machine"


def _age_lock(workdir, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(os.path.join(workdir, ".lock"), (past, past))


def test_a_foreign_lock_is_stale_once_its_heartbeat_is_old(tmp_path, caplog):
    # A preempted pod restarted under a new hostname: the old host's lock stops
    # being refreshed, and after STALE_AFTER_S the new pod takes it over.
    _write_lock(tmp_path, pid=os.getpid(), host="old-pod-7f9c", started=workdir_lock._now())
    _age_lock(tmp_path, workdir_lock.STALE_AFTER_S - 60)
    with pytest.raises(WorkdirLockedError, match=r"old-pod-7f9c.*last refreshed 2\d\d s ago"
                       r".*stale once not refreshed for 300 s"):
        with hold(str(tmp_path)):
            pass
    _age_lock(tmp_path, workdir_lock.STALE_AFTER_S + 60)
    with caplog.at_level(logging.WARNING, logger="funmatch_keras.app.workdir_lock"):
        with hold(str(tmp_path)):
            assert workdir_lock.holder(str(tmp_path))["host"] == socket.gethostname()
    assert "old-pod-7f9c" in caplog.text and "last refreshed 360 s ago" in caplog.text


def test_a_held_lock_is_refreshed_while_the_run_lasts(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(workdir_lock, "HEARTBEAT_S", 0.05)
    path = os.path.join(tmp_path, ".lock")
    with hold(str(tmp_path)):
        _age_lock(tmp_path, 3600)
        deadline = time.time() + 10
        while os.path.getmtime(path) < time.time() - 60 and time.time() < deadline:
            time.sleep(0.05)
        assert time.time() - os.path.getmtime(path) < 60  # refreshed by the heartbeat
        with caplog.at_level(logging.ERROR, logger="funmatch_keras.app.workdir_lock"):
            _write_lock(tmp_path, pid=1, host="intruder", started=workdir_lock._now())
            while "removed or replaced" not in caplog.text and time.time() < deadline:
                time.sleep(0.05)
        assert "removed or replaced" in caplog.text
        _age_lock(tmp_path, 3600)
        time.sleep(0.3)  # the heartbeat stopped: it no longer touches another's lock
        assert time.time() - os.path.getmtime(path) > 3000
    assert workdir_lock.holder(str(tmp_path))["host"] == "intruder"  # not ours to remove


def test_the_lock_is_released_after_an_exception(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with hold(str(tmp_path)):
            raise RuntimeError("boom")
    assert workdir_lock.holder(str(tmp_path)) is None
    with hold(str(tmp_path)):  # and can be held again
        pass


def test_disabled_hold_does_nothing_and_missing_workdir_is_created(tmp_path):
    with hold(str(tmp_path / "a"), enabled=False) as path:
        assert path is None and not (tmp_path / "a").exists()
    with hold(str(tmp_path / "b" / "c")):
        assert (tmp_path / "b" / "c" / ".lock").exists()


def test_a_lock_removed_by_hand_is_not_an_error_on_release(tmp_path):
    with hold(str(tmp_path)):
        os.remove(tmp_path / ".lock")
        _second_process(tmp_path)  # another run took it meanwhile, then ended
    assert workdir_lock.holder(str(tmp_path)) is None
