"""The report of `ssau compare`: per method and label drop, mean +- std over seeds; the paired difference to the
baseline; per-AU F1; F1 against label drop (paper 000, Fig. 4). Tables, CSV and PNG artifacts, parent metrics.

A seed's value is the mean over the folds run for it. The std over seeds is the sample std (ddof=1; undefined for one
seed). The paired difference takes, for each seed that both the method and the baseline have (same seed, same label
drop, over the folds both have), method minus baseline; its standard error is std(ddof=1) / sqrt(n), undefined for
one pair. Undefined values are empty in the CSVs, "-" in the printed table and not logged as metrics.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ssau.io import atomic_file, atomic_write
from ssau.metrics import sample_std, standard_error

# short name (CSV column, metric name) -> the child run's metric
METRICS = {"f1": "val/f1_mean", "auc": "val/auc_mean", "acc": "val/acc_mean", "marginal_gap": "val/marginal_gap",
           "conditional_gap": "val/conditional_gap"}
# Reported only when a compared method logs them (MLCR): the mean of the views' F1 (a single-view method's is its
# F1, so the paired difference to the baseline is defined) and the views' inconsistency rate; F1 at per-AU thresholds
# chosen on the AU validation split (train.thresholds=val).
EXTRA = {"f1_views": "val/f1_views", "inconsistency": "val/inconsistency_mean", "f1_valthr": "val/f1_valthr_mean"}
HEADS = {"f1": "F1", "auc": "AUC", "acc": "Acc", "marginal_gap": "marginal gap", "conditional_gap": "cond. gap",
         "f1_views": "F1 views", "inconsistency": "inconsistency", "f1_valthr": "F1 val-thr"}
NAN = float("nan")


@dataclass
class Report:
    methods: tuple[str, ...]
    drops: tuple[float, ...]
    baseline: str
    summary: list[dict] = field(default_factory=list)  # method, label_drop, n_seeds, <m>_mean, <m>_std
    paired: list[dict] = field(default_factory=list)  # method, baseline, label_drop, n_pairs, seeds, <m>_diff, _se
    per_au: list[dict] = field(default_factory=list)  # method, label_drop, au, n_seeds, f1_mean, f1_std
    per_seed: dict = field(default_factory=dict)  # (method, drop) -> {seed: {short or "f1/<AU>": value}}
    keys: tuple[str, ...] = tuple(METRICS)  # METRICS, then the EXTRA ones some cell logged


def _drop_key(p: float) -> str:
    return f"{p:g}"


def _fold_means(results: list[dict]) -> dict:
    """(method, drop key, seed) -> {fold: {short or "f1/<AU>": value}}"""
    out: dict = {}
    for r in results:
        m = r["metrics"]
        values = {k: m[v] for k, v in (METRICS | EXTRA).items() if v in m}
        values.update({"f1/" + k[len("val/f1/"):]: v for k, v in m.items() if k.startswith("val/f1/")})
        out.setdefault((r["method"], _drop_key(r["drop"]), r["seed"]), {})[r["fold"]] = values
    return out


def _seed_value(folds: dict, key: str, only: set | None = None) -> float:
    xs = [v[key] for k, v in folds.items() if (only is None or k in only) and key in v]
    return statistics.fmean(xs) if xs else NAN


def summarize(results: list[dict], methods: tuple[str, ...], drops: tuple[float, ...], baseline: str) -> Report:
    """``results``: one dict per evaluated cell: method, seed, drop, fold, metrics (the child's val/* metrics)."""
    cells = _fold_means(results)
    extra = tuple(k for k in EXTRA if any(k in v for f in cells.values() for v in f.values()))
    if "f1_views" in extra:
        for f in cells.values():
            for v in f.values():
                if "f1" in v:
                    v.setdefault("f1_views", v["f1"])
    rep = Report(tuple(methods), tuple(drops), baseline, keys=(*METRICS, *extra))
    aus = sorted({k[3:] for f in cells.values() for v in f.values() for k in v if k.startswith("f1/")})
    for p in drops:
        d = _drop_key(p)
        for method in methods:
            seeds = sorted(s for (m, dk, s) in cells if m == method and dk == d)
            per_seed = {s: {k: _seed_value(cells[(method, d, s)], k) for k in [*rep.keys, *("f1/" + a for a in aus)]}
                        for s in seeds}
            rep.per_seed[(method, d)] = per_seed
            row = {"method": method, "label_drop": p, "n_seeds": len(seeds)}
            for k in rep.keys:
                xs = [v[k] for v in per_seed.values() if not math.isnan(v[k])]
                row[f"{k}_mean"], row[f"{k}_std"] = (statistics.fmean(xs) if xs else NAN), sample_std(xs)
            rep.summary.append(row)
            for a in aus:
                xs = [v["f1/" + a] for v in per_seed.values() if not math.isnan(v["f1/" + a])]
                rep.per_au.append({"method": method, "label_drop": p, "au": a, "n_seeds": len(xs),
                                   "f1_mean": statistics.fmean(xs) if xs else NAN, "f1_std": sample_std(xs)})
            if method == baseline:
                continue
            pairs = sorted(s for s in seeds if (baseline, d, s) in cells)
            row = {"method": method, "baseline": baseline, "label_drop": p, "n_pairs": len(pairs),
                   "seeds": " ".join(map(str, pairs))}
            for k in rep.keys:
                diffs = []
                for s in pairs:  # the same folds on both sides: a missing fold must not bias one side
                    mine, theirs = cells[(method, d, s)], cells[(baseline, d, s)]
                    common = set(mine) & set(theirs)
                    diffs.append(_seed_value(mine, k, common) - _seed_value(theirs, k, common))
                diffs = [x for x in diffs if not math.isnan(x)]
                row[f"{k}_diff"] = statistics.fmean(diffs) if diffs else NAN
                row[f"{k}_diff_se"] = standard_error(diffs)
            rep.paired.append(row)
    return rep


def parent_metrics(rep: Report) -> dict[str, float]:
    """cmp/<method>/drop<p>/<metric>_mean, _std, _diff, _diff_se, n_seeds, f1/<AU>."""
    out = {}
    for row in rep.summary:
        base = f"cmp/{row['method']}/drop{_drop_key(row['label_drop'])}"
        out[f"{base}/n_seeds"] = row["n_seeds"]
        for k in rep.keys:
            out[f"{base}/{k}_mean"], out[f"{base}/{k}_std"] = row[f"{k}_mean"], row[f"{k}_std"]
    for row in rep.paired:
        base = f"cmp/{row['method']}/drop{_drop_key(row['label_drop'])}"
        out[f"{base}/n_pairs"] = row["n_pairs"]
        for k in rep.keys:
            out[f"{base}/{k}_diff"], out[f"{base}/{k}_diff_se"] = row[f"{k}_diff"], row[f"{k}_diff_se"]
    for row in rep.per_au:
        out[f"cmp/{row['method']}/drop{_drop_key(row['label_drop'])}/f1/{row['au']}"] = row["f1_mean"]
    return {k: float(v) for k, v in out.items() if not math.isnan(v)}


# ---------------------------------------------------------------------------------------------------- artifacts
def _write_csv(path: Path, rows: list[dict]) -> Path:
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else ["method"])
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if isinstance(v, float) and math.isnan(v) else
                    (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return atomic_write(path, text.getvalue().encode())


def write_artifacts(rep: Report, folder: Path) -> list[Path]:
    """summary.csv, paired.csv, per_au.csv, f1_vs_label_drop.png, per_au_f1.png under ``folder``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = [_write_csv(folder / "summary.csv", rep.summary), _write_csv(folder / "paired.csv", rep.paired),
             _write_csv(folder / "per_au.csv", rep.per_au)]

    def save(fig, path: Path) -> Path:
        fig.tight_layout()
        with atomic_file(path) as f:
            fig.savefig(f, dpi=100, format="png")
        plt.close(fig)
        return path

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for method in rep.methods:
        rows = sorted((r for r in rep.summary if r["method"] == method and r["n_seeds"]), key=lambda r: r["label_drop"])
        ax.errorbar([100 * r["label_drop"] for r in rows], [100 * r["f1_mean"] for r in rows],
                    yerr=[0 if math.isnan(r["f1_std"]) else 100 * r["f1_std"] for r in rows], marker="o",
                    capsize=3, label=method)
    ax.set_xlabel("labels dropped (%)")
    ax.set_ylabel("F1 (%), mean +- std (ddof 1) over seeds")
    ax.legend(fontsize=8)
    paths.append(save(fig, folder / "f1_vs_label_drop.png"))

    aus = sorted({r["au"] for r in rep.per_au})
    fig, axes = plt.subplots(len(rep.drops), 1, figsize=(max(5, 0.6 * len(aus) * max(1, len(rep.methods)) / 2),
                                                         3 * len(rep.drops)), squeeze=False)
    width = 0.8 / max(1, len(rep.methods))
    for ax, p in zip(axes[:, 0], rep.drops):
        for j, method in enumerate(rep.methods):
            f1 = {r["au"]: r["f1_mean"] for r in rep.per_au if r["method"] == method and r["label_drop"] == p}
            ax.bar([i + j * width for i in range(len(aus))], [100 * f1.get(a, NAN) for a in aus], width, label=method)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(aus))], aus, rotation=60)
        ax.set_ylabel("F1 (%)")
        ax.set_title(f"label drop {_drop_key(p)}", fontsize=9)
        ax.legend(fontsize=7)
    paths.append(save(fig, folder / "per_au_f1.png"))
    return paths


# ---------------------------------------------------------------------------------------------------- printing
def _pm(mean: float, spread: float, sign: str = "") -> str:
    if math.isnan(mean):
        return f"{'-':>13}"
    return f"{100 * mean:{sign}6.1f} ± " + (f"{'-':>4}" if math.isnan(spread) else f"{100 * spread:4.1f}")


def format_report(rep: Report) -> str:
    """The summary (mean ± std over seeds) and paired (mean ± SE) tables, in percentage points."""
    heads = "".join(f"{HEADS[k]:>15}" for k in rep.keys)
    lines = ["mean ± std over seeds (%; std: sample std, ddof 1):", f"{'method':<22}{'drop':>6}{'seeds':>6}{heads}"]
    for r in rep.summary:
        lines.append(f"{r['method']:<22}{_drop_key(r['label_drop']):>6}{r['n_seeds']:>6}"
                     + "".join(f"  {_pm(r[f'{k}_mean'], r[f'{k}_std'])}" for k in rep.keys))
    if rep.paired:
        lines += [f"paired difference to {rep.baseline}, mean ± standard error over seeds (points):",
                  f"{'method':<22}{'drop':>6}{'pairs':>6}{heads}"]
        for r in rep.paired:
            lines.append(f"{r['method']:<22}{_drop_key(r['label_drop']):>6}{r['n_pairs']:>6}"
                         + "".join(f"  {_pm(r[f'{k}_diff'], r[f'{k}_diff_se'], '+')}" for k in rep.keys))
    return "\n".join(lines)
