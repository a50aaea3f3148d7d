"""``data.decode=device`` (``ssau.data.device_decode``, issue 26) against the worker path, on the CPU: the same code
runs with ``device="cpu"`` (libjpeg-turbo inside torchvision) as on CUDA (nvjpeg; tests/test_gpu.py). Pixels are
compared within ``device_decode.TOLERANCE`` (how it was measured is written there), geometry for equality: the
landmarks the worker computes from the header alone are those it computes from the decoded image."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
import torch
from corpora import face_like, write_tar
from helpers import tiny_train

from ssau.data import device_decode
from ssau.data.decode import decode_sample
from ssau.data.device_decode import TOLERANCE, DeviceDecoder, encode
from ssau.data.sources import SourceConfig, StreamConfig
from ssau.data.stream import TrainStream
from ssau.errors import DecodeError
from ssau.faces.template import mean_landmarks

FULL, SCALED = TOLERANCE["full"], TOLERANCE["scaled"]


def sample(key: str, data: bytes, w: int, h: int) -> dict:
    meta = {"aligned": "similarity", "landmarks": (mean_landmarks(w, h, 0.1) + 1.5).tolist()}
    return {"__key__": key, "jpg": data, "json": json.dumps(meta).encode()}


def both(samples: list[dict], size: int, device: str = "cpu") -> tuple[list, torch.Tensor, list[int]]:
    """(worker path's examples, device path's images and kept rows) for the same per-sample seeds."""
    worker = [decode_sample(s, size, random.Random(i), flow=False) for i, s in enumerate(samples)]
    pending = [decode_sample(s, size, random.Random(i), pixels=False) for i, s in enumerate(samples)]
    for a, b in zip(worker, pending):
        assert np.array_equal(a.landmarks, b.landmarks) and a.flipped == b.flipped  # the same draws, the same geometry
    images, keep = DeviceDecoder(device).part(encode(pending, [s["__key__"] for s in samples], size))
    return worker, images, keep


def assert_within(a: torch.Tensor, b: torch.Tensor, tol: tuple[int, float]) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype == torch.uint8
    d = (a.cpu().int() - b.cpu().int()).abs().float()
    assert d.max() <= tol[0] and d.mean() <= tol[1], (d.max().item(), d.mean().item())


@pytest.mark.parametrize("w,h,size,tol", [(37, 45, 32, (0, 0.0)), (40, 40, 32, FULL), (64, 72, 64, FULL),
                                          (130, 140, 112, FULL), (80, 90, 32, SCALED), (76, 81, 32, SCALED),
                                          (300, 260, 32, SCALED), (300, 300, 112, SCALED), (538, 512, 112, SCALED)])
def test_device_pixels_equal_the_worker_paths_within_tolerance_and_geometry_exactly(w, h, size, tol):
    samples = [sample(f"k{i}", face_like(w, h, seed=i), w, h) for i in range(8)]
    worker, images, keep = both(samples, size)
    assert keep == list(range(8))
    assert_within(images, torch.stack([ex.image for ex in worker]), tol)  # (37, 45): no resize at all: equal


def test_what_the_worker_leaves_to_pil_is_decoded_there_and_travels_as_pixels():
    png, cmyk = face_like(40, 40, 1, fmt="PNG"), face_like(40, 40, 2, mode="CMYK")
    samples = [sample("jpg", face_like(40, 40, 0), 40, 40), sample("png", png, 40, 40), sample("cmyk", cmyk, 40, 40)]
    pending = [decode_sample(s, 32, random.Random(i), pixels=False) for i, s in enumerate(samples)]
    assert [p.pending is None for p in pending] == [False, True, True]
    enc = encode(pending, [s["__key__"] for s in samples], 32)
    assert sorted(enc.ready) == [1, 2] and enc.offsets[1] == enc.offsets[2] == enc.offsets[3]
    worker, images, keep = both(samples, 32)
    assert keep == [0, 1, 2]
    for j in (1, 2):
        assert torch.equal(images[j], worker[j].image)


def test_a_jpeg_over_the_device_pixel_cap_is_decoded_in_the_worker_at_reduced_scale(monkeypatch):
    """The device decodes at full size (no DCT scaling), so a batch's device memory is bounded by the cap, not by
    what a shard may hold (64 megapixels an image): larger JPEGs travel as pixels the worker made."""
    import ssau.data.decode as decode

    monkeypatch.setattr(decode, "DEVICE_MAX_PIXELS", 100 * 100)
    small, large = sample("s", face_like(100, 100, 0), 100, 100), sample("l", face_like(160, 120, 1), 160, 120)
    pending = [decode_sample(s, 32, random.Random(i), pixels=False) for i, s in enumerate([small, large])]
    assert [p.pending is None for p in pending] == [False, True]
    worker = decode_sample(large, 32, random.Random(1))
    assert torch.equal(pending[1].image, worker.image) and np.array_equal(pending[1].landmarks, worker.landmarks)


def test_a_truncated_jpeg_the_header_check_passes_is_dropped_on_the_device_and_counted():
    good = [sample(f"g{i}", face_like(40, 40, i), 40, 40) for i in range(3)]
    data = face_like(40, 40, 9)
    bad = sample("cut", data[:len(data) // 2], 40, 40)
    with pytest.raises(DecodeError):  # the worker path refuses it too
        decode_sample(bad, 32, random.Random(0))
    samples = good[:1] + [bad] + good[1:]
    pending = [decode_sample(s, 32, random.Random(i), pixels=False) for i, s in enumerate(samples)]
    assert pending[1].pending is not None  # its header is sound: the worker lets it through
    dec = DeviceDecoder("cpu")
    images, keep = dec.part(encode(pending, [s["__key__"] for s in samples], 32))
    assert keep == [0, 2, 3] and images.shape[0] == 3 and dec.dropped == 1 and dec.fallbacks == 0
    worker = [decode_sample(s, 32, random.Random(i)) for i, s in enumerate(samples) if i != 1]
    assert_within(images, torch.stack([ex.image for ex in worker]), FULL)  # the rows kept are the right ones


def test_a_jpeg_the_device_refuses_is_decoded_by_the_worker_decoder_on_the_cpu(monkeypatch):
    """nvjpeg does not read every JPEG libjpeg-turbo reads: such a file falls back to the worker path's decoder."""
    samples = [sample(f"k{i}", face_like(80, 90, i), 80, 90) for i in range(3)]
    real = device_decode._decode_jpegs
    monkeypatch.setattr(device_decode, "_decode_jpegs", lambda files, dev: [None, *real(files[1:], dev)])
    worker, images, keep = both(samples, 32)
    assert keep == [0, 1, 2]
    assert_within(images[:1], worker[0].image[None], FULL)  # the worker's own 1/k decode: only the resize differs
    assert_within(images[1:], torch.stack([ex.image for ex in worker[1:]]), SCALED)


