"""What a careless or hostile world sends to the face layer (issue 11, found by review): each case once gave a
traceback, a crash of the training stream, a silently wrong landmark or a deleted file."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
from helpers import face_frame, one_error_line, openface_header, openface_row, samples_of, save, write_csv
from PIL import Image

from ssau.cli import main
from ssau.data.decode import decode_sample
from ssau.errors import DecodeError, LabelError
from ssau.shard.landmarks import read_landmark_csv


def _jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _sample(meta: dict) -> dict:
    return {"__key__": "k", "jpg": _jpeg(np.full((40, 40, 3), 100, np.uint8)), "json": json.dumps(meta).encode()}


def test_a_huge_integer_in_shard_landmarks_is_a_decode_error_not_a_crash():
    huge = [[10 ** 400, 1]] + [[1, 1]] * 67  # json ints have no bound; float() overflowed inside the worker
    with pytest.raises(DecodeError, match="far outside"):
        decode_sample(_sample({"aligned": "none", "landmarks": huge}), 32, random.Random(0))


def test_landmarks_of_shards_written_before_issue_11_are_not_trusted():
    # Old shards stored sidecar points as they came (5, in source pixels), with no "aligned": the template stands in.
    ex = decode_sample(_sample({"landmarks": [[1.0, 2.0]] * 5}), 32, random.Random(0))
    assert not ex.landmarks_valid and ex.landmarks.shape == (68, 2)


def test_sidecar_with_a_huge_integer_is_ignored_with_a_note(tmp_path):
    root = tmp_path / "photos"
    save(root / "a.jpg", face_frame(1)[0])
    (root / "a.jpg.json").write_text('{"bounding_box": {"x": 1' + "0" * 400 + ', "y": 1, "width": 5, "height": 5}}')
    out = tmp_path / "out"
    assert main(["shard", "folder", "--images", str(root), "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "dataset.json").read_text())["skipped_by_reason"] == {"bad-sidecar-ignored": 1}


def test_frames_that_are_not_whole_numbers_are_bad_rows(tmp_path):
    pts = np.arange(136, dtype=float).reshape(68, 2)
    rows = [openface_row(1, pts), openface_row(2, pts), openface_row(3, pts)]
    rows[1][0], rows[2][0] = "1e400", "12.7"
    write_csv(tmp_path / "s.csv", openface_header(), rows)
    table, problems = read_landmark_csv(tmp_path / "s.csv")
    assert list(table) == [1] and problems["bad-landmark-row"] == 2


def test_byte_order_mark_missing_frame_column_and_twice_named_columns(tmp_path):
    pts = np.arange(136, dtype=float).reshape(68, 2)
    write_csv(tmp_path / "bom.csv", openface_header(), [openface_row(183, pts), openface_row(184, pts)])
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "bom.csv").read_bytes())
    assert sorted(read_landmark_csv(tmp_path / "bom.csv")[0]) == [183, 184]  # not rows 1, 2
    with pytest.raises(LabelError, match="no frame column 'img'"):
        read_landmark_csv(tmp_path / "bom.csv", frame_column="img")
    header = ["frame"] + [f"x_{i}" for i in range(68)] + [f"y_{i}" for i in range(68)] + ["x0"]
    write_csv(tmp_path / "twice.csv", header, [["1"] * 138], ",")
    with pytest.raises(LabelError, match="appears twice"):
        read_landmark_csv(tmp_path / "twice.csv")


def test_a_still_takes_its_most_confident_face(tmp_path):
    lm = tmp_path / "lm"
    root = tmp_path / "photos"
    rgb, pts = face_frame(4)
    save(root / "p.jpg", rgb)
    header = ["face", "confidence", "success"] + [f"x_{i}" for i in range(68)] + [f"y_{i}" for i in range(68)]
    row = lambda face, conf, p: [str(face), str(conf), "1"] + [f"{v:.2f}" for v in p[:, 0]] + [f"{v:.2f}" for v in p[:, 1]]  # noqa: E731
    write_csv(lm / "p.csv", header, [row(0, 0.85, pts + 7), row(1, 0.99, pts)], ",")
    out = tmp_path / "out"
    assert main(["shard", "folder", "--images", str(root), "--landmarks", str(lm), "--out", str(out), "--quiet"]) == 0
    assert np.abs(np.array(samples_of(out)["p"]["json"]["landmarks"]) - pts).max() < 0.01


def test_implausible_landmarks_are_counted_not_stored(tmp_path):
    root = tmp_path / "photos"
    rgb, pts = face_frame(5)
    save(root / "far.jpg", rgb)
    far = pts - 5000
    (root / "far.jpg.json").write_text(json.dumps({"landmarks": {str(i): {"x": p[0], "y": p[1]}
                                                                 for i, p in enumerate(far)}}))
    out = tmp_path / "out"
    assert main(["shard", "folder", "--images", str(root), "--out", str(out), "--quiet"]) == 0
    doc = json.loads((out / "dataset.json").read_text())
    assert doc["faces"]["landmarks"]["implausible"] == 1 and doc["faces"]["landmarks"]["stored"] == 0
    assert samples_of(out)["far"]["json"]["landmarks"] == []  # schema version 2: empty, not a missing key


def test_landmarks_of_a_resized_frame_follow_libjpeg_scaled_decoding(tmp_path):
    # 1001 x 701 resized to 100: libjpeg decodes at 1/4 onto 251 x 176 pixels, so the scale is not 100 / 701.
    root = tmp_path / "photos"
    rgb, pts = face_frame(6, w=701, h=1001, face=400)
    save(root / "big.jpg", rgb)
    (root / "big.jpg.json").write_text(json.dumps({"landmarks": {str(i): {"x": p[0], "y": p[1]}
                                                                 for i, p in enumerate(pts)}}))
    out = tmp_path / "out"
    assert main(["shard", "folder", "--images", str(root), "--out", str(out), "--resize", "100", "--quiet"]) == 0
    got = samples_of(out)["big"]["json"]
    k, decoded = 4, (-(-701 // 4), -(-1001 // 4))
    sx, sy = got["width"] / (k * decoded[0]), got["height"] / (k * decoded[1])
    want = (pts + 0.5) * [sx, sy] - 0.5
    assert np.abs(np.array(got["landmarks"]) - want).max() < 0.02
    naive = (pts + 0.5) * [got["width"] / 701, got["height"] / 1001] - 0.5
    assert np.abs(naive - want).max() > 0.1  # the case is one where the two differ


def test_frame_numbers_read_the_wrong_way_are_warned_about(tmp_path, capsys):
    root = tmp_path / "BP4D"
    (root / "AUCoding" / "AU_OCC").mkdir(parents=True)
    rows, labels = [], ["0,1,2"]
    for i in range(6):  # a folder numbered from 0000: OpenFace's positions 1..6 overlap the numbers 1..5
        rgb, pts = face_frame(7, t=i)
        save(root / "F001" / "T1" / f"{i:04d}.jpg", rgb)
        rows.append(openface_row(i + 1, pts))
        labels.append(f"{i},0,1")
    (root / "AUCoding" / "AU_OCC" / "F001_T1.csv").write_text("\n".join(labels) + "\n")
    write_csv(root / "lm" / "F001_T1.csv", openface_header(), rows)
    assert main(["shard", "bp4d", "--images", str(root), "--labels", str(root), "--landmarks", str(root / "lm"),
                 "--out", str(tmp_path / "out"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "more frames match as positions" in err and "F001_T1.csv" in err


def test_landmark_files_outside_the_landmarks_folder_are_never_read(tmp_path):
    img = tmp_path / "img"
    rgb, pts = face_frame(8)
    save(img / "a.jpg", rgb)
    (tmp_path / "manifest.csv").write_text("image,sequence,AU1\na.jpg,../secret,1\n")
    (tmp_path / "lm").mkdir()
    write_csv(tmp_path / "secret.csv", openface_header(), [openface_row(1, pts)])
    out = tmp_path / "out"
    assert main(["shard", "csv", "--images", str(img), "--labels", str(tmp_path / "manifest.csv"), "--landmarks",
                 str(tmp_path / "lm"), "--landmark-pattern", "{sequence}.csv", "--out", str(out), "--quiet"]) == 0
    lm = json.loads((out / "dataset.json").read_text())["faces"]["landmarks"]
    assert lm["no-landmark-file"] == 1 and lm["stored"] == 0


@pytest.mark.parametrize("template", ["{subject}/{frame[0]}.jpg", "{subject.x}/{frame}.jpg", "{0}.jpg"])
def test_odd_frame_templates_are_one_line(tmp_path, capsys, template):
    (tmp_path / "L" / "SN001").mkdir(parents=True)
    (tmp_path / "L" / "SN001" / "SN001_au1.txt").write_text("1,0\n")
    (tmp_path / "F").mkdir()
    assert main(["shard", "disfa", "--images", str(tmp_path / "F"), "--labels", str(tmp_path / "L"),
                 "--frame-template", template, "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "--frame-template" in one_error_line(capsys)


@pytest.mark.parametrize("pattern", ["{stem[0]}.csv", "{stem.x}.csv", "{nope}.csv"])
def test_odd_landmark_patterns_are_one_line(tmp_path, capsys, pattern):
    save(tmp_path / "img" / "a.jpg", face_frame(9)[0])
    (tmp_path / "lm").mkdir()
    assert main(["shard", "folder", "--images", str(tmp_path / "img"), "--landmarks", str(tmp_path / "lm"),
                 "--landmark-pattern", pattern, "--out", str(tmp_path / "o"), "--quiet"]) in (0, 2)
    err = capsys.readouterr().err
    assert "Traceback" not in err


def test_index_on_one_based_frames_is_warned_about(tmp_path, capsys):
    labels, frames = tmp_path / "L", tmp_path / "F"
    (labels / "SN001").mkdir(parents=True)
    (labels / "SN001" / "SN001_au1.txt").write_text("".join(f"{f},1\n" for f in range(1, 5)))
    for f in range(1, 6):  # 1-based files, and one past the last label frame
        save(frames / "SN001" / f"{f}.jpg", np.full((32, 32, 3), 20 * f, np.uint8))
    assert main(["shard", "disfa", "--images", str(frames), "--labels", str(labels), "--frame-template",
                 "{subject}/{index}.jpg", "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert "look 1-based" in capsys.readouterr().err


def test_the_demo_never_deletes_a_folder_it_did_not_render(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d" / "corpus").mkdir(parents=True)
    (tmp_path / "d" / "corpus" / "my_notes.txt").write_text("mine")
    assert main(["demo", "--out", str(tmp_path / "d"), "--subjects", "3", "--frames", "4", "--steps", "1"]) == 2
    assert "not rendered by ssau demo" in one_error_line(capsys)
    assert (tmp_path / "d" / "corpus" / "my_notes.txt").read_text() == "mine"
