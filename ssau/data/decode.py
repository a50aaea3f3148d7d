"""Decode and augment one shard sample inside a DataLoader worker.

JPEGs are decoded with PIL's draft mode, which lets libjpeg decode at 1/2, 1/4 or 1/8 scale when the target is
that much smaller than the stored image (a large part of why streaming beats loose-file ImageFolder loading).
Output is uint8 CHW: four times less to move from workers than float, normalised on the model side.
Training: resize the shorter side to ``RESIZE_RATIO * size``, random crop, horizontal flip, colour jitter.
Evaluation: the same resize, centre crop.

Geometry (``decode_sample``): the sample's 68 landmarks (json ``landmarks``, pixels of the stored image) and, when
asked, its optical flow (``flow.npy``, see ``ssau.faces.flow``) go through the same resize, crop and flip as the
image. Pixel centres are at integers (``ssau.faces.template``): resizing by s maps a stored-image point x to
``(x + 0.5) * s - 0.5`` (PIL's resize and libjpeg's scaled decoding both keep pixel areas, so a pixel centre maps to
a pixel centre); the crop then subtracts its offset and the flip maps x to ``S - 1 - x`` with the 68-point mirror
permutation (the flow: columns reversed and u negated). Displacements are scaled by s per axis. A sample without
landmarks gets the template (``mean_landmarks`` of the stored image with the shard's ``align_margin``) pushed
through the same augmentation and flagged invalid; one without ``flow.npy`` gets zeros, flagged invalid.

One sample can never end a run: whatever its bytes are, the only exception that leaves ``decode_train`` /
``decode_eval`` is ``DecodeError``, which the stream skips and counts. Memory is bounded before any pixel is
decoded: the size the image header declares (``Image.open`` reads only the header) is checked against
``MAX_PIXELS``, the limit ``ssau shard`` applies, so nothing a shard may hold is refused here. Only JPEG, PNG and
WebP are opened (a shard holds JPEG): PIL's other plugins include ones that hand the bytes to an external
interpreter (EPS to Ghostscript). The json metadata is checked for the shape the trainer relies on.
"""

from __future__ import annotations

import io
import json
import random
import re
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ssau.aus import EXPRESSIONS
from ssau.errors import DecodeError
from ssau.faces.flow import decode_flow
from ssau.faces.template import DEFAULT_MARGIN, N_LANDMARKS, flip_landmarks, mean_landmarks
from ssau.shard.schema import MAX_PIXELS, SCHEMA_VERSION

RESIZE_RATIO = 1.143  # 224 of 256, the usual crop ratio
JITTER = 0.2  # brightness, contrast and saturation factors drawn from [1 - JITTER, 1 + JITTER]
FORMATS = ("JPEG", "PNG", "WEBP")
_GRAY = np.array([0.299, 0.587, 0.114], dtype=np.float32)

Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # PIL's own decompression-bomb guard at the format's limit, as the writer


def check_meta(meta: object, key: object = None) -> dict:
    """``meta`` if it has the shape training reads, else DecodeError: an object; ``aus`` (int AU numbers),
    ``occurrence`` and ``mask`` lists of one length, or no ``aus``; ``intensity`` absent, null or one number per AU
    (0-5, -1 unknown); ``expression`` an int from -1 (none) to the last
    class of EXPRESSIONS, or absent; ``schema_version`` absent (1) or one this reader knows.

    Both schema versions (``ssau.shard.schema``) read alike: ``mask`` says which AUs are coded, and an unknown
    occurrence is 0 (version 1) or -1 (version 2) under mask 0, never read; a coded one must be 0 or 1."""
    if not isinstance(meta, dict):
        raise DecodeError(f"{key}: metadata is a json {type(meta).__name__}, not an object")
    version = meta.get("schema_version", 1)
    if type(version) is not int or not 1 <= version <= SCHEMA_VERSION:
        raise DecodeError(f"{key}: schema_version {str(version)[:20]!r} is not one this ssau reads (1 to "
                          f"{SCHEMA_VERSION}; a newer ssau wrote it)")
    aus = meta.get("aus")
    if aus is not None:
        occ, mask = meta.get("occurrence"), meta.get("mask")
        if not (isinstance(aus, list) and isinstance(occ, list) and isinstance(mask, list)
                and len(aus) == len(occ) == len(mask)):
            raise DecodeError(f"{key}: 'aus', 'occurrence' and 'mask' are not lists of one length")
        if not all(type(a) is int for a in aus):
            raise DecodeError(f"{key}: 'aus' holds something other than AU numbers")
        if not all(type(v) in (int, float, bool) and v in (0, 1) for v in mask):
            raise DecodeError(f"{key}: 'mask' holds a value other than 0 or 1")
        if not all(type(v) in (int, float, bool) and v in ((0, 1) if m else (-1, 0, 1)) for v, m in zip(occ, mask)):
            raise DecodeError(f"{key}: 'occurrence' holds a value other than 0 or 1 (or -1 where 'mask' is 0)")
    inten = meta.get("intensity")
    if inten is not None and not (isinstance(inten, list) and len(inten) == len(aus or ())
                                  and all(type(v) in (int, float) and (v == -1 or 0 <= v <= 5) for v in inten)):
        raise DecodeError(f"{key}: 'intensity' is not a list of one number per AU (0-5, or -1 for unknown)")
    e = meta.get("expression", -1)
    if type(e) is not int or not -1 <= e < len(EXPRESSIONS):
        raise DecodeError(f"{key}: expression {str(e)[:20]!r} is not an int from -1 to {len(EXPRESSIONS) - 1}")
    return meta


