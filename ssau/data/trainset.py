"""The facts of one run's labelled training set, read once from the shard indexes (no pixels).

``TrainingSet.read(cfg)`` scans the labelled directories' index.parquet once (training folds only) and holds what
the trainer, the stream and the method's ``setup`` need: the AU list, every training image's key, subject, fold,
labels and known-mask, which labels label drop hides, the AU validation set, the label bank and the label-drop
report. Before, each of these re-read the index.

Label drop (the adversarial paper's T1/T2 split): ``label_drop=p`` hides the labels of a fraction p of the
labelled training images - they stream as unlabelled - or, with ``label_drop_mode='au'``, hides single AU labels.
Hiding is a hash of (split_seed, key[, AU]), the same on every rank, worker, epoch, initialisation seed and method.

AU validation set (MAL, Li & Shan Sec. 4.1.4): ``validation=f`` reserves, per (directory, subject), the
``max(1, round(f * n))`` images with the lowest hash(split_seed, key) among its n labelled training images with at
least one label left known. Images without a subject (EmotioNet) form one group per directory.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from ssau.aus import au_name
from ssau.data.sources import StreamConfig, hidden_aus, index_batches, index_names, is_hidden, resolve_aus, unit_hash


@dataclass
class ValidationSplit:
    keys: list[str]
    targets: torch.Tensor  # [K, J]
    mask: torch.Tensor  # [K, J]
    subjects: int


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

    @classmethod
    def read(cls, cfg: StreamConfig) -> "TrainingSet":
        aus = resolve_aus(cfg)
        cols = [au_name(a) for a in aus]
        dirs, keys, subjects, folds, values = [], [], [], [], []
        for d in cfg.labelled.dirs:
            present = [c for c in cols if c in index_names(d)]
            for b in index_batches(d, ["key", "fold", "subject"] + present):
                t = b.to_pydict()
                for i, key in enumerate(t["key"]):
                    if cfg.labelled.folds is not None and t["fold"][i] not in cfg.labelled.folds:
                        continue
                    dirs.append(str(d))
                    keys.append(key)
                    subjects.append(t["subject"][i] or "")
                    folds.append(int(t["fold"][i]))
                    values.append([t[c][i] if c in t else -1 for c in cols])
        v = torch.tensor(values, dtype=torch.float32).reshape(-1, len(aus))
        known = (v != -1).float()
        hidden_img = frozenset(k for k in keys if cfg.label_drop_mode == "image"
                               and is_hidden(k, cfg.label_drop, cfg.split_seed))
        if cfg.label_drop_mode == "au" and cfg.label_drop > 0:
            hid = torch.tensor([hidden_aus(k, aus, cfg.label_drop, cfg.split_seed) for k in keys],
                               dtype=torch.bool).reshape(-1, len(aus))
        else:
            hid = torch.tensor([k in hidden_img for k in keys], dtype=torch.bool).view(-1, 1).expand(-1, len(aus))
        visible = known * (~hid).float()
        ts = cls(aus, dirs, keys, subjects, folds, v.clamp_min(0), known, visible, hidden_img,
                 ValidationSplit([], torch.zeros(0, len(aus)), torch.zeros(0, len(aus)), 0),
                 cfg.label_drop_mode, cfg.label_drop)
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
                               self.visible[idx].reshape(-1, J), len(groups))

    def label_bank(self) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """AU vectors of the labelled training samples, their masks and keys: never the evaluation fold, never
        hidden labels (image mode drops the sample, AU mode masks the AU), never the AU validation set."""
        exclude = frozenset(self.validation.keys) | self.hidden_images
        rows = [i for i, k in enumerate(self.keys) if k not in exclude]
        idx = torch.tensor(rows, dtype=torch.long)
        J = len(self.aus)
        return self.targets[idx].reshape(-1, J), self.visible[idx].reshape(-1, J), [self.keys[i] for i in rows]

    def drop_report(self) -> dict:
        """The fraction actually hidden, over the labelled training folds."""
        images, labels = len(self.keys), int(self.known.sum())
        hidden_labels = int((self.known - self.visible).sum())
        hidden_images = len(self.hidden_images)
        return {"mode": self.label_drop_mode, "requested": self.label_drop, "images": images,
                "hidden_images": hidden_images, "labels": labels, "hidden_labels": hidden_labels,
                "fraction": (hidden_images / max(images, 1)) if self.label_drop_mode == "image"
                else hidden_labels / max(labels, 1)}


def label_drop_report(cfg: StreamConfig) -> dict:
    return TrainingSet.read(cfg).drop_report()


def validation_split(cfg: StreamConfig) -> ValidationSplit:
    return TrainingSet.read(cfg).validation
