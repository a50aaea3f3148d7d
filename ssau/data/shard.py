"""`ssau shard`: pack a corpus into webdataset tar shards, a parquet index and dataset.json.

Guarantees, and how they are kept:
- Byte-identical output whatever ``--workers`` is: the plan (which records go to which shard) is made in one
  process from sorted inputs; each shard is written by one worker from its own records, with fixed tar metadata.
- Kill -9 safe and resumable: every file is written under a temporary name and renamed. A shard counts as done
  only when its stats file (``.ssau/<shard>.json``) exists, names the same plan hash, and the tar's sha256 matches;
  anything else is rewritten. The index and dataset.json are rebuilt from the per-shard parts at the end.
- Bad images are skipped or converted and listed with their reason; they never end a run. Records are screened
  first (``adapters.screen``: files outside ``--images``, images listed twice); every key is unique.
- Otherwise a run stops with one line (ShardError): an unusable ``--out`` (a file in the way, read-only, disk
  full), a worker that raised or died. No temporary file is left; finished shards are kept for the resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from tqdm import tqdm

from ssau.aus import EXPRESSIONS, STANDARD_FOLDS, au_name
from ssau.data.adapters import ADAPTERS, AdapterArgs, Record, Scan, screen
from ssau.data.images import JPEG_QUALITY, MIN_SIDE, Prepared, SkipImage, exception_detail, prepare_image
from ssau.data.pool import WorkerDied, run_tasks
from ssau.data.video import read_source

FORMAT_VERSION = 1
STATE_DIR = ".ssau"


class ShardError(Exception):
    """A problem with the command's input or output directory; one line for the user."""


@dataclass(frozen=True)
class ShardSettings:
    format: str
    images: str
    labels: str | None
    aus: tuple[int, ...] | None = None
    unknown: str = ""
    frame_template: str | None = None
    active_threshold: float = 2.0
    folds: str | None = None  # "bp4d", "disfa" or a number of subject folds
    shard_size: int = 1000
    resize: int | None = None
    quality: int = JPEG_QUALITY
    seed: int = 0  # only used to place subject-less samples into numbered folds

    def fingerprint(self) -> dict:
        d = asdict(self)
        d["aus"] = list(self.aus) if self.aus else None
        return d


