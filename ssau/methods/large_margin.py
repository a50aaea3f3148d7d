"""Large margin: embeddings pulled to their pseudo-emotion's centroid and pushed from the others.

Racoviteanu et al., "Large Margin Loss for Learning Facial Movements from Pseudo-Emotions"
(../shared/papers/003_e26a6ee118c13f96.txt), Sec. 3 (Eq. 1-7) and Sec. 4. No public code exists; the choices
below are ssau's, each configurable where it matters.

Network: backbone -> dropout -> embedding layer x (linear, ``embedding`` wide, 128 by default, no activation; the
paper does not say which layer) -> decision layer (AU outputs, or the expression classes in the FER variant).

One update per step (group ``model``), loss lambda_3 L_S + lambda_4 L_M (Eq. 4, 7):
- Pseudo-emotions (Eq. 6-7): p_i^k = the mean predicted activation (sigmoid outputs, no gradient) of prototype k's
  AUs that the training AU list holds (the prototype's AU count there normalises it, Sec. 3.2); the pseudo-class is
  argmax_k p_i^k. Table: EMFACS as ssau.aus.PROTOTYPES holds it (Friesen & Ekman 1983 via ../shared/AU-DATA.md:
  happiness 6+12, sadness 1+4+15, surprise 1+2+5+26, fear 1+2+4+5+7+20+26, anger 4+5+7+23, disgust 9+15+16;
  contempt left out, as the paper does). A prototype takes part when at least ``min_coverage`` of its AUs are in
  the training list (BP4D's 12 AUs: happiness, sadness, surprise, fear, anger; disgust has only AU15 there and
  would shadow sadness). ``neutral: true`` adds a neutral class scored 1 - max AU activation (not in the paper).
  Labelled images use their predictions, as Eq. 7 says (``classes_from: truth`` uses the known labels, the
  predictions where a label is unknown).
- Centroids c_j: the mean raw embedding of each pseudo-class, constants in the gradient (Eq. 5). They move in
  ``after_step`` from the global batch (per-class sums and counts summed across ranks, so every rank holds the same
  centroids): ``centroid_update: running`` (default) c_j <- (1 - r) c_j + r * mean_j(batch), r = ``centroid_rate``
  (0.5, the centre loss's alpha of Wen et al.), a class's first batch setting it; ``cumulative``: the mean of every
  embedding the class has had. The loss of a step uses the centroids as the previous steps left them; classes not
  yet seen are left out (a sample of an unseen class adds nothing; the push term averages over the seen others).
- L_M (Eq. 3) on normalised embeddings of labelled and unlabelled images alike: ||x^_i - c^_j|| - 1/(C'-1) sum_k!=j
  ||x^_i - c^_k|| with C' the seen classes, averaged over the global batch (the paper's sum over N, divided by N so
  that lambda_4 does not depend on the batch size). ``distance: euclidean`` is Eq. 3 as written; Eq. 5's gradient
  (2 (x^ - c^)) is that of the squared distance, ``distance: squared``; autograd takes the exact Jacobian of the
  normalisation, (I - x^ x^T) / ||x||, where Eq. 5 keeps its diagonal. ``margin: center`` is the centre loss of
  Eq. 1, ||x_i - c_j|| on raw embeddings (the comparison of Table 1-2).
- L_S on labelled images only (Sec. 3.3): MSE between the sigmoid outputs and the targets, averaged over the global
  batch's known labels (``supervised: bce`` as an option). ``target: intensity`` regresses intensity / 5 where the
  corpus codes it (DISFA: Batch.intensity); ``predict`` then maps the predicted intensity v onto [0, 1] piecewise
  linearly so that 0.5 falls at ``intensity_active`` (DISFA's active threshold, 2): F1 at 0.5 means v >= 2.
- Balance: ``balance: fixed`` (default) keeps lambda_4 = ``lambda_m``, 0.05 by default: a hyper-parameter to choose
  on the AU validation split (``data.validation``, ``ssau compare --select-on val``), never on the test fold. 0.05 is
  where a toy with fixed features gained (F1 74.6 against 70.5 for lambda_4 = 0) while the ratio rule collapsed it
  (38.4, one pseudo-class holding 65-80 % of the images; issue 22): with self-predicted classes nothing penalises
  an empty class, so pulling every embedding to one centroid lowers L_M and flattens the head's input.
  ``balance: auto`` is the paper's rule lambda_3 L_S ~ 0.8 lambda_4 L_M (Sec. 4.2), ill-posed when L_M < 0 (it is
  whenever samples sit nearer their own centroid than the others); it measures, on absolute values, the global
  batch's |L_S| and mean per-sample |L_M term| (not |mean L_M|, which nears 0 while pull and push balance) over the
  first ``balance_steps`` steps where L_M had two seen classes, with lambda_4 = 0 meanwhile (measured at 1.0, L_M
  shrank under its own weight while it was measured, and the rule fixed lambda_4 too high), then fixes
  lambda_4 = lambda_3 |L_S| / (``balance_ratio`` |L_M|), capped at ``balance_max`` (``lambda_m`` when a measured mean
  is 0), the same on every rank (a buffer, checkpointed). ``decay_steps`` > 0 decays lambda_4 linearly to 0 there
  (Sec. 3.3's option).
- Starting from the lambda_4 = 0 network (``train.init_from=<a lambda_m=0 run>/model.pt``): the warm start loads the
  centroids and their counts (persistent buffers), so L_M acts from the first step against the centroids that
  network's embeddings formed; ``setup`` clears the balance measurement, which each run makes for itself.
- Collapse monitor: ``largest_share``, the largest pseudo-class's share of the global batch's assignments each step
  (train/state/largest_share; the trainer warns once above ``train.collapse_share``).
- FER variant (``task: expression``, Sec. 3.1): the decision layer has the 7 RAF-DB classes (softmax + CE on the
  expression stream, its train split; mutually exclusive, so the pseudo-class is the argmax). L_M runs on the
  expression images, the unlabelled faces and the labelled stream's images (the trainer always streams a labelled
  AU part; this variant reads those images as unlabelled faces). Evaluation: accuracy and mean class accuracy on the
  expression corpus's test split (``tasks()``); no AU output, so ``ssau eval`` does not apply.
Logged per step: the pseudo-class counts of the global batch, each centroid's shift and their mean (train/state/*);
per evaluation, a ``centroids`` table (step, class, count, shift, norm) and its convergence plot (Fig. 4).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ssau.aus import EXPRESSIONS, PROTOTYPES
from ssau.config import ModelConfig
from ssau.data.batch import Batch
from ssau.data.sources import read_dataset
from ssau.dist.collectives import sum_across_ranks, world_size
from ssau.errors import ConfigError
from ssau.methods.backbones import build_backbone
from ssau.methods.base import Group, Method, SetupInfo, Update
from ssau.methods.parts import full_precision, global_mean

EPS = 1e-12  # inside square roots: a distance's gradient at 0


@dataclass
class LargeMarginParams:
    task: Literal["au", "expression"] = "au"  # AU detection (Sec. 3.3) or the FER variant (Sec. 3.1)
    margin: Literal["large", "center"] = "large"  # Eq. 3 or the centre loss of Eq. 1
    distance: Literal["euclidean", "squared"] = "euclidean"  # Eq. 3 as written, or the form Eq. 5 differentiates
    embedding: int = 128  # width of the embedding layer
    supervised: Literal["mse", "bce"] = "mse"  # AU task's L_S (Sec. 3.3: MSE)
    target: Literal["occurrence", "intensity"] = "occurrence"  # intensity: DISFA-style intensity / 5
    intensity_active: float = 2.0  # intensity at which an AU counts as active (predict's 0.5)
    classes_from: Literal["predicted", "truth"] = "predicted"  # labelled images' pseudo-class (Eq. 7: predicted)
    min_coverage: float = 0.5  # share of a prototype's AUs the training list must hold for it to take part
    neutral: bool = False  # AU task: a neutral pseudo-class scored 1 - max activation
    centroid_update: Literal["running", "cumulative"] = "running"
    centroid_rate: float = 0.5  # running estimate's rate
    lambda_s: float = 1.0  # lambda_3
    lambda_m: float = 0.05  # lambda_4: choose it on the AU validation split (module docstring)
    balance: Literal["fixed", "auto"] = "fixed"  # auto: the paper's ratio rule, measured with lambda_4 = 0
    balance_steps: int = 20
    balance_ratio: float = 0.8  # lambda_3 L_S = ratio * lambda_4 L_M (Sec. 4.2)
    balance_max: float = 1000.0  # the measured lambda_4's cap
    decay_steps: int = 0  # > 0: lambda_4 decays linearly to 0 at this step
    record: int = 200_000  # centroid table rows kept between evaluations


def prototype_matrix(aus: tuple[int, ...], min_coverage: float, neutral: bool) -> tuple[tuple[str, ...], torch.Tensor]:
    """(class names, [C, J] weights): row k averages the activations of prototype k's AUs in ``aus`` (Eq. 6). A
    neutral class (``neutral``) has a zero row; its score is computed apart (``pseudo_classes``)."""
    names, rows = [], []
    for name in EXPRESSIONS:
        proto = PROTOTYPES[name]
        held = [j for j, au in enumerate(aus) if au in proto]
        if proto and len(held) >= min_coverage * len(proto) and held:
            row = torch.zeros(len(aus))
            row[held] = 1.0 / len(held)
            names.append(name)
            rows.append(row)
    if neutral:
        names.append("neutral")
        rows.append(torch.zeros(len(aus)))
    return tuple(names), torch.stack(rows) if rows else torch.zeros(0, len(aus))


def pseudo_classes(activations: torch.Tensor, weights: torch.Tensor, neutral: bool) -> torch.Tensor:
    """Eq. 6-7: argmax_k of the prototypes' mean activations -> [N] class indices (the neutral class, last, scores
    1 - the largest AU activation)."""
    scores = (activations[:, None, :] * weights.to(activations.dtype)).sum(-1)  # elementwise: autocast keeps fp32
    if neutral:
        scores[:, -1] = 1 - activations.max(1).values
    return scores.argmax(1)


def _distance(a: torch.Tensor, b: torch.Tensor, squared: bool) -> torch.Tensor:
    sq = ((a - b) ** 2).sum(-1)
    return sq if squared else torch.sqrt(sq + EPS)


def margin_terms(x: torch.Tensor, classes: torch.Tensor, centroids: torch.Tensor, seen: torch.Tensor,
                 kind: str = "large", squared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample terms of L_M (Eq. 3, ``kind='large'``) or the centre loss (Eq. 1, ``'center'``) and which
    samples count (their class seen): ([N], [N] bool). ``centroids`` are constants."""
    c = centroids.detach().to(x.dtype)
    valid = seen[classes]
    if kind == "center":
        return _distance(x, c[classes], squared) * valid, valid
    xn = nn.functional.normalize(x, dim=1, eps=EPS)
    cn = nn.functional.normalize(c, dim=1, eps=EPS)
    d = _distance(xn[:, None, :], cn[None, :, :], squared)  # [N, C]
    own = d.gather(1, classes[:, None]).squeeze(1)
    others = seen[None, :].to(x.dtype).expand_as(d).clone()
    others.scatter_(1, classes[:, None], 0.0)
    push = (d * others).sum(1) / others.sum(1).clamp_min(1.0)  # 0 when no other class is seen yet
    return (own - push) * valid, valid


