"""Every exception ssau raises (``tests/test_house.py`` fails on one defined elsewhere). Those that reach the
command line stop it with one line (``ssau: error: ...``, exit 2) instead of a traceback; the others are caught
inside ssau and turned into a counted skip or one of those. They live here, free of heavy imports, so that the
command line can catch them without importing torch.
"""

from __future__ import annotations


# ---------------------------------------------------------------------------------------------- one line, exit 2
class UserError(Exception):
    """Bad input from the user on the command line."""


class ConfigError(Exception):
    """A bad configuration; the message is one line naming the key."""


class LabelError(Exception):
    """A label file that cannot be read as its format says; the message names the file and the line."""


class ShardError(Exception):
    """A problem with `ssau shard`'s input or output directory; one line for the user."""


class InputError(Exception):
    """A file ssau reads that is not what it must be: a FIFO, socket or device, text that is not UTF-8, JSON nested
    without bound, a number out of range, a count its files contradict (one line naming the file)."""


class JournalError(Exception):
    """A run directory whose journal cannot be read or replayed (one line)."""


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


# ---------------------------------------------------------------------------------------------- caught inside ssau
class SkipImage(Exception):
    """The image cannot enter a shard; ``str(e)`` is the reason code written to dataset.json, ``detail`` what
    was seen (a declared size, an exception message), or None."""

    def __init__(self, reason: str, detail: str | None = None) -> None:
        super().__init__(reason)
        self.detail = detail

    def __reduce__(self):  # survives a trip between processes with its detail
        return SkipImage, (str(self), self.detail)


class WorkerDied(Exception):
    """A shard worker process ended without returning its task's result."""


class TarFormatError(Exception):
    """A tar header that is not what the format allows (the stream skips and counts what follows from it)."""


class DecodeError(Exception):
    """A sample whose image or metadata cannot be read; the stream skips and counts it."""


class Undeliverable(Exception):
    """A journal record that no retry can deliver (its artifact file is gone)."""
