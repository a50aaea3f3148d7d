"""`ssau shard --out URL`: shard into a local staging directory and upload to any fsspec URL (issue 27), e.g.
``s3://bucket/prefix`` or ``gs://bucket/prefix``.

Guarantees, and how they are kept:
- The store ends byte-identical to a local ``ssau shard`` of the same corpus: ``run_shard`` writes into the staging
  directory exactly as into any ``--out``, and its shards, ``index.parquet`` and ``dataset.json`` are uploaded as
  they are there. The staging directory's ``.ssau/`` state stays local.
- Staging needs local disk for the whole sharded corpus: ``--stage DIR``, by default
  ``~/.cache/ssau/stage/<first 16 hex of sha256(URL without credentials)>``. It is what makes a resume after a kill
  the local resume: the same command verifies the staged shards, writes the rest, and uploads only what the store
  lacks. Delete the staging directory once the upload is done, if the disk is needed.
- Nothing half-uploaded under a final name. S3 and GCS show an object only once its PUT, multipart or resumable
  upload completes (s3fs sends 50 MiB parts from 100 MiB up); on any other filesystem a file is uploaded as
  ``.<name>.tmp-<pid>`` and moved, and such leftovers of a killed run are removed by the next. A kill during a
  multipart upload leaves parts the store never lists (an AbortIncompleteMultipartUpload lifecycle rule frees them).
- ``dataset.json`` in the store always describes the shards beside it: it is removed before the first other object
  changes, and uploaded after every shard and ``index.parquet``. A reader that finds it finds the whole dataset.
- Shards upload while sharding goes on: a thread polls the staging directory every ``POLL_S`` for shards whose stats
  file (written last) matches the tar's size and sha256, once ``run_shard`` has accepted the directory (it rewrites
  ``.ssau/settings.json`` then), so shards of other settings are never sent. When ``run_shard`` returns, whatever is
  missing is uploaded, then ``index.parquet``, then ``dataset.json``.
- A file is skipped when ``.ssau/upload/uploaded.json`` (name -> sha256 of what this staging directory put in the
  store; rewritten atomically after each upload) names the same sha256 and the store lists the same size. It lives
  in a folder of its own because ``run_shard`` sweeps temporary files from ``.ssau/`` itself while it runs.
- Left in the store: objects this staging directory never put there (say, shards of an earlier plan staged in
  another directory). Shards it put there that the new ``dataset.json`` does not list (an earlier, larger plan, or
  settings replaced by ``--overwrite``) are removed after ``dataset.json`` is written. The record costs one small
  atomic write per upload (some 50 MB written in all for 1000 shards, little beside the shards themselves).
- A store that refuses (no bucket, no permission, no credentials, transient errors past ``ssau.remote.retrying``'s
  budget) is one ShardError line naming the URL without credentials; the bucket is checked before the scan, write
  permission at the first upload. An upload that fails while sharding goes on is reported once the local shards are
  done, so the same command then only uploads. No message carries a credential.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import urllib.parse
from pathlib import Path
from typing import Callable, TypeVar

from fsspec.callbacks import Callback
from tqdm import tqdm

from ssau.errors import InputError, ShardError
from ssau.io import atomic_write
from ssau.readfile import read_json
from ssau.remote import filesystem, public, retrying
from ssau.shard.plan import run_shard
from ssau.shard.schema import STATE_DIR
from ssau.shard.write import ShardSettings, json_bytes, sha256

# Object stores: the first path component is a bucket, and a PUT (single or multipart) is atomic.
BUCKET_STORES = {"s3", "s3a", "gs", "gcs"}
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "GOOGLE_APPLICATION_CREDENTIALS")
POLL_S = 0.5  # how often the uploader looks for finished shards
T = TypeVar("T")


def default_stage(url: str) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "ssau" / "stage" / hashlib.sha256(public(url).rstrip("/").encode()).hexdigest()[:16]


def _scrub(text: str, url: str) -> str:
    """``text`` without anything that could be a credential: the URL's user info, the environment's keys."""
    p = urllib.parse.urlsplit(url)
    for secret in [p.username, p.password, p.query, *(os.environ.get(k) for k in SECRET_ENV)]:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


class _Bytes(Callback):
    """fsspec's progress callback onto one shared tqdm bar (s3fs reports each part as it is sent)."""

    def __init__(self, bar: tqdm) -> None:
        super().__init__()
        self.bar, self.sent = bar, 0

    def call(self, *args, **kwargs) -> None:
        if self.value > self.sent:
            self.bar.update(self.value - self.sent)
            self.sent = self.value


