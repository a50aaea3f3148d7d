"""Writing one shard (the shard workers' side of `ssau shard`; the driver is ``ssau.shard.plan``).

A worker gets a task (a shard name and its records, in plan order) and writes ``<name>.tar`` under a temporary
name, its index part and its stats file, each renamed into place; the stats file comes last and marks the shard
done. Every sample's pixels, landmarks, alignment and flow come from ``ssau.shard.faces``; whatever one input holds
costs that input (a skip entry with its reason), never the shard.

The on-disk format (per-sample json, index columns, versions) is described in ``ssau.shard.schema``.
"""

from __future__ import annotations

import hashlib
import json
import os
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path, PurePath

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from ssau.aus import EXPRESSIONS, au_name
from ssau.errors import ShardError, SkipImage
from ssau.io import atomic_file, atomic_write
from ssau.shard.faces import FaceOptions, Placed, flow_bytes, place
from ssau.shard.images import JPEG_QUALITY, VALIDATE, decodes_in_full, exception_detail
from ssau.shard.records import Record, Scan
from ssau.shard.schema import SCHEMA_VERSION, STATE_DIR
from ssau.shard.video import keep_frames, read_source, split_source


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
    # faces (issue 11): where landmarks come from, how faces are aligned, optical flow to frame t+K
    landmarks: str | None = None
    landmark_pattern: str | None = None
    landmark_frames: str = "number"
    landmark_frame_column: str = "frame"
    min_landmark_confidence: float = 0.8
    require_landmarks: bool = False
    align: int | None = None
    align_margin: float = 0.15
    align_points: str = "five"
    detect: bool = True
    detector: str = "haar"  # haar | dlib (the [faces] extra); the CLI's auto is resolved before a run
    landmarks_from: str = "file"  # file | detector (--landmarks-from)
    flow: int = 0
    flow_size: int = 64
    flow_clip: float = 20.0
    validate: str = "full"  # full | header (--validate, ssau.shard.images): how far each pass-through JPEG is decoded

    def fingerprint(self) -> dict:
        """The settings that decide the output. Face settings at their defaults are left out, so a directory
        sharded before they existed is not refused as made with other settings; its shards are rewritten once
        (each shard's plan now names its samples' face inputs), then resume as usual. ``validate`` is left out: on
        images that decode it changes no byte, so a run may resume in the other mode (last_run.json says which)."""
        d = asdict(self)
        del d["validate"]
        d["aus"] = list(self.aus) if self.aus else None
        since_faces = [f for f in fields(self) if f.name in _FACE_FIELDS]
        return {k: v for k, v in d.items() if k not in _FACE_FIELDS} | {
            f.name: d[f.name] for f in since_faces if d[f.name] != f.default}

    def __post_init__(self) -> None:
        if self.validate not in VALIDATE:  # a typo must not quietly mean full
            raise ShardError(f"--validate {self.validate!r}: {' or '.join(VALIDATE)}")

    def faces(self, want_gray: bool = False) -> FaceOptions:
        return FaceOptions(resize=self.resize, quality=self.quality, align=self.align, margin=self.align_margin,
                           points=self.align_points, detect=self.detect, detector=self.detector,
                           landmarks_from=self.landmarks_from, flow_size=self.flow_size,
                           flow_clip=self.flow_clip, want_gray=want_gray)


_FACE_FIELDS = ("landmarks", "landmark_pattern", "landmark_frames", "landmark_frame_column", "min_landmark_confidence",
                "require_landmarks", "align", "align_margin", "align_points", "detect", "detector", "landmarks_from",
                "flow", "flow_size", "flow_clip")


def json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def relative_source(source: str, root: str) -> str:
    """``source`` relative to ``root`` (the absolute --images), POSIX separators; a video frame keeps ``#<i>``."""
    if not root:
        return source
    path, frame = split_source(source)
    rel = os.path.relpath(os.path.abspath(path), root)
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        # Reached through a link: screen() found it inside the resolved root, so it is relative to that.
        rel = os.path.relpath(os.path.realpath(path), os.path.realpath(root))
    rel = PurePath(rel).as_posix()
    return f"{rel}#{frame}" if frame else rel


