"""Face benchmark: `python -m ssau.bench.faces [--frames N] [--size PX] [--align PX] [--out DIR]`.

On the realistic synthetic corpus (head-and-shoulders frames with OpenFace landmark CSVs), one shard worker:
  pass-through        ssau shard as before (frames stored as they are)
  align, landmarks    --landmarks ... --align SIZE: decode, similarity transform, warp, encode
  align, detector     --align SIZE without landmarks: the Haar cascade finds every face (a box)
  align, dlib         --align SIZE --detector dlib: dlib's face and 68 landmarks per frame (the [faces] extra)
  flow                --align SIZE --flow 3: TV-L1 per pair (pairs/s), on top of the alignment
Every figure comes from one run and is also given as a ratio to pass-through in that run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from ssau.faces.detect import available as detector_available
from ssau.shard.plan import run_shard
from ssau.shard.write import ShardSettings
from ssau.synth.corpus import render_corpus
from ssau.synth.faces import SynthSettings


def _timed(fn) -> tuple[float, dict]:
    t = time.perf_counter()
    doc = fn()
    return time.perf_counter() - t, doc


def run(frames: int, size: int, align: int, work: Path) -> dict:
    subjects = max(3, min(41, frames // 40))
    render_corpus(work / "corpus", SynthSettings(subjects=subjects, tasks=1, frames=-(-frames // subjects), size=size,
                                                 expression_images=0, unlabelled=0, style="realistic"),
                  workers=2, progress=False)
    bp4d = work / "corpus" / "bp4d"
    base = dict(format="bp4d", images=str(bp4d), labels=str(bp4d), shard_size=100)
    lm = dict(landmarks=str(bp4d / "landmarks"), landmark_frames="position")
    cases = {
        "pass_through": ShardSettings(**base),
        "align_landmarks": ShardSettings(**base, **lm, align=align),
        "align_detector": ShardSettings(**base, align=align, detector="haar"),
        "align_landmarks_flow3": ShardSettings(**base, **lm, align=align, flow=3),
    }
    if detector_available():
        cases["align_dlib"] = ShardSettings(**base, align=align, detector="dlib")
    out = {"frames": sum(1 for _ in bp4d.rglob("*.jpg")), "frame_size": f"{size}x{round(size * 1.25)}",
           "align": align, "workers": 1}
    for name, s in cases.items():
        seconds, doc = _timed(lambda s=s, name=name: run_shard(s, work / name, workers=1, progress=False))
        out[f"{name}_img_s"] = doc["samples"] / seconds
        out[f"{name}_aligned_by"] = doc["faces"]["aligned_by"]
        if s.flow:
            pairs = doc["faces"]["flow"]["pairs"]
            # pairs/s of the flow itself: this run's time less the same alignment without flow
            align_only = doc["samples"] / out["align_landmarks_img_s"]
            out["flow_pairs"] = pairs
            out["flow_pairs_s"] = pairs / max(seconds - align_only, 1e-9)
    for name in cases:
        out[f"{name}_vs_pass_through"] = out[f"{name}_img_s"] / out["pass_through_img_s"]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=240)
    p.add_argument("--size", type=int, default=256, help="frame width (height = 1.25 x width)")
    p.add_argument("--align", type=int, default=200, help="aligned face side (RTATL: 200)")
    p.add_argument("--out", help="keep the corpus and shards here (default: a temporary directory)")
    a = p.parse_args(argv)
    work = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="ssau-bench-faces-"))
    try:
        print(json.dumps(run(a.frames, a.size, a.align, work), indent=1))
    finally:
        if not a.out:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
