"""MLflow tracking, from rank 0 only (metrics are reduced across ranks before they get here).

The default store is ``sqlite:///mlflow.db`` in the working directory; rank 0 creates it (schema migration) before
any other rank goes on, because several processes migrating a brand-new SQLite store at once fail. Every method logs
the same metric names, so the MLflow UI compares them side by side.

Tracking never stops training. Each record (params, metrics, tags, artifacts, status) is first appended to the run
directory's journal, ``tracking.jsonl`` (see ``ssau/tracking/journal.py``), then queued; one background thread delivers the
queue in order and, while the server is away, retries with capped exponential backoff (0.5 s doubling to 15 s), so
a log call returns at once and delivery resumes, in order, when the server answers again. MLflow's own HTTP retries
(7 retries with backoff, minutes per request, which stalled training for 4 minutes) are turned off for this process
unless the user set ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``/``_TIMEOUT``/``_BACKOFF_FACTOR``. A record the server keeps
refusing is dropped from the queue (never from the journal) so that it cannot hold up the rest. ``end()`` waits up
to ``tracking.flush_timeout`` seconds; what is still undelivered stays in the journal, one line on stderr says how
much and prints the ``ssau upload <run_dir>`` command that sends it, and the run ends normally.

A fresh run needs its run id from the server, so an unreachable server at the start of a fresh run fails at once
with one line. A resumed run has its run id from the checkpoint: it trains on with the server down and delivers
later. A local SQLite store that another process holds locked is waited for the same way, one line per wait (each try
waits SQLite's 20 s busy timeout; MLflow's own traceback for it is dropped, ssau/tracking/store.py), and the first
start on a new store creates it under a lock, so that runs starting together do not migrate it twice.

One value per metric and step: a (metric key, step) already in the run's journal is never logged again, and the
first value is kept. A run killed at step 58 and resumed from its step-50 checkpoint recomputes steps 51-58; MLflow
has no API to delete or replace a logged metric value (logging again appends a second point at the same step), so
the only way to keep one value per step is never to send the second. Params are likewise logged once per run.
"""

from __future__ import annotations

import os
import shlex
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from itertools import islice
from pathlib import Path

import numpy as np

from ssau.config import TrackingConfig
from ssau.errors import ConfigError, JournalError
from ssau.predict.mlflow_log import log_model as log_pyfunc
from ssau.tracking.journal import Journal, Sender, Steps, groups, pending, read_delivered, reason
from ssau.tracking.journal import verdict as verdict_of
from ssau.tracking.store import artifact_root, database, locked, opening, quiet_lock_waits, relocate

MAX_WAIT = 15.0  # seconds between retries at most while the server is away
REFUSALS = 8  # a record the server answers with an error this many times is dropped (it stays in the journal)


def check_uri(uri: str, reach: bool = True) -> None:
    """Fail fast, with one line, on a tracking URI that cannot work (``reach``: also ask an http server's /health)."""
    if uri.startswith(("http://", "https://")):
        if not reach:
            return
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as r:
                if r.status != 200:
                    raise ConfigError(f"tracking.uri: {uri} answered {r.status} on /health")
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ConfigError(f"tracking.uri: MLflow server {uri} is unreachable ({reason})") from None
    elif uri.startswith("sqlite:///"):
        parent = Path(uri[len("sqlite:///"):]).resolve().parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise ConfigError(f"tracking.uri: {parent} is not a writable directory for the SQLite store")
    elif not uri.startswith(("databricks", "postgresql", "mysql", "mssql")):
        raise ConfigError(f"tracking.uri: {uri!r} is not an http(s):// server or a database URI "
                          "(the ./mlruns file store is refused by MLflow 3)")


