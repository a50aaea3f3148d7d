"""What a training run reads, decided from the shard directories' dataset.json and parquet index alone: the
source configs, shard lists, the AU list, label drop and the AU validation set. No pixels are read here.

Label drop and the AU validation set are decided by hashes defined here and applied once per run by
``ssau.data.trainset.TrainingSet`` (the training-set facts). The validation images are excluded from the labelled
training source and stream instead as ``val_batch`` images per step, read once into memory as encoded bytes when
the stream starts (the fraction is small) and decoded without augmentation.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq

from ssau.config import Config
from ssau.errors import ConfigError, InputError
from ssau.readfile import is_regular, read_json
from ssau.remote import is_remote, join, meta_dir, public, size_of


@dataclass(frozen=True)
class SourceConfig:
    """Shard directories of one source, their mixing weights and the folds read from them (None = all)."""

    dirs: tuple[str, ...]
    weights: tuple[float, ...] | None = None
    folds: tuple[int, ...] | None = None
    held_out: int = 0  # a fold never read from any of these directories (the evaluation fold); 0: none
    exclude_split: str = ""  # shards of this split are never read (the expression corpus's "test": its evaluation)


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
    seed: int = 0  # shard order, augmentation
    split_seed: int = 0  # which labels label drop hides, which images the AU validation set holds
    workers: int = 2  # DataLoader workers per source
    shuffle_buffer: int = 500
    validation: float = 0.0  # fraction of each subject's labelled training images reserved as the AU validation set
    val_batch: int = 256
    source_timeout: float = 600.0  # seconds a reader may find no usable sample before the run stops
    flow: bool = False  # decode each sample's flow.npy into Batch.flow (costs a warp per image)
    decode: str = "worker"  # "device": JPEG pixels are left to ssau.data.device_decode (augmentation drawn here)
    labelled_subjects: float = 0.0  # 0: every training subject keeps its labels; K >= 1 subjects, or a fraction


# ---------------------------------------------------------------------------------------------------- shard lists
def _shard_folds(key: str, directory: str) -> set[int]:
    """The folds of a shard directory's shards, read from its dataset.json (one line if it is not one)."""
    if not is_remote(directory) and not Path(directory).is_dir():
        raise ConfigError(f"{key}: {directory} is not a directory (shard a corpus there with `ssau shard`)")
    path = meta_dir(directory) / "dataset.json"  # a URL's is fetched once (ssau.remote)
    try:
        doc = read_json(path, "dataset.json")  # a FIFO never blocks, nesting is bounded
        return {int(s["fold"]) for s in doc["shards"] if int(s["samples"]) > 0}
    except FileNotFoundError:
        raise ConfigError(f"{key}: {public(directory)} has no dataset.json; it is not a shard directory") from None
    except (OSError, ValueError, KeyError, TypeError, InputError) as e:
        raise ConfigError(f"{key}: {public(join(directory, 'dataset.json'))} is unreadable or damaged ({type(e).__name__}: {e})") from None


def check_shards(d: DataConfig) -> None:
    """The data section against the disk, before anything is built: every directory is a shard directory, and
    data.folds is the labelled shards' fold count (else a held-out fold could be absent and nothing evaluated)."""
    for key, dirs in (("data.labelled", d.labelled), ("data.unlabelled", d.unlabelled),
                      ("data.expression", d.expression)):
        for x in dirs:
            _shard_folds(key, x)
    for x in d.labelled:
        folds = _shard_folds("data.labelled", x) - {0}
        if not folds and d.fold:
            raise ConfigError(f"data.fold={d.fold}: {x} has no folds (shard it with --folds, or set data.fold=0)")
        if folds and max(folds) != d.folds:
            raise ConfigError(f"data.folds={d.folds}: {x} has samples in folds {sorted(folds)}")
        if d.fold and d.fold not in folds:
            raise ConfigError(f"data.fold={d.fold}: {x} has no sample in fold {d.fold} (folds with samples: "
                              f"{sorted(folds)})")


