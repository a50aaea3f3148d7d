"""The files a run writes for people to look at: per-AU CSV and figures of an evaluation, and the tables a
method reports (MAL's sample weights). Each is written under a temporary name in its folder, then renamed."""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ssau.io import atomic_file
from ssau.metrics import figures
from ssau.tracking.tracker import Tracker

PER_AU_COLUMNS = ("f1", "auc", "acc", "n", "positives", "p_pred", "p_true")  # per_au.csv after the AU name

def _write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """``write(binary file)`` through ``ssau.io.atomic_file``: a reader (or an artifact upload after a crash) sees
    the old file or the new one, never half of one."""
    with atomic_file(path) as f:
        write(f)
    return path


def _save_png(fig, path: Path) -> Path:
    """A matplotlib figure laid out, written atomically as PNG, and closed."""
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        return _write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)


def eval_artifacts(m: dict, aus_names: list[str], folder: Path) -> list[Path]:
    """per_au.csv (with both marginals) and per_au.json (the same, as an MLflow table), f1_bar.png, marginal.png
    (paper 000 Fig. 5) and conditional.png (Fig. 6: true, predicted and gap matrices) for one evaluation, each
    written atomically; returns the paths written. Values are fractions (0-1), as in MLflow."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".*.tmp-*"):  # left by a process killed mid-write; never a finished artifact
        stale.unlink(missing_ok=True)
    fmt = lambda v: f"{v:.6f}" if isinstance(v, float) else str(v)  # noqa: E731
    rows = [",".join(("au",) + PER_AU_COLUMNS)]
    rows += [",".join([k] + [fmt(v[c]) for c in PER_AU_COLUMNS]) for k, v in m["per_au"].items()]
    out = [_write_atomic(folder / "per_au.csv", lambda f: f.write(("\n".join(rows) + "\n").encode()))]
    # The same table as MLflow's log_table writes it (pandas orient="split"): the UI's table view and
    # MlflowClient.load_table read per_au.json of several runs together.
    table = {"columns": ["au", *PER_AU_COLUMNS],
             "data": [[k] + [None if isinstance(v[c], float) and not np.isfinite(v[c]) else v[c] for c in PER_AU_COLUMNS]
                      for k, v in m["per_au"].items()]}
    out.append(_write_atomic(folder / "per_au.json", lambda f: f.write(json.dumps(table).encode())))
    figs = figures(m, aus_names)
    import matplotlib.pyplot as plt  # after figures() chose the Agg backend

    try:
        for name, fig in figs.items():
            out.append(_write_atomic(folder / name, lambda f, fig=fig: fig.savefig(f, format="png", dpi=100)))
    finally:
        for fig in figs.values():
            plt.close(fig)
    return out


def result_artifacts(m: dict, aus_names: list[str], folder: Path) -> list[Path]:
    """The files of a run's last evaluation: ``eval_artifacts`` for the AU task, ``expression_artifacts`` for the
    expression task, whichever it has."""
    out = eval_artifacts(m, aus_names, folder) if "per_au" in m else []
    return out + (expression_artifacts(m["expression"], folder) if "expression" in m else [])


def cv_artifacts(folds: list[dict], folder: Path) -> list[Path]:
    """For the parent run of ``ssau cv``: per_au.csv and per_au.json (one row per AU and fold: F1, AUC, accuracy, as
    fractions) and per_au_f1.png, a grouped per-AU bar chart with one bar per fold and the mean over folds (+- std),
    so the parent shows its children's per-AU results side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    aus = list(folds[0]["per_au"])
    clean = lambda v: float(v) if np.isfinite(v) else None  # noqa: E731
    data = [[au, k, *(clean(m["per_au"][au][c]) for c in ("f1", "auc", "acc"))]
            for k, m in enumerate(folds, 1) for au in aus]
    text = "au,fold,f1,auc,acc\n" + "".join(",".join("" if v is None else f"{v:.6f}" if isinstance(v, float) else str(v)
                                                     for v in row) + "\n" for row in data)
    out = [_write_atomic(folder / "per_au.csv", lambda f: f.write(text.encode())),
           _write_atomic(folder / "per_au.json", lambda f: f.write(json.dumps(
               {"columns": ["au", "fold", "f1", "auc", "acc"], "data": data}).encode()))]
    f1 = np.array([[m["per_au"][au]["f1"] for au in aus] for m in folds]) * 100
    width = 0.8 / (len(folds) + 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(aus) * (len(folds) + 1)), 3.6))
    x = np.arange(len(aus))
    for k in range(len(folds)):
        ax.bar(x + k * width, f1[k], width, label=f"fold {k + 1}")
    with warnings.catch_warnings():  # an AU scored in fewer than two folds has no std: no error bar, no warning
        warnings.simplefilter("ignore", RuntimeWarning)
        mean, spread = np.nanmean(f1, 0), np.nan_to_num(np.nanstd(f1, 0, ddof=1))
    ax.bar(x + len(folds) * width, mean, width, yerr=spread, capsize=2, color="0.3", label="mean +- std (ddof 1)")
    ax.set_xticks(x + 0.4 - width / 2, aus, rotation=60)
    ax.set_ylabel("F1 (%)")
    ax.legend(fontsize=7, ncol=len(folds) + 1)
    out.append(_save_png(fig, folder / "per_au_f1.png"))
    return out


