"""Tracking outages: a real `mlflow server` killed and restarted under 2 CPU ranks, a server that never comes back
(journal, one line, `ssau upload` to another server), a resumed run (one value per metric and step), kill -9.

The servers are real processes on 127.0.0.1 with their own SQLite stores; each training step is slowed by a test-time
patch so that the server can be killed between logged steps. What the server holds is compared with the journal.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import model_artifacts

from ssau.cli import main
from ssau.tracking.journal import JOURNAL, read_journal

ROOT = Path(__file__).resolve().parents[1]
MLFLOW = Path(sys.executable).parent / "mlflow"
LOSS = "train/supervised/loss"

# Each rank sleeps before every step so that a test can act between logged steps.
SLOW = """import sys, time
from ssau.train.trainer import Trainer
step = Trainer.train_step
def slow(self, batches):
    time.sleep({delay})
    return step(self, batches)
Trainer.train_step = slow
from ssau.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def shards(corpora) -> Path:
    return corpora.bp4d(shard_size=3)


@pytest.fixture(autouse=True)
def _short_http(monkeypatch):
    # what Tracker/upload set for themselves; set here so the test process gets its environment back afterwards
    for k, v in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0"), ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30"),
                 ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"), ("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")):
        monkeypatch.setenv(k, v)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    # ssau's own HTTP settings are under test: none of the test process's MLFLOW_HTTP_* reach the training process
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_")}
    return env | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


