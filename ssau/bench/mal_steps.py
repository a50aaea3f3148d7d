"""MAL's step cost against MTL's (issue 26: goal <= 5x), in interleaved rounds on one machine:
`python -m ssau.bench.mal_steps --labelled demo/shards/bp4d --expression demo/shards/rafdb [--backbone resnet18]`.

Both trainers are built first (the config of issue 12's experiment, ``launch/recipes/compare-synthetic.yaml``:
16 AU + 16 expression images, MAL's 32 AU validation images, 64 px), each warmed up, then every round times
``--steps`` steps of each method through ``Trainer.train_step`` (the stream's reading and decoding included), in
alternating order, so that load from other work on the cores falls on both alike. Prints seconds per step per method
(median over rounds) and the ratio of the medians, and each round's ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from ssau.data.stream import TrainStream
from ssau.train.setup import load_run_config
from ssau.train.trainer import Trainer


class Arm:
    """One method's trainer and stream, stepped on demand."""

    def __init__(self, config: str, overrides: list[str], method: str, out: str):
        cfg = load_run_config(config, [*overrides, f"method.name={method}", f"train.out={out}/{method}",
                                       "tracking.enabled=false", "train.checkpoint_every=0", "train.progress=false"])
        self.trainer = Trainer(cfg)
        self.batches = iter(TrainStream(self.trainer.stream_cfg, 0, 1, self.trainer.trainset))
        self.trainer.method.train()
        self.step = 0

    def run(self, steps: int) -> float:
        """Seconds per step over ``steps`` steps."""
        t0 = time.perf_counter()
        for _ in range(steps):
            self.trainer.step = self.step
            self.trainer.train_step(self.batches)
            self.step += 1
        return (time.perf_counter() - t0) / steps


def interleaved(config: str, overrides: list[str], methods: list[str], warmup: int, steps: int, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        arms = {m: Arm(config, overrides, m, out) for m in methods}
        for arm in arms.values():
            arm.run(warmup)
        times: dict[str, list[float]] = {m: [] for m in methods}
        for r in range(rounds):
            order = methods if r % 2 == 0 else methods[::-1]
            for m in order:
                times[m].append(arms[m].run(steps))
            print(json.dumps({"round": r, **{m: round(times[m][-1], 4) for m in methods}}), flush=True)
    first = methods[0]
    med = {m: statistics.median(t) for m, t in times.items()}
    return {"s_per_step": {m: round(s, 4) for m, s in med.items()},
            "ratio": {m: round(med[m] / med[first], 2) for m in methods},
            "round_ratios": {m: [round(a / b, 2) for a, b in zip(times[m], times[first])] for m in methods[1:]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="launch/recipes/compare-synthetic.yaml")
    ap.add_argument("--labelled", required=True)
    ap.add_argument("--expression", required=True)
    ap.add_argument("--methods", default="mtl,mal")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--validation", type=float, default=0.1, help="data.validation (MAL's meta-test images)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default); 1 keeps "
                    "timings steady on cores other work shares")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    overrides = [f"data.labelled=[{a.labelled}]", f"data.expression=[{a.expression}]", f"model.backbone={a.backbone}",
                 f"data.image_size={a.image_size}", "data.m1=16", "data.m_expr=16", "data.m2=0", "data.val_batch=32",
                 f"data.validation={a.validation}", "train.steps=100000"]
    res = interleaved(a.config, overrides, a.methods.split(","), a.warmup, a.steps, a.rounds)
    print(json.dumps({"backbone": a.backbone, "image_size": a.image_size, "threads": torch.get_num_threads(),
                      "steps": a.steps, "rounds": a.rounds,
                      **res}))


if __name__ == "__main__":
    main()
