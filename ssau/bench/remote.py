"""Streaming from object storage against local disk (issue 27):
`python -m ssau.bench.remote [--shards DIR] [--images N] [--batches B] [--rounds R]`.

Starts moto's S3 server on 127.0.0.1 (needs the test extras: ``moto[server]``), uploads a shard directory to a bucket
and times the training stream (64 px, m1 = 32, one and two DataLoader workers) from ``s3://`` and from the local
directory, in alternating rounds (medians). A local endpoint has no network latency or bandwidth limit: the ratio is
the cost of the client path (ranged GETs through s3fs, the retrying reader), not of a real network. Without
``--shards`` it renders and shards a small synthetic corpus first.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ssau.bench.data import _corpus
from ssau.bench.ui_screenshots import free_port
from ssau.data.sources import SourceConfig, StreamConfig
from ssau.data.stream import TrainStream
from ssau.shard.plan import run_shard
from ssau.shard.write import ShardSettings


def _img_s(d: str, workers: int, batches: int) -> float:
    cfg = StreamConfig(labelled=SourceConfig((d,)), m1=32, m2=0, image_size=64, workers=workers, shuffle_buffer=500)
    it = iter(TrainStream(cfg))
    next(it)  # workers started, shuffle buffers filled
    t = time.perf_counter()
    for _ in itertools.islice(it, batches):
        pass
    return batches * 32 / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", help="a shard directory (default: a synthetic corpus, sharded here)")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    from moto.server import ThreadedMotoServer  # the test extras

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    with tempfile.TemporaryDirectory(prefix="ssau-bench-remote-") as tmp:
        shards = args.shards
        if not shards:
            _corpus(Path(tmp) / "corpus", args.images, 224)
            src = Path(tmp) / "corpus" / "bp4d"
            run_shard(ShardSettings(format="bp4d", images=str(src), labels=str(src), shard_size=100),
                      Path(tmp) / "shards", progress=False)
            shards = str(Path(tmp) / "shards")
        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                          AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
        try:
            import s3fs

            fs = s3fs.S3FileSystem(skip_instance_cache=True)
            fs.mkdir("bench")
            fs.put(f"{shards.rstrip('/')}/", "bench/shards/", recursive=True)
            rows = []
            for workers in (1, 2):
                runs: dict[str, list[float]] = {"local": [], "s3": []}
                for r in range(args.rounds):
                    order = ["local", "s3"] if r % 2 == 0 else ["s3", "local"]
                    for what in order:
                        runs[what].append(_img_s(shards if what == "local" else "s3://bench/shards", workers,
                                                 args.batches))
                local, s3 = (statistics.median(runs[k]) for k in ("local", "s3"))
                rows.append((workers, s3, local))
        finally:
            server.stop()
    print(f"{'stream, 64 px, m1 = 32':<34} {'s3 / local':>10}  figures")
    for workers, s3, local in rows:
        print(f"{f'{workers} worker' + ('s' if workers > 1 else ''):<34} {s3 / local:>10.2f}  "
              f"{s3:,.0f} / {local:,.0f} img/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
