"""Scoring a method on the held-out fold: exact-once evaluation over all ranks, the papers' per-AU metrics, and a
check that every sample the index lists was scored (``data.eval_incomplete``). A method whose tasks include
``expression`` is also scored on the expression corpus's test split (accuracy and mean class accuracy)."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from ssau.config import Config
from ssau.data.evaluation import eval_loader
from ssau.errors import SourceError
from ssau.methods import Method
from ssau.aus import EXPRESSIONS
from ssau.metrics import au_metrics, expression_metrics, view_metrics
from ssau.runtime import Runtime


@torch.no_grad()
def evaluate_method(method: Method, cfg: Config, aus: tuple[int, ...], rt: Runtime,
                    dirs: tuple[str, ...] | None = None, folds: tuple[int, ...] | None = None) -> dict:
    method.eval()
    d = cfg.data
    dirs = dirs or tuple(d.labelled)
    folds = folds if folds is not None else ((d.fold,) if d.fold else None)
    probs, targets, masks, view_probs, names = [], [], [], [], []
    loader = eval_loader(dirs, folds, aus, d.eval_batch, d.image_size, rt.rank, rt.world, min(d.workers, 2))
    if loader.expected == 0:  # the same on every rank (from dataset.json): nothing to score is not a result
        what = f"folds {', '.join(map(str, folds))}" if folds else "all folds"
        raise SourceError(f"evaluation: {what} of {', '.join(dirs)} hold no sample (dataset.json)")
    for b in loader:
        images = b.images.to(rt.device)
        if rt.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with rt.autocast():
            p, views = method.predict_all(images)
            p, views = p.float(), {k: v.float() for k, v in views.items()}
        names = list(views)
        rows = torch.cat([p, *views.values(), b.targets.to(rt.device), b.mask.to(rt.device),
                          b.valid.to(rt.device).float()[:, None]], 1)
        if rt.world > 1:  # every rank yields the same number of equally sized batches
            gathered = [torch.empty_like(rows) for _ in range(rt.world)]
            dist.all_gather(gathered, rows)
            rows = torch.cat(gathered)
        rows = rows[rows[:, -1] > 0].cpu()
        J, V = len(aus), len(names)
        probs.append(rows[:, :J])
        view_probs.append(rows[:, J:(1 + V) * J])
        targets.append(rows[:, (1 + V) * J:(2 + V) * J])
        masks.append(rows[:, (2 + V) * J:(3 + V) * J])
    scored = sum(len(p) for p in probs)  # valid rows of every rank: each rank counts the same and decides the same
    problems = loader.problems[:1]
    if scored != loader.expected:  # every rank is here: name the first problem any rank found
        problems = [p for ps in rt.gather_objects(problems) for p in ps]
    counts = loader.finish(scored, problems, d.eval_incomplete, rt.main)
    if not rt.main:
        return {}
    if not probs:
        warnings.warn("evaluation fold is empty", stacklevel=2)
        return {}
    t, m = torch.cat(targets).numpy(), torch.cat(masks).numpy()
    out = au_metrics(torch.cat(probs).numpy(), t, m, aus) | counts
    if names:  # a multi-view method: every view scored too (predict's output is their ensemble)
        vp, J = torch.cat(view_probs).numpy(), len(aus)
        out |= view_metrics({n: vp[:, i * J:(i + 1) * J] for i, n in enumerate(names)}, t, m, aus)
    return out


@torch.no_grad()
def evaluate_expression(method: Method, cfg: Config, rt: Runtime) -> dict:
    """The expression task on the test split of ``data.expression`` (RAF-DB's), every image exactly once over all
    ranks: ``expression_metrics`` plus the sample counts (rank 0; the others get {})."""
    method.eval()
    d = cfg.data
    dirs = tuple(d.expression)
    loader = eval_loader(dirs, None, (), d.eval_batch, d.image_size, rt.rank, rt.world, min(d.workers, 2), split="test")
    if loader.expected == 0:
        raise SourceError(f"expression evaluation: {', '.join(dirs)} hold no image of a test split (dataset.json); "
                          f"shard RAF-DB with its list_patition_label.txt, whose test_* images are the test split")
    probs, labels = [], []
    for b in loader:
        images = b.images.to(rt.device)
        if rt.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with rt.autocast():
            p = method.predict_expression(images).float()
        rows = torch.cat([p, b.expression.to(rt.device).float()[:, None], b.valid.to(rt.device).float()[:, None]], 1)
        if rt.world > 1:
            gathered = [torch.empty_like(rows) for _ in range(rt.world)]
            dist.all_gather(gathered, rows)
            rows = torch.cat(gathered)
        rows = rows[(rows[:, -1] > 0) & (rows[:, -2] >= 0)].cpu()  # padding, and images without a class, out
        probs.append(rows[:, :-2])
        labels.append(rows[:, -2].long())
    scored = sum(len(x) for x in labels)
    problems = loader.problems[:1]
    if scored != loader.expected:
        problems = [p for ps in rt.gather_objects(problems) for p in ps]
    counts = loader.finish(scored, problems, d.eval_incomplete, rt.main)
    if not rt.main:
        return {}
    return expression_metrics(torch.cat(probs).numpy(), torch.cat(labels).numpy(), EXPRESSIONS) | counts


def evaluate_tasks(method: Method, cfg: Config, aus: tuple[int, ...], rt: Runtime) -> dict:
    """Every task the method is scored on: the AU metrics of the held-out fold and, for the ``expression`` task,
    ``expression``: the expression corpus's test-split metrics (rank 0; the others get {})."""
    tasks = method.tasks()
    metrics = evaluate_method(method, cfg, aus, rt) if "au" in tasks else {}
    if "expression" in tasks:
        expression = evaluate_expression(method, cfg, rt)
        metrics = metrics | ({"expression": expression} if expression else {})
    return metrics
