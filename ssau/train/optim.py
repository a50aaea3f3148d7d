"""Optimisers and the learning-rate schedule, from the ``optim`` config section."""

from __future__ import annotations

import dataclasses
import math

import torch

from ssau.config import OptimConfig, build
from ssau.errors import ConfigError

GROUP_KEYS = ("name", "lr", "weight_decay", "momentum", "betas")  # what a group may set for itself


def group_config(o: OptimConfig, group: str, lr: float, method_defaults: dict) -> OptimConfig:
    """The optim section as one group sees it: the section, then the method's own settings for the group (MAL's
    meta net: plain SGD, Eq. 7), then ``optim.groups.<group>`` from the user; ``lr`` is the group's learning rate
    (optim.lr x the group's lr_scale) unless a setting names one. Checked as strictly as the section itself."""
    user = o.groups.get(group, {})
    if not isinstance(user, dict):
        raise ConfigError(f"optim.groups.{group}: expected a mapping of {', '.join(GROUP_KEYS)}, got {user!r}")
    for k in user:
        if k not in GROUP_KEYS:
            raise ConfigError(f"unknown key 'optim.groups.{group}.{k}'; allowed: {', '.join(GROUP_KEYS)}")
    tree = {k: v for k, v in dataclasses.asdict(o).items() if k != "groups"} | {"lr": lr} | method_defaults | user
    g = build(OptimConfig, tree, f"optim.groups.{group}")
    for key, v, lo, hi in (("lr", g.lr, 1e-12, 10.0), ("weight_decay", g.weight_decay, 0.0, 1.0),
                           ("momentum", g.momentum, 0.0, 1.0)):
        if not lo <= v <= hi:
            raise ConfigError(f"optim.groups.{group}.{key}: {v:g} is outside {lo:g}..{hi:g}")
    if len(g.betas) != 2 or not all(0.0 <= b < 1.0 for b in g.betas):
        raise ConfigError(f"optim.groups.{group}.betas: {g.betas} must be two numbers in [0, 1)")
    return g


def check_group_names(o: OptimConfig, groups) -> None:
    """optim.groups names only groups the method has (a typo would otherwise be ignored silently)."""
    unknown = sorted(set(o.groups) - set(groups))
    if unknown:
        raise ConfigError(f"optim.groups.{unknown[0]}: this method has no optimiser group {unknown[0]!r}; its "
                          f"groups: {', '.join(groups)}")


def build_optimizer(o: OptimConfig, params: list, lr: float | None = None,
                    fused: bool = False) -> torch.optim.Optimizer:
    """``o``'s optimiser over ``params`` at ``lr`` (None: ``o.lr``); ``fused``: torch's fused kernels where
    ``optim.fused`` allows (on, or auto with the parameters on CUDA). A DeepSpeed engine's optimiser stays unfused."""
    lr = o.lr if lr is None else lr
    if o.name == "sgd":  # never fused: a refused first step would leave fused SGD an uninitialised momentum buffer
        return torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)
    fused = bool(params) and fused and (o.fused == "on" or (o.fused == "auto" and params[0].is_cuda))
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay, **({"fused": True} if fused else {}))


def as_built(opt: torch.optim.Optimizer, state: dict) -> dict:
    """A saved optimiser state with this optimiser's kernel choices (fused, foreach), so that a checkpoint from an
    unfused run resumes into a fused one and back (loading casts Adam's step counts to where the kernel wants them)."""
    kernel = {k: opt.defaults.get(k) for k in ("fused", "foreach")}
    return {**state, "param_groups": [{**g, **kernel} for g in state.get("param_groups", [])]}


def lr_factor(o: OptimConfig, total: int, step: int) -> float:
    """Linear warm-up over ``o.warmup_steps``, then constant or cosine decay to 0 at ``total`` steps."""
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