def _image(data: bytes, key: object, size: int) -> tuple[Image.Image, tuple[int, int], tuple[float, float]]:
    """The image resized for a ``size`` crop, the stored image's (width, height) and the scale from stored-image
    pixels to resized ones per axis."""
    with warnings.catch_warnings():
        # PIL warns between its limit and twice it, then raises; the declared size is checked just below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=FORMATS)
        except Image.DecompressionBombError as e:
            declared = re.search(r"\((\d+) pixels\)", str(e))
            raise DecodeError(f"{key}: image declares {declared[1] if declared else 'too many'} pixels "
                              f"(limit {MAX_PIXELS} pixels)") from e
    w, h = img.size
    if w * h > MAX_PIXELS or w < 1 or h < 1:
        raise DecodeError(f"{key}: image declares {w}x{h} pixels (limit {MAX_PIXELS} pixels)")
    short = round(size * RESIZE_RATIO)
    drafted = img.draft("RGB", (short, short))  # decode at reduced scale where libjpeg can
    # libjpeg decodes at 1/k (k = 1, 2, 4, 8) onto ceil(w / k) pixels, so a resized pixel spans k * dw / W stored
    # pixels, not w / W: the two differ when k does not divide w, by up to a pixel at the far edge.
    k = w / drafted[1][2] if drafted else 1.0
    img = img.convert("RGB")
    dw, dh = img.size
    scale = short / min(img.size)
    img = img.resize((max(short, round(img.width * scale)), max(short, round(img.height * scale))),
                     Image.Resampling.BILINEAR)
    return img, (w, h), (img.width / (k * dw), img.height / (k * dh))


LABEL_FIELDS = ("aus", "occurrence", "mask", "intensity", "expression")


def _load(sample: dict, size: int,
          labels: bool = True) -> tuple[Image.Image, dict, tuple[int, int], tuple[float, float]]:
    """``labels=False`` (an unlabelled source): the label fields are dropped unread, never checked."""
    key = sample.get("__key__")
    if "json" not in sample or "jpg" not in sample:
        raise DecodeError(f"{key}: sample has no {'json' if 'json' not in sample else 'jpg'} member")
    try:
        meta = json.loads(sample["json"])
    except (ValueError, RecursionError) as e:  # RecursionError: json nested thousands deep
        raise DecodeError(f"{key}: json: {str(e)[:100]}") from e
    if not labels and isinstance(meta, dict):
        meta = {k: v for k, v in meta.items() if k not in LABEL_FIELDS}
    meta = check_meta(meta, key)
    try:
        img, stored, scale = _image(sample["jpg"], key, size)
    except DecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL's decoders raise a zoo (OSError, SyntaxError, struct.error,
        # EOFError, IndexError, ZeroDivisionError, DecompressionBombError, MemoryError...) on crafted bytes; all of
        # them are confined to this one sample.
        raise DecodeError(f"{key}: image: {type(e).__name__}: {str(e)[:100]}") from e
    return img, meta, stored, scale


