"""AU metrics as the field reports them, with unknown labels excluded per AU (per pair of AUs for conditionals).

- F1 at threshold 0.5 on probabilities, per AU, then the unweighted mean over AUs (an AU with no positive label
  and no positive prediction scores 0, as sklearn's zero_division=0 does); AUC (Mann-Whitney, ties averaged;
  undefined and left out of the mean when an AU has one class only); accuracy. Per-AU thresholds chosen on the
  AU validation split (``f1_thresholds``) are an option reported apart; 0.5 stays the reported default.
- The label-distribution gaps of Wang et al. (paper 000, Sec. 4.2.2, Fig. 5-6), thresholded predictions against
  ground truth:
  - marginals: ``P(AU_i = 1)`` over the samples where AU_i is known, predicted (``p_pred``) and true (``p_true``);
    ``marginal_gap`` = mean over AUs with a known label of ``|p_pred - p_true|`` (Fig. 5b).
  - conditionals: ``P(AU_i = 1 | AU_j = 1)`` over the samples where both AU_i and AU_j are known, for the
    prediction and for the truth; ``conditional_gap`` = mean of the J x J matrix ``|P_pred(i|j) - P_gt(i|j)|``
    over *all* J*J entries, diagonal included (P(i|i) = 1 in both, so its gap is 0). This is how the paper's
    0.054 / 0.056 come out of its Fig. 6 matrices; the off-diagonal mean is J/(J-1) times larger.
  - undefined conditionals: where AU_j never occurs among the samples where both are known (in the truth or in
    the prediction, counted separately), the conditional is "P(i and j) / P(j)" with 0/0 := 0. So the pair set is
    the same J*J entries in every run, and a model that never predicts AU_j is charged ``|0 - P_gt(i|j)|`` for
    each i. ``conditional_pairs`` (J*J) and ``conditional_undefined_pred`` / ``conditional_undefined_true`` (how
    many off-diagonal entries were undefined; the diagonal is 1 by definition) say how much of the mean rests on
    the rule.
- ``figures``: F1 bars, the Fig. 5-style marginal bars and the Fig. 6-style conditional heatmaps (true,
  predicted, gap) for ``ssau.tracking.artifacts.eval_artifacts``.
"""

from __future__ import annotations

import math
import statistics

import numpy as np

from ssau.aus import au_name


def sample_std(xs) -> float:
    """The spread every report of ssau gives (``ssau cv`` over folds, ``ssau compare`` over seeds): the sample
    standard deviation, ddof=1; NaN for fewer than two values, where it is undefined."""
    xs = [float(x) for x in xs]
    return statistics.stdev(xs) if len(xs) > 1 else math.nan


def standard_error(xs) -> float:
    """The standard error of a mean: ``sample_std / sqrt(n)``; NaN for fewer than two values."""
    xs = list(xs)
    return sample_std(xs) / math.sqrt(len(xs)) if len(xs) > 1 else math.nan


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
    """[J, J] P(AU_i = 1 | AU_j = 1) over samples where both are known; NaN (off the diagonal) where AU_j never
    occurs among them; the diagonal is 1 by definition."""
    known = mask.astype(np.float64)
    b = binary.astype(np.float64) * known
    joint = b.T @ b  # [i, j] samples with i and j both on (and so both known)
    cond_on = known.T @ b  # [i, j] samples with j on where i is known
    with np.errstate(invalid="ignore", divide="ignore"):
        m = joint / cond_on
    m[cond_on == 0] = np.nan
    np.fill_diagonal(m, 1.0)
    return m


def conditional_gap(pred: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> dict:
    """The conditional-distribution comparison of paper 000 Fig. 6 with the module's rule for undefined entries."""
    c_pred, c_true = conditional_matrix(pred, mask), conditional_matrix(targets, mask)
    undefined_pred, undefined_true = int(np.isnan(c_pred).sum()), int(np.isnan(c_true).sum())
    c_pred, c_true = np.nan_to_num(c_pred, nan=0.0), np.nan_to_num(c_true, nan=0.0)  # 0/0 := 0
    gaps = np.abs(c_pred - c_true)
    return {"conditional_gap": float(gaps.mean()) if gaps.size else float("nan"), "conditional_gaps": gaps,
            "conditional_pred": c_pred, "conditional_true": c_true, "conditional_pairs": int(gaps.size),
            "conditional_undefined_pred": undefined_pred, "conditional_undefined_true": undefined_true}


def au_metrics(probs: np.ndarray, targets: np.ndarray, mask: np.ndarray, aus: tuple[int, ...],
               threshold: float | np.ndarray = 0.5) -> dict:
    """-> {'per_au': {AU01: {f1, auc, acc, n, positives, p_pred, p_true}}, f1_mean, auc_mean, acc_mean,
    marginal_gap, conditional_gap, conditional_gaps / conditional_pred / conditional_true ([J, J] arrays),
    conditional_pairs, conditional_undefined_pred, conditional_undefined_true}. ``threshold``: one for every AU, or
    [J] per AU (``f1_thresholds``)."""
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
                            "n": int(known.sum()), "positives": int(y.sum()),
                            "p_pred": float(p.mean()) if known.any() else float("nan"),
                            "p_true": float(y.mean()) if known.any() else float("nan")}
    known_any = mask.sum(0) > 0
    p_pred = np.array([v["p_pred"] for v in per.values()])
    p_true = np.array([v["p_true"] for v in per.values()])
    nanmean = lambda xs: float(np.nanmean(xs)) if np.isfinite(xs).any() else float("nan")  # noqa: E731
    return {
        "per_au": per,
        "f1_mean": float(np.mean([v["f1"] for v, k in zip(per.values(), known_any) if k])) if known_any.any() else 0.0,
        "auc_mean": nanmean(np.array([v["auc"] for v in per.values()])),
        "acc_mean": nanmean(np.array([v["acc"] for v in per.values()])),
        "marginal_gap": nanmean(np.abs(p_pred - p_true)[known_any]),
    } | conditional_gap(pred, targets, mask)


