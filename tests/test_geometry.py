"""Face geometry through the stream (issue 11): landmarks and optical flow follow the training augmentation.

Images and shards are built here: blobs drawn at known sub-pixel points of the stored image are found again in the
augmented image (by their intensity centroid) and compared with where the stream says the landmarks went; a
textured pair shifted by a known amount checks TV-L1; crafted ``flow.npy`` members check the hostile-input side.
"""

from __future__ import annotations

import io
import itertools
import json
import random
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from ssau.data.batch import Batch
from ssau.data.decode import decode_sample
from ssau.data.sources import SourceConfig, StreamConfig
from ssau.data.stream import TrainStream
from ssau.errors import DecodeError
from ssau.faces.flow import decode_flow, encode_flow, grid_size, require_optflow, tvl1
from ssau.faces.template import DEFAULT_MARGIN, MIRROR_68, mean_landmarks

S = 32  # training crop


def encode(arr: np.ndarray, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def blobs(w: int, h: int, points: list[tuple[float, float]], colours: list[tuple[int, int, int]],
          sigma: float = 1.6) -> np.ndarray:
    """A black w x h RGB image with a Gaussian blob of each colour centred on each point."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3))
    for (px, py), c in zip(points, colours):
        img += np.exp(-((xx - px) ** 2 + (yy - py) ** 2) / (2 * sigma ** 2))[..., None] * np.array(c)
    return np.clip(img, 0, 255).astype(np.uint8)


def centroid(weight: np.ndarray, near: np.ndarray, radius: int = 5) -> np.ndarray | None:
    """Intensity centroid (x, y) of ``weight`` [H, W] around the brightest pixel within ``radius`` of ``near``
    (the window is re-centred on the blob, so its position does not pull the centroid); None at the border."""
    h, w = weight.shape
    x0, y0 = int(round(near[0])), int(round(near[1]))
    win = weight[max(0, y0 - radius):y0 + radius + 1, max(0, x0 - radius):x0 + radius + 1]
    if win.size == 0 or win.max() <= 0:
        return None
    py, px = np.unravel_index(np.argmax(win), win.shape)
    cx, cy = max(0, x0 - radius) + px, max(0, y0 - radius) + py
    r = 3
    if not (r <= cx < w - r and r <= cy < h - r):
        return None
    patch = weight[cy - r:cy + r + 1, cx - r:cx + r + 1].astype(np.float64)
    patch = np.clip(patch - np.median(weight), 0, None)
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return np.array([cx + (patch * xx).sum() / patch.sum(), cy + (patch * yy).sum() / patch.sum()])


def sample(key: str, img: bytes, meta: dict, flow: bytes | None = None) -> dict:
    meta = {"aligned": "none"} | meta  # what `ssau shard` writes beside landmarks since issue 11
    s = {"__key__": key, "jpg": img, "json": json.dumps(meta).encode()}
    if flow is not None:
        s["flow.npy"] = flow
    return s


# ---------------------------------------------------------------------------------------------------- landmarks
# 161 x 127 and 329 x 297: libjpeg decodes at 1/2 onto 81 x 64 and at 1/8 onto 42 x 38 pixels, so the scale is
# not (resized / stored) width: a landmark mapped with that would miss its blob by up to 0.35 and 0.76 px.
@pytest.mark.parametrize("w,h", [(80, 64), (161, 127), (329, 297)])
def test_landmarks_follow_resize_and_crop(w, h):
    rng = np.random.default_rng(w)
    lm = np.stack([rng.uniform(6, w - 7, 68), rng.uniform(6, h - 7, 68)], 1)
    marked = [3, 20, 40, 60]  # blobs far enough apart to be told apart after the resize
    lm[marked] = [(0.2 * w + 0.3, 0.25 * h + 0.7), (0.75 * w + 0.4, 0.3 * h + 0.2), (0.3 * w + 0.6, 0.75 * h),
                  (0.7 * w, 0.7 * h + 0.5)]
    sigma = 1.6 * min(w, h) / round(S * 1.143)  # 1.6 px once resized
    s = sample("k", encode(blobs(w, h, [tuple(lm[i]) for i in marked], [(255, 255, 255)] * 4, sigma)),
               {"landmarks": lm.tolist()})
    errors = []
    for seed in range(40):
        ex = decode_sample(s, S, random.Random(seed))
        assert ex.landmarks_valid and ex.landmarks.shape == (68, 2) and ex.landmarks.dtype == np.float32
        gray = ex.image.numpy().astype(np.float64).mean(0)
        for i in marked:
            j = MIRROR_68[i] if ex.flipped else i  # where point i of the stored face is after the flip
            found = centroid(gray, ex.landmarks[j])
            if found is not None:
                errors.append(np.abs(found - ex.landmarks[j]).max())
    assert len(errors) > 40  # most blobs stay inside the crop
    assert np.max(errors) < 0.3, f"landmark off its blob by up to {np.max(errors):.2f} px"  # measured: 0.17


def test_flip_applies_the_mirror_permutation():
    w, h = 64, 64
    lm = mean_landmarks(w, h, 0.1).astype(np.float64)
    # a red blob on the image-left eye's outer corner (36), a green one on the image-right eye's (45)
    img = blobs(w, h, [tuple(lm[36]), tuple(lm[45])], [(255, 0, 0), (0, 255, 0)])
    s = sample("k", encode(img, "PNG"), {"landmarks": lm.tolist()})
    seen = set()
    for seed in range(30):
        ex = decode_sample(s, S, random.Random(seed))
        a = ex.image.numpy().astype(np.float64)
        red, green = a[0] - a[1], a[1] - a[0]
        # without the permutation a flip would put landmark 36 on the image-right
        assert ex.landmarks[36, 0] < ex.landmarks[45, 0], "landmark 36 must stay the image-left eye corner"
        # flipped: the red blob (the subject's right eye corner) moved to the image-right, under index 45
        red_at = ex.landmarks[45] if ex.flipped else ex.landmarks[36]
        green_at = ex.landmarks[36] if ex.flipped else ex.landmarks[45]
        r, g = centroid(red, red_at), centroid(green, green_at)
        if r is not None and g is not None:
            assert np.abs(r - red_at).max() < 0.6 and np.abs(g - green_at).max() < 0.6
            assert (r[0] > g[0]) == ex.flipped  # the image itself says whether it was flipped
            seen.add(ex.flipped)
    assert seen == {True, False}


def test_a_sample_without_landmarks_gets_the_template_flagged_invalid():
    w, h = 72, 60
    img = encode(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))
    for margin in (0.25, None):
        meta = {} if margin is None else {"align_margin": margin}
        template = mean_landmarks(w, h, DEFAULT_MARGIN if margin is None else margin)
        for seed in range(6):
            bare = decode_sample(sample("a", img, meta), S, random.Random(seed))
            given = decode_sample(sample("a", img, {**meta, "landmarks": template.tolist()}), S, random.Random(seed))
            assert not bare.landmarks_valid and given.landmarks_valid
            # the template went through the same resize, crop and flip as a sample's own landmarks do
            np.testing.assert_allclose(bare.landmarks, given.landmarks, atol=1e-4)
            assert torch.equal(bare.image, given.image)


@pytest.mark.parametrize("landmarks", [
    [[1.0, 2.0]] * 67, [[1.0, 2.0, 3.0]] * 68, [[1.0, "2"]] * 68, [[True, 2.0]] * 68, "Infinity", {"x": 1},
    [[float("nan"), 2.0]] * 68, [[1e30, 2.0]] * 68])
def test_malformed_landmarks_are_a_decode_error(landmarks):
    img = encode(np.zeros((40, 40, 3), np.uint8))
    with pytest.raises(DecodeError, match="landmarks"):
        decode_sample(sample("k", img, {"landmarks": landmarks}), S, random.Random(0))


@pytest.mark.parametrize("margin", ["wide", 0.5, -0.1, True])
def test_a_malformed_align_margin_is_a_decode_error(margin):
    img = encode(np.zeros((40, 40, 3), np.uint8))
    with pytest.raises(DecodeError, match="align_margin"):
        decode_sample(sample("k", img, {"align_margin": margin}), S, random.Random(0))


def test_geometry_leaves_the_image_and_its_random_draws_alone():
    """Other tests compare batches: the landmarks add no draw and change no pixel."""
    img = encode(np.random.default_rng(1).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    r1, r2 = random.Random(5), random.Random(5)
    a = decode_sample(sample("k", img, {}), S, r1)
    b = decode_sample(sample("k", img, {"landmarks": mean_landmarks(70, 50).tolist()}), S, r2, flow=True)
    assert torch.equal(a.image, b.image) and r1.random() == r2.random()


# ---------------------------------------------------------------------------------------------------- flow
def textured(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 255, (n // 4 + 2, n // 4 + 2)).astype(np.float32)
    return cv2.GaussianBlur(cv2.resize(base, (n, n), interpolation=cv2.INTER_CUBIC), (0, 0), 1.0)


def test_tvl1_recovers_a_known_shift_deterministically():
    require_optflow()
    n = 64
    img = textured(n + 16)
    for dx, dy in ((2.0, -1.0), (-1.5, 0.5)):
        nxt = cv2.warpAffine(img, np.float32([[1, 0, dx], [0, 1, dy]]), img.shape[::-1], borderMode=cv2.BORDER_REFLECT)
        a, b = (np.clip(x[8:-8, 8:-8], 0, 255).astype(np.uint8) for x in (img, nxt))
        f = tvl1(a, b)
        assert f.shape == (n, n, 2) and f.dtype == np.float32
        inner = f[8:-8, 8:-8]
        err = np.abs(inner - np.array([dx, dy], dtype=np.float32)).mean((0, 1))
        assert (err < 0.1).all(), f"TV-L1 misses a ({dx}, {dy}) shift by {err}"
    threads = cv2.getNumThreads()
    try:
        cv2.setNumThreads(1)
        one = tvl1(a, b).tobytes()
        cv2.setNumThreads(2)
        assert tvl1(a, b).tobytes() == one == f.tobytes()
    finally:
        cv2.setNumThreads(threads)
    with pytest.raises(ValueError, match="uint8"):
        tvl1(a.astype(np.float32), b)


def test_encode_decode_keeps_values_in_stored_image_pixels():
    rng = np.random.default_rng(0)
    w, h = 80, 64
    f = cv2.GaussianBlur(rng.normal(0, 6, (h, w, 2)).astype(np.float32), (0, 0), 3) * 4
    f[0, 0] = (50.0, -50.0)  # beyond the clip
    data = encode_flow(f, 32, clip=10.0)
    out = decode_flow(data, w, h)
    assert out.shape == (2, 32, 40) and grid_size(w, h, 32) == (40, 32)
    clipped = np.clip(f, -10, 10)
    want = cv2.resize(clipped, (40, 32), interpolation=cv2.INTER_AREA).transpose(2, 0, 1)
    np.testing.assert_allclose(out, want, rtol=1e-3, atol=1e-3)  # float16: 11 bits of mantissa
    full = decode_flow(encode_flow(f, 64, clip=10.0), w, h)  # the grid is never larger than the image
    assert full.shape == (2, h, w) and np.abs(full).max() <= 10.0
    np.testing.assert_allclose(full, clipped.transpose(2, 0, 1), rtol=1e-3, atol=1e-3)
    assert np.abs(full - clipped.transpose(2, 0, 1)).max() > 0  # it is float16, not float32, on disk


def _npy(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, **kw)
    return buf.getvalue()


def _header(shape: tuple, descr: str = "<f2", tail: bytes = b"\0" * 64) -> bytes:
    h = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}".encode()
    h += b" " * (-(len(h) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(h).to_bytes(2, "little") + h + tail


GOOD = np.full((2, 16, 20), 1.5, np.float16)  # a 20 x 16 grid of a 40 x 32 image
CRAFTED = {
    "pickled": _npy(np.array([{"a": 1}, None], dtype=object), allow_pickle=True),
    "huge": _header((2, 100_000, 100_000)),
    "float64": _npy(GOOD.astype(np.float64)),
    "nan": _npy(np.where(np.arange(640).reshape(2, 16, 20) == 7, np.nan, 1.0).astype(np.float16)),
    "inf": _npy(np.where(np.arange(640).reshape(2, 16, 20) == 9, -np.inf, 1.0).astype(np.float16)),
    "three-channels": _npy(np.zeros((3, 16, 20), np.float16)),
    "aspect": _npy(np.zeros((2, 16, 8), np.float16)),
    "flat": _npy(np.zeros(640, np.float16)),
    "truncated": _npy(GOOD)[:-10],
    "padded": _npy(GOOD) + b"\0\0",
    "fortran": _npy(np.asfortranarray(np.zeros((2, 16, 20), np.float16))),
    "not-npy": b"PK\x03\x04 a zip, not an array",
    "far": _npy(np.full((2, 16, 20), 900, np.float16)),
    "header": b"\x93NUMPY\x01\x00\xff\xff{'descr': '<f2', " + b"(" * 4000,
}


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_flow_is_a_decode_error(name):
    assert decode_flow(_npy(GOOD), 40, 32).shape == (2, 16, 20)
    with pytest.raises(DecodeError, match="flow.npy"):
        decode_flow(CRAFTED[name], 40, 32)


def test_a_header_declaring_a_huge_array_allocates_nothing():
    data = _header((2, 40_000, 40_000))  # 3.2e9 float16 values for an image that claims 40000 x 40000
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError, match="data bytes"):
            decode_flow(data, 40_000, 40_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes allocated for a header"


def _ramp_flow(w: int, h: int, grid_short: int = 8) -> bytes:
    """flow.npy of u = 3 px everywhere and v = 0.05 * x (stored-image pixels), exact at the grid's cell centres.
    A coarse grid (8 px) makes a half-cell error in placing it on the crop show (0.09 px of v, 8 %)."""
    gw, gh = grid_size(w, h, grid_short)
    x = (np.arange(gw) + 0.5) * w / gw - 0.5  # stored-image x of each grid column
    grid = np.stack([np.full((gh, gw), 3.0), np.broadcast_to(0.05 * x, (gh, gw))]).astype(np.float16)
    return _npy(grid)


def check_flow(flow: np.ndarray, landmarks: np.ndarray, stored_x0: float, w: int, h: int, flipped: bool) -> None:
    """One augmented flow field of ``_ramp_flow``: u = +-3 px scaled to the crop, v the ramp, read at the place
    the augmentation sent landmark 0 (stored x ``stored_x0``) holding that point's value, scaled."""
    short = round(S * 1.143)
    sx, sy = max(short, round(w * short / min(w, h))) / w, max(short, round(h * short / min(w, h))) / h
    assert flow.shape == (2, S, S) and flow.dtype == np.float32
    np.testing.assert_allclose(flow[0], (-3.0 if flipped else 3.0) * sx, rtol=2e-3)
    x, y = landmarks[0]
    v_at = np.interp(x, np.arange(S), flow[1, int(round(y))])
    np.testing.assert_allclose(v_at, sy * 0.05 * stored_x0, rtol=1e-2)
    slope = np.diff(flow[1, S // 2, 4:-4]).mean()
    assert (slope < 0) == flipped  # the field is mirrored with the image


def test_flow_follows_crop_scale_and_flip():
    w, h = 80, 64
    data = _ramp_flow(w, h)
    lm = mean_landmarks(w, h)
    lm[0] = (40.3, 30.0)
    img = encode(np.random.default_rng(2).integers(0, 255, (h, w, 3), dtype=np.uint8))
    flips = set()
    for seed in range(12):
        ex = decode_sample(sample("k", img, {"landmarks": lm.tolist()}, data), S, random.Random(seed), flow=True)
        assert ex.flow_valid
        j = MIRROR_68[0] if ex.flipped else 0  # jaw point 0 is index 16 after a flip
        check_flow(ex.flow, ex.landmarks[[j]], 40.3, w, h, ex.flipped)
        flips.add(ex.flipped)
    assert flips == {True, False}
    none = decode_sample(sample("k", img, {}), S, random.Random(0), flow=True)
    assert not none.flow_valid and none.flow.shape == (2, S, S) and not none.flow.any()
    off = decode_sample(sample("k", img, {}, CRAFTED["nan"]), S, random.Random(0))
    assert off.flow is None and not off.flow_valid  # flow not asked for: flow.npy is not even read


# ---------------------------------------------------------------------------------------------------- the stream
def shard_dir(root: Path, samples: list[dict]) -> Path:
    import webdataset as wds

    root.mkdir(parents=True)
    with wds.TarWriter(str(root / "geo-000000.tar")) as tw:
        for s in samples:
            tw.write(s)
    (root / "dataset.json").write_text(json.dumps({"aus": ["AU01", "AU02"], "shards": [
        {"name": "geo-000000.tar", "fold": 0, "samples": len(samples)}]}))
    return root


@pytest.fixture(scope="module")
def geo(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("geo")
    w, h = 80, 64
    data = _ramp_flow(w, h)
    lm = mean_landmarks(w, h)
    lm[0] = (40.3, 30.0)
    meta = {"aus": [1, 2], "occurrence": [1, 0], "mask": [1, 1]}
    rng = np.random.default_rng(3)

    def img():
        return encode(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))

    good = [sample(f"f{i}", img(), {**meta, "landmarks": lm.tolist()}, data) for i in range(6)]
    still = [sample(f"s{i}", img(), meta) for i in range(3)]  # no landmarks, no flow
    crafted = [sample(f"x-{name}", img(), {**meta, "landmarks": lm.tolist()}, bad) for name, bad in CRAFTED.items()]
    crafted.append(sample("x-landmarks", img(), {**meta, "landmarks": [[1.0, 2.0]] * 5}, data))
    return {"lab": shard_dir(tmp / "lab", good + still + crafted), "unl": shard_dir(tmp / "unl", good[:3] + still)}


def _batches(cfg: StreamConfig, n: int) -> list[Batch]:
    return list(itertools.islice(TrainStream(cfg), n))


def test_the_stream_carries_landmarks_and_flow_and_skips_crafted_flow(geo):
    cfg = StreamConfig(labelled=SourceConfig((str(geo["lab"]),)), unlabelled=SourceConfig((str(geo["unl"]),)),
                       m1=4, m2=3, image_size=S, workers=0, shuffle_buffer=8, flow=True)
    batches = _batches(cfg, 8)
    keys = [k for b in batches for k in b.keys]
    assert not any(k.startswith("x-") for k in keys)
    assert sum(b.skipped for b in batches) >= len(CRAFTED) + 1  # every crafted sample counted, none delivered
    assert {k[0] for k in keys} == {"f", "s"}
    for b in batches:
        assert b.landmarks.shape == (4, 68, 2) and b.landmarks.dtype == torch.float32
        assert b.flow.shape == (4, 2, S, S) and b.flow.dtype == torch.float32
        assert b.unlabelled_landmarks.shape == (3, 68, 2) and b.unlabelled_flow.shape == (3, 2, S, S)
        for part in ((b.keys, b.landmarks, b.landmarks_valid, b.flow, b.flow_valid),
                     (b.unlabelled_keys, b.unlabelled_landmarks, b.unlabelled_landmarks_valid, b.unlabelled_flow,
                      b.unlabelled_flow_valid)):
            for k, lm, lm_ok, fl, fl_ok in zip(*part):
                assert bool(lm_ok) == bool(fl_ok) == k.startswith("f")
                if not fl_ok:
                    assert not fl.any()
                    continue
                flipped = bool(fl[0].mean() < 0)  # a flip negates u; check_flow checks the rest agrees
                j = MIRROR_68[0] if flipped else 0
                check_flow(fl.numpy(), lm.numpy()[[j]], 40.3, 80, 64, flipped)
    flips = {bool(fl[0].mean() < 0) for b in batches for fl, ok in zip(b.flow, b.flow_valid) if ok}
    assert flips == {True, False}


def test_without_data_flow_the_batch_has_landmarks_but_no_flow(geo):
    cfg = StreamConfig(labelled=SourceConfig((str(geo["unl"]),)), m1=4, m2=0, image_size=S, workers=0,
                       shuffle_buffer=4)
    b = _batches(cfg, 1)[0]
    assert b.flow is None and b.flow_valid is None and b.unlabelled_landmarks is None
    assert b.landmarks.shape == (4, 68, 2)
    assert b.landmarks_valid.tolist() == [k.startswith("f") for k in b.keys]


def test_batch_to_moves_the_geometry():
    t = lambda *shape: torch.zeros(*shape)  # noqa: E731
    b = Batch(images=t(2, 3, 4, 4), targets=t(2, 1), mask=t(2, 1), keys=["a", "b"], landmarks=t(2, 68, 2),
              landmarks_valid=t(2).bool(), flow=t(2, 2, 4, 4), flow_valid=t(2).bool(), unlabelled=t(1, 3, 4, 4),
              unlabelled_landmarks=t(1, 68, 2), unlabelled_landmarks_valid=t(1).bool(),
              unlabelled_flow=t(1, 2, 4, 4), unlabelled_flow_valid=t(1).bool(), skipped=3)
    m = b.to("meta")
    for name in ("images", "landmarks", "landmarks_valid", "flow", "flow_valid", "unlabelled_landmarks",
                 "unlabelled_landmarks_valid", "unlabelled_flow", "unlabelled_flow_valid"):
        assert getattr(m, name).device.type == "meta", name
    assert m.keys == ["a", "b"] and m.skipped == 3 and m.expr_images is None


def test_require_optflow_names_the_fix_when_the_contrib_module_is_missing(monkeypatch):
    from ssau.errors import ConfigError

    require_optflow()  # the project's one OpenCV build has it
    monkeypatch.delattr(cv2, "optflow")  # what a plain opencv-python installed beside the contrib wheel looks like
    with pytest.raises(ConfigError, match="pip uninstall opencv-python .* pip install opencv-contrib") as e:
        require_optflow()
    assert "\n" not in str(e.value)
