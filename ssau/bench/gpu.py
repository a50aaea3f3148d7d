"""The GPU benchmark, for the day a GPU is lent: `python -m ssau.bench.gpu [--backbones resnet34,resnet50]`.

Prints one table, every ratio taken in the same run:
- ``end-to-end``: supervised training from aligned shards (render, shard with alignment, stream with
  ``--workers`` DataLoader workers) against the same model on synthetic device tensors (goal >= 0.9x);
- ``precision``: the synthetic-tensor step with bf16 autocast and channels_last on and off;
- ``methods``: each method's step (from shards) relative to ``supervised``;
- ``decode``: ``data.decode=device`` (``ssau.data.device_decode``: nvjpeg, batched, then resize, crop, flip and
  jitter on the GPU) against ssau's CPU decoder in ``--workers`` DataLoader workers, images per second;
- ``syncs``: host syncs in steady-state steps (``torch.cuda.set_sync_debug_mode``: each one warns), per step.
``--smoke`` runs every part on the CPU at toy sizes (what tests/test_bench.py runs, so that the script works the
day it is needed); the sync row then says "no CUDA", and the device decode runs decode_jpeg on the CPU.
"""

from __future__ import annotations

import argparse
import itertools
import random
import tempfile
import time
import warnings
from pathlib import Path

import torch

from ssau.data.decode import decode_eval, decode_sample
from ssau.data.device_decode import DeviceDecoder, encode
from ssau.data.stream import TrainStream
from ssau.shard.plan import run_shard
from ssau.shard.write import ShardSettings
from ssau.synth.corpus import render_corpus
from ssau.synth.faces import SynthSettings
from ssau.train.setup import load_run_config
from ssau.train.trainer import Trainer

METHODS = "supervised,mtl,mal,adversarial,mlcr,large_margin,pseudo_label,mean_teacher,fixmatch,rtatl"


def _corpus(work: Path, size: int, frames: int, align: int) -> dict[str, Path]:
    render_corpus(work / "c", SynthSettings(subjects=6, tasks=2, frames=frames, size=size, expression_images=60,
                                            unlabelled=120, style="realistic"), progress=False)
    out = {}
    for fmt, images, labels, folds, extra in (
            ("bp4d", "bp4d", "bp4d", "bp4d", {"align": align, "landmarks": str(work / "c/bp4d/landmarks"),
                                              "landmark_frames": "position"}),
            ("rafdb", "rafdb", None, None, {}), ("folder", "unlabelled", None, None, {"align": align})):
        run_shard(ShardSettings(format=fmt, images=str(work / "c" / images), labels=str(work / "c" / labels)
                                if labels else None, folds=folds, shard_size=100, **extra), work / fmt, progress=False)
        out[fmt] = work / fmt
    return out


def _trainer(shards: dict, work: Path, a, method: str = "supervised", backbone: str = "", extra=()) -> Trainer:
    cfg = load_run_config(None, [f"data.labelled=[{shards['bp4d']}]", f"data.unlabelled=[{shards['folder']}]",
                                 f"data.expression=[{shards['rafdb']}]", f"data.image_size={a.size}",
                                 f"data.m1={a.batch}", f"data.m2={a.batch}", f"data.workers={a.workers}",
                                 f"model.backbone={backbone or a.backbones.split(',')[0]}", "train.steps=100000",
                                 f"train.out={work / 'runs'}", "tracking.enabled=false", "train.checkpoint_every=0",
                                 "train.progress=false", f"train.device={a.device}", f"method.name={method}",
                                 *extra])
    tr = Trainer(cfg)
    tr.method.train()
    return tr