def f1_thresholds(probs: np.ndarray, targets: np.ndarray, mask: np.ndarray, default: float = 0.5) -> np.ndarray:
    """[J] per AU, the threshold that maximises that AU's F1 over the samples where it is known (``train.thresholds
    =val``: chosen on the AU validation split, applied to the held-out fold). A sample is positive at ``p >= t``.
    The candidates are the cuts between consecutive distinct scores: the midpoint between the lowest score predicted
    positive and the next lower one (half the lowest score when all are positive), so the choice does not sit on a
    validation sample's own score. Equal F1: the candidate nearest ``default``. An AU without a known positive (F1 0
    whatever the threshold) keeps ``default``."""
    probs, targets, mask = (np.asarray(a, dtype=np.float64) for a in (probs, targets, mask))
    out = np.full(probs.shape[1], float(default))
    for j in range(probs.shape[1]):
        known = mask[:, j] > 0
        s, y = probs[known, j], targets[known, j]
        if not y.sum():
            continue
        order = np.argsort(-s, kind="mergesort")
        s, y = s[order], y[order]
        last = np.flatnonzero(np.append(s[1:] != s[:-1], True))  # the last sample of each distinct score, descending
        tp, predicted = np.cumsum(y)[last], last + 1.0
        f1 = 2 * tp / (predicted + y.sum())  # equal ratios of whole numbers are equal floats: ties are exact
        lower = np.append(s[last[1:]], 0.0)  # the next lower distinct score (0 below the lowest)
        cuts = (s[last] + lower) / 2
        best = np.flatnonzero(f1 == f1.max())
        out[j] = cuts[best[np.argmin(np.abs(cuts[best] - default))]]
    return out


def view_metrics(views: dict[str, np.ndarray], targets: np.ndarray, mask: np.ndarray, aus: tuple[int, ...],
                 threshold: float = 0.5) -> dict:
    """Scores of a multi-view method's views (MLCR's twins): each view's au_metrics, ``f1_views`` (the mean of the
    views' per-AU F1, averaged over AUs: MLCR's headline, Sec. 4.1.3) and, for two views, the inconsistency rate
    (paper 001 Fig. 3a): per AU the fraction of images on which the views' 0/1 predictions differ (all images,
    labels known or not), its mean over AUs, and the fraction of images with any AU differing."""
    per_view = {name: au_metrics(p, targets, mask, aus, threshold) for name, p in views.items()}
    out = {"views": per_view, "f1_views": float(np.mean([m["f1_mean"] for m in per_view.values()]))}
    if len(views) == 2:
        a, b = ((np.asarray(p) >= threshold) for p in views.values())
        differ = a != b
        out["inconsistency"] = {au_name(au): float(differ[:, j].mean()) if len(differ) else float("nan")
                                for j, au in enumerate(aus)}
        out["inconsistency_mean"] = float(differ.mean()) if differ.size else float("nan")
        out["inconsistency_any"] = float(differ.any(1).mean()) if len(differ) else float("nan")
    return out


def expression_metrics(probs: np.ndarray, labels: np.ndarray, names: tuple[str, ...]) -> dict:
    """Scores of a mutually exclusive expression task (RAF-DB's two accuracies, paper 003 Sec. 4.3): ``acc`` over
    all images, ``mean_class_acc`` the mean of the confusion matrix's diagonal (per-class recall) over the classes
    present, ``per_class`` {name: {acc, n}} (acc nan for a class with no image), ``confusion`` [C, C] counts (row:
    true class, column: predicted)."""
    labels = np.asarray(labels, dtype=np.int64)
    pred = np.asarray(probs).argmax(1) if len(labels) else np.zeros(0, dtype=np.int64)
    C = len(names)
    confusion = np.zeros((C, C), dtype=np.int64)
    np.add.at(confusion, (labels, pred), 1)
    n = confusion.sum(1)
    per = {name: {"acc": float(confusion[c, c] / n[c]) if n[c] else float("nan"), "n": int(n[c])}
           for c, name in enumerate(names)}
    present = n > 0
    return {"acc": float(np.trace(confusion) / len(labels)) if len(labels) else float("nan"),
            "mean_class_acc": float(np.mean(np.diag(confusion)[present] / n[present])) if present.any() else float("nan"),
            "per_class": per, "confusion": confusion}


