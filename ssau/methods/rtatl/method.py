"""RTATL (regional and temporal auxiliary task learning; paper 004, Sec. 3, Eq. 1-9): a RoI transformer AU recogniser
trained beside two self-supervised tasks, RoI inpainting (RoII) and single-image optical-flow estimation (OFE).

Per step (groups ``model``: backbone, fused map, RoI modules, transformer, heads, flow head, G; ``discriminator``:
D and C):
1. ``model`` (D and C frozen): every image of the step (labelled and unlabelled: "the auxiliary tasks are also
   performed on the labeled data"; with both tasks off, as in Table 1's first two arms, the unlabelled images are
   not read) is seen with both regions of one AU whitened (``inpaint``), then
     L = L_sup + L_G + lambda_f L_F  (Eq. 9 without L_D, which is the other update's)
   - L_sup: BCE of the final (max of regional and global) logits on the labelled images' known labels, leaving out
     the cropped AU and every AU one of whose regions is whitened over at least ``overlap`` (0.5) of its area
     (AU12, AU14 and AU15 share the lip corners; AU10's inner-lip regions lie mostly under them) - "we calculate
     L_sup only on AUs in the intact regions".
   - L_G = lambda_1 L_adv^g + (1 - lambda_1) L_rec + lambda_2 L_c^g (Eq. 3, 4, 6, 7) over both patches of every
     image: G rebuilds each cropped region from its attended token; L_rec is the mean absolute difference per
     element of patches in [-1, 1] (the paper's L1 norm divided by the patch's element count).
   - L_F: the mean absolute difference per element (u and v of every pixel) between the flow head's prediction and
     the stored TV-L1 flow area-resized to half the image's resolution, over the images that have flow (Eq. 8);
     images without are masked.
2. ``discriminator`` (the same batch): L_D = -L_adv (Eq. 2: D(real) -> 1, D(G(x)) -> 0) + L_C (Eq. 5), on the real
   patches and the patches G made in update 1 (detached). ``optim.accumulate`` > 1 is refused: the trainer draws
   new micro-batches for the second update, which update 1 never generated patches for.
C's target y for the cropped AU: the known label of a labelled image; otherwise the pseudo label
p >= ``pseudo_threshold`` from a no-gradient pass on the intact image (Sec. 3.3.1), BatchNorm statistics left alone.

Choices where the paper is silent (configurable where they matter):
- Update order: the main update first, D and C second on the patches it generated (one forward of the network per
  step instead of two); the paper says only that D and G "are trained alternately".
- Regions: JAA-Net's code by default (``regions.py``), which differs from the EAC-Net pairs of ../shared/AU-DATA.md
  for AU10, AU17 and AU23/24 (``regions=eac``); the paper follows ROI-Nets [17], whose text both encode.
- BatchNorm running statistics follow the training forward only, of whitened images (the intact pass for C's
  targets leaves them alone); inference sees intact images.
- The fused map has ``fused_width`` (128) channels; RoIs are pooled by ``roi_align`` to ``roi_size`` (6) cells; the
  region side is 48/200 of the face, which the stream enlarges by 1.143 before cropping (18 px at 64 px, 53 px at
  192 px); G makes 48 px patches resized to it.
- Transformer: 8 heads, d = 128, feed-forward 4d, dropout ``dropout`` (0: a dropout mask would differ between
  2 ranks x B and 1 process x 2B); AU indicators shared by an AU's two tokens, added to the decoder's input.
- The supervised loss is on the fused (max) output; the regional and global heads get no loss of their own.
- Flow is read on the same (cropped) forward as the other terms. The crop draw is per image key (``inpaint.choose``).
- Table 1's arms: ``transformer``, ``inpaint`` and ``flow`` switch the parts off one by one (all off: the
  backbone with RoI modules and max-fused heads).
- Optimiser: the ``optim`` section's, for both groups (the paper's Adam at 3e-4, Sec. 4.2, is
  launch/recipes/rtatl.yaml's; a comparison keeps one optimiser for every arm).
- Inference reads the template's mean landmarks (no landmarks come with a frame at inference); G, D, C and the
  flow head are left out of ``model.pt`` (``inference_drops``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ssau.config import ModelConfig
from ssau.data.batch import Batch
from ssau.dist.collectives import sum_across_ranks
from ssau.errors import ConfigError
from ssau.methods.backbones import build_backbone
from ssau.methods.base import Group, Method, Update
from ssau.methods.parts import frozen_bn, full_precision, global_mean, masked_bce
from ssau.methods.rtatl.inpaint import Generator, PatchNet, choose, patches, white_out
from ssau.methods.rtatl.network import FlowHead, Heads, Pyramid, Regional, Relation, stage_channels, stages
from ssau.methods.rtatl.regions import au_centres, boxes, overlaps, region_side, rule_table, template_landmarks


@dataclass
class RTATLParams:
    regions: Literal["jaa", "eac"] = "jaa"  # AU centre rules (regions.py)
    transformer: bool = True
    inpaint: bool = True  # RoII
    flow: bool = True  # OFE (needs data.flow=true: shards made with ssau shard --flow 3)
    lambda_1: float = 0.1
    lambda_2: float = 0.1
    lambda_f: float = 0.2
    d: int = 128
    heads: int = 8
    fused_width: int = 128
    roi_size: int = 6
    dropout: float = 0.0
    overlap: float = 0.5
    pseudo_threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.d % self.heads or not 0.0 <= self.lambda_1 <= 1.0 or min(self.lambda_2, self.lambda_f) < 0:
            raise ConfigError(f"method: d={self.d} must divide by heads={self.heads}, lambda_1 in [0, 1], lambda_2 "
                              f"and lambda_f >= 0")
        if not (0.0 < self.overlap <= 1.0 and 0.0 < self.pseudo_threshold < 1.0 and self.roi_size >= 1):
            raise ConfigError(f"method: overlap={self.overlap:g} in (0, 1], pseudo_threshold in (0, 1), roi_size >= 1")


class RTATL(Method):
    name = "rtatl"
    Params = RTATLParams
    uses = ("unlabelled",)
    inference_drops = ("generator", "discriminator", "classifier", "flow_head")

    def __init__(self, params: RTATLParams, aus: tuple[int, ...], model: ModelConfig):
        super().__init__(params, aus)
        p, n = params, len(aus)
        self.register_buffer("rules", rule_table(self.aus, p.regions), persistent=False)
        self.backbone, _ = build_backbone(model)
        chans, last_stride = stage_channels(self.backbone)
        self.pyramid = Pyramid(chans, p.fused_width)
        self.regional = Regional(n, p.fused_width, p.d, p.roi_size)
        self.relation = Relation(n, p.d, p.heads, p.dropout) if p.transformer else None
        self.heads = Heads(n, p.d, chans[-1])
        self.flow_head = FlowHead(chans[-1], last_stride) if p.flow else None
        if p.inpaint:
            self.generator = Generator(p.d)
            self.discriminator, self.classifier = PatchNet(1), PatchNet(n)
        self.seed, self.stats, self._made = 0, {}, None

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.method.get("flow", True) and not cfg.data.flow:
            raise ConfigError("method.flow: the optical-flow task needs data.flow=true and shards made with "
                              "`ssau shard ... --flow 3` (or method.flow=false)")
        if cfg.method.get("inpaint", True) and cfg.optim.accumulate > 1:
            raise ConfigError("optim.accumulate: rtatl's discriminator update reuses the patches of the step's one "
                              "batch; accumulate 1 (or method.inpaint=false)")

    def setup(self, info) -> None:
        self.seed = info.seed

    def groups(self) -> dict[str, Group]:
        if not self.params.inpaint:
            return {"model": Group(list(self.parameters()))}
        return self.split_groups("model", "discriminator", nn.ModuleList([self.discriminator, self.classifier]))

    def updates(self, step: int) -> list[Update]:
        main = Update("model", "model", self.main_loss, freeze=("discriminator",) if self.params.inpaint else ())
        if not self.params.inpaint:
            return [main]
        return [main, Update("discriminator", "discriminator", self.discriminator_loss, new_batch=False,
                             freeze=("model",))]

    # ------------------------------------------------------------------------------------------------ forward
    def regions(self, landmarks: torch.Tensor | None, n: int, size: int, device) -> torch.Tensor:
        """[n, J, 2, 4] region boxes from landmarks (the template where there are none)."""
        lm = landmarks if landmarks is not None else template_landmarks(n, size, device)
        return boxes(au_centres(lm.to(device), self.rules), region_side(size))

    def recognise(self, images: torch.Tensor, regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """uint8 images -> (final logits [B, J], attended tokens [B, 2J, d], last-stage maps)."""
        feats = stages(self.backbone, self.normalise(images))
        fused, last = self.pyramid(feats), feats[-1]
        tokens = self.regional(fused, regions, images.shape[-1])
        if self.relation is not None:
            tokens = self.relation(tokens)
        logits, _ = self.heads(tokens, last)
        return full_precision(logits), tokens, last

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        regions = self.regions(None, len(images), images.shape[-1], images.device)
        return torch.sigmoid(self.recognise(images, regions)[0])

    # ------------------------------------------------------------------------------------------------ losses
    def _step_data(self, batch: Batch):
        """The step's images (the unlabelled ones only where an auxiliary task reads them), keys and regions."""
        images, keys, lm = batch.images, list(batch.keys), batch.landmarks
        if self._with_unlabelled(batch):
            images = torch.cat([images, batch.unlabelled])
            keys += list(batch.unlabelled_keys)
            if lm is not None or batch.unlabelled_landmarks is not None:
                s, dev = images.shape[-1], images.device
                own = lm if lm is not None else template_landmarks(len(batch.images), s, dev)
                other = batch.unlabelled_landmarks if batch.unlabelled_landmarks is not None else \
                    template_landmarks(len(batch.unlabelled), s, dev)
                lm = torch.cat([own.to(dev), other.to(dev)])
        return images, keys, self.regions(lm, len(images), images.shape[-1], images.device)

    def _targets_for_c(self, images, regions, chosen, batch: Batch) -> torch.Tensor:
        """[N] C's target for each image's cropped AU: the known label, else the intact image's pseudo label."""
        with torch.no_grad(), frozen_bn(self):
            pseudo = (torch.sigmoid(self.recognise(images, regions)[0]) >= self.params.pseudo_threshold).float()
        m, rows = len(batch.images), torch.arange(len(images), device=images.device)
        known = torch.zeros(len(images), device=images.device)
        label = pseudo[rows, chosen]
        known[:m] = batch.mask[rows[:m], chosen[:m]].float()
        label[:m] = torch.where(known[:m] > 0, batch.targets[rows[:m], chosen[:m]].float(), label[:m])
        return label

    def _with_unlabelled(self, batch: Batch) -> bool:
        return (self.params.inpaint or self.params.flow) and batch.unlabelled is not None and len(batch.unlabelled) > 0

    def _flow_loss(self, last: torch.Tensor, batch: Batch) -> torch.Tensor:
        pred = full_precision(self.flow_head(last, batch.images.shape[-1]))
        parts = [(batch.flow, batch.flow_valid, len(batch.images))]
        if self._with_unlabelled(batch):
            parts.append((batch.unlabelled_flow, batch.unlabelled_flow_valid, len(batch.unlabelled)))
        flows, valid = [], []
        for f, v, n in parts:
            flows.append(f if f is not None else torch.zeros(n, 2, *batch.images.shape[-2:], device=pred.device))
            valid.append(v if v is not None else torch.zeros(n, dtype=torch.bool, device=pred.device))
        target = nn.functional.interpolate(torch.cat(flows).to(pred), size=pred.shape[-2:], mode="area")
        ok = torch.cat(valid).to(pred.device).float()
        per = (pred - target).abs().mean((1, 2, 3)) * ok
        self.stats["flow_images"] = float(sum_across_ranks(ok.sum().detach()))
        return global_mean(per.sum(), ok.sum())

    def main_loss(self, batch: Batch, step: int) -> dict:
        p, m = self.params, len(batch.images)
        images, keys, regions = self._step_data(batch)
        keep = torch.ones_like(batch.mask)
        if p.inpaint:
            chosen = torch.tensor(choose(keys, self.seed, step, len(self.aus)), device=images.device)
            rows = torch.arange(len(images), device=images.device)
            y = self._targets_for_c(images, regions, chosen, batch)
            crop = regions[rows, chosen]  # [N, 2, 4]
            real = patches(images, crop, int(round(region_side(images.shape[-1]))))
            seen = white_out(images, crop)
            keep = (~overlaps(regions[:m], chosen[:m], p.overlap)).to(batch.mask.dtype)
        else:
            seen = images
        logits, tokens, last = self.recognise(seen, regions)
        sup = masked_bce(logits[:m], batch.targets, batch.mask * keep)
        out = {"bce": sup.detach()}
        loss = sup
        if p.inpaint:
            d = tokens.shape[-1]
            x = tokens.view(len(images), len(self.aus), 2, d)[rows, chosen].reshape(-1, d)
            fake = full_precision(self.generator(x, real.shape[-1]))
            y2, c2 = y.repeat_interleave(2), chosen.repeat_interleave(2)
            count = torch.tensor(float(len(fake)), device=fake.device)
            bce = nn.functional.binary_cross_entropy_with_logits
            adv = global_mean(bce(self.discriminator(fake).squeeze(1), torch.ones_like(y2), reduction="sum"), count)
            rec = global_mean((fake - real).abs().mean((1, 2, 3)).sum(), count)
            sem = global_mean(bce(self.classifier(fake)[torch.arange(len(fake)), c2], y2, reduction="sum"), count)
            loss_g = p.lambda_1 * adv + (1 - p.lambda_1) * rec + p.lambda_2 * sem
            loss = loss + loss_g
            out |= {"g_adv": adv.detach(), "g_rec": rec.detach(), "g_cls": sem.detach()}
            self._made = (tuple(keys), real, fake.detach(), y2, c2)
        if p.flow:
            flow = self._flow_loss(last, batch)
            loss = loss + p.lambda_f * flow
            out["flow"] = flow.detach()
        return {"loss": loss} | out

    def discriminator_loss(self, batch: Batch, step: int) -> dict:
        images, keys, regions = self._step_data(batch)
        if self._made is None or self._made[0] != tuple(keys):  # no patches of this batch yet: make them
            with torch.no_grad(), frozen_bn(self):
                self.main_loss(batch, step)
        _, real, fake, y2, c2 = self._made
        bce = nn.functional.binary_cross_entropy_with_logits
        count = torch.tensor(float(len(real)), device=real.device)
        d_real, d_fake = self.discriminator(real).squeeze(1), self.discriminator(fake).squeeze(1)
        l_d = global_mean(bce(d_real, torch.ones_like(d_real), reduction="sum")
                          + bce(d_fake, torch.zeros_like(d_fake), reduction="sum"), count)
        l_c = global_mean(bce(self.classifier(real)[torch.arange(len(real)), c2], y2, reduction="sum"), count)
        return {"loss": l_d + l_c, "d": l_d.detach(), "c": l_c.detach()}

    def step_metrics(self) -> dict[str, float]:
        return dict(self.stats)
