"""Supervised baseline: backbone + one linear AU layer, masked binary cross-entropy.

This is the "O-wlc" baseline of Wang et al. (adversarial paper, Sec. 4.1: alpha = 0, no label-distribution
constraint) and the labelled-only reference of every other paper here: Eq. 5 of Wang et al. on the labelled
images, with unknown labels (BP4D's 9, EmotioNet's 999, labels hidden by label drop) masked out of the loss.
Unlabelled images in the batch are ignored.

``loss=selective`` applies MLCR's selective learning (Niu et al., Eq. 2; ``ssau.methods.parts.selective_mask``: per AU
rare in the global batch, only ceil(a_c * n) of its negatives count) to this one classifier, so that MLCR's ablation
has a baseline that differs from it in the co-training terms alone. a_c as MLCR's: the code's table for BP4D or
EmotioNet AU lists (``a_c_table: auto``), else ``a_c_default``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ssau.config import ModelConfig
from ssau.data.batch import Batch
from ssau.errors import ConfigError
from ssau.methods.base import Group, Update
from ssau.methods.parts import AUClassifier, a_c_values, masked_bce, selective_mask


@dataclass
class SupervisedParams:
    pos_weight: bool = False  # weight positives by negatives/positives per AU (off in the papers' baseline)
    loss: Literal["plain", "selective"] = "plain"  # selective: MLCR's Eq. 2 balance of rare AUs' negatives
    a_c_table: Literal["auto", "bp4d", "emotionet", "default"] = "auto"  # loss=selective only
    a_c_default: float = 0.3  # loss=selective only

    def __post_init__(self) -> None:
        if not 0.0 < self.a_c_default <= 1.0:
            raise ConfigError(f"method.a_c_default: {self.a_c_default:g} is not in (0, 1]")


class Supervised(AUClassifier):
    name = "supervised"
    Params = SupervisedParams

    def __init__(self, params: SupervisedParams, aus: tuple[int, ...], model: ModelConfig):
        super().__init__(params, aus, model)
        self.register_buffer("pos_w", torch.ones(len(aus)))
        self.a_c = a_c_values(aus, params)  # Python floats, as MLCR's

    def setup(self, info) -> None:
        if self.params.pos_weight:
            pos = (info.label_bank * info.label_bank_mask).sum(0)
            neg = ((1 - info.label_bank) * info.label_bank_mask).sum(0)
            self.pos_w.copy_((neg / pos.clamp_min(1)).clamp(1, 50))

    def groups(self) -> dict[str, Group]:
        return {"model": Group(list(self.parameters()))}

    def updates(self, step: int) -> list[Update]:
        return [Update("supervised", "model", self.loss)]

    def loss(self, batch: Batch, step: int) -> dict:
        bce = self.labelled_loss(self.logits(batch.images), batch)
        return {"loss": bce, "bce": bce.detach()}

    def labelled_loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The masked BCE of the labelled images' ``logits`` (``loss=selective``: MLCR's Eq. 2 mask), which the
        semi-supervised baselines built on this class share."""
        mask = selective_mask(batch.targets, batch.mask, self.a_c) if self.params.loss == "selective" else batch.mask
        return masked_bce(logits, batch.targets, mask, self.pos_w if self.params.pos_weight else None)
