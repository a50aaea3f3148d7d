"""A run directory: named inside ``train.out``, and owned by one run at a time.

- Names: ``train.name`` (and the cross-validation folds' names made from it) is a relative name below
  ``train.out``: no absolute path, no ``..`` part, no NUL. A name that would put checkpoints elsewhere is one
  ConfigError line (``ssau.config.validate`` checks the key; ``confined`` checks the path again here).
- Ownership: the run holds an exclusive POSIX record lock (``lockf``) on ``<run dir>/.lock`` from before it writes
  anything there until it ends. The kernel drops it when the process dies, kill -9 included, and forked DataLoader
  workers do not inherit it (a ``flock`` would live on in a worker that outlives its parent), so a resume never
  finds a stale lock; NFS carries POSIX locks to its lock manager. A second run on the same directory touches
  nothing and stops with one line naming the holder, which wrote its pid, host and start time into the lock file.
  The lock tells processes apart, not threads: two trainers of one process on one directory are the caller's
  business.
- A generated name (no ``train.name``) is made unique: the first of ``<base>``, ``<base>-2``, ... that this process
  creates itself (``mkdir`` without ``exist_ok`` is atomic), so two runs started in the same second never meet.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from ssau.checkpoints import writable_dir
from ssau.config import name_problem
from ssau.errors import ConfigError

LOCK = ".lock"


def confined(root: Path, name: str, key: str) -> Path:
    """``root / name``, or ConfigError when the name would leave ``root``."""
    if problem := name_problem(name):
        raise ConfigError(f"{key}: {name!r} {problem}")
    return Path(root) / name


class RunLock:
    """The exclusive lock of one run directory (see the module's docstring)."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.fd = Path(run_dir), None

    def acquire(self) -> str | None:
        """Take the lock: None, or one line saying who holds it (nothing in the directory is changed then)."""
        path = self.run_dir / LOCK
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            return f"train.out: cannot write the run directory {self.run_dir} ({e.strerror or e})"
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return f"train.out: cannot lock the run directory {self.run_dir} ({e.strerror or e})"
            return (f"the run directory {self.run_dir} is in use by another run ({holder}); wait for it to end, "
                    f"or give another train.name")
        self.fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        return None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None

    def __del__(self) -> None:
        self.release()


def claim(out: Path, name: str, generated: bool) -> tuple[Path, RunLock | None, str | None]:
    """(run directory, its lock, None) or (run directory, None, one line why not): a user's name is locked where it
    is; a generated one gets the first free suffix. Then a probe write: a read-only or full ``train.out`` fails now,
    not at the first checkpoint hours later."""
    try:
        run_dir = confined(out, name, "train.name")
    except ConfigError as e:
        return Path(out), None, str(e)
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        if generated:
            for k in range(1, 1000):
                candidate = run_dir if k == 1 else run_dir.with_name(f"{run_dir.name}-{k}")
                try:
                    candidate.mkdir()
                except FileExistsError:
                    continue
                run_dir = candidate
                break
        run_dir.mkdir(exist_ok=True)
    except OSError as e:
        return run_dir, None, f"train.out: cannot write the run directory {run_dir} ({e.strerror or e})"
    lock = RunLock(run_dir)
    try:
        error = lock.acquire() or writable_dir(run_dir, "train.out")
    except OSError as e:  # the pid line written into the lock file (a full disk)
        error = f"train.out: cannot write the run directory {run_dir} ({e.strerror or e})"
    if error:
        lock.release()
        return run_dir, None, error
    return run_dir, lock, None
