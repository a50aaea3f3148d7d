#!/usr/bin/env bash
# Issue 22: a semi-supervised benchmark that can show an effect. The AU methods against the field's generic
# semi-supervised baselines (USB's pseudo_label, mean_teacher, fixmatch) under one protocol, at two regimes:
#   scarce  data.labelled_subjects=$K training subjects keep their labels; every frame of the other training
#           subjects and a 21,000-face pool stream as unlabelled
#   rich    every training subject labelled, label drop 0.5 (the adversarial paper's setting), the same pool
# Steps (each resumes where it stopped: run the script again; STEPS_ONLY=<list> runs some of them):
#   pool     render and shard the unlabelled pool (20,000 realistic faces, aligned to 64 px like the labelled ones)
#   plateau  one supervised run per regime scored on the AU validation split every $EVERY steps: steps to plateau
#   search   hyper-parameters chosen on the validation split (ssau compare --select-on val, 2 seeds), never fold 1
#   final    the grid on fold 1 with the chosen settings, $SEEDS paired seeds
# The report: docs/experiments/ssl-benchmark.md (attempts run so far, their exact commands, what each showed).
# Sizing for a 2-core machine (ResNet-18, 64 px, m1 = 16 + m2 = 32; python -m ssau.bench.ssl_steps): a supervised
# step 0.28 s, pseudo_label 0.46, mean_teacher 0.52, fixmatch 0.56 (on an idle machine: never run tests beside it,
# oversubscribed cores made steps 10x slower); the generic arms' final grid is about 16 minutes per seed, the whole
# script many hours.
# BACKBONE, WARM_STEPS, STEPS, SEEDS, K, ARMS, SEARCH and WARM override it. Needs `ssau demo --out demo` first (the
# labelled corpus, 41 subjects x 4 x 40 frames).
set -euo pipefail
SSAU=${SSAU:-.venv/bin/ssau}
CONFIG=${CONFIG:-launch/recipes/ssl-benchmark.yaml}
DEMO=${DEMO:-demo}
BACKBONE=${BACKBONE:-resnet18}
WARM_STEPS=${WARM_STEPS:-600}  # the supervised run every arm starts from (its validation plateau, measured)
STEPS=${STEPS:-400}  # each arm's steps after it
EVERY=${EVERY:-100}
SEEDS=${SEEDS:-0-4}
K=${K:-4}
ARMS=${ARMS:-supervised,supervised-sel,pseudo_label,mean_teacher,fixmatch,adversarial,mlcr,large_margin,rtatl}
SEARCH=${SEARCH:-pseudo_label,pseudo_label-t80,pseudo_label-cap,fixmatch,fixmatch-t80,fixmatch-cap,mean_teacher,mean_teacher-w10,mean_teacher-e99,large_margin,large_margin-l01,large_margin-l20}
WARM=${WARM:---warm-start --warm-steps $WARM_STEPS}  # every arm continues from one supervised run per seed (WARM= :
# from scratch; MLCR's two twins both start from the supervised backbone and head, large margin's embedding and
# centroids, adversarial's discriminator and RTATL's regional path have no supervised counterpart and start fresh)
STEPS_ONLY=${STEPS_ONLY:-pool,plateau,search,final}
OUT=${OUT:-runs/ssl-benchmark}
DATA=("data.labelled=[$DEMO/shards/bp4d]" "data.unlabelled=[$DEMO/shards/pool,$DEMO/shards/folder]"
      "model.backbone=$BACKBONE" "train.steps=$STEPS" "train.out=$OUT")
# mal is left out of ARMS by default: it needs data.expression, and an expression corpus in the config streams into
# every cell (ARMS=...,mal plus data.expression=[$DEMO/shards/rafdb] adds it, at that cost to every arm).
# Arms that differ in one thing: supervised-sel is supervised with MLCR's selective loss (MLCR's ablation baseline);
# mlcr runs its last quarter as stage 2 from the identity GCN; large_margin its fixed lambda_4 (searched below).
# rtatl runs without its flow task here (these shards carry no flow; launch/experiments/rtatl.sh's scarce step runs
# the full method on shards made with --flow 3).
ARM_SETTINGS=(supervised-sel.loss=selective "mlcr.stage1_steps=$((STEPS * 3 / 4))" "mlcr.stage2_steps=$((STEPS / 4))"
              rtatl.flow=false)
declare -A REGIME=([scarce]="--label-drop 0 data.labelled_subjects=$K" [rich]="--label-drop 0.5")
run() { [[ ",$STEPS_ONLY," == *",$1,"* ]]; }

if run pool && [ ! -f "$DEMO/shards/pool/dataset.json" ]; then
  $SSAU synth --out "$DEMO/pool" --style realistic --subjects 1 --tasks 1 --frames 1 --expression-images 0 \
    --unlabelled 20000 --size 128 --seed 7
  # POOL_DETECTOR: the faces without sidecar landmarks; attempts 1-3 were sharded with OpenCV's Haar box (the only
  # detector then), auto takes dlib's face and 68 landmarks where the [faces] extra is installed
  $SSAU shard folder --images "$DEMO/pool/unlabelled" --out "$DEMO/shards/pool" --align 64 --shard-size 500 \
    --detector "${POOL_DETECTOR:-haar}"
fi

for regime in scarce rich; do
  read -r -a R <<< "${REGIME[$regime]}"
  drop=${R[1]}
  extra=("${R[@]:2}")
  if run plateau; then  # the supervised baseline's validation F1/AUC every $EVERY steps (train/... and val/...)
    $SSAU train --config "$CONFIG" "${DATA[@]}" "train.steps=$((2 * WARM_STEPS))" "train.eval_every=$EVERY" \
      train.evaluate_on=val "train.name=plateau-$regime" train.resume=auto "data.label_drop=$drop" "${extra[@]}" "$@"
  fi
  if run search; then  # the settings a paper leaves to the user, on the validation split (2 seeds)
    # (ssau compare's options first: its key=value overrides are one block at the end)
    $SSAU compare --config "$CONFIG" --name "ssl-search-$regime" --select-on val --seeds 0-1 --label-drop "$drop" \
      --selection "$OUT/selection-$regime.json" --methods "$SEARCH" "${DATA[@]}" \
      pseudo_label-t80.p_cutoff=0.8 fixmatch-t80.p_cutoff=0.8 pseudo_label-cap.threshold=class_aware \
      fixmatch-cap.threshold=class_aware mean_teacher-w10.lambda_u=10 mean_teacher-e99.ema=0.99 \
      large_margin-l01.lambda_m=0.01 large_margin-l20.lambda_m=0.2 "${extra[@]}" "$@"
  fi
  if run final; then
    $SSAU compare --config "$CONFIG" --name "ssl-$regime" --methods "$ARMS" --seeds "$SEEDS" --label-drop "$drop" \
      --settings-from "$OUT/selection-$regime.json" $WARM "${DATA[@]}" train.thresholds=val "${ARM_SETTINGS[@]}" \
      "${extra[@]}" "$@"
  fi
done
