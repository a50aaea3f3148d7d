"""File writes that never leave a half-written file under the final name: write a temporary sibling
(``.<name>.tmp-<pid>``), flush and fsync it, then rename it over the target (atomic within a directory). On any
failure, a full disk or an exception in the writer, the temporary file is removed and the target is left as it was.
Every file ssau writes for others to read (shards, indexes, checkpoints, run artifacts, journals' sidecars) goes
through here.

A second stop signal (its exit is immediate, ``ssau.dist.stop``) that arrives while the main thread writes such a
file waits for the write to end: raised inside torch.save's C++ writer, its SystemExit came out as a RuntimeError
("unexpected pos"), a failed checkpoint and exit 2 instead of the KILLED run and exit 143 that SLURM and Kubernetes
expect.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator


class _Writes:
    depth = 0  # atomic writes under way in the main thread
    pending: int | None = None  # a signal whose exit waits for them


def defer_exit(signum: int) -> bool:
    """For a signal handler: True when the main thread is inside an atomic write, whose end then raises
    ``SystemExit(128 + signum)``; False when the handler should exit now."""
    if _Writes.depth and threading.current_thread() is threading.main_thread():
        _Writes.pending = signum
        return True
    return False


@contextmanager
def _uninterrupted() -> Iterator[None]:
    main = threading.current_thread() is threading.main_thread()
    _Writes.depth += main
    try:
        yield
    finally:
        _Writes.depth -= main
        if main and _Writes.depth == 0 and _Writes.pending is not None:
            signum, _Writes.pending = _Writes.pending, None
            raise SystemExit(128 + signum)


def temporary_name(path: Path) -> Path:
    """The temporary sibling a write of ``path`` goes through (a crash leaves it; ``.tmp-`` marks it partial)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path for a writer that takes a path (a parquet writer, a figure's savefig, a tar writer);
    once the block ends the file is fsync'd and renamed to ``path``."""
    path = Path(path)
    tmp = temporary_name(path)
    with _uninterrupted():
        try:
            yield tmp
            _fsync(tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """Yield a binary file to write ``path``'s new content into; flushed, fsync'd and renamed when the block ends."""
    path = Path(path)
    tmp = temporary_name(path)
    with _uninterrupted():
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def atomic_write(path: Path, data: bytes) -> Path:
    """``data`` as the whole new content of ``path``."""
    with atomic_file(path) as f:
        f.write(data)
    return Path(path)
