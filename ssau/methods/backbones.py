"""Feature extractors: torchvision ResNet-18/34/50 and a tiny CNN for tests.

ImageNet initialisation goes through torchvision's weights enums (downloaded into the torch cache on machines with
internet, read from the cache otherwise) or a local state_dict file. Nothing here downloads during tests.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision import models

from ssau.checkpoints import CheckpointError, safe_load
from ssau.config import ModelConfig
from ssau.errors import ConfigError

_RESNETS = {
    "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1, 512),
    "resnet34": (models.resnet34, models.ResNet34_Weights.IMAGENET1K_V1, 512),
    "resnet50": (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V2, 2048),
}


class TinyCNN(nn.Module):
    """Three strided conv blocks and global pooling: a backbone that trains in seconds on CPU."""

    def __init__(self, width: int = 32):
        super().__init__()
        layers, c = [], 3
        for out in (width, width * 2, width * 4):
            layers += [nn.Conv2d(c, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            c = out
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.dim = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def build_backbone(cfg: ModelConfig) -> tuple[nn.Module, int]:
    """-> (module mapping normalised images to [B, D] features, D)."""
    if cfg.backbone == "tiny":
        net = TinyCNN()
        dim = net.dim
        if cfg.pretrained == "imagenet":
            raise ConfigError("model.pretrained=imagenet: the tiny backbone has no ImageNet weights")
    else:
        ctor, weights, dim = _RESNETS[cfg.backbone]
        if cfg.pretrained == "imagenet":
            try:
                net = ctor(weights=weights)
            except Exception as e:  # no network and nothing cached: one clear line, at start
                raise ConfigError(f"model.pretrained=imagenet: could not load {weights} ({type(e).__name__}); "
                                  f"put it in the torch cache or pass a state_dict file path") from None
        else:
            net = ctor(weights=None)
        net.fc = nn.Identity()
    if cfg.pretrained not in ("none", "imagenet"):
        path = Path(cfg.pretrained)
        if not path.is_file():
            raise ConfigError(f"model.pretrained: {path} is not a file")
        try:
            state = safe_load(path)  # weights only: a pickled file runs nothing
        except CheckpointError as e:
            raise ConfigError(f"model.pretrained: {e}") from None
        if not isinstance(state, dict):
            raise ConfigError(f"model.pretrained: {path} holds a {type(state).__name__}, not a state_dict")
        if "method" in state:  # an ssau model.pt or checkpoint: take its backbone
            state = {k.removeprefix("backbone."): v for k, v in state["method"].items() if k.startswith("backbone.")}
        state = state.get("state_dict", state)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # a torchvision classifier's head
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing:
            raise ConfigError(f"model.pretrained: {path} lacks {len(missing)} backbone tensors (e.g. {missing[0]})")
    return net, dim
