"""`ssau shard --landmarks DIR`: the 68 facial landmarks users already have, matched to the records of a scan.

Read, one CSV per sequence (or per still image) under DIR:
- OpenFace 2.0 ``FeatureExtraction`` / ``FaceLandmarkImg`` output: ``frame, face_id, timestamp, confidence,
  success, ..., x_0..x_67, y_0..y_67, X_0..Z_67, AU01_r...`` (names after ", " or ","; only the lower-case x/y are
  the 2D image points). A row with ``success`` 0 or ``confidence`` below ``min_confidence`` means "no landmarks" for
  that frame, as does an all-zero row (OpenFace writes zeros where tracking failed). Where one frame has several
  faces (``face_id``), the most confident is kept.
- plain per-sequence CSVs: a frame column (``--landmark-frame-column``, default ``frame``) and 68 x/y columns named
  ``x_0``/``y_0`` or ``x0``/``y0``, interleaved or grouped (columns are found by name, so order does not matter).
MegaFace-style ``<image>.json`` sidecars are read by the ``folder`` adapter itself.

File names: ``--landmark-pattern`` with the fields ``{subject}``, ``{sequence}`` and ``{stem}`` (the image file's
stem); the defaults (``DEFAULT_PATTERNS``) follow what users have: ``<subject>_<task>.csv`` for BP4D,
``<subject>.csv`` or OpenFace's ``LeftVideo<subject>_comp.csv`` for DISFA, ``<stem>.csv`` for stills.

Frame numbers: ``--landmark-frames number`` (default) matches the CSV's frame column to the corpus's frame number
(BP4D's file name, DISFA's 1-based label frame = OpenFace's 1-based video frame); ``position`` matches it to the
image's 1-based position in its sorted folder, which is what OpenFace writes when run on a folder of frames (a BP4D
sequence starting at frame 0183 is frames 1, 2, ... in its CSV).

A missing or unusable file costs its frames their landmarks (counted), never the run; a file with no 68 x/y columns,
that is not UTF-8 CSV, or that is a FIFO, socket or device is a LabelError naming it.

Memory: a file is streamed row by row (``ssau.readfile.csv_rows``) into a ``LandmarkTable`` of flat arrays, and
``attach_landmarks`` keeps only the frames its records can match (their points are views of it). Per-frame Python
lists of floats took 10-15 times the file (issue 25: 4.3 GB for a 417 MiB CSV of 400k frames, now 0.3 GB).
"""

from __future__ import annotations

import math
import os
import re
from array import array
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssau.errors import InputError, LabelError
from ssau.faces.template import N_LANDMARKS
from ssau.readfile import csv_rows
from ssau.shard.records import IMAGE_EXTS, Record, Scan, present
from ssau.shard.video import split_source

DEFAULT_PATTERNS: dict[str, tuple[str, ...]] = {
    "bp4d": ("{subject}_{sequence}.csv",),
    "disfa": ("{subject}.csv", "LeftVideo{subject}_comp.csv"),
    "csv": ("{sequence}.csv", "{stem}.csv"),
    "emotionet": ("{stem}.csv",),
    "rafdb": ("{stem}.csv",),
    "folder": ("{stem}.csv",),
}
FIELDS = ("subject", "sequence", "stem")
MAX_FILE_BYTES = 512 << 20  # a sequence of 10^5 frames x ~2 kB; more is not a landmark file


@dataclass(frozen=True)
class LandmarkSource:
    root: Path
    pattern: str | None = None  # None: the corpus default(s)
    frames: str = "number"  # "number" | "position"
    frame_column: str = "frame"
    min_confidence: float = 0.8


def check_pattern(pattern: str) -> None:
    """LabelError unless ``pattern`` only uses the allowed fields."""
    try:
        pattern.format(**{f: "x" for f in FIELDS})
    except Exception as e:  # KeyError, IndexError ({stem[0]}), AttributeError ({stem.x}), ValueError (a bad spec)
        raise LabelError(f"--landmark-pattern {pattern!r}: {type(e).__name__} {e}; allowed fields: "
                         + ", ".join("{%s}" % f for f in FIELDS)) from None


def _columns(header: list[str], path: Path, frame_column: str) -> tuple[int | None, list[int], list[int], dict]:
    names = [h.strip() for h in header]
    xs, ys = {}, {}
    for j, name in enumerate(names):
        m = re.fullmatch(r"([xy])_?(\d+)", name)  # lower case only: OpenFace's X_0..Z_67 are 3D
        if m:
            cols = xs if m[1] == "x" else ys
            if int(m[2]) in cols:
                raise LabelError(f"{path}:1: column {name!r} appears twice (as {names[cols[int(m[2])]]!r} too)")
            cols[int(m[2])] = j
    need = range(N_LANDMARKS)
    if not all(i in xs and i in ys for i in need):
        raise LabelError(f"{path}:1: no 68 landmark columns (x_0..x_67 and y_0..y_67, or x0..x67 and y0..y67)")
    lower = [n.lower() for n in names]
    frame = lower.index(frame_column.lower()) if frame_column.lower() in lower else None
    if frame is None and "face" not in lower:  # only FaceLandmarkImg's per-image files come without frames
        raise LabelError(f"{path}:1: no frame column {frame_column!r} (--landmark-frame-column); columns start "
                         f"{', '.join(names[:6])}")
    opt = {k: lower.index(k) if k in lower else None for k in ("success", "confidence")}
    return frame, [xs[i] for i in need], [ys[i] for i in need], opt


