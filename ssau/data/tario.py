"""Reading samples out of a tar shard, fast, and safely on damaged or crafted files.

webdataset's reader goes through Python's ``tarfile`` in stream mode, about 0.15 ms per member; at 64 px a JPEG
decodes in about 0.7 ms, so header parsing alone cost a third of a worker's throughput (ssau.bench.data). Shards
are plain tar files, so this reads the 512-byte headers directly: ustar names with prefixes, pax ``path``/``size``
records and GNU long names are honoured, header checksums are verified, and a damaged shard ends early through
the ``handler`` (which counts it) instead of raising. Samples are grouped by key as webdataset does: the member
name up to the first dot of its basename.

Nothing a header declares is trusted: sizes must be plain octal, positive base-256 or decimal pax digits, at most
``MAX_MEMBER`` bytes (``MAX_META`` for pax and long-name records) and inside the file; pax records must have a
length that covers the record and lies within the data. Anything else is a ``TarFormatError`` that ends the shard,
so memory per member is bounded and every loop advances through the file (no header can make it spin). A shard
must end with the end-of-archive block followed by zeros only: without it the file was cut short, and data after it
means samples were hidden behind a zeroed block; both are reported like any damage.
"""

from __future__ import annotations

import io
import re
import zlib
from typing import Callable, Iterator

from ssau.errors import ConfigError, TarFormatError
from ssau.remote import open_shard, read_span

_BLOCK = 512
_ZEROS = bytes(_BLOCK)
_OCTAL = re.compile(rb"[0-7]*")
MAX_MEMBER = 64 << 20  # far above any face JPEG; a member declaring more is damage, not data to allocate
MAX_META = 1 << 20  # pax / GNU long-name records: names and a few numbers


def _field(hdr: bytes, a: int, b: int) -> bytes:
    return hdr[a:b].split(b"\0", 1)[0]


def _number(hdr: bytes, a: int, b: int, what: str) -> int:
    """A numeric header field: NUL/space-padded octal, or GNU base-256 (first byte 0x80; 0xff is negative)."""
    raw = hdr[a:b]
    if raw[0] & 0x80:
        if raw[0] not in (0x80, 0xFF):
            raise TarFormatError(f"{what} field is neither octal nor base-256")
        n = int.from_bytes(raw[1:], "big")
        return n - 256 ** (len(raw) - 1) if raw[0] == 0xFF else n
    text = raw.split(b"\0", 1)[0].strip(b" ")
    if not _OCTAL.fullmatch(text):  # int(..., 8) would also take signs, underscores and inner spaces
        raise TarFormatError(f"{what} field {text[:12]!r} is not an octal number")
    return int(text, 8) if text else 0


def _checksum(hdr: bytes) -> int:
    """The header's byte sum with its checksum field counted as spaces. Adler-32's low half is 1 + the byte sum
    modulo 65,521, and 256 bytes sum to at most 65,280: so two C-speed adler32 calls give the exact sum (a Python
    ``sum`` over 512 bytes cost 3 us a member)."""
    view = memoryview(hdr)
    total = (zlib.adler32(view[:256]) & 0xFFFF) + (zlib.adler32(view[256:]) & 0xFFFF) - 2
    return total - sum(view[148:156]) + 8 * 32


def _members(f, file_size: int | None) -> Iterator[tuple[str, bytes]]:
    """Members of the tar read from ``f`` by ``read`` alone (no seek: a stream reads alike); ``file_size`` (None
    when unknown) lets a declared size be checked against the file before it is read."""
    long_name, pax, at, read = None, {}, 0, f.read
    while True:
        hdr = read(_BLOCK)
        if len(hdr) < _BLOCK:
            raise TarFormatError(f"file ends at byte {at + len(hdr)} without the end-of-archive block (cut short)")
        if hdr == _ZEROS:
            # Only zeros may follow (the second end block, record padding): anything else means a header was
            # overwritten with zeros or zeros were inserted, and the samples after it would vanish unreported.
            while chunk := read(1 << 20):
                if chunk.count(0) != len(chunk):
                    raise TarFormatError(f"data after the end-of-archive block at byte {at}")
            return
        if _number(hdr, 148, 156, "checksum") != _checksum(hdr):
            raise TarFormatError(f"bad header checksum at byte {at}")
        kind = hdr[156:157]
        size = _number(hdr, 124, 136, "size")
        if "size" in pax:
            digits = pax["size"]
            if not digits.isdigit() or not digits.isascii():
                raise TarFormatError(f"pax size {digits[:20]!r} at byte {at} is not a number")
            size = int(digits) if len(digits) <= 20 else MAX_MEMBER + 1  # no int() of a megabyte of digits
        limit = MAX_META if kind in (b"x", b"g", b"L") else MAX_MEMBER
        if size < 0 or size > limit:
            raise TarFormatError(f"member at byte {at} declares {size} bytes (limit {limit})")
        if file_size is not None and at + _BLOCK + size > file_size:
            raise TarFormatError(f"member at byte {at} declares {size} bytes, past the end of the file (cut short)")
        data = read(size)
        if len(data) < size:
            raise TarFormatError(f"truncated member at byte {at}")
        pad = -size % _BLOCK
        if pad and len(read(pad)) < pad:
            raise TarFormatError(f"file ends inside the padding of the member at byte {at} (cut short)")
        header_at, at = at, at + _BLOCK + size + pad
        if kind == b"x":
            pax = _pax_records(data, header_at)
            continue
        if kind == b"L":
            long_name = data.rstrip(b"\0").decode()
            continue
        if kind == b"g":
            continue
        name = long_name or pax.get("path")
        if name is None:
            name = _field(hdr, 0, 100).decode()
            if hdr[257:262] == b"ustar" and (prefix := _field(hdr, 345, 500)):
                name = f"{prefix.decode()}/{name}"
        long_name, pax = None, {}
        if kind in (b"0", b"\0", b"7"):
            yield name, data


