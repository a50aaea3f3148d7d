"""Parts shared by the methods, beside the contract rather than inside it (USB's ``core/criterions``): the
backbone + linear AU head classifier, losses whose normalisers are global over ranks (masked BCE, global means),
and the float32 guard for losses computed under bf16 autocast."""

from __future__ import annotations

import torch
from torch import nn

from ssau.dist.collectives import sum_across_ranks, world_size
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

