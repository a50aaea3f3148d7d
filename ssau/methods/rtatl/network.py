"""RTATL's recognition path (Sec. 3.1-3.2) and its optical-flow head (Sec. 3.4).

- ``stages`` and ``Pyramid``: the backbone's stages (``model.backbone``: torchvision's ResNet, kept whole as the
  method's ``backbone`` so ``model.pretrained`` and warm starts from a supervised run find its tensors by name; the
  tiny CNN for tests) and the top-down fused map: 1x1 lateral convolutions to ``width`` channels, the higher map
  upsampled (nearest) and added, down to stride 4 (the paper: "gradually upsampled and added with the low-level
  feature maps").
- ``Regional``: per AU a module of two 3x3 convolutions (ReLU) on its two RoIs (``torchvision.ops.roi_align`` from
  the fused map to ``roi_size`` x ``roi_size``), average-pooled to d-dimensional tokens. The J modules run as one
  grouped convolution (groups = J), which is J separate modules computed in one call.
- ``Relation``: one encoder and one decoder layer (``nn.Transformer*Layer``, 8 heads, d = 128, feed-forward 4d),
  no positional encoding in the encoder; the decoder's input is the same 2J tokens plus a learned AU indicator per
  token (an AU's two tokens share their AU's indicator), its memory the encoder's output. Off (``transformer=false``,
  Table 1's bare backbone): the tokens pass unchanged.
- Heads: each AU's two output tokens averaged, a fully connected layer per AU (the regional prediction); a linear
  layer on the pooled last stage (the global prediction); the final logit is their element-wise max (Sec. 3.1).
- ``FlowHead``: two transposed convolutions on the last stage's maps (ReLU between), predicting (u, v) at half the
  image's resolution, in pixels of the image.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.ops import roi_align

from ssau.methods.backbones import TinyCNN
from ssau.methods.rtatl.regions import roi_rows


def stage_channels(backbone: nn.Module) -> tuple[list[int], int]:
    """(channels of the maps ``stages`` returns, the last one's stride) for a ``build_backbone`` network."""
    if isinstance(backbone, TinyCNN):  # blocks of stride 2, 4, 8: the stride-4 and stride-8 maps
        c = backbone.body[3].out_channels
        return [c, c * 2], 8
    b = backbone  # a block's last convolution: conv2 (BasicBlock) or conv3 (Bottleneck)
    return [getattr(layer[-1], "conv3", layer[-1].conv2).out_channels
            for layer in (b.layer1, b.layer2, b.layer3, b.layer4)], 32


def stages(backbone: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The backbone's maps from stride 4 to its last stage."""
    b = backbone
    if isinstance(b, TinyCNN):
        s4 = b.body[3:6](b.body[0:3](x))
        return [s4, b.body[6:9](s4)]
    out = [b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(x)))))]
    for layer in (b.layer2, b.layer3, b.layer4):
        out.append(layer(out[-1]))
    return out


class Pyramid(nn.Module):
    """The top-down fused map from the backbone's stages (the backbone itself stays the method's ``backbone``)."""

    def __init__(self, chans: list[int], width: int = 128):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in chans)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """-> the fused map [B, width, S/4, S/4]."""
        fused = self.lateral[-1](feats[-1])
        for i in range(len(feats) - 2, -1, -1):
            up = nn.functional.interpolate(fused, size=feats[i].shape[-2:], mode="nearest")
            fused = up + self.lateral[i](feats[i])
        return fused


class Regional(nn.Module):
    def __init__(self, n_aus: int, channels: int, d: int = 128, roi_size: int = 6):
        super().__init__()
        self.n, self.c, self.d, self.roi_size = n_aus, channels, d, roi_size
        self.body = nn.Sequential(nn.Conv2d(n_aus * channels, n_aus * d, 3, padding=1, groups=n_aus),
                                  nn.ReLU(inplace=True),
                                  nn.Conv2d(n_aus * d, n_aus * d, 3, padding=1, groups=n_aus), nn.ReLU(inplace=True))

    def forward(self, fused: torch.Tensor, boxes: torch.Tensor, image_size: int) -> torch.Tensor:
        """``boxes`` [B, J, 2, 4] in image pixels (centres at integers) -> tokens [B, 2J, d] (AU j's at 2j, 2j+1)."""
        b = boxes.shape[0]
        # float32 boxes: in bf16 a box snaps to whole pixels above 128 and an image index above 256 names another
        crops = roi_align(fused.float(), roi_rows(boxes).float(), self.roi_size,
                          spatial_scale=fused.shape[-1] / image_size,
                          sampling_ratio=2, aligned=True).to(fused.dtype)  # [B * J * 2, C, r, r]
        crops = crops.view(b, self.n, 2, self.c, self.roi_size, self.roi_size).transpose(1, 2)
        out = self.body(crops.reshape(b * 2, self.n * self.c, self.roi_size, self.roi_size)).mean((2, 3))
        return out.view(b, 2, self.n, self.d).transpose(1, 2).reshape(b, 2 * self.n, self.d)


class Relation(nn.Module):
    def __init__(self, n_aus: int, d: int = 128, heads: int = 8, dropout: float = 0.0):
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=dropout, batch_first=True)
        self.decoder = nn.TransformerDecoderLayer(d, heads, 4 * d, dropout=dropout, batch_first=True)
        self.indicators = nn.Parameter(torch.randn(n_aus, d) * 0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        memory = self.encoder(tokens)
        return self.decoder(tokens + self.indicators.repeat_interleave(2, dim=0), memory)


class Heads(nn.Module):
    def __init__(self, n_aus: int, d: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_aus, d).uniform_(-1 / math.sqrt(d), 1 / math.sqrt(d)))
        self.bias = nn.Parameter(torch.zeros(n_aus))
        self.globl = nn.Linear(dim, n_aus)

    def forward(self, tokens: torch.Tensor, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (final logits [B, J] = max(regional, global), regional features [B, J, d])."""
        b, n2, d = tokens.shape
        feats = tokens.view(b, n2 // 2, 2, d).mean(2)
        regional = (feats * self.weight).sum(-1) + self.bias
        return torch.maximum(regional, self.globl(last.mean((2, 3)))), feats


class FlowHead(nn.Module):
    def __init__(self, dim: int, last_stride: int, hidden: int = 64):
        super().__init__()
        k = int(round(math.sqrt(last_stride / 2)))  # two equal upsamplings from stride last_stride to 2
        self.body = nn.Sequential(nn.ConvTranspose2d(dim, hidden, k, stride=k), nn.ReLU(inplace=True),
                                  nn.ConvTranspose2d(hidden, 2, k, stride=k))

    def forward(self, last: torch.Tensor, image_size: int) -> torch.Tensor:
        """-> [B, 2, S/2, S/2] (the transposed convolutions' output cut to half the image where S/last_stride was
        rounded up)."""
        half = image_size // 2
        return self.body(last)[..., :half, :half]
