"""MLCR: multi-label co-regularisation of two co-training views, with an AU-relation GCN.

Niu, Han, Shan, Chen, "Multi-label Co-regularization for Semi-supervised Facial Action Unit Recognition"
(../shared/papers/001_39f802f7934887b0.txt), Sec. 3 (Eq. 1-8) and Sec. 4.1; the authors' public code
(github.com/nxsEdson/MLCR: losses, networks, adjacency files, no training loop) where the paper is silent.

Networks: two twins, each a backbone f_i and an AU classifier W_i = [w_i b_i] (Eq. 1: p_i = sigmoid(w_i^T f_i + b_i)),
built one after the other from the seeded generator, so initialised differently (identically on every rank: rank
0's weights are broadcast; with ``model.pretrained=imagenet`` both backbones load the same weights and only the
classifiers start apart); a GCN (Eq. 6) shared by the views. Groups: ``twins`` (both backbones, an engine under
DeepSpeed), ``heads`` (both stage-1 classifiers) and ``gcn``, the last two plain optimisers with their gradients
averaged by hand (one backward cannot drive two ZeRO-2 engines, ../shared/STACK-NOTES.md). The classifiers are a
group of their own so that stage 2 leaves them exactly as they were: an optimiser that still stepped them (with
zero-filled gradients on 2 ranks, None on one) would move them by Adam's momentum on some world sizes only.

Stage 1 (steps < ``stage1_steps``), one update on ``("twins", "heads")``:
L = 1/2 (L_v1 + L_v2) + lambda_mv L_mv + lambda_cr L_cr
(Eq. 5, lambda_mv = 400, lambda_cr = 100: the code's call site; its function defaults are swapped).
- L_vi (Eq. 2) with selective learning: BCE on the labelled images; per AU whose positive count in the batch is
  below a_c * n (n: images with the AU known), ceil(a_c * n) negatives chosen at random are kept and the others
  masked (the code; its positive re-weighting is capped at 1 and so never changes a weight). a_c: the code's
  EmotioNet and BP4D tables when the AU list is one of those corpora's (``a_c_table: auto``), else ``a_c_default``.
  Counts are the global batch's: n, positives and negatives summed over ranks, the kept count split over the ranks
  in proportion to their negatives (largest remainder, the same on every rank), each rank drawing its share.
  Normaliser: the code's, summed over AUs and divided by the number of labelled images (global), not the paper's
  1/C; lambda_mv and lambda_cr were tuned against that scale.
- L_mv (Eq. 3): the cosine similarity of the views' [w_j b_j], averaged over AUs; the code takes its absolute
  value (``mv_abs: true``, the default: orthogonal heads), the paper does not (``mv_abs: false``: anti-parallel
  heads score -1 and would be preferred).
- L_cr (Eq. 4): the Jensen-Shannon divergence of the views' Bernoulli predictions per AU and image, on every image
  of the batch (labelled, label-dropped and unlabelled), probabilities clamped to [1e-3, 1 - 1e-3] (clamped, not
  masked as in the code, so every rank averages the same number of terms), averaged over AUs and the global image
  count. The code's |mean H(p) - mean H|-form is not used.
- ``labelled_pass: true`` adds a second update per step on a fresh batch's labelled images only (per-view BCE, and
  lambda_mv L_mv in stage 1): Sec. 4.1.2's labelled-only pass of every epoch, here per step (off by default; not
  with ``train.deepspeed``, whose engine steps its schedule once per update).

Stage switch: after step ``stage1_steps - 1`` (``after_step``, the same step on every rank) the classifiers are
copied into the frozen W^0 buffers (checkpointed). Stage 2 (``stage2_steps`` steps), one update naming
``("twins", "gcn")`` (``heads`` frozen): L = 1/2 (L_v1 + L_v2) + lambda_cr L_cr (L_mv off, Sec. 4.1.2), each view's classifier
W_i^t = GCN(W_i^0) (Eq. 6: A LeakyReLU_0.2(A W^0 H0) H1, H of (D+1) x (D+1); the code's GraphConvolution without
bias; computed in float32 under autocast), the twins at 1e-4 and the GCN at 1e-3 (``stage2_twins_lr_scale`` 0.1
and ``gcn_lr_scale`` 1.0 times optim.lr = 1e-3, through ``lr_scale``). Stage 2 starts the trainer's schedule
afresh (``stage_starts``: warm-up and cosine run within each stage), so these are its initial rates, as the paper
gives them. The stage-1 classifiers get no gradient in stage 2.
- Adjacency (Eq. 7-8): A = |2 (P_dep - 0.5)|, P_dep(i, j) = 1/2 [P(L_i=1 | L_j=1) + P(L_i=0 | L_j=0)], counted on
  the label bank (training folds' known, not label-dropped labels) over images with both labels known; a
  conditional with no image is 0.5 (no link); the diagonal is 1 (Sec. 3.4); normalised as D^-1/2 A^T D^-1/2 with
  D = diag(row sums) (the code's gen_adj). A buffer (checkpointed): ``ssau eval`` needs no training set.
- GCN start, set at the switch (``GCN.start``, from the seeded draw whatever a warm start loaded): the paper says
  the GCN fine-tunes the pre-trained classifiers (Sec. 3.4; 20 epochs, Sec. 4.1.2), so by default stage 2 starts
  from W^0.
  ``gcn_init: identity`` (default): the residual form W^0 + A LeakyReLU(A W^0 H0) H1 with H0 = I and H1 = 0,
  which reproduces W^0 exactly. ``fit``: Eq. 6 as written, H0 the seeded draw and H1 the minimum-norm
  least-squares solution of GCN(W^0_v) = W^0_v over both views (closed form, float64 on the CPU: deterministic
  from rank-equal inputs, so every rank computes the same H1; exact up to float32 whenever the 2J rows of
  A LeakyReLU(A W^0 H0) are independent, i.e. 2J <= D+1). ``random``: the code's uniform +-1/sqrt(D+1) draw in
  Eq. 6 as written, so stage 2 starts from a new classifier (cosine ~0 with W^0, a fraction of its norm: with
  lambda_cr = 100 pushing both views towards all-negative, a short stage 2 collapses; issue 22).
- Warm start from a supervised run (``train.init_from``, ``ssau compare --warm-start``; ``warm_aliases`` map its
  ``backbone.*`` and ``head.*`` onto the twins): ``warm_twins: first`` (default) starts view 1 from it and leaves
  view 2 at its own draw, because the paper's views must start apart ("two networks may generate different features
  if they are initialized differently", Sec. 4.4; co-training needs conditionally independent views); ``both``
  starts both views from it, and then they stay one network: in the semi-supervised benchmark's attempt 4 the
  views never disagreed (inconsistency 0.0 on both seeds). ``first`` kept them apart (0.7 %, 3 seeds) but lost more
  there (-4.0 F1 against -2.6 at 400 steps): the ensemble averages in a view trained from random weights.
- Continuing from a stage-1 checkpoint: ``method.stage1_steps=0 method.stage2_steps=N
  train.init_from=<stage-1 run>/model.pt``. The warm start loads the twins before ``setup``, which then takes W^0
  from the loaded classifiers (and starts the GCN from them). Its control arm is the same N steps without the GCN,
  from the same checkpoint: ``stage1_steps=N stage2_steps=0`` (stage 1's loss, L_mv included, at stage 1's rates;
  ``optim.groups.twins.lr`` matches stage 2's twin rate). ``setup`` starts any other run in stage 1, even from a
  checkpoint that had switched.

Prediction: ``predict`` returns the ensemble (the mean of the views' probabilities, Sec. 4.4); ``predict_views``
gives each view, so evaluation also logs val/view1/*, val/view2/*, ``val/f1_views`` (the mean of the two views'
per-AU F1: the paper's headline, Sec. 4.1.3) and the views' inconsistency rate (Fig. 3a).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ssau.config import ModelConfig
from ssau.data.batch import Batch
from ssau.errors import ConfigError
from ssau.methods.backbones import build_backbone
from ssau.methods.base import Group, Method, SetupInfo, Update
from ssau.dist.collectives import rank, sum_across_ranks
from ssau.methods.parts import a_c_values, full_precision, global_mean, selective_mask

CLAMP = 1e-3


@dataclass
class MLCRParams:
    lambda_mv: float = 400.0
    lambda_cr: float = 100.0
    mv_abs: bool = True  # |cos| as the code; false: the paper's signed cosine
    selective: bool = True
    a_c_table: Literal["auto", "bp4d", "emotionet", "default"] = "auto"
    a_c_default: float = 0.3
    stage1_steps: int = 750  # the paper's 60 + 20 epochs, as 3:1 of 1000 steps
    stage2_steps: int = 250  # 0: no GCN stage
    stage2_twins_lr_scale: float = 0.1  # 1e-4 at optim.lr = 1e-3
    gcn_lr_scale: float = 1.0
    gcn_init: Literal["identity", "fit", "random"] = "identity"  # the GCN at the switch (module docstring)
    labelled_pass: bool = False
    warm_twins: Literal["first", "both"] = "first"  # what a supervised warm start starts (module docstring)

    def __post_init__(self) -> None:
        if self.warm_twins not in ("first", "both"):
            raise ConfigError(f"method.warm_twins: {self.warm_twins!r}; choose first or both")
        if self.a_c_table not in ("auto", "bp4d", "emotionet", "default"):
            raise ConfigError(f"method.a_c_table: {self.a_c_table!r}; choose auto, bp4d, emotionet or default")
        if self.gcn_init not in ("identity", "fit", "random"):
            raise ConfigError(f"method.gcn_init: {self.gcn_init!r}; choose identity, fit or random")
        if not 0.0 < self.a_c_default <= 1.0:
            raise ConfigError(f"method.a_c_default: {self.a_c_default:g} is not in (0, 1]")
        if self.stage1_steps < 0 or self.stage2_steps < 0:
            raise ConfigError("method.stage1_steps, stage2_steps: must be 0 or more")


def relation_matrix(labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 7-8: A[i, j] = |2 (P_dep(i, j) - 0.5)| over images with both labels known; unit diagonal."""
    y, m = labels.double() * mask.double(), mask.double()
    n = (1 - labels.double()) * m
    both = m.T @ m  # [i, j]: images with AU i and AU j known

    def cond(e: torch.Tensor) -> torch.Tensor:  # P(L_i = e | L_j = e), 0.5 where no image
        num, den = e.T @ e, m.T @ e  # num[i, j]: i and j both e; den[i, j]: i known, j = e
        return torch.where(den > 0, num / den.clamp_min(1), torch.full_like(num, 0.5)) * (both > 0) + \
            0.5 * (both == 0)

    a = (2 * ((cond(y) + cond(n)) / 2 - 0.5)).abs()
    a.fill_diagonal_(1.0)
    return a.float()


