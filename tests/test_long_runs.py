"""Long runs: crafted checkpoints execute nothing, non-finite values never reach a file, a killed save leaves nothing
behind, a full disk keeps the previous checkpoint, bad settings and directories give one line (issue 10, items 1,
5, 8 and 9). Each test builds the broken thing at test time and asserts what survives."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from corpora import shard_bp4d
from helpers import error_line, tiny_train

from ssau.checkpoints import safe_load
from ssau.cli import main
from ssau.dist.ranks import Runtime

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(corpora) -> Path:
    return corpora.bp4d(shard_size=4)


# ---------------------------------------------------------------------------------------------------- item 1
class _Payload:
    """Unpickling this runs a shell command: what a crafted checkpoint does under weights_only=False."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _crafted(tmp: Path, shaped_like_checkpoint: bool = True) -> tuple[Path, Path]:
    marker = tmp / f"pwned-{uuid.uuid4().hex[:6]}"
    payload = _Payload(marker)
    obj = ({"method": {"x": payload}, "config": {}, "aus": [1], "step": 1, "starts": 0, "rng": [], "optimizers": {},
            "schedulers": {}, "run_id": "", "skipped_updates": 0} if shaped_like_checkpoint else {"weight": payload})
    path = tmp / "evil.pt"
    torch.save(obj, path)
    torch.load(path, weights_only=False)  # the control: the payload really runs when unpickled
    assert marker.exists()
    marker.unlink()
    return path, marker


@pytest.mark.parametrize("path", ["eval", "resume", "pretrained", "deepspeed"])
def test_a_pickled_checkpoint_executes_nothing_on_any_load_path(shards, tmp_path, capsys, path):
    evil, marker = _crafted(tmp_path, shaped_like_checkpoint=path != "pretrained")
    if path == "eval":
        rc = main(["eval", "--checkpoint", str(evil), "--shards", str(shards), "--workers", "0"])
    elif path == "resume":
        rc = main(tiny_train(shards, tmp_path, f"train.resume={evil}", "tracking.enabled=false"))
    elif path == "pretrained":
        rc = main(tiny_train(shards, tmp_path, f"model.pretrained={evil}", "tracking.enabled=false"))
    else:  # DeepSpeed's own loader is replaced by the weights-only one
        from ssau.checkpoints import CheckpointError
        from ssau.dist.deepspeed import _deepspeed_safe_load

        with pytest.raises(CheckpointError, match="refused"):
            _deepspeed_safe_load(str(evil))
        rc = 2
    assert not marker.exists(), "the crafted checkpoint ran its command"
    if path != "deepspeed":
        assert rc == 2
        assert "refused" in error_line(capsys)


def test_training_checkpoints_and_models_load_weights_only(shards, tmp_path):
    assert main(tiny_train(shards, tmp_path, "train.name=w", "train.checkpoint_every=2", "tracking.enabled=false")) == 0
    run = tmp_path / "runs" / "w"
    ckpt = torch.load(run / "checkpoints" / "step-0000003.pt", weights_only=True)  # raises if anything else is in it
    assert ckpt["step"] == 3 and set(ckpt["rng"][0]) == {"python", "numpy", "torch"}
    torch.load(run / "model.pt", weights_only=True)
    # The RNG state round-trips: set, draw, set again, draw the same.
    import random

    import numpy as np

    from ssau.dist.rng import rng_state, set_rng_state

    state = rng_state()
    a = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(safe_load_roundtrip(state, tmp_path))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == a


def safe_load_roundtrip(obj, tmp: Path):
    torch.save(obj, tmp / "rng.pt")
    return safe_load(tmp / "rng.pt")