# ---------------------------------------------------------------------------------------------------- planning
def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not also leave a partial file behind
        raise


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def _assign_folds(scan: Scan, spec: str | None, seed: int) -> tuple[list[tuple[int, Record]], list[dict]]:
    if spec is None:
        return [(0, r) for r in scan.records], []
    if spec in STANDARD_FOLDS:
        part = {s: k + 1 for k, subs in enumerate(STANDARD_FOLDS[spec]) for s in subs}
        out, skipped = [], []
        for r in scan.records:
            if r.subject in part:
                out.append((part[r.subject], r))
            else:
                skipped.append({"input": r.source, "reason": f"subject-not-in-{spec}-folds"})
        return out, skipped
    try:
        k = int(spec)
        assert k >= 2
    except (ValueError, AssertionError):
        raise ShardError(f"--folds {spec!r}: use bp4d, disfa or a number of folds >= 2") from None
    subjects = sorted({r.subject for r in scan.records if r.subject})
    part = {s: i % k + 1 for i, s in enumerate(subjects)}  # round-robin over sorted subjects: balanced, stable

    def fold(r: Record) -> int:
        if r.subject:
            return part[r.subject]
        h = hashlib.blake2b(f"{seed}:{r.key}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "big") % k + 1  # no subject: each image is its own subject

    return [(fold(r), r) for r in scan.records], []


def _dedupe_keys(records: list[Record]) -> None:
    """Make every key unique, in list order (the adapters' sorted order, so the same for any --workers).

    The first record with a key keeps it; a later one becomes ``<key>-dup<n>`` with the smallest n that no record
    uses, counting keys that only appear later in the list (``x``, ``x``, ``x-dup2`` must not give two x-dup2).
    """
    used = {r.key for r in records}
    kept: set[str] = set()
    next_n: Counter[str] = Counter()
    for r in records:
        if r.key not in kept:
            kept.add(r.key)
            continue
        base, n = r.key, max(2, next_n[r.key])
        while f"{base}-dup{n}" in used:
            n += 1
        next_n[base] = n + 1
        r.key = f"{base}-dup{n}"
        used.add(r.key)
        kept.add(r.key)


def plan_shards(scan: Scan, s: ShardSettings) -> tuple[list[dict], list[dict]]:
    """-> (shard tasks in output order, inputs skipped while planning)."""
    placed, skipped = _assign_folds(scan, s.folds, s.seed)
    groups: dict[tuple[int, str], list[Record]] = {}
    for fold, r in sorted(placed, key=lambda fr: (fr[0], fr[1].split, fr[1].key)):
        groups.setdefault((fold, r.split), []).append(r)
    tasks = []
    for (fold, split), recs in groups.items():
        stem = scan.corpus + (f"-fold{fold}" if fold else "") + (f"-{split}" if split else "")
        for i in range(0, len(recs), s.shard_size):
            chunk = recs[i:i + s.shard_size]
            plan_sha = hashlib.sha256(json.dumps([_record_doc(r, scan, fold) for r in chunk],
                                                 sort_keys=True).encode()).hexdigest()
            tasks.append({"name": f"{stem}-{i // s.shard_size:06d}.tar", "fold": fold, "split": split,
                          "records": chunk, "plan_sha": plan_sha})
    return tasks, skipped


def _record_doc(r: Record, scan: Scan, fold: int) -> dict:
    doc = {"corpus": scan.corpus, "key": r.key, "subject": r.subject, "sequence": r.sequence, "frame": r.frame,
           "split": r.split, "fold": fold, "source": r.source,
           "expression": r.expression, "expression_name": EXPRESSIONS[r.expression] if r.expression >= 0 else None}
    if scan.aus:
        doc.update(aus=list(scan.aus), occurrence=r.occurrence, mask=r.mask, intensity=r.intensity)
    doc.update(r.meta)
    return doc


# ---------------------------------------------------------------------------------------------------- workers
_SCAN: Scan | None = None
_SETTINGS: ShardSettings | None = None
_OUT: Path | None = None


def _init_worker(scan_meta: Scan, settings: ShardSettings, out: Path) -> None:
    global _SCAN, _SETTINGS, _OUT
    _SCAN, _SETTINGS, _OUT = scan_meta, settings, out


def _write_shard(task: dict) -> dict:
    tmp = _OUT / f".{task['name']}.tmp-{os.getpid()}"
    try:
        return _write_shard_to(task, tmp)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) or not isinstance(e, Exception):
            raise  # --out's (inputs are guarded per image: run_shard names it), or Ctrl-C
        log = _OUT / STATE_DIR / "error.txt"  # anything else is a bug: one line, and its traceback for the report
        try:
            _atomic_write(log, "".join(traceback.format_exception(e)).encode())
        except OSError:
            pass
        raise ShardError(f"writing {task['name']} failed: {type(e).__name__}: {exception_detail(e)}; "
                         f"traceback in {log}") from None


def _prepared(r: Record, s: ShardSettings) -> tuple[Prepared | None, dict | None]:
    """-> (Prepared, None) or (None, skip entry). Nothing one input holds can raise out of here."""
    try:
        return prepare_image(read_source(r.source), s.resize, s.quality), None
    except SkipImage as e:
        return None, {"input": r.source, "reason": str(e)} | ({"detail": e.detail} if e.detail else {})
    except OSError as e:
        return None, {"input": r.source, "reason": f"unreadable: {e.strerror or e}"}
    except Exception as e:  # a reader bug on one input must cost that input, not the run
        return None, {"input": r.source, "reason": f"error-{type(e).__name__}", "detail": exception_detail(e)}


