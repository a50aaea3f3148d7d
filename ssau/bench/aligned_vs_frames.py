"""Experiment (not a test): the supervised baseline on whole frames vs aligned faces, equal steps, several seeds.

`python -m ssau.bench.aligned_vs_frames [--out DIR] [--seeds 0 1 2] [--steps 400] [--size 128] [--align 64]`

The corpus is `ssau demo`'s: the realistic synthetic BP4D (head-and-shoulders frames, the face about 40 % of the
width, OpenFace landmark CSVs), 41 subjects x 4 sequences x 40 frames. Both arms shard the same frames: whole
frames as they are, and faces aligned with the landmarks (`--align`); both train the demo's configuration
(ResNet-18 from scratch, 64 px, m1 32, lr 0.002) on folds 2+3 and are scored on fold 1 (subject-independent), with
only the seed changed. Prints one JSON object: per arm and seed the mean F1 / AUC, and their means and stds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from ssau.shard.plan import run_shard
from ssau.shard.write import ShardSettings
from ssau.synth.corpus import render_corpus
from ssau.synth.faces import SynthSettings
from ssau.train.setup import load_run_config
from ssau.train.trainer import Trainer


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="experiments/aligned-vs-frames")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--align", type=int, default=64)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args(argv)
    root = Path(a.out).resolve()
    corpus = root / "corpus"
    if not (corpus / "bp4d" / "AUCoding").is_dir():
        render_corpus(corpus, SynthSettings(subjects=41, tasks=4, frames=40, size=a.size, expression_images=0,
                                            unlabelled=0, style="realistic"), workers=a.workers, progress=False)
    bp4d = corpus / "bp4d"
    arms = {"whole_frames": {}, f"aligned_{a.align}": dict(landmarks=str(bp4d / "landmarks"),
                                                           landmark_frames="position", align=a.align)}
    results: dict = {"steps": a.steps, "backbone": a.backbone, "frame_width": a.size, "seeds": a.seeds}
    for arm, extra in arms.items():
        run_shard(ShardSettings(format="bp4d", images=str(bp4d), labels=str(bp4d), folds="bp4d", shard_size=250,
                                **extra), root / arm, workers=a.workers, progress=False)
        per_seed = {}
        for seed in a.seeds:
            cfg = load_run_config(None, [f"data.labelled=[{root / arm}]", "data.fold=1", "data.image_size=64",
                                     "data.m1=32", f"data.workers={a.workers}", f"model.backbone={a.backbone}",
                                     f"train.steps={a.steps}", f"train.seed={seed}",
                                     f"train.out={root / 'runs'}", f"train.name={arm}-seed{seed}",
                                     f"train.checkpoint_every={a.steps}", "train.progress=false",
                                     "tracking.enabled=false", "optim.lr=0.002"])
            m = Trainer(cfg).fit()
            per_seed[seed] = {"f1": m["f1_mean"], "auc": m["auc_mean"]}
            print(json.dumps({arm: {seed: per_seed[seed]}}), flush=True)
        f1s, aucs = [v["f1"] for v in per_seed.values()], [v["auc"] for v in per_seed.values()]
        std = lambda xs: statistics.pstdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
        results[arm] = {"per_seed": per_seed, "f1_mean": statistics.fmean(f1s), "f1_std": std(f1s),
                        "auc_mean": statistics.fmean(aucs), "auc_std": std(aucs)}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
