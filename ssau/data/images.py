"""Turning whatever a corpus holds into the RGB JPEG bytes a shard stores, or a reason to skip it.

A shard sample is always ``.jpg``. Valid RGB JPEGs are passed through byte for byte (no generation loss, and the
fastest path); everything else that decodes (grayscale, CMYK, alpha, palette, PNG, 16-bit) is converted to RGB and
encoded once at ``JPEG_QUALITY``. Every image is fully decoded first, because a truncated JPEG only shows itself
when its last scan is read.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image

JPEG_QUALITY = 95
# Decompression-bomb guard: far above any face image, far below what would exhaust a worker's memory.
Image.MAX_IMAGE_PIXELS = 64_000_000


class SkipImage(Exception):
    """The image cannot enter a shard; ``str(e)`` is the reason code written to dataset.json."""


@dataclass(frozen=True)
class Prepared:
    jpeg: bytes
    width: int
    height: int
    converted: str | None  # why the bytes were re-encoded, or None when passed through


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on white: faces cut out with alpha are usually shown on a light page.
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if img.mode.startswith("I;16") or img.mode == "I":
        # 16-bit grayscale: scale to 8 bits rather than clip.
        return img.point(lambda v: v / 256).convert("L").convert("RGB")
    return img.convert("RGB")


def encode_jpeg(img: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def prepare_image(data: bytes, resize: int | None = None, quality: int = JPEG_QUALITY) -> Prepared:
    """Validate ``data`` and return shard-ready JPEG bytes. Raises SkipImage with a reason code.

    ``resize`` scales the shorter side to that many pixels (aspect kept); faces arrive already cropped.
    """
    if len(data) == 0:
        raise SkipImage("empty-file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt, mode, size = img.format, img.mode, img.size
            if fmt == "JPEG" and (resize or mode == "RGB"):
                # libjpeg's DCT scaling: every scan is still read (so truncation is still caught), at a fraction
                # of the IDCT cost. Pass-through only validates; a resize needs no more than its target.
                img.draft(None, _target(size, resize) if resize else (size[0] // 8, size[1] // 8))
            img.load()
    except Image.DecompressionBombError as e:
        raise SkipImage("too-large") from e
    except Image.UnidentifiedImageError as e:
        raise SkipImage("not-an-image") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as e:
        raise SkipImage("truncated" if "truncated" in str(e) else "corrupt") from e
    if size[0] < 8 or size[1] < 8:
        raise SkipImage("too-small")

    converted = None
    if mode != "RGB":
        converted = f"mode-{mode}"
        img = _to_rgb(img)
    elif fmt != "JPEG":
        converted = f"format-{fmt}"
    if resize is not None and min(size) != resize:
        img = img.resize(_target(size, resize), Image.Resampling.BICUBIC)
        converted = converted or "resize"
    if converted is None:
        return Prepared(data, size[0], size[1], None)
    return Prepared(encode_jpeg(img, quality), img.width, img.height, converted)


def _target(size: tuple[int, int], short: int) -> tuple[int, int]:
    scale = short / min(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))
