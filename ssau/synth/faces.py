"""What both synthetic styles share: identities, AU-driven face geometry and its 68 landmarks, expression sequences
and their AU coding rows. `ssau synth` (``ssau.synth.corpus``) renders a synthetic AU corpus with them, so that the
whole path runs where no real dataset can be downloaded.

Faces are drawn (PIL, 2x supersampled) with geometry driven by AU intensities 0-5: brows (AU1 inner raise, AU2
outer raise, AU4 lowerer), lids (AU5 raise, AU6/AU7 narrow), cheeks (AU6), nose (AU9 wrinkle, AU10 lifts the
upper lip), lips (AU12 corners up, AU14 dimples, AU15 corners down, AU17 chin boss, AU20 stretch, AU23/AU24 thin,
AU25 part), jaw (AU26). Each subject has an identity (skin, face shape, eye spacing, brow weight); each sequence
rises to and falls from an apex of one EMFACS combination (VARIANTS below) plus sparse noise AUs, so AU6 and
AU12 co-occur while AU12 and AU15 rarely do. ``face_geometry`` places the features and ``face_landmarks`` reads
the 68 iBUG points off the same geometry, so every drawn face knows its landmarks exactly.

Two styles (``SynthSettings.style``):
  classic    the face fills a square image; pose (roll, shift, scale) and lighting vary per frame. Cartoon-strong
             cues: quick to learn, so the fast tests and benchmarks use it.
  realistic  BP4D-like head-and-shoulders frames (ssau/synth/realistic.py): the face is ~40 % of the frame width on a
             room background, pose drifts smoothly within a sequence, subtle apexes, OpenFace landmark CSVs.

Written layouts, all read back through the real adapters:
  bp4d/<subject>/<task>/<frame>.jpg + bp4d/AUCoding/AU_OCC/<subject>_<task>.csv  (9 = not coded)
    (+ realistic: bp4d/landmarks/<subject>_<task>.csv, OpenFace 2.0 FeatureExtraction format)
  rafdb/basic/EmoLabel/list_patition_label.txt + rafdb/basic/Image/aligned/<split>_<n>_aligned.jpg
    (+ rafdb/ambiguous.txt: the images whose face does not show their label - a neutral face or another
    expression's AUs - as RAF-DB images labelled from gaze, pose or gesture are; MAL should weigh them down).
    RAF-DB's aligned images are face crops, so they are classic in both styles.
  unlabelled/<identity>/<n>.jpg (+ MegaFace-style <image>.json sidecars, bbox and 68 landmarks, for half of them)
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ssau.aus import EXPRESSIONS, PROTOTYPES, STANDARD_AUS

RENDERED_AUS = (1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 17, 20, 23, 24, 25, 26)
UNCODED_COLUMNS = (5, 9, 25, 26, 43)  # present in the CSV, all 9, as BP4D's uncoded columns are
ACTIVE = 1.5  # intensity from which a rendered AU is labelled present (FACS "A" and up)
# EMFACS lists several AU combinations per emotion; the sequences draw from these variants (AU16 is not drawn).
# Without them AU10, AU14, AU17 and AU24 would only appear as rare noise.
VARIANTS: dict[str, tuple[tuple[int, ...], ...]] = {
    "happiness": ((6, 12), (6, 12, 25)),
    "sadness": ((1, 4, 15), (1, 4, 15, 17)),
    "surprise": ((1, 2, 5, 26), (1, 2, 5, 25)),
    "fear": ((1, 2, 4, 5, 7, 20, 26), (1, 2, 4, 5, 20, 25)),
    "anger": ((4, 5, 7, 23), (4, 5, 7, 17, 24), (4, 5, 7, 10, 23, 25)),
    "disgust": ((9, 15, 16), (10, 16, 25), (9, 17)),
    "contempt": ((12, 14),),
}
# Antagonists never drawn together as noise: a smile does not pull its corners down.
ANTAGONISTS = {12: {15}, 15: {12}, 5: {7}, 7: {5}, 1: {4}, 4: {1}}

Point = tuple[float, float]


@dataclass(frozen=True)
class SynthSettings:
    subjects: int = 41
    tasks: int = 4
    frames: int = 40
    size: int = 96  # image side (classic); frame width (realistic, height 1.25x)
    expression_images: int = 1000
    unlabelled: int = 2000
    seed: int = 0
    unknown_rate: float = 0.005  # coded cells written as 9, as real coding has gaps
    ambiguous: float = 0.2  # expression images whose face does not show their label
    style: str = "classic"  # one of STYLES


@dataclass(frozen=True)
class Identity:
    skin: tuple[int, int, int]
    face_w: float
    face_h: float
    eye_sep: float
    brow_w: float
    lip: tuple[int, int, int]
    hair: tuple[int, int, int]


def make_identity(rng: random.Random) -> Identity:
    tone = rng.uniform(0.35, 1.0)
    skin = (int(120 + 120 * tone), int(80 + 110 * tone), int(60 + 90 * tone))
    return Identity(skin=skin, face_w=rng.uniform(0.28, 0.34), face_h=rng.uniform(0.36, 0.42),
                    eye_sep=rng.uniform(0.11, 0.145), brow_w=rng.uniform(1.5, 3.5),
                    lip=(int(skin[0] * 0.8), int(skin[1] * 0.45), int(skin[2] * 0.5)),
                    hair=tuple(int(rng.uniform(10, 90)) for _ in range(3)))


@dataclass(frozen=True)
class FaceGeometry:
    """Where one face's features lie, in unit coordinates of its square canvas (x right, y down)."""
    a: dict[int, float]  # AU id -> intensity / 5
    cx: float
    cy: float
    fw: float  # face ellipse half-axes
    fh: float
    eyes: tuple[Point, Point]  # centres, image-left then image-right
    eye_rx: float
    eye_ry: float  # half-opening
    brows: tuple[tuple[Point, Point], tuple[Point, Point]]  # (inner, outer) end, image-left then image-right
    nose: tuple[Point, Point, Point]  # classic polyline: bridge top, tip, end of the base stroke
    mouth: tuple[Point, Point, Point, Point]  # centre lines: left corner, upper-lip middle, right corner, lower middle
    my: float  # mouth line
    lip_w: float  # drawn width of each lip stroke
    gap: float  # lip parting


