#!/usr/bin/env bash
# Issue 15's AU experiment: large margin (Racoviteanu et al., Eq. 3) against the centre loss (Eq. 1) and the
# baselines, at equal steps, 3 paired seeds, label drop 0.5, the demo's unlabelled faces beside the labelled ones:
#   supervised             the baseline (BCE, labelled images only)
#   large_margin-mse       the same network as large margin (embedding layer, MSE on the AU outputs, Sec. 3.3)
#                          with lambda_4 = 0: what L_M adds is read against this one
#   large_margin-center    + the centre loss (Eq. 1) on raw embeddings, pseudo-emotion classes
#   large_margin           + the large-margin loss (Eq. 3) on normalised embeddings
# ResNet-18 from scratch, 64 px aligned faces, m1 = m2 = 16 per step, 300 steps, no warm start (the embedding
# layer would start fresh while the supervised head did not), Adam 1e-3. Hyper-parameters fixed in advance: the
# automatic balance (lambda_3 L_S = 0.8 lambda_4 L_M on absolute values over the first 20 steps; no longer the
# default, and measured with lambda_4 = 0 since issue 22), centroids as a
# running mean at rate 0.5, EMFACS prototypes at half coverage. Sized for a 2-core machine: a large-margin step
# reads twice the images of a supervised one; one seed took about 7 minutes here (74-117 s a cell).
#   ssau demo --out demo      (renders and shards the corpus once, unlabelled faces included), then:
#   bash launch/experiments/compare-large-margin.sh
set -euo pipefail
SSAU=${SSAU:-.venv/bin/ssau}
SEEDS=${SEEDS:-0-2}
$SSAU compare --config launch/recipes/compare-synthetic.yaml --name large-margin \
  --methods supervised,large_margin-mse,large_margin-center,large_margin --seeds "$SEEDS" --label-drop 0.5 \
  train.steps=300 'data.unlabelled=[demo/shards/folder]' data.m2=16 \
  large_margin-mse.balance=fixed large_margin-mse.lambda_m=0 large_margin-center.margin=center \
  large_margin-center.balance=auto large_margin.balance=auto "$@"
