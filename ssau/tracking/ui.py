"""MLflow's UI as a process group that ends with ``ssau ui``.

``mlflow ui`` is a dozen processes: the ``mlflow`` command, uvicorn and its workers, a job runner and its huey
consumers. A Ctrl-C at a terminal reaches all of them (they share its foreground process group), but a SIGTERM to
``ssau ui`` (a service manager, ``kill``, a script) or a SIGINT sent to it alone killed only ``ssau ui`` and
``mlflow``: the server and its consumers ran on, holding the port and the store. So the server starts in a session
of its own, and however ``ssau ui`` stops (SIGINT, SIGTERM, SIGHUP, the server exiting by itself), its whole process
group gets SIGTERM and, whatever is left of it after ``GRACE`` seconds, SIGKILL. A second signal during the grace
period kills at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import psutil

GRACE = 10.0  # seconds the server's processes get to stop on SIGTERM before SIGKILL


def serve(cmd: list[str], grace: float = GRACE) -> int:
    """Run ``cmd`` in a new session until it exits or this process is stopped, then stop its whole process group.
    Returns the command's exit status; SIGTERM and SIGHUP exit with 128 + the signal's number, SIGINT raises
    KeyboardInterrupt (the CLI prints one line)."""
    def stop(signum: int, frame) -> None:
        raise SystemExit(128 + signum)

    server = subprocess.Popen(cmd, start_new_session=True)  # its pid is its process group's id
    main = threading.current_thread() is threading.main_thread()  # handlers can be set in the main thread only
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP) if main}
    try:
        return server.wait()
    finally:
        try:
            stop_group(server, grace)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def stop_group(leader: subprocess.Popen, grace: float = GRACE) -> None:
    """SIGTERM to ``leader``'s process group, SIGKILL to what is left of it after ``grace`` seconds (or at once when
    the wait is interrupted)."""
    pgid = leader.pid
    _signal(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    try:
        while members(pgid, leader) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        if members(pgid, leader):
            _signal(pgid, signal.SIGKILL)
        leader.wait()


def members(pgid: int, leader: subprocess.Popen | None = None) -> list[int]:
    """The live processes of process group ``pgid`` (zombies do not count: a container's init may never reap the
    server's orphans, and a zombie holds no port or file)."""
    if leader is not None:
        leader.poll()  # reap the leader, our child, once it has exited
    found = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p.pid)
        except (psutil.Error, OSError):  # gone meanwhile
            continue
    return found


def _signal(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # every process of the group has exited already
        pass
