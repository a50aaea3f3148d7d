"""`ssau shard` against crafted inputs and broken outputs (issue 10, items 9 and 10).

Every input is built here: tiny and header-declared huge images, colliding names, duplicated and contradictory
label rows, manifest paths that leave ``--images``, an ``--out`` that cannot be written, a disk that fills, a worker
that raises or is killed. Each test asserts what the run produced, not only that it did not raise.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
import warnings
import zlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from corpora import jpeg_bytes, write_bp4d
from helpers import one_error_line, samples_of, shard, tree_bytes
from PIL import EpsImagePlugin, Image, ImageFile

from ssau.cli import main
from ssau.errors import SkipImage
from ssau.shard.images import check_header, prepare_image
from ssau.shard.plan import _dedupe_keys
from ssau.shard.records import Record
from ssau.shard.schema import MAX_PIXELS

ROOT = Path(__file__).resolve().parents[1]


def png_declaring(w: int, h: int) -> bytes:
    """A valid PNG header declaring w x h RGB pixels, with a few bytes of image data: costs nothing to build."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def jpeg_declaring(w: int, h: int) -> bytes:
    """A small real JPEG whose SOF0 header is patched to declare w x h."""
    data = bytearray(jpeg_bytes(1))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def folder_of(root: Path, files: dict[str, bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def skips(out: Path) -> dict[str, str]:
    return {Path(x["input"].split(" ")[-1]).name: x["reason"]
            for x in json.loads((out / "dataset.json").read_text())["skipped"]}


# ---------------------------------------------------------------------------------------------------- images
@pytest.mark.parametrize("workers", ["1", "3"])
def test_tiny_rgb_jpegs_are_skipped_and_the_pool_lives_on(tmp_path, workers):
    # Sides under 8 px made libjpeg's 1/8 draft scale 0: ZeroDivisionError, and the pool died with it.
    files = {f"tiny{i}.jpg": jpeg_bytes(i, size=s) for i, s in enumerate((1, 5, 7))}
    files |= {f"good{i}.jpg": jpeg_bytes(10 + i) for i in range(4)}
    root = folder_of(tmp_path / "faces", files)
    out = tmp_path / "out"
    assert shard("folder", "--images", str(root), "--out", str(out), "--workers", workers, "--shard-size", "1") == 0
    assert skips(out) == {"tiny0.jpg": "too-small", "tiny1.jpg": "too-small", "tiny2.jpg": "too-small"}
    got = samples_of(out)
    assert sorted(got) == [f"good{i}" for i in range(4)]
    assert all(got[f"good{i}"]["jpg"] == files[f"good{i}.jpg"] for i in range(4))


@pytest.mark.parametrize("workers", ["1", "3"])
def test_any_exception_while_preparing_one_image_skips_only_that_image(tmp_path, monkeypatch, workers):
    import ssau.shard.images as images
    import ssau.shard.write as shardwrite

    root = folder_of(tmp_path / "faces", {"gray.jpg": jpeg_bytes(1, mode="L"), "boom.jpg": jpeg_bytes(2),
                                          "good.jpg": jpeg_bytes(3)})

    def to_rgb(img):
        raise KeyError("a converter bug")

    def read_source(source):
        if source.endswith("boom.jpg"):
            raise RecursionError("a reader bug")
        return Path(source).read_bytes()

    monkeypatch.setattr(images, "_to_rgb", to_rgb)  # forked workers inherit both patches
    monkeypatch.setattr(shardwrite, "read_source", read_source)
    out = tmp_path / "out"
    assert shard("folder", "--images", str(root), "--out", str(out), "--workers", workers, "--shard-size", "1") == 0
    assert skips(out) == {"gray.jpg": "error-KeyError", "boom.jpg": "error-RecursionError"}
    assert sorted(samples_of(out)) == ["good"]


def test_header_declared_huge_images_are_too_large_and_never_decoded(tmp_path, monkeypatch):
    files = {"png121mp.png": png_declaring(11_000, 11_000),  # 1x-2x PIL's limit: PIL only warns (was 'corrupt')
             "jpeg81mp.jpg": jpeg_declaring(9_000, 9_000),
             "jpeg900mp.jpg": jpeg_declaring(30_000, 30_000),  # over 2x: PIL refuses in open
             "png4g.png": png_declaring(65_535, 65_535),
             "good.jpg": jpeg_bytes(1)}
    root = folder_of(tmp_path / "faces", files)
    decoded = []
    real_load = ImageFile.ImageFile.load

    def load(self):
        decoded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    out = tmp_path / "out"
    assert shard("folder", "--images", str(root), "--out", str(out)) == 0
    doc = json.loads((out / "dataset.json").read_text())
    by_name = {Path(x["input"]).name: x for x in doc["skipped"]}
    assert {n: x["reason"] for n, x in by_name.items()} == {n: "too-large" for n in files if n != "good.jpg"}
    assert "11000x11000" in by_name["png121mp.png"]["detail"] and "9000x9000" in by_name["jpeg81mp.jpg"]["detail"]
    assert str(30_000 * 30_000) in by_name["jpeg900mp.jpg"]["detail"]
    assert len(decoded) == 1  # only the good image's pixels were ever decoded: memory stays bounded
    assert sorted(samples_of(out)) == ["good"]


def test_check_header_is_the_importable_guard():
    for data, reason in ((png_declaring(11_000, 11_000), "too-large"), (jpeg_declaring(30_000, 3_000), "too-large"),
                         (jpeg_bytes(0, size=5), "too-small")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # PIL's backstop, between 1x and 2x
            img = Image.open(io.BytesIO(data))
        with pytest.raises(SkipImage, match=reason):
            check_header(img)
    check_header(Image.open(io.BytesIO(jpeg_declaring(8_000, 8_000))))  # exactly MAX_PIXELS passes
    assert MAX_PIXELS == 64_000_000 and Image.MAX_IMAGE_PIXELS == MAX_PIXELS  # PIL's guard kept as a backstop


def test_no_program_is_run_on_an_image_file(tmp_path, monkeypatch):
    # An EPS file named .jpg: PIL would open it as EPS and hand it to Ghostscript on load.
    calls = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: calls.append(a) or Image.new("RGB", (32, 32)))
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\n0 0 moveto 32 32 lineto stroke\nshowpage\n%%EOF\n"
    with pytest.raises(SkipImage, match="not-an-image"):
        prepare_image(eps)
    root = folder_of(tmp_path / "faces", {"face.jpg": eps, "good.jpg": jpeg_bytes(1)})
    assert shard("folder", "--images", str(root), "--out", str(tmp_path / "out")) == 0
    assert skips(tmp_path / "out") == {"face.jpg": "not-an-image"} and calls == []


# ---------------------------------------------------------------------------------------------------- keys
def test_dedupe_gives_unique_keys_whatever_the_order():
    keys = ["x", "x", "x-dup2", "x-dup2", "x", "x-dup3", "y"]
    recs = [Record(key=k, source=str(i)) for i, k in enumerate(keys)]
    _dedupe_keys(recs)
    got = [r.key for r in recs]
    assert len(set(got)) == len(got)
    assert got[:4] == ["x", "x-dup4", "x-dup2", "x-dup2-dup2"]  # first holders keep their key; later ones move
    again = [Record(key=k, source=str(i)) for i, k in enumerate(keys)]
    _dedupe_keys(again)
    assert [r.key for r in again] == got


def test_colliding_names_give_unique_keys_plain_webdataset_reads(tmp_path):
    # x!.jpg cleans to x; x.jpg then became x-dup2, which x-dup2.jpg already was: two members named x-dup2.
    names = ["x!.jpg", "x-dup2.jpg", "x.jpg", "x-.png", "x .jpg", "y.jpg"]
    root = folder_of(tmp_path / "faces", {n: jpeg_bytes(i) for i, n in enumerate(names)})
    trees = []
    for w in ("1", "3"):
        out = tmp_path / f"out{w}"
        assert shard("folder", "--images", str(root), "--out", str(out), "--workers", w, "--shard-size", "4") == 0
        keys = pq.read_table(out / "index.parquet", columns=["key"]).column("key").to_pylist()
        assert len(keys) == len(set(keys)) == len(names)
        urls = [str(p) for p in sorted(out.glob("*.tar"))]
        read = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)]  # raises on a duplicate member
        assert sorted(read) == sorted(keys)
        trees.append(tree_bytes(out))
    assert trees[0] == trees[1]


