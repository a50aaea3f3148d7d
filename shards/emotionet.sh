#!/usr/bin/env bash
# EmotioNet's manually annotated subset: challenge label files (URL, URL, 60 AU values; 999 = unknown) mapped to a
# local image folder by URL basename. Subject-less, so --folds K places images by a seeded hash.
set -euo pipefail
EMOTIONET=${EMOTIONET:?set EMOTIONET to the folder holding the label files and images/}
ssau shard emotionet --images "$EMOTIONET/images" --labels "$EMOTIONET/labels" --out shards/emotionet \
  --unknown 999 --align "${ALIGN:-240}" --workers "${WORKERS:-8}"
