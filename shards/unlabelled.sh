#!/usr/bin/env bash
# Any tree of face images (MegaFace, EmotioNet's unlabelled million, your own); MegaFace <image>.json sidecars are read.
set -euo pipefail
FACES=${FACES:?set FACES to the image tree}
ssau shard folder --images "$FACES" --out "shards/${NAME:-unlabelled}" --align "${ALIGN:-240}" --shard-size 2000 --workers "${WORKERS:-8}"
