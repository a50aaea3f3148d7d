"""`ssau synth`: landmarks that sit on the drawn features, the realistic style's frames, OpenFace CSVs, smooth pose
and subtle apexes, and the classic style's layouts."""

from __future__ import annotations

import json
import random
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from ssau.aus import STANDARD_AUS
from ssau.faces.template import flip_landmarks
from ssau.synth.classic import draw_face, render_face
from ssau.synth.corpus import realistic as sc
from ssau.synth.corpus import render_corpus
from ssau.synth.faces import (ACTIVE, SynthSettings, face_geometry, face_landmarks, make_identity, sequence_intensities,
                              to_pixels)

W = 96  # realistic frame width in the corpus fixture: big enough that an eye is a few pixels tall


def at(img: np.ndarray, p: np.ndarray) -> np.ndarray:
    """The pixel (float RGB) nearest to point p = (x, y)."""
    x, y = (int(round(v)) for v in p)
    return img[y, x, :3].astype(np.float64)


def skin_like(rgb: np.ndarray, skin: np.ndarray) -> bool:
    """Skin is warm (R well above B) and bright; sclera is neutral, iris, lashes, brows and mouth are dark."""
    return rgb[0] - rgb[2] > 0.5 * (skin[0] - skin[2]) and rgb.sum() > 0.6 * skin.sum()


def green_red(rgb: np.ndarray) -> float:
    return rgb[1] / max(rgb[0], 1.0)


def lip_near(img: np.ndarray, p: np.ndarray) -> float:
    """The lowest green/red ratio within a pixel of p: lips are red, thin, and PIL rasterises strokes to +-1 px."""
    return min(green_red(at(img, p + (dx, dy))) for dx in (-1, 0, 1) for dy in (-1, 0, 1))


def read_openface(path: Path) -> tuple[list[str], list[list[str]]]:
    head, *rows = path.read_text().splitlines()
    return head.split(", "), [r.split(", ") for r in rows]


def points(names: list[str], row: list[str]) -> np.ndarray:
    col = {n: i for i, n in enumerate(names)}
    return np.array([[float(row[col[f"x_{i}"]]), float(row[col[f"y_{i}"]])] for i in range(68)])


@pytest.fixture(scope="module")
def realistic(tmp_path_factory) -> tuple[Path, SynthSettings]:
    out = tmp_path_factory.mktemp("realistic")
    s = SynthSettings(subjects=3, tasks=2, frames=40, size=W, expression_images=3, unlabelled=8, style="realistic")
    render_corpus(out, s, workers=2, progress=False)
    return out, s


@pytest.mark.parametrize("au", [{}, {6: 4.0, 12: 4.5, 25: 3.0, 26: 3.0}, {1: 3.0, 2: 3.0, 5: 4.0, 26: 4.0}])
def test_canonical_landmarks_land_on_the_drawn_features(au):
    ident = make_identity(random.Random(3))
    skin, lip = np.array(ident.skin, float), np.array(ident.lip, float)
    side = 128
    look = sc.make_look(random.Random(3))
    layer, lm, _ = sc.face_layer(ident, look, au, side)
    classic, clm = draw_face(ident, au, side)
    for img, p in ((layer, lm), (classic, clm)):
        for eye in (p[36:42], p[42:48]):  # inside the eye: iris, pupil or sclera, never skin
            c = eye.mean(0)
            assert not skin_like(at(img, c), skin)
            assert not any(skin_like(at(img, (c + q) / 2), skin) for q in eye[[0, 3]])
            assert skin_like(at(img, c + (0, 0.09 * side)), skin)  # the same spot on the cheek is skin
        for i in [*range(18, 21), *range(23, 26)]:  # along the brows (17, 21, 22, 26 are the stroke ends)
            assert at(img, p[i]).sum() < 0.8 * skin.sum()
        # the lips: between the outer and the inner contour lies lip colour
        for o, n in ((51, 62), (57, 66), (49, 61), (55, 65)):
            assert lip_near(img, (p[o] + p[n]) / 2) < (green_red(skin) + green_red(lip)) / 2
            assert lip_near(img, p[o] + (0, 4 if o > 54 else -4)) > (green_red(skin) + green_red(lip)) / 2
    for i in (48, 54):  # realistic mouth corners sit on the lip (its shadowed commissure); a bit outward is skin
        assert green_red(at(layer, lm[i])) < (green_red(skin) + green_red(lip)) / 2
        out = lm[i] + ((-1 if i == 48 else 1) * 0.05 * side, 0)
        assert green_red(at(layer, out)) > (green_red(skin) + green_red(lip)) / 2
    centre = lm[list(range(27, 36))].mean(0)
    for i in range(3, 14):  # the lower jaw is the face's edge: face just inside, transparent just outside
        inward = (centre - lm[i]) / np.linalg.norm(centre - lm[i])
        assert layer[tuple(np.round(lm[i] + 3 * inward).astype(int)[::-1])][3] > 0.95
        assert layer[tuple(np.round(lm[i] - 3 * inward).astype(int)[::-1])][3] < 0.5


