"""Corpus adapters: each reads one corpus in the layout its owners have on disk and yields Records.

An adapter only reads labels and lists images; it never decodes pixels (the shard workers do, in parallel).
Layouts and unknown markers are those of ../shared/AU-DATA.md. A malformed label file raises LabelError naming
the file and line; mismatches between labels and images are reported as skips, never fatal.

``screen`` then vets every adapter's records alike. A source that resolves (``..``, an absolute path, a symlink)
outside the resolved ``--images`` root is skipped as ``outside-images``: a manifest never makes ssau read other
files (link the whole root elsewhere if need be, not files or folders inside it). An image listed more than once
(two rows, one URL twice, two URLs with one basename, two names of one file) is one sample when the labels agree,
the other listings skipped as ``duplicate-row``; when they disagree there is no telling which is right, so every
listing is skipped as ``conflicting-labels``, naming the others: the run goes on, and dataset.json says why.
"""

from __future__ import annotations

import csv
import json
import os
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ssau.aus import EXPRESSIONS, STANDARD_AUS, parse_au
from ssau.data.video import split_source

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class LabelError(Exception):
    """A label file that cannot be read as its format says; the message names the file and the line."""


@dataclass
class Record:
    """One sample to be: where its pixels are, and everything known about it."""

    key: str
    source: str  # an image path, or "<video path>#<0-based frame index>"
    subject: str = ""
    sequence: str = ""
    frame: int = -1
    occurrence: list[int] | None = None  # per AU of the corpus list: 1/0 (meaningless where mask is 0)
    mask: list[int] | None = None  # 1 = coded, 0 = unknown
    intensity: list[float] | None = None
    expression: int = -1
    split: str = ""
    meta: dict = field(default_factory=dict)  # landmarks, bbox
    origin: str = ""  # the label line that listed it ("file:line"), for skip reports; not stored in shards


@dataclass
class Scan:
    corpus: str
    aus: tuple[int, ...]
    records: list[Record]
    skipped: list[dict]  # {"input": ..., "reason": ...}
    labelled: bool


@dataclass(frozen=True)
class AdapterArgs:
    images: Path
    labels: Path | None
    aus: tuple[int, ...] | None
    unknown: str  # the marker for "not coded" in csv / emotionet files
    frame_template: str | None  # disfa: where extracted frames are, relative to images
    active_threshold: float  # disfa: intensity at which an AU counts as active


def _safe(text: str) -> str:
    # webdataset splits a member name at its first dot, so keys carry none.
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "x"


def _list_images(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        out.extend(Path(dirpath) / f for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTS))
    return out


def _require_dir(path: Path | None, what: str) -> Path:
    if path is None:
        raise LabelError(f"{what} is required for this format")
    if not path.is_dir():
        raise LabelError(f"{what} {path} is not a directory")
    return path


def _int(text: str, where: str) -> int:
    try:
        return int(float(text)) if re.fullmatch(r"-?\d+(\.0*)?", text.strip()) else int(text)
    except ValueError:
        raise LabelError(f"{where}: expected an integer, found {text.strip()!r}") from None


# ---------------------------------------------------------------------------------------------------- BP4D
def scan_bp4d(a: AdapterArgs) -> Scan:
    aus = a.aus or STANDARD_AUS["bp4d"]
    images = _require_dir(a.images, "--images")
    labels = _require_dir(a.labels, "--labels")
    if (labels / "AUCoding" / "AU_OCC").is_dir():
        labels = labels / "AUCoding" / "AU_OCC"
    frames: dict[tuple[str, str], dict[int, Path]] = {}
    for sub in sorted(p for p in images.iterdir() if p.is_dir()):
        for task in sorted(p for p in sub.iterdir() if p.is_dir()):
            seq = frames.setdefault((sub.name, task.name), {})
            for img in sorted(task.iterdir()):
                if img.suffix.lower() in IMAGE_EXTS and img.stem.isdigit():
                    seq[int(img.stem)] = img
    records, skipped, seen, listed = [], [], set(), set()
    for csv_path in sorted(labels.glob("*.csv")):
        m = re.fullmatch(r"(.+)_([^_]+)", csv_path.stem)
        if m is None:
            raise LabelError(f"{csv_path}: name is not <subject>_<task>.csv")
        subject, task = m.groups()
        seen.add((subject, task))
        seq = frames.get((subject, task), {})
        with open(csv_path, newline="") as f:
            rows = csv.reader(f)
            header = next(rows, None)
            if not header or header[0].strip() != "0":
                raise LabelError(f"{csv_path}:1: header must start with column '0' (the frame number)")
            cols = {}
            for j, name in enumerate(header[1:], 1):
                au = parse_au(name)
                if au is None:
                    raise LabelError(f"{csv_path}:1: column {name!r} is not an AU number")
                cols[au] = j
            for lineno, row in enumerate(rows, 2):
                if not row:
                    continue
                where = f"{csv_path}:{lineno}"
                if len(row) != len(header):
                    raise LabelError(f"{where}: {len(row)} fields, header has {len(header)}")
                frame = _int(row[0], where)
                occ, mask = [], []
                for au in aus:
                    v = _int(row[cols[au]], where) if au in cols else 9
                    if v not in (0, 1, 9):
                        raise LabelError(f"{where}: AU{au:02d} value {v} is not 0, 1 or 9")
                    occ.append(1 if v == 1 else 0)
                    mask.append(0 if v == 9 else 1)  # 9 = not coded: masked, never positive
                img = seq.get(frame)
                if img is None:
                    skipped.append({"input": f"{where}", "reason": "label-without-image"})
                    continue
                listed.add(img)
                records.append(Record(key=f"{_safe(subject)}_{_safe(task)}_{frame:06d}", source=str(img),
                                      subject=subject, sequence=task, frame=frame, occurrence=occ, mask=mask,
                                      origin=where))
    for (subject, task), seq in sorted(frames.items()):
        skipped.extend({"input": str(p), "reason": "image-without-label"} for p in seq.values() if p not in listed)
    return Scan("bp4d", aus, records, skipped, labelled=True)


