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

import hashlib
import json
import os
import random
import signal
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ssau.accelerate_env import accelerate_settings
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
    return Runtime(rank, world, device, bf16, channels_last)


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


@contextmanager
def sigterm_as_exit():
    """SIGTERM (scancel, an elastic agent stopping its group) raises SystemExit in the main thread, so the code
    that ends an MLflow run as KILLED gets to run; elsewhere, and afterwards, the previous handler stands."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_draws(seed: int, rank: int, step: int, update: str, repeat: int) -> None:
    """Reseed torch's generators (CPU and every GPU) for one update of one step on one rank: every stochastic draw
    inside a method (label-bank vectors, dropout masks, noise) differs between ranks, as the samples of one process
    holding the global batch would, while parameters stay identical (initial weights broadcast, gradients
    averaged). A pure function of (seed, rank, step, update), so a resumed run draws what the uninterrupted run
    would have drawn."""
    h = hashlib.blake2b(f"draw:{seed}:{rank}:{step}:{update}:{repeat}".encode(), digest_size=8).digest()
    torch.manual_seed(int.from_bytes(h, "big") >> 1)


def rng_state() -> dict:
    """Every RNG's state as tensors, ints and lists only, so a checkpoint loads with ``weights_only=True``."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(words), gauss],
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
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
    """Floating buffers (BatchNorm statistics, centroids) averaged so that every rank holds the same state.

    BatchNorm running variances get the between-rank term too. Buffers are averaged after every step, so before
    a step every rank holds the same (M, V); rank r then moves them with its batch mean mu_r and variance v_r:
    M_r = (1-m) M + m mu_r, V_r = (1-m) V + m v_r. The global batch's statistics (equal batch sizes) have mean
    mean_r(mu_r) - the average of M_r - and variance mean_r(v_r) + mean_r((mu_r - mu)^2) (law of total variance);
    since M_r - mean(M) = m (mu_r - mu), the missing term is mean_r((M_r - mean(M))^2) / m. Exact up to the n/(n-1)
    corrections of the per-rank variances; with ``model.sync_bn`` the statistics are global already (this adds 0).
    A BatchNorm with momentum=None (cumulative average) gets plain averaging."""
    if rt.world == 1:
        return
    persistent = module.state_dict(keep_vars=True)  # non-persistent buffers (constants) need no averaging
    bufs = [b for name, b in module.named_buffers() if b.is_floating_point() and name in persistent]
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
    engine.checkpoint_engine.load = _deepspeed_safe_load  # DeepSpeed's own loader unpickles anything
    return engine


def _deepspeed_safe_load(path: str, map_location=None):
    """DeepSpeed checkpoint files through ``safe_load``: weights only, plus the three DeepSpeed classes its ZeRO
    optimiser state holds (checked with ``torch.serialization.get_unsafe_globals_in_checkpoint``)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from ssau.checkpoints import safe_load

    return safe_load(path, map_location, allow=(ZeroStageEnum, LossScaler, fragment_address))


def write_rank_report(path: Path, module: nn.Module, first_keys: list[str] | None, step: int, deepspeed: bool) -> None:
    """What one rank saw, read back by the distributed tests: world size, rank and backend from torch.distributed
    itself, the keys of its first batch, and a digest of its full state (equal on every rank after training)."""
    digest = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    up = dist.is_available() and dist.is_initialized()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rank": dist.get_rank() if up else 0, "world_size": dist.get_world_size() if up else 1,
                                "first_keys": first_keys, "state_sha256": digest.hexdigest(), "step": step,
                                "backend": dist.get_backend() if up else "", "deepspeed": deepspeed}))
