"""The run directory's tracking journal and the sending of its records (the replay of ``ssau upload`` is in
ssau/tracking/upload.py).

``<run_dir>/tracking.jsonl`` holds everything a run logs to MLflow, one JSON object a line, appended (one write,
then flushed to the OS) before the record is queued for the server, so a crash, an outage or ``kill -9`` never loses
logged work. A record is self-describing::

    {"seq": 7, "kind": "metrics", "run_id": "3f2a...", "payload": {"step": 12, "timestamp": 1718000000000,
                                                                    "values": {"train/supervised/loss": 0.41}}}

``kind`` is one of run (the run's creation: uri, experiment, name, tags, start time), params, metrics, tags,
artifact (a file path, relative to the run directory when inside it, and the artifact folder), inputs (MLflow
dataset inputs: the shard sets the run reads, see ssau.data.sources.dataset_inputs) or status. ``seq``
counts the run's records; one journal may hold several runs (a run directory restarted from scratch). A kill can
leave the last line torn (a full disk, a line cut short): readers skip and count such lines, and a resumed run cuts it off before appending.

``tracking.delivered.json`` (written atomically) says, per run id, how many of the run's records reached its server
(``upto``: every seq below it, except those in ``dropped``: records the server refused). Records past ``upto`` may or
may not have arrived (a kill between delivery and the sidecar write), so they are re-sent with de-duplication:
metric steps the server already holds (``get_metric_history``) are left out, and params, tags, artifacts and status
are compared first. ``upload`` always de-duplicates, so running it twice sends nothing the second time.
"""

from __future__ import annotations

import json
import os
from array import array
from bisect import bisect_left, insort
from collections.abc import Iterable, Iterator
from pathlib import Path

from ssau.errors import JournalError, Undeliverable
from ssau.io import atomic_write

JOURNAL = "tracking.jsonl"
SIDECAR = "tracking.delivered.json"
KINDS = ("run", "params", "metrics", "tags", "artifact", "inputs", "status")
MAX_METRICS, MAX_PARAMS = 1000, 100  # what one MLflow log_batch request may carry
_TRANSIENT = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}


# ---------------------------------------------------------------------------------------------------- the file
def _parse(line: bytes) -> dict | None:
    try:
        rec = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    ok = (isinstance(rec, dict) and rec.get("kind") in KINDS and isinstance(rec.get("run_id"), str)
          and isinstance(rec.get("seq"), int) and isinstance(rec.get("payload"), dict))
    return rec if ok and _payload_ok(rec["kind"], rec["payload"]) else None


def _payload_ok(kind: str, p: dict) -> bool:
    """Each kind's payload has the fields and types the replay uses (a hand-edited or damaged line is skipped)."""
    flat = lambda d: isinstance(d, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in d.items())  # noqa: E731
    if kind == "metrics":
        v = p.get("values")
        return (type(p.get("step")) is int and type(p.get("timestamp", 0)) is int and isinstance(v, dict)
                and all(isinstance(k, str) and type(x) in (int, float) for k, x in v.items()))
    if kind in ("params", "tags"):
        return flat(p.get(kind))
    if kind == "artifact":
        return isinstance(p.get("path"), str) and (p.get("folder") is None or isinstance(p.get("folder"), str))
    if kind == "inputs":
        keys = ("name", "digest", "source_type", "source", "profile")
        d = p.get("datasets")
        return isinstance(d, list) and all(isinstance(x, dict) and all(isinstance(x.get(k), str) for k in keys)
                                           and flat(x.get("tags", {})) for x in d)
    if kind == "status":
        return p.get("status") in ("RUNNING", "FINISHED", "FAILED", "KILLED")
    return isinstance(p.get("uri"), str) and flat(p.get("tags", {})) and isinstance(p.get("name", ""), str)