class Store:
    """One remote directory: what it lists, what this staging directory put there, and puts that never show a
    partial object under a final name."""

    def __init__(self, url: str, stage: Path, progress: bool) -> None:
        self.url, self.stage, self.progress = url.rstrip("/"), stage, progress
        self.bar: tqdm | None = None  # made at the first upload, so that it stands below the sharding bar
        self.fs, path = filesystem(url)
        self.path = path.rstrip("/")
        protocols = {self.fs.protocol} if isinstance(self.fs.protocol, str) else set(self.fs.protocol)
        self.bucket_store = bool(protocols & BUCKET_STORES)
        self.record_path = stage / STATE_DIR / "upload" / "uploaded.json"
        self.record = self._load_record()
        self.sizes: dict[str, int] = {}
        self.unpublished = False  # dataset.json removed from the store in this run
        self.sent: set[str] = set()  # files uploaded in this run

    # ------------------------------------------------------------------------------------------ store calls
    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()`` with ``ssau.remote.retrying``'s policy (missing credentials and refusals are not retried)."""
        return retrying(f"{self.url}/{what}" if what else self.url, fn)

    def refused(self, e: Exception, started: bool) -> ShardError:
        reason = _scrub((str(e).strip().splitlines() or [type(e).__name__])[0][:240], self.url)
        then = (f"; finished shards are kept in {self.stage} and the same command resumes" if started
                else "; nothing was sharded")
        return ShardError(f"--out {public(self.url)}: the store refuses it ({reason}){then}")

    def probe(self) -> None:
        """A bucket that does not exist, or cannot be listed, is refused before the scan (which can take long)."""
        if self.bucket_store:
            bucket = self.path.split("/", 1)[0]
            self._call("", lambda: self.fs.ls(bucket, detail=False))

    def refresh(self) -> None:
        """Sizes from one listing; leftovers of a killed run's temporary uploads are removed."""
        self.fs.invalidate_cache(self.path)
        try:
            listing = self._call("", lambda: self.fs.ls(self.path, detail=True))
        except FileNotFoundError:  # an empty prefix
            listing = []
        self.sizes = {str(e["name"]).rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
                      for e in listing if e.get("type") != "directory"}
        for name in [n for n in self.sizes if n.startswith(".") and ".tmp-" in n and not self.bucket_store]:
            self._call(name, lambda n=name: self.fs.rm_file(f"{self.path}/{n}"))
            del self.sizes[name]

    # ------------------------------------------------------------------------------------------ the record
    def _load_record(self) -> dict[str, str]:
        try:
            doc = read_json(self.record_path, "upload record")
        except (OSError, InputError):  # none yet, or damaged: everything is checked by upload again
            return {}
        ok = isinstance(doc, dict) and doc.get("url") == public(self.url) and isinstance(doc.get("objects"), dict)
        return {str(k): str(v) for k, v in doc["objects"].items()} if ok else {}

    def _save_record(self) -> None:
        self.record_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.record_path, json_bytes({"url": public(self.url), "objects": self.record}))

    def forget(self, name: str) -> None:
        if self.record.pop(name, None) is not None:
            self._save_record()

    # ------------------------------------------------------------------------------------------ uploads
    def ensure(self, name: str, local: Path, digest: str, size: int) -> None:
        """The store holds ``local`` (of that sha256 and size) as ``name`` when this returns."""
        if self.record.get(name) == digest and self.sizes.get(name) == size:
            return
        if name != "dataset.json":
            self._unpublish()
        self._put(local, name, size)
        self.record[name], self.sizes[name] = digest, size
        self._save_record()
        self.sent.add(name)

    def _unpublish(self) -> None:
        """Remove dataset.json before the first object it describes changes."""
        if self.unpublished:
            return
        if self.sizes.pop("dataset.json", None) is not None:
            self._call("dataset.json", lambda: self.fs.rm_file(f"{self.path}/dataset.json"))
        self.forget("dataset.json")
        self.unpublished = True

    def _put(self, local: Path, name: str, size: int) -> None:
        final = f"{self.path}/{name}"
        target = final if self.bucket_store else f"{self.path}/.{name}.tmp-{os.getpid()}"
        if self.bar is None:
            self.bar = tqdm(total=0, unit="B", unit_scale=True, desc=f"upload {public(self.url)}",
                            disable=not self.progress, file=sys.stderr, dynamic_ncols=True)
        bar = self.bar
        bar.total += size
        bar.refresh()

        def attempt() -> None:
            cb = _Bytes(bar)
            try:
                self.fs.put_file(str(local), target, callback=cb)
            except BaseException:
                bar.update(-cb.sent)  # sent again by the next attempt
                raise

        self._call(name, attempt)
        if target != final:
            self._call(name, lambda: self.fs.mv(target, final))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def remove_stale(self, keep: set[str]) -> None:
        """Shards this staging directory put in the store that the new dataset.json does not list."""
        for name in sorted(set(self.record) - keep):
            self._call(name, lambda n=name: self.fs.rm_file(f"{self.path}/{n}"))
            self.sizes.pop(name, None)
            self.forget(name)


