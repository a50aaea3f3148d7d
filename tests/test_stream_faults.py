"""Damaged and crafted data never ends or hangs a run (issue 10, items 2-4).

Item 2: one bad sample (json that is not an object, a header-declared huge image, a tar member with a huge size)
is skipped and counted. Item 3: crafted tar headers never make the reader loop, and a training source with nothing
readable stops the run within seconds with one line naming it. Item 4: a damaged evaluation shard makes evaluation
fail with the counts (or, with data.eval_incomplete=warn, say so and report them), on every rank together.

Everything that could hang on a regression runs in a forked process with a time limit (``bounded``).
"""

from __future__ import annotations

import io
import itertools
import json
import multiprocessing as mp
import os
import signal
import tarfile
import time
import traceback
import zlib
from pathlib import Path

import pytest
import torch
from corpora import jpeg_bytes, write_tar
from PIL import Image
from ranks import run_ranks

from ssau.aus import STANDARD_AUS
from ssau.data.decode import decode_eval
from ssau.data.sources import SourceConfig, StreamConfig
from ssau.data.stream import TrainStream
from ssau.data.tario import tar_samples
from ssau.errors import DecodeError, SourceError

AUS = STANDARD_AUS["bp4d"]
META = {"aus": list(AUS), "occurrence": [1, 0] * 6, "mask": [1] * 12}


def _child(conn, fn, args) -> None:
    os.setpgid(0, 0)  # its own process group, with the DataLoader workers it starts: one killpg ends them all
    try:
        conn.send(("ok", fn(*args)))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        conn.send(("raised", type(e).__name__, str(e), traceback.format_exc()))


