"""Face alignment: a similarity transform onto the canonical template, or a square box from a face detector.

Used by ``ssau shard --align SIZE`` and meant for inference too (one definition of "an aligned face").

- With landmarks: the least-squares similarity (rotation, uniform scale, translation; Umeyama 1991, closed form)
  taking the five points (eye centres, nose tip, mouth corners) or all 68 onto ``template.MEAN_5`` / ``MEAN_68``
  placed in a SIZE x SIZE crop with ``margin`` free on each side. Closed form rather than
  ``cv2.estimateAffinePartial2D``: that one is a robust estimator over random subsets (RANSAC/LMedS), where exact
  least squares over five reliable points is what the papers' alignment is.
- Without, where the ``[faces]`` extra is installed (``detector="dlib"``): dlib's face detector and 68 landmarks
  (``ssau.faces.detect``), then the same landmark similarity, so such a face is aligned like a landmarked one.
- Without, otherwise (``detector="haar"``): OpenCV's Haar cascade (``haarcascade_frontalface_default.xml``, inside
  the opencv wheel: nothing is downloaded at run time; the DNN detectors OpenCV offers need model files no wheel
  ships). The largest face wins; the crop is the square around the box's centre whose side leaves the same margin. No face: ``SkipImage("no-face")``.
- The warp is ``cv2.warpAffine`` (bilinear, border replicated, so a face near the frame edge gets no black wedge).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from ssau.errors import SkipImage
from ssau.faces.detect import landmarks_in_box, largest_face
from ssau.faces.template import DEFAULT_MARGIN, MEAN_5, MEAN_68, five_points, placed, plausible

DETECTOR = "haarcascade_frontalface_default.xml"
DETECT_MAX_SIDE = 640  # detection runs on a copy at most this large: a 1392 px BP4D frame costs 5x less
MIN_FACE_FRACTION = 0.08  # a face narrower than this share of the shorter side is not the subject's
# The Haar box is not the landmarks' box: measured on 79 frames of the realistic synthetic corpus (ssau synth
# --style realistic), its side is 1.25 x the landmarks' width and its centre 0.17 of its height above theirs (it
# takes in the forehead). The detector's crop is corrected by both, so that box-aligned and landmark-aligned faces
# come out at about one scale; a sidecar's box (MegaFace) is used as it is.
DETECTOR_BOX_SCALE, DETECTOR_BOX_DROP = 1.25, 0.17


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 similarity matrix M minimising sum |M [src; 1] - dst|^2 (Umeyama's closed form, no reflection)."""
    src, dst = np.asarray(src, dtype=np.float64), np.asarray(dst, dtype=np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    var = (a ** 2).sum() / len(src)
    if var < 1e-12:
        raise ValueError("degenerate points: they all coincide")
    u, sig, vt = np.linalg.svd(b.T @ a / len(src))
    d = np.diag([1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])
    rot = u @ d @ vt
    scale = float(np.trace(np.diag(sig) @ d)) / var
    t = mu_d - scale * rot @ mu_s
    return np.hstack([scale * rot, t[:, None]])


def transform(points: np.ndarray, m: np.ndarray) -> np.ndarray:
    p = np.asarray(points, dtype=np.float64)
    return p @ m[:, :2].T + m[:, 2]


def landmark_matrix(points: np.ndarray, size: int, margin: float = DEFAULT_MARGIN, use: str = "five") -> np.ndarray:
    """Source pixels -> aligned crop pixels, from 68 landmarks (``use`` five or all) or 5 points."""
    pts = np.asarray(points, dtype=np.float64)
    if len(pts) == 5:
        return similarity(pts, placed(MEAN_5, size, margin))
    if use == "all":
        return similarity(pts, placed(MEAN_68, size, margin))
    return similarity(five_points(pts), placed(MEAN_5, size, margin))


def box_matrix(box: tuple[float, float, float, float], size: int, margin: float = DEFAULT_MARGIN) -> np.ndarray:
    """Source pixels -> crop pixels for the square around ``box`` (x, y, w, h) that leaves ``margin`` per side."""
    x, y, w, h = (float(v) for v in box)
    side = max(w, h) / (1.0 - 2.0 * margin)
    scale = (size - 1) / side
    cx, cy = x + w / 2 - 0.5, y + h / 2 - 0.5  # box edges are pixel borders; centres are at integers
    return np.array([[scale, 0.0, (size - 1) / 2 - scale * cx], [0.0, scale, (size - 1) / 2 - scale * cy]])


@lru_cache(maxsize=1)
def _cascade() -> "cv2.CascadeClassifier":  # noqa: F821 (OpenCV is imported inside)
    import cv2  # lazy: OpenCV loads where a face is aligned or detected, not for a plain shard or a run

    path = cv2.data.haarcascades + DETECTOR
    c = cv2.CascadeClassifier(path)
    if c.empty():
        raise RuntimeError(f"OpenCV's face detector {path} did not load: reinstall opencv-contrib-python-headless")
    return c


def detect_face(rgb: np.ndarray) -> tuple[float, float, float, float] | None:
    """The largest frontal face as (x, y, w, h) in ``rgb``'s pixels, or None."""
    import cv2  # lazy: OpenCV loads where a face is aligned or detected, not for a plain shard or a run

    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    h, w = gray.shape
    f = min(1.0, DETECT_MAX_SIDE / max(h, w))
    if f < 1.0:
        gray = cv2.resize(gray, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    side = max(20, int(MIN_FACE_FRACTION * min(gray.shape)))
    faces = _cascade().detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(side, side))
    if len(faces) == 0:
        return None
    x, y, bw, bh = max((tuple(int(v) for v in b) for b in faces), key=lambda b: (b[2] * b[3], b))
    return x / f, y / f, bw / f, bh / f


def warp(rgb: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
    import cv2  # lazy: OpenCV loads where a face is aligned or detected, not for a plain shard or a run

    return cv2.warpAffine(rgb, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def face_matrix(rgb: np.ndarray, points: np.ndarray | None, bbox, size: int, margin: float, use: str,
                detect: bool = True, detector: str = "haar") -> tuple[np.ndarray, str, np.ndarray | None]:
    """(source -> crop matrix, how it was found, the 68 points it used or None). How: landmarks (given), bbox (a
    sidecar's box; with ``detector="dlib"`` its landmarks are predicted inside it: detector-landmarks), detector
    (Haar box) or detector-landmarks (dlib's face and 68 points, ``ssau.faces.detect``). SkipImage('no-face') when
    nothing gives a face."""
    h, w = rgb.shape[:2]
    if points is not None and plausible(points, w, h):
        return landmark_matrix(points, size, margin, use), "landmarks", points
    box_ok = bbox is not None and len(bbox) == 4 and all(np.isfinite(bbox)) and bbox[2] > 4 and bbox[3] > 4
    if detector == "dlib" and (box_ok or detect):
        found = landmarks_in_box(rgb, bbox) if box_ok else getattr(largest_face(rgb), "points", None)
        if found is not None and plausible(found, w, h):
            return landmark_matrix(found, size, margin, use), "detector-landmarks", found
        if not box_ok:
            raise SkipImage("no-face")
    if box_ok:
        return box_matrix(bbox, size, margin), "bbox", None
    box = detect_face(rgb) if detect else None
    if box is None:
        raise SkipImage("no-face")
    return haar_matrix(box, size, margin), "detector", None


def haar_matrix(box: tuple[float, float, float, float], size: int, margin: float) -> np.ndarray:
    """Source -> crop matrix for a Haar box, corrected to the landmarks' extent (``DETECTOR_BOX_SCALE``, ``_DROP``)."""
    x, y, bw, bh = box
    side = bw / DETECTOR_BOX_SCALE  # the landmarks' extent the box stands for
    cx, cy = x + bw / 2, y + bh / 2 + DETECTOR_BOX_DROP * bh
    return box_matrix((cx - side / 2, cy - side / 2, side, side), size, margin)