# ---------------------------------------------------------------------------------------------------- item 5
@pytest.mark.parametrize("override,message", [
    ("optim.lr=inf", "optim.lr: expected a finite number"),
    ("optim.lr=nan", "optim.lr: expected a finite number"),
    ("optim.lr=1e39", "optim.lr: 1e+39 is outside 0..10"),
    ("optim.lr=1e400", "optim.lr: expected a finite number"),  # overflows to inf when parsed
    ("optim.lr=50", "optim.lr: 50 is outside 0..10"),
    ("optim.weight_decay=3", "optim.weight_decay: 3 is outside 0..1"),
    ("method.name=adversarial method.alpha=inf", "method.alpha: expected a finite number"),
    ("data.image_size=1", "data.image_size: 1 px is outside 16..1024"),
    ("optim.betas=[0.9,1.5]", "optim.betas"),
    ("train.checkpoint_every=-1", "train.checkpoint_every: must be 0 or more"),
])
def test_non_finite_and_absurd_settings_are_refused_at_parse_time(shards, tmp_path, capsys, override, message):
    assert main(tiny_train(shards, tmp_path, *override.split())) == 2
    assert message in error_line(capsys)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_step_that_makes_parameters_non_finite_stops_the_run_and_saves_nothing_of_it(shards, tmp_path, capsys,
                                                                                      monkeypatch):
    """A finite loss and gradient norm, then an optimiser step that writes inf (what optim.lr=inf did): the run
    stops at that step with one line, the MLflow run is FAILED, and no checkpoint or model holds a non-finite value."""
    from mlflow.tracking import MlflowClient

    real_step = torch.optim.Adam.step
    calls = {"n": 0}

    def overflowing_step(self, *a, **k):
        out = real_step(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", overflowing_step)
    rc = main(tiny_train(shards, tmp_path, "train.name=inf", "train.steps=5", "train.checkpoint_every=1"))
    assert rc == 2
    line = error_line(capsys)
    assert "step 3: update 'supervised' left NaN or inf in the parameters" in line and "step-0000002.pt" in line
    ckpts = tmp_path / "runs" / "inf" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*.pt")) == ["step-0000001.pt", "step-0000002.pt"]
    for p in ckpts.glob("step-*.pt"):
        assert all(torch.isfinite(v).all() for v in safe_load(p)["method"].values() if v.is_floating_point())
    assert not (tmp_path / "runs" / "inf" / "model.pt").exists()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("ssau").experiment_id])
    assert run.info.status == "FAILED"


def test_a_non_finite_state_is_never_written(tmp_path):
    from ssau.checkpoints import CheckpointError, atomic_save

    with pytest.raises(CheckpointError, match="NaN or inf"):
        atomic_save({"method": {"w": torch.tensor([1.0, float("nan")])}}, tmp_path / "x.pt")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------- item 8
def test_leftovers_of_a_killed_save_are_removed_and_old_checkpoints_pruned(shards, tmp_path, capsys):
    args = tiny_train(shards, tmp_path, "train.name=p", "train.checkpoint_every=1", "train.keep_checkpoints=2",
                "tracking.enabled=false", "train.resume=auto")
    assert main([*args, "train.steps=4"]) == 0
    ckpts = tmp_path / "runs" / "p" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*.pt")) == ["step-0000003.pt", "step-0000004.pt"]
    # What a kill -9 during the step-5 save leaves: the temporary file, and a step file the pointer never reached.
    (ckpts / f".step-0000005.pt.tmp-{os.getpid() + 7}").write_bytes(os.urandom(1 << 20))
    (ckpts / "step-0000005.pt").write_bytes(b"half")
    assert main([*args, "train.steps=6"]) == 0
    err = capsys.readouterr().err
    assert "removed .step-0000005.pt.tmp-" in err and "resumed p at step 4" in err
    assert not list(ckpts.glob(".*tmp*"))
    assert sorted(p.name for p in ckpts.glob("step-*.pt")) == ["step-0000005.pt", "step-0000006.pt"]
    assert safe_load(ckpts / "step-0000005.pt")["step"] == 5


