"""`ssau compare`: the parent's tables read back from MLflow, finished cells skipped, killed cells resumed, paired
differences against a hand computation from the child runs, warm start, dry run, one-line errors."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

import pytest

from ssau.cli import main


@pytest.fixture(scope="module")
def setup(corpora, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("compare")
    shards = corpora.bp4d(shard_size=4)
    config = tmp / "tiny.yaml"
    config.write_text(f"data: {{labelled: [{shards}], image_size: 32, m1: 4, m2: 4, workers: 0, eval_batch: 16}}\n"
                      f"model: {{backbone: tiny}}\n"
                      f"train: {{steps: 2, log_every: 1, checkpoint_every: 1, progress: false, out: {tmp / 'runs'}}}\n"
                      f"tracking: {{uri: 'sqlite:///{tmp / 'mlflow.db'}'}}\n")
    return {"tmp": tmp, "config": config, "uri": f"sqlite:///{tmp / 'mlflow.db'}"}


def grid(setup: dict, name: str, *extra: str) -> list[str]:
    return ["compare", "--config", str(setup["config"]), "--methods", "supervised,adversarial", "--seeds", "0-1",
            "--label-drop", "0.5", "--folds", "1", "--name", name, *extra]


def client(setup: dict):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=setup["uri"])


def runs(setup: dict, filter_string: str = "") -> list:
    c = client(setup)
    exp = c.get_experiment_by_name("ssau")
    return list(c.search_runs([exp.experiment_id], filter_string, max_results=1000)) if exp else []


def children(setup: dict, parent_id: str) -> dict:
    return {r.info.run_name: r for r in runs(setup, f"tags.mlflow.parentRunId = '{parent_id}'")}


def read_csv(setup: dict, run_id: str, name: str, dst: Path) -> list[dict]:
    dst.mkdir(parents=True, exist_ok=True)
    path = client(setup).download_artifacts(run_id, name, str(dst))  # at the root: the compare view lists it
    with open(path) as f:
        return list(csv.DictReader(f))


def test_compare_reports_skips_and_pairs(setup, capsys, tmp_path, monkeypatch):
    from ssau.train.trainer import Trainer

    step = Trainer.train_step

    def interrupted(self, batches):  # Ctrl-C in the third cell, after its step-1 checkpoint
        if self.cfg.train.name.endswith("supervised-s1-d0.5-f1") and self.step == 1:
            raise KeyboardInterrupt
        return step(self, batches)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    assert main(grid(setup, "pair")) == 130
    capsys.readouterr()
    (parent,) = runs(setup, "tags.compare_parent = 'pair'")
    assert parent.info.status == "KILLED"
    assert sorted(r.info.status for r in children(setup, parent.info.run_id).values()) == ["FINISHED"] * 2 + ["KILLED"]
    monkeypatch.setattr(Trainer, "train_step", step)
    # the second call skips the finished cells and resumes the killed one from its checkpoint, in the same run
    assert main(grid(setup, "pair")) == 0
    out, err = capsys.readouterr()
    assert "paired difference to supervised" in out and err.count("skipped (finished") == 2
    assert "resumed pair-supervised-s1-d0.5-f1 at step 1" in err and err.count("running in") == 2
    kids = children(setup, parent.info.run_id)
    ids = {f"{m}-s{s}-d0.5-f1" for m in ("supervised", "adversarial") for s in (0, 1)}
    assert set(kids) == ids and all(r.info.status == "FINISHED" for r in kids.values())
    assert kids["adversarial-s1-d0.5-f1"].data.tags["compare"] == "pair"
    assert kids["adversarial-s1-d0.5-f1"].data.params["train.seed"] == "1"
    assert kids["adversarial-s1-d0.5-f1"].data.params["data.split_seed"] == "0"  # the same split for every seed

    # hand computation from the child runs as MLflow holds them
    f1 = {(m, s): kids[f"{m}-s{s}-d0.5-f1"].data.metrics["val/f1_mean"] for m in ("supervised", "adversarial")
          for s in (0, 1)}
    auc = {(m, s): kids[f"{m}-s{s}-d0.5-f1"].data.metrics["val/auc_mean"] for m in ("supervised", "adversarial")
           for s in (0, 1)}
    diffs = [f1[("adversarial", s)] - f1[("supervised", s)] for s in (0, 1)]
    auc_diffs = [auc[("adversarial", s)] - auc[("supervised", s)] for s in (0, 1)]
    metrics = client(setup).get_run(parent.info.run_id).data.metrics
    assert metrics["cmp/adversarial/drop0.5/f1_diff"] == pytest.approx(statistics.fmean(diffs), abs=1e-9)
    assert metrics["cmp/adversarial/drop0.5/f1_diff_se"] == pytest.approx(statistics.stdev(diffs) / math.sqrt(2),
                                                                         abs=1e-9)
    assert metrics["cmp/adversarial/drop0.5/auc_diff"] == pytest.approx(statistics.fmean(auc_diffs), abs=1e-9)
    assert metrics["cmp/supervised/drop0.5/f1_mean"] == pytest.approx(
        statistics.fmean([f1[("supervised", 0)], f1[("supervised", 1)]]), abs=1e-9)
    assert metrics["cmp/supervised/drop0.5/f1_std"] == pytest.approx(
        statistics.stdev([f1[("supervised", 0)], f1[("supervised", 1)]]), abs=1e-9)
    summary = {r["method"]: r for r in read_csv(setup, parent.info.run_id, "summary.csv", tmp_path)}
    assert set(summary) == {"supervised", "adversarial"} and summary["adversarial"]["n_seeds"] == "2"
    assert float(summary["adversarial"]["f1_mean"]) == pytest.approx(
        statistics.fmean([f1[("adversarial", 0)], f1[("adversarial", 1)]]), abs=1e-5)
    (paired,) = read_csv(setup, parent.info.run_id, "paired.csv", tmp_path)
    assert paired["method"] == "adversarial" and paired["baseline"] == "supervised" and paired["seeds"] == "0 1"
    assert float(paired["f1_diff"]) == pytest.approx(statistics.fmean(diffs), abs=1e-5)
    per_au = read_csv(setup, parent.info.run_id, "per_au.csv", tmp_path)
    f1_au = kids["supervised-s0-d0.5-f1"].data.metrics["val/f1/AU01"]
    f1_au1 = kids["supervised-s1-d0.5-f1"].data.metrics["val/f1/AU01"]
    (row,) = [r for r in per_au if r["method"] == "supervised" and r["au"] == "AU01"]
    assert float(row["f1_mean"]) == pytest.approx((f1_au + f1_au1) / 2, abs=1e-5)
    listed = {a.path for a in client(setup).list_artifacts(parent.info.run_id)}
    assert {"f1_vs_label_drop.png", "per_au_f1.png", "summary.csv", "paired.csv", "per_au.csv"} <= listed

    # the second call runs nothing: same children, same start times, every cell skipped
    starts = {k: r.info.start_time for k, r in kids.items()}
    assert main(grid(setup, "pair")) == 0
    out, err = capsys.readouterr()
    assert err.count("skipped (finished") == 4 and "running in" not in err
    assert len(runs(setup, "tags.compare_parent = 'pair'")) == 1
    again = children(setup, parent.info.run_id)
    assert {k: r.info.start_time for k, r in again.items()} == starts

    # a cell that failed after training to its end starts afresh in a new directory and a new run
    failed, history = kids["supervised-s1-d0.5-f1"], "cmp/adversarial/drop0.5/f1_diff"
    assert [m.step for m in client(setup).get_metric_history(parent.info.run_id, history)] == [1]
    client(setup).set_terminated(failed.info.run_id, "FAILED")
    assert main(grid(setup, "pair")) == 0
    out, err = capsys.readouterr()
    assert err.count("skipped (finished") == 3 and "pair-supervised-s1-d0.5-f1-r2" in err
    after = runs(setup, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(after) == 5
    # a call that ran a cell logs the parent's metrics at a new step (one value per step is kept)
    assert [m.step for m in client(setup).get_metric_history(parent.info.run_id, history)] == [1, 2]
    # the parent's metrics are those of the cells as they are now, not the first call's
    now = {r.info.run_name: r for r in sorted(after, key=lambda r: r.info.start_time) if r.info.status == "FINISHED"}
    diffs = [now[f"adversarial-s{s}-d0.5-f1"].data.metrics["val/f1_mean"]
             - now[f"supervised-s{s}-d0.5-f1"].data.metrics["val/f1_mean"] for s in (0, 1)]
    metrics = client(setup).get_run(parent.info.run_id).data.metrics
    assert metrics["cmp/adversarial/drop0.5/f1_diff"] == pytest.approx(statistics.fmean(diffs), abs=1e-9)


def test_warm_start_and_dry_run(setup, capsys, monkeypatch):
    import ssau.train.trainer

    loaded, original = [], ssau.checkpoints.warm_start
    monkeypatch.setattr(ssau.train.trainer, "warm_start", lambda module, path: loaded.append(path) or original(module, path))
    before = len(runs(setup))
    assert main(grid(setup, "dry", "--warm-start", "--warm-steps", "1", "--dry-run")) == 0
    out, err = capsys.readouterr()
    assert "6 cells, 0 finished, 6 to run" in out and "estimated time" in out and "s/step" in out
    assert len(runs(setup)) == before and not runs(setup, "tags.compare_parent = 'dry'")

    args = ["compare", "--config", str(setup["config"]), "--methods", "adversarial", "--seeds", "3",
            "--label-drop", "0.25", "--name", "warm", "--warm-start", "--warm-steps", "1", "adversarial.alpha=0.5"]
    assert main(args) == 0
    capsys.readouterr()
    (parent,) = runs(setup, "tags.compare_parent = 'warm'")
    kids = children(setup, parent.info.run_id)
    assert set(kids) == {"warm-s3-d0.25-f1", "adversarial-s3-d0.25-f1"}
    warm, cell = kids["warm-s3-d0.25-f1"].data.params, kids["adversarial-s3-d0.25-f1"].data.params
    assert warm["method.name"] == "supervised" and warm["train.steps"] == "1" and cell["train.steps"] == "2"
    model = Path(kids["warm-s3-d0.25-f1"].data.tags["run_dir"]) / "model.pt"
    assert kids["adversarial-s3-d0.25-f1"].data.tags["warm_start"] == str(model) and model.is_file()
    assert cell["train.warm_start"] == "True" and cell["method.alpha"] == "0.5"
    assert loaded == [model]  # the adversarial cell started from the warm cell's weights
    assert main(args + ["--dry-run"]) == 0
    assert "2 cells, 2 finished, 0 to run" in capsys.readouterr().out
    # the same --name with other settings, or another section for a finished cell, is refused in one line
    for changed, message in ((args + ["train.steps=3"], "was made with other settings"),
                             (args[:-1] + ["adversarial.alpha=0.7"], "finished with other method settings")):
        assert main(changed) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]
    assert len(children(setup, parent.info.run_id)) == 2
    # the grid grows by a seed: the finished warm cell is skipped (its run directory read back from its tags)
    grown = args[:6] + ["3,4"] + args[7:]
    assert main(grown) == 0
    err = capsys.readouterr().err
    assert err.count("skipped (finished") == 2 and err.count("running in") == 2
    warm4 = children(setup, parent.info.run_id)["warm-s4-d0.25-f1"]
    assert loaded[-1] == Path(warm4.data.tags["run_dir"]) / "model.pt"


@pytest.mark.parametrize("flag,value,message", [
    ("--seeds", "3-1", "--seeds: '3-1' is not a range"),
    ("--seeds", "0-x", "--seeds: '0-x' is not a seed list"),
    ("--seeds", "1,1", "names a seed twice"),
    ("--methods", "supervised,nosuch", "--methods: 'nosuch' is not a method"),
    ("--label-drop", "1.0", "--label-drop: 1 is not a fraction in [0, 1)"),
    ("--baseline", "mal", "--baseline: 'mal' is not one of --methods"),
])
def test_bad_grid_is_one_line(flag, value, message, capsys):
    argv = {"--methods": "supervised,adversarial", "--seeds": "0-1", "--label-drop": "0.5", flag: value}
    assert main(["compare", *[x for kv in argv.items() for x in kv], "data.labelled=[nowhere]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ssau: error: ") and message in err[0]


@pytest.mark.parametrize("method,message", [
    ("{name: nosuch}", "method.name: 'nosuch' is not a method"),
    ("{name: mtl, bogus: 1}", "unknown key 'method.bogus'"),
    ("{name: mal}", "data.expression: method mal needs an expression corpus"),
])
def test_the_configs_own_method_section_is_checked_even_when_not_compared(method, message, tmp_path, capsys):
    """The config file's method section is validated as `ssau train` validates it, whatever --methods holds."""
    config = tmp_path / "c.yaml"
    config.write_text(f"method: {method}\ndata: {{labelled: [nowhere]}}\n")
    argv = ["compare", "--config", str(config), "--methods", "supervised,adversarial", "--seeds", "0-1",
            "--label-drop", "0.5"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ssau: error: ") and message in err[0], err


def test_views_mean_f1_and_inconsistency_are_reported_when_a_method_logs_them():
    from ssau.compare.report import format_report, parent_metrics, summarize

    def cell(method, seed, f1, views=None, inc=None):
        m = {"val/f1_mean": f1, "val/auc_mean": 0.7, "val/acc_mean": 0.9, "val/marginal_gap": 0.1,
             "val/conditional_gap": 0.2}
        if views is not None:
            m |= {"val/f1_views": views, "val/inconsistency_mean": inc}
        return {"method": method, "seed": seed, "drop": 0.5, "fold": 1, "metrics": m}

    results = [cell("supervised", 0, 0.40), cell("supervised", 1, 0.44),
               cell("mlcr", 0, 0.46, 0.43, 0.10), cell("mlcr", 1, 0.47, 0.49, 0.20)]
    rep = summarize(results, ("supervised", "mlcr"), (0.5,), "supervised")
    assert rep.keys[-2:] == ("f1_views", "inconsistency")
    sup, mlcr = rep.summary
    assert sup["f1_views_mean"] == pytest.approx(0.42)  # a single view's "views' mean" is its F1
    assert math.isnan(sup["inconsistency_mean"]) and mlcr["inconsistency_mean"] == pytest.approx(0.15)
    (paired,) = rep.paired  # by hand: (0.43 - 0.40, 0.49 - 0.44) -> mean 0.04, SE std(0.03, 0.05) / sqrt(2)
    assert paired["f1_views_diff"] == pytest.approx(0.04)
    assert paired["f1_views_diff_se"] == pytest.approx(statistics.stdev([0.03, 0.05]) / math.sqrt(2))
    assert paired["f1_diff"] == pytest.approx(0.045)
    assert parent_metrics(rep)["cmp/mlcr/drop0.5/f1_views_diff"] == pytest.approx(0.04)
    assert "F1 views" in format_report(rep) and "inconsistency" in format_report(rep)
    plain = summarize(results[:2], ("supervised",), (0.5,), "supervised")  # no method logs views: no columns
    assert plain.keys == ("f1", "auc", "acc", "marginal_gap", "conditional_gap")


def test_methods_with_an_underscore_and_their_variants_are_compared():
    from ssau.compare.grid import method_of, parse_methods, split_overrides

    labels = parse_methods("supervised,large_margin,large_margin-center")
    assert [method_of(x) for x in labels] == ["supervised", "large_margin", "large_margin"]
    base, per = split_overrides(["train.steps=5", "large_margin-center.margin=center"], labels)
    assert base == ["train.steps=5"] and per == {"large_margin-center": {"margin": "center"}}
