"""The label-scarce regime (``data.labelled_subjects``): which subjects keep their labels, and that no label of the
others is ever read (a poisoned copy of their labels changes nothing)."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import tiny_train

from ssau.cli import main
from ssau.data.sources import stream_config
from ssau.data.stream import TrainStream
from ssau.data.trainset import TrainingSet
from ssau.errors import ConfigError
from ssau.train.setup import load_run_config

AUS = (1, 2, 4, 6)


@pytest.fixture(scope="module")
def shards(corpora) -> Path:
    return corpora.bp4d(frames=6, shard_size=4)


def _cfg(shards: Path, *extra: str):
    cfg = load_run_config(None, [f"data.labelled=[{shards}]", "data.fold=1", "data.m1=4", "data.m2=4",
                                 "data.workers=0", "data.image_size=32", "data.aus=[1,2,4,6]", *extra])
    return stream_config(cfg, AUS)


def _subjects(shards: Path) -> dict[str, tuple[str, int]]:
    t = pq.read_table(shards / "index.parquet", columns=["key", "subject", "fold"]).to_pydict()
    return {k: (s, f) for k, s, f in zip(t["key"], t["subject"], t["fold"])}


def test_k_subjects_per_the_split_seed_balanced_over_folds(shards):
    subjects = _subjects(shards)
    ts = TrainingSet.read(_cfg(shards, "data.labelled_subjects=2"))
    chosen = [s for _, s in ts.labelled_subjects]
    folds = {subjects[k][1] for k in ts.keys if subjects[k][0] in chosen}
    assert len(chosen) == 2 and folds == {2, 3}  # one subject from each training fold
    assert ts.unlabelled_subjects == 2 and ts.drop_report()["labelled_subjects"] == 2
    # Every image of the other two subjects is hidden, and only those (no label drop asked for).
    others = {k for k in ts.keys if subjects[k][0] not in chosen}
    assert ts.hidden_images == others and len(others) == 2 * 2 * 6
    assert ts.visible[[ts.keys.index(k) for k in others]].sum() == 0
    # Deterministic, a function of split_seed (train.seed plays no part), and a fraction works like a count.
    again = TrainingSet.read(_cfg(shards, "data.labelled_subjects=0.5", "train.seed=7"))
    assert again.labelled_subjects == ts.labelled_subjects and torch.equal(again.visible, ts.visible)
    picks = {TrainingSet.read(_cfg(shards, "data.labelled_subjects=2", f"data.split_seed={s}")).labelled_subjects
             for s in range(8)}
    assert len(picks) > 1
    one = TrainingSet.read(_cfg(shards, "data.labelled_subjects=1"))
    assert len(one.labelled_subjects) == 1 and one.labelled_subjects[0] in ts.labelled_subjects  # nested in K=2


def test_labelled_subjects_settings_are_checked(shards):
    for bad in ("2.5", "-1"):
        with pytest.raises(ConfigError, match="data.labelled_subjects"):
            _cfg(shards, f"data.labelled_subjects={bad}")
    with pytest.raises(ConfigError, match="only 4 subjects"):
        TrainingSet.read(_cfg(shards, "data.labelled_subjects=5"))


def _poison(src: Path, dst: Path, victims: set[str]) -> None:
    """A copy of ``src`` whose ``victims`` carry labels nothing may read: 7 in the index, strings in the samples."""
    import shutil

    shutil.copytree(src, dst)
    table = pq.read_table(dst / "index.parquet")
    hit = [s in victims for s in table.column("subject").to_pylist()]
    for name in [n for n in table.column_names if n.startswith("AU")]:
        col = table.column(name)
        values = [7 if h else v for h, v in zip(hit, col.to_pylist())]
        table = table.set_column(table.column_names.index(name), name, pa.array(values, type=col.type))
    pq.write_table(table, dst / "index.parquet")
    for tar in dst.glob("*.tar"):
        with tarfile.open(tar) as t:
            files = [(m, t.extractfile(m).read()) for m in t.getmembers()]
        with tarfile.open(tar, "w") as t:
            for m, data in files:
                if m.name.endswith(".json"):
                    meta = json.loads(data)
                    if meta.get("subject") in victims:
                        meta["occurrence"] = ["poison"] * len(meta["occurrence"])
                        data = json.dumps(meta).encode()
                m.size = len(data)
                t.addfile(m, io.BytesIO(data))


def _batches(cfg, n: int) -> list:
    return list(itertools.islice(iter(TrainStream(cfg)), n))


def test_no_label_of_a_subject_without_labels_is_read(shards, tmp_path):
    subjects = _subjects(shards)
    clean = TrainingSet.read(_cfg(shards, "data.labelled_subjects=2"))
    kept = {s for _, s in clean.labelled_subjects}
    victims = {s for s, f in subjects.values() if f != 1} - kept
    poisoned = tmp_path / "poisoned"
    _poison(shards, poisoned, victims)
    assert any(json.loads(m)["occurrence"][0] == "poison" for tar in poisoned.glob("*.tar")
               for m in _json_members(tar))
    bad = TrainingSet.read(_cfg(poisoned, "data.labelled_subjects=2"))
    for field in ("targets", "known", "visible"):  # the poison (7 in the index) reached no tensor
        assert torch.equal(getattr(bad, field), getattr(clean, field)), field
    assert bad.hidden_images == clean.hidden_images and bad.label_bank()[0].max() <= 1
    # The stream: labelled batches from the kept subjects only, their targets as the clean copy's; the victims'
    # frames arrive as unlabelled images; no sample was skipped (a poisoned label read would fail to decode).
    got = _batches(_cfg(poisoned, "data.labelled_subjects=2"), 6)
    want = _batches(_cfg(shards, "data.labelled_subjects=2"), 6)
    assert sum(b.skipped for b in got) == 0
    for g, w in zip(got, want):
        assert g.keys == w.keys and torch.equal(g.targets, w.targets) and torch.equal(g.mask, w.mask)
        assert {subjects[k][0] for k in g.keys} <= kept
    assert {subjects[k][0] for b in got for k in b.unlabelled_keys} & victims
    # Without the split, the same poisoned copy is read: the poison is real (7 reaches the targets).
    assert TrainingSet.read(_cfg(poisoned)).targets.max() == 7
    # A whole run trains on the poisoned copy and logs how many subjects kept their labels.
    assert main(tiny_train(poisoned, tmp_path, "data.fold=1", "data.labelled_subjects=2", "data.m2=4",
                           "data.aus=[1,2,4,6]", "train.name=scarce")) == 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("ssau").experiment_id])
    assert run.data.metrics["data/labelled_subjects"] == 2 and run.data.metrics["data/hidden_images"] == 24
    assert run.data.params["data.labelled_subjects"] == "2.0"  # a param to compare runs by (data.labelled is not)
    assert "data.labelled" not in run.data.params and "train.collapse_window" not in run.data.params


def _json_members(tar: Path):
    with tarfile.open(tar) as t:
        return [t.extractfile(m).read() for m in t.getmembers() if m.name.endswith(".json")]


def test_the_labelled_stream_refuses_an_image_of_a_subject_without_labels(shards):
    from ssau.errors import SourceError

    cfg = _cfg(shards, "data.labelled_subjects=2")
    stream = TrainStream(cfg)
    src = stream.sources["labelled"]
    src.keep = None  # the filter broken: the guard behind it stops the stream
    with pytest.raises(SourceError, match="subject without labels"):
        for _ in itertools.islice(iter(src), 12):
            pass
