"""Optical flow between two frames of a sequence (RTATL, paper 004 Sec. 3.4: TV-L1 between frames t and t + K),
and its storage in a shard sample as ``<key>.flow.npy``.

``tvl1`` is OpenCV's Dual TV-L1 (Zach, Pock & Bischof 2007; Wedel et al. 2009), ``cv2.optflow`` of the contrib
build. Its parameters are fixed here, set one by one rather than left to OpenCV's defaults, so that a new OpenCV
release changing a default cannot change the shards ``ssau shard --flow`` writes. The values are OpenCV's 4.x
defaults, which is what TV-L1 users (RTATL included) run: tau 0.25 (time step), lambda 0.15 (data-term weight),
theta 0.3 (coupling), 5 pyramid scales at step 0.8 (the coarsest is 0.41 of the image: a few pixels of head
motion between t and t + 3 at 200 px stay within reach), 5 warps per scale, epsilon 0.01 (stopping criterion),
30 inner x 10 outer iterations, gamma 0 (no illumination term), a 5 x 5 median filter, no initial flow. Cheaper
settings (fewer warps and scales) were measured: about 1.5x faster, twice the error on a known shift. The result
is identical bytes for any ``cv2.setNumThreads`` (checked), so shards do not depend on the machine's cores.

Storage (the issue 11 contract): float16 ``(2, h, w)``, channel 0 = u (x displacement), 1 = v, in pixels of the
STORED image, on a grid that is the stored image downscaled to the flow size on its shorter side (``cv2.resize``
INTER_AREA: an average of the displacements, values not rescaled), clipped to +-clip. ``decode_flow`` reads it
back from bytes that may come from anywhere: it never unpickles, parses the npy header before anything is
allocated, and checks everything the stream relies on.
"""

from __future__ import annotations

import io

import numpy as np

from ssau.errors import ConfigError, DecodeError

# Dual TV-L1 parameters (see above); keyword names as cv2.optflow.DualTVL1OpticalFlow_create spells them.
TVL1_PARAMS = dict(tau=0.25, lambda_=0.15, theta=0.3, nscales=5, warps=5, epsilon=0.01, innnerIterations=30,
                   outerIterations=10, scaleStep=0.8, gamma=0.0, medianFiltering=5, useInitialFlow=False)
_MAX_HEADER = 1024  # np.save writes 128 bytes for a (2, h, w) float16 array; a longer header is not ours

FIX = ("pip uninstall opencv-python opencv-python-headless opencv-contrib-python-headless && "
       "pip install opencv-contrib-python-headless")


def require_optflow() -> None:
    """ConfigError (one line, naming the fix) unless OpenCV's contrib module ``cv2.optflow`` can be used."""
    try:
        import cv2
    except ImportError as e:
        raise ConfigError(f"optical flow needs OpenCV's contrib build, which does not import ({e}); "
                          f"fix: {FIX}") from None
    if not hasattr(getattr(cv2, "optflow", None), "DualTVL1OpticalFlow_create"):
        # The usual cause: opencv-python installed beside the contrib wheel shadows its cv2 package.
        raise ConfigError(f"OpenCV {getattr(cv2, '__version__', '?')} has no cv2.optflow (TV-L1 optical flow is "
                          f"in the contrib build; two OpenCV builds side by side are the common cause); fix: {FIX}")


