"""``ssau upload``: replay a run directory's journal (ssau/tracking/journal.py) to its MLflow server, sending only what the
run misses, or everything to a new run on another server (found again by its ``ssau.source_run_id`` tag, so running
it twice sends nothing the second time)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ssau.errors import JournalError, Undeliverable
from ssau.tracking.journal import (JOURNAL, Sender, groups, pending, read_delivered, read_journal, reason,
                                   write_delivered)
from ssau.tracking.store import artifact_root, database, opening, quiet_lock_waits, relocate
from ssau.tracking.tracker import check_uri, quiet_http


def _target_run(client, uri: str, run: dict, experiment: str | None) -> tuple[str, bool]:
    """The run on ``uri`` that receives ``run``'s records, and whether it is the original run (same server)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run["run_id"])
        return run["run_id"], True
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    p = run["payload"]
    name = experiment or p.get("experiment") or "ssau"
    exp = client.get_experiment_by_name(name)
    if exp is None:
        exp_id = client.create_experiment(name, artifact_location=artifact_root(uri))
    else:
        exp_id = exp.experiment_id
    found = client.search_runs([exp_id], f"tags.`ssau.source_run_id` = '{run['run_id']}'", max_results=1)
    if found:  # an earlier upload created it: idempotent
        return found[0].info.run_id, False
    # The parent run id names a run on the original server; keep it as a plain tag.
    tags = {k: v for k, v in p.get("tags", {}).items() if k != "mlflow.parentRunId"}
    if "mlflow.parentRunId" in p.get("tags", {}):
        tags["ssau.source_parent_run_id"] = p["tags"]["mlflow.parentRunId"]
    tags["ssau.source_run_id"] = run["run_id"]
    created = client.create_run(exp_id, start_time=p.get("start_time"), tags=tags, run_name=p.get("name") or None)
    return created.info.run_id, False


def upload(run_dir: Path, uri: str | None = None, experiment: str | None = None) -> str:
    """Replay ``run_dir``'s journal to its server (only what is missing) or to ``uri`` (a new run there, found again
    by its ``ssau.source_run_id`` tag on a second upload). Returns the one line to print."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise JournalError(f"{run_dir} is not a directory")
    path = run_dir / JOURNAL
    if not path.is_file():
        raise JournalError(f"{run_dir} has no {JOURNAL} (not an ssau run directory, or tracking was off)")
    records, torn = read_journal(path)
    runs: dict[str, list[dict]] = {}
    for r in records:
        runs.setdefault(r["run_id"], []).append(r)
    if not runs:
        raise JournalError(f"{path} holds no records")
    lines, missing = [], 0
    for run_id, recs in runs.items():
        created = [r for r in recs if r["kind"] == "run"]
        if not created:
            raise JournalError(f"{path}: run {run_id} has no 'run' record (where it was created)")
        target_uri = uri or created[0]["payload"].get("uri") or "sqlite:///mlflow.db"
        check_uri(target_uri)
        quiet_http(retries=2)
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # our one line is the output
        if database(target_uri):
            quiet_lock_waits()  # a locked store fails in one line below, not in MLflow's traceback
        try:
            with opening(target_uri):  # a new store is created by one process at a time (store.py)
                client = MlflowClient(tracking_uri=target_uri)  # creates/migrates the store
                if line := relocate(target_uri):
                    print(line, file=sys.stderr)
                target, same = _target_run(client, target_uri, created[0], experiment)
            todo = pending(recs, read_delivered(run_dir).get(run_id)) if same else recs
            final = [r for r in recs if r["kind"] == "status"][-1:]  # only the last status matters (compared first)
            todo = [r for r in todo if r["kind"] != "status"] + final
            sender = Sender(client, target, run_dir)
            for group in groups(todo):
                try:
                    sender.send(group, dedupe=True)
                except Undeliverable:
                    missing += 1
        except (MlflowException, OSError) as e:
            raise JournalError(f"upload of {run_id} to {target_uri} stopped ({reason(e)}); "
                               "what was sent stays there, run the command again") from None
        if same:
            write_delivered(run_dir, run_id, max(r["seq"] for r in recs) + 1, ())
        s = sender.sent
        lines.append(f"{'run' if same else 'new run'} {target} at {target_uri}: sent {s['metrics']} metric values, "
                     f"{s['params']} params, {s['tags']} tags, {s['artifacts']} artifacts, {s['inputs']} dataset inputs, "
                     f"{s['status']} status")
    notes = [f"{missing} artifact file(s) no longer exist"] * bool(missing)
    notes += [f"{torn} damaged line{'s' * (torn > 1)} skipped"] * bool(torn)
    return "; ".join(lines) + (f" ({', '.join(notes)})" if notes else "")