class LandmarkTable(Mapping):
    """{frame: (confidence, 68 x 2 points or None where the row says the face was not found)} of one file, in the
    file's order, held as flat arrays (``typecode`` "d": float64, "f": float32): a frame costs its 136 numbers and
    an index entry, not 68 Python lists. The points handed out are views of one array."""

    def __init__(self, typecode: str) -> None:
        self._at: dict[int, int] = {}  # frame -> row
        self._conf, self._found, self._flat = array("d"), bytearray(), array(typecode)
        self._points: np.ndarray | None = None

    def put(self, frame: int, conf: float, flat: list[float] | None) -> None:
        """A row's face; where a frame has several (OpenFace's ``face_id``), the most confident that was found."""
        i = self._at.get(frame)
        if i is not None and self._found[i] and (flat is None or self._conf[i] >= conf):
            return
        values = array(self._flat.typecode, flat if flat is not None else [0.0] * (2 * N_LANDMARKS))
        if i is None:
            self._at[frame] = len(self._conf)
            self._conf.append(conf)
            self._found.append(flat is not None)
            self._flat.extend(values)
        else:
            self._conf[i], self._found[i] = conf, flat is not None
            self._flat[i * 2 * N_LANDMARKS:(i + 1) * 2 * N_LANDMARKS] = values

    def _rows(self) -> np.ndarray:
        if self._points is None:  # filled: from here on the buffer is shared, never grown
            self._points = np.frombuffer(self._flat, self._flat.typecode).reshape(-1, N_LANDMARKS, 2)
        return self._points

    def __getitem__(self, frame: int) -> tuple[float, np.ndarray | None]:
        i = self._at[frame]
        return self._conf[i], (self._rows()[i] if self._found[i] else None)

    def __iter__(self) -> Iterator[int]:
        return iter(self._at)

    def __len__(self) -> int:
        return len(self._at)


def read_landmark_csv(path: Path, frame_column: str = "frame", min_confidence: float = 0.8
                      ) -> tuple[dict[int, list[list[float]] | None], Counter]:
    """-> ({frame: 68 [x, y] or None where the row says the face was not found}, problems by kind).

    ``FaceLandmarkImg``'s per-image files have a ``face`` column and no frame column: their rows are numbered
    1, 2, ... and a still takes the most confident (``still_landmarks``)."""
    table, problems = _read(path, frame_column, min_confidence)
    return {k: None if v is None else v.tolist() for k, (_, v) in table.items()}, problems


def landmark_rows(path: Path, frame_column: str = "frame", min_confidence: float = 0.8) -> LandmarkTable:
    """{frame: (confidence, 68 x 2 float64 or None)} of an OpenFace or plain landmark CSV (rows numbered 1, 2, ...
    in a file without a frame column); LabelError for a file that is not one."""
    return _read(path, frame_column, min_confidence)[0]


def still_landmarks(table: Mapping[int, tuple[float, np.ndarray | None]]) -> np.ndarray | None:
    """The most confident face of a still image's file."""
    found = [(conf, pts) for conf, pts in table.values() if pts is not None]
    return max(found, key=lambda cp: cp[0])[1] if found else None


def _frame_number(text: str) -> int:
    v = float(text)
    if not math.isfinite(v) or v != int(v):
        raise ValueError(f"frame {text!r} is not a whole number")
    return int(v)


def _read(path: Path, frame_column: str, min_confidence: float, keep: set[int] | None = None, typecode: str = "d"
          ) -> tuple[LandmarkTable, Counter]:
    """Stream ``path`` into a table of the frames in ``keep`` (all when None); rows that cannot be read are
    counted in the returned problems whatever their frame."""
    problems: Counter[str] = Counter()
    if path.stat().st_size > MAX_FILE_BYTES:
        raise LabelError(f"{path}: {path.stat().st_size} bytes, more than a landmark file holds")
    table = LandmarkTable(typecode)
    try:
        rows = csv_rows(path, "landmark file")  # UTF-8, a byte-order mark dropped: it is not part of a name
        header = next(rows, None)
        if not header:
            raise LabelError(f"{path}:1: empty file")
        fcol, xcols, ycols, opt = _columns(header, path, frame_column)
        cols = [c for xy in zip(xcols, ycols) for c in xy]  # x_0, y_0, x_1, ...: the (68, 2) layout, flat
        for lineno, row in enumerate(rows, 2):
            if not row or not any(c.strip() for c in row):
                continue
            if len(row) != len(header):
                problems["bad-landmark-row"] += 1
                continue
            try:
                frame = _frame_number(row[fcol]) if fcol is not None else lineno - 1
                flat = [float(row[j]) for j in cols]
                conf = float(row[opt["confidence"]]) if opt["confidence"] is not None else 1.0
                ok = float(row[opt["success"]]) != 0 if opt["success"] is not None else True
            except (ValueError, OverflowError):  # 1e400 parses, then overflows int()
                problems["bad-landmark-row"] += 1
                continue
            if not all(map(math.isfinite, flat)) or not math.isfinite(conf):
                problems["bad-landmark-row"] += 1
                continue
            if keep is None or frame in keep:
                # no landmarks where tracking failed: success 0, low confidence, or OpenFace's all-zero row
                table.put(frame, conf, flat if ok and conf >= min_confidence and any(flat) else None)
    except InputError as e:  # a FIFO, not UTF-8, not CSV: a LabelError, which `ssau predict` notes and goes on
        raise LabelError(str(e)) from None
    return table, problems


