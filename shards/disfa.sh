#!/usr/bin/env bash
# DISFA: left-camera videos decoded while sharding, ActionUnit_Labels/<SN>/<SN>_au<N>.txt, active = intensity >= 2.
# With frames already extracted, replace --images by the frame root and add e.g. --frame-template '{subject}/{frame:05d}.png'.
set -euo pipefail
DISFA=${DISFA:?set DISFA to the corpus root}
# 0-based extractions (0.jpg = label frame 1): '{subject}/{index}.jpg'. Faces aligned as in bp4d.sh; LANDMARKS holds
# OpenFace's LeftVideo<SN>_comp.csv (its frames are the video's, 1-based: the label frames) or <SN>.csv.
ssau shard disfa --images "$DISFA/Videos_LeftCamera" --labels "$DISFA/ActionUnit_Labels" --out shards/disfa \
  --folds disfa --align "${ALIGN:-240}" ${LANDMARKS:+--landmarks "$LANDMARKS"} ${FLOW:+--flow "$FLOW"} \
  --shard-size 1000 --workers "${WORKERS:-8}"