def record_doc(r: Record, scan: Scan, fold: int) -> dict:
    """A sample's identity and labels, schema version 2 (module doc): the same keys and types for every corpus."""
    n = len(scan.aus)
    mask = list(r.mask) if r.mask is not None else [0] * n
    occ = [int(o) if m else -1 for o, m in zip(r.occurrence, mask)] if r.occurrence is not None else [-1] * n
    inten = ([float(v) if m else -1.0 for v, m in zip(r.intensity, mask)] if r.intensity is not None
             else [-1.0] * n)
    return {"schema_version": SCHEMA_VERSION, "corpus": scan.corpus, "key": r.key, "subject": r.subject,
            "sequence": r.sequence, "frame": r.frame, "split": r.split, "fold": fold,
            "source": relative_source(r.source, scan.root),
            "aus": list(scan.aus), "au_names": [au_name(au) for au in scan.aus], "occurrence": occ, "mask": mask,
            "intensity": inten, "expression": r.expression,
            "expression_name": EXPRESSIONS[r.expression] if r.expression >= 0 else ""}


def plan_doc(r: Record, scan: Scan, fold: int) -> dict:
    """What decides a sample's bytes: its stored doc plus the inputs of its face (hashed into the plan)."""
    points = r.points.tolist() if hasattr(r.points, "tolist") else r.points  # float32 arrays from the CSVs
    return record_doc(r, scan, fold) | {"points": points, "bbox": r.bbox, "partner": r.partner}


# ---------------------------------------------------------------------------------------------------- workers
_SCAN: Scan | None = None
_SETTINGS: ShardSettings | None = None
_OUT: Path | None = None


def init_worker(scan_meta: Scan, settings: ShardSettings, out: Path) -> None:
    global _SCAN, _SETTINGS, _OUT
    _SCAN, _SETTINGS, _OUT = scan_meta, settings, out
    keep_frames(settings.flow + 1)  # frame t+K is decoded before frame t+1


def write_shard(task: dict) -> dict:
    try:
        return _write_shard_to(task)
    except BaseException as e:  # the shard's temporary file is gone already (atomic_file)
        if isinstance(e, OSError) or not isinstance(e, Exception):
            raise  # --out's (inputs are guarded per image: run_shard names it), or Ctrl-C
        log = _OUT / STATE_DIR / "error.txt"  # anything else is a bug: one line, and its traceback for the report
        try:
            atomic_write(log, "".join(traceback.format_exception(e)).encode())
        except OSError:
            pass
        raise ShardError(f"writing {task['name']} failed: {type(e).__name__}: {exception_detail(e)}; "
                         f"traceback in {log}") from None


def _skip_entry(source: str, e: Exception) -> dict:
    if isinstance(e, SkipImage):
        return {"input": source, "reason": str(e)} | ({"detail": e.detail} if e.detail else {})
    if isinstance(e, OSError):
        return {"input": source, "reason": f"unreadable: {e.strerror or e}"}
    return {"input": source, "reason": f"error-{type(e).__name__}", "detail": exception_detail(e)}


def _placed(r: Record, s: ShardSettings) -> tuple[Placed | None, dict | None]:
    """-> (Placed, None) or (None, skip entry). Nothing one input holds can raise out of here."""
    try:
        return place(read_source(r.source), r.points, r.bbox, s.faces(want_gray=bool(s.flow and r.partner)),
                     header_only=s.validate == "header" and not decodes_in_full(r.key)), None
    except Exception as e:  # a reader bug on one input must cost that input, not the run
        return None, _skip_entry(r.source, e)


def _flow(r: Record, placed: Placed, s: ShardSettings, notes: Counter) -> bytes | None:
    try:
        return flow_bytes(placed, read_source(r.partner), s.faces())
    except Exception as e:  # the partner frame's problem: this sample keeps its image, loses its flow
        notes[f"flow-{_skip_entry(r.partner, e)['reason'].removeprefix('flow-')}"] += 1
        return None


