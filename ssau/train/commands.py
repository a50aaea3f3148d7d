"""What `ssau train`, `ssau eval`, `ssau cv` and `ssau demo` do (the CLI only parses)."""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path

from ssau.config import TrainConfig
from ssau.dist.ranks import init_runtime
from ssau.errors import ConfigError
from ssau.methods.registry import scores_au
from ssau.metrics import format_expression_table, format_table, sample_std
from ssau.predict.model import MODEL_FILE, is_uri, model_file, read_model
from ssau.tracking.artifacts import cv_artifacts
from ssau.tracking.journal import JOURNAL
from ssau.tracking.naming import git_commit
from ssau.tracking.store import relocate
from ssau.tracking.tracker import Tracker, check_uri
from ssau.tracking.ui import serve
from ssau.train.evaluate import evaluate_method
from ssau.train.rundir import claim
from ssau.train.setup import load_run_config
from ssau.train.trainer import Trainer


def ssau_command() -> str:
    """How this process was started, as a command that works when typed (README command 1 never activates the
    venv, so a bare `ssau` or `mlflow` is not on PATH)."""
    import shlex
    import sys

    argv0 = Path(sys.argv[0])
    if argv0.name == "ssau" and argv0.is_file():
        return shlex.quote(str(argv0))
    return f"{shlex.quote(sys.executable)} -m ssau"


def ui(uri: str, host: str, port: int) -> int:
    """`ssau ui`: MLflow's UI on the store ssau writes, from this environment's mlflow (no activated venv needed); its
    processes stop when `ssau ui` stops (ssau/tracking/ui.py)."""
    import sys

    check_uri(uri, reach=False)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise ConfigError(f"--uri {uri}: no store there yet (`ssau demo` or `ssau train` writes sqlite:///mlflow.db "
                          f"in the directory they run in)")
    if line := relocate(uri):  # a copied store lists the artifacts beside it (ssau/tracking/store.py)
        print(line, file=sys.stderr)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    # workflowType: the UI's classic model-training view (its GenAI view hides runs' metrics and artifacts)
    print(f"MLflow UI on http://{host}:{port}/#/experiments?workflowType=machine_learning for {uri} "
          f"(Ctrl-C stops it)", flush=True)
    return serve(cmd)


def train(config: str | None, overrides: list[str]) -> dict:
    cfg = load_run_config(config, overrides)
    trainer = Trainer(cfg)
    metrics = trainer.fit()
    if trainer.rt.main and metrics:
        if "per_au" in metrics:
            print(format_table(metrics))
        if "expression" in metrics:
            print(format_expression_table(metrics["expression"]))
        print(f"run directory: {trainer.run_dir}")
    return metrics


def evaluate(checkpoint: str, shards: list[str], folds: list[int] | None, batch: int, workers: int,
             incomplete: str = "fail") -> dict:
    """`ssau eval`: the model ``checkpoint`` names (a run directory, its model.pt or a checkpoints/step-N.pt, an
    MLflow model URI) on ``folds`` of ``shards``; no folds: every sample of them, not the run's held-out fold."""
    import tempfile

    if batch < 1 or workers < 0:
        raise ConfigError(f"--batch {batch} / --workers {workers}: need a batch of at least 1 and 0 or more workers")
    path = Path(checkpoint)
    if not is_uri(checkpoint) and path.is_dir() and not (path / MODEL_FILE).is_file():
        steps = sorted((path / "checkpoints").glob("step-*.pt"))
        hint = f"; its last checkpoint is {steps[-1]}" if steps else ""
        raise ConfigError(f"--checkpoint {path}: a directory without {MODEL_FILE} (a run directory has one once it "
                          f"finished{hint})")
    if not is_uri(checkpoint) and not path.exists():
        raise ConfigError(f"--checkpoint {path} does not exist (a run directory, its model.pt or "
                          f"checkpoints/step-N.pt, or an MLflow model URI)")
    with tempfile.TemporaryDirectory(prefix="ssau-model-") as scratch:  # a downloaded model is read, then removed
        path = model_file(checkpoint, Path(scratch))  # a run directory's model.pt, a file, or a download
        method, cfg, aus, _ = read_model(path, {"eval_batch": batch, "workers": workers,
                                                "eval_incomplete": incomplete})
    rt = init_runtime(TrainConfig(device="auto", precision="fp32"))
    method.to(rt.device)
    # No --folds: every fold of the shards. The model's data.fold is its training run's held-out fold, which
    # evaluate_method scores when given no folds; fold 0 (no held-out fold) makes it score every sample.
    data = dataclasses.replace(cfg.data, fold=0)
    metrics = evaluate_method(method, data, aus, rt, dirs=tuple(shards), folds=tuple(folds) if folds else None)
    if rt.main:
        print(format_table(metrics))
    return metrics


