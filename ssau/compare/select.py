"""Hyper-parameters chosen before the test fold is seen: ``ssau compare --select-on val`` scores every cell on the AU
validation split (``train.evaluate_on=val``: the held-out fold's shards are never opened) and picks, per method, the
label that scores best: the method itself or one of its ``<method>-<variant>`` labels, each with its own
``<label>.<key>=value`` settings. ``--settings-from`` hands the choice to the final grid, which scores the test fold.

A label's score is the report's mean over seeds (a seed's value: the mean over its folds) of ``--select-metric``
(F1 or AUC), averaged over the label drops given; a label missing a score at one drop is not chosen. Equal scores:
the label listed first in ``--methods``. The selection file (JSON, written atomically) holds per method the chosen
label, its score, every candidate's score, the chosen label's own settings and its whole method section, and
``overrides``: the chosen settings as ``<method>.<key>=value`` for the final call's command line.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from ssau.compare.grid import method_of
from ssau.compare.report import Report
from ssau.errors import InputError, UserError
from ssau.io import atomic_write
from ssau.readfile import read_json

FORMAT = "ssau-selection/1"
NAMES = {"f1": "F1", "auc": "AUC"}


def choose(rep: Report, metric: str) -> dict[str, dict]:
    """method -> {label: the best label or None, score, candidates: {label: score}} (NaN: no score)."""
    scores: dict[str, dict[str, float]] = {}
    for label in rep.methods:
        xs = [r[f"{metric}_mean"] for r in rep.summary if r["method"] == label]
        ok = xs and not any(math.isnan(x) for x in xs)
        scores.setdefault(method_of(label), {})[label] = statistics.fmean(xs) if ok else math.nan
    out = {}
    for method, candidates in scores.items():
        valid = {label: s for label, s in candidates.items() if not math.isnan(s)}
        best = max(valid, key=valid.get) if valid else None  # max keeps the first of equal scores
        out[method] = {"label": best, "score": valid[best] if best else math.nan, "candidates": candidates}
    return out


def _clean(x):
    return None if isinstance(x, float) and math.isnan(x) else x


def selection_doc(choice: dict, sections: dict, per_label: dict, metric: str, meta: dict) -> dict:
    """The selection file's content; ``meta``: where it came from (compare name, parent run, config, grid)."""
    methods, overrides = {}, []
    for method, c in choice.items():
        settings = dict(per_label.get(c["label"], {})) if c["label"] else {}
        methods[method] = {"label": c["label"], "score": _clean(c["score"]), "settings": settings,
                           "section": sections[c["label"]] if c["label"] else None,
                           "candidates": {k: _clean(v) for k, v in c["candidates"].items()}}
        overrides += [f"{method}.{k}={json.dumps(v)}" for k, v in sorted(settings.items())]
    return {"format": FORMAT, "select_on": "val", "metric": metric, **meta, "methods": methods,
            "overrides": overrides}


def write_selection(doc: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, (json.dumps(doc, indent=2) + "\n").encode())


def format_selection(doc: dict, path: Path) -> str:
    """What the search chose, per method, and how the final grid takes it."""
    lines = [(f"selection on the AU validation split ({NAMES[doc['metric']]} %, mean over seeds and label drops; "
              f"the held-out fold was not read):")]
    for method, c in doc["methods"].items():
        others = ", ".join(f"{k} {'-' if v is None else f'{100 * v:.1f}'}" for k, v in c["candidates"].items())
        chosen = f"{c['label']} {100 * c['score']:.1f}" if c["label"] else "none (no score)"
        lines.append(f"  {method:<20} {chosen:<30} of: {others}")
    lines.append(f"selection in {path}; the final grid takes it with --settings-from {path}"
                 + (f" (or the overrides {' '.join(doc['overrides'])})" if doc["overrides"] else ""))
    return "\n".join(lines)


def settings_overrides(path: str, labels: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(``<label>.<key>=value`` for every label of --methods whose method the selection file chose settings for,
    a line per such label). They come before the command line's own, which win."""
    try:
        doc = read_json(path, "selection file")
    except (OSError, ValueError, InputError) as e:
        raise UserError(f"--settings-from: {path}: unreadable ({type(e).__name__}: {str(e)[:100]})") from None
    methods = doc.get("methods") if isinstance(doc, dict) and doc.get("format") == FORMAT else None
    if not isinstance(methods, dict) or not all(isinstance(c, dict) and isinstance(c.get("settings"), dict)
                                                for c in methods.values()):
        raise UserError(f"--settings-from: {path} is not a selection file of `ssau compare --select-on val`")
    out, lines = [], []
    for label in labels:
        if (c := methods.get(method_of(label))) is None:
            continue
        if not c.get("label"):
            lines.append(f"--settings-from: {label}: the search scored no label of {method_of(label)}; its own "
                         f"settings stay")
            continue
        out += [f"{label}.{k}={json.dumps(v)}" for k, v in c["settings"].items()]
        what = ", ".join(f"{k}={v}" for k, v in c["settings"].items()) or "its defaults"
        lines.append(f"--settings-from: {label} takes the settings of {c['label']} ({what})")
    if not lines:
        raise UserError(f"--settings-from: {path} chose settings for {', '.join(methods) or 'no method'}, none of "
                        f"--methods ({', '.join(labels)})")
    return out, lines