def tvl1(prev_gray: np.ndarray, next_gray: np.ndarray) -> np.ndarray:
    """float32 [H, W, 2] flow from ``prev_gray`` to ``next_gray`` (uint8 [H, W] each): prev(x) ~ next(x + flow(x)),
    [..., 0] = u (x), [..., 1] = v (y), in pixels. Deterministic: the same inputs give the same bytes."""
    import cv2

    for name, a in (("prev_gray", prev_gray), ("next_gray", next_gray)):
        if not isinstance(a, np.ndarray) or a.dtype != np.uint8 or a.ndim != 2 or min(a.shape) < 1:
            raise ValueError(f"{name}: expected a uint8 [H, W] array, got "
                             f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")
    if prev_gray.shape != next_gray.shape:
        raise ValueError(f"frames of different sizes: {prev_gray.shape} and {next_gray.shape}")
    algo = cv2.optflow.DualTVL1OpticalFlow_create(**TVL1_PARAMS)
    return algo.calc(np.ascontiguousarray(prev_gray), np.ascontiguousarray(next_gray), None)


def grid_size(width: int, height: int, grid_short: int) -> tuple[int, int]:
    """(w, h) of the flow grid of a ``width`` x ``height`` image: its shorter side ``grid_short`` (never more than
    the image's), the longer one rounded to keep the aspect."""
    short = min(width, height)
    g = min(grid_short, short)
    return max(1, round(width * g / short)), max(1, round(height * g / short))


def encode_flow(flow_hw2: np.ndarray, grid_short: int, clip: float) -> bytes:
    """``numpy.save`` bytes of the stored form of ``flow_hw2`` (float32 [H, W, 2] over the stored image, as
    ``tvl1`` returns it): clipped to +-clip, grid reduced to ``grid_size`` by area averaging (values stay in
    stored-image pixels), float16 (2, h, w)."""
    import cv2

    if not (isinstance(flow_hw2, np.ndarray) and flow_hw2.ndim == 3 and flow_hw2.shape[2] == 2
            and min(flow_hw2.shape[:2]) >= 1):
        raise ValueError(f"flow: expected a float [H, W, 2] array, got {getattr(flow_hw2, 'shape', flow_hw2)}")
    if not 0 < clip <= 60000:  # float16 holds up to 65504
        raise ValueError(f"clip {clip}: use a positive number of pixels up to 60000")
    if grid_short < 1:
        raise ValueError(f"flow grid {grid_short}: use a positive number of pixels")
    f = np.clip(np.asarray(flow_hw2, dtype=np.float32), -clip, clip)
    if not np.isfinite(f).all():
        raise ValueError("flow holds non-finite values")
    h, w = f.shape[:2]
    gw, gh = grid_size(w, h, grid_short)
    if (gw, gh) != (w, h):
        f = cv2.resize(f, (gw, gh), interpolation=cv2.INTER_AREA)
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(f.transpose(2, 0, 1)).astype("<f2"), allow_pickle=False)
    return buf.getvalue()


def decode_flow(data: bytes, width: int, height: int) -> np.ndarray:
    """float32 (2, h, w) flow of a sample whose stored image is ``width`` x ``height``; DecodeError on anything
    that is not what ``encode_flow`` writes: not npy, a header over 1 KiB, a dtype other than float16 (pickled
    object arrays included: nothing is unpickled), C order only, a shape other than (2, h, w) with h, w within
    [1, image side] and the image's aspect (within rounding), a byte count other than the header's (truncated or
    trailing bytes), non-finite values or a displacement larger than the image. The header is checked before any
    array is made, so a crafted header declaring a huge array allocates nothing."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(f"flow.npy: {type(data).__name__}, not bytes")
    data = bytes(data)
    if not data.startswith(b"\x93NUMPY"):
        raise DecodeError("flow.npy: not a numpy .npy file")
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=_MAX_HEADER)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=_MAX_HEADER)
        else:
            raise DecodeError(f"flow.npy: npy format version {version} (1.0 or 2.0 expected)")
    except DecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - numpy's header parser raises ValueError, SyntaxError, TypeError... on
        # crafted bytes; all of them are this one sample's damage.
        raise DecodeError(f"flow.npy: unreadable header ({type(e).__name__}: {str(e)[:100]})") from None
    if dtype != np.float16:
        raise DecodeError(f"flow.npy: dtype {str(dtype)[:20]}, not float16")
    if fortran:
        raise DecodeError("flow.npy: Fortran-ordered array (encode_flow writes C order)")
    if len(shape) != 3 or shape[0] != 2:
        raise DecodeError(f"flow.npy: shape {str(shape)[:40]}, not (2, h, w)")
    gh, gw = shape[1], shape[2]
    if not (1 <= gw <= width and 1 <= gh <= height):
        raise DecodeError(f"flow.npy: a {gw}x{gh} grid for a {width}x{height} image")
    # encode_flow rounds the longer side of the grid: each side is within 1 of the other times the image's aspect
    if abs(gw - width * gh / height) > 1 or abs(gh - height * gw / width) > 1:
        raise DecodeError(f"flow.npy: a {gw}x{gh} grid does not have the aspect of the {width}x{height} image")
    n = 2 * gh * gw
    if len(data) - f.tell() != 2 * n:
        raise DecodeError(f"flow.npy: {len(data) - f.tell()} data bytes where the header declares {2 * n} "
                          f"(truncated or padded)")
    arr = np.frombuffer(data, dtype=dtype, count=n, offset=f.tell()).reshape(shape).astype(np.float32)
    if not np.isfinite(arr).all():
        raise DecodeError("flow.npy: non-finite values")
    if np.abs(arr).max() > max(width, height):
        raise DecodeError(f"flow.npy: a displacement of {float(np.abs(arr).max()):g} px in a {width}x{height} image")
    return arr
