"""Streams read by training and evaluation: webdataset pipelines over the shards `ssau shard` wrote.

Training (``TrainStream``): per rank, every batch has a fixed composition - ``m1`` labelled samples, ``m2``
unlabelled ones and, when configured, ``m_expr`` expression samples - each source read by its own DataLoader.
A source is one or more shard directories mixed by weight. Shards are split across (rank, worker) slots so ranks
read disjoint shards, then resampled with replacement inside each slot, seeded by (seed, epoch, rank, worker):
training is counted in steps, never in epochs (webdataset has no checkpointable position).

Evaluation (``eval_loader``): every sample of the chosen folds exactly once across all ranks. The global sample
order comes from the parquet index; rank r takes a contiguous 1/world slice of it, and every rank yields the same
number of batches (padding batches have ``valid`` all False), so collectives never hang on uneven shards.

Label drop (the adversarial paper's T1/T2 split): ``label_drop=p`` hides the labels of a fraction p of the
labelled training images - they stream as unlabelled - or, with ``label_drop_mode='au'``, hides single AU labels.
Hiding is a hash of (seed, key[, AU]), so it is the same on every rank, worker and epoch.
"""

from __future__ import annotations

import hashlib
import json
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ssau.aus import au_name
from ssau.data.tario import tar_samples
from ssau.data.decode import DecodeError, au_targets, decode_eval, decode_train


@dataclass(frozen=True)
class SourceConfig:
    """Shard directories of one source, their mixing weights and the folds read from them (None = all)."""

    dirs: tuple[str, ...]
    weights: tuple[float, ...] | None = None
    folds: tuple[int, ...] | None = None


@dataclass(frozen=True)
class StreamConfig:
    labelled: SourceConfig
    unlabelled: SourceConfig | None = None
    expression: SourceConfig | None = None
    aus: tuple[int, ...] | None = None  # None: the AU list of the first labelled directory
    m1: int = 32
    m2: int = 32
    m_expr: int = 32
    image_size: int = 64
    label_drop: float = 0.0
    label_drop_mode: str = "image"  # "image" (T1/T2 split) or "au" (single AU labels hidden)
    seed: int = 0
    workers: int = 2  # DataLoader workers per source
    shuffle_buffer: int = 500


@dataclass
class Batch:
    """One training step's data on one rank. Images are uint8 NCHW; the model side normalises."""

    images: torch.Tensor  # [m1, 3, S, S] labelled
    targets: torch.Tensor  # [m1, J] 0/1 float
    mask: torch.Tensor  # [m1, J] 1 = label known
    keys: list[str]
    unlabelled: torch.Tensor | None = None  # [m2, 3, S, S]
    unlabelled_keys: list[str] = field(default_factory=list)
    expr_images: torch.Tensor | None = None  # [m_expr, 3, S, S]
    expr_labels: torch.Tensor | None = None  # [m_expr] int64
    expr_keys: list[str] = field(default_factory=list)
    skipped: int = 0  # corrupt samples skipped by the workers since the previous batch

    def to(self, device: torch.device | str) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.images), move(self.targets), move(self.mask), self.keys, move(self.unlabelled),
                     self.unlabelled_keys, move(self.expr_images), move(self.expr_labels), self.expr_keys,
                     self.skipped)


@dataclass
class EvalBatch:
    images: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    keys: list[str]
    valid: torch.Tensor  # bool [B]: False marks padding


# ---------------------------------------------------------------------------------------------------- shard lists
def read_dataset(d: str | Path) -> dict:
    path = Path(d) / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(f"{d} is not a shard directory (no dataset.json); run `ssau shard` first")
    return json.loads(path.read_text())


def shard_urls(d: str | Path, folds: tuple[int, ...] | None) -> list[str]:
    doc = read_dataset(d)
    return [str(Path(d) / s["name"]) for s in doc["shards"] if folds is None or s["fold"] in folds]


def resolve_aus(cfg: StreamConfig) -> tuple[int, ...]:
    if cfg.aus is not None:
        return cfg.aus
    return tuple(int(a[2:]) for a in read_dataset(cfg.labelled.dirs[0])["aus"])


def _unit_hash(*parts) -> float:
    h = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def is_hidden(key: str, p: float, seed: int) -> bool:
    """Whether label-drop hides this image's labels (image mode)."""
    return p > 0 and _unit_hash("drop", seed, key) < p


def hidden_aus(key: str, aus: tuple[int, ...], p: float, seed: int) -> list[bool]:
    """Which single AU labels label-drop hides (AU mode)."""
    return [p > 0 and _unit_hash("drop-au", seed, key, au) < p for au in aus]


