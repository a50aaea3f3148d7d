"""`ssau synth`: a synthetic AU corpus, so that the whole path runs where no real dataset can be downloaded.

Faces are drawn (PIL, 2x supersampled) with geometry driven by AU intensities 0-5: brows (AU1 inner raise, AU2
outer raise, AU4 lowerer), lids (AU5 raise, AU6/AU7 narrow), cheeks (AU6), nose (AU9 wrinkle, AU10 lifts the
upper lip), lips (AU12 corners up, AU14 dimples, AU15 corners down, AU17 chin boss, AU20 stretch, AU23/AU24 thin,
AU25 part), jaw (AU26). Each subject has an identity (skin, face shape, eye spacing, brow weight); each sequence
rises to and falls from an apex of one EMFACS combination (VARIANTS below) plus sparse noise AUs, so AU6 and
AU12 co-occur while AU12 and AU15 rarely do. Pose (roll, shift, scale) and lighting (gradient, gain) vary per frame.

Written layouts, all read back through the real adapters:
  bp4d/<subject>/<task>/<frame>.jpg + bp4d/AUCoding/AU_OCC/<subject>_<task>.csv  (9 = not coded)
  rafdb/basic/EmoLabel/list_patition_label.txt + rafdb/basic/Image/aligned/<split>_<n>_aligned.jpg
    (+ rafdb/ambiguous.txt: the images whose face does not show their label - a neutral face or another
    expression's AUs - as RAF-DB images labelled from gaze, pose or gesture are; MAL should weigh them down)
  unlabelled/<identity>/<n>.jpg (+ MegaFace-style <image>.json sidecars for half of them)
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from ssau.aus import EXPRESSIONS, PROTOTYPES, STANDARD_AUS, STANDARD_FOLDS

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


@dataclass(frozen=True)
class SynthSettings:
    subjects: int = 41
    tasks: int = 4
    frames: int = 40
    size: int = 96
    expression_images: int = 1000
    unlabelled: int = 2000
    seed: int = 0
    unknown_rate: float = 0.005  # coded cells written as 9, as real coding has gaps
    ambiguous: float = 0.2  # expression images whose face does not show their label


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


def render_face(ident: Identity, au: dict[int, float], size: int, rng: random.Random) -> Image.Image:
    """Draw one face; ``au`` maps AU id -> intensity 0-5 (missing = 0)."""
    a = {k: au.get(k, 0.0) / 5.0 for k in RENDERED_AUS}
    S = size * 2
    img = Image.new("RGB", (S, S), tuple(int(rng.uniform(40, 200)) for _ in range(3)))
    d = ImageDraw.Draw(img)
    P = lambda x, y: (x * S, y * S)  # noqa: E731  normalised -> pixels
    cx, cy, fw, fh = 0.5, 0.52, ident.face_w, ident.face_h + 0.04 * a[26]
    d.ellipse([P(cx - fw - 0.02, cy - fh - 0.04), P(cx + fw + 0.02, cy + 0.05)], fill=ident.hair)
    d.ellipse([P(cx - fw, cy - fh), P(cx + fw, cy + fh)], fill=ident.skin)
    dark = tuple(int(c * 0.55) for c in ident.skin)
    # cheeks (AU6 raises and reddens them)
    for sx in (-1, 1):
        ch_y = 0.60 - 0.04 * a[6]
        col = (min(255, ident.skin[0] + int(40 * a[6])), int(ident.skin[1] * (1 - 0.2 * a[6])), ident.skin[2])
        d.ellipse([P(cx + sx * 0.17 - 0.06, ch_y - 0.035), P(cx + sx * 0.17 + 0.06, ch_y + 0.035)], fill=col)
    # eyes: AU5 opens, AU6 and AU7 narrow
    open_ = max(0.006, 0.028 * (1 + 0.8 * a[5] - 0.6 * a[7] - 0.5 * a[6]))
    for sx in (-1, 1):
        ex, ey = cx + sx * ident.eye_sep, 0.44
        d.ellipse([P(ex - 0.055, ey - open_), P(ex + 0.055, ey + open_)], fill=(245, 245, 240), outline=dark, width=2)
        d.ellipse([P(ex - 0.018, ey - min(open_, 0.018)), P(ex + 0.018, ey + min(open_, 0.018))], fill=(40, 30, 20))
        # brows: inner end (near the midline) by AU1 up / AU4 down+in, outer end by AU2 up
        by = 0.37
        inner = (cx + sx * (0.035 + 0.02 * (1 - a[4])), by - 0.05 * a[1] + 0.035 * a[4])
        outer = (cx + sx * (ident.eye_sep + 0.07), by + 0.01 - 0.05 * a[2])
        d.line([P(*inner), P(*outer)], fill=ident.hair, width=int(ident.brow_w * S / 64) + 2)
    if a[4] > 0.2:  # glabella furrows
        for dx in (-0.012, 0.012):
            d.line([P(cx + dx, 0.37), P(cx + dx, 0.41)], fill=dark, width=max(1, int(a[4] * S / 60)))
    # nose; AU9 wrinkles across the bridge
    d.line([P(cx, 0.45), P(cx - 0.02, 0.57), P(cx + 0.02, 0.58)], fill=dark, width=2)
    for k in range(int(round(3 * a[9]))):
        d.line([P(cx - 0.03, 0.47 + 0.015 * k), P(cx + 0.03, 0.47 + 0.015 * k)], fill=dark, width=2)
    # mouth
    my = 0.71 - 0.025 * a[10] + 0.02 * a[26]
    half = 0.085 * (1 + 0.35 * a[20] + 0.25 * a[12] - 0.2 * a[23] - 0.1 * a[24])
    corner_dy = -0.05 * a[12] + 0.045 * a[15] - 0.01 * a[14]
    lip_t = max(0.004, 0.018 * (1 - 0.6 * a[23] - 0.7 * a[24]))
    gap = 0.06 * a[26] + 0.02 * a[25] + 0.01 * a[10]
    left, right = (cx - half, my + corner_dy), (cx + half, my + corner_dy)
    upper = [left, (cx, my - lip_t - 0.01 * a[10]), right]
    lower = [right, (cx, my + gap + lip_t + 0.02 * a[12]), left]
    if gap > 0.005:
        d.polygon([P(*p) for p in (left, (cx, my), right, (cx, my + gap))], fill=(50, 15, 20))
    d.line([P(*p) for p in upper], fill=ident.lip, width=max(2, int(lip_t * S * 1.2)))
    d.line([P(*p) for p in lower], fill=ident.lip, width=max(2, int(lip_t * S * 1.2)))
    if a[14] > 0.1:  # dimples
        for sx in (-1, 1):
            r = 0.008 + 0.01 * a[14]
            d.ellipse([P(cx + sx * (half + 0.02) - r, my - r), P(cx + sx * (half + 0.02) + r, my + r)], fill=dark)
    if a[17] > 0.1:  # chin boss pushed up
        chy = 0.82 + 0.04 * a[26] - 0.03 * a[17]
        d.arc([P(cx - 0.06, chy - 0.03), P(cx + 0.06, chy + 0.03)], 200, 340, fill=dark, width=int(1 + 3 * a[17]))
    # pose and lighting
    angle, shift = rng.gauss(0, 6), (rng.gauss(0, 0.03) * S, rng.gauss(0, 0.03) * S)
    scale = rng.uniform(0.92, 1.08)
    img = img.rotate(angle, resample=Image.Resampling.BILINEAR, translate=shift, fillcolor=(90, 90, 90))
    if abs(scale - 1) > 0.01:
        cs = int(S / scale)
        off = (S - cs) // 2
        img = img.crop((off, off, off + cs, off + cs)) if cs < S else img
    img = img.resize((size, size), Image.Resampling.LANCZOS).filter(ImageFilter.GaussianBlur(0.4))
    arr = np.asarray(img, dtype=np.float32)
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    light = rng.uniform(0.7, 1.2) * (1 + rng.uniform(0.1, 0.4) * (np.cos(theta) * xx + np.sin(theta) * yy))
    arr = arr * light[..., None] + np.asarray([rng.gauss(0, 3) for _ in range(3)])
    arr += np.random.default_rng(rng.getrandbits(32)).normal(0, 3.0, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _prototype_au(rng: random.Random, expression: str, scale: float, variants: bool = False) -> dict[int, float]:
    """Apex intensities of one expression: the prototype (RAF-DB-style images) or one EMFACS variant (sequences)."""
    aus = rng.choice(VARIANTS[expression]) if variants else PROTOTYPES[expression]
    au = {k: scale * rng.uniform(2.5, 5.0) for k in aus if k in RENDERED_AUS}
    for k in RENDERED_AUS:  # sparse noise AUs, never an antagonist of one already on
        if k not in au and rng.random() < 0.06 and not (ANTAGONISTS.get(k, set()) & set(au)):
            au[k] = rng.uniform(1.0, 3.5) * scale
    return au


def sequence_intensities(rng: random.Random, frames: int) -> list[dict[int, float]]:
    """One sequence: a prototype (or two in turn) rising to an apex and falling, per-AU timing jitter."""
    out = [dict() for _ in range(frames)]
    episodes = rng.choice((1, 1, 2))
    for e in range(episodes):
        expr = rng.choice([x for x in EXPRESSIONS if x != "neutral"] + ["happiness"] * 2 + ["contempt"])  # smiles: common
        apex = _prototype_au(rng, expr, 1.0, variants=True)
        start = int(e * frames / episodes)
        length = max(4, int(frames / episodes))
        for k, peak in apex.items():
            on = start + rng.randint(0, length // 4)
            dur = max(3, int(length * rng.uniform(0.5, 0.9)))
            for t in range(on, min(frames, on + dur)):
                env = math.sin(math.pi * (t - on) / dur)
                out[t][k] = max(out[t].get(k, 0.0), peak * env)
    return out


def _subjects(n: int) -> list[str]:
    ordered = [s for part in zip(*STANDARD_FOLDS["bp4d"]) for s in part]  # interleave so each fold fills
    ordered += [s for s in STANDARD_FOLDS["bp4d"][0] + STANDARD_FOLDS["bp4d"][1] if s not in ordered]
    if n > 41:
        raise ValueError("--subjects: the BP4D layout has 41 subject ids")
    return ordered[:n]


def _render_sequence(job: tuple) -> list[str]:
    out, subject, task, s = job
    rng = random.Random(f"{s.seed}:{subject}:{task}")
    ident = make_identity(random.Random(f"{s.seed}:{subject}"))
    seq_dir = out / "bp4d" / subject / task
    seq_dir.mkdir(parents=True, exist_ok=True)
    coded = STANDARD_AUS["bp4d"]
    header = ["0"] + [str(k) for k in sorted(coded + UNCODED_COLUMNS)]
    lines = [",".join(header)]
    first = rng.randint(1, 400)  # BP4D frame numbers need not start at 1
    for i, au in enumerate(sequence_intensities(rng, s.frames)):
        frame = first + i
        render_face(ident, au, s.size, rng).save(seq_dir / f"{frame:04d}.jpg", quality=92)
        cells = []
        for k in map(int, header[1:]):
            if k in UNCODED_COLUMNS or rng.random() < s.unknown_rate:
                cells.append("9")
            else:
                cells.append("1" if au.get(k, 0.0) >= ACTIVE else "0")
        lines.append(",".join([str(frame)] + cells))
    (out / "bp4d" / "AUCoding" / "AU_OCC" / f"{subject}_{task}.csv").write_text("\n".join(lines) + "\n")
    return lines


def _render_expression(job: tuple) -> tuple[str, bool]:
    out, i, s = job
    rng = random.Random(f"{s.seed}:raf:{i}")
    label = rng.randint(1, 7)
    expr = EXPRESSIONS[label - 1]
    amb = random.Random(f"{s.seed}:raf-ambiguous:{i}")
    ambiguous = amb.random() < s.ambiguous
    if ambiguous:  # the label stays; the face shows neutral or another expression
        expr = amb.choice([e for e in EXPRESSIONS if e != expr])
    au = _prototype_au(rng, expr, 1.0) if expr != "neutral" else {}
    split = "train" if i % 5 else "test"
    name = f"{split}_{i + 1:05d}"
    render_face(make_identity(rng), au, s.size, rng).save(out / "rafdb/basic/Image/aligned" / f"{name}_aligned.jpg",
                                                           quality=92)
    return f"{name}.jpg {label}", ambiguous


def _render_unlabelled(job: tuple) -> None:
    out, i, s = job
    rng = random.Random(f"{s.seed}:unl:{i}")
    ident_id = i // 10  # ten images per identity, like a face-recognition corpus
    ident = make_identity(random.Random(f"{s.seed}:unl-id:{ident_id}"))
    au = sequence_intensities(rng, 8)[rng.randrange(8)]
    folder = out / "unlabelled" / f"id{ident_id:05d}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{i:06d}.jpg"
    render_face(ident, au, s.size, rng).save(path, quality=92)
    if i % 2 == 0:
        c = s.size / 2
        side = {"bounding_box": {"x": 0.18 * s.size, "y": 0.1 * s.size, "width": 0.64 * s.size,
                                 "height": 0.84 * s.size},
                "landmarks": {"0": {"x": c - 0.12 * s.size, "y": 0.44 * s.size},
                              "1": {"x": c + 0.12 * s.size, "y": 0.44 * s.size},
                              "2": {"x": c, "y": 0.71 * s.size}}}
        path.with_name(path.name + ".json").write_text(json.dumps(side))


def render_corpus(out: Path, s: SynthSettings, workers: int = 1, progress: bool = True) -> str:
    """Render all three layouts under ``out``; returns a one-paragraph summary."""
    (out / "bp4d" / "AUCoding" / "AU_OCC").mkdir(parents=True, exist_ok=True)
    (out / "rafdb/basic/Image/aligned").mkdir(parents=True, exist_ok=True)
    (out / "rafdb/basic/EmoLabel").mkdir(parents=True, exist_ok=True)
    tasks = [f"T{t + 1}" for t in range(min(s.tasks, 8))]
    seq_jobs = [(out, subj, t, s) for subj in _subjects(s.subjects) for t in tasks]
    expr_jobs = [(out, i, s) for i in range(s.expression_images)]
    unl_jobs = [(out, i, s) for i in range(s.unlabelled)]
    total = len(seq_jobs) * s.frames + len(expr_jobs) + len(unl_jobs)
    bar = tqdm(total=total, unit="img", desc="synth", disable=not progress, file=sys.stderr)
    with mp.get_context("fork").Pool(max(1, workers)) as pool:
        for _ in pool.imap_unordered(_render_sequence, seq_jobs):
            bar.update(s.frames)
        raf_lines, ambiguous = [], []
        for line, amb in pool.imap(_render_expression, expr_jobs, chunksize=16):
            raf_lines.append(line)
            if amb:
                ambiguous.append(line.split()[0])
            bar.update(1)
        for _ in pool.imap_unordered(_render_unlabelled, unl_jobs, chunksize=16):
            bar.update(1)
    bar.close()
    (out / "rafdb/basic/EmoLabel/list_patition_label.txt").write_text("\n".join(raf_lines) + "\n")
    (out / "rafdb/ambiguous.txt").write_text("".join(f"{n}\n" for n in ambiguous))
    return (f"synthetic corpus in {out}: bp4d/ {len(seq_jobs)} sequences x {s.frames} frames, "
            f"rafdb/ {len(expr_jobs)} expression images ({len(ambiguous)} ambiguous, listed in rafdb/ambiguous.txt), "
            f"unlabelled/ {len(unl_jobs)} faces, {s.size}px")
