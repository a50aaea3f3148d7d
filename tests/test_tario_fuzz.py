"""Property-based fuzzing (hypothesis) of the tar reader and of the per-sample decode path (issue 10's proof).

The reader property, precisely. O is a real shard written by ``ssau shard``, parsed independently with Python's
``tarfile``: for every member its key, extension, bytes and the byte range [start, end) of its data. M is O after
one random mutation: byte flips (anywhere, or aimed at headers), a truncation, an insertion, a size field
overwritten with a value a reader must refuse (checksum recomputed, so only the value betrays it), or a pax header
inserted before a member (malformed records, or a harmless valid one). Reading M with ``tar_samples`` and decoding
every sample with ``decode_eval`` + ``au_targets``:

1. bounded: every read finishes within ``LIMIT_S`` (an interval timer interrupts a reader that loops);
2. nothing escapes: damage reaches the reader's handler only; decode raises DecodeError only;
3. nothing made up: every yielded sample has an original key and a subset of its extensions, and each member's
   bytes equal the original's unless the mutation wrote inside that member's data range. (Tar has no checksum over
   member data: a flipped byte inside a JPEG or a json is passed on as it is, by any reader. Such a sample either
   fails to decode - counted as skipped - or decodes into a well-formed example of damaged content; ``ssau shard``
   records each shard's sha256 in dataset.json for that.) A reader that mis-frames members - trusting a bad size,
   losing alignment, reading a header as data - yields bytes that differ outside any written range and fails;
4. nothing lost silently: when the handler was not called, every original sample was yielded, complete;
5. examples are the originals': a sample whose members are byte-identical decodes to the original's tensor,
   targets and mask; any other sample that decodes is well formed (uint8 3xSxS, 0/1 targets and mask over the AU
   list); the rest raise DecodeError, which the stream counts as skipped.

The decode property: any mutation of one sample's json or jpg bytes (flips, cuts, insertions, json values of any
type in any field, frame headers declaring any size) gives DecodeError or a well-formed example, quickly.
"""

from __future__ import annotations

import json
import random
import signal
import tarfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ssau.aus import EXPRESSIONS, STANDARD_AUS
from ssau.data.decode import au_targets, decode_eval, decode_train
from ssau.data.tario import tar_samples
from ssau.errors import DecodeError

