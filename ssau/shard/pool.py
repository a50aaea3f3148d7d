"""Running one function over many tasks in forked worker processes, so that a failure stops the run at once.

``multiprocessing.Pool`` waits forever for the task of a worker that died (the OOM killer, a segfault in a decoder,
kill -9), and leaves its workers running when the main process is killed. Here, on ``concurrent.futures``:
- a worker that dies raises WorkerDied in the main process;
- a task that raises, or Ctrl-C, stops the other workers at once (they are killed, as under kill -9, so the
  caller's files must be written atomically) and the exception goes on unchanged;
- workers ignore Ctrl-C (the main process handles it) and exit on their own when the main process is gone.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Sequence

from ssau.errors import WorkerDied


def _start_worker(initializer: Callable, initargs: tuple) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()

    def exit_when_orphaned() -> None:  # else a killed run's workers would go on writing beside its resume
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=exit_when_orphaned, daemon=True).start()
    initializer(*initargs)


def run_tasks(fn: Callable, tasks: Sequence, workers: int, initializer: Callable, initargs: tuple,
              on_done: Callable) -> None:
    """``on_done(task, fn(task))`` for every task, in completion order; ``workers <= 1`` runs in this process."""
    workers = min(workers, len(tasks))  # a process per task at most: --workers 100000 is no fork bomb
    if workers <= 1:
        initializer(*initargs)
        for t in tasks:
            on_done(t, fn(t))
        return
    others = set(mp.active_children())  # children that are not this pool's workers
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_start_worker,
                               initargs=(initializer, initargs))
    try:
        futures = {pool.submit(fn, t): t for t in tasks}
        for fut in as_completed(futures):
            on_done(futures[fut], fut.result())
    except BaseException as e:
        for p in set(mp.active_children()) - others:
            p.kill()
        # The queue that feeds tasks to the workers may be blocked writing to a pipe no worker reads any more:
        # joining its thread (shutdown(wait=True), or at interpreter exit) would then hang the interrupted run.
        call_queue = getattr(pool, "_call_queue", None)
        if call_queue is not None:
            call_queue.cancel_join_thread()
        pool.shutdown(wait=False, cancel_futures=True)
        if isinstance(e, BrokenProcessPool):
            raise WorkerDied("a worker process died (killed, or out of memory)") from None
        raise
    pool.shutdown(wait=True)
