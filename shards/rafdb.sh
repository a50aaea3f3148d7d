#!/usr/bin/env bash
# RAF-DB basic: list_patition_label.txt (train_/test_ prefix = split, labels 1-7) + its aligned images (aligned
# already: no --align). Used by MAL. --images may also be the corpus root or basic/.
set -euo pipefail
RAFDB=${RAFDB:?set RAFDB to the folder holding basic/}
ssau shard rafdb --images "$RAFDB/basic/Image/aligned" --labels "$RAFDB/basic/EmoLabel/list_patition_label.txt" \
  --out shards/rafdb --workers "${WORKERS:-8}"
