"""Data-layer benchmark: `python -m ssau.bench.data [--images N] [--size PX] [--out DIR]`.

Every figure is per worker (one process) and every comparison is a ratio taken in the same run:
  shard   ssau shard (pass-through; --resize) vs `tar -cf` over the same files vs a bare PIL decode-resize-encode loop
  stream  TrainStream decode+augment vs the same decode+augment over the same bytes held in memory (goal >= 0.9x),
          and vs torchvision ImageFolder + DataLoader over the same images as loose files (goal >= 1.5x)
  memory  peak RSS (main process + DataLoader workers) streaming 10 vs 200 shards (goal: within 10 %)
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from PIL import Image

from ssau.data.decode import JITTER, RESIZE_RATIO, decode_train
from ssau.data.sources import SourceConfig, StreamConfig
from ssau.data.stream import TrainStream
from ssau.shard.plan import run_shard
from ssau.shard.write import ShardSettings
from ssau.synth.corpus import render_corpus
from ssau.synth.faces import SynthSettings


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _corpus(root: Path, n: int, size: int) -> None:
    subjects = max(3, min(41, n // 40))
    render_corpus(root, SynthSettings(subjects=subjects, tasks=1, frames=-(-n // subjects), size=size,
                                      expression_images=0, unlabelled=0), workers=2, progress=False)


def bench_shard(src: Path, work: Path, resize: int) -> dict:
    files = sorted(src.rglob("*.jpg"))
    n = len(files)
    s = ShardSettings(format="bp4d", images=str(src), labels=str(src), shard_size=100)
    t_pass = _timed(lambda: run_shard(s, work / "pass", workers=1, progress=False))
    t_resize = _timed(lambda: run_shard(s.__class__(**{**s.__dict__, "resize": resize}), work / "resize",
                                        workers=1, progress=False))
    t_tar = _timed(lambda: subprocess.run(["tar", "-cf", str(work / "plain.tar"), "-C", str(src), "."], check=True))

    def pil_loop():
        for f in files:
            img = Image.open(f)
            img.load()
            img = img.resize((resize, resize), Image.Resampling.BICUBIC)
            img.save(io.BytesIO(), format="JPEG", quality=95)

    t_pil = _timed(pil_loop)
    r = {"images": n, "pass_through_img_s": n / t_pass, "resize_img_s": n / t_resize, "tar_cf_img_s": n / t_tar,
         "bare_pil_decode_resize_encode_img_s": n / t_pil}
    r["pass_through_vs_tar"] = r["pass_through_img_s"] / r["tar_cf_img_s"]
    r["resize_vs_bare_pil"] = r["resize_img_s"] / r["bare_pil_decode_resize_encode_img_s"]
    return r


def bench_stream(shards: Path, src: Path, image_size: int, n: int, rounds: int = 3) -> dict:
    import random

    import torch
    import webdataset as wds
    from torchvision import datasets, transforms

    cfg = StreamConfig(labelled=SourceConfig((str(shards),)), m1=32, m2=0, image_size=image_size, workers=0,
                       shuffle_buffer=500)
    batches = n // 32
    stream = iter(TrainStream(cfg))
    next(stream)  # warm-up: fills the shuffle buffer

    urls = [str(p) for p in sorted(shards.glob("*.tar"))]
    mem = list(itertools.islice(itertools.cycle(list(wds.tarfile_samples(iter({"url": u} for u in urls)))),
                                batches * 32))
    rng = random.Random(0)

    # The usual torchvision recipe over loose files: ImageFolder (one class per subject) + DataLoader.
    tf = transforms.Compose([transforms.Resize(round(image_size * RESIZE_RATIO)), transforms.RandomCrop(image_size),
                             transforms.RandomHorizontalFlip(), transforms.ColorJitter(JITTER, JITTER, JITTER),
                             transforms.PILToTensor()])
    folder = src.parent / "imagefolder"
    if not folder.exists():
        for f in sorted(src.rglob("*.jpg")):
            dst = folder / f.parent.parent.name / f"{f.parent.name}_{f.name}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dst)
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(folder), transform=tf), batch_size=32,
                                         shuffle=True, num_workers=0)
    def epochs():  # not itertools.cycle: that would replay cached batches instead of loading them again
        while True:
            yield from loader

    loop = epochs()
    runs = {"stream": [], "bare": [], "imagefolder": []}
    for _ in range(rounds):  # interleaved rounds, medians: the machine is shared and noisy
        runs["stream"].append(_timed(lambda: list(itertools.islice(stream, batches))))
        runs["bare"].append(_timed(lambda: [torch.stack([decode_train(s, image_size, rng)[0] for s in mem[i:i + 32]])
                                            for i in range(0, len(mem), 32)]))
        runs["imagefolder"].append(_timed(lambda: list(itertools.islice(loop, batches))))
    t_stream, t_bare, t_if = (statistics.median(runs[k]) for k in ("stream", "bare", "imagefolder"))
    k = batches * 32
    r = {"image_size": image_size, "samples_per_round": k, "rounds": rounds, "stream_img_s": k / t_stream, "bare_in_memory_img_s": k / t_bare,
         "imagefolder_img_s": k / t_if}
    r["stream_vs_bare"] = r["stream_img_s"] / r["bare_in_memory_img_s"]
    r["stream_vs_imagefolder"] = r["stream_img_s"] / r["imagefolder_img_s"]
    return r


def _rss_child(shards: str, batches: int) -> None:
    """Run in a subprocess: stream ``batches`` batches with 2 workers."""
    cfg = StreamConfig(labelled=SourceConfig((shards,)), m1=32, m2=0, image_size=64, workers=2,
                       shuffle_buffer=1000)
    for _ in itertools.islice(TrainStream(cfg), batches):
        pass


def _peak_rss(shards: Path, batches: int) -> int:
    proc = subprocess.Popen([sys.executable, "-c", f"from ssau.bench.data import _rss_child; "
                             f"_rss_child({str(shards)!r}, {batches})"])
    peak, p = 0, psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [p] + p.children(recursive=True)
            peak = max(peak, sum(c.memory_info().rss for c in tree if c.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.02)
    if proc.returncode:
        raise RuntimeError("memory probe failed")
    return peak


def bench_memory(shards: Path, work: Path, batches: int) -> dict:
    """A corpus of 10 and one of 200 shards (hard links to the real shards under new names)."""
    tars = sorted(shards.glob("*.tar"))
    out = {}
    for count in (10, 200):
        d = work / f"rss{count}"
        d.mkdir()
        entries = []
        for i in range(count):
            name = f"s-{i:06d}.tar"
            (d / name).hardlink_to(tars[i % len(tars)])
            entries.append({"name": name, "fold": 0, "samples": 1})
        doc = json.loads((shards / "dataset.json").read_text())
        (d / "dataset.json").write_text(json.dumps(doc | {"shards": entries}))
        out[f"peak_rss_mb_{count}_shards"] = _peak_rss(d, batches) / 2**20
    out["rss_200_vs_10"] = out["peak_rss_mb_200_shards"] / out["peak_rss_mb_10_shards"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=224, help="stored image side (aligned faces: 224-256)")
    ap.add_argument("--out", help="keep the work directory here (default: a temporary one)")
    args = ap.parse_args(argv)
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="ssau-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "corpus"
    if not (src / "bp4d").exists():
        _corpus(src, args.images, args.size)
    result = {"cpu": psutil.cpu_count(), "shard": bench_shard(src / "bp4d", work, resize=args.size // 2)}
    print(json.dumps(result, indent=1), flush=True)
    result["stream"] = [bench_stream(work / "pass", src / "bp4d", s, n=2048) for s in (64, args.size // 2)]
    print(json.dumps(result["stream"], indent=1), flush=True)
    result["memory"] = bench_memory(work / "pass", work, batches=300)
    print(json.dumps(result["memory"], indent=1), flush=True)
    (work / "bench_data.json").write_text(json.dumps(result, indent=1))
    if not args.out:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