def face_geometry(ident: Identity, au: dict[int, float], canvas: int) -> FaceGeometry:
    """The features of a face with AU intensities ``au`` drawn on a ``canvas``-pixel square."""
    a = {k: au.get(k, 0.0) / 5.0 for k in RENDERED_AUS}
    cx, cy = 0.5, 0.52
    open_ = max(0.006, 0.028 * (1 + 0.8 * a[5] - 0.6 * a[7] - 0.5 * a[6]))
    brows = []
    for sx in (-1, 1):  # inner end (near the midline) by AU1 up / AU4 down+in, outer end by AU2 up
        inner = (cx + sx * (0.035 + 0.02 * (1 - a[4])), 0.37 - 0.05 * a[1] + 0.035 * a[4])
        brows.append((inner, (cx + sx * (ident.eye_sep + 0.07), 0.38 - 0.05 * a[2])))
    my = 0.71 - 0.025 * a[10] + 0.02 * a[26]
    half = 0.085 * (1 + 0.35 * a[20] + 0.25 * a[12] - 0.2 * a[23] - 0.1 * a[24])
    corner_dy = -0.05 * a[12] + 0.045 * a[15] - 0.01 * a[14]
    lip_t = max(0.004, 0.018 * (1 - 0.6 * a[23] - 0.7 * a[24]))
    gap = 0.06 * a[26] + 0.02 * a[25] + 0.01 * a[10]
    mouth = ((cx - half, my + corner_dy), (cx, my - lip_t - 0.01 * a[10]), (cx + half, my + corner_dy),
             (cx, my + gap + lip_t + 0.02 * a[12]))
    return FaceGeometry(a=a, cx=cx, cy=cy, fw=ident.face_w, fh=ident.face_h + 0.04 * a[26],
                        eyes=((cx - ident.eye_sep, 0.44), (cx + ident.eye_sep, 0.44)), eye_rx=0.055, eye_ry=open_,
                        brows=(brows[0], brows[1]), nose=((cx, 0.45), (cx - 0.02, 0.57), (cx + 0.02, 0.58)),
                        mouth=mouth, my=my, lip_w=max(2, int(lip_t * canvas * 1.2)) / canvas, gap=gap)


