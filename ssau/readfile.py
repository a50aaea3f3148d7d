"""Reading what users hand ssau: regular files only, UTF-8 text, bounded JSON, numbers in range.

- ``open_regular`` opens with ``O_NONBLOCK`` and checks the opened descriptor with ``fstat``: a FIFO, socket or
  device (or a path swapped for one after a ``stat``) is refused with ``InputError`` and never blocks the process.
  A FIFO's open returns at once under ``O_NONBLOCK`` even with no writer; the flag is cleared for the reads.
- ``text_lines`` / ``csv_rows`` stream a text file as lines (rows) decoded as UTF-8 (a leading byte-order mark
  dropped) with an incremental decoder: a byte that is not UTF-8 is one ``InputError`` naming the file and the
  byte offset; each line is bounded (a 600 MB one-line file is one line of error after a megabyte, not gigabytes of
  fields), so memory follows one line, not the file; ``csv``'s own errors are ``InputError`` too.
- ``read_text`` / ``load_json``: the same for a whole small file; JSON nested past the recursion limit (the C
  parser's RecursionError, raised cleanly) is one line. A pre-scan of the nesting was tried and dropped: any regular
  expression that skips strings backtracks quadratically on a crafted run of escaped quotes.
- ``bounded_int``: a decimal integer whose digits are checked before conversion (a 400-digit frame number is one
  line, never an OverflowError).
"""

from __future__ import annotations

import codecs
import csv
import json
import os
import re
import stat
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from ssau.errors import InputError

_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFDIR: "a directory"}


def kind_of(mode: int) -> str:
    """'a FIFO', 'a socket', ... for ``st_mode``: how a non-regular file is named in error lines."""
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def is_regular(path: str | Path) -> bool:
    """True for a regular file (symlinks followed); False for a FIFO, socket, device, directory or missing path.
    Never opens the path."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def open_regular(path: str | Path, what: str = "file") -> BinaryIO:
    """``path`` opened for binary reading if it is a regular file; ``InputError`` (one line) otherwise. Never
    blocks on a FIFO: the open is non-blocking and the descriptor is checked before any read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except IsADirectoryError:
        raise InputError(f"{path}: the {what} is a directory, not a file") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise InputError(f"{path}: the {what} is {kind_of(mode)}, not a regular file; ssau reads regular files "
                             f"only")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _decode_error(path: str | Path, what: str, offset: int, e: UnicodeDecodeError) -> InputError:
    return InputError(f"{path}: the {what} is not UTF-8 text (byte {offset + e.start}: "
                      f"{e.object[e.start:e.start + 4]!r}); save it as UTF-8")


def read_text(path: str | Path, what: str = "file", limit: int = 64 << 20) -> str:
    """A whole small text file as UTF-8 (BOM dropped); larger than ``limit`` bytes, not UTF-8, or not a regular
    file: one ``InputError`` line."""
    with open_regular(path, what) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise InputError(f"{path}: the {what} is over {limit >> 20} MiB; ssau does not read it whole")
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise _decode_error(path, what, 0, e) from None


def load_json(text: str | bytes, where: str) -> Any:
    """``json.loads`` with nesting past the recursion limit and malformed text as one ``InputError`` line."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8").removeprefix("\ufeff")
        except UnicodeDecodeError as e:
            raise InputError(f"{where}: not UTF-8 text (byte {e.start})") from None
    try:
        return json.loads(text)
    except RecursionError:  # the C parser counts its depth against the recursion limit and raises cleanly
        raise InputError(f"{where}: JSON nested too deeply (past Python's recursion limit); not what ssau "
                         f"writes") from None
    except ValueError as e:
        raise InputError(f"{where}: not valid JSON ({str(e)[:100]})") from None


def read_json(path: str | Path, what: str = "file", limit: int = 64 << 20) -> Any:
    return load_json(read_text(path, what, limit), str(path))


_INT = re.compile(r"\s*[-+]?\d+(\.0*)?\s*")


def bounded_int(text: str, where: str, digits: int = 18) -> int:
    """A decimal integer of at most ``digits`` digits ("12", "12.0"); anything else is one ``InputError``."""
    if not _INT.fullmatch(text):
        raise InputError(f"{where}: {text[:40]!r} is not an integer")
    whole = text.strip().split(".")[0].lstrip("+-").lstrip("0")
    if len(whole) > digits:
        raise InputError(f"{where}: {text.strip()[:20]}... has {len(whole)} digits; integers here have at most "
                         f"{digits}")
    return int(text.strip().split(".")[0])


# ---------------------------------------------------------------------------------------------------- label text
MAX_LINE = 1 << 20  # a label or landmark row is a few kB; a "line" of 600 MB is not one, and is never held whole
_EOL = re.compile(r"\r\n?|\n")


def _long_line(path: str | Path, what: str, lineno: int, max_line: int) -> InputError:
    return InputError(f"{path}:{lineno}: a line of over {max_line} characters; a {what} holds short lines")


def text_lines(path: str | Path, what: str = "file", max_line: int = MAX_LINE, chunk: int = 1 << 18
               ) -> Iterator[str]:
    """The lines of a UTF-8 text file: lines end at ``\\n``, ``\\r\\n`` or a lone ``\\r`` (as ``open(newline="")``
    splits them for ``csv``), a line longer than ``max_line`` characters is one ``InputError`` naming the file and
    line, and so is a NUL (UTF-16 without a byte-order mark decodes as UTF-8 full of them). Memory stays within a
    chunk and ``max_line``, whatever the file holds."""
    with open_regular(path, what) as f:
        decoder = codecs.getincrementaldecoder("utf-8")("strict")
        offset, pending, first, lineno = 0, "", True, 1
        while True:
            data = f.read(chunk)
            held = len(decoder.getstate()[0])  # bytes of a character split by the previous chunk's end
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:  # e.start counts from the held bytes
                raise _decode_error(path, what, offset - held, e) from None
            base = offset - held  # the file offset of text's first byte
            offset += len(data)
            if first and text:
                base += 3 * text.startswith("\ufeff")
                text, first = text.removeprefix("\ufeff"), False
            if (nul := text.find("\0")) >= 0:
                raise InputError(f"{path}: the {what} is not UTF-8 text (byte {base + len(text[:nul].encode())}: "
                                 f"a NUL; UTF-16?); save it as UTF-8")
            text, start = pending + text, 0
            for m in _EOL.finditer(text):
                if data and m.end() == len(text) and m.group() == "\r":
                    break  # the \n of a \r\n may open the next chunk
                if m.start() - start > max_line:
                    raise _long_line(path, what, lineno, max_line)
                yield text[start:m.end()]
                start, lineno = m.end(), lineno + 1
            pending = text[start:]
            if len(pending) - pending.endswith("\r") > max_line:
                raise _long_line(path, what, lineno, max_line)
            if not data:
                break
        if pending:
            yield pending


def csv_rows(path: str | Path, what: str = "file", max_line: int = MAX_LINE) -> Iterator[list[str]]:
    """The rows of a UTF-8 CSV file, streamed (``csv.reader`` over ``text_lines``); what ``csv`` refuses (a field
    over its size limit, a quote left open to the end) is one ``InputError`` naming the file and line."""
    reader = csv.reader(text_lines(path, what, max_line))
    try:
        yield from reader
    except csv.Error as e:
        raise InputError(f"{path}:{reader.line_num}: the {what} is not CSV ({e})") from None