def absolute_uri(uri: str) -> str:
    """A SQLite URI with its path made absolute, so `ssau upload` finds the store from any directory."""
    if uri.startswith("sqlite:///"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def quiet_http(retries: int = 0) -> None:
    """MLflow retries a failed request 7 times with backoff (about 4 minutes) and waits 120 s for an answer; our own
    queue retries instead, so keep each request short, unless the user chose these settings."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


class Tracker:
    """One MLflow run behind a journal and a delivery queue; nothing global (mlflow.active_run) leaks between runs.

    ``journal``: the run directory's tracking.jsonl (None: records live only in the queue, as for ``ssau cv``'s
    parent run)."""

    def __init__(self, cfg: TrackingConfig, journal: Path | None = None):
        check_uri(cfg.uri, reach=False)
        if cfg.uri.startswith(("http://", "https://")):
            quiet_http()
        if database(cfg.uri):
            quiet_lock_waits()
        self.cfg, self.uri = cfg, cfg.uri
        self.journal = Journal(journal) if journal else None
        self.run_id: str | None = None
        self._client = None
        self._seq, self._seen, self._params = 0, {}, set()
        self._queue: deque = deque()  # (record, uncertain: it may already have reached the server)
        self._cv, self._wake, self._mark_lock = threading.Condition(), threading.Event(), threading.Lock()
        self._upto, self._dropped, self._marked = 0, set(), 0.0
        self._stop = self._hurry = self._ended = self._away = False
        self._error, self._thread = "", None

    # ------------------------------------------------------------------------------------------------ run
    def start(self, name: str, tags: dict, parent_run_id: str = "") -> str:
        """Create the run (the server must answer: this is the start-of-run check)."""
        from mlflow.tracking import MlflowClient

        check_uri(self.uri)
        with opening(self.uri):  # one process at a time creates a new store and its experiment (store.py)
            self._client = client = MlflowClient(tracking_uri=self.uri)  # creates/migrates the store
            exp = client.get_experiment_by_name(self.cfg.experiment)
            if line := relocate(self.uri):  # a copied store: its runs write beside the copy, not into the original
                self._say(line)
                exp = client.get_experiment_by_name(self.cfg.experiment)
            if exp is None:  # artifacts beside a local database (store.py); a server chooses its own location
                experiment_id = client.create_experiment(self.cfg.experiment,
                                                         artifact_location=artifact_root(self.uri))
            else:
                experiment_id = exp.experiment_id
        tags = {k: str(v) for k, v in tags.items()}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = client.create_run(experiment_id, run_name=name, tags=tags)
        self.run_id = run.info.run_id
        self._record("run", {"uri": absolute_uri(self.uri), "experiment": self.cfg.experiment,
                             "experiment_id": experiment_id, "name": name, "tags": tags,
                             "start_time": run.info.start_time}, queue=False)
        self._upto = self._seq
        self._start_worker()
        return self.run_id

    def resume(self, run_id: str) -> None:
        """Continue ``run_id`` (from a checkpoint) without asking the server: the journal says which metric steps
        and params the run holds, and its records not known delivered are queued again first (de-duplicated)."""
        self.run_id = run_id
        records = []
        if self.journal:
            try:
                records = [r for r in self.journal.records() if r["run_id"] == run_id]
            except JournalError as e:
                self._say(f"ssau: warning: {e}; metric steps logged before the restart may be logged again")
        for r in records:
            self._seq = max(self._seq, r["seq"] + 1)
            if r["kind"] == "metrics":
                for k in r["payload"]["values"]:
                    self._seen.setdefault(k, Steps()).add(r["payload"]["step"])
            elif r["kind"] == "params":
                self._params.update(r["payload"]["params"])
        if self.journal:
            state = read_delivered(self.journal.dir).get(run_id) or {}
            self._upto, self._dropped = state.get("upto", 0), set(state.get("dropped", ()))
            self._queue.extend((r, True) for r in pending(records, state) if r["kind"] != "run")
        if not any(r["kind"] == "run" for r in records):  # so that `ssau upload` can find or re-create the run
            self._record("run", {"uri": absolute_uri(self.uri), "experiment": self.cfg.experiment, "name": "",
                                 "tags": {}}, queue=False)
        try:
            check_uri(self.uri)
        except ConfigError as e:
            self._away = True
            self._say(f"ssau: warning: {e}; training goes on and the run's records are sent when it answers")
        self._record("status", {"status": "RUNNING"})
        self._start_worker()

    def end(self, status: str = "FINISHED") -> int:
        """Mark the run ``status`` (FINISHED, FAILED, KILLED), wait up to tracking.flush_timeout for the queue, and
        return how many records were not delivered (one line on stderr says how to send them)."""
        if self._ended or self.run_id is None:
            return 0
        self._record("status", {"status": status, "end_time": int(time.time() * 1000)})
        self._ended = True
        deadline = time.monotonic() + max(0.0, self.cfg.flush_timeout)
        self._hurry = True
        self._wake.set()
        with self._cv:
            while self._queue and self._thread.is_alive() and (left := deadline - time.monotonic()) > 0:
                self._cv.wait(timeout=min(left, 0.5))
            undelivered = len(self._queue) + len(self._dropped)
            self._stop = True
            self._cv.notify_all()
        self._wake.set()
        self._mark(force=True)
        if self.journal:
            self.journal.close()
        if undelivered:
            why = f" ({self._error})" if self._error else ""
            if self.journal:
                self._say(f"ssau: tracking: {undelivered} records not delivered to {self.uri}{why}; they are kept in "
                          f"{self.journal.path}; send them with: ssau upload {shlex.quote(str(self.journal.dir))}")
            else:
                self._say(f"ssau: tracking: {undelivered} records not delivered to {self.uri}{why} (no journal)")
        return undelivered

    def log_model(self, model_pt: Path, card: dict, aus: tuple[int, ...]) -> str:
        """``model_pt`` as the artifact ``model/model.pt`` (through the journal) and, with ``tracking.log_model``,
        as the run's MLflow pyfunc model ``model`` (``ssau.predict.mlflow_log``; registered as
        ``tracking.register_as`` if set), logged now, not through the journal (``ssau upload`` does not carry it).
        A failure of the latter is one warning line, never the run's end: model.pt stays in the run directory and
        its plain artifact. Returns the model URI or ''."""
        self.log_artifact(model_pt, "model")
        if not self.cfg.log_model:
            return ""
        try:
            check_uri(self.uri)  # one quick question first: MLflow's own client retries for minutes
            return log_pyfunc(model_pt, card, aus, self.run_id, self.uri, self.cfg.register_as)
        except Exception as e:  # noqa: BLE001 - MLflow's own errors (store, registry, environment) end nothing here
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            self._say(f"ssau: warning: the MLflow model was not logged ({why}); {model_pt} is the model")
            return ""

    # ------------------------------------------------------------------------------------------------ logging
    def log_params(self, params: dict) -> None:
        params = {k: str(v)[:6000] for k, v in sorted(params.items()) if k not in self._params}
        if params:
            self._params.update(params)
            self._record("params", {"params": params})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        values = {}
        for k, v in metrics.items():
            if v is None or not np.isfinite(v):
                continue
            steps = self._seen.setdefault(k, Steps())
            if step in steps:  # already logged (a resumed run recomputing steps): keep the first value
                continue
            steps.add(step)
            values[k] = float(v)
        if values:
            self._record("metrics", {"step": int(step), "timestamp": int(time.time() * 1000), "values": values})

    def log_tags(self, tags: dict) -> None:
        self._record("tags", {"tags": {k: str(v) for k, v in tags.items()}})

    def log_inputs(self, datasets: list[dict]) -> None:
        """MLflow dataset inputs (ssau.data.sources.dataset_inputs: name, digest, source, profile, tags)."""
        if datasets:
            self._record("inputs", {"datasets": datasets})

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        where = self.journal.relative(Path(path)) if self.journal else str(Path(path).resolve())
        self._record("artifact", {"path": where, "folder": folder})

    def _record(self, kind: str, payload: dict, queue: bool = True) -> None:
        if self.run_id is None:
            raise RuntimeError("Tracker: start() or resume() first")
        if self._ended:
            return
        rec = {"seq": self._seq, "kind": kind, "run_id": self.run_id, "payload": payload}
        self._seq += 1
        if self.journal:
            try:
                self.journal.append(rec)
            except OSError as e:  # a full disk must not stop training either; the queue still delivers it
                if not self._error.startswith("journal"):
                    self._error = f"journal: {e.strerror or e}"
                    self._say(f"ssau: warning: cannot append to {self.journal.path} ({e.strerror or e})")
        if queue:
            with self._cv:
                self._queue.append((rec, False))
                self._cv.notify_all()

    # ------------------------------------------------------------------------------------------------ delivery
    def _start_worker(self) -> None:
        # daemon: a crashed training process exits at once; the journal holds whatever was not delivered
        self._thread = threading.Thread(target=self._work, name="ssau-tracking", daemon=True)
        self._thread.start()

    def _take(self) -> tuple[list[dict], bool]:
        """The queue's first group (see journal.groups) and whether any of it may already have been delivered."""
        group = next(groups(r for r, _ in self._queue))
        return group, any(unsure for _, unsure in islice(self._queue, len(group)))

    def _work(self) -> None:
        from mlflow.tracking import MlflowClient

        sender, tries, refusals = None, 0, 0
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                group, uncertain = self._take()
            began = time.monotonic()
            try:
                if sender is None:
                    sender = Sender(self._client or MlflowClient(tracking_uri=self.uri), self.run_id,
                                    self.journal.dir if self.journal else None)
                sender.send(group, dedupe=uncertain or tries > 0)  # a failed request may have been applied
                dropped = False
            except Exception as e:  # noqa: BLE001 - whatever goes wrong here, training goes on
                verdict = verdict_of(e)
                self._error = reason(e)
                tries += 1
                refusals += verdict == "refused"
                if verdict == "wait" or (verdict == "refused" and refusals < REFUSALS):
                    if verdict == "wait" and locked(e):  # each try waited SQLite's busy timeout: one line each
                        self._away = True
                        kept = f"in {self.journal.path}" if self.journal else "in memory"
                        self._say(f"ssau: tracking: {database(self.uri)} is locked by another process (waited "
                                  f"{time.monotonic() - began:.0f} s); the records wait {kept} and are sent when it "
                                  "is free")
                    elif verdict == "wait" and not self._away:
                        self._away = True
                        self._say(f"ssau: warning: tracking server {self.uri} is not answering ({self._error}); "
                                  "training goes on, records are kept and sent when it answers")
                    self._wake.wait(min(1.0 if self._hurry else MAX_WAIT, 0.5 * 2 ** min(tries - 1, 6)))
                    self._wake.clear()
                    continue
                dropped = True
                if not self._dropped:  # the first refusal only: a deleted run would refuse every record
                    self._say(f"ssau: warning: tracking: {self.uri} refused one {group[0]['kind']} record "
                              f"({self._error}); it stays in the journal for `ssau upload`")
            if self._away and not dropped:
                self._away = False
                self._say(f"ssau: tracking: {self.uri} answers again; delivering the queued records")
            tries = refusals = 0
            with self._cv:
                for r in group:
                    self._queue.popleft()
                    (self._dropped.add if dropped else self._dropped.discard)(r["seq"])
                self._upto = max(self._upto, group[-1]["seq"] + 1)
                self._cv.notify_all()
            self._mark(force=not self._queue)

    def _mark(self, force: bool = False) -> None:
        """Write the delivery sidecar: at most once a second, and whenever the queue is empty."""
        if not self.journal or not self.run_id or (not force and time.monotonic() - self._marked < 1.0):
            return
        with self._mark_lock:
            with self._cv:  # snapshot under the lock that orders the writes, so a later write is never older
                upto, dropped = self._upto, set(self._dropped)
            try:
                self.journal.mark_delivered(self.run_id, upto, dropped)
            except OSError:
                pass  # the sidecar only saves de-duplication work; records past it are re-sent de-duplicated
            self._marked = time.monotonic()

    @staticmethod
    def _say(line: str) -> None:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)  # between progress-bar redraws


