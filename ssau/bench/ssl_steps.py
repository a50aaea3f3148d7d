"""Step cost of the semi-supervised methods relative to ``supervised``, as the benchmark runs them:
`python -m ssau.bench.ssl_steps --labelled demo/shards/bp4d --unlabelled demo/shards/pool [--backbone resnet18]`.

Per method: a Trainer on the config (``launch/recipes/ssl-benchmark.yaml`` by default) and its training stream, then
``--warmup`` steps untimed and ``--steps`` timed through ``Trainer.train_step`` (the stream's reading and decoding
included, evaluation not). Prints seconds per step and the ratio to the first method listed. Run it on an idle
machine: other work on the cores slows every step far more than its share (oversubscribed threads).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from ssau.data.stream import TrainStream
from ssau.train.setup import load_run_config
from ssau.train.trainer import Trainer


def step_seconds(config: str, overrides: list[str], method: str, warmup: int, steps: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        cfg = load_run_config(config, [*overrides, f"method.name={method}", f"train.out={out}",
                                       "tracking.enabled=false", "train.checkpoint_every=0"])
        tr = Trainer(cfg)
        batches = iter(TrainStream(tr.stream_cfg, 0, 1, tr.trainset))
        tr.method.train()
        for i in range(warmup + steps):
            if i == warmup:
                t0 = time.perf_counter()
            tr.step = i
            tr.train_step(batches)
        return (time.perf_counter() - t0) / steps


def compare_steps(config: str, arms: dict[str, tuple[str, list[str]]], warmup: int, steps: int) -> dict:
    """Seconds per step of each arm (name -> (method, overrides)) and its ratio to the first, printed as they come."""
    results, first = {}, None
    for name, (method, overrides) in arms.items():
        s = step_seconds(config, overrides, method, warmup, steps)
        first = first or s
        results[name] = {"s_per_step": round(s, 4), "ratio": round(s / first, 2)}
        print(json.dumps({name: results[name]}), flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="launch/recipes/ssl-benchmark.yaml")
    ap.add_argument("--labelled", required=True)
    ap.add_argument("--unlabelled", required=True, help="comma-separated shard directories")
    ap.add_argument("--methods", default="supervised,pseudo_label,mean_teacher,fixmatch")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--labelled-subjects", default="4")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    overrides = [f"data.labelled=[{a.labelled}]", f"data.unlabelled=[{a.unlabelled}]", f"model.backbone={a.backbone}",
                 f"data.labelled_subjects={a.labelled_subjects}", "train.steps=1000"]
    arms = {m: (m, overrides) for m in a.methods.split(",")}
    print(json.dumps({"backbone": a.backbone, "steps": a.steps,
                      "results": compare_steps(a.config, arms, a.warmup, a.steps)}))


if __name__ == "__main__":
    main()
