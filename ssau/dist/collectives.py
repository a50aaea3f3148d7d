"""Collectives over the ranks of a run: parameters broadcast from rank 0, gradients and buffers averaged (DDP's
arithmetic, see ``ssau.dist.ranks``), sums across ranks for the global normalisers of the methods' losses."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ssau.dist.ranks import Runtime


def broadcast_module(module: nn.Module, rt: Runtime) -> None:
    """Every rank starts from rank 0's parameters and buffers."""
    if rt.world > 1:
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def average_gradients(params: list[nn.Parameter], rt: Runtime) -> None:
    """DDP's arithmetic: one flattened all-reduce, mean over ranks. Missing gradients count as zeros, so every
    rank contributes the same layout whatever its batch touched."""
    if rt.world == 1:
        return
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= rt.world
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sum_across_ranks(t: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
    """The sum over ranks. ``differentiable=True`` uses the functional collective (the replacement torch names when
    it deprecates ``torch.distributed.nn.functional.all_reduce``), whose backward sums the incoming gradients over
    ranks, so a loss on any rank reaches every rank's inputs (MAL's inner step); otherwise a plain all-reduce of a
    detached copy."""
    if world_size() == 1:
        return t
    if differentiable:
        from torch.distributed._functional_collectives import all_reduce, wait_tensor

        return wait_tensor(all_reduce(t, "sum", dist.group.WORLD))
    out = t.detach().clone()
    dist.all_reduce(out)
    return out


def average_buffers(module: nn.Module, rt: Runtime, skip: tuple[str, ...] = ()) -> None:
    """Floating buffers (BatchNorm statistics, centroids) averaged so that every rank holds the same state.

    BatchNorm running variances get the between-rank term too. Buffers are averaged after every step, so before
    a step every rank holds the same (M, V); rank r then moves them with its batch mean mu_r and variance v_r:
    M_r = (1-m) M + m mu_r, V_r = (1-m) V + m v_r. The global batch's statistics (equal batch sizes) have mean
    mean_r(mu_r) - the average of M_r - and variance mean_r(v_r) + mean_r((mu_r - mu)^2) (law of total variance);
    since M_r - mean(M) = m (mu_r - mu), the missing term is mean_r((M_r - mean(M))^2) / m. Exact up to the n/(n-1)
    corrections of the per-rank variances; with ``model.sync_bn`` the statistics are global already (this adds 0).
    A BatchNorm with momentum=None (cumulative average) gets plain averaging. Buffers named with a prefix in ``skip``
    are equal on every rank by construction and left alone."""
    if rt.world == 1:
        return
    persistent = module.state_dict(keep_vars=True)  # non-persistent buffers (constants) need no averaging
    bufs = [b for name, b in module.named_buffers() if b.is_floating_point() and name in persistent
            and not name.startswith(skip or ("\0",))]
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats and m.running_mean is not None and m.momentum]
    squares = [m.running_mean.detach().double() ** 2 for m in norms]  # for mean_r(M_r^2) - mean(M)^2
    if bufs:
        flat = torch.cat([b.reshape(-1).double() for b in bufs] + [q.reshape(-1) for q in squares])
        dist.all_reduce(flat)
        flat /= rt.world
        offset = 0
        for b in bufs:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()
        for m, q in zip(norms, squares):
            spread = (flat[offset:offset + q.numel()].view_as(q) - m.running_mean.double() ** 2).clamp_min(0)
            m.running_var.add_((spread / m.momentum).to(m.running_var.dtype))
            offset += q.numel()


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
