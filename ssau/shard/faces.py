"""One record's face at shard time: the stored image, its landmarks in the stored image's pixels, how it was aligned,
and (``--flow K``) the TV-L1 flow to frame t+K.

Without ``--align`` the image is stored as before (passed through, converted or resized) and landmarks are scaled
with it. With ``--align SIZE`` the frame is decoded once, the face found (landmarks, else a sidecar box, else the
detector: ``ssau.faces.align``) and the SIZE x SIZE crop stored; landmarks go through the same matrix.

Flow follows RTATL (paper 004, Sec. 3.4): frame t+K is warped with frame t's matrix (so head motion the alignment
removed stays removed), both are taken to grayscale, and TV-L1 runs on the pair at stored resolution
(``ssau.faces.flow``). A partner frame that cannot be read costs the sample its flow, never the sample.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ssau.errors import SkipImage
from ssau.faces.align import face_matrix, transform, warp
from ssau.faces.flow import encode_flow, tvl1
from ssau.faces.template import N_LANDMARKS, plausible
from ssau.shard.images import Prepared, decode_rgb, encode_jpeg, prepare_image

# OpenCV is imported where a face is aligned or a flow computed (inside ssau.faces.align and ssau.faces.flow), not
# when these modules load: a plain `ssau shard` forks its workers without it, as it did before faces were aligned.


@dataclass(frozen=True)
class FaceOptions:
    resize: int | None = None
    quality: int = 95
    align: int | None = None  # crop side, or None: store the frame
    margin: float = 0.15
    points: str = "five"  # five | all: which landmarks the similarity fits
    detect: bool = True  # frames without landmarks or box: a face detector (else skipped as no-face)
    detector: str = "haar"  # haar (a box) | dlib (face and 68 landmarks: the [faces] extra)
    landmarks_from: str = "file"  # file (CSV or sidecar, else the detector) | detector (always the detector)
    flow_size: int = 64  # shorter side of the stored flow grid
    flow_clip: float = 20.0  # |u|, |v| clipped to this many stored-image pixels
    want_gray: bool = False  # keep the stored image's grayscale for the flow


@dataclass
class Placed:
    prepared: Prepared
    matrix: np.ndarray  # source pixels -> stored pixels (2 x 3)
    landmarks: list[list[float]] | None  # 68 [x, y] in stored pixels
    aligned: str  # landmarks | bbox | detector | none
    gray: np.ndarray | None = None
    dropped: bool = False  # the record had points that cannot be this image's face (counted, not stored)


def _scale_matrix(src: tuple[int, int], prep: Prepared) -> np.ndarray:
    sx, sy = prep.scale or (prep.width / src[0], prep.height / src[1])  # pixel centres: x' = (x + 0.5) * s - 0.5
    return np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5]])


def _gray(rgb: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)


def _stored_points(points, m: np.ndarray) -> list[list[float]] | None:
    if points is None or len(points) != N_LANDMARKS:
        return None
    return [[round(float(x), 2), round(float(y), 2)] for x, y in transform(points, m)]


def place(data: bytes, points, bbox, o: FaceOptions, header_only: bool = False) -> Placed:
    """Store one image (SkipImage with a reason when it cannot be); ``header_only``: see ``prepare_image``."""
    if o.align is None:
        prep = prepare_image(data, o.resize, o.quality, header_only)
        # passed through: the source's own size; else validated by prepare_image, so only the header is read
        src = (prep.width, prep.height) if prep.converted is None else Image.open(io.BytesIO(data)).size
        m = _scale_matrix(src, prep)
        gray = _gray(decode_rgb(prep.jpeg)) if o.want_gray else None
        usable = points is not None and plausible(points, *src)
        return Placed(prep, m, _stored_points(points, m) if usable else None, "none", gray,
                      dropped=points is not None and not usable)
    rgb = decode_rgb(data)
    pts = np.asarray(points, dtype=np.float64) if points is not None and o.landmarks_from == "file" else None
    m, how, used = face_matrix(rgb, pts, bbox, o.align, o.margin, o.points, o.detect, o.detector)
    crop = warp(rgb, m, o.align)
    prep = Prepared(encode_jpeg(Image.fromarray(crop), o.quality), o.align, o.align, "align")
    return Placed(prep, m, _stored_points(used, m), how, _gray(crop) if o.want_gray else None,
                  dropped=pts is not None and how != "landmarks")


def partner_gray(data: bytes, placed: Placed, o: FaceOptions) -> np.ndarray:
    """Frame t+K brought to frame t's stored geometry: the same alignment matrix, or the same resize."""
    if o.align is not None:
        return _gray(warp(decode_rgb(data), placed.matrix, o.align))
    return _gray(decode_rgb(prepare_image(data, o.resize, o.quality).jpeg))  # the very path frame t took


def flow_bytes(placed: Placed, partner: bytes, o: FaceOptions) -> bytes:
    """``flow.npy`` bytes for (frame t as placed, frame t+K's file bytes); SkipImage if the partner is unusable."""
    later = partner_gray(partner, placed, o)
    if later.shape != placed.gray.shape:  # a partner frame of another size: no flow between them
        raise SkipImage("partner-size")
    return encode_flow(tvl1(placed.gray, later), o.flow_size, o.flow_clip)