def _write_shard_to(task: dict, tmp: Path) -> dict:
    scan, s, out = _SCAN, _SETTINGS, _OUT
    rows, skipped, converted = [], [], Counter()
    with open(tmp, "wb") as f:
        # Fixed metadata: byte-identical shards. The mtime is an int on purpose: a float makes tarfile add a pax
        # header to every member, which readers then have to parse.
        sink = wds.TarWriter(f, user="", group="", mtime=0)
        for r in task["records"]:
            prep, skip = _prepared(r, s)
            if skip is not None:
                skipped.append(skip)
                continue
            doc = _record_doc(r, scan, task["fold"]) | {"width": prep.width, "height": prep.height}
            sink.write({"__key__": r.key, "jpg": prep.jpeg,
                        "json": json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()})
            if prep.converted:
                converted[prep.converted] += 1
            row = {"key": r.key, "shard": task["name"], "offset": len(rows), "fold": task["fold"],
                   "split": r.split, "corpus": scan.corpus, "subject": r.subject, "sequence": r.sequence,
                   "frame": r.frame, "expression": r.expression, "width": prep.width, "height": prep.height,
                   "source": r.source}
            for j, au in enumerate(scan.aus):
                row[au_name(au)] = (r.occurrence[j] if r.mask[j] else -1)
            rows.append(row)
        sink.close()
        f.flush()
        os.fsync(f.fileno())
    sha = _sha256(tmp)
    os.replace(tmp, out / task["name"])
    state = out / STATE_DIR
    _atomic_write(state / f"{task['name']}.parquet", _parquet_bytes(rows, scan))
    stats = {"name": task["name"], "fold": task["fold"], "split": task["split"], "samples": len(rows),
             "sha256": sha, "bytes": (out / task["name"]).stat().st_size, "plan_sha": task["plan_sha"],
             "skipped": skipped, "converted": dict(converted)}
    _atomic_write(state / f"{task['name']}.json", _json_bytes(stats))  # written last: marks the shard done
    return stats


def _schema(scan: Scan) -> pa.Schema:
    fields = [("key", pa.string()), ("shard", pa.string()), ("offset", pa.int32()), ("fold", pa.int16()),
              ("split", pa.string()), ("corpus", pa.string()), ("subject", pa.string()), ("sequence", pa.string()),
              ("frame", pa.int32()), ("expression", pa.int8()), ("width", pa.int32()), ("height", pa.int32()),
              ("source", pa.string())]
    fields += [(au_name(au), pa.int8()) for au in scan.aus]  # 1 / 0, -1 = unknown
    return pa.schema(fields)


def _parquet_bytes(rows: list[dict], scan: Scan) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=_schema(scan)), sink)
    return sink.getvalue().to_pybytes()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _verified(out: Path, task: dict) -> dict | None:
    stats_path = out / STATE_DIR / f"{task['name']}.json"
    try:
        stats = json.loads(stats_path.read_text())
    except (OSError, ValueError):
        return None
    tar = out / task["name"]
    parts = out / STATE_DIR / f"{task['name']}.parquet"
    if stats.get("plan_sha") != task["plan_sha"] or not tar.is_file() or not parts.is_file():
        return None
    return stats if tar.stat().st_size == stats["bytes"] and _sha256(tar) == stats["sha256"] else None