# ---------------------------------------------------------------------------------------------------- DISFA
def scan_disfa(a: AdapterArgs) -> Scan:
    aus = a.aus or STANDARD_AUS["disfa"]
    images = _require_dir(a.images, "--images")
    labels = _require_dir(a.labels, "--labels")
    if (labels / "ActionUnit_Labels").is_dir():
        labels = labels / "ActionUnit_Labels"
    records, skipped = [], []
    for sub in sorted(p for p in labels.iterdir() if p.is_dir()):
        subject = sub.name
        per_au: dict[int, dict[int, float]] = {}
        conflicts: dict[int, str] = {}  # frame -> the AU file line that contradicts an earlier one
        for txt in sorted(sub.glob(f"{subject}_au*.txt")):
            au = _int(txt.stem.split("_au")[-1], f"{txt}:0")
            table = per_au[au] = {}
            with open(txt) as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    parts = line.strip().split(",")
                    where = f"{txt}:{lineno}"
                    if len(parts) != 2:
                        raise LabelError(f"{where}: expected 'frame,intensity', found {line.strip()!r}")
                    frame, value = _int(parts[0], where), _int(parts[1], where)
                    if not 0 <= value <= 5 or frame < 1:
                        raise LabelError(f"{where}: frame {frame} intensity {value} (frames from 1, intensity 0-5)")
                    if frame in table:
                        if table[frame] != value:
                            conflicts.setdefault(frame, where)
                        else:
                            skipped.append({"input": where, "reason": "duplicate-row"})
                        continue
                    table[frame] = float(value)
        if not per_au:
            continue
        video = None
        if a.frame_template is None:
            video = images / f"LeftVideo{subject}_comp.avi"
            if not video.is_file():
                n = len(set().union(*per_au.values()))
                skipped.append({"input": str(video), "reason": "video-missing", "count": n})
                continue
        for frame in sorted(set().union(*per_au.values())):
            if frame in conflicts:
                skipped.append({"input": f"{subject} frame {frame}", "reason": "conflicting-labels",
                                "detail": f"{conflicts[frame]} contradicts an earlier line"})
                continue
            inten = [per_au.get(au, {}).get(frame, -1.0) for au in aus]
            mask = [int(v >= 0) for v in inten]
            occ = [int(v >= a.active_threshold) for v in inten]
            if video is not None:
                source = f"{video}#{frame - 1}"  # label frames are 1-based, decoded frames 0-based
            else:
                path = images / a.frame_template.format(subject=subject, frame=frame)
                if not path.is_file():
                    skipped.append({"input": f"{subject} frame {frame}: {path}", "reason": "label-without-image"})
                    continue
                source = str(path)
            records.append(Record(key=f"{_safe(subject)}_{frame:06d}", source=source, subject=subject,
                                  sequence=subject, frame=frame, occurrence=occ, mask=mask,
                                  intensity=[max(v, 0.0) for v in inten], origin=f"{subject} frame {frame}"))
    return Scan("disfa", aus, records, skipped, labelled=True)


# ---------------------------------------------------------------------------------------------------- EmotioNet
def _binary(value: str, unknown: str, where: str, au: int) -> tuple[int, int]:
    """(occurrence, mask) for a 0/1/unknown cell."""
    v = value.strip()
    if v == unknown.strip():
        return 0, 0
    if v in ("0", "1", "0.0", "1.0"):
        return int(float(v)), 1
    raise LabelError(f"{where}: AU{au:02d} value {v!r} is not 0, 1 or the unknown marker {unknown!r}")


