"""Experiment (not a test): does D win by how binary its inputs are, and which remedy stops it?

`python -m ssau.bench.adversarial_d [--out DIR] [--steps 150] [--remedies paper,noise,...] [key=value ...]`

The corpus is `ssau demo`'s realistic synthetic BP4D (head-and-shoulders frames, OpenFace landmark CSVs), rendered
with `ssau synth --style realistic` and sharded with `ssau shard bp4d ... --landmarks ... --landmark-frames position
--align A` (the CLI in-process, so its checks and output are the demo's). Every remedy trains `adversarial` on
folds 2+3 with label drop 0.5 (the hidden images are R's unlabelled images) from the same seed and split, and is
scored on fold 1. Printed per remedy, over the last --window steps: D's accuracy at 0.5 on the inputs it trains on
(d_acc; acc_real, acc_fake), R's saturated fraction (r_sat: p < 0.05 or p > 0.95), the loss ratios adv/sup (the
paper's reading of its 1:15, Sec. 4.3.2) and alpha*adv/((1-alpha)*sup), the alpha used, a 10-bin histogram of R's
training-batch probabilities (fractions; bins of 0.1), then F1 / AUC on fold 1. One JSON object at the end.
Extra key=value overrides go to every run (e.g. optim.lr=0.001 method.d_hidden=128).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

from ssau.cli import main as cli
from ssau.train.setup import load_run_config
from ssau.train.trainer import Trainer

REMEDIES: dict[str, list[str]] = {
    "o_wlc": ["method.alpha=0"],  # the paper's "without label constraint" reference (D trains, R ignores it)
    "paper": [],
    "noise": ["method.d_noise=0.2"],
    "noise_anneal": ["method.d_noise=0.3", "method.d_noise_steps={steps}"],
    "smooth": ["method.real_smooth=0.2"],
    "noise_smooth": ["method.d_noise=0.2", "method.real_smooth=0.2"],
    "straight_through": ["method.fake=straight_through"],
    "threshold": ["method.fake=threshold"],
    "balance": ["method.alpha_balance=0.0667"],  # alpha * adv = (1 - alpha) * sup / 15
}
WINDOW_KEYS = ("discriminator/d_acc", "discriminator/acc_real", "discriminator/acc_fake", "classifier/r_sat",
               "classifier/ratio", "classifier/wratio", "classifier/alpha", "classifier/adv", "classifier/sup")


def prepare(root: Path, subjects: int, frames: int, size: int, align: int, workers: int) -> Path:
    """The demo's corpus through the CLI: render once per settings, shard (verified and kept when unchanged)."""
    corpus, shards = root / "corpus", root / f"shards-align{align}"
    synth = ["synth", "--out", str(corpus), "--style", "realistic", "--subjects", str(subjects), "--tasks", "4",
             "--frames", str(frames), "--size", str(size), "--expression-images", "0", "--unlabelled", "0",
             "--workers", str(workers), "--quiet"]
    marker = root / "synth-args.json"
    if not marker.is_file() or json.loads(marker.read_text()) != synth:
        if cli(synth):
            sys.exit("adversarial_d: ssau synth failed (its line is above)")
        marker.write_text(json.dumps(synth))
    bp4d = corpus / "bp4d"
    shard = ["shard", "bp4d", "--images", str(bp4d), "--labels", str(bp4d), "--folds", "bp4d", "--out", str(shards),
             "--shard-size", "250", "--landmarks", str(bp4d / "landmarks"), "--landmark-frames", "position",
             "--align", str(align), "--workers", str(workers), "--quiet"]
    if cli(shard) and cli([*shard, "--overwrite"]):  # once more over shards of other settings (this script's own)
        sys.exit("adversarial_d: ssau shard failed (its line is above)")
    return shards


