"""Shards read from object storage and HTTP (issue 27): a real S3 endpoint on 127.0.0.1 (moto's server, started here
and stopped after) and a plain ``http.server``. What a run reads from a URL equals what it reads from local disk;
an outage is retried through, a vanished shard is skipped and counted, a cache keeps shards, and no credential
reaches the run's MLflow store or its run directory."""

from __future__ import annotations

import functools
import http.server
import json
import itertools
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from helpers import tiny_train  # noqa: E402

from ssau import remote  # noqa: E402
from ssau.cli import main  # noqa: E402
from ssau.data.sources import SourceConfig, StreamConfig, read_dataset, shard_urls  # noqa: E402
from ssau.data.stream import TrainStream  # noqa: E402
from ssau.data.tario import SkipCounter, tar_samples  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "ssau-shards"
SECRET = "ssau-test-secret-Zq81"  # the access key a leak would show
KEY_ID = "SSAUTESTKEYID"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3:
    """moto's S3 server on a fixed port, so that it can be stopped and started again (its buckets live in this
    process and survive a restart)."""

    def __init__(self) -> None:
        self.port = _port()
        self.server = None

    def start(self) -> None:
        self.server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}"}


@pytest.fixture(scope="module")
def s3(corpora):
    import s3fs

    store = S3()
    store.start()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in store.env.items():
            mp.setenv(k, v)
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir(BUCKET)
        fs.put(f"{corpora.bp4d()}/", f"{BUCKET}/bp4d/", recursive=True)
        yield store
    store.stop()


@pytest.fixture(autouse=True)
def fresh_process_state():
    """Every test starts from no fetched metadata, no listing and the default settings."""
    remote._META.clear()
    remote._SIZES.clear()
    remote.configure()
    yield
    remote._META.clear()
    remote._SIZES.clear()
    remote.configure()


def _stream(d: str, workers: int = 0, world: int = 1, rank: int = 0, validation: float = 0.0) -> TrainStream:
    cfg = StreamConfig(labelled=SourceConfig((d,), folds=(2, 3)), m1=4, m2=0, image_size=32, workers=workers,
                       shuffle_buffer=8, source_timeout=60, validation=validation, val_batch=3)
    return TrainStream(cfg, rank=rank, world=world)


def _batches(stream: TrainStream, n: int) -> list:
    return [(b.keys, b.images, b.targets, b.skipped) for b in itertools.islice(iter(stream), n)]


def _same(a: list, b: list) -> None:
    assert [x[0] for x in a] == [x[0] for x in b]
    for (_, ia, ta, _), (_, ib, tb, _) in zip(a, b):
        assert torch.equal(ia, ib) and torch.equal(ta, tb)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_from_s3_equals_the_stream_from_local_disk(s3, corpora, workers):
    local = _batches(_stream(str(corpora.bp4d()), workers), 6)
    url = f"s3://{BUCKET}/bp4d"
    assert read_dataset(url) == read_dataset(corpora.bp4d())
    assert shard_urls(url, None) == [f"{url}/{Path(u).name}" for u in shard_urls(corpora.bp4d(), None)]
    from_s3 = _batches(_stream(url, workers), 6)
    _same(local, from_s3)
    assert sum(x[3] for x in from_s3) == 0
    # The AU validation split is read by ranged reads of its samples (index.parquet's tar_offset, tar_size)
    val = [[(b.val_keys, b.val_images) for b in itertools.islice(iter(_stream(d, workers, validation=0.3)), 4)]
           for d in (str(corpora.bp4d()), url)]
    assert [k for k, _ in val[0]] == [k for k, _ in val[1]] and all(k for k, _ in val[1])
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(*val))


def test_reading_goes_on_through_an_outage_and_skips_nothing(s3, corpora, monkeypatch):
    """The server is stopped after the first batch and started again 3 s later: the reader retries, and the batches
    are the local ones, none skipped, none repeated."""
    monkeypatch.setattr(remote, "READ_AHEAD", 4096)  # a range request every few members: the outage is hit mid-shard
    local = _batches(_stream(str(corpora.bp4d())), 8)
    it = iter(_stream(f"s3://{BUCKET}/bp4d"))
    got = [next(it)]
    s3.stop()
    restart = threading.Timer(3.0, s3.start)
    restart.start()
    t0 = time.monotonic()
    got += list(itertools.islice(it, 7))
    restart.join()
    assert time.monotonic() - t0 >= 2.5  # the reads did wait for the server
    _same(local, [(b.keys, b.images, b.targets, b.skipped) for b in got])
    assert sum(b.skipped for b in got) == 0


