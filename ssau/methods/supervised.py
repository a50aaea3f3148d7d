"""Supervised baseline: backbone + one linear AU layer, masked binary cross-entropy.

This is the "O-wlc" baseline of Wang et al. (adversarial paper, Sec. 4.1: alpha = 0, no label-distribution
constraint) and the labelled-only reference of every other paper here: Eq. 5 of Wang et al. on the labelled
images, with unknown labels (BP4D's 9, EmotioNet's 999, labels hidden by label drop) masked out of the loss.
Unlabelled images in the batch are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ssau.config import ModelConfig
from ssau.data.batch import Batch
from ssau.methods.base import Group, Update
from ssau.methods.parts import AUClassifier, masked_bce


@dataclass
class SupervisedParams:
    pos_weight: bool = False  # weight positives by negatives/positives per AU (off in the papers' baseline)


class Supervised(AUClassifier):
    name = "supervised"
    Params = SupervisedParams

    def __init__(self, params: SupervisedParams, aus: tuple[int, ...], model: ModelConfig):
        super().__init__(params, aus, model)
        self.register_buffer("pos_w", torch.ones(len(aus)))

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
        bce = masked_bce(self.logits(batch.images), batch.targets, batch.mask,
                         self.pos_w if self.params.pos_weight else None)
        return {"loss": bce, "bce": bce.detach()}
