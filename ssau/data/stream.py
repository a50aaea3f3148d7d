"""Training streams: webdataset pipelines over the shards `ssau shard` wrote.

Training (``TrainStream``): per rank, every batch has a fixed composition - ``m1`` labelled samples, ``m2``
unlabelled ones and, when configured, ``m_expr`` expression samples - each source read by its own DataLoader.
A source is one or more shard directories mixed by weight. Shards are split across (rank, worker) slots so ranks
read disjoint shards, then resampled with replacement inside each slot, seeded by (seed, epoch, rank, worker):
training is counted in steps, never in epochs (webdataset has no checkpointable position).

Damaged data: a sample that cannot be read (tar damage, undecodable image, malformed json or ``landmarks``, a
damaged ``flow.npy`` when flow is read) is skipped and counted (``Batch.skipped``). A training source that cannot
deliver stops the run with a ``SourceError`` naming it: at start each reader (rank x worker slot) goes through its
shards until one sample is usable and fails at once if none is; later, a reader that finds no usable sample for
``source_timeout`` seconds fails, and the main process gives up on workers that deliver no batch for twice that (a
worker stuck in I/O).

Geometry: the labelled and unlabelled parts carry each image's 68 landmarks in the coordinates of the augmented
image (``ssau.data.decode``: the template, flagged invalid, where a sample has none) and, with ``flow`` set, its
optical flow (zeros, flagged invalid, where a sample has none). The expression and validation parts carry none.

What the stream reads (source configs, label drop, the AU validation set) is decided in ``ssau.data.sources``;
evaluation reads through ``ssau.data.eval_stream``.
"""

from __future__ import annotations

import random
import time
import warnings
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ssau.data.batch import Batch
from ssau.data.decode import TrainSample, au_intensity, au_targets, decode_eval, decode_sample
from ssau.data.sources import SourceConfig, StreamConfig, hidden_aus, is_hidden, resolve_aus, shard_urls
from ssau.data.tario import SkipCounter, tar_samples
from ssau.data.trainset import TrainingSet
from ssau.errors import DecodeError, SourceError


# ---------------------------------------------------------------------------------------------------- training
class _SlotShards(IterableDataset):
    """Resampled shard URLs for one (rank, worker) slot: this slot's part of each directory, mixed by weight."""

    def __init__(self, lists: list[list[str]], weights: list[float], seed: int, rank: int, world: int, salt: str):
        self.lists, self.weights, self.seed, self.rank, self.world, self.salt = lists, weights, seed, rank, world, salt
        self.epoch = 0
        self.shared = False  # set in a worker whose own shards hold nothing usable: it reads every shard instead


    def parts(self, warn: bool = False) -> list[list[str]]:
        """This slot's shards of each directory (in the calling DataLoader worker)."""
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        slots, slot = self.world * nw, self.rank * nw + wid
        parts = []
        for urls in self.lists:
            if self.shared:
                parts.append(urls)
            elif len(urls) >= slots:
                parts.append(urls[slot::slots])  # disjoint across ranks and workers
            else:
                if warn:
                    warnings.warn(f"{len(urls)} shards for {slots} rank x worker slots: slots share shards "
                                  f"(re-shard with a smaller --shard-size to read disjoint shards)", stacklevel=1)
                parts.append(urls)
        return parts

    def where(self) -> str:
        info = get_worker_info()
        return f"rank {self.rank} of {self.world}, worker {info.id if info else 0} of {info.num_workers if info else 1}"

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        parts = self.parts(warn=True)
        rng = random.Random(f"{self.salt}:{self.seed}:{self.epoch}:{self.rank}:{info.id if info else 0}")
        while True:
            urls = rng.choices(parts, weights=self.weights)[0]
            yield {"url": urls[rng.randrange(len(urls))]}