def _landmarks(meta: dict, stored: tuple[int, int], key: object) -> tuple[np.ndarray, bool]:
    """The sample's [68, 2] landmarks in stored-image pixels and True, or the template and False when it has none;
    DecodeError when ``landmarks`` (or the ``align_margin`` the template needs) is malformed."""
    # Shards written before issue 11 stored sidecar points as they came (5 of them, source pixels): only a sample
    # that says how it was aligned ("aligned", written since) holds landmarks in its own pixels.
    raw = meta.get("landmarks") if "aligned" in meta else None
    w, h = stored
    if raw is None or raw == []:  # version 2 stores [] where version 1 left the key out
        margin = meta.get("align_margin", DEFAULT_MARGIN)
        margin = DEFAULT_MARGIN if margin == -1 and type(margin) in (int, float) else margin  # -1: not aligned
        if type(margin) not in (int, float) or not 0 <= margin < 0.5:
            raise DecodeError(f"{key}: align_margin {str(margin)[:20]!r} is not a fraction in [0, 0.5)")
        return mean_landmarks(w, h, margin), False
    if not (isinstance(raw, list) and len(raw) == N_LANDMARKS
            and all(isinstance(p, list) and len(p) == 2 and all(type(v) in (int, float) for v in p) for p in raw)):
        raise DecodeError(f"{key}: 'landmarks' is not a list of {N_LANDMARKS} [x, y] numbers")
    side = max(w, h)
    if any(abs(v) > 1e9 for p in raw for v in p):  # json ints have no bound: 10**400 overflows a float
        raise DecodeError(f"{key}: 'landmarks' holds points far outside the {w}x{h} image")
    lm = np.array(raw, dtype=np.float64)
    # json reads Infinity and NaN; a point further than one image side off the image is not a landmark of it
    if not np.isfinite(lm).all() or lm.min() < -side or lm.max() > 2 * side:
        raise DecodeError(f"{key}: 'landmarks' holds non-finite values or points far outside the {w}x{h} image")
    return lm.astype(np.float32), True


def _warp_flow(grid: np.ndarray, stored: tuple[int, int], scale: tuple[float, float], x0: int, y0: int,
               size: int, flipped: bool) -> np.ndarray:
    """float32 [2, size, size]: the stored flow grid (2, gh, gw) resampled onto the augmented crop, displacements
    in its pixels. One inverse affine map, crop pixel -> grid pixel, with the pixel-centre convention above."""
    import cv2

    (w, h), (sx, sy) = stored, scale
    gh, gw = grid.shape[1:]
    ax, ay = gw / (w * sx), gh / (h * sy)  # crop pixels -> grid pixels per axis
    m = np.array([[ax, 0.0, (x0 + 0.5) * ax - 0.5], [0.0, ay, (y0 + 0.5) * ay - 0.5]])
    uv = cv2.warpAffine(np.ascontiguousarray(grid.transpose(1, 2, 0)), m, (size, size),
                        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)
    uv = uv.reshape(size, size, 2) * np.array([sx, sy], dtype=np.float32)
    if flipped:
        uv = uv[:, ::-1] * np.array([-1.0, 1.0], dtype=np.float32)
    return np.ascontiguousarray(uv.transpose(2, 0, 1), dtype=np.float32)


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


@dataclass
class TrainSample:
    """One augmented training example: the image and, in its pixel coordinates, the face's geometry."""

    image: torch.Tensor  # uint8 [3, S, S]
    meta: dict  # checked by check_meta
    landmarks: np.ndarray  # float32 [68, 2] in the augmented image (the template where the sample has none)
    landmarks_valid: bool
    flow: np.ndarray | None  # float32 [2, S, S], pixels of the augmented image; None unless asked for
    flow_valid: bool  # False: the sample has no flow.npy (zeros), or flow was not asked for
    flipped: bool


