"""ssau's local MLflow store: ``sqlite:///DIR/mlflow.db`` with its artifacts in ``DIR/mlartifacts/``.

MLflow writes an experiment's artifact location, and every run's artifact URI, as absolute paths into the database.
A store copied or moved elsewhere (``mlflow.db`` plus ``mlartifacts/``) would then list no artifacts, or list the
original folder's, and new runs in the copy would write into the original folder. ssau makes its store
relocatable: whenever it opens a local store (``ssau train``/``compare``/``cv``/``upload`` starting a run,
``ssau ui``), the experiments whose artifact location is an ``mlartifacts`` folder other than the one beside the
database, with the one beside it present, are pointed at it (experiments, runs and logged models, in one
transaction), and one line says so. Locations of any other shape (a server's ``mlflow-artifacts:``, a bucket, a
folder a user chose) are left alone. A database copied without its ``mlartifacts/`` keeps reading the original
folder, and one line says that too.

Two processes opening a brand-new store at once both run MLflow's schema migration and one of them fails (duplicate
column, ``_alembic_tmp_*`` already exists, "expected to match one row" in alembic_version), and both may create
the experiment. ``opening`` holds an exclusive ``flock`` on the database's directory while a process opens the store
(creating or migrating it, relocating it, getting or creating its experiment): the second one waits a moment,
then finds the tables made. The lock is on the directory, not a ``mlflow.db.lock`` file, so nothing is left beside
the store.

A database another process holds locked (an ``mlflow gc``, a copy, a long write) makes each MLflow statement wait
SQLite's busy timeout (20 s, set by MLflow), then fail; MLflow logs that failure with a 70-line SQLAlchemy
traceback before it raises. The tracker retries and says so in one line per wait, so ``quiet_lock_waits`` drops
MLflow's log record for a lock (and only for a lock: any other database error keeps its traceback).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlparse

ARTIFACTS = "mlartifacts"
SQLITE = "sqlite:///"


def database(uri: str) -> Path | None:
    """The database file of a local SQLite store (None for a server or another database)."""
    return Path(uri[len(SQLITE):]).resolve() if uri.startswith(SQLITE) else None


@contextmanager
def opening(uri: str) -> Iterator[None]:
    """Hold the store's directory lock while this process opens a local SQLite store (nothing for any other URI)."""
    db = database(uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(db.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd is closed, also when the process dies
        except OSError as e:  # NFS emulates flock with POSIX locks, which a directory opened read-only cannot
            if e.errno not in (errno.EBADF, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):  # take: open unlocked,
                raise  # as before this lock existed
        yield
    finally:
        os.close(fd)


def locked(e: BaseException | None) -> bool:
    """Whether ``e`` (an MlflowException, or what it wraps) is SQLite saying that another process holds the lock."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if "database is locked" in str(e) or "database table is locked" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


class _LockWaits(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and locked(record.exc_info[1]))


def quiet_lock_waits() -> None:
    """Drop MLflow's traceback for a locked database (the tracker prints one line per wait instead); idempotent."""
    log = logging.getLogger("mlflow.store.db.utils")
    if not any(isinstance(f, _LockWaits) for f in log.filters):
        log.addFilter(_LockWaits())


def artifact_root(uri: str) -> str | None:
    """Where a new experiment of this store keeps its artifacts: beside the database (MLflow's default would be
    ./mlruns under whatever directory the command runs in); None: the server decides."""
    db = database(uri)
    return (db.parent / ARTIFACTS).as_uri() if db else None


def _folder(location: str) -> Path | None:
    """The local folder of a file: URI or plain path; None for any other scheme."""
    u = urlparse(location)
    if u.scheme == "file":
        return Path(unquote(u.path))
    return Path(location) if not u.scheme and location.startswith("/") else None


def relocate(uri: str) -> str:
    """Point a copied or moved store's experiments at the ``mlartifacts/`` beside its database. Returns the line to
    print ("" when nothing was to do)."""
    db = database(uri)
    if db is None or not db.is_file():
        return ""
    here = db.parent / ARTIFACTS
    try:
        con = sqlite3.connect(db, timeout=60)
    except sqlite3.Error:
        return ""  # MLflow itself says what is wrong with the file when it opens it
    try:
        try:
            rows = con.execute("SELECT experiment_id, artifact_location FROM experiments").fetchall()
        except sqlite3.DatabaseError:
            return ""  # a new or foreign database: MLflow creates or refuses it
        moved = []
        for exp_id, location in rows:
            folder = _folder(location or "")
            if folder is not None and folder.name == ARTIFACTS and folder != here:
                moved.append((exp_id, location, folder))
        if not moved:
            return ""
        if not here.is_dir():
            olds = ", ".join(sorted({str(f) for _, _, f in moved}))
            return (f"ssau: warning: {db} keeps its artifacts in {olds}, and {here} does not exist: copy the "
                    f"{ARTIFACTS}/ folder beside the database to move the store")
        new = here.as_uri()
        runs = 0
        with con:  # one transaction: all or nothing
            for exp_id, old, _ in moved:
                con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?", (new, exp_id))
                runs += con.execute("UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) "
                                    "WHERE experiment_id = ? AND substr(artifact_uri, 1, ?) = ?",
                                    (new, len(old) + 1, exp_id, len(old) + 1, old + "/")).rowcount
                try:
                    con.execute("UPDATE logged_models SET artifact_location = ? || substr(artifact_location, ?) "
                                "WHERE experiment_id = ? AND substr(artifact_location, 1, ?) = ?",
                                (new, len(old) + 1, exp_id, len(old) + 1, old + "/"))
                except sqlite3.OperationalError:
                    pass  # an older schema without logged models
        olds = ", ".join(sorted({str(f) for _, _, f in moved}))
        return (f"ssau: {db} was copied or moved from where it kept its artifacts ({olds}): {len(moved)} "
                f"experiment(s) and {runs} run(s) now keep them in {here}")
    finally:
        con.close()
