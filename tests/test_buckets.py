"""The bucketed gradient reducer (ssau/dist/buckets.py) inside the update path (ssau/train/updates.py), on 2 real gloo
ranks: it equals the averaging after backward (``average_gradients``, the path before issue 26) over a two-group
update with accumulation, a frozen group and a parameter that gets no gradient, plain, with fused optimisers, and with
one group a DeepSpeed ZeRO-2 engine beside it; buckets are launched while backward runs; a non-finite loss or gradient
on one rank is refused on every rank."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from ranks import run_ranks
from torch import nn

from ssau.config import OptimConfig
from ssau.dist.ranks import Runtime
from ssau.methods.base import Group, Update

ROOT = Path(__file__).resolve().parents[1]
ZERO2 = str(ROOT / "launch" / "deepspeed" / "zero2.json")
STEPS, ACCUMULATE, CLIP = 3, 2, 0.5


def _net() -> nn.ModuleDict:
    torch.manual_seed(0)
    return nn.ModuleDict(dict(a=nn.Sequential(nn.Linear(6, 64), nn.Tanh(), nn.Linear(64, 64)), idle=nn.Linear(2, 2),
                              b=nn.Linear(64, 3), c=nn.Linear(3, 3)))


def _groups(net) -> dict[str, Group]:  # group a holds a layer no loss uses: its gradient counts as zeros
    return {"a": Group(list(net.a.parameters()) + list(net.idle.parameters())), "b": Group(list(net.b.parameters())),
            "c": Group(list(net.c.parameters()))}


def _batch(rank: int, step: int, micro: int, poison: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + 10 * step + micro)
    x, y = torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)
    if poison == "loss":
        x[0, 0] = float("nan")
    return x, y


def _loss(net, batch, step):
    x, y = batch
    return {"loss": ((net.c(net.b(net.a(x))) - y) ** 2).mean(), "mse_b": (net.b(net.a(x)) ** 2).mean()}


def _reference(net, rank: int, world: int, rt: Runtime, opts: dict) -> None:
    """The averaging after backward: micro-batches, then one flat all-reduce per group, clip, step."""
    from ssau.dist.collectives import average_gradients

    groups = _groups(net)
    for step in range(STEPS):
        for g in ("a", "b"):
            opts[g].zero_grad(set_to_none=True)
        for p in groups["c"].params:
            p.requires_grad_(False)
        params = groups["a"].params + groups["b"].params
        for micro in range(ACCUMULATE):
            (_loss(net, _batch(rank, step, micro), step)["loss"] / ACCUMULATE).backward(inputs=params)
        for p in groups["c"].params:
            p.requires_grad_(True)
        for g in ("a", "b"):
            average_gradients(groups[g].params, rt)
            torch.nn.utils.clip_grad_norm_(groups[g].params, CLIP)
            opts[g].step()


def _rank_run(rank: int, world: int, mode: str) -> dict:
    import torch.distributed as dist

    from ssau.train.optim import build_optimizer
    from ssau.train.updates import Updates

    assert dist.get_world_size() == world == 2
    os.environ["LOCAL_RANK"] = str(rank)
    rt = Runtime(rank, world, torch.device("cpu"), False, False)
    net, optim = _net(), OptimConfig(accumulate=ACCUMULATE, clip_grad=CLIP, fused="on" if mode == "fused" else "off")
    groups = _groups(net)
    opts = {g: build_optimizer(optim, groups[g].params, fused=True) for g in groups}
    if mode == "reference":
        _reference(net, rank, world, rt, opts)
        return {"params": [p.detach().double().numpy().copy() for p in net.parameters()]}
    engines = {}
    if mode == "zero2":
        from ssau.dist.deepspeed import deepspeed_engine

        engines["a"] = deepspeed_engine(groups["a"].params, opts["a"], None, ZERO2, 4, ACCUMULATE, CLIP)
        opts["a"] = engines["a"].optimizer
    upd = Update("u", ("a", "b"), lambda batch, step: _loss(net, batch, step), freeze=("c",))
    updates = Updates(optim, rt, groups, opts, engines, bucket_mb=0.0002)  # 210 bytes: several buckets per group
    early, parts = [], None
    for step in range(STEPS):
        micro = iter(range(ACCUMULATE))
        _, parts = updates.run(upd, lambda: _batch(rank, step, next(micro)), None, step)  # noqa: B023
        early.append(updates.reducer.early)
    updates.flush()
    return {"params": [p.detach().double().numpy().copy() for p in net.parameters()], "early": early,
            "buckets": [len(b) for b in updates.reducer.layouts.values()], "refused": updates.refused,
            "parts": {k: float(v) for k, v in parts.items()}}


@pytest.fixture(scope="module")
def reference() -> list:
    return run_ranks(_rank_run, 2, "reference")


@pytest.mark.parametrize("mode", ["plain", "fused", "zero2"])
def test_bucketed_reduction_equals_averaging_after_backward(reference, mode):
    got = run_ranks(_rank_run, 2, mode)
    for rank in range(2):
        for ours, theirs in zip(got[rank]["params"], reference[rank]["params"], strict=True):
            np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=0)
        assert got[rank]["refused"] == 0
    for a, b in zip(got[0]["params"], got[1]["params"], strict=True):
        np.testing.assert_array_equal(a, b)  # every rank holds the same parameters
    # the engine's group is reduced by DeepSpeed: only group b's buckets are ssau's
    assert got[0]["buckets"] == ([1] if mode == "zero2" else [6])
    # buckets went out while backward ran: from the second update on, all but the last (the idle layer's, which
    # waits for finish()); the first update learns the order in which gradients arrive
    assert got[0]["early"][1:] == ([1, 1] if mode == "zero2" else [5, 5]), got[0]["early"]
    assert set(got[0]["parts"]) >= {"loss", "mse_b", "grad_norm_b"}


def _rank_nonfinite(rank: int, world: int, name: str, fused: bool) -> dict:
    import torch.distributed as dist

    from ssau.train.optim import build_optimizer
    from ssau.train.updates import Updates

    assert dist.get_world_size() == world == 2
    rt = Runtime(rank, world, torch.device("cpu"), False, False)
    net, optim = _net(), OptimConfig(name=name, accumulate=1, clip_grad=CLIP, fused="on" if fused else "off")
    groups = _groups(net)
    opts = {g: build_optimizer(optim, groups[g].params, fused=True) for g in groups}
    upd = Update("u", ("a", "b"), lambda batch, step: _loss(net, batch, step), freeze=("c",))
    updates = Updates(optim, rt, groups, opts, {}, bucket_mb=0.0002)
    snapshots = [[p.detach().clone() for p in net.parameters()]]
    for step in range(4):
        poison = "loss" if step == 0 and rank == 1 else ""  # the first update: rank 1's loss is NaN
        hook = net.a[0].weight.register_hook(lambda g: g * float("inf")) if step == 1 and rank == 0 else None
        updates.run(upd, lambda: _batch(rank, step, 0, poison), None, step)  # noqa: B023
        if hook:  # the second: rank 0's loss is finite, one of its gradients is not
            hook.remove()
        snapshots.append([p.detach().clone() for p in net.parameters()])
    updates.flush()
    same = [all(torch.equal(x, y) for x, y in zip(snapshots[s], snapshots[s - 1])) for s in range(1, 5)]
    state = [opts["b"].state[p] for p in groups["b"].params]
    return {"same": same, "refused": updates.refused, "fused": opts["b"].param_groups[0].get("fused"),
            "steps": [int(s["step"]) for s in state] if name == "adam" else [],
            "momentum": [float(s["momentum_buffer"].abs().max()) for s in state] if name == "sgd" else [],
            "params": [p.detach().numpy().copy() for p in net.parameters()]}


@pytest.mark.parametrize("name,fused", [("adam", False), ("adam", True), ("sgd", True)])
def test_a_non_finite_loss_or_gradient_on_one_rank_is_refused_on_every_rank(name, fused):
    """Refused from the very first update on (an optimiser with no state yet), fused or not; SGD is never fused
    (a fused SGD refused at its first step keeps an uninitialised momentum buffer)."""
    r0, r1 = run_ranks(_rank_nonfinite, 2, name, fused)
    for r in (r0, r1):
        assert r["same"] == [True, True, False, False]  # updates 0 and 1 left every parameter as it was
        assert r["refused"] == 2
        assert r["fused"] is (True if fused and name == "adam" else None)
        if name == "adam":
            assert r["steps"] == [2, 2]  # the optimiser's state did not advance on a refused update
        else:
            assert max(r["momentum"]) < 10.0  # two real steps' gradients, nothing left over from a refused one
    for a, b in zip(r0["params"], r1["params"], strict=True):
        np.testing.assert_array_equal(a, b)
