"""MLflow tracking, from rank 0 only (metrics are reduced across ranks before they get here).

The default store is ``sqlite:///mlflow.db`` in the working directory; rank 0 creates it (schema migration) before
any other rank goes on, because several processes migrating a brand-new SQLite store at once fail. An HTTP
tracking server is checked at start with a short timeout, so an unreachable server fails the run at once with one
line, never hours later. Every method logs the same metric names, so the MLflow UI compares them side by side.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from ssau.config import ConfigError, TrackingConfig


def check_uri(uri: str) -> None:
    """Fail fast, with one line, on a tracking URI that cannot work."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as r:
                if r.status != 200:
                    raise ConfigError(f"tracking.uri: {uri} answered {r.status} on /health")
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ConfigError(f"tracking.uri: MLflow server {uri} is unreachable ({reason})") from None
    elif uri.startswith("sqlite:///"):
        parent = Path(uri[len("sqlite:///"):]).resolve().parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise ConfigError(f"tracking.uri: {parent} is not a writable directory for the SQLite store")
    elif not uri.startswith(("databricks", "postgresql", "mysql", "mssql")):
        raise ConfigError(f"tracking.uri: {uri!r} is not an http(s):// server or a database URI "
                          "(the ./mlruns file store is refused by MLflow 3)")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Tracker:
    """A thin wrapper over MlflowClient so that nothing global (mlflow.active_run) leaks between runs."""

    def __init__(self, cfg: TrackingConfig):
        import mlflow
        from mlflow.tracking import MlflowClient

        check_uri(cfg.uri)
        self.client = MlflowClient(tracking_uri=cfg.uri)
        exp = self.client.get_experiment_by_name(cfg.experiment)  # creates/migrates the store
        if exp is None:
            # With a SQLite store MLflow's default artifact root is ./mlruns under whatever directory the command
            # runs in; keep artifacts beside the database instead (a server chooses its own location).
            location = None
            if cfg.uri.startswith("sqlite:///"):
                location = (Path(cfg.uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
            self.experiment_id = self.client.create_experiment(cfg.experiment, artifact_location=location)
        else:
            self.experiment_id = exp.experiment_id
        self.uri = cfg.uri
        self.run_id: str | None = None
        self._mlflow = mlflow

    def start(self, name: str, tags: dict, parent_run_id: str = "") -> str:
        tags = {k: str(v) for k, v in tags.items()}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        self.run_id = run.info.run_id
        return self.run_id

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # a batch request carries at most 100 params
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        import time

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and np.isfinite(v)]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id:
            self.client.set_terminated(self.run_id, status)


def eval_metric_dict(m: dict, prefix: str = "val") -> dict[str, float]:
    out = {f"{prefix}/f1_mean": m["f1_mean"], f"{prefix}/auc_mean": m["auc_mean"],
           f"{prefix}/acc_mean": m["acc_mean"], f"{prefix}/marginal_gap": m["marginal_gap"],
           f"{prefix}/conditional_gap": m["conditional_gap"]}
    for name, v in m["per_au"].items():
        out[f"{prefix}/f1/{name}"] = v["f1"]
        out[f"{prefix}/auc/{name}"] = v["auc"]
    return out


def eval_artifacts(m: dict, aus_names: list[str], folder: Path) -> list[Path]:
    """per_au.csv, f1_bar.png and conditional_gap.png for one evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    csv = folder / "per_au.csv"
    rows = ["au,f1,auc,acc,n,positives"] + [f"{k},{v['f1']:.6f},{v['auc']:.6f},{v['acc']:.6f},{v['n']},{v['positives']}"
                                            for k, v in m["per_au"].items()]
    csv.write_text("\n".join(rows) + "\n")
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(aus_names)), 3))
    ax.bar(aus_names, [100 * m["per_au"][a]["f1"] for a in aus_names], color="#4477aa")
    ax.axhline(100 * m["f1_mean"], color="k", lw=1, ls="--", label=f"mean {100 * m['f1_mean']:.1f}")
    ax.set_ylabel("F1 (%)")
    ax.set_ylim(0, 100)
    ax.legend(loc="upper right")
    ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    bar = folder / "f1_bar.png"
    fig.savefig(bar, dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 4.2))
    im = ax.imshow(m["conditional_gaps"], vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(aus_names)), aus_names, rotation=90)
    ax.set_yticks(range(len(aus_names)), aus_names)
    ax.set_xlabel("given AU j")
    ax.set_ylabel("AU i")
    ax.set_title("|P_pred(i|j) - P_gt(i|j)|")
    fig.colorbar(im)
    fig.tight_layout()
    heat = folder / "conditional_gap.png"
    fig.savefig(heat, dpi=100)
    plt.close(fig)
    return [csv, bar, heat]


def table_artifacts(name: str, table: dict[str, list], folder: Path) -> list[Path]:
    """<name>.csv of a method's report table and, when it has a ``weight`` column, <name>.png: its histogram, one
    layer per value of the ``group`` column (MAL: expression-sample weights per expression class)."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    cols = list(table)
    path = folder / f"{name}.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerows(zip(*(table[c] for c in cols)))
    out = [path]
    if "weight" in table and table["weight"]:
        weights = np.asarray(table["weight"], dtype=float)
        groups = np.asarray(table.get("group", ["all"] * len(weights)))
        names = sorted(set(groups.tolist()))
        fig, ax = plt.subplots(figsize=(6, 3.4))
        bins = np.linspace(weights.min(), weights.max() + 1e-9, 31)
        ax.hist([weights[groups == g] for g in names], bins=bins, stacked=True, label=names)
        ax.set_xlabel(f"sample weight (mean {weights.mean():.3f})")
        ax.set_ylabel("samples")
        ax.set_title(name.replace("_", " "))
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        png = folder / f"{name}.png"
        fig.savefig(png, dpi=100)
        plt.close(fig)
        out.append(png)
    return out


def temp_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="ssau-artifacts-"))
