#!/usr/bin/env bash
# Issue 15's expression experiment: the FER variant of large margin (Racoviteanu et al., Sec. 3.1 and Table 1) on
# the demo's RAF-DB-layout expression corpus (`ssau demo` renders 500 expression images, 1 in 5 in the test split;
# `ssau synth --expression-images 1000` renders more) with its unlabelled faces, against the
# same network trained on softmax + CE alone (lambda_4 = 0), 3 paired seeds, equal steps. Scored on the corpus's
# test split: accuracy and mean class accuracy (val/expr_acc, val/expr_mean_class_acc). ssau compare reads AU F1,
# so this loops `ssau train` and prints mean +- std and the paired differences from the MLflow store.
# ResNet-18 from scratch, 64 px, 16 expression + 16 unlabelled + 8 labelled-stream faces per step (the labelled AU
# images count as further unlabelled faces), 300 steps, Adam 1e-3, automatic balance; about 2.5 minutes a run here.
#   ssau demo --out demo      then:   bash launch/experiments/fer-large-margin.sh
set -euo pipefail
SSAU=${SSAU:-.venv/bin/ssau}
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-0 1 2}
for seed in $SEEDS; do
  for variant in ce lm; do
    lam=$([ "$variant" = ce ] && echo "method.balance=fixed method.lambda_m=0" || echo "method.balance=auto")
    $SSAU train --config launch/recipes/compare-synthetic.yaml method.name=large_margin method.task=expression \
      $lam train.seed="$seed" train.name="fer-$variant-s$seed" train.resume=auto \
      tracking.experiment=fer-large-margin tracking.run_name="fer-$variant-s$seed" \
      'data.expression=[demo/shards/rafdb]' 'data.unlabelled=[demo/shards/folder]' \
      data.m_expr=16 data.m2=16 data.m1=8 "$@"
  done
done
$PY - "$(grep -o 'sqlite:[^"]*' launch/recipes/compare-synthetic.yaml)" $SEEDS <<'PY'
import statistics, sys
from mlflow.tracking import MlflowClient
c = MlflowClient(tracking_uri=sys.argv[1])
seeds = [int(x) for x in sys.argv[2:]]
runs = c.search_runs([c.get_experiment_by_name("fer-large-margin").experiment_id], "attributes.status = 'FINISHED'")
got = {r.info.run_name: r.data.metrics for r in runs}
for key in ("val/expr_acc", "val/expr_mean_class_acc"):
    pairs = [(got[f"fer-ce-s{s}"][key], got[f"fer-lm-s{s}"][key]) for s in seeds
             if f"fer-ce-s{s}" in got and f"fer-lm-s{s}" in got]
    if not pairs:
        continue
    ce, lm = zip(*pairs)
    d = [b - a for a, b in pairs]
    sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else float("nan")
    print(f"{key}: ce {100 * statistics.fmean(ce):.1f} +- {100 * sd(ce):.1f}, lm {100 * statistics.fmean(lm):.1f} "
          f"+- {100 * sd(lm):.1f}, paired lm - ce {100 * statistics.fmean(d):+.1f} +- "
          f"{100 * sd(d) / len(d) ** 0.5:.1f} (SE, {len(d)} seeds)")
PY
