"""One training source read by one DataLoader: its (rank, worker) slot's shards, resampled and shuffled, decoded
into fixed-size batches (``ssau.data.stream`` puts the sources of a step together).

Position: a slot's stream is a function of (seed, epoch, rank, worker role) and of the shards' bytes alone. It runs
in segments of ``SEGMENT`` samples; each segment draws its shards, shuffles and seeds augmentation with generators of
its own (a segment's shuffle buffer starts empty), and each sample's augmentation draws from a generator seeded by
one 64-bit draw, taken whether or not the sample decodes. So "n samples pulled" fixes the slot's whole state, and a
resumed run replays at most one segment (``SlotPosition``): tar members are read again but nothing is decoded, and
the next batch is the one the interrupted run would have drawn. The replay's cost stays bounded however long the
run (about 4,000 tar members per worker).
Every batch carries its worker role and the slot's running sample count (``consumed``) for that purpose; DataLoader
hands batches out round robin over its workers, so a resumed loader whose worker w plays role (w + rotate) mod W
continues the interrupted one's order exactly.
"""

from __future__ import annotations

import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ssau.data.decode import TrainSample, au_labels, decode_sample
from ssau.data.device_decode import encode
from ssau.data.sources import StreamConfig, hidden_aus
from ssau.data.tario import SkipCounter, tar_samples
from ssau.errors import DecodeError, SourceError
from ssau.remote import bytes_read


SEGMENT = 4096  # samples per segment of a slot's stream: what a resume replays at most, per worker


@dataclass
class SlotPosition:
    """Where a resumed source starts: its loader's workers shifted by ``rotate`` and, per worker role, the number
    of samples that role had pulled when the checkpoint was written (replayed without decoding)."""
    rotate: int = 0
    consumed: dict[int, int] = field(default_factory=dict)


def worker_role(rotate: int = 0) -> tuple[int, int]:
    """(role, workers) of the calling DataLoader worker: its id shifted by ``rotate`` (0 of 1 in the main process)."""
    info = get_worker_info()
    wid, nw = (info.id, info.num_workers) if info else (0, 1)
    return (wid + rotate) % nw, nw


class SlotShards:
    """Resampled shard URLs for one (rank, worker) slot: this slot's part of each directory, mixed by weight."""

    def __init__(self, lists: list[list[str]], weights: list[float], seed: int, rank: int, world: int, salt: str):
        self.lists, self.weights, self.seed, self.rank, self.world, self.salt = lists, weights, seed, rank, world, salt
        self.epoch = 0
        self.shared = False  # set in a worker whose own shards hold nothing usable: it reads every shard instead
        self.position = SlotPosition()  # where a resumed run starts (set before the loader starts its workers)

    def parts(self, warn: bool = False) -> list[list[str]]:
        """This slot's shards of each directory (in the calling DataLoader worker, by its role)."""
        role, nw = worker_role(self.position.rotate)
        slots, slot = self.world * nw, self.rank * nw + role
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
        role, nw = worker_role(self.position.rotate)
        return f"rank {self.rank} of {self.world}, worker {role} of {nw}"

    def draws(self, segment: str) -> Iterator[dict]:
        """Shards drawn with replacement for one segment of the slot's stream (``segment`` seeds the draws)."""
        parts = self.parts(warn=True)
        rng = random.Random(f"shards:{segment}")
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


class SourceDataset(IterableDataset):
    """Batches of one training source, built inside each DataLoader worker."""

    def __init__(self, shards: SlotShards, batch: int, cfg: StreamConfig, aus: tuple[int, ...], kind: str,
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
                           labels=self.kind != "unlabelled", pixels=self.cfg.decode != "device")
        if self.kind == "labelled":
            hidden = (hidden_aus(s["__key__"], self.aus, self.cfg.label_drop, self.cfg.split_seed)
                      if self.cfg.label_drop_mode == "au" else None)
            return ex, au_labels(ex.meta, self.aus, hidden), None
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

    def _samples(self, bad: SkipCounter, clock: _Clock, segment: str) -> Iterator[dict]:
        for u in self.shards.draws(segment):
            clock.check()  # a source whose shards all fail reads them fast: check once per shard, not per sample
            for s in tar_samples(u["url"], bad):
                if self.keep is None or self.keep(s):
                    yield s

    def _segments(self, role: int, bad: SkipCounter, clock: _Clock) -> Iterator[tuple[dict, random.Random]]:
        """(sample, its augmentation generator) for ever, from where the slot's position says: segments of
        ``SEGMENT`` samples, each drawn by generators of its own (shard draws, shuffle, augmentation seeds), so a
        resumed run replays at most one segment's samples (read again, not decoded)."""
        consumed = self.shards.position.consumed.get(role, 0)
        k, skip = divmod(consumed, SEGMENT)
        while True:
            slot = f"{self.shards.salt}:{self.cfg.seed}:{self.shards.epoch}:{self.shards.rank}:{role}:{k}"
            order, seeds = random.Random(f"shuffle:{slot}"), random.Random(f"aug:{slot}")
            samples = _shuffle(self.cfg.shuffle_buffer, order)(self._samples(bad, clock, slot))  # buffers hold bytes
            for _ in range(skip):
                next(samples)
                seeds.getrandbits(64)
                clock.ok()
            for _ in range(SEGMENT - skip):
                yield next(samples), random.Random(seeds.getrandbits(64))  # one draw per sample, decodable or not
            k, skip = k + 1, 0

    def __iter__(self) -> Iterator[dict]:
        role, _ = worker_role(self.shards.position.rotate)
        self._probe()
        bad = SkipCounter()
        clock = _Clock(self.cfg.source_timeout, self.what, bad)
        consumed = self.shards.position.consumed.get(role, 0)
        examples, labels, keys, exprs = [], [], [], []
        reported, read = bad.n, bytes_read()
        for s, rng in self._segments(role, bad, clock):
            consumed += 1
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
                out = {"keys": keys, "skipped": bad.n - reported, "role": role, "consumed": consumed,
                       "read_bytes": bytes_read() - read}
                if self.cfg.decode == "device":  # the pixels are made on the device (ssau.data.device_decode)
                    out["images"], out["encoded"] = None, encode(examples, keys, self.cfg.image_size)
                else:
                    out["images"] = torch.stack([x.image for x in examples])
                if labels:
                    out["targets"], out["mask"], out["intensity"], out["intensity_mask"] = (
                        torch.from_numpy(np.array(col, dtype=np.float32)) for col in zip(*labels))
                if exprs:
                    out["labels"] = torch.tensor(exprs, dtype=torch.int64)
                if self.kind != "expression":
                    out.update(geometry(examples))
                reported, read = bad.n, bytes_read()
                yield out
                clock.ok()  # the consumer's pace is not the source's fault
                examples, labels, keys, exprs = [], [], [], []


def geometry(examples: list[TrainSample]) -> dict[str, torch.Tensor]:
    out = {"landmarks": torch.from_numpy(np.stack([x.landmarks for x in examples])),
           "landmarks_valid": torch.from_numpy(np.array([x.landmarks_valid for x in examples]))}
    if examples[0].flow is not None:
        out["flow"] = torch.from_numpy(np.stack([x.flow for x in examples]))
        out["flow_valid"] = torch.from_numpy(np.array([x.flow_valid for x in examples]))
    return out