def bounded(fn, *args, timeout: float = 60):
    """``fn(*args)`` in a forked process; ('ok', value) or ('raised', type name, str, traceback). A call still
    running after ``timeout`` s is killed with its workers and fails the test: a hang becomes a failure, not a
    stuck CI job or orphaned workers spinning."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(child, fn, args))  # not a daemon: DataLoader workers are its children
    p.start()
    child.close()
    try:
        if not parent.poll(timeout):
            pytest.fail(f"{getattr(fn, '__name__', fn)} still running after {timeout} s (hang)")
        return parent.recv()
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the result is in; workers still shutting down need not finish
        except ProcessLookupError:
            pass
        p.join()


# ---------------------------------------------------------------------------------------------------- crafted tars
def header(name: str, size: int, kind: bytes = b"0", size_field: bytes | None = None) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    h = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
    if size_field is not None:
        h[124:136] = size_field
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)  # a valid checksum: only the crafted field is wrong
    return bytes(h)


def member(name: str, data: bytes, kind: bytes = b"0", size_field: bytes | None = None) -> bytes:
    return header(name, len(data), kind, size_field) + data + bytes(-len(data) % 512)


def sample(key: str, seed: int) -> bytes:
    return member(f"{key}.jpg", jpeg_bytes(seed)) + member(f"{key}.json", json.dumps(META).encode())


def pax(records: bytes) -> bytes:
    return member("././@PaxHeader", records, kind=b"x")


END = bytes(10240)  # end-of-archive blocks and record padding, as tarfile writes them

CRAFTED = {  # a header after good samples g0, g1 and before a good sample g2
    "pax length 0": pax(b"0 path=x.jpg\n"),
    "pax length negative": pax(b"-12 path=x.jpg\n"),
    "pax length huge": pax(b"99999999999999999999 path=x.jpg\n"),
    "pax length non-numeric": pax(b"1a path=x.jpg\n"),
    "pax size huge": pax(b"35 size=99999999999999999999999\n") + member("x.jpg", b"abc"),
    "pax size negative": pax(b"12 size=-10\n") + member("x.jpg", b"abc"),
    "base-256 size huge": member("x.jpg", b"abc", size_field=b"\x80" + b"\xff" * 11),
    "base-256 size negative": member("x.jpg", b"abc", size_field=b"\xff" * 12),
    "octal size negative": member("x.jpg", b"abc", size_field=b"-0000000001\0"),
    "octal size 8 GiB": member("x.jpg", b"abc", size_field=b"77777777777\0"),
    "size past the end of the file": member("x.jpg", b"abc", size_field=b"00004000000\0"),  # 1 MiB declared
}


def _read_all(path: str) -> tuple[list[str], list[str]]:
    errors = []
    keys = [s["__key__"] for s in tar_samples(path, lambda e: errors.append(f"{type(e).__name__}: {e}"))]
    return keys, errors


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_tar_headers_end_the_shard_counted(tmp_path, case):
    path = tmp_path / "crafted.tar"
    path.write_bytes(sample("g0", 1) + sample("g1", 2) + CRAFTED[case] + sample("g2", 3) + END)
    status, *rest = bounded(_read_all, str(path), timeout=30)
    assert status == "ok", rest  # nothing escapes the reader (before: OverflowError, or a hang)
    keys, errors = rest[0]
    assert keys == ["g0"]  # what precedes the damage (g1, in progress, is dropped with it), nothing made up
    assert len(errors) == 1 and errors[0].startswith("TarFormatError: ") and str(path) in errors[0]


def test_samples_hidden_behind_a_zeroed_header_are_reported(tmp_path):
    path = tmp_path / "zeroed.tar"
    path.write_bytes(sample("g0", 1) + sample("g1", 2) + bytes(512) + sample("g2", 3) + END)
    keys, errors = _read_all(str(path))
    assert keys == ["g0"] and len(errors) == 1 and "after the end-of-archive" in errors[0]
    path.write_bytes(sample("g0", 1) + sample("g1", 2)[:-512])  # cut short at a block boundary
    keys, errors = _read_all(str(path))
    assert len(errors) == 1 and "cut short" in errors[0]


# ---------------------------------------------------------------------------------------------------- bad samples
def huge_jpeg(w: int, h: int) -> bytes:
    """A real JPEG whose frame header declares w x h (Image.open believes it; decoding would allocate it)."""
    data = bytearray(jpeg_bytes(5))
    i = data.find(b"\xff\xc0")
    data[i + 5:i + 9] = h.to_bytes(2, "big") + w.to_bytes(2, "big")
    return bytes(data)


def huge_png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = w.to_bytes(4, "big") + h.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # IHDR's CRC, so PIL accepts the header
    return bytes(data)


BAD_SAMPLES = {
    "json-list": (jpeg_bytes(7), b"[1, 2]"),
    "json-string": (jpeg_bytes(7), b'"occurrence"'),
    "json-null": (jpeg_bytes(7), b"null"),
    "json-deep": (jpeg_bytes(7), b"[" * 100_000),
    "json-not-utf8": (jpeg_bytes(7), b"\xff\xfe{}"),
    "aus-uneven": (jpeg_bytes(7), json.dumps({**META, "mask": [1]}).encode()),
    "occurrence-text": (jpeg_bytes(7), json.dumps({**META, "occurrence": ["1"] * 12}).encode()),
    "occurrence-9": (jpeg_bytes(7), json.dumps({**META, "occurrence": [9] * 12}).encode()),
    "expression-99": (jpeg_bytes(7), json.dumps({**META, "expression": 99}).encode()),
    "jpeg-30000x30000": (huge_jpeg(30000, 30000), json.dumps(META).encode()),
    "png-11000x11000": (huge_png(11000, 11000), json.dumps(META).encode()),
}


def _bad_shards(root: Path) -> Path:
    d = root / "badsamples"
    d.mkdir()
    members = [(f"g{i}", jpeg_bytes(100 + i), META) for i in range(3)]
    with open(d / "bad-000000.tar", "wb") as f:
        f.write(b"".join(sample(k, 100 + i) for i, (k, _, _) in enumerate(members[:2])))
        for key, (jpg, js) in BAD_SAMPLES.items():
            f.write(member(f"{key}.jpg", jpg) + member(f"{key}.json", js))
        f.write(sample("g2", 102) + END)
    (d / "dataset.json").write_text(json.dumps({"aus": [f"AU{a:02d}" for a in AUS], "shards": [
        {"name": "bad-000000.tar", "fold": 0, "samples": 3 + len(BAD_SAMPLES)}]}))
    return d


def _train_batches(cfg: StreamConfig, n: int) -> tuple[list[list[str]], int]:
    batches = list(itertools.islice(TrainStream(cfg), n))
    return [b.keys for b in batches], sum(b.skipped for b in batches)


@pytest.mark.parametrize("workers", [0, 1])
def test_malformed_samples_are_skipped_and_counted(tmp_path, workers):
    cfg = StreamConfig(labelled=SourceConfig((str(_bad_shards(tmp_path)),)), m1=2, m2=0, image_size=32,
                       workers=workers, shuffle_buffer=4)
    status, *rest = bounded(_train_batches, cfg, 6)
    assert status == "ok", rest  # before: AttributeError ('list' object has no attribute 'get'), DecompressionBombError
    keys, skipped = rest[0]
    assert {k for b in keys for k in b} == {"g0", "g1", "g2"}
    assert skipped >= len(BAD_SAMPLES)  # 12 good samples took at least one full pass over the shard


@pytest.mark.parametrize("key", list(BAD_SAMPLES))
def test_decode_rejects_bad_samples_before_decoding_pixels(key):
    jpg, js = BAD_SAMPLES[key]
    t0 = time.perf_counter()
    with pytest.raises(DecodeError) as e:
        decode_eval({"__key__": key, "jpg": jpg, "json": js}, 32)
    assert time.perf_counter() - t0 < 0.5  # a header check, not a 121-megapixel decode
    if key in ("jpeg-30000x30000", "png-11000x11000"):
        assert "declares" in str(e.value)  # refused from the header, before any pixel memory


def test_an_exception_inside_the_image_decoder_is_one_skipped_sample(monkeypatch):
    """MemoryError (or any other error a PIL decoder raises on crafted bytes) is confined to its sample."""
    def fail(self, *a, **k):
        raise MemoryError("cannot allocate")
    s = {"__key__": "m", "jpg": jpeg_bytes(1), "json": json.dumps(META).encode()}
    monkeypatch.setattr(Image.Image, "convert", fail)
    monkeypatch.setattr("ssau.data.decode.simplejpeg.decode_jpeg", fail)  # the libjpeg-turbo path (issue 26)
    with pytest.raises(DecodeError, match="MemoryError"):
        decode_eval(s, 32)


# ---------------------------------------------------------------------------------------------------- empty sources
def _dead_source(root: Path, kind: str) -> Path:
    d = root / kind
    d.mkdir()
    shards = []
    for i in range(4):
        name = f"{kind}-{i:06d}.tar"
        if kind == "empty":
            write_tar(d / name, [])
        else:
            (d / name).write_bytes(os.urandom(3000))
        shards.append({"name": name, "fold": 0, "samples": 0 if kind == "empty" else 2})
    (d / "dataset.json").write_text(json.dumps({"aus": [f"AU{a:02d}" for a in AUS], "shards": shards}))
    return d


@pytest.mark.parametrize("kind,workers", [("empty", 0), ("empty", 2), ("garbage", 0), ("garbage", 2)])
def test_a_source_with_nothing_readable_stops_the_run_naming_it(tmp_path, kind, workers):
    dead = _dead_source(tmp_path, kind)
    cfg = StreamConfig(labelled=SourceConfig((str(dead),)), m1=2, m2=0, image_size=32, workers=workers)
    t0 = time.monotonic()
    status, *rest = bounded(_train_batches, cfg, 1, timeout=60)  # before: spins at 100 % CPU forever
    assert status == "raised" and rest[0] == "SourceError", rest
    message = rest[1]
    assert time.monotonic() - t0 < 30 and "\n" not in message
    assert message.startswith(f"labelled source ({dead}): none of the ")
    assert ("0 samples read, 0 of them set aside by label drop or the validation split, 0 errors)" in message
            if kind == "empty" else "TarFormatError" in message)


def _good_source(root: Path) -> Path:
    d = root / "one"
    d.mkdir()
    write_tar(d / "one-000000.tar", [(f"k{i}", jpeg_bytes(i), META) for i in range(4)])
    (d / "dataset.json").write_text(json.dumps({"aus": [f"AU{a:02d}" for a in AUS], "shards": [
        {"name": "one-000000.tar", "fold": 0, "samples": 4}]}))
    return d


def test_an_unlabelled_source_with_nothing_readable_is_named(tmp_path):
    good = _good_source(tmp_path)
    dead = _dead_source(tmp_path, "empty")
    cfg = StreamConfig(labelled=SourceConfig((str(good),)), unlabelled=SourceConfig((str(dead),)), m1=2, m2=2,
                       image_size=32, workers=0)
    status, *rest = bounded(_train_batches, cfg, 1)
    assert status == "raised" and rest[0] == "SourceError" and rest[1].startswith(f"unlabelled source ({dead})")


def _go_dead_after_start(cfg: StreamConfig, shard: Path):
    it = iter(TrainStream(cfg))
    next(it)
    shard.write_bytes(os.urandom(3000))  # the shard turns into garbage mid-run (a disk or a mount gone bad)
    for _ in range(10_000):
        next(it)


def test_a_source_that_stops_yielding_stops_the_run_after_source_timeout(tmp_path):
    d = _good_source(tmp_path)
    cfg = StreamConfig(labelled=SourceConfig((str(d),)), m1=2, m2=0, image_size=32, workers=0, shuffle_buffer=2,
                       source_timeout=1.0)
    t0 = time.monotonic()
    status, *rest = bounded(_go_dead_after_start, cfg, d / "one-000000.tar", timeout=60)
    assert status == "raised" and rest[0] == "SourceError", rest
    assert "no usable sample for 1 s (data.source_timeout)" in rest[1] and "TarFormatError" in rest[1]
    assert time.monotonic() - t0 < 30


def test_a_worker_stuck_in_a_system_call_stops_the_run(tmp_path):
    d = tmp_path / "fifo"
    d.mkdir()
    os.mkfifo(d / "fifo-000000.tar")  # open() blocks until a writer comes: a file system that does not answer
    (d / "dataset.json").write_text(json.dumps({"aus": [f"AU{a:02d}" for a in AUS], "shards": [
        {"name": "fifo-000000.tar", "fold": 0, "samples": 4}]}))
    cfg = StreamConfig(labelled=SourceConfig((str(d),)), m1=2, m2=0, image_size=32, workers=1, source_timeout=1.0)
    status, *rest = bounded(_train_batches, cfg, 1, timeout=60)
    assert status == "raised" and rest[0] == "SourceError", rest
    assert rest[1] == (f"labelled source ({d}): its DataLoader workers delivered no batch for 2 s "
                       f"(2 x data.source_timeout): a worker is stuck, e.g. reading from a file system that does "
                       f"not answer")


# ---------------------------------------------------------------------------------------------------- evaluation
@pytest.fixture(scope="module")
def damaged(corpora, tmp_path_factory) -> Path:
    """BP4D look-alike shards (fold 1: 24 samples in 6 shards) whose last fold-1 shard is cut short inside its
    third sample's last member: its first two samples stay readable."""
    import pyarrow.parquet as pq

    d = corpora.copy(corpora.bp4d(frames=6, shard_size=4), tmp_path_factory.mktemp("evalfaults") / "bp4d")
    doc = json.loads((d / "dataset.json").read_text())
    last = [s["name"] for s in doc["shards"] if s["fold"] == 1][-1]
    tar = d / last
    third = next(r for r in pq.read_table(d / "index.parquet").to_pylist() if r["shard"] == last and r["position"] == 2)
    tar.write_bytes(tar.read_bytes()[:third["tar_offset"] + third["tar_size"] - 512])
    return d


