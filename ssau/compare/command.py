"""`ssau compare`: methods x seeds x label drops x folds, each cell a child MLflow run of one parent run.

Cells run in the order label drop, seed, fold, method, so a run stopped half way leaves whole seeds: every finished
seed is paired with its baseline. A second call with the same ``--name`` finds the parent again (tag
``compare_parent``), reads the metrics of every FINISHED child back from the tracking store and skips it; a cell left
FAILED, KILLED or RUNNING by a kill is run again with ``train.resume=auto`` in its own run directory, so it goes on
from its last checkpoint in the same MLflow run. A run directory whose training already reached the last step (killed
while evaluating) cannot be resumed into an evaluation, so that cell starts afresh in ``<dir>-r2`` (then -r3, ...).

Method hyper-parameters: the config's ``method`` section serves the method it names; any other method starts from
its own defaults (a section written for one method is meaningless for another). ``<label>.<key>=value`` sets one
compared method's hyper-parameter (``adversarial.alpha=0.01``). A label is a method name, or a method name and a
variant (``adversarial-noise``: method ``adversarial`` with its own ``adversarial-noise.<key>=value`` settings), so
options of one method can be compared in the same grid.

Under ``accelerate launch`` every rank runs every cell (the trainer's collectives need them all); only rank 0 talks
to MLflow and writes the report, and its plan is broadcast.

``--select-on val`` runs the grid scored on the AU validation split, never opening the held-out fold, and writes which
label of each method scored best (ssau/compare/select.py); ``--settings-from`` gives that choice to the final grid.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ssau.compare.grid import (Cell, Grid, cell_config, digest, method_sections, parse_drops, parse_folds,
                               parse_methods, parse_seeds, same_section, settings, split_overrides)
from ssau.compare.report import format_report, parent_metrics, summarize, write_artifacts
from ssau.compare.select import NAMES, choose, format_selection, selection_doc, settings_overrides, write_selection
from ssau.config import Config
from ssau.dist.ranks import init_runtime
from ssau.errors import ConfigError, UserError
from ssau.methods.registry import scores_au
from ssau.tracking.journal import JOURNAL
from ssau.tracking.naming import eval_metric_dict, git_commit
from ssau.tracking.store import opening
from ssau.tracking.tracker import Tracker, check_uri
from ssau.train.setup import load_run_config
from ssau.train.trainer import Trainer

PROBE_STEPS = 3  # the dry run's timing probe: steps per method (the first is not timed: warm-up)


# ---------------------------------------------------------------------------------------------------- the store
def lookup(cfg: Config, name: str, fixed: str) -> dict:
    """Rank 0: the parent run of ``name`` (tag compare_parent) and, per cell id, its newest FINISHED child that
    holds an evaluation. Reads only: a SQLite store that does not exist yet is not created."""
    t = cfg.tracking
    if not t.enabled or (t.uri.startswith("sqlite:///") and not Path(t.uri[len("sqlite:///"):]).is_file()):
        return {"parent_id": "", "done": {}, "step": 0}
    from mlflow.tracking import MlflowClient

    check_uri(t.uri)
    with opening(t.uri):  # a store another process is creating right now is read once its tables exist
        client = MlflowClient(tracking_uri=t.uri)
    exp = client.get_experiment_by_name(t.experiment)

    def search(filter_string: str) -> list:
        runs, token = [], None
        while exp is not None:
            page = client.search_runs([exp.experiment_id], filter_string, max_results=1000, page_token=token,
                                      order_by=["attribute.start_time ASC"])
            runs.extend(page)
            if not (token := page.token):
                break
        return runs

    parents = search(f"tags.compare_parent = '{name}'")
    if not parents:
        return {"parent_id": "", "done": {}, "step": 0}
    parent = parents[0]
    if parent.data.tags.get("compare_settings") != fixed:
        raise UserError(f"compare {name}: its parent run {parent.info.run_id} was made with other settings (config "
                        f"or warm start); give another --name")
    done = {}
    for run in search(f"tags.mlflow.parentRunId = '{parent.info.run_id}'"):
        m = run.data.metrics
        if run.info.status == "FINISHED" and "val/f1_mean" in m:
            done[run.info.run_name] = {"metrics": {k: v for k, v in m.items() if k.startswith("val/")},
                                       "params": dict(run.data.params), "tags": dict(run.data.tags)}
    steps = [m.step for m in client.get_metric_history(parent.info.run_id, "cmp/cells")]
    return {"parent_id": parent.info.run_id, "done": done, "step": max(steps, default=0)}


def _timed_trainer(cfg: Config, rt):
    """A trainer that records how long each training step took in ``step_times`` (the dry run's estimate)."""
    trainer = Trainer(cfg, rt)
    trainer.step_times = []
    step = trainer.train_step

    def timed(batches):
        t0 = time.perf_counter()
        out = step(batches)
        trainer.step_times.append(time.perf_counter() - t0)
        return out

    trainer.train_step = timed
    return trainer


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------- the command
def compare(config: str | None, methods: str, seeds: str, drops: str, folds: str | None = None,
            baseline: str | None = None, warm: bool = False, warm_steps: int | None = None, dry_run: bool = False,
            name: str | None = None, overrides: list[str] = (), select_on: str = "", select_metric: str = "",
            selection: str | None = None, settings_from: str | None = None) -> dict:
    """Run (or, with ``dry_run``, plan and time) the grid; returns the parent's metrics (rank 0; {} elsewhere).
    ``select_on='val'``: every cell scored on the AU validation split, and the selection file written."""
    labels, seed_list, drop_list = parse_methods(methods), parse_seeds(seeds), parse_drops(drops)
    if select_on not in ("", "val") or (select_metric or selection) and select_on != "val":
        raise UserError("--select-on takes val; --select-metric and --selection go with --select-on val")
    if select_metric and select_metric not in NAMES:
        raise UserError(f"--select-metric: {select_metric!r} is not one of {', '.join(NAMES)}")
    if select_on and any(x.partition("=")[0].strip() == "train.evaluate_on" for x in overrides):
        raise UserError("--select-on val sets train.evaluate_on=val for every cell; drop the override")
    notes = []
    if settings_from:  # before the command line's own <label>.<key>=value, which win
        chosen, notes = settings_overrides(settings_from, labels)
        overrides = chosen + list(overrides)
    if select_on:
        overrides = list(overrides) + ["train.evaluate_on=val"]
    if baseline is None:
        baseline = "supervised" if "supervised" in labels else labels[0]
    elif baseline not in labels:
        raise UserError(f"--baseline: {baseline!r} is not one of --methods ({', '.join(labels)})")
    if warm_steps is not None and (not warm or warm_steps < 1):
        raise UserError(f"--warm-steps {warm_steps}: needs --warm-start and at least 1 step")
    base_overrides, per_label = split_overrides(list(overrides), labels + ("supervised",) * warm)
    cfg = load_run_config(config, base_overrides)
    if not folds and not cfg.data.fold:
        raise UserError("ssau compare evaluates a held-out fold: give --folds or set data.fold")
    grid = Grid(labels, seed_list, drop_list, parse_folds(folds, cfg.data.folds) if folds else (cfg.data.fold,),
                baseline, warm, (warm_steps or cfg.train.steps) if warm else 0)
    sections = method_sections(cfg, labels + ("supervised",) * (warm and "supervised" not in labels), per_label)
    for label, section in sections.items():
        if not scores_au(section):
            raise UserError(f"--methods: {label} is scored on expressions, not AU F1; ssau compare compares AU "
                            f"recognisers (launch/experiments/fer-large-margin.sh loops ssau train instead)")
    fixed = digest(settings(cfg, grid))
    name = name or (f"compare-{Path(config).stem if config else 'cli'}-"
                    f"{digest([fixed, sections, grid.methods, grid.seeds, grid.drops, grid.folds])}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", name) or not name.strip("."):
        raise UserError(f"--name {name!r}: letters, digits, '_', '.' and '-' only, not only dots (it names run "
                        f"directories)")
    rt = init_runtime(cfg.train)
    plan, error = None, None
    if rt.main:
        try:
            plan = lookup(cfg, name, fixed)
        except (UserError, ConfigError) as e:
            error = str(e)
        except Exception as e:  # noqa: BLE001 - rank 0 must not fail alone while the others wait
            error = f"tracking.uri: cannot read {cfg.tracking.uri} ({(str(e) or type(e).__name__).splitlines()[0]})"
    error, plan = rt.broadcast_object((error, plan))
    if error:
        raise UserError(error)
    cells = grid.cells()
    for c in cells:  # a finished cell of a named compare run with other method settings is not this grid's
        if c.id in plan["done"] and not same_section(plan["done"][c.id]["params"], sections[_label(c)]):
            raise UserError(f"compare {name}: cell {c.id} finished with other method settings; give another --name")
    for line in notes if rt.main else ():
        say(line)
    if dry_run:
        return _dry_run(cfg, grid, sections, cells, plan["done"], name, rt)
    select = {"metric": select_metric or "f1", "per_label": per_label, "config": str(config or ""),
              "path": Path(selection).resolve() if selection else None} if select_on else None
    return _run(cfg, grid, sections, cells, plan, name, fixed, rt, select)


def _label(cell: Cell) -> str:
    return "supervised" if cell.warm else cell.method


def _start_parent(cfg: Config, grid: Grid, name: str, fixed: str, parent_id: str, rt):
    """Rank 0 creates or reopens the parent run; every rank gets its id (or the error, together)."""
    tracker, error = None, None
    if rt.main and cfg.tracking.enabled:
        try:
            tracker = Tracker(cfg.tracking, Path(cfg.train.out).resolve() / name / JOURNAL)
            if parent_id:
                tracker.resume(parent_id)
            else:
                tracker.start(name, {"compare_parent": name, "compare_role": "parent", "compare_settings": fixed,
                                     "git_commit": git_commit(), "world_size": rt.world})
            tracker.log_tags({"compare_methods": ",".join(grid.methods), "compare_baseline": grid.baseline,
                              "compare_seeds": ",".join(map(str, grid.seeds)),
                              "compare_label_drops": ",".join(f"{p:g}" for p in grid.drops),
                              "compare_folds": ",".join(map(str, grid.folds)),
                              "compare_warm_start": f"{grid.warm_steps} steps" if grid.warm else "off",
                              "compare_evaluated_on": cfg.train.evaluate_on})
        except Exception as e:  # noqa: BLE001
            tracker, error = None, (f"tracking.uri: cannot start the parent run at {cfg.tracking.uri} "
                                    f"({(str(e) or type(e).__name__).splitlines()[0][:200]})")
    error, parent_id = rt.broadcast_object((error, tracker.run_id if tracker else ""))
    if error:
        raise ConfigError(error)
    return tracker, parent_id


def _run(cfg: Config, grid: Grid, sections: dict, cells: list[Cell], plan: dict, name: str, fixed: str, rt,
         select: dict | None = None) -> dict:
    tracker, parent_id = _start_parent(cfg, grid, name, fixed, plan["parent_id"], rt)
    done, warm_models, results, folder = plan["done"], {}, [], Path(cfg.train.out).resolve() / name / "compare"
    ran = 0
    try:
        for i, cell in enumerate(cells, 1):
            where, key = f"compare {name}: cell {i}/{len(cells)} {cell.id}", (cell.seed, cell.drop, cell.fold)
            if cell.id in done:
                metrics, p, tags = done[cell.id]["metrics"], done[cell.id]["params"], done[cell.id]["tags"]
                if cell.warm:  # its run directory: a tag since params hold the experimental choices only
                    run_dir = tags.get("run_dir") or str(Path(p["train.out"]) / p["train.name"])
                    warm_models[key] = str(Path(run_dir) / "model.pt")
                if rt.main:
                    say(f"{where}: skipped (finished, F1 {100 * metrics['val/f1_mean']:.1f})")
            else:
                c, error = None, None
                if rt.main:  # the run directory is chosen on rank 0's disk, and every rank takes it
                    try:
                        init = _warm_model(warm_models, key, cell) if grid.warm and not cell.warm else ""
                        c = cell_config(cfg, cell, sections[_label(cell)], name,
                                        grid.warm_steps if cell.warm else cfg.train.steps, parent_id, init)
                    except (UserError, ConfigError) as e:
                        error = str(e)
                error, c = rt.broadcast_object((error, c))
                if error:
                    raise UserError(error)
                if rt.main:
                    say(f"{where}: running in {Path(c.train.out) / c.train.name}")
                t0 = time.perf_counter()
                trainer = Trainer(c, rt)
                m = trainer.fit()
                ran += 1
                warm_models[key] = str(trainer.run_dir / "model.pt") if cell.warm else warm_models.get(key)
                metrics = eval_metric_dict(m) if m else {}
                if rt.broadcast_object(rt.main and not metrics):  # every rank stops together
                    raise UserError(f"{where}: the run returned no evaluation of fold {cell.fold}")
                if rt.main:
                    say(f"{where}: finished in {time.perf_counter() - t0:.0f} s, F1 {100 * metrics['val/f1_mean']:.1f}")
            if not cell.warm:
                results.append({"method": cell.method, "seed": cell.seed, "drop": cell.drop, "fold": cell.fold,
                                "metrics": metrics})
        if not rt.main:
            return {}
        report = summarize(results, grid.methods, grid.drops, grid.baseline)
        paths, values = write_artifacts(report, folder), parent_metrics(report)
        if select:  # the search's choice, beside the report (and an artifact of the parent)
            meta = {"compare": name, "parent_run_id": tracker.run_id if tracker else "", "config": select["config"],
                    "seeds": list(grid.seeds), "label_drops": list(grid.drops), "folds_held_out": list(grid.folds)}
            doc = selection_doc(choose(report, select["metric"]), sections, select["per_label"], select["metric"], meta)
            paths.append(write_selection(doc, folder / "selection.json"))  # logged: inside the run directory
            chosen = write_selection(doc, select["path"]) if select["path"] else paths[-1]
        if tracker:
            # One value per (metric, step) is kept (ssau/tracking/tracker.py): a call that ran cells logs at a new step, a call
            # that ran none the same values at the last step (dropped as already logged)
            step = plan["step"] + 1 if ran or not plan["step"] else plan["step"]
            tracker.log_metrics({"cmp/cells": len(results), **values}, step)
            for path in paths:  # at the root, where MLflow's compare view lists a run's artifacts
                tracker.log_artifact(path)
            tracker.end()
        print(format_report(report))
        if select:
            print(format_selection(doc, chosen))
        print(f"compare {name}: report in {folder}" + (f", parent MLflow run {tracker.run_id}" if tracker else ""))
        return values
    except BaseException as e:
        if tracker:
            tracker.end("KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED")
        raise


def _warm_model(warm_models: dict, key: tuple, cell: Cell) -> str:
    path = warm_models.get(key)
    if not path or not Path(path).is_file():
        raise UserError(f"cell {cell.id}: the warm-start model {path or '(none)'} of seed {cell.seed}, label drop "
                        f"{cell.drop:g}, fold {cell.fold} is missing; restore it or give another --name")
    return path


# ---------------------------------------------------------------------------------------------------- dry run
def _dry_run(cfg: Config, grid: Grid, sections: dict, cells: list[Cell], done: dict, name: str, rt) -> dict:
    """The plan and its time, estimated from a short timing probe of each method; no MLflow run is created."""
    timing = probe(cfg, grid, sections, rt)
    if not rt.main:
        return {}
    todo, total = [c for c in cells if c.id not in done], 0.0
    print(f"compare {name}: {len(cells)} cells, {len(cells) - len(todo)} finished, {len(todo)} to run")
    for i, c in enumerate(cells, 1):
        per_step, overhead = timing[_label(c)]
        steps = grid.warm_steps if c.warm else cfg.train.steps
        if c.id in done:
            what = f"finished (F1 {100 * done[c.id]['metrics']['val/f1_mean']:.1f})"
        else:
            total += overhead + steps * per_step
            what = f"to run, {steps} steps, about {overhead + steps * per_step:.0f} s"
        print(f"  {i:>4}/{len(cells)}  {c.id:<40} {what}")
    for label, (per_step, overhead) in timing.items():
        print(f"probe {label}: {per_step:.3f} s/step + {overhead:.1f} s per run (setup, evaluation, saving)")
    print(f"estimated time: {total / 60:.1f} min for {len(todo)} cells")
    return {"cells": len(cells), "to_run": len(todo), "estimate_s": total}


def probe(cfg: Config, grid: Grid, sections: dict, rt) -> dict[str, tuple[float, float]]:
    """label -> (seconds per step, seconds per run besides its steps), from PROBE_STEPS steps of each method on the
    grid's first seed, drop and fold, tracking off, in a temporary directory."""
    tmp = rt.broadcast_object(tempfile.mkdtemp(prefix="ssau-probe-") if rt.main else "")
    out = {}
    try:
        for label, section in sections.items():
            c = dataclasses.replace(
                cfg, method=section,
                train=dataclasses.replace(cfg.train, steps=PROBE_STEPS, out=tmp, name=label, resume="never",
                                          checkpoint_every=0, progress=False, init_from="", seed=grid.seeds[0]),
                data=dataclasses.replace(cfg.data, fold=grid.folds[0], label_drop=grid.drops[0]),
                tracking=dataclasses.replace(cfg.tracking, enabled=False))
            t0 = time.perf_counter()
            trainer = _timed_trainer(c, rt)
            trainer.fit()
            per_step = statistics.fmean(trainer.step_times[1:])  # the first step pays for warm-up
            out[label] = (per_step, max(0.0, time.perf_counter() - t0 - PROBE_STEPS * per_step))
    finally:
        if rt.main:
            shutil.rmtree(tmp, ignore_errors=True)
    return out