def format_expression_table(m: dict) -> str:
    """The per-class table of an expression evaluation."""
    lines = [f"{'class':<10}{'Acc %':>7}{'n':>7}"]
    lines += [f"{name:<10}{100 * v['acc']:7.1f}{v['n']:7d}" for name, v in m["per_class"].items()]
    lines.append(f"accuracy {100 * m['acc']:.1f} %   mean class accuracy {100 * m['mean_class_acc']:.1f} %")
    return "\n".join(lines)


def format_table(m: dict) -> str:
    """The per-AU table printed by `ssau eval`, `ssau demo` and `ssau cv`."""
    lines = [f"{'AU':<6}{'F1 %':>7}{'AUC %':>7}{'Acc %':>7}{'n':>8}{'pos':>7}"]
    for name, v in m["per_au"].items():
        lines.append(f"{name:<6}{100 * v['f1']:7.1f}{100 * v['auc']:7.1f}{100 * v['acc']:7.1f}{v['n']:8d}"
                     f"{v['positives']:7d}")
    lines.append(f"{'mean':<6}{100 * m['f1_mean']:7.1f}{100 * m['auc_mean']:7.1f}{100 * m['acc_mean']:7.1f}")
    lines.append(f"marginal gap {m['marginal_gap']:.4f}   conditional gap {m['conditional_gap']:.4f} "
                 f"({m['conditional_pairs']} pairs; undefined, taken as 0: {m['conditional_undefined_true']} true, "
                 f"{m['conditional_undefined_pred']} predicted)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- figures
def figures(m: dict, aus_names: list[str]) -> dict:
    """{file name: matplotlib Figure} for one evaluation: f1_bar.png, marginal.png (paper 000 Fig. 5: true vs
    predicted marginal per AU, and their absolute difference), conditional.png (Fig. 6: the true and predicted
    conditional matrices and their gap). The caller saves and closes them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per, x = m["per_au"], np.arange(len(aus_names))
    out = {}
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(aus_names)), 3))
    ax.bar(aus_names, [100 * per[a]["f1"] for a in aus_names], color="#4477aa")
    ax.axhline(100 * m["f1_mean"], color="k", lw=1, ls="--", label=f"mean {100 * m['f1_mean']:.1f}")
    ax.set_ylabel("F1 (%)")
    ax.set_ylim(0, 100)
    ax.legend(loc="upper right")
    ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    out["f1_bar.png"] = fig

    p_true = np.array([per[a]["p_true"] for a in aus_names])
    p_pred = np.array([per[a]["p_pred"] for a in aus_names])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(5, 0.6 * len(aus_names)), 5.5), sharex=True)
    top.bar(x - 0.2, p_true, 0.4, label="ground truth", color="#999999")
    top.bar(x + 0.2, p_pred, 0.4, label="predicted", color="#4477aa")
    top.set_ylabel("P(AU = 1)")
    top.set_ylim(0, 1)
    top.legend(loc="upper right", fontsize=8)
    top.set_title("marginal distribution per AU")
    bottom.bar(x, np.abs(p_pred - p_true), 0.5, color="#cc6677")
    bottom.set_ylabel("|P_pred - P_gt|")
    bottom.set_title(f"absolute difference (mean {m['marginal_gap']:.3f})")
    bottom.set_xticks(x, aus_names, rotation=60)
    fig.tight_layout()
    out["marginal.png"] = fig

    gaps = m["conditional_gaps"]
    width = max(12.0, 1.2 * len(aus_names))
    fig, axes = plt.subplots(1, 3, figsize=(width, width / 3.2 + 0.4))
    panels = ((m["conditional_true"], f"P_gt(i|j) ({m['conditional_undefined_true']} undefined -> 0)", 1.0),
              (m["conditional_pred"], f"P_pred(i|j) ({m['conditional_undefined_pred']} undefined -> 0)", 1.0),
              (gaps, f"|P_pred - P_gt|, mean {m['conditional_gap']:.3f} over {m['conditional_pairs']}",
               max(float(gaps.max()) if gaps.size else 0.0, 1e-6)))
    for ax, (mat, title, vmax) in zip(axes, panels):
        im = ax.imshow(mat, vmin=0, vmax=vmax, cmap="viridis")
        ax.set_xticks(x, aus_names, rotation=90, fontsize=7)
        ax.set_yticks(x, aus_names, fontsize=7)
        ax.set_xlabel("given AU j")
        ax.set_ylabel("AU i")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if len(aus_names) <= 16:  # the paper prints every gap in its cell
        for i in range(len(aus_names)):
            for j in range(len(aus_names)):
                axes[2].text(j, i, f"{gaps[i, j]:.2f}", ha="center", va="center", fontsize=5,
                             color="w" if gaps[i, j] < 0.6 * panels[2][2] else "k")
    fig.tight_layout()
    out["conditional.png"] = fig
    return out
