"""`ssau synth`: render the three layouts (BP4D-style sequences, RAF-DB-style expression images, an unlabelled
face folder) in either style with a process pool, and summarise what was written."""

from __future__ import annotations

import multiprocessing as mp
import sys
from pathlib import Path

import cv2
from tqdm import tqdm

from ssau.aus import STANDARD_FOLDS
from ssau.synth import realistic
from ssau.synth.classic import render_expression, render_sequence, render_unlabelled
from ssau.synth.faces import SynthSettings

STYLES = ("classic", "realistic")


def _subjects(n: int) -> list[str]:
    ordered = [s for part in zip(*STANDARD_FOLDS["bp4d"]) for s in part]  # interleave so each fold fills
    ordered += [s for s in STANDARD_FOLDS["bp4d"][0] + STANDARD_FOLDS["bp4d"][1] if s not in ordered]
    if n > 41:
        raise ValueError("--subjects: the BP4D layout has 41 subject ids")
    return ordered[:n]


def render_corpus(out: Path, s: SynthSettings, workers: int = 1, progress: bool = True) -> str:
    """Render all three layouts under ``out``; returns a one-paragraph summary."""
    styles = {"classic": (render_sequence, render_unlabelled),
              "realistic": (realistic.render_sequence, realistic.render_unlabelled)}
    if s.style not in styles:
        raise ValueError(f"style: unknown '{s.style}' (choose from {', '.join(STYLES)})")
    render_seq, render_unl = styles[s.style]
    (out / "bp4d" / "AUCoding" / "AU_OCC").mkdir(parents=True, exist_ok=True)
    if s.style == "realistic":
        (out / "bp4d" / "landmarks").mkdir(parents=True, exist_ok=True)
    (out / "rafdb/basic/Image/aligned").mkdir(parents=True, exist_ok=True)
    (out / "rafdb/basic/EmoLabel").mkdir(parents=True, exist_ok=True)
    tasks = [f"T{t + 1}" for t in range(min(s.tasks, 8))]
    seq_jobs = [(out, subj, t, s) for subj in _subjects(s.subjects) for t in tasks]
    expr_jobs = [(out, i, s) for i in range(s.expression_images)]
    unl_jobs = [(out, i, s) for i in range(s.unlabelled)]
    total = len(seq_jobs) * s.frames + len(expr_jobs) + len(unl_jobs)
    bar = tqdm(total=total, unit="img", desc="synth", disable=not progress, file=sys.stderr)
    # One process per core and no OpenCV threads in them. Set here, before the fork: a forked child that touches
    # OpenCV's thread pool (setNumThreads included) can hang on a lock one of the parent's pool threads held.
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        with mp.get_context("fork").Pool(max(1, workers)) as pool:
            for _ in pool.imap_unordered(render_seq, seq_jobs):
                bar.update(s.frames)
            raf_lines, ambiguous = [], []
            for line, amb in pool.imap(render_expression, expr_jobs, chunksize=16):
                raf_lines.append(line)
                if amb:
                    ambiguous.append(line.split()[0])
                bar.update(1)
            for _ in pool.imap_unordered(render_unl, unl_jobs, chunksize=16):
                bar.update(1)
    finally:
        cv2.setNumThreads(threads)
    bar.close()
    (out / "rafdb/basic/EmoLabel/list_patition_label.txt").write_text("\n".join(raf_lines) + "\n")
    (out / "rafdb/ambiguous.txt").write_text("".join(f"{n}\n" for n in ambiguous))
    frames = (f"{s.size}x{realistic.frame_height(s.size)} head-and-shoulders frames, OpenFace landmarks in "
              f"bp4d/landmarks/" if s.style == "realistic" else f"{s.size}px")
    return (f"synthetic corpus ({s.style}) in {out}: bp4d/ {len(seq_jobs)} sequences x {s.frames} frames ({frames}), "
            f"rafdb/ {len(expr_jobs)} expression images ({len(ambiguous)} ambiguous, listed in rafdb/ambiguous.txt, "
            f"{s.size}px), unlabelled/ {len(unl_jobs)} faces")

