"""RTATL's RoI inpainting (RoII, Sec. 3.3): the crop, the patches, the generator G, the patch discriminator D and the
patch AU classifier C.

- One AU per image is drawn from (train.seed, step, image key) - the same however the global batch is split over
  ranks, the same in the D/C update and the main update of a step. Both of its regions are filled with white
  (the paper's Fig. 6) in the image the network sees.
- Real patches: both regions cut from the intact image (``roi_align``, ``side`` x ``side`` px), scaled to [-1, 1].
- G (5 transposed convolutions, BatchNorm + ReLU between, tanh out): a region's attended token (d) -> a 48 x 48
  patch (1 -> 3 -> 6 -> 12 -> 24 -> 48), resized (area) to the region's side when that is not 48.
- D and C (5 convolutions each, LeakyReLU 0.2 between, no BatchNorm: a patch's score does not depend on the rest of
  the batch): three of stride 2, two of stride 1, averaged over space; D gives one logit (real / generated), C one
  logit per AU of the run, of which the cropped AU's is read.
"""

from __future__ import annotations

import random

import torch
from torch import nn
from torchvision.ops import roi_align

from ssau.methods.rtatl.regions import roi_rows

GENERATED = 48  # G's output side (the paper's patch on a 200 px face)


def choose(keys: list[str], seed: int, step: int, n_aus: int) -> list[int]:
    """The AU whose regions are cropped, per image: a function of (seed, step, key) alone."""
    return [random.Random(f"roii:{seed}:{step}:{k}").randrange(n_aus) for k in keys]


def white_out(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, S, S] with each image's boxes [B, K, 4] (pixel centres at integers) filled with white."""
    s = images.shape[-1]
    grid = torch.arange(s, device=images.device, dtype=boxes.dtype)
    x1, y1, x2, y2 = (boxes[..., i, None] for i in range(4))  # [B, K, 1]
    inside_x = (grid >= x1) & (grid <= x2)  # [B, K, S]
    inside_y = (grid >= y1) & (grid <= y2)
    inside = (inside_y[..., :, None] & inside_x[..., None, :]).any(1)  # [B, S, S]
    return images.masked_fill(inside[:, None], 255)


def patches(images: torch.Tensor, boxes: torch.Tensor, side: int) -> torch.Tensor:
    """[B * K, 3, side, side] in [-1, 1]: the boxes [B, K, 4] cut from uint8 images."""
    x = images.float() / 127.5 - 1.0
    return roi_align(x, roi_rows(boxes).to(x.dtype), side, spatial_scale=1.0, sampling_ratio=2, aligned=True)


class Generator(nn.Module):
    def __init__(self, d: int = 128):
        super().__init__()
        chans = (256, 128, 64, 32)
        layers: list[nn.Module] = [nn.ConvTranspose2d(d, chans[0], 3), nn.BatchNorm2d(chans[0]), nn.ReLU(True)]
        for a, b in zip(chans, chans[1:]):
            layers += [nn.ConvTranspose2d(a, b, 4, stride=2, padding=1), nn.BatchNorm2d(b), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(chans[-1], 3, 4, stride=2, padding=1), nn.Tanh()]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        """[N, d] tokens -> [N, 3, side, side] patches in [-1, 1]."""
        out = self.body(x[:, :, None, None])
        if side != GENERATED:
            out = nn.functional.interpolate(out, size=(side, side), mode="area" if side < GENERATED else "bilinear")
        return out


class PatchNet(nn.Module):
    """D (``outputs`` = 1) or C (``outputs`` = J)."""

    def __init__(self, outputs: int, width: int = 32):
        super().__init__()
        c = (3, width, width * 2, width * 4, width * 4)
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [nn.Conv2d(c[i], c[i + 1], 3, stride=2 if i < 3 else 1, padding=1), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(c[4], outputs, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean((2, 3))
