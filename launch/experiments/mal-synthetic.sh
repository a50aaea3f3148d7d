#!/usr/bin/env bash
# Issue 6's experiment: mal vs mtl (fixed expression weight rho = 1) vs supervised on the synthetic corpus, equal
# steps, 3 seeds each. Every run lands in MLflow experiment 'mal-synthetic'; the summary (mean +- std over seeds)
# is read back from MLflow by ssau.bench.compare, and MAL's expression-sample weights (clean vs ambiguous images)
# by ssau.bench.mal_weights.
#   bash launch/experiments/mal-synthetic.sh        (after `ssau demo --out demo`)
set -euo pipefail
SSAU=${SSAU:-.venv/bin/ssau}
PY=${PY:-.venv/bin/python}
R=launch/recipes/mal-synthetic.yaml
for seed in 0 1 2; do
  $SSAU train --config $R train.seed=$seed train.name=mal-s$seed
  $SSAU train --config $R method.name=mtl data.validation=0 train.seed=$seed train.name=mtl-s$seed
  $SSAU train --config $R method.name=supervised data.validation=0 train.seed=$seed train.name=supervised-s$seed
done
# The other reading of Sec. 4.1.2 (mean weights sum to one: a B times larger inner step), one seed.
$SSAU train --config $R method.normalise=mean train.seed=0 train.name=mal-mean-s0
$PY -m ssau.bench.compare --uri sqlite:///mlflow.db --experiment mal-synthetic
for run in mal-s0 mal-s1 mal-s2 mal-mean-s0; do
  $PY -m ssau.bench.mal_weights runs/mal-synthetic/$run --ambiguous demo/corpus/rafdb/ambiguous.txt
done