def _key(tar: Path, stats: Path) -> tuple | None:
    """What identifies a shard's files as written: both are replaced by rename (a new inode), never rewritten."""
    try:
        a, b = tar.stat(), stats.stat()
    except OSError:
        return None
    return a.st_ino, a.st_mtime_ns, a.st_size, b.st_ino, b.st_mtime_ns


class Uploader(threading.Thread):
    """Uploads each shard ``run_shard`` finishes while it goes on; ``error`` holds what stopped it."""

    def __init__(self, store: Store, stage: Path) -> None:
        super().__init__(name="ssau-upload", daemon=True)
        self.store, self.stage, self.done = store, stage, threading.Event()
        self.error: Exception | None = None
        self.settings = stage / STATE_DIR / "settings.json"
        self.old_settings = self._inode(self.settings)
        self.accepted = False
        self.seen: dict[str, tuple] = {}  # shard -> its files (_key) when last looked at

    @staticmethod
    def _inode(path: Path) -> int | None:
        try:
            return path.stat().st_ino
        except OSError:
            return None

    def run(self) -> None:
        try:
            while not self.done.wait(POLL_S):
                # run_shard rewrites settings.json (a new file, so a new inode) once it accepts the directory
                if not self.accepted and self._inode(self.settings) not in (None, self.old_settings):
                    self.accepted = True
                    self.store.refresh()
                if self.accepted:
                    for stats_path in sorted((self.stage / STATE_DIR).glob("*.tar.json")):
                        if self.done.is_set():
                            return
                        self._offer(stats_path.name.removesuffix(".json"), stats_path)
        except OSError as e:
            self.error = e

    def _offer(self, name: str, stats_path: Path) -> None:
        tar = self.stage / name
        key = _key(tar, stats_path)
        if key is None or self.seen.get(name) == key:  # polls cost a stat per shard, not a read
            return
        self.seen[name] = key
        try:
            stats = read_json(stats_path, "shard stats file")
        except (OSError, InputError):
            return
        if not isinstance(stats, dict) or stats.get("bytes") != key[2]:
            return
        try:
            if sha256(tar) != stats.get("sha256"):
                return  # a shard being rewritten: its new stats file comes last
            self.store.ensure(name, tar, stats["sha256"], key[2])
        except OSError:
            if tar.exists():
                raise
            return  # a shard of an earlier plan, removed by run_shard: not in the new dataset.json
        if _key(tar, stats_path) != key:
            # The same inode after the upload means the bytes sent are the bytes hashed; another one means they may
            # not be, so the record forgets them (the next poll or the final pass sends the new file).
            self.store.forget(name)


def publish(store: Store, stage: Path, doc: dict) -> None:
    """Every shard of ``doc``, then index.parquet, then dataset.json; then the shards the new plan dropped."""
    store.refresh()
    for sh in doc["shards"]:
        store.ensure(sh["name"], stage / sh["name"], sh["sha256"], sh["bytes"])
    for name in ("index.parquet", "dataset.json"):
        store.ensure(name, stage / name, sha256(stage / name), (stage / name).stat().st_size)
    store.remove_stale({sh["name"] for sh in doc["shards"]} | {"index.parquet", "dataset.json"})


def shard_to_url(s: ShardSettings, url: str, stage: str | Path | None = None, workers: int = 1,
                 overwrite: bool = False, progress: bool = True) -> dict:
    """``run_shard`` into ``stage`` with each shard uploaded to ``url`` as it is done; returns the dataset.json
    document, its ``last_run`` counting the files ``uploaded`` and those ``already_in_store``. Raises ShardError."""
    stage = Path(stage).expanduser() if stage else default_stage(url)
    store = Store(url, stage, progress)
    try:
        doc = _shard_and_upload(store, s, stage, workers, overwrite, progress)
    finally:
        store.close()
    files = {sh["name"] for sh in doc["shards"]} | {"index.parquet", "dataset.json"}
    sent = len(files & store.sent)
    return doc | {"last_run": doc["last_run"] | {"uploaded": sent, "already_in_store": len(files) - sent}}


def _shard_and_upload(store: Store, s: ShardSettings, stage: Path, workers: int, overwrite: bool,
                      progress: bool) -> dict:
    try:
        store.probe()
    except OSError as e:
        raise store.refused(e, started=False) from None
    uploader = Uploader(store, stage)
    uploader.start()
    try:
        doc = run_shard(s, stage, workers=workers, overwrite=overwrite, progress=progress)
    finally:
        uploader.done.set()  # after an error the thread (a daemon) is not waited for: S3 shows nothing half-sent
    uploader.join()
    try:
        if uploader.error is not None:
            raise uploader.error
        publish(store, stage, doc)
    except OSError as e:
        raise store.refused(e, started=True) from None
    return doc
