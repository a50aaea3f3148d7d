"""Adversarial semi-supervised AU recognition.

Wang, Ji et al., "Exploring Adversarial Learning for Deep Semi-Supervised Facial Action Unit Recognition"
(../shared/papers/000_12feb89dc266844d.txt), Sec. 3.2: Eq. 2-5 and Algorithm 1.

R (classifier): backbone + one fully connected layer over the J AUs, sigmoid outputs.
D (discriminator): a three-layer feed-forward net over AU vectors giving P(real).
Per step (Alg. 1): H_D discriminator updates (line 6 / Eq. 3), then H_R classifier updates (line 10 / Eq. 4 with
the non-saturating -log D(R(x)) of Sec. 3.2). Each update draws its own mini-batch, as lines 4 and 9 do.

Choices where the paper is silent (configurable where it matters):
- D's "three layers" are three linear layers, J -> d_hidden -> d_hidden -> 1, LeakyReLU(0.2) between them.
- D's real vectors y^r come from the label bank built from the shard index by the trainer: labelled training
  samples only (never the evaluation fold, never labels hidden by label drop), and only vectors with every AU
  known, since a partly unknown vector is not a sample of the joint AU distribution.
- Line 6's m images are the update's batch: its m1 labelled and m2 unlabelled images (m = m1 + m2); R's outputs
  are detached there. Fakes are R's probabilities, reals are 0/1 vectors, as in Fig. 2.
- L_s (Eq. 5) sums the binary cross-entropy over a sample's AUs, unknown AUs left out; line 10 divides by m1.
- In the classifier update D is frozen (requires_grad off): no gradient reaches it, and under DeepSpeed ZeRO-2 each
  of D's parameters is reduced once per backward (../shared/STACK-NOTES.md).
- Without an unlabelled stream (fully supervised mode), X is the labelled images alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ssau.config import ModelConfig
from ssau.data.stream import Batch
from ssau.methods.base import AUClassifier, Group, SetupInfo, Update

_EPS = 1e-7  # keeps log() finite when D saturates


@dataclass
class AdversarialParams:
    alpha: float = 0.01  # trade-off of Eq. 2; the paper's best: 0.01 on BP4D, 0.001 on DISFA (Sec. 4.3.2)
    h_d: int = 1  # discriminator updates per step (H_D)
    h_r: int = 1  # classifier updates per step (H_R)
    d_hidden: int = 64
    d_lr_scale: float = 1.0  # D's learning rate relative to optim.lr (the paper uses Adam for both)


class Discriminator(nn.Module):
    def __init__(self, num_aus: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(num_aus, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden),
                                 nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """P(real) for AU vectors [B, J]."""
        return torch.sigmoid(self.net(y.float())).squeeze(1)


class Adversarial(AUClassifier):
    name = "adversarial"
    Params = AdversarialParams

    def __init__(self, params: AdversarialParams, aus: tuple[int, ...], model: ModelConfig):
        super().__init__(params, aus, model)
        self.discriminator = Discriminator(len(aus), params.d_hidden)
        self.bank = torch.zeros(0, len(aus))  # not a buffer: rebuilt from the index, never checkpointed or averaged

    def setup(self, info: SetupInfo) -> None:
        full = info.label_bank_mask.min(dim=1).values > 0
        if not full.any():
            raise ValueError("adversarial: no labelled training sample has every AU known; the label bank is empty")
        self.bank = info.label_bank[full].clone()

    # ------------------------------------------------------------------------------------------------ R
    def probs(self, images: torch.Tensor) -> torch.Tensor:
        return self.predict(images)

    def _images(self, batch: Batch) -> torch.Tensor:
        return batch.images if batch.unlabelled is None else torch.cat([batch.images, batch.unlabelled])

    def sample_bank(self, m: int, device: torch.device) -> torch.Tensor:
        idx = torch.randint(len(self.bank), (m,))
        return self.bank[idx].to(device)

    # ------------------------------------------------------------------------------------------------ losses
    def discriminator_loss(self, batch: Batch, step: int) -> dict:
        """Alg. 1 line 6 (Eq. 3): -(1/m) sum [log D(y^r) + log(1 - D(R(x)))], R's outputs detached."""
        with torch.no_grad():
            fake = self.probs(self._images(batch))
        real = self.sample_bank(fake.shape[0], fake.device)
        d_real, d_fake = self.discriminator(real), self.discriminator(fake)
        loss = -(torch.log(d_real + _EPS) + torch.log(1 - d_fake + _EPS)).mean()
        return {"loss": loss, "d_real": d_real.mean().detach(), "d_fake": d_fake.mean().detach()}

    def classifier_loss(self, batch: Batch, step: int) -> dict:
        """Alg. 1 line 10: -(alpha/m) sum_x log D(R(x)) + ((1 - alpha)/m1) sum_labelled L_s (Eq. 5)."""
        a, m1 = self.params.alpha, batch.images.shape[0]
        p = self.probs(self._images(batch))
        adv = -torch.log(self.discriminator(p) + _EPS).mean()
        pl = p[:m1].clamp(_EPS, 1 - _EPS)
        ce = -(batch.targets * torch.log(pl) + (1 - batch.targets) * torch.log(1 - pl))
        sup = (ce * batch.mask).sum() / m1
        return {"loss": a * adv + (1 - a) * sup, "adv": adv.detach(), "sup": sup.detach()}

    # ------------------------------------------------------------------------------------------------ contract
    def groups(self) -> dict[str, Group]:
        return self.split_groups("classifier", "discriminator", self.discriminator, self.params.d_lr_scale)

    def updates(self, step: int) -> list[Update]:
        return [Update("discriminator", "discriminator", self.discriminator_loss, repeat=self.params.h_d),
                Update("classifier", "classifier", self.classifier_loss, repeat=self.params.h_r,
                       freeze=("discriminator",))]
