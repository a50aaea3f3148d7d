"""What a hostile or careless world sends, found by a review of the issue-10 change: damaged checkpoints, pointers,
dataset.json and index files, absurd settings, a lost `last` pointer, one damaged shard among many, a held-out fold
with no sample, a source that fails on one rank only. Each gives one line (or survives), never a traceback, a hang
or lost work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import error_line, tiny_train
from ranks import run_ranks

from ssau.checkpoints import safe_load
from ssau.cli import main


@pytest.fixture(scope="module")
def shards(corpora) -> Path:
    return corpora.bp4d(shard_size=4)


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("crafted-run")
    assert main(tiny_train(shards, tmp, "train.name=base", "train.steps=4", "train.checkpoint_every=2",
                     "tracking.enabled=false")) == 0
    return tmp / "runs" / "base"


def _copy_run(trained: Path, tmp: Path) -> Path:
    run = tmp / "runs" / "base"
    shutil.copytree(trained, run)
    return run


# ---------------------------------------------------------------------------------------------------- checkpoints
def test_a_lost_last_pointer_resumes_from_the_newest_step_file_and_deletes_nothing(shards, trained, tmp_path,
                                                                                     capsys):
    run = _copy_run(trained, tmp_path)
    (run / "checkpoints" / "last").unlink()
    args = tiny_train(shards, tmp_path, "train.name=base", "train.steps=6", "train.checkpoint_every=2",
                "train.resume=auto", "tracking.enabled=false")
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "removed step-" not in err and "resumed base at step 4" in err
    assert safe_load(run / "checkpoints" / "step-0000006.pt")["starts"] == 1


def _damage(state: dict, how: str) -> object:
    if how == "shapes":
        state["method"] = {k: v[..., :1] if v.dim() else v for k, v in state["method"].items()}
    elif how == "step-text":
        state["step"] = "abc"
    elif how == "step-huge":
        state["step"] = 10**30
    elif how == "no-schedulers":
        del state["schedulers"]
    elif how == "optimizers-list":
        state["optimizers"] = [1]
    elif how == "foreign-group":
        state["optimizers"] = {"nope": {}}
    elif how == "rng":
        state["rng"] = [{"python": 1}]
    elif how == "aus-int":
        state["aus"] = 5
    return state


@pytest.mark.parametrize("how", ["shapes", "step-text", "step-huge", "no-schedulers", "optimizers-list",
                                 "foreign-group", "rng", "aus-int", "text-file", "zeros"])
def test_a_damaged_checkpoint_is_one_line_on_resume(shards, trained, tmp_path, capsys, how):
    run = _copy_run(trained, tmp_path)
    ckpt = run / "checkpoints" / "step-0000004.pt"
    if how == "text-file":
        ckpt.write_text("hello, this is not a checkpoint\n")
    elif how == "zeros":
        ckpt.write_bytes(bytes(100))
    else:
        torch.save(_damage(safe_load(ckpt), how), ckpt)
    args = tiny_train(shards, tmp_path, "train.name=base", "train.steps=6", "train.resume=auto", "tracking.enabled=false")
    assert main(args) == 2
    line = error_line(capsys)
    assert "step-0000004.pt" in line and "execute code" not in line


def test_a_damaged_pointer_and_a_damaged_model_config_are_one_line(shards, trained, tmp_path, capsys):
    run = _copy_run(trained, tmp_path)
    (run / "checkpoints" / "last").write_bytes(b"\xff\xfe")
    args = tiny_train(shards, tmp_path, "train.name=base", "train.steps=6", "train.resume=auto", "tracking.enabled=false")
    assert main(args) == 2
    assert "last is unreadable" in error_line(capsys)
    model = safe_load(run / "model.pt")
    model["config"]["data"]["image_size"] = 100000  # would allocate terabytes if trusted
    torch.save(model, run / "bad-model.pt")
    assert main(["eval", "--checkpoint", str(run / "bad-model.pt"), "--shards", str(shards), "--workers", "0"]) == 2
    assert "its config is not valid (data.image_size: 100000 px" in error_line(capsys)
    assert main(["eval", "--checkpoint", str(run / "model.pt"), "--shards", str(shards), "--batch", "0"]) == 2
    assert "--batch 0" in error_line(capsys)


# ---------------------------------------------------------------------------------------------------- shard dirs
@pytest.mark.parametrize("damage", ["dataset-junk", "dataset-samples-text", "dataset-escaping-name", "index-junk"])
def test_damaged_shard_directories_are_one_line(shards, tmp_path, capsys, damage):
    copy = tmp_path / "bp4d"
    shutil.copytree(shards, copy)
    doc = json.loads((copy / "dataset.json").read_text())
    if damage == "dataset-junk":
        (copy / "dataset.json").write_text("{not json")
    elif damage == "dataset-samples-text":
        doc["shards"][0]["samples"] = "many"
        (copy / "dataset.json").write_text(json.dumps(doc))
    elif damage == "dataset-escaping-name":
        doc["shards"][0]["name"] = "../../../etc/passwd"
        (copy / "dataset.json").write_text(json.dumps(doc))
    else:
        (copy / "index.parquet").write_bytes(b"PAR1 not really")
    assert main(tiny_train(copy, tmp_path, "tracking.enabled=false")) == 2
    assert str(copy) in error_line(capsys)


def test_a_held_out_fold_without_samples_is_one_line(shards, tmp_path, capsys):
    copy = tmp_path / "bp4d"
    shutil.copytree(shards, copy)
    doc = json.loads((copy / "dataset.json").read_text())
    for s in doc["shards"]:
        if s["fold"] == 1:
            s["samples"] = 0
    (copy / "dataset.json").write_text(json.dumps(doc))
    assert main(tiny_train(copy, tmp_path, "tracking.enabled=false")) == 2
    assert "has no sample in fold 1" in error_line(capsys)
    assert main(["eval", "--checkpoint", "/nonexistent", "--shards", str(copy)]) == 2  # (no traceback either)
    capsys.readouterr()


def test_one_damaged_training_shard_does_not_end_the_run(shards, tmp_path):
    """Three readers split the training shards; every shard of reader 0 is damaged. It reads every shard of the
    source instead of stopping the run (before: 'none of the 4 shards read by rank 0 of 1, worker 0 of 3')."""
    from ssau.data.sources import SourceConfig, StreamConfig
    from ssau.data.stream import TrainStream

    copy = tmp_path / "bp4d"
    shutil.copytree(shards, copy)
    doc = json.loads((copy / "dataset.json").read_text())
    train = [s["name"] for s in doc["shards"] if s["fold"] in (2, 3)]
    for name in train[0::3]:  # reader 0's part (the stream splits a directory's shards slot::slots)
        (copy / name).write_bytes(bytes(range(256)) * 4)
    cfg = StreamConfig(labelled=SourceConfig((str(copy),), folds=(2, 3)), m1=2, m2=0, image_size=32,
                       workers=3, shuffle_buffer=2)
    batches = [b for _, b in zip(range(9), TrainStream(cfg))]  # three from each reader, round robin
    assert len(batches) == 9 and all(b.images.shape[0] == 2 for b in batches)


def _one_rank_fails(rank: int, world: int) -> str:
    from ssau.dist.ranks import Runtime
    from ssau.errors import SourceError
    from ssau.train.trainer import Trainer

    def batches():
        if rank == 1:
            raise SourceError("labelled source (x): nothing readable")
        while True:
            yield "batch"

    me = SimpleNamespace(rt=Runtime(rank, world, torch.device("cpu"), False, False), _to_device=lambda b: b)
    assert torch.distributed.get_world_size() == 2
    try:
        Trainer._next_batch(me, batches())
    except SourceError as e:
        return str(e)
    return "no error"


def test_a_source_failing_on_one_rank_stops_every_rank_with_one_line():
    """Rank 1's source fails while rank 0's delivers: both raise SourceError at the same fetch (rank 0 would
    otherwise wait in the step's collectives, and gloo would end it with a traceback or NCCL hang it)."""
    r0, r1 = run_ranks(_one_rank_fails, 2, timeout=120)
    assert r1 == "labelled source (x): nothing readable"
    assert r0 == "a data source failed on another rank (its line is printed there)"


# ---------------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("override,message", [
    ("data.eval_batch=10000000000", "data.eval_batch: 10000000000 is above the limit"),
    ("train.seed=99999999999999999999999", "train.seed: "),
    ("data.source_timeout=1e308", "data.source_timeout: 1e+308 s is above the limit"),
    ("data.labelled_weights=[0]", "data.labelled_weights: every mixing weight must be positive"),
    ("method.name=[x]", "method.name: ['x'] is not a method"),
    ("data.shuffle_buffer=100000000000000", "data.shuffle_buffer: "),
    ("data.aus=[999]", "data.aus: [999] holds a number that is no AU"),
])
def test_absurd_settings_are_refused(shards, tmp_path, capsys, override, message):
    assert main(tiny_train(shards, tmp_path, override)) == 2
    assert message in error_line(capsys)


def test_a_yaml_file_may_write_a_learning_rate_as_1e_3(shards, tmp_path):
    from ssau.train.setup import load_run_config

    (tmp_path / "r.yaml").write_text("optim:\n  lr: 1e-3\n")  # PyYAML reads this as the string '1e-3'
    assert load_run_config(tmp_path / "r.yaml", [f"data.labelled=[{shards}]"]).optim.lr == 1e-3


def test_sigterm_ends_the_mlflow_run_as_killed(shards, tmp_path):
    """scancel and an elastic agent stop ranks with SIGTERM: the run is marked KILLED, not left RUNNING."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from mlflow.tracking import MlflowClient

    args = tiny_train(shards, tmp_path, "train.name=term", "train.steps=100000", "train.checkpoint_every=1")
    p = subprocess.Popen([sys.executable, "-m", "ssau", *args], cwd=Path(__file__).resolve().parents[1],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env=os.environ | {"OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (tmp_path / "runs" / "term" / "checkpoints" / "last").exists():
        assert p.poll() is None and time.time() < deadline, p.stderr.read()[-2000:] if p.poll() is not None else ""
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 128 + signal.SIGTERM
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("ssau").experiment_id])
    assert run.info.status == "KILLED"
