#!/usr/bin/env bash
# Issue 5's experiment: adversarial vs supervised at label drop 0.5 on the synthetic corpus, equal steps, 3 seeds
# each, then an alpha sweep (Fig. 7). Every run lands in MLflow experiment 'adversarial-synthetic'; the summary
# (mean +- std over seeds) is read back from MLflow by ssau.bench.compare.
#   bash launch/experiments/adversarial-synthetic.sh        (after `ssau demo --out demo`)
set -euo pipefail
SSAU=${SSAU:-.venv/bin/ssau}
R=launch/recipes/adversarial-synthetic.yaml
for seed in 0 1 2; do
  $SSAU train --config $R method.name=supervised train.seed=$seed train.name=supervised-s$seed
  $SSAU train --config $R train.seed=$seed train.name=adversarial-a0.01-s$seed
done
for alpha in 0.001 0.1 0.3; do
  $SSAU train --config $R method.alpha=$alpha train.seed=0 train.name=adversarial-a$alpha-s0
done
.venv/bin/python -m ssau.bench.compare --uri sqlite:///mlflow.db --experiment adversarial-synthetic