def label_drop_report(cfg: StreamConfig) -> dict:
    """The fraction actually hidden, read from the indexes of the labelled training folds."""
    aus = resolve_aus(cfg)
    images = hidden_images = labels = hidden_labels = 0
    for d in cfg.labelled.dirs:
        cols = ["key", "fold"] + [au_name(a) for a in aus if au_name(a) in pq.read_schema(Path(d) / "index.parquet").names]
        for batch in pq.ParquetFile(Path(d) / "index.parquet").iter_batches(columns=cols):
            rows = batch.to_pylist()
            for r in rows:
                if cfg.labelled.folds is not None and r["fold"] not in cfg.labelled.folds:
                    continue
                known = [au for au in aus if r.get(au_name(au), -1) != -1]
                images += 1
                labels += len(known)
                if cfg.label_drop_mode == "image":
                    hid = is_hidden(r["key"], cfg.label_drop, cfg.seed)
                    hidden_images += hid
                    hidden_labels += len(known) if hid else 0
                else:
                    hidden_labels += sum(hidden_aus(r["key"], tuple(known), cfg.label_drop, cfg.seed))
    return {"mode": cfg.label_drop_mode, "requested": cfg.label_drop, "images": images,
            "hidden_images": hidden_images, "labels": labels, "hidden_labels": hidden_labels,
            "fraction": (hidden_images / max(images, 1)) if cfg.label_drop_mode == "image"
            else hidden_labels / max(labels, 1)}


# ---------------------------------------------------------------------------------------------------- training
class _SlotShards(IterableDataset):
    """Resampled shard URLs for one (rank, worker) slot: this slot's part of each directory, mixed by weight."""

    def __init__(self, lists: list[list[str]], weights: list[float], seed: int, rank: int, world: int, salt: str):
        self.lists, self.weights, self.seed, self.rank, self.world, self.salt = lists, weights, seed, rank, world, salt
        self.epoch = 0

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        slots, slot = self.world * nw, self.rank * nw + wid
        parts = []
        for urls in self.lists:
            if len(urls) >= slots:
                parts.append(urls[slot::slots])  # disjoint across ranks and workers
            else:
                warnings.warn(f"{len(urls)} shards for {slots} rank x worker slots: slots share shards "
                              f"(re-shard with a smaller --shard-size to read disjoint shards)", stacklevel=1)
                parts.append(urls)
        rng = random.Random(f"{self.salt}:{self.seed}:{self.epoch}:{self.rank}:{wid}")
        while True:
            urls = rng.choices(parts, weights=self.weights)[0]
            yield {"url": urls[rng.randrange(len(urls))]}


