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
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from ssau.aus import EXPRESSIONS, STANDARD_FOLDS, au_name
from ssau.errors import InputError, ShardError, WorkerDied
from ssau.faces.align import DETECTOR
from ssau.faces.detect import DLIB_DETECTOR, LICENCE
from ssau.faces.detect import available as detector_available
from ssau.faces.flow import require_optflow
from ssau.faces.template import MEAN_68
from ssau.io import atomic_path, atomic_write
from ssau.readfile import read_json
from ssau.shard.adapters import ADAPTERS
from ssau.shard.images import MIN_SIDE
from ssau.shard.landmarks import LandmarkSource, attach_landmarks
from ssau.shard.pool import run_tasks
from ssau.shard.records import AdapterArgs, Record, Scan, screen
from ssau.shard.schema import FORMAT_VERSION, SCHEMA_VERSION, STATE_DIR
from ssau.shard.write import ShardSettings, init_worker, json_bytes, plan_doc, schema, sha256, write_shard

__all__ = ["ShardError", "ShardSettings", "run_shard", "plan_shards", "STATE_DIR"]


# ---------------------------------------------------------------------------------------------------- planning
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
            plan_sha = hashlib.sha256(json.dumps([plan_doc(r, scan, fold) for r in chunk],
                                                 sort_keys=True).encode()).hexdigest()
            tasks.append({"name": f"{stem}-{i // s.shard_size:06d}.tar", "fold": fold, "split": split,
                          "records": chunk, "plan_sha": plan_sha})
    return tasks, skipped


def _verified(out: Path, task: dict) -> dict | None:
    stats_path = out / STATE_DIR / f"{task['name']}.json"
    try:  # damaged, a FIFO, nested without bound: not a finished shard, so it is rewritten
        stats = read_json(stats_path, "shard stats file")
    except (OSError, InputError):
        return None
    tar = out / task["name"]
    parts = out / STATE_DIR / f"{task['name']}.parquet"
    if not isinstance(stats, dict) or stats.get("plan_sha") != task["plan_sha"] or not tar.is_file() \
            or not parts.is_file():
        return None
    return stats if tar.stat().st_size == stats.get("bytes") and sha256(tar) == stats.get("sha256") else None


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
    if settings_path.is_file() and not overwrite:
        try:  # damaged, or nested without bound: one line that says how to go on
            old = read_json(settings_path, "settings file")
            if not isinstance(old, dict):
                raise InputError(f"{settings_path}: not a settings object")
        except InputError as e:
            raise ShardError(f"--out {out}: {e}; pass --overwrite to replace its shards") from None
        if old != s.fingerprint():
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
    atomic_write(settings_path, json_bytes(s.fingerprint()))


def _run_tasks(todo: list[dict], meta: Scan, s: ShardSettings, out: Path, workers: int, done: dict, bar) -> None:
    pairs = [0, time.perf_counter()]

    def finished(task: dict, stats: dict) -> None:
        done[task["name"]] = stats
        pairs[0] += stats.get("faces", {}).get("flow", 0)
        if s.flow:
            bar.set_postfix_str(f"{pairs[0] / max(time.perf_counter() - pairs[1], 1e-9):.1f} flow pairs/s", refresh=False)
        bar.update(len(task["records"]))

    threads = None
    if s.align is not None or s.flow:  # only then do the workers run OpenCV
        import cv2

        # One OpenCV thread per worker: a process per core already, and the same arithmetic whatever --workers
        # is. Set here before the workers fork (setNumThreads in a forked child can hang on the parent pool's lock).
        threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
    try:
        run_tasks(write_shard, todo, workers, init_worker, (meta, s, out), finished)
    except WorkerDied as e:
        raise ShardError(f"{e} while writing {out}; finished shards are kept and the same command resumes") from None
    finally:
        if threads is not None:
            import cv2

            cv2.setNumThreads(threads)
        _remove_tmp(out)  # of the workers stopped mid-shard


