#!/usr/bin/env bash
# BP4D: 2D frames <subject>/<task>/<frame>.jpg + AUCoding/AU_OCC/<subject>_<task>.csv (9 = not coded), 3 standard folds.
set -euo pipefail
BP4D=${BP4D:?set BP4D to the corpus root (holding the 2D frame tree and AUCoding/)}
# Faces are aligned to ALIGN px (MLCR 240, RTATL 200) by the landmarks in LANDMARKS (OpenFace CSVs named
# <subject>_<task>.csv; OpenFace run on the frame folders numbers frames by position), else by the Haar detector.
# FLOW=3 adds RTATL's TV-L1 flow between frames t and t+3.
ssau shard bp4d --images "${BP4D_IMAGES:-$BP4D/2D}" --labels "$BP4D/AUCoding/AU_OCC" --out shards/bp4d \
  --folds bp4d --align "${ALIGN:-240}" ${LANDMARKS:+--landmarks "$LANDMARKS" --landmark-frames "${LANDMARK_FRAMES:-position}"} \
  ${FLOW:+--flow "$FLOW"} --shard-size 1000 --workers "${WORKERS:-8}"