class _Counter:
    """A webdataset handler that skips and counts what a worker could not read."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, exn: Exception) -> bool:
        self.n += 1
        return True


def _shuffle(buffer: int, rng: random.Random) -> Callable:
    def stage(src: Iterator) -> Iterator:
        buf = []
        for sample in src:
            buf.append(sample)
            if len(buf) >= buffer:
                yield buf.pop(rng.randrange(len(buf)))
        while buf:
            yield buf.pop(rng.randrange(len(buf)))
    return stage


class _SourceDataset(IterableDataset):
    """Batches of one training source, built inside each DataLoader worker."""

    def __init__(self, shards: _SlotShards, batch: int, cfg: StreamConfig, aus: tuple[int, ...], kind: str,
                 keep: Callable[[dict], bool] | None):
        self.shards, self.batch, self.cfg, self.aus, self.kind, self.keep = shards, batch, cfg, aus, kind, keep

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid = info.id if info else 0
        rng = random.Random(f"aug:{self.shards.salt}:{self.cfg.seed}:{self.shards.epoch}:{self.shards.rank}:{wid}")
        bad = _Counter()
        samples = (s for u in self.shards for s in tar_samples(u["url"], bad))
        if self.keep is not None:
            samples = (s for s in samples if self.keep(s))
        samples = _shuffle(self.cfg.shuffle_buffer, rng)(samples)  # buffers hold bytes; decode after
        images, targets, masks, keys, exprs = [], [], [], [], []
        reported = 0
        for s in samples:
            try:
                img, meta = decode_train(s, self.cfg.image_size, rng)
                if self.kind == "labelled":
                    hidden = (hidden_aus(s["__key__"], self.aus, self.cfg.label_drop, self.cfg.seed)
                              if self.cfg.label_drop_mode == "au" else None)
                    t, m = au_targets(meta, self.aus, hidden)
                    targets.append(t)
                    masks.append(m)
                elif self.kind == "expression":
                    if meta.get("expression", -1) < 0:
                        raise DecodeError("no expression label")
                    exprs.append(meta["expression"])
            except (DecodeError, KeyError, ValueError):
                bad.n += 1
                continue
            images.append(img)
            keys.append(s["__key__"])
            if len(images) == self.batch:
                out = {"images": torch.stack(images), "keys": keys, "skipped": bad.n - reported}
                if targets:
                    out["targets"], out["mask"] = torch.tensor(targets), torch.tensor(masks)
                if exprs:
                    out["labels"] = torch.tensor(exprs, dtype=torch.int64)
                reported = bad.n
                yield out
                images, targets, masks, keys, exprs = [], [], [], [], []


class TrainStream:
    """Infinite iterator of Batch for one rank; ``set_epoch`` reseeds (call it when the run resumes)."""

    def __init__(self, cfg: StreamConfig, rank: int = 0, world: int = 1):
        if cfg.label_drop_mode not in ("image", "au"):
            raise ValueError(f"label_drop_mode {cfg.label_drop_mode!r}: use 'image' or 'au'")
        if not 0.0 <= cfg.label_drop < 1.0:
            raise ValueError(f"label_drop {cfg.label_drop}: use a fraction in [0, 1)")
        self.cfg, self.rank, self.world = cfg, rank, world
        self.aus = resolve_aus(cfg)
        image_drop = cfg.label_drop > 0 and cfg.label_drop_mode == "image"
        keep_labelled = (lambda s: not is_hidden(s["__key__"], cfg.label_drop, cfg.seed)) if image_drop else None
        self.sources: dict[str, _SourceDataset] = {
            "labelled": self._source("labelled", cfg.labelled, cfg.m1, keep_labelled)}
        # The unlabelled source: unlabelled corpora, plus the labelled images whose labels were dropped (T2).
        unl_lists, unl_weights = self._lists(cfg.unlabelled) if cfg.unlabelled else ([], [])
        if image_drop:
            hidden_lists, hidden_weights = self._lists(cfg.labelled)
            unl_lists += hidden_lists
            unl_weights += hidden_weights
        if unl_lists and cfg.m2 > 0:
            keep = None
            if image_drop:
                labelled_urls = {u for urls in self._lists(cfg.labelled)[0] for u in urls}
                keep = lambda s: s["__url__"] not in labelled_urls or is_hidden(s["__key__"], cfg.label_drop, cfg.seed)  # noqa: E731
            self.sources["unlabelled"] = _SourceDataset(
                _SlotShards(unl_lists, unl_weights, cfg.seed, rank, world, "unlabelled"),
                cfg.m2, cfg, self.aus, "unlabelled", keep)
        if cfg.expression is not None:
            self.sources["expression"] = self._source("expression", cfg.expression, cfg.m_expr, None)

    def _lists(self, src: SourceConfig) -> tuple[list[list[str]], list[float]]:
        lists = [shard_urls(d, src.folds) for d in src.dirs]
        weights = list(src.weights) if src.weights is not None else [1.0] * len(src.dirs)
        if len(weights) != len(src.dirs):
            raise ValueError(f"{len(weights)} weights for {len(src.dirs)} shard directories")
        for d, urls in zip(src.dirs, lists):
            if not urls:
                raise ValueError(f"{d}: no shards in folds {src.folds}")
        return lists, weights

    def _source(self, kind: str, src: SourceConfig, batch: int, keep) -> _SourceDataset:
        lists, weights = self._lists(src)
        return _SourceDataset(_SlotShards(lists, weights, self.cfg.seed, self.rank, self.world, kind),
                              batch, self.cfg, self.aus, kind, keep)

    def set_epoch(self, epoch: int) -> None:
        for s in self.sources.values():
            s.shards.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        loaders = {k: iter(DataLoader(s, batch_size=None, num_workers=self.cfg.workers,
                                      persistent_workers=False, prefetch_factor=4 if self.cfg.workers else None))
                   for k, s in self.sources.items()}
        while True:
            parts = {k: next(it) for k, it in loaders.items()}
            lab, unl, ex = parts["labelled"], parts.get("unlabelled"), parts.get("expression")
            yield Batch(images=lab["images"], targets=lab["targets"], mask=lab["mask"], keys=lab["keys"],
                        unlabelled=unl["images"] if unl else None, unlabelled_keys=unl["keys"] if unl else [],
                        expr_images=ex["images"] if ex else None, expr_labels=ex["labels"] if ex else None,
                        expr_keys=ex["keys"] if ex else [],
                        skipped=sum(p["skipped"] for p in parts.values()))


# ---------------------------------------------------------------------------------------------------- evaluation
def _eval_segments(dirs: tuple[str, ...], folds: tuple[int, ...] | None, world: int
                   ) -> tuple[list[list[tuple[str, int, int]]], int]:
    """-> (per rank: [(url, first offset, end offset)], total samples). Every rank computes the same plan."""
    order: list[tuple[str, int]] = []  # (url, samples in it) in global order
    for d in dirs:
        for s in read_dataset(d)["shards"]:
            if (folds is None or s["fold"] in folds) and s["samples"]:
                order.append((str(Path(d) / s["name"]), s["samples"]))
    total = sum(n for _, n in order)
    plans = []
    for r in range(world):
        lo, hi = total * r // world, total * (r + 1) // world
        segs, base = [], 0
        for url, n in order:
            a, b = max(lo, base), min(hi, base + n)
            if a < b:
                segs.append((url, a - base, b - base))
            base += n
        plans.append(segs)
    return plans, total


def _split(segs: list[tuple[str, int, int]], parts: int) -> list[list[tuple[str, int, int]]]:
    """Cut a rank's segments into ``parts`` contiguous pieces of near-equal sample count (one per worker)."""
    total = sum(b - a for _, a, b in segs)
    out = []
    for w in range(parts):
        lo, hi = total * w // parts, total * (w + 1) // parts
        piece, base = [], 0
        for url, a, b in segs:
            x, y = max(lo, base), min(hi, base + b - a)
            if x < y:
                piece.append((url, a + x - base, a + y - base))
            base += b - a
        out.append(piece)
    return out