AUS = STANDARD_AUS["bp4d"]
SIZE = 32
LIMIT_S = 5.0
FUZZ = settings(max_examples=200, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


class Hang(Exception):
    pass


@contextmanager
def time_limit(seconds: float):
    def ring(signum, frame):
        raise Hang(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Original:
    """One real shard and what an independent parser (tarfile) finds in it."""

    def __init__(self, path: Path):
        self.data = path.read_bytes()
        self.samples: dict[str, dict[str, bytes]] = {}
        self.ranges: dict[tuple[str, str], tuple[int, int]] = {}
        self.headers: list[int] = []
        with tarfile.open(path) as tf:
            for m in tf.getmembers():
                key, _, ext = m.name.partition(".")
                self.samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
                self.ranges[(key, ext)] = (m.offset_data, m.offset_data + m.size)
                self.headers.append(m.offset)
        self.decoded = {k: _example(s) for k, s in self.samples.items()}
        assert len(self.samples) >= 3 and all(v is not None for v in self.decoded.values())


def _example(s: dict) -> tuple[torch.Tensor, list, list] | None:
    try:
        img, meta = decode_eval(s, SIZE)
    except DecodeError:
        return None
    t, m = au_targets(meta, AUS)
    return img, t, m


@pytest.fixture(scope="module")
def original(corpora) -> Original:
    d = corpora.bp4d(frames=2, shard_size=4)
    return Original(sorted(d.glob("*.tar"))[0])


def checksum(hdr: bytearray) -> None:
    hdr[148:156] = b" " * 8
    hdr[148:156] = b"%06o\0 " % sum(hdr)


def pax_header(records: bytes) -> bytes:
    info = tarfile.TarInfo("././@PaxHeader")
    info.size, info.type = len(records), tarfile.XHDTYPE
    return info.tobuf(tarfile.USTAR_FORMAT) + records + bytes(-len(records) % 512)


REFUSED_SIZES = [b"\x80" + b"\xff" * 11, b"\xff" * 12, b"\xff" * 11 + b"\x00", b"-0000000001\0", b"+0000000001\0",
                 b"77777777777\0", b"0000000001a\0", b"00000_00001\0", b"\x81" + bytes(11)]
PAX_RECORDS = [b"0 path=x.jpg\n", b"-12 path=x.jpg\n", b"99999999999999999999 path=x.jpg\n", b"1a path=x.jpg\n",
               b"3 path=x.jpg\n", b"14 path=x.jpg", b"9 noequal\n", b"15 size=-100000\n", b"12 size=1e9\n",
               b"40 size=999999999999999999999999999999\n", b"\xff\xfe path=x\n", b"16 path=\xff\xfe.jpg\n"]
HARMLESS_PAX = b"18 mtime=12345.5\n"


def mutations(o: Original) -> st.SearchStrategy[tuple]:
    """Small mutation specs (what hypothesis prints when a property fails); ``mutate`` applies one."""
    n = len(o.data)
    anywhere = st.integers(0, n - 1)
    at_header = st.builds(lambda h, i: h + i, st.sampled_from(o.headers), st.integers(0, 511))
    return st.one_of(
        st.tuples(st.just("flip"), st.lists(st.tuples(anywhere | at_header, st.integers(1, 255)), min_size=1,
                                            max_size=4)),
        st.tuples(st.just("truncate"), anywhere),
        st.tuples(st.just("insert"), st.integers(0, n), st.binary(min_size=1, max_size=1100)
                  | st.builds(bytes, st.sampled_from([512, 1024]))),
        st.tuples(st.just("size"), st.sampled_from(o.headers), st.sampled_from(REFUSED_SIZES + [b"%011o\0" % (n + 1)])),
        st.tuples(st.just("pax"), st.sampled_from(o.headers), st.sampled_from(PAX_RECORDS + [HARMLESS_PAX])))


def mutate(o: Original, spec: tuple) -> tuple[bytes, set[int], bool]:
    """-> (mutated bytes, positions written in original coordinates, whether the reader must report damage)."""
    data, kind = bytearray(o.data), spec[0]
    if kind == "flip":
        for pos, x in spec[1]:
            data[pos] ^= x
        return bytes(data), {pos for pos, _ in spec[1]}, False
    if kind == "truncate":
        return bytes(data[:spec[1]]), set(), False
    if kind == "insert":
        return bytes(data[:spec[1]] + spec[2] + data[spec[1]:]), {spec[1]}, False
    h = spec[1]
    if kind == "size":  # checksum recomputed: only the value itself can tell the reader something is wrong
        hdr = bytearray(data[h:h + 512])
        hdr[124:136] = spec[2]
        checksum(hdr)
        data[h:h + 512] = hdr
        return bytes(data), set(), True
    return bytes(data[:h] + pax_header(spec[2]) + data[h:]), set(), spec[2] != HARMLESS_PAX


def _hit(o: Original, key: str, ext: str, written: set[int]) -> bool:
    start, end = o.ranges[(key, ext)]
    return any(start <= p < end for p in written)


def _well_formed(img: torch.Tensor, t: list, m: list) -> None:
    assert img.dtype == torch.uint8 and img.shape == (3, SIZE, SIZE)
    assert len(t) == len(m) == len(AUS) and set(t) <= {0.0, 1.0} and set(m) <= {0.0, 1.0}


@FUZZ
@given(data=st.data())
def test_mutated_shards_never_hang_raise_or_yield_made_up_samples(original, tmp_path_factory, data):
    mutated, written, must_report = mutate(original, data.draw(mutations(original), label="mutation"))
    path = tmp_path_factory.getbasetemp() / "mutated.tar"
    path.write_bytes(mutated)
    errors: list[Exception] = []
    with time_limit(LIMIT_S):
        samples = list(tar_samples(str(path), errors.append))  # 2: any other exception fails the test
    if must_report:
        assert errors, "a header the reader must refuse was accepted"
    assert all(type(e).__name__ in ("TarFormatError", "OSError") for e in errors)
    keys = set(original.samples)
    for s in samples:  # 3
        key = s["__key__"]
        assert key in keys, f"made-up key {key!r}"
        exts = set(s) - {"__key__", "__url__"}
        assert exts <= set(original.samples[key])
        for ext in exts:
            assert s[ext] == original.samples[key][ext] or _hit(original, key, ext, written), (
                f"{key}.{ext} differs from the original outside anything the mutation wrote: mis-framed")
    if not errors:  # 4
        assert {s["__key__"] for s in samples} == set(original.samples)
        assert all(set(s) - {"__key__", "__url__"} == set(original.samples[s["__key__"]]) for s in samples)
    for s in samples:  # 5
        with time_limit(LIMIT_S):
            got = _example(s)
        if got is None:
            continue  # DecodeError: skipped and counted by the stream
        _well_formed(*got)
        key = s["__key__"]
        if all(s[e] == original.samples[key][e] for e in set(s) - {"__key__", "__url__"}):
            img, t, m = original.decoded[key]
            assert torch.equal(got[0], img) and got[1] == t and got[2] == m


# ---------------------------------------------------------------------------------------------------- decode path
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=13) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=16)


