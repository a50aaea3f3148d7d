"""Faces, not frames (issue 11): landmark files as users have them, alignment, the detector fallback, flow at shard
time, and the DISFA / RAF-DB layouts that used to fail quietly."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import (FACE_SUBJECTS, bp4d_with_landmarks, face_frame, one_error_line, openface_header, openface_row,
                     samples_of, save, tree_bytes, write_csv)
from PIL import Image

from ssau.cli import main
from ssau.errors import LabelError
from ssau.faces.align import detect_face, landmark_matrix, transform, warp
from ssau.faces.template import MEAN_5, MEAN_68, placed
from ssau.shard.landmarks import read_landmark_csv

SUBJECTS = FACE_SUBJECTS  # one per standard BP4D fold


# ---------------------------------------------------------------------------------------------------- landmark files
def test_openface_csv_rows_success_confidence_faces_and_3d_columns(tmp_path):
    pts = np.arange(136, dtype=float).reshape(68, 2) + 0.25
    rows = [openface_row(1, pts), openface_row(2, pts + 1, success=0), openface_row(3, pts + 2, conf=0.3),
            openface_row(4, None), openface_row(5, pts + 4, conf=0.9), openface_row(5, pts + 5, conf=0.95, face=1)]
    for spaces in (True, False):
        path = tmp_path / f"seq{spaces}.csv"
        write_csv(path, openface_header(spaces), rows, sep=", " if spaces else ",")
        table, problems = read_landmark_csv(path)
        assert table[1] == pts.tolist()  # x_/y_, never the 3D X_ columns
        assert table[2] is None and table[3] is None and table[4] is None  # success 0, confidence 0.3, all zeros
        assert table[5] == (pts + 5).tolist()  # two faces in frame 5: the more confident
        assert not problems
    table, _ = read_landmark_csv(tmp_path / "seqTrue.csv", min_confidence=0.2)
    assert table[3] == (pts + 2).tolist()


def test_plain_csvs_interleaved_grouped_and_x0_names(tmp_path):
    pts = np.random.default_rng(0).uniform(0, 100, (68, 2)).round(2)
    inter = ["Frame"] + [n for i in range(68) for n in (f"x{i}", f"y{i}")]
    write_csv(tmp_path / "a.csv", inter, [["7"] + [f"{v}" for p in pts for v in p]], sep=",")
    grouped = ["frame"] + [f"x_{i}" for i in range(68)] + [f"y_{i}" for i in range(68)]
    write_csv(tmp_path / "b.csv", grouped, [["7"] + [f"{v}" for v in pts[:, 0]] + [f"{v}" for v in pts[:, 1]],
                                            ["8"] + ["nan"] * 136, ["x"] * 137], sep=",")
    assert read_landmark_csv(tmp_path / "a.csv")[0] == {7: pts.tolist()}
    table, problems = read_landmark_csv(tmp_path / "b.csv")
    assert table == {7: pts.tolist()} and problems["bad-landmark-row"] == 2  # counted, not fatal
    renamed = ["img_no"] + grouped[1:]
    write_csv(tmp_path / "c.csv", renamed, [["3"] + [f"{v}" for v in pts[:, 0]] + [f"{v}" for v in pts[:, 1]]], ",")
    assert read_landmark_csv(tmp_path / "c.csv", frame_column="img_no")[0] == {3: pts.tolist()}


def test_landmark_files_that_are_not_landmarks_are_one_line(tmp_path):
    write_csv(tmp_path / "few.csv", ["frame"] + [f"x_{i}" for i in range(5)], [["1"] * 6], ",")
    (tmp_path / "latin1.csv").write_bytes(", ".join(openface_header()).encode() + b"\n1, \xe9\xe9\n")
    with pytest.raises(LabelError, match="no 68 landmark columns"):
        read_landmark_csv(tmp_path / "few.csv")
    with pytest.raises(LabelError, match="not UTF-8"):
        read_landmark_csv(tmp_path / "latin1.csv")


# ---------------------------------------------------------------------------------------------------- alignment
@pytest.mark.parametrize("seed", range(5))
def test_alignment_recovers_a_known_similarity(seed):
    rng = np.random.default_rng(seed)
    size, margin = 64, 0.15
    # The template as a face in a 240 px frame: rotated, scaled and shifted at random.
    pose = cv2.getRotationMatrix2D(((size - 1) / 2, (size - 1) / 2), rng.uniform(-30, 30), rng.uniform(1.2, 3.0))
    pose[:, 2] += rng.uniform(60, 110, 2)
    truth = placed(MEAN_68, size, margin)
    frame_pts = transform(truth, pose)
    assert frame_pts.min() > 0 and frame_pts.max() < 240
    for use in ("five", "all"):
        m = landmark_matrix(frame_pts + rng.normal(0, 0.05, frame_pts.shape), size, margin, use)
        eyes = transform(frame_pts, m)[[36, 39, 42, 45]]
        assert np.abs(eyes - truth[[36, 39, 42, 45]]).max() < 1.0
    # And in pixels: dots drawn at the two eye centres of a frame land on the template's eye centres in the crop.
    frame = np.zeros((240, 240, 3), np.uint8)
    eye_src = [frame_pts[36:42].mean(0), frame_pts[42:48].mean(0)]
    for x, y in eye_src:
        cv2.circle(frame, (int(round(x * 16)), int(round(y * 16))), 16 * 2, (255, 255, 255), -1, cv2.LINE_AA, 4)
    crop = warp(frame, landmark_matrix(frame_pts, size, margin), size)[..., 0].astype(float)
    for side, (ex, ey) in zip((slice(0, size // 2), slice(size // 2, size)), placed(MEAN_5, size, margin)[:2]):
        part = np.zeros_like(crop)
        part[:, side] = crop[:, side]
        yy, xx = np.mgrid[:size, :size]
        cx, cy = (part * xx).sum() / part.sum(), (part * yy).sum() / part.sum()
        assert math.hypot(cx - ex, cy - ey) < 1.0, (cx, cy, ex, ey)


def test_detector_finds_a_rendered_face_and_not_a_blank():
    rgb, pts = face_frame(3)
    box = detect_face(rgb)
    assert box is not None
    x, y, w, h = box
    nose = pts[30]
    assert x < nose[0] < x + w and y < nose[1] < y + h and 25 < w < 90
    assert detect_face(np.full((120, 96, 3), 128, np.uint8)) is None


def test_folder_aligned_by_detector_box_sidecar_and_no_face(tmp_path, capsys):
    root = tmp_path / "photos"
    save(root / "a.jpg", face_frame(1)[0])
    save(root / "blank.jpg", np.full((120, 96, 3), 90, np.uint8))
    rgb, pts = face_frame(2)
    save(root / "lm.jpg", rgb)
    (root / "lm.jpg.json").write_text(json.dumps({"landmarks": {str(i): {"x": p[0], "y": p[1]} for i, p in enumerate(pts)}}))
    save(root / "box.jpg", np.full((120, 96, 3), 90, np.uint8))
    (root / "box.jpg.json").write_text(json.dumps({"bounding_box": {"x": 20, "y": 30, "width": 40, "height": 40}}))
    out = tmp_path / "out"
    assert main(["shard", "folder", "--images", str(root), "--out", str(out), "--align", "48", "--detector", "haar",
                 "--quiet"]) == 0
    doc = json.loads((out / "dataset.json").read_text())
    assert doc["skipped_by_reason"] == {"no-face": 1} and doc["samples"] == 3
    assert doc["faces"]["aligned_by"] == {"bbox": 1, "detector": 1, "landmarks": 1}
    assert doc["faces"]["align"]["size"] == 48 and len(doc["faces"]["align"]["template"]) == 68
    got = samples_of(out)
    assert {k: v["json"]["aligned"] for k, v in got.items()} == {"a": "detector", "box": "bbox", "lm": "landmarks"}
    lm = np.array(got["lm"]["json"]["landmarks"])
    assert np.abs(lm[[36, 45, 30]] - placed(MEAN_68, 48)[[36, 45, 30]]).max() < 3  # five-point fit, not exact
    assert Image.open(io.BytesIO(got["a"]["jpg"])).size == (48, 48)
    assert "aligned to 48 px" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------- BP4D + CSVs
def test_bp4d_openface_landmarks_aligned_counted_and_required(tmp_path, capsys):
    root = bp4d_with_landmarks(tmp_path / "BP4D", frames=4, failed={("F001", "T1", 2)})
    common = ["shard", "bp4d", "--images", str(root), "--labels", str(root), "--landmarks", str(root / "landmarks"),
              "--folds", "bp4d", "--detector", "haar", "--quiet"]
    out = tmp_path / "pos"
    assert main([*common, "--out", str(out), "--landmark-frames", "position", "--align", "40"]) == 0
    doc = json.loads((out / "dataset.json").read_text())
    lm = doc["faces"]["landmarks"]
    assert lm["files"] == 6 and lm["matched"] == 23 and lm["tracking-failed"] == 1
    assert lm["stored"] == 23 and lm["no-landmarks"] == 1  # kept and counted
    assert doc["faces"]["aligned_by"] == {"detector": 1, "landmarks": 23}
    got = samples_of(out)
    stored = np.array(got["F001_T1_000100"]["json"]["landmarks"])
    assert np.abs(stored[[36, 45]] - placed(MEAN_68, 40)[[36, 45]]).max() < 2.5
    idx = pq.read_table(out / "index.parquet").to_pylist()
    row = next(r for r in idx if r["key"] == "F001_T1_000100")
    assert row["aligned"] == "landmarks" and np.allclose(row["landmarks_x"], stored[:, 0], atol=1e-3)
    assert next(r for r in idx if r["key"] == "F001_T1_000101")["landmarks_x"] is None

    # The same CSVs read as frame numbers match nothing: every frame counted, none silently misplaced.
    out = tmp_path / "num"
    assert main([*common, "--out", str(out)]) == 0
    lm = json.loads((out / "dataset.json").read_text())["faces"]["landmarks"]
    assert lm["frame-not-in-file"] == 24 and lm["stored"] == 0

    out = tmp_path / "req"
    assert main([*common, "--out", str(out), "--landmark-frames", "position", "--require-landmarks"]) == 0
    doc = json.loads((out / "dataset.json").read_text())
    assert doc["samples"] == 23 and doc["skipped_by_reason"]["no-landmarks"] == 1
    # Without --align the frame is stored as it is, landmarks in its own pixels.
    got = samples_of(out)
    _, pts = face_frame(0, t=0)
    assert np.abs(np.array(got["F001_T1_000100"]["json"]["landmarks"]) - pts).max() < 0.01


def test_flow_and_alignment_byte_identical_for_1_and_3_workers(tmp_path):
    root = bp4d_with_landmarks(tmp_path / "BP4D", frames=6)
    outs = []
    for workers in ("1", "3"):
        out = tmp_path / f"w{workers}"
        assert main(["shard", "bp4d", "--images", str(root), "--labels", str(root), "--landmarks",
                     str(root / "landmarks"), "--landmark-frames", "position", "--align", "32", "--flow", "3",
                     "--flow-size", "16", "--shard-size", "5", "--workers", workers, "--out", str(out),
                     "--quiet"]) == 0
        outs.append(tree_bytes(out))
    assert outs[0] == outs[1]
    out = tmp_path / "w3"
    doc = json.loads((out / "dataset.json").read_text())
    assert doc["faces"]["flow"]["pairs"] == 6 * 3  # frames t with t+3 in each 6-frame sequence
    got = samples_of(out)
    first = got["F001_T1_000100"]
    assert first["json"]["flow_partner"] == "F001_T1_000103" and "flow.npy" in first
    flow = np.load(io.BytesIO(first["flow.npy"]), allow_pickle=False)
    assert flow.dtype == np.float16 and flow.shape == (2, 16, 16)
    assert "flow.npy" not in got["F001_T1_000103"]
    has = {r["key"]: r["has_flow"] for r in pq.read_table(out / "index.parquet").to_pylist()}
    assert sum(has.values()) == 18 and has["F001_T1_000102"] and not has["F001_T1_000105"]


def test_flow_sees_the_motion_alignment_leaves(tmp_path):
    # The head moves 1 px per frame; the face is aligned by landmarks that move with it, and frame t+3 is warped
    # with frame t's matrix: in the crop the face moved 3 px x (32/face scale), the background the other way.
    root = bp4d_with_landmarks(tmp_path / "BP4D", frames=4)
    out = tmp_path / "noalign"
    assert main(["shard", "bp4d", "--images", str(root), "--labels", str(root), "--flow", "3", "--flow-size", "48",
                 "--out", str(out), "--quiet"]) == 0
    flow = np.load(io.BytesIO(samples_of(out)["F001_T1_000100"]["flow.npy"]), allow_pickle=False).astype(float)
    # Unaligned frames (96 px wide, grid 48): the face region moved +3 px in x, 0 in y.
    face_u = flow[0, 12:36, 16:32]
    assert abs(np.median(face_u) - 3.0) < 0.8 and abs(np.median(flow[1, 12:36, 16:32])) < 0.5


def test_resume_after_kill_9_with_flow(tmp_path):
    root = bp4d_with_landmarks(tmp_path / "BP4D", frames=12)
    args = ["-m", "ssau", "shard", "bp4d", "--images", str(root), "--labels", str(root), "--landmarks",
            str(root / "landmarks"), "--landmark-frames", "position", "--align", "40", "--flow", "3",
            "--shard-size", "3", "--workers", "2", "--quiet"]
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, *args, "--out", str(ref)], check=True, timeout=300)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, *args, "--out", str(out)])
    deadline = time.time() + 120
    while len(list((out / ".ssau").glob("*.tar.json"))) < 5 and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for child in subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split():
        os.kill(int(child), signal.SIGKILL)
    assert not (out / "dataset.json").exists(), "killed too late to test resume"
    res = subprocess.run([sys.executable, *args, "--out", str(out)], capture_output=True, text=True, check=True,
                         timeout=300)
    assert int(res.stdout.split("written, ")[1].split(" verified")[0]) >= 5
    assert tree_bytes(out) == tree_bytes(ref)
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


# ---------------------------------------------------------------------------------------------------- layouts
def test_disfa_zero_based_frames_index_field_warning_and_unknown_field(tmp_path, capsys):
    labels, frames = tmp_path / "ActionUnit_Labels", tmp_path / "frames"
    for sn in ("SN001", "SN002"):
        (labels / sn).mkdir(parents=True)
        for au in (1, 2, 4, 6, 9, 12, 25, 26):
            (labels / sn / f"{sn}_au{au}.txt").write_text("".join(f"{f},{f % 6}\n" for f in range(1, 6)))
        for i in range(5):  # 0-based extraction: 0.jpg is label frame 1, its grey level says which frame it is
            save(frames / sn / f"{i}.jpg", np.full((32, 32, 3), 40 * (i + 1), np.uint8))
    common = ["shard", "disfa", "--images", str(frames), "--labels", str(labels), "--quiet"]
    assert main([*common, "--out", str(tmp_path / "shifted"), "--frame-template", "{subject}/{frame}.jpg"]) == 0
    err = capsys.readouterr().err
    assert "frame-0 image" in err and "{index}" in err
    assert main([*common, "--out", str(tmp_path / "ok"), "--frame-template", "{subject}/{index}.jpg"]) == 0
    got = samples_of(tmp_path / "ok")
    assert len(got) == 10 and "frame-0" not in capsys.readouterr().err
    level = np.asarray(Image.open(io.BytesIO(got["SN001_000003"]["jpg"]))).mean()
    assert abs(level - 120) < 4 and got["SN001_000003"]["json"]["intensity"][0] == 3.0
    assert main([*common, "--out", str(tmp_path / "bad"), "--frame-template", "{subject}/{frame_no}.jpg"]) == 2
    line = one_error_line(capsys)
    assert "unknown field 'frame_no'" in line and "{index}" in line and not (tmp_path / "bad").exists()


def test_rafdb_root_or_basic_is_accepted(tmp_path):
    root = tmp_path / "RAF-DB"
    aligned = root / "basic" / "Image" / "aligned"
    for i, name in enumerate(("train_00001", "train_00002", "test_0001")):
        save(aligned / f"{name}_aligned.jpg", np.full((32, 32, 3), 30 * i, np.uint8))
    (root / "basic" / "EmoLabel").mkdir(parents=True)
    (root / "basic" / "EmoLabel" / "list_patition_label.txt").write_text(
        "train_00001.jpg 4\ntrain_00002.jpg 7\ntest_0001.jpg 1\n")
    for i, where in enumerate((root, root / "basic", aligned)):
        out = tmp_path / f"out{i}"
        assert main(["shard", "rafdb", "--images", str(where), "--out", str(out), "--quiet"]) == 0
        assert json.loads((out / "dataset.json").read_text())["samples"] == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "list_patition_label.txt").write_text("train_00001.jpg 4\n")
    with pytest.raises(Exception, match="no samples found under .*empty"):
        from ssau.shard.plan import run_shard
        from ssau.shard.write import ShardSettings

        run_shard(ShardSettings("rafdb", str(empty), str(empty / "list_patition_label.txt")), tmp_path / "o", progress=False)


def test_a_shard_without_align_keeps_its_fingerprint_when_dlib_is_installed(tmp_path, monkeypatch):
    """Issue 24: `--detector auto` takes dlib only for aligned shards; an unaligned shard directory made before
    detectors existed is still verified and kept, not refused as made with other settings."""
    monkeypatch.setattr("ssau.faces.detect.available", lambda: True)  # as with the [faces] extra installed
    save(tmp_path / "photos" / "a.jpg", face_frame(1)[0])
    out = tmp_path / "out"
    assert main(["shard", "folder", "--images", str(tmp_path / "photos"), "--out", str(out), "--quiet"]) == 0
    settings = json.loads((out / "dataset.json").read_text())["settings"]
    assert "detector" not in settings and "landmarks_from" not in settings  # defaults are left out
