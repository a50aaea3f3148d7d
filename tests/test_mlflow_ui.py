"""What a user comparing runs in the MLflow UI gets, read back with MlflowClient: per-AU results of several runs
side by side (root artifacts, the logged table), run names, params vs the config artifact, MLflow's own tags, the
shard sets as dataset inputs, and a store that still works when copied elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import global_tracking_uri

from ssau.cli import main


@pytest.fixture(scope="module")
def store(corpora, tmp_path_factory) -> tuple[Path, object]:
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("ui")
    shards = corpora.bp4d(shard_size=4)
    _common[:] = [f"data.labelled=[{shards}]", "model.backbone=tiny", "data.image_size=32", "data.m1=4", "data.m2=4",
                  "data.workers=0", "data.eval_batch=16", "train.steps=2", "train.log_every=1", "train.progress=false"]
    common = [f"data.labelled=[{shards}]", "model.backbone=tiny", "data.image_size=32", "data.m1=4", "data.m2=4",
              "data.workers=0", "data.eval_batch=16", "train.steps=2", "train.log_every=1", f"train.out={tmp / 'runs'}",
              "train.progress=false", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}"]
    assert main(["train", *common, "train.seed=0"]) == 0
    assert main(["train", *common, "train.seed=1", "method.name=adversarial", "data.label_drop=0.5"]) == 0
    return tmp, MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")


_common: list[str] = []  # the fixture's training overrides without out and uri


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
    with global_tracking_uri(client.tracking_uri):  # load_table searches runs through the global tracking URI
        table = client.load_table(exp.experiment_id, "per_au.json", extra_columns=["run_id"])
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


def test_dataset_inputs_name_the_shards_each_run_read(store, corpora):
    import hashlib
    import json

    tmp, client = store
    _, runs = _runs(client)
    shards = corpora.bp4d(shard_size=4)  # the shared corpus the store's runs read
    doc = json.loads((shards / "dataset.json").read_text())

    def digest(folds):  # by hand: the sha256 of every shard read, in dataset.json's order
        lines = "".join(f"{sh['name']}:{sh['sha256']}\n" for sh in doc["shards"] if sh["fold"] in folds)
        return hashlib.sha256(lines.encode()).hexdigest()[:16]

    for r in runs.values():
        got = {}
        for i in r.inputs.dataset_inputs:
            tags = {t.key: t.value for t in i.tags}
            got[tags["mlflow.data.context"]] = (i.dataset.name, i.dataset.digest, tags["folds"], i.dataset.source)
            profile = json.loads(i.dataset.profile)
            assert profile["corpus"] == "bp4d" and profile["shards"] >= 1 and profile["samples"] >= 1
        source = json.dumps({"uri": shards.resolve().as_uri()})
        assert got == {"train": ("bp4d", digest({2, 3}), "2,3", source),
                       "eval": ("bp4d", digest({1}), "1", source)}, got
        assert got["train"][1] != got["eval"][1]


def test_a_copied_store_lists_its_artifacts_and_new_runs_write_into_the_copy(store, tmp_path, capsys):
    import shutil

    from mlflow.tracking import MlflowClient

    tmp, client = store
    copy = tmp_path / "elsewhere"
    copy.mkdir()
    shutil.copy2(tmp / "mlflow.db", copy / "mlflow.db")
    shutil.copytree(tmp / "mlartifacts", copy / "mlartifacts")
    before = {p.name for p in (tmp / "mlartifacts").iterdir()}
    capsys.readouterr()
    assert main(["train", *_common, f"train.out={copy / 'runs'}", f"tracking.uri=sqlite:///{copy / 'mlflow.db'}",
                 "train.seed=7"]) == 0
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "copied or moved" in x]
    assert f"{tmp / 'mlartifacts'}" in line and f"now keep them in {copy / 'mlartifacts'}" in line
    assert "2 run(s)" in line
    moved = MlflowClient(tracking_uri=f"sqlite:///{copy / 'mlflow.db'}")
    exp = moved.get_experiment_by_name("ssau")
    assert exp.artifact_location == (copy / "mlartifacts").as_uri()
    runs = moved.search_runs([exp.experiment_id])
    assert len(runs) == 3
    for r in runs:  # the copied runs and the new one: artifacts listed from the copy, written into the copy
        assert r.info.artifact_uri.startswith((copy / "mlartifacts").as_uri() + "/")
        assert "per_au.json" in {a.path for a in moved.list_artifacts(r.info.run_id)}
    new = [r for r in runs if r.info.run_name.endswith("-s7-fold1")][0].info.run_id
    assert (copy / "mlartifacts" / new / "artifacts" / "per_au.json").is_file()
    assert {p.name for p in (tmp / "mlartifacts").iterdir()} == before  # the original folder is untouched
    exp0 = client.get_experiment_by_name("ssau")
    assert exp0.artifact_location == (tmp / "mlartifacts").as_uri()  # and so is the original store


def test_a_database_copied_without_its_artifacts_is_left_pointing_at_them(store, tmp_path):
    import shutil

    from ssau.tracking.store import relocate

    tmp, client = store
    shutil.copy2(tmp / "mlflow.db", tmp_path / "mlflow.db")
    line = relocate(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert line.startswith("ssau: warning: ") and "copy the mlartifacts/ folder beside the database" in line
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_experiment_by_name("ssau")
    assert exp.artifact_location == (tmp / "mlartifacts").as_uri()
    assert relocate(f"sqlite:///{tmp / 'mlflow.db'}") == ""  # a store where it was made: nothing to do
