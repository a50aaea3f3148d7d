#!/usr/bin/env bash
# DISFA: left-camera videos decoded while sharding, ActionUnit_Labels/<SN>/<SN>_au<N>.txt, active = intensity >= 2.
# With frames already extracted, replace --images by the frame root and add e.g. --frame-template '{subject}/{frame:05d}.png'.
set -euo pipefail
DISFA=${DISFA:?set DISFA to the corpus root}
ssau shard disfa --images "$DISFA/Videos_LeftCamera" --labels "$DISFA/ActionUnit_Labels" --out shards/disfa \
  --folds disfa --resize 256 --shard-size 1000 --workers "${WORKERS:-8}"
