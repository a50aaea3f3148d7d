#!/usr/bin/env bash
# Issue 12's adversarial experiment: supervised vs adversarial (the paper's form) vs two remedies for a
# discriminator that wins by how binary its inputs are, label drop 0.5, warm start from a 500-step supervised run
# per seed, then 300 steps each (800 in all), paired seeds, hyper-parameters fixed here in advance (alpha 0.01, the
# paper's BP4D value; remedy strengths 0.1). Resumable: run it again and finished cells are skipped; raise --seeds
# to add seeds to the same parent run.
#   ssau demo --out demo      (renders and shards the corpus once), then: bash launch/experiments/compare-adversarial.sh
set -euo pipefail
SSAU=${SSAU:-.venv/bin/ssau}
SEEDS=${SEEDS:-0-4}
$SSAU compare --config launch/recipes/compare-synthetic.yaml --name adversarial-remedies \
  --methods supervised,adversarial,adversarial-ns,adversarial-st --seeds "$SEEDS" --label-drop 0.5 \
  --warm-start --warm-steps 500 train.steps=300 \
  adversarial.alpha=0.01 adversarial-ns.d_noise=0.1 adversarial-ns.real_smooth=0.1 \
  adversarial-st.fake=straight_through "$@"