def expression_artifacts(m: dict, folder: Path) -> list[Path]:
    """per_expression.csv (accuracy and images per class) and confusion.png (the confusion matrix, rows the true
    class, each row normalised) of an expression evaluation (``ssau.metrics.expression_metrics``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    names = list(m["per_class"])
    acc = lambda v: f"{v:.6f}" if np.isfinite(v) else ""  # noqa: E731 - a class with no test image: empty
    text = "class,acc,n\n" + "".join(f"{k},{acc(v['acc'])},{v['n']}\n" for k, v in m["per_class"].items())
    out = [_write_atomic(folder / "per_expression.csv", lambda f: f.write(text.encode()))]
    conf = np.asarray(m["confusion"], dtype=float)
    rows = conf / np.maximum(conf.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    im = ax.imshow(rows, vmin=0, vmax=1, cmap="viridis")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{int(conf[i, j])}", ha="center", va="center", fontsize=7,
                    color="w" if rows[i, j] < 0.6 else "k")
    ax.set_xticks(range(len(names)), names, rotation=60, fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"accuracy {100 * m['acc']:.1f} %, mean class accuracy {100 * m['mean_class_acc']:.1f} %", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    out.append(_save_png(fig, folder / "confusion.png"))
    return out


def _curves(name: str, table: dict[str, list], folder: Path) -> Path:
    """<name>.png of a table with ``step``, ``group`` and ``shift`` columns: each group's shift per step on a log
    scale (large margin's centroids: how far each pseudo-class centroid moved, paper 003 Fig. 4)."""
    import matplotlib.pyplot as plt

    steps, groups = np.asarray(table["step"]), np.asarray(table["group"])
    shift = np.asarray(table["shift"], dtype=float)
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for g in sorted(set(groups.tolist())):
        sel = groups == g
        y = np.where(np.isfinite(shift[sel]) & (shift[sel] > 0), shift[sel], np.nan)  # a gap where it was absent
        ax.plot(steps[sel], y, lw=1, marker=".", ms=2, label=g)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("centroid shift (L2)")
    ax.set_title(name.replace("_", " "))
    ax.legend(fontsize=7, ncol=2)
    return _save_png(fig, folder / f"{name}.png")


def table_artifacts(name: str, table: dict[str, list], folder: Path) -> list[Path]:
    """<name>.csv of a method's report table and, when it has a ``weight`` column, <name>.png: its histogram, one
    layer per value of the ``group`` column (MAL: expression-sample weights per expression class); with ``step``
    and ``shift`` columns instead, <name>.png holds each group's curve over the steps (large margin's centroids)."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    cols = list(table)
    text = io.StringIO()
    w = csv.writer(text)
    w.writerow(cols)
    w.writerows(zip(*(table[c] for c in cols)))
    out = [_write_atomic(folder / f"{name}.csv", lambda f: f.write(text.getvalue().encode()))]
    if {"step", "group", "shift"} <= set(table) and table["step"]:
        out.append(_curves(name, table, folder))
    elif "weight" in table and table["weight"]:
        weights = np.asarray(table["weight"], dtype=float)
        groups = np.asarray(table.get("group", ["all"] * len(weights)))
        names = sorted(set(groups.tolist()))
        fig, ax = plt.subplots(figsize=(6, 3.4))
        bins = np.linspace(weights.min(), weights.max() + 1e-9, 31)
        ax.hist([weights[groups == g] for g in names], bins=bins, stacked=True, label=names)
        ax.set_xlabel(f"sample weight (mean {weights.mean():.3f})")
        ax.set_ylabel("samples")
        ax.set_title(name.replace("_", " "))
        ax.legend(fontsize=7, ncol=2)
        out.append(_save_png(fig, folder / f"{name}.png"))
    return out


def log_report_tables(gathered: list[dict], run_dir: Path, folder: str, tracker: Tracker | None) -> None:
    """A method's report tables from every rank (``gathered[r]``: name -> column -> values), joined, written under
    ``run_dir/folder`` as CSV (+ histogram) and logged to MLflow there."""
    for name, cols in gathered[0].items():
        table = {c: [v for g in gathered for v in g[name][c]] for c in cols}
        for path in table_artifacts(name, table, run_dir / folder):
            if tracker:
                tracker.log_artifact(path, folder)