def scan_emotionet(a: AdapterArgs) -> Scan:
    aus = a.aus or STANDARD_AUS["emotionet"]
    images = _require_dir(a.images, "--images")
    if a.labels is None or not a.labels.exists():
        raise LabelError(f"--labels {a.labels} does not exist")
    files = sorted(a.labels.glob("*.txt")) if a.labels.is_dir() else [a.labels]
    local = {}
    for p in _list_images(images):
        local.setdefault(p.name, p)
    records, skipped = [], []
    for path in files:
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                fields = line.split()
                if not fields:
                    continue
                where = f"{path}:{lineno}"
                if len(fields) < 2 + max(aus):
                    raise LabelError(f"{where}: {len(fields)} fields; expected 2 URLs and AU values up to AU{max(aus)}")
                name = urllib.parse.unquote(urllib.parse.urlparse(fields[0]).path.rsplit("/", 1)[-1])
                occ, mask = zip(*(_binary(fields[1 + au], a.unknown, where, au) for au in aus))
                img = local.get(name)
                if img is None:
                    skipped.append({"input": f"{where} {name}", "reason": "label-without-image"})
                    continue
                records.append(Record(key=_safe(Path(name).stem), source=str(img), occurrence=list(occ),
                                      mask=list(mask), origin=where))
    return Scan("emotionet", aus, records, skipped, labelled=True)


# ---------------------------------------------------------------------------------------------------- CSV
def scan_csv(a: AdapterArgs) -> Scan:
    if a.labels is None or not a.labels.is_file():
        raise LabelError(f"--labels {a.labels} is not a file (the csv manifest)")
    images = _require_dir(a.images if a.images is not None else a.labels.parent, "--images")
    records, skipped = [], []
    with open(a.labels, newline="") as f:
        rows = csv.reader(f)
        header = [h.strip() for h in next(rows, [])]
        lower = [h.lower() for h in header]
        col = next((lower.index(c) for c in ("image", "path", "file") if c in lower), None)
        if col is None:
            raise LabelError(f"{a.labels}:1: no 'image' column in header {header}")
        au_cols = {parse_au(h): j for j, h in enumerate(header) if j != col and parse_au(h) is not None}
        aus = a.aus or tuple(sorted(au_cols))
        missing = [au for au in aus if au not in au_cols]
        if missing:
            raise LabelError(f"{a.labels}:1: no column for AU{missing[0]:02d} in header {header}")
        opt = {name: lower.index(name) if name in lower else None for name in ("subject", "sequence", "frame", "expression")}
        for lineno, row in enumerate(rows, 2):
            if not row:
                continue
            where = f"{a.labels}:{lineno}"
            if len(row) != len(header):
                raise LabelError(f"{where}: {len(row)} fields, header has {len(header)}")
            occ, mask = zip(*(_binary(row[au_cols[au]], a.unknown, where, au) for au in aus)) if aus else ((), ())
            expr = -1
            if opt["expression"] is not None and row[opt["expression"]].strip():
                expr = _expression(row[opt["expression"]], where)
            path = images / row[col].strip()
            if not path.is_file():
                skipped.append({"input": f"{where} {path}", "reason": "label-without-image"})
                continue
            subject = row[opt["subject"]].strip() if opt["subject"] is not None else ""
            sequence = row[opt["sequence"]].strip() if opt["sequence"] is not None else ""
            frame = _int(row[opt["frame"]], where) if opt["frame"] is not None else -1
            stem = Path(row[col].strip()).with_suffix("").as_posix()
            records.append(Record(key=_safe(stem), source=str(path), subject=subject, sequence=sequence, frame=frame,
                                  occurrence=list(occ), mask=list(mask), expression=expr, origin=where))
    return Scan("csv", tuple(aus), records, skipped, labelled=True)


def _expression(text: str, where: str) -> int:
    t = text.strip().lower()
    if t in EXPRESSIONS:
        return EXPRESSIONS.index(t)
    if t.isdigit() and int(t) < len(EXPRESSIONS):
        return int(t)
    raise LabelError(f"{where}: expression {text.strip()!r} is not one of {', '.join(EXPRESSIONS)} or 0-6")


