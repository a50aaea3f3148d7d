"""Decode and augment one shard sample inside a DataLoader worker.

What decodes what: a JPEG goes to libjpeg-turbo through ``simplejpeg``, straight into a numpy array, at 1/2, 1/4 or
1/8 scale when the target is that much smaller than the stored image (DCT scaling: a large part of why streaming
beats loose-file ImageFolder loading), then to the target size by torch's antialiased bilinear (PIL's filter, within
1 grey level). The rest goes to PIL exactly as before (draft mode, ``convert``, bilinear): PNG and WebP, CMYK and
YCCK JPEGs (libjpeg-turbo's CMYK -> RGB is not PIL's), and any JPEG whose header or data libjpeg-turbo refuses or
warns about, so a file PIL accepted is still accepted and one it refused still refused. Both paths decode at the
same scale and give the same pixels within 1 grey level (``tests/test_decode.py``). Output is uint8 CHW: four times
less to move from workers than float, normalised on the model side.
Training: resize the shorter side to ``RESIZE_RATIO * size``, random crop, horizontal flip, colour jitter; with
``data.decode=device`` a JPEG is only checked here and drawn for, and made on the device (``device_decode``).
Evaluation: the same resize, centre crop.

Geometry (``decode_sample``): the sample's 68 landmarks (json ``landmarks``, pixels of the stored image) and, when
asked, its optical flow (``flow.npy``, see ``ssau.faces.flow``) go through the same resize, crop and flip as the
image. Pixel centres are at integers (``ssau.faces.template``): resizing by s maps a stored-image point x to
``(x + 0.5) * s - 0.5`` (the resize, PIL's or torch's with half-pixel centres, and libjpeg's scaled decoding all
keep pixel areas, so a pixel centre maps to a pixel centre); the crop then subtracts its offset and the flip maps x
to ``S - 1 - x`` with the 68-point mirror permutation (the flow: columns reversed and u negated). Displacements
are scaled by s per axis. A sample without landmarks gets the template (``mean_landmarks`` of the stored image with
the shard's ``align_margin``) pushed through the same augmentation and flagged invalid; one without ``flow.npy``
gets zeros, flagged invalid.

One sample can never end a run: whatever its bytes are, the only exception that leaves ``decode_train`` /
``decode_eval`` is ``DecodeError``, which the stream skips and counts. Memory is bounded before any pixel is
decoded: the size the image header declares (``simplejpeg.decode_jpeg_header`` or ``Image.open`` reads only the
header) is checked against ``MAX_PIXELS``, the limit ``ssau shard`` applies, so nothing a shard may hold is refused
here. Only JPEG, PNG and WebP are opened (a shard holds JPEG): PIL's other plugins include ones that hand the bytes
to an external interpreter (EPS to Ghostscript). The json metadata is checked for the shape the trainer relies on.
"""

from __future__ import annotations

import functools
import io
import json
import random
import re
import warnings
from dataclasses import dataclass

import numpy as np
import simplejpeg
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
DEVICE_MAX_PIXELS = 1 << 22  # data.decode=device decodes at full size: larger JPEGs are decoded here (DCT-scaled)
SOI = b"\xff\xd8\xff"  # a JPEG's first bytes: start of image, then a marker
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


def _check_size(w: int, h: int, key: object) -> None:
    if w * h > MAX_PIXELS or w < 1 or h < 1:
        raise DecodeError(f"{key}: image declares {w}x{h} pixels (limit {MAX_PIXELS} pixels)")


def _resized(w: int, h: int, short: int) -> tuple[int, int]:
    """(width, height) with the shorter side ``short``, the aspect kept."""
    scale = short / min(w, h)
    return max(short, round(w * scale)), max(short, round(h * scale))


