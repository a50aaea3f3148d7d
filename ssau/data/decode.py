"""Decode and augment one shard sample inside a DataLoader worker.

JPEGs are decoded with PIL's draft mode, which lets libjpeg decode at 1/2, 1/4 or 1/8 scale when the target is
that much smaller than the stored image (a large part of why streaming beats loose-file ImageFolder loading).
Output is uint8 CHW: four times less to move from workers than float, normalised on the model side.
Training: resize the shorter side to ``RESIZE_RATIO * size``, random crop, horizontal flip, colour jitter.
Evaluation: the same resize, centre crop.
"""

from __future__ import annotations

import io
import json
import random

import numpy as np
import torch
from PIL import Image

RESIZE_RATIO = 1.143  # 224 of 256, the usual crop ratio
JITTER = 0.2  # brightness, contrast and saturation factors drawn from [1 - JITTER, 1 + JITTER]
_GRAY = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class DecodeError(Exception):
    """A sample whose image or metadata cannot be read; the stream skips and counts it."""


def _load(sample: dict, size: int) -> tuple[Image.Image, dict]:
    try:
        meta = json.loads(sample["json"])
        img = Image.open(io.BytesIO(sample["jpg"]))
        short = round(size * RESIZE_RATIO)
        img.draft("RGB", (short, short))  # decode at reduced scale where libjpeg can
        img = img.convert("RGB")
        scale = short / min(img.size)
        img = img.resize((max(short, round(img.width * scale)), max(short, round(img.height * scale))),
                         Image.Resampling.BILINEAR)
    except (OSError, SyntaxError, ValueError, KeyError) as e:
        raise DecodeError(f"{sample.get('__key__')}: {e}") from e
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
    unknown, and AUs hidden by label drop are masked (mask 0, target 0)."""
    pos = {au: j for j, au in enumerate(meta.get("aus") or [])}
    t, m = [0.0] * len(aus), [0.0] * len(aus)
    for i, au in enumerate(aus):
        j = pos.get(au)
        if j is not None and meta["mask"][j] and not (hidden and hidden[i]):
            t[i], m[i] = float(meta["occurrence"][j]), 1.0
    return t, m  # lists: tensors are made once per batch
