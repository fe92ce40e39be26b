"""One run per workdir: `hold(workdir)` keeps a second process out while a run writes there.

Two runs in one workdir would interleave their checkpoints, metrics and report.
`hold` creates `<workdir>/.lock` atomically (`O_CREAT | O_EXCL`: of two processes
starting together exactly one creates it) holding `{"pid", "host", "started"}`,
and removes it when the block ends, exceptions and `Preempted` included.

While held, a daemon thread refreshes the lock file's modification time every
`HEARTBEAT_S` seconds. A lock left by a run that died without cleaning up
(SIGKILL, a lost machine) is stale, and is taken over with a warning, when it
names this host and a process that no longer exists (or a pid now used by a
process that started after the lock was written), or when it names another host
and has not been refreshed for `STALE_AFTER_S` seconds: a preempted pod restarted
under a new hostname resumes on its own once the old heartbeat is that old. A
fresher lock of another host counts as held: its process cannot be checked from
here, and the error says when it will count as stale.

Under multi-worker training only the chief locks the workdir (`enabled=False`
on the others: they write into their own `workertemp_<task>/`).

Example:
>>> import os, tempfile
>>> workdir = tempfile.mkdtemp()
>>> with hold(workdir) as path:
...     os.path.basename(path), holder(workdir)["pid"] == os.getpid()
('.lock', True)
>>> os.path.exists(os.path.join(workdir, LOCK_FILE))
False
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import socket
import threading
import time
from typing import Any, Iterator

LOCK_FILE = ".lock"
HEARTBEAT_S = 30.0  # how often a holder refreshes its lock file's mtime
# A lock of another host not refreshed for this long is stale. Ten heartbeats:
# room for clock skew and network filesystems' attribute caches (NFS: up to 60 s).
STALE_AFTER_S = 300.0
# A pid whose process started this many seconds after the lock's `started` was
# reused: the lock's own process is gone. (Linux reports start times to about 1 s.)
_PID_REUSE_SLACK_S = 2.0

_log = logging.getLogger(__name__)
_held: dict[str, dict[str, Any]] = {}  # lock files this process holds: their records
_heartbeats: dict[str, threading.Event] = {}  # set to stop a held lock's heartbeat
_held_guard = threading.Lock()


class WorkdirLockedError(ValueError):
    """Another live process holds the workdir (its lock file is `path`)."""

    def __init__(self, message: str, path: str, holder: dict[str, Any] | None):
        super().__init__(message)
        self.path = path
        self.holder = holder


def lock_path(workdir: str) -> str:
    """The lock file of a workdir.

    Example:
    >>> lock_path("/runs/pets")
    '/runs/pets/.lock'
    """
    return os.path.join(workdir, LOCK_FILE)


def holder(workdir: str) -> dict[str, Any] | None:
    """The `{"pid", "host", "started"}` of the workdir's lock; None if it is unlocked.

    An unreadable lock file (being written, or cut short) reads as `{}`.

    Example:
    >>> import tempfile
    >>> holder(tempfile.mkdtemp()) is None
    True
    """
    try:
        with open(lock_path(workdir)) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


@contextlib.contextmanager
def hold(workdir: str, enabled: bool = True) -> Iterator[str | None]:
    """Holds `<workdir>/.lock` for the `with` block; yields its path (None if not `enabled`).

    Args:
        workdir: str. Created if missing.
        enabled: bool. False does nothing (a non-chief worker of multi-worker
            training, which must not lock the chief's workdir). Defaults to True.

    Raises:
        WorkdirLockedError: a live process (or one on another host) holds the
            workdir; the message names it and the fix. A `ValueError`, so
            `funmatch` exits with code 2.
        ValueError: the workdir cannot be created or written.

    Example:
    >>> import tempfile
    >>> workdir = tempfile.mkdtemp()
    >>> with hold(workdir):
    ...     with hold(workdir):
    ...         pass
    Traceback (most recent call last):
    ...
    funmatch_keras.app.workdir_lock.WorkdirLockedError: The workdir ... is in use by ...
    >>> with hold(workdir, enabled=False) as path:
    ...     path is None
    True
    """
    if not enabled:
        yield None
        return
    path = _acquire(workdir)
    try:
        yield path
    finally:
        _release(path)


# ---------------------------------------------------------------- internals


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")


def _create(path: str, record: dict[str, Any]) -> bool:
    """Creates the lock file holding `record`; False if it exists already."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record))
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.remove(path)
        raise
    return True


def _acquire(workdir: str) -> str:
    path = os.path.abspath(lock_path(workdir))
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    except OSError as error:
        raise ValueError(f"The workdir {workdir!r} cannot be created ({error}). "
                         "Pick another --workdir.") from None
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}
    with _held_guard:
        if path in _held:
            raise WorkdirLockedError(
                f"The workdir {workdir!r} is in use by this process (pid {os.getpid()}): "
                "a run in it has not ended yet. Use another --workdir for a second run.",
                path, record)
        for _ in range(5):  # lost races re-read the new holder
            try:
                if _create(path, record):
                    return _start_holding(path, record)
            except OSError as error:
                if error.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
                    raise ValueError(f"The workdir {workdir!r} is not writable ({error}). "
                                     "Pick another --workdir.") from None
                raise
            if _take_over_if_stale(workdir, path, record):
                return _start_holding(path, record)
            time.sleep(0.05)  # e.g. a holder writing its lock file this moment
        found = holder(workdir)
        raise WorkdirLockedError(_locked_message(workdir, path, found), path, found)