class _Clock:
    """Time since a reader last produced a usable sample; the time spent waiting for the consumer (between
    batches) does not count."""

    def __init__(self, timeout: float, what: str, bad: SkipCounter):
        self.timeout, self.what, self.bad = timeout, what, bad
        self.ok()

    def ok(self) -> None:
        self.since, self.bad_since = time.monotonic(), self.bad.n

    def check(self) -> None:
        if time.monotonic() - self.since > self.timeout:
            raise SourceError(f"{self.what}: no usable sample for {self.timeout:g} s (data.source_timeout); "
                              f"{self.bad.n - self.bad_since} unreadable meanwhile, the last: {self.bad.last}")


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
                 keep: Callable[[dict], bool] | None, dirs: list[str], unlabelled_keys: frozenset[str] = frozenset()):
        self.shards, self.batch, self.cfg, self.aus, self.kind, self.keep = shards, batch, cfg, aus, kind, keep
        self.what = f"{kind} source ({', '.join(dirs)})"
        self.unlabelled_keys = unlabelled_keys  # images of subjects without labels (data.labelled_subjects)

    def _example(self, s: dict, rng: random.Random) -> tuple[TrainSample, tuple | None, int | None]:
        """(decoded sample, AU labels (targets, mask, intensity, intensity mask), expression) of one sample;
        DecodeError when it cannot be used."""
        if self.kind == "labelled" and s["__key__"] in self.unlabelled_keys:  # the guard behind the filter, before
            raise SourceError(f"{self.what}: {s['__key__']} belongs to a subject without labels "  # any decoding
                              f"(data.labelled_subjects) yet reached the labelled stream")
        ex = decode_sample(s, self.cfg.image_size, rng, flow=self.cfg.flow and self.kind != "expression",
                           labels=self.kind != "unlabelled")
        if self.kind == "labelled":
            hidden = (hidden_aus(s["__key__"], self.aus, self.cfg.label_drop, self.cfg.split_seed)
                      if self.cfg.label_drop_mode == "au" else None)
            return ex, (*au_targets(ex.meta, self.aus, hidden), *au_intensity(ex.meta, self.aus, hidden)), None
        if self.kind == "expression":
            if ex.meta.get("expression", -1) < 0:
                raise DecodeError(f"{s['__key__']}: no expression label")
            return ex, None, ex.meta["expression"]
        return ex, None, None

    def _probe(self) -> None:
        """Raise SourceError unless one of this slot's shards holds a usable sample. Reads until the first one
        (usually the first sample); a separate generator leaves the stream's batches as they would be without."""
        own = list(dict.fromkeys(u for part in self.shards.parts() for u in part))
        every = list(dict.fromkeys(u for part in self.shards.lists for u in part))
        urls = own + [u for u in every if u not in set(own)]  # this slot's shards first, then everyone else's
        bad, read, kept, rng = SkipCounter(), 0, 0, random.Random(0)
        for i, url in enumerate(urls):
            for s in tar_samples(url, bad):
                read += 1
                if self.keep is not None and not self.keep(s):
                    continue
                kept += 1
                try:
                    self._example(s, rng)
                except DecodeError as e:
                    bad(e)
                    continue
                if i >= len(own):  # one damaged shard must not end a run: this slot reads all shards instead
                    self.shards.shared = True
                    warnings.warn(f"{self.what}: none of the {len(own)} shards of {self.shards.where()} holds a "
                                  f"usable sample; it reads every shard of the source instead", stacklevel=1)
                return
        raise SourceError(f"{self.what}: none of the {len(urls)} shards read by {self.shards.where()} holds a "
                          f"usable sample ({read} samples read, {read - kept} of them set aside by label drop or "
                          f"the validation split, {bad.n} errors" + (f"; the first: {bad.first})" if bad.n else ")"))

    def _samples(self, bad: SkipCounter, clock: _Clock) -> Iterator[dict]:
        for u in self.shards:
            clock.check()  # a source whose shards all fail reads them fast: check once per shard, not per sample
            for s in tar_samples(u["url"], bad):
                if self.keep is None or self.keep(s):
                    yield s

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid = info.id if info else 0
        rng = random.Random(f"aug:{self.shards.salt}:{self.cfg.seed}:{self.shards.epoch}:{self.shards.rank}:{wid}")
        self._probe()
        bad = SkipCounter()
        clock = _Clock(self.cfg.source_timeout, self.what, bad)
        samples = _shuffle(self.cfg.shuffle_buffer, rng)(self._samples(bad, clock))  # buffers hold bytes
        examples, labels, keys, exprs = [], [], [], []
        reported = 0
        for s in samples:
            try:
                ex, lab, e = self._example(s, rng)
            except DecodeError as exn:
                bad(exn)
                clock.check()
                continue
            clock.ok()
            examples.append(ex)
            keys.append(s["__key__"])
            if lab is not None:
                labels.append(lab)
            if e is not None:
                exprs.append(e)
            if len(examples) == self.batch:
                out = {"images": torch.stack([x.image for x in examples]), "keys": keys, "skipped": bad.n - reported}
                if labels:
                    out["targets"], out["mask"], out["intensity"], out["intensity_mask"] = (
                        torch.tensor(list(col)) for col in zip(*labels))
                if exprs:
                    out["labels"] = torch.tensor(exprs, dtype=torch.int64)
                if self.kind != "expression":
                    out.update(_geometry(examples))
                reported = bad.n
                yield out
                clock.ok()  # the consumer's pace is not the source's fault
                examples, labels, keys, exprs = [], [], [], []