# ---------------------------------------------------------------------------------------------------- labels
def test_csv_duplicate_rows_one_sample_conflicts_skipped(tmp_path):
    img = folder_of(tmp_path / "img", {"a.jpg": jpeg_bytes(1), "b.jpg": jpeg_bytes(2), "c.jpg": jpeg_bytes(3),
                                       "d.jpg": jpeg_bytes(4)})
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,AU1,AU2\n"
                        "a.jpg,1,0\n"   # 2
                        "b.jpg,1,1\n"   # 3
                        "a.jpg,1,0\n"   # 4: same image, same labels
                        "b.jpg,0,1\n"   # 5: same image, other labels
                        "./c.jpg,0,0\n"  # 6: one file under two names
                        "c.jpg,0,0\n"   # 7
                        "d.jpg,1,1\n")
    out = tmp_path / "out"
    assert shard("csv", "--images", str(img), "--labels", str(manifest), "--out", str(out)) == 0
    doc = json.loads((out / "dataset.json").read_text())
    assert doc["skipped_by_reason"] == {"conflicting-labels": 2, "duplicate-row": 2}
    conflicts = [x for x in doc["skipped"] if x["reason"] == "conflicting-labels"]
    assert [x["input"].split(" ")[0] for x in conflicts] == [f"{manifest}:3", f"{manifest}:5"]
    assert f"{manifest}:5" in conflicts[0]["detail"] and f"{manifest}:3" in conflicts[1]["detail"]
    got = samples_of(out)
    assert sorted(got) == ["a", "c", "d"] and got["a"]["json"]["occurrence"] == [1, 0]
    assert doc["samples"] == 3