def normalise_adjacency(a: torch.Tensor) -> torch.Tensor:
    """D^-1/2 A^T D^-1/2, D = diag(row sums of A) (the code's gen_adj)."""
    d = torch.diag(a.sum(1).pow(-0.5))
    return (a @ d).T @ d


def js_divergence(p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """Eq. 4 per element: H((p1 + p2) / 2) - (H(p1) + H(p2)) / 2, probabilities clamped to [1e-3, 1 - 1e-3]."""
    p1, p2 = p1.clamp(CLAMP, 1 - CLAMP), p2.clamp(CLAMP, 1 - CLAMP)
    h = lambda p: -(p * p.log() + (1 - p) * (1 - p).log())  # noqa: E731
    return h((p1 + p2) / 2) - (h(p1) + h(p2)) / 2


def multi_view_loss(w1: torch.Tensor, w2: torch.Tensor, absolute: bool) -> torch.Tensor:
    """Eq. 3: the mean over AUs of cos([w_1j b_1j], [w_2j b_2j]) (rows of [J, D+1]); |cos| with ``absolute``."""
    cos = nn.functional.cosine_similarity(w1, w2, dim=1, eps=1e-12)
    return (cos.abs() if absolute else cos).mean()


class GCN(nn.Module):
    """Eq. 6: W^t = A LeakyReLU(A W^0 H0) H1 over the AU nodes (rows of W^0, [J, D+1]); ``start`` sets its
    starting point at the switch (``identity``, ``fit``, ``random``: the module docstring)."""

    def __init__(self, dim: int, init: str):
        super().__init__()
        self.init = init
        self.h0, self.h1 = nn.Parameter(torch.empty(dim, dim)), nn.Parameter(torch.empty(dim, dim))
        self.residual = init == "identity"
        for h in (self.h0, self.h1):  # the code's draw, in every mode (one RNG stream whatever gcn_init)
            nn.init.uniform_(h, -1 / math.sqrt(dim), 1 / math.sqrt(dim))
        # The seeded draw, kept apart (not checkpointed, so no warm start replaces it): ``start`` begins from it.
        self.register_buffer("drawn", torch.stack([self.h0.detach(), self.h1.detach()]).clone(), persistent=False)
        self.start()

    @staticmethod
    def hidden(w0: torch.Tensor, adj: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        """LeakyReLU_0.2(A W^0 H0): the first layer's output."""
        return nn.functional.leaky_relu(adj @ (w0 @ h0), 0.2)

    def forward(self, w0: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        x = adj @ (self.hidden(w0, adj, self.h0) @ self.h1)
        return w0 + x if self.residual else x

    @torch.no_grad()
    def start(self, w0: torch.Tensor | None = None, adj: torch.Tensor | None = None) -> None:
        """The GCN's starting point, from the seeded draw whatever a warm start loaded: ``identity`` H0 = I, H1 = 0;
        ``random`` the draw; ``fit`` H0 the draw and H1 the minimum-norm least-squares solution of
        GCN(W^0_v) = W^0_v over the views ``w0`` [V, J, D+1] (float64 on the CPU; rank 0's solution is sent to every
        rank, since BLAS builds on other nodes may round differently and nothing would align the GCN again)."""
        self.h0.copy_(self.drawn[0])
        self.h1.copy_(self.drawn[1])
        if self.init == "identity":
            nn.init.eye_(self.h0)
            nn.init.zeros_(self.h1)
        elif self.init == "fit" and w0 is not None:
            w, a, h0 = (t.detach().double().cpu() for t in (w0, adj, self.h0))
            x = torch.cat([a @ self.hidden(v, a, h0) for v in w])  # [V J, D+1]
            sol = torch.linalg.lstsq(x, w.flatten(0, 1), driver="gelsd").solution.to(self.h1)
            self.h1.copy_(sum_across_ranks(sol if rank() == 0 else torch.zeros_like(sol)))


class Twin(nn.Module):
    def __init__(self, model: ModelConfig, num_aus: int):
        super().__init__()
        self.backbone, dim = build_backbone(model)
        self.dropout = nn.Dropout(model.dropout)
        self.head = nn.Linear(dim, num_aus)

    def weights(self) -> torch.Tensor:
        """[w b] as [J, D+1]."""
        return torch.cat([self.head.weight, self.head.bias[:, None]], 1)


class MLCR(Method):
    name = "mlcr"
    Params = MLCRParams
    uses = ("unlabelled",)

    @property
    def warm_aliases(self) -> tuple[tuple[str, str], ...]:
        twins = (0, 1) if self.params.warm_twins == "both" else (0,)
        return tuple((f"{part}.", f"twins.{i}.{part}.") for i in twins for part in ("backbone", "head"))

    def __init__(self, params: MLCRParams, aus: tuple[int, ...], model: ModelConfig):
        super().__init__(params, aus)
        self.twins = nn.ModuleList([Twin(model, len(aus)), Twin(model, len(aus))])  # drawn apart: two inits
        dim = self.twins[0].head.in_features + 1
        self.gcn = GCN(dim, params.gcn_init)
        J = len(aus)
        self.register_buffer("adj", torch.eye(J))  # normalised; setup computes it
        self.register_buffer("w0", torch.zeros(2, J, dim))  # the frozen stage-1 classifiers
        self.register_buffer("switched", torch.zeros(()))  # 1 once W^0 is taken
        self.a_c = a_c_values(aus, params)  # Python floats: ceil(0.3 * 10) is 3 (a float32 0.3 would make it 4)

    @classmethod
    def check(cls, cfg) -> None:
        p = cls.Params(**{k: v for k, v in cfg.method.items() if k != "name"})
        if p.stage1_steps + p.stage2_steps != cfg.train.steps:
            raise ConfigError(f"train.steps: {cfg.train.steps} is not method.stage1_steps + method.stage2_steps "
                              f"({p.stage1_steps} + {p.stage2_steps}); set them to add up")
        if p.labelled_pass and cfg.train.deepspeed:  # DeepSpeed steps an engine's schedule once per update
            raise ConfigError("method.labelled_pass: not with train.deepspeed (the twins' engine would advance its "
                              "learning-rate schedule twice per step)")

    def setup(self, info: SetupInfo) -> None:
        if self.params.stage2_steps:
            self.adj.copy_(normalise_adjacency(relation_matrix(info.label_bank, info.label_bank_mask)))
        if self.params.stage2_steps and self.params.stage1_steps == 0:
            self.take_w0()  # straight into stage 2: W^0 are the classifiers as built or warm-started
        else:  # a run starts in stage 1, whatever a warm start loaded (train.resume loads its state after this)
            self.switched.zero_()

    # ------------------------------------------------------------------------------------------------ views
    def stage2(self, step: int) -> bool:
        return self.params.stage2_steps > 0 and step >= self.params.stage1_steps

    def take_w0(self) -> None:
        """The switch: W^0 = the classifiers as they are now (stage 1's, or a warm start's), and the GCN's start."""
        with torch.no_grad():
            self.w0.copy_(torch.stack([t.weights() for t in self.twins]))
            self.switched.fill_(1.0)
            self.gcn.start(self.w0, self.adj)

    def view_logits(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.normalise(images)
        out = []
        for i, t in enumerate(self.twins):
            f = t.dropout(t.backbone(x))
            if self.switched > 0:  # stage 2 (and every prediction after it): the GCN's classifier
                with torch.autocast(f.device.type, enabled=False):  # a [J, D+1] product: float32 under bf16 too
                    w = self.gcn(self.w0[i].float(), self.adj.float())
                out.append(f @ w[:, :-1].T.to(f.dtype) + w[:, -1].to(f.dtype))
            else:
                out.append(t.head(f))
        return out

    def predict_views(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {f"view{i + 1}": torch.sigmoid(full_precision(z)) for i, z in enumerate(self.view_logits(images))}

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """The ensemble: the mean of the two views' probabilities."""
        return self.predict_all(images)[0]

    def predict_all(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The ensemble and the views from one pass of each twin (evaluation)."""
        p = self.predict_views(images)
        return (p["view1"] + p["view2"]) / 2, p

    # ------------------------------------------------------------------------------------------------ losses
    def view_bce(self, logits: list[torch.Tensor], batch: Batch) -> tuple[torch.Tensor, dict]:
        """1/2 (L_v1 + L_v2) over the labelled images, each summed over AUs, divided by the global image count."""
        m = selective_mask(batch.targets, batch.mask, self.a_c) if self.params.selective else batch.mask
        n = torch.tensor(float(len(batch.targets)), device=batch.targets.device)
        parts = []
        for z in logits:
            ce = nn.functional.binary_cross_entropy_with_logits(full_precision(z), batch.targets, reduction="none")
            parts.append(global_mean((ce * m).sum(), n))
        return (parts[0] + parts[1]) / 2, {"l_v1": parts[0].detach(), "l_v2": parts[1].detach(),
                                           "kept": m.sum().detach() / batch.mask.sum().clamp_min(1)}

    def loss(self, batch: Batch, step: int) -> dict:
        p = self.params
        images = batch.images if batch.unlabelled is None else torch.cat([batch.images, batch.unlabelled])
        z1, z2 = self.view_logits(images)
        m1 = len(batch.images)
        bce, parts = self.view_bce([z1[:m1], z2[:m1]], batch)
        js = js_divergence(torch.sigmoid(full_precision(z1)), torch.sigmoid(full_precision(z2)))
        cr = global_mean(js.sum() / js.shape[1], torch.tensor(float(len(js)), device=js.device))
        loss = bce + p.lambda_cr * cr
        out = {"l_cr": cr.detach(), **parts}
        if not self.stage2(step):
            mv = multi_view_loss(self.twins[0].weights(), self.twins[1].weights(), p.mv_abs)
            loss = loss + p.lambda_mv * mv
            out["l_mv"] = mv.detach()
        return {"loss": loss, **out}

    def labelled_loss(self, batch: Batch, step: int) -> dict:
        z1, z2 = self.view_logits(batch.images)
        bce, parts = self.view_bce([z1, z2], batch)
        loss = bce
        if not self.stage2(step):
            loss = loss + self.params.lambda_mv * multi_view_loss(self.twins[0].weights(), self.twins[1].weights(),
                                                                   self.params.mv_abs)
        return {"loss": loss, **parts}

    def after_step(self, batch: Batch, step: int) -> None:
        if self.params.stage2_steps and step == self.params.stage1_steps - 1:
            self.take_w0()  # the same step on every rank; the trainer then averages (equal) buffers

    # ------------------------------------------------------------------------------------------------ contract
    def groups(self) -> dict[str, Group]:
        return {"twins": Group([p for t in self.twins for p in t.backbone.parameters()]),
                "heads": Group([p for t in self.twins for p in t.head.parameters()], deepspeed=False),
                "gcn": Group(list(self.gcn.parameters()), self.params.gcn_lr_scale, deepspeed=False)}

    def stage_starts(self) -> tuple[int, ...]:
        """Stage 2 starts the trainer's schedule afresh: the paper's initial rates 1e-3 / 1e-4 of Sec. 4.1.2."""
        return (self.params.stage1_steps,) if self.params.stage2_steps and self.params.stage1_steps else ()

    def lr_scale(self, group: str, step: int) -> float:
        if group == "twins" and self.stage2(step):
            return self.params.stage2_twins_lr_scale
        return 1.0

    def updates(self, step: int) -> list[Update]:
        two = self.stage2(step)
        groups, freeze = (("twins", "gcn"), ("heads",)) if two else (("twins", "heads"), ("gcn",))
        out = [Update("mlcr", groups, self.loss, freeze=freeze)]
        if self.params.labelled_pass:
            out.append(Update("labelled", groups, self.labelled_loss, freeze=out[0].freeze))
        return out

