"""What ``ssau predict`` reads, as rows: images, folders (recursively), videos and shard directories.

- ``plan_inputs`` turns the command line into jobs, in a stable order: a file is an image or a video by its
  suffix; a folder is walked (sorted; a landmark CSV or sidecar JSON beside an input is not an input); a folder
  with a dataset.json is a shard directory, one job per shard. Anything else (a text file, a FIFO, a socket) is a job
  that yields one flagged row: listed and skipped, never opened.
- ``FaceRows`` is the IterableDataset DataLoader workers run: jobs are dealt round-robin to workers, and each job
  yields one row per face per frame (``success=1``, with its network input), or one flagged row (``success=0``,
  ``problem`` saying why) for a frame without a face, an unreadable image or video, or a file that is neither.
- Videos are decoded with PyAV, the library the sharder decodes DISFA with; ``every`` keeps frames 0, N, 2N...
  Their frame number is the 0-based index of the decoded frame and the timestamp its presentation time.
- A landmark CSV beside an input (OpenFace's ``<stem>.csv``) gives that input's landmarks: row ``frame`` is frame
  ``frame - 1`` of a video (OpenFace counts from 1), the most confident face of an image's file.
- A shard directory's samples are scored as ``ssau eval`` scores them (``decode_eval``: the stored face, resized
  and centre-cropped); ``input`` is ``<dir>#<key>`` and the landmarks are the stored ones.
"""

from __future__ import annotations

import math
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ssau.data.decode import decode_eval_points
from ssau.data.sources import read_dataset
from ssau.data.tario import SkipCounter, tar_samples
from ssau.errors import DecodeError, LabelError, SkipImage, UserError
from ssau.predict.faces import FoundFace, extent, find_faces
from ssau.remote import is_remote, join, public, size_of
from ssau.shard.images import decode_rgb, encode_jpeg
from ssau.shard.landmarks import landmark_rows

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv"}


MAX_IMAGE_BYTES = 256 << 20  # a photo larger than this is flagged unread (the decoder caps pixels, not bytes)


def video_rgb(frame) -> np.ndarray:
    """A decoded video frame as the sharder stores it before aligning it (``ssau.shard.video``: JPEG at its
    default quality), so a video's faces reach the network as a sharded video's did."""
    return decode_rgb(encode_jpeg(frame.to_image()))


@dataclass(frozen=True)
class Job:
    kind: str  # image | video | shard | other
    path: str
    landmarks: str | None = None  # a landmark CSV beside it
    problem: str = ""  # an `other` job's reason


def _beside(path: Path) -> str | None:
    csv = path.with_suffix(".csv")
    return str(csv) if csv.is_file() else None


def _file_job(path: Path) -> Job:
    try:
        mode = path.stat().st_mode
    except OSError as e:
        return Job("other", str(path), problem=f"unreadable ({e.strerror or e})")
    if not stat.S_ISREG(mode):
        return Job("other", str(path), problem="not a regular file")
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return Job("image", str(path), _beside(path))
    if suffix in VIDEO_SUFFIXES:
        return Job("video", str(path), _beside(path))
    return Job("other", str(path), problem="not an image or video")


def _shard_jobs(root: Path | str) -> list[Job]:
    """A job per shard of a shard directory, local or at a URL (``ssau.remote``)."""
    try:
        doc = read_dataset(root)
    except Exception as e:  # noqa: BLE001 - a damaged dataset.json is this input's problem, not the run's
        return [Job("other", public(str(root)), problem=f"shard directory unreadable ({str(e)[:120]})")]
    present = (lambda name: size_of(join(root, name)) is not None) if is_remote(root) else (  # noqa: E731
        lambda name: _regular(Path(root) / name))
    return [Job("shard", join(root, sh["name"])) if present(sh["name"]) else
            Job("other", public(join(root, sh["name"])),
                problem="shard is missing from the store" if is_remote(root) else "shard is not a regular file")
            for sh in doc["shards"]]


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


def plan_inputs(inputs: list[str]) -> list[Job]:
    """The jobs of the command line's INPUTs (a path that does not exist is a UserError: a typo, not data)."""
    jobs: list[Job] = []
    for text in inputs:
        if is_remote(text):  # a shard directory in object storage or over HTTP
            jobs += _shard_jobs(text)
            continue
        path = Path(text)
        if not path.exists() and not path.is_symlink():
            raise UserError(f"{text}: no such file or directory")
        if path.is_dir() and (path / "dataset.json").is_file():
            jobs += _shard_jobs(path)
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if not p.is_dir())
            names = {p for p in files if p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES}
            for p in files:
                beside = p.suffix.lower() in (".csv", ".json") and any(
                    q in names for q in (p.with_suffix(s) for s in IMAGE_SUFFIXES | VIDEO_SUFFIXES)) \
                    or p.suffix.lower() == ".json" and p.with_suffix("") in names  # face.jpg.json: a sidecar
                if not beside:
                    jobs.append(_file_job(p))
        else:
            jobs.append(_file_job(path))
    return jobs


def _chunk(rows: list[dict]) -> dict:
    images = [r.pop("image") for r in rows]
    faces = [i for i in images if i is not None]
    return {"rows": rows, "images": torch.stack(faces) if faces else None}