class _EvalDataset(IterableDataset):
    def __init__(self, pieces: list[list[tuple[str, int, int]]], batch: int, size: int, aus: tuple[int, ...]):
        self.pieces, self.batch, self.size, self.aus = pieces, batch, size, aus

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        piece = self.pieces[info.id if info else 0]
        rows = []
        for url, a, b in piece:
            bad = _Counter()
            for pos, s in enumerate(tar_samples(url, bad)):
                if pos >= b:
                    break
                if pos < a:
                    continue
                try:
                    img, meta = decode_eval(s, self.size)
                except (DecodeError, KeyError, ValueError):
                    continue  # counted by the caller as missing valid entries
                t, m = au_targets(meta, self.aus)
                rows.append((img, t, m, s["__key__"]))
                if len(rows) == self.batch:
                    yield _collate_eval(rows)
                    rows = []
        if rows:
            yield _collate_eval(rows)


def _collate_eval(rows: list) -> dict:
    imgs, ts, ms, keys = zip(*rows)
    return {"images": torch.stack(imgs), "targets": torch.tensor(ts), "mask": torch.tensor(ms), "keys": list(keys)}


def eval_loader(dirs: tuple[str, ...], folds: tuple[int, ...] | None, aus: tuple[int, ...], batch_size: int = 64,
                image_size: int = 64, rank: int = 0, world: int = 1, workers: int = 1) -> Iterator[EvalBatch]:
    """Every sample of ``folds`` exactly once over all ranks; the same number of batches on every rank."""
    plans, _ = _eval_segments(dirs, folds, world)
    target = eval_batches_per_rank(dirs, folds, batch_size, world, workers)  # the busiest rank's count
    pieces = _split(plans[rank], max(1, workers))
    ds = _EvalDataset(pieces, batch_size, image_size, aus)
    loader = DataLoader(ds, batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None)
    n = 0
    for b in loader:  # partial batches are padded to full size: ranks can all_gather them
        n += 1
        k = len(b["keys"])
        missing = batch_size - k
        valid = torch.cat([torch.ones(k, dtype=torch.bool), torch.zeros(missing, dtype=torch.bool)])
        if missing:
            b["images"] = torch.cat([b["images"], b["images"].new_zeros(missing, *b["images"].shape[1:])])
            b["targets"] = torch.cat([b["targets"], b["targets"].new_zeros(missing, len(aus))])
            b["mask"] = torch.cat([b["mask"], b["mask"].new_zeros(missing, len(aus))])
        yield EvalBatch(b["images"], b["targets"], b["mask"], b["keys"], valid)
    pad = torch.zeros(batch_size, 3, image_size, image_size, dtype=torch.uint8)
    for _ in range(target - n):
        yield EvalBatch(pad, torch.zeros(batch_size, len(aus)), torch.zeros(batch_size, len(aus)), [],
                        torch.zeros(batch_size, dtype=torch.bool))


def eval_batches_per_rank(dirs: tuple[str, ...], folds: tuple[int, ...] | None, batch_size: int,
                          world: int, workers: int) -> int:
    """The number of batches every rank yields (what the busiest rank has; the others pad up to it)."""
    plans, _ = _eval_segments(dirs, folds, world)
    return max(sum(-(-sum(b - a for _, a, b in p) // batch_size) for p in _split(segs, max(1, workers)))
               for segs in plans)
