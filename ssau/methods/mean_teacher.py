"""Mean Teacher (Tarvainen & Valpola 2017, "Mean teachers are better role models: weight-averaged consistency targets
improve semi-supervised deep learning results"), as USB implements it (microsoft/Semi-supervised-learning,
algorithms/meanteacher), made multi-label: a generic semi-supervised reference for the AU methods.

Networks: the student (backbone + linear AU head, group ``model``) and the teacher, an exponential moving average of
the student's parameters held as buffers (``teacher.*``, checkpointed; no optimiser steps it). The teacher uses the
student's BatchNorm buffers, as USB's ``ema.apply_shadow`` swaps parameters only.

Per step, one update on ``model``:  L = L_s + lambda_u * ramp(step) * L_c
- L_s: masked BCE on the labelled images (``supervised``'s loss; ``loss=selective`` as there).
- L_c: consistency between the teacher's AU probabilities on the unlabelled images (the stream's augmented view, no
  gradient) and the student's on a second, independently noised view (``augment.weak``: flip + shift up to
  ``weak_shift`` of the side): mean over (image, AU) of (sigmoid(z_s) - sigmoid(z_t))^2. Per AU this is USB's
  ``mse`` consistency on the two-class softmax [p, 1 - p] (both classes differ by the same amount). The paper's
  noise is two independent augmentations; USB's code at the version read scores the teacher's own logits against
  themselves (``logits_x_ulb_s = outs_x_ulb_w['logits']``), which makes L_c zero: not copied.
- Both unlabelled forwards leave BatchNorm's running statistics alone (USB's freeze_bn); the teacher's runs in train
  mode (batch statistics, dropout), as in the paper.
- ramp: USB's linear clip(step / (``unsup_warmup`` x train.steps), 0, 1) (0.4); ``lambda_u`` 50 and ``ema`` 0.999
  (USB's meanteacher configs).
- EMA (``after_step``, after the optimiser step): teacher = a * teacher + (1 - a) * student with
  a = min(1 - 1 / (step + 2), ``ema``): the authors' code's warm-up (the true average while it is the better
  estimate), which matters at the short budgets of a CPU benchmark. Every rank holds the same student after the
  step, so every rank computes the same teacher (not averaged across ranks; asserted in the tests).
Evaluation: ``evaluate_with: teacher`` (the paper's model) by default; the other network is scored beside it as a
view (``val/student/...``), so the student can be compared with ``supervised`` too. With one view, ``val/f1_views``
(``ssau compare``'s "F1 views" column, the mean of the views' F1 for MLCR) is that other network's F1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call

from ssau.config import ModelConfig
from ssau.data.batch import Batch
from ssau.errors import ConfigError
from ssau.methods.augment import weak
from ssau.methods.parts import frozen_bn, full_precision, global_mean, ramp
from ssau.methods.supervised import Supervised, SupervisedParams


@dataclass
class MeanTeacherParams(SupervisedParams):
    ema: float = 0.999
    lambda_u: float = 50.0
    unsup_warmup: float = 0.4  # the weight of L_c ramps linearly from 0 over this fraction of train.steps
    weak_shift: float = 0.0625  # the student view's largest shift, as a fraction of the image side
    evaluate_with: Literal["teacher", "student"] = "teacher"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.ema < 1.0 or not 0.0 <= self.weak_shift <= 0.25:
            raise ConfigError(f"method.ema={self.ema:g}, weak_shift={self.weak_shift:g}: ema in [0, 1), weak_shift "
                              f"in [0, 0.25]")


class Shadow(nn.Module):
    """A copy of a module's parameters as buffers (``.`` in names becomes ``__``)."""

    def __init__(self, params: dict[str, torch.Tensor]):
        super().__init__()
        for name, p in params.items():
            self.register_buffer(name.replace(".", "__"), p.detach().clone())

    def named(self) -> dict[str, torch.Tensor]:
        return {name.replace("__", "."): b for name, b in self.named_buffers()}


class MeanTeacher(Supervised):
    name = "mean_teacher"
    Params = MeanTeacherParams
    needs = uses = ("unlabelled",)
    identical_buffers = ("teacher.",)  # computed alike on every rank from the averaged student: never averaged

    def __init__(self, params: MeanTeacherParams, aus: tuple[int, ...], model: ModelConfig):
        super().__init__(params, aus, model)
        self.teacher = Shadow(self._student())
        self.steps, self.seed = 0, 0

    def _student(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.named_parameters()}

    def setup(self, info) -> None:
        super().setup(info)
        self.steps, self.seed = info.steps, info.seed
        self.teacher = Shadow(self._student()).to(next(self.parameters()).device)  # after a warm start: its student
        if set(self.teacher.named()) != set(self._student()):  # functional_call(strict=False) would use the student
            raise ValueError("mean_teacher: a parameter name does not survive the teacher's renaming")

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # what functional_call runs with the teacher's tensors
        return self.logits(images)

    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        state = self.teacher.named() | {n: b.clone() for n, b in self.named_buffers()
                                        if not n.startswith("teacher.")}  # BN statistics read, never moved
        return functional_call(self, state, (images,), strict=False)

    def loss(self, batch: Batch, step: int) -> dict:
        out = super().loss(batch, step)
        if batch.unlabelled is None:
            return out
        with torch.no_grad(), frozen_bn(self):
            target = torch.sigmoid(full_precision(self.teacher_logits(batch.unlabelled)))
        with frozen_bn(self):
            view = weak(batch.unlabelled, batch.unlabelled_keys, self.seed, step, self.params.weak_shift)
            student = torch.sigmoid(full_precision(self.logits(view)))
        sq = (student - target) ** 2
        cons = global_mean(sq.sum(), torch.tensor(float(sq.numel()), device=sq.device))
        weight = self.params.lambda_u * ramp(step, self.steps, self.params.unsup_warmup)
        return {"loss": out["loss"] + weight * cons, "bce": out["bce"], "consistency": cons.detach(), "weight": weight}

    def decay(self, step: int) -> float:
        return min(1.0 - 1.0 / (step + 2), self.params.ema)

    def after_step(self, batch: Batch, step: int) -> None:
        a = self.decay(step)
        for name, p in self._student().items():
            self.teacher.get_buffer(name.replace(".", "__")).mul_(a).add_(p.detach(), alpha=1 - a)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.teacher_logits(images) if self.params.evaluate_with == "teacher" else self.logits(images)
        return torch.sigmoid(full_precision(logits))

    def predict_views(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        other = "student" if self.params.evaluate_with == "teacher" else "teacher"
        logits = self.logits(images) if other == "student" else self.teacher_logits(images)
        return {other: torch.sigmoid(full_precision(logits))}