def face_landmarks(g: FaceGeometry) -> np.ndarray:
    """[68, 2] iBUG points (unit coordinates) read off the drawn shapes: the jaw on the face ellipse from eye
    height round the chin, brows along their strokes, eyes on their ellipses (outer corner, upper lid, inner corner,
    lower lid for the image-left eye; inner corner first for the image-right one), lips on the stroke edges."""
    p = np.zeros((68, 2))
    s = float(np.clip((g.eyes[0][1] - g.cy) / g.fh, -0.95, 0.95))
    th = np.linspace(math.pi - math.asin(s), math.asin(s), 17)  # y grows downwards: pi/2 is the chin
    p[0:17] = np.stack([g.cx + g.fw * np.cos(th), g.cy + g.fh * np.sin(th)], 1)
    f = np.linspace(0, 1, 5)[:, None]
    (li, lo), (ri, ro) = (np.array(q) for q in g.brows[0]), (np.array(q) for q in g.brows[1])
    p[17:22], p[22:27] = lo + f * (li - lo), ri + f * (ro - ri)
    top, tip, base = (np.array(q) for q in g.nose)
    p[27:31] = top + np.linspace(0, 1, 4)[:, None] * (tip - top)
    p[31:36] = tip + np.linspace(-0.5, 1.5, 5)[:, None] * (base - tip)  # along the base stroke, left to right
    phi = math.pi + np.arange(6) * math.pi / 3  # left end, upper lid, right end, lower lid (clockwise on screen)
    for k, (ex, ey) in enumerate(g.eyes):
        p[36 + 6 * k:42 + 6 * k] = np.stack([ex + g.eye_rx * np.cos(phi), ey + g.eye_ry * np.sin(phi)], 1)
    L, T, R, B = (np.array(q) for q in g.mouth)
    up, dn = np.array([0.0, -g.lip_w / 2]), np.array([0.0, g.lip_w / 2])
    thirds = np.array([[1 / 3], [2 / 3]])
    p[48], p[51], p[54], p[57] = L, T + up, R, B + dn
    p[49:51], p[52:54] = L + thirds * (T - L) + up, T + thirds * (R - T) + up
    p[55:57], p[58:60] = R + thirds * (B - R) + dn, B + thirds * (L - B) + dn
    p[60] = (L[0] + 0.1 * (R[0] - L[0]), L[1] + 0.1 * (T[1] + B[1] - 2 * L[1]))  # inner corners, between the strokes
    p[64] = (R[0] - 0.1 * (R[0] - L[0]), R[1] + 0.1 * (T[1] + B[1] - 2 * R[1]))
    p[61], p[62], p[63] = (L + T) / 2 + dn, T + dn, (T + R) / 2 + dn  # the inner edges of the strokes
    p[65], p[66], p[67] = (R + B) / 2 + up, B + up, (B + L) / 2 + up
    return p


def to_pixels(unit: np.ndarray, side: float) -> np.ndarray:
    """Unit canvas coordinates -> pixels of a ``side``-pixel canvas (pixel centres at integers)."""
    return np.asarray(unit, dtype=np.float64) * side - 0.5