class LargeMargin(Method):
    name = "large_margin"
    Params = LargeMarginParams
    uses = ("unlabelled", "expression")

    def __init__(self, params: LargeMarginParams, aus: tuple[int, ...], model: ModelConfig):
        super().__init__(params, aus)
        self.backbone, dim = build_backbone(model)
        self.dropout = nn.Dropout(model.dropout)
        self.embed = nn.Linear(dim, params.embedding)
        fer = params.task == "expression"
        self.head = nn.Linear(params.embedding, len(EXPRESSIONS) if fer else len(aus))
        if fer:
            self.classes, weights = EXPRESSIONS, torch.zeros(0, len(aus))
        else:
            self.classes, weights = prototype_matrix(self.aus, params.min_coverage, params.neutral)
            if len(self.classes) < 2:
                raise ConfigError(f"method.min_coverage: the AU list {list(aus)} expresses {len(self.classes)} "
                                  f"EMFACS prototype(s) at coverage {params.min_coverage:g}; large margin needs 2")
        C = len(self.classes)
        self.register_buffer("weights", weights, persistent=False)
        self.register_buffer("centroids", torch.zeros(C, params.embedding))
        self.register_buffer("counts", torch.zeros(C, dtype=torch.float64))  # embeddings each centroid has had
        self.register_buffer("balance_sums", torch.zeros(3, dtype=torch.float64))  # sum |L_S|, sum |L_M|, steps
        self.register_buffer("lambda_auto", torch.zeros((), dtype=torch.float64))  # 0: not measured yet
        self._stash: list[tuple[torch.Tensor, torch.Tensor]] = []  # this step's (embeddings, classes)
        self._losses: list[torch.Tensor] = []  # this step's (L_S, mean |L_M term|), this rank's shares
        self._last: dict[str, float] = {}
        self._rows: deque = deque(maxlen=params.record)

    @classmethod
    def check(cls, cfg) -> None:
        p = cfg.method
        if p["task"] == "expression" and not cfg.data.expression:
            raise ConfigError("data.expression: large_margin's task=expression trains on an expression corpus "
                              "(shard one with `ssau shard rafdb`)")
        if p["task"] == "expression" and p["target"] != "occurrence":
            raise ConfigError("method.target: intensity is an AU target; task=expression has classes")
        for key, v, lo, hi in (("centroid_rate", p["centroid_rate"], 1e-6, 1.0), ("min_coverage", p["min_coverage"], 1e-6, 1.0),
                               ("balance_ratio", p["balance_ratio"], 1e-6, 1e6), ("intensity_active", p["intensity_active"], 0.01, 4.99)):
            if not lo <= v <= hi:
                raise ConfigError(f"method.{key}: {v:g} is outside {lo:g}..{hi:g}")
        if p["embedding"] < 2 or p["balance_steps"] < 1 or p["decay_steps"] < 0 or p["record"] < 0:
            raise ConfigError("method.embedding must be 2 or more, method.balance_steps 1 or more, "
                              "method.decay_steps and method.record 0 or more")
        for key in ("lambda_s", "lambda_m", "balance_max"):
            if p[key] < 0:
                raise ConfigError(f"method.{key}: must be 0 or more, got {p[key]:g}")
        if p["task"] == "expression":  # found now, not at the evaluation after the whole run
            for d in cfg.data.expression:
                if Path(d, "dataset.json").is_file() and not any(s.get("split") == "test"
                                                                 for s in read_dataset(d)["shards"]):
                    raise ConfigError(f"data.expression: {d} has no test split to score the expression task on "
                                      f"(RAF-DB's test_* images)")

    def setup(self, info: SetupInfo) -> None:
        """A run measures its own balance: a warm start brings the centroids and counts, not the measurement
        (``train.resume`` restores a run's own after this)."""
        self.balance_sums.zero_()
        self.lambda_auto.zero_()

    # ------------------------------------------------------------------------------------------------ network
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings x, decision-layer logits)."""
        x = self.embed(self.dropout(self.backbone(self.normalise(images))))
        return x, self.head(x)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        if self.params.task == "expression":
            raise NotImplementedError("large_margin with task=expression has no AU output (its task: expression)")
        p = torch.sigmoid(full_precision(self(images)[1]))
        if self.params.target == "occurrence":
            return p
        v, t = 5 * p, self.params.intensity_active  # intensity, mapped so that 0.5 falls at t
        return torch.where(v < t, 0.5 * v / t, 0.5 + 0.5 * (v - t) / (5 - t))

    def predict_expression(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(full_precision(self(images)[1]), 1)

    @classmethod
    def eval_tasks(cls, params: LargeMarginParams) -> tuple[str, ...]:
        return ("expression",) if params.task == "expression" else ("au",)

    # ------------------------------------------------------------------------------------------------ losses
    def balanced(self) -> bool:
        return self.params.balance == "auto" and float(self.balance_sums[2]) >= self.params.balance_steps

    def lambda_m(self, step: int) -> float:
        p = self.params
        if p.balance == "auto":  # 0 while the rule measures: L_M's size on a network it has not shaped yet
            base = float(self.lambda_auto) if self.balanced() else 0.0
        else:
            base = p.lambda_m
        return base * max(0.0, 1 - step / p.decay_steps) if p.decay_steps else base

    def _supervised_au(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        z = full_precision(logits)
        if self.params.target == "intensity":
            if batch.intensity is None:
                raise ValueError("large_margin target=intensity: the batch carries no intensities")
            t, m = batch.intensity.to(z.dtype) / 5, batch.intensity_mask.to(z.dtype)
        else:
            t, m = batch.targets.to(z.dtype), batch.mask.to(z.dtype)
        if self.params.supervised == "bce":
            per = nn.functional.binary_cross_entropy_with_logits(z, t, reduction="none")
        else:
            per = (torch.sigmoid(z) - t) ** 2
        return global_mean((per * m).sum(), m.sum())

    def loss(self, batch: Batch, step: int) -> dict:
        p = self.params
        fer = p.task == "expression"
        parts = [batch.expr_images] if fer else []
        parts += [batch.images] + ([batch.unlabelled] if batch.unlabelled is not None and len(batch.unlabelled) else [])
        x, logits = self(torch.cat(parts))
        n_sup = len(batch.expr_images) if fer else len(batch.images)
        with torch.no_grad():
            if fer:
                classes = logits.argmax(1)
                if p.classes_from == "truth":
                    classes[:n_sup] = batch.expr_labels
            else:
                a = torch.sigmoid(full_precision(logits))
                if p.classes_from == "truth":  # the known labels on the outputs' scale, the predictions elsewhere
                    t, m = ((batch.intensity / 5, batch.intensity_mask) if p.target == "intensity"
                            else (batch.targets, batch.mask))
                    m = m.to(a.dtype)
                    a[:n_sup] = m * t.to(a.dtype) + (1 - m) * a[:n_sup]
                classes = pseudo_classes(a, self.weights, p.neutral)
        if fer:
            ce = nn.functional.cross_entropy(full_precision(logits[:n_sup]), batch.expr_labels, reduction="sum")
            sup = global_mean(ce, torch.tensor(float(n_sup), device=ce.device))
        else:
            sup = self._supervised_au(logits[:n_sup], batch)
        x32 = full_precision(x)
        terms, valid = margin_terms(x32, classes, self.centroids, self.counts > 0, p.margin, p.distance == "squared")
        margin = global_mean(terms.sum(), valid.sum())
        lam = self.lambda_m(step)
        self._stash.append((x32.detach(), classes))
        margin_abs = global_mean(terms.detach().abs().sum(), valid.sum())  # what balance=auto measures
        self._losses.append(torch.stack([sup.detach(), margin_abs]).double())
        return {"loss": p.lambda_s * sup + lam * margin, "supervised": sup.detach(), "margin": margin.detach(),
                "margin_abs": margin_abs, "lambda_m": lam,
                "valid": valid.float().mean().detach()}

    # ------------------------------------------------------------------------------------------------ state
    def after_step(self, batch: Batch, step: int) -> None:
        """Centroids from the global batch's embeddings of this step; the balance measurement."""
        if not self._stash:
            return
        x = torch.cat([s[0] for s in self._stash])
        cls = torch.cat([s[1] for s in self._stash])
        losses, self._stash, self._losses = self._losses, [], []
        self._balance(losses, defined=bool((self.counts > 0).sum() >= 2))  # the centroids this step's L_M saw
        ok = torch.isfinite(x).all(1)  # a refused (non-finite) update's embeddings move nothing
        x, cls = x[ok], cls[ok]
        C, D = self.centroids.shape
        sums = torch.zeros(C, D, dtype=torch.float64, device=x.device).index_add_(0, cls, x.double())
        n = torch.zeros(C, dtype=torch.float64, device=x.device).index_add_(0, cls, torch.ones_like(cls, dtype=torch.float64))
        stats = sum_across_ranks(torch.cat([sums.reshape(-1), n]))
        sums, n = stats[:-C].view(C, D), stats[-C:]
        old = self.centroids.double().clone()
        mean = sums / n.clamp_min(1)[:, None]
        here, first = n > 0, (n > 0) & (self.counts == 0)
        if self.params.centroid_update == "running":
            r = self.params.centroid_rate
            new = torch.where(first[:, None], mean, (1 - r) * old + r * mean)
        else:
            new = (old * self.counts[:, None] + sums) / (self.counts + n).clamp_min(1)[:, None]
        new = torch.where(here[:, None], new, old)
        shift = torch.where(here & ~first, (new - old).norm(dim=1), torch.zeros_like(n))
        self.centroids.copy_(new.to(self.centroids.dtype))
        self.counts += n
        self._last = {"shift": float(shift[here & ~first].mean()) if (here & ~first).any() else 0.0,
                      "seen": float((self.counts > 0).sum()), "lambda_m": self.lambda_m(step + 1),
                      "largest_share": float(n.max() / n.sum()) if n.sum() > 0 else 0.0}  # the collapse monitor
        for c, name in enumerate(self.classes):
            self._last[f"count/{name}"] = float(n[c])
            self._last[f"shift/{name}"] = float(shift[c])
        if not (torch.distributed.is_initialized() and torch.distributed.get_rank()):  # the same on every rank
            norms = new.norm(dim=1)
            self._rows.extend((step, name, float(n[c]), float(shift[c]) if here[c] and not first[c] else float("nan"),
                               float(norms[c])) for c, name in enumerate(self.classes))

    def _balance(self, losses: list[torch.Tensor], defined: bool) -> None:
        """balance=auto: the global batch's |L_S| and mean per-sample |L_M term| (the ranks' shares summed over ranks
        / world size: the same on every rank) over the first ``balance_steps`` steps where L_M had two seen classes
        (with one, L_M is a pull alone) and both were finite; then lambda_4 = lambda_3 |L_S| / (ratio |L_M|), capped
        at ``balance_max`` (``lambda_m`` when a measured mean is 0)."""
        p = self.params
        if p.balance != "auto" or self.balanced() or not losses:
            return
        g = sum_across_ranks(torch.stack(losses).mean(0)) / world_size()
        if defined and bool(torch.isfinite(g).all()):
            self.balance_sums += torch.stack([g[0].abs(), g[1], g.new_tensor(1.0)])
        s, m, _ = self.balance_sums.tolist()
        if self.balanced():
            self.lambda_auto.fill_(min(p.lambda_s * s / (p.balance_ratio * m), p.balance_max) if s > 0 and m > 0
                                   else p.lambda_m)

    def step_metrics(self) -> dict[str, float]:
        return dict(self._last)

    def report(self) -> dict[str, dict[str, list]]:
        rows = list(self._rows)  # empty on ranks other than 0: every rank answers with the same table
        self._rows.clear()
        return {"centroids": {"step": [r[0] for r in rows], "group": [r[1] for r in rows],
                              "count": [r[2] for r in rows], "shift": [r[3] for r in rows], "norm": [r[4] for r in rows]}}

    # ------------------------------------------------------------------------------------------------ contract
    def groups(self) -> dict[str, Group]:
        return {"model": Group(list(self.parameters()))}

    def updates(self, step: int) -> list[Update]:
        return [Update("large_margin", "model", self.loss)]
