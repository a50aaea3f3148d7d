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

Remedies for a D that wins by how binary its inputs are (soft fakes against 0/1 reals, Fig. 2), all off by
default (the paper's form, bit for bit: no extra random draw, same arithmetic):
- ``d_noise`` (instance noise): N(0, d_noise^2) added to every D input, reals and fakes, in both updates, drawn
  after the label-bank draw (reals first, then fakes) from the global generator; ``d_noise_steps`` > 0 anneals
  the std linearly to 0 at that step.
- ``real_smooth`` s: input-side smoothing of the reals, y -> y (1 - s) + s/2 (0 -> s/2, 1 -> 1 - s/2), in D's
  update (the only place reals appear). D's targets stay 1/0; this is not one-sided target smoothing.
- ``fake``: what D is shown as R's output p (threshold 0.5 for "hard"):
  ``soft``: p in both updates (the paper). ``straight_through``: hard 0/1 in both updates; in R's update the
  forward value is hard and the backward passes D's gradient to p unchanged (p + (hard - p).detach()), so R
  gets the sigmoid's gradient. ``threshold``: hard 0/1 in D's update only (no gradient is needed there), soft p
  in R's update, so D never learns "soft means fake" and R is pushed by D's judgement of soft points.
- ``alpha_balance`` r > 0: alpha is set before each classifier update so that the weighted adversarial term is
  r times the weighted supervised one, alpha A = r (1 - alpha) S, i.e. alpha = r S / (A + r S), with A and S
  running means (decay ``balance_decay``, EMA) of the measured adv and sup losses of earlier steps (``alpha``
  until a first measurement). The running means are a floating buffer, registered only when balancing; a step's
  measurements are folded in by ``after_step``, then the trainer averages buffers across ranks: the EMA is linear,
  so it equals one process's EMA over the global batch, and alpha is the same on every rank within a step.
  Non-finite measurements (a refused update) are left out.

Diagnostics (logged per update as train/<update>/<key>):
- discriminator: ``d_real`` / ``d_fake`` (mean D), ``d_acc`` (fraction of the 2m inputs D classifies right at 0.5:
  reals with D > 0.5, fakes with D < 0.5), ``acc_real`` / ``acc_fake``, all on the inputs D trains on (noise,
  smoothing, thresholding applied).
- classifier: ``adv``, ``sup``, ``alpha`` (the one used), ``r_sat`` (fraction of R's probabilities below 0.05
  or above 0.95), ``ratio`` = adv / sup, and ``wratio`` = alpha adv / ((1 - alpha) sup). Sec. 4.3.2's "ratio of
  the adversarial loss and supervised loss" (1:15 at alpha 0.01 on BP4D, 1:3 at alpha 0.001 on DISFA) is read as
  ``ratio``: the weighted reading would need adv = 333 sup on DISFA (-log D in the hundreds), which no working
  run shows, while adv/sup of 1/3..1/15 is a D near its equilibrium (-log 0.5 = 0.69) against a summed L_s.
  ``ratio`` and ``wratio`` are per-rank means over each rank's batch (diagnostics, not exact global ratios).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ssau.config import ModelConfig
from ssau.data.batch import Batch
from ssau.errors import ConfigError
from ssau.methods.base import Group, SetupInfo, Update
from ssau.methods.parts import AUClassifier

_EPS = 1e-7  # keeps log() finite when D saturates
FAKES = ("soft", "straight_through", "threshold")


@dataclass
class AdversarialParams:
    alpha: float = 0.01  # trade-off of Eq. 2; the paper's best: 0.01 on BP4D, 0.001 on DISFA (Sec. 4.3.2)
    h_d: int = 1  # discriminator updates per step (H_D)
    h_r: int = 1  # classifier updates per step (H_R)
    d_hidden: int = 64
    d_lr_scale: float = 1.0  # D's learning rate relative to optim.lr (the paper uses Adam for both)
    # Remedies (module docstring); each off by default, which is the paper's form.
    d_noise: float = 0.0  # std of Gaussian instance noise on both D inputs, both updates
    d_noise_steps: int = 0  # > 0: the noise std falls linearly to 0 at this step
    real_smooth: float = 0.0  # s: reals y -> y (1 - s) + s/2 on D's input
    fake: Literal["soft", "straight_through", "threshold"] = "soft"
    alpha_balance: float = 0.0  # r > 0: alpha set so that alpha adv = r (1 - alpha) sup (running means)
    balance_decay: float = 0.95  # EMA decay of those running means (about 20 steps of memory)

    def __post_init__(self) -> None:
        if self.fake not in FAKES:
            raise ConfigError(f"method.fake: {self.fake!r} is not allowed; choose one of {', '.join(FAKES)}")
        for key, v, lo, hi in (("d_noise", self.d_noise, 0.0, 10.0), ("real_smooth", self.real_smooth, 0.0, 0.999),
                               ("alpha_balance", self.alpha_balance, 0.0, 100.0),
                               ("balance_decay", self.balance_decay, 0.0, 0.9999)):
            if not lo <= v <= hi:
                raise ConfigError(f"method.{key}: {v:g} is outside {lo:g}..{hi:g}")
        if self.d_noise_steps < 0:
            raise ConfigError(f"method.d_noise_steps: must be 0 or more, got {self.d_noise_steps}")


class Discriminator(nn.Module):
    def __init__(self, num_aus: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(num_aus, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden),
                                 nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """P(real) for AU vectors [B, J]."""
        return torch.sigmoid(self.net(y.float())).squeeze(1)


def saturated(p: torch.Tensor) -> torch.Tensor:
    """Fraction of probabilities below 0.05 or above 0.95 (how binary R's outputs are)."""
    return ((p < 0.05) | (p > 0.95)).float().mean()


def d_accuracy(d_real: torch.Tensor, d_fake: torch.Tensor) -> dict:
    """D's accuracy at 0.5: reals called real (D > 0.5), fakes called fake (D < 0.5), and both together."""
    acc_real, acc_fake = (d_real > 0.5).float(), (d_fake < 0.5).float()
    return {"d_acc": torch.cat([acc_real, acc_fake]).mean(), "acc_real": acc_real.mean(), "acc_fake": acc_fake.mean()}


class Adversarial(AUClassifier):
    name = "adversarial"
    Params = AdversarialParams
    uses = ("unlabelled",)

    def __init__(self, params: AdversarialParams, aus: tuple[int, ...], model: ModelConfig):
        super().__init__(params, aus, model)
        self.discriminator = Discriminator(len(aus), params.d_hidden)
        self.bank = torch.zeros(0, len(aus))  # not a buffer: rebuilt from the index, never checkpointed or averaged
        self._pending: list[torch.Tensor] = []  # this step's [adv, sup] measurements, folded in by after_step
        if params.alpha_balance > 0:  # only then: the paper's form keeps its state_dict as it was
            self.register_buffer("balance", torch.zeros(2))  # EMA of (adv, sup)

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

    # ------------------------------------------------------------------------------------------------ D's inputs
    def noise_std(self, step: int) -> float:
        p = self.params
        if p.d_noise_steps > 0:
            return p.d_noise * max(0.0, 1.0 - step / p.d_noise_steps)
        return p.d_noise

    def _noisy(self, y: torch.Tensor, step: int) -> torch.Tensor:
        std = self.noise_std(step)
        if std == 0:
            return y  # no draw at all: the generator's state stays what the paper's form leaves
        return y + std * torch.randn(y.shape, dtype=y.dtype).to(y.device)  # drawn on the CPU generator: the same
        # numbers on any device for a given global seed

    def _real_input(self, real: torch.Tensor) -> torch.Tensor:
        s = self.params.real_smooth
        return real * (1 - s) + s / 2 if s > 0 else real

    def _fake_input(self, p: torch.Tensor, update: str) -> torch.Tensor:
        """R's probabilities as D sees them in ``update`` ("discriminator" or "classifier")."""
        mode = self.params.fake
        if mode == "soft" or (mode == "threshold" and update == "classifier"):
            return p
        hard = (p > 0.5).to(p.dtype)
        if update == "discriminator":
            return hard  # R's outputs are detached there: no gradient to pass
        return p + (hard - p).detach()  # straight-through: the value is hard, the gradient is p's

    # ------------------------------------------------------------------------------------------------ losses
    def discriminator_loss(self, batch: Batch, step: int) -> dict:
        """Alg. 1 line 6 (Eq. 3): -(1/m) sum [log D(y^r) + log(1 - D(R(x)))], R's outputs detached."""
        with torch.no_grad():
            fake = self.probs(self._images(batch))
        real = self.sample_bank(fake.shape[0], fake.device)
        real = self._noisy(self._real_input(real), step)
        fake = self._noisy(self._fake_input(fake, "discriminator"), step)
        d_real, d_fake = self.discriminator(real), self.discriminator(fake)
        loss = -(torch.log(d_real + _EPS) + torch.log(1 - d_fake + _EPS)).mean()
        with torch.no_grad():
            acc = d_accuracy(d_real, d_fake)
        return {"loss": loss, "d_real": d_real.mean().detach(), "d_fake": d_fake.mean().detach(), **acc}

    def current_alpha(self) -> float:
        """alpha for this step's classifier updates: the configured one, or the balanced one (module docstring)."""
        r = self.params.alpha_balance
        if r <= 0:
            return self.params.alpha
        adv, sup = self.balance.tolist()
        denom = adv + r * sup
        return r * sup / denom if denom > 0 else self.params.alpha

    def classifier_loss(self, batch: Batch, step: int) -> dict:
        """Alg. 1 line 10: -(alpha/m) sum_x log D(R(x)) + ((1 - alpha)/m1) sum_labelled L_s (Eq. 5)."""
        a, m1 = self.current_alpha(), batch.images.shape[0]
        p = self.probs(self._images(batch))
        adv = -torch.log(self.discriminator(self._noisy(self._fake_input(p, "classifier"), step)) + _EPS).mean()
        pl = p[:m1].clamp(_EPS, 1 - _EPS)
        ce = -(batch.targets * torch.log(pl) + (1 - batch.targets) * torch.log(1 - pl))
        sup = (ce * batch.mask).sum() / m1
        adv_d, sup_d = adv.detach(), sup.detach()
        if self.params.alpha_balance > 0:
            self._pending.append(torch.stack([adv_d, sup_d]).float())
        with torch.no_grad():
            ratio = adv_d / sup_d.clamp_min(_EPS)
            diag = {"alpha": a, "r_sat": saturated(p), "ratio": ratio, "wratio": a * ratio / max(1 - a, _EPS)}
        return {"loss": a * adv + (1 - a) * sup, "adv": adv_d, "sup": sup_d, **diag}

    def after_step(self, batch: Batch, step: int) -> None:
        """Fold this step's measured (adv, sup) into the balance EMA; the trainer then averages it over ranks."""
        pending, self._pending = self._pending, []
        if self.params.alpha_balance <= 0 or not pending:
            return
        x = torch.stack(pending).mean(0).to(self.balance.device)
        if bool(torch.isfinite(x).all()):
            d = self.params.balance_decay
            self.balance.mul_(d).add_((1 - d) * x)

    # ------------------------------------------------------------------------------------------------ contract
    def groups(self) -> dict[str, Group]:
        return self.split_groups("classifier", "discriminator", self.discriminator, self.params.d_lr_scale)

    def updates(self, step: int) -> list[Update]:
        return [Update("discriminator", "discriminator", self.discriminator_loss, repeat=self.params.h_d),
                Update("classifier", "classifier", self.classifier_loss, repeat=self.params.h_r,
                       freeze=("discriminator",))]