@pytest.mark.parametrize("style", ["classic", "realistic"])
def test_landmarks_follow_the_ibug_order(style):
    g = face_geometry(make_identity(random.Random(2)), {12: 3.0, 25: 3.0}, 200)
    p = sc.realistic_landmarks(g) if style == "realistic" else face_landmarks(g)
    x, y = p[:, 0], p[:, 1]
    # jaw: from the image's left (at eye height, the ellipse still widening) round the chin to the right
    assert (np.diff(x[1:9]) > 0).all() and (np.diff(x[8:16]) > 0).all() and y[8] == y.max() and x[0] < x[3]
    assert (np.diff(x[17:22]) > 0).all() and (np.diff(x[22:27]) > 0).all() and x[21] < g.cx < x[22]  # brows
    assert (np.diff(y[27:31]) > 0).all() and (np.diff(x[31:36]) > 0).all()  # bridge down, nostrils left to right
    for corner_a, up, corner_b, down in (((36, (37, 38), 39, (40, 41))), (42, (43, 44), 45, (46, 47))):
        assert x[corner_a] < x[up[0]] < x[up[1]] < x[corner_b]  # clockwise on screen: along the upper lid first
        assert x[corner_b] > x[down[0]] > x[down[1]] > x[corner_a]
        assert (y[list(up)] < y[[corner_a, corner_b]].mean()).all() and (y[list(down)] > y[corner_a]).all()
    assert x[39] < g.cx < x[42] and x[36] < x[39]  # 36 is the image-left eye's outer corner, 42 the right eye's inner
    assert x[48] < x[51] < x[54] and y[51] < y[62] < y[66] < y[57]  # lips: corners, top/bottom, inner within outer
    assert (np.diff(x[48:55]) > 0).all() and (np.diff(x[54:60]) < 0).all()  # outer lip clockwise from the left
    assert x[48] < x[60] < x[62] < x[64] < x[54] and x[64] > x[66] > x[60]


def test_a_frontal_face_is_mirror_symmetric_under_the_68_point_permutation():
    ident, side = make_identity(random.Random(7)), 100
    g = face_geometry(ident, {6: 3.0, 12: 4.0, 25: 2.0, 1: 2.0}, 2 * side)  # AUs act on both sides alike
    realistic = to_pixels(sc.realistic_landmarks(g), side)
    np.testing.assert_allclose(flip_landmarks(realistic, side), realistic, atol=1e-4)
    classic = to_pixels(face_landmarks(g), side)
    keep = [i for i in range(68) if not 27 <= i <= 35]  # the classic nose is a slanted stroke
    np.testing.assert_allclose(flip_landmarks(classic, side)[keep], classic[keep], atol=1e-4)
    swapped = realistic.copy()
    swapped[[37, 38]] = swapped[[38, 37]]  # one mislabelled lid point is caught
    assert np.abs(flip_landmarks(swapped, side) - swapped).max() > 1.0


def test_posed_frames_carry_exact_landmarks():
    ident, look = make_identity(random.Random(11)), sc.make_look(random.Random(11))
    rng = random.Random(5)
    scene = sc.make_scene(rng, ident, look, 128)
    for pose in ((9.5, 0.05, -0.03, 1.05), (-9.5, -0.05, 0.04, 0.95)):
        img, lm, box = sc.render_frame(scene, ident, look, {}, np.array(pose), rng)
        assert img.shape == (160, 128, 3)
        cheek = at(img, 0.6 * lm[3] + 0.4 * lm[30])
        for eye in (lm[36:42], lm[42:48]):
            assert not skin_like(at(img, eye.mean(0)), cheek)
        tilt = np.degrees(np.arctan2(*(lm[45] - lm[36])[::-1]))  # outer eye corners tilt against the roll
        assert abs(tilt + pose[0]) < 0.5
        assert box["x"] <= lm[:, 0].min() + 1 and lm[:, 0].max() <= box["x"] + box["width"] + 1
        assert 0.33 < (lm[16, 0] - lm[0, 0]) / 128 / np.cos(np.radians(pose[0])) < 0.48
    # classic faces: the posed points (sidecar ones) are on the eyes too
    for k in range(6):
        ident = make_identity(random.Random(k))
        img, lm, box = render_face(ident, {}, 96, random.Random(k), landmarks=True)
        img = np.asarray(img)
        cheek = at(img, 0.6 * lm[3] + 0.4 * lm[30])
        assert not any(skin_like(at(img, eye.mean(0)), cheek) for eye in (lm[36:42], lm[42:48]))
        assert skin_like(at(img, lm[36:42].mean(0) + (0, 9)), cheek)


