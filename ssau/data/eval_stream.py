"""Evaluation stream: every sample of the chosen folds exactly once over all ranks, and a count of what was scored.

Evaluation (``eval_loader``): every sample of the chosen folds exactly once across all ranks. The global sample
order comes from the parquet index; rank r takes a contiguous 1/world slice of it, and every rank yields the same
number of batches (padding batches have ``valid`` all False), so collectives never hang on uneven shards.
With ``keys`` (the AU validation split, ``train.evaluate_on=val``) only those samples of the chosen folds are scored,
each exactly once: the index says which shard holds each, and only those shards are opened.

Evaluation counts the samples it scored against the index (``EvalLoader.expected``); the caller decides what a shortfall means.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ssau.data.decode import au_targets, decode_eval
from ssau.data.sources import index_batches, index_names, read_dataset, shard_capacity
from ssau.data.tario import SkipCounter, tar_samples
from ssau.dist.stop import ignore_stop_signals
from ssau.errors import ConfigError, DecodeError, SourceError
from ssau.remote import join, public


@dataclass
class EvalBatch:
    images: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    keys: list[str]
    valid: torch.Tensor  # bool [B]: False marks padding
    expression: torch.Tensor | None = None  # int64 [B]: the expression class, -1 where a sample has none


# ---------------------------------------------------------------------------------------------------- evaluation
def _keyed(d: str, folds: tuple[int, ...] | None, keys: frozenset[str]) -> list[tuple[str, int, tuple]]:
    """[(url, count, its keys to score in index order)] of one directory: the shards of ``folds`` (by dataset.json
    and by the index row both) that hold one of ``keys``, as the index places them."""
    fold_of = {s["name"]: s["fold"] for s in read_dataset(d)["shards"]}
    if "shard" not in index_names(d):
        raise ConfigError(f"{public(join(d, 'index.parquet'))}: no shard column, so the AU validation split cannot be found")
    found: dict[str, list[str]] = {}
    for b in index_batches(d, ["key", "fold", "subject", "shard"]):
        t = b.to_pydict()
        for key, fold, name in zip(t["key"], t["fold"], t["shard"]):
            if key in keys and name in fold_of and fold_of[name] == fold and (folds is None or fold in folds):
                found.setdefault(name, []).append(key)
    return [(join(d, name), len(ks), tuple(ks)) for name, ks in found.items()]


def _eval_segments(dirs: tuple[str, ...], folds: tuple[int, ...] | None, world: int, split: str | None = None,
                   keys: frozenset[str] | None = None) -> tuple[list[list[tuple[str, int, int, tuple | None]]], int]:
    """-> (per rank: [(url, first, end, keys)], total samples); ``split``: only that split's shards (the expression
    corpus's test split); ``keys``: only those samples, ``first``/``end`` then index the segment's ``keys`` instead
    of the shard's positions. Every rank computes the same plan."""
    order: list[tuple[str, int, tuple | None]] = []  # (url, samples in it, its keys) in global order
    for d in dirs:
        if keys is not None:
            order += _keyed(d, folds, keys)
            continue
        for s in read_dataset(d)["shards"]:
            if (folds is None or s["fold"] in folds) and s["samples"] and (split is None or s.get("split") == split):
                order.append((join(d, s["name"]), s["samples"], None))
    expected = sum(n for _, n, _ in order)
    # A shard plans no more samples than its file can hold (a missing file: one, whose read fails and says why): a
    # count that a truncated file cannot hold is a shortfall to report, never batches to pad for ever.
    order = [(url, min(n, 1 if (cap := shard_capacity(url))[0] is None else cap[1]), ks) for url, n, ks in order]
    total = sum(n for _, n, _ in order)
    plans = []
    for r in range(world):
        lo, hi = total * r // world, total * (r + 1) // world
        segs, base = [], 0
        for url, n, ks in order:
            a, b = max(lo, base), min(hi, base + n)
            if a < b:
                segs.append((url, a - base, b - base, ks))
            base += n
        plans.append(segs)
    return plans, expected


