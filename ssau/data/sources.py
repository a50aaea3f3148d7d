"""What a training run reads, decided from the shard directories' dataset.json and parquet index alone: the
source configs, shard lists, the AU list, label drop and the AU validation set. No pixels are read here.

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
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pyarrow.parquet as pq
import torch

from ssau.aus import au_name

if TYPE_CHECKING:
    from ssau.config import Config


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
    source_timeout: float = 600.0  # seconds a reader may find no usable sample before the run stops
    flow: bool = False  # decode each sample's flow.npy into Batch.flow (costs a warp per image)


# ---------------------------------------------------------------------------------------------------- shard lists
def read_dataset(d: str | Path) -> dict:
    """dataset.json, checked for what the streams rely on (ConfigError, one line, otherwise): shard names that
    stay inside the directory, integer folds and sample counts, an AU list."""
    from ssau.config import ConfigError

    path = Path(d) / "dataset.json"
    if not path.is_file():
        raise ConfigError(f"{d} is not a shard directory (no dataset.json); run `ssau shard` first")
    try:
        doc = json.loads(path.read_text())
        ok = (isinstance(doc, dict) and isinstance(doc.get("aus"), list) and isinstance(doc.get("shards"), list)
              and isinstance(doc.setdefault("corpus", ""), str) and all(isinstance(a, str) for a in doc["aus"]))
        for sh in doc["shards"] if ok else ():
            name = sh.get("name") if isinstance(sh, dict) else None
            ok = ok and (isinstance(name, str) and Path(name).name == name and name not in ("", ".", "..")
                         and type(sh.get("fold")) is int and type(sh.get("samples")) is int and sh["samples"] >= 0)
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"{path}: unreadable ({type(e).__name__}: {str(e)[:100]})") from None
    if not ok:
        raise ConfigError(f"{path}: damaged (needs aus and shards of name, fold and samples; shard names "
                          f"without folders)")
    return doc


def _index_names(d: str | Path) -> list[str]:
    """The columns of a directory's index.parquet; a damaged index is one ConfigError line."""
    return _index_read(d, lambda path: pq.read_schema(path).names)


def _index_batches(d: str | Path, columns: list[str]) -> Iterator:
    """Record batches of a directory's index.parquet (the columns it has of ``columns``)."""
    from ssau.config import ConfigError

    names = _index_names(d)
    if not {"key", "fold", "subject"} <= set(names):
        raise ConfigError(f"{Path(d) / 'index.parquet'}: damaged (no key, fold or subject column)")
    batches = _index_read(d, lambda path: pq.ParquetFile(path).iter_batches(columns=[c for c in columns if c in names]))
    while (batch := _index_read(d, lambda _: next(batches, None))) is not None:  # streamed: memory stays flat
        yield batch


def _index_read(d: str | Path, read):
    import pyarrow as pa

    from ssau.config import ConfigError

    path = Path(d) / "index.parquet"
    try:
        return read(path)
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(f"{path}: unreadable or damaged ({str(e).splitlines()[0][:120]})") from None


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
        cols = ["key", "fold"] + [au_name(a) for a in aus if au_name(a) in _index_names(d)]
        for batch in _index_batches(d, cols):
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
        names = _index_names(d)
        present = [c for c in cols if c in names]
        for b in _index_batches(d, ["key", "fold", "subject"] + present):
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


# ---------------------------------------------------------------------------------------------------- from a run config
def stream_config(cfg: "Config", aus: tuple[int, ...]) -> StreamConfig:
    d = cfg.data
    train_folds = None if d.fold == 0 else tuple(k for k in range(1, d.folds + 1) if k != d.fold)
    src = lambda dirs, w, folds=None: SourceConfig(tuple(dirs), tuple(w) if w else None, folds)  # noqa: E731
    return StreamConfig(labelled=src(d.labelled, d.labelled_weights, train_folds),
                        unlabelled=src(d.unlabelled, d.unlabelled_weights) if d.unlabelled else None,
                        expression=src(d.expression, None) if d.expression else None, aus=aus, m1=d.m1, m2=d.m2,
                        m_expr=d.m_expr, image_size=d.image_size, label_drop=d.label_drop,
                        label_drop_mode=d.label_drop_mode, seed=cfg.train.seed, workers=d.workers,
                        shuffle_buffer=d.shuffle_buffer, validation=d.validation, val_batch=d.val_batch,
                        source_timeout=d.source_timeout, flow=d.flow)


def label_bank(s: StreamConfig, exclude: frozenset[str] = frozenset()) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """AU vectors of the labelled training samples, their masks and keys: never the evaluation fold, never hidden
    labels (image mode drops the sample, AU mode masks the AU), never the keys in ``exclude`` (the AU validation
    set)."""
    rows = [(key, t, m) for _, key, _, t, m in labelled_rows(s) if key not in exclude]
    J = len(s.aus)
    return (torch.tensor([r[1] for r in rows]).reshape(-1, J), torch.tensor([r[2] for r in rows]).reshape(-1, J),
            [r[0] for r in rows])
