"""Hyper-parameters chosen before the test fold is seen (issue 22): evaluation on the AU validation split
(``train.evaluate_on=val``) reads every validation image once over all ranks and never opens the held-out fold;
``ssau compare --select-on val`` picks the better variant and hands it to the final grid (``--settings-from``);
per-AU thresholds chosen on the validation split against a hand-worked example, the 0.5 metrics left unchanged."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import error_line, one_error_line, tiny_train

from ssau.cli import main
from ssau.data.eval_stream import eval_batches_per_rank, eval_loader
from ssau.data.sources import read_dataset, stream_config
from ssau.data.trainset import TrainingSet
from ssau.metrics import au_metrics, f1_thresholds
from ssau.train.setup import load_run_config

OPENED: list[str] = []  # every file path opened while RECORD[0] is True (an audit hook cannot be removed)
RECORD = [False]


def _audit(event: str, args: tuple) -> None:
    if RECORD[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        OPENED.append(os.fsdecode(args[0]))


def recording():
    """Start recording opened paths (the hook is installed once per process)."""
    if not getattr(sys, "_ssau_test_audit", False):
        sys.addaudithook(_audit)
        sys._ssau_test_audit = True
    OPENED.clear()
    RECORD[0] = True


def shard_names(shards: Path, fold: int, held_out: bool) -> set[str]:
    return {s["name"] for s in read_dataset(shards)["shards"] if (s["fold"] == fold) == held_out}


def validation_keys(shards: Path, *extra: str) -> list[str]:
    cfg = load_run_config(None, [f"data.labelled=[{shards}]", "data.validation=0.25", "data.fold=1", *extra])
    aus = tuple(int(a[2:]) for a in read_dataset(shards)["aus"])
    return TrainingSet.read(stream_config(cfg, aus)).validation.keys


def same(a: dict, b: dict) -> bool:
    """Equal to the last bit, NaN (an AU's undefined AUC) equal to NaN."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


# ---------------------------------------------------------------------------------------------------- thresholds
def test_f1_thresholds_by_hand_and_the_05_metrics_unchanged():
    # columns: A best at >= 0.3 (F1 0.8), B at >= 0.8 (F1 1), C without a positive, D with an unknown label at 0.38
    # that must not count, E a tie (F1 2/3 at >= 0.9 and at >= 0.1) settled towards 0.5
    probs = np.array([[0.1, 0.9, 0.7, 0.38, 0.9],
                      [0.3, 0.8, 0.6, 0.40, 0.7],
                      [0.6, 0.7, 0.2, 0.35, 0.3],
                      [0.8, 0.2, 0.1, 0.10, 0.1]])
    targets = np.array([[0, 1, 0, 0, 1],
                        [1, 1, 0, 1, 0],
                        [1, 0, 0, 0, 0],
                        [0, 0, 0, 0, 1]])
    mask = np.ones_like(probs)
    mask[0, 3] = 0
    # cuts are midpoints to the next lower score: A (0.3 + 0.1) / 2, B (0.8 + 0.7) / 2, D (0.40 + 0.35) / 2 (with the
    # unknown 0.38 counted it would be 0.39), E: (0.9 + 0.7) / 2 = 0.8 is nearer 0.5 than 0.1 / 2
    assert f1_thresholds(probs, targets, mask) == pytest.approx([0.2, 0.75, 0.5, 0.375, 0.8])

    # the fold scored at those thresholds, beside 0.5: A's 0.25 is positive at 0.2, not at 0.5
    aus = (1, 2, 4, 6, 7)
    test = np.array([[0.25, 0.76, 0.9, 0.37, 0.85], [0.15, 0.74, 0.1, 0.38, 0.6]])
    truth = np.array([[1, 1, 0, 0, 1], [0, 0, 0, 1, 0]])
    at05 = au_metrics(test, truth, np.ones_like(test), aus)
    chosen = au_metrics(test, truth, np.ones_like(test), aus, f1_thresholds(probs, targets, mask))
    # by hand at 0.5: A 0 (0.25 missed), B 2/3 (both predicted), C 0, D 0, E 2/3; at the cuts: A 1, B 1, C 0,
    # D 1 (0.38 >= 0.375 > 0.37), E 1 (0.85 >= 0.8 > 0.6)
    assert [at05["per_au"][a]["f1"] for a in at05["per_au"]] == pytest.approx([0, 2 / 3, 0, 0, 2 / 3])
    assert [chosen["per_au"][a]["f1"] for a in chosen["per_au"]] == pytest.approx([1, 1, 0, 1, 1])
    assert same(au_metrics(test, truth, np.ones_like(test), aus, np.full(5, 0.5))["per_au"], at05["per_au"])


def test_validation_thresholds_are_chosen_on_the_validation_split_and_leave_05_alone(corpora, tmp_path, monkeypatch):
    import ssau.train.evaluate as ev
    from ssau.train.trainer import Trainer

    shards = corpora.bp4d(shard_size=4)
    # label drop hides single AU labels: the validation split's hidden ones must not count in its F1
    args = tiny_train(shards, tmp_path, "data.validation=0.25", "data.label_drop=0.3", "data.label_drop_mode=au",
                      "tracking.enabled=false")[1:]
    trainer = Trainer(load_run_config(None, args))
    seen, real = [], ev.f1_thresholds
    monkeypatch.setattr(ev, "f1_thresholds", lambda p, t, m: seen.append((p, t, m)) or real(p, t, m))

    def score(**train):
        return ev.evaluate_tasks(trainer.method, trainer.cfg.data, trainer.aus, trainer.rt,
                                 dataclasses.replace(trainer.cfg.train, **train), trainer.validation,
                                 trainer.stream_cfg.labelled.folds)

    fixed, chosen = score(), score(thresholds="val")
    # the 0.5 metrics are those of the run without the option, to the last bit
    assert {k: v for k, v in chosen.items() if k != "valthr"}.keys() == fixed.keys()
    assert same(chosen["per_au"], fixed["per_au"]) and chosen["f1_mean"] == fixed["f1_mean"]
    assert "valthr" not in fixed and chosen["eval_expected"] == 24  # fold 1: two subjects x 2 tasks x 6 frames
    # chosen on the validation split: its images, its visible labels (in some order), not the hidden ones
    (p, t, m), = seen
    val = trainer.validation
    assert len(p) == len(val.keys) == chosen["valthr"]["scored"] > 0
    assert sorted(map(tuple, m)) == sorted(map(tuple, val.mask.numpy())) and 0 < val.mask.mean() < 0.9
    assert sorted(map(tuple, t * m)) == sorted(map(tuple, (val.targets * val.mask).numpy()))
    assert chosen["valthr"]["thresholds"] == dict(zip(chosen["per_au"], real(p, t, m).tolist()))
    # and applied per AU to the fold: at threshold 0 every image is positive, F1 = 2 pos / (n + pos)
    monkeypatch.setattr(ev, "f1_thresholds", lambda p, t, m: np.zeros(t.shape[1]))
    zero = score(thresholds="val")["valthr"]["per_au"]
    for au, v in fixed["per_au"].items():
        assert zero[au]["f1"] == pytest.approx(2 * v["positives"] / (v["n"] + v["positives"]) if v["n"] else 0.0)

    # a run with the option logs both, apart, with the thresholds
    assert main(tiny_train(shards, tmp_path, "data.validation=0.25", "train.thresholds=val")) == 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("ssau").experiment_id])
    metrics = run.data.metrics
    assert {"val/f1_mean", "val/f1_valthr_mean", "val/f1_valthr/AU01", "val/threshold/AU01",
            "val/threshold_samples"} <= set(metrics)
    assert run.data.params["train.thresholds"] == "val" and run.data.params["data.validation"] == "0.25"
    assert run.data.tags["evaluated_on"] == "fold"


