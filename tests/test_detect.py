"""dlib's face detector and 68 landmarks, the [faces] extra (issue 24): how far the detected points fall from the
truth on realistic synthetic frames and on a real public-domain photo, and `ssau shard --align` with them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import FACE_SUBJECTS, bp4d_with_landmarks, samples_of, save
from PIL import Image

from ssau.cli import main
from ssau.faces import detect

if not detect.available():
    pytest.skip("dlib's detector and landmarks need the [faces] extra: pip install -e '.[faces]'",
                allow_module_level=True)

from ssau.synth.faces import SynthSettings  # noqa: E402
from ssau.synth.realistic import render_still  # noqa: E402

# The astronaut (Eileen Collins, NASA, public domain; scikit-image's data.astronaut, shipped in its wheel): seven
# points placed by hand on an 8x enlargement, in 300-W order: outer and inner corners of both eyes, nose tip, mouth
# corners. Hand placement is good to about 1.5 px of a 66 px inter-ocular distance.
ASTRONAUT = {36: (192.5, 100.6), 39: (210.0, 101.9), 42: (236.3, 103.8), 45: (258.8, 103.5), 30: (223.8, 126.9),
             48: (202.8, 139.4), 54: (243.8, 141.3)}


def test_landmarks_on_realistic_synthetic_frames_stay_near_the_truth():
    s = SynthSettings(size=160, style="realistic", seed=3)
    errors = []
    for i in range(12):
        rgb, truth, _ = render_still(s, i)
        face = detect.largest_face(rgb)
        assert face is not None, i
        errors.append(detect.interocular_error(face.points, truth))
    # measured: mean 0.07, worst 0.11 over 40 frames at 128 px, 0.06 / 0.09 at 320 px (README, "Faces")
    assert np.mean(errors) < 0.10 and max(errors) < 0.15, errors


def test_landmarks_on_a_real_public_domain_photo():
    data = pytest.importorskip("skimage.data", reason="scikit-image (the test extra) ships the astronaut photo")
    faces = detect.detect_faces(data.astronaut())
    assert len(faces) == 1
    found = faces[0].points[list(ASTRONAUT)]
    truth = np.array(list(ASTRONAUT.values()))
    iod = np.linalg.norm(truth[0] - truth[3])
    assert np.linalg.norm(found - truth, axis=1).mean() / iod < 0.06  # measured: 0.035
    assert detect.detect_faces(np.full((200, 200, 3), 128, np.uint8)) == []


def test_shard_aligns_faces_without_landmark_files_by_detected_landmarks(tmp_path):
    s = SynthSettings(size=160, style="realistic", seed=5)
    root = tmp_path / "faces"
    truth = {}
    for i in range(3):
        rgb, lm, _ = render_still(s, i)
        save(root / f"f{i}.jpg", rgb)
        truth[f"f{i}"] = lm
    save(root / "blank.jpg", np.full((160, 128, 3), 90, np.uint8))
    out = tmp_path / "out"
    assert main(["shard", "folder", "--images", str(root), "--out", str(out), "--align", "64", "--detector", "dlib",
                 "--quiet"]) == 0
    doc = json.loads((out / "dataset.json").read_text())
    assert doc["faces"]["aligned_by"] == {"detector-landmarks": 3} and doc["skipped_by_reason"] == {"no-face": 1}
    assert "not for commercial use" in doc["faces"]["align"]["landmarks_licence"]
    got = samples_of(out)
    for key, sample in got.items():
        stored = np.array(sample["json"]["landmarks"])  # detected points, carried through the alignment
        assert sample["json"]["aligned"] == "detector-landmarks" and stored.shape == (68, 2)
        assert Image.open(__import__("io").BytesIO(sample["jpg"])).size == (64, 64)
        eyes = stored[[36, 45]]
        assert 10 < eyes[1, 0] - eyes[0, 0] < 40 and abs(eyes[1, 1] - eyes[0, 1]) < 4  # level eyes, face-sized


def test_landmarks_from_detector_replaces_the_csv_points(tmp_path):
    root = bp4d_with_landmarks(tmp_path / "BP4D", frames=2)
    common = ["shard", "bp4d", "--images", str(root), "--labels", str(root), "--landmarks", str(root / "landmarks"),
              "--landmark-frames", "position", "--folds", "bp4d", "--align", "48", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "csv")]) == 0
    assert main([*common, "--out", str(tmp_path / "det"), "--landmarks-from", "detector"]) == 0
    by_csv, by_det = (json.loads((tmp_path / d / "dataset.json").read_text()) for d in ("csv", "det"))
    assert by_csv["faces"]["aligned_by"] == {"landmarks": 12}
    n_det = by_det["faces"]["aligned_by"].get("detector-landmarks", 0)
    assert n_det + by_det["skipped_by_reason"].get("no-face", 0) == 12 and n_det >= 6
    a, b = samples_of(tmp_path / "csv"), samples_of(tmp_path / "det")
    assert {v["json"]["aligned"] for v in b.values()} == {"detector-landmarks"}
    assert set(b) <= set(a) and FACE_SUBJECTS[0] in next(iter(b))


def test_detector_dlib_is_refused_with_one_line_when_asked_without_align(tmp_path, capsys):
    root = tmp_path / "faces"
    save(root / "a.jpg", np.full((64, 64, 3), 90, np.uint8))
    assert main(["shard", "folder", "--images", str(root), "--out", str(tmp_path / "o"), "--landmarks-from",
                 "detector", "--quiet"]) == 2
    assert "--landmarks-from detector needs --align SIZE" in capsys.readouterr().err
