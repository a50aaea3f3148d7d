"""Corpus adapters: each reads one corpus in the layout its owners have on disk and yields Records.

An adapter only reads labels and lists images; it never decodes pixels (the shard workers do, in parallel).
Layouts and unknown markers are those of ../shared/AU-DATA.md. A malformed label file raises LabelError naming
the file and line; mismatches between labels and images are reported as skips, never fatal. Label files are
read as UTF-8 text, streamed row by row (``ssau.readfile.csv_rows`` / ``text_lines``: a FIFO, another encoding or
a line of megabytes is one line of error, and memory follows one row, not the file).
"""

from __future__ import annotations

import math
import os
import re
import urllib.parse
from pathlib import Path
from typing import Callable, Iterator

from ssau.aus import EXPRESSIONS, STANDARD_AUS, parse_au
from ssau.errors import InputError, LabelError
from ssau.readfile import csv_rows, load_json, read_text, text_lines
from ssau.shard.images import exception_detail
from ssau.shard.records import (IMAGE_EXTS, AdapterArgs, Record, Scan, list_images, parse_int, present, require_dir,
                                safe_key, screen)

__all__ = ["ADAPTERS", "AdapterArgs", "IMAGE_EXTS", "LabelError", "Record", "Scan", "screen"]


def _rows(rows, header: list[str], path) -> Iterator[tuple[str, list[str]]]:
    """(file:line, row) for each non-empty row after a CSV's header; a row of another width is one LabelError."""
    for lineno, row in enumerate(rows, 2):
        if not row:
            continue
        where = f"{path}:{lineno}"
        if len(row) != len(header):
            raise LabelError(f"{where}: {len(row)} fields, header has {len(header)}")
        yield where, row


# ---------------------------------------------------------------------------------------------------- BP4D
def scan_bp4d(a: AdapterArgs) -> Scan:
    aus = a.aus or STANDARD_AUS["bp4d"]
    images = require_dir(a.images, "--images")
    labels = require_dir(a.labels, "--labels")
    if (labels / "AUCoding" / "AU_OCC").is_dir():
        labels = labels / "AUCoding" / "AU_OCC"
    frames: dict[tuple[str, str], dict[int, Path]] = {}
    for sub in sorted(p for p in images.iterdir() if p.is_dir()):
        for task in sorted(p for p in sub.iterdir() if p.is_dir()):
            seq = frames.setdefault((sub.name, task.name), {})
            for img in sorted(task.iterdir()):
                if img.suffix.lower() in IMAGE_EXTS and re.fullmatch(r"[0-9]{1,18}", img.stem):  # an int64 frame
                    seq[int(img.stem)] = img
    records, skipped, seen, listed = [], [], set(), set()
    for csv_path in sorted(labels.glob("*.csv")):
        m = re.fullmatch(r"(.+)_([^_]+)", csv_path.stem)
        if m is None:
            raise LabelError(f"{csv_path}: name is not <subject>_<task>.csv")
        subject, task = m.groups()
        seen.add((subject, task))
        seq = frames.get((subject, task), {})
        rows = csv_rows(csv_path, "label file")
        header = next(rows, None)
        if not header or header[0].strip() != "0":
            raise LabelError(f"{csv_path}:1: header must start with column '0' (the frame number)")
        cols = {}
        for j, name in enumerate(header[1:], 1):
            au = parse_au(name)
            if au is None:
                raise LabelError(f"{csv_path}:1: column {name[:40]!r} is not an AU number")
            cols[au] = j
        for where, row in _rows(rows, header, csv_path):
            frame = parse_int(row[0], where)
            occ, mask = [], []
            for au in aus:
                v = parse_int(row[cols[au]], where) if au in cols else 9
                if v not in (0, 1, 9):
                    raise LabelError(f"{where}: AU{au:02d} value {v} is not 0, 1 or 9")
                occ.append(1 if v == 1 else 0)
                mask.append(0 if v == 9 else 1)  # 9 = not coded: masked, never positive
            img = seq.get(frame)
            if img is None:
                skipped.append({"input": f"{where}", "reason": "label-without-image"})
                continue
            listed.add(img)
            records.append(Record(key=f"{safe_key(subject)}_{safe_key(task)}_{frame:06d}", source=str(img),
                                  subject=subject, sequence=task, frame=frame, occurrence=occ, mask=mask,
                                  origin=where))
    for (subject, task), seq in sorted(frames.items()):
        skipped.extend({"input": str(p), "reason": "image-without-label"} for p in seq.values() if p not in listed)
    return Scan("bp4d", aus, records, skipped, labelled=True)


