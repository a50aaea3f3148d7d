#!/usr/bin/env bash
# Issue 12's MAL experiment: supervised vs mtl (fixed expression weight rho = 1) vs mal (Li & Shan, psi on plain
# gradient descent as Eq. 7 writes it), label drop 0.5, warm start from a 500-step supervised run per seed, then
# 300 steps each (800 in all), 3 paired seeds, hyper-parameters fixed here in advance (MAL's paper defaults: inner
# alpha = beta = 1e-3, normalise: sum). Every method holds out the same 2 % AU validation set (MAL's meta-test
# images; the baselines simply do not train on them), so all three train on the same AU images. The expression
# corpus is a RAF-DB-layout folder (ssau synth --expression-images; 20 % ambiguous), given as data.expression=[...].
# Sized for a 2-core machine: MAL's step costs about 9 supervised steps, so one seed is about 17 minutes.
#   ssau demo --out demo      (renders and shards the corpus once, rafdb included), then:
#   bash launch/experiments/compare-mal.sh
#   python -m ssau.bench.mal_weights runs/compare-synthetic/mal-vs-mtl-mal-s0-d0.5-f1 --ambiguous demo/corpus/rafdb/ambiguous.txt
set -euo pipefail
SSAU=${SSAU:-.venv/bin/ssau}
SEEDS=${SEEDS:-0-2}
$SSAU compare --config launch/recipes/compare-synthetic.yaml --name mal-vs-mtl \
  --methods supervised,mtl,mal --seeds "$SEEDS" --label-drop 0.5 \
  --warm-start --warm-steps 500 train.steps=300 \
  'data.expression=[demo/shards/rafdb]' data.m_expr=16 data.validation=0.02 data.val_batch=32 "$@"
