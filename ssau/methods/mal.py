"""MAL: meta auxiliary learning of AU detection from an expression corpus.

Li & Shan, "Meta Auxiliary Learning for Facial Action Unit Detection" (../shared/papers/002_c7a603dcd9c42924.txt),
Sec. 3 (Eq. 1-11, Algorithm 1) and Sec. 4.1.

Networks (Sec. 4.1.1): the base net of ``mtl`` (backbone f, AU classifier, FE classifier; parameters theta) and a
meta net g (parameters psi): one fully connected layer from the feature f(x) to a scalar, then a sigmoid, its
weights and bias initialised to zero so that every sample weight starts at 0.5.

One training step, in Algorithm 1's order (two updates of the method contract):
1. Meta-train + meta-test (update ``meta``, group psi). Weights w_i = g(f(x_i); psi) for the m1 AU and m_expr FE
   samples (Eq. 4), normalised (Sec. 4.1.2, below), the weighted loss of Eq. 5, one SGD step
   theta*(psi) = theta - alpha * grad_theta L_total (Eq. 6), then the AU validation loss at theta* (Eq. 7-8) and its
   gradient in psi through the inner step. The optimiser of group ``meta`` takes the step psi -> psi-hat
   with beta = optim.lr * meta_lr_scale, as Eq. 7 writes it: plain gradient descent (SGD without momentum or weight
   decay) whatever optimiser the base net uses; ``optim.groups.meta.name=adam`` (or any other setting) overrides.
2. Base-learning (update ``base``, group theta, the same batch): weights recomputed with psi-hat (Eq. 9) as
   constants, the loss of Eq. 10, and theta updated from its original value (Eq. 11) by the ``base`` optimiser.

How the meta-gradient is computed (issue 26; ``ssau.methods.mal_meta``). theta* depends on psi only through the
weights, so d L_val(theta*) / d psi = sum_i c_i d wn_i / d psi with c_i = -alpha <grad_theta l_i, V>, V the gradient
of the validation loss at theta*. The update's loss is L_val(theta*) in value and sum_i c_i wn_i(psi) in gradient:
one first-order backward for the inner gradient, one forward and backward of the validation batch at theta* for
V, and one forward-mode pass of the training batch for all <grad l_i, V> at once (J V, with BatchNorm's coupling of
the batch inside J and the meta-train forward's dropout masks drawn again); no graph through the inner step, no
double backward through the base net (the old formulation, which did, is the reference in tests/test_mal_meta.py;
it made a step 2.7-2.9x dearer, ResNet-18 at 64 px on CPU: ``ssau.bench.mal_steps``). With ``model.sync_bn`` on
several ranks J V is two reverse passes instead (forward mode does not cross the all-reduce).
Base-learning reuses the meta-train forward: at the same theta on the same batch, Eq. 10's per-sample losses are
Eq. 5's, and f(x) for Eq. 9 is the same, so only the weights change and the update backpropagates through the kept
graph; that forward ran on copies of the BatchNorm buffers, which base-learning then takes, so running statistics
move once per step from the training batch at theta, as before. One difference: with ``model.dropout`` > 0 base-
learning sees the meta-train forward's dropout masks (Eq. 5 and Eq. 10 name the same losses) rather than new ones.
A different batch (a later micro-batch under ``optim.accumulate``) or a changed theta takes a new forward.

Distributed: one step computes what one process holding the global batch (all ranks' samples) would. The weight
normaliser is summed over ranks with a differentiable all-reduce, the inner gradient and V are summed over ranks,
so every rank's c_i are those of the global batch; losses are this rank's share of the global sum times the world
size, so the trainer's gradient mean over ranks (or DeepSpeed's) is the global gradient.

Choices where the paper is ambiguous (configurable where it matters):
- Normalisation (Sec. 4.1.2). The formula divides each weight by w_ave^AU + w_ave^FE with w_ave = sum over the batch,
  so all 2B weights sum to one (the "predefined step size" of Ren et al. [53]): ``normalise: sum`` (default). The
  text's "average weights ... sum up to one" reads w_ave as a mean, which makes every weight B times larger (the
  same as multiplying alpha by B): ``normalise: mean``. Either way the sums run over the global batch.
- The meta net reads f(x) detached: the weights are a function of psi, and theta's gradient does not flow through
  them (otherwise the base net could lower its loss by moving features to shrink its own weights).
- Eq. 6 (inner) and Eq. 7 (psi) are plain gradient descent, steps ``alpha`` and beta, as written (the paper gives
  alpha = beta = 1e-3); base-learning (Eq. 11) uses the ``optim`` section's optimiser (Adam at optim.lr = 1e-3 by
  default), since the paper names none for it. Before issue 12, psi also stepped by Adam.
- The meta-test batch (``data.val_batch`` per rank, 256 in the paper) passes the base net in training mode
  (BatchNorm batch statistics), like the meta-train batch; running statistics are only updated from the training
  batch at theta (base-learning's forward, which is the meta-train forward).
- Validation loss: Eq. 1 per sample (summed over known AUs), averaged over the validation batch, each term weighted
  against class imbalance (Sec. 4.1.4) by the "balanced" rule over the whole reserved set: an AU's positives by
  K_j / (2 P_j), its negatives by K_j / (2 (K_j - P_j)) (K_j known labels, P_j positives), capped at 50.
  ``val_balance: false`` turns it off.
- Under ``train.deepspeed`` the base net is a DeepSpeed engine (ZeRO-1/2); psi keeps a plain optimiser with its
  gradient averaged by hand (``Group(deepspeed=False)``), since the inner step happens outside any engine anyway.
- Per step the trainer logs the mean raw weight of AU and FE samples (before and after the meta step) and the FE
  share of the normalised weight; per evaluation, every sample weight of base-learning since the last one
  (``expression_weights`` and ``au_weights`` tables: CSV + histogram per expression class).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call

from ssau.aus import EXPRESSIONS
from ssau.config import ModelConfig
from ssau.data.batch import Batch
from ssau.dist.collectives import sum_across_ranks, world_size
from ssau.errors import ConfigError
from ssau.methods.base import Group, SetupInfo, Update
from ssau.methods.mal_meta import (ForwardSlot, RngState, TrainForward, buffer_copies, double_backward_losses,
                                   flat_sum_across_ranks, jvp_losses, reduces_statistics)
from ssau.methods.mtl import MultiTask
from ssau.methods.parts import full_precision

CLASS_WEIGHT_CAP = 50.0


@dataclass
class MALParams:
    alpha: float = 1e-3  # inner SGD step of Eq. 6 (paper: 0.001)
    meta_lr_scale: float = 1.0  # beta = optim.lr * meta_lr_scale (paper: beta = alpha = 0.001)
    normalise: Literal["sum", "mean"] = "sum"  # Sec. 4.1.2, see the module docstring
    val_balance: bool = True  # reweight the validation loss against AU class imbalance (Sec. 4.1.4)
    record: int = 100_000  # sample weights kept per rank between evaluations, for the histogram


class MAL(MultiTask):
    name = "mal"
    Params = MALParams
    needs = uses = ("expression", "validation")

    def __init__(self, params: MALParams, aus: tuple[int, ...], model: ModelConfig):
        super().__init__(params, aus, model)
        self.meta = nn.Linear(self.head.in_features, 1)
        nn.init.zeros_(self.meta.weight)
        nn.init.zeros_(self.meta.bias)
        J = len(aus)
        self.register_buffer("val_pos_w", torch.ones(J), persistent=False)
        self.register_buffer("val_neg_w", torch.ones(J), persistent=False)
        self._fe_rows: deque = deque(maxlen=params.record)
        self._au_rows: deque = deque(maxlen=params.record)
        self._train_forward = ForwardSlot()  # meta-train's forward, for base-learning of the same step

    def setup(self, info: SetupInfo) -> None:
        if info.validation_targets is None or not len(info.validation_targets):
            raise ConfigError("data.validation: the AU validation set is empty (no training image has a known AU label)")
        if self.params.val_balance:
            t, m = info.validation_targets, info.validation_mask
            known, pos = m.sum(0), (t * m).sum(0)
            self.val_pos_w.copy_((known / (2 * pos.clamp_min(1))).clamp(max=CLASS_WEIGHT_CAP))
            self.val_neg_w.copy_((known / (2 * (known - pos).clamp_min(1))).clamp(max=CLASS_WEIGHT_CAP))

    # ------------------------------------------------------------------------------------------------ weights
    def weights(self, features: torch.Tensor) -> torch.Tensor:
        """Eq. 4: w = g(f(x); psi) in [0, 1], from detached features -> [N]."""
        return full_precision(torch.sigmoid(self.meta(features.detach()))).squeeze(1)

    def normalise_weights(self, w: torch.Tensor, m_au: int, differentiable: bool) -> torch.Tensor:
        """Sec. 4.1.2 over the global batch; ``w`` holds this rank's m_au AU weights, then its FE weights."""
        sums = sum_across_ranks(torch.stack([w[:m_au].sum(), w[m_au:].sum()]), differentiable)
        if self.params.normalise == "sum":
            return w / sums.sum()
        counts = sum_across_ranks(torch.tensor([float(m_au), float(len(w) - m_au)], device=w.device, dtype=w.dtype))
        return w / (sums / counts).sum()

    # ------------------------------------------------------------------------------------------------ losses
    def validation_loss(self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """This rank's share of the global validation loss (Eq. 1 per sample, class-balanced), times world size."""
        ce = nn.functional.binary_cross_entropy_with_logits(full_precision(logits), targets, reduction="none")
        c = targets * self.val_pos_w + (1 - targets) * self.val_neg_w
        n = sum_across_ranks(torch.tensor(float(len(targets)), device=logits.device, dtype=ce.dtype))
        return world_size() * (c * ce * mask).sum() / n

    def sample_loss_vector(self, out: tuple, batch: Batch) -> torch.Tensor:
        """L^AU_i (Eq. 1) of the batch's m1 AU images, then L^FE_i (Eq. 2) of its expression images -> [m1 + m_expr]."""
        _, au, fe = out
        m = batch.images.shape[0]
        return torch.cat([self.au_losses(au[:m], batch.targets, batch.mask), self.fe_losses(fe[m:], batch.expr_labels)])

    def meta_loss(self, batch: Batch, step: int) -> dict:
        """Meta-train (Eq. 4-6) and meta-test (Eq. 7-8): the validation loss at theta*(psi), its gradient in psi the
        meta-gradient (computed as ``ssau.methods.mal_meta`` describes)."""
        if batch.val_images is None:
            raise ValueError("mal needs AU validation images in every batch (data.validation)")
        m, alpha, world = batch.images.shape[0], self.params.alpha, world_size()
        theta = {n: p for n, p in self.named_parameters() if not n.startswith("meta.")}
        params = list(theta.values())
        x = self.images(batch)
        rng = RngState(x.device)  # the JVP's forward draws this forward's dropout masks again
        buffers = buffer_copies(self)  # BN statistics move in base-learning, which takes this forward's (below)
        out = functional_call(self, buffers, (x,))  # on theta itself: base-learning backpropagates through it
        losses = self.sample_loss_vector(out, batch)
        w = self.weights(out[0])
        wn = self.normalise_weights(w, m, differentiable=True)
        inner = (wn.detach() * losses).sum()  # this rank's part of Eq. 5 (the weights are constants of theta)
        grads = torch.autograd.grad(inner, params, retain_graph=True, allow_unused=True)
        grads = flat_sum_across_ranks(grads, params)  # the global batch's gradient
        star = {n: (p.detach() - alpha * g).requires_grad_() for (n, p), g in zip(theta.items(), grads)}  # Eq. 6
        _, val_logits, _ = functional_call(self, {**star, **buffer_copies(self)}, (batch.val_images,))
        val = self.validation_loss(val_logits, batch.val_targets, batch.val_mask)  # Eq. 7's L_val(theta*)
        v = torch.autograd.grad(val, list(star.values()), allow_unused=True)
        v = [t / world for t in flat_sum_across_ranks(v, params)]  # V: the gradient of the global L_val at theta*
        if reduces_statistics(self):
            jv = double_backward_losses(losses, params, v)
        else:
            jv = jvp_losses(self, theta, v, x, lambda o: self.sample_loss_vector(o, batch), rng)
        c = -alpha * jv.detach()  # d L_val / d wn_i (Eq. 8 through Eq. 6)
        meta = world * (c * wn).sum()  # its gradient in psi is this rank's share of the meta-gradient
        self._train_forward.value = TrainForward(batch, out[0].detach(), losses[:m], losses[m:], buffers,
                                                 [p._version for p in params])
        return {"loss": val.detach() + (meta - meta.detach()), "inner_loss": world * inner.detach(),
                "w_au": w[:m].mean().detach(), "w_fe": w[m:].mean().detach()}

    def base_loss(self, batch: Batch, step: int) -> dict:
        """Base-learning (Eq. 9-11): the batch's loss under the weights of the updated meta net, through the
        meta-train forward when it is this batch's at this theta (else a new forward)."""
        m = batch.images.shape[0]
        base = [p for n, p in self.named_parameters() if not n.startswith("meta.")]
        kept = self._train_forward.take()
        if kept is not None and kept.fits(batch, base):
            f, l_au, l_fe = kept.features, kept.au_losses, kept.fe_losses
            with torch.no_grad():  # the running statistics that forward moved, as a base-learning forward would
                for n, b in self.named_buffers():
                    b.copy_(kept.buffers[n])
        else:  # e.g. a later micro-batch under optim.accumulate
            f, l_au, l_fe = self.sample_losses(batch)
        with torch.no_grad():
            w = self.weights(f)  # Eq. 9, psi-hat: constants here
            wn = self.normalise_weights(w, m, differentiable=False)
        self._record(batch, w, step)
        total = (wn * torch.cat([l_au, l_fe])).sum()  # Eq. 10, this rank's part
        return {"loss": world_size() * total, "au_loss": l_au.mean().detach(), "fe_loss": l_fe.mean().detach(),
                "w_au": w[:m].mean(), "w_fe": w[m:].mean(), "fe_share": wn[m:].sum() / wn.sum()}

    # ------------------------------------------------------------------------------------------------ contract
    def groups(self) -> dict[str, Group]:
        # psi stays out of DeepSpeed: its dim + 1 parameters have no optimiser state worth partitioning, and a plain
        # group lets the trainer take the meta-gradient for psi alone (an engine's backward would also compute the
        # second-order terms of the inner step's theta copies, which nothing uses).
        return self.split_groups("base", "meta", self.meta, self.params.meta_lr_scale, deepspeed=False,
                                 optim={"name": "sgd", "momentum": 0.0, "weight_decay": 0.0})  # Eq. 7

    def updates(self, step: int) -> list[Update]:
        return [Update("meta", "meta", self.meta_loss), Update("base", "base", self.base_loss, new_batch=False)]

    # ------------------------------------------------------------------------------------------------ report
    def _record(self, batch: Batch, w: torch.Tensor, step: int) -> None:
        m, ws = batch.images.shape[0], w.float().cpu().tolist()
        self._au_rows.extend((step, k, x) for k, x in zip(batch.keys, ws[:m]))
        self._fe_rows.extend((step, k, int(e), x) for k, e, x in zip(batch.expr_keys, batch.expr_labels.tolist(), ws[m:]))

    def report(self) -> dict[str, dict[str, list]]:
        fe, au = list(self._fe_rows), list(self._au_rows)
        self._fe_rows.clear()
        self._au_rows.clear()
        return {"expression_weights": {"step": [r[0] for r in fe], "key": [r[1] for r in fe],
                                       "group": [EXPRESSIONS[r[2]] for r in fe], "weight": [r[3] for r in fe]},
                "au_weights": {"step": [r[0] for r in au], "key": [r[1] for r in au], "weight": [r[2] for r in au]}}
