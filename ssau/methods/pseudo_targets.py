"""How the pseudo-labelling baselines (``pseudo_label``, ``fixmatch``) turn per-AU probabilities on unlabelled
images into hard targets and a mask: ``method.threshold``.

- ``fixed`` (the default; USB's FixedThresholdingHook, per AU since AUs are not mutually exclusive): AU j of an image
  is labelled 1 where p >= tau_j, 0 where p <= 1 - tau_j, and masked out between. tau: ``p_cutoff`` (0.95) or
  ``p_cutoffs``, one per AU of the run's list.
- ``class_aware``: CAP (Xie et al., NeurIPS 2023, "Class-distribution-aware pseudo-labeling for semi-supervised
  multi-label learning"; the authors' USB port, algorithms/cap: CAPPseudoLabelingHook). Per AU, the thresholds are
  quantiles of the most recent unlabelled probabilities, chosen so that the pseudo-labels keep the labelled data's
  positive rate pi_j: a pair is labelled 1 where p >= q_j(1 - pi_j), and it counts where
  p >= q_j(1 - pos_per * pi_j) or p <= q_j(neg_per * (1 - pi_j)) (CAP's defaults pos_per = neg_per = 1: every pair
  counts). A fixed 0.95 keeps almost only negatives where AUs are rare (the benchmark measured 1-2 % positives among
  the confident pairs against 10 % in the labels); CAP's rule keeps the labels' share.
  Choices: pi_j is the positive share of the known labels in the training label bank (``SetupInfo.label_bank``: the
  labelled subjects only, as CAP's labelled set); an AU with no known positive gets no positive pseudo-label (CAP's
  quantile would label its single most probable pair). The queue holds the global batch's probabilities (every
  rank's rows, gathered, so every rank holds the same queue and 2 ranks x B equal 1 process x 2B);
  ``cap_queue`` rows (CAP keeps 64,000, about one epoch of its COCO unlabelled set; the default here, 8,192, is some
  250 steps of 32 faces, so stale predictions of a short run's early network leave it). The queue is checkpointed
  (a resumed run continues with it) and is not averaged across ranks. CAP's EMA teacher for the targets and its
  asymmetric loss are left out: with either, an arm would differ from ``fixed`` in more than its thresholds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ssau.dist.collectives import rank, sum_across_ranks, world_size
from ssau.errors import ConfigError


@dataclass
class ThresholdParams:
    """The pseudo-labelling rule's settings, shared by ``pseudo_label`` and ``fixmatch``'s params."""
    threshold: Literal["fixed", "class_aware"] = "fixed"
    p_cutoff: float = 0.95  # fixed: USB's; an AU's pseudo-label counts where max(p, 1 - p) >= p_cutoff
    p_cutoffs: list[float] | None = None  # fixed: one threshold per AU of the run's list, over p_cutoff
    cap_queue: int = 8192  # class_aware: unlabelled rows (images) whose probabilities set the quantiles
    pos_per: float = 1.0  # class_aware: the share of the expected positives that count (CAP: 1)
    neg_per: float = 1.0  # class_aware: the share of the expected negatives that count (CAP: 1)


def cutoffs(p_cutoff: float, per_au: list[float] | None, aus: tuple[int, ...], key: str) -> torch.Tensor:
    """[J] confidence thresholds: ``per_au`` (one per AU of the run's list) or ``p_cutoff`` for every AU."""
    values = per_au if per_au is not None else [p_cutoff] * len(aus)
    if len(values) != len(aus) or not all(0.5 < v <= 1.0 for v in values):
        raise ConfigError(f"method.{key}: {values} must hold one threshold in (0.5, 1] per AU of {list(aus)}")
    return torch.tensor(values, dtype=torch.float32)


def confident_targets(probs: torch.Tensor, cutoff: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-AU hard pseudo-labels and their confidence mask (multi-label pseudo-labelling): AU j of an image is
    labelled 1 where p >= cutoff_j, 0 where p <= 1 - cutoff_j, and masked out between (USB's FixedThresholdingHook
    on max(p, 1 - p), per AU)."""
    pos, neg = probs >= cutoff, probs <= 1.0 - cutoff
    return pos.to(probs.dtype), (pos | neg).to(probs.dtype)


def quantiles(rows: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """[J] per-column quantiles of ``rows`` [n, J] at ``q`` [J] as CAP takes them: the sorted column's element at
    floor(n * q_j), clipped to the last."""
    n = rows.shape[0]
    index = torch.floor(n * q).long().clamp(0, n - 1)
    return torch.sort(rows, dim=0).values.gather(0, index.unsqueeze(0)).squeeze(0)


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``t`` [n, J] in rank order, on every rank (a sum of zero-padded blocks, no gradient)."""
    w, r = world_size(), rank()
    if w == 1:
        return t.detach()
    sizes = torch.zeros(w, dtype=torch.float64, device=t.device)
    sizes[r] = len(t)
    counts = [int(c) for c in sum_across_ranks(sizes).tolist()]
    block = torch.zeros(w, max(counts), t.shape[1], dtype=torch.float64, device=t.device)
    block[r, :len(t)] = t.detach().double()
    block = sum_across_ranks(block)
    return torch.cat([block[i, :c] for i, c in enumerate(counts)]).to(t.dtype)


class PseudoTargets(nn.Module):
    """``method.threshold``'s rule as a module (its queue is state). Call with the unlabelled batch's probabilities
    [n, J] -> (hard targets, mask), both [n, J]."""

    def __init__(self, p: ThresholdParams, aus: tuple[int, ...]):
        super().__init__()
        if p.threshold not in ("fixed", "class_aware"):
            raise ConfigError(f"method.threshold: {p.threshold!r} is neither 'fixed' nor 'class_aware'")
        if p.cap_queue < 1 or not (0.0 < p.pos_per <= 1.0 and 0.0 < p.neg_per <= 1.0):
            raise ConfigError(f"method.cap_queue={p.cap_queue}, pos_per={p.pos_per:g}, neg_per={p.neg_per:g}: "
                              f"cap_queue >= 1, pos_per and neg_per in (0, 1]")
        self.rule, self.pos_per, self.neg_per = p.threshold, p.pos_per, p.neg_per
        self.register_buffer("cutoff", cutoffs(p.p_cutoff, p.p_cutoffs, aus, "p_cutoffs"), persistent=False)
        self.register_buffer("prior", torch.zeros(len(aus)), persistent=False)
        if self.rule == "class_aware":
            self.register_buffer("rows", torch.zeros(p.cap_queue, len(aus)))
            self.register_buffer("filled", torch.zeros((), dtype=torch.long))
            self.register_buffer("head", torch.zeros((), dtype=torch.long))

    def setup(self, label_bank: torch.Tensor, label_bank_mask: torch.Tensor) -> None:
        """pi_j: the positive share of the known training labels."""
        known = label_bank_mask.sum(0)
        self.prior.copy_((label_bank * label_bank_mask).sum(0) / known.clamp_min(1))

    def push(self, probs: torch.Tensor) -> None:
        """The global batch's rows into the queue, oldest overwritten first."""
        new = gather_rows(probs).to(self.rows.dtype)[-len(self.rows):]
        at = (int(self.head) + torch.arange(len(new), device=new.device)) % len(self.rows)
        self.rows[at] = new
        self.head.fill_((int(self.head) + len(new)) % len(self.rows))
        self.filled.fill_(min(int(self.filled) + len(new), len(self.rows)))

    def thresholds(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(labelled-1 threshold, positive mask threshold, negative mask threshold), each [J], from the queue."""
        rows, pi = self.rows[:int(self.filled)], self.prior.to(self.rows.dtype)
        label = quantiles(rows, 1.0 - pi)
        pos = quantiles(rows, 1.0 - self.pos_per * pi)
        neg = quantiles(rows, self.neg_per * (1.0 - pi))
        never = torch.full_like(label, float("inf"))
        return torch.where(pi > 0, label, never), torch.where(pi > 0, pos, never), neg

    def forward(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = probs.detach()
        if self.rule == "fixed":
            return confident_targets(probs, self.cutoff.to(probs.dtype))
        self.push(probs)
        label, pos, neg = (t.to(probs.dtype) for t in self.thresholds())
        mask = (probs >= pos) | (probs <= neg)
        return (probs >= label).to(probs.dtype), mask.to(probs.dtype)


def pseudo_label_stats(mask: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Global (all ranks) share of confident (image, AU) pairs and the positive share among them: the monitors of a
    pseudo-labelling method (an all-negative collapse shows as positive_share falling to 0)."""
    s = sum_across_ranks(torch.stack([mask.sum(), (mask * targets).sum(), torch.tensor(float(mask.numel()),
                                                                                     device=mask.device)]).double())
    return {"mask_ratio": float(s[0] / s[2].clamp_min(1)), "positive_share": float(s[1] / s[0].clamp_min(1))}