def read_journal(path: Path) -> tuple[list[dict], int]:
    """The records, and how many damaged lines were skipped: the last one a kill tore, or one a full disk cut short
    mid-file (the writer truncates after a failed append, but a crash in between can leave one)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise JournalError(f"{path}: cannot be read ({e.strerror or e})") from None
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline, else the line a kill tore
    records, torn = [], 0
    for line in lines:
        if not line.strip():
            continue
        rec = _parse(line)
        if rec is None:
            torn += 1
            continue
        records.append(rec)
    if torn and not records:
        raise JournalError(f"{path}: no line of it is a journal record")
    if tail.strip():
        rec = _parse(tail)
        if rec is None:
            torn += 1
        else:
            records.append(rec)
    return records, torn


def journal_run_id(path: Path) -> str:
    """The run id of the journal's newest run ("" when there is none): a run directory restarted before its first
    checkpoint (a rank killed early, under an elastic launcher) continues that MLflow run instead of opening another."""
    try:
        records, _ = read_journal(path)
    except JournalError:
        return ""
    runs = [r["run_id"] for r in records if r["kind"] == "run"]
    if not runs:
        return ""
    status = [r["payload"].get("status") for r in records if r["kind"] == "status" and r["run_id"] == runs[-1]]
    return "" if status and status[-1] == "FINISHED" else runs[-1]  # a finished run is never reopened


class Journal:
    """Append-only writer of one run directory's journal (rank 0 only), plus its delivery sidecar."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.dir = self.path.parent
        self._fd: int | None = None  # opened at the first record: a run that fails at start leaves no file

    def records(self) -> list[dict]:
        return read_journal(self.path)[0] if self.path.is_file() else []

    def append(self, rec: dict) -> None:
        if self._fd is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            if self.path.is_file():
                data = self.path.read_bytes()
                if data and not data.endswith(b"\n"):  # a torn record from a killed process: it was never queued
                    os.truncate(self.path, data.rfind(b"\n") + 1)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        data = (json.dumps(rec, separators=(",", ":"), allow_nan=False) + "\n").encode()
        start = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            while data:  # one write in practice; the loop only covers a short write
                data = data[os.write(self._fd, data):]
        except OSError:
            try:  # a full disk: cut the partial line off, so the next record does not run into it
                os.ftruncate(self._fd, start)
            except OSError:
                pass
            raise

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def relative(self, path: Path) -> str:
        path = Path(path).resolve()
        return str(path.relative_to(self.dir.resolve())) if path.is_relative_to(self.dir.resolve()) else str(path)

    def delivered(self) -> dict:
        return read_delivered(self.dir)

    def mark_delivered(self, run_id: str, upto: int, dropped: Iterable[int]) -> None:
        write_delivered(self.dir, run_id, upto, dropped)


def read_delivered(run_dir: Path) -> dict:
    try:
        doc = json.loads((run_dir / SIDECAR).read_text())
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}  # no sidecar (or a damaged one): nothing is known delivered, so everything is de-duplicated


def write_delivered(run_dir: Path, run_id: str, upto: int, dropped: Iterable[int]) -> None:
    doc = read_delivered(run_dir)
    doc[run_id] = {"upto": upto, "dropped": sorted(set(dropped))}
    atomic_write(run_dir / SIDECAR, json.dumps(doc).encode())


def pending(records: list[dict], state: dict | None) -> list[dict]:
    """The records of one run not known to have reached its server."""
    upto, dropped = (state or {}).get("upto", 0), set((state or {}).get("dropped", ()))
    return [r for r in records if r["seq"] >= upto or r["seq"] in dropped]


def groups(records: list[dict]) -> Iterator[list[dict]]:
    """Consecutive metrics records merged up to one request's worth; every other record alone."""
    group, n = [], 0
    for r in records:
        size = len(r["payload"]["values"]) if r["kind"] == "metrics" else 0
        if group and (r["kind"] != "metrics" or n + size > MAX_METRICS):
            yield group
            group, n = [], 0
        group.append(r)
        n += size
        if r["kind"] != "metrics":
            yield group
            group, n = [], 0
    if group:
        yield group


