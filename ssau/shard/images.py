"""Turning whatever a corpus holds into the RGB JPEG bytes a shard stores, or a reason to skip it.

A shard sample is always ``.jpg``. Valid RGB JPEGs are passed through byte for byte (no generation loss, and the
fastest path); everything else that decodes (grayscale, CMYK, alpha, palette, PNG, 16-bit) is converted to RGB and
encoded once at ``JPEG_QUALITY``. Every image is fully decoded first, because a truncated JPEG only shows itself
when its last scan is read (an RGB JPEG that passes through at libjpeg's 1/8 scale: every scan is still read).

``--validate header`` trades that check for speed on pass-through JPEGs: libjpeg-turbo reads the header (through
``simplejpeg.decode_jpeg_header``: SOI, tables and the SOF marker, strict, so a warning counts) and the size it
declares is checked as below, and the bytes pass through undecoded. One key in ``HEADER_SAMPLE`` (by a hash of the
key: the same images on every run and for any ``--workers``) is still decoded in full, and so is every image the
header check does not pass (not a JPEG, not 3-component, a header libjpeg-turbo refuses or warns about) or that is
converted or resized anyway: header mode never skips an image full mode keeps, and on a corpus of sound images
writes the same bytes. Its limit: damage after the header (a truncated or corrupt scan) passes unless sampled; the
reader then refuses that sample (DecodeError), which the stream skips and counts.

Memory stays bounded: ``check_header`` compares the size the header declares (``Image.open`` reads only the
header) with ``MAX_PIXELS`` before a single pixel is decoded, so a crafted 30000x30000 JPEG or a 121-megapixel PNG
costs a few bytes of header, not gigabytes. No image can end a run: whatever goes wrong while preparing one image
becomes a reason to skip it.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image

from ssau.errors import SkipImage
from ssau.shard.schema import MAX_PIXELS

JPEG_QUALITY = 95
# Below this the image cannot hold a face, and libjpeg's 1/8 draft scale would round a side to 0 pixels.
MIN_SIDE = 8
# PIL's own guard stays as a backstop for code that opens images without check_header (it warns above the limit
# and raises above twice it); the reader (ssau.data.decode) sets the same.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# The formats a corpus ships (adapters.IMAGE_EXTS, plus GIF under a wrong name); the contents decide, not the name.
# PIL's other plugins include EPS, whose load hands the bytes to Ghostscript: never run a program on a file read.
FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF", "GIF")
VALIDATE = ("full", "header")  # --validate: decode every image, or read pass-through JPEGs' headers (module doc)
HEADER_SAMPLE = 64  # --validate header: 1 key in this many is still decoded in full


def exception_detail(e: BaseException) -> str:
    """A short, reproducible description of ``e`` for a skip entry (dataset.json is byte-identical across runs, so
    no object addresses)."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", f"{e}")[:200] or type(e).__name__


def check_header(img: Image.Image) -> None:
    """Raise SkipImage('too-large' / 'too-small') from the size ``img``'s header declares; decodes nothing.

    Call it right after ``Image.open`` and before ``draft``/``load``/``convert``.
    """
    check_size(*img.size)


def check_size(w: int, h: int) -> None:
    """``check_header`` for a declared width and height."""
    if w * h > MAX_PIXELS:
        raise SkipImage("too-large", f"{w}x{h} declared, limit {MAX_PIXELS} pixels")
    if w < MIN_SIDE or h < MIN_SIDE:
        raise SkipImage("too-small", f"{w}x{h}, sides under {MIN_SIDE} px")


@dataclass(frozen=True)
class Prepared:
    jpeg: bytes
    width: int
    height: int
    converted: str | None  # why the bytes were re-encoded, or None when passed through
    scale: tuple[float, float] | None = None  # source pixels -> stored pixels per axis when resized (else sizes')


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