# ---------------------------------------------------------------------------------------------------- driver
def _check_out(out: Path) -> None:
    """Refuse an ``--out`` that cannot be written before the scan (which can take long), creating nothing."""
    if out.exists() and not out.is_dir():
        raise ShardError(f"--out {out} exists and is not a directory")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ShardError(f"--out {out}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):  # catches a read-only file system even for root
        raise ShardError(f"--out {out}: {probe} is not writable (permissions or a read-only file system)")


def _out_error(out: Path, e: OSError, started: bool) -> ShardError:
    path = str(e.filename) if e.filename is not None and str(e.filename) != str(out) else ""
    return ShardError(f"--out {out}: {e.strerror or e}" + (f" ({path})" if path else "")
                      + ("; finished shards are kept and the same command resumes" if started else ""))


def _remove_tmp(out: Path) -> None:
    for p in list(out.glob(".*.tmp-*")) + list((out / STATE_DIR).glob(".*.tmp-*")):
        p.unlink(missing_ok=True)  # left by a killed run or a killed worker


def _prepare_out(out: Path, s: ShardSettings, overwrite: bool) -> None:
    state = out / STATE_DIR
    settings_path = state / "settings.json"
    if settings_path.is_file():
        old = json.loads(settings_path.read_text())
        if old != s.fingerprint() and not overwrite:
            changed = sorted(k for k in set(old) | set(s.fingerprint()) if old.get(k) != s.fingerprint().get(k))
            raise ShardError(f"--out {out} holds shards made with other settings ({', '.join(changed)} differ); "
                             "pass --overwrite to replace them")
    elif out.is_dir() and any(out.glob("*.tar")) and not overwrite:
        raise ShardError(f"--out {out} holds tar files not made by ssau shard; pass --overwrite to replace them")
    if overwrite and out.is_dir():
        for p in out.glob("*.tar"):
            p.unlink()
        for p in (out / "index.parquet", out / "dataset.json"):
            p.unlink(missing_ok=True)
        shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True, exist_ok=True)
    _remove_tmp(out)
    _atomic_write(settings_path, _json_bytes(s.fingerprint()))


def _run_tasks(todo: list[dict], meta: Scan, s: ShardSettings, out: Path, workers: int, done: dict, bar) -> None:
    def finished(task: dict, stats: dict) -> None:
        done[task["name"]] = stats
        bar.update(len(task["records"]))

    try:
        run_tasks(_write_shard, todo, workers, _init_worker, (meta, s, out), finished)
    except WorkerDied as e:
        raise ShardError(f"{e} while writing {out}; finished shards are kept and the same command resumes") from None
    finally:
        _remove_tmp(out)  # of the workers stopped mid-shard


def run_shard(s: ShardSettings, out: Path, workers: int = 1, overwrite: bool = False, progress: bool = True) -> dict:
    """Shard one corpus into ``out``; returns the dataset.json document. Raises ShardError / LabelError."""
    if s.format not in ADAPTERS:
        raise ShardError(f"unknown format {s.format!r}; choose one of {', '.join(ADAPTERS)}")
    if s.shard_size < 1 or workers < 1:
        raise ShardError(f"--shard-size {s.shard_size} and --workers {workers}: both must be at least 1")
    if s.resize is not None and not MIN_SIDE <= s.resize <= 4096:
        raise ShardError(f"--resize {s.resize}: the shorter side must be {MIN_SIDE} to 4096 px")
    if workers > 1024:
        raise ShardError(f"--workers {workers}: at most 1024")
    if not 1 <= s.quality <= 100:
        raise ShardError(f"--quality {s.quality}: JPEG quality is 1-100")
    if not 0 < s.active_threshold <= 5:  # also refuses nan: DISFA intensities are 0-5
        raise ShardError(f"--active-threshold {s.active_threshold}: an intensity in (0, 5]")
    _check_out(out)
    t0 = time.time()
    scan = ADAPTERS[s.format](AdapterArgs(images=Path(s.images), labels=Path(s.labels) if s.labels else None,
                                          aus=s.aus, unknown=s.unknown, frame_template=s.frame_template,
                                          active_threshold=s.active_threshold))
    screen(scan, Path(s.images))
    _dedupe_keys(scan.records)
    tasks, plan_skipped = plan_shards(scan, s)
    if not tasks:
        raise ShardError(f"no samples found under {s.images}" + (f" with labels {s.labels}" if s.labels else ""))
    try:
        _prepare_out(out, s, overwrite)
    except OSError as e:
        raise _out_error(out, e, started=False) from None
    try:
        return _write_all(scan, s, tasks, plan_skipped, out, workers, progress, t0)
    except OSError as e:
        raise _out_error(out, e, started=True) from None


