"""Multi-task AU detection + facial expression recognition with a fixed expression-loss weight.

The "MTL" ablation of Li & Shan, "Meta Auxiliary Learning for Facial Action Unit Detection"
(../shared/papers/002_c7a603dcd9c42924.txt), Sec. 3.1 and 4.3: MAL's base net trained on
L_train = L^AU + rho * L^FE, the paper's "1 : 1" being rho = 1.

Base net (Sec. 3.2, 4.1.1): backbone f + AU classifier (one linear layer, J sigmoid outputs) + FE classifier (one
linear layer, Q = 7 softmax classes: RAF-DB's basic expressions, in ssau's EXPRESSIONS order).
L^AU_i sums the binary cross-entropy over the sample's known AUs (Eq. 1; unknown and hidden labels left out);
L^FE_i is the cross-entropy over the Q classes (Eq. 2). Each batch holds m1 AU images and m_expr expression images
(64 and 64 in the paper); the two are averaged over their own samples, then combined.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ssau.aus import EXPRESSIONS
from ssau.config import ModelConfig
from ssau.data.batch import Batch
from ssau.methods.base import Group, Update
from ssau.methods.parts import AUClassifier, full_precision


@dataclass
class MTLParams:
    rho: float = 1.0  # weight of the expression loss (the paper's MTL uses 1 : 1)


class MultiTask(AUClassifier):
    name = "mtl"
    Params = MTLParams
    needs = uses = ("expression",)

    def __init__(self, params, aus: tuple[int, ...], model: ModelConfig):
        super().__init__(params, aus, model)
        self.expr_head = nn.Linear(self.head.in_features, len(EXPRESSIONS))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The base net: (features f(x), AU logits, expression logits)."""
        f = self.backbone(self.normalise(images))
        h = self.dropout(f)
        return f, self.head(h), self.expr_head(h)

    @staticmethod
    def images(batch: Batch) -> torch.Tensor:
        if batch.expr_images is None:
            raise ValueError("this method needs expression images in every batch (data.expression)")
        return torch.cat([batch.images, batch.expr_images])

    @staticmethod
    def au_losses(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Eq. 1 per sample: binary cross-entropy summed over the known AUs -> [B]."""
        ce = nn.functional.binary_cross_entropy_with_logits(full_precision(logits), targets, reduction="none")
        return (ce * mask).sum(1)

    @staticmethod
    def fe_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Eq. 2 per sample -> [B]."""
        return nn.functional.cross_entropy(full_precision(logits), labels, reduction="none")

    def sample_losses(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(features, L^AU_i, L^FE_i) of one batch, both tasks through one backbone pass."""
        f, au, fe = self(self.images(batch))
        m = batch.images.shape[0]
        return f, self.au_losses(au[:m], batch.targets, batch.mask), self.fe_losses(fe[m:], batch.expr_labels)

    def groups(self) -> dict[str, Group]:
        return {"model": Group(list(self.parameters()))}

    def updates(self, step: int) -> list[Update]:
        return [Update("mtl", "model", self.loss)]

    def loss(self, batch: Batch, step: int) -> dict:
        _, l_au, l_fe = self.sample_losses(batch)
        au, fe = l_au.mean(), l_fe.mean()
        return {"loss": au + self.params.rho * fe, "au_loss": au.detach(), "fe_loss": fe.detach()}