def _row(job: Job, frame: int, timestamp: float, problem: str = "", face=None, points=None) -> dict:
    box = face.box if face is not None else (math.nan,) * 4
    pts = points if points is not None else (face.points if face is not None else None)
    return {"input": job.path, "frame": frame, "timestamp": timestamp, "face_id": face.face_id if face else 0,
            "confidence": face.confidence if face else math.nan, "success": int(face is not None),
            "box": box, "points": pts, "problem": problem, "image": face.image if face is not None else None}


class FaceRows(IterableDataset):
    """Chunks of up to ``chunk`` rows: {"rows": [...], "images": uint8 [n, 3, S, S] of the rows with a face, in
    order, or None}. One tensor per chunk crosses from a worker, not one per face."""

    def __init__(self, jobs: list[Job], pre: dict, detector: str, every: int = 1, chunk: int = 32):
        self.jobs, self.pre, self.detector, self.every, self.chunk = jobs, pre, detector, every, chunk

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        ids = range(len(self.jobs))
        rows: list[dict] = []
        for order in (ids[info.id::info.num_workers] if info else ids):
            job = self.jobs[order]
            made = (iter([_row(job, 0, math.nan, job.problem)]) if job.kind == "other" else
                    self._shard(job) if job.kind == "shard" else self._media(job))
            for r in made:
                rows.append(r | {"order": order})
                if len(rows) == self.chunk:
                    yield _chunk(rows)
                    rows = []
        if rows:
            yield _chunk(rows)

    def _frame_rows(self, job: Job, rgb: np.ndarray, frame: int, timestamp: float, given) -> Iterator[dict]:
        faces = find_faces(rgb, self.pre, self.detector, given)
        if not faces:
            yield _row(job, frame, timestamp, "no face")
        for f in faces:
            yield _row(job, frame, timestamp, face=f)

    def _landmarks(self, job: Job) -> tuple[dict, str]:
        if job.landmarks is None:
            return {}, ""
        try:
            rows = landmark_rows(Path(job.landmarks))
        except (LabelError, OSError, ValueError) as e:
            return {}, f"landmark file ignored ({str(e)[:120]})"
        if job.kind == "image":  # FaceLandmarkImg's file of a still: its most confident face
            found = [r for r in rows.values() if r[1] is not None]
            return ({0: max(found, key=lambda r: r[0])} if found else {}), ""
        return {frame - 1: row for frame, row in rows.items()}, ""

    def _media(self, job: Job) -> Iterator[dict]:
        table, note = self._landmarks(job)
        for r in self._image(job, table) if job.kind == "image" else self._video(job, table):
            yield r | ({"problem": note} if note and r["success"] else {})

    def _image(self, job: Job, table: dict) -> Iterator[dict]:
        try:
            if Path(job.path).stat().st_size > MAX_IMAGE_BYTES:
                raise SkipImage("file-too-large", f"over {MAX_IMAGE_BYTES >> 20} MB")
            rgb = decode_rgb(Path(job.path).read_bytes())
        except (SkipImage, OSError) as e:
            detail = getattr(e, "detail", None)
            yield _row(job, 0, math.nan, f"unreadable image ({e}{': ' + detail if detail else ''})")
            return
        yield from self._frame_rows(job, rgb, 0, math.nan, table.get(0))

    def _video(self, job: Job, table: dict) -> Iterator[dict]:
        import av  # lazy: only videos need it

        try:
            container = av.open(job.path)
        except (av.error.FFmpegError, OSError, ValueError) as e:
            yield _row(job, 0, math.nan, f"unreadable video ({type(e).__name__})")
            return
        index, done = -1, True  # done: frame `index` was scored (a failure is then in frame index + 1)
        try:
            for index, frame in enumerate(container.decode(video=0)):
                if index % self.every:
                    continue
                done = False
                stamp = float(frame.time) if frame.time is not None else math.nan
                yield from self._frame_rows(job, video_rgb(frame), index, stamp, table.get(index))
                done = True
        except Exception as e:  # noqa: BLE001 - a broken stream ends this video with a flagged row, not the run
            yield _row(job, index + done, math.nan, f"video decoding stopped ({type(e).__name__}: {str(e)[:80]})")
        finally:
            container.close()

    def _shard(self, job: Job) -> Iterator[dict]:
        bad = SkipCounter()
        size = self.pre["image_size"]
        root = public(job.path.rsplit("/", 1)[0]) if is_remote(job.path) else str(Path(job.path).parent)
        for pos, s in enumerate(tar_samples(job.path, bad)):
            key = f"{root}#{s.get('__key__')}"
            try:
                image, _, pts = decode_eval_points(s, size)
            except DecodeError as e:
                yield _row(Job("shard", key), pos, math.nan, f"unreadable sample ({str(e)[:120]})")
                continue
            box = extent(pts) if pts is not None else (math.nan,) * 4
            yield _row(Job("shard", key), pos, math.nan, face=FoundFace(0, box, math.nan, pts, image))
        if bad.n:
            yield _row(Job("shard", job.path), -1, math.nan, f"shard damaged ({bad.first})")
