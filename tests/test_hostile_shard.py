"""`ssau shard` against hostile inputs (issue 25): FIFOs, label files in other encodings, numbers of 400 digits, JSON
nested without bound, files of one 20 MB line.

Every input is built here. A FIFO blocks a plain ``open()`` for good, so the runs that meet one go in a subprocess
bounded by a timeout (a hang fails the test instead of the suite). Each test asserts what the run left: the samples
sharded, the skip counted in dataset.json, the one error line naming the file (and the byte), no shard written.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from corpora import jpeg_bytes, write_bp4d
from helpers import one_error_line, openface_header, openface_row, samples_of, shard, tree_bytes, write_csv

from ssau.shard.landmarks import LandmarkSource, _read, attach_landmarks, landmark_rows, read_landmark_csv
from ssau.shard.records import Record, Scan

ROOT = Path(__file__).resolve().parents[1]


def shard_bounded(*args: str, timeout: float = 60) -> tuple[int, str]:
    """(exit code, stderr) of ``ssau shard ...`` in its own process group, killed with it after ``timeout`` s."""
    p = subprocess.Popen([sys.executable, "-m", "ssau", "shard", *args, "--quiet"], cwd=ROOT, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the workers too: one of them may be the one blocked
        p.communicate()
        pytest.fail(f"ssau shard {' '.join(args)} still running after {timeout} s: blocked on a FIFO")
    return p.returncode, err


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err[-3000:]
    return err.strip().splitlines()


def nothing_written(out: Path) -> bool:
    return not out.exists() or not any(out.rglob("*"))


# ---------------------------------------------------------------------------------------------------- FIFOs
def test_a_fifo_among_the_images_and_as_a_sidecar_is_skipped_and_counted(tmp_path):
    root = tmp_path / "faces"
    root.mkdir()
    for i in range(3):
        (root / f"good{i}.jpg").write_bytes(jpeg_bytes(i))
    os.mkfifo(root / "fifo.jpg")  # a plain open() waits for a writer that never comes
    os.mkfifo(root / "good1.jpg.json")  # a sidecar that is a FIFO: the image keeps going, without it
    out = tmp_path / "out"
    rc, err = shard_bounded("folder", "--images", str(root), "--out", str(out))
    assert rc == 0, err
    doc = json.loads((out / "dataset.json").read_text())
    assert doc["samples"] == 3 and sorted(samples_of(out)) == ["good0", "good1", "good2"]
    assert doc["skipped_by_reason"] == {"bad-sidecar-ignored": 1, "not-a-regular-file": 1}
    fifo = next(x for x in doc["skipped"] if x["reason"] == "not-a-regular-file")
    assert fifo["input"].endswith("fifo.jpg") and fifo["detail"] == "a FIFO"


@pytest.mark.parametrize("where", ["labels", "landmarks"])
def test_a_fifo_in_place_of_a_label_or_landmark_csv_is_one_line(tmp_path, where):
    root = tmp_path / "BP4D"
    write_bp4d(root, frames=2)
    extra = []
    if where == "labels":
        fifo = root / "AUCoding" / "AU_OCC" / "F001_T1.csv"
        fifo.unlink()
    else:
        (root / "lm").mkdir()
        fifo = root / "lm" / "F001_T1.csv"
        extra = ["--landmarks", str(root / "lm")]
    os.mkfifo(fifo)
    out = tmp_path / "out"
    rc, err = shard_bounded("bp4d", "--images", str(root), "--labels", str(root), "--out", str(out), *extra)
    lines = error_lines(err)
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("ssau: error: "), err
    assert str(fifo) in lines[0] and "FIFO" in lines[0]
    assert nothing_written(out)


# ---------------------------------------------------------------------------------------------------- encodings
def _manifest(tmp: Path) -> tuple[list[str], Path]:
    img = tmp / "img"
    img.mkdir()
    for name in ("a", "b"):
        (img / f"{name}.jpg").write_bytes(jpeg_bytes(len(name)))
    return ["--images", str(img)], tmp / "labels.csv"


CASES = {  # format -> a label file of it, as text (Latin-1 shows in the ë)
    "csv": "image,subject,AU1\na.jpg,Zoë,1\nb.jpg,Zoë,0\n",
    "rafdb": "train_00001.jpg 1\ntest_0001.jpg 2\n",
    "bp4d": "0,1,2\n1,0,1\n2,1,1\n",
}


@pytest.mark.parametrize("fmt,encoding", [("csv", "latin-1"), ("csv", "utf-16"), ("rafdb", "utf-16-le"),
                                          ("bp4d", "utf-16"), ("bp4d", "random")])
def test_label_files_that_are_not_utf8_are_one_line_naming_the_byte(tmp_path, capsys, fmt, encoding):
    text = CASES[fmt]
    if encoding == "random":
        data = text.encode() + random.Random(0).randbytes(4096)
    else:
        data = text.encode(encoding)
    args, labels = _manifest(tmp_path)
    if fmt == "bp4d":
        write_bp4d(tmp_path / "BP4D", frames=2)
        labels = tmp_path / "BP4D" / "AUCoding" / "AU_OCC" / "F001_T1.csv"
        args = ["--images", str(tmp_path / "BP4D"), "--labels", str(tmp_path / "BP4D")]
    else:
        args += ["--labels", str(labels)]
    labels.write_bytes(data)
    # where UTF-8 decoding first fails: Latin-1's ë, UTF-16's byte-order mark, UTF-16-LE's first NUL
    byte = {"latin-1": data.find(b"\xeb"), "utf-16": 0, "utf-16-le": 1}.get(encoding)
    out = tmp_path / "out"
    assert shard(fmt, *args, "--out", str(out)) == 2
    line = one_error_line(capsys)
    assert str(labels) in line and "not UTF-8" in line, line
    assert f"(byte {byte}:" in line if byte is not None else "(byte " in line, line
    assert nothing_written(out)


def test_utf8_with_a_byte_order_mark_and_crlf_is_read(tmp_path):
    args, labels = _manifest(tmp_path)
    labels.write_bytes(b"\xef\xbb\xbf" + CASES["csv"].replace("\n", "\r\n").encode())
    out = tmp_path / "out"
    assert shard("csv", *args, "--labels", str(labels), "--out", str(out)) == 0
    got = samples_of(out)
    assert got["a"]["json"]["subject"] == "Zoë" and got["a"]["json"]["occurrence"] == [1]


# ---------------------------------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("fmt", ["bp4d", "csv", "disfa"])
def test_a_400_digit_frame_number_is_one_line(tmp_path, capsys, fmt):
    huge = "9" * 400
    if fmt == "bp4d":
        write_bp4d(tmp_path / "BP4D", frames=2)
        labels = tmp_path / "BP4D" / "AUCoding" / "AU_OCC" / "F001_T1.csv"
        labels.write_text(labels.read_text() + f"{huge}," + ",".join(["0"] * 13) + "\n")
        args = ["--images", str(tmp_path / "BP4D"), "--labels", str(tmp_path / "BP4D")]
    elif fmt == "csv":
        args, labels = _manifest(tmp_path)
        labels.write_text(f"image,frame,AU1\na.jpg,1,1\nb.jpg,{huge},0\n")
        args += ["--labels", str(labels)]
    else:
        (tmp_path / "img").mkdir()
        labels = tmp_path / "labels" / "SN001" / "SN001_au1.txt"
        labels.parent.mkdir(parents=True)
        labels.write_text(f"1,0\n{huge},2\n")
        args = ["--images", str(tmp_path / "img"), "--labels", str(tmp_path / "labels"), "--frame-template",
                "{subject}/{frame}.jpg"]
    assert shard(fmt, *args, "--out", str(tmp_path / "out")) == 2
    line = one_error_line(capsys)
    assert f"{labels}:" in line and "400 digits" in line and len(line) < 300, line


# ---------------------------------------------------------------------------------------------------- deep JSON
DEEP = "[" * 100_000 + "]" * 100_000


def _faces(tmp: Path) -> Path:
    root = tmp / "faces"
    root.mkdir()
    for i in range(2):
        (root / f"f{i}.jpg").write_bytes(jpeg_bytes(i))
    return root


def test_a_sidecar_nested_100000_deep_is_refused_in_one_line_and_counted(tmp_path):
    root = _faces(tmp_path)
    (root / "f0.jpg.json").write_text(DEEP)  # its image is sharded without it
    out = tmp_path / "out"
    assert shard("folder", "--images", str(root), "--out", str(out)) == 0
    doc = json.loads((out / "dataset.json").read_text())
    assert doc["samples"] == 2 and doc["skipped_by_reason"] == {"bad-sidecar-ignored": 1}
    assert "nested too deeply" in doc["skipped"][0]["input"]  # one line, not the parser's message


def test_state_files_in_out_nested_100000_deep_are_rewritten_or_one_line(tmp_path, capsys):
    root = _faces(tmp_path)
    out = tmp_path / "out"
    args = ["folder", "--images", str(root), "--out", str(out), "--shard-size", "1"]
    assert shard(*args) == 0
    first = tree_bytes(out)
    # a shard's stats file: not a finished shard, so it is written again, the same
    (out / ".ssau" / "folder-000000.tar.json").write_text(DEEP)
    assert shard(*args) == 0
    assert tree_bytes(out) == first
    # --out's settings file: one line that says how to go on, and --overwrite does
    (out / ".ssau" / "settings.json").write_text(DEEP)
    assert shard(*args) == 2
    line = one_error_line(capsys)
    assert "settings.json" in line and "nested too deeply" in line and "--overwrite" in line
    assert shard(*args, "--overwrite") == 0
    assert tree_bytes(out) == first


# ---------------------------------------------------------------------------------------------------- memory
def test_a_label_file_of_one_20mb_line_is_one_line_in_bounded_memory(tmp_path, capsys):
    write_bp4d(tmp_path / "BP4D", frames=2)
    labels = tmp_path / "BP4D" / "AUCoding" / "AU_OCC" / "F001_T1.csv"
    labels.write_bytes(b"0" + b",x" * (10 << 20))  # csv.reader over the whole line held 8 bytes per field
    tracemalloc.start()
    try:
        rc = shard("bp4d", "--images", str(tmp_path / "BP4D"), "--labels", str(tmp_path / "BP4D"), "--out",
                   str(tmp_path / "out"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rc == 2
    line = one_error_line(capsys)
    assert f"{labels}:1:" in line and "a line of over" in line
    assert peak < 12 << 20, f"{peak >> 20} MiB traced for a 20 MiB file"  # a chunk and a line, not the file


def _openface_file(path: Path, n: int, seed: int = 0) -> dict[int, list[list[float]] | None]:
    """An OpenFace CSV of ``n`` frames (some failed, some with two faces, some broken) and what it says per frame."""
    rng = np.random.default_rng(seed)
    rows, want = [], {}
    for f in range(1, n + 1):
        pts = rng.uniform(0, 400, (68, 2))
        exact = [[float(f"{x:.2f}"), float(f"{y:.2f}")] for x, y in pts]  # what the text holds
        if f % 7 == 0:
            rows.append(openface_row(f, pts, success=0))
            want[f] = None
        elif f % 5 == 0:  # two faces: the more confident counts
            rows += [openface_row(f, pts + 50, conf=0.85, face=0), openface_row(f, pts, conf=0.95, face=1)]
            want[f] = exact
        else:
            rows.append(openface_row(f, pts))
            want[f] = exact
        if f % 11 == 0:
            rows.append(openface_row(f + 10_000, pts)[:-3])  # too few fields: a bad row, counted
    write_csv(path, openface_header(), rows)
    return want


def test_the_streaming_landmark_parser_reads_what_the_file_says(tmp_path):
    path = tmp_path / "F001_T1.csv"
    want = _openface_file(path, 60)
    table, problems = read_landmark_csv(path)
    assert table == want and list(table) == list(want)  # values equal, in the file's order
    assert problems == {"bad-landmark-row": 60 // 11}
    rows = landmark_rows(path)
    assert set(rows) == set(want) and rows[5][0] == 0.95 and rows[7][1] is None
    assert all(np.array_equal(rows[f][1], want[f]) for f in want if want[f] is not None)

    # attach_landmarks keeps only the frames its records ask for, as float32
    records = [Record(key=f"k{f}", source=str(tmp_path / f"{f:04d}.jpg"), subject="F001", sequence="T1", frame=f)
               for f in (3, 5, 7, 500)]
    scan = Scan("bp4d", (), records, [], labelled=True)
    counts = attach_landmarks(scan, LandmarkSource(tmp_path))
    assert counts["matched"] == 2 and counts["tracking-failed"] == 1 and counts["frame-not-in-file"] == 1
    assert counts["bad_rows"] == 60 // 11
    for r in records[:2]:
        assert r.points.dtype == np.float32 and r.points.shape == (68, 2)
        assert np.array_equal(r.points, np.asarray(want[r.frame], dtype=np.float32))
    assert records[2].points is None and records[3].points is None


def test_landmark_parsing_memory_follows_the_frames_kept_not_the_file(tmp_path):
    path = tmp_path / "big.csv"
    _openface_file(path, 4000)  # 7 MiB of text
    size = path.stat().st_size
    tracemalloc.start()
    try:
        one, _ = _read(path, "frame", 0.8, keep={3})
        kept = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        full, _ = _read(path, "frame", 0.8, typecode="f")
        whole = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert list(one) == [3] and len(full) == 4000
    assert kept < 2 << 20, f"{kept >> 20} MiB traced keeping one frame of a {size >> 20} MiB file"
    assert whole < size, f"{whole >> 20} MiB traced for a {size >> 20} MiB file"  # lists of floats: 8 times it