class _Positions:
    """1-based position of an image in its sorted folder (OpenFace's frame number when run on the folder)."""

    def __init__(self) -> None:
        self.folders: dict[str, dict[str, int]] = {}

    def __call__(self, source: str) -> int:
        path, frame = split_source(source)
        if frame:
            return int(frame) + 1  # a video: OpenFace numbers its frames from 1
        folder, name = os.path.split(path)
        if folder not in self.folders:
            names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTS))
            self.folders[folder] = {n: i for i, n in enumerate(names, 1)}
        return self.folders[folder].get(name, -1)


def _file_for(r: Record, src: LandmarkSource, patterns: tuple[str, ...], root: str) -> Path | None:
    fields = {"subject": r.subject, "sequence": r.sequence or r.subject,
              "stem": Path(split_source(r.source)[0]).stem}
    for pattern in patterns:
        if any(f"{{{f}" in pattern and not fields[f] for f in ("subject", "stem")) or \
                ("{sequence" in pattern and not r.sequence):
            continue
        try:
            p = src.root / pattern.format(**fields)
        except Exception:  # a field this record cannot fill ({subject[3]} of a short id): no file for it
            continue
        # A manifest's subject or sequence ("../x") must not make ssau read files outside --landmarks.
        if os.path.commonpath((root, os.path.realpath(p))) == root and present(p):
            return p  # a FIFO by that name too: _read refuses it with one line, never opening it blocking
    return None


def attach_landmarks(scan: Scan, src: LandmarkSource) -> dict:
    """Set ``Record.points`` (68 x 2 float32 in the source image's pixels) where the CSVs have them; returns the
    counts for dataset.json. Records that already hold points (sidecars) keep them where no CSV row has any."""
    if not src.root.is_dir():
        raise LabelError(f"--landmarks {src.root} is not a directory (of per-sequence or per-image CSVs)")
    if src.frames not in ("number", "position"):
        raise LabelError(f"--landmark-frames {src.frames!r}: use number or position")
    patterns = (src.pattern,) if src.pattern else DEFAULT_PATTERNS[scan.corpus]
    for p in patterns:
        check_pattern(p)
    root = os.path.realpath(src.root)
    problems: Counter[str] = Counter()
    position = _Positions()
    counts: Counter[str] = Counter()
    other_way: Counter[Path] = Counter()  # per file: frames the other numbering would match, minus this one's
    by_file: dict[Path, list[Record]] = {}
    for r in scan.records:
        path = _file_for(r, src, patterns, root)
        if path is None:
            counts["no-landmark-file"] += 1
        else:
            by_file.setdefault(path, []).append(r)
    for path, records in by_file.items():  # one file at a time; what stays is what its records view
        # (number, position) of each frame record; None for a still, which takes its file's most confident face
        numbers = [(r.frame, position(r.source)) if r.frame >= 0 else None for r in records]
        keep = None if None in numbers else {n for pair in numbers for n in pair}
        table, found = _read(path, src.frame_column, src.min_confidence, keep, "f")  # float32: BP4D has 146k frames
        problems.update(found)
        counts["files"] += 1
        for r, pair in zip(records, numbers):
            if pair is None:
                pts, hit = still_landmarks(table), bool(table)
            else:
                frame, other = pair if src.frames == "number" else pair[::-1]
                hit = frame in table
                pts = table[frame][1] if hit else None
                other_way[path] += int(other in table) - int(hit)
            if pts is not None:
                r.points = pts
                counts["matched"] += 1
            elif hit:
                counts["tracking-failed"] += 1
            else:
                counts["frame-not-in-file"] += 1
    suspect = sorted(str(p.name) for p, n in other_way.items() if n > 0)
    if suspect:
        other = "position" if src.frames == "number" else "number"
        scan.warnings.append(f"--landmark-frames {src.frames}: in {len(suspect)} landmark file(s) ({', '.join(suspect[:3])}"
                             f"{', ...' if len(suspect) > 3 else ''}) more frames match as {other}s; OpenFace run "
                             f"on a folder of frames numbers them by position: check --landmark-frames")
    return {"files": counts.pop("files", 0), **dict(sorted(counts.items())),
            "bad_rows": sum(problems.values()), "patterns": list(patterns), "frames": src.frames,
            "min_confidence": src.min_confidence}
