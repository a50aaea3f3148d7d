"""Exceptions that stop a run with one line (``ssau: error: ...``, exit 2) instead of a traceback. They live here,
free of heavy imports, so that the command line can catch them without importing torch."""

from __future__ import annotations


class CheckpointError(Exception):
    """A checkpoint that cannot be read (or would run code) or cannot be written."""


class RunStopped(Exception):
    """Training cannot go on: non-finite parameters, a checkpoint that cannot be written."""


class SourceError(Exception):
    """A data source cannot deliver what the run needs (no readable training sample, an evaluation that scored
    fewer samples than its index lists). ``str(e)`` is one line naming the source."""

    def __init__(self, message: str) -> None:
        # A DataLoader worker's exception reaches the main process as type(its formatted traceback) (torch's
        # ExceptionWrapper.reraise); keep only the original line, which the traceback ends with.
        if message.startswith("Caught SourceError"):
            message = message.rstrip().rsplit("\n", 1)[-1].split("SourceError: ", 1)[-1]
        super().__init__(message)


STOPS: tuple[type[Exception], ...] = (CheckpointError, RunStopped, SourceError)
