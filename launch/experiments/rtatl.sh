#!/usr/bin/env bash
# Issue 23: RTATL's parts one at a time (the paper's Table 1 order) and its few-labelled-subjects setting (Fig. 4).
# Steps (each resumes where it stopped: run the script again; STEPS_ONLY=<list> runs some of them):
#   flow     shard the demo's BP4D look-alike again with TV-L1 flow to frame t + 3 (aligned 64 px, as the demo's)
#   table1   at equal steps, paired seeds: the bare backbone (RoI modules + max-fused heads), + transformer,
#            + OFE, + RoII, full RTATL; paired differences to the bare backbone
#   scarce   data.labelled_subjects=$K: the bare backbone vs RTATL (the unlabelled pool and the other subjects'
#            frames stream as unlabelled; flow is self-supervised, so every video frame's flow is a target)
#   cost     python -m ssau.bench.rtatl_cost: parameters and GFLOPs (training, inference) and seconds per step of
#            each variant relative to the backbone
# The report: docs/experiments/rtatl.md. Needs `ssau demo --out demo` and the pool of launch/experiments/ssl-benchmark.sh.
set -euo pipefail
SSAU=${SSAU:-.venv/bin/ssau}
PY=${PY:-.venv/bin/python}
DEMO=${DEMO:-demo}
SEEDS=${SEEDS:-0-2}
STEPS=${STEPS:-600}
K=${K:-4}
OUT=${OUT:-runs/rtatl}
STEPS_ONLY=${STEPS_ONLY:-flow,table1,scarce,cost}
run() { [[ ",$STEPS_ONLY," == *",$1,"* ]]; }
DATA=("data.labelled=[$DEMO/shards/bp4d-flow]" "data.unlabelled=[$DEMO/shards/pool]" "train.steps=$STEPS"
      "train.out=$OUT")
ARMS=(rtatl-backbone.transformer=false rtatl-backbone.inpaint=false rtatl-backbone.flow=false
      rtatl-transformer.inpaint=false rtatl-transformer.flow=false rtatl-ofe.inpaint=false rtatl-roii.flow=false)

if run flow && [ ! -f "$DEMO/shards/bp4d-flow/dataset.json" ]; then
  $SSAU shard bp4d --images "$DEMO/corpus/bp4d" --labels "$DEMO/corpus/bp4d" --landmarks "$DEMO/corpus/bp4d/landmarks" \
    --landmark-frames position --align 64 --flow 3 --flow-size 64 --folds bp4d --shard-size 250 \
    --out "$DEMO/shards/bp4d-flow"
fi
if run table1; then  # (ssau compare's options first: its key=value overrides are one block at the end)
  $SSAU compare --config launch/recipes/rtatl.yaml --name rtatl-table1 --baseline rtatl-backbone --label-drop 0 \
    --methods rtatl-backbone,rtatl-transformer,rtatl-ofe,rtatl-roii,rtatl --seeds "$SEEDS" "${DATA[@]}" "${ARMS[@]}" "$@"
fi
if run scarce; then
  $SSAU compare --config launch/recipes/rtatl.yaml --name rtatl-scarce --baseline rtatl-backbone --label-drop 0 \
    --methods rtatl-backbone,rtatl --seeds "$SEEDS" "${DATA[@]}" "data.labelled_subjects=$K" "${ARMS[@]:0:3}" "$@"
fi
if run cost; then
  $PY -m ssau.bench.rtatl_cost --labelled "$DEMO/shards/bp4d-flow" --unlabelled "$DEMO/shards/pool"
fi