def read_dataset(d: str | Path) -> dict:
    """dataset.json, checked for what the streams rely on (ConfigError, one line, otherwise): shard names that
    stay inside the directory, integer folds and sample counts, an AU list, and counts its tar files can hold
    (``shard_capacity``: an inflated count would have evaluation pad batches for ever)."""
    path = meta_dir(d) / "dataset.json"  # a remote directory's is fetched once (ssau.remote)
    if not path.is_file():
        raise ConfigError(f"{public(str(d))} is not a shard directory (no dataset.json); run `ssau shard` first")
    shown = public(join(d, "dataset.json"))
    try:
        doc = read_json(path, "dataset.json")
        ok = (isinstance(doc, dict) and isinstance(doc.get("aus"), list) and isinstance(doc.get("shards"), list)
              and isinstance(doc.setdefault("corpus", ""), str) and all(isinstance(a, str) for a in doc["aus"]))
        for sh in doc["shards"] if ok else ():
            name = sh.get("name") if isinstance(sh, dict) else None
            ok = ok and (isinstance(name, str) and Path(name).name == name and name not in ("", ".", "..")
                         and type(sh.get("fold")) is int and type(sh.get("samples")) is int and sh["samples"] >= 0)
    except (OSError, ValueError, AttributeError, InputError) as e:
        raise ConfigError(f"{shown}: unreadable ({type(e).__name__}: {str(e)[:160]})") from None
    if not ok:
        raise ConfigError(f"{shown}: damaged (needs aus and shards of name, fold and samples; shard names "
                          f"without folders)")
    for sh in doc["shards"]:
        size, cap = shard_capacity(join(d, sh["name"]))
        if size is not None and sh["samples"] > cap and sh.get("bytes", size) == size:  # an intact file: the count lies
            raise ConfigError(f"{shown}: shard {sh['name']} is said to hold {sh['samples']} samples, but its "
                              f"{size} bytes hold at most {cap}; the dataset.json is damaged")
    return doc


