"""The libjpeg-turbo decode path (``ssau.data.decode._image``, issue 26) against the PIL path it replaced
(``_image_pil``, still the fallback).

Tolerance: at one decode scale the two decoders give identical pixels (both are libjpeg-turbo's ISLOW IDCT with
fancy upsampling); the resize is torch's antialiased bilinear instead of PIL's, which differs by at most 1 grey
level per channel (asserted here as max |a - b| <= 1 and a mean under 0.05). The geometry (stored size, per-axis
scale) is equal, not close. Every fast-path test counts the calls into simplejpeg, so a fast path that silently
fell back to PIL fails them.
"""

from __future__ import annotations

import json
import random
import struct

import numpy as np
import pytest
import simplejpeg
import torch
from corpora import face_like, jpeg_bytes

from ssau.data import decode
from ssau.data.decode import RESIZE_RATIO, _image, _image_pil, decode_eval, decode_sample, eval_image
from ssau.errors import DecodeError
from ssau.shard.schema import MAX_PIXELS


@pytest.fixture
def calls(monkeypatch) -> list[tuple[int, int]]:
    """The (height, width) of every array simplejpeg decoded during the test."""
    seen, real = [], simplejpeg.decode_jpeg

    def counted(*a, **k):
        out = real(*a, **k)
        seen.append(out.shape[:2])
        return out

    monkeypatch.setattr(decode.simplejpeg, "decode_jpeg", counted)
    return seen