# ---------------------------------------------------------------------------------------------------- sending
class Sender:
    """Delivers journal records to one MLflow run. With ``dedupe`` it first reads what the run holds and sends only
    what is missing; a metric's history is read once per key and then kept up to date."""

    def __init__(self, client, run_id: str, base: Path | None):
        self.client, self.run_id, self.base = client, run_id, base
        self.history: dict[str, set[int]] = {}
        self.sent = {"metrics": 0, "params": 0, "tags": 0, "artifacts": 0, "inputs": 0, "status": 0}

    def send(self, group: list[dict], dedupe: bool) -> None:
        from mlflow.entities import Metric, Param, RunTag

        if not dedupe:
            self.history.clear()  # only needed after a failure; a long outage must not keep it forever
        kind, run = group[0]["kind"], None
        if dedupe and kind in ("params", "tags", "inputs", "status"):
            run = self.client.get_run(self.run_id)
        if kind == "metrics":
            items = []
            for r in group:
                p = r["payload"]
                for k, v in p["values"].items():
                    if dedupe and k not in self.history:
                        self.history[k] = {m.step for m in self.client.get_metric_history(self.run_id, k)}
                    if k in self.history:
                        if p["step"] in self.history[k]:
                            continue
                        self.history[k].add(p["step"])
                    items.append(Metric(k, float(v), int(p["timestamp"]), int(p["step"])))
            if items:
                self.client.log_batch(self.run_id, metrics=items)
            self.sent["metrics"] += len(items)
        elif kind == "params":
            have = run.data.params if run else {}
            items = [Param(k, v) for k, v in group[0]["payload"]["params"].items() if have.get(k) != v]
            for i in range(0, len(items), MAX_PARAMS):
                self.client.log_batch(self.run_id, params=items[i:i + MAX_PARAMS])
            self.sent["params"] += len(items)
        elif kind == "tags":
            have = run.data.tags if run else {}
            items = [RunTag(k, v) for k, v in group[0]["payload"]["tags"].items() if have.get(k) != v]
            if items:
                self.client.log_batch(self.run_id, tags=items)
            self.sent["tags"] += len(items)
        elif kind == "artifact":
            self._artifact(group[0]["payload"], dedupe)
        elif kind == "inputs":
            self._inputs(group[0]["payload"]["datasets"], run)
        elif kind == "status":
            p = group[0]["payload"]
            if run and run.info.status == p["status"]:
                return
            if p["status"] == "RUNNING":
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                self.client.set_terminated(self.run_id, p["status"], p.get("end_time"))
            self.sent["status"] += 1
        # "run": the run's creation is the caller's business (Tracker.start, or upload to another server)

    def _inputs(self, datasets: list[dict], run) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        def key(name, digest, tags):
            return name, digest, tags.get("mlflow.data.context", "")

        have = {key(i.dataset.name, i.dataset.digest, {t.key: t.value for t in i.tags})
                for i in (run.inputs.dataset_inputs if run and run.inputs else ())}
        items = [DatasetInput(Dataset(d["name"], d["digest"], d["source_type"], d["source"], d.get("schema"),
                                      d["profile"]), [InputTag(k, v) for k, v in d.get("tags", {}).items()])
                 for d in datasets if key(d["name"], d["digest"], d.get("tags", {})) not in have]
        if items:
            self.client.log_inputs(self.run_id, datasets=items)
        self.sent["inputs"] += len(items)

    def _artifact(self, p: dict, dedupe: bool) -> None:
        path = Path(p["path"])
        if not path.is_absolute() and self.base is not None:
            path = self.base / path
        if self.base is not None and not path.resolve().is_relative_to(self.base.resolve()):
            raise Undeliverable(f"artifact {path} is outside the run directory {self.base}: not sent")
        if not path.is_file():
            raise Undeliverable(f"artifact {path} no longer exists")
        if dedupe:
            name = f"{p['folder']}/{path.name}" if p.get("folder") else path.name
            listed = {a.path: a.file_size for a in self.client.list_artifacts(self.run_id, p.get("folder"))}
            if listed.get(name) == path.stat().st_size:
                return
        self.client.log_artifact(self.run_id, str(path), p.get("folder"))
        self.sent["artifacts"] += 1


def verdict(e: Exception) -> str:
    """wait: the server is away, retry until it answers; refused: it answered with an error, retry a few times;
    drop: no retry can help."""
    from mlflow.exceptions import MlflowException, RestException

    if isinstance(e, Undeliverable):
        return "drop"
    if isinstance(e, (ConnectionError, TimeoutError)):
        return "wait"
    if isinstance(e, MlflowException):
        if e.error_code not in _TRANSIENT:
            return "drop"  # INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST, ...
        if isinstance(e, RestException) and e.error_code == "INTERNAL_ERROR":
            return "refused"
        return "wait"  # no answer (connection refused, timeout) or "come back later"
    return "refused"  # a local failure (artifact copy, disk): bounded retries


def reason(e: Exception) -> str:
    """A short why for one line: MLflow wraps a refused connection in a few hundred characters of urllib3 repr."""
    text = str(e) or type(e).__name__
    for needle, short in (("Connection refused", "connection refused"), ("timed out", "timed out"),
                          ("Name or service not known", "unknown host"), ("Connection reset", "connection reset")):
        if needle in text:
            return short
    return text.splitlines()[0][:160]


class Steps:
    """The steps a metric holds: a sorted int64 array (8 bytes a step, where a set would take ~60)."""

    def __init__(self):
        self.a = array("q")

    def __contains__(self, step: int) -> bool:
        i = bisect_left(self.a, step)
        return i < len(self.a) and self.a[i] == step

    def add(self, step: int) -> None:
        if not self.a or step > self.a[-1]:
            self.a.append(step)
        elif step not in self:
            insort(self.a, step)