def test_a_shard_deleted_from_the_bucket_is_skipped_and_counted(s3, corpora):
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.copy(f"{BUCKET}/bp4d/", f"{BUCKET}/doomed/", recursive=True)
    url = f"s3://{BUCKET}/doomed"
    names = [Path(u).name for u in shard_urls(url, (2, 3))]  # metadata and listing fetched: the run has started
    gone = names[0]
    fs.rm(f"{BUCKET}/doomed/{gone}")
    bad = SkipCounter()
    keys = [s["__key__"] for u in shard_urls(url, (2, 3)) for s in tar_samples(u, bad)]
    local = {Path(u).name: [s["__key__"] for s in tar_samples(u, SkipCounter())]
             for u in shard_urls(corpora.bp4d(), (2, 3))}
    assert bad.n == 1 and "FileNotFoundError" in bad.first
    assert keys == [k for name in names if name != gone for k in local[name]]
    batches = list(itertools.islice(iter(_stream(url)), 12))  # the training stream counts it and goes on
    assert sum(b.skipped for b in batches) >= 1
    assert not {k for b in batches for k in b.keys} & set(local[gone])


def test_the_cache_keeps_shards_under_its_cap_and_serves_them_when_the_store_is_down(s3, corpora, tmp_path):
    url = f"s3://{BUCKET}/bp4d"
    urls = shard_urls(url, None)
    one = os.path.getsize(corpora.bp4d() / Path(urls[0]).name)
    remote.configure(cache_dir=str(tmp_path / "cache"), cache_gb=3.5 * one / 2**30)
    first = [[s["__key__"] for s in tar_samples(u, SkipCounter())] for u in urls]
    cached = sorted((tmp_path / "cache").glob("*.tar"))
    assert len(cached) == 3 and not list((tmp_path / "cache").glob(".*tmp*"))  # the cap holds 3 of these shards
    kept = {p.read_bytes() for p in cached}  # the three read last
    assert kept == {(corpora.bp4d() / Path(u).name).read_bytes() for u in urls[-3:]}
    last = urls[-1]
    s3.stop()
    remote.filesystem(url)[0].invalidate_cache()  # nothing known of the store but the listing this process made
    try:
        bad = SkipCounter()
        assert [s["__key__"] for s in tar_samples(last, bad)] == first[-1] and bad.n == 0  # from the cache...
    finally:
        s3.start()
    remote.configure()
    assert [s["__key__"] for s in tar_samples(last, SkipCounter())] == first[-1]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    """Silent, and sending files in 16 KB pieces as a real network delivers them (a streamed read returns what has
    arrived)."""

    def log_message(self, *args) -> None:
        pass

    def copyfile(self, source, outputfile) -> None:
        while chunk := source.read(16384):
            outputfile.write(chunk)
            outputfile.flush()
            time.sleep(0.0005)


@pytest.fixture
def http_root(corpora, tmp_path):
    """A plain http.server (no range requests, directory listings) over a folder holding the BP4D look-alike and a
    shard of 300 KB JPEGs (members larger than what one streamed read returns)."""
    from corpora import jpeg_bytes, write_tar

    shutil.copytree(corpora.bp4d(), tmp_path / "bp4d")
    (tmp_path / "big").mkdir()
    write_tar(tmp_path / "big" / "big-000000.tar", [(f"k{i}", jpeg_bytes(i, size=600), {}) for i in range(4)])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_stream_over_plain_http_equals_the_local_one(http_root):
    root, base = http_root
    local = [s for s in tar_samples(str(root / "big" / "big-000000.tar"), SkipCounter())]
    bad = SkipCounter()
    assert [s for s in tar_samples(f"{base}/big/big-000000.tar", bad) if s.pop("__url__")] == \
        [s for s in local if s.pop("__url__")] and bad.n == 0
    assert min(len(s["jpg"]) for s in local) > 200_000
    url = f"{base}/bp4d"
    assert read_dataset(url) == read_dataset(root / "bp4d")
    _same(_batches(_stream(str(root / "bp4d")), 5), _batches(_stream(url), 5))
    # The validation split's ranged reads meet a server that answers 200 with the whole shard: read whole instead.
    val = [[(b.val_keys, b.val_images) for b in itertools.islice(iter(_stream(d, validation=0.3)), 3)]
           for d in (str(root / "bp4d"), url)]
    assert [k for k, _ in val[0]] == [k for k, _ in val[1]] and all(torch.equal(a, b) for (_, a), (_, b) in zip(*val))


