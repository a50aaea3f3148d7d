"""Training streams: webdataset pipelines over the shards `ssau shard` wrote.

Training (``TrainStream``): per rank, every batch has a fixed composition - ``m1`` labelled samples, ``m2``
unlabelled ones and, when configured, ``m_expr`` expression samples - each source read by its own DataLoader.
A source is one or more shard directories mixed by weight. Shards are split across (rank, worker) slots so ranks
read disjoint shards, then resampled with replacement inside each slot, seeded by (seed, epoch, rank, worker):
training is counted in steps, never in epochs. The slots live in ``ssau.data.train_source``.

Position: ``state()`` is where the stream stands after the batches handed out so far (per source: the epoch, how
many batches, and how many samples each worker role pulled); ``restore`` makes a new stream continue from there,
batch for batch, as long as the world size and the worker count are those of the run that saved it. The trainer
keeps it in every checkpoint, so a resumed run draws what the interrupted one would have drawn next.

Damaged data: a sample that cannot be read (tar damage, undecodable image, malformed json or ``landmarks``, a
damaged ``flow.npy`` when flow is read) is skipped and counted (``Batch.skipped``). A training source that cannot
deliver stops the run with a ``SourceError`` naming it: at start each reader (rank x worker slot) goes through its
shards until one sample is usable and fails at once if none is; later, a reader that finds no usable sample for
``source_timeout`` seconds fails, and the main process gives up on workers that deliver no batch for twice that (a
worker stuck in I/O).

Geometry: the labelled and unlabelled parts carry each image's 68 landmarks in the coordinates of the augmented
image (``ssau.data.decode``: the template, flagged invalid, where a sample has none) and, with ``flow`` set, its
optical flow (zeros, flagged invalid, where a sample has none). The expression and validation parts carry none.

Decoding: with ``decode="device"`` (``data.decode``) the workers leave JPEG pixels undecoded: a part's image field is
None and ``Batch.encoded`` holds its files and augmentation draws, for ``ssau.data.device_decode`` to finish on the
training device. The validation part is decoded in the workers either way.

What the stream reads (source configs, label drop, the AU validation set) is decided in ``ssau.data.sources``;
evaluation reads through ``ssau.data.eval_stream``.
"""

from __future__ import annotations

import random
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from ssau.data.batch import Batch
from ssau.data.decode import au_targets, decode_eval
from ssau.data.sources import SourceConfig, StreamConfig, hidden_aus, is_hidden, resolve_aus, shard_urls
from ssau.data.tario import SkipCounter, samples_at, tar_samples
from ssau.data.train_source import SlotPosition, SlotShards, SourceDataset, worker_role
from ssau.data.trainset import TrainingSet
from ssau.dist.stop import ignore_stop_signals
from ssau.errors import DecodeError, SourceError


VAL_SEGMENT = 32  # validation batches per segment: what a resume regenerates at most, per worker


class _ValidationDataset(IterableDataset):
    """Batches of the AU validation set, from samples held in memory; shuffled passes seeded per rank/worker. The
    stream runs in segments of ``VAL_SEGMENT`` batches, each shuffled by a generator of its own and finding
    unreadable images anew, so a resumed worker regenerates (decodes) at most one segment's batches."""

    def __init__(self, samples: list[dict], cfg: StreamConfig, aus: tuple[int, ...], rank: int):
        self.samples, self.cfg, self.aus, self.rank = samples, cfg, aus, rank
        self.epoch = 0
        self.position = SlotPosition()

    def __iter__(self) -> Iterator[dict]:
        role, _ = worker_role(self.position.rotate)
        done = self.position.consumed.get(role, 0)
        k, skip = divmod(done, VAL_SEGMENT)
        counted: set[int] = set()  # unreadable images already counted (each segment finds them again)
        while True:
            for j, batch in zip(range(VAL_SEGMENT), self._batches(role, k)):
                new = batch.pop("bad") - counted
                counted |= new
                if j >= skip:
                    done += 1
                    yield batch | {"skipped": len(new), "role": role, "consumed": done}
            k, skip = k + 1, 0

    def _batches(self, role: int, segment: int) -> Iterator[dict]:
        rng = random.Random(f"validation:{self.cfg.seed}:{self.epoch}:{self.rank}:{role}:{segment}")
        order: list[int] = []
        bad: set[int] = set()  # unreadable samples of this segment, skipped
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
                   "keys": keys, "bad": set(bad)}