def decodes_in_full(key: str) -> bool:
    """Whether ``--validate header`` still decodes ``key``'s image in full: 1 key in ``HEADER_SAMPLE``, by a hash
    that does not change between runs (Python's ``hash`` does)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % HEADER_SAMPLE == 0


def prepare_image(data: bytes, resize: int | None = None, quality: int = JPEG_QUALITY,
                  header_only: bool = False) -> Prepared:
    """Validate ``data`` and return shard-ready JPEG bytes. Raises SkipImage with a reason code.

    ``resize`` scales the shorter side to that many pixels (aspect kept); faces arrive already cropped.
    ``header_only``: an RGB JPEG whose header passes is not decoded (``--validate header``, module doc).
    """
    if len(data) == 0:
        raise SkipImage("empty-file")
    try:
        if header_only and resize is None and (passed := _header_passes(data)) is not None:
            return passed
        return _prepare(data, resize, quality)
    except SkipImage:
        raise
    except Exception as e:  # one image's bytes must never end a run, whatever they make PIL raise
        raise SkipImage(f"error-{type(e).__name__}", exception_detail(e)) from e


def _header_passes(data: bytes) -> Prepared | None:
    """The pass-through of an RGB JPEG whose header libjpeg-turbo reads without a warning and whose declared size is
    within limits (SkipImage when it is not); None for anything else, which takes the full path."""
    if not data.startswith(b"\xff\xd8\xff"):  # SOI, then a marker
        return None
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None  # PIL may still read it, as full mode would
    if colorspace not in ("YCbCr", "RGB"):  # what PIL opens as mode RGB; gray and CMYK are converted, so decoded
        return None
    check_size(w, h)
    return Prepared(data, w, h, None)


def _open(data: bytes, resize: int | None = None, validate_only: bool = False
          ) -> tuple[Image.Image, str, str, tuple[int, int], float]:
    """(loaded image, format, mode, declared size, k): a JPEG decodes at 1/k (k = 1, 2, 4, 8) where that is enough:
    to the ``resize`` target, or at 1/8 when an RGB JPEG is only validated (it then passes through byte for byte)."""
    k = 1.0
    try:
        with warnings.catch_warnings():
            # PIL warns between 1x and 2x its limit; check_header makes the decision, with the declared size.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
        fmt, mode, size = img.format, img.mode, img.size
        check_header(img)
        if fmt == "JPEG" and (resize or (validate_only and mode == "RGB")):
            # libjpeg's DCT scaling: every scan is still read (so truncation is still caught), at a fraction
            # of the IDCT cost.
            drafted = img.draft(None, _target(size, resize) if resize else (size[0] // 8, size[1] // 8))
            k = size[0] / drafted[1][2] if drafted else 1.0
        img.load()
    except Image.DecompressionBombError as e:  # over twice the limit: PIL refuses in open, before check_header
        declared = re.search(r"\((\d+) pixels\)", str(e))
        raise SkipImage("too-large", f"{declared[1] if declared else 'over 2x that'} pixels declared, "
                                     f"limit {MAX_PIXELS} pixels") from e
    except Image.UnidentifiedImageError as e:
        raise SkipImage("not-an-image") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise SkipImage("truncated" if "truncated" in str(e) else "corrupt", exception_detail(e)) from e
    return img, fmt, mode, size, k


def decode_rgb(data: bytes) -> np.ndarray:
    """The full-size RGB pixels (H x W x 3 uint8) of ``data``, checked as ``prepare_image`` checks it."""
    if len(data) == 0:
        raise SkipImage("empty-file")
    try:
        img = _open(data)[0]
        return np.asarray(_to_rgb(img))
    except SkipImage:
        raise
    except Exception as e:  # as in prepare_image: one image's bytes never end a run
        raise SkipImage(f"error-{type(e).__name__}", exception_detail(e)) from e


def _prepare(data: bytes, resize: int | None, quality: int) -> Prepared:
    img, fmt, mode, size, k = _open(data, resize, validate_only=True)
    decoded = img.size
    converted = None
    if mode != "RGB":
        converted = f"mode-{mode}"
        img = _to_rgb(img)
    elif fmt != "JPEG":
        converted = f"format-{fmt}"
    scale = None
    if resize is not None and min(size) != resize:
        img = img.resize(_target(size, resize), Image.Resampling.BICUBIC)
        converted = converted or "resize"
        # libjpeg decoded onto ceil(w / k) pixels: a stored pixel spans k * decoded / stored source pixels, which
        # is not w / stored where k does not divide w (landmarks are scaled by this)
        scale = (img.width / (k * decoded[0]), img.height / (k * decoded[1]))
    if converted is None:
        return Prepared(data, size[0], size[1], None)
    return Prepared(encode_jpeg(img, quality), img.width, img.height, converted, scale)


def _target(size: tuple[int, int], short: int) -> tuple[int, int]:
    scale = short / min(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))