# ---------------------------------------------------------------------------------------------------- DISFA
TEMPLATE_FIELDS = {"subject": "the subject id (SN001)", "frame": "the 1-based label frame",
                   "index": "the 0-based frame index (frame - 1), as 0-based extractions name their files"}


def _frame_path(images: Path, template: str, subject: str, frame: int) -> Path:
    return images / template.format(subject=subject, frame=frame, index=frame - 1)


def check_frame_template(template: str) -> None:
    """LabelError, one line, unless ``template`` formats with the fields of TEMPLATE_FIELDS."""
    try:
        template.format(subject="SN001", frame=1, index=0)
    except Exception as e:  # KeyError, IndexError, TypeError ({frame[0]}), AttributeError, ValueError (a bad spec)
        what = f"unknown field {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise LabelError(f"--frame-template {template!r}: {what}; allowed fields: "
                         + ", ".join(f"{{{k}}} ({v})" for k, v in TEMPLATE_FIELDS.items())) from None


def scan_disfa(a: AdapterArgs) -> Scan:
    aus = a.aus or STANDARD_AUS["disfa"]
    images = require_dir(a.images, "--images")
    labels = require_dir(a.labels, "--labels")
    if a.frame_template is not None:
        check_frame_template(a.frame_template)
    zero_based: list[str] = []  # subjects whose files look 0-based while the template reads 1-based frames
    one_based: list[str] = []  # and the other way round
    if (labels / "ActionUnit_Labels").is_dir():
        labels = labels / "ActionUnit_Labels"
    records, skipped = [], []
    for sub in sorted(p for p in labels.iterdir() if p.is_dir()):
        subject = sub.name
        per_au: dict[int, dict[int, float]] = {}
        conflicts: dict[int, str] = {}  # frame -> the AU file line that contradicts an earlier one
        for txt in sorted(sub.glob(f"{subject}_au*.txt")):
            au = parse_int(txt.stem.split("_au")[-1], f"{txt}:0")
            table = per_au[au] = {}
            for lineno, line in enumerate(text_lines(txt, "label file"), 1):
                if not line.strip():
                    continue
                parts = line.strip().split(",")
                where = f"{txt}:{lineno}"
                if len(parts) != 2:
                    raise LabelError(f"{where}: expected 'frame,intensity', found {line.strip()[:80]!r}")
                frame, value = parse_int(parts[0], where), parse_int(parts[1], where)
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
        if a.frame_template is not None:
            last = max(set().union(*per_au.values()))
            if "{index" not in a.frame_template and _frame_path(images, a.frame_template, subject, 0).is_file():
                zero_based.append(subject)  # {frame} on 0-based files: every label one frame early
            elif "{index" in a.frame_template and not _frame_path(images, a.frame_template, subject, 1).is_file() \
                    and _frame_path(images, a.frame_template, subject, last + 1).is_file():
                one_based.append(subject)  # {index} on 1-based files: every label one frame late
        if a.frame_template is None:
            video = images / f"LeftVideo{subject}_comp.avi"
            if not present(video):  # a FIFO by that name: its frames are skipped, counted, by the workers
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
                path = _frame_path(images, a.frame_template, subject, frame)
                if not present(path):
                    skipped.append({"input": f"{subject} frame {frame}: {path}", "reason": "label-without-image"})
                    continue
                source = str(path)
            records.append(Record(key=f"{safe_key(subject)}_{frame:06d}", source=source, subject=subject,
                                  sequence=subject, frame=frame, occurrence=occ, mask=mask,
                                  intensity=[max(v, 0.0) for v in inten], origin=f"{subject} frame {frame}"))
    warnings = []
    if zero_based:
        warnings.append(f"--frame-template {a.frame_template!r}: {len(zero_based)} subject(s) ({', '.join(zero_based[:3])}"
                        f"{', ...' if len(zero_based) > 3 else ''}) have a frame-0 image but DISFA labels start at "
                        f"frame 1: the frames look 0-based, and {{frame}} would shift every label by one frame; "
                        f"use {{index}} (0-based) instead")
    if one_based:
        warnings.append(f"--frame-template {a.frame_template!r}: {len(one_based)} subject(s) ({', '.join(one_based[:3])}"
                        f"{', ...' if len(one_based) > 3 else ''}) have no index-0 image but one past the last label "
                        f"frame: the frames look 1-based, and {{index}} would shift every label by one frame; use "
                        f"{{frame}} instead")
    return Scan("disfa", aus, records, skipped, labelled=True, warnings=warnings)