def _start_holding(path: str, record: dict[str, Any]) -> str:
    _held[path] = record
    stop = _heartbeats[path] = threading.Event()
    threading.Thread(target=_heartbeat, args=(path, record, stop), daemon=True,
                     name=f"workdir-lock-heartbeat:{path}").start()
    return path


def _heartbeat(path: str, record: dict[str, Any], stop: threading.Event) -> None:
    """Refreshes the lock file's mtime until `stop`; stops if the lock is no longer ours."""
    while not stop.wait(HEARTBEAT_S):
        try:
            with open(path) as f:
                ours = json.loads(f.read()) == record
            if ours:
                os.utime(path)
        except (OSError, ValueError):
            ours = False
        if not ours:
            _log.error("The workdir lock %s was removed or replaced while this process "
                       "(pid %d) held it: another run may now write in the same workdir.",
                       path, os.getpid())
            return


def _heartbeat_age(path: str) -> float | None:
    """Seconds since the lock file was last refreshed (0 if it is in the future)."""
    try:
        return max(0.0, time.time() - os.path.getmtime(path))
    except OSError:
        return None


def _take_over_if_stale(workdir: str, path: str, record: dict[str, Any]) -> bool:
    """Replaces a stale lock by `record`; False if the lock is held (or just went away)."""
    with _directory_guard(os.path.dirname(path)):
        found = holder(workdir)
        if found is None:  # released meanwhile: the caller creates it anew
            return False
        reason = _stale_reason(found, path)
        if reason is None:
            return False
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        if not _create(path, record):
            return False
    _log.warning("Took over the stale lock %s of process %s on %s (started %s): %s.",
                 path, found.get("pid"), found.get("host"), found.get("started"), reason)
    return True


def _stale_reason(found: dict[str, Any], path: str) -> str | None:
    """Why the lock `found` is stale, or None when its process may still run."""
    if not found:
        # Empty or cut short: a holder that died while writing it, unless it is
        # being written this very moment.
        try:
            age = time.time() - os.path.getmtime(path)
        except OSError:
            return None
        return "its lock file is unreadable and over 10 s old" if age > 10 else None
    if found.get("host") != socket.gethostname():
        # Another machine: its processes cannot be checked from here; its heartbeat can.
        age = _heartbeat_age(path)
        if age is not None and age > STALE_AFTER_S:
            return (f"it names another host and was last refreshed {age:.0f} s ago "
                    f"(a live holder refreshes it every {HEARTBEAT_S:.0f} s)")
        return None
    pid = found.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return f"it names no valid pid ({pid!r})"
    if pid == os.getpid():  # not ours (see `_held`): a former process with our pid
        return "its pid is this process's, which does not hold it"
    if not _pid_alive(pid):
        return f"process {pid} no longer exists"
    process_start = _process_start(pid)
    lock_start = _parse_time(found.get("started"))
    if (process_start is not None and lock_start is not None
            and process_start > lock_start + _PID_REUSE_SLACK_S):
        return f"pid {pid} now belongs to a process started after the lock"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return True
    return True


def _process_start(pid: int) -> float | None:
    """The process's start time (Unix seconds) from /proc, or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/stat") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _parse_time(text: Any) -> float | None:
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except (TypeError, ValueError):
        return None


@contextlib.contextmanager
def _directory_guard(directory: str) -> Iterator[None]:
    """An exclusive `flock` of the directory: one stale-lock takeover at a time.

    Where `flock` is unavailable (not POSIX, some network filesystems) the
    takeover runs unguarded; `O_EXCL` still lets only one process create the lock.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # also releases the flock


def _release(path: str) -> None:
    with _held_guard:
        record = _held.pop(path, None)
        stop = _heartbeats.pop(path, None)
        if stop is not None:
            stop.set()
        try:
            with open(path) as f:
                found = json.loads(f.read())
        except (OSError, ValueError):
            return  # removed by hand, or replaced: nothing of ours to remove
        if record is not None and found == record:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def _locked_message(workdir: str, path: str, found: dict[str, Any] | None) -> str:
    if found is None:
        who = "another process (its lock came and went while this one started)"
    elif not found:
        who = "another process (its lock file is empty: it may be starting now)"
    else:
        who = (f"process {found.get('pid')} on host {found.get('host')} "
               f"since {found.get('started')}")
        if found.get("host") != socket.gethostname():
            age = _heartbeat_age(path)
            refreshed = "" if age is None else f", last refreshed {age:.0f} s ago"
            who += (f" (another host than this one, {socket.gethostname()}: not checkable "
                    f"here{refreshed}; it counts as stale once not refreshed for "
                    f"{STALE_AFTER_S:.0f} s)")
    return (
        f"The workdir {workdir!r} is in use by {who}. Two runs in one workdir would "
        "overwrite each other's checkpoints. Wait for that run to end, use another "
        f"--workdir, or, if you are sure no run uses this workdir any more, delete {path} "
        "and rerun."
    )
