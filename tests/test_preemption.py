"""Preemption (issue 25): SIGTERM, SIGINT and SIGUSR1 finish the step under way, write a checkpoint at that step on
every rank, end the MLflow run KILLED with a line naming it, and exit with 128 + the signal. The resumed run is
bit-identical from then on to the run that was never interrupted: the stream's position (``TrainStream.state``)
and every RNG are in the checkpoint."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from ssau.checkpoints import safe_load
from ssau.data.sources import stream_config
from ssau.data.stream import TrainStream
from ssau.train.setup import load_run_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(corpora) -> Path:
    return corpora.bp4d(shard_size=3)


def _stream(shards: Path, workers: int, rank: int = 0, world: int = 1) -> TrainStream:
    cfg = load_run_config(None, [f"data.labelled=[{shards}]", f"data.unlabelled=[{shards}]", "data.fold=1",
                                 "data.m1=3", "data.m2=2", f"data.workers={workers}", "data.image_size=32",
                                 "data.shuffle_buffer=5", "data.validation=0.3", "data.val_batch=2",
                                 "method.name=pseudo_label"])
    return TrainStream(stream_config(cfg, (1, 2, 4, 6)), rank, world)


@pytest.mark.parametrize("workers,taken,segment", [(0, 7, 4096), (2, 7, 4096), (2, 8, 7), (3, 4, 5), (0, 9, 4)])
def test_a_restored_stream_continues_batch_for_batch(shards, workers, taken, segment, monkeypatch):
    """Every source (labelled, unlabelled, the AU validation split) continues where the state was taken: the same
    keys and the same pixels (augmentation included), whatever the count of batches modulo the workers (the loader's
    round robin), within a segment of the stream and across segment boundaries (small segments here)."""
    import ssau.data.stream
    import ssau.data.train_source

    monkeypatch.setattr(ssau.data.train_source, "SEGMENT", segment)
    monkeypatch.setattr(ssau.data.stream, "VAL_SEGMENT", max(2, segment // 2))
    first = _stream(shards, workers)
    it = iter(first)
    for _ in range(taken):
        next(it)
    state = first.state()
    expected = list(itertools.islice(it, 5))
    again = _stream(shards, workers)
    assert again.restore(state) is None
    got = list(itertools.islice(iter(again), 5))
    assert [b.keys for b in got] == [b.keys for b in expected]
    assert [b.unlabelled_keys for b in got] == [b.unlabelled_keys for b in expected]
    assert [b.val_keys for b in got] == [b.val_keys for b in expected] and got[0].val_keys
    for a, b in zip(got, expected):
        assert torch.equal(a.images, b.images) and torch.equal(a.unlabelled, b.unlabelled)
        assert torch.equal(a.val_images, b.val_images)
        assert torch.equal(a.targets, b.targets) and torch.equal(a.landmarks, b.landmarks)
    fresh = list(itertools.islice(iter(_stream(shards, workers)), 5))  # without the state: another order
    assert [b.keys for b in fresh] != [b.keys for b in expected]


def test_a_stream_state_of_other_workers_is_refused_with_its_reason(shards):
    state = _stream(shards, 2).state()
    why = _stream(shards, 1).restore(state)
    assert why is not None and "2 workers" in why and "1" in why


def _train(shards: Path, tmp: Path, name: str, *extra: str) -> list[str]:
    return ["-m", "ssau", "train", f"data.labelled=[{shards}]", f"data.unlabelled=[{shards}]", "model.backbone=tiny",
            "data.image_size=32", "data.m1=4", "data.m2=4", "data.eval_batch=16", "data.shuffle_buffer=8",
            "train.steps=100", "train.checkpoint_every=0", "train.log_every=1", f"train.out={tmp / 'runs'}",
            f"train.name={name}", "train.resume=auto", "train.progress=false",
            f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", *extra]


def _env() -> dict:
    return os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}


def _wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 240) -> None:
    """Until the run's journal has logged ``step`` (tracking.jsonl: one metrics record per step)."""
    deadline = time.time() + timeout
    journal = run_dir / "tracking.jsonl"
    while time.time() < deadline:
        if journal.is_file() and f'"step":{step},' in journal.read_text():
            return
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.02)
    raise AssertionError(f"step {step} was not reached in time")


