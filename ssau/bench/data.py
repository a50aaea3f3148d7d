"""Data-layer benchmark: `python -m ssau.bench.data [--images N] [--size PX] [--rounds R] [--out DIR]`.

Every figure is per worker (one process) and every comparison is a ratio of medians over interleaved rounds taken
in the same run (the machine is shared and noisy); the stream's variants take turns batch by batch, and a control
row times the bare loop twice, so the spread between two identical loops is printed beside the ratios:
  shard   ssau shard pass-through, --validate full and header (issue 26), and --resize, vs `tar -cf` over the same
          files and vs a bare PIL decode-resize-encode loop; header and full must write the same bytes (checked)
  stream  TrainStream decode+augment vs the same decode+augment over the same bytes held in memory (goal >= 0.9x),
          vs torchvision ImageFolder + DataLoader over the same images as loose files (goal >= 1.5x), at 64 px and
          at half the stored size; and that bare loop with the decoder of issue 26 (libjpeg-turbo) vs with the PIL
          path it replaced
  memory  peak RSS (main process + DataLoader workers) streaming 10 vs 200 shards (goal: within 10 %)
It ends with one table of the ratios; bench_data.json in the work directory holds every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from unittest import mock

import psutil
import torch
from PIL import Image

from ssau.data import decode
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


def _rounds(fns: dict, rounds: int) -> dict[str, float]:
    """Median seconds of each function, the functions run in turn in every round."""
    runs = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            runs[k].append(_timed(fn))
    return {k: statistics.median(v) for k, v in runs.items()}


def _interleaved(batch_fns: dict, batches: int, rounds: int) -> dict[str, float]:
    """Median seconds a round of each variant, a round being ``batches`` calls of its one-batch function. The
    variants take turns batch by batch, each round in another order: timing whole loops one after another let the
    machine's drift (clock, neighbours) land on one of them, and the same loop timed twice differed by 10-20 %."""
    names = list(batch_fns)
    runs = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        total = dict.fromkeys(names, 0.0)
        for _ in range(batches):
            for k in order:
                total[k] += _timed(batch_fns[k])
        for k in names:
            runs[k].append(total[k])
    return {k: statistics.median(v) for k, v in runs.items()}


def bench_shard(src: Path, work: Path, resize: int, rounds: int) -> dict:
    files = sorted(src.rglob("*.jpg"))
    n = len(files)
    s = ShardSettings(format="bp4d", images=str(src), labels=str(src), shard_size=100)

    def shard(settings: ShardSettings, out: str):
        return lambda: run_shard(settings, work / out, workers=1, overwrite=True, progress=False)

    def pil_loop():
        for f in files:
            img = Image.open(f)
            img.load()
            img = img.resize((resize, resize), Image.Resampling.BICUBIC)
            img.save(io.BytesIO(), format="JPEG", quality=95)

    t = _rounds({"full": shard(s, "pass"), "header": shard(replace(s, validate="header"), "header"),
                 "resize": shard(replace(s, resize=resize), "resize"),
                 "tar": lambda: subprocess.run(["tar", "-cf", str(work / "plain.tar"), "-C", str(src), "."],
                                               check=True),
                 "pil": pil_loop}, rounds)
    same = {p.name: p.read_bytes() for p in (work / "pass").glob("*.tar")} == \
        {p.name: p.read_bytes() for p in (work / "header").glob("*.tar")}
    if not same:
        raise RuntimeError("--validate header wrote other shards than full on a sound corpus")
    r = {"images": n, "rounds": rounds, "pass_through_img_s": n / t["full"], "header_img_s": n / t["header"],
         "resize_img_s": n / t["resize"], "tar_cf_img_s": n / t["tar"],
         "bare_pil_decode_resize_encode_img_s": n / t["pil"], "header_shards_same_bytes": same}
    r["pass_through_vs_tar"] = r["pass_through_img_s"] / r["tar_cf_img_s"]
    r["header_vs_tar"] = r["header_img_s"] / r["tar_cf_img_s"]
    r["header_vs_full"] = r["header_img_s"] / r["pass_through_img_s"]
    r["resize_vs_bare_pil"] = r["resize_img_s"] / r["bare_pil_decode_resize_encode_img_s"]
    return r


