"""Long runs survive, part 2 (issue 25): a SQLite store another process holds locked mid-run (one line per wait,
no SQLAlchemy traceback, the metrics delivered once it is free), two runs starting together on a fresh store (both
migrate nothing twice and finish), `ssau ui` stopped by SIGTERM or SIGINT (no process of MLflow's server left), and
`ssau eval`'s defaults (every fold; a run directory as the checkpoint).

The broken things are real: a second process holding ``BEGIN EXCLUSIVE`` on the database, processes released at the
same instant on a store that does not exist yet, a real MLflow UI with its uvicorn workers and job consumers.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from helpers import error_line, tiny_train

from ssau.cli import main

ROOT = Path(__file__).resolve().parents[1]

# A rank-0 tracker on a SQLite store: it creates its run, says so, waits for a line on stdin, then logs 5 steps.
TRACK = """import sys
from pathlib import Path
from ssau.config import TrackingConfig
from ssau.tracking.tracker import Tracker
d, name = Path(sys.argv[1]), sys.argv[2]
t = Tracker(TrackingConfig(uri=f"sqlite:///{d / 'mlflow.db'}", flush_timeout=120), d / name / "tracking.jsonl")
print("ready", flush=True)
sys.stdin.readline()  # every process starts its run at the same instant
t.start(name, {})
print("run", t.run_id, flush=True)
sys.stdin.readline()
for step in range(5):
    t.log_metrics({"loss": 1.0 / (step + 1)}, step)
