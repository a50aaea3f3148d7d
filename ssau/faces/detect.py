"""Faces and their 68 landmarks from dlib: the optional ``[faces]`` extra (``pip install -e '.[faces]'``).

- Detector: dlib's HOG frontal-face detector (``dlib.get_frontal_face_detector``), built into the ``dlib-bin``
  wheel. It finds faces of about 80 px and up, so detection runs on a copy scaled to ``DETECT_SIDE`` px on its
  longer side (up for a 64-128 px face crop, down for a 1392 px BP4D frame); boxes are scaled back.
- Landmarks: dlib's ``shape_predictor_68_face_landmarks.dat`` (iBUG 300-W order, the order OpenFace writes and
  ``ssau.faces.template`` uses), shipped in the ``face_recognition_models`` package and predicted on the full-size
  image inside the detected box. The file is found with ``importlib.util.find_spec``: the package's own
  ``__init__`` imports ``pkg_resources``, which the setuptools mlflow brings in no longer has, so it is never
  imported.
- **Licence**: that 68-point model was trained on iBUG 300-W, whose images are licensed for research only: **not for
  commercial use** (``LICENCE``, written into dataset.json and the model metadata of what used it). dlib itself is
  Boost-licensed.

Without the extra, ``available()`` is False and ssau keeps OpenCV's Haar box (``ssau.faces.align``), saying so
once (``EXTRA_MISSING``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

DETECT_SIDE = 640  # the detection copy's longer side
PREDICTOR = "shape_predictor_68_face_landmarks.dat"
DLIB_DETECTOR = f"dlib HOG frontal face detector + {PREDICTOR}"
LICENCE = ("68-point landmarks by dlib's shape_predictor_68_face_landmarks.dat (face_recognition_models), trained on "
           "iBUG 300-W: licensed for research, not for commercial use")
EXTRA_MISSING = ("faces without landmark files are boxed by OpenCV's Haar cascade, with no landmarks: install the "
                 "[faces] extra (pip install -e '.[faces]': dlib-bin, face_recognition_models) for dlib's detector "
                 "and 68 landmarks")


@dataclass(frozen=True)
class Face:
    box: tuple[float, float, float, float]  # x, y, w, h in the image's pixels
    score: float  # the HOG detector's margin (higher: surer)
    points: np.ndarray  # [68, 2] float64, pixel centres at integers


def _predictor_path() -> Path | None:
    spec = importlib.util.find_spec("face_recognition_models")  # finds the package without running its __init__
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "models" / PREDICTOR
    return path if path.is_file() else None


@lru_cache(maxsize=1)
def available() -> bool:
    """dlib imports and the 68-point model file is installed."""
    try:
        if importlib.util.find_spec("dlib") is None or _predictor_path() is None:
            return False
        import dlib  # noqa: F401  (optional: the [faces] extra)
    except (ImportError, ValueError):  # ValueError: a module without a spec (a stub, a blocked import)
        return False
    return True


def resolve(choice: str) -> str:
    """A detector choice made concrete: ``auto`` is dlib where the extra is installed, else haar."""
    return ("dlib" if available() else "haar") if choice == "auto" else choice


@lru_cache(maxsize=1)
def _models():
    import dlib  # lazy and optional: the [faces] extra

    path = _predictor_path()
    if path is None:
        raise RuntimeError(EXTRA_MISSING)
    return dlib.get_frontal_face_detector(), dlib.shape_predictor(str(path)), dlib.rectangle


def detect_faces(rgb: np.ndarray) -> list[Face]:
    """Every frontal face in ``rgb`` (uint8 H x W x 3), surest first, with its 68 landmarks."""
    import cv2  # lazy: OpenCV loads where faces are found

    detector = _models()[0]
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w = rgb.shape[:2]
    f = DETECT_SIDE / max(h, w)
    small = cv2.resize(rgb, (max(1, round(w * f)), max(1, round(h * f))),
                       interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)
    rects, scores, _ = detector.run(small, 0, 0.0)
    faces = []
    for r, s in zip(rects, scores):
        x0, y0, x1, y1 = (r.left() / f, r.top() / f, (r.right() + 1) / f, (r.bottom() + 1) / f)
        box = (x0, y0, x1 - x0, y1 - y0)
        faces.append(Face(box, float(s), landmarks_in_box(rgb, box)))
    return sorted(faces, key=lambda fc: -fc.score)


def landmarks_in_box(rgb: np.ndarray, box) -> np.ndarray:
    """The 68 points of the face in ``box`` (x, y, w, h: a sidecar's or another detector's), no detection."""
    _, predictor, rectangle = _models()
    x, y, w, h = (float(v) for v in box)
    shape = predictor(np.ascontiguousarray(rgb, dtype=np.uint8),
                      rectangle(round(x), round(y), round(x + w) - 1, round(y + h) - 1))
    return np.array([(shape.part(i).x, shape.part(i).y) for i in range(shape.num_parts)], dtype=np.float64)


def largest_face(rgb: np.ndarray) -> Face | None:
    """The face with the largest box (the subject of a frame), or None."""
    faces = detect_faces(rgb)
    return max(faces, key=lambda fc: (fc.box[2] * fc.box[3], fc.score)) if faces else None


def interocular_error(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean point-to-point error over the 68 points, divided by the distance between the outer eye corners
    (points 36 and 45: the 300-W benchmark's normalisation)."""
    truth = np.asarray(truth, dtype=np.float64)
    iod = float(np.linalg.norm(truth[36] - truth[45]))
    return float(np.linalg.norm(np.asarray(found, dtype=np.float64) - truth, axis=1).mean() / iod)