def sample_mutations(o: Original) -> st.SearchStrategy[tuple]:
    key = st.sampled_from(sorted(o.samples))
    byte_ops = st.tuples(st.sampled_from(["flip", "cut", "insert"]), st.integers(0, 10_000), st.integers(1, 255),
                         st.binary(min_size=1, max_size=64))
    return st.one_of(
        st.tuples(key, st.just("json-field"), st.sampled_from(["aus", "occurrence", "mask", "expression"]),
                  json_values | st.lists(st.integers(-2, 30), max_size=13) | st.integers(-3, 10)),
        st.tuples(key, st.just("json-value"), json_values),
        st.tuples(key, st.just("jpg-size"), st.integers(0, 65535), st.integers(0, 65535)),
        st.tuples(key, st.sampled_from(["json-bytes", "jpg-bytes"]), byte_ops))


def mutate_sample(o: Original, spec: tuple) -> dict:
    key, what = spec[0], spec[1]
    s = {"__key__": key, **o.samples[key]}
    if what == "json-field":
        meta = json.loads(s["json"])
        meta[spec[2]] = spec[3]
        s["json"] = json.dumps(meta).encode()
    elif what == "json-value":
        s["json"] = json.dumps(spec[2]).encode()
    elif what == "jpg-size":  # the frame header declares any width x height, up to 65535 x 65535
        jpg = bytearray(s["jpg"])
        i = jpg.find(b"\xff\xc0")
        jpg[i + 5:i + 9] = spec[3].to_bytes(2, "big") + spec[2].to_bytes(2, "big")
        s["jpg"] = bytes(jpg)
    else:
        ext = what.split("-")[0]
        b = bytearray(s[ext])
        op, pos, x, blob = spec[2]
        pos %= len(b)
        if op == "flip":
            b[pos] ^= x
        elif op == "cut":
            del b[pos:]
        else:
            b[pos:pos] = blob
        s[ext] = bytes(b)
    return s


@FUZZ
@given(data=st.data())
def test_any_mutation_of_one_sample_gives_decode_error_or_a_well_formed_example(original, data):
    s = mutate_sample(original, data.draw(sample_mutations(original), label="mutation"))
    for decode in (lambda: decode_eval(s, SIZE), lambda: decode_train(s, SIZE, random.Random(0))):
        try:
            with time_limit(LIMIT_S):
                img, meta = decode()
        except DecodeError:
            continue
        hidden = [i % 2 == 0 for i in range(len(AUS))]
        for t, m in (au_targets(meta, AUS), au_targets(meta, AUS, hidden)):
            _well_formed(img, t, m)
        assert type(meta.get("expression", -1)) is int and -1 <= meta.get("expression", -1) < len(EXPRESSIONS)
