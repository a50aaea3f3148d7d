"""The classic style: the face fills a square image; pose (roll, shift, scale) and lighting vary per frame.
Cartoon-strong cues, quick to learn, so the fast tests and benchmarks use it. RAF-DB's aligned images are face
crops, so expression images are classic in both styles."""

from __future__ import annotations

import math
import random

import cv2
import numpy as np
from PIL import Image, ImageDraw

from ssau.aus import EXPRESSIONS
from ssau.synth.faces import (FaceGeometry, Identity, coding_header, coding_row, face_box, face_geometry,
                              face_landmarks, make_identity, prototype_au, sequence_intensities, sidecar, to_pixels,
                              transform)


def _draw_classic(img: Image.Image, g: FaceGeometry, ident: Identity) -> None:
    S = img.size[0]
    d = ImageDraw.Draw(img)
    P = lambda x, y: (x * S - 0.5, y * S - 0.5)  # noqa: E731  unit -> pixels, as to_pixels
    a, cx, cy, fw, fh = g.a, g.cx, g.cy, g.fw, g.fh
    d.ellipse([P(cx - fw - 0.02, cy - fh - 0.04), P(cx + fw + 0.02, cy + 0.05)], fill=ident.hair)
    d.ellipse([P(cx - fw, cy - fh), P(cx + fw, cy + fh)], fill=ident.skin)
    dark = tuple(int(c * 0.55) for c in ident.skin)
    for sx in (-1, 1):  # cheeks (AU6 raises and reddens them)
        ch_y = 0.60 - 0.04 * a[6]
        col = (min(255, ident.skin[0] + int(40 * a[6])), int(ident.skin[1] * (1 - 0.2 * a[6])), ident.skin[2])
        d.ellipse([P(cx + sx * 0.17 - 0.06, ch_y - 0.035), P(cx + sx * 0.17 + 0.06, ch_y + 0.035)], fill=col)
    for (ex, ey), (inner, outer) in zip(g.eyes, g.brows):  # eyes: AU5 opens, AU6 and AU7 narrow
        rx, ry = g.eye_rx, g.eye_ry
        d.ellipse([P(ex - rx, ey - ry), P(ex + rx, ey + ry)], fill=(245, 245, 240), outline=dark, width=2)
        d.ellipse([P(ex - 0.018, ey - min(ry, 0.018)), P(ex + 0.018, ey + min(ry, 0.018))], fill=(40, 30, 20))
        d.line([P(*inner), P(*outer)], fill=ident.hair, width=int(ident.brow_w * S / 64) + 2)
    if a[4] > 0.2:  # glabella furrows
        for dx in (-0.012, 0.012):
            d.line([P(cx + dx, 0.37), P(cx + dx, 0.41)], fill=dark, width=max(1, int(a[4] * S / 60)))
    d.line([P(*q) for q in g.nose], fill=dark, width=2)
    for k in range(int(round(3 * a[9]))):  # AU9 wrinkles across the bridge
        d.line([P(cx - 0.03, 0.47 + 0.015 * k), P(cx + 0.03, 0.47 + 0.015 * k)], fill=dark, width=2)
    L, T, R, B = g.mouth
    if g.gap > 0.005:
        d.polygon([P(*q) for q in (L, (cx, g.my), R, (cx, g.my + g.gap))], fill=(50, 15, 20))
    w = max(2, round(g.lip_w * S))
    d.line([P(*q) for q in (L, T, R)], fill=ident.lip, width=w)
    d.line([P(*q) for q in (R, B, L)], fill=ident.lip, width=w)
    if a[14] > 0.1:  # dimples
        for sx, corner in ((-1, L), (1, R)):
            r = 0.008 + 0.01 * a[14]
            x, y = corner[0] + sx * 0.02, g.my
            d.ellipse([P(x - r, y - r), P(x + r, y + r)], fill=dark)
    if a[17] > 0.1:  # chin boss pushed up
        chy = 0.82 + 0.04 * a[26] - 0.03 * a[17]
        d.arc([P(cx - 0.06, chy - 0.03), P(cx + 0.06, chy + 0.03)], 200, 340, fill=dark, width=int(1 + 3 * a[17]))


def _classic_canvas(ident: Identity, au: dict[int, float], S: int,
                    background: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, FaceGeometry]:
    g = face_geometry(ident, au, S)
    img = Image.new("RGB", (S, S), background)
    _draw_classic(img, g, ident)
    return np.asarray(img), to_pixels(face_landmarks(g), S), g


