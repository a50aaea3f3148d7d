"""FixMatch (Sohn et al. 2020, "FixMatch: simplifying semi-supervised learning with consistency and confidence"), as
USB implements it (microsoft/Semi-supervised-learning, algorithms/fixmatch), made multi-label: a generic
semi-supervised reference for the AU methods.

Per step, one update on the group ``model`` (backbone + linear AU head):
  L = L_s + lambda_u * L_u
- One forward over the labelled images, the unlabelled images' weak view and their strong view together (USB's
  ``use_cat``: BatchNorm sees the three as one batch).
- L_s: masked BCE on the labelled images (``supervised``'s loss; ``loss=selective`` as there).
- Pseudo-labels from the weak view (the stream's augmented image), without gradient: per AU, p >= tau_j gives 1,
  p <= 1 - tau_j gives 0, anything between is masked (USB's FixedThresholdingHook and hard labels, per AU since AUs
  are not mutually exclusive; with hard labels the temperature T plays no part). tau: ``p_cutoff`` (0.95) or
  ``p_cutoffs``, one per AU; ``threshold=class_aware``: CAP's quantiles that keep the labels' positive rate
  (``ssau.methods.pseudo_targets``).
- L_u: BCE of the strong view's logits against them, masked, averaged over every (image, AU) pair of the global
  batch (USB: (ce * mask).mean()). ``lambda_u`` 1, no warm-up (USB). The unlabelled batch's size relative to the
  labelled one is data.m2 / data.m1 (the paper's mu = 7).
- Strong view: ``ssau.methods.augment.strong``: RandAugment's photometric operations (AutoContrast, Brightness,
  Color, Contrast, Equalize, Identity, Posterize, Sharpness, Solarize; ``n_ops`` = 3 at random magnitudes in USB's
  ranges) and Cutout up to ``cutout`` of the side; Rotate, Shear and Translate are left out because they move AU
  regions out of the aligned face. Drawn per image from (train.seed, step, key): the same on any number of ranks.
Logged per step (train/state/*): ``mask_ratio`` and ``positive_share`` of the confident pairs (an all-negative
collapse shows as positive_share falling towards 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ssau.config import ModelConfig
from ssau.data.batch import Batch
from ssau.errors import ConfigError
from ssau.methods.augment import strong
from ssau.methods.parts import full_precision, global_mean
from ssau.methods.pseudo_targets import PseudoTargets, ThresholdParams, pseudo_label_stats
from ssau.methods.supervised import Supervised, SupervisedParams


@dataclass
class FixMatchParams(SupervisedParams, ThresholdParams):
    lambda_u: float = 1.0
    n_ops: int = 3  # RandAugment operations per strong view (USB: 3)
    cutout: float = 0.25  # Cutout's largest side, as a fraction of the image side (USB: 0.5)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.n_ops <= 10 or not 0.0 <= self.cutout <= 0.5:
            raise ConfigError(f"method.n_ops={self.n_ops}, cutout={self.cutout:g}: n_ops in 0..10, cutout in [0, 0.5]")


class FixMatch(Supervised):
    name = "fixmatch"
    Params = FixMatchParams
    needs = uses = ("unlabelled",)
    identical_buffers = ("labeller.",)  # CAP's queue holds every rank's rows alike: never averaged

    def __init__(self, params: FixMatchParams, aus: tuple[int, ...], model: ModelConfig):
        super().__init__(params, aus, model)
        self.labeller = PseudoTargets(params, aus)
        self.seed, self.stats = 0, {}

    def setup(self, info) -> None:
        super().setup(info)
        self.labeller.setup(info.label_bank, info.label_bank_mask)
        self.seed = info.seed

    def loss(self, batch: Batch, step: int) -> dict:
        if batch.unlabelled is None:
            return super().loss(batch, step)
        n, u = len(batch.images), len(batch.unlabelled)
        views = strong(batch.unlabelled, batch.unlabelled_keys, self.seed, step, self.params.n_ops, self.params.cutout)
        logits = full_precision(self.logits(torch.cat([batch.images, batch.unlabelled, views])))
        lab, weak_logits, strong_logits = logits[:n], logits[n:n + u], logits[n + u:]
        sup = self.labelled_loss(lab, batch)
        targets, conf = self.labeller(torch.sigmoid(weak_logits.detach()))
        per = torch.nn.functional.binary_cross_entropy_with_logits(strong_logits, targets, reduction="none") * conf
        unsup = global_mean(per.sum(), torch.tensor(float(per.numel()), device=per.device))
        self.stats = pseudo_label_stats(conf, targets)
        return {"loss": sup + self.params.lambda_u * unsup, "bce": sup.detach(), "unsup": unsup.detach()}

    def step_metrics(self) -> dict[str, float]:
        return dict(self.stats)
