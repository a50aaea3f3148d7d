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

import atexit
import hashlib
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
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
_TAGS: dict[str, str] = {}  # remote shard -> its size and ETag, from the listing (the cache key)


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
    """``url`` without user info or query (a presigned URL's signature is a credential): what ssau prints and logs.
    The host keeps its case and brackets, a key its ``#``."""
    if not is_remote(url):
        return url
    scheme, rest = url.split("://", 1)
    host, slash, path = rest.partition("/")
    return f"{scheme}://{host.rsplit('@', 1)[-1]}{slash}{path.split('?', 1)[0]}"


def has_credentials(url: str) -> bool:
    """True for a URL that carries user info or a query: credentials ssau refuses to take from a path."""
    return is_remote(url) and public(url) != url


def filesystem(url: str):
    """(fsspec filesystem, path) of a URL; ConfigError, one line, for one that carries credentials or that no
    installed filesystem reads."""
    if has_credentials(url):
        raise ConfigError(f"{public(url)}: the URL carries credentials (user info or a query); give them to the "
                          f"store's library instead (environment, ~/.aws, gcloud), never in a path")
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec comes with the base install today; s3fs/gcsfs with [cloud]
        raise ConfigError(f"{public(url)}: reading URLs needs `pip install 'ssau[cloud]'`") from None
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise ConfigError(f"{public(url)}: {str(e).splitlines()[0][:160]} (install `ssau[cloud]`)") from None


_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}


def _permanent(e: BaseException) -> bool:
    """Errors no retry cures: a missing object or permission, missing credentials, a 4xx answer other than 408 and
    429 (throttling), and programming errors. The rest (connection refused or reset, timeouts, 5xx) is retried."""
    status = getattr(e, "status", None)  # aiohttp's ClientResponseError (HTTP)
    return (isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ConfigError,
                           TypeError, AttributeError, NameError, KeyError, AssertionError))
            or type(e).__name__ in _NO_CREDENTIALS
            or (isinstance(status, int) and 400 <= status < 500 and status not in (408, 429)))


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
                if isinstance(e, (OSError, ConfigError, TypeError, AttributeError, NameError, KeyError,
                                  AssertionError)):
                    raise  # OSErrors as they are; the others are ssau's own (configuration, bugs)
                raise PermissionError(f"{public(what)}: {type(e).__name__}: {str(e)[:160]}") from None
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
        fs, path = filesystem(self.url)
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
        """``n`` bytes, fewer only at the end of the object (a streamed HTTP body returns what has arrived: the
        reads are repeated until ``n`` is reached)."""
        def attempt() -> bytes:
            try:
                if self.f is None:
                    self.f = self._open()
                return self.f.read(n if n < 0 else n - len(got))
            except BaseException:
                self.close()
                raise

        got = bytearray()
        while n < 0 or len(got) < n:
            data = retrying(self.url, attempt)
            self.pos += len(data)
            _READ[0] += len(data)
            got += data
            if not data or n < 0:
                break
        return bytes(got)

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
    """{file name: bytes} of a remote directory's files, from one listing (kept for the process, with each entry's
    ETag for the cache); a server without listings (404, or a page without links) gives {} here and ``size_of``
    asks per file."""
    if d not in _SIZES:
        fs, path = filesystem(d)
        try:
            listing = retrying(d, lambda: fs.ls(path, detail=True))
        except (FileNotFoundError, NotADirectoryError):
            listing = []
        found = {}
        for e in listing:
            name = str(e["name"]).rstrip("/").rsplit("/", 1)[-1]
            if e.get("type") != "directory" and name and e.get("size") is not None:
                found[name] = int(e["size"])
                _TAGS[join(d, name)] = _tag(e)
        _SIZES[d] = found
    return _SIZES[d]


def size_of(url: str) -> int | None:
    """A remote shard's size: from its directory's listing, else one HEAD request (kept); None if it is missing."""
    d, name = url.rstrip("/").rsplit("/", 1)
    listed = sizes(d)
    if name not in listed:
        fs, path = filesystem(url)
        try:
            info = retrying(url, lambda: fs.info(path))
        except FileNotFoundError:
            return None
        if info.get("size") is None:
            return None
        listed[name] = int(info["size"])
        _TAGS[url] = _tag(info)
    return listed[name]


def _tag(entry: dict) -> str:
    """What tells two versions of an object apart: its size and ETag (S3), md5Hash (GCS) or Last-Modified (HTTP)."""
    return "\0".join(str(entry.get(k) or "") for k in ("size", "ETag", "etag", "md5Hash", "Last-Modified"))


