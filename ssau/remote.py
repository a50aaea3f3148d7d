"""Shard directories at fsspec URLs (issue 27): ``s3://bucket/prefix``, ``gs://...``, ``https://host/path`` wherever a
shard directory is accepted. Needs the ``cloud`` extra (fsspec, s3fs, gcsfs; HTTP needs only aiohttp).

- Credentials and endpoints come from the libraries' own sources (environment, ``~/.aws``, ``AWS_ENDPOINT_URL``,
  gcloud's), never from ssau's config: nothing ssau logs can hold them. ``public`` is the form a URL is shown and
  logged in (user info and query dropped: a presigned URL's signature is a credential).
- Metadata: a remote directory's ``dataset.json`` and ``index.parquet`` are fetched once per process into a local
  folder (``meta_dir``), and the readers go on as for a local directory. Shard sizes come from one listing.
- Shards are read sequentially (``RemoteReader``): ranged reads of ``READ_AHEAD`` bytes ahead for S3 and GCS (the
  read-ahead bound per worker), one streamed GET for HTTP. A transient error (connection reset or refused, 5xx,
  throttling) reopens the object at the byte it stopped at, with exponential backoff, for up to ``retry_s`` seconds
  (``data.remote_retry``); a missing object or a refused permission is not retried. What still fails is an OSError
  for the reader's handler: the shard is skipped and counted, as a damaged local one.
- ``data.cache_dir``: each remote shard is downloaded whole (temporary name, then rename) on first read and read
  from disk after, for the next epoch or run; the least recently read shards are removed above ``cache_gb``. The
  cache key is the URL with the object's size and ETag, so a re-sharded corpus is fetched again.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, TypeVar

from ssau.errors import ConfigError

READ_AHEAD = 8 << 20  # bytes read ahead per open shard (S3 / GCS ranged reads)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
T = TypeVar("T")


@dataclass
class Settings:
    cache_dir: str | None = None
    cache_gb: float = 50.0
    retry_s: float = 60.0


SETTINGS = Settings()  # set by ``configure`` in the main process before DataLoader workers fork (they inherit it)
_META: dict[str, Path] = {}  # remote directory -> local folder with its metadata (this process)
_SIZES: dict[str, dict[str, int]] = {}  # remote directory -> {file name: bytes}
_READ = [0]  # bytes this process read from remote objects (``bytes_read``)


def bytes_read() -> int:
    """Bytes this process has read from remote objects so far (the streams report MB/s from it)."""
    return _READ[0]


def configure(cache_dir: str | None = None, cache_gb: float = 50.0, retry_s: float = 60.0) -> None:
    SETTINGS.cache_dir, SETTINGS.cache_gb, SETTINGS.retry_s = cache_dir or None, cache_gb, retry_s


def is_remote(path: object) -> bool:
    return bool(_SCHEME.match(str(path))) and not str(path).startswith("file://")


def join(d: str | Path, name: str) -> str:
    """``name`` inside directory ``d`` (a URL keeps its ``//``, which ``Path`` would fold)."""
    return f"{str(d).rstrip('/')}/{name}" if is_remote(d) else str(Path(d) / name)


def public(url: str) -> str:
    """``url`` without user info, query or fragment: what ssau prints and logs."""
    if not is_remote(url):
        return url
    p = urllib.parse.urlsplit(url)
    host = (p.hostname or "") + (f":{p.port}" if p.port else "")
    return urllib.parse.urlunsplit((p.scheme, host, p.path, "", ""))


def _fs(url: str):
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec comes with the base install today; s3fs/gcsfs with [cloud]
        raise ConfigError(f"{public(url)}: reading URLs needs `pip install 'ssau[cloud]'`") from None
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise ConfigError(f"{public(url)}: {str(e).splitlines()[0][:160]} (install `ssau[cloud]`)") from None


def _permanent(e: BaseException) -> bool:
    return isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ConfigError))


def retrying(what: str, fn: Callable[[], T], budget: float | None = None) -> T:
    """``fn()``, again after a transient error with backoff (0.25 s doubling to 8 s) for up to ``budget`` seconds
    (``SETTINGS.retry_s``); then an OSError naming ``what`` and the last error."""
    budget = SETTINGS.retry_s if budget is None else budget
    start, wait = time.monotonic(), 0.25
    while True:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - the stores' clients raise their own zoo (botocore, aiohttp, OSError)
            if _permanent(e):
                raise
            if time.monotonic() - start + wait > budget:
                raise OSError(f"{public(what)}: {type(e).__name__}: {str(e)[:160]} (retried for "
                              f"{time.monotonic() - start:.0f} s)") from None
            time.sleep(wait)
            wait = min(2 * wait, 8.0)