@pytest.fixture(scope="module")
def shards(corpora):
    return corpora.bp4d(shard_size=4)


def stream_cfg(shards, decode: str, workers: int, **kw) -> StreamConfig:
    return StreamConfig(labelled=SourceConfig((str(shards),)), unlabelled=SourceConfig((str(shards),)), m1=4, m2=3,
                        image_size=32, workers=workers, shuffle_buffer=8, decode=decode, **kw)


@pytest.mark.parametrize("workers", [0, 1])
def test_the_stream_gives_the_worker_paths_batches_with_images_made_on_the_device(shards, workers):
    ref = list(itertools.islice(TrainStream(stream_cfg(shards, "worker", workers)), 3))
    raw = list(itertools.islice(TrainStream(stream_cfg(shards, "device", workers)), 3))
    assert raw[0].images is None and set(raw[0].encoded) == {"images", "unlabelled"}
    dev = list(DeviceDecoder("cpu")(iter(raw)))
    for a, b in zip(ref, dev, strict=True):
        assert a.keys == b.keys and a.unlabelled_keys == b.unlabelled_keys and not b.encoded
        for name in ("targets", "mask", "landmarks", "landmarks_valid", "unlabelled_landmarks"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert_within(b.images, a.images, FULL)
        assert_within(b.unlabelled, a.unlabelled, FULL)


def test_a_sample_nobody_can_decode_leaves_its_batch_with_its_labels_and_is_counted(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    meta = {"aus": [1, 2], "occurrence": [1, 0], "mask": [1, 1], "aligned": "similarity",
            "landmarks": mean_landmarks(40, 40, 0.1).tolist()}
    cut = face_like(40, 40, 99)
    write_tar(d / "bad-000000.tar", [(f"g{i}", face_like(40, 40, i), meta) for i in range(3)]
              + [("cut", cut[:len(cut) // 2], meta)])
    (d / "dataset.json").write_text(json.dumps({"aus": ["AU01", "AU02"], "shards": [
        {"name": "bad-000000.tar", "fold": 0, "samples": 4}]}))
    cfg = StreamConfig(labelled=SourceConfig((str(d),)), m1=4, image_size=32, workers=0, shuffle_buffer=1,
                       decode="device")
    batches = list(itertools.islice(DeviceDecoder("cpu")(iter(TrainStream(cfg))), 4))
    assert sum(b.skipped for b in batches) >= 1
    for b in batches:
        n = len(b.keys)
        assert b.images.shape[0] == b.targets.shape[0] == b.landmarks.shape[0] == b.landmarks_valid.shape[0] == n
        assert "cut" not in b.keys and n == 4 - b.skipped


def test_a_short_training_run_decodes_on_the_device_and_evaluates(shards, tmp_path, monkeypatch):
    from ssau.train.setup import load_run_config
    from ssau.train.trainer import Trainer

    made = []
    real = DeviceDecoder.part
    monkeypatch.setattr(DeviceDecoder, "part", lambda self, enc: made.append(len(enc.keys)) or real(self, enc))
    cfg = load_run_config(None, tiny_train(shards, tmp_path, "data.decode=device", "tracking.enabled=false",
                                           f"data.unlabelled=[{shards}]", "data.m2=2")[1:])
    metrics = Trainer(cfg).fit()
    assert made and set(made) <= {4, 2}  # labelled and unlabelled parts, every step
    assert 0.0 <= metrics["f1_mean"] <= 1.0 and (tmp_path / "runs").is_dir()


def test_an_unknown_decode_setting_is_refused():
    from ssau.errors import ConfigError
    from ssau.train.setup import load_run_config

    with pytest.raises(ConfigError, match="data.decode: 'gpu' is not allowed; choose one of worker, device"):
        load_run_config(None, ["data.labelled=[x]", "data.decode=gpu"])


def test_a_batch_whose_part_lost_every_sample_is_passed_over_and_its_samples_counted():
    from ssau.data.batch import Batch

    cut = face_like(40, 40, 5)
    cut = cut[:len(cut) // 2]  # a sound header, half the data
    bad = [decode_sample(sample(f"c{i}", cut, 40, 40), 32, random.Random(i), pixels=False) for i in range(2)]
    good = [decode_sample(sample(f"g{i}", face_like(40, 40, i), 40, 40), 32, random.Random(i), pixels=False)
            for i in range(2)]

    def batch(examples, keys):
        return Batch(images=None, targets=torch.zeros(2, 1), mask=torch.ones(2, 1), keys=keys, skipped=1,
                     encoded={"images": encode(examples, keys, 32)})

    out = list(DeviceDecoder("cpu")(iter([batch(bad, ["c0", "c1"]), batch(good, ["g0", "g1"])])))
    assert len(out) == 1 and out[0].keys == ["g0", "g1"] and out[0].images.shape == (2, 3, 32, 32)
    assert out[0].skipped == (1 + 2) + 1  # the passed-over batch's own count and its two samples, then this one's


def test_flow_is_warped_by_the_same_geometry_as_on_the_worker_path():
    from ssau.faces.flow import encode_flow

    w, h = 150, 170  # k = 2 at 32 px: the scale comes from the header's 1/k size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    flow = encode_flow(np.stack([xx / w * 3, yy / h - 0.5], -1), 16, 8.0)
    for seed in range(4):
        s = sample("k", face_like(w, h, seed), w, h) | {"flow.npy": flow}
        a = decode_sample(s, 32, random.Random(seed), flow=True)
        b = decode_sample(s, 32, random.Random(seed), flow=True, pixels=False)
        assert b.image is None and b.pending is not None and a.flow_valid and b.flow_valid
        assert np.array_equal(a.flow, b.flow) and np.array_equal(a.landmarks, b.landmarks)