print("undelivered", t.end(), flush=True)
"""


def _tracker(tmp: Path, store: Path, name: str) -> subprocess.Popen:
    script = tmp / "track.py"
    script.write_text(TRACK)
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, str(script), str(store), name], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    return proc


def _expect(proc: subprocess.Popen, word: str) -> str:
    line = proc.stdout.readline()
    if not line.startswith(word):
        _, err = proc.communicate(timeout=60)
        raise AssertionError(f"expected {word!r}, got {line!r}: {err[-3000:]}")
    return line.split()[-1] if len(line.split()) > 1 else ""


def _go(*procs: subprocess.Popen) -> None:
    for p in procs:
        p.stdin.write("\n")
    for p in procs:
        p.stdin.flush()


def _steps(uri: str, run_id: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, "loss"))


# ---------------------------------------------------------------------------------------------------- a locked store
@pytest.mark.slow
def test_a_locked_database_is_waited_for_in_one_line_per_wait(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    proc = _tracker(tmp_path, store, "locked")
    _expect(proc, "ready")
    _go(proc)
    run_id = _expect(proc, "run")
    # Another process holds the database for 30 s: MLflow's statements wait SQLite's 20 s busy timeout, so the
    # first delivery fails once and the retry gets through when the lock goes.
    holder = sqlite3.connect(store / "mlflow.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        _go(proc)
        time.sleep(30)
    finally:
        holder.execute("COMMIT")
        holder.close()
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    assert "undelivered 0" in out
    assert "Traceback" not in err and "sqlalchemy" not in err.lower() and "[SQL:" not in err, err[-3000:]
    lines = err.splitlines()
    waits = [line for line in lines if "is locked" in line]
    assert len(waits) == 1 and waits[0].startswith("ssau: tracking: "), err
    assert re.search(r"waited 2\d s", waits[0]) and str(store / "locked" / "tracking.jsonl") in waits[0]
    mlflow_info = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d INFO mlflow")  # "Creating initial MLflow tables..."
    assert all(line.startswith("ssau: ") or mlflow_info.match(line) for line in lines), err
    assert _steps(f"sqlite:///{store / 'mlflow.db'}", run_id) == [0, 1, 2, 3, 4]  # delivered once it was free


# ---------------------------------------------------------------------------------------------------- a fresh store
@pytest.mark.slow
def test_two_runs_starting_together_on_a_fresh_store_both_finish(tmp_path):
    from mlflow.tracking import MlflowClient

    for attempt in range(3):  # the migration race lost the second run in most tries before the store lock
        store = tmp_path / f"store{attempt}"
        store.mkdir()
        procs = [_tracker(tmp_path, store, name) for name in ("a", "b")]
        for p in procs:
            _expect(p, "ready")  # both have imported MLflow; the store does not exist yet
        assert not (store / "mlflow.db").exists()
        _go(*procs)  # released together
        ids = []
        for p in procs:
            line = p.stdout.readline()
            if not line.startswith("run"):
                _, err = p.communicate(timeout=60)
                for q in procs:
                    q.kill()
                raise AssertionError(f"try {attempt}: a run did not start on the fresh store: {err[-2000:]}")
            ids.append(line.split()[1])
        _go(*procs)
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0 and "undelivered 0" in out, err[-2000:]
        client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
        runs = client.search_runs([client.get_experiment_by_name("ssau").experiment_id])
        assert sorted(r.info.run_id for r in runs) == sorted(ids)
        assert {r.info.status for r in runs} == {"FINISHED"}
        assert [_steps(client.tracking_uri, i) for i in ids] == [[0, 1, 2, 3, 4]] * 2
        assert {p.name for p in store.iterdir()} <= {"a", "b", "mlartifacts", "mlflow.db"}  # no lock file left


# ---------------------------------------------------------------------------------------------------- ssau ui
def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:  # is_running: the same process, not the pid
                out.append(f"{p.pid} {_command(p)}")
        except psutil.Error:
            continue
    return out


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stopping_ssau_ui_stops_the_server_and_its_job_consumers(tmp_path, sig):
    from mlflow.tracking import MlflowClient

    db = tmp_path / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()  # a store to show
    port = _port()
    with open(tmp_path / "ui.log", "w") as log:  # its own session, as a terminal gives it: signals reach `ssau ui` only
        ui = subprocess.Popen([sys.executable, "-m", "ssau", "ui", "--uri", f"sqlite:///{db}", "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    tree: list[psutil.Process] = []
    groups: set[int] = set()
    try:
        deadline = time.monotonic() + 180
        while True:
            assert ui.poll() is None, (tmp_path / "ui.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the UI did not answer /health in 180 s"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        while time.monotonic() < deadline:  # the job runner starts its huey consumers after the server answers
            tree = psutil.Process(ui.pid).children(recursive=True)
            if any("huey" in _command(p) for p in tree):
                break
            time.sleep(0.5)
        groups = {_pgid(p) for p in tree} - {None}
        assert len(tree) >= 5, [_command(p) for p in tree]  # mlflow, uvicorn and workers, job runner, consumers
        ui.send_signal(sig)  # to `ssau ui` alone: a service manager's SIGTERM, a Ctrl-C forwarded to it
        rc = ui.wait(timeout=60)
        assert rc == (143 if sig == signal.SIGTERM else 130)
        left = _alive(tree)
        left += [f"{p.pid} {_command(p)}" for p in psutil.process_iter()
                 if _pgid(p) in groups and p.pid not in {q.pid for q in tree} and _alive([p])]
        assert not left, left
    finally:  # whatever a failed stop left behind: the groups of the processes this test started
        for g in groups | {ui.pid}:
            try:
                os.killpg(g, signal.SIGKILL)
            except ProcessLookupError:
                pass
        ui.wait()


def _pgid(p: psutil.Process) -> int | None:
    try:
        return os.getpgid(p.pid)
    except OSError:  # gone
        return None


def _command(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())[:120]
    except psutil.Error:  # gone
        return ""


# ---------------------------------------------------------------------------------------------------- ssau eval
@pytest.fixture(scope="module")
def model(corpora, tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("eval")
    shards = corpora.bp4d(shard_size=4)
    assert main(tiny_train(shards, tmp, "train.name=ev", "tracking.enabled=false")) == 0
    return shards, tmp / "runs" / "ev"


def _table(capsys, *args: str) -> str:
    capsys.readouterr()
    assert main(["eval", *args, "--workers", "0"]) == 0
    return capsys.readouterr().out


def test_eval_without_folds_scores_every_fold(model, capsys):
    shards, run = model
    default = _table(capsys, "--checkpoint", str(run / "model.pt"), "--shards", str(shards))
    every = _table(capsys, "--checkpoint", str(run / "model.pt"), "--shards", str(shards), "--folds", "1", "2", "3")
    held_out = _table(capsys, "--checkpoint", str(run / "model.pt"), "--shards", str(shards), "--folds", "1")
    assert default == every and default != held_out  # the run's held-out fold is 1
    n = {line.split()[0]: int(line.split()[4]) for line in default.splitlines()[1:13]}
    n1 = {line.split()[0]: int(line.split()[4]) for line in held_out.splitlines()[1:13]}
    assert n["AU01"] == 72 and n1["AU01"] == 24  # 6 subjects x 2 tasks x 6 frames; two subjects a fold


def test_eval_takes_a_run_directory(model, tmp_path, capsys):
    shards, run = model
    from_dir = _table(capsys, "--checkpoint", str(run), "--shards", str(shards), "--folds", "2")
    from_file = _table(capsys, "--checkpoint", str(run / "model.pt"), "--shards", str(shards), "--folds", "2")
    assert from_dir == from_file and from_dir.startswith("AU")
    empty = tmp_path / "unfinished"
    (empty / "checkpoints").mkdir(parents=True)
    (empty / "checkpoints" / "step-0000002.pt").write_bytes(b"")
    assert main(["eval", "--checkpoint", str(empty), "--shards", str(shards)]) == 2
    line = error_line(capsys)
    assert f"{empty}: a directory without model.pt" in line and "step-0000002.pt" in line
    assert main(["eval", "--checkpoint", str(tmp_path / "nothing"), "--shards", str(shards)]) == 2
    assert f"{tmp_path / 'nothing'} does not exist" in error_line(capsys)