def _pax_records(data: bytes, at: int) -> dict[str, str]:
    """POSIX.1-2001 records ``"<length> <key>=<value>\\n"``, the length counting the whole record."""
    out, pos, n = {}, 0, len(data)
    while pos < n and data[pos] != 0:
        space = data.find(b" ", pos, pos + 21)
        digits = data[pos:space] if space > pos else b""
        if not digits.isdigit():
            raise TarFormatError(f"pax record at byte {at}+{pos} has no decimal length")
        end = pos + int(digits)
        # At least "<digits> k=\n": a length of 0 or one that stops inside its own digits would never advance.
        if end < space + 3 or end > n or data[end - 1] != 0x0A:
            raise TarFormatError(f"pax record at byte {at}+{pos} declares length {int(digits)}, "
                                 f"which does not frame a record within the {n}-byte header")
        key, eq, value = data[space + 1:end - 1].partition(b"=")
        if not eq:
            raise TarFormatError(f"pax record at byte {at}+{pos} has no '='")
        out[key.decode()] = value.decode()
        pos = end
    return out


def tar_samples(url: str, handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """Samples ``{'__key__', '__url__', ext: bytes, ...}`` of one shard; errors go to ``handler`` and end the shard.

    The handler receives a ``TarFormatError`` naming ``url`` for damage, or the ``OSError`` of a file that cannot
    be read. Nothing else leaves this function (tests/test_tario_fuzz.py checks it on mutated shards).
    """
    try:
        f, size = open_shard(url)  # a local file, or a remote shard (ssau.remote): retried, cached
    except (OSError, ConfigError) as e:  # ConfigError: a URL no installed filesystem reads
        handler(e)
        return
    with f:
        yield from _grouped(f, size, url, handler)


def samples_at(spans: list[tuple[str, int, int]], keys: frozenset[str], handler: Callable[[Exception], bool],
               gap: int = 1 << 20) -> Iterator[dict]:
    """The samples named ``keys`` at (shard, ``tar_offset``, ``tar_size``) spans of the index, sorted by shard and
    offset: spans of one shard less than ``gap`` bytes apart are read together (one range request for a remote
    shard), the bytes parsed as a small tar and filtered by key. A read that fails (a server that ignores range
    requests, a shard cut short) reads that shard whole instead; damage goes to ``handler``."""
    reads: list[list] = []
    for url, offset, size in spans:
        if reads and reads[-1][0] == url and reads[-1][1] <= offset <= reads[-1][2] + gap:
            reads[-1][2] = max(reads[-1][2], offset + size)
        else:
            reads.append([url, offset, offset + size])
    seen, whole = set(), set()
    for url, start, end in reads:
        if url in whole:
            continue
        try:
            data = read_span(url, start, end - start)
            found = _grouped(io.BytesIO(data + bytes(2 * _BLOCK)), None, url, handler)  # + the end-of-archive blocks
        except (OSError, ConfigError):  # a server without range requests, a shard shorter than its index: the
            whole.add(url)  # shard read whole, its damage counted as in any pass
            found = tar_samples(url, handler)
        for s in found:
            if s["__key__"] in keys and s["__key__"] not in seen:
                seen.add(s["__key__"])
                yield s


def _grouped(f, size: int | None, url: str, handler: Callable[[Exception], bool]) -> Iterator[dict]:
    sample: dict | None = None
    try:
        for name, data in _members(f, size):
            slash = name.rfind("/") + 1
            dot = name.find(".", slash)
            if dot < 0:
                continue
            key, ext = name[:dot], name[dot + 1:]
            if sample is None or sample["__key__"] != key:
                if sample is not None:
                    yield sample
                sample = {"__key__": key, "__url__": url}
            sample[ext] = data
    except OSError as e:
        handler(e)
        return
    except (TarFormatError, ValueError) as e:  # ValueError: names that are not UTF-8
        handler(TarFormatError(f"{url}: {e}"))
        return  # a damaged shard ends here; a half-read last sample is dropped with it
    if sample is not None:
        yield sample


class SkipCounter:
    """A handler that skips and counts what a worker could not read, keeping the first and last reason."""

    def __init__(self) -> None:
        self.n = 0
        self.first: str | None = None
        self.last: str | None = None

    def __call__(self, exn: Exception) -> bool:
        self.n += 1
        self.last = f"{type(exn).__name__}: {exn}"[:300]
        self.first = self.first or self.last
        return True
