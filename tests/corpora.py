"""Small look-alike corpora written at test time (no dataset can be downloaded here)."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

BP4D_SUBJECTS = ("F001", "M007", "M011", "F003", "F007", "F015")  # two per standard fold
BP4D_COLUMNS = (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24, 43)


def jpeg_bytes(seed: int, size: int = 32, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    img = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def face_like(w: int, h: int, seed: int = 0, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    """Smooth colour fields with grain, as a face photo has (random noise is no image libjpeg is tuned for); the
    same as tests/test_decode.py's own."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    arr = np.clip(np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_bp4d(root: Path, frames: int = 5, seed: int = 0) -> dict:
    """BP4D layout. Returns the labels written: {(subject, task, frame): {au: value}}."""
    rng = random.Random(seed)
    labels = {}
    occ = root / "AUCoding" / "AU_OCC"
    occ.mkdir(parents=True)
    for s in BP4D_SUBJECTS:
        for t in ("T1", "T2"):
            (root / s / t).mkdir(parents=True)
            lines = [",".join(["0"] + [str(a) for a in BP4D_COLUMNS])]
            first = rng.randint(1, 900)
            for f in range(first, first + frames):
                (root / s / t / f"{f:04d}.jpg").write_bytes(jpeg_bytes(hash((s, t, f)) % 2**32))
                row = {a: (9 if a == 43 else rng.choice((0, 1, 1, 9) if a == 4 else (0, 1))) for a in BP4D_COLUMNS}
                labels[(s, t, f)] = row
                lines.append(",".join([str(f)] + [str(row[a]) for a in BP4D_COLUMNS]))
            (occ / f"{s}_{t}.csv").write_text("\n".join(lines) + "\n")
    return labels


def write_tar(path: Path, samples: list[tuple[str, bytes, dict]]) -> None:
    import webdataset as wds

    with wds.TarWriter(str(path)) as w:
        for key, jpg, meta in samples:
            w.write({"__key__": key, "jpg": jpg, "json": json.dumps(meta).encode()})


def shard_bp4d(tmp: Path, frames: int = 6, shard_size: int = 4) -> Path:
    """A BP4D look-alike tree sharded with the standard folds; returns the shard directory."""
    from ssau.cli import main

    write_bp4d(tmp / "BP4D", frames=frames)
    out = tmp / "bp4d"
    assert main(["shard", "bp4d", "--images", str(tmp / "BP4D"), "--labels", str(tmp / "BP4D"), "--out", str(out),
                 "--folds", "bp4d", "--shard-size", str(shard_size), "--quiet"]) == 0
    return out


def shard_bp4d_flow(tmp: Path, size: int = 32, shard_size: int = 3) -> Path:
    """The landmarked BP4D look-alike (three subjects, one per standard fold) aligned to ``size`` px with TV-L1 flow
    between frames t and t + 3; returns the shard directory."""
    from helpers import bp4d_with_landmarks

    from ssau.cli import main

    root = bp4d_with_landmarks(tmp / "BP4D", frames=6)
    out = tmp / "bp4d-flow"
    assert main(["shard", "bp4d", "--images", str(root), "--labels", str(root), "--landmarks", str(root / "landmarks"),
                 "--landmark-frames", "position", "--align", str(size), "--flow", "3", "--flow-size", "16",
                 "--folds", "bp4d", "--shard-size", str(shard_size), "--out", str(out), "--quiet"]) == 0
    return out


def shard_rafdb(tmp: Path, images: int = 24, shard_size: int = 8) -> Path:
    """A RAF-DB look-alike (aligned images + list_patition_label.txt) sharded; returns the shard directory."""
    from ssau.cli import main

    root = tmp / "RAF" / "aligned"
    root.mkdir(parents=True)
    lines = []
    for i in range(images):
        name = f"{'train' if i % 4 else 'test'}_{i + 1:05d}"
        (root / f"{name}_aligned.jpg").write_bytes(jpeg_bytes(10_000 + i))
        lines.append(f"{name}.jpg {i % 7 + 1}")
    (tmp / "RAF" / "labels.txt").write_text("\n".join(lines) + "\n")
    out = tmp / "rafdb"
    assert main(["shard", "rafdb", "--images", str(root), "--labels", str(tmp / "RAF" / "labels.txt"), "--out", str(out),
                 "--shard-size", str(shard_size), "--quiet"]) == 0
    return out