_SLOW_SAVE = """
import sys, time, torch
import ssau.checkpoints as c
real = torch.save
def slow(obj, f, *a, **k):
    if '0000004' in getattr(f, 'name', ''):
        f.write(b'x' * 4096); f.flush()
        print('WRITING', flush=True); time.sleep(60)
    return real(obj, f, *a, **k)
c.torch.save = slow
from ssau.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_mid_checkpoint_write_then_resume(shards, tmp_path):
    """The process is killed while it writes the step-4 checkpoint: the step-2 one stays the newest, the
    temporary file is removed on resume, and the resumed run finishes all its steps."""
    args = tiny_train(shards, tmp_path, "train.name=k", "train.checkpoint_every=2", "train.steps=6", "train.resume=auto",
                "tracking.enabled=false")
    p = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, *args], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    for line in p.stdout:
        if "WRITING" in line or time.time() > deadline:
            break
    p.kill()
    p.wait(timeout=30)
    ckpts = tmp_path / "runs" / "k" / "checkpoints"
    assert (ckpts / "last").read_text().strip() == "step-0000002.pt"
    assert list(ckpts.glob(".step-0000004.pt.tmp-*")), "the kill came before the write"
    assert main(args) == 0
    assert not list(ckpts.glob(".*tmp*"))
    assert safe_load(ckpts / "step-0000006.pt")["step"] == 6
    assert (ckpts / "last").read_text().strip() == "step-0000006.pt"


# ---------------------------------------------------------------------------------------------------- disk full
@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs: a real ENOSPC (root can mount it; CI runs as root)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_stops_with_one_line(shards, tmp_path,
                                                                                      small_disk, capsys, monkeypatch):
    from ssau.train.trainer import Trainer

    real = Trainer.save_checkpoint

    def then_fill(self):
        path = real(self)
        if self.step == 1:  # the disk fills up after the first checkpoint
            with open(small_disk / "filler", "wb", buffering=0) as f:  # unbuffered: close has nothing to flush
                try:
                    while True:
                        f.write(b"\0" * (1 << 12))
                except OSError:
                    pass
        return path

    monkeypatch.setattr(Trainer, "save_checkpoint", then_fill)
    args = tiny_train(shards, tmp_path, "train.name=full", "train.checkpoint_every=1", "tracking.enabled=false")
    args = [a if not a.startswith("train.out=") else f"train.out={small_disk}" for a in args]
    assert main(args) == 2
    line = error_line(capsys)
    assert "No space left on device" in line and "step-0000001.pt" in line
    ckpts = small_disk / "full" / "checkpoints"
    assert (ckpts / "last").read_text().strip() == "step-0000001.pt"
    assert safe_load(ckpts / "step-0000001.pt")["step"] == 1
    assert not list(ckpts.glob(".*tmp*")) and not (ckpts / "step-0000002.pt").exists()


# ---------------------------------------------------------------------------------------------------- item 9
def test_bad_directories_and_fold_settings_give_one_line(shards, tmp_path, capsys):
    assert main(tiny_train(tmp_path / "nope", tmp_path)) == 2
    assert "data.labelled: " in error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert main(tiny_train(tmp_path / "empty", tmp_path)) == 2
    assert "has no dataset.json" in error_line(capsys)
    assert main(tiny_train(shards, tmp_path, "data.fold=5", "data.folds=5")) == 2
    line = error_line(capsys)
    assert "data.folds=5: " in line and "has samples in folds [1, 2, 3]" in line
    (tmp_path / "afile").write_text("x")
    assert main([a if not a.startswith("train.out=") else f"train.out={tmp_path / 'afile' / 'runs'}"
                 for a in tiny_train(shards, tmp_path, "tracking.enabled=false")]) == 2
    assert "train.out: cannot write the run directory" in error_line(capsys)
    assert main([a if not a.startswith("train.out=") else "train.out=/proc/ssau-runs"
                 for a in tiny_train(shards, tmp_path, "tracking.enabled=false")]) == 2
    assert "train.out: cannot write the run directory" in error_line(capsys)


def test_a_run_restarted_before_its_first_checkpoint_continues_the_same_mlflow_run(shards, tmp_path, monkeypatch):
    """What an elastic restart does to a rank killed before any checkpoint: the second start finds no checkpoint,
    but the run directory's journal names the MLflow run, so it is continued rather than a second one opened."""
    from mlflow.tracking import MlflowClient

    from ssau.train.trainer import Trainer

    real = Trainer.train_step

    def dies_at_step_3(self, batches):
        if self.step == 2:
            raise KeyboardInterrupt  # stands in for the kill: the step never finishes
        return real(self, batches)

    args = tiny_train(shards, tmp_path, "train.name=early", "train.steps=4", "train.checkpoint_every=10",
                "train.resume=auto")
    monkeypatch.setattr(Trainer, "train_step", dies_at_step_3)
    assert main(args) == 130
    assert not (tmp_path / "runs" / "early" / "checkpoints" / "last").exists()
    monkeypatch.setattr(Trainer, "train_step", real)
    assert main(args) == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("ssau").experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/supervised/loss")] == [1, 2, 3, 4]