# ---------------------------------------------------------------------------------------------------- exactly once
@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (3, 0), (2, 2)])
def test_the_validation_split_is_scored_once_over_all_ranks_from_training_shards_only(corpora, world, workers):
    shards = corpora.bp4d(shard_size=4)
    keys = frozenset(validation_keys(shards, "data.label_drop=0.5"))
    folds = (2, 3)
    got, counts, urls = [], [], set()
    for rank in range(world):
        loader = eval_loader((str(shards),), folds, (1, 2, 4), batch_size=3, image_size=32, rank=rank, world=world,
                             workers=workers, keys=keys)
        assert loader.expected == len(keys)
        urls |= {Path(u).name for piece in loader.pieces for u, *_ in piece}
        n = 0
        for b in loader:
            n += 1
            got += [k for k, v in zip(b.keys, b.valid.tolist()) if v]
        counts.append(n)
    assert len(got) == len(set(got)) and set(got) == keys and len(keys) >= 4
    assert counts == [eval_batches_per_rank((str(shards),), folds, 3, world, workers, keys=keys)] * world
    assert urls and urls <= shard_names(shards, 1, held_out=False)  # only the shards that hold validation images


# ---------------------------------------------------------------------------------------------------- compare
def test_select_on_val_never_reads_the_test_fold_and_picks_the_better_variant(corpora, tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    from ssau.methods.supervised import Supervised

    clean = corpora.bp4d(shard_size=4)
    poisoned = corpora.copy(clean, tmp_path / "poisoned")
    held_out = shard_names(poisoned, 1, held_out=True)
    for name in held_out:  # the test fold: garbage that no reader could score
        (poisoned / name).write_bytes(b"poison" * 1000)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tmp_path / "tiny.yaml"
    config.write_text(f"data: {{labelled: [{poisoned}], image_size: 32, m1: 4, m2: 4, workers: 0, eval_batch: 8, "
                      f"validation: 0.25}}\nmodel: {{backbone: tiny}}\ntrain: {{steps: 2, log_every: 1, "
                      f"checkpoint_every: 0, progress: false, out: {tmp_path / 'runs'}}}\n"
                      f"tracking: {{uri: '{uri}'}}\n")
    # a clearly worse variant: the one with a_c_default 0.01 (unread by plain BCE) predicts no AU, so its F1 is 0
    predict = Supervised.predict
    monkeypatch.setattr(Supervised, "predict",
                        lambda self, x: predict(self, x) * (0.0 if self.params.a_c_default < 0.05 else 1.0))
    search = ["compare", "--config", str(config), "--methods", "supervised-zero,supervised-keep", "--seeds", "0-1",
              "--label-drop", "0.5", "--folds", "1", "--select-on", "val", "--name", "search",
              "supervised-zero.a_c_default=0.01", "supervised-keep.a_c_default=0.4"]
    recording()
    try:
        assert main(search + ["--selection", str(tmp_path / "sel.json")]) == 0
    finally:
        RECORD[0] = False
    out, err = capsys.readouterr()
    assert not [p for p in OPENED if Path(p).name in held_out]  # not one open of a test-fold shard
    assert any(Path(p).name in shard_names(poisoned, 1, held_out=False) for p in OPENED)  # the hook does see shards
    assert "selection on the AU validation split" in out and "--settings-from" in out

    client = MlflowClient(uri)
    (parent,) = client.search_runs([client.get_experiment_by_name("ssau").experiment_id],
                                   "tags.compare_parent = 'search'")
    assert parent.data.tags["compare_evaluated_on"] == "val"
    kids = {r.info.run_name: r for r in client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    assert len(kids) == 4
    n_val = len(validation_keys(poisoned, "data.label_drop=0.5"))
    for r in kids.values():  # scored on the validation split, under the names compare reads back, and tagged so
        assert r.data.tags["evaluated_on"] == "val" and r.data.params["train.evaluate_on"] == "val"
        assert r.data.metrics["val/samples_scored"] == r.data.metrics["val/samples_expected"] == n_val
    score = {v: statistics.fmean(kids[f"supervised-{v}-s{s}-d0.5-f1"].data.metrics["val/f1_mean"] for s in (0, 1))
             for v in ("zero", "keep")}
    assert score["zero"] == 0.0 and score["keep"] > 0.0
    doc = json.loads((tmp_path / "sel.json").read_text())
    chosen = doc["methods"]["supervised"]
    assert chosen["label"] == "supervised-keep" and chosen["settings"] == {"a_c_default": 0.4}
    assert chosen["score"] == pytest.approx(score["keep"], abs=1e-9)
    assert chosen["candidates"] == pytest.approx({"supervised-zero": 0.0, "supervised-keep": score["keep"]})
    assert doc["overrides"] == ["supervised.a_c_default=0.4"] and doc["parent_run_id"] == parent.info.run_id
    assert "selection.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    # by AUC: the finished cells are read back and ranked by their mean AUC (equal: the first listed)
    assert main(search + ["--selection", str(tmp_path / "auc.json"), "--select-metric", "auc"]) == 0
    assert capsys.readouterr().err.count("skipped (finished") == 4
    auc = {v: statistics.fmean(kids[f"supervised-{v}-s{s}-d0.5-f1"].data.metrics["val/auc_mean"] for s in (0, 1))
           for v in ("zero", "keep")}
    doc = json.loads((tmp_path / "auc.json").read_text())
    assert doc["metric"] == "auc" and doc["methods"]["supervised"]["candidates"] == pytest.approx(
        {f"supervised-{v}": auc[v] for v in auc})
    best = "supervised-keep" if auc["keep"] > auc["zero"] else "supervised-zero"  # equal: the first listed
    assert doc["methods"]["supervised"]["label"] == best

    # the same grid scored on the fold, as the final grid is, reads the poisoned test fold and fails
    final = ["compare", "--config", str(config), "--methods", "supervised", "--seeds", "0", "--label-drop", "0.5",
             "--folds", "1", "--settings-from", str(tmp_path / "sel.json")]
    recording()
    try:
        assert main(final + ["--name", "final-poisoned"]) == 2
    finally:
        RECORD[0] = False
    assert "evaluation of fold 1" in error_line(capsys)
    assert [p for p in OPENED if Path(p).name in held_out]
    # on clean shards the final grid runs the chosen settings and scores the fold
    assert main(final + ["--name", "final", f"data.labelled=[{clean}]"]) == 0
    err = capsys.readouterr().err
    assert "--settings-from: supervised takes the settings of supervised-keep (a_c_default=0.4)" in err
    (parent,) = client.search_runs([parent.info.experiment_id], "tags.compare_parent = 'final'")
    (cell,) = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert cell.data.params["method.a_c_default"] == "0.4" and cell.data.tags["evaluated_on"] == "fold"
    assert cell.data.metrics["val/samples_scored"] == 24


@pytest.mark.parametrize("argv,message", [
    (["train", "data.labelled=[nowhere]", "train.evaluate_on=val"], "train.evaluate_on=val needs an AU validation"),
    (["train", "data.labelled=[nowhere]", "data.validation=0.1", "train.evaluate_on=val", "train.thresholds=val"],
     "train.thresholds=val applies thresholds chosen on the AU validation split"),
    (["train", "data.labelled=[nowhere]", "data.validation=0.1", "data.fold=0", "train.thresholds=val"],
     "needs train.evaluate_on=fold and data.fold above 0"),
    (["compare", "--methods", "supervised", "--seeds", "0", "--label-drop", "0", "--select-metric", "auc",
      "data.labelled=[nowhere]"], "--select-metric and --selection go with --select-on val"),
    (["compare", "--methods", "supervised", "--seeds", "0", "--label-drop", "0", "--select-on", "val",
      "data.labelled=[nowhere]", "train.evaluate_on=fold"], "--select-on val sets train.evaluate_on=val"),
])
def test_bad_selection_settings_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert message in line, line


def test_settings_from_refuses_what_is_not_a_selection(tmp_path, capsys):
    argv = ["compare", "--methods", "supervised", "--seeds", "0", "--label-drop", "0", "data.labelled=[nowhere]"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"methods": {}}))
    assert main(argv + ["--settings-from", str(bad)]) == 2
    assert "is not a selection file" in one_error_line(capsys)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "ssau-selection/1", "methods": {"adversarial": {
        "label": "adversarial", "settings": {"alpha": 0.1}}}}))
    assert main(argv + ["--settings-from", str(other)]) == 2
    assert "chose settings for adversarial, none of --methods (supervised)" in one_error_line(capsys)
