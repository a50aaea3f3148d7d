"""`ssau demo` end to end, shrunk: the realistic corpus, its OpenFace CSVs through --landmarks and --align, training
and evaluation on aligned faces, the MLflow run read back with its client."""

from __future__ import annotations

import json

from ssau.cli import main


def test_demo_trains_on_aligned_faces_and_logs_the_run(tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # the demo's MLflow store is ./mlflow.db
    args = ["demo", "--out", str(tmp_path / "demo"), "--steps", "2", "--backbone", "tiny", "--subjects", "3",
            "--frames", "6", "--size", "96", "--align", "48", "--workers", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "48 px faces aligned by landmarks (realistic corpus)" in out and "by landmarks" in out
    doc = json.loads((tmp_path / "demo" / "shards" / "bp4d" / "dataset.json").read_text())
    assert doc["faces"]["align"]["size"] == 48 and doc["faces"]["aligned_by"]["landmarks"] >= 60
    assert doc["faces"]["landmarks"]["matched"] >= 60 and doc["samples"] == 3 * 4 * 6
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("ssau-demo").experiment_id])
    assert run.info.status == "FINISHED" and "val/f1_mean" in run.data.metrics

    # A second demo with other settings re-shards (the demo owns its directory) instead of stopping at old shards.
    assert main([*args[:-4], "--align", "0", "--workers", "1"]) == 0
    doc = json.loads((tmp_path / "demo" / "shards" / "bp4d" / "dataset.json").read_text())
    assert "align" not in doc["faces"] and doc["faces"]["aligned_by"] == {"none": 72}
    assert "whole frames" in capsys.readouterr().out
