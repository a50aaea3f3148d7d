"""One per-sample json schema for every format (issue 13), read back with plain webdataset and pyarrow; samples of
schema version 1 read like version 2; the index's position / tar_offset / tar_size; sources relative to --images."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from corpora import jpeg_bytes, shard_bp4d, shard_rafdb, write_tar

from ssau.aus import STANDARD_AUS
from ssau.cli import main
from ssau.data.decode import au_targets, decode_eval, decode_sample
from ssau.data.eval_stream import eval_loader
from ssau.faces.template import MEAN_68
from ssau.shard.plan import _part
from ssau.shard.schema import hf_features, sample_arrow_type
from ssau.shard.write import relative_source

# The documented schema (ssau/shard/schema.py): [t] is a list of t.
SCHEMA = {"schema_version": int, "corpus": str, "key": str, "source": str, "subject": str, "sequence": str,
          "frame": int, "split": str, "fold": int, "aus": [int], "au_names": [str], "occurrence": [int],
          "mask": [int], "intensity": [float], "expression": int, "expression_name": str, "width": int,
          "height": int, "aligned": str, "align_margin": float, "landmarks": [[float]], "bbox": [float],
          "flow_partner": str}


def conforms(value, kind) -> bool:
    if isinstance(kind, list):
        return isinstance(value, list) and all(conforms(v, kind[0]) for v in value)
    return type(value) is kind  # strict: a bool is not an int, an int is not a float, None is nothing


def shard(*args: str) -> None:
    assert main(["shard", *args, "--quiet"]) == 0


@pytest.fixture(scope="module")
def local_corpora(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("schema")
    out = {"bp4d": shard_bp4d(tmp, frames=3, shard_size=8), "rafdb": shard_rafdb(tmp, images=8, shard_size=4)}
    # Unlabelled faces in subfolders: one with a sidecar box, one with 68 sidecar landmarks.
    faces = tmp / "faces"
    for i in range(6):
        (faces / f"p{i % 2}").mkdir(parents=True, exist_ok=True)
        (faces / f"p{i % 2}" / f"face {i}.jpg").write_bytes(jpeg_bytes(500 + i))
    (faces / "p0" / "face 0.jpg.json").write_text(json.dumps({"bounding_box": {"x": 1, "y": 2, "width": 20,
                                                                               "height": 22}}))
    lm = {str(i): {"x": round(2 + 28 * x, 2), "y": round(2 + 28 * y, 2)} for i, (x, y) in enumerate(MEAN_68)}
    (faces / "p1" / "face 1.jpg.json").write_text(json.dumps({"landmarks": lm}))
    shard("folder", "--images", str(faces), "--out", str(tmp / "folder"), "--shard-size", "4")
    out["folder"] = tmp / "folder"
    # DISFA from extracted frames, two of its eight AUs coded: the others are unknown in every list.
    for f in range(1, 4):
        (tmp / "frames" / "SN001").mkdir(parents=True, exist_ok=True)
        (tmp / "frames" / "SN001" / f"{f:05d}.jpg").write_bytes(jpeg_bytes(600 + f))
    (tmp / "AUL" / "SN001").mkdir(parents=True)
    for au in (1, 12):
        (tmp / "AUL" / "SN001" / f"SN001_au{au}.txt").write_text("".join(f"{f},{f + au % 3}\n" for f in range(1, 4)))
    shard("disfa", "--images", str(tmp / "frames"), "--labels", str(tmp / "AUL"), "--out", str(tmp / "disfa"),
          "--frame-template", "{subject}/{frame:05d}.jpg")
    out["disfa"] = tmp / "disfa"
    # EmotioNet (999 unknown) and a CSV manifest (-1 unknown, an expression, a path with '..' in it).
    emo = tmp / "emo"
    emo.mkdir()
    lines = []
    for i in range(3):
        (emo / f"e{i}.jpg").write_bytes(jpeg_bytes(700 + i))
        vals = ["999" if au == 5 else str((i + au) % 2) for au in range(1, 61)]
        lines.append(f"http://x.org/e{i}.jpg http://y.org/{i}.jpg " + " ".join(vals))
    (tmp / "emo.txt").write_text("\n".join(lines) + "\n")
    shard("emotionet", "--images", str(emo), "--labels", str(tmp / "emo.txt"), "--out", str(tmp / "emotionet"))
    out["emotionet"] = tmp / "emotionet"
    (emo / "sub").mkdir()
    (tmp / "m.csv").write_text("image,subject,AU1,AU2,expression\ne0.jpg,s1,1,-1,happiness\nsub/../e1.jpg,s2,0,1,\n")
    shard("csv", "--images", str(emo), "--labels", str(tmp / "m.csv"), "--out", str(tmp / "csv"), "--unknown", "-1")
    out["csv"] = tmp / "csv"
    return out


def tars(d: Path) -> list[str]:
    return [str(p) for p in sorted(d.glob("*.tar"))]


def test_every_format_stores_one_schema_that_webdataset_and_pyarrow_read_as_one_table(local_corpora):
    # A mixed list, shards of different local_corpora interleaved, read with plain webdataset.
    lists = [tars(local_corpora[c]) for c in ("bp4d", "rafdb", "folder", "disfa", "emotionet", "csv")]
    urls = [lst[i] for i in range(max(map(len, lists))) for lst in lists if i < len(lst)]
    docs = [s["json"] for s in wds.WebDataset(urls, shardshuffle=False).decode()]
    total = sum(json.loads((local_corpora[c] / "dataset.json").read_text())["samples"] for c in local_corpora)
    assert len({(d["corpus"], d["key"]) for d in docs}) == total
    assert {d["corpus"] for d in docs} == set(local_corpora)
    for d in docs:
        assert set(d) == set(SCHEMA), (d["corpus"], set(d) ^ set(SCHEMA))
        bad = {k: d[k] for k, kind in SCHEMA.items() if not conforms(d[k], kind)}
        assert not bad, (d["corpus"], bad)
        assert d["schema_version"] == 2
        n = len(d["aus"])
        assert len(d["au_names"]) == len(d["occurrence"]) == len(d["mask"]) == len(d["intensity"]) == n
        assert d["au_names"] == [f"AU{a:02d}" for a in d["aus"]]  # the index's and MLflow's names
        for o, m, v in zip(d["occurrence"], d["mask"], d["intensity"]):
            assert (o == -1) == (m == 0) and o in (-1, 0, 1) and (m or v == -1.0)
        assert d["landmarks"] == [] or len(d["landmarks"]) == 68
    by = {c: [d for d in docs if d["corpus"] == c] for c in local_corpora}
    assert all(d["aus"] == [] and d["intensity"] == [] for c in ("rafdb", "folder") for d in by[c])
    assert all(d["intensity"] == [-1.0] * 12 and d["expression_name"] == "" for d in by["bp4d"])
    assert any(-1 in d["occurrence"] for d in by["bp4d"])  # local_corpora.write_bp4d codes some AU04 as 9
    disfa = by["disfa"][0]
    coded = [au in (1, 12) for au in STANDARD_AUS["disfa"]]
    assert disfa["mask"] == [int(c) for c in coded] and all((v >= 0) == c for v, c in zip(disfa["intensity"], coded))
    assert {d["expression_name"] for d in by["rafdb"]} <= {"surprise", "fear", "disgust", "happiness", "sadness",
                                                           "anger", "neutral"}
    folder = {d["key"]: d for d in by["folder"]}
    assert folder["p0-face-0"]["bbox"] == [1.0, 2.0, 20.0, 22.0] and len(folder["p1-face-1"]["landmarks"]) == 68
    assert all(d["align_margin"] == -1.0 and d["flow_partner"] == "" for d in docs)
    # Over all samples pyarrow infers the documented Arrow type (no null columns); handed that type, a typed reader
    # takes the local_corpora in either order and gives back every label (before: BP4D's AU lists dropped, or a cast error).
    assert pa.array(docs).type == sample_arrow_type() and not any(pa.types.is_null(t) for t in _leaves(pa.array(docs).type))
    for order in (by["rafdb"] + by["bp4d"] + by["folder"], by["folder"] + by["bp4d"] + by["rafdb"]):
        assert pa.array(order, type=sample_arrow_type()).to_pylist() == order
    for c, d in local_corpora.items():
        doc = json.loads((d / "dataset.json").read_text())
        assert doc["schema_version"] == 2 and doc["format_version"] == 2, c


def _leaves(t: pa.DataType) -> list[pa.DataType]:
    if pa.types.is_struct(t):
        return [x for i in range(t.num_fields) for x in _leaves(t.field(i).type)]
    if pa.types.is_list(t):
        return _leaves(t.value_type)
    return [t]


def test_tar_offset_seeks_to_the_samples_first_member_and_position_counts_samples(local_corpora):
    for corpus in ("bp4d", "folder"):
        d = local_corpora[corpus]
        idx = pq.read_table(d / "index.parquet").to_pylist()
        assert "offset" not in idx[0]
        by_shard: dict[str, list[dict]] = {}
        for row in idx:
            by_shard.setdefault(row["shard"], []).append(row)
        for name, rows in by_shard.items():
            data = (d / name).read_bytes()
            with tarfile.open(d / name) as t:
                keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m in t.getmembers()))
            assert [r["position"] for r in rows] == list(range(len(rows)))
            for r in rows:
                assert keys[r["position"]] == r["key"]  # the sample's position in its shard
                header = tarfile.TarInfo.frombuf(data[r["tar_offset"]:r["tar_offset"] + 512], "utf-8", "strict")
                assert header.name == f"{r['key']}.jpg"  # the first member: flow.npy < jpg < json
                with tarfile.open(fileobj=io.BytesIO(data[r["tar_offset"]:r["tar_offset"] + r["tar_size"]])) as t:
                    names = t.getnames()
                    meta = json.loads(t.extractfile(f"{r['key']}.json").read())
                assert names == [f"{r['key']}.jpg", f"{r['key']}.json"] and meta["key"] == r["key"]
            spans = [(r["tar_offset"], r["tar_offset"] + r["tar_size"]) for r in rows]
            assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # back to back


def test_source_is_relative_to_the_images_root_in_dataset_json(local_corpora):
    for corpus, d in local_corpora.items():
        root = Path(json.loads((d / "dataset.json").read_text())["images_root"])
        assert root.is_absolute() and root.is_dir(), corpus
        index = {r["key"]: r["source"] for r in pq.read_table(d / "index.parquet").to_pylist()}
        for s in wds.WebDataset(tars(d), shardshuffle=False).decode():
            src = s["json"]["source"]
            assert not Path(src).is_absolute() and "\\" not in src and index[s["__key__"]] == src
            assert (root / src).read_bytes() == s["jpg"]  # passed-through JPEGs: the very file
    sources = {r["key"]: r["source"] for r in pq.read_table(local_corpora["folder"] / "index.parquet").to_pylist()}
    assert sources["p0-face-0"] == "p0/face 0.jpg"
    assert sorted(r["source"] for r in pq.read_table(local_corpora["csv"] / "index.parquet").to_pylist()) == ["e0.jpg",
                                                                                                       "e1.jpg"]


def test_relative_source_of_video_frames_and_paths_through_links(tmp_path):
    assert relative_source("/data/v/LeftVideoSN001_comp.avi#12", "/data/v") == "LeftVideoSN001_comp.avi#12"
    assert relative_source("/data/v/a/../b/x.jpg", "/data/v") == "b/x.jpg"
    (tmp_path / "root" / "sub").mkdir(parents=True)
    (tmp_path / "root" / "sub" / "x.jpg").write_bytes(b"x")
    (tmp_path / "elsewhere").symlink_to(tmp_path / "root" / "sub")  # a manifest's absolute path through a link
    assert relative_source(str(tmp_path / "elsewhere" / "x.jpg"), str(tmp_path / "root")) == "sub/x.jpg"


# ---------------------------------------------------------------------------------------------------- version 1
def _v1_and_v2() -> list[tuple[dict, dict]]:
    """Hand-made samples as ssau wrote them before issue 13 (version 1) and the same samples in version 2."""
    common = {"corpus": "bp4d", "key": "k", "subject": "F001", "sequence": "T1", "frame": 7, "split": "", "fold": 1,
              "expression": -1, "width": 40, "height": 40}
    bp4d_v1 = common | {"source": "/abs/F001/T1/0007.jpg", "aus": [1, 2, 4], "occurrence": [1, 0, 0],
                        "mask": [1, 1, 0], "intensity": None, "expression_name": None, "aligned": "none"}
    bp4d_v2 = common | {"schema_version": 2, "source": "F001/T1/0007.jpg", "aus": [1, 2, 4],
                        "au_names": ["AU01", "AU02", "AU04"], "occurrence": [1, 0, -1], "mask": [1, 1, 0],
                        "intensity": [-1.0] * 3, "expression_name": "", "aligned": "none", "align_margin": -1.0,
                        "landmarks": [], "bbox": [], "flow_partner": ""}
    raf = {"corpus": "rafdb", "key": "k", "subject": "", "sequence": "", "frame": -1, "split": "train", "fold": 0,
           "expression": 3, "expression_name": "happiness", "width": 40, "height": 40}
    raf_v1 = raf | {"source": "/abs/train_00001_aligned.jpg", "aligned": "none"}
    raf_v2 = raf | {"schema_version": 2, "source": "train_00001_aligned.jpg", "aus": [], "au_names": [],
                    "occurrence": [], "mask": [], "intensity": [], "aligned": "none", "align_margin": -1.0,
                    "landmarks": [], "bbox": [], "flow_partner": ""}
    aligned_v1 = bp4d_v1 | {"aligned": "detector", "align_margin": 0.2}
    aligned_v2 = bp4d_v2 | {"aligned": "detector", "align_margin": 0.2}
    return [(bp4d_v1, bp4d_v2), (raf_v1, raf_v2), (aligned_v1, aligned_v2)]


def _sample(meta: dict, key: str = "k") -> dict:
    rgb = np.random.default_rng(3).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
    return {"__key__": key, "jpg": buf.getvalue(), "json": json.dumps(meta).encode()}


def test_version_1_samples_decode_like_version_2():
    aus = (1, 2, 4, 6)
    for old, new in _v1_and_v2():
        a, b = _sample(old), _sample(new)
        ia, ma = decode_eval(a, 32)
        ib, mb = decode_eval(b, 32)
        assert torch.equal(ia, ib) and au_targets(ma, aus) == au_targets(mb, aus)
        assert au_targets(ma, aus, [True, False, False, False]) == au_targets(mb, aus, [True, False, False, False])
        ta, tb = decode_sample(a, 32, random.Random(5)), decode_sample(b, 32, random.Random(5))
        assert torch.equal(ta.image, tb.image) and ta.landmarks_valid == tb.landmarks_valid is False
        assert np.array_equal(ta.landmarks, tb.landmarks) and ta.meta["expression"] == tb.meta["expression"]
    assert au_targets(_v1_and_v2()[0][1], aus) == ([1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0])


def test_evaluation_scores_version_1_and_version_2_shards_alike(tmp_path):
    aus = (1, 2, 4)
    got = []
    for version in (0, 1):
        d = tmp_path / f"v{version + 1}"
        d.mkdir()
        pairs = [(old | {"key": f"s{i}"}, new | {"key": f"s{i}"}) for i, (old, new) in enumerate(_v1_and_v2())]
        write_tar(d / "x-000000.tar", [(f"s{i}", _sample(p[version])["jpg"], p[version]) for i, p in enumerate(pairs)])
        (d / "dataset.json").write_text(json.dumps({"aus": ["AU01", "AU02", "AU04"], "shards": [
            {"name": "x-000000.tar", "fold": 1, "samples": len(pairs)}]}))
        loader = eval_loader((str(d),), None, aus, batch_size=4, image_size=32, workers=0)
        batches = list(loader)
        assert loader.problems == [] and sum(int(b.valid.sum()) for b in batches) == len(pairs)
        got.append([(b.keys, b.targets, b.mask, b.images) for b in batches])
    for (ka, ta, ma, ia), (kb, tb, mb, ib) in zip(*got):
        assert ka == kb and torch.equal(ta, tb) and torch.equal(ma, mb) and torch.equal(ia, ib)


def test_an_index_part_written_with_offset_is_read_as_position(tmp_path, local_corpora):
    d = local_corpora["bp4d"]
    new = pq.read_table(d / ".ssau" / f"{tars(d)[0].rsplit('/', 1)[1]}.parquet")
    old = new.drop(["tar_offset", "tar_size"])
    old = old.rename_columns(["offset" if c == "position" else c for c in old.column_names])
    pq.write_table(old, tmp_path / "old.parquet")
    back = _part(tmp_path / "old.parquet", new.schema)
    assert back.column("position").to_pylist() == new.column("position").to_pylist()
    assert back.column("tar_offset").null_count == len(back)  # unknown for a part written before it existed


@pytest.mark.parametrize("first", ["bp4d", "rafdb"])
def test_hugging_face_datasets_loads_bp4d_rafdb_and_unlabelled_tars_in_one_call(local_corpora, tmp_path, monkeypatch, first):
    # The reader: one load_dataset("webdataset") call over mixed tars failed with a cast error in one order
    # and dropped every BP4D sample's AU labels in the other. datasets infers types from the first 5 samples, where
    # empty landmark and box lists read as null: handed ssau's features, every order loads every label.
    # Offline: the builder ships with the package.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from datasets import load_dataset

    order = [first, "folder", "rafdb" if first == "bp4d" else "bp4d"]
    urls = [u for c in order for u in tars(local_corpora[c])]
    ds = load_dataset("webdataset", data_files={"train": urls}, split="train", cache_dir=str(tmp_path / "hf"),
                      features=hf_features())
    docs = ds["json"]
    expected = {c: sum(s["samples"] for s in json.loads((local_corpora[c] / "dataset.json").read_text())["shards"])
                for c in order}
    assert {c: sum(d["corpus"] == c for d in docs) for c in order} == expected
    direct = {(d["corpus"], d["key"]): d for u in urls for d in
              (s["json"] for s in wds.WebDataset([u], shardshuffle=False).decode())}
    for d in docs:  # every sample's labels exactly as plain webdataset reads them
        assert d == direct[(d["corpus"], d["key"])]
    assert all(len(d["aus"]) == 12 and len(d["occurrence"]) == 12 for d in docs if d["corpus"] == "bp4d")
    assert ds[0]["jpg"].size == (docs[0]["width"], docs[0]["height"])  # the image decodes too
