"""The writer: `ssau shard` packs a corpus in its native layout (BP4D, DISFA, EmotioNet, RAF-DB, a CSV manifest, a
folder of faces, videos) into webdataset tar shards with a parquet index. ``schema`` is the on-disk format both
sides share."""
