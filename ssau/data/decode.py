"""Decode and augment one shard sample inside a DataLoader worker.

JPEGs are decoded with PIL's draft mode, which lets libjpeg decode at 1/2, 1/4 or 1/8 scale when the target is
that much smaller than the stored image (a large part of why streaming beats loose-file ImageFolder loading).
Output is uint8 CHW: four times less to move from workers than float, normalised on the model side.
Training: resize the shorter side to ``RESIZE_RATIO * size``, random crop, horizontal flip, colour jitter.
Evaluation: the same resize, centre crop.

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

import numpy as np
import torch
from PIL import Image

from ssau.aus import EXPRESSIONS
from ssau.data.images import MAX_PIXELS

RESIZE_RATIO = 1.143  # 224 of 256, the usual crop ratio
JITTER = 0.2  # brightness, contrast and saturation factors drawn from [1 - JITTER, 1 + JITTER]
FORMATS = ("JPEG", "PNG", "WEBP")
_GRAY = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class DecodeError(Exception):
    """A sample whose image or metadata cannot be read; the stream skips and counts it."""


def check_meta(meta: object, key: object = None) -> dict:
    """``meta`` if it has the shape training reads, else DecodeError: an object; ``aus`` (int AU numbers),
    ``occurrence`` and ``mask`` (0/1 values) lists of one length, or no ``aus``; ``expression`` an int from -1
    (none) to the last class of EXPRESSIONS, or absent."""
    if not isinstance(meta, dict):
        raise DecodeError(f"{key}: metadata is a json {type(meta).__name__}, not an object")
    aus = meta.get("aus")
    if aus is not None:
        occ, mask = meta.get("occurrence"), meta.get("mask")
        if not (isinstance(aus, list) and isinstance(occ, list) and isinstance(mask, list)
                and len(aus) == len(occ) == len(mask)):
            raise DecodeError(f"{key}: 'aus', 'occurrence' and 'mask' are not lists of one length")
        if not all(type(a) is int for a in aus):
            raise DecodeError(f"{key}: 'aus' holds something other than AU numbers")
        if not all(type(v) in (int, float, bool) and v in (0, 1) for v in occ + mask):
            raise DecodeError(f"{key}: 'occurrence' or 'mask' holds a value other than 0 or 1")
    e = meta.get("expression", -1)
    if type(e) is not int or not -1 <= e < len(EXPRESSIONS):
        raise DecodeError(f"{key}: expression {str(e)[:20]!r} is not an int from -1 to {len(EXPRESSIONS) - 1}")
    return meta


def _image(data: bytes, key: object, size: int) -> Image.Image:
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
    img.draft("RGB", (short, short))  # decode at reduced scale where libjpeg can
    img = img.convert("RGB")
    scale = short / min(img.size)
    return img.resize((max(short, round(img.width * scale)), max(short, round(img.height * scale))),
                      Image.Resampling.BILINEAR)


def _load(sample: dict, size: int) -> tuple[Image.Image, dict]:
    key = sample.get("__key__")
    if "json" not in sample or "jpg" not in sample:
        raise DecodeError(f"{key}: sample has no {'json' if 'json' not in sample else 'jpg'} member")
    try:
        meta = json.loads(sample["json"])
    except (ValueError, RecursionError) as e:  # RecursionError: json nested thousands deep
        raise DecodeError(f"{key}: json: {str(e)[:100]}") from e
    meta = check_meta(meta, key)
    try:
        img = _image(sample["jpg"], key, size)
    except DecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL's decoders raise a zoo (OSError, SyntaxError, struct.error,
        # EOFError, IndexError, ZeroDivisionError, DecompressionBombError, MemoryError...) on crafted bytes; all of
        # them are confined to this one sample.
        raise DecodeError(f"{key}: image: {type(e).__name__}: {str(e)[:100]}") from e
    return img, meta


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def decode_train(sample: dict, size: int, rng: random.Random) -> tuple[torch.Tensor, dict]:
    img, meta = _load(sample, size)
    x, y = rng.randint(0, img.width - size), rng.randint(0, img.height - size)
    arr = np.asarray(img.crop((x, y, x + size, y + size)), dtype=np.float32)
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    b, c, s = (rng.uniform(1 - JITTER, 1 + JITTER) for _ in range(3))
    # brightness, contrast about the mean, saturation about the grey level, folded into two passes
    mean = float(arr.mean()) * b
    arr = arr * (b * c) + mean * (1 - c)
    arr = arr * s + (arr @ _GRAY)[..., None] * (1 - s)
    return _to_tensor(np.clip(arr, 0, 255).astype(np.uint8)), meta


def decode_eval(sample: dict, size: int) -> tuple[torch.Tensor, dict]:
    img, meta = _load(sample, size)
    x, y = (img.width - size) // 2, (img.height - size) // 2
    return _to_tensor(np.asarray(img.crop((x, y, x + size, y + size)))), meta


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