def _geometry(examples: list[TrainSample]) -> dict[str, torch.Tensor]:
    out = {"landmarks": torch.from_numpy(np.stack([x.landmarks for x in examples])),
           "landmarks_valid": torch.tensor([x.landmarks_valid for x in examples])}
    if examples[0].flow is not None:
        out["flow"] = torch.from_numpy(np.stack([x.flow for x in examples]))
        out["flow_valid"] = torch.tensor([x.flow_valid for x in examples])
    return out


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
                        raise SourceError(f"validation source: none of the {len(self.samples)} reserved "
                                          f"images can be read")
                    rng.shuffle(order)
                i = order.pop()
                s = self.samples[i]
                try:
                    img, meta = decode_eval(s, self.cfg.image_size)
                except DecodeError:
                    bad.add(i)
                    continue
                hidden = (hidden_aus(s["__key__"], self.aus, self.cfg.label_drop, self.cfg.split_seed)
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

    def __init__(self, cfg: StreamConfig, rank: int = 0, world: int = 1, trainset: TrainingSet | None = None):
        if cfg.label_drop_mode not in ("image", "au"):
            raise ValueError(f"label_drop_mode {cfg.label_drop_mode!r}: use 'image' or 'au'")
        if not 0.0 <= cfg.label_drop < 1.0:
            raise ValueError(f"label_drop {cfg.label_drop}: use a fraction in [0, 1)")
        self.cfg, self.rank, self.world = cfg, rank, world
        self.aus = resolve_aus(cfg)
        if trainset is None and (cfg.validation > 0 or cfg.labelled_subjects):  # the trainer passes its own: one
            trainset = TrainingSet.read(cfg)  # read of the index a run
        val_keys = frozenset(trainset.validation.keys) if trainset is not None else frozenset()
        # Images whose labels are hidden (label drop in image mode, subjects without labels) stream as unlabelled.
        hidden = trainset.hidden_images if trainset is not None else frozenset()
        scarce = hidden if cfg.labelled_subjects else frozenset()
        image_drop = (cfg.label_drop > 0 and cfg.label_drop_mode == "image") or bool(scarce)
        dropped = (lambda k: k in hidden) if trainset is not None else (  # noqa: E731
            lambda k: is_hidden(k, cfg.label_drop, cfg.split_seed))

        def keep_labelled(s: dict) -> bool:
            return s["__key__"] not in val_keys and not (image_drop and dropped(s["__key__"]))

        self.sources: dict[str, IterableDataset] = {
            "labelled": self._source("labelled", cfg.labelled, cfg.m1,
                                     keep_labelled if image_drop or val_keys else None, scarce)}
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
                keep = lambda s: s["__url__"] not in labelled_urls or dropped(s["__key__"])  # noqa: E731
            unl_dirs = list(cfg.unlabelled.dirs if cfg.unlabelled else ()) + (
                [f"label-dropped images of {d}" for d in cfg.labelled.dirs] if image_drop else [])
            self.sources["unlabelled"] = _SourceDataset(
                _SlotShards(unl_lists, unl_weights, cfg.seed, rank, world, "unlabelled"),
                cfg.m2, cfg, self.aus, "unlabelled", keep, unl_dirs)
        if cfg.expression is not None:
            self.sources["expression"] = self._source("expression", cfg.expression, cfg.m_expr, None)
        if val_keys:
            self.sources["validation"] = _ValidationDataset(self._read_validation(val_keys), cfg, self.aus, rank)

    def _read_validation(self, keys: frozenset[str]) -> list[dict]:
        """This rank's validation samples' bytes, read from the labelled training shards once. Ranks draw from
        disjoint parts of the set (every world-th key in sorted order), as one process drawing the global batch
        would, unless the set has fewer images than there are ranks (then every rank draws from all of it)."""
        if len(keys) >= self.world:
            keys = frozenset(sorted(keys)[self.rank::self.world])
        samples, bad = [], SkipCounter()
        for urls in self._lists(self.cfg.labelled)[0]:
            for url in urls:
                samples += [s for s in tar_samples(url, bad) if s["__key__"] in keys]
        if not samples:
            raise ValueError("the AU validation set is empty: no reserved key was found in the labelled shards")
        return samples

    def _lists(self, src: SourceConfig) -> tuple[list[list[str]], list[float]]:
        lists = [shard_urls(d, src.folds, src.held_out, src.exclude_split) for d in src.dirs]
        weights = list(src.weights) if src.weights is not None else [1.0] * len(src.dirs)
        if len(weights) != len(src.dirs):
            raise ValueError(f"{len(weights)} weights for {len(src.dirs)} shard directories")
        for d, urls in zip(src.dirs, lists):
            if not urls:
                raise ValueError(f"{d}: no shards in folds {src.folds}" if src.folds is not None else
                                 f"{d}: no shards outside its {src.exclude_split!r} split (kept for evaluation)"
                                 if src.exclude_split else
                                 f"{d}: every shard is in fold {src.held_out}, the evaluation fold (held out of "
                                 f"training so that its images never leak into it)")
        return lists, weights

    def _source(self, kind: str, src: SourceConfig, batch: int, keep, unlabelled_keys=frozenset()) -> _SourceDataset:
        lists, weights = self._lists(src)
        return _SourceDataset(_SlotShards(lists, weights, self.cfg.seed, self.rank, self.world, kind),
                              batch, self.cfg, self.aus, kind, keep, list(src.dirs), unlabelled_keys)

    def _next(self, kind: str, it: Iterator[dict]) -> dict:
        try:
            return next(it)
        except RuntimeError as e:
            if not str(e).startswith("DataLoader timed out"):
                raise
            what = getattr(self.sources[kind], "what", f"{kind} source")
            raise SourceError(f"{what}: its DataLoader workers delivered no batch for "
                              f"{2 * self.cfg.source_timeout:g} s (2 x data.source_timeout): a worker is stuck, e.g. "
                              f"reading from a file system that does not answer") from None

    def set_epoch(self, epoch: int) -> None:
        for s in self.sources.values():
            if isinstance(s, _ValidationDataset):
                s.epoch = epoch
            else:
                s.shards.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        # Workers check the timeout themselves; the loader's own timeout catches a worker stuck in a system call.
        stuck = 2 * self.cfg.source_timeout if self.cfg.workers else 0
        if self.cfg.flow:
            import cv2

            # The flow warp runs in every worker: one OpenCV thread each, not one per core each. Set here, before
            # the workers fork: setNumThreads in a forked child can hang on a lock of the parent's thread pool.
            cv2.setNumThreads(1)
        loaders = {k: iter(DataLoader(s, batch_size=None, num_workers=self.cfg.workers, timeout=stuck,
                                      persistent_workers=False, prefetch_factor=4 if self.cfg.workers else None))
                   for k, s in self.sources.items()}
        while True:
            parts = {k: self._next(k, it) for k, it in loaders.items()}
            lab, unl, ex, val = (parts.get(k) for k in ("labelled", "unlabelled", "expression", "validation"))
            unl = unl or {}
            yield Batch(images=lab["images"], targets=lab["targets"], mask=lab["mask"], keys=lab["keys"],
                        intensity=lab["intensity"], intensity_mask=lab["intensity_mask"],
                        unlabelled=unl.get("images"), unlabelled_keys=unl.get("keys", []),
                        expr_images=ex["images"] if ex else None, expr_labels=ex["labels"] if ex else None,
                        expr_keys=ex["keys"] if ex else [],
                        skipped=sum(p["skipped"] for p in parts.values()),
                        val_images=val["images"] if val else None, val_targets=val["targets"] if val else None,
                        val_mask=val["mask"] if val else None, val_keys=val["keys"] if val else [],
                        landmarks=lab["landmarks"], landmarks_valid=lab["landmarks_valid"], flow=lab.get("flow"),
                        flow_valid=lab.get("flow_valid"), unlabelled_landmarks=unl.get("landmarks"),
                        unlabelled_landmarks_valid=unl.get("landmarks_valid"), unlabelled_flow=unl.get("flow"),
                        unlabelled_flow_valid=unl.get("flow_valid"))
