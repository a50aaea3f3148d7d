"""The method contract: what a semi-supervised AU method declares, and what the trainer does with it.

A method is an ``nn.Module`` holding its networks (backbone, AU head, discriminator, twin, GCN, meta net,
generator, ...) and its hyper-parameters (a ``Params`` dataclass, the paper's defaults beside each field). It
never touches loaders, devices, the accelerator, ranks or checkpoint files. It declares:

- ``groups()``: its optimiser groups, name -> ``Group(params, lr_scale, deepspeed)``. The trainer builds one
  optimiser and one LR schedule per group, and averages each group's gradients across ranks (or, under
  ``train.deepspeed``, hands the group to a DeepSpeed engine unless ``deepspeed=False``).
- ``updates(step)``: the ordered updates of one training step, each ``Update(name, group, loss, repeat,
  new_batch, freeze)``; ``group`` names one group or several (a tuple: MLCR's stage 2 steps the twins and the GCN
  from one loss). ``loss(batch, step)`` returns a dict with a required ``loss`` tensor and named float parts
  for logging. The trainer runs every update the same way, in one visible place (``Trainer._run_update``):
  freeze the listed groups, zero_grad, forward + backward (over ``accumulate`` micro-batches; one backward for all
  of the update's groups), then per group: average gradients across ranks, clip to the group's own norm (as a
  DeepSpeed engine clips its own parameters, so plain averaging and ZeRO agree), finite check (a NaN/Inf update
  is refused on every rank and reported), step. ``repeat`` runs an update several times per step;
  ``new_batch=False`` reuses the previous update's batch instead of drawing a new one. A method changes what
  trains between stages by returning different updates for a step. Under ``train.deepspeed`` at most one of an
  update's groups may be an engine (the others are declared ``deepspeed=False``: ZeRO-2 reduces each parameter
  once per backward, and one backward cannot drive two engines); the engine's backward also fills the plain
  groups' gradients, which are then averaged by hand.
- ``lr_scale(group, step)``: a factor on the group's learning rate at ``step`` (default 1), multiplied into the
  trainer's schedule (warm-up, cosine: the schedules stay the trainer's); MLCR's stage 2 lowers the twins' rate.
  ``stage_starts()``: steps where that schedule starts afresh (warm-up and decay run within each stage).
- ``predict_views(images)``: per-view probabilities of a multi-view method, scored beside ``predict``'s
  (``predict_all`` returns both from one pass).
- ``after_step(batch, step)``: state updated without gradients (centroids, banks), under ``torch.no_grad``;
  the trainer then averages floating-point buffers across ranks so every rank holds the same state.
  Buffers named in ``identical_buffers`` (Mean Teacher's EMA teacher, computed alike on every rank from the
  averaged parameters) are left out of that averaging. ``step_metrics()``: numbers about that state after the
  step (centroid shift, class counts), logged as ``train/state/<name>`` beside the losses; they must be the same
  on every rank (computed from global sums).
  A method that assigns images to classes or clusters reports ``largest_share`` (or ``<name>/largest_share``):
  the largest one's share of the global batch's assignments; when its mean over ``train.collapse_window`` steps is
  above ``train.collapse_share`` the trainer warns once per run (``ssau.train.monitor``).
- ``predict(images) -> [B, J]`` AU probabilities, for evaluation. ``tasks()``: what evaluation scores, ``au``
  (the held-out fold, the default) and/or ``expression``: ``predict_expression(images) -> [B, C]`` class
  probabilities over EXPRESSIONS, scored on the expression corpus's test split (accuracy, mean class accuracy).
- ``setup(info)``: called once before training, after a warm start, with the training-set facts a method may need
  (the label bank of known training AU vectors, AU list, expression classes, the AU validation set's labels, the
  run's ``train.steps`` and ``train.seed``).
- ``report()``: tables of what training saw (MAL: per-sample weights), gathered from all ranks at each evaluation
  and logged as CSV + histogram.
- ``inference_drops``: submodules only training uses (RTATL's generator, discriminators, flow head); model.pt
  leaves them out and ``ssau eval`` builds the method without them.
- ``needs``: data a method cannot run without (``expression``, ``validation``, ``unlabelled``: the generic
  semi-supervised baselines, which would otherwise train as ``supervised``); the config check names what is missing
  before anything starts.

How each paper's Algorithm 1 maps onto this:

Supervised baseline ("O-wlc" in Wang et al.): one group ``model`` (backbone + AU head), one update: masked BCE.

Adversarial (Wang et al., Alg. 1): groups ``classifier`` (R) and ``discriminator`` (D). Updates per step:
``Update("discriminator", "discriminator", L_D of Eq. 3, repeat=H_D)`` with R's outputs detached, then
``Update("classifier", "classifier", line-10 loss, repeat=H_R, freeze=("discriminator",))``. Freezing D during the
classifier update is what lets ZeRO-2 accept a loss that flows through D. The label bank comes from ``setup``.

MLCR (Niu et al., Sec. 3-4.1): groups ``twins`` (two backbones), ``heads`` (their AU classifiers) and ``gcn``
(both ``deepspeed=False``). Stage 1 (``step < stage1_steps``): one update on ``("twins", "heads")`` with the
per-view selective BCE + lambda_mv orthogonality + lambda_cr JS co-regularisation; then ``after_step`` takes the
frozen classifier copies W^0; stage 2: one update naming ``("twins", "gcn")`` (one backward, two optimisers; the
heads frozen) without the orthogonality term, with ``lr_scale`` giving the twins 1e-4 against the GCN's 1e-3.
``updates(step)`` returns one or the other.

MAL (Li & Shan, Alg. 1): groups ``meta`` (psi) and ``base`` (theta). Update 1 ``meta``: inside its loss, the
meta-train step theta -> theta*(psi) is taken functionally (``autograd.grad`` of the weighted loss, summed across
ranks; theta* as new tensors for ``torch.func.functional_call``), and the meta-test loss at theta* is returned with
a gradient in psi equal to the meta-gradient (its second-order part reduced to one Jacobian-vector product of the
per-sample losses, ``ssau.methods.mal_meta``), so the backward of the update reaches psi alone. Update 2 ``base``
with ``new_batch=False``: the same training batch re-weighted by the updated meta net (Eq. 9-11), updating theta
from its original value, backpropagating through the meta-train forward that update 1 kept (the same batch at the
same theta). MAL's losses are global sums (normalisers all-reduced), scaled by the world size so that the
trainer's mean over ranks gives exactly what one process holding the global batch computes. ``mtl`` is the same
base net with a fixed expression-loss weight (the paper's MTL ablation).

Large margin (Racoviteanu et al., Eq. 1-7): group ``model``; one update with the supervised loss on labelled images
(MSE on the AU outputs; CE on expression images in the FER variant) plus the large-margin loss on embeddings of
labelled and unlabelled images against pseudo-emotion centroids. The centroids are buffers without gradients, moved
in ``after_step`` from the global batch (per-class sums and counts summed across ranks, so the trainer's buffer
averaging finds them equal); ``step_metrics`` reports their shift and class counts, ``report`` their history, and
the FER variant's ``tasks()`` is ``("expression",)``.

RTATL (regional and temporal auxiliary tasks, Eq. 9): groups ``model`` (backbone, RoI transformer, flow head,
generator) and ``discriminator`` (the patch discriminator D and AU classifier C); updates: everything but D and C on
L_sup + L_G + lambda_f L_F with them frozen, then D and C (L_D + L_C, ``new_batch=False``) on the patches the first
update generated. model.pt keeps the recognition path (``inference_drops``).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from torch import nn

from ssau.data.batch import Batch

# ImageNet statistics; images arrive as uint8 and are normalised on the model side.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass
class Group:
    params: list[nn.Parameter]
    lr_scale: float = 1.0
    deepspeed: bool = True  # False: a plain optimiser with gradients averaged by hand even under train.deepspeed
    optim: dict = field(default_factory=dict)  # the method's own optimiser settings for this group (name, lr,
    # momentum, weight_decay, betas) over the optim section; optim.groups.<group>.* overrides both


@dataclass(frozen=True)
class Update:
    name: str
    group: str | tuple[str, ...]  # one group, or several stepped from one backward
    loss: Callable[[Batch, int], dict]
    repeat: int = 1
    new_batch: bool = True
    freeze: tuple[str, ...] = ()

    @property
    def groups(self) -> tuple[str, ...]:
        return (self.group,) if isinstance(self.group, str) else tuple(self.group)


@dataclass
class SetupInfo:
    aus: tuple[int, ...]
    label_bank: torch.Tensor  # [N, J] 0/1 known training AU vectors (labelled, not hidden, not the eval fold)
    label_bank_mask: torch.Tensor  # [N, J] 1 where known
    expressions: int = 7
    validation_targets: torch.Tensor | None = None  # [K, J] the AU validation set's labels (data.validation > 0)
    validation_mask: torch.Tensor | None = None
    steps: int = 0  # the run's train.steps (ramp-ups measured as a fraction of the run)
    seed: int = 0  # the run's train.seed (per-image augmentation draws)
    extra: dict = field(default_factory=dict)


class Method(nn.Module, abc.ABC):
    """Base class; see the module docstring for the contract. A method lacking a hook cannot be built."""

    name: ClassVar[str]
    Params: ClassVar[type]
    needs: ClassVar[tuple[str, ...]] = ()  # data the method cannot run without: "expression", "validation"
    uses: ClassVar[tuple[str, ...]] = ()  # data it reads when given: "unlabelled", "expression", "validation"
    identical_buffers: ClassVar[tuple[str, ...]] = ()  # name prefixes of buffers every rank computes alike from the
    # averaged parameters (Mean Teacher's EMA): the trainer does not average them across ranks
    warm_aliases: ClassVar[tuple[tuple[str, str], ...]] = ()  # (prefix in a warm-start file, prefix here): a
    # file's tensor also starts the submodules named so (MLCR's two twins from a supervised run's backbone and head)
    inference_drops: ClassVar[tuple[str, ...]] = ()  # submodules only training uses (RTATL's auxiliary heads): left
    # out of model.pt (``inference_state``) and of a model built to load it (``for_inference``)

    def __init__(self, params, aus: tuple[int, ...]):
        super().__init__()
        self.params = params
        self.aus = tuple(aus)
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)

    def inference_state(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``state`` (this method's state_dict by default; a step checkpoint's) without the ``inference_drops``
        submodules' tensors: what model.pt keeps and what ``for_inference`` loads."""
        drop = tuple(f"{name}." for name in self.inference_drops)
        state = self.state_dict() if state is None else state
        return {k: v for k, v in state.items() if not k.startswith(drop or ("\0",))}

    def for_inference(self) -> "Method":
        """This method without its ``inference_drops`` submodules, ready to load a model.pt."""
        for name in self.inference_drops:
            if getattr(self, name, None) is not None:
                setattr(self, name, None)
        return self

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW -> normalised float, in the dtype/memory format of the images' device."""
        return (images.float() / 255.0 - self.mean) / self.std

    @classmethod
    def check(cls, cfg) -> None:
        """Settings that must agree with the rest of the config (one ConfigError line); the default has none."""

    def setup(self, info: SetupInfo) -> None:
        """Training-set facts before the first step; the default needs none."""

    def split_groups(self, rest: str, part: str, module: nn.Module, lr_scale: float = 1.0,
                     deepspeed: bool = True, optim: dict | None = None) -> dict[str, Group]:
        """Two groups: ``part`` holds ``module``'s parameters, ``rest`` every other parameter."""
        own = list(module.parameters())
        ids = {id(p) for p in own}
        return {rest: Group([p for p in self.parameters() if id(p) not in ids]),
                part: Group(own, lr_scale, deepspeed, dict(optim or {}))}

    @abc.abstractmethod
    def groups(self) -> dict[str, Group]:
        """See the module docstring."""

    @abc.abstractmethod
    def updates(self, step: int) -> list[Update]:
        """See the module docstring."""

    def lr_scale(self, group: str, step: int) -> float:
        """A factor on ``group``'s learning rate at ``step`` (stages); the default keeps the schedule's."""
        return 1.0

    def predict_views(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-view AU probabilities of a multi-view method (MLCR's twins), scored beside ``predict``'s; none by
        default."""
        return {}

    def predict_all(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``predict`` and ``predict_views`` together (evaluation); a multi-view method computes both in one pass."""
        return self.predict(images), self.predict_views(images)

    def stage_starts(self) -> tuple[int, ...]:
        """Steps at which the trainer's schedule (warm-up, decay) starts afresh (a method's stages); none by
        default."""
        return ()

    def after_step(self, batch: Batch, step: int) -> None:
        """No-gradient state updates; the default has none."""

    def step_metrics(self) -> dict[str, float]:
        """Numbers about the no-gradient state after the last ``after_step``, equal on every rank; none by default."""
        return {}

    @classmethod
    def eval_tasks(cls, params) -> tuple[str, ...]:
        """What evaluation scores with these ``params``: ``au`` (``predict``) and/or ``expression``
        (``predict_expression``)."""
        return ("au",)

    def tasks(self) -> tuple[str, ...]:
        return self.eval_tasks(self.params)

    def predict_expression(self, images: torch.Tensor) -> torch.Tensor:
        """[B, len(EXPRESSIONS)] class probabilities of a method with the ``expression`` task."""
        raise NotImplementedError(f"{self.name} has no expression task")

    @abc.abstractmethod
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """See the module docstring."""

    def report(self) -> dict[str, dict[str, list]]:
        """Tables (name -> column -> values) of what this rank saw since the last call, logged at each
        evaluation; the default has none."""
        return {}


