"""What the MLflow UI shows of a run: its name, tags and source, the experimental choices as params (the rest of
the config is in config.yaml), and the evaluation metrics' names."""

from __future__ import annotations

import subprocess
from pathlib import Path

from ssau.data.sources import read_dataset

# Settings that say where things are or how a run is carried out, not what is compared: in config.yaml only.
SETUP_PARAMS = ("data.labelled", "data.labelled_weights", "data.unlabelled_weights", "data.expression", "data.workers",
                "data.shuffle_buffer", "data.eval_batch", "data.source_timeout", "data.eval_incomplete",
                "train.log_every", "train.eval_every", "train.checkpoint_every", "train.out", "train.name",
                "train.resume", "train.device", "train.channels_last", "train.rank_report", "train.progress",
                "train.keep_checkpoints", "train.init_from", "train.collapse_share", "train.collapse_window", "tracking.")


# Settings that mean nothing unless the method reads that data (supervised ignores m2), or the optimiser is that one.
UNUSED_UNLESS = {"data.m2": "unlabelled", "data.unlabelled": "unlabelled", "data.m_expr": "expression",
                 "data.validation": "validation", "data.val_batch": "validation"}


def _is_setup(key: str) -> bool:
    """A key of SETUP_PARAMS, or under one of its sections (``tracking.``): whole keys, so that data.labelled does
    not take data.labelled_subjects with it."""
    return key in SETUP_PARAMS or any(key.startswith(p) for p in SETUP_PARAMS if p.endswith("."))


def experiment_params(flat: dict, uses: tuple[str, ...]) -> dict:
    """The experimental choices of a flattened config, the params MLflow's compare view plots: no paths, workers
    or logging cadence, nothing the method does not read, momentum only for SGD and betas only for Adam(W)."""
    out = {}
    # the AU validation split also decides what a run is scored on, or at which thresholds
    scored_on_val = "val" in (flat.get("train.evaluate_on"), flat.get("train.thresholds"))
    for k, v in flat.items():
        if _is_setup(k) or (k in UNUSED_UNLESS and UNUSED_UNLESS[k] not in uses
                                          and not (k == "data.validation" and scored_on_val)):
            continue
        if (k == "optim.momentum" and flat.get("optim.name") != "sgd") or \
                (k == "optim.betas" and flat.get("optim.name") == "sgd") or \
                (k == "data.label_drop_mode" and not flat.get("data.label_drop")):
            continue
        out[k] = v
    out["train.warm_start"] = bool(flat.get("train.init_from"))
    return out


def run_name(cfg) -> str:
    """What tells runs apart: method, backbone, label drop, seed, fold (tracking.run_name overrides)."""
    d = cfg.data
    return (f"{cfg.method_name}-{cfg.model.backbone}-drop{d.label_drop:g}-s{cfg.train.seed}-"
            + (f"fold{d.fold}" if d.fold else "all"))


def run_tags(cfg, world: int, run_dir: Path) -> dict:
    """A fresh training run's tags: what it trained on and how, MLflow's source tags, and tracking.tags."""
    d, t = cfg.data, cfg.train
    return {"method": cfg.method_name, "backbone": cfg.model.backbone, "fold": d.fold, "label_drop": d.label_drop,
            "seed": t.seed, "corpus": ",".join(read_dataset(x)["corpus"] for x in d.labelled), "world_size": world,
            "deepspeed": Path(t.deepspeed).name if t.deepspeed else "off", "run_dir": str(Path(run_dir).resolve()),
            "warm_start": t.init_from or "none", "evaluated_on": t.evaluate_on, **source_tags("ssau train"),
            **cfg.tracking.tags}


def source_tags(command: str) -> dict:
    """MLflow's own source tags (the UI's Source and User columns, the commit link)."""
    import getpass

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return {"mlflow.source.name": command, "mlflow.source.type": "LOCAL", "mlflow.source.git.commit": git_commit(),
            "mlflow.user": user}


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def eval_metric_dict(m: dict, prefix: str = "val") -> dict[str, float]:
    """The MLflow metrics of one evaluation (ssau/metrics.py defines them): means, gaps with their pair counts, and
    per AU the F1, AUC and both marginals (so paper 000 Fig. 5 can be redrawn from the store)."""
    out = {f"{prefix}/{k}": m[k] for k in ("f1_mean", "auc_mean", "acc_mean", "marginal_gap", "conditional_gap",
                                           "conditional_pairs", "conditional_undefined_pred",
                                           "conditional_undefined_true") if k in m}
    if "expression" in m:  # the expression task, named in parallel: val/expr_acc, val/expr_acc/<class>
        e = m["expression"]
        out |= {f"{prefix}/expr_acc": e["acc"], f"{prefix}/expr_mean_class_acc": e["mean_class_acc"]}
        out |= {f"{prefix}/expr_acc/{name}": v["acc"] for name, v in e["per_class"].items()}
        out |= {f"{prefix}/expr_samples_{k.removeprefix('eval_')}": e[k] for k in ("eval_scored", "eval_expected",
                                                                                   "eval_skipped") if k in e}
    for name, v in m.get("per_au", {}).items():
        for k in ("f1", "auc", "p_pred", "p_true"):
            out[f"{prefix}/{k}/{name}"] = v[k]
    if "views" in m:  # a multi-view method (MLCR): each view, the views' mean F1 (its paper's headline), agreement
        out[f"{prefix}/f1_views"] = m["f1_views"]
        for view, vm in m["views"].items():
            for k in ("f1_mean", "auc_mean", "acc_mean"):
                out[f"{prefix}/{view}/{k}"] = vm[k]
            for name, v in vm["per_au"].items():
                out[f"{prefix}/{view}/f1/{name}"] = v["f1"]
        for k in ("inconsistency_mean", "inconsistency_any"):
            if k in m:
                out[f"{prefix}/{k}"] = m[k]
        for name, v in m.get("inconsistency", {}).items():
            out[f"{prefix}/inconsistency/{name}"] = v
    if "valthr" in m:  # train.thresholds=val: the fold at per-AU thresholds chosen on the AU validation split
        v = m["valthr"]
        out |= {f"{prefix}/f1_valthr_mean": v["f1_mean"], f"{prefix}/acc_valthr_mean": v["acc_mean"],
                f"{prefix}/marginal_gap_valthr": v["marginal_gap"], f"{prefix}/threshold_samples": v["scored"]}
        for name, a in v["per_au"].items():
            out[f"{prefix}/f1_valthr/{name}"], out[f"{prefix}/threshold/{name}"] = a["f1"], v["thresholds"][name]
    for key in ("eval_scored", "eval_expected", "eval_skipped"):  # samples scored vs what the index lists
        if key in m:
            out[f"{prefix}/samples_{key.removeprefix('eval_')}"] = m[key]
    return out

