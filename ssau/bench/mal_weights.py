"""MAL's expression-sample weights against the synthetic corpus's ground truth:
`python -m ssau.bench.mal_weights RUN_DIR --ambiguous demo/corpus/rafdb/ambiguous.txt`.

Reads the ``expression_weights.csv`` tables a MAL run wrote under RUN_DIR/eval/step-N/ (the weight the updated meta
net gave every expression sample in base-learning) and the list of ambiguous images ``ssau synth`` rendered (a
face that does not show its label). Prints, for the first and the last quarter of training, the mean weight of
clean and ambiguous samples and P(w_clean > w_ambiguous) over all pairs (0.5: the weights do not tell them apart;
1: every clean sample outweighs every ambiguous one), then the mean weight per expression class.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np


def separation(clean: np.ndarray, ambiguous: np.ndarray) -> float:
    """P(a clean sample's weight > an ambiguous one's), ties counted half (the Mann-Whitney AUC)."""
    if not len(clean) or not len(ambiguous):
        return float("nan")
    both = np.concatenate([clean, ambiguous])
    order = both.argsort(kind="mergesort")
    ranks = np.empty(len(both))
    ranks[order] = np.arange(1, len(both) + 1)
    for v in np.unique(both):  # average ranks of ties
        tie = both == v
        ranks[tie] = ranks[tie].mean()
    return float((ranks[:len(clean)].sum() - len(clean) * (len(clean) + 1) / 2) / (len(clean) * len(ambiguous)))


def read_rows(run: Path) -> list[dict]:
    rows = []
    for path in sorted(run.glob("eval/step-*/expression_weights.csv")):
        with open(path, newline="") as f:
            rows += list(csv.DictReader(f))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--ambiguous", type=Path, required=True, help="rafdb/ambiguous.txt from ssau synth")
    args = ap.parse_args(argv)
    rows = read_rows(args.run)
    if not rows:
        print(f"{args.run}: no eval/step-*/expression_weights.csv (is it a mal run?)", file=sys.stderr)
        return 2
    names = {Path(line.strip()).stem for line in args.ambiguous.read_text().splitlines() if line.strip()}
    step = np.array([int(r["step"]) for r in rows])
    w = np.array([float(r["weight"]) for r in rows])
    amb = np.array([r["key"] in names for r in rows])
    last = step.max()
    print(f"{args.run.name}: {len(rows)} expression-sample weights over {last + 1} steps, "
          f"{amb.mean():.1%} of them ambiguous images")
    for label, sel in (("first quarter", step < (last + 1) / 4), ("last quarter", step >= 3 * (last + 1) / 4)):
        c, a = w[sel & ~amb], w[sel & amb]
        print(f"  {label:<14} mean weight clean {c.mean():.4f}  ambiguous {a.mean():.4f}  "
              f"P(w_clean > w_ambiguous) {separation(c, a):.3f}")
    groups = np.array([r["group"] for r in rows])
    late = step >= 3 * (last + 1) / 4
    print("  last quarter, per class: " + "  ".join(
        f"{g} {w[late & (groups == g)].mean():.4f}" for g in sorted(set(groups.tolist())) if (late & (groups == g)).any()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
