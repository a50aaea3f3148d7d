"""Training and evaluation streams: composition, label drop, disjoint shards per rank, exact-once evaluation."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from corpora import jpeg_bytes, write_bp4d, write_tar
from ranks import run_ranks

from ssau.aus import STANDARD_AUS
from ssau.cli import main
from ssau.data.eval_stream import eval_batches_per_rank, eval_loader
from ssau.data.sources import SourceConfig, StreamConfig, is_hidden
from ssau.data.stream import TrainStream
from ssau.data.trainset import label_drop_report

AUS = STANDARD_AUS["bp4d"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("streams")
    write_bp4d(tmp / "BP4D", frames=6)
    faces = tmp / "faces"
    faces.mkdir()
    for i in range(24):
        (faces / f"u{i:03d}.jpg").write_bytes(jpeg_bytes(1000 + i, size=40))
    out = {"bp4d": tmp / "bp4d", "unl": tmp / "unl", "raf": tmp / "raf", "bad": tmp / "bad"}
    assert main(["shard", "bp4d", "--images", str(tmp / "BP4D"), "--labels", str(tmp / "BP4D"), "--out",
                 str(out["bp4d"]), "--folds", "bp4d", "--shard-size", "3", "--quiet"]) == 0
    assert main(["shard", "folder", "--images", str(faces), "--out", str(out["unl"]), "--shard-size", "4",
                 "--quiet"]) == 0
    raf = tmp / "raf_src"
    raf.mkdir()
    lines = []
    for i in range(12):
        (raf / f"train_{i:05d}_aligned.jpg").write_bytes(jpeg_bytes(2000 + i))
        lines.append(f"train_{i:05d}.jpg {i % 7 + 1}")
    (tmp / "raf.txt").write_text("\n".join(lines) + "\n")
    assert main(["shard", "rafdb", "--images", str(raf), "--labels", str(tmp / "raf.txt"), "--out",
                 str(out["raf"]), "--shard-size", "2", "--quiet"]) == 0
    # A hand-made shard directory with one corrupt and one label-less sample among good ones.
    out["bad"].mkdir()
    meta = {"aus": list(AUS), "occurrence": [1] * 12, "mask": [1] * 12}
    good = [(f"g{i}", jpeg_bytes(3000 + i), meta) for i in range(5)]
    write_tar(out["bad"] / "bad-000000.tar", good[:2] + [("broken", b"\xff\xd8garbage", meta)] + good[2:])
    (out["bad"] / "dataset.json").write_text(json.dumps({"aus": [f"AU{a:02d}" for a in AUS], "shards": [
        {"name": "bad-000000.tar", "fold": 0, "samples": 6}]}))
    return out


def index(d: Path) -> dict[str, dict]:
    return {r["key"]: r for r in pq.read_table(d / "index.parquet").to_pylist()}


def test_batches_have_fixed_composition_and_masked_targets(dirs):
    cfg = StreamConfig(labelled=SourceConfig((str(dirs["bp4d"]),), folds=(1, 2)),
                       unlabelled=SourceConfig((str(dirs["unl"]),)), expression=SourceConfig((str(dirs["raf"]),)),
                       m1=5, m2=3, m_expr=2, image_size=32, workers=2)
    idx = index(dirs["bp4d"])
    raf = index(dirs["raf"])
    for b in itertools.islice(TrainStream(cfg), 6):
        assert b.images.shape == (5, 3, 32, 32) and b.images.dtype == torch.uint8
        assert b.unlabelled.shape == (3, 3, 32, 32) and b.expr_images.shape == (2, 3, 32, 32)
        assert b.targets.shape == b.mask.shape == (5, 12)
        for k, t, m in zip(b.keys, b.targets, b.mask):
            row = idx[k]
            assert row["fold"] in (1, 2)
            for j, au in enumerate(AUS):
                v = row[f"AU{au:02d}"]
                assert m[j] == (v != -1) and t[j] == (v == 1)
        assert all(k.startswith("u") for k in b.unlabelled_keys)
        assert len(b.expr_keys) == 2
        assert b.expr_labels.tolist() == [raf[k]["expression"] for k in b.expr_keys]


def test_label_drop_hides_the_same_images_on_every_rank_and_epoch(dirs):
    cfg = StreamConfig(labelled=SourceConfig((str(dirs["bp4d"]),), folds=(1, 2, 3)), m1=4, m2=4, image_size=32,
                       label_drop=0.5, seed=7, split_seed=3, workers=1)  # hiding follows split_seed, not seed
    keys = list(index(dirs["bp4d"]))
    hidden = {k for k in keys if is_hidden(k, 0.5, 3)}
    rep = label_drop_report(cfg)
    assert rep["images"] == len(keys) and rep["hidden_images"] == len(hidden)
    assert rep["fraction"] == pytest.approx(len(hidden) / len(keys)) and 0.3 < rep["fraction"] < 0.7
    seen_lab, seen_unl = set(), set()
    for rank, epoch in ((0, 0), (1, 0), (0, 1)):
        ts = TrainStream(cfg, rank=rank, world=2)
        ts.set_epoch(epoch)
        for b in itertools.islice(ts, 8):
            seen_lab.update(b.keys)
            seen_unl.update(b.unlabelled_keys)
    assert seen_lab and not (seen_lab & hidden)  # hidden labels never reach the supervised loss
    assert seen_unl and seen_unl <= hidden  # ... and those images stream as unlabelled (T2)


def test_label_drop_au_mode_hides_single_labels(dirs):
    cfg = StreamConfig(labelled=SourceConfig((str(dirs["bp4d"]),)), m1=6, m2=0, image_size=32, label_drop=0.3,
                       label_drop_mode="au", split_seed=1, workers=1)
    idx = index(dirs["bp4d"])
    rep = label_drop_report(cfg)
    assert rep["hidden_images"] == 0 and 0.15 < rep["fraction"] < 0.45
    known = sum(1 for r in idx.values() for a in AUS if r[f"AU{a:02d}"] != -1)
    assert rep["labels"] == known
    masked_known = 0
    for b in itertools.islice(TrainStream(cfg), 5):
        assert b.unlabelled is None
        for k, m in zip(b.keys, b.mask):
            masked_known += sum(1 for j, a in enumerate(AUS) if idx[k][f"AU{a:02d}"] != -1 and m[j] == 0)
    assert masked_known > 0


def test_ranks_read_disjoint_shards_and_seeds_reproduce(dirs):
    cfg = StreamConfig(labelled=SourceConfig((str(dirs["bp4d"]),), folds=(1, 2)), m1=4, m2=0, image_size=32,
                       seed=7, workers=2)
    idx = index(dirs["bp4d"])
    shards = []
    for rank in (0, 1):
        seen = set()
        for b in itertools.islice(TrainStream(cfg, rank=rank, world=2), 10):
            seen.update(idx[k]["shard"] for k in b.keys)
        shards.append(seen)
    assert shards[0] and shards[1] and not (shards[0] & shards[1])
    first = [next(iter(TrainStream(cfg, rank=0, world=2))).keys for _ in range(2)]
    assert first[0] == first[1]  # same (seed, epoch, rank): same stream
    other = TrainStream(cfg, rank=0, world=2)
    other.set_epoch(1)
    assert next(iter(other)).keys != first[0]


def test_corrupt_samples_are_skipped_and_counted(dirs):
    cfg = StreamConfig(labelled=SourceConfig((str(dirs["bad"]),)), m1=2, m2=0, image_size=32, workers=1)
    batches = list(itertools.islice(TrainStream(cfg), 6))
    assert sum(b.skipped for b in batches) > 0
    assert all("broken" not in b.keys for b in batches)


def _eval_on_rank(rank: int, world: int, dirs: tuple[str, ...], folds, batch: int, workers: int):
    import torch.distributed as dist

    n, keys = 0, []
    for b in eval_loader(dirs, folds, AUS, batch_size=batch, image_size=32, rank=rank, world=world, workers=workers):
        n += 1
        assert b.images.shape[1:] == (3, 32, 32)
        keys += [k for k, v in zip(b.keys, b.valid.tolist()) if v]
        dist.all_reduce(torch.ones(1))  # a collective per batch, as evaluation does: hangs if counts differ
    return dist.get_world_size(), n, keys


@pytest.mark.parametrize("folds,batch,workers", [((1,), 4, 2), ((2, 3), 5, 1), (None, 64, 2)])
def test_evaluation_reads_every_sample_once_over_two_ranks(dirs, folds, batch, workers):
    ds = (str(dirs["bp4d"]),)
    results = run_ranks(_eval_on_rank, 2, ds, folds, batch, workers)
    assert [r[0] for r in results] == [2, 2]
    assert results[0][1] == results[1][1] == eval_batches_per_rank(ds, folds, batch, 2, workers)
    got = results[0][2] + results[1][2]
    want = [k for k, r in index(dirs["bp4d"]).items() if folds is None or r["fold"] in folds]
    assert len(got) == len(set(got)) and sorted(got) == sorted(want)
    assert results[0][2] and results[1][2]


def test_evaluation_with_fewer_shards_than_ranks_and_a_corrupt_sample(dirs):
    results = run_ranks(_eval_on_rank, 2, (str(dirs["bad"]),), None, 4, 1)
    assert results[0][1] == results[1][1]
    got = results[0][2] + results[1][2]
    assert sorted(got) == [f"g{i}" for i in range(5)]  # the corrupt one skipped, the rest once each
