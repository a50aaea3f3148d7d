"""Read an experiment's runs back from MLflow and print mean +- std over seeds per configuration:
`python -m ssau.bench.compare --uri sqlite:///mlflow.db --experiment NAME`.

Runs are grouped by method and the method's own params (everything under ``method.``) except the seed."""

from __future__ import annotations

import argparse
import statistics
import sys

METRICS = ("val/f1_mean", "val/auc_mean", "val/marginal_gap", "val/conditional_gap")


def main(argv: list[str] | None = None) -> int:
    from mlflow.tracking import MlflowClient

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--uri", default="sqlite:///mlflow.db")
    ap.add_argument("--experiment", required=True)
    args = ap.parse_args(argv)
    client = MlflowClient(tracking_uri=args.uri)
    exp = client.get_experiment_by_name(args.experiment)
    if exp is None:
        print(f"no experiment {args.experiment!r} in {args.uri}", file=sys.stderr)
        return 2
    groups: dict[str, list] = {}
    for run in client.search_runs([exp.experiment_id], max_results=10000):
        if run.info.status != "FINISHED" or "val/f1_mean" not in run.data.metrics:
            continue
        p = run.data.params
        key = ", ".join(f"{k.removeprefix('method.')}={v}" for k, v in sorted(p.items()) if k.startswith("method."))
        key += f", label_drop={p.get('data.label_drop')}, steps={p.get('train.steps')}"
        groups.setdefault(key, []).append(run)
    width = max(map(len, groups), default=13) + 2
    print(f"{'configuration':<{width}}{'n':>3}" + "".join(f"{m.split('/')[-1]:>22}" for m in METRICS))
    for key, runs in sorted(groups.items()):
        cells = []
        for m in METRICS:  # a gap is not logged when it is undefined (no positive prediction for some AU)
            xs = [r.data.metrics[m] for r in runs if m in r.data.metrics]
            sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
            cells.append(f"{statistics.fmean(xs):>9.4f} +- {sd:.4f}" + (f" ({len(xs)})" if len(xs) < len(runs) else "    ")
                         if xs else "n/a")
        print(f"{key:<{width}}{len(runs):>3}" + "".join(f"{c:>22}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