def cross_validate(config: str | None, overrides: list[str]) -> dict:
    """The folds in turn, each a child MLflow run of one parent run holding the across-fold means and stds."""
    cfg = load_run_config(config, overrides)
    if not scores_au(cfg.method):
        raise ConfigError(f"method {cfg.method_name}: this setting is scored on expressions, not AU folds; "
                          f"`ssau cv` cross-validates AU recognisers (train it with `ssau train`)")
    rt = init_runtime(cfg.train)
    lock, claimed = None, None  # the lock lives as long as this call (RunLock drops it when collected)
    if rt.main:  # the parent's directory is owned like a run's: a second `ssau cv` of this name touches nothing
        out = Path(cfg.train.out)
        run_dir, lock, error = claim(out, cfg.train.name or f"{cfg.method_name}-cv-{time.strftime('%Y%m%d-%H%M%S')}",
                                     not cfg.train.name)
        claimed = ("" if error else str(run_dir.relative_to(out)), error)
    base, error = rt.broadcast_object(claimed)
    if error:
        raise ConfigError(error)
    parent = None
    if rt.main and cfg.tracking.enabled:
        parent = Tracker(cfg.tracking, Path(cfg.train.out) / base / JOURNAL)  # a local copy, for `ssau upload`
        parent.start(cfg.tracking.run_name or base, {"method": cfg.method_name, "cv_folds": cfg.data.folds,
                                                     "label_drop": cfg.data.label_drop, "git_commit": git_commit(),
                                                     "world_size": rt.world})
    parent_id = rt.broadcast_object(parent.run_id if parent else "")
    folds = []
    for k in range(1, cfg.data.folds + 1):
        fold_cfg = dataclasses.replace(
            cfg, data=dataclasses.replace(cfg.data, fold=k), train=dataclasses.replace(cfg.train, name=f"{base}-fold{k}"),
            tracking=dataclasses.replace(cfg.tracking, parent_run_id=parent_id, run_name=f"{base}-fold{k}"))
        folds.append(Trainer(fold_cfg, rt).fit())
    if not rt.main:
        return {}
    summary = summarize_folds(folds)
    if parent:
        parent.log_metrics(summary, cfg.train.steps)
        for path in cv_artifacts(folds, Path(cfg.train.out) / base / "cv"):  # at the root: the compare view lists it
            parent.log_artifact(path)
        parent.log_tags({"mlflow.loggedArtifacts": json.dumps([{"path": "per_au.json", "type": "table"}])})
        parent.end()
    for k, m in enumerate(folds, 1):
        print(f"fold {k}: F1 {100 * m['f1_mean']:.1f}  AUC {100 * m['auc_mean']:.1f}  Acc {100 * m['acc_mean']:.1f}")
    print(f"{'AU':<6}{'F1 mean':>9}{'F1 std (ddof 1)':>17}")
    for name in folds[0]["per_au"]:
        print(f"{name:<6}{100 * summary[f'cv/f1/{name}']:9.1f}{100 * summary[f'cv/f1_std/{name}']:17.1f}")
    print(f"{'mean':<6}{100 * summary['cv/f1_mean']:9.1f}{100 * summary['cv/f1_mean_std']:17.1f}")
    return summary


def summarize_folds(folds: list[dict]) -> dict[str, float]:
    """Across-fold means and sample stds (ddof 1, ``ssau.metrics.sample_std``: the std of every ssau report)."""
    std = sample_std
    out = {}
    for key in ("f1_mean", "auc_mean", "acc_mean", "marginal_gap", "conditional_gap"):
        xs = [m[key] for m in folds]
        out[f"cv/{key}"], out[f"cv/{key}_std"] = statistics.fmean(xs), std(xs)
    for name in folds[0]["per_au"]:
        xs = [m["per_au"][name]["f1"] for m in folds]
        out[f"cv/f1/{name}"], out[f"cv/f1_std/{name}"] = statistics.fmean(xs), std(xs)
    return out