def shard_capacity(tar: str | Path) -> tuple[int | None, int]:
    """(the file's size, the most samples it can hold) of a shard; (None, 0) when it is missing or not a file. A
    sample takes at least one 512-byte header and one data block. A count above this is a lie when the file is whole
    (``read_dataset`` refuses it); a truncated file (its size differs from dataset.json's ``bytes``) is read, and
    its shortfall skipped and counted, with its plan bounded by this (``ssau.data.eval_stream``). A remote shard's
    size comes from its directory's listing."""
    if is_remote(tar):
        size = size_of(str(tar))
        return (None, 0) if size is None else (size, size // 1024)
    if not is_regular(tar):
        return None, 0
    size = Path(tar).stat().st_size
    return size, size // 1024


def check_offsets(d: str | Path, shards: list, offsets: list, sizes: list, cache: dict[str, int | None]) -> None:
    """Index rows whose sample (``tar_offset``, ``tar_size``) does not lie inside its shard file: one ConfigError
    line. Checked against whole files only (size as dataset.json's ``bytes``): a truncated shard is read, and what it
    lost skipped and counted. ``cache`` keeps each shard's size across batches."""
    if not cache:
        recorded = {sh["name"]: sh.get("bytes") for sh in read_dataset(d)["shards"]}
        for name, size in recorded.items():
            cache[name] = size if shard_capacity(join(d, name))[0] == size else None
    for name, offset, span in zip(shards, offsets, sizes):
        size = cache.get(name)
        if size is not None and not (0 <= offset and 0 < span and offset + span <= size):
            raise ConfigError(f"{public(join(d, 'index.parquet'))}: a sample of {name} at bytes {offset}..{offset + span} "
                              f"lies outside the shard's {size} bytes; the index is damaged")


def index_names(d: str | Path) -> list[str]:
    """The columns of a directory's index.parquet; a damaged index is one ConfigError line."""
    return _index_read(d, lambda path: pq.read_schema(path).names)


def index_batches(d: str | Path, columns: list[str]) -> Iterator:
    """Record batches of a directory's index.parquet (the columns it has of ``columns``)."""
    names = index_names(d)
    if not {"key", "fold", "subject"} <= set(names):
        raise ConfigError(f"{public(join(d, 'index.parquet'))}: damaged (no key, fold or subject column)")
    batches = _index_read(d, lambda path: pq.ParquetFile(path).iter_batches(columns=[c for c in columns if c in names]))
    while (batch := _index_read(d, lambda _: next(batches, None))) is not None:  # streamed: memory stays flat
        yield batch


def _index_read(d: str | Path, read):
    import pyarrow as pa

    path = meta_dir(d) / "index.parquet"
    try:
        return read(path)
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(f"{public(join(d, 'index.parquet'))}: unreadable or damaged ({str(e).splitlines()[0][:120]})") from None


def read_shards(doc: dict, folds: tuple[int, ...] | None, held_out: int = 0, exclude_split: str = "") -> list[dict]:
    """The shard entries of a dataset.json that a source reads: in ``folds`` (None: all), not in the held-out fold,
    not of the excluded split."""
    return [s for s in doc["shards"] if (folds is None or s["fold"] in folds) and not (held_out and s["fold"] == held_out)
            and not (exclude_split and s.get("split") == exclude_split)]


def shard_urls(d: str | Path, folds: tuple[int, ...] | None, held_out: int = 0, exclude_split: str = "") -> list[str]:
    return [join(d, s["name"]) for s in read_shards(read_dataset(d), folds, held_out, exclude_split)]


def dataset_inputs(cfg: StreamConfig) -> list[dict]:
    """MLflow dataset inputs, one per shard directory and use (context train, unlabelled, expression, and eval for
    the labelled directories' held-out fold): named by the directory, a digest over the sha256 of exactly the shards
    read (so runs on different data, or other folds of it, are told apart), the directory as source, and shard and
    sample counts, folds and corpus as profile. Fields as ssau.tracking.journal's ``inputs`` records carry them."""
    uses = [("train", cfg.labelled, cfg.labelled.folds, cfg.labelled.held_out)]
    uses += [(what, src, src.folds, src.held_out) for what, src in (("unlabelled", cfg.unlabelled),
                                                                     ("expression", cfg.expression)) if src]
    if cfg.labelled.held_out:
        uses.append(("eval", cfg.labelled, (cfg.labelled.held_out,), 0))
    out = []
    for context, src, folds, held_out in uses:
        for d in src.dirs:
            doc = read_dataset(d)
            shards = read_shards(doc, folds, held_out, src.exclude_split if context != "eval" else "")
            h = hashlib.sha256()
            for sh in shards:  # a dataset.json without per-shard sha256 (older shards): name, size and count
                h.update(f"{sh['name']}:{sh.get('sha256') or (sh.get('bytes'), sh['samples'])}\n".encode())
            used = sorted({sh["fold"] for sh in shards})
            profile = {"corpus": doc["corpus"], "shards": len(shards), "samples": sum(sh["samples"] for sh in shards),
                       "folds": used, "schema_version": doc.get("schema_version", 1)}
            remote = is_remote(d)  # a URL is logged without credentials (ssau.remote.public)
            out.append({"name": public(str(d)).rstrip("/").rsplit("/", 1)[-1] if remote else Path(d).name,
                        "digest": h.hexdigest()[:16], "source_type": str(d).split(":", 1)[0] if remote else "local",
                        "source": json.dumps({"uri": public(str(d)) if remote else Path(d).resolve().as_uri()}),
                        "profile": json.dumps(profile),
                        "tags": {"mlflow.data.context": context, "folds": ",".join(map(str, used))}})
    return out


def held_out_notes(cfg: StreamConfig) -> list[str]:
    """A line per unlabelled or expression directory that has shards in the evaluation fold: they are not read."""
    lines = []
    for what, src in (("data.unlabelled", cfg.unlabelled), ("data.expression", cfg.expression)):
        for d in src.dirs if src is not None and src.held_out else ():
            shards = read_dataset(d)["shards"]
            n = sum(1 for s in shards if s["fold"] == src.held_out)
            if n:
                lines.append(f"{what}: {d}: {n} of {len(shards)} shards are in fold {src.held_out}, the evaluation "
                             f"fold, and are not read (no test image may reach training)")
    return lines


def resolve_aus(cfg: StreamConfig) -> tuple[int, ...]:
    if cfg.aus is not None:
        return cfg.aus
    return tuple(int(a[2:]) for a in read_dataset(cfg.labelled.dirs[0])["aus"])


def unit_hash(*parts) -> float:
    h = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def is_hidden(key: str, p: float, seed: int) -> bool:
    """Whether label-drop hides this image's labels (image mode)."""
    return p > 0 and unit_hash("drop", seed, key) < p


def hidden_aus(key: str, aus: tuple[int, ...], p: float, seed: int) -> list[bool]:
    """Which single AU labels label-drop hides (AU mode)."""
    return [p > 0 and unit_hash("drop-au", seed, key, au) < p for au in aus]


# ---------------------------------------------------------------------------------------------------- from a run config
def stream_config(cfg: Config, aus: tuple[int, ...]) -> StreamConfig:
    d = cfg.data
    train_folds = None if d.fold == 0 else tuple(k for k in range(1, d.folds + 1) if k != d.fold)
    # No leakage: the evaluation fold is held out of every training source whose shards carry folds (an unlabelled
    # source pointed at the labelled shards would otherwise train on the test fold's images). Shards of fold 0
    # (no subject folds: a folder of faces) are never held out. The expression corpus's test split (RAF-DB's) is
    # never trained on: it is where the expression task is evaluated.
    src = lambda dirs, w, folds=None: SourceConfig(tuple(dirs), tuple(w) if w else None, folds, d.fold)  # noqa: E731
    return StreamConfig(labelled=src(d.labelled, d.labelled_weights, train_folds),
                        unlabelled=src(d.unlabelled, d.unlabelled_weights) if d.unlabelled else None,
                        expression=replace(src(d.expression, None), exclude_split="test") if d.expression else None,
                        aus=aus, m1=d.m1, m2=d.m2,
                        m_expr=d.m_expr, image_size=d.image_size, label_drop=d.label_drop,
                        label_drop_mode=d.label_drop_mode, seed=cfg.train.seed, split_seed=d.split_seed,
                        workers=d.workers,
                        shuffle_buffer=d.shuffle_buffer, validation=d.validation, val_batch=d.val_batch,
                        source_timeout=d.source_timeout, flow=d.flow, labelled_subjects=d.labelled_subjects,
                        decode=d.decode)