def _split(segs: list[tuple], parts: int) -> list[list[tuple]]:
    """Cut a rank's segments into ``parts`` contiguous pieces of near-equal sample count (one per worker)."""
    total = sum(b - a for _, a, b, _ in segs)
    out = []
    for w in range(parts):
        lo, hi = total * w // parts, total * (w + 1) // parts
        piece, base = [], 0
        for url, a, b, ks in segs:
            x, y = max(lo, base), min(hi, base + b - a)
            if x < y:
                piece.append((url, a + x - base, a + y - base, ks))
            base += b - a
        out.append(piece)
    return out


class _EvalDataset(IterableDataset):
    _PROBLEMS = 5  # reasons kept per worker: enough to say what broke, bounded for a shard of garbage

    def __init__(self, pieces: list[list[tuple]], batch: int, size: int, aus: tuple[int, ...]):
        self.pieces, self.batch, self.size, self.aus = pieces, batch, size, aus

    def __iter__(self) -> Iterator[dict]:
        """Batches of readable samples; each carries the reasons (``problems``) found since the previous one, and
        a last item without images carries what was found after the last batch."""
        info = get_worker_info()
        piece = self.pieces[info.id if info else 0]
        rows, problems, noted = [], [], 0

        def note(text: str) -> None:
            nonlocal noted
            noted += 1
            if noted <= self._PROBLEMS:
                problems.append(text[:300])

        for url, a, b, keys in piece:
            bad, reached = SkipCounter(), 0
            wanted = frozenset(keys[a:b]) if keys is not None else None  # by key: a..b index the segment's keys
            for pos, s in enumerate(tar_samples(url, bad)):
                if wanted is None and pos >= b or wanted is not None and reached == len(wanted):
                    break
                if wanted is None and pos < a or wanted is not None and s["__key__"] not in wanted:
                    continue
                reached += 1
                try:
                    img, meta = decode_eval(s, self.size)
                except DecodeError as e:
                    note(f"{Path(url).name}: {e}")
                    continue
                t, m = au_targets(meta, self.aus)
                rows.append((img, t, m, s["__key__"], meta.get("expression", -1)))
                if len(rows) == self.batch:
                    yield _collate_eval(rows) | {"problems": problems}
                    rows, problems = [], []
            if reached < b - a and wanted is not None:
                note(f"{Path(url).name}: {b - a - reached} of its {b - a} samples to score not read ("
                     + (bad.first or "the index lists keys the shard does not hold") + ")")
            elif reached < b - a:
                note(f"{Path(url).name}: samples {a + reached}-{b - 1} not read ("
                     + (bad.first or "the shard holds fewer samples than dataset.json lists") + ")")
        if rows:
            yield _collate_eval(rows) | {"problems": problems}
        elif problems:
            yield {"problems": problems}


def _collate_eval(rows: list) -> dict:
    imgs, ts, ms, keys, es = zip(*rows)
    return {"images": torch.stack(imgs), "targets": torch.tensor(ts), "mask": torch.tensor(ms), "keys": list(keys),
            "expression": torch.tensor(es, dtype=torch.int64)}


