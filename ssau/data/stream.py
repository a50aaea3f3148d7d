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

AU validation set (MAL, Li & Shan Sec. 4.1.4): ``validation=f`` reserves about a fraction f of every subject's
labelled training images (at least one per subject; by a hash of (seed, key), so the same on every rank). They are
excluded from the labelled training source and stream instead as ``val_batch`` images per step, read once into
memory as encoded bytes when the stream starts (f is small) and decoded without augmentation.
"""

from __future__ import annotations

import hashlib
import json
import random
import warnings
from collections import defaultdict
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
    validation: float = 0.0  # fraction of each subject's labelled training images reserved as the AU validation set
    val_batch: int = 256


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
    val_images: torch.Tensor | None = None  # [val_batch, 3, S, S] from the AU validation set
    val_targets: torch.Tensor | None = None
    val_mask: torch.Tensor | None = None
    val_keys: list[str] = field(default_factory=list)

    def to(self, device: torch.device | str) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.images), move(self.targets), move(self.mask), self.keys, move(self.unlabelled),
                     self.unlabelled_keys, move(self.expr_images), move(self.expr_labels), self.expr_keys,
                     self.skipped, move(self.val_images), move(self.val_targets), move(self.val_mask), self.val_keys)


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


def labelled_rows(cfg: StreamConfig) -> Iterator[tuple[str, str, str, list[float], list[float]]]:
    """(directory, key, subject, targets, mask) of every labelled training image whose labels are not hidden,
    read from the indexes (training folds only; AU-mode label drop masks the hidden AUs)."""
    aus = resolve_aus(cfg)
    cols = [au_name(a) for a in aus]
    for d in cfg.labelled.dirs:
        names = pq.read_schema(Path(d) / "index.parquet").names
        present = [c for c in cols if c in names]
        for b in pq.ParquetFile(Path(d) / "index.parquet").iter_batches(columns=["key", "fold", "subject"] + present):
            t = b.to_pydict()
            for i, key in enumerate(t["key"]):
                if cfg.labelled.folds is not None and t["fold"][i] not in cfg.labelled.folds:
                    continue
                if cfg.label_drop_mode == "image" and is_hidden(key, cfg.label_drop, cfg.seed):
                    continue
                hid = (hidden_aus(key, aus, cfg.label_drop, cfg.seed) if cfg.label_drop_mode == "au"
                       else [False] * len(aus))
                v = [t[c][i] if c in t else -1 for c in cols]
                yield (d, key, t["subject"][i] or "", [float(max(x, 0)) for x in v],
                       [float(x != -1 and not h) for x, h in zip(v, hid)])


@dataclass
class ValidationSplit:
    keys: list[str]
    targets: torch.Tensor  # [K, J]
    mask: torch.Tensor  # [K, J]
    subjects: int


def validation_split(cfg: StreamConfig) -> ValidationSplit:
    """The AU validation set: per (directory, subject), the ``max(1, round(f * n))`` images with the lowest
    hash(seed, key) among its n labelled training images with at least one known label. Images without a subject
    (EmotioNet) form one group per directory."""
    J = len(resolve_aus(cfg))
    if cfg.validation <= 0:
        return ValidationSplit([], torch.zeros(0, J), torch.zeros(0, J), 0)
    groups: dict[tuple[str, str], list] = defaultdict(list)
    for d, key, subject, t, m in labelled_rows(cfg):
        if any(m):
            groups[(d, subject)].append((_unit_hash("validation", cfg.seed, key), key, t, m))
    chosen = []
    for rows in groups.values():
        rows.sort()
        chosen += rows[:max(1, round(cfg.validation * len(rows)))]
    return ValidationSplit([r[1] for r in chosen], torch.tensor([r[2] for r in chosen]).reshape(-1, J),
                           torch.tensor([r[3] for r in chosen]).reshape(-1, J), len(groups))


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


class _ValidationDataset(IterableDataset):
    """Batches of the AU validation set, from samples held in memory; shuffled passes seeded per rank/worker."""

    def __init__(self, samples: list[dict], cfg: StreamConfig, aus: tuple[int, ...], rank: int):
        self.samples, self.cfg, self.aus, self.rank = samples, cfg, aus, rank
        self.epoch = 0

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        rng = random.Random(f"validation:{self.cfg.seed}:{self.epoch}:{self.rank}:{info.id if info else 0}")
        order: list[int] = []
        bad: set[int] = set()  # unreadable samples, skipped (and counted) once
        reported = 0
        while True:
            images, targets, masks, keys = [], [], [], []
            while len(images) < self.cfg.val_batch:
                if not order:
                    order = [i for i in range(len(self.samples)) if i not in bad]
                    if not order:
                        raise RuntimeError("the AU validation set has no readable image")
                    rng.shuffle(order)
                i = order.pop()
                s = self.samples[i]
                try:
                    img, meta = decode_eval(s, self.cfg.image_size)
                except (DecodeError, KeyError, ValueError):
                    bad.add(i)
                    continue
                hidden = (hidden_aus(s["__key__"], self.aus, self.cfg.label_drop, self.cfg.seed)
                          if self.cfg.label_drop_mode == "au" else None)
                t, m = au_targets(meta, self.aus, hidden)
                images.append(img)
                targets.append(t)
                masks.append(m)
                keys.append(s["__key__"])
            yield {"images": torch.stack(images), "targets": torch.tensor(targets), "mask": torch.tensor(masks),
                   "keys": keys, "skipped": len(bad) - reported}
            reported = len(bad)


class TrainStream:
    """Infinite iterator of Batch for one rank; ``set_epoch`` reseeds (call it when the run resumes)."""

    def __init__(self, cfg: StreamConfig, rank: int = 0, world: int = 1, validation: ValidationSplit | None = None):
        if cfg.label_drop_mode not in ("image", "au"):
            raise ValueError(f"label_drop_mode {cfg.label_drop_mode!r}: use 'image' or 'au'")
        if not 0.0 <= cfg.label_drop < 1.0:
            raise ValueError(f"label_drop {cfg.label_drop}: use a fraction in [0, 1)")
        self.cfg, self.rank, self.world = cfg, rank, world
        self.aus = resolve_aus(cfg)
        image_drop = cfg.label_drop > 0 and cfg.label_drop_mode == "image"
        val_keys = frozenset((validation or validation_split(cfg)).keys)  # pass it to skip a second index scan

        def keep_labelled(s: dict) -> bool:
            return s["__key__"] not in val_keys and not (image_drop and is_hidden(s["__key__"], cfg.label_drop, cfg.seed))

        self.sources: dict[str, IterableDataset] = {
            "labelled": self._source("labelled", cfg.labelled, cfg.m1,
                                     keep_labelled if image_drop or val_keys else None)}
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
        if val_keys:
            self.sources["validation"] = _ValidationDataset(self._read_validation(val_keys), cfg, self.aus, rank)

    def _read_validation(self, keys: frozenset[str]) -> list[dict]:
        """The validation samples' bytes, read from the labelled training shards once."""
        samples, bad = [], _Counter()
        for urls in self._lists(self.cfg.labelled)[0]:
            for url in urls:
                samples += [s for s in tar_samples(url, bad) if s["__key__"] in keys]
        if not samples:
            raise ValueError("the AU validation set is empty: no reserved key was found in the labelled shards")
        return samples

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
            if isinstance(s, _ValidationDataset):
                s.epoch = epoch
            else:
                s.shards.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        loaders = {k: iter(DataLoader(s, batch_size=None, num_workers=self.cfg.workers,
                                      persistent_workers=False, prefetch_factor=4 if self.cfg.workers else None))
                   for k, s in self.sources.items()}
        while True:
            parts = {k: next(it) for k, it in loaders.items()}
            lab, unl, ex, val = (parts.get(k) for k in ("labelled", "unlabelled", "expression", "validation"))
            yield Batch(images=lab["images"], targets=lab["targets"], mask=lab["mask"], keys=lab["keys"],
                        unlabelled=unl["images"] if unl else None, unlabelled_keys=unl["keys"] if unl else [],
                        expr_images=ex["images"] if ex else None, expr_labels=ex["labels"] if ex else None,
                        expr_keys=ex["keys"] if ex else [],
                        skipped=sum(p["skipped"] for p in parts.values()),
                        val_images=val["images"] if val else None, val_targets=val["targets"] if val else None,
                        val_mask=val["mask"] if val else None, val_keys=val["keys"] if val else [])


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