def test_a_url_with_credentials_in_it_is_refused_in_one_line(tmp_path, capsys):
    code = main(tiny_train(tmp_path, tmp_path, f"data.labelled=[s3://{KEY_ID}:{SECRET}@{BUCKET}/bp4d]"))
    err = capsys.readouterr().err
    assert code != 0 and SECRET not in err and "credentials" in err and len(err.strip().splitlines()) == 1


def _run(args: list[str], env: dict) -> None:
    p = subprocess.run([sys.executable, *args], env=os.environ | env | {"OMP_NUM_THREADS": "1"}, cwd=ROOT,
                       capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]


def test_two_ranks_training_from_s3_equal_training_from_local_disk_and_log_no_credential(s3, corpora, tmp_path):
    from mlflow.tracking import MlflowClient

    def train(src: str, name: str, *extra: str) -> list[dict]:
        _run(["-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch" / "accelerate" / "cpu-2ranks.yaml"),
              "--main_process_port", str(_port()), "-m", "ssau", *tiny_train(corpora.bp4d(), tmp_path)[:1],
              f"data.labelled=[{src}]", *tiny_train(corpora.bp4d(), tmp_path)[2:], f"train.name={name}",
              "train.rank_report=true", "data.workers=1", *extra], s3.env)
        return [json.loads((tmp_path / "runs" / name / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]

    # The local run logs nothing: MLflow keeps one dataset per (name, digest), and the bucket's is the same data.
    local = train(str(corpora.bp4d()), "local", "tracking.enabled=false")
    from_s3 = train(f"s3://{BUCKET}/bp4d", "s3")
    assert [r["world_size"] for r in from_s3] == [2, 2]
    assert [r["first_keys"] for r in from_s3] == [r["first_keys"] for r in local]
    assert [r["state_sha256"] for r in from_s3] == [r["state_sha256"] for r in local]
    assert from_s3[0]["state_sha256"] == from_s3[1]["state_sha256"]
    # No credential in the store or the run directory; the dataset input keeps the URL.
    for path in [tmp_path / "mlflow.db", *(tmp_path / "runs").rglob("*")]:
        if path.is_file():
            data = path.read_bytes()
            assert SECRET.encode() not in data and KEY_ID.encode() not in data, path
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    sources = [(d.dataset.source_type, d.dataset.source) for r in runs for d in r.inputs.dataset_inputs]
    assert ("s3", json.dumps({"uri": f"s3://{BUCKET}/bp4d"})) in sources
    mb_s = [m.value for r in runs for m in client.get_metric_history(r.info.run_id, "train/remote_mb_per_s")]
    assert mb_s and all(v > 0 for v in mb_s)  # the MB/s the progress bar shows, logged too


def test_eval_and_predict_read_a_bucket_as_they_read_a_directory(s3, corpora, tmp_path, capsys):
    import pandas as pd

    assert main(tiny_train(corpora.bp4d(), tmp_path, "train.name=m", "tracking.enabled=false")) == 0
    capsys.readouterr()
    url = f"s3://{BUCKET}/bp4d"
    tables = []
    for src in (str(corpora.bp4d()), url):
        assert main(["eval", "--checkpoint", str(tmp_path / "runs" / "m"), "--shards", src, "--workers", "1"]) == 0
        tables.append(capsys.readouterr().out)
    assert tables[0] == tables[1] and "AU01" in tables[0]
    frames = []
    for i, src in enumerate((str(corpora.bp4d()), url)):
        out = tmp_path / f"p{i}.parquet"
        assert main(["predict", str(tmp_path / "runs" / "m"), src, "--out", str(out), "--quiet"]) == 0
        frames.append(pd.read_parquet(out))
    assert list(frames[1]["input"].str.split("#").str[0].unique()) == [url]
    a, b = (f.drop(columns="input") for f in frames)
    pd.testing.assert_frame_equal(a, b)


def test_training_goes_on_through_an_outage_and_ends_as_a_run_from_local_disk(s3, corpora, tmp_path, monkeypatch):
    """The server stops at step 3 and is back 3 s later; the run ends with the parameters of the same run from local
    disk (so no sample was skipped or read twice) and logs no skipped sample."""
    from mlflow.tracking import MlflowClient

    from ssau.train.trainer import Trainer

    monkeypatch.setattr(remote, "READ_AHEAD", 4096)  # range requests all along, so the outage is met mid-shard
    args = ["train.steps=12", "data.workers=0", "train.rank_report=true", "data.shuffle_buffer=4"]
    assert main([*tiny_train(corpora.bp4d(), tmp_path, "train.name=local", "tracking.enabled=false", *args)]) == 0
    real, stopped, starts = Trainer.train_step, [], []

    def step(self, batches):
        starts.append(time.monotonic())
        if self.step == 3 and not stopped:
            s3.stop()
            stopped.append(time.monotonic())
            threading.Timer(3.0, s3.start).start()
        return real(self, batches)

    monkeypatch.setattr(Trainer, "train_step", step)
    train = tiny_train(corpora.bp4d(), tmp_path, "train.name=s3", *args)
    assert main([train[0], f"data.labelled=[s3://{BUCKET}/bp4d]", *train[2:]]) == 0
    assert stopped and starts[4] - stopped[0] >= 2.5  # step 4 waited for the server (s3fs's own retries, then ours)
    reports = [json.loads((tmp_path / "runs" / n / "ranks" / "rank0.json").read_text()) for n in ("local", "s3")]
    assert reports[0]["state_sha256"] == reports[1]["state_sha256"] and reports[1]["step"] == 12
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
    assert run.data.metrics["train/skipped_samples"] == 0


class _Flaky:
    """A filesystem whose files break after ``cut`` bytes on every other open: the connection resets mid-read."""

    def __init__(self, data: bytes, cut: int, seekable: bool):
        self.data, self.cut, self.seekable, self.opens = data, cut, seekable, []

    def open(self, path, mode="rb", block_size=None, **kw):
        import io

        fs, broken = self, len(self.opens) % 2 == 0
        self.opens.append(block_size)

        class File(io.BytesIO):
            def read(self, n=-1):
                if broken and self.tell() >= fs.cut:
                    raise ConnectionResetError("reset by peer")
                return super().read(n if n >= 0 and not broken else min(n if n >= 0 else 1 << 30, fs.cut - self.tell()))

            def seek(self, pos, whence=0):
                if not fs.seekable:
                    raise io.UnsupportedOperation("not seekable")
                return super().seek(pos, whence)

        return File(self.data)


@pytest.mark.parametrize("url", ["s3://b/shard.tar", "http://h/shard.tar"])
def test_the_reader_reopens_at_the_byte_it_reached_after_a_reset(url, monkeypatch):
    data = bytes(range(256)) * 400
    fs = _Flaky(data, cut=10_000, seekable=url.startswith("s3"))
    monkeypatch.setattr(remote, "filesystem", lambda u: (fs, u.split("://", 1)[1]))
    monkeypatch.setattr(remote.time, "sleep", lambda s: None)
    reader, got = remote.RemoteReader(url), []
    while chunk := reader.read(4096):
        got.append(chunk)
    assert b"".join(got) == data and len(fs.opens) >= 2  # every byte once, in order, across the reopenings
    assert fs.opens[0] == (0 if url.startswith("http") else remote.READ_AHEAD)  # HTTP streams; S3 reads ahead