# ---------------------------------------------------------------------------------------------------- RAF-DB
def scan_rafdb(a: AdapterArgs) -> Scan:
    images = _require_dir(a.images, "--images")
    if a.labels is None or not a.labels.is_file():
        raise LabelError(f"--labels {a.labels} is not a file (list_patition_label.txt)")
    records, skipped, named = [], [], set()
    with open(a.labels) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{a.labels}:{lineno}"
            parts = line.split()
            if len(parts) != 2 or "_" not in parts[0]:
                raise LabelError(f"{where}: expected '<split>_<n>.jpg <label>', found {line.strip()!r}")
            label = _int(parts[1], where)
            if not 1 <= label <= 7:
                raise LabelError(f"{where}: label {label} is not 1-7")
            stem = Path(parts[0]).stem
            path = next((p for p in (images / f"{stem}_aligned.jpg", images / parts[0]) if p.is_file()), None)
            named.add(f"{stem}_aligned.jpg")
            named.add(parts[0])
            if path is None:
                skipped.append({"input": f"{where} {parts[0]}", "reason": "label-without-image"})
                continue
            records.append(Record(key=_safe(stem), source=str(path), expression=label - 1,
                                  split=stem.split("_", 1)[0], origin=where))
    skipped.extend({"input": str(p), "reason": "image-without-label"}
                   for p in _list_images(images) if p.name not in named)
    return Scan("rafdb", (), records, skipped, labelled=False)


# ---------------------------------------------------------------------------------------------------- folder
def _sidecar(img: Path) -> tuple[dict, str | None]:
    """MegaFace-style ``<image>.json``: bounding_box {x,y,width,height}, landmarks {"0": {x,y}, ...}."""
    side = img.with_name(img.name + ".json")
    if not side.is_file():
        return {}, None
    try:
        doc = json.loads(side.read_text())
        meta = {}
        if "bounding_box" in doc:
            b = doc["bounding_box"]
            meta["bbox"] = [float(b["x"]), float(b["y"]), float(b["width"]), float(b["height"])]
        if "landmarks" in doc:
            pts = doc["landmarks"]
            meta["landmarks"] = [[float(pts[k]["x"]), float(pts[k]["y"])] for k in sorted(pts, key=int)]
        return meta, None
    except (ValueError, KeyError, TypeError) as e:
        return {}, f"{side}: {type(e).__name__}: {e}"


def scan_folder(a: AdapterArgs) -> Scan:
    images = _require_dir(a.images, "--images")
    records, skipped = [], []
    for img in _list_images(images):
        rel = img.relative_to(images).with_suffix("").as_posix()
        meta, problem = _sidecar(img)
        if problem:
            skipped.append({"input": problem, "reason": "bad-sidecar-ignored"})
        records.append(Record(key=_safe(rel), source=str(img), meta=meta))
    return Scan("folder", (), records, skipped, labelled=False)


# ---------------------------------------------------------------------------------------------------- screen
def screen(scan: Scan, images: Path) -> None:
    """Skip, in place, records that resolve outside ``images`` and images listed more than once (module doc)."""
    root = os.path.realpath(images)
    real_dirs: dict[str, str] = {}  # a corpus has few folders and many files: one realpath per folder

    def real(path: str) -> str:
        parent, name = os.path.split(path)
        if parent not in real_dirs:
            real_dirs[parent] = os.path.realpath(parent)
        full = os.path.join(real_dirs[parent], name)
        return os.path.realpath(full) if os.path.islink(full) else full

    def where(r: Record) -> str:
        return f"{r.origin} {r.source}" if r.origin else r.source

    first: dict[tuple[str, str], Record] = {}  # (real path, frame) -> the first listing, in listing order
    more: dict[tuple[str, str], list[Record]] = {}  # the later listings of the few images listed twice
    for r in scan.records:
        path, frame = split_source(r.source)
        full = real(path)
        if os.path.commonpath((root, full)) != root:
            scan.skipped.append({"input": where(r), "reason": "outside-images", "detail": f"resolves to {full}"})
        elif (full, frame) in first:
            more.setdefault((full, frame), []).append(r)
        else:
            first[(full, frame)] = r
    for ident, later in more.items():
        head = first[ident]
        if all(_labels(r) == _labels(head) for r in later):
            scan.skipped.extend({"input": where(r), "reason": "duplicate-row", "detail": f"repeats {where(head)}"}
                                for r in later)
        else:
            del first[ident]
            listed = [head, *later]
            scan.skipped.extend({"input": where(r), "reason": "conflicting-labels",
                                 "detail": "labels differ from " + "; ".join(where(o) for o in listed if o is not r)}
                                for r in listed)
    scan.records = list(first.values())


def _labels(r: Record) -> tuple:
    # Everything a sample says about the image; key, source and origin only say where the listing came from.
    return (r.subject, r.sequence, r.frame, r.occurrence, r.mask, r.intensity, r.expression, r.split, r.meta)


ADAPTERS: dict[str, Callable[[AdapterArgs], Scan]] = {
    "bp4d": scan_bp4d,
    "disfa": scan_disfa,
    "emotionet": scan_emotionet,
    "csv": scan_csv,
    "rafdb": scan_rafdb,
    "folder": scan_folder,
}
