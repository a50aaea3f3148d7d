"""Helpers shared by test modules (no test module imports another): the shard command and what it wrote, the one
error line of a failed command, a tiny training command line, OpenFace CSVs and posed face frames."""

from __future__ import annotations

import json
import os
import random
import tarfile
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from ssau.aus import STANDARD_AUS
from ssau.cli import main
from ssau.data.batch import Batch
from ssau.faces.template import MEAN_68
from ssau.synth.classic import render_face
from ssau.synth.faces import make_identity


def shard(*args: str) -> int:
    return main(["shard", *args, "--quiet"])


def members(tar: Path) -> dict[str, bytes]:
    with tarfile.open(tar) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers()}


def samples_of(out: Path) -> dict[str, dict]:
    """key -> {'jpg': bytes, 'json': dict} over every shard of a directory."""
    out_samples = {}
    for tar in sorted(out.glob("*.tar")):
        for name, data in members(tar).items():
            key, ext = name.split(".", 1)
            out_samples.setdefault(key, {})[ext] = json.loads(data) if ext == "json" else data
    return out_samples


def tree_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "last_run.json"}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ssau: error: "), err
    return err[0]


def tiny_train(shards: Path, tmp: Path, *extra: str) -> list[str]:
    return ["train", f"data.labelled=[{shards}]", "model.backbone=tiny", "data.image_size=32", "data.m1=4",
            "data.workers=0", "data.eval_batch=16", "train.steps=3", "train.log_every=1", f"train.out={tmp / 'runs'}",
            "train.progress=false", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", *extra]


def error_line(capsys) -> str:
    """The one ``ssau: error:`` line of a failed command (MLflow's own INFO lines may stand beside it)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ssau: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def openface_header(spaces: bool = True) -> list[str]:
    names = (["frame", "face_id", "timestamp", "confidence", "success", "gaze_0_x", "pose_Tx"]
             + [f"x_{i}" for i in range(68)] + [f"y_{i}" for i in range(68)]
             + [f"X_{i}" for i in range(68)] + ["AU01_r"])
    return [(" " + n if spaces and j else n) for j, n in enumerate(names)]


def openface_row(frame: int, pts, success: int = 1, conf: float = 0.98, face: int = 0) -> list[str]:
    pts = np.zeros((68, 2)) if pts is None else np.asarray(pts)
    return ([str(frame), str(face), f"{(frame - 1) / 25:.3f}", f"{conf:.2f}", str(success), "0.1", "12.5"]
            + [f"{x:.2f}" for x in pts[:, 0]] + [f"{y:.2f}" for y in pts[:, 1]]
            + [f"{-x:.1f}" for x in pts[:, 0]] + ["0.5"])


def write_csv(path: Path, header: list[str], rows: list[list[str]], sep: str = ", ") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(sep.join(r) for r in [header] + rows) + "\n")


def face_frame(seed: int, t: int = 0, w: int = 96, h: int = 120, face: int = 56) -> tuple[np.ndarray, np.ndarray]:
    """A head on a textured background, moving 1 px right per frame t; -> (RGB frame, its 68 landmarks)."""
    rng = np.random.default_rng(seed)
    bg = cv2.resize(rng.integers(60, 200, (h // 8, w // 8, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)
    img = np.asarray(render_face(make_identity(random.Random(seed)), {12: 4.0}, face, random.Random(seed)))
    x0, y0 = (w - face) // 2 - 6 + t, 16
    bg[y0:y0 + face, x0:x0 + face] = img
    # the rendered face spans about 0.2-0.8 of its square across and 0.15-0.95 down
    pts = np.stack([x0 + face * (0.2 + 0.6 * MEAN_68[:, 0]), y0 + face * (0.3 + 0.6 * MEAN_68[:, 1])], 1)
    return bg, pts


def save(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, quality=95)


def make_batch(seed: int = 0, m1: int = 6, m2: int = 4, size: int = 32,
               aus: tuple[int, ...] = STANDARD_AUS["bp4d"]) -> Batch:
    """A random in-memory batch with every field a method may read (BP4D's 12 AUs by default)."""
    g = torch.Generator().manual_seed(seed)
    targets = (torch.rand(m1, len(aus), generator=g) < 0.3).float()
    mask = (torch.rand(m1, len(aus), generator=g) < 0.8).float()
    return Batch(images=torch.randint(0, 256, (m1, 3, size, size), dtype=torch.uint8, generator=g),
                 targets=targets * mask, mask=mask, keys=[f"k{i}" for i in range(m1)],
                 unlabelled=torch.randint(0, 256, (m2, 3, size, size), dtype=torch.uint8, generator=g),
                 unlabelled_keys=[f"u{i}" for i in range(m2)],
                 expr_images=torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8, generator=g),
                 expr_labels=torch.randint(0, 7, (4,), generator=g), expr_keys=[f"e{i}" for i in range(4)],
                 val_images=torch.randint(0, 256, (5, 3, size, size), dtype=torch.uint8, generator=g),
                 val_targets=targets[:5], val_mask=mask[:5],
                 landmarks=_landmarks(m1, size, g), landmarks_valid=torch.ones(m1, dtype=torch.bool),
                 unlabelled_landmarks=_landmarks(m2, size, g),
                 unlabelled_landmarks_valid=torch.ones(m2, dtype=torch.bool),
                 flow=torch.randn(m1, 2, size, size, generator=g), flow_valid=torch.arange(m1) % 3 > 0,
                 unlabelled_flow=torch.zeros(m2, 2, size, size),
                 unlabelled_flow_valid=torch.zeros(m2, dtype=torch.bool))


def _landmarks(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """[n, 68, 2] the template over a ``size`` px face, each point moved by up to a pixel."""
    from ssau.faces.template import mean_landmarks

    return torch.from_numpy(mean_landmarks(size, size)) + torch.rand(n, 68, 2, generator=g) * 2 - 1


FACE_SUBJECTS = ("F001", "M011", "F007")  # one per standard BP4D fold


def bp4d_with_landmarks(root: Path, frames: int = 6, failed: tuple = ()) -> Path:
    """BP4D tree whose OpenFace CSVs number frames by position, as OpenFace does on a frame folder."""
    occ = root / "AUCoding" / "AU_OCC"
    occ.mkdir(parents=True)
    for s_i, s in enumerate(FACE_SUBJECTS):
        for task in ("T1", "T2"):
            first = 100 + 7 * s_i
            lines, rows = ["0,1,2,4,6,12"], []
            for i in range(frames):
                rgb, pts = face_frame(s_i * 10 + (task == "T2"), t=i)
                save(root / s / task / f"{first + i:04d}.jpg", rgb)
                lines.append(f"{first + i},{i % 2},0,1,{(i // 2) % 2},1")
                bad = (s, task, i + 1) in failed
                rows.append(openface_row(i + 1, None if bad else pts, success=0 if bad else 1))
            (occ / f"{s}_{task}.csv").write_text("\n".join(lines) + "\n")
            write_csv(root / "landmarks" / f"{s}_{task}.csv", openface_header(), rows)
    return root


@contextmanager
def global_tracking_uri(uri: str):
    """MLflow's global tracking URI set to ``uri`` for a block, then given back (tests share one process)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    previous, env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")  # None: unset (restored as unset)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if env is not None:  # setting None deletes MLFLOW_TRACKING_URI too
            os.environ["MLFLOW_TRACKING_URI"] = env


def model_artifacts(client, run_id: str) -> set[str]:
    """Paths under a run's ``model`` artifact: model/model.pt, and the MLflow model's files where one was logged.
    MLflow 3.17 looks the logged model up in the global tracking store, not the client's, when it lists a run's
    artifacts; the global URI points at the client's store for the call."""
    with global_tracking_uri(client.tracking_uri):
        return {a.path for a in client.list_artifacts(run_id, "model")}