# ---------------------------------------------------------------------------------------------------- EmotioNet
def _binary(value: str, unknown: str, where: str, au: int) -> tuple[int, int]:
    """(occurrence, mask) for a 0/1/unknown cell."""
    v = value.strip()
    if v == unknown.strip():
        return 0, 0
    if v in ("0", "1", "0.0", "1.0"):
        return int(float(v)), 1
    raise LabelError(f"{where}: AU{au:02d} value {v[:40]!r} is not 0, 1 or the unknown marker {unknown!r}")


def scan_emotionet(a: AdapterArgs) -> Scan:
    aus = a.aus or STANDARD_AUS["emotionet"]
    images = require_dir(a.images, "--images")
    if a.labels is None or not a.labels.exists():
        raise LabelError(f"--labels {a.labels} does not exist")
    files = sorted(a.labels.glob("*.txt")) if a.labels.is_dir() else [a.labels]
    local = {}
    for p in list_images(images):
        local.setdefault(p.name, p)
    records, skipped = [], []
    for path in files:
        for lineno, line in enumerate(text_lines(path, "label file"), 1):
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
            records.append(Record(key=safe_key(Path(name).stem), source=str(img), occurrence=list(occ),
                                  mask=list(mask), origin=where))
    return Scan("emotionet", aus, records, skipped, labelled=True)


# ---------------------------------------------------------------------------------------------------- CSV
def scan_csv(a: AdapterArgs) -> Scan:
    if a.labels is None or not a.labels.is_file():
        raise LabelError(f"--labels {a.labels} is not a file (the csv manifest)")
    images = require_dir(a.images if a.images is not None else a.labels.parent, "--images")
    records, skipped = [], []
    rows = csv_rows(a.labels, "manifest")
    header = [h.strip() for h in next(rows, [])]
    lower = [h.lower() for h in header]
    col = next((lower.index(c) for c in ("image", "path", "file") if c in lower), None)
    if col is None:
        raise LabelError(f"{a.labels}:1: no 'image' column in header {str(header)[:200]}")
    au_cols = {parse_au(h): j for j, h in enumerate(header) if j != col and parse_au(h) is not None}
    aus = a.aus or tuple(sorted(au_cols))
    missing = [au for au in aus if au not in au_cols]
    if missing:
        raise LabelError(f"{a.labels}:1: no column for AU{missing[0]:02d} in header {str(header)[:200]}")
    opt = {name: lower.index(name) if name in lower else None
           for name in ("subject", "sequence", "frame", "expression")}
    for where, row in _rows(rows, header, a.labels):
        occ, mask = zip(*(_binary(row[au_cols[au]], a.unknown, where, au) for au in aus)) if aus else ((), ())
        expr = -1
        if opt["expression"] is not None and row[opt["expression"]].strip():
            expr = _expression(row[opt["expression"]], where)
        path = images / row[col].strip()
        if not present(path):
            skipped.append({"input": f"{where} {path}", "reason": "label-without-image"})
            continue
        subject = row[opt["subject"]].strip() if opt["subject"] is not None else ""
        sequence = row[opt["sequence"]].strip() if opt["sequence"] is not None else ""
        frame = parse_int(row[opt["frame"]], where) if opt["frame"] is not None else -1
        stem = Path(row[col].strip()).with_suffix("").as_posix()
        records.append(Record(key=safe_key(stem), source=str(path), subject=subject, sequence=sequence, frame=frame,
                              occurrence=list(occ), mask=list(mask), expression=expr, origin=where))
    return Scan("csv", tuple(aus), records, skipped, labelled=True)


def _expression(text: str, where: str) -> int:
    t = text.strip().lower()
    if t in EXPRESSIONS:
        return EXPRESSIONS.index(t)
    if t.isdigit() and int(t) < len(EXPRESSIONS):
        return int(t)
    raise LabelError(f"{where}: expression {text.strip()[:40]!r} is not one of {', '.join(EXPRESSIONS)} or 0-6")


# ---------------------------------------------------------------------------------------------------- RAF-DB
RAFDB_IMAGES = ("basic/Image/aligned", "Image/aligned", "aligned")
RAFDB_LABELS = ("basic/EmoLabel/list_patition_label.txt", "EmoLabel/list_patition_label.txt",
                "list_patition_label.txt")


