#!/usr/bin/env bash
# BP4D: 2D frames <subject>/<task>/<frame>.jpg + AUCoding/AU_OCC/<subject>_<task>.csv (9 = not coded), 3 standard folds.
set -euo pipefail
BP4D=${BP4D:?set BP4D to the corpus root (holding the 2D frame tree and AUCoding/)}
ssau shard bp4d --images "${BP4D_IMAGES:-$BP4D/2D}" --labels "$BP4D/AUCoding/AU_OCC" --out shards/bp4d \
  --folds bp4d --resize 256 --shard-size 1000 --workers "${WORKERS:-8}"