def _evaluate(rank: int, world: int, shards: str, mode: str):
    from ssau.dist.ranks import Runtime
    from ssau.methods.registry import build_method
    from ssau.train.evaluate import evaluate_method
    from ssau.train.setup import load_run_config

    cfg = load_run_config(None, [f"data.labelled=[{shards}]", "model.backbone=tiny", "data.image_size=32",
                             "data.fold=1", "data.workers=0", "data.eval_batch=4", f"data.eval_incomplete={mode}"])
    torch.manual_seed(0)
    method = build_method(cfg.method, AUS, cfg.model)
    try:
        m = evaluate_method(method, cfg.data, AUS, Runtime(rank, world, torch.device("cpu"), False, False))
    except SourceError as e:
        return "raised", str(e)
    return "ok", {k: v for k, v in m.items() if k.startswith("eval_")}


def test_a_damaged_eval_shard_fails_evaluation_with_the_counts(damaged):
    status, line = _evaluate(0, 1, str(damaged), "fail")  # before: scored 22 of 24, said nothing
    assert status == "raised" and "\n" not in line
    assert line.startswith(f"evaluation of fold 1 of {damaged} scored 22 of the 24 samples dataset.json lists "
                           f"(2 unreadable or missing); the first problem: bp4d-fold1-000005.tar: samples 2-3 not "
                           f"read (TarFormatError: ")