def test_emotionet_rafdb_bp4d_disfa_images_listed_twice(tmp_path):
    img = folder_of(tmp_path / "emo", {"p.jpg": jpeg_bytes(1), "q.jpg": jpeg_bytes(2), "r.jpg": jpeg_bytes(3)})

    def row(url: str, v: str) -> str:  # two URLs and the 60 AU values of EmotioNet's label files
        return f"{url} http://y/z.jpg " + " ".join(v for _ in range(60))

    (tmp_path / "emo.txt").write_text("\n".join([row("http://a/p.jpg", "1"), row("http://a/p.jpg", "1"),
                                                 row("http://a/q.jpg", "0"), row("http://b/q.jpg", "1"),
                                                 row("http://a/r.jpg", "0")]) + "\n")
    out = tmp_path / "emo_out"
    assert shard("emotionet", "--images", str(img), "--labels", str(tmp_path / "emo.txt"), "--out", str(out)) == 0
    assert json.loads((out / "dataset.json").read_text())["skipped_by_reason"] == {"conflicting-labels": 2,
                                                                                   "duplicate-row": 1}
    assert sorted(samples_of(out)) == ["p", "r"]

    raf = folder_of(tmp_path / "raf", {"train_00001_aligned.jpg": jpeg_bytes(4),
                                       "test_0001_aligned.jpg": jpeg_bytes(5)})
    (tmp_path / "raf.txt").write_text("train_00001.jpg 4\ntest_0001.jpg 1\ntrain_00001.jpg 4\ntest_0001.jpg 2\n")
    out = tmp_path / "raf_out"
    assert shard("rafdb", "--images", str(raf), "--labels", str(tmp_path / "raf.txt"), "--out", str(out)) == 0
    assert json.loads((out / "dataset.json").read_text())["skipped_by_reason"] == {"conflicting-labels": 2,
                                                                                   "duplicate-row": 1}
    assert sorted(samples_of(out)) == ["train_00001"]

    root = tmp_path / "BP4D"
    write_bp4d(root, frames=2)
    csv = root / "AUCoding" / "AU_OCC" / "F001_T1.csv"
    header, first, second = csv.read_text().splitlines()
    flipped = first.split(",")
    flipped[1] = "0" if flipped[1] == "1" else "1"  # AU1 of the same frame, contradicted
    csv.write_text("\n".join([header, first, second, second, ",".join(flipped)]) + "\n")
    out = tmp_path / "bp4d_out"
    assert shard("bp4d", "--images", str(root), "--labels", str(root), "--out", str(out)) == 0
    doc = json.loads((out / "dataset.json").read_text())
    assert doc["skipped_by_reason"] == {"conflicting-labels": 2, "duplicate-row": 1}  # not label-without-image
    assert doc["samples"] == 6 * 2 * 2 - 1

    labels, frames = tmp_path / "disfa_labels", tmp_path / "disfa_frames"
    (labels / "SN001").mkdir(parents=True)
    (labels / "SN001" / "SN001_au1.txt").write_text("1,0\n2,3\n3,0\n2,3\n")  # frame 2 repeated, same value
    (labels / "SN001" / "SN001_au2.txt").write_text("1,0\n2,1\n3,0\n2,0\n")  # frame 2 contradicted
    folder_of(frames, {f"SN001/{f:05d}.jpg": jpeg_bytes(f) for f in (1, 2, 3)})
    out = tmp_path / "disfa_out"
    assert shard("disfa", "--images", str(frames), "--labels", str(labels), "--out", str(out), "--aus", "1,2",
                 "--frame-template", "{subject}/{frame:05d}.jpg") == 0
    doc = json.loads((out / "dataset.json").read_text())
    assert doc["skipped_by_reason"] == {"conflicting-labels": 1, "duplicate-row": 1}
    assert sorted(samples_of(out)) == ["SN001_000001", "SN001_000003"]


