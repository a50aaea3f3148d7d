"""Run directories and the files that describe shards, against what a second run or a crafted file does (issue 25):
one run per run directory, names that stay inside train.out, counts and offsets the files can hold, JSON without
bound on its nesting."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import error_line, tiny_train
from ssau.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(corpora) -> Path:
    return corpora.bp4d(shard_size=4)


def _tree(*roots: Path) -> dict[str, bytes]:
    """Every file under (or at) ``roots`` with its bytes."""
    files = [p for r in roots for p in ([r] if r.is_file() else sorted(r.rglob("*"))) if p.is_file()]
    assert files
    return {str(p): p.read_bytes() for p in files}


def test_a_second_run_on_a_busy_run_directory_touches_nothing_and_names_the_first(shards, tmp_path, capsys):
    """Two `ssau train` with the same train.name: the first holds the directory; the second stops with one line
    naming the first's pid, and no file of the directory or the store changes (the first is paused meanwhile, so
    only the second could change them)."""
    args = tiny_train(shards, tmp_path, "train.name=busy", "train.steps=100000", "train.checkpoint_every=1",
                      "train.resume=auto")
    first = subprocess.Popen([sys.executable, "-m", "ssau", *args], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    run_dir = tmp_path / "runs" / "busy"
    try:
        deadline = time.time() + 240
        while not (run_dir / "checkpoints" / "last").exists():
            assert first.poll() is None and time.time() < deadline, first.communicate()[0][-3000:]
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGSTOP)
        time.sleep(0.5)  # a write under way when it stopped has landed or not: either way, it is the first's
        before = _tree(run_dir, tmp_path / "mlflow.db")
        second = _bounded(args)  # without the lock it would train on: the timeout fails the test, not the suite
        lines = [x for x in second.stderr.splitlines() if x.startswith("ssau: error:")]
        assert second.returncode == 2 and len(lines) == 1, second.stderr[-2000:]
        assert f"{run_dir} is in use by another run (pid {first.pid} on " in lines[0] and "train.name" in lines[0]
        assert _tree(run_dir, tmp_path / "mlflow.db") == before
    finally:
        os.killpg(first.pid, signal.SIGCONT)
        os.killpg(first.pid, signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM
    from ssau.checkpoints import safe_load

    step = safe_load(run_dir / "checkpoints" / (run_dir / "checkpoints" / "last").read_text().strip())["step"]
    again = tiny_train(shards, tmp_path, "train.name=busy", f"train.steps={step + 1}", "train.resume=auto")
    assert main(again) == 0  # the directory is free once its run has ended
    assert "in use" not in capsys.readouterr().err


@pytest.mark.parametrize("override", ["train.name=../../escaped", "train.name=/tmp/ssau-escaped-abs",
                                      "train.name=a/../../escaped", "tracking.run_name=../escaped"])
def test_names_that_leave_train_out_are_refused_and_nothing_is_written_there(shards, tmp_path, capsys, override):
    args = tiny_train(shards, tmp_path / "deep" / "er", override, "tracking.enabled=false")
    assert main(args) == 2
    key, value = override.split("=", 1)
    assert error_line(capsys).startswith(f"ssau: error: {key}: {value!r} ")
    assert not (tmp_path / "escaped").exists() and not Path("/tmp/ssau-escaped-abs").exists()
    assert not (tmp_path / "deep").exists()  # refused before anything was made


def test_runs_without_a_name_started_in_one_second_get_directories_of_their_own(shards, tmp_path, monkeypatch):
    import ssau.train.trainer
    from ssau.train.setup import load_run_config
    from ssau.train.trainer import Trainer

    monkeypatch.setattr(ssau.train.trainer.time, "strftime", lambda fmt, *a: "20261207-120000")  # one second

    cfg = [f"data.labelled=[{shards}]", "model.backbone=tiny", "data.image_size=32", "data.workers=0",
           f"train.out={tmp_path}", "tracking.enabled=false", "train.progress=false"]
    a, b = Trainer(load_run_config(None, cfg)), Trainer(load_run_config(None, cfg))
    assert a.run_dir.parent == b.run_dir.parent == tmp_path
    assert (a.run_dir.name, b.run_dir.name) == ("supervised-fold1-20261207-120000", "supervised-fold1-20261207-120000-2")


def _inflate(shards: Path, corpora, tmp: Path, change) -> Path:
    bad = corpora.copy(shards, tmp / "bad")
    doc = json.loads((bad / "dataset.json").read_text())
    change(doc)
    (bad / "dataset.json").write_text(json.dumps(doc))
    return bad


def _bounded(args: list[str]) -> subprocess.CompletedProcess:
    """A CLI run in a subprocess bounded by a timeout: a hang fails the test instead of stalling the suite."""
    return subprocess.run([sys.executable, "-m", "ssau", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=180)


def test_an_inflated_sample_count_is_one_line_not_an_endless_evaluation(shards, corpora, tmp_path):
    def inflate(doc):
        doc["shards"][0]["samples"] = 10**30

    bad = _inflate(shards, corpora, tmp_path, inflate)
    name = json.loads((bad / "dataset.json").read_text())["shards"][0]["name"]
    for args in (["eval", "--checkpoint", str(tmp_path / "none.pt"), "--shards", str(bad)],
                 tiny_train(bad, tmp_path, "tracking.enabled=false")):
        if args[0] == "eval":  # a real model, so that eval gets as far as the shards
            assert main(tiny_train(shards, tmp_path, "train.name=m", "tracking.enabled=false")) == 0
            args[2] = str(tmp_path / "runs" / "m" / "model.pt")
        r = _bounded(args)
        lines = [x for x in r.stderr.splitlines() if x.startswith("ssau: error:")]
        assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert f"shard {name} is said to hold {10**30} samples" in lines[0]


def test_index_offsets_past_the_end_of_their_shard_are_one_line(shards, corpora, tmp_path, capsys):
    bad = corpora.copy(shards, tmp_path / "bad")
    t = pq.read_table(bad / "index.parquet")
    offsets = t.column("tar_offset").to_pylist()
    offsets[3] = 10**15
    t = t.set_column(t.schema.get_field_index("tar_offset"), "tar_offset", pa.array(offsets, pa.int64()))
    pq.write_table(t, bad / "index.parquet")
    assert main(tiny_train(bad, tmp_path, "tracking.enabled=false")) == 2
    line = error_line(capsys)
    assert "index.parquet: a sample of" in line and f"at bytes {10**15}.." in line and "index is damaged" in line


def test_a_dataset_json_nested_without_bound_is_one_line(shards, corpora, tmp_path, capsys):
    bad = corpora.copy(shards, tmp_path / "bad")
    (bad / "dataset.json").write_text('{"aus": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert main(tiny_train(bad, tmp_path, "tracking.enabled=false")) == 2
    assert "dataset.json" in (line := error_line(capsys)) and "nested too deeply" in line