def draw_face(ident: Identity, au: dict[int, float], side: int,
              background: tuple[int, int, int] = (128, 128, 128)) -> tuple[np.ndarray, np.ndarray]:
    """The canonical (un-posed, unlit) classic face: ``side`` x ``side`` x 3 uint8 RGB and its [68, 2] landmarks
    in pixels of that image. Drawn at 2x and area-averaged, so a pixel centre x of the canvas lands on
    (x - 0.5) / 2."""
    arr, lm, _ = _classic_canvas(ident, au, 2 * side, background)
    return cv2.resize(arr, (side, side), interpolation=cv2.INTER_AREA), (lm - 0.5) / 2


def render_face(ident: Identity, au: dict[int, float], size: int, rng: random.Random,
                landmarks: bool = False) -> Image.Image | tuple[Image.Image, np.ndarray, dict[str, float]]:
    """Draw one classic face; ``au`` maps AU id -> intensity 0-5 (missing = 0). Pose and lighting come from
    ``rng``. With ``landmarks``, also the [68, 2] points and the face box in pixels of the returned image."""
    S = size * 2
    bg = tuple(int(rng.uniform(40, 200)) for _ in range(3))
    arr, lm, g = _classic_canvas(ident, au, S, bg)
    # pose: roll about the centre, a shift, a zoom-in (a zoom-out would only show the fill)
    angle, shift = rng.gauss(0, 6), (rng.gauss(0, 0.03) * S, rng.gauss(0, 0.03) * S)
    zoom = max(1.0, rng.uniform(0.92, 1.08))
    M = cv2.getRotationMatrix2D(((S - 1) / 2, (S - 1) / 2), angle, zoom)
    M[:, 2] += shift
    arr = cv2.warpAffine(arr, M, (S, S), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                         borderValue=(90, 90, 90))
    arr = cv2.GaussianBlur(cv2.resize(arr, (size, size), interpolation=cv2.INTER_AREA), (0, 0), 0.4)
    arr = arr.astype(np.float32)
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    light = rng.uniform(0.7, 1.2) * (1 + rng.uniform(0.1, 0.4) * (np.cos(theta) * xx + np.sin(theta) * yy))
    arr = arr * light[..., None] + np.asarray([rng.gauss(0, 3) for _ in range(3)])
    arr += np.random.default_rng(rng.getrandbits(32)).normal(0, 3.0, arr.shape)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if not landmarks:
        return img
    to_image = lambda unit: (transform(to_pixels(unit, S), M) - 0.5) / 2  # noqa: E731
    return img, (transform(lm, M) - 0.5) / 2, face_box(g, to_image)


def render_sequence(job: tuple) -> list[str]:
    out, subject, task, s = job
    rng = random.Random(f"{s.seed}:{subject}:{task}")
    ident = make_identity(random.Random(f"{s.seed}:{subject}"))
    seq_dir = out / "bp4d" / subject / task
    seq_dir.mkdir(parents=True, exist_ok=True)
    header = coding_header()
    lines = [",".join(header)]
    first = rng.randint(1, 400)  # BP4D frame numbers need not start at 1
    for i, au in enumerate(sequence_intensities(rng, s.frames)):
        frame = first + i
        render_face(ident, au, s.size, rng).save(seq_dir / f"{frame:04d}.jpg", quality=92)
        lines.append(coding_row(rng, header, frame, au, s))
    (out / "bp4d" / "AUCoding" / "AU_OCC" / f"{subject}_{task}.csv").write_text("\n".join(lines) + "\n")
    return lines


def render_expression(job: tuple) -> tuple[str, bool]:
    out, i, s = job
    rng = random.Random(f"{s.seed}:raf:{i}")
    label = rng.randint(1, 7)
    expr = EXPRESSIONS[label - 1]
    amb = random.Random(f"{s.seed}:raf-ambiguous:{i}")
    ambiguous = amb.random() < s.ambiguous
    if ambiguous:  # the label stays; the face shows neutral or another expression
        expr = amb.choice([e for e in EXPRESSIONS if e != expr])
    au = prototype_au(rng, expr, 1.0) if expr != "neutral" else {}
    split = "train" if i % 5 else "test"
    name = f"{split}_{i + 1:05d}"
    render_face(make_identity(rng), au, s.size, rng).save(out / "rafdb/basic/Image/aligned" / f"{name}_aligned.jpg",
                                                           quality=92)
    return f"{name}.jpg {label}", ambiguous


def render_unlabelled(job: tuple) -> None:
    out, i, s = job
    rng = random.Random(f"{s.seed}:unl:{i}")
    ident_id = i // 10  # ten images per identity, like a face-recognition corpus
    ident = make_identity(random.Random(f"{s.seed}:unl-id:{ident_id}"))
    au = sequence_intensities(rng, 8)[rng.randrange(8)]
    folder = out / "unlabelled" / f"id{ident_id:05d}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{i:06d}.jpg"
    img, lm, box = render_face(ident, au, s.size, rng, landmarks=True)
    img.save(path, quality=92)
    if i % 2 == 0:
        path.with_name(path.name + ".json").write_text(sidecar(lm, box))