def _as_is(part: dict) -> dict:
    """A source's batch part as the worker built it (tensors already): DataLoader's default, ``default_convert``,
    walked every key and list of it again, a few microseconds a sample."""
    return part


class TrainStream:
    """Infinite iterator of Batch for one rank; ``set_epoch`` reseeds (call it when the run resumes)."""

    def __init__(self, cfg: StreamConfig, rank: int = 0, world: int = 1, trainset: TrainingSet | None = None,
                 pin_memory: bool = False):
        """``pin_memory``: batches in page-locked memory (a run on CUDA), so that copying them to the device is
        asynchronous and the step does not wait for it."""
        self.pin_memory = pin_memory
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
            self.sources["unlabelled"] = SourceDataset(
                SlotShards(unl_lists, unl_weights, cfg.seed, rank, world, "unlabelled"),
                cfg.m2, cfg, self.aus, "unlabelled", keep, unl_dirs)
        if cfg.expression is not None:
            self.sources["expression"] = self._source("expression", cfg.expression, cfg.m_expr, None)
        if val_keys:
            self.sources["validation"] = _ValidationDataset(self._read_validation(val_keys, trainset.validation.spans),
                                                            cfg, self.aus, rank)
        self.set_epoch(0)

    def _read_validation(self, keys: frozenset[str], where: dict | None) -> list[dict]:
        """This rank's validation samples' bytes, read from the labelled training shards once. Ranks draw from
        disjoint parts of the set (every world-th key in sorted order), as one process drawing the global batch
        would, unless the set has fewer images than there are ranks (then every rank draws from all of it)."""
        if len(keys) >= self.world:
            keys = frozenset(sorted(keys)[self.rank::self.world])
        samples, bad = [], SkipCounter()
        order = {url: i for i, url in enumerate(u for urls in self._lists(self.cfg.labelled)[0] for u in urls)}
        spans = [where[k] for k in keys] if where is not None else None  # (shard, offset, size) from the index
        if spans is not None:  # the index says where each sample lies: read those bytes alone (a range request each
            spans = sorted((s for s in spans if s[0] in order), key=lambda s: (order[s[0]], s[1]))  # remotely)
            samples = list(samples_at(spans, keys, bad))  # in the order a pass over the shards finds them
        else:  # an index written before issue 13 has no byte spans: a pass over the shards
            for url in order:
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

    def _source(self, kind: str, src: SourceConfig, batch: int, keep, unlabelled_keys=frozenset()) -> SourceDataset:
        lists, weights = self._lists(src)
        return SourceDataset(SlotShards(lists, weights, self.cfg.seed, self.rank, self.world, kind),
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

    def _slot(self, kind: str):
        s = self.sources[kind]
        return s if isinstance(s, _ValidationDataset) else s.shards

    def set_epoch(self, epoch: int) -> None:
        for kind in self.sources:
            self._slot(kind).epoch = epoch
            self._slot(kind).position = SlotPosition()
        self._position = {k: {"epoch": epoch, "batches": 0, "consumed": {}} for k in self.sources}

    def state(self) -> dict:
        """Where the stream stands after the batches handed out so far (plain containers, for a checkpoint)."""
        return {"world": self.world, "workers": self.cfg.workers,
                "sources": {k: {"epoch": p["epoch"], "batches": p["batches"],
                                "consumed": [[r, c] for r, c in sorted(p["consumed"].items())]}
                            for k, p in self._position.items()}}

    def restore(self, state: dict) -> str | None:
        """Continue from ``state()`` of an earlier stream; None, or why it cannot (then the stream is unchanged)."""
        if state.get("world") != self.world or state.get("workers") != self.cfg.workers:
            return (f"the checkpoint's stream ran on {state.get('world')} ranks x {state.get('workers')} workers, "
                    f"this run on {self.world} x {self.cfg.workers}")
        if set(state.get("sources", {})) != set(self.sources):
            return f"the checkpoint's stream read {sorted(state.get('sources', {}))}, this one {sorted(self.sources)}"
        workers = max(self.cfg.workers, 1)
        for kind, p in state["sources"].items():
            consumed = {int(r): int(c) for r, c in p["consumed"]}
            if int(p["batches"]) < 0 or any(r < 0 or c < 0 for r, c in consumed.items()):
                raise ValueError(f"a negative position in the stream state of {kind}")
            self._slot(kind).epoch = int(p["epoch"])
            self._slot(kind).position = SlotPosition(int(p["batches"]) % workers, consumed)
            self._position[kind] = {"epoch": int(p["epoch"]), "batches": int(p["batches"]), "consumed": consumed}
        return None

    def __iter__(self) -> Iterator[Batch]:
        # Workers check the timeout themselves; the loader's own timeout catches a worker stuck in a system call.
        stuck = 2 * self.cfg.source_timeout if self.cfg.workers else 0
        if self.cfg.flow:
            import cv2

            # The flow warp runs in every worker: one OpenCV thread each, not one per core each. Set here, before
            # the workers fork: setNumThreads in a forked child can hang on a lock of the parent's thread pool.
            cv2.setNumThreads(1)
        # Each loader seeds its workers from a generator of its own: starting one draws from the global CPU generator
        # otherwise, at the first step of a fresh run but mid-run after a resume (dropout, noise, bank draws differ).
        loaders = {k: iter(DataLoader(s, batch_size=None, num_workers=self.cfg.workers, timeout=stuck,
                                      persistent_workers=False, prefetch_factor=4 if self.cfg.workers else None,
                                      worker_init_fn=ignore_stop_signals if self.cfg.workers else None,
                                      generator=torch.Generator(), pin_memory=self.pin_memory, collate_fn=_as_is))
                   for k, s in self.sources.items()}
        while True:
            parts = {k: self._next(k, it) for k, it in loaders.items()}
            for k, part in parts.items():
                p = self._position[k]
                p["batches"] += 1
                p["consumed"][part["role"]] = part["consumed"]
            lab, unl, ex, val = (parts.get(k) for k in ("labelled", "unlabelled", "expression", "validation"))
            unl = unl or {}
            yield Batch(images=lab["images"], targets=lab["targets"], mask=lab["mask"], keys=lab["keys"],
                        intensity=lab["intensity"], intensity_mask=lab["intensity_mask"],
                        unlabelled=unl.get("images"), unlabelled_keys=unl.get("keys", []),
                        expr_images=ex["images"] if ex else None, expr_labels=ex["labels"] if ex else None,
                        expr_keys=ex["keys"] if ex else [],
                        skipped=sum(p["skipped"] for p in parts.values()),
                        read_bytes=sum(p.get("read_bytes", 0) for p in parts.values()),
                        val_images=val["images"] if val else None, val_targets=val["targets"] if val else None,
                        val_mask=val["mask"] if val else None, val_keys=val["keys"] if val else [],
                        landmarks=lab["landmarks"], landmarks_valid=lab["landmarks_valid"], flow=lab.get("flow"),
                        flow_valid=lab.get("flow_valid"), unlabelled_landmarks=unl.get("landmarks"),
                        unlabelled_landmarks_valid=unl.get("landmarks_valid"), unlabelled_flow=unl.get("flow"),
                        unlabelled_flow_valid=unl.get("flow_valid"),
                        encoded={k: p["encoded"] for k, p in (("images", lab), ("unlabelled", unl), ("expr_images", ex))
                                 if p and p.get("encoded") is not None})
