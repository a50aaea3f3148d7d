"""Tiny networks for tests that compare ranks with one process."""

from __future__ import annotations

import torch
from torch import nn


class PixelNet(nn.Module):
    """A BatchNorm-free backbone in float64: what every rank computes is a function of its samples alone."""

    def __init__(self, size: int = 8, dim: int = 5):
        super().__init__()
        self.fc = nn.Linear(3 * size * size, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x.double().flatten(1)))
