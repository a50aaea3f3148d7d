"""The realistic style of `ssau synth`: BP4D-like head-and-shoulders frames whose landmarks are known exactly.

A frame is W x H, W = ``SynthSettings.size`` and H = 1.25 W (BP4D's 1040 x 1392 portrait frames, smaller). Per
sequence, a static scene: a room-like wall gradient with a few blurred shapes, a shirt-coloured torso and the neck.
The head is a face layer (premultiplied RGBA) drawn canonically by the shared ``face_geometry`` /
``face_landmarks`` with softer, shaded features (eye sockets, iris, lashes, nostrils, nasolabial folds, filled lips
and a mouth interior), composited with ONE affine per frame (cv2.warpAffine on colour and alpha together); the
landmarks go through the same matrix, so they are exact. The face spans about FACE_FRACTION of the frame width.
Roll (within about +-10 degrees), shift (a few % of W) and scale (+-5 %) drift along low-frequency curves over
the sequence plus tiny jitter, so what moves between t and t+3 is the head and the face, not per-frame jumps.
Lighting is fixed per sequence with mild per-frame noise. A SUBTLE share of apexes lies at intensity 1.5-2.5.

Each sequence also gets ``bp4d/landmarks/<subject>_<task>.csv`` as OpenFace 2.0 FeatureExtraction writes it when
run on the frame folder (RecorderCSV: ", " between names and between values; ``frame`` = 1-based position in the
sorted folder, not the BP4D frame number; timestamp = (frame - 1) / 25; eye_lmk_, pose_, X_/Y_/Z_, p_ and AU
columns around x_0..x_67, y_0..y_67): landmarks with ~0.5 px tracker noise, 2 decimals; about 2 % of the rows,
in short bursts, failed (success 0, low confidence, zeros), as OpenFace writes a lost frame.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageDraw

from ssau.synth.faces import (FaceGeometry, Identity, SynthSettings, coding_header, coding_row, face_box, face_geometry,
                              face_landmarks, make_identity, sequence_intensities, sidecar, to_pixels, transform)

FACE_FRACTION = 0.40  # face (jaw to jaw) width / frame width
ASPECT = 1.25  # frame height / width
SUBTLE = 0.4  # share of apexes at intensity 1.5-2.5
FPS = 25  # OpenFace's timestamp for a frame folder
FAIL_BURST = (0.55, 1, 2)  # chance per sequence of one tracking loss, its length range: ~2 % of 40-frame rows
LANDMARK_NOISE = 0.5  # px, the tracker's error in the CSV (the sidecars and the returned points are exact)
OPENFACE_AUS_R = (1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 17, 20, 23, 25, 26, 45)
OPENFACE_AUS_C = (1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 17, 20, 23, 25, 26, 28, 45)
EYE_LMK = 8  # OpenFace writes 56 per family; a few keep the trap (eye_lmk_x_0 is not x_0) at a fraction of the size
OPENFACE_HEADER = (
    ["frame", "face_id", "timestamp", "confidence", "success",
     "gaze_0_x", "gaze_0_y", "gaze_0_z", "gaze_1_x", "gaze_1_y", "gaze_1_z", "gaze_angle_x", "gaze_angle_y"]
    + [f"eye_lmk_{c}_{i}" for c in "xyXYZ" for i in range(EYE_LMK)]
    + ["pose_Tx", "pose_Ty", "pose_Tz", "pose_Rx", "pose_Ry", "pose_Rz"]
    + [f"{c}_{i}" for c in "xyXYZ" for i in range(68)]
    + ["p_scale", "p_rx", "p_ry", "p_rz", "p_tx", "p_ty"]
    + [f"AU{k:02d}_r" for k in OPENFACE_AUS_R] + [f"AU{k:02d}_c" for k in OPENFACE_AUS_C])


def frame_height(width: int) -> int:
    return int(round(width * ASPECT))


@dataclass(frozen=True)
class Look:
    """What the realistic style adds to an identity."""
    face_frac: float
    hair_style: int  # 0 short, 1 long (falls behind the jaw), 2 cropped (no fringe)
    hair: tuple[int, int, int, int]
    iris: tuple[int, int, int, int]
    shirt: tuple[float, float, float]


HAIR = ((25, 20, 18), (55, 38, 26), (90, 60, 35), (120, 70, 40), (160, 130, 85), (130, 125, 120))  # black..grey
IRIS = ((70, 45, 25), (45, 30, 20), (60, 85, 110), (80, 95, 60))


def make_look(rng: random.Random) -> Look:
    hair = tuple(int(c * rng.uniform(0.85, 1.15)) for c in rng.choice(HAIR)) + (255,)
    grey = rng.uniform(40, 200)
    shirt = tuple(0.5 * grey + 0.5 * rng.uniform(20, 230) for _ in range(3))
    return Look(face_frac=FACE_FRACTION * rng.uniform(0.94, 1.06), hair_style=rng.randrange(3), hair=hair,
                iris=rng.choice(IRIS) + (255,), shirt=shirt)


def _shade(c: tuple, f: float) -> tuple[int, int, int, int]:
    return tuple(int(min(255, max(0, v * f))) for v in c[:3]) + (255,)


def realistic_landmarks(g: FaceGeometry) -> np.ndarray:
    """The shared landmarks with this style's symmetric nose: bridge down the midline, nostrils 31-35 below the
    tip (AU9 and AU10 lift them)."""
    p = face_landmarks(g)
    lift = 0.012 * g.a[9] + 0.008 * g.a[10]
    tip_y = 0.57 - lift
    p[27:31] = np.stack([np.full(4, g.cx), np.linspace(0.45, tip_y, 4)], 1)
    p[31:36] = np.stack([g.cx + np.array([-0.042, -0.02, 0.0, 0.02, 0.042]),
                         tip_y + np.array([0.005, 0.018, 0.022, 0.018, 0.005])], 1)
    return p


def _draw(img: Image.Image, g: FaceGeometry, lm: np.ndarray, ident: Identity, look: Look) -> None:
    S = img.size[0]
    d = ImageDraw.Draw(img)
    P = lambda x, y: (x * S - 0.5, y * S - 0.5)  # noqa: E731  unit -> canvas pixels, as to_pixels
    Q = lambda i: P(*lm[i])  # noqa: E731
    a, cx, cy, fw, fh, skin = g.a, g.cx, g.cy, g.fw, g.fh, ident.skin
    hair, thin = look.hair, max(1, S // 100)
    d.ellipse([P(cx - fw - 0.03, cy - fh - 0.05), P(cx + fw + 0.03, cy + 0.06)], fill=hair)
    if look.hair_style == 1:
        d.ellipse([P(cx - fw - 0.04, cy - fh - 0.05), P(cx + fw + 0.04, cy + 0.9 * fh)], fill=hair)
    for sx in (-1, 1):  # ears, half behind the face
        d.ellipse([P(cx + sx * fw - 0.03, 0.44), P(cx + sx * fw + 0.03, 0.57)], fill=_shade(skin, 0.88))
    d.ellipse([P(cx - fw, cy - fh), P(cx + fw, cy + fh)], fill=_shade(skin, 0.86))  # the face turning away: darker
    d.ellipse([P(cx - 0.88 * fw, cy - 0.92 * fh), P(cx + 0.88 * fw, cy + 0.86 * fh)], fill=_shade(skin, 1.0))
    if look.hair_style != 2:  # fringe over the forehead
        d.chord([P(cx - fw, cy - fh - 0.03), P(cx + fw, cy - fh + 0.17)], 180, 360, fill=hair)
    for sx in (-1, 1):  # cheeks: AU6 raises and slightly flushes them
        ch_y = 0.60 - 0.04 * a[6]
        col = (min(255, int(skin[0] * (1 + 0.08 * a[6]))), int(skin[1] * (1 - 0.06 * a[6])), skin[2], 255)
        d.ellipse([P(cx + sx * 0.17 - 0.06, ch_y - 0.035), P(cx + sx * 0.17 + 0.06, ch_y + 0.035)], fill=col)
    lash, lid = (30, 24, 22, 255), _shade(skin, 0.62)
    for ex, ey in g.eyes:
        d.ellipse([P(ex - 0.075, ey - 0.045), P(ex + 0.075, ey + 0.032)], fill=_shade(skin, 0.86))  # socket
        rx, ry, ir, pr = g.eye_rx, g.eye_ry, 0.021, 0.009
        box = [P(ex - rx, ey - ry), P(ex + rx, ey + ry)]
        d.ellipse(box, fill=(226, 222, 214, 255))
        d.ellipse([P(ex - ir, ey - min(ry, ir)), P(ex + ir, ey + min(ry, ir))], fill=look.iris)
        d.ellipse([P(ex - pr, ey - min(ry, pr)), P(ex + pr, ey + min(ry, pr))], fill=(14, 12, 12, 255))
        d.arc(box, 180, 360, fill=lash, width=max(2, S // 60))
        d.arc(box, 0, 180, fill=lid, width=thin)
    if a[6] > 0.15:  # crow's feet at the outer corners
        for i, sx in ((36, -1), (45, 1)):
            x, y = lm[i]
            for dy in (-0.012, 0.0, 0.012):
                d.line([P(x + sx * 0.012, y + dy * 0.5), P(x + sx * 0.035, y + dy * 1.6)], fill=_shade(skin, 0.82),
                       width=thin)
    bw = int(ident.brow_w * S / 64) + 2
    for idx in (range(17, 22), range(22, 27)):  # brows: denser, so darker, than the hair
        d.line([Q(i) for i in idx], fill=_shade(hair, 0.6), width=bw, joint="curve")
    if a[4] > 0.2:  # glabella furrows
        for dx in (-0.012, 0.012):
            d.line([P(cx + dx, 0.37), P(cx + dx, 0.41)], fill=_shade(skin, 0.75), width=max(1, int(a[4] * S / 70)))
    tx, ty = lm[30]
    d.line([P(cx + 0.022, 0.47), P(tx + 0.03, ty - 0.01)], fill=_shade(skin, 0.84), width=thin)  # bridge side
    d.ellipse([P(tx - 0.03, ty - 0.02), P(tx + 0.03, ty + 0.02)], fill=_shade(skin, 1.05))  # tip highlight
    for i in (31, 35):  # alae
        x, y = lm[i]
        d.ellipse([P(x - 0.014, y - 0.016), P(x + 0.014, y + 0.01)], fill=_shade(skin, 0.84))
    for i in (32, 34):  # nostrils
        x, y = lm[i]
        d.ellipse([P(x - 0.012, y - 0.006), P(x + 0.012, y + 0.006)], fill=_shade(skin, 0.42))
    for k in range(int(round(3 * a[9]))):  # AU9 wrinkles across the bridge
        d.line([P(cx - 0.028, 0.47 + 0.015 * k), P(cx + 0.028, 0.47 + 0.015 * k)], fill=_shade(skin, 0.8), width=thin)
    fold = _shade(skin, 0.88 - 0.12 * max(a[12], a[10], 0.7 * a[9]))  # nasolabial folds deepen with AU10/AU12
    for sx, n, c in ((-1, 31, 48), (1, 35, 54)):
        (nx, ny), (mx, my) = lm[n], lm[c]
        d.line([P(nx + sx * 0.015, ny - 0.01), P(mx + sx * 0.03, (ny + my) / 2), P(mx + sx * 0.022, my + 0.04)],
               fill=fold, width=thin, joint="curve")
    d.polygon([Q(i) for i in (48, 49, 50, 51, 52, 53, 54, 64, 63, 62, 61, 60)], fill=_shade(ident.lip, 0.9))
    d.polygon([Q(i) for i in (54, 55, 56, 57, 58, 59, 48, 60, 67, 66, 65, 64)], fill=_shade(ident.lip, 1.0))
    d.polygon([Q(i) for i in range(60, 68)], fill=(55, 18, 22, 255) if g.gap > 0.005 else _shade(ident.lip, 0.55))
    if g.gap > 0.02:  # upper teeth
        drop = min(0.4 * g.gap, 0.02)
        d.polygon([Q(i) for i in (60, 61, 62, 63, 64)] + [P(x, y + drop) for x, y in lm[[64, 63, 62, 61, 60]]],
                  fill=(214, 208, 196, 255))
    for i in (48, 54):  # the shadowed commissures
        x, y = lm[i]
        d.ellipse([P(x - 0.008, y - 0.008), P(x + 0.008, y + 0.008)], fill=_shade(ident.lip, 0.5))
    if a[14] > 0.1:  # dimples
        for sx, i in ((-1, 48), (1, 54)):
            r, (x, y) = 0.006 + 0.008 * a[14], lm[i]
            d.ellipse([P(x + sx * 0.02 - r, y - r), P(x + sx * 0.02 + r, y + r)], fill=_shade(skin, 0.72))
    if a[17] > 0.1:  # chin boss pushed up
        chy = 0.82 + 0.04 * a[26] - 0.03 * a[17]
        d.arc([P(cx - 0.06, chy - 0.03), P(cx + 0.06, chy + 0.03)], 200, 340, fill=_shade(skin, 0.75),
              width=int(1 + 2 * a[17]))


def face_layer(ident: Identity, look: Look, au: dict[int, float],
               side: int) -> tuple[np.ndarray, np.ndarray, FaceGeometry]:
    """The canonical head: ``side`` x ``side`` x 4 float32 premultiplied RGBA (alpha 0-1), its [68, 2] landmarks in
    pixels of that layer, and the geometry. Drawn at 2x on a transparent canvas, softened, area-averaged: with
    transparent pixels black, the averaged colour is already premultiplied."""
    S = 2 * side
    g = face_geometry(ident, au, S)
    lm = realistic_landmarks(g)
    img = Image.new("RGBA", (S, S), (0, 0, 0, 0))
    _draw(img, g, lm, ident, look)
    arr = cv2.GaussianBlur(np.asarray(img, dtype=np.float32), (0, 0), 0.9)  # the 2x canvas is drawn aliased
    arr = cv2.resize(arr, (side, side), interpolation=cv2.INTER_AREA)
    arr[..., 3] *= 1.0 / 255.0
    return arr, to_pixels(lm, side), g


@dataclass(frozen=True)
class Scene:
    """What stays fixed over a sequence: the camera, the room, the body and the light."""
    background: np.ndarray  # H x W x 3 float32
    light: np.ndarray  # H x W x 1 float32 gain map
    lit: np.ndarray  # background * light + cast
    cast: np.ndarray  # (3,) colour offset
    anchor: tuple[float, float]  # where the face centre sits at rest (pixels)
    layer_side: int


def make_scene(rng: random.Random, ident: Identity, look: Look, width: int) -> Scene:
    W, H = width, frame_height(width)
    top = np.float32(rng.uniform(110, 210)) + np.array([rng.uniform(-25, 25) for _ in range(3)], dtype=np.float32)
    t = np.linspace(0.0, 1.0, H, dtype=np.float32)[:, None, None]
    bg = np.ascontiguousarray(np.broadcast_to(top * (1 - t) + top * rng.uniform(0.55, 0.9) * t, (H, W, 3)))
    for _ in range(rng.randint(2, 4)):  # door, picture frames, a window, a shelf
        x0, y0 = rng.uniform(-0.2, 0.9) * W, rng.uniform(-0.1, 0.7) * H
        x1, y1 = x0 + rng.uniform(0.12, 0.45) * W, y0 + rng.uniform(0.1, 0.5) * H
        f = rng.uniform(0.5, 1.4)
        col = tuple(float(np.clip(c * f + rng.uniform(-30, 30), 0, 255)) for c in top)
        cv2.rectangle(bg, (int(x0), int(y0)), (int(x1), int(y1)), col, -1 if rng.random() < 0.6 else max(1, W // 40))
    if rng.random() < 0.5:  # a lamp or a clock
        cv2.circle(bg, (int(rng.uniform(0, W)), int(rng.uniform(0, 0.5 * H))), int(rng.uniform(0.04, 0.1) * W),
                   tuple(rng.uniform(150, 250) for _ in range(3)), -1)
    bg = cv2.GaussianBlur(bg, (0, 0), max(0.5, W / 120))  # out of focus behind the subject
    side = max(8, int(round(look.face_frac * W / (2 * ident.face_w))))
    anchor = (W / 2 - 0.5 + rng.uniform(-0.03, 0.03) * W, 0.40 * H)
    neck_w, chin = 0.21 * look.face_frac * W, anchor[1] + 0.3 * side
    cv2.rectangle(bg, (int(anchor[0] - neck_w), int(anchor[1])), (int(anchor[0] + neck_w), int(0.85 * H)),
                  tuple(0.78 * c for c in ident.skin), -1)
    cv2.ellipse(bg, (int(anchor[0]), int(chin + 0.06 * H)), (int(neck_w), int(0.05 * H)), 0, 0, 180,
                tuple(0.68 * c for c in ident.skin), -1)  # shadow under the jaw
    cv2.ellipse(bg, (int(W / 2), int(1.03 * H)), (int(0.56 * W), int(0.3 * H)), 0, 180, 360, look.shirt, -1)
    cv2.ellipse(bg, (int(anchor[0]), int(0.74 * H)), (int(1.3 * neck_w), int(0.05 * H)), 0, 0, 180,
                tuple(0.65 * c for c in look.shirt), max(1, W // 64))  # collar
    theta, strength = rng.uniform(0, 2 * math.pi), rng.uniform(0.1, 0.35)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    ramp = math.cos(theta) * (xx / W - 0.5) + math.sin(theta) * (yy / H - 0.5)
    light = (rng.uniform(0.75, 1.15) * (1 + strength * ramp))[..., None].astype(np.float32)
    cast = np.array([rng.gauss(0, 4) for _ in range(3)], dtype=np.float32)
    return Scene(background=bg, light=light, lit=bg * light + cast, cast=cast, anchor=anchor, layer_side=side)


def pose_track(rng: random.Random, n: int) -> np.ndarray:
    """[n, 4] roll (degrees), shift x and y (fractions of W), scale: a random offset plus two slow sines (periods
    40-120 frames) per parameter, tiny jitter, clipped to the stated range. n = 1 gives a random still pose."""
    t = np.arange(n, dtype=np.float64)
    out = np.empty((n, 4))
    for j, (base, amp, bound, jitter) in enumerate(((4.0, 4.0, 10.0, 0.05), (0.03, 0.02, 0.06, 0.0008),
                                                    (0.02, 0.015, 0.05, 0.0008), (0.02, 0.02, 0.05, 0.0005))):
        v = np.full(n, rng.uniform(-base, base))
        for _ in range(2):
            v += rng.uniform(0, amp) * np.sin(2 * math.pi * t / rng.uniform(40, 120) + rng.uniform(0, 2 * math.pi))
        v += jitter * np.array([rng.gauss(0, 1) for _ in range(n)])
        out[:, j] = np.clip(v, -bound, bound)
    out[:, 3] += 1.0
    return out


def pose_matrix(scene: Scene, pose: np.ndarray, width: int, centre: tuple[float, float]) -> np.ndarray:
    """2x3 affine from face-layer pixels to frame pixels: roll and scale about the face centre (unit layer
    coordinates), which lands on the scene's anchor plus the shift."""
    roll, tx, ty, scale = pose
    c = to_pixels(np.array(centre), scene.layer_side)
    r = math.radians(roll)
    A = scale * np.array([[math.cos(r), math.sin(r)], [-math.sin(r), math.cos(r)]])  # counter-clockwise, y down
    dst = np.array([scene.anchor[0] + tx * width, scene.anchor[1] + ty * width])
    return np.hstack([A, (dst - A @ c)[:, None]])