def meta_dir(d: str | Path) -> Path:
    """A local folder holding directory ``d``'s ``dataset.json`` and ``index.parquet`` (``d`` itself when local);
    a remote one's are fetched once per process. A file the directory lacks is absent here too."""
    if not is_remote(d):
        return Path(d)
    d = str(d)
    if d not in _META:
        local = Path(tempfile.mkdtemp(prefix="ssau-meta-"))
        atexit.register(shutil.rmtree, local, True)  # at the process's exit (forked workers leave by os._exit)
        fs, path = filesystem(d)
        for name in ("dataset.json", "index.parquet"):
            try:
                data = retrying(d, lambda n=name: fs.cat_file(f"{path.rstrip('/')}/{n}"))
            except (FileNotFoundError, IsADirectoryError):
                continue
            (local / name).write_bytes(data)
        if not (local / "dataset.json").is_file():
            return local  # not kept: a directory being sharded may have its dataset.json soon
        _META[d] = local
    return _META[d]


def open_shard(url: str) -> tuple[BinaryIO, int | None]:
    """(binary file, size or None) of a shard: the local file, the cached copy of a remote one (``cache_dir``), or
    a ``RemoteReader``."""
    if not is_remote(url):
        f = open(url, "rb", buffering=1 << 20)  # one read system call per MB, not three per member
        return f, os.fstat(f.fileno()).st_size
    d, name = url.rstrip("/").rsplit("/", 1)
    size = _SIZES[d].get(name) if d in _SIZES else None
    if SETTINGS.cache_dir:
        f = _cached(url)
        return f, os.fstat(f.fileno()).st_size
    return RemoteReader(url, size), size


def read_span(url: str, offset: int, size: int) -> bytes:
    """``size`` bytes of a shard from ``offset``: a seek and a read, or one range request (retried)."""
    if not is_remote(url):
        with open(url, "rb") as f:
            f.seek(offset)
            data = f.read(size)
    else:
        fs, path = filesystem(url)
        data = retrying(url, lambda: fs.cat_file(path, start=offset, end=offset + size))
        _READ[0] += len(data)
    if len(data) != size:  # a server that ignores Range sends the whole object; a cut one sends less
        raise OSError(f"{public(url)}: asked for bytes {offset}..{offset + size}, got {len(data)} bytes (the server "
                      f"does not answer range requests, or the shard is shorter than its index says)")
    return data


def _cached(url: str) -> BinaryIO:
    """The open cached copy of a remote shard, downloaded first if the cache lacks it. Opened before it is touched
    (its modification time marks it recently read): a file another worker evicts meanwhile is downloaded again."""
    tag = _TAGS.get(url)
    if tag is None:  # a shard its directory's listing did not show: one HEAD request
        fs, path = filesystem(url)
        tag = _TAGS[url] = _tag(retrying(url, lambda: fs.info(path)))
    root = Path(SETTINGS.cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{hashlib.sha256(f'{url}{chr(0)}{tag}'.encode()).hexdigest()[:32]}.tar"
    for _ in range(3):
        try:
            f = open(target, "rb", buffering=1 << 20)
        except FileNotFoundError:
            _download(url, target, tag.split(chr(0), 1)[0])
            continue
        os.utime(f.fileno())  # recently read: evicted last
        return f
    raise OSError(f"{public(url)}: its cached copy in {root} was removed three times while being opened")


def _download(url: str, target: Path, size: str) -> None:
    """``url`` into ``target`` through a temporary name (host and pid and a random part: several nodes may share a
    cache), checked against the listed size, then the cache trimmed to its cap."""
    tmp = target.with_name(f".{target.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with RemoteReader(url) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        if size and tmp.stat().st_size != int(size):
            raise OSError(f"{public(url)}: downloaded {tmp.stat().st_size} bytes, the store lists {size}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _evict(target.parent, keep=target)


def _evict(root: Path, keep: Path) -> None:
    """Remove the least recently read shards until the cache holds at most ``cache_gb``, and temporary files over an
    hour old (left by a killed download)."""
    files, now = [], time.time()
    for p in root.glob("*.tar*"):
        try:
            st = p.stat()
        except FileNotFoundError:  # another worker removed it
            continue
        if ".tmp-" in p.name:
            if now - st.st_mtime > 3600:
                p.unlink(missing_ok=True)
            continue
        files.append((st.st_mtime, st.st_size, p))
    total, cap = sum(s for _, s, _ in files), SETTINGS.cache_gb * 2**30
    for _, size, p in sorted(files, key=lambda t: t[0]):
        if total <= cap:
            break
        if p != keep:
            p.unlink(missing_ok=True)  # a reader that has it open keeps reading (POSIX)
            total -= size