def _check_faces(s: ShardSettings) -> None:
    if s.align is not None and not 16 <= s.align <= 1024:
        raise ShardError(f"--align {s.align}: the aligned face's side must be 16 to 1024 px")
    if not 0.0 <= s.align_margin < 0.45:  # also refuses nan
        raise ShardError(f"--align-margin {s.align_margin}: a fraction of the side in [0, 0.45)")
    if s.align_points not in ("five", "all"):
        raise ShardError(f"--align-points {s.align_points!r}: five (eye centres, nose tip, mouth corners) or all")
    if not 0 <= s.flow <= 100:
        raise ShardError(f"--flow {s.flow}: a frame step from 1 to 100 (0: no flow)")
    if not 4 <= s.flow_size <= 512 or not 0 < s.flow_clip <= 1000:
        raise ShardError(f"--flow-size {s.flow_size} / --flow-clip {s.flow_clip}: 4-512 px and (0, 1000] px")
    if not 0.0 <= s.min_landmark_confidence <= 1.0:
        raise ShardError(f"--min-landmark-confidence {s.min_landmark_confidence}: a value in [0, 1]")
    if s.require_landmarks and not s.landmarks and s.format != "folder":
        raise ShardError("--require-landmarks needs --landmarks DIR (only folder sidecars come without it)")
    if s.detector not in ("haar", "dlib") or s.landmarks_from not in ("file", "detector"):
        raise ShardError(f"--detector {s.detector!r} / --landmarks-from {s.landmarks_from!r}: auto, dlib or haar / "
                         f"file or detector")
    if s.detector == "dlib" and not detector_available():
        raise ShardError("--detector dlib needs the [faces] extra: pip install -e '.[faces]' (dlib-bin, "
                         "face_recognition_models)")
    if s.landmarks_from == "detector" and (s.align is None or s.detector != "dlib"):
        raise ShardError("--landmarks-from detector needs --align SIZE and dlib's landmarks (the [faces] extra)")
    if s.flow:
        require_optflow()


def _landmarks_in(scan: Scan, s: ShardSettings) -> dict:
    """Attach --landmarks to the records, drop those without under --require-landmarks, pair frames for --flow."""
    counts = attach_landmarks(scan, LandmarkSource(Path(s.landmarks), s.landmark_pattern, s.landmark_frames,
                                                   s.landmark_frame_column, s.min_landmark_confidence)) \
        if s.landmarks else {}
    if s.require_landmarks:
        scan.skipped.extend({"input": r.source, "reason": "no-landmarks"} for r in scan.records
                            if r.points is None or len(r.points) != 68)
        scan.records = [r for r in scan.records if r.points is not None and len(r.points) == 68]
    if s.flow:
        frames = {(r.subject, r.sequence, r.frame): r for r in scan.records if r.frame >= 0 and r.sequence}
        for (subject, sequence, frame), r in frames.items():
            later = frames.get((subject, sequence, frame + s.flow))
            if later is not None:
                r.partner, r.partner_key = later.source, later.key
    return counts


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
    _check_faces(s)
    _check_out(out)
    t0 = time.time()
    scan = ADAPTERS[s.format](AdapterArgs(images=Path(s.images), labels=Path(s.labels) if s.labels else None,
                                          aus=s.aus, unknown=s.unknown, frame_template=s.frame_template,
                                          active_threshold=s.active_threshold))
    screen(scan, Path(s.images))
    scan.root = os.path.abspath(s.images)  # samples store their source relative to it (ssau.shard.schema module doc)
    _dedupe_keys(scan.records)
    landmark_counts = _landmarks_in(scan, s)
    for w in scan.warnings:
        print(f"ssau shard: warning: {w}", file=sys.stderr)
    tasks, plan_skipped = plan_shards(scan, s)
    if not tasks:
        raise ShardError(f"no samples found under {scan.searched or s.images}"
                         + (f" with labels {s.labels}" if s.labels else ""))
    scan.landmark_counts = landmark_counts  # for dataset.json
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
    meta = Scan(scan.corpus, scan.aus, [], [], scan.labelled, root=scan.root)  # workers need no record list
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
    with atomic_path(out / "index.parquet") as index_tmp:
        with pq.ParquetWriter(index_tmp, schema(scan)) as writer:  # streamed: memory stays flat
            for st in shards:
                writer.write_table(_part(out / STATE_DIR / f"{st['name']}.parquet", schema(scan)))
    doc = _dataset_doc(scan, s, shards, plan_skipped, out)
    atomic_write(out / "dataset.json", json_bytes(doc))
    # Run facts differ between runs, so they stay out of dataset.json (which is byte-identical across runs).
    seconds = time.time() - t0
    run = {"seconds": round(seconds, 3), "shards_written": len(todo), "shards_reused": len(tasks) - len(todo),
           "validate": s.validate, "images_per_s": round(sum(len(t["records"]) for t in todo) / max(seconds, 1e-9), 1),
           "flow_pairs_per_s": round(sum(done[t["name"]].get("faces", {}).get("flow", 0) for t in todo)
                                     / max(seconds, 1e-9), 1)}
    atomic_write(out / STATE_DIR / "last_run.json", json_bytes(run))
    return doc | {"last_run": run}


