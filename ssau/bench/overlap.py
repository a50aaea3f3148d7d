"""Gradient communication overlapping backward, on 2 CPU ranks:
`python -m ssau.bench.overlap [--backbone resnet18] [--size 64] [--batch 16] [--steps 6] [--rounds 3]`.

Each rank (gloo, one thread each) runs ``supervised`` updates through ``ssau.train.updates.Updates`` on in-memory
batches. The arms differ only in how gradients are averaged:
- ``after``: one flat all-reduce per group once backward has ended (the path before issue 26, ``average_gradients``'
  arithmetic: buckets of unbounded size, launched after backward);
- ``buckets``: 25 MB buckets, launched after backward (``BucketReducer(overlap=False)``);
- ``overlap``: 25 MB buckets, launched from gradient hooks while backward runs (the default).
Each arm runs on the local link (loopback gloo) and on modelled inter-node links (``--links``: latency ms and
Gbit/s; ``ssau.dist.buckets``' ``slow_network``, a benchmark-only option: each collective then takes at least
latency + bytes / rate, one at a time in launch order). Rounds are interleaved and medians reported; ratios are
against ``after`` on the same link in the same run.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssau.config import ModelConfig, OptimConfig
from ssau.data.batch import Batch
from ssau.dist.ranks import Runtime
from ssau.methods.registry import build_method
from ssau.train.optim import build_optimizer
from ssau.train.updates import Updates

ARMS = {"after": (10**6, False), "buckets": (25.0, False), "overlap": (25.0, True)}  # bucket_mb, overlap


def _rank(rank: int, world: int, port: int, args, links: list, queue) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    aus = (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24)
    torch.manual_seed(0)
    method = build_method({"name": "supervised"}, aus, ModelConfig(backbone=args.backbone))
    groups = method.groups()
    rt = Runtime(rank, world, torch.device("cpu"), False, False)
    g = torch.Generator().manual_seed(rank)
    n, s = args.batch, args.size
    batches = [Batch(images=torch.randint(0, 256, (n, 3, s, s), dtype=torch.uint8, generator=g),
                     targets=(torch.rand(n, len(aus), generator=g) < 0.3).float(),
                     mask=torch.ones(n, len(aus)), keys=[]) for _ in range(4)]
    arms = {}
    for link in links:
        for arm, (mb, overlap) in ARMS.items():
            opts = {k: build_optimizer(OptimConfig(), grp.params) for k, grp in groups.items()}
            net = None if link == (0, 0) else (link[0] / 1000, link[1] * 1e9 / 8)
            arms[(link, arm)] = Updates(OptimConfig(), rt, groups, opts, {}, mb, overlap, net)
    method.train()
    times: dict = {k: [] for k in arms}
    it = iter(range(10**9))
    for r in range(args.rounds + 1):  # round 0 warms up
        for key, updates in arms.items():
            upd = method.updates(0)[0]
            dist.barrier()
            t0 = time.perf_counter()
            for step in range(args.steps):
                updates.run(upd, lambda: batches[next(it) % len(batches)], None, step)
            dist.barrier()
            if r:
                times[key].append((time.perf_counter() - t0) / args.steps)
    if rank == 0:
        early = {k: u.reducer.early for k, u in arms.items()}
        queue.put(({k: statistics.median(v) for k, v in times.items()}, early,
                   sum(p.numel() for p in method.parameters())))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--links", default="0:0,1:10,1:1", help="latency_ms:gbit_s pairs; 0:0 is the local link")
    args = ap.parse_args(argv)
    links = [tuple(float(x) for x in pair.split(":")) for pair in args.links.split(",")]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_rank, args=(2, port, args, links, queue), nprocs=2, start_method="spawn")
    times, early, params = queue.get()
    print(f"{args.backbone}, {params / 1e6:.1f}M parameters, {args.size} px, batch {args.batch} per rank, 2 gloo "
          f"ranks x 1 thread, {args.steps} steps x {args.rounds} rounds (medians)")
    print(f"{'link':>16} {'arm':>8} {'s/step':>8} {'speedup':>9} {'launched-in-backward':>20}")
    for link in links:
        name = "local" if link == (0, 0) else f"{link[0]:g} ms, {link[1]:g} Gb/s"
        for arm in ARMS:
            t = times[(link, arm)]
            print(f"{name:>16} {arm:>8} {t:8.3f} {times[(link, 'after')] / t:8.2f}x {early[(link, arm)]:>20}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