class EvalLoader:
    """Every sample of ``folds`` (with ``keys``: those samples of them) exactly once over all ranks; the same
    number of batches on every rank.

    ``expected`` is what the folds hold by dataset.json (with ``keys``: how many of them the index places in those
    folds), all ranks together; after a pass, ``problems`` holds
    the first reasons this rank found for samples it could not score. A caller that gathers the valid rows of
    all ranks passes their number to ``finish``, so every rank takes the same decision.
    """

    def __init__(self, dirs: tuple[str, ...], folds: tuple[int, ...] | None, aus: tuple[int, ...],
                 batch_size: int = 64, image_size: int = 64, rank: int = 0, world: int = 1, workers: int = 1,
                 split: str | None = None, keys: frozenset[str] | None = None):
        self.dirs, self.folds, self.aus, self.batch_size, self.image_size = dirs, folds, aus, batch_size, image_size
        self.workers, self.split, self.keys = workers, split, keys
        plans, self.expected = _eval_segments(dirs, folds, world, split, keys)
        self.target = _busiest(plans, batch_size, workers)  # the busiest rank's batches
        self.pieces = _split(plans[rank], max(1, workers))
        self.problems: list[str] = []

    def __iter__(self) -> Iterator[EvalBatch]:
        aus, batch_size, image_size = self.aus, self.batch_size, self.image_size
        self.problems = []
        ds = _EvalDataset(self.pieces, batch_size, image_size, aus)
        loader = DataLoader(ds, batch_size=None, num_workers=self.workers,
                            prefetch_factor=2 if self.workers else None,
                            worker_init_fn=ignore_stop_signals if self.workers else None,
                            generator=torch.Generator())  # the global CPU generator is the training's
        n = 0
        for b in loader:  # partial batches are padded to full size: ranks can all_gather them
            self.problems += b["problems"]
            if "images" not in b:
                continue
            n += 1
            k = len(b["keys"])
            missing = batch_size - k
            valid = torch.cat([torch.ones(k, dtype=torch.bool), torch.zeros(missing, dtype=torch.bool)])
            if missing:
                b["images"] = torch.cat([b["images"], b["images"].new_zeros(missing, *b["images"].shape[1:])])
                b["targets"] = torch.cat([b["targets"], b["targets"].new_zeros(missing, len(aus))])
                b["mask"] = torch.cat([b["mask"], b["mask"].new_zeros(missing, len(aus))])
                b["expression"] = torch.cat([b["expression"], b["expression"].new_full((missing,), -1)])
            yield EvalBatch(b["images"], b["targets"], b["mask"], b["keys"], valid, b["expression"])
        pad = torch.zeros(batch_size, 3, image_size, image_size, dtype=torch.uint8)
        for _ in range(self.target - n):
            yield EvalBatch(pad, torch.zeros(batch_size, len(aus)), torch.zeros(batch_size, len(aus)), [],
                            torch.zeros(batch_size, dtype=torch.bool), torch.full((batch_size,), -1))

    def finish(self, scored: int, problems: list[str], incomplete: str = "fail", main: bool = True) -> dict[str, int]:
        """The completeness metrics of a pass that scored ``scored`` samples over all ranks. Fewer than
        ``expected`` raise SourceError (``incomplete='fail'``) or print one warning line on stderr from the main
        rank (``'warn'``); ``problems`` are the first reasons any rank found. Every rank passes the same count, so
        every rank raises, or none does."""
        if scored != self.expected:
            what = ("the AU validation split" if self.keys is not None else
                    f"fold {','.join(map(str, self.folds))}" if self.folds else
                    f"the {self.split} split" if self.split else "all folds")
            line = (f"evaluation of {what} of {', '.join(self.dirs)} scored {scored} of the {self.expected} samples "
                    f"dataset.json lists ({self.expected - scored} unreadable or missing); the first problem: "
                    f"{problems[0] if problems else 'unknown'}")
            if incomplete == "fail":
                raise SourceError(f"{line} (data.eval_incomplete=warn scores what remains)")
            if main:
                print(f"ssau: warning: {line}", file=sys.stderr, flush=True)
        return {"eval_scored": scored, "eval_expected": self.expected, "eval_skipped": self.expected - scored}


def eval_loader(dirs: tuple[str, ...], folds: tuple[int, ...] | None, aus: tuple[int, ...], batch_size: int = 64,
                image_size: int = 64, rank: int = 0, world: int = 1, workers: int = 1,
                split: str | None = None, keys: frozenset[str] | None = None) -> EvalLoader:
    """Every sample of ``folds`` (and ``split``; with ``keys``, only those) exactly once over all ranks; the same
    number of batches on every rank."""
    return EvalLoader(dirs, folds, aus, batch_size, image_size, rank, world, workers, split, keys)


def _busiest(plans: list[list[tuple]], batch_size: int, workers: int) -> int:
    return max(sum(-(-sum(b - a for _, a, b, _ in p) // batch_size) for p in _split(segs, max(1, workers)))
               for segs in plans)


def eval_batches_per_rank(dirs: tuple[str, ...], folds: tuple[int, ...] | None, batch_size: int,
                          world: int, workers: int, split: str | None = None,
                          keys: frozenset[str] | None = None) -> int:
    """The number of batches every rank yields (what the busiest rank has; the others pad up to it)."""
    return _busiest(_eval_segments(dirs, folds, world, split, keys)[0], batch_size, workers)
