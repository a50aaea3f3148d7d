"""Trainer step overhead: `python -m ssau.bench.trainer [--backbone resnet18] [--steps 30] [--rounds 3]`.

``Trainer.train_step`` (the method's updates through ``_run_update``: freeze, zero_grad, forward/backward, gradient
averaging, clip, finite check, step, buffers, LR schedule) against a bare PyTorch loop doing the same arithmetic
(masked BCE, Adam, clip_grad_norm_, cosine LR) on an identical copy of the model and the same in-memory batches.
Rounds are interleaved and medians reported, because the machine is shared. Goal: overhead <= 5 %.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from ssau.data.batch import Batch
from ssau.methods.parts import masked_bce
from ssau.shard.plan import run_shard
from ssau.shard.write import ShardSettings
from ssau.synth.corpus import render_corpus
from ssau.synth.faces import SynthSettings
from ssau.train.optim import lr_factor
from ssau.train.setup import load_run_config
from ssau.train.trainer import Trainer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="ssau-bench-trainer-"))
    render_corpus(work / "c", SynthSettings(subjects=6, tasks=1, frames=4, size=args.image_size, expression_images=0,
                                            unlabelled=0), progress=False)
    run_shard(ShardSettings(format="bp4d", images=str(work / "c/bp4d"), labels=str(work / "c/bp4d"), folds="bp4d"),
              work / "s", progress=False)
    cfg = load_run_config(None, [f"data.labelled=[{work / 's'}]", f"model.backbone={args.backbone}",
                             f"data.image_size={args.image_size}", f"data.m1={args.batch}",
                             f"train.steps={10 * args.steps * args.rounds}", f"train.out={work}", "tracking.enabled=false"])
    trainer = Trainer(cfg)
    g = torch.Generator().manual_seed(0)
    batches = [Batch(images=torch.randint(0, 256, (args.batch, 3, args.image_size, args.image_size), dtype=torch.uint8,
                                          generator=g),
                     targets=(torch.rand(args.batch, 12, generator=g) < 0.3).float(),
                     mask=(torch.rand(args.batch, 12, generator=g) < 0.9).float(), keys=[]) for _ in range(8)]

    bare_model = copy.deepcopy(trainer.method)
    opt = torch.optim.Adam(bare_model.parameters(), lr=cfg.optim.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_factor, cfg.optim, cfg.train.steps))

    def bare(n: int) -> None:
        for b in itertools.islice(itertools.cycle(batches), n):
            opt.zero_grad(set_to_none=True)
            loss = masked_bce(bare_model.logits(b.images), b.targets, b.mask)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(bare_model.parameters(), cfg.optim.clip_grad)
            opt.step()
            sched.step()

    def ssau_steps(n: int) -> None:
        it = itertools.cycle(batches)
        for _ in range(n):
            trainer.train_step(it)

    trainer.method.train()
    bare_model.train()
    bare(3)
    ssau_steps(3)  # warm-up both
    times = {"bare": [], "trainer": []}
    for _ in range(args.rounds):
        for name, fn in (("bare", bare), ("trainer", ssau_steps)):
            t0 = time.perf_counter()
            fn(args.steps)
            times[name].append((time.perf_counter() - t0) / args.steps)
    bare_s, trainer_s = statistics.median(times["bare"]), statistics.median(times["trainer"])
    result = {"backbone": args.backbone, "image_size": args.image_size, "batch": args.batch,
              "steps_per_round": args.steps, "rounds": args.rounds, "threads": torch.get_num_threads(),
              "bare_s_per_step": bare_s, "trainer_s_per_step": trainer_s, "overhead": trainer_s / bare_s - 1,
              "rounds_s_per_step": times}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
