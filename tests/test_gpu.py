"""CUDA-only checks (`pytest -m gpu`), skipped where no GPU is visible (CI has none): bf16 autocast steps, a
steady-state step that makes no host sync (``torch.cuda.set_sync_debug_mode("error")``), nvjpeg's ``data.decode=device`` against
the same code on the CPU, and, with two GPUs, NCCL ranks whose bucketed reduction equals the averaging after
backward and whose SyncBatchNorm statistics are global."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from corpora import shard_bp4d
from ranks import run_ranks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return shard_bp4d(tmp_path_factory.mktemp("gpu"), frames=8)


def _trainer(shards, tmp, *extra):
    from ssau.train.setup import load_run_config
    from ssau.train.trainer import Trainer

    cfg = load_run_config(None, [f"data.labelled=[{shards}]", "model.backbone=resnet18", "data.image_size=64",
                                 "data.m1=8", "data.workers=0", "train.steps=100", "train.device=cuda",
                                 f"train.out={tmp}", "tracking.enabled=false", "train.progress=false", *extra])
    tr = Trainer(cfg)
    tr.method.train()
    return tr


def _device_batches(tr):
    from ssau.data.stream import TrainStream

    return itertools.cycle([next(iter(TrainStream(tr.stream_cfg, 0, 1, tr.trainset))).to(tr.rt.device)])


def test_bf16_autocast_steps_keep_fp32_parameters_and_learn(shards, tmp_path):
    tr = _trainer(shards, tmp_path, "train.precision=bf16")
    assert tr.rt.bf16 and tr.rt.device.type == "cuda"
    batches, before = _device_batches(tr), [p.detach().clone() for p in tr.method.parameters()]
    losses = [float(tr.train_step(batches)[1]["train/supervised/loss"]) for _ in range(20)]
    assert all(p.dtype == torch.float32 for p in tr.method.parameters())
    assert np.isfinite(losses).all() and losses[-1] < losses[0]  # one batch, fitted
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.method.parameters()))


def test_a_steady_state_step_makes_no_host_sync(shards, tmp_path):
    """Loss parts stay on the device, the finite check goes to the fused optimiser as found_inf, and the parameter
    check waits for flush(): torch raises on any synchronising call while the debug mode is "error"."""
    tr = _trainer(shards, tmp_path)
    assert all(o.defaults.get("fused") for o in tr.optimizers.values())  # optim.fused=auto on CUDA
    batches = _device_batches(tr)
    for _ in range(3):
        tr.train_step(batches)  # warm-up: allocations, cuDNN's choices
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            tr.train_step(batches)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    tr.updates.flush()
    assert tr.updates.refused == 0


def test_nvjpeg_device_decode_equals_the_cpu_device_path_within_tolerance():
    """``data.decode=device`` on CUDA (nvjpeg) against the same code with decode_jpeg on the CPU (libjpeg-turbo),
    for the same draws: the same samples and shapes; pixels within a mean of 2 grey levels, the bound torchvision's
    own test puts between its CUDA and CPU decoders (nvjpeg's IDCT and chroma upsampling are not libjpeg-turbo's).
    Not yet measured here (no GPU lent so far): tighten it to what a GPU shows."""
    import json
    import random

    from corpora import face_like

    from ssau.data.decode import decode_sample
    from ssau.data.device_decode import DeviceDecoder, encode
    from ssau.faces.template import mean_landmarks

    for w, h, size in ((40, 40, 32), (80, 90, 32), (256, 256, 224)):
        meta = json.dumps({"aligned": "similarity", "landmarks": mean_landmarks(w, h, 0.1).tolist()}).encode()
        pending = [decode_sample({"__key__": f"k{i}", "jpg": face_like(w, h, i), "json": meta}, size,
                                 random.Random(i), pixels=False) for i in range(8)]
        enc = encode(pending, [f"k{i}" for i in range(8)], size)
        (gpu, kept_gpu), (cpu, kept_cpu) = DeviceDecoder("cuda").part(enc), DeviceDecoder("cpu").part(enc)
        assert kept_gpu == kept_cpu == list(range(8)) and gpu.is_cuda and gpu.shape == cpu.shape == (8, 3, size, size)
        d = (gpu.cpu().int() - cpu.int()).abs().float()
        assert d.mean() < 2, (w, h, size, d.mean().item(), d.max().item())


def _nccl_rank(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from ssau.config import OptimConfig
    from ssau.dist.collectives import average_gradients
    from ssau.dist.ranks import Runtime
    from ssau.methods.base import Group, Update
    from ssau.train.optim import build_optimizer
    from ssau.train.updates import Updates

    assert dist.get_world_size() == world == 2
    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    rt = Runtime(rank, world, dev, False, False)
    out = {}
    for arm in ("reference", "buckets"):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.SyncBatchNorm(8), torch.nn.ReLU(),
                                  torch.nn.Flatten(), torch.nn.LazyLinear(3)).to(dev)
        g = torch.Generator().manual_seed(rank)
        x, y = torch.randn(4, 3, 8, 8, generator=g).to(dev), torch.randn(4, 3, generator=g).to(dev)
        net(x)  # the lazy layer's shape
        params = list(net.parameters())
        opt = build_optimizer(OptimConfig(), params)
        loss = lambda b, s: {"loss": ((net(x) - y) ** 2).mean()}  # noqa: E731
        if arm == "reference":
            loss(None, 0)["loss"].backward()
            average_gradients(params, rt)
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
        else:
            Updates(OptimConfig(), rt, {"all": Group(params)}, {"all": opt}, {}, bucket_mb=0.001).run(
                Update("u", "all", loss), lambda: None, None, 0)
        out[arm] = [p.detach().cpu().numpy() for p in params]
        out["bn_mean"] = net[1].running_mean.cpu().numpy()
    return out


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs a GPU per rank")
def test_two_nccl_ranks_reduce_in_buckets_as_after_backward_with_global_batch_norm():
    r0, r1 = run_ranks(_nccl_rank, 2, backend="nccl")
    for r in (r0, r1):
        for a, b in zip(r["buckets"], r["reference"], strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(r0["bn_mean"], r1["bn_mean"], atol=1e-7)  # SyncBatchNorm: the global batch's