def bench_stream(shards: Path, src: Path, image_size: int, n: int, rounds: int = 3) -> dict:
    import random

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
    at = {"bare": 0, "again": 0, "pil": 0}

    def bare_batch(which: str, patch: bool = False):
        def run():
            i = at[which] % len(mem)
            at[which] = i + 32
            with mock.patch.object(decode, "_image", decode._image_pil) if patch else contextlib.nullcontext():
                torch.stack([decode_train(s, image_size, rng)[0] for s in mem[i:i + 32]])
        return run

    # "again" is the bare loop timed a second time under its own name: the spread between the two is the noise floor
    # of these figures on the machine it ran on.
    t = _interleaved({"stream": lambda: next(stream), "bare": bare_batch("bare"), "again": bare_batch("again"),
                      "bare_pil": bare_batch("pil", patch=True), "imagefolder": lambda: next(loop)}, batches, rounds)
    k = batches * 32
    r = {"image_size": image_size, "samples_per_round": k, "rounds": rounds, "stream_img_s": k / t["stream"],
         "bare_in_memory_img_s": k / t["bare"], "bare_again_img_s": k / t["again"],
         "bare_pil_decoder_img_s": k / t["bare_pil"], "imagefolder_img_s": k / t["imagefolder"]}
    r["stream_vs_bare"] = r["stream_img_s"] / r["bare_in_memory_img_s"]
    r["bare_again_vs_bare"] = r["bare_again_img_s"] / r["bare_in_memory_img_s"]
    r["stream_vs_imagefolder"] = r["stream_img_s"] / r["imagefolder_img_s"]
    r["decoder_vs_pil"] = r["bare_in_memory_img_s"] / r["bare_pil_decoder_img_s"]
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
        shutil.rmtree(d, ignore_errors=True)  # of an earlier run with the same --out
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


def table(result: dict) -> str:
    """The ratios, one row each, with the figures they divide and the goal where the issue sets one."""
    sh = result["shard"]
    rows = [("shard pass-through --validate full / tar -cf", sh["pass_through_vs_tar"],
             f"{sh['pass_through_img_s']:,.0f} / {sh['tar_cf_img_s']:,.0f} img/s", ""),
            ("shard pass-through --validate header / tar -cf", sh["header_vs_tar"],
             f"{sh['header_img_s']:,.0f} / {sh['tar_cf_img_s']:,.0f} img/s", ""),
            ("shard --validate header / full", sh["header_vs_full"], f"same bytes: {sh['header_shards_same_bytes']}",
             ""),
            ("shard --resize / bare PIL decode-resize-encode", sh["resize_vs_bare_pil"],
             f"{sh['resize_img_s']:,.0f} / {sh['bare_pil_decode_resize_encode_img_s']:,.0f} img/s", "")]
    for st in result.get("stream", []):
        px = st["image_size"]
        rows += [(f"stream / ImageFolder+DataLoader, {px} px", st["stream_vs_imagefolder"],
                  f"{st['stream_img_s']:,.0f} / {st['imagefolder_img_s']:,.0f} img/s", ">= 1.5"),
                 (f"stream / bare decode+augment in memory, {px} px", st["stream_vs_bare"],
                  f"{st['stream_img_s']:,.0f} / {st['bare_in_memory_img_s']:,.0f} img/s", ">= 0.9"),
                 (f"  control: the bare loop timed again / bare, {px} px", st["bare_again_vs_bare"],
                  f"{st['bare_again_img_s']:,.0f} / {st['bare_in_memory_img_s']:,.0f} img/s", "1.0 +- noise"),
                 (f"bare: libjpeg-turbo decoder / PIL path, {px} px", st["decoder_vs_pil"],
                  f"{st['bare_in_memory_img_s']:,.0f} / {st['bare_pil_decoder_img_s']:,.0f} img/s", "")]
    if "memory" in result:
        m = result["memory"]
        rows.append(("peak RSS, 200 / 10 shards", m["rss_200_vs_10"],
                     f"{m['peak_rss_mb_200_shards']:,.0f} / {m['peak_rss_mb_10_shards']:,.0f} MB", "<= 1.1"))
    lines = [f"{'ratio':<52} {'x':>7}  {'figures':<28} goal"]
    lines += [f"{name:<52} {ratio:>7.2f}  {figs:<28} {goal}" for name, ratio, figs, goal in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=224, help="stored image side (aligned faces: 224-256)")
    ap.add_argument("--stream-images", type=int, default=2048, help="images per stream round and variant")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-RSS probe (two subprocesses)")
    ap.add_argument("--out", help="keep the work directory here (default: a temporary one)")
    args = ap.parse_args(argv)
    # One intra-op thread, as torch gives each DataLoader worker: the figures are per worker, and on a shared
    # machine a 2-thread pool waiting on a descheduled thread made every 112 px pipeline here 5-7x slower.
    torch.set_num_threads(1)
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="ssau-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "corpus"
    if not (src / "bp4d").exists():
        _corpus(src, args.images, args.size)
    result = {"cpu": psutil.cpu_count(), "shard": bench_shard(src / "bp4d", work, args.size // 2, args.rounds)}
    print(json.dumps(result, indent=1), flush=True)
    result["stream"] = [bench_stream(work / "pass", src / "bp4d", s, args.stream_images, args.rounds)
                        for s in (64, args.size // 2)]
    print(json.dumps(result["stream"], indent=1), flush=True)
    if not args.no_memory:
        result["memory"] = bench_memory(work / "pass", work, batches=300)
        print(json.dumps(result["memory"], indent=1), flush=True)
    (work / "bench_data.json").write_text(json.dumps(result, indent=1))
    print(table(result))
    if not args.out:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
