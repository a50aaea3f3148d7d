"""Peak memory of the landmark parser on a large OpenFace CSV (issue 25).

Two steps, each its own process so that writing the file does not count against parsing it:

    python -m ssau.bench.landmarks write /tmp/lm.csv --rows 400000      # ~420 MB, OpenFace's 2D columns
    /usr/bin/time -v python -m ssau.bench.landmarks read /tmp/lm.csv     # "Maximum resident set size"

``read`` parses the whole file as ``ssau predict`` does (``landmark_rows``: every frame kept) and prints the file's
size, the frames read, the seconds and this process's peak RSS (``ru_maxrss``), so the figure is there without
``time`` too. A baseline for the interpreter and imports: ``read --rows-only 0`` parses nothing.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np

from ssau.shard.landmarks import landmark_rows


def write(path: Path, rows: int, seed: int = 0) -> None:
    """An OpenFace FeatureExtraction-like CSV: frame, face_id, timestamp, confidence, success, x_0..67, y_0..67."""
    g = np.random.default_rng(seed)
    header = ["frame", "face_id", "timestamp", "confidence", "success"] + [f"x_{i}" for i in range(68)] + \
        [f"y_{i}" for i in range(68)]
    with open(path, "w") as f:
        f.write(", ".join(header) + "\n")
        for start in range(0, rows, 10_000):  # in blocks: the writer's memory stays small too
            n = min(10_000, rows - start)
            frames = np.arange(start + 1, start + n + 1)
            block = np.column_stack([frames, np.zeros(n), frames / 25, np.full(n, 0.98), np.ones(n),
                                     g.uniform(0, 640, (n, 136))])
            np.savetxt(f, block, fmt=["%d", "%d", "%.3f", "%.2f", "%d"] + ["%.2f"] * 136, delimiter=", ")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=["write", "read"])
    p.add_argument("csv", type=Path)
    p.add_argument("--rows", type=int, default=400_000)
    p.add_argument("--rows-only", type=int, default=-1, help="read: 0 parses nothing (the process's baseline)")
    args = p.parse_args()
    if args.step == "write":
        write(args.csv, args.rows)
        print(f"{args.csv}: {args.csv.stat().st_size / 2**20:.0f} MiB, {args.rows} rows")
        return
    t0 = time.perf_counter()
    frames = 0 if args.rows_only == 0 else len(landmark_rows(args.csv))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.csv}: {args.csv.stat().st_size / 2**20:.0f} MiB, {frames} frames parsed in "
          f"{time.perf_counter() - t0:.1f} s, peak RSS {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
