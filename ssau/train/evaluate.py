"""Scoring a method on the held-out fold: exact-once evaluation over all ranks, the papers' per-AU metrics, and a
check that every sample the index lists was scored (``data.eval_incomplete``). A method whose tasks include
``expression`` is also scored on the expression corpus's test split (accuracy and mean class accuracy)."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from ssau.aus import EXPRESSIONS
from ssau.config import DataConfig
from ssau.data.eval_stream import eval_loader
from ssau.dist.ranks import Runtime
from ssau.errors import SourceError
from ssau.methods.base import Method
from ssau.metrics import au_metrics, expression_metrics, view_metrics


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
                    dirs: tuple[str, ...] | None = None, folds: tuple[int, ...] | None = None) -> dict:
    method.eval()
    d = data
    dirs = dirs or tuple(d.labelled)
    folds = folds if folds is not None else ((d.fold,) if d.fold else None)
    loader = eval_loader(dirs, folds, aus, d.eval_batch, d.image_size, rt.rank, rt.world, min(d.workers, 2))
    if loader.expected == 0:  # the same on every rank (from dataset.json): nothing to score is not a result
        what = f"folds {', '.join(map(str, folds))}" if folds else "all folds"
        raise SourceError(f"evaluation: {what} of {', '.join(dirs)} hold no sample (dataset.json)")
    names: list[str] = []

    def rows_of(images, b):
        p, views = method.predict_all(images)
        names[:] = list(views)
        return torch.cat([p.float(), *(v.float() for v in views.values()), b.targets.to(rt.device),
                          b.mask.to(rt.device), b.valid.to(rt.device).float()[:, None]], 1)

    rows = _scored_rows(loader, rt, rows_of)
    counts = _completeness(loader, sum(len(r) for r in rows), data, rt)
    if not rt.main:
        return {}
    if not rows:
        warnings.warn("evaluation fold is empty", stacklevel=2)
        return {}
    rows = torch.cat(rows).numpy()
    J, V = len(aus), len(names)
    t, m = rows[:, (1 + V) * J:(2 + V) * J], rows[:, (2 + V) * J:(3 + V) * J]
    out = au_metrics(rows[:, :J], t, m, aus) | counts
    if names:  # a multi-view method: every view scored too (predict's output is their ensemble)
        out |= view_metrics({n: rows[:, (1 + i) * J:(2 + i) * J] for i, n in enumerate(names)}, t, m, aus)
    return out


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


def evaluate_tasks(method: Method, data: DataConfig, aus: tuple[int, ...], rt: Runtime) -> dict:
    """Every task the method is scored on: the AU metrics of the held-out fold and, for the ``expression`` task,
    ``expression``: the expression corpus's test-split metrics (rank 0; the others get {})."""
    tasks = method.tasks()
    metrics = evaluate_method(method, data, aus, rt) if "au" in tasks else {}
    if "expression" in tasks:
        expression = evaluate_expression(method, data, rt)
        metrics = metrics | ({"expression": expression} if expression else {})
    return metrics