def _model(tmp: Path, name: str) -> dict[str, torch.Tensor]:
    return safe_load(tmp / "runs" / name / "model.pt")["method"]


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"


@pytest.fixture(scope="module")
def whole(shards, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The uninterrupted run the interrupted ones are compared with."""
    tmp = tmp_path_factory.mktemp("whole")
    done = subprocess.run([sys.executable, *_train(shards, tmp, "whole", *EXTRA)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return _model(tmp, "whole")


EXTRA = ("method.name=pseudo_label", "data.workers=2", "model.dropout=0.3")  # dropout: the CPU generator in play


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_a_signal_mid_run_checkpoints_and_the_resumed_run_equals_an_uninterrupted_one(shards, tmp_path, sig, whole):
    """pseudo_label with two DataLoader workers per source: the signal (sent to the process group, as a terminal or
    SLURM does) stops the run at a step with a checkpoint, a line and the run KILLED; the same command finishes it,
    with every parameter and buffer equal to a run never interrupted."""
    from mlflow.tracking import MlflowClient

    cmd = [sys.executable, *_train(shards, tmp_path, "cut", *EXTRA)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        _wait_for_step(tmp_path / "runs" / "cut", proc, 10)
        os.killpg(proc.pid, sig)  # the whole group: the DataLoader workers get it too, and must not die of it
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + sig, out[-3000:]
    ckpts = tmp_path / "runs" / "cut" / "checkpoints"
    stopped_at = safe_load(ckpts / (ckpts / "last").read_text().strip())["step"]
    assert 10 <= stopped_at < 100, out[-3000:]
    line = [x for x in out.splitlines() if x.startswith(f"ssau: {signal.Signals(sig).name} at step {stopped_at}")]
    assert len(line) == 1 and f"step-{stopped_at:07d}.pt" in line[0] and "Traceback" not in out, out[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    cut = [r for r in client.search_runs([client.get_experiment_by_name("ssau").experiment_id])
           if r.data.tags.get("ssau.stopped")]
    assert len(cut) == 1 and cut[0].info.status == "KILLED" and f"step-{stopped_at:07d}.pt" in cut[0].data.tags[
        "ssau.stopped"]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed cut at step {stopped_at}" in done.stderr and "fresh shard orders" not in done.stderr
    assert client.get_run(cut[0].info.run_id).info.status == "FINISHED"  # the same MLflow run, finished
    _same(_model(tmp_path, "cut"), whole)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_to_one_of_two_ranks_stops_both_at_one_step_and_the_resume_is_exact(shards, tmp_path):
    """torchrun, 2 gloo ranks: SIGTERM reaches rank 1 only; rank 0 learns of it in the step's all-reduce, both write
    the checkpoint at the same step and exit 143; the same command resumes, and the final state equals that of an
    uninterrupted 2-rank run (rank reports: world size 2 inside each rank, equal digests)."""
    import json

    def cmd(name: str) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                "--master-port", str(_port()), *_train(shards, tmp_path, name, "train.rank_report=true",
                                                       "data.workers=0")]

    whole = subprocess.run(cmd("whole"), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stdout[-2000:] + whole.stderr[-2000:]
    proc = subprocess.Popen(cmd("cut"), cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        _wait_for_step(tmp_path / "runs" / "cut", proc, 8)
        ranks = {}
        for child in psutil.Process(proc.pid).children(recursive=True):
            if child.environ().get("RANK") is not None and "ssau" in " ".join(child.cmdline()):
                ranks[int(child.environ()["RANK"])] = child.pid
        assert set(ranks) == {0, 1}, ranks
        os.kill(ranks[1], signal.SIGTERM)
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and "exitcode  : 143" in out, out[-3000:]
    ckpts = tmp_path / "runs" / "cut" / "checkpoints"
    state = safe_load(ckpts / (ckpts / "last").read_text().strip())
    assert 8 <= state["step"] < 100 and len(state["streams"]) == 2 and len(state["rng"]) == 2
    assert out.count(f"ssau: SIGTERM at step {state['step']}") == 1, out[-3000:]
    done = subprocess.run(cmd("cut"), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    _same(_model(tmp_path, "cut"), _model(tmp_path, "whole"))
    reports = [json.loads((tmp_path / "runs" / n / "ranks" / f"rank{r}.json").read_text())
               for n in ("whole", "cut") for r in (0, 1)]
    assert [r["world_size"] for r in reports] == [2, 2, 2, 2] and [r["step"] for r in reports] == [100] * 4
    assert len({r["state_sha256"] for r in reports}) == 1  # both ranks, both runs: one state


@pytest.mark.parametrize("step_status", [143, 0])
def test_the_slurm_script_passes_usr1_to_the_ranks_as_sigterm_then_requeues(tmp_path, step_status):
    """launch/slurm/train.sbatch under stand-ins for srun, scontrol and the ranks: SLURM's USR1 to the batch shell
    reaches the job step as SIGTERM, the script waits for the step to end, then requeues the job and exits with the
    step's status; a step that ended well meanwhile (0: the run finished) is not requeued."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "srun").write_text('#!/usr/bin/env bash\necho "$$" > "$LOG/srun.pid"\n'
                               f'trap \'echo TERM >> "$LOG/srun.log"; sleep 0.3; exit {step_status}\' TERM\n'
                               'while true; do sleep 0.05; done\n')
    (bin_ / "scontrol").write_text('#!/usr/bin/env bash\nif [ "$1" = show ]; then echo node1; exit 0; fi\n'
                                   'echo "$@" >> "$LOG/scontrol.log"\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    env = os.environ | {"PATH": f"{bin_}:{os.environ['PATH']}", "LOG": str(tmp_path), "SLURM_JOB_ID": "77",
                        "SLURM_JOB_NODELIST": "node1", "SLURM_NNODES": "1", "SLURM_JOB_NAME": "ssau"}
    job = subprocess.Popen(["bash", str(ROOT / "launch" / "slurm" / "train.sbatch"), "recipe.yaml"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not (tmp_path / "srun.pid").exists():
        assert job.poll() is None and time.time() < deadline, job.communicate()
        time.sleep(0.05)
    time.sleep(0.2)
    job.send_signal(signal.SIGUSR1)
    _, err = job.communicate(timeout=30)
    assert job.returncode == step_status and "the ranks checkpoint and stop" in err, err
    assert (tmp_path / "srun.log").read_text().split() == ["TERM"]
    requeued = (tmp_path / "scontrol.log").read_text().split() if (tmp_path / "scontrol.log").exists() else []
    assert requeued == (["requeue", "77"] if step_status else [])


def test_a_finished_run_started_again_changes_nothing(shards, tmp_path, capsys):
    """A requeue that lands after the run's end (or a rerun of the same command): the model and its card stay as
    the finished run wrote them; nothing is trained, evaluated or logged again."""
    from helpers import tiny_train
    from ssau.cli import main

    args = tiny_train(shards, tmp_path, "train.name=done", "train.resume=auto", "tracking.enabled=false")
    assert main(args) == 0
    model = tmp_path / "runs" / "done" / "model.pt"
    before = (model.read_bytes(), model.stat().st_mtime_ns)
    capsys.readouterr()
    assert main(args) == 0
    assert "done finished at step 3 already; nothing to do" in capsys.readouterr().err
    assert (model.read_bytes(), model.stat().st_mtime_ns) == before
