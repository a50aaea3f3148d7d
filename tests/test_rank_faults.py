"""Faults a multi-node job must survive, on 2 real gloo ranks on 127.0.0.1 (issue 10): one rank killed under
torchrun's elastic agent (the group restarts and resumes), and the whole job killed with kill -9 under DeepSpeed
ZeRO-2 then started again with train.resume=auto. Both finish with the planned step count, one MLflow run, and
one value per metric and step."""

from __future__ import annotations

import json
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

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(corpora) -> Path:
    return corpora.bp4d(shard_size=3)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(shards: Path, tmp: Path, name: str, steps: int, *extra: str) -> list[str]:
    return ["-m", "ssau", "train", f"data.labelled=[{shards}]", "model.backbone=tiny", "data.image_size=32",
            "data.m1=4", "data.workers=0", "data.eval_batch=8", f"train.steps={steps}", "train.checkpoint_every=5",
            f"train.out={tmp / 'runs'}", f"train.name={name}", "train.resume=auto", "train.rank_report=true",
            "train.progress=false", "train.log_every=1", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", *extra]


def _env() -> dict:
    return os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}


def _wait_for_checkpoint(ckpts: Path, proc: subprocess.Popen, timeout: float = 240) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (ckpts / "last").is_file():
            return (ckpts / "last").read_text().strip()
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    raise AssertionError("no checkpoint within the time limit")


def _rank_pids(launcher: subprocess.Popen) -> dict[int, int]:
    out = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            rank = child.environ().get("RANK")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if rank is not None and "ssau" in " ".join(child.cmdline()):
            out[int(rank)] = child.pid
    return out


def _kill_all(launcher: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it (torchrun starts each rank in a session of its own, so
    killing the launcher's process group alone leaves the ranks training)."""
    procs = [psutil.Process(launcher.pid)]
    procs += procs[0].children(recursive=True)
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    launcher.wait(timeout=30)


def _assert_finished_once(tmp: Path, name: str, steps: int) -> None:
    """Both ranks at the planned step with equal state, finite weights, one MLflow run with one value per step."""
    from mlflow.tracking import MlflowClient

    run_dir = tmp / "runs" / name
    reports = [json.loads((run_dir / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in reports] == [2, 2]
    assert [r["step"] for r in reports] == [steps, steps]
    assert reports[0]["state_sha256"] == reports[1]["state_sha256"]
    final = safe_load(run_dir / "checkpoints" / f"step-{steps:07d}.pt")
    assert final["step"] == steps and final["starts"] >= 1  # it was resumed, not run again from scratch
    model = safe_load(run_dir / "model.pt")["method"]
    assert all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point())
    assert not list((run_dir / "checkpoints").glob(".*tmp*"))
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("ssau").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    history = [m.step for m in client.get_metric_history(run.info.run_id, "train/supervised/loss")]
    assert sorted(history) == list(range(1, steps + 1))  # every step once: none lost, none logged twice


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_a_killed_rank_restarts_the_group_which_resumes_and_finishes(shards, tmp_path, launcher):
    """The elastic agent (torchrun with c10d rendezvous, or accelerate launch with its restart options;
    --max-restarts 1): rank 1 gets SIGKILL after the first checkpoint; the agent stops rank 0, starts both again,
    and train.resume=auto continues from the checkpoint."""
    steps = 60
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
               "--max-restarts", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_port()}",
               "--monitor-interval", "0.2"]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "launch" / "accelerate" / "cpu-2ranks.yaml"), "--main_process_port", str(_port()),
               "--max_restarts", "1", "--monitor_interval", "0.2", "--rdzv_backend", "c10d"]
    cmd += _args(shards, tmp_path, "elastic", steps)
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    try:
        first = _wait_for_checkpoint(tmp_path / "runs" / "elastic" / "checkpoints", launcher)
        pids = _rank_pids(launcher)
        assert set(pids) == {0, 1}, pids
        os.kill(pids[1], signal.SIGKILL)
        out, _ = launcher.communicate(timeout=400)
    finally:
        if launcher.poll() is None:
            _kill_all(launcher)
    assert launcher.returncode == 0, out[-4000:]
    assert first != f"step-{steps:07d}.pt", "the run finished before the kill"
    assert "resumed elastic at step" in out
    _assert_finished_once(tmp_path, "elastic", steps)


def test_whole_job_kill_9_then_resume_under_zero2(shards, tmp_path):
    """Every process of an accelerate-launched ZeRO-2 job gets SIGKILL mid-run; the same command again resumes
    (DeepSpeed's partitioned optimiser state included) and ends at the planned step count."""
    steps = 60
    args = _args(shards, tmp_path, "zero2", steps, f"train.deepspeed={ROOT / 'launch/deepspeed/zero2.json'}")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "launch" / "accelerate" / "cpu-2ranks.yaml"), "--main_process_port", str(_port()), *args]
    job = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    ckpts = tmp_path / "runs" / "zero2" / "checkpoints"
    try:
        _wait_for_checkpoint(ckpts, job)
        time.sleep(0.1)  # mid-step, a few steps past the checkpoint
    finally:
        _kill_all(job)
    assert (ckpts / "last").read_text().strip() != f"step-{steps:07d}.pt", "the run finished before the kill"
    cmd[cmd.index("--main_process_port") + 1] = str(_port())
    again = subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=400)
    assert again.returncode == 0, again.stdout[-4000:]
    assert "resumed zero2 at step" in again.stdout
    assert (tmp_path / "runs" / "zero2" / "checkpoints" / "deepspeed" / "model" / f"step-{steps:07d}").is_dir()
    _assert_finished_once(tmp_path, "zero2", steps)