def _part(path: Path, sch: pa.Schema) -> pa.Table:
    """A shard's index part in today's schema (parts written before a column existed get it as nulls; the sample's
    position in its shard was called ``offset`` before issue 13)."""
    t = pq.read_table(path)
    if "offset" in t.column_names and "position" not in t.column_names:
        t = t.rename_columns(["position" if c == "offset" else c for c in t.column_names])
    cols = [t.column(f.name).cast(f.type) if f.name in t.column_names else pa.nulls(len(t), f.type) for f in sch]
    return pa.Table.from_arrays(cols, schema=sch)


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
        "format_version": FORMAT_VERSION, "schema_version": SCHEMA_VERSION, "corpus": scan.corpus,
        "labelled": scan.labelled, "images_root": scan.root,
        "aus": [au_name(au) for au in scan.aus], "au_counts": counts, "expressions": dict(sorted(expressions.items())),
        "samples": samples,
        "shards": [{k: st[k] for k in ("name", "fold", "split", "samples", "sha256", "bytes")} for st in shards],
        "skipped": skipped,
        "skipped_by_reason": dict(sorted(Counter(x["reason"] for x in skipped).items())),
        "converted_by_reason": dict(sorted(converted.items())),
        "faces": _faces_doc(scan, s, shards),
        "warnings": scan.warnings,
        "settings": s.fingerprint(),
    }


def _faces_doc(scan: Scan, s: ShardSettings, shards: list[dict]) -> dict:
    """Landmarks, alignment and flow: what was asked, what each sample got (for dataset.json)."""
    got: Counter[str] = Counter()
    for st in shards:
        got.update(st.get("faces", {}))
    doc = {"landmarks": {"source": s.landmarks, **scan.landmark_counts,
                         "stored": got["with-landmarks"], "no-landmarks": got["no-landmarks"],
                         "implausible": got["implausible-landmarks"]},
           "aligned_by": {k.removeprefix("aligned-"): v for k, v in sorted(got.items()) if k.startswith("aligned-")}}
    if s.align is not None:
        doc["align"] = {"size": s.align, "margin": s.align_margin, "points": s.align_points,
                        "detector": (DLIB_DETECTOR if s.detector == "dlib" else DETECTOR) if s.detect else None,
                        "landmarks_from": s.landmarks_from, "warp": "cv2.warpAffine bilinear, border replicate",
                        "template": [[round(float(x), 6), round(float(y), 6)] for x, y in MEAN_68]}
        if s.detector == "dlib":
            doc["align"]["landmarks_licence"] = LICENCE
    if s.flow:
        doc["flow"] = {"k": s.flow, "size": s.flow_size, "clip": s.flow_clip, "units": "stored-image pixels",
                       "method": "TV-L1 (cv2.optflow), frame t+K warped by frame t's alignment, grayscale",
                       "pairs": got["flow"], "failed": {k: v for k, v in sorted(got.items()) if k.startswith("flow-")}}
    return doc
