"""`ssau shard --validate header|full` (issue 26): what header mode still refuses, that it writes the same shards on
sound images, and its documented limit (damage after the header passes unless the key is in the sampled share)."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import pytest
from corpora import jpeg_bytes, write_bp4d
from helpers import samples_of, shard, tree_bytes
from PIL import Image

from ssau.cli import build_parser
from ssau.data.decode import decode_eval
from ssau.errors import DecodeError, ShardError
from ssau.shard import images
from ssau.shard.faces import FaceOptions, place
from ssau.shard.images import HEADER_SAMPLE, decodes_in_full, prepare_image
from ssau.shard.write import ShardSettings


def jpeg_declaring(w: int, h: int) -> bytes:
    data = bytearray(jpeg_bytes(1))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def keys(sampled: bool, n: int) -> list[str]:
    """``n`` folder keys that are (or are not) in header mode's fully decoded share."""
    return [k for k in (f"img{i}" for i in range(10 * HEADER_SAMPLE)) if decodes_in_full(k) == sampled][:n]


def test_the_sampled_share_is_one_key_in_64_and_the_same_on_every_run():
    share = sum(decodes_in_full(f"F{i:03d}_T1_{i:06d}") for i in range(64 * 200)) / (64 * 200)
    assert abs(share - 1 / HEADER_SAMPLE) < 0.3 / HEADER_SAMPLE
    assert [decodes_in_full(k) for k in keys(True, 3) + keys(False, 3)] == [True] * 3 + [False] * 3


def test_header_mode_passes_an_rgb_jpeg_without_decoding_it(monkeypatch):
    good = jpeg_bytes(3, size=48)
    opened = []
    real_open = Image.open
    monkeypatch.setattr(images.Image, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    fast = place(good, None, None, FaceOptions(), header_only=True)
    assert opened == [] and fast.prepared.jpeg == good  # no PIL at all: libjpeg-turbo's header only
    full = place(good, None, None, FaceOptions())
    assert opened and full.prepared == fast.prepared and (full.matrix == fast.matrix).all()


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_header_mode_converts_gray_and_cmyk_as_full_mode_does(mode):
    data = jpeg_bytes(4, size=40, mode=mode)
    assert prepare_image(data, header_only=True) == prepare_image(data)


def test_a_validate_mode_not_known_is_refused_and_the_help_says_what_header_does(capsys):
    with pytest.raises(ShardError, match="--validate 'hdr'"):
        ShardSettings(format="folder", images="x", labels=None, validate="hdr")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["shard", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--validate {full,header}" in text and "1 image in 64" in text and "damage after the header" in text


def test_header_mode_refuses_what_is_no_jpeg_or_declares_too_much(tmp_path):
    root = tmp_path / "faces"
    root.mkdir()
    cases = {"good.jpg": jpeg_bytes(1), "text.jpg": b"this is not an image at all\n" * 10, "empty.jpg": b"",
             "huge.jpg": jpeg_declaring(9000, 9000), "vast.jpg": jpeg_declaring(60000, 60000),
             "tiny.jpg": jpeg_bytes(5, size=4), "soi-then-junk.jpg": b"\xff\xd8\xff" + bytes(range(200))}
    for name, data in cases.items():
        (root / name).write_bytes(data)
        assert not decodes_in_full(Path(name).stem)  # every one takes the header path
    reasons = {}
    for mode in ("full", "header"):
        out = tmp_path / mode
        assert shard("folder", "--images", str(root), "--out", str(out), "--validate", mode) == 0
        doc = json.loads((out / "dataset.json").read_text())
        reasons[mode] = {Path(x["input"]).name: (x["reason"], x.get("detail")) for x in doc["skipped"]}
        assert sorted(samples_of(out)) == ["good"]
    assert {k: v[0] for k, v in reasons["header"].items()} == {
        "text.jpg": "not-an-image", "empty.jpg": "empty-file", "huge.jpg": "too-large", "vast.jpg": "too-large",
        "tiny.jpg": "too-small", "soi-then-junk.jpg": "not-an-image"}
    # one wording differs: over twice the limit, PIL (full mode) refuses in Image.open and gives only the product
    assert reasons["full"].pop("vast.jpg")[1] == "3600000000 pixels declared, limit 64000000 pixels"
    assert reasons["header"].pop("vast.jpg")[1] == "60000x60000 declared, limit 64000000 pixels"
    assert reasons["header"] == reasons["full"]


def test_header_mode_writes_the_same_shards_as_full_mode_on_sound_images(tmp_path):
    root = tmp_path / "BP4D"
    write_bp4d(root, frames=4)
    trees = {}
    for mode in ("full", "header"):
        out = tmp_path / mode
        assert shard("bp4d", "--images", str(root), "--labels", str(root), "--out", str(out), "--shard-size", "7",
                     "--validate", mode) == 0
        assert json.loads((out / ".ssau" / "last_run.json").read_text())["validate"] == mode
        trees[mode] = tree_bytes(out)  # tars, index, dataset.json, settings: all of it but the run's timings
    assert trees["header"] == trees["full"] and any(k.endswith(".tar") for k in trees["full"])
    # the mode is no setting of the output: a header-mode directory resumes (and verifies) under full mode
    assert shard("bp4d", "--images", str(root), "--labels", str(root), "--out", str(tmp_path / "header"),
                 "--shard-size", "7") == 0
    assert tree_bytes(tmp_path / "header") == trees["full"]


def test_a_jpeg_cut_after_its_header_passes_header_mode_unless_its_key_is_sampled(tmp_path):
    """The documented limit: only the sampled share (and the reader, which refuses it) catches body damage."""
    root = tmp_path / "faces"
    root.mkdir()
    good = jpeg_bytes(1, size=64)
    cut = good[:len(good) * 2 // 3]
    (sampled,), (unsampled,) = keys(True, 1), keys(False, 1)
    for key in (sampled, unsampled):
        (root / f"{key}.jpg").write_bytes(cut)
    (root / "whole.jpg").write_bytes(good)
    got = {}
    for mode in ("full", "header"):
        out = tmp_path / mode
        assert shard("folder", "--images", str(root), "--out", str(out), "--validate", mode) == 0
        doc = json.loads((out / "dataset.json").read_text())
        got[mode] = ({Path(x["input"]).stem: x["reason"] for x in doc["skipped"]}, samples_of(out))
    assert got["full"][0] == {sampled: "truncated", unsampled: "truncated"} and sorted(got["full"][1]) == ["whole"]
    skipped, stored = got["header"]
    assert skipped == {sampled: "truncated"} and sorted(stored) == sorted(["whole", unsampled])
    assert stored[unsampled]["jpg"] == cut  # stored as it came ...
    with pytest.raises(DecodeError, match="truncated"):  # ... and refused by the reader, which skips and counts it
        decode_eval({"__key__": unsampled, "jpg": cut, "json": b"{}"}, 32)
    assert Image.open(io.BytesIO(cut)).size == (64, 64)  # its header is whole: nothing short of decoding tells