def test_manifest_paths_outside_images_are_refused(tmp_path):
    secret = tmp_path / "elsewhere" / "secret.jpg"
    secret.parent.mkdir()
    secret.write_bytes(jpeg_bytes(99))
    img = folder_of(tmp_path / "img", {"ok.jpg": jpeg_bytes(1), "sub/ok2.jpg": jpeg_bytes(2)})
    (img / "link.jpg").symlink_to(secret)
    (img / "sub" / "up").symlink_to(secret.parent, target_is_directory=True)
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,AU1\nok.jpg,1\n../elsewhere/secret.jpg,1\n" f"{secret},0\nlink.jpg,1\n"
                        "sub/up/secret.jpg,0\nsub/../ok.jpg,1\nsub/ok2.jpg,0\n")
    out = tmp_path / "out"
    assert shard("csv", "--images", str(img), "--labels", str(manifest), "--out", str(out)) == 0
    doc = json.loads((out / "dataset.json").read_text())
    assert doc["skipped_by_reason"] == {"duplicate-row": 1, "outside-images": 4}
    got = samples_of(out)
    assert sorted(got) == ["ok", "sub-ok2"] and all(s["jpg"] != secret.read_bytes() for s in got.values())

    # EmotioNet finds images by name under --images: a symlink is the way out.
    lines = [f"http://a/{n} http://b/{n} " + " ".join("1" for _ in range(60)) for n in ("ok.jpg", "link.jpg")]
    (tmp_path / "emo.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "emo"
    assert shard("emotionet", "--images", str(img), "--labels", str(tmp_path / "emo.txt"), "--out", str(out)) == 0
    assert json.loads((out / "dataset.json").read_text())["skipped_by_reason"] == {"outside-images": 1}
    assert sorted(samples_of(out)) == ["ok"]


# ---------------------------------------------------------------------------------------------------- --images / --out
def test_missing_images_and_unusable_out_are_one_line_errors(tmp_path, capsys):
    img = folder_of(tmp_path / "img", {"a.jpg": jpeg_bytes(1)})
    (tmp_path / "m.csv").write_text("image,AU1\na.jpg,1\n")
    assert shard("csv", "--images", str(tmp_path / "absent"), "--labels", str(tmp_path / "m.csv"),
                 "--out", str(tmp_path / "o")) == 2
    line = one_error_line(capsys)
    assert "--images" in line and "absent" in line and "not a directory" in line

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    for out in (blocker / "out", blocker / "deeper" / "out"):
        assert shard("folder", "--images", str(img), "--out", str(out)) == 2
        line = one_error_line(capsys)
        assert f"--out {out}" in line and str(blocker) in line
    assert blocker.read_text() == "not a directory"


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux sysfs")
def test_out_the_kernel_refuses_even_root(tmp_path, capsys):
    # Root ignores permission bits; sysfs refuses a new directory to everyone (EPERM, or EROFS where read-only).
    img = folder_of(tmp_path / "img", {"a.jpg": jpeg_bytes(1)})
    out = Path("/sys/kernel/ssau-test-out")
    assert shard("folder", "--images", str(img), "--out", str(out)) == 2
    line = one_error_line(capsys)
    assert f"--out {out}" in line and not out.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
def test_out_in_a_read_only_directory(tmp_path, capsys):
    img = folder_of(tmp_path / "img", {"a.jpg": jpeg_bytes(1)})
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert shard("folder", "--images", str(img), "--out", str(locked / "out")) == 2
        assert "not writable" in one_error_line(capsys) and not (locked / "out").exists()
    finally:
        locked.chmod(0o700)


def test_other_commands_turn_os_errors_into_one_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["synth", "--out", str(blocker / "syn"), "--subjects", "1", "--tasks", "1", "--frames", "1",
                 "--expression-images", "1", "--unlabelled", "1", "--size", "16", "--quiet"]) == 2
    assert str(blocker) in one_error_line(capsys)


