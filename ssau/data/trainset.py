"""The facts of one run's labelled training set, read once from the shard indexes (no pixels).

``TrainingSet.read(cfg)`` scans the labelled directories' index.parquet once (training folds only) and holds what
the trainer, the stream and the method's ``setup`` need: the AU list, every training image's key, subject, fold,
labels and known-mask, which labels label drop hides, the AU validation set, the label bank and the label-drop
report. Before, each of these re-read the index.

Label drop (the adversarial paper's T1/T2 split): ``label_drop=p`` hides the labels of a fraction p of the
labelled training images - they stream as unlabelled - or, with ``label_drop_mode='au'``, hides single AU labels.
Hiding is a hash of (split_seed, key[, AU]), the same on every rank, worker, epoch, initialisation seed and method.

Label-scarce regime (``labelled_subjects``): K training subjects keep their labels (a fraction f: K = max(1,
round(f n))), chosen by ``split_seed``: within each training fold subjects are ordered by hash(split_seed, directory,
subject) (the directory's place in the list) and taken in turn from fold to fold (starting at a fold the seed
picks), so the K spread over the folds. Every image of the other subjects is hidden like a label-dropped one (it
streams as unlabelled); its label values are replaced by "unknown" as the index rows are read (the column is read,
its values never kept or used) and never reach a tensor, a count or a stream: the labelled stream stops with a
``SourceError`` should one of their images reach it, and the unlabelled stream drops every label field unread.

AU validation set (MAL, Li & Shan Sec. 4.1.4): ``validation=f`` reserves, per (directory, subject), the
``max(1, round(f * n))`` images with the lowest hash(split_seed, key) among its n labelled training images with at
least one label left known. Images without a subject (EmotioNet) form one group per directory.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from ssau.aus import au_name
from ssau.data.sources import (StreamConfig, check_offsets, hidden_aus, index_batches, index_names, is_hidden,
                               resolve_aus, unit_hash)
from ssau.errors import ConfigError
from ssau.remote import join


@dataclass
class ValidationSplit:
    keys: list[str]
    targets: torch.Tensor  # [K, J]
    mask: torch.Tensor  # [K, J]
    subjects: int
    spans: dict[str, tuple[str, int, int]] | None = None  # key -> (shard, tar_offset, tar_size); None: no spans


@dataclass
class TrainingSet:
    aus: tuple[int, ...]
    dirs: list[str]  # the directory of each image
    keys: list[str]
    subjects: list[str]
    folds: list[int]
    targets: torch.Tensor  # [N, J] 0/1 (unknown as 0)
    known: torch.Tensor  # [N, J] 1 where the index holds a label
    visible: torch.Tensor  # [N, J] 1 where the label is known and label drop does not hide it
    hidden_images: frozenset[str]  # image mode: keys whose labels are hidden (they stream as unlabelled)
    validation: ValidationSplit
    label_drop_mode: str = "image"
    label_drop: float = 0.0
    labelled_subjects: tuple[tuple[str, str], ...] = ()  # (directory, subject) keeping labels; () = all subjects
    unlabelled_subjects: int = 0  # training subjects whose images stream as unlabelled (labelled_subjects set)
    unlabelled_subject_images: int = 0  # their images
    locations: list[tuple[str, int, int]] | None = None  # per image: (shard, tar_offset, tar_size), from the index

    @classmethod
    def read(cls, cfg: StreamConfig) -> "TrainingSet":
        aus = resolve_aus(cfg)
        cols = [au_name(a) for a in aus]
        keep = _labelled_subjects(cfg)  # None: every subject keeps its labels
        dirs, keys, subjects, folds, values, scarce, locations = [], [], [], [], [], set(), []
        for d in cfg.labelled.dirs:
            names = index_names(d)
            present = [c for c in cols if c in names]
            spans = [c for c in ("shard", "tar_offset", "tar_size") if c in names]
            sizes: dict[str, int | None] = {}
            shard_urls: dict[str, str] = {}  # one string per shard, not one per image
            if len(spans) < 3:
                locations = None  # an index written before issue 13: no byte spans
            for b in index_batches(d, ["key", "fold", "subject"] + present + spans):
                t = b.to_pydict()
                if len(spans) == 3:  # offsets that leave their shard: one line now, not a bad read later
                    check_offsets(d, t["shard"], t["tar_offset"], t["tar_size"], sizes)
                for i, key in enumerate(t["key"]):
                    if cfg.labelled.folds is not None and t["fold"][i] not in cfg.labelled.folds:
                        continue
                    subject = t["subject"][i] or ""
                    dirs.append(str(d))
                    keys.append(key)
                    subjects.append(subject)
                    folds.append(int(t["fold"][i]))
                    if locations is not None:
                        sh = t["shard"][i]
                        locations.append((shard_urls.setdefault(sh, join(d, sh)), t["tar_offset"][i], t["tar_size"][i]))
                    if keep is None or (str(d), subject) in keep:
                        values.append([t[c][i] if c in t else -1 for c in cols])
                    else:  # an unlabelled subject: its labels are dropped here, unread by anything after
                        values.append([-1] * len(cols))
                        scarce.add(key)
        v = torch.tensor(values, dtype=torch.float32).reshape(-1, len(aus))
        known = (v != -1).float()
        hidden_img = frozenset(k for k in keys if cfg.label_drop_mode == "image"
                               and is_hidden(k, cfg.label_drop, cfg.split_seed)) | scarce
        if cfg.label_drop_mode == "au" and cfg.label_drop > 0:
            hid = torch.tensor([hidden_aus(k, aus, cfg.label_drop, cfg.split_seed) for k in keys],
                               dtype=torch.bool).reshape(-1, len(aus))
        else:
            hid = torch.zeros(len(keys), len(aus), dtype=torch.bool)
        hid |= torch.tensor([k in hidden_img for k in keys], dtype=torch.bool).view(-1, 1)
        visible = known * (~hid).float()
        ts = cls(aus, dirs, keys, subjects, folds, v.clamp_min(0), known, visible, hidden_img,
                 ValidationSplit([], torch.zeros(0, len(aus)), torch.zeros(0, len(aus)), 0),
                 cfg.label_drop_mode, cfg.label_drop, tuple(sorted(keep or ())),
                 len({(d, s) for d, s in zip(dirs, subjects)} - (keep or set())) if keep is not None else 0,
                 len(scarce), locations)
        ts.validation = ts._validation(cfg.validation, cfg.split_seed)
        return ts

    def _validation(self, fraction: float, seed: int) -> ValidationSplit:
        J = len(self.aus)
        if fraction <= 0:
            return ValidationSplit([], torch.zeros(0, J), torch.zeros(0, J), 0)
        groups: dict[tuple[str, str], list] = defaultdict(list)
        for i, key in enumerate(self.keys):
            if key not in self.hidden_images and bool(self.visible[i].any()):
                groups[(self.dirs[i], self.subjects[i])].append((unit_hash("validation", seed, key), i))
        chosen = []
        for rows in groups.values():
            rows.sort()
            chosen += [i for _, i in rows[:max(1, round(fraction * len(rows)))]]
        idx = torch.tensor(chosen, dtype=torch.long)
        return ValidationSplit([self.keys[i] for i in chosen], self.targets[idx].reshape(-1, J),
                               self.visible[idx].reshape(-1, J), len(groups),
                               {self.keys[i]: self.locations[i] for i in chosen} if self.locations else None)

    def label_bank(self) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """AU vectors of the labelled training samples, their masks and keys: never the evaluation fold, never
        hidden labels (image mode drops the sample, AU mode masks the AU), never the AU validation set."""
        exclude = frozenset(self.validation.keys) | self.hidden_images
        rows = [i for i, k in enumerate(self.keys) if k not in exclude]
        idx = torch.tensor(rows, dtype=torch.long)
        J = len(self.aus)
        return self.targets[idx].reshape(-1, J), self.visible[idx].reshape(-1, J), [self.keys[i] for i in rows]

    def drop_report(self) -> dict:
        """The fraction label drop actually hid, over the labelled training folds' images of subjects that keep
        their labels (``hidden_images`` counts the images of subjects without labels too; ``unlabelled_subject_images``
        those alone)."""
        images, labels, scarce = len(self.keys), int(self.known.sum()), self.unlabelled_subject_images
        hidden_labels = int((self.known - self.visible).sum())  # a subject without labels has none known
        hidden_images = len(self.hidden_images)
        return {"mode": self.label_drop_mode, "requested": self.label_drop, "images": images,
                "labelled_subjects": len(self.labelled_subjects), "unlabelled_subjects": self.unlabelled_subjects,
                "unlabelled_subject_images": scarce,
                "hidden_images": hidden_images, "labels": labels, "hidden_labels": hidden_labels,
                "fraction": ((hidden_images - scarce) / max(images - scarce, 1)) if self.label_drop_mode == "image"
                else hidden_labels / max(labels, 1)}


def _labelled_subjects(cfg: StreamConfig) -> set[tuple[str, str]] | None:
    """The (directory, subject) pairs that keep their labels under ``cfg.labelled_subjects`` (None: all). Reads only
    the key, fold and subject columns. Balanced over folds: each fold's subjects in hash order, taken fold by fold."""
    want = cfg.labelled_subjects
    if not want:
        return None
    by_fold: dict[int, set[tuple[str, str]]] = defaultdict(set)
    position = {str(d): i for i, d in enumerate(cfg.labelled.dirs)}  # the hash names a directory by its place in
    for d in cfg.labelled.dirs:  # data.labelled, not its path: moved or copied shards keep their split
        for b in index_batches(d, ["key", "fold", "subject"]):
            t = b.to_pydict()
            for fold, subject in zip(t["fold"], t["subject"]):
                if cfg.labelled.folds is None or fold in cfg.labelled.folds:
                    by_fold[int(fold)].add((str(d), subject or ""))
    total = sum(map(len, by_fold.values()))
    k = int(want) if want >= 1 else max(1, round(want * total))
    if k > total:
        raise ConfigError(f"data.labelled_subjects={want:g}: the training folds hold only {total} subjects")
    order = lambda ds: unit_hash("labelled-subject", cfg.split_seed, position[ds[0]], ds[1])  # noqa: E731
    queues = [sorted(by_fold[f], key=order, reverse=True) for f in sorted(by_fold)]
    first = int(unit_hash("labelled-fold", cfg.split_seed) * len(queues))  # K < folds: the seed picks the folds too
    queues = queues[first:] + queues[:first]
    chosen: set[tuple[str, str]] = set()
    while len(chosen) < k:
        for q in queues:
            if q and len(chosen) < k:
                chosen.add(q.pop())
    return chosen


def label_drop_report(cfg: StreamConfig) -> dict:
    return TrainingSet.read(cfg).drop_report()


def validation_split(cfg: StreamConfig) -> ValidationSplit:
    return TrainingSet.read(cfg).validation