def _resize(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """HWC uint8 resized to ``size`` (w, h), bilinear with PIL's antialiasing (a wider triangle when shrinking):
    torch's uint8 kernel matches PIL's BILINEAR within 1 grey level at a third of its cost, and needs no OpenCV."""
    if (arr.shape[1], arr.shape[0]) == size:
        return arr
    x = torch.from_numpy(arr).permute(2, 0, 1)[None]  # a channels_last view: the kernel's vectorised layout
    out = torch.nn.functional.interpolate(x, size=(size[1], size[0]), mode="bilinear", antialias=True,
                                          align_corners=False)
    return out[0].permute(1, 2, 0).numpy()


def _dct_scale(w: int, h: int, short: int) -> int:
    """PIL's draft rule, so both paths decode at one scale: the largest 1/k (k = 8, 4, 2) with both sides still
    >= short. Not libjpeg-turbo's other scales (3/8, 5/8, 7/8...): they have no SIMD IDCT and cost more than a
    full-size decode. (With short under 4 a side may be under 8 px, where two scales give one size: k unknown.)"""
    return next((k for k in (8, 4, 2) if min(w, h) // short >= k and short >= 4), 1)


def _header(data: bytes, key: object, size: int) -> tuple | None:
    """``_image``'s answer but the pixels, from a JPEG header alone: ((resized w, h), k), stored (w, h), scale; None
    for what ``_image`` leaves to PIL: not a JPEG (PNG, WebP), CMYK and YCCK (libjpeg-turbo's CMYK -> RGB is not
    PIL's, 1-2 grey levels apart), a header libjpeg-turbo refuses or warns about (strict: PIL decides, as before)."""
    if data[:3] != SOI:
        return None
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace in ("CMYK", "YCCK"):
        return None
    _check_size(w, h, key)
    k = _dct_scale(w, h, round(size * RESIZE_RATIO))
    dw, dh = -(-w // k), -(-h // k)  # libjpeg's 1/k output size
    rw, rh = _resized(dw, dh, round(size * RESIZE_RATIO))
    return ((rw, rh), k), (w, h), (rw / (k * dw), rh / (k * dh))


def _image(data: bytes, key: object, size: int) -> tuple[np.ndarray, tuple[int, int], tuple[float, float]]:
    """The image resized for a ``size`` crop (HWC uint8 RGB), the stored image's (width, height) and the scale from
    stored-image pixels to resized ones per axis. libjpeg-turbo (simplejpeg) where it reads the bytes, else PIL."""
    head = _header(data, key, size)
    if head is None:
        return _image_pil(data, key, size)
    (_, k), (w, h), _ = head
    try:
        arr = simplejpeg.decode_jpeg(data, "rgb", min_height=-(-h // k), min_width=-(-w // k))
    except ValueError:  # data libjpeg-turbo refuses or warns about (truncated, corrupt): PIL decides, as before
        return _image_pil(data, key, size)
    dh, dw = arr.shape[:2]
    out = _resize(arr, _resized(dw, dh, round(size * RESIZE_RATIO)))
    # libjpeg decodes at 1/k onto ceil(w / k) pixels, so a resized pixel spans k * dw / W stored pixels, not w / W:
    # the two differ when k does not divide w, by up to a pixel at the far edge.
    return out, (w, h), (out.shape[1] / (k * dw), out.shape[0] / (k * dh))


def _image_pil(data: bytes, key: object, size: int) -> tuple[np.ndarray, tuple[int, int], tuple[float, float]]:
    """``_image`` by PIL: its draft mode (libjpeg's 1/k scales) for JPEG, then ``convert`` and PIL's bilinear."""
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
    _check_size(w, h, key)
    short = round(size * RESIZE_RATIO)
    drafted = img.draft("RGB", (short, short))  # decode at reduced scale where libjpeg can
    k = w / drafted[1][2] if drafted else 1.0  # as in _image
    img = img.convert("RGB")
    dw, dh = img.size
    img = img.resize(_resized(dw, dh, short), Image.Resampling.BILINEAR)
    return np.asarray(img), (w, h), (img.width / (k * dw), img.height / (k * dh))


LABEL_FIELDS = ("aus", "occurrence", "mask", "intensity", "expression")


def _load(sample: dict, size: int, labels: bool = True,
          pixels: bool = True) -> tuple[np.ndarray | tuple, dict, tuple[int, int], tuple[float, float]]:
    """``labels=False`` (an unlabelled source): the label fields are dropped unread, never checked. ``pixels=False``
    (``data.decode=device``): a JPEG libjpeg-turbo reads is not decoded; ``_header``'s (resized, k) stands for it."""
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
        head = None if pixels else _header(sample["jpg"], key, size)
        if head is not None and head[1][0] * head[1][1] <= DEVICE_MAX_PIXELS:
            return head[0], meta, head[1], head[2]
        img, stored, scale = _image(sample["jpg"], key, size)
    except DecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - the decoders (PIL's above all) raise a zoo (OSError, SyntaxError,
        # struct.error, EOFError, IndexError, ZeroDivisionError, DecompressionBombError, MemoryError...) on crafted
        # bytes; all of them are confined to this one sample.
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

    image: torch.Tensor | None  # uint8 [3, S, S]; None when ``pending``
    meta: dict  # checked by check_meta
    landmarks: np.ndarray  # float32 [68, 2] in the augmented image (the template where the sample has none)
    landmarks_valid: bool
    flow: np.ndarray | None  # float32 [2, S, S], pixels of the augmented image; None unless asked for
    flow_valid: bool  # False: the sample has no flow.npy (zeros), or flow was not asked for
    flipped: bool
    pending: Pending | None = None  # data.decode=device: the image is made on the device (image None)


@dataclass
class Pending:
    """A training image as the device makes it (``ssau.data.device_decode``): the JPEG, sizes from its header, and
    the augmentation drawn by ``decode_sample``."""

    data: bytes
    resized: tuple[int, int]  # (w, h) the image is resized to before the crop
    dct: int  # k: the worker path decodes at 1/k (see _image)
    crop: tuple[int, int]  # (x, y)
    flipped: bool
    jitter: tuple[float, float, float]  # brightness, contrast, saturation


def _augment(img: np.ndarray, x: int, y: int, size: int, flipped: bool, b: float, c: float, s: float) -> torch.Tensor:
    arr = img[y:y + size, x:x + size].astype(np.float32)
    if flipped:
        arr = arr[:, ::-1]
    # brightness, contrast about the mean, saturation about the grey level, folded into two passes
    mean = float(arr.mean()) * b
    arr = arr * (b * c) + mean * (1 - c)
    arr = arr * s + (arr @ _GRAY)[..., None] * (1 - s)
    return _to_tensor(np.clip(arr, 0, 255).astype(np.uint8))


def decode_sample(sample: dict, size: int, rng: random.Random, flow: bool = False, labels: bool = True,
                  pixels: bool = True) -> TrainSample:
    """Decode and augment one training sample; ``flow``: also read and transform its ``flow.npy``; ``labels=False``:
    its label fields are dropped unread (an unlabelled source); ``pixels=False`` (``data.decode=device``): a JPEG
    libjpeg-turbo reads is left ``pending`` for the device, with the same draws. The random draws are the image's
    alone (crop, flip, jitter, in that order whatever ``pixels`` says): the geometry adds none."""
    img, meta, stored, scale = _load(sample, size, labels, pixels)
    key = sample.get("__key__")
    lm, lm_valid = _landmarks(meta, stored, key)
    grid = None
    if flow and "flow.npy" in sample:
        grid = decode_flow(sample["flow.npy"], *stored)
    rw, rh = img[0] if isinstance(img, tuple) else (img.shape[1], img.shape[0])
    x, y = rng.randint(0, rw - size), rng.randint(0, rh - size)
    flipped = rng.random() < 0.5
    b, c, s = (rng.uniform(1 - JITTER, 1 + JITTER) for _ in range(3))
    image = pending = None
    if isinstance(img, tuple):
        pending = Pending(sample["jpg"], img[0], img[1], (x, y), flipped, (b, c, s))
    else:
        image = _augment(img, x, y, size, flipped, b, c, s)
    lm = (lm + 0.5) * np.array(scale, dtype=np.float32) - 0.5 - np.array([x, y], dtype=np.float32)
    if flipped:
        lm = flip_landmarks(lm, size)
    out_flow = None
    if flow:
        out_flow = (np.zeros((2, size, size), np.float32) if grid is None
                    else _warp_flow(grid, stored, scale, x, y, size, flipped))
    return TrainSample(image, meta, lm.astype(np.float32), lm_valid, out_flow, grid is not None, flipped, pending)


def decode_train(sample: dict, size: int, rng: random.Random) -> tuple[torch.Tensor, dict]:
    """(image, meta) of ``decode_sample``: for the parts of a batch that carry no geometry."""
    ex = decode_sample(sample, size, rng)
    return ex.image, ex.meta


def _centre(img: np.ndarray, size: int) -> torch.Tensor:
    x, y = (img.shape[1] - size) // 2, (img.shape[0] - size) // 2
    return _to_tensor(img[y:y + size, x:x + size])


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
    except Exception as e:  # noqa: BLE001 - the decoders' zoo of errors, confined to this image (see _load)
        raise DecodeError(f"{key}: image: {type(e).__name__}: {str(e)[:100]}") from e
    return _centre(img, size)


@functools.lru_cache(maxsize=64)
def _positions(corpus_aus: tuple, aus: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """(training AU index, index in the sample's ``aus``) for each training AU its corpus codes (the last, if
    listed twice): one map per corpus, not one dict a sample."""
    pos = {au: j for j, au in enumerate(corpus_aus)}
    return tuple((i, pos[au]) for i, au in enumerate(aus) if au in pos)


def au_labels(meta: dict, aus: tuple[int, ...], hidden: list[bool] | None = None) -> tuple[list[float], ...]:
    """(targets, mask, intensities, intensity mask) over the training AU list ``aus``, lists for one batch tensor.
    Occurrence: AUs the sample's corpus does not code, AUs coded as unknown and AUs hidden by label drop are masked
    (mask 0, target 0). Intensity (0-5): known only where the occurrence is, and the corpus stores one for the AU
    (DISFA; BP4D's occurrence-only labels store -1, version-1 shards null). ``meta`` is checked by ``check_meta``."""
    n = len(aus)
    t, m, v, vm = [0.0] * n, [0.0] * n, [0.0] * n, [0.0] * n
    occ, mask, inten = meta.get("occurrence"), meta.get("mask"), meta.get("intensity") or ()
    for i, j in _positions(tuple(meta.get("aus") or ()), aus):
        if mask[j] and not (hidden and hidden[i]):
            t[i], m[i] = float(occ[j]), 1.0
            if j < len(inten) and inten[j] >= 0:
                v[i], vm[i] = float(inten[j]), 1.0
    return t, m, v, vm


def au_targets(meta: dict, aus: tuple[int, ...], hidden: list[bool] | None = None) -> tuple[list[float], list[float]]:
    """Targets and mask of ``au_labels``."""
    return au_labels(meta, aus, hidden)[:2]
