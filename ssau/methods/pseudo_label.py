"""Pseudo-labelling (Lee 2013, "Pseudo-Label: the simple and efficient semi-supervised learning method for deep
neural networks"), as USB implements it (microsoft/Semi-supervised-learning, algorithms/pseudolabel), made
multi-label: a generic semi-supervised reference for the AU methods.

Per step, one update on the group ``model`` (backbone + linear AU head, ``AUClassifier``):
  L = L_s + lambda_u * ramp(step) * L_u
- L_s: masked BCE on the labelled images (``supervised``'s loss; ``loss=selective`` as there).
- L_u: the network's own predictions on the unlabelled images (the stream's weakly augmented view; USB: x_ulb_w)
  are the targets: per AU, p >= tau_j gives 1, p <= 1 - tau_j gives 0, anything between is masked (USB's
  FixedThresholdingHook on the class confidence, here per AU since AUs are not mutually exclusive). The targets are
  hard and carry no gradient; L_u is the BCE of the same logits against them, masked, averaged over every
  (image, AU) pair of the global batch (USB: (ce * mask).mean() over the unlabelled batch), so fewer confident pairs
  mean a smaller loss rather than a renormalised one.
- tau: ``p_cutoff`` (USB: 0.95) for every AU, or ``p_cutoffs``, one per AU of the run's list (rare AUs may need
  their own); ``threshold=class_aware`` replaces the fixed rule by CAP's quantiles that keep the labels' positive
  rate (``ssau.methods.pseudo_targets``).
- ramp: USB's linear warm-up clip(step / (``unsup_warmup`` x train.steps), 0, 1) (0.4); ``lambda_u`` 1 (USB).
- BatchNorm: the unlabelled forward leaves the running statistics alone (USB's freeze_bn: "calculate BN only for
  the first batch").
Logged per step (train/state/*): ``mask_ratio`` (share of confident pairs) and ``positive_share`` (positives among
them): a collapse to all-negative pseudo-labels shows as positive_share falling towards 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ssau.config import ModelConfig
from ssau.data.batch import Batch
from ssau.methods.parts import frozen_bn, full_precision, global_mean, ramp
from ssau.methods.pseudo_targets import PseudoTargets, ThresholdParams, pseudo_label_stats
from ssau.methods.supervised import Supervised, SupervisedParams


@dataclass
class PseudoLabelParams(SupervisedParams, ThresholdParams):
    lambda_u: float = 1.0
    unsup_warmup: float = 0.4  # the weight of L_u ramps linearly from 0 over this fraction of train.steps


class PseudoLabel(Supervised):
    name = "pseudo_label"
    Params = PseudoLabelParams
    needs = uses = ("unlabelled",)
    identical_buffers = ("labeller.",)  # CAP's queue holds every rank's rows alike: never averaged

    def __init__(self, params: PseudoLabelParams, aus: tuple[int, ...], model: ModelConfig):
        super().__init__(params, aus, model)
        self.labeller = PseudoTargets(params, aus)
        self.steps, self.stats = 0, {}

    def setup(self, info) -> None:
        super().setup(info)
        self.labeller.setup(info.label_bank, info.label_bank_mask)
        self.steps = info.steps

    def loss(self, batch: Batch, step: int) -> dict:
        out = super().loss(batch, step)
        if batch.unlabelled is None:
            return out
        with frozen_bn(self):
            logits = full_precision(self.logits(batch.unlabelled))
        targets, mask = self.labeller(torch.sigmoid(logits.detach()))
        per = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none") * mask
        unsup = global_mean(per.sum(), torch.tensor(float(per.numel()), device=per.device))
        weight = self.params.lambda_u * ramp(step, self.steps, self.params.unsup_warmup)
        self.stats = pseudo_label_stats(mask, targets)
        return {"loss": out["loss"] + weight * unsup, "bce": out["bce"], "unsup": unsup.detach(), "weight": weight}

    def step_metrics(self) -> dict[str, float]:
        return dict(self.stats)