def _rafdb_paths(images: Path, labels: Path | None) -> tuple[Path, Path]:
    """Accept the corpus root or ``basic/`` as well as the image folder itself, and the label file's folders."""
    for sub in RAFDB_IMAGES:
        if (images / sub).is_dir() and not any(images.glob("*_aligned.jpg")):
            images = images / sub
            break
    if labels is None or labels.is_dir():
        roots = [labels] if labels is not None else [images] + list(images.parents)[:3]
        found = next((r / sub for r in roots for sub in RAFDB_LABELS if (r / sub).is_file()), None)
        if found is None:
            raise LabelError(f"--labels {labels or '(not given)'}: no list_patition_label.txt "
                             f"(looked for {', '.join(RAFDB_LABELS)} under {', '.join(map(str, roots))})")
        labels = found
    if not labels.is_file():
        raise LabelError(f"--labels {labels} is not a file (list_patition_label.txt)")
    return images, labels


def scan_rafdb(a: AdapterArgs) -> Scan:
    images, labels = _rafdb_paths(require_dir(a.images, "--images"), a.labels)
    a = AdapterArgs(images, labels, a.aus, a.unknown, a.frame_template, a.active_threshold)
    records, skipped, named = [], [], set()
    for lineno, line in enumerate(text_lines(a.labels, "label file"), 1):
        if not line.strip():
            continue
        where = f"{a.labels}:{lineno}"
        parts = line.split()
        if len(parts) != 2 or "_" not in parts[0]:
            raise LabelError(f"{where}: expected '<split>_<n>.jpg <label>', found {line.strip()[:80]!r}")
        label = parse_int(parts[1], where)
        if not 1 <= label <= 7:
            raise LabelError(f"{where}: label {label} is not 1-7")
        stem = Path(parts[0]).stem
        path = next((p for p in (images / f"{stem}_aligned.jpg", images / parts[0]) if present(p)), None)
        named.add(f"{stem}_aligned.jpg")
        named.add(parts[0])
        if path is None:
            skipped.append({"input": f"{where} {parts[0]}", "reason": "label-without-image"})
            continue
        records.append(Record(key=safe_key(stem), source=str(path), expression=label - 1,
                              split=stem.split("_", 1)[0], origin=where))
    skipped.extend({"input": str(p), "reason": "image-without-label"}
                   for p in list_images(images) if p.name not in named)
    return Scan("rafdb", (), records, skipped, labelled=False,
                searched=f"{images} (as <name>_aligned.jpg or <name>.jpg, for the names in {labels})")


# ---------------------------------------------------------------------------------------------------- folder
def _sidecar(img: Path) -> tuple[list | None, list | None, str | None]:
    """MegaFace-style ``<image>.json``: bounding_box {x,y,width,height}, landmarks {"0": {x,y}, ...} (68 iBUG
    points, or 5: eye centres, nose tip, mouth corners). -> (points, bbox, problem)."""
    side = img.with_name(img.name + ".json")
    if not os.path.lexists(side):
        return None, None, None
    try:  # a FIFO, a broken link, over 1 MiB, not UTF-8, nested without bound: one counted note, never a hang
        doc = load_json(read_text(side, "sidecar", limit=1 << 20), str(side))
        points = bbox = problem = None
        if "bounding_box" in doc:
            b = doc["bounding_box"]
            bbox = [float(b["x"]), float(b["y"]), float(b["width"]), float(b["height"])]
            if not all(math.isfinite(v) for v in bbox):
                raise ValueError("a bounding_box coordinate is not a finite number")
        if "landmarks" in doc:
            pts = doc["landmarks"]
            points = [[float(pts[k]["x"]), float(pts[k]["y"])] for k in sorted(pts, key=int)]
            if len(points) not in (5, 68) or not all(math.isfinite(c) for p in points for c in p):
                problem = (f"{side}: {len(points)} landmarks ignored (68 iBUG points or 5 are read, "
                           f"all finite); the box is kept")
                points = None
        return points, bbox, problem
    except InputError as e:
        return None, None, str(e)
    except OSError as e:
        return None, None, f"{side}: {e.strerror or e}"
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as e:  # float(10**400) overflows
        return None, None, f"{side}: {type(e).__name__}: {exception_detail(e)}"


def scan_folder(a: AdapterArgs) -> Scan:
    images = require_dir(a.images, "--images")
    records, skipped = [], []
    for img in list_images(images):
        rel = img.relative_to(images).with_suffix("").as_posix()
        points, bbox, problem = _sidecar(img)
        if problem:
            skipped.append({"input": problem, "reason": "bad-sidecar-ignored"})
        records.append(Record(key=safe_key(rel), source=str(img), points=points, bbox=bbox))
    return Scan("folder", (), records, skipped, labelled=False)


ADAPTERS: dict[str, Callable[[AdapterArgs], Scan]] = {
    "bp4d": scan_bp4d,
    "disfa": scan_disfa,
    "emotionet": scan_emotionet,
    "csv": scan_csv,
    "rafdb": scan_rafdb,
    "folder": scan_folder,
}