class Server:
    """`mlflow server` on 127.0.0.1:port over a SQLite store; killed with SIGKILL (its whole process group)."""

    def __init__(self, store: Path, port: int):
        self.store, self.port, self.proc = store, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self, wait: bool = True) -> Server:
        self.store.mkdir(parents=True, exist_ok=True)
        cmd = [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{self.store / 'mlflow.db'}",
               "--default-artifact-root", str(self.store / "artifacts")]
        self.proc = subprocess.Popen(cmd, env=_env() | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                                     stdout=open(self.store / "server.log", "a"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return self.ready() if wait else self

    def ready(self) -> Server:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.store / "server.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"mlflow server on {self.port} did not answer /health in 90 s")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # uvicorn runs as a child of the `mlflow server` process
            self.proc.wait(timeout=30)


@pytest.fixture
def servers():
    started: list[Server] = []

    def make(store: Path, port: int | None = None) -> Server:
        s = Server(store, port or _port())
        started.append(s)
        return s

    yield make
    for s in started:
        s.kill()


def _args(shards: Path, out: Path, name: str, uri: str, *extra: str) -> list[str]:
    return [f"data.labelled=[{shards}]", "model.backbone=tiny", "data.image_size=32", "data.m1=4", "data.workers=0",
            "data.eval_batch=16", "train.log_every=1", f"train.out={out}", f"train.name={name}",
            "train.progress=false", f"tracking.uri={uri}", *extra]


def _slow_script(tmp: Path, delay: float) -> Path:
    path = tmp / "slow_ssau.py"
    path.write_text(SLOW.format(delay=delay))
    return path


def _journal(run_dir: Path) -> list[dict]:
    path = run_dir / JOURNAL
    return read_journal(path)[0] if path.is_file() else []


def _logged(run_dir: Path) -> dict[str, list[int]]:
    """Every metric key's steps as the journal holds them."""
    out: dict[str, list[int]] = {}
    for r in _journal(run_dir):
        if r["kind"] == "metrics":
            for k in r["payload"]["values"]:
                out.setdefault(k, []).append(r["payload"]["step"])
    return out


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if max(_logged(run_dir).get(LOSS, [0])) >= step:
            return
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.1)
    raise AssertionError(f"training did not log step {step} in {timeout} s")


def _wait_for_checkpoint(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Training progress read from the checkpoint pointer (not from anything tracking writes)."""
    pointer = run_dir / "checkpoints" / "last"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if int(pointer.read_text().strip()[len("step-"):-len(".pt")]) >= step:
                return
        except (OSError, ValueError):
            pass
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.1)
    raise AssertionError(f"training did not checkpoint step {step} in {timeout} s")


def _server_history(client, run_id: str, keys) -> dict[str, list[int]]:
    return {k: sorted(m.step for m in client.get_metric_history(run_id, k)) for k in keys}


def _assert_holds_journal_once(client, run_id: str, run_dir: Path) -> None:
    logged = _logged(run_dir)
    assert len(logged[LOSS]) >= 20 and len(set(logged[LOSS])) == len(logged[LOSS])
    assert _server_history(client, run_id, logged) == {k: sorted(v) for k, v in logged.items()}


# ---------------------------------------------------------------------------------------------------- outages
@pytest.mark.slow
def test_server_killed_and_restarted_mid_run_on_two_cpu_ranks(shards, tmp_path, servers):
    from mlflow.tracking import MlflowClient

    server = servers(tmp_path / "store").start()
    out = tmp_path / "runs"
    run_dir = out / "outage"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "launch" / "accelerate" / "cpu-2ranks.yaml"), "--main_process_port", str(_port()),
           str(_slow_script(tmp_path, 0.3)), "train",
           *_args(shards, out, "outage", server.uri, "train.steps=40", "train.checkpoint_every=2",
                  "train.rank_report=true", "tracking.flush_timeout=120")]
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_checkpoint(run_dir, 4, proc)
        server.kill()
        _wait_for_checkpoint(run_dir, 12, proc)  # these steps go to the journal and the queue only
        server.start()  # same port, same store
        output, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-4000:]
    assert "is not answering" in output  # the outage happened while training ran...
    assert "not delivered" not in output  # ...and everything reached the server by the end
    ranks = [json.loads((run_dir / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and all(r["step"] == 40 for r in ranks)
    (created,) = [r for r in _journal(run_dir) if r["kind"] == "run"]
    client = MlflowClient(tracking_uri=server.uri)
    run = client.get_run(created["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    assert _logged(run_dir)[LOSS] == list(range(1, 41))
    _assert_holds_journal_once(client, run.info.run_id, run_dir)
    assert run.data.params["train.steps"] == "40"
    # the weights, and the MLflow model logged beside them once the server answered again (issue 24)
    assert {"model/model.pt", "model/MLmodel"} <= model_artifacts(client, run.info.run_id)
    # Upload afterwards finds nothing missing.
    assert main(["upload", str(run_dir)]) == 0
    assert _server_history(client, run.info.run_id, [LOSS])[LOSS] == list(range(1, 41))


@pytest.mark.slow
def test_server_that_never_returns_then_upload_to_another_server(shards, tmp_path, servers, capsys):
    from mlflow.tracking import MlflowClient

    server = servers(tmp_path / "store").start()
    out = tmp_path / "runs"
    run_dir = out / "gone"
    cmd = [sys.executable, str(_slow_script(tmp_path, 0.2)), "train",
           *_args(shards, out, "gone", server.uri, "train.steps=24", "train.checkpoint_every=2",
                  "tracking.flush_timeout=3")]
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_checkpoint(run_dir, 4, proc)
        server.kill()
        t0 = time.monotonic()
        other = servers(tmp_path / "other").start(wait=False)  # where the journal goes afterwards
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-4000:]
    assert time.monotonic() - t0 < 120  # 20 slow steps, evaluation and a 3 s flush; no MLflow retry stall
    assert (run_dir / "model.pt").is_file()
    (line,) = [x for x in err.splitlines() if "not delivered" in x]
    assert line.startswith("ssau: tracking: ") and line.endswith(f"send them with: ssau upload {run_dir}")

    other.ready()
    capsys.readouterr()
    assert main(["upload", str(run_dir), "--uri", other.uri, "--experiment", "recovered"]) == 0
    (summary,) = capsys.readouterr().out.strip().splitlines()
    assert summary.startswith("new run ") and "0 metric values" not in summary
    client = MlflowClient(tracking_uri=other.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("recovered").experiment_id])
    (created,) = [r for r in _journal(run_dir) if r["kind"] == "run"]
    assert run.data.tags["ssau.source_run_id"] == created["run_id"] and run.data.tags["world_size"] == "1"
    assert run.info.status == "FINISHED" and run.data.params["train.steps"] == "24"
    _assert_holds_journal_once(client, run.info.run_id, run_dir)
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    arts |= model_artifacts(client, run.info.run_id)
    assert {"config.yaml", "model/model.pt", "per_au.csv", "f1_bar.png"} <= arts
    inputs = {(i.dataset.name, {t.key: t.value for t in i.tags}["mlflow.data.context"])
              for i in run.inputs.dataset_inputs}  # the journal's dataset inputs, through a real server
    assert inputs == {(Path(shards).name, "train"), (Path(shards).name, "eval")}
    # Twice: nothing more is sent, no second run.
    assert main(["upload", str(run_dir), "--uri", other.uri, "--experiment", "recovered"]) == 0
    assert "sent 0 metric values, 0 params, 0 tags, 0 artifacts, 0 dataset inputs, 0 status" in capsys.readouterr().out
    assert len(client.search_runs([run.info.experiment_id])) == 1
    _assert_holds_journal_once(client, run.info.run_id, run_dir)


def test_upload_refuses_a_bad_run_directory_with_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad"
    bad.mkdir()
    rec = {"seq": 0, "kind": "run", "run_id": "x", "payload": {"uri": "sqlite:///" + str(tmp_path / "m.db")}}
    (bad / JOURNAL).write_text("{not json\n" + json.dumps(rec | {"kind": "metrics", "payload": {"values": 1}}) + "\n")
    for where, says in ((tmp_path / "missing", "is not a directory"), (tmp_path / "empty", "has no tracking.jsonl"),
                        (bad, "no line of it is a journal record")):
        assert main(["upload", str(where)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("ssau: error: ") and says in err[0], err


# ---------------------------------------------------------------------------------------------------- restarts
def test_resumed_run_logs_one_value_per_metric_and_step(shards, tmp_path):
    from mlflow.tracking import MlflowClient

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = _args(shards, tmp_path / "runs", "res", db, "train.steps=8", "train.checkpoint_every=4",
                 "train.resume=auto")
    assert main(["train", *args]) == 0
    # As if killed after step 8 was logged but before its checkpoint: the last checkpoint is step 4.
    ckpt = tmp_path / "runs" / "res" / "checkpoints"
    (ckpt / "step-0000008.pt").unlink()
    (ckpt / "last").write_text("step-0000004.pt\n")
    assert main(["train", *args]) == 0  # recomputes and would log steps 5-8 (and the final metrics) again
    client = MlflowClient(tracking_uri=db)
    (run,) = client.search_runs([client.get_experiment_by_name("ssau").experiment_id])
    assert run.info.status == "FINISHED"
    for key in run.data.metrics:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(steps) == len(set(steps)), (key, steps)
    assert [m.step for m in client.get_metric_history(run.info.run_id, LOSS)] == list(range(1, 9))
    records = _journal(tmp_path / "runs" / "res")
    assert sum(r["kind"] == "params" for r in records) == 1
    assert [r["payload"]["path"] for r in records if r["kind"] == "artifact"].count("config.yaml") == 1
    assert [r["payload"]["status"] for r in records if r["kind"] == "status"] == ["FINISHED", "RUNNING", "FINISHED"]


def test_kill_9_mid_run_then_upload_and_resume(shards, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "runs" / "k9"
    args = _args(shards, tmp_path / "runs", "k9", db, "train.steps=24", "train.checkpoint_every=5",
                 "train.resume=auto")
    proc = subprocess.Popen([sys.executable, str(_slow_script(tmp_path, 0.2)), "train", *args], env=_env(),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        _wait_for_step(run_dir, 12, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    # What a kill in the middle of an append leaves: a torn last line.
    with open(run_dir / JOURNAL, "a") as f:
        f.write('{"seq":999,"kind":"metrics","run_id":"')
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)

    # The torn line is skipped and counted; every complete record reaches a fresh store once.
    other = f"sqlite:///{tmp_path / 'other.db'}"
    capsys.readouterr()
    assert main(["upload", str(copy), "--uri", other]) == 0
    assert "(1 damaged line skipped)" in capsys.readouterr().out
    client = MlflowClient(tracking_uri=other)
    (run,) = client.search_runs([client.get_experiment_by_name("ssau").experiment_id])
    logged = _logged(copy)
    assert _server_history(client, run.info.run_id, logged) == {k: sorted(v) for k, v in logged.items()}
    assert run.info.status == "RUNNING"  # the killed run never ended

    # Resumed from its step-10 checkpoint: the torn line is cut off, steps 11-12 are not logged twice.
    assert main(["train", *args]) == 0
    assert read_journal(run_dir / JOURNAL)[1] == 0
    client = MlflowClient(tracking_uri=db)
    (run,) = client.search_runs([client.get_experiment_by_name("ssau").experiment_id])
    assert run.info.status == "FINISHED"
    assert _logged(run_dir)[LOSS] == list(range(1, 25))
    _assert_holds_journal_once(client, run.info.run_id, run_dir)


# ---------------------------------------------------------------------------------------------------- the queue
def test_resume_with_the_server_down_buffers_without_blocking(tmp_path, capsys):
    from ssau.config import TrackingConfig
    from ssau.tracking.tracker import Tracker

    uri = f"http://127.0.0.1:{_port()}"  # nothing listens there
    tracker = Tracker(TrackingConfig(uri=uri, flush_timeout=1.0), tmp_path / "run" / JOURNAL)
    tracker.resume("0" * 32)  # a resumed run knows its run id: no server needed to go on
    t0 = time.monotonic()
    for step in range(1, 201):
        tracker.log_metrics({LOSS: 1.0 / step}, step)
    tracker.log_metrics({LOSS: 5.0}, 7)  # a step already logged is never logged again
    assert time.monotonic() - t0 < 1.0  # 201 log calls, none waiting for the server
    t0 = time.monotonic()
    left = tracker.end("FAILED")
    assert time.monotonic() - t0 < 5.0 and left == 202  # 200 metric records, RUNNING and FAILED
    err = capsys.readouterr().err
    assert "unreachable" in err and f"202 records not delivered to {uri}" in err
    assert err.strip().splitlines()[-1].endswith(f"send them with: ssau upload {tmp_path / 'run'}")
    logged = _logged(tmp_path / "run")
    assert logged[LOSS] == list(range(1, 201))
    statuses = [r["payload"]["status"] for r in _journal(tmp_path / "run") if r["kind"] == "status"]
    assert statuses == ["RUNNING", "FAILED"]


def test_a_record_that_cannot_be_delivered_does_not_hold_up_the_rest(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from ssau.config import TrackingConfig
    from ssau.tracking.tracker import Tracker

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    tracker = Tracker(TrackingConfig(uri=db, flush_timeout=30.0), run_dir / JOURNAL)
    run_id = tracker.start("drop", {"world_size": 1})
    tracker.log_artifact(run_dir / "later.txt")  # not there yet: no retry can deliver it
    tracker.log_metrics({LOSS: 0.5}, 1)
    assert tracker.end() == 1
    err = capsys.readouterr().err
    assert "refused one artifact record" in err and "1 records not delivered" in err
    client = MlflowClient(tracking_uri=db)
    assert [m.step for m in client.get_metric_history(run_id, LOSS)] == [1]
    assert client.get_run(run_id).info.status == "FINISHED"
    (run_dir / "later.txt").write_text("now\n")
    assert main(["upload", str(run_dir)]) == 0
    assert "sent 0 metric values, 0 params, 0 tags, 1 artifacts, 0 dataset inputs, 0 status" in capsys.readouterr().out
    assert [a.path for a in client.list_artifacts(run_id)] == ["later.txt"]
    assert [m.step for m in client.get_metric_history(run_id, LOSS)] == [1]


def test_a_full_disk_mid_append_leaves_no_torn_line_and_upload_sends_only_the_run_directory(tmp_path, capsys,
                                                                                           monkeypatch):
    """A write that fails part-way (ENOSPC) is cut off again, so the next record starts on its own line; a damaged
    line a crash left mid-file is skipped and counted; an artifact outside the run directory is never sent."""
    import errno

    from mlflow.tracking import MlflowClient

    from ssau.tracking.journal import Journal, read_journal

    run_dir = tmp_path / "run"
    j = Journal(run_dir / JOURNAL)
    db = f"sqlite:///{tmp_path / 'up.db'}"
    j.append({"seq": 0, "kind": "run", "run_id": "r1", "payload": {"uri": db, "experiment": "x", "name": "r"}})
    real = os.write

    def short_then_full(fd, data):
        monkeypatch.setattr(os, "write", real)
        real(fd, data[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", short_then_full)
    with pytest.raises(OSError):
        j.append({"seq": 1, "kind": "metrics", "run_id": "r1",
                  "payload": {"step": 1, "timestamp": 1, "values": {"m": 1.0}}})
    j.append({"seq": 1, "kind": "metrics", "run_id": "r1", "payload": {"step": 1, "timestamp": 1, "values": {"m": 2.0}}})
    (run_dir / "inside.txt").write_text("ok")
    j.append({"seq": 2, "kind": "artifact", "run_id": "r1", "payload": {"path": "inside.txt", "folder": None}})
    j.append({"seq": 3, "kind": "artifact", "run_id": "r1", "payload": {"path": "/etc/passwd", "folder": None}})
    j.close()
    records, damaged = read_journal(run_dir / JOURNAL)
    assert damaged == 0 and [r["seq"] for r in records] == [0, 1, 2, 3]
    with open(run_dir / JOURNAL, "ab") as f:  # what a crash between the short write and the truncation leaves
        f.write(b'{"seq":4,"ki\n')
    assert main(["upload", str(run_dir), "--uri", db]) == 0
    assert "1 damaged line skipped" in capsys.readouterr().out
    client = MlflowClient(tracking_uri=db)
    (run,) = client.search_runs([client.get_experiment_by_name("x").experiment_id])
    assert [m.value for m in client.get_metric_history(run.info.run_id, "m")] == [2.0]
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["inside.txt"]
