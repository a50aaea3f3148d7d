"""What adapters produce (Record, Scan) and the checks every corpus gets alike.

``screen`` vets every adapter's records alike. A source that resolves (``..``, an absolute path, a symlink)
outside the resolved ``--images`` root is skipped as ``outside-images``: a manifest never makes ssau read other
files (link the whole root elsewhere if need be, not files or folders inside it). An image listed more than once
(two rows, one URL twice, two URLs with one basename, two names of one file) is one sample when the labels agree,
the other listings skipped as ``duplicate-row``; when they disagree there is no telling which is right, so every
listing is skipped as ``conflicting-labels``, naming the others: the run goes on, and dataset.json says why.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ssau.errors import InputError, LabelError
from ssau.readfile import bounded_int
from ssau.shard.video import split_source

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


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
    origin: str = ""  # the label line that listed it ("file:line"), for skip reports; not stored in shards
    # Face geometry in the SOURCE image's pixels (the shard stores it in the stored image's): 68 iBUG points
    # (a CSV, a sidecar) or 5 (eye centres, nose tip, mouth corners: a sidecar), and a face box (x, y, w, h).
    points: list[list[float]] | None = None
    bbox: list[float] | None = None
    partner: str = ""  # --flow K: the source of frame t+K of the same sequence, and its key
    partner_key: str = ""


@dataclass
class Scan:
    corpus: str
    aus: tuple[int, ...]
    records: list[Record]
    skipped: list[dict]  # {"input": ..., "reason": ...}
    labelled: bool
    warnings: list[str] = field(default_factory=list)  # printed and kept in dataset.json; the run goes on
    searched: str = ""  # where the images were looked for, named when none is found
    landmark_counts: dict = field(default_factory=dict)  # what --landmarks matched (ssau.shard.landmarks)
    root: str = ""  # the absolute --images: samples store their source relative to it (set by run_shard)


@dataclass(frozen=True)
class AdapterArgs:
    images: Path
    labels: Path | None
    aus: tuple[int, ...] | None
    unknown: str  # the marker for "not coded" in csv / emotionet files
    frame_template: str | None  # disfa: where extracted frames are, relative to images
    active_threshold: float  # disfa: intensity at which an AU counts as active


def safe_key(text: str) -> str:
    # webdataset splits a member name at its first dot, so keys carry none.
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "x"


def list_images(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        out.extend(Path(dirpath) / f for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTS))
    return out


def present(path: Path) -> bool:
    """Whether an image a label names is there: a file, or a FIFO, socket or device by that name, which the shard
    worker skips and counts as ``not-a-regular-file`` (a label naming it is not a label without an image)."""
    return path.exists() and not path.is_dir()


def require_dir(path: Path | None, what: str) -> Path:
    if path is None:
        raise LabelError(f"{what} is required for this format")
    if not path.is_dir():
        raise LabelError(f"{what} {path} is not a directory")
    return path


def parse_int(text: str, where: str) -> int:
    """An integer label cell ("12", "12.0") of at most 18 digits, so that it fits the index's int64 columns; the
    digits are counted before any conversion (a 400-digit frame number once reached float() and overflowed)."""
    try:
        return bounded_int(text, where)
    except InputError as e:
        raise LabelError(str(e)) from None


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
    return (r.subject, r.sequence, r.frame, r.occurrence, r.mask, r.intensity, r.expression, r.split, r.points,
            r.bbox)
