"""Optimisers and the learning-rate schedule, from the ``optim`` config section."""

from __future__ import annotations

import math

import torch

from ssau.config import OptimConfig


def build_optimizer(o: OptimConfig, params: list, lr: float) -> torch.optim.Optimizer:
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay)


def lr_factor(o: OptimConfig, total: int, step: int) -> float:
    """Linear warm-up over ``o.warmup_steps``, then constant or cosine decay to 0 at ``total`` steps."""
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