def test_with_eval_incomplete_warn_evaluation_finishes_and_reports_the_counts(damaged, capsys):
    status, counts = _evaluate(0, 1, str(damaged), "warn")
    assert status == "ok" and counts == {"eval_scored": 22, "eval_expected": 24, "eval_skipped": 2}
    err = capsys.readouterr().err
    assert err.startswith("ssau: warning: evaluation of fold 1 of ") and "scored 22 of the 24" in err


def test_an_intact_eval_fold_reports_complete_counts(damaged):
    from ssau.dist.ranks import Runtime
    from ssau.methods.registry import build_method
    from ssau.train.evaluate import evaluate_method
    from ssau.train.setup import load_run_config

    cfg = load_run_config(None, [f"data.labelled=[{damaged}]", "model.backbone=tiny", "data.image_size=32",
                             "data.fold=2", "data.workers=0", "data.eval_batch=4"])  # fold 2 is intact
    m = evaluate_method(build_method(cfg.method, AUS, cfg.model), cfg.data, AUS,
                        Runtime(0, 1, torch.device("cpu"), False, False))
    assert (m["eval_scored"], m["eval_expected"], m["eval_skipped"]) == (24, 24, 0) and "f1_mean" in m


def test_every_rank_fails_together_when_the_damage_is_on_one_rank(damaged):
    """The cut shard is the last of fold 1, so only rank 1 reads it; both ranks must raise (none may hang in a
    collective or carry on)."""
    results = run_ranks(_evaluate, 2, str(damaged), "fail", timeout=180)
    assert [r[0] for r in results] == ["raised", "raised"]
    assert "scored 22 of the 24" in results[0][1] and "bp4d-fold1-000005.tar" in results[0][1]