def transform(points: np.ndarray, M: np.ndarray) -> np.ndarray:
    """Points mapped by a 2x3 affine, as cv2.warpAffine maps the pixels."""
    return np.asarray(points, dtype=np.float64) @ M[:, :2].T + M[:, 2]


def face_box(g: FaceGeometry, to_image: Callable[[np.ndarray], np.ndarray]) -> dict[str, float]:
    """The axis-aligned box of the face ellipse once mapped into the image (MegaFace ``bounding_box``)."""
    t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    pts = to_image(np.stack([g.cx + g.fw * np.cos(t), g.cy + g.fh * np.sin(t)], 1))
    (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
    return {"x": round(float(x0), 2), "y": round(float(y0), 2), "width": round(float(x1 - x0), 2),
            "height": round(float(y1 - y0), 2)}


def sidecar(landmarks: np.ndarray, box: dict[str, float]) -> str:
    """A MegaFace-style ``<image>.json``: bounding_box and landmarks {"0": {x, y}, ... "67"}."""
    pts = {str(i): {"x": round(float(x), 2), "y": round(float(y), 2)} for i, (x, y) in enumerate(landmarks)}
    return json.dumps({"bounding_box": box, "landmarks": pts})


def prototype_au(rng: random.Random, expression: str, scale: float, variants: bool = False,
                  subtle: float = 0.0) -> dict[int, float]:
    """Apex intensities of one expression: the prototype (RAF-DB-style images) or one EMFACS variant (sequences).
    A ``subtle`` share of the apexes lies at 1.5-2.5 (FACS A-B: labelled active, barely visible)."""
    aus = rng.choice(VARIANTS[expression]) if variants else PROTOTYPES[expression]
    au = {k: scale * (rng.uniform(1.5, 2.5) if subtle and rng.random() < subtle else rng.uniform(2.5, 5.0))
          for k in aus if k in RENDERED_AUS}
    for k in RENDERED_AUS:  # sparse noise AUs, never an antagonist of one already on
        if k not in au and rng.random() < 0.06 and not (ANTAGONISTS.get(k, set()) & set(au)):
            au[k] = rng.uniform(1.0, 3.5) * scale
    return au


def sequence_intensities(rng: random.Random, frames: int, subtle: float = 0.0) -> list[dict[int, float]]:
    """One sequence: a prototype (or two in turn) rising to an apex and falling, per-AU timing jitter."""
    out = [dict() for _ in range(frames)]
    episodes = rng.choice((1, 1, 2))
    for e in range(episodes):
        expr = rng.choice([x for x in EXPRESSIONS if x != "neutral"] + ["happiness"] * 2 + ["contempt"])  # smiles: common
        apex = prototype_au(rng, expr, 1.0, variants=True, subtle=subtle)
        start = int(e * frames / episodes)
        length = max(4, int(frames / episodes))
        for k, peak in apex.items():
            on = start + rng.randint(0, length // 4)
            dur = max(3, int(length * rng.uniform(0.5, 0.9)))
            for t in range(on, min(frames, on + dur)):
                env = math.sin(math.pi * (t - on) / dur)
                out[t][k] = max(out[t].get(k, 0.0), peak * env)
    return out


def coding_header() -> list[str]:
    """BP4D AU_OCC header: column 0 is the frame number, then the coded and the all-9 columns."""
    return ["0"] + [str(k) for k in sorted(STANDARD_AUS["bp4d"] + UNCODED_COLUMNS)]


def coding_row(rng: random.Random, header: list[str], frame: int, au: dict[int, float], s: SynthSettings) -> str:
    cells = []
    for k in map(int, header[1:]):
        if k in UNCODED_COLUMNS or rng.random() < s.unknown_rate:
            cells.append("9")
        else:
            cells.append("1" if au.get(k, 0.0) >= ACTIVE else "0")
    return ",".join([str(frame)] + cells)


