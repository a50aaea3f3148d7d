"""Config strictness, metrics against hand-worked examples, in-process training, resume, MLflow read back."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import model_artifacts

from ssau.cli import main
from ssau.errors import ConfigError
from ssau.metrics import au_metrics, conditional_matrix
from ssau.train.setup import load_run_config


@pytest.fixture(scope="module")
def shards(corpora) -> Path:
    return corpora.bp4d(shard_size=4)


def tiny_args(shards: Path, tmp: Path, *extra: str) -> list[str]:
    return [f"data.labelled=[{shards}]", "model.backbone=tiny", "data.image_size=32", "data.m1=4", "data.workers=0",
            "data.eval_batch=16", "train.steps=4", "train.log_every=2", f"train.out={tmp / 'runs'}",
            "train.progress=false", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", *extra]


# ---------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("override,message", [
    ("data.imgsize=3", "unknown key 'data.imgsize'; allowed: labelled"),
    ("model.backbone=vgg", "model.backbone: 'vgg' is not allowed; choose one of tiny, resnet18"),
    ("train.steps=ten", "train.steps: expected an integer, got 'ten'"),
    ("method.name=nosuch", "method.name: 'nosuch' is not a method; choose one of supervised, mtl, adversarial, mal"),
    ("method.alpha=0.1", "unknown key 'method.alpha'; allowed: pos_weight"),
    ("data.label_drop=1.5", "data.label_drop: 1.5 is not a fraction"),
    ("optim.lr=-1", "optim.lr: must be positive"),
    ("data.fold=7", "data.fold: 7 is not in 0..3"),
    ("train.deepspeed=missing.json", "train.deepspeed: missing.json does not exist"),
    ("train.bucket_mb=0", "train.bucket_mb: 0 is outside 0.01..100000"),
    ("optim.fused=always", "optim.fused: 'always' is not allowed; choose one of auto, on, off"),
    ("nosection.x=1", "unknown key 'nosection'"),
])
def test_config_is_strict(override, message):
    with pytest.raises(ConfigError) as e:
        load_run_config(None, ["data.labelled=[x]", override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_on_and_off_read_as_words_where_a_setting_takes_them():
    """YAML 1.1 reads a bare on/off as a boolean: train.channels_last=off was refused with "False is not allowed"."""
    cfg = load_run_config(None, ["data.labelled=[x]", "train.channels_last=off", "optim.fused=on"])
    assert cfg.train.channels_last == "off" and cfg.optim.fused == "on"
    with pytest.raises(ConfigError, match="train.precision: 'on' is not allowed"):
        load_run_config(None, ["data.labelled=[x]", "train.precision=on"])  # a setting without on/off stays strict


def test_config_file_and_overrides(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("method: {name: supervised, pos_weight: true}\ndata: {labelled: [a, b], fold: 2}\noptim: {lr: 0.01}\n")
    cfg = load_run_config(f, ["optim.lr=1e-4", "data.m1=7"])
    assert cfg.method == {"name": "supervised", "pos_weight": True, "loss": "plain", "a_c_table": "auto",
                          "a_c_default": 0.3}  # the section resolved: every hyper-parameter, defaults filled
    assert cfg.data.labelled == ["a", "b"] and cfg.data.fold == 2 and cfg.data.m1 == 7 and cfg.optim.lr == 1e-4
    assert main(["train", "--config", str(f), "optim.betas=oops"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ssau: error: optim.betas[0]: expected a number, got 'o'"] or \
        (len(err) == 1 and err[0].startswith("ssau: error: optim.betas"))


# ---------------------------------------------------------------------------------------------------- metrics
def test_metrics_hand_worked():
    # AU1: labels 1,1,0,0,unknown ; probs .9,.4,.6,.1,.99 -> pred 1,0,1,0 (5th excluded)
    #   tp=1 fp=1 fn=1 -> F1 = 2/(2+1+1) = 0.5; acc = 2/4; AUC: pos {.9,.4} neg {.6,.1}: pairs won 3/4
    # AU2: labels 0,1,1,1,1 ; probs .2,.7,.8,.3,.6 -> pred 0,1,1,0,1: tp=3 fn=1 -> F1 = 6/7; AUC = 4/4
    probs = np.array([[.9, .2], [.4, .7], [.6, .8], [.1, .3], [.99, .6]])
    y = np.array([[1, 0], [1, 1], [0, 1], [0, 1], [0, 1]])
    mask = np.array([[1, 1], [1, 1], [1, 1], [1, 1], [0, 1]])
    m = au_metrics(probs, y, mask, (1, 2))
    assert m["per_au"]["AU01"]["f1"] == pytest.approx(0.5) and m["per_au"]["AU01"]["acc"] == 0.5
    assert m["per_au"]["AU01"]["auc"] == pytest.approx(0.75) and m["per_au"]["AU01"]["n"] == 4
    assert m["per_au"]["AU02"]["f1"] == pytest.approx(6 / 7) and m["per_au"]["AU02"]["auc"] == 1.0
    assert m["f1_mean"] == pytest.approx((0.5 + 6 / 7) / 2)
    # marginal: AU1 P_pred = 2/4, P_gt = 2/4 -> 0; AU2 P_pred = 3/5, P_gt = 4/5 -> 0.2; mean 0.1
    assert m["marginal_gap"] == pytest.approx(0.1)
    # conditional over rows 0-3 (both known): P(1|2): gt rows with AU2=1 {1,2,3}: AU1 on in {1} -> 1/3;
    #   pred AU2 on {1,2}: AU1 on in {2} -> 1/2 ; gap 1/6
    # P(2|1): gt AU1 on {0,1}: AU2 on {1} -> 1/2 ; pred AU1 on {0,2}: AU2 on {2} -> 1/2 ; gap 0
    assert m["conditional_gaps"][0, 1] == pytest.approx(1 / 6) and m["conditional_gaps"][1, 0] == pytest.approx(0)
    assert m["conditional_gap"] == pytest.approx(1 / 24)  # mean of all 4 entries, the zero diagonal included


def test_conditional_matrix_undefined_where_condition_never_occurs():
    b = np.array([[1, 0], [0, 0]])
    c = conditional_matrix(b, np.ones_like(b))
    assert np.isnan(c[0, 1]) and c[1, 0] == 0 and c[0, 0] == c[1, 1] == 1  # P(i|i) = 1 by definition


# ---------------------------------------------------------------------------------------------------- training
def test_train_logs_metrics_params_tags_and_artifacts_to_mlflow(shards, tmp_path):
    from mlflow.tracking import MlflowClient

    assert main(["train", *tiny_args(shards, tmp_path, "train.name=r1", "data.label_drop=0.25")]) == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ssau")
    (run,) = client.search_runs([exp.experiment_id])
    d = run.data
    assert d.tags["method"] == "supervised" and d.tags["fold"] == "1" and d.tags["world_size"] == "1"
    assert d.tags["label_drop"] == "0.25" and d.tags["corpus"] == "bp4d"
    assert len(d.tags["mlflow.source.git.commit"]) >= 7 and d.tags["mlflow.source.name"] == "ssau train"
    assert d.params["optim.lr"] == "0.001" and d.params["data.label_drop"] == "0.25" and d.params["model.backbone"] == "tiny"
    for key in ("val/f1_mean", "val/f1/AU01", "val/f1/AU24", "val/auc_mean", "val/acc_mean", "val/marginal_gap",
                "val/conditional_pairs", "val/p_pred/AU01", "val/p_true/AU24", "train/supervised/loss",
                "train/images_per_s", "data/label_drop_fraction"):
        assert key in d.metrics, key
    assert 0.0 <= d.metrics["val/f1_mean"] <= 1.0
    history = client.get_metric_history(run.info.run_id, "train/supervised/loss")
    assert [h.step for h in history] == [2, 4]
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    arts |= model_artifacts(client, run.info.run_id)
    assert {"config.yaml", "per_au.csv", "per_au.json", "f1_bar.png", "conditional.png", "marginal.png",
            "model/model.pt", "model/MLmodel"} <= arts  # the evaluation at the root, where MLflow's compare view lists artifacts
    csv = Path(client.download_artifacts(run.info.run_id, "per_au.csv", str(tmp_path))).read_text()
    assert csv.splitlines()[1].startswith("AU01,")
    assert run.info.status == "FINISHED"
    assert (tmp_path / "mlartifacts").is_dir() and not Path("mlruns").exists()  # artifacts beside the store


def test_resume_continues_at_the_saved_step_with_the_saved_state(shards, tmp_path, capsys):
    args = tiny_args(shards, tmp_path, "train.name=res", "train.checkpoint_every=2", "tracking.enabled=false",
                     "train.resume=auto", "optim.schedule=constant")
    assert main(["train", *args, "train.steps=2"]) == 0
    ckpt_dir = tmp_path / "runs" / "res" / "checkpoints"
    saved = torch.load(ckpt_dir / "step-0000002.pt", weights_only=True)
    # Asking again for the same 2 steps resumes at step 2 and trains nothing: the model equals the checkpoint.
    assert main(["train", *args, "train.steps=2"]) == 0
    final = torch.load(tmp_path / "runs" / "res" / "model.pt", weights_only=True)
    for k, v in saved["method"].items():
        assert torch.equal(v, final["method"][k]), k
    # Four steps: continues from step 2; optimiser and schedule state carried (Adam counts 4 steps, not 2).
    assert main(["train", *args, "train.steps=4"]) == 0
    assert "resumed res at step 2" in capsys.readouterr().err
    four = torch.load(ckpt_dir / "step-0000004.pt", weights_only=True)
    assert four["step"] == 4 and four["starts"] == 1  # the second run trained nothing, saved nothing
    adam = four["optimizers"]["model"]["state"]
    assert {int(s["step"]) for s in adam.values()} == {4}
    assert (ckpt_dir / "last").read_text().strip() == "step-0000004.pt"
    assert not list(ckpt_dir.glob(".*tmp*"))


@pytest.mark.parametrize("first,then", [("off", "on"), ("on", "off")])
def test_a_checkpoint_resumes_across_fused_and_unfused_optimisers(shards, tmp_path, first, then):
    """optim.fused is auto (on with CUDA): a checkpoint written on a CPU, or before fused optimisers, resumes on a GPU.
    Loading used to restore the saved groups' fused=None, and the fused verdict (found_inf) then hit torch's unfused
    step, which refuses it (AssertionError)."""
    args = tiny_args(shards, tmp_path, "train.name=fu", "train.checkpoint_every=2", "tracking.enabled=false",
                     "train.resume=auto")
    assert main(["train", *args, "train.steps=2", f"optim.fused={first}"]) == 0
    assert main(["train", *args, "train.steps=4", f"optim.fused={then}"]) == 0
    four = torch.load(tmp_path / "runs" / "fu" / "checkpoints" / "step-0000004.pt", weights_only=True)
    groups = four["optimizers"]["model"]["param_groups"]
    assert {g["fused"] for g in groups} == {True if then == "on" else None}
    assert {int(s["step"]) for s in four["optimizers"]["model"]["state"].values()} == {4}


def test_eval_command_prints_the_per_au_table(shards, tmp_path, capsys):
    assert main(["train", *tiny_args(shards, tmp_path, "train.name=ev", "tracking.enabled=false")]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "runs" / "ev" / "model.pt"), "--shards", str(shards),
                 "--folds", "2", "--workers", "0"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["AU", "F1", "%", "AUC", "%", "Acc", "%", "n", "pos"]
    assert [line.split()[0] for line in out[1:13]] == [f"AU{a:02d}" for a in (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24)]
    assert out[13].startswith("mean")


def test_unreachable_tracking_server_fails_at_start(shards, tmp_path, capsys):
    assert main(["train", *tiny_args(shards, tmp_path, "tracking.uri=http://127.0.0.1:9")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unreachable" in err[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.pt"))


def test_non_finite_update_is_refused(shards, tmp_path, capsys, monkeypatch):
    from ssau.methods.supervised import Supervised

    real = Supervised.loss

    def poisoned(self, batch, step):
        out = real(self, batch, step)
        return out | {"loss": out["loss"] * float("nan")} if step == 1 else out

    monkeypatch.setattr(Supervised, "loss", poisoned)
    assert main(["train", *tiny_args(shards, tmp_path, "train.name=nan", "tracking.enabled=false",
                                     "train.steps=3")]) == 0
    assert "step 2: update 'supervised' refused: non-finite loss" in capsys.readouterr().err
    final = torch.load(tmp_path / "runs" / "nan" / "model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in final["method"].values() if v.is_floating_point())


def test_cv_runs_folds_as_child_runs_with_means(shards, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    assert main(["cv", *tiny_args(shards, tmp_path, "train.steps=2", "train.name=cv")]) == 0
    out = capsys.readouterr().out
    assert "fold 3:" in out and "AU24" in out
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ssau").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and sorted(r.data.tags["fold"] for r in children) == ["1", "2", "3"]
    f1s = [r.data.metrics["val/f1_mean"] for r in children]
    assert parents[0].data.metrics["cv/f1_mean"] == pytest.approx(np.mean(f1s))
    assert parents[0].data.metrics["cv/f1_mean_std"] == pytest.approx(statistics.stdev(f1s))  # ddof 1, as compare
    assert "cv/f1/AU01" in parents[0].data.metrics
    # The children's per-AU results side by side in the parent, at the artifact root (the compare view lists it).
    pid = parents[0].info.run_id
    assert {"per_au.csv", "per_au.json", "per_au_f1.png"} <= {a.path for a in client.list_artifacts(pid)}
    import json

    table = json.loads(Path(client.download_artifacts(pid, "per_au.json", str(tmp_path / "dl"))).read_text())
    rows = {(r[0], r[1]): r[2] for r in table["data"]}
    by_fold = {int(r.data.tags["fold"]): r.data.metrics for r in children}
    assert len(rows) == 3 * 12 and table["columns"] == ["au", "fold", "f1", "auc", "acc"]
    for k in (1, 2, 3):
        assert rows[("AU01", k)] == pytest.approx(by_fold[k]["val/f1/AU01"], abs=1e-6)
    assert '"per_au.json"' in parents[0].data.tags["mlflow.loggedArtifacts"]


def test_gradient_accumulation_equals_one_step_on_the_mean_loss(shards, tmp_path):
    import copy

    from helpers import make_batch

    from ssau.methods.parts import masked_bce
    from ssau.train.trainer import Trainer

    # Plain SGD: its step is proportional to the gradient (Adam's first step is not), so a wrong 1/accumulate shows.
    cfg = load_run_config(None, tiny_args(shards, tmp_path, "optim.accumulate=2", "optim.clip_grad=0", "optim.name=sgd",
                                      "optim.momentum=0", "optim.lr=0.5", "tracking.enabled=false"))
    tr = Trainer(cfg)
    tr.method.eval()  # BatchNorm in eval mode: both sides see the same statistics
    twin = copy.deepcopy(tr.method)
    b1, b2 = make_batch(1, m1=4), make_batch(2, m1=4)
    drawn = []

    def batches():
        for b in (b1, b2):
            drawn.append(b)
            yield b

    (upd,) = tr.method.updates(0)
    tr._run_update(upd, batches(), None)
    assert drawn == [b1, b2]  # one micro-batch each

    opt = torch.optim.SGD(twin.parameters(), lr=cfg.optim.lr)
    loss = (masked_bce(twin.logits(b1.images), b1.targets, b1.mask)
            + masked_bce(twin.logits(b2.images), b2.targets, b2.mask)) / 2
    loss.backward()
    opt.step()
    for (name, a), b in zip(tr.method.named_parameters(), twin.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