def _write_shard_to(task: dict) -> dict:
    scan, s, out = _SCAN, _SETTINGS, _OUT
    rows, skipped, converted, faces = [], [], Counter(), Counter()
    with atomic_file(_OUT / task["name"]) as f:
        # Fixed metadata: byte-identical shards. The mtime is an int on purpose: a float makes tarfile add a pax
        # header to every member, which readers then have to parse.
        sink = wds.TarWriter(f, user="", group="", mtime=0)
        for r in task["records"]:
            placed, skip = _placed(r, s)
            if skip is not None:
                skipped.append(skip)
                continue
            prep = placed.prepared
            doc = record_doc(r, scan, task["fold"]) | {
                "width": prep.width, "height": prep.height, "aligned": placed.aligned,
                "align_margin": float(s.align_margin) if s.align is not None else -1.0,
                "landmarks": placed.landmarks or [], "bbox": [], "flow_partner": ""}
            if s.align is None and r.bbox is not None:  # box edges are pixel borders: they scale with the image
                sx, sy = placed.matrix[0, 0], placed.matrix[1, 1]
                doc["bbox"] = [round(float(r.bbox[0] * sx), 2), round(float(r.bbox[1] * sy), 2),
                               round(float(r.bbox[2] * sx), 2), round(float(r.bbox[3] * sy), 2)]
            sample = {"__key__": r.key, "jpg": prep.jpeg}
            if s.flow and r.partner:
                flow = _flow(r, placed, s, faces)
                if flow is not None:
                    sample["flow.npy"] = flow
                    doc["flow_partner"] = r.partner_key
                    faces["flow"] += 1
            sample["json"] = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
            # tarfile's running archive offset: where this sample's first header goes (the stream-mode writer
            # buffers, so f.tell() lags behind it).
            start = sink.tarstream.offset
            sink.write(sample)
            span = sink.tarstream.offset - start
            if prep.converted:
                converted[prep.converted] += 1
            faces[f"aligned-{placed.aligned}"] += 1
            faces["with-landmarks" if placed.landmarks is not None else "no-landmarks"] += 1
            if placed.dropped:
                faces["implausible-landmarks"] += 1
            row = {"key": r.key, "shard": task["name"], "position": len(rows), "tar_offset": start,
                   "tar_size": span, "fold": task["fold"],
                   "split": r.split, "corpus": scan.corpus, "subject": r.subject, "sequence": r.sequence,
                   "frame": r.frame, "expression": r.expression, "width": prep.width, "height": prep.height,
                   "source": doc["source"], "aligned": placed.aligned, "has_flow": "flow.npy" in sample,
                   "landmarks_x": [p[0] for p in placed.landmarks] if placed.landmarks else None,
                   "landmarks_y": [p[1] for p in placed.landmarks] if placed.landmarks else None}
            for j, au in enumerate(scan.aus):
                row[au_name(au)] = (r.occurrence[j] if r.mask[j] else -1)
            rows.append(row)
        sink.close()
    sha = sha256(out / task["name"])
    state = out / STATE_DIR
    atomic_write(state / f"{task['name']}.parquet", parquet_bytes(rows, scan))
    stats = {"name": task["name"], "fold": task["fold"], "split": task["split"], "samples": len(rows),
             "sha256": sha, "bytes": (out / task["name"]).stat().st_size, "plan_sha": task["plan_sha"],
             "skipped": skipped, "converted": dict(converted), "faces": dict(sorted(faces.items()))}
    atomic_write(state / f"{task['name']}.json", json_bytes(stats))  # written last: marks the shard done
    return stats


def schema(scan: Scan) -> pa.Schema:
    fields_ = [("key", pa.string()), ("shard", pa.string()), ("position", pa.int32()), ("tar_offset", pa.int64()),
               ("tar_size", pa.int64()), ("fold", pa.int16()),
               ("split", pa.string()), ("corpus", pa.string()), ("subject", pa.string()), ("sequence", pa.string()),
               ("frame", pa.int32()), ("expression", pa.int8()), ("width", pa.int32()), ("height", pa.int32()),
               ("source", pa.string()), ("aligned", pa.string()), ("has_flow", pa.bool_()),
               ("landmarks_x", pa.list_(pa.float32())), ("landmarks_y", pa.list_(pa.float32()))]  # 68 or null
    fields_ += [(au_name(au), pa.int8()) for au in scan.aus]  # 1 / 0, -1 = unknown
    return pa.schema(fields_)


def parquet_bytes(rows: list[dict], scan: Scan) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema(scan)), sink)
    return sink.getvalue().to_pybytes()
