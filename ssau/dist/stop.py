"""Stopping a run on a signal without losing work: SIGTERM (scancel, Kubernetes, an elastic agent), SIGINT (Ctrl-C)
and SIGUSR1 (``#SBATCH --signal=USR1@120``: SLURM's warning before a time limit or a preemption).

The first signal is only recorded, with one line on stderr. The trainer asks ``requested`` after every step, on
every rank together (a one-element all-reduce, so ranks the signal did not reach stop at the same step). It then
writes a checkpoint at that step, flushes the tracking journal, ends the MLflow run KILLED with a line naming the
checkpoint, and exits with 128 + the signal's number. A second signal exits at once: ``SystemExit``, which still
waits for an atomic write under way (``ssau.io.defer_exit``), so no checkpoint is torn. "Second" means at least
``REPEAT_S`` seconds after the first: launchers pass a signal on (srun to every process of the step, torchrun's
agent to its ranks), so a rank often gets the same stop twice within milliseconds, and that must not cost the
checkpoint.

DataLoader workers ignore the three signals (``ignore_stop_signals``, their ``worker_init_fn``). A signal sent to
the whole process group must not kill the workers under a step that is being finished; they still end with the
main process (DataLoader's watchdog).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from ssau.io import defer_exit

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
REPEAT_S = 2.0


def ignore_stop_signals(_worker: int = 0) -> None:
    """For a DataLoader's ``worker_init_fn``: leave the stop signals to the main process."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class StopSignals:
    """The first stop signal received (0: none). ``installed()`` puts the handlers in place for a block."""

    def __init__(self) -> None:
        self.signum, self.since = 0, 0.0

    def _handle(self, signum: int, frame) -> None:
        if self.signum:
            if time.monotonic() - self.since < REPEAT_S:
                return  # the same stop, passed on by a launcher
            if not defer_exit(signum):  # the second: at once (after an atomic write under way)
                raise SystemExit(128 + signum)
            return
        self.signum, self.since = signum, time.monotonic()
        # os.write, not print: a handler interrupting a buffered write to stderr must not write through the buffer
        os.write(2, f"ssau: {signal.Signals(signum).name}: finishing this step, then a checkpoint; send it again "
                    f"(after {REPEAT_S:g} s) to exit at once\n".encode())

    @contextmanager
    def installed(self) -> Iterator["StopSignals"]:
        if threading.current_thread() is not threading.main_thread():  # handlers live in the main thread only
            yield self
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def requested(self, rt) -> int:
        """The signal any rank received (the largest number where they differ), 0 if none: a collective over the
        runtime's control group (``ssau.dist.ranks.Runtime.host_max``), which makes no device wait."""
        return rt.host_max(self.signum)