def _write_all(scan: Scan, s: ShardSettings, tasks: list[dict], plan_skipped: list[dict], out: Path, workers: int,
               progress: bool, t0: float) -> dict:
    done = {t["name"]: st for t in tasks if (st := _verified(out, t)) is not None}
    todo = [t for t in tasks if t["name"] not in done]
    meta = Scan(scan.corpus, scan.aus, [], [], scan.labelled)  # workers need no record list of their own
    bar = tqdm(total=sum(len(t["records"]) for t in tasks), unit="img", desc=f"shard {scan.corpus}",
               disable=not progress, initial=sum(len(t["records"]) for t in tasks if t["name"] in done),
               file=sys.stderr, dynamic_ncols=True)
    try:
        _run_tasks(todo, meta, s, out, workers, done, bar)
    finally:
        bar.close()

    planned = {t["name"] for t in tasks}
    for stale in out.glob("*.tar"):  # shards of an earlier, larger plan with the same settings
        if stale.name not in planned and (out / STATE_DIR / f"{stale.name}.json").exists():
            stale.unlink()
            (out / STATE_DIR / f"{stale.name}.json").unlink()
            (out / STATE_DIR / f"{stale.name}.parquet").unlink(missing_ok=True)
    shards = [done[t["name"]] for t in tasks]
    index_tmp = out / f".index.parquet.tmp-{os.getpid()}"
    try:
        with pq.ParquetWriter(index_tmp, _schema(scan)) as writer:  # streamed: memory stays flat
            for st in shards:
                writer.write_table(pq.read_table(out / STATE_DIR / f"{st['name']}.parquet", schema=_schema(scan)))
        os.replace(index_tmp, out / "index.parquet")
    except BaseException:
        index_tmp.unlink(missing_ok=True)
        raise
    doc = _dataset_doc(scan, s, shards, plan_skipped, out)
    _atomic_write(out / "dataset.json", _json_bytes(doc))
    # Run facts differ between runs, so they stay out of dataset.json (which is byte-identical across runs).
    seconds = time.time() - t0
    run = {"seconds": round(seconds, 3), "shards_written": len(todo), "shards_reused": len(tasks) - len(todo),
           "images_per_s": round(sum(len(t["records"]) for t in todo) / max(seconds, 1e-9), 1)}
    _atomic_write(out / STATE_DIR / "last_run.json", _json_bytes(run))
    return doc | {"last_run": run}


def _dataset_doc(scan: Scan, s: ShardSettings, shards: list[dict], plan_skipped: list[dict], out: Path) -> dict:
    skipped = scan.skipped + plan_skipped + [x for st in shards for x in st["skipped"]]
    counts = {au_name(au): {"positive": 0, "negative": 0, "unknown": 0} for au in scan.aus}
    expressions: Counter[str] = Counter()
    idx = pq.ParquetFile(out / "index.parquet")
    for batch in idx.iter_batches(columns=[au_name(au) for au in scan.aus] + ["expression"]):
        for au in scan.aus:
            col = batch.column(au_name(au)).to_pylist()
            c = counts[au_name(au)]
            c["positive"] += col.count(1)
            c["negative"] += col.count(0)
            c["unknown"] += col.count(-1)
        expressions.update(EXPRESSIONS[e] for e in batch.column("expression").to_pylist() if e >= 0)
    converted: Counter[str] = Counter()
    for st in shards:
        converted.update(st["converted"])
    samples = sum(st["samples"] for st in shards)
    return {
        "format_version": FORMAT_VERSION, "corpus": scan.corpus, "labelled": scan.labelled,
        "aus": [au_name(au) for au in scan.aus], "au_counts": counts, "expressions": dict(sorted(expressions.items())),
        "samples": samples,
        "shards": [{k: st[k] for k in ("name", "fold", "split", "samples", "sha256", "bytes")} for st in shards],
        "skipped": skipped,
        "skipped_by_reason": dict(sorted(Counter(x["reason"] for x in skipped).items())),
        "converted_by_reason": dict(sorted(converted.items())),
        "settings": s.fingerprint(),
    }
