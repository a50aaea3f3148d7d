"""What a user comparing runs in the MLflow UI gets, read back with MlflowClient: per-AU results of several runs
side by side (root artifacts, the logged table), run names, params vs the config artifact, MLflow's own tags."""

from __future__ import annotations

from pathlib import Path

import pytest

from corpora import shard_bp4d
from ssau.cli import main


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, object]:
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("ui")
    shards = shard_bp4d(tmp, shard_size=4)
    common = [f"data.labelled=[{shards}]", "model.backbone=tiny", "data.image_size=32", "data.m1=4", "data.m2=4",
              "data.workers=0", "data.eval_batch=16", "train.steps=2", "train.log_every=1", f"train.out={tmp / 'runs'}",
              "train.progress=false", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}"]
    assert main(["train", *common, "train.seed=0"]) == 0
    assert main(["train", *common, "train.seed=1", "method.name=adversarial", "data.label_drop=0.5"]) == 0
    return tmp, MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")


def _runs(client):
    exp = client.get_experiment_by_name("ssau")
    return exp, {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


def test_runs_are_named_by_what_tells_them_apart(store):
    _, client = store
    _, runs = _runs(client)
    assert set(runs) == {"supervised-tiny-drop0-s0-fold1", "adversarial-tiny-drop0.5-s1-fold1"}


def test_per_au_results_of_two_runs_side_by_side(store, tmp_path):
    _, client = store
    exp, runs = _runs(client)
    for r in runs.values():  # the compare view lists root artifacts only
        root = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"per_au.csv", "per_au.json", "f1_bar.png", "marginal.png", "conditional.png"} <= root
        assert '"per_au.json"' in r.data.tags["mlflow.loggedArtifacts"]
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(client.tracking_uri)  # load_table searches runs through the global tracking URI
    try:
        table = client.load_table(exp.experiment_id, "per_au.json", extra_columns=["run_id"])
    finally:
        mlflow.set_tracking_uri(previous)
    assert len(table) == 2 * 12 and set(table["run_id"]) == {r.info.run_id for r in runs.values()}
    for r in runs.values():  # the table holds what the run logged as metrics
        rows = table[table["run_id"] == r.info.run_id].set_index("au")
        assert rows.loc["AU01", "f1"] == pytest.approx(r.data.metrics["val/f1/AU01"], abs=1e-6)
        assert rows.loc["AU24", "p_true"] == pytest.approx(r.data.metrics["val/p_true/AU24"], abs=1e-6)


def test_params_are_the_experimental_choices(store, tmp_path):
    _, client = store
    _, runs = _runs(client)
    sup, adv = runs["supervised-tiny-drop0-s0-fold1"].data, runs["adversarial-tiny-drop0.5-s1-fold1"].data
    for setup in ("data.labelled", "data.workers", "train.out", "tracking.uri", "train.checkpoint_every",
                  "train.progress", "optim.momentum"):
        assert setup not in sup.params and setup not in adv.params, setup
    assert "data.m2" not in sup.params and sup.params["data.m1"] == "4"  # supervised reads no unlabelled images
    assert adv.params["data.m2"] == "4" and adv.params["method.alpha"] == "0.01"
    assert sup.params["model.backbone"] == "tiny" and sup.params["train.seed"] == "0"
    assert sup.params["optim.lr"] == "0.001" and sup.params["train.warm_start"] == "False"
    run_id = runs["supervised-tiny-drop0-s0-fold1"].info.run_id  # everything else is in the config artifact
    text = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path))).read_text()
    assert "workers: 0" in text and "checkpoint_every" in text


def test_mlflow_source_and_user_tags(store):
    _, client = store
    _, runs = _runs(client)
    tags = runs["supervised-tiny-drop0-s0-fold1"].data.tags
    assert tags["mlflow.source.name"] == "ssau train" and tags["mlflow.source.type"] == "LOCAL"
    assert len(tags["mlflow.source.git.commit"]) >= 7 and tags["mlflow.user"]
    assert tags["backbone"] == "tiny" and tags["seed"] == "0" and Path(tags["run_dir"]).is_dir()


def test_ssau_ui_serves_the_store_on_loopback(store, capsys):
    import json
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    tmp, _ = store
    assert main(["ui", "--uri", f"sqlite:///{tmp / 'nowhere.db'}"]) == 2
    assert "no store there yet" in capsys.readouterr().err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "ssau", "ui", "--uri", f"sqlite:///{tmp / 'mlflow.db'}", "--port",
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url, body, deadline = f"http://127.0.0.1:{port}", None, time.time() + 90
        while body is None and time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{url}/ajax-api/2.0/mlflow/experiments/search?max_results=10",
                                            timeout=5) as r:
                    body = json.loads(r.read())
            except OSError:
                time.sleep(0.5)
        assert body is not None, "the UI never answered"
        assert "ssau" in {e["name"] for e in body["experiments"]}  # the store of the runs, not a new one
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
