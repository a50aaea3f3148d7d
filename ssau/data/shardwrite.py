"""Writing one shard (the shard workers' side of `ssau shard`; the driver is ``ssau.data.shard``).

A worker gets a task (a shard name and its records, in plan order) and writes ``<name>.tar`` under a temporary
name, its index part and its stats file, each renamed into place; the stats file comes last and marks the shard
done. Every sample's pixels, landmarks, alignment and flow come from ``ssau.data.faces``; whatever one input holds
costs that input (a skip entry with its reason), never the shard.

Per-sample json, schema version 2 (``SCHEMA_VERSION``; a sample without ``schema_version`` is version 1). Every
sample of every format has exactly these keys with these types, so a mixed list of shards reads as one table;
"absent" is a value of the key's own type, never a missing key or a null:

    key              type          absent   meaning
    schema_version   int           -        2
    corpus           str           -        bp4d | disfa | emotionet | csv | rafdb | folder
    key              str           -        the sample's key (tar member names are ``<key>.<ext>``)
    source           str           -        the input, relative to dataset.json ``images_root``, POSIX separators;
                                            a video frame is ``<video>#<0-based frame index>``
    subject          str           ""
    sequence         str           ""       task / video / sequence id
    frame            int           -1       the corpus's frame number
    split            str           ""       the corpus's split (RAF-DB train / test)
    fold             int           0        0 = no --folds
    aus              list[int]     []       the corpus's AU ids (1 = AU01), the order of the lists below
    au_names         list[str]     []       the same AUs named as in the index and MLflow: "AU01", ...
    occurrence       list[int]     []       per AU: 1 present, 0 absent, -1 unknown (not coded)
    mask             list[int]     []       per AU: 1 coded, 0 unknown (= occurrence != -1)
    intensity        list[float]   []       per AU: 0-5, -1.0 unknown (every AU of a corpus without intensities)
    expression       int           -1       index into ssau.aus.EXPRESSIONS
    expression_name  str           ""       its name
    width, height    int           -        the stored image's size
    aligned          str           -        how the face was placed: landmarks | bbox | detector | none
    align_margin     float         -1.0     --align's margin; -1.0 when the shard was not aligned
    landmarks        list[[x, y]]  []       68 iBUG points (float) in the stored image's pixels
    bbox             list[float]   []       the sidecar's face box x, y, w, h in stored pixels (not aligned)
    flow_partner     str           ""       the key of frame t+K whose flow ``flow.npy`` holds

Typed readers that infer column types from a few samples read an empty list as null and then fail on a later
non-empty one (Hugging Face ``datasets`` infers from the first 5 samples of the first tar, so shards whose first
samples have no landmarks or box fail with "Couldn't cast array of type double to null"): ``sample_arrow_type()``
is this table as an Arrow struct to hand them instead, and ``hf_features()`` the whole sample as ``datasets``
Features: ``load_dataset("webdataset", data_files=..., features=hf_features())``.

Version 1 (before issue 13) left out ``aus``/``occurrence``/``mask``/``intensity`` for corpora without AUs, stored
``intensity: null`` for BP4D, ``expression_name: null``, omitted landmarks, bbox, align_margin, flow_partner and
au_names when absent, wrote 0 (with mask 0) for unknown occurrences and an absolute ``source``. ssau's reader
(``ssau.data.decode``) reads both alike.

Index (``index.parquet``): one row per sample; ``position`` is the sample's 0-based position in its shard (called
``offset`` before issue 13), ``tar_offset`` the byte offset in the shard of the sample's first tar member's header
and ``tar_size`` the bytes its members take, headers and padding included: ``f.seek(tar_offset)`` then
``f.read(tar_size)`` is a small tar of that sample alone.
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
from ssau.data.records import SCHEMA_VERSION, Record, Scan
from ssau.data.faces import FaceOptions, Placed, flow_bytes, place
from ssau.data.images import JPEG_QUALITY, SkipImage, exception_detail
from ssau.data.video import keep_frames, read_source, split_source

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
    flow: int = 0
    flow_size: int = 64
    flow_clip: float = 20.0

    def fingerprint(self) -> dict:
        """The settings that decide the output. Face settings at their defaults are left out, so a directory
        sharded before they existed is not refused as made with other settings; its shards are rewritten once
        (each shard's plan now names its samples' face inputs), then resume as usual."""
        d = asdict(self)
        d["aus"] = list(self.aus) if self.aus else None
        since_faces = [f for f in fields(self) if f.name in _FACE_FIELDS]
        return {k: v for k, v in d.items() if k not in _FACE_FIELDS} | {
            f.name: d[f.name] for f in since_faces if d[f.name] != f.default}

    def faces(self, want_gray: bool = False) -> FaceOptions:
        return FaceOptions(resize=self.resize, quality=self.quality, align=self.align, margin=self.align_margin,
                           points=self.align_points, detect=self.detect, flow_size=self.flow_size,
                           flow_clip=self.flow_clip, want_gray=want_gray)


_FACE_FIELDS = ("landmarks", "landmark_pattern", "landmark_frames", "landmark_frame_column", "min_landmark_confidence",
                "require_landmarks", "align", "align_margin", "align_points", "detect", "flow", "flow_size",
                "flow_clip")


def atomic_write(path: Path, data: bytes) -> None:
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


def sample_arrow_type() -> pa.StructType:
    """The per-sample json of schema version 2 (module doc) as an Arrow struct, fields in the json's (sorted) order."""
    i64, f64, text = pa.int64(), pa.float64(), pa.string()
    kinds = {"schema_version": i64, "corpus": text, "key": text, "source": text, "subject": text, "sequence": text,
             "frame": i64, "split": text, "fold": i64, "aus": pa.list_(i64), "au_names": pa.list_(text),
             "occurrence": pa.list_(i64), "mask": pa.list_(i64), "intensity": pa.list_(f64), "expression": i64,
             "expression_name": text, "width": i64, "height": i64, "aligned": text, "align_margin": f64,
             "landmarks": pa.list_(pa.list_(f64)), "bbox": pa.list_(f64), "flow_partner": text}
    return pa.struct(sorted(kinds.items()))