def _faces(root: Path, n: int = 12) -> Path:
    return folder_of(root, {f"{i:03d}.png": jpeg_bytes(i, fmt="PNG") for i in range(n)})


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds the file behind an fd in /proc")
@pytest.mark.parametrize("workers", ["1", "3"])
def test_disk_full_mid_run_stops_with_one_line_and_resumes(tmp_path, monkeypatch, capsys, workers):
    root = _faces(tmp_path / "faces")
    common = ["folder", "--images", str(root), "--shard-size", "2", "--workers", workers]
    ref = tmp_path / "ref"
    assert shard(*common, "--out", str(ref)) == 0
    real_fsync = os.fsync

    def fsync(fd):
        if "folder-000003.tar" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    out = tmp_path / "out"
    monkeypatch.setattr(os, "fsync", fsync)
    assert shard(*common, "--out", str(out)) == 2
    line = one_error_line(capsys)
    assert f"--out {out}: No space left on device" in line and "resumes" in line
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]  # nothing half-written ...
    assert not (out / "dataset.json").exists() and not (out / "index.parquet").exists()
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert shard(*common, "--out", str(out)) == 0  # ... and the same command finishes the job
    assert tree_bytes(out) == tree_bytes(ref)


@pytest.mark.parametrize("workers", ["1", "3"])
def test_a_worker_that_raises_stops_the_run_with_one_line(tmp_path, monkeypatch, capsys, workers):
    import ssau.shard.write as shardwrite

    real = shardwrite.parquet_bytes

    def parquet_bytes(rows, scan):
        if rows and rows[0]["shard"] == "folder-000002.tar":
            raise RuntimeError("a bug in the writer")
        return real(rows, scan)

    monkeypatch.setattr(shardwrite, "parquet_bytes", parquet_bytes)
    out = tmp_path / "out"
    assert shard("folder", "--images", str(_faces(tmp_path / "faces")), "--out", str(out), "--shard-size", "2",
                 "--workers", workers) == 2
    line = one_error_line(capsys)
    assert "writing folder-000002.tar failed: RuntimeError: a bug in the writer" in line
    assert "a bug in the writer" in (out / ".ssau" / "error.txt").read_text()  # the traceback, for the bug report
    assert not (out / "dataset.json").exists()


