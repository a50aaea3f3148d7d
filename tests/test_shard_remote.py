"""`ssau shard --out s3://bucket/prefix` against a real S3 endpoint on 127.0.0.1 (moto's server, started here and
stopped after): the bucket equals a local shard of the same corpus byte for byte, also after a kill -9 and a resume;
no partial or temporary object is ever listed; dataset.json comes last; a bad store is one line without credentials.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import fsspec
import pytest
import s3fs
from corpora import jpeg_bytes
from helpers import shard
from moto.server import ThreadedMotoServer

from ssau.cli import main

pytestmark = pytest.mark.slow  # a real server and a killed process (about 20 s in all on 2 cores)

KEY_ID, SECRET = "AKIASSAUTESTKEY00042", "ssau/test+secret-0b5c9e1f7d"  # distinctive, to grep the output for
ARGS = ["folder", "--shard-size", "5"]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free port of 127.0.0.1 with the bucket ``bucket``; the environment points boto at it."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        with pytest.MonkeyPatch.context() as mp:
            env = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
                   "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.get_host_and_port()[1]}",
                   "AWS_EC2_METADATA_DISABLED": "true"}
            for k, v in env.items():
                mp.setenv(k, v)
            s3fs.S3FileSystem.clear_instance_cache()  # an instance made before would keep its endpoint
            client = boto3.client("s3")
            client.create_bucket(Bucket="bucket")
            yield client
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """(images, the same images sharded to local disk): 150 PNGs in 30 shards of 5 (PNGs are re-encoded, so that
    sharding takes long enough to be killed while it goes on)."""
    tmp = tmp_path_factory.mktemp("remote")
    images = tmp / "faces"
    for i in range(150):
        (images / f"d{i // 30}").mkdir(parents=True, exist_ok=True)
        (images / f"d{i // 30}" / f"{i:04d}.png").write_bytes(jpeg_bytes(i, size=64, fmt="PNG"))
    assert shard(*ARGS, "--images", str(images), "--out", str(tmp / "local")) == 0
    return images, tmp / "local"


def local_files(out: Path) -> dict[str, bytes]:
    """What a reader of a shard directory reads: shards, index.parquet, dataset.json (not the .ssau/ state)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def listing(client, prefix: str) -> dict[str, int]:
    """name (relative to the prefix) -> size of every object under ``prefix``, straight from the server."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket="bucket", Prefix=prefix + "/"):
        out.update({o["Key"][len(prefix) + 1:]: o["Size"] for o in page.get("Contents", [])})
    return out


def bucket_files(client, prefix: str) -> dict[str, bytes]:
    return {name: client.get_object(Bucket="bucket", Key=f"{prefix}/{name}")["Body"].read()
            for name in sorted(listing(client, prefix))}


def watch(client, prefix: str, proc: subprocess.Popen, stop=lambda seen: False) -> list[dict[str, int]]:
    """Listings of ``prefix`` taken every 50 ms until ``proc`` ends or ``stop(listing)``."""
    seen = []
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline:
        seen.append(listing(client, prefix))
        if stop(seen[-1]):
            break
        time.sleep(0.05)  # more often, and the server in this process slows the uploads it watches
    return seen


def check_listings(seen: list[dict[str, int]], final: dict[str, bytes]) -> None:
    """Every name ever listed is a final name with its final size (nothing partial, nothing temporary), and a
    listing that holds dataset.json holds every shard and the index beside it."""
    for objects in seen:
        assert set(objects) <= set(final), sorted(set(objects) - set(final))
        assert all(size == len(final[name]) for name, size in objects.items())
        if "dataset.json" in objects:
            assert set(objects) == set(final)


def test_shard_to_s3_equals_local_and_dataset_json_comes_last(s3, corpus, tmp_path, monkeypatch, capsys):
    images, local = corpus
    puts = []
    put_file = s3fs.S3FileSystem._put_file

    async def recording(self, lpath, rpath, *args, **kwargs):
        out = await put_file(self, lpath, rpath, *args, **kwargs)
        puts.append(rpath.rsplit("/", 1)[-1])  # recorded once the object is complete
        return out

    monkeypatch.setattr(s3fs.S3FileSystem, "_put_file", recording)
    # Two workers: the pool forks while the uploader thread runs.
    args = [*ARGS, "--images", str(images), "--out", "s3://bucket/one", "--stage", str(tmp_path / "stage"),
            "--workers", "2"]
    assert shard(*args) == 0
    assert "uploaded 32 files, 0 already in the store" in capsys.readouterr().out
    assert bucket_files(s3, "one") == local_files(local)
    shards = sorted(n for n in local_files(local) if n.endswith(".tar"))
    assert len(shards) == 30 and sorted(puts[:-2]) == shards and puts[-2:] == ["index.parquet", "dataset.json"]

    # Run again: everything is verified in the stage and found in the store, nothing is sent.
    puts.clear()
    assert shard(*args) == 0
    assert "uploaded 0 files, 32 already in the store" in capsys.readouterr().out and puts == []

    # A shard deleted from the bucket is sent again, and dataset.json is taken down while it is missing.
    s3.delete_object(Bucket="bucket", Key=f"one/{shards[3]}")
    assert shard(*args) == 0
    assert puts == [shards[3], "dataset.json"] and bucket_files(s3, "one") == local_files(local)


def test_killed_mid_upload_and_resumed_gives_the_local_bytes(s3, corpus, tmp_path):
    images, local = corpus
    final = local_files(local)
    stage = tmp_path / "stage"
    cmd = [sys.executable, "-m", "ssau", "shard", *ARGS, "--images", str(images), "--out", "s3://bucket/two",
           "--stage", str(stage), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Two shards listed: the first one's upload is complete and recorded in the stage (uploads go one by one).
    seen = watch(s3, "two", proc, stop=lambda objects: sum(n.endswith(".tar") for n in objects) >= 2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    killed = listing(s3, "two")
    assert "dataset.json" not in killed and sum(n.endswith(".tar") for n in killed) >= 2, "killed too late"

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen += watch(s3, "two", proc)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    kept = int(out.split("uploaded ")[1].split(", ")[1].split(" already")[0])
    assert kept >= 1  # what was uploaded before the kill is not sent again
    check_listings(seen, final)
    assert bucket_files(s3, "two") == final  # byte for byte, nothing missing, nothing extra


def test_a_missing_bucket_is_one_line_without_credentials(s3, corpus, tmp_path, capsys):
    images, _ = corpus
    stage = tmp_path / "stage"
    assert main(["shard", *ARGS, "--images", str(images), "--out", "s3://no-such-bucket/x", "--stage", str(stage),
                 "--quiet"]) == 2
    out = capsys.readouterr()
    assert KEY_ID not in out.out + out.err and SECRET not in out.out + out.err and out.out == ""
    [line] = out.err.strip().splitlines()
    assert line.startswith("ssau: error: --out s3://no-such-bucket/x: the store refuses it (")
    assert "nothing was sharded" in line and not stage.exists()


def test_a_missing_bucket_from_the_command_line(s3, corpus, tmp_path):
    images, _ = corpus
    res = subprocess.run([sys.executable, "-m", "ssau", "shard", *ARGS, "--images", str(images), "--out",
                          "s3://no-such-bucket/x", "--stage", str(tmp_path / "stage")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and res.stderr.startswith("ssau: error: --out s3://")
    assert KEY_ID not in res.stderr and SECRET not in res.stderr


def test_a_store_without_atomic_puts_moves_each_file_into_place(corpus, tmp_path):
    """memory:// stands for any filesystem whose writes show as they go: each file is put under a temporary name
    and moved, and the result is the same bytes."""
    images, local = corpus
    fs = fsspec.filesystem("memory")
    puts = []
    put_file = type(fs).put_file

    def recording(self, lpath, rpath, *args, **kwargs):
        puts.append(rpath.rsplit("/", 1)[-1])
        return put_file(self, lpath, rpath, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(fs), "put_file", recording)
        assert shard(*ARGS, "--images", str(images), "--out", "memory://ssau-test/three",
                     "--stage", str(tmp_path / "stage")) == 0
    try:
        got = {p.rsplit("/", 1)[-1]: fs.cat_file(p) for p in fs.find("/ssau-test/three")}
        assert got == local_files(local)
        assert len(puts) == 32 and all(p.startswith(".") and ".tmp-" in p for p in puts)
        assert puts[-1].startswith(".dataset.json.tmp-")
    finally:
        fs.rm("/ssau-test", recursive=True)
