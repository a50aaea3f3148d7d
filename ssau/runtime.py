"""Ranks, devices, precision, gradient averaging and DeepSpeed engines: everything distributed lives here.

Process groups come from accelerate's ``PartialState``, so ``accelerate launch`` (and torchrun) environments work as
they are: NCCL on GPUs; on a CPU-only machine, real ranks on gloo (``cpu=True`` is passed when there is no GPU, or
every process would report rank 0 of 1). Ranks are always read from ``torch.distributed``, never from accelerate's
helpers, which report rank 0 of 1 under DeepSpeed on CPU (../shared/STACK-NOTES.md).

Data parallelism without DeepSpeed: after each update's backward the trainer averages that update's gradients
across ranks with one flattened all-reduce - the arithmetic of DDP - instead of wrapping networks in
DistributedDataParallel. Methods alternate updates over sub-networks with others frozen (adversarial), and take
second-order gradients (MAL); DDP's reducer supports neither (pytorch #63929: its all-reduce is not
differentiable and it expects every registered parameter to receive a gradient each backward). What is lost is
DDP's overlap of communication with the backward pass.

With ``train.deepspeed=FILE``, each optimiser group becomes a DeepSpeed engine (ZeRO stage 0-2) that owns its
optimiser, its gradient reduction and partitioning, and its clipping.
"""

from __future__ import annotations

import json
import os
import random
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ssau.config import ConfigError, TrainConfig


@dataclass
class Runtime:
    rank: int
    world: int
    device: torch.device
    bf16: bool
    channels_last: bool

    @property
    def main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
            t /= self.world
        return t

    def any_true(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast_object(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def init_runtime(cfg: TrainConfig) -> Runtime:
    from accelerate import PartialState

    cuda = torch.cuda.is_available() if cfg.device == "auto" else cfg.device == "cuda"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda: no CUDA device is visible")
    state = PartialState(cpu=not cuda)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    device = state.device if cuda else torch.device("cpu")
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
    if bf16 and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision=bf16: this GPU does not support bfloat16")
    channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and cuda)
    return Runtime(rank, world, device, bf16, channels_last)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def average_buffers(module: nn.Module, rt: Runtime) -> None:
    """Floating buffers (BatchNorm statistics, centroids) averaged so that every rank holds the same state."""
    if rt.world == 1:
        return
    persistent = module.state_dict(keep_vars=True)  # non-persistent buffers (constants) need no averaging
    bufs = [b for name, b in module.named_buffers() if b.is_floating_point() and name in persistent]
    if bufs:
        flat = torch.cat([b.reshape(-1) for b in bufs])
        dist.all_reduce(flat)
        flat /= rt.world
        offset = 0
        for b in bufs:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()


class _Params(nn.Module):
    """The parameters of one optimiser group as a module, for deepspeed.initialize (forward is never called:
    methods compute losses with their own modules; ZeRO-1/2 reduce through hooks on these same parameters)."""

    def __init__(self, params: list[nn.Parameter]):
        super().__init__()
        self.params = nn.ParameterList(params)


def deepspeed_engine(params: list[nn.Parameter], optimizer, scheduler, path: str, micro_batch: int,
                     accumulate: int, clip: float):
    import deepspeed

    with open(path) as f:
        ds = json.load(f)
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage > 2:
        raise ConfigError(f"train.deepspeed: ZeRO stage {stage} partitions parameters; ssau supports stages 0-2")
    for key in ("train_batch_size", "optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"train.deepspeed: remove {key!r} from {path}; ssau sets it from the run config")
    ds.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=accumulate,
              gradient_clipping=clip, zero_allow_untested_optimizer=True)
    ds.setdefault("steps_per_print", 10**9)
    os.environ.setdefault("LOCAL_RANK", os.environ.get("LOCAL_RANK", "0"))
    engine, _, _, _ = deepspeed.initialize(model=_Params(params), optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds, dist_init_required=False)
    return engine