def decode_sample(sample: dict, size: int, rng: random.Random, flow: bool = False, labels: bool = True) -> TrainSample:
    """Decode and augment one training sample; ``flow``: also read and transform its ``flow.npy``; ``labels=False``:
    its label fields are dropped unread (an unlabelled source). The random draws are the image's alone (crop, flip,
    jitter): the geometry adds none."""
    img, meta, stored, scale = _load(sample, size, labels)
    key = sample.get("__key__")
    lm, lm_valid = _landmarks(meta, stored, key)
    grid = None
    if flow and "flow.npy" in sample:
        grid = decode_flow(sample["flow.npy"], *stored)
    x, y = rng.randint(0, img.width - size), rng.randint(0, img.height - size)
    arr = np.asarray(img.crop((x, y, x + size, y + size)), dtype=np.float32)
    flipped = rng.random() < 0.5
    if flipped:
        arr = arr[:, ::-1]
    b, c, s = (rng.uniform(1 - JITTER, 1 + JITTER) for _ in range(3))
    # brightness, contrast about the mean, saturation about the grey level, folded into two passes
    mean = float(arr.mean()) * b
    arr = arr * (b * c) + mean * (1 - c)
    arr = arr * s + (arr @ _GRAY)[..., None] * (1 - s)
    lm = (lm + 0.5) * np.array(scale, dtype=np.float32) - 0.5 - np.array([x, y], dtype=np.float32)
    if flipped:
        lm = flip_landmarks(lm, size)
    out_flow = None
    if flow:
        out_flow = (np.zeros((2, size, size), np.float32) if grid is None
                    else _warp_flow(grid, stored, scale, x, y, size, flipped))
    return TrainSample(_to_tensor(np.clip(arr, 0, 255).astype(np.uint8)), meta, lm.astype(np.float32), lm_valid,
                       out_flow, grid is not None, flipped)


def decode_train(sample: dict, size: int, rng: random.Random) -> tuple[torch.Tensor, dict]:
    """(image, meta) of ``decode_sample``: for the parts of a batch that carry no geometry."""
    ex = decode_sample(sample, size, rng)
    return ex.image, ex.meta


def _centre(img: Image.Image, size: int) -> torch.Tensor:
    x, y = (img.width - size) // 2, (img.height - size) // 2
    return _to_tensor(np.asarray(img.crop((x, y, x + size, y + size))))


def decode_eval(sample: dict, size: int) -> tuple[torch.Tensor, dict]:
    img, meta, _, _ = _load(sample, size)
    return _centre(img, size), meta


def decode_eval_points(sample: dict, size: int) -> tuple[torch.Tensor, dict, np.ndarray | None]:
    """``decode_eval`` and the sample's stored landmarks as training reads them (None where it has none, or only
    the 5 raw points of a shard written before issue 11); DecodeError for malformed ones."""
    img, meta, stored, _ = _load(sample, size)
    lm, valid = _landmarks(meta, stored, sample.get("__key__"))
    return _centre(img, size), meta, (lm.astype(np.float64) if valid else None)


def eval_image(data: bytes, size: int, key: object = "image") -> torch.Tensor:
    """A stored face's bytes -> the network's uint8 [3, size, size] input, exactly as evaluation makes it (resize,
    centre crop): what ``ssau predict`` feeds a face it aligned itself. DecodeError when the bytes are no image."""
    try:
        img = _image(data, key, size)[0]
    except DecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL's zoo of decoder errors, confined to this image (see _load)
        raise DecodeError(f"{key}: image: {type(e).__name__}: {str(e)[:100]}") from e
    return _centre(img, size)


def au_targets(meta: dict, aus: tuple[int, ...], hidden: list[bool] | None = None) -> tuple[list[float], list[float]]:
    """Targets and mask over the training AU list ``aus``. AUs the sample's corpus does not code, AUs coded as
    unknown, and AUs hidden by label drop are masked (mask 0, target 0). ``meta`` is what decode returned (checked
    by ``check_meta``)."""
    pos = {au: j for j, au in enumerate(meta.get("aus") or [])}
    t, m = [0.0] * len(aus), [0.0] * len(aus)
    for i, au in enumerate(aus):
        j = pos.get(au)
        if j is not None and meta["mask"][j] and not (hidden and hidden[i]):
            t[i], m[i] = float(meta["occurrence"][j]), 1.0
    return t, m  # lists: tensors are made once per batch


def au_intensity(meta: dict, aus: tuple[int, ...], hidden: list[bool] | None = None) -> tuple[list[float], list[float]]:
    """Intensities (0-5) and their mask over ``aus``, as ``au_targets`` masks occurrences: known only where the AU is
    coded, not hidden by label drop, and the corpus stores an intensity for it (DISFA; BP4D's occurrence-only
    labels store -1, version-1 shards null). ``meta`` is checked by ``check_meta``."""
    pos = {au: j for j, au in enumerate(meta.get("aus") or [])}
    inten = meta.get("intensity") or []
    v, m = [0.0] * len(aus), [0.0] * len(aus)
    for i, au in enumerate(aus):
        j = pos.get(au)
        if j is not None and j < len(inten) and meta["mask"][j] and inten[j] >= 0 and not (hidden and hidden[i]):
            v[i], m[i] = float(inten[j]), 1.0
    return v, m