def hf_features(flow_shape: tuple[int, int, int] | None = None):
    """A shard sample as Hugging Face ``datasets`` Features (its ``webdataset`` builder's fields: ``__key__``,
    ``__url__``, the image ``jpg``, the ``json`` doc typed as ``sample_arrow_type()``; ``flow.npy`` as a float16
    Array3D of ``flow_shape`` = (2, h, w) for shards written with --flow). Needs the ``datasets`` package."""
    import datasets

    doc = datasets.Features.from_arrow_schema(pa.schema(list(sample_arrow_type())))
    out = {"__key__": datasets.Value("string"), "__url__": datasets.Value("string"), "jpg": datasets.Image(),
           "json": dict(doc)}
    if flow_shape is not None:
        out["flow.npy"] = datasets.Array3D(shape=tuple(flow_shape), dtype="float16")
    return datasets.Features(out)


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
    tmp = _OUT / f".{task['name']}.tmp-{os.getpid()}"
    try:
        return _write_shard_to(task, tmp)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
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
        return place(read_source(r.source), r.points, r.bbox, s.faces(want_gray=bool(s.flow and r.partner))), None
    except Exception as e:  # a reader bug on one input must cost that input, not the run
        return None, _skip_entry(r.source, e)


def _flow(r: Record, placed: Placed, s: ShardSettings, notes: Counter) -> bytes | None:
    try:
        return flow_bytes(placed, read_source(r.partner), s.faces())
    except Exception as e:  # the partner frame's problem: this sample keeps its image, loses its flow
        notes[f"flow-{_skip_entry(r.partner, e)['reason'].removeprefix('flow-')}"] += 1
        return None


def _write_shard_to(task: dict, tmp: Path) -> dict:
    scan, s, out = _SCAN, _SETTINGS, _OUT
    rows, skipped, converted, faces = [], [], Counter(), Counter()
    with open(tmp, "wb") as f:
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
        f.flush()
        os.fsync(f.fileno())
    sha = sha256(tmp)
    os.replace(tmp, out / task["name"])
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