def render_frame(scene: Scene, ident: Identity, look: Look, au: dict[int, float], pose: np.ndarray,
                 rng: random.Random) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """One frame: H x W x 3 uint8 RGB, its exact [68, 2] landmarks and the face box, in frame pixels."""
    H, W = scene.background.shape[:2]
    layer, lm, g = face_layer(ident, look, au, scene.layer_side)
    M = pose_matrix(scene, pose, W, (g.cx, g.cy))
    # Warp and composite only where the layer lands (a third of the frame): lit = (background * light + cast)
    # outside, (background * (1 - alpha) + colour) * light + cast inside.
    n = scene.layer_side - 1
    corners = transform(np.array([[0, 0], [n, 0], [0, n], [n, n]], dtype=np.float64), M)
    (x0, y0), (x1, y1) = np.floor(corners.min(0)).astype(int) - 1, np.ceil(corners.max(0)).astype(int) + 2
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(W, x1), min(H, y1)
    img = scene.lit.copy()
    if x1 > x0 and y1 > y0:
        Mr = M.copy()
        Mr[:, 2] -= (x0, y0)
        warped = cv2.warpAffine(layer, Mr, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        alpha, light = warped[..., 3:], scene.light[y0:y1, x0:x1]
        roi = img[y0:y1, x0:x1]
        roi[...] = roi * (1.0 - alpha) + warped[..., :3] * light + scene.cast * alpha
    noise = np.empty_like(img)
    cv2.setRNGSeed(rng.getrandbits(31))
    cv2.randn(noise, 0.0, 2.5)  # sensor noise; several times faster than numpy's generator at this size
    img = cv2.GaussianBlur(img * (1 + rng.gauss(0, 0.006)) + noise, (0, 0), 0.5)
    box = face_box(g, lambda unit: transform(to_pixels(unit, scene.layer_side), M))
    return np.clip(img, 0, 255).astype(np.uint8), transform(lm, M), box


def _fmt(values, digits: int) -> list[str]:
    return list(map(f"{{:.{digits}f}}".format, np.asarray(values, dtype=np.float64).ravel().tolist()))


def openface_row(position: int, ok: bool, rng: random.Random, lm: np.ndarray, pose: np.ndarray,
                 au: dict[int, float], size: tuple[int, int]) -> str:
    """One FeatureExtraction row (columns of OPENFACE_HEADER); a failed frame writes zeros, as OpenFace does."""
    W, H = size
    conf = rng.uniform(0.88, 0.98) if ok else rng.uniform(0.0, 0.2)
    head = [str(position), "0", f"{(position - 1) / FPS:.3f}", f"{conf:.2f}", "1" if ok else "0"]
    if not ok:
        return ", ".join(head + ["0"] * (len(OPENFACE_HEADER) - len(head)))
    gen = np.random.default_rng(rng.getrandbits(32))
    noisy = lm + gen.normal(0.0, LANDMARK_NOISE, lm.shape)
    f = 500.0 * W / 640  # a pinhole camera; 3D in mm, nearer at the nose than at the jaw
    z = 650.0 / pose[3] + 40.0 * np.hypot(*((lm - lm.mean(0)) / (0.3 * W)).T) ** 2
    X, Y = (lm[:, 0] - W / 2) * z / f, (lm[:, 1] - H / 2) * z / f
    eye, roll = [36, 37, 38, 39, 40, 41, 37, 40], -math.radians(pose[0])
    gaze = gen.normal([0.0, 0.1, 0.0, 0.1], 0.06)
    vals = _fmt([gaze[0], gaze[1], -1.0, gaze[2], gaze[3], -1.0], 6) + _fmt(gen.normal([0.0, 0.1], 0.05), 3)
    vals += _fmt([lm[eye, 0], lm[eye, 1], X[eye], Y[eye], z[eye]], 1)
    vals += _fmt([X.mean(), Y.mean(), z.mean()], 1) + _fmt([*gen.normal(0.0, 0.05, 2), roll], 3)
    vals += _fmt([noisy[:, 0], noisy[:, 1]], 2) + _fmt([X, Y, z], 1)
    vals += _fmt([pose[3] * W / 200, 0.0, 0.0, roll, *lm.mean(0)], 3)
    r = np.array([au.get(k, 0.0) for k in OPENFACE_AUS_R])
    vals += _fmt(np.clip(r + gen.normal(0.0, 0.25, r.shape), 0.0, 5.0), 2)
    vals += _fmt([float(au.get(k, 0.0) >= 1.0) for k in OPENFACE_AUS_C], 1)
    return ", ".join(head + vals)


@dataclass(frozen=True)
class Plan:
    """What one sequence shows, drawn before any pixel: the test and the renderer read the same plan."""
    first: int  # BP4D frame number of the first image
    intensities: list[dict[int, float]]
    poses: np.ndarray  # [frames, 4]
    failed: frozenset[int]  # positions (0-based) where the tracker lost the face


def plan_sequence(s: SynthSettings, subject: str, task: str) -> Plan:
    rng = random.Random(f"{s.seed}:{subject}:{task}:realistic")
    first = rng.randint(1, 400)  # BP4D frame numbers need not start at 1
    intensities = sequence_intensities(rng, s.frames, subtle=SUBTLE)
    poses = pose_track(rng, s.frames)
    failed: set[int] = set()
    if s.frames > 4 and rng.random() < FAIL_BURST[0]:
        start = rng.randrange(s.frames)
        failed = set(range(start, min(s.frames, start + rng.randint(*FAIL_BURST[1:]))))
    return Plan(first=first, intensities=intensities, poses=poses, failed=frozenset(failed))


def _look(s: SynthSettings, key: str) -> Look:
    return make_look(random.Random(f"{s.seed}:{key}:look"))


def render_sequence(job: tuple) -> list[str]:
    out, subject, task, s = job
    plan = plan_sequence(s, subject, task)
    ident, look = make_identity(random.Random(f"{s.seed}:{subject}")), _look(s, subject)
    rng = random.Random(f"{s.seed}:{subject}:{task}:frames")
    scene = make_scene(rng, ident, look, s.size)
    seq_dir = out / "bp4d" / subject / task
    seq_dir.mkdir(parents=True, exist_ok=True)
    header = coding_header()
    lines, rows = [",".join(header)], [", ".join(OPENFACE_HEADER)]
    size = (s.size, frame_height(s.size))
    for i, au in enumerate(plan.intensities):
        frame = plan.first + i
        img, lm, _ = render_frame(scene, ident, look, au, plan.poses[i], rng)
        Image.fromarray(img).save(seq_dir / f"{frame:04d}.jpg", quality=92)
        lines.append(coding_row(rng, header, frame, au, s))
        rows.append(openface_row(i + 1, i not in plan.failed, rng, lm, plan.poses[i], au, size))
    (out / "bp4d" / "AUCoding" / "AU_OCC" / f"{subject}_{task}.csv").write_text("\n".join(lines) + "\n")
    (out / "bp4d" / "landmarks" / f"{subject}_{task}.csv").write_text("\n".join(rows) + "\n")
    return lines


def render_still(s: SynthSettings, i: int) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Unlabelled face ``i``: (frame, its exact [68, 2] landmarks, the face box); ten images per identity."""
    rng = random.Random(f"{s.seed}:unl:{i}:realistic")
    ident_id = i // 10  # ten images per identity, like a face-recognition corpus
    ident, look = make_identity(random.Random(f"{s.seed}:unl-id:{ident_id}")), _look(s, f"unl-{ident_id}")
    au = sequence_intensities(rng, 8, subtle=SUBTLE)[rng.randrange(8)]
    scene = make_scene(rng, ident, look, s.size)
    return render_frame(scene, ident, look, au, pose_track(rng, 1)[0], rng)


def render_unlabelled(job: tuple) -> None:
    out, i, s = job
    img, lm, box = render_still(s, i)
    ident_id = i // 10
    folder = out / "unlabelled" / f"id{ident_id:05d}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{i:06d}.jpg"
    Image.fromarray(img).save(path, quality=92)
    if i % 2 == 0:
        path.with_name(path.name + ".json").write_text(sidecar(lm, box))