def assert_close(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert d.max() <= 1 and d.mean() < 0.05, (d.max(), d.mean())


# stored (w, h), crop size, the scale libjpeg-turbo decodes at: 1/2 where the stored image is over twice the resize
# target (round(size * RESIZE_RATIO): 73 px at 64, 128 px at 112), full size where it is close to it or smaller
CASES = [((300, 260), 64, 2), ((300, 260), 112, 2), ((640, 600), 64, 8), ((150, 140), 64, 1),
         ((140, 130), 112, 1), ((131, 150), 112, 1), ((100, 120), 112, 1)]


@pytest.mark.parametrize("stored,size,k", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_libjpeg_turbo_gives_the_pil_paths_pixels_and_geometry(calls, stored, size, k, seed):
    data = face_like(*stored, seed=seed)
    got, got_stored, got_scale = _image(data, "k", size)
    assert calls == [(-(-stored[1] // k), -(-stored[0] // k))]  # the fast path ran, once, at the DCT scale 1/k
    ref, ref_stored, ref_scale = _image_pil(data, "k", size)
    assert_close(got, ref)
    assert min(got.shape[:2]) == round(size * RESIZE_RATIO)
    assert got_stored == ref_stored == stored and got_scale == ref_scale


def test_a_grayscale_jpeg_takes_the_fast_path_as_rgb(calls):
    data = face_like(200, 180, mode="L")
    got = _image(data, "k", 64)[0]
    assert len(calls) == 1 and got.shape[2] == 3
    assert_close(got, _image_pil(data, "k", 64)[0])
    assert (got[..., 0] == got[..., 1]).all() and (got[..., 1] == got[..., 2]).all()


@pytest.mark.parametrize("size", [64, 112])
def test_eval_and_train_crops_come_from_the_fast_path(calls, size):
    data = face_like(300, 260)
    s = {"__key__": "k", "jpg": data, "json": b"{}"}
    img, _ = decode_eval(s, size)
    ref = _image_pil(data, "k", size)[0]
    y, x = (ref.shape[0] - size) // 2, (ref.shape[1] - size) // 2
    assert_close(img.permute(1, 2, 0).numpy(), ref[y:y + size, x:x + size])
    assert torch.equal(eval_image(data, size), img)  # what `ssau predict` feeds the net: the same crop
    ex = decode_sample(s, size, random.Random(0))
    assert tuple(ex.image.shape) == (3, size, size) and len(calls) == 3


def test_png_and_webp_decode_with_pil(calls):
    for fmt in ("PNG", "WEBP"):
        data = face_like(150, 140, fmt=fmt)
        got, stored, scale = _image(data, "k", 64)
        ref, ref_stored, ref_scale = _image_pil(data, "k", 64)
        assert np.array_equal(got, ref) and stored == ref_stored and scale == ref_scale
    assert calls == []


def test_a_cmyk_jpeg_decodes_with_pil(calls):
    data = jpeg_bytes(2, size=96, mode="CMYK")
    assert simplejpeg.decode_jpeg_header(data)[2] == "CMYK"  # libjpeg-turbo reads it, with its own CMYK -> RGB
    got, stored, scale = _image(data, "k", 32)
    ref, ref_stored, ref_scale = _image_pil(data, "k", 32)
    assert np.array_equal(got, ref) and (stored, scale) == (ref_stored, ref_scale) and stored == (96, 96)
    assert calls == []


def jpeg_declaring(w: int, h: int) -> bytes:
    data = bytearray(face_like(64, 64))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def sample(jpg: bytes) -> dict:
    return {"__key__": "bad", "jpg": jpg, "json": json.dumps({}).encode()}


def test_a_header_declaring_too_many_pixels_is_refused_before_any_pixel(calls):
    for w, h in ((60000, 60000), (8001, 8000)):  # over twice the limit (PIL's own guard) and just over it
        with pytest.raises(DecodeError, match=f"declares {w}x{h} pixels \\(limit {MAX_PIXELS} pixels\\)"):
            decode_eval(sample(jpeg_declaring(w, h)), 32)
    with pytest.raises(Exception):  # noqa: B017 - a zero width: libjpeg-turbo refuses the header, and so does PIL
        _image_pil(jpeg_declaring(0, 64), "bad", 32)
    with pytest.raises(DecodeError, match="UnidentifiedImageError"):  # as it always did
        decode_eval(sample(jpeg_declaring(0, 64)), 32)
    assert calls == []


@pytest.mark.parametrize("what", ["truncated", "garbage", "garbage-after-soi", "empty", "cut-in-header"])
def test_crafted_bytes_give_decode_error_as_the_pil_path_does(what):
    good = face_like(120, 100)
    data = {"truncated": good[:len(good) * 2 // 3], "garbage": bytes(range(256)) * 4,
            "garbage-after-soi": b"\xff\xd8\xff" + bytes(range(250)), "empty": b"",
            "cut-in-header": good[:40]}[what]
    with pytest.raises(Exception):  # noqa: B017 - the old path refused these too, with whatever PIL raised
        _image_pil(data, "bad", 32)
    for fn in (lambda: decode_eval(sample(data), 32), lambda: decode_sample(sample(data), 32, random.Random(0)),
               lambda: eval_image(data, 32, "bad")):
        with pytest.raises(DecodeError, match="bad"):
            fn()


def test_a_truncated_jpeg_is_tried_by_libjpeg_turbo_then_refused_by_pil(calls, monkeypatch):
    good = face_like(120, 100)
    tried = []
    monkeypatch.setattr(decode, "_image_pil", lambda *a: tried.append(a) or _image_pil(*a))
    with pytest.raises(DecodeError, match="truncated"):
        decode_eval(sample(good[:len(good) // 2]), 32)
    assert len(tried) == 1  # libjpeg-turbo (strict) refused it: the fallback decided, as PIL alone did before


def test_any_exception_inside_libjpeg_turbo_is_one_skipped_sample(monkeypatch):
    """MemoryError (or anything else the decoder raises on crafted bytes) is confined to its sample."""
    def fail(*a, **k):
        raise MemoryError("cannot allocate")
    monkeypatch.setattr(decode.simplejpeg, "decode_jpeg", fail)
    with pytest.raises(DecodeError, match="MemoryError"):
        decode_eval(sample(face_like(64, 64)), 32)