def test_a_damaged_evaluation_shard_stops_train_with_one_line_or_warns_and_logs_the_counts(tmp_path, capsys):
    """Item 4 end to end: the counts reach the command line and MLflow, not only evaluate_method's return value."""
    import json

    from mlflow.tracking import MlflowClient

    shards = shard_bp4d(tmp_path, shard_size=4)
    doc = json.loads((shards / "dataset.json").read_text())
    victim = next(s for s in doc["shards"] if s["fold"] == 1)
    tar = shards / victim["name"]
    tar.write_bytes(tar.read_bytes()[:1536])  # the first member survives, the rest of the shard is cut
    assert main(tiny_train(shards, tmp_path, "train.name=cut")) == 2
    line = error_line(capsys)
    expected = sum(s["samples"] for s in doc["shards"] if s["fold"] == 1)
    assert f"evaluation of fold 1 of {shards}" in line and f"of the {expected} samples" in line
    assert main(tiny_train(shards, tmp_path, "train.name=cut-warn", "data.eval_incomplete=warn")) == 0
    assert "ssau: warning: evaluation of fold 1" in capsys.readouterr().err
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ssau").experiment_id])
    (m,) = [r.data.metrics for r in runs if r.data.tags["run_dir"].endswith("cut-warn")]
    assert m["val/samples_expected"] == expected and m["val/samples_scored"] < expected
    assert m["val/samples_skipped"] == expected - m["val/samples_scored"]
    # ssau eval on the same damage: one line, or the table with --incomplete warn.
    model = str(tmp_path / "runs" / "cut-warn" / "model.pt")
    capsys.readouterr()
    assert main(["eval", "--checkpoint", model, "--shards", str(shards), "--folds", "1", "--workers", "0"]) == 2
    assert "scored" in error_line(capsys)
    assert main(["eval", "--checkpoint", model, "--shards", str(shards), "--folds", "1", "--workers", "0",
                 "--incomplete", "warn"]) == 0


def test_a_second_sigterm_during_a_checkpoint_write_exits_once_the_file_is_whole(tmp_path, monkeypatch, capfd):
    """A SIGTERM landing inside torch.save (under load it did, in the SIGTERM test) used to tear the write: a
    CheckpointError and exit 2. The first signal only asks the run to stop after its step; a repeat within
    ``REPEAT_S`` (a launcher passing the signal on) changes nothing; a later one exits, and waits for the file, which
    is complete and loads."""
    import os
    import signal
    import time

    import ssau.dist.stop
    from ssau.checkpoints import atomic_save
    from ssau.dist.stop import StopSignals

    monkeypatch.setattr(ssau.dist.stop, "REPEAT_S", 0.3)
    real = torch.save

    def save(obj, f):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs here, mid-write
        real(obj, f)

    monkeypatch.setattr(torch, "save", save)
    state = {"w": torch.arange(6.0)}
    with StopSignals().installed() as stop, pytest.raises(SystemExit) as exit_:
        os.kill(os.getpid(), signal.SIGTERM)  # the first: recorded, nothing raised
        os.kill(os.getpid(), signal.SIGTERM)  # at once again: the same stop, passed on
        one = Runtime(0, 1, torch.device("cpu"), False, False)
        assert stop.signum == signal.SIGTERM and stop.requested(one) == signal.SIGTERM
        time.sleep(0.4)
        atomic_save(state, tmp_path / "step.pt")
    assert exit_.value.code == 128 + signal.SIGTERM
    assert capfd.readouterr().err.count("ssau: SIGTERM: finishing this step") == 1  # once: the repeat is silent
    assert torch.equal(torch.load(tmp_path / "step.pt", weights_only=True)["w"], state["w"])
    assert [p.name for p in tmp_path.iterdir()] == ["step.pt"]  # no temporary file left
    with StopSignals().installed(), pytest.raises(SystemExit):  # outside a write the second exits at once
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.4)
        os.kill(os.getpid(), signal.SIGINT)
        raise AssertionError("not reached")