def run_remedy(name: str, overrides: list[str], window: int, settings: list[str], bins: int = 10) -> dict:
    """Train one remedy; means of the diagnostics over the last ``window`` steps, R's histogram, F1 / AUC."""
    import torch

    trainer = Trainer(load_run_config(None, overrides))
    steps = trainer.cfg.train.steps
    sums, counted, probs = defaultdict(float), [0], []
    first = max(0, steps - window)
    method, train_step, method_probs = trainer.method, trainer.train_step, trainer.method.probs

    def recording_probs(images):  # R's outputs in both updates of the last window's steps
        p = method_probs(images)
        if trainer.step >= first:
            probs.append(p.detach().float().cpu())
        return p

    def recording_step(batches):
        batch, parts = train_step(batches)
        if trainer.step > first:  # train_step has counted this step already
            counted[0] += 1
            for k in WINDOW_KEYS:
                sums[k] += parts.get(f"train/{k}", float("nan"))
        return batch, parts

    method.probs, trainer.train_step = recording_probs, recording_step
    t0 = time.perf_counter()
    metrics = trainer.fit()
    n = max(counted[0], 1)
    p = torch.cat(probs).flatten() if probs else torch.zeros(0)
    hist = torch.histc(p, bins=bins, min=0.0, max=1.0) / max(p.numel(), 1)
    return {"remedy": name, "settings": settings, "steps_in_window": counted[0],
            **{k.split("/")[1]: sums[k] / n for k in WINDOW_KEYS}, "hist": [round(v, 4) for v in hist.tolist()],
            "f1": metrics.get("f1_mean", float("nan")), "auc": metrics.get("auc_mean", float("nan")),
            "seconds": round(time.perf_counter() - t0, 1)}


def table(rows: list[dict]) -> str:
    head = (f"{'remedy':<17}{'d_acc':>6}{'acc_r':>6}{'acc_f':>6}{'r_sat':>6}{'adv/sup':>8}{'w.ratio':>8}{'alpha':>7}"
            f"{'F1':>6}{'AUC':>6}   R's outputs, 10 bins of 0.1 (% of probabilities)")
    lines = [head]
    for r in rows:
        hist = " ".join(f"{100 * v:3.0f}" for v in r["hist"])
        lines.append(f"{r['remedy']:<17}{r['d_acc']:6.2f}{r['acc_real']:6.2f}{r['acc_fake']:6.2f}{r['r_sat']:6.2f}"
                     f"{r['ratio']:8.3f}{r['wratio']:8.4f}{r['alpha']:7.4f}{100 * r['f1']:6.1f}{100 * r['auc']:6.1f}"
                     f"   {hist}")
    lines.append("paper (Sec. 4.3.2, BP4D, alpha 0.01): adv/sup about 1/15 = 0.067")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ssau.bench.adversarial_d", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="experiments/adversarial-d")
    ap.add_argument("--remedies", default=",".join(REMEDIES), help=f"comma-separated, of: {', '.join(REMEDIES)}")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--window", type=int, default=50, help="last steps the diagnostics are averaged over")
    ap.add_argument("--backbone", default="resnet18", choices=("tiny", "resnet18", "resnet34", "resnet50"))
    ap.add_argument("--alpha", type=float, default=0.01, help="method.alpha (the paper's BP4D value)")
    ap.add_argument("--image-size", type=int, default=64, help="data.image_size (the aligned faces are --align px)")
    ap.add_argument("--align", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16, help="data.m1 and data.m2")
    ap.add_argument("--subjects", type=int, default=41, help="BP4D subject ids, so at most 41")
    ap.add_argument("--frames", type=int, default=20, help="frames per sequence (4 sequences per subject)")
    ap.add_argument("--size", type=int, default=128, help="rendered frame width")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    a = ap.parse_args(argv)
    names = [r for r in a.remedies.split(",") if r]
    unknown = [r for r in names if r not in REMEDIES]
    if unknown or not names:
        ap.error(f"--remedies: {', '.join(unknown) or 'none given'}; choose from {', '.join(REMEDIES)}")
    if a.steps < 1 or a.window < 1:
        ap.error("--steps and --window must be at least 1")
    root = Path(a.out).resolve()
    shards = prepare(root, a.subjects, a.frames, a.size, a.align, a.workers)
    base = [f"data.labelled=[{shards}]", "data.fold=1", f"data.image_size={a.image_size}", f"data.m1={a.batch}",
            f"data.m2={a.batch}", f"data.workers={a.workers}", "data.label_drop=0.5", f"model.backbone={a.backbone}",
            f"train.steps={a.steps}", f"train.seed={a.seed}", f"train.out={root / 'runs'}",
            f"train.checkpoint_every={a.steps}", f"train.log_every={a.steps}", "train.progress=false",
            "tracking.enabled=false", "optim.lr=0.002", "method.name=adversarial", f"method.alpha={a.alpha}"]
    rows = []
    for name in names:
        extra = [o.format(steps=a.steps) for o in REMEDIES[name]]
        run = [*base, f"train.name=adv-{name}-seed{a.seed}-{time.strftime('%Y%m%d-%H%M%S')}", *extra, *a.overrides]
        rows.append(run_remedy(name, run, a.window, extra))
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    print(json.dumps({"steps": a.steps, "window": a.window, "backbone": a.backbone, "seed": a.seed, "rows": rows},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