def _seconds(tr: Trainer, batches, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        tr.train_step(batches)
    _sync(tr)
    t0 = time.perf_counter()
    for _ in range(steps):
        tr.train_step(batches)
    _sync(tr)
    tr.updates.flush()
    return (time.perf_counter() - t0) / steps


def _sync(tr: Trainer) -> None:
    if tr.rt.device.type == "cuda":
        torch.cuda.synchronize()


def _device_batches(tr: Trainer) -> itertools.cycle:
    """A batch as the stream makes it, already on the device: the step with no input pipeline at all."""
    real = next(iter(TrainStream(tr.stream_cfg, 0, 1, tr.trainset))).to(tr.rt.device)
    return itertools.cycle([real])


def end_to_end(shards: dict, work: Path, a, rows: list) -> None:
    for backbone in a.backbones.split(","):
        tr = _trainer(shards, work, a, backbone=backbone)
        stream = iter(TrainStream(tr.stream_cfg, 0, 1, tr.trainset))
        synthetic = _device_batches(tr)
        s_synth, s_stream = [], []
        for _ in range(a.rounds):  # interleaved rounds
            s_synth.append(_seconds(tr, synthetic, a.warmup, a.steps))
            s_stream.append(_seconds(tr, stream, a.warmup, a.steps))
        s, d = min(s_stream), min(s_synth)
        rows.append(("end-to-end", f"{backbone} supervised, shards vs device tensors",
                     f"{a.batch / s:.0f} vs {a.batch / d:.0f} img/s", f"{d / s:.2f}x (goal >= 0.9x)"))


def precision(shards: dict, work: Path, a, rows: list) -> None:
    backbone = a.backbones.split(",")[0]
    base = None
    for prec, cl in (("fp32", "off"), ("bf16", "off"), ("fp32", "on"), ("bf16", "on")):
        if prec == "bf16" and a.device == "cpu" and not a.smoke:
            continue
        tr = _trainer(shards, work, a, backbone=backbone, extra=(f"train.precision={prec}",
                                                                f"train.channels_last={cl}"))
        s = _seconds(tr, _device_batches(tr), a.warmup, a.steps)
        base = base or s
        rows.append(("precision", f"{backbone} {prec}, channels_last {cl}", f"{a.batch / s:.0f} img/s",
                     f"{base / s:.2f}x vs fp32"))


def methods(shards: dict, work: Path, a, rows: list) -> None:
    base = None
    for m in a.methods.split(","):
        tr = _trainer(shards, work, a, method=m, extra=("data.flow=false",))
        s = _seconds(tr, iter(TrainStream(tr.stream_cfg, 0, 1, tr.trainset)), a.warmup, a.steps)
        base = base or s
        rows.append(("methods", m, f"{s * 1000:.1f} ms/step", f"{s / base:.2f}x supervised"))


def decode(shards: dict, a, rows: list) -> None:
    import webdataset as wds

    files = sorted(str(p) for p in Path(shards["bp4d"]).glob("*.tar"))
    samples = list(itertools.islice(wds.WebDataset(files, shardshuffle=False, empty_check=False), 256))
    loader = torch.utils.data.DataLoader(samples, batch_size=32, num_workers=a.workers, collate_fn=lambda b: [
        decode_eval(s, a.size)[0] for s in b])
    t0 = time.perf_counter()
    n = sum(len(b) for b in loader)
    cpu = n / (time.perf_counter() - t0)
    rows.append(("decode", f"CPU decoder, {a.workers} workers", f"{cpu:.0f} img/s", "1.00x"))
    # data.decode=device as training runs it (ssau.data.device_decode): the worker's share (header, draws) is done
    # before the clock starts; timed: decode_jpeg on the device, resize, crop, flip, jitter. nvjpeg where CUDA is.
    dev = "cuda" if torch.cuda.is_available() and a.device == "cuda" else "cpu"
    rng = random.Random(0)
    pending = [decode_sample(s, a.size, rng, pixels=False) for s in samples]
    parts = [encode(pending[i:i + 32], [s["__key__"] for s in samples[i:i + 32]], a.size)
             for i in range(0, len(samples), 32)]
    decoder = DeviceDecoder(dev)
    decoder.part(parts[0])  # warm-up: nvjpeg's handles, the kernels
    _sync_device(dev)
    t0 = time.perf_counter()
    n = sum(decoder.part(p)[0].shape[0] for p in parts)
    _sync_device(dev)
    rate = n / (time.perf_counter() - t0)
    what = "nvjpeg (decode_jpeg on cuda)" if dev == "cuda" else "decode_jpeg on cpu (no CUDA)"
    rows.append(("decode", f"data.decode=device: {what} + resize, crop, flip, jitter", f"{rate:.0f} img/s",
                 f"{rate / cpu:.2f}x"))


def _sync_device(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def syncs(shards: dict, work: Path, a, rows: list) -> None:
    if not torch.cuda.is_available():
        rows.append(("syncs", "host syncs per steady-state step", "no CUDA", "-"))
        return
    tr = _trainer(shards, work, a)
    batches = _device_batches(tr)
    _seconds(tr, batches, a.warmup, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(a.steps):
                tr.train_step(batches)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    n = sum("synchroniz" in str(w.message) for w in caught)
    rows.append(("syncs", "host syncs per steady-state step (fused Adam)", f"{n / a.steps:.2f}", "goal 0"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", default="resnet34,resnet50")
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="every part on the CPU at toy sizes")
    a = ap.parse_args(argv)
    if a.smoke:
        a.backbones, a.methods, a.size, a.batch, a.workers = "tiny", "supervised,mtl", 32, 4, 1
        a.warmup, a.steps, a.rounds, a.device = 1, 2, 1, "cpu"
    elif not torch.cuda.is_available():
        print("ssau.bench.gpu: no CUDA device here; --smoke runs its parts on the CPU at toy sizes")
        return 2
    rows: list = []
    with tempfile.TemporaryDirectory(prefix="ssau-bench-gpu-") as tmp:
        work = Path(tmp)
        shards = _corpus(work, 96 if a.smoke else 256, 4 if a.smoke else 30, a.size)
        end_to_end(shards, work, a, rows)
        precision(shards, work, a, rows)
        methods(shards, work, a, rows)
        decode(shards, a, rows)
        syncs(shards, work, a, rows)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and a.device == "cuda" else "CPU"
    print(f"ssau GPU benchmark on {device}: {a.size} px, batch {a.batch}, {a.workers} workers, {a.steps} steps")
    width = max(len(r[1]) for r in rows)
    for part, what, value, ratio in rows:
        print(f"{part:<11} {what:<{width}}  {value:>18}  {ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