def test_openface_csv_has_the_exact_form_and_follows_the_folder(realistic):
    out, s = realistic
    csvs = sorted((out / "bp4d" / "landmarks").glob("*.csv"))
    assert len(csvs) == s.subjects * s.tasks
    failed, starts = 0, []
    for path in csvs:
        subject, task = path.stem.split("_")
        names, rows = read_openface(path)
        assert all(n and "," not in n and " " not in n for n in names)  # every separator is ", " exactly
        assert names[:5] == ["frame", "face_id", "timestamp", "confidence", "success"]
        for c in "xyXYZ":
            k0 = names.index(f"{c}_0")
            assert names[k0:k0 + 68] == [f"{c}_{i}" for i in range(68)]
        assert names.index("x_0") < names.index("y_0") < names.index("X_0") and "AU12_r" in names
        assert any(n.startswith("gaze_") for n in names) and any(n.startswith("pose_") for n in names)
        frames = sorted((out / "bp4d" / subject / task).glob("*.jpg"))
        starts.append(int(frames[0].stem))
        assert [int(r[0]) for r in rows] == list(range(1, len(frames) + 1))
        assert all(r[2] == f"{(int(r[0]) - 1) / 25:.3f}" and len(r) == len(names) for r in rows)
        hits = total = 0
        for r in rows:
            lm = points(names, r)
            if r[4] == "0":
                failed += 1
                assert float(r[3]) < 0.3 and not lm.any()
                continue
            assert float(r[3]) > 0.8 and all(len(v.split(".")[1]) == 2 for v in r[names.index("x_0"):][:136])
            img = np.asarray(Image.open(frames[int(r[0]) - 1]))  # the row's image: 1-based position in the folder
            cheek = at(img, 0.6 * lm[3] + 0.4 * lm[30])
            hits += sum(not skin_like(at(img, eye.mean(0)), cheek) for eye in (lm[36:42], lm[42:48]))
            total += 2
        assert hits >= 0.9 * total
    assert 0 < failed < 0.08 * s.subjects * s.tasks * s.frames
    assert any(n != 1 for n in starts)  # BP4D numbers start anywhere; OpenFace's `frame` counts from 1 regardless


def test_pose_drifts_smoothly_and_the_face_is_forty_percent_of_the_width(realistic):
    out, s = realistic
    # The head's position is the landmarks' centroid (it averages the tracker's 0.5 px noise away).
    steps, centres, widths = [], [], []
    for path in sorted((out / "bp4d" / "landmarks").glob("*.csv")):
        names, rows = read_openface(path)
        seq = [points(names, r).mean(0) if r[4] == "1" else None for r in rows]
        steps += [np.linalg.norm(b - a) for a, b in zip(seq, seq[1:]) if a is not None and b is not None]
        centres += [c for c in seq if c is not None]
        widths += [(p[:, 0].max() - p[:, 0].min()) / s.size for p in (points(names, r) for r in rows if r[4] == "1")]
    spread = np.mean(np.linalg.norm(np.array(centres) - np.mean(centres, axis=0), axis=1))  # across sequences
    # frame to frame: slow drift and facial motion, a fraction of a pixel; across sequences: pixels
    assert np.mean(steps) < 0.3 * spread and np.mean(steps) < 0.005 * s.size
    assert 0.36 < np.mean(widths) < 0.44 and 0.3 < min(widths) and max(widths) < 0.5
    # the classic style redraws the pose every frame: the same measures flag it
    ident = make_identity(random.Random(0))
    classic = [render_face(ident, {}, s.size, random.Random(k), landmarks=True)[1].mean(0) for k in range(8)]
    jumps = np.mean([np.linalg.norm(b - a) for a, b in zip(classic, classic[1:])])
    assert jumps > 0.5 * spread and jumps > 0.01 * s.size
    track = sc.pose_track(random.Random(1), 200)
    assert np.abs(track[:, 0]).max() <= 10 and np.abs(track[:, 1:3]).max() <= 0.06
    assert np.abs(track[:, 3] - 1).max() <= 0.05 and np.abs(np.diff(track[:, 0])).max() < 1.0
    assert track[:, 0].std() > 0.5  # it does move


