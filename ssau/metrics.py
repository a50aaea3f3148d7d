"""AU metrics as the field reports them, with unknown labels excluded per AU.

- F1 at threshold 0.5 on probabilities, per AU, then the unweighted mean over AUs (an AU with no positive label
  and no positive prediction scores 0, as sklearn's zero_division=0 does); AUC (Mann-Whitney, ties averaged;
  undefined and left out of the mean when an AU has one class only); accuracy.
- The label-distribution gaps of Wang et al. (Sec. 4.2.2, Fig. 5-6), on thresholded predictions vs ground truth:
  marginal = mean over AUs of |P_pred(AU_i) - P_gt(AU_i)|; conditional = mean over ordered pairs i != j of
  |P_pred(AU_i | AU_j) - P_gt(AU_i | AU_j)|, each probability over samples where both AUs are known, pairs where
  AU_j never occurs (in truth or prediction) left out.
"""

from __future__ import annotations

import numpy as np

from ssau.aus import au_name


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = int(labels.sum()), int((1 - labels).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    s = scores[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[labels == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def conditional_matrix(binary: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[J, J] P(AU_i = 1 | AU_j = 1) over samples where both are known; NaN where AU_j never occurs."""
    b = binary.astype(np.float64) * mask
    both = mask.T.astype(np.float64) @ mask  # [J, J] samples with both known
    joint = b.T @ b  # [i, j] count of i and j both on
    cond_on = (mask.T.astype(np.float64) @ b)  # [i, j] count of j on where i known
    with np.errstate(invalid="ignore", divide="ignore"):
        m = joint / cond_on
    m[(cond_on == 0) | (both == 0)] = np.nan
    np.fill_diagonal(m, np.nan)
    return m


def au_metrics(probs: np.ndarray, targets: np.ndarray, mask: np.ndarray, aus: tuple[int, ...],
               threshold: float = 0.5) -> dict:
    """-> {'per_au': {AU01: {f1, auc, acc, n, positives}}, f1_mean, auc_mean, acc_mean, marginal_gap,
    conditional_gap, conditional_gaps ([J, J] array)}."""
    probs, targets, mask = (np.asarray(a, dtype=np.float64) for a in (probs, targets, mask))
    pred = (probs >= threshold).astype(np.float64)
    per = {}
    for j, au in enumerate(aus):
        known = mask[:, j] > 0
        y, p, s = targets[known, j], pred[known, j], probs[known, j]
        tp, fp, fn = (p * y).sum(), (p * (1 - y)).sum(), ((1 - p) * y).sum()
        denom = 2 * tp + fp + fn
        per[au_name(au)] = {"f1": float(2 * tp / denom) if denom else 0.0, "auc": _auc(s, y),
                            "acc": float((p == y).mean()) if known.any() else float("nan"),
                            "n": int(known.sum()), "positives": int(y.sum())}
    known_any = mask.sum(0) > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        p_pred = (pred * mask).sum(0) / mask.sum(0)
        p_gt = (targets * mask).sum(0) / mask.sum(0)
    gaps = np.abs(conditional_matrix(pred, mask) - conditional_matrix(targets, mask))
    nanmean = lambda xs: float(np.nanmean(xs)) if np.isfinite(xs).any() else float("nan")  # noqa: E731
    return {
        "per_au": per,
        "f1_mean": float(np.mean([v["f1"] for v, k in zip(per.values(), known_any) if k])) if known_any.any() else 0.0,
        "auc_mean": nanmean(np.array([v["auc"] for v in per.values()])),
        "acc_mean": nanmean(np.array([v["acc"] for v in per.values()])),
        "marginal_gap": nanmean(np.abs(p_pred - p_gt)[known_any]),
        "conditional_gap": nanmean(gaps),
        "conditional_gaps": gaps,
    }


def format_table(m: dict) -> str:
    """The per-AU table printed by `ssau eval`, `ssau demo` and `ssau cv`."""
    lines = [f"{'AU':<6}{'F1':>7}{'AUC':>7}{'Acc':>7}{'n':>8}{'pos':>7}"]
    for name, v in m["per_au"].items():
        lines.append(f"{name:<6}{100 * v['f1']:7.1f}{100 * v['auc']:7.1f}{100 * v['acc']:7.1f}{v['n']:8d}"
                     f"{v['positives']:7d}")
    lines.append(f"{'mean':<6}{100 * m['f1_mean']:7.1f}{100 * m['auc_mean']:7.1f}{100 * m['acc_mean']:7.1f}")
    lines.append(f"marginal gap {m['marginal_gap']:.4f}   conditional gap {m['conditional_gap']:.4f}")
    return "\n".join(lines)
