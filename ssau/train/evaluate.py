"""Scoring a method on the held-out fold: exact-once evaluation over all ranks, the papers' per-AU metrics, and a
check that every sample the index lists was scored (``data.eval_incomplete``). A method whose tasks include
``expression`` is also scored on the expression corpus's test split (accuracy and mean class accuracy).

``train.evaluate_on=val`` scores the AU validation split instead (the same metrics under the same names; the run is
tagged ``evaluated_on=val``): no test image is read, neither the held-out fold nor the expression test split, so
hyper-parameters can be chosen on it. ``train.thresholds=val`` scores the validation split first, chooses per AU the
threshold that maximises its F1 (``ssau.metrics.f1_thresholds``) and adds the fold's metrics at those thresholds
(``valthr``) to the usual ones at 0.5, which it leaves unchanged.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from ssau.aus import EXPRESSIONS, au_name
from ssau.config import DataConfig, TrainConfig
from ssau.data.eval_stream import eval_loader
from ssau.data.trainset import ValidationSplit
from ssau.dist.ranks import Runtime
from ssau.errors import SourceError
from ssau.methods.base import Method
from ssau.metrics import au_metrics, expression_metrics, f1_thresholds, view_metrics


def _scored_rows(loader, rt: Runtime, rows_of) -> list[torch.Tensor]:
    """One pass of an evaluation loader: ``rows_of(images, batch)`` gives [B, K] float rows whose last column is 1
    for a sample to score; the rows of every rank are gathered (every rank yields equally many, equally sized
    batches, so the all_gather never waits on a missing one) and those to score kept, on CPU, on every rank."""
    out = []
    for b in loader:
        images = b.images.to(rt.device)
        if rt.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with rt.autocast():
            rows = rows_of(images, b)
        if rt.world > 1:
            gathered = [torch.empty_like(rows) for _ in range(rt.world)]
            dist.all_gather(gathered, rows)
            rows = torch.cat(gathered)
        out.append(rows[rows[:, -1] > 0].cpu())
    return out


def _completeness(loader, scored: int, data: DataConfig, rt: Runtime) -> dict:
    """``loader.finish`` for ``scored`` rows (the same count on every rank); when some are missing, the first
    problem any rank found names why."""
    problems = loader.problems[:1]
    if scored != loader.expected:  # every rank is here
        problems = [p for ps in rt.gather_objects(problems) for p in ps]
    return loader.finish(scored, problems, data.eval_incomplete, rt.main)


@torch.no_grad()
def evaluate_method(method: Method, data: DataConfig, aus: tuple[int, ...], rt: Runtime,
                    dirs: tuple[str, ...] | None = None, folds: tuple[int, ...] | None = None,
                    validation: ValidationSplit | None = None, thresholds: dict | None = None) -> dict:
    """The AU metrics of ``folds`` of ``dirs`` (default: the held-out fold of the labelled shards), or of the AU
    ``validation`` split's images of them; ``thresholds`` (rank 0: ``validation_thresholds``'s) adds ``valthr``, the
    metrics at those per-AU thresholds. Rank 0 gets the metrics, the others {}."""
    d = data
    dirs = dirs or tuple(d.labelled)
    folds = folds if folds is not None or validation is not None else ((d.fold,) if d.fold else None)
    rows, names, counts = _au_rows(method, d, aus, rt, dirs, folds, validation)
    if not rt.main:
        return {}
    if rows is None:
        warnings.warn("evaluation fold is empty", stacklevel=2)
        return {}
    J, V = len(aus), len(names)
    t, m = rows[:, (1 + V) * J:(2 + V) * J], rows[:, (2 + V) * J:(3 + V) * J]
    out = au_metrics(rows[:, :J], t, m, aus) | counts
    if names:  # a multi-view method: every view scored too (predict's output is their ensemble)
        out |= view_metrics({n: rows[:, (1 + i) * J:(2 + i) * J] for i, n in enumerate(names)}, t, m, aus)
    if thresholds is not None:
        at = au_metrics(rows[:, :J], t, m, aus, thresholds["values"])
        out["valthr"] = {k: at[k] for k in ("per_au", "f1_mean", "acc_mean", "marginal_gap")} | thresholds
    return out


@torch.no_grad()
def validation_thresholds(method: Method, data: DataConfig, aus: tuple[int, ...], rt: Runtime,
                          validation: ValidationSplit, folds: tuple[int, ...] | None) -> dict | None:
    """Per AU, the threshold that maximises F1 on the AU ``validation`` split (of the labelled training ``folds``):
    rank 0 gets {values: [J], thresholds: {AU: t}, scored: images}, the others None."""
    rows, names, counts = _au_rows(method, data, aus, rt, tuple(data.labelled), folds, validation)
    if not rt.main or rows is None:
        return None
    J, V = len(aus), len(names)
    values = f1_thresholds(rows[:, :J], rows[:, (1 + V) * J:(2 + V) * J], rows[:, (2 + V) * J:(3 + V) * J])
    return {"values": values, "thresholds": {au_name(a): float(v) for a, v in zip(aus, values)},
            "scored": counts["eval_scored"]}


def _au_rows(method: Method, d: DataConfig, aus: tuple[int, ...], rt: Runtime, dirs: tuple[str, ...],
             folds: tuple[int, ...] | None, validation: ValidationSplit | None) -> tuple:
    """One exact-once pass: (rows [N, (2 + V) J + J + 1] as numpy on rank 0, else None; the views' names; the
    completeness counts). A row: prediction, each view's, targets, mask, valid. On the ``validation`` split a label
    counts only where label drop left it visible (``label_drop_mode=au`` hides single AUs of its images)."""
    method.eval()
    keys = frozenset(validation.keys) if validation is not None else None
    visible = dict(zip(validation.keys, validation.mask)) if validation is not None else {}
    loader = eval_loader(dirs, folds, aus, d.eval_batch, d.image_size, rt.rank, rt.world, min(d.workers, 2),
                         keys=keys)
    if loader.expected == 0:  # the same on every rank (from dataset.json): nothing to score is not a result
        what = ("the AU validation split" if keys is not None else
                f"folds {', '.join(map(str, folds))}" if folds else "all folds")
        raise SourceError(f"evaluation: {what} of {', '.join(dirs)} hold no sample (dataset.json)")
    if keys is not None and loader.expected != len(keys):
        raise SourceError(f"evaluation: the index of {', '.join(dirs)} places {loader.expected} of the "
                          f"{len(keys)} images of the AU validation split in the training folds")
    names: list[str] = []

    def rows_of(images, b):
        p, views = method.predict_all(images)
        names[:] = list(views)
        mask = b.mask.clone() if visible else b.mask
        for i, k in enumerate(b.keys if visible else ()):
            mask[i] *= visible[k]
        return torch.cat([p.float(), *(v.float() for v in views.values()), b.targets.to(rt.device),
                          mask.to(rt.device), b.valid.to(rt.device).float()[:, None]], 1)

    rows = _scored_rows(loader, rt, rows_of)
    counts = _completeness(loader, sum(len(r) for r in rows), d, rt)
    return (torch.cat(rows).numpy() if rt.main and rows else None), names, counts


@torch.no_grad()
def evaluate_expression(method: Method, data: DataConfig, rt: Runtime) -> dict:
    """The expression task on the test split of ``data.expression`` (RAF-DB's), every image exactly once over all
    ranks: ``expression_metrics`` plus the sample counts (rank 0; the others get {})."""
    method.eval()
    d = data
    dirs = tuple(d.expression)
    loader = eval_loader(dirs, None, (), d.eval_batch, d.image_size, rt.rank, rt.world, min(d.workers, 2), split="test")
    if loader.expected == 0:
        raise SourceError(f"expression evaluation: {', '.join(dirs)} hold no image of a test split (dataset.json); "
                          f"shard RAF-DB with its list_patition_label.txt, whose test_* images are the test split")

    def rows_of(images, b):  # padding, and images without a class, are not scored
        keep = (b.valid & (b.expression >= 0)).to(rt.device).float()[:, None]
        return torch.cat([method.predict_expression(images).float(), b.expression.to(rt.device).float()[:, None],
                          keep], 1)

    rows = _scored_rows(loader, rt, rows_of)
    counts = _completeness(loader, sum(len(r) for r in rows), data, rt)
    if not rt.main:
        return {}
    rows = torch.cat(rows)
    return expression_metrics(rows[:, :-2].numpy(), rows[:, -2].long().numpy(), EXPRESSIONS) | counts


def evaluate_tasks(method: Method, data: DataConfig, aus: tuple[int, ...], rt: Runtime,
                   train: TrainConfig | None = None, validation: ValidationSplit | None = None,
                   train_folds: tuple[int, ...] | None = None) -> dict:
    """Every task the method is scored on: the AU metrics of the held-out fold (``train.evaluate_on=val``: of the AU
    ``validation`` split of the labelled ``train_folds``; ``train.thresholds=val``: with ``valthr`` too)
    and, for the ``expression`` task, ``expression``: the expression corpus's test-split metrics, not when scoring
    the validation split (rank 0; the others get {})."""
    tasks, t = method.tasks(), train or TrainConfig()
    if validation is None and "val" in (t.evaluate_on, t.thresholds):  # never the training folds in its stead
        raise ValueError("train.evaluate_on=val and train.thresholds=val need the AU validation split")
    metrics = {}
    if "au" in tasks and t.evaluate_on == "val":
        metrics = evaluate_method(method, data, aus, rt, folds=train_folds, validation=validation)
    elif "au" in tasks:
        val = t.thresholds == "val"
        chosen = validation_thresholds(method, data, aus, rt, validation, train_folds) if val else None
        metrics = evaluate_method(method, data, aus, rt, thresholds=chosen)
    if "expression" in tasks and t.evaluate_on == "fold":
        expression = evaluate_expression(method, data, rt)
        metrics = metrics | ({"expression": expression} if expression else {})
    return metrics
