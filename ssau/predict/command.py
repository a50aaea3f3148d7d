"""``ssau predict MODEL INPUT... --out FILE.csv|FILE.parquet``: a trained recogniser on images, folders, videos and
shard directories, one row per face per frame.

Columns (OpenFace 2.0's and py-feat's names where they have one; the README maps them):
``input, frame, timestamp, face_id, confidence, success, face_x, face_y, face_width, face_height, x_0..x_67,
y_0..y_67, AU01.. (probabilities), AU01_c.. (presence at the model's thresholds), problem``. A frame without a face,
an unreadable file and a file that is neither image nor video get a row with ``success=0`` and the reason in
``problem``; their AU columns are empty. Rows come in the order of the inputs (then frame, then face), whatever
order the DataLoader workers finished them in. The file is written under a temporary name and renamed.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ssau.errors import UserError
from ssau.predict.faces import choose_detector
from ssau.predict.inputs import FaceRows, plan_inputs
from ssau.predict.model import Recogniser, load_recogniser
from ssau.predict.table import table_row, write_table


def _score(rec: Recogniser, pending: list[dict], images: list[torch.Tensor]) -> None:
    probs = rec.probabilities(torch.cat(images))
    for r, p in zip(pending, probs.tolist(), strict=True):
        r["probs"] = p


def predict(model: str, inputs: list[str], out: str, every: int = 1, batch: int = 64, workers: int = 2,
            detector: str = "auto", device: str = "auto", progress: bool = True) -> dict:
    """Run the command; returns its summary (also printed)."""
    target = Path(out)
    if target.suffix.lower() not in (".csv", ".parquet"):
        raise UserError(f"--out {out}: a .csv or .parquet file")
    if every < 1 or batch < 1 or workers < 0:
        raise UserError(f"--every {every} / --batch {batch} / --workers {workers}: at least 1, 1 and 0")
    rec = load_recogniser(model, device)
    jobs = plan_inputs(inputs)
    if not jobs:
        raise UserError("no input file found under " + ", ".join(inputs))
    pre = rec.card["preprocess"]
    det, note = choose_detector(detector, pre)
    if note:
        print(f"ssau predict: note: {note}", file=sys.stderr)
    loader = DataLoader(FaceRows(jobs, pre, det, every), batch_size=None, num_workers=min(workers, len(jobs)))
    rows, pending, images, frames, problems = [], [], [], 0, Counter()
    t0 = time.perf_counter()
    with tqdm(total=None, unit="frame", disable=not progress, desc="predict", dynamic_ncols=True) as bar:
        for chunk in loader:
            for r in chunk["rows"]:
                rows.append(r)
                if r["success"]:
                    pending.append(r)
                else:
                    problems[r["problem"].split(" (")[0]] += 1
                if r["face_id"] == 0:
                    frames += 1
                    bar.update(1)
            if chunk["images"] is not None:
                images.append(chunk["images"])
            if len(pending) >= batch:
                _score(rec, pending, images)
                pending, images = [], []
        if pending:
            _score(rec, pending, images)
    seconds = time.perf_counter() - t0
    rows.sort(key=lambda r: (r["order"], r["frame"], r["face_id"]))
    write_table([table_row(r, rec.aus, r.get("probs"), rec.thresholds) for r in rows], target)
    faces = sum(1 for r in rows if r["success"])
    summary = {"inputs": len(jobs), "frames": frames, "faces": faces, "flagged": dict(problems),
               "seconds": seconds, "frames_per_s": frames / max(seconds, 1e-9), "out": str(target)}
    print(f"{len(jobs)} inputs: {frames} frames, {faces} faces scored in {seconds:.1f} s "
          f"({summary['frames_per_s']:.1f} frames/s)"
          + "".join(f"; {n} {why}" for why, n in sorted(problems.items())) + f" -> {target}")
    return summary