class RemoteReader:
    """A read-only, sequential file over a URL that survives transient errors: after one it reopens the object at
    the byte it had reached (an HTTP server without range requests is read from the start and the bytes already
    read are skipped), so the reader above it sees one unbroken stream."""

    def __init__(self, url: str, size: int | None = None):
        self.url, self.pos, self.f, self.size = url, 0, None, size
        self.http = url.lower().startswith(("http://", "https://"))

    def _open(self) -> BinaryIO:
        fs, path = _fs(self.url)
        if self.http:  # streamed: plain servers do not answer range requests
            f = fs.open(path, "rb", block_size=0)
            left = self.pos
            while left:
                got = len(f.read(min(left, 1 << 20)))
                if not got:
                    raise OSError(f"{public(self.url)}: shorter than before on reopening")
                left -= got
            return f
        known = {"size": self.size} if self.size is not None and self.url.startswith("s3://") else {}  # no HEAD
        f = fs.open(path, "rb", block_size=READ_AHEAD, cache_type="readahead", **known)
        f.seek(self.pos)
        return f

    def read(self, n: int = -1) -> bytes:
        def attempt() -> bytes:
            try:
                if self.f is None:
                    self.f = self._open()
                return self.f.read(n)
            except BaseException:
                self.close()
                raise

        data = retrying(self.url, attempt)
        self.pos += len(data)
        _READ[0] += len(data)
        return data

    def close(self) -> None:
        f, self.f = self.f, None
        if f is not None:
            try:
                f.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass

    def __enter__(self) -> RemoteReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def sizes(d: str) -> dict[str, int]:
    """{file name: bytes} of a remote directory's files, from one listing (kept for the process); a listing without
    sizes (an HTTP server's index page) is completed by one HEAD request a file."""
    if d not in _SIZES:
        fs, path = _fs(d)
        listing = retrying(d, lambda: fs.ls(path, detail=True))
        found = {}
        for e in listing:
            name = str(e["name"]).rstrip("/").rsplit("/", 1)[-1]
            if e.get("type") == "directory" or not name:
                continue
            size = e.get("size")
            if size is None:
                try:
                    size = retrying(d, lambda n=e["name"]: fs.info(n)).get("size")
                except FileNotFoundError:
                    continue
            if size is not None:
                found[name] = int(size)
        _SIZES[d] = found
    return _SIZES[d]


def meta_dir(d: str | Path) -> Path:
    """A local folder holding directory ``d``'s ``dataset.json`` and ``index.parquet`` (``d`` itself when local);
    a remote one's are fetched once per process. A file the directory lacks is absent here too."""
    if not is_remote(d):
        return Path(d)
    d = str(d)
    if d not in _META:
        local = Path(tempfile.mkdtemp(prefix="ssau-meta-"))
        fs, path = _fs(d)
        for name in ("dataset.json", "index.parquet"):
            try:
                data = retrying(d, lambda n=name: fs.cat_file(f"{path.rstrip('/')}/{n}"))
            except FileNotFoundError:
                continue
            (local / name).write_bytes(data)
        _META[d] = local
    return _META[d]


def open_shard(url: str) -> tuple[BinaryIO, int | None]:
    """(binary file, size or None) of a shard: the local file, the cached copy of a remote one (``cache_dir``), or
    a ``RemoteReader``."""
    if not is_remote(url):
        f = open(url, "rb", buffering=1 << 20)  # one read system call per MB, not three per member
        return f, os.fstat(f.fileno()).st_size
    d, name = url.rstrip("/").rsplit("/", 1)
    size = sizes(d).get(name) if d in _SIZES else None
    if SETTINGS.cache_dir:
        path = _cached(url)
        f = open(path, "rb", buffering=1 << 20)
        return f, os.fstat(f.fileno()).st_size
    return RemoteReader(url, size), size


def read_span(url: str, offset: int, size: int) -> bytes:
    """``size`` bytes of a shard from ``offset``: a seek and a read, or one range request (retried)."""
    if not is_remote(url):
        with open(url, "rb") as f:
            f.seek(offset)
            return f.read(size)
    fs, path = _fs(url)
    data = retrying(url, lambda: fs.cat_file(path, start=offset, end=offset + size))
    _READ[0] += len(data)
    return data


def _cached(url: str) -> Path:
    fs, path = _fs(url)
    info = retrying(url, lambda: fs.info(path))
    tag = f"{url}\0{info.get('size')}\0{info.get('ETag') or info.get('etag') or info.get('md5Hash') or ''}"
    root = Path(SETTINGS.cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{hashlib.sha256(tag.encode()).hexdigest()[:32]}.tar"
    if target.is_file():
        os.utime(target)  # recently read: evicted last
        return target
    tmp = root / f".{target.name}.tmp-{os.getpid()}"
    try:
        with RemoteReader(url) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _evict(root, keep=target)
    return target


def _evict(root: Path, keep: Path) -> None:
    """Remove the least recently read shards until the cache holds at most ``cache_gb``."""
    files = []
    for p in root.glob("*.tar"):
        try:
            st = p.stat()
        except FileNotFoundError:  # another worker evicted it
            continue
        files.append((st.st_mtime, st.st_size, p))
    total, cap = sum(s for _, s, _ in files), SETTINGS.cache_gb * 2**30
    for _, size, p in sorted(files, key=lambda t: t[0]):
        if total <= cap:
            break
        if p != keep:
            p.unlink(missing_ok=True)  # a reader that has it open keeps reading (POSIX)
            total -= size
