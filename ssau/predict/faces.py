"""A frame's faces as the model's inputs, made the way its training faces were (the model card's ``preprocess``).

- Landmarks: the frame's row of an OpenFace CSV given beside the input, else the detector (``choose_detector``):
  dlib's faces and 68 points (every face in the frame, largest first) where the ``[faces]`` extra is installed and
  the training faces were aligned by landmarks, else OpenCV's Haar box (the largest face, no landmarks). Then the
  shard's own geometry: the similarity onto the template (``ssau.faces.align``), warped to the card's aligned side,
  JPEG-encoded at its quality, decoded, resized and centre-cropped as evaluation does
  (``ssau.data.decode.eval_image``). So a face that went through ``ssau shard --align`` and the same face through
  here reach the network as the same pixels.
- A model trained on whole frames (``align`` None) gets the whole frame, JPEG-encoded at the card's quality. That is
  close to, not bit-identical with, a shard of the same file: ``ssau shard`` without ``--align`` stores an RGB JPEG's
  own bytes (and ``--resize`` is not repeated here).
- The face box is the detector's box, or the points' extent when the landmarks came from a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ssau.data.decode import eval_image
from ssau.errors import UserError
from ssau.faces import detect
from ssau.faces.align import detect_face, haar_matrix, landmark_matrix, warp
from ssau.faces.template import N_LANDMARKS, plausible
from ssau.shard.images import encode_jpeg


@dataclass
class FoundFace:
    face_id: int
    box: tuple[float, float, float, float]  # x, y, w, h in frame pixels
    confidence: float  # the landmark file's, dlib's detector margin, or nan (Haar, whole frame)
    points: np.ndarray | None  # [68, 2] frame pixels
    image: torch.Tensor = field(repr=False)  # uint8 [3, S, S]: the network's input


def _input(rgb: np.ndarray, pre: dict) -> torch.Tensor:
    return eval_image(encode_jpeg(Image.fromarray(rgb), pre["quality"]), pre["image_size"])


def extent(points: np.ndarray) -> tuple[float, float, float, float]:
    lo, hi = points.min(0), points.max(0)
    return float(lo[0]), float(lo[1]), float(hi[0] - lo[0]), float(hi[1] - lo[1])


def choose_detector(choice: str, pre: dict) -> tuple[str, str]:
    """(dlib or haar, a note to print or ''): ``auto`` follows how the training faces were aligned: by landmarks
    (most shards: OpenFace CSVs, dlib) -> dlib's landmarks where the [faces] extra is installed, else the Haar box
    with a note; by a box -> the Haar box, so new faces get the training faces' geometry."""
    if choice == "dlib" and not detect.available():
        raise UserError("--detector dlib needs the [faces] extra: pip install -e '.[faces]'")
    if choice != "auto" or pre["align"] is None:
        return (choice if choice != "auto" else "haar"), ""
    if pre.get("faces_from") == "box":
        return "haar", ""
    return ("dlib", "") if detect.available() else ("haar", detect.EXTRA_MISSING)


def find_faces(rgb: np.ndarray, pre: dict, detector: str, given: tuple[float, list] | None = None) -> list[FoundFace]:
    """The faces of one frame (uint8 H x W x 3) as network inputs; [] when none is found. ``given``: (confidence,
    68 points or None) from a landmark file's row for this frame; ``detector``: dlib or haar."""
    h, w = rgb.shape[:2]
    align = pre["align"]
    if align is None:
        return [FoundFace(0, (0.0, 0.0, float(w), float(h)), float("nan"), None, _input(rgb, pre))]
    size, margin, use = align["size"], align["margin"], align["points"]
    found: list[tuple[tuple, float, np.ndarray | None, np.ndarray]] = []  # box, confidence, points, matrix
    if given is not None and given[1] is not None and len(given[1]) == N_LANDMARKS \
            and plausible(pts := np.asarray(given[1], dtype=np.float64), w, h):
        found.append((extent(pts), float(given[0]), pts, landmark_matrix(pts, size, margin, use)))
    elif detector == "dlib":  # largest first, as the sharder aligns a frame's largest face
        for f in sorted(detect.detect_faces(rgb), key=lambda f: -f.box[2] * f.box[3]):
            if plausible(f.points, w, h):
                found.append((f.box, f.score, f.points, landmark_matrix(f.points, size, margin, use)))
    elif (box := detect_face(rgb)) is not None:
        found.append((box, float("nan"), None, haar_matrix(box, size, margin)))
    return [FoundFace(i, tuple(float(v) for v in box), conf, pts, _input(warp(rgb, m, size), pre))
            for i, (box, conf, pts, m) in enumerate(found)]