def test_a_killed_worker_stops_the_run_instead_of_hanging(tmp_path):
    # multiprocessing.Pool waited forever for the task of a worker the OOM killer took; run in a child, bounded.
    root = _faces(tmp_path / "faces")
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        import ssau.shard.write as shardwrite
        from ssau.cli import main
        real = shardwrite.parquet_bytes
        def parquet_bytes(rows, scan):
            if rows and rows[0]["shard"] == "folder-000002.tar":
                os.kill(os.getpid(), signal.SIGKILL)
            return real(rows, scan)
        shardwrite.parquet_bytes = parquet_bytes
        sys.exit(main(["shard", "folder", "--images", {str(root)!r}, "--out", {str(out)!r}, "--shard-size", "2",
                       "--workers", "3", "--quiet"]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, cwd=ROOT)
    try:
        _, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("ssau shard hung after a worker was killed")
    lines = err.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "worker process died" in lines[0], err
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    res = subprocess.run([sys.executable, "-m", "ssau", "shard", "folder", "--images", str(root), "--out", str(out),
                          "--shard-size", "2", "--workers", "3", "--quiet"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert res.returncode == 0 and "verified and kept" in res.stdout, res.stderr
    assert len(pq.read_table(out / "index.parquet")) == 12


def _slow_shard_run(tmp_path: Path) -> tuple[subprocess.Popen, list[int]]:
    """`ssau shard --workers 3` in a child whose workers each sit in a long shard; -> (child, worker pids)."""
    root = _faces(tmp_path / "faces")
    out, marks = tmp_path / "out", tmp_path / "marks"
    marks.mkdir()
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        # As under a terminal: a suite started in the background (`cmd &`, nohup, some CI runners) hands its
        # children SIGINT ignored, and Python then installs no KeyboardInterrupt handler at all.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        import ssau.shard.write as shardwrite
        from ssau.cli import main
        def parquet_bytes(rows, scan):
            open(os.path.join({str(marks)!r}, str(os.getpid())), "w").close()
            time.sleep(120)  # a shard that takes long
        shardwrite.parquet_bytes = parquet_bytes
        sys.exit(main(["shard", "folder", "--images", {str(root)!r}, "--out", {str(out)!r}, "--shard-size", "2",
                       "--workers", "3", "--quiet"]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=ROOT)
    deadline = time.time() + 60
    while len(list(marks.iterdir())) < 3 and time.time() < deadline:
        time.sleep(0.05)
    pids = [int(p.name) for p in marks.iterdir()]
    if len(pids) < 3:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the workers never started")
    return proc, pids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_ctrl_c_stops_the_pool_at_once(tmp_path):
    # Interrupted, the pool waits for nothing: shards in flight are cut short (the resume rewrites them).
    proc, pids = _slow_shard_run(tmp_path)
    try:
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends
        proc.wait(timeout=30)  # the run itself; then its workers (which hold its stderr too) must be gone
        deadline = time.time() + 15
        while any(_alive(p) for p in pids) and time.time() < deadline:
            time.sleep(0.05)
        assert not [p for p in pids if _alive(p)], "workers outlived an interrupted run"
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130 and err.strip().splitlines() == ["ssau: interrupted"], err  # no worker tracebacks
    assert not [p for p in (tmp_path / "out").rglob("*") if ".tmp-" in p.name]


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads process states from /proc")
def test_workers_of_a_killed_run_exit(tmp_path):
    # kill -9 of the main process: its workers must not go on writing beside the resumed run, nor linger forever.
    proc, pids = _slow_shard_run(tmp_path)
    try:
        proc.kill()
        proc.wait()  # not communicate(): orphans would hold its stderr open
        proc.stderr.close()
        deadline = time.time() + 20
        while any(_alive(p) for p in pids) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids), "orphaned shard workers still running"
    finally:
        for p in pids:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def test_absurd_settings_are_one_line_errors(tmp_path, capsys):
    img = folder_of(tmp_path / "img", {"a.jpg": jpeg_bytes(1)})
    common = ["folder", "--images", str(img), "--out", str(tmp_path / "o")]
    for flag, value in (("--resize", "1"), ("--resize", "0"), ("--quality", "101"), ("--quality", "0"),
                        ("--workers", "0"), ("--active-threshold", "nan"), ("--active-threshold", "-1")):
        assert shard(*common, flag, value) == 2, (flag, value)
        assert flag in one_error_line(capsys)
    assert not (tmp_path / "o").exists()
