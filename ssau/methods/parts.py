"""Parts shared by the methods, beside the contract rather than inside it (USB's ``core/criterions``): the
backbone + linear AU head classifier, losses whose normalisers are global over ranks (masked BCE, global means),
the float32 guard for losses computed under bf16 autocast, and selective learning (MLCR's Eq. 2 balance, Niu et
al.; ``supervised`` takes it with ``loss=selective`` so an ablation's baseline has the same loss)."""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from ssau.aus import STANDARD_AUS
from ssau.dist.collectives import rank, sum_across_ranks, world_size
from ssau.methods.backbones import build_backbone
from ssau.methods.base import Method


class AUClassifier(Method):
    """A method whose AU recogniser is a backbone + one linear AU layer (sigmoid outputs): every method here."""

    def __init__(self, params, aus: tuple[int, ...], model):
        super().__init__(params, aus)
        self.backbone, dim = build_backbone(model)
        self.dropout = nn.Dropout(model.dropout)
        self.head = nn.Linear(dim, len(aus))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.backbone(self.normalise(images))))

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(images).float())


def full_precision(t: torch.Tensor) -> torch.Tensor:
    """Half and bfloat16 (autocast outputs) up to float32; float32 and float64 as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def global_mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``total / count`` over the global batch, as this rank's share times the world size: ``total`` is this rank's
    sum, ``count`` this rank's number of terms (summed over ranks here, no gradient). The trainer averages gradients
    over ranks, so they are then those of the global batch's mean: 2 ranks x B equal 1 process x 2B even when the
    ranks hold different numbers of known labels (a mean of per-rank means would not)."""
    return world_size() * total / sum_across_ranks(count.detach().float()).clamp_min(1.0)


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
               pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy (Eq. 5 of Wang et al.) averaged over the known labels of the global batch; 0 when none
    is known."""
    per = nn.functional.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none",
                                                         pos_weight=pos_weight) * mask
    return global_mean(per.sum(), mask.sum())


# The code's selective-learning a_c per AU of its two corpora (loss/loss_BCE.py).
A_C = {"emotionet": dict(zip(STANDARD_AUS["emotionet"], (.2, .3, .2, .2, .5, .2, .5, .2, .1, .5, .2, .3))),
       "bp4d": dict(zip(STANDARD_AUS["bp4d"], (.3, .3, .5, .3, .3, .5, .3, .5, .3, .3, .3, .3)))}


def a_c_values(aus: tuple[int, ...], p) -> list[float]:
    """Selective learning's a_c per AU from ``p.a_c_table`` / ``p.a_c_default`` (MLCR's and supervised's params):
    the code's table for BP4D or EmotioNet when the AU list is that corpus's (``auto``), else the default."""
    table = p.a_c_table
    if table == "auto":
        table = next((c for c in ("bp4d", "emotionet") if tuple(aus) == STANDARD_AUS[c]), "default")
    return [A_C[table].get(a, p.a_c_default) if table != "default" else p.a_c_default for a in aus]


def selective_mask(targets: torch.Tensor, mask: torch.Tensor, a_c: list[float]) -> torch.Tensor:
    """The labels L_v counts (Eq. 2 with selective learning): per AU whose global positive count is below a_c * n,
    ceil(a_c * n) of the global batch's negatives are kept (this rank keeps its share, drawn at random), the rest
    masked."""
    known = mask > 0
    pos, neg = (known & (targets > 0.5)), (known & (targets <= 0.5))
    w, r = world_size(), rank()
    counts = sum_across_ranks(torch.stack([known.sum(0), pos.sum(0)]).double())
    per_rank = torch.zeros(w, targets.shape[1], dtype=torch.float64, device=targets.device)
    per_rank[r] = neg.sum(0).double()
    per_rank = sum_across_ranks(per_rank)
    out = mask.clone()
    for j in range(targets.shape[1]):
        n, p, negs = float(counts[0, j]), float(counts[1, j]), float(per_rank[:, j].sum())
        keep = math.ceil(a_c[j] * n)
        if not (p < a_c[j] * n and negs - keep >= 1):
            continue
        quota = _share(keep, per_rank[:, j].tolist())[r]
        idx = neg[:, j].nonzero().squeeze(1)
        drop = idx[torch.randperm(len(idx))[quota:].to(idx.device)]
        out[drop, j] = 0
    return out


def _share(total: int, weights: list[float]) -> list[int]:
    """``total`` split in proportion to ``weights``, largest remainder first (ties: lower rank), never above a
    weight."""
    s = sum(weights)
    raw = [total * w / s for w in weights]
    out = [int(math.floor(x)) for x in raw]
    for i in sorted(range(len(raw)), key=lambda i: (-(raw[i] - out[i]), i))[:total - sum(out)]:
        out[i] += 1
    return [min(o, int(w)) for o, w in zip(out, weights)]


# ---------------------------------------------------------------------------------------------------- generic SSL
def ramp(step: int, steps: int, fraction: float) -> float:
    """USB's linear warm-up of an unsupervised weight: clip(step / (fraction x steps), 0, 1); 1 when fraction is 0."""
    if fraction <= 0 or steps <= 0:
        return 1.0
    return min(max(step / (fraction * steps), 0.0), 1.0)


@contextmanager
def frozen_bn(module: nn.Module):
    """BatchNorm layers normalise with the batch's statistics but leave their running statistics as they were (USB's
    bn_controller.freeze_bn around the unlabelled forward: the running statistics follow labelled batches only)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)
