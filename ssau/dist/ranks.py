"""Ranks, devices and precision: the process group a run joins (``init_runtime``) and what one rank saw (its
report). Stop signals, collectives, RNG and DeepSpeed engines are the other modules of ``ssau.dist``.

Process groups come from accelerate's ``PartialState``, so ``accelerate launch`` (and torchrun) environments work as
they are: NCCL on GPUs; on a CPU-only machine, real ranks on gloo (``cpu=True`` is passed when there is no GPU, or
every process would report rank 0 of 1). Ranks are always read from ``torch.distributed``, never from accelerate's
helpers, which report rank 0 of 1 under DeepSpeed on CPU (../shared/STACK-NOTES.md).

Data parallelism without DeepSpeed: each update's gradients are averaged across ranks in buckets launched from
gradient hooks while backward runs (``ssau.dist.buckets``) - the arithmetic and the overlap of DDP - instead of
wrapping networks in DistributedDataParallel. Methods alternate updates over sub-networks with others frozen
(adversarial), and take second-order gradients (MAL); DDP's reducer supports neither (pytorch #63929: its
all-reduce is not differentiable and it expects every registered parameter to receive a gradient each backward).
Flags the host holds (a stop signal, a failed source) are agreed on a gloo ``control`` group when the device's group
is NCCL, so that agreeing on them makes no CUDA stream wait.

With ``train.deepspeed=FILE``, each optimiser group becomes a DeepSpeed engine (ZeRO stage 0-2) that owns its
optimiser, its gradient reduction and partitioning, and its clipping.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ssau.config import TrainConfig
from ssau.dist.accelerate import accelerate_settings
from ssau.errors import ConfigError
from ssau.io import atomic_write


@dataclass
class Runtime:
    rank: int
    world: int
    device: torch.device
    bf16: bool
    channels_last: bool
    control: object = None  # a gloo group for flags the host holds (stop signals, a failed source) when the
    # device's group is NCCL: agreeing on them then makes no CUDA stream wait; None: the default group

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

    def all_max(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def any_true(self, flag: bool) -> bool:
        return bool(self.host_max(int(flag)))

    def host_max(self, value: int) -> int:
        """The largest of the ranks' ``value`` (a flag or a signal number the host holds), agreed on the control
        group: on CPU tensors, so no CUDA stream is waited for."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device="cpu" if self.control is not None else self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return int(t.item())

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
    """Ranks, device and precision. accelerate launch's options are applied to ``cfg`` itself first
    (``accelerate_settings``: train.precision, train.device, train.deepspeed), because callers read ``cfg`` after
    this call (the trainer builds DeepSpeed engines from ``cfg.deepspeed``); a refused option is a ConfigError,
    raised on every rank alike since every rank sees the same environment."""
    from accelerate import PartialState

    resolved = accelerate_settings(cfg)
    cfg.precision, cfg.device, cfg.deepspeed = resolved.precision, resolved.device, resolved.deepspeed

    cuda = torch.cuda.is_available() if cfg.device == "auto" else cfg.device == "cuda"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda: no CUDA device is visible")
    _init_elastic_group(cuda)
    state = PartialState(cpu=not cuda)  # adopts a group that is already initialised
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    device = state.device if cuda else torch.device("cpu")
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
    if bf16 and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision=bf16: this GPU does not support bfloat16")
    channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and cuda)
    control = dist.new_group(backend="gloo") if world > 1 and dist.get_backend() != "gloo" else None
    return Runtime(rank, world, device, bf16, channels_last, control)


def _init_elastic_group(cuda: bool) -> None:
    """Under torchrun's elastic agent (``--max-restarts``), join the process group through a store prefix of this
    restart attempt. The agent keeps one store across attempts, so the peers' addresses of the attempt that died are
    still in it, and a restarted rank can read those before the new ones are written: gloo then fails with
    "connectFullMesh ... Connection refused" (seen on about half of the restarts here). A fresh prefix per attempt
    leaves nothing stale to read."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or int(os.environ.get("WORLD_SIZE", "1")) < 2 or dist.is_initialized():
        return
    from datetime import timedelta

    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    store, rank, world = next(dist.rendezvous("env://", timeout=timedelta(minutes=10)))
    dist.init_process_group("nccl" if cuda else "gloo", store=dist.PrefixStore(f"ssau/attempt-{attempt}", store),
                            rank=rank, world_size=world)


def write_rank_report(path: Path, module: nn.Module, first_keys: list[str] | None, step: int, deepspeed: bool) -> None:
    """What one rank saw, read back by the distributed tests: world size, rank and backend from torch.distributed
    itself, the keys of its first batch, and a digest of its full state (equal on every rank after training)."""
    digest = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    up = dist.is_available() and dist.is_initialized()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps({"rank": dist.get_rank() if up else 0, "world_size": dist.get_world_size() if up
                                   else 1, "first_keys": first_keys, "state_sha256": digest.hexdigest(), "step": step,
                                   "backend": dist.get_backend() if up else "", "deepspeed": deepspeed}).encode())