def test_realistic_apexes_include_subtle_intensities_labelled_active(realistic):
    def subtle_share(plans: list[list[dict[int, float]]]) -> float:
        apexes = [max(f.get(k, 0.0) for f in p) for p in plans for k in set().union(*p)]
        return np.mean([ACTIVE <= a <= 2.5 for a in apexes])

    realistic_plans = [sc.plan_sequence(SynthSettings(frames=40), f"F{i:03d}", "T1").intensities for i in range(60)]
    classic_plans = [sequence_intensities(random.Random(i), 40) for i in range(60)]
    assert subtle_share(realistic_plans) > 0.3 > 0.15 > subtle_share(classic_plans)
    out, s = realistic
    coded, checked = set(STANDARD_AUS["bp4d"]), 0
    for csv in sorted((out / "bp4d" / "AUCoding" / "AU_OCC").glob("*.csv")):
        subject, task = csv.stem.split("_")
        plan = sc.plan_sequence(s, subject, task)
        head, *lines = [line.split(",") for line in csv.read_text().splitlines()]
        labels = {int(r[0]): dict(zip(map(int, head[1:]), r[1:])) for r in lines}
        for k in coded & set().union(*plan.intensities):
            t = int(np.argmax([f.get(k, 0.0) for f in plan.intensities]))
            if ACTIVE <= plan.intensities[t][k] <= 2.5:
                assert labels[plan.first + t][k] in ("1", "9")
                checked += 1
    assert checked > 0


def test_realistic_layout_unlabelled_sidecars_and_classic_rafdb(realistic):
    out, s = realistic
    frames = sorted((out / "bp4d").glob("[FM]*/T*/*.jpg"))
    assert len(frames) == s.subjects * s.tasks * s.frames
    assert Image.open(frames[0]).size == (W, sc.frame_height(W)) == (96, 120)
    header = (out / "bp4d/AUCoding/AU_OCC").glob("*.csv").__next__().read_text().splitlines()[0]
    assert header == "0,1,2,4,5,6,7,9,10,12,14,15,17,23,24,25,26,43"
    unl = sorted((out / "unlabelled").rglob("*.jpg"))
    assert len(unl) == s.unlabelled and Image.open(unl[0]).size == (96, 120)
    sides = [p for p in unl if p.with_name(p.name + ".json").exists()]
    assert len(sides) == s.unlabelled // 2
    for p in sides:
        doc = json.loads(p.with_name(p.name + ".json").read_text())
        lm = np.array([[doc["landmarks"][str(i)]["x"], doc["landmarks"][str(i)]["y"]] for i in range(68)])
        assert set(doc["landmarks"]) == {str(i) for i in range(68)}
        b = doc["bounding_box"]
        assert b["x"] - 1 <= lm[:, 0].min() and lm[:, 0].max() <= b["x"] + b["width"] + 1
        assert b["y"] < lm[17:27, 1].min() and lm[8, 1] <= b["y"] + b["height"] + 1
    raf = sorted((out / "rafdb/basic/Image/aligned").glob("*.jpg"))
    assert len(raf) == s.expression_images and Image.open(raf[0]).size == (96, 96)  # aligned crops: classic


def test_classic_style_writes_the_old_layouts(tmp_path):
    s = SynthSettings(subjects=2, tasks=1, frames=3, size=32, expression_images=2, unlabelled=4)
    assert s.style == "classic"
    render_corpus(tmp_path, s, workers=1, progress=False)
    frames = sorted((tmp_path / "bp4d").glob("[FM]*/T1/*.jpg"))
    assert len(frames) == 6 and Image.open(frames[0]).size == (32, 32)
    assert not (tmp_path / "bp4d" / "landmarks").exists()
    assert len(list((tmp_path / "bp4d/AUCoding/AU_OCC").glob("*.csv"))) == 2
    assert (tmp_path / "rafdb/basic/EmoLabel/list_patition_label.txt").read_text().count("\n") == 2
    sides = sorted((tmp_path / "unlabelled").rglob("*.json"))
    assert [p.name for p in sides] == ["000000.jpg.json", "000002.jpg.json"]
    doc = json.loads(sides[0].read_text())
    assert set(doc["landmarks"]) == {str(i) for i in range(68)} and set(doc["bounding_box"]) == {"x", "y", "width",
                                                                                                 "height"}
    with pytest.raises(ValueError, match="unknown 'cartoon'"):
        render_corpus(tmp_path / "x", SynthSettings(style="cartoon"), progress=False)


def test_opencv_haar_finds_the_realistic_faces():
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    found = empty = 0
    for i in range(12):
        rng = random.Random(f"haar{i}")
        ident, look = make_identity(rng), sc.make_look(rng)
        scene = sc.make_scene(rng, ident, look, 128)
        img, lm, box = sc.render_frame(scene, ident, look, {}, sc.pose_track(rng, 1)[0], rng)
        faces = cascade.detectMultiScale(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), 1.1, 4, minSize=(24, 24))
        cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        found += any(x < cx < x + w and y < cy < y + h and 0.6 < w / box["width"] < 1.6 for x, y, w, h in faces)
        bare = np.clip(scene.lit, 0, 255).astype(np.uint8)  # the same room without the head
        empty += len(cascade.detectMultiScale(cv2.cvtColor(bare, cv2.COLOR_RGB2GRAY), 1.1, 4, minSize=(24, 24))) == 0
    assert found >= 10 and empty >= 10
