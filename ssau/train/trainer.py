"""The training loop: build, train in steps, evaluate, checkpoint, track.

One training step runs the method's ordered updates; every update goes through ``ssau.train.updates.Updates.run``:
freeze, zero_grad, forward/backward over micro-batches, then per group average gradients across ranks, clip, finite
check, step. Then the no-gradient state, the LR schedules, logging, evaluation and checkpoints, in that order.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections import defaultdict
from functools import partial
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from ssau.aus import au_name
from ssau.checkpoints import atomic_save, warm_start
from ssau.config import Config, flatten, to_dict
from ssau.data.device_decode import DeviceDecoder
from ssau.data.sources import (SourceConfig, StreamConfig, check_shards, dataset_inputs, held_out_notes, resolve_aus,
                               stream_config)
from ssau.data.stream import TrainStream
from ssau.data.trainset import TrainingSet
from ssau.dist.collectives import average_buffers, broadcast_module
from ssau.dist.deepspeed import deepspeed_engine
from ssau.dist.ranks import Runtime, init_runtime, write_rank_report
from ssau.dist.rng import seed_all, seed_draws
from ssau.dist.stop import StopSignals
from ssau.errors import ConfigError, SourceError
from ssau.io import atomic_write
from ssau.methods.base import Method, SetupInfo, Update
from ssau.methods.registry import build_method, check_groups
from ssau.methods.syncbn import convert_sync_bn
from ssau.remote import configure
from ssau.tracking.artifacts import log_report_tables, result_artifacts
from ssau.tracking.journal import JOURNAL, journal_run_id
from ssau.tracking.naming import eval_metric_dict, experiment_params, run_name, run_tags
from ssau.tracking.tracker import Tracker
from ssau.train.checkpointing import Checkpointing
from ssau.train.evaluate import evaluate_tasks
from ssau.train.model_card import card_of_config, model_state
from ssau.train.monitor import CollapseMonitor
from ssau.train.optim import build_optimizer, check_group_names, group_config, lr_factor
from ssau.train.rundir import claim
from ssau.train.setup import resolve_method
from ssau.train.updates import Updates


class Trainer(Checkpointing):
    def __init__(self, cfg: Config, rt: Runtime | None = None):
        self.cfg = resolve_method(cfg)  # the method section against its Params (a no-op when already resolved)
        configure(cfg.data.cache_dir, cfg.data.cache_gb, cfg.data.remote_retry)  # remote shards (before workers fork)
        check_shards(cfg.data)  # one line for a missing or mismatched shard directory, before any rank builds
        self.rt = rt or init_runtime(cfg.train)
        rt = self.rt
        t = cfg.train
        seed_all(t.seed)  # the same initialisation on every rank (and rank 0's is broadcast anyway)
        self.aus = tuple(cfg.data.aus) if cfg.data.aus else resolve_aus(
            StreamConfig(labelled=SourceConfig(tuple(cfg.data.labelled))))
        self.stream_cfg = stream_config(cfg, self.aus)
        self.run_dir = self._run_dir()
        self.method: Method = build_method(cfg.method, self.aus, cfg.model).to(rt.device)
        if cfg.model.sync_bn and rt.world > 1:
            convert_sync_bn(self.method, rt.device)
        if rt.channels_last:
            self.method.to(memory_format=torch.channels_last)
        if t.init_from:  # warm start: the optimiser starts fresh; a resumed run's checkpoint overrides it below
            taken, total = warm_start(self.method, Path(t.init_from))
            if rt.main and t.progress:
                tqdm.write(f"warm start: {taken} of {total} tensors from {t.init_from}", file=sys.stderr)
        self.trainset = TrainingSet.read(self.stream_cfg)  # the one read of the training set's index
        self.validation = self.trainset.validation
        bank, bank_mask, self.bank_keys = self.trainset.label_bank()
        self.drop = self.trainset.drop_report()
        for line in held_out_notes(self.stream_cfg) if rt.main and t.progress else ():
            tqdm.write(line, file=sys.stderr)
        if self.validation.keys and rt.main and t.progress:
            tqdm.write(f"AU validation set: {len(self.validation.keys)} images from {self.validation.subjects} "
                       f"subjects, excluded from training ({len(bank)} training images remain)", file=sys.stderr)
        self.method.setup(SetupInfo(self.aus, bank, bank_mask, validation_targets=self.validation.targets,
                                    validation_mask=self.validation.mask, steps=t.steps, seed=t.seed,
                                    extra={"trainset": self.trainset}))
        broadcast_module(self.method, rt)
        self.groups = self.method.groups()
        check_groups(cfg.method_name, self.groups)
        check_group_names(cfg.optim, self.groups)
        self.optimizers, self.schedulers, self.engines = {}, {}, {}
        for name, g in self.groups.items():
            opt = build_optimizer(group_config(cfg.optim, name, cfg.optim.lr * g.lr_scale, g.optim), g.params,
                                  fused=not (t.deepspeed and g.deepspeed))
            sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(self._lr, name))
            if t.deepspeed and g.deepspeed:
                self.engines[name] = deepspeed_engine(g.params, opt, sched, t.deepspeed, cfg.data.m1,
                                                      cfg.optim.accumulate, cfg.optim.clip_grad)
                opt, sched = self.engines[name].optimizer, self.engines[name].lr_scheduler
            self.optimizers[name], self.schedulers[name] = opt, sched
        self.updates = Updates(cfg.optim, rt, self.groups, self.optimizers, self.engines, t.bucket_mb)
        self.step, self.starts, self.skipped_samples, self.run_id, self.read_bytes = 0, 0, 0, "", 0
        self.tracker = None
        self._last_good = ""  # the newest checkpoint known complete (named when a run has to stop)
        self.stream: TrainStream | None = None
        self.resumed_stream = None  # this rank's stream position in the checkpoint resumed from
        self.stop = StopSignals()
        self.collapse = CollapseMonitor(t.collapse_share, t.collapse_window, cfg.method_name, rt.main)

    # ------------------------------------------------------------------------------------------------ building
    def _lr(self, group: str, step: int) -> float:
        """The schedule's factor at ``step``, restarted at each of the method's stage starts, times the method's
        factor for the group."""
        total = self.cfg.train.steps
        starts = [0, *(b for b in self.method.stage_starts() if 0 < b < total)]
        k = sum(b <= step for b in starts) - 1  # the stage holding this step
        end = starts[k + 1] if k + 1 < len(starts) else total
        return lr_factor(self.cfg.optim, end - starts[k], step - starts[k]) * self.method.lr_scale(group, step)

    def _run_dir(self) -> Path:
        """Rank 0 claims the run directory (``ssau.train.rundir``: confined to train.out, locked for this run, a
        generated name made unique); every rank gets its path, or every rank the same one-line error."""
        t = self.cfg.train
        if t.resume == "auto" and not t.name:
            raise ConfigError("train.resume=auto needs train.name (the run directory to continue)")
        self.lock, claimed = None, (None, None)
        if self.rt.main:
            name = t.name or f"{self.cfg.method_name}-fold{self.cfg.data.fold}-{time.strftime('%Y%m%d-%H%M%S')}"
            run_dir, self.lock, error = claim(Path(t.out), name, generated=not t.name)
            claimed = (str(run_dir), error)
        run_dir, error = self.rt.broadcast_object(claimed)
        if error:
            raise ConfigError(error)
        return Path(run_dir)

    # ------------------------------------------------------------------------------------------------ one update
    def _run_update(self, upd: Update, batches, previous):
        """One update through ``ssau.train.updates.Updates`` (the per-update path, in one visible place)."""
        def draw():
            batch = self._next_batch(batches)
            self.skipped_samples += batch.skipped
            self.read_bytes += batch.read_bytes
            return batch

        return self.updates.run(upd, draw, previous, self.step)

    @property
    def skipped_updates(self) -> int:
        return self.updates.refused

    @skipped_updates.setter
    def skipped_updates(self, n: int) -> None:
        self.updates.refused = n

    def _next_batch(self, batches):
        """The next batch, or SourceError on every rank together: a source that fails on one rank (nothing readable,
        stalled) must not leave the others waiting in the step's collectives. One scalar all-reduce per batch."""
        error = None
        try:
            batch = next(batches)
        except SourceError as e:
            error = str(e)
        if self.rt.any_true(error is not None):
            raise SourceError(error or "a data source failed on another rank (its line is printed there)")
        return self._to_device(batch)

    def _to_device(self, batch):
        b = batch.to(self.rt.device)
        if self.rt.channels_last:
            for name in ("images", "unlabelled", "expr_images"):
                if getattr(b, name) is not None:
                    setattr(b, name, getattr(b, name).contiguous(memory_format=torch.channels_last))
        return b

    # ------------------------------------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        """Train to ``train.steps``. Whatever stops a run on rank 0 also ends its MLflow run (FAILED, or KILLED on
        a stop signal: ``ssau.dist.stop``), so no run is left RUNNING by an error."""
        try:
            with self.stop.installed():
                return self._fit()
        except BaseException as e:
            if self.tracker:  # a stop signal then a failure (a peer gone mid-stop) is still a kill
                self.tracker.end("KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) or self.stop.signum
                                 else "FAILED")
            raise
        finally:
            if self.lock:
                self.lock.release()  # the run directory is free for the next run (a resume, the next fold)

    def _fit(self) -> dict:
        cfg, rt, t = self.cfg, self.rt, self.cfg.train
        self._resume()
        if rt.broadcast_object(rt.main and self.step >= t.steps and (self.run_dir / "model.pt").is_file()):
            if rt.main:  # a finished run started again (a requeue after its end): its model and run stay as they are
                tqdm.write(f"{self.run_dir.name} finished at step {self.step} already; nothing to do", file=sys.stderr)
            return {}
        self._start_tracking()
        try:
            self.stream = TrainStream(self.stream_cfg, rt.rank, rt.world, self.trainset,
                                      pin_memory=rt.device.type == "cuda")
        except ValueError as e:  # a source with no shard to read (e.g. all of it in the held-out fold)
            raise ConfigError(str(e)) from None
        self.restore_stream()  # a resumed run continues the stream where its checkpoint left it
        batches = iter(self.stream)
        if cfg.data.decode == "device":  # JPEGs decoded and augmented on rt.device, before _to_device moves the rest
            batches = DeviceDecoder(rt.device)(batches)
        bar = tqdm(total=t.steps, initial=self.step, desc=f"train {cfg.method_name}", unit="step",
                   disable=not (rt.main and t.progress), file=sys.stderr, dynamic_ncols=True)
        window, seen, t0, first_keys, metrics = defaultdict(float), 0, time.perf_counter(), None, {}
        window_steps = 0
        self.method.train()
        while self.step < t.steps:
            batch, parts = self.train_step(batches)
            for k, v in parts.items():
                window[k] += v
            if first_keys is None:
                first_keys = list(batch.keys)
            window_steps += 1
            seen += batch.images.shape[0] * rt.world
            bar.update(1)
            last = self.step == t.steps
            log = self.step % t.log_every == 0 or last
            signum = 0 if last else self.stop.requested(rt)  # host flags only: no wait on the device
            ckpt = bool(t.checkpoint_every and self.step % t.checkpoint_every == 0) or last
            ev = bool(cfg.data.fold or t.evaluate_on == "val") and ((t.eval_every and self.step % t.eval_every == 0)
                                                                     or last)
            if log or signum or ckpt or ev:  # what the updates left on the device, before any of it is used
                self.updates.flush(self._last_good)
            if log:
                self._log_window(window, window_steps, seen, time.perf_counter() - t0, bar)
                window, seen, t0, window_steps = defaultdict(float), 0, time.perf_counter(), 0
            if signum:
                self.stop_on_signal(signum)  # a checkpoint at this step, before any evaluation: then exit
            if ckpt:
                self.save_checkpoint()  # before evaluating: a damaged eval shard must not cost the step's state
            if ev:
                metrics = self.evaluate()
                self.method.train()
            if last or ((cfg.data.fold or t.evaluate_on == "val") and t.eval_every and self.step % t.eval_every == 0):
                self._log_reports()
        bar.close()
        if t.rank_report:
            write_rank_report(self.run_dir / "ranks" / f"rank{rt.rank}.json", self.method, first_keys, self.step,
                              bool(self.engines))
        if rt.main:
            self._finish(metrics)
        return metrics

    def train_step(self, batches) -> tuple:
        """One step: the method's ordered updates, then no-gradient state, buffer averaging and LR schedules."""
        batch, window = None, defaultdict(float)
        for upd in self.method.updates(self.step):
            for r in range(upd.repeat):
                seed_draws(self.cfg.train.seed, self.rt.rank, self.step, upd.name, r)  # ranks draw apart
                batch, parts = self._run_update(upd, batches, batch)
                for k, v in parts.items():
                    window[f"train/{upd.name}/{k}"] += v / upd.repeat
        with torch.no_grad():
            self.method.after_step(batch, self.step)
        average_buffers(self.method, self.rt, type(self.method).identical_buffers)
        for k, v in (state := self.method.step_metrics()).items():
            window[f"train/state/{k}"] += v
        self.collapse.check(state, self.step + 1, self.tracker)  # warns once: a *largest_share over the limit
        for name, s in self.schedulers.items():
            if name not in self.engines:  # DeepSpeed engines step their own schedules
                with warnings.catch_warnings():  # a group no update stepped yet (MLCR's GCN in stage 1)
                    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
                    s.step()
        self.step += 1
        return batch, window

    def _log_window(self, window: dict, steps: int, seen: int, seconds: float, bar) -> None:
        keys, img_s = sorted(window), seen / seconds  # loss parts are device tensors until here: one read per window
        vec = self.rt.all_mean(torch.stack([torch.as_tensor(window[k], dtype=torch.float64, device=self.rt.device)
                                            for k in keys] + [torch.tensor(float(x), dtype=torch.float64,
                                                                           device=self.rt.device)
                                                              for x in (self.read_bytes, self.skipped_samples)]))
        values = {k: v / steps for k, v in zip(keys, vec.tolist())}
        mb_s = vec[-2].item() * self.rt.world / seconds / 1e6  # remote shards read (ssau.remote), all ranks
        self.read_bytes = 0
        values["train/images_per_s"] = img_s  # labelled images per second, all ranks
        values["train/lr"] = self.schedulers[next(iter(self.schedulers))].get_last_lr()[0]
        values["train/skipped_samples"] = vec[-1].item() * self.rt.world  # corrupt samples, all ranks, so far
        if self.rt.main:
            shown = {"img/s": f"{img_s:.0f}"} | ({"MB/s": f"{mb_s:.1f}"} if mb_s else {})
            bar.set_postfix({k.split("/")[-2] + "." + k.split("/")[-1]: f"{v:.3g}" for k, v in values.items()
                             if k.endswith("/loss")} | shown)
            if mb_s:
                values["train/remote_mb_per_s"] = mb_s
            if self.tracker:
                self.tracker.log_metrics(values, self.step)

    # ------------------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Exact-once evaluation of the held-out fold or the AU validation split over all ranks; metrics on rank 0."""
        metrics = evaluate_tasks(self.method, self.cfg.data, self.aus, self.rt, self.cfg.train,
                                 self.validation, self.stream_cfg.labelled.folds)
        if self.rt.main and metrics and self.tracker:
            self.tracker.log_metrics(eval_metric_dict(metrics), self.step)
        return metrics

    def _log_reports(self) -> None:
        """The method's tables since the last evaluation (MAL: sample weights) from every rank: CSV + histogram
        under the run directory's eval/step-N/, and in MLflow."""
        gathered = self.rt.gather_objects(self.method.report())
        if self.rt.main and gathered[0]:
            log_report_tables(gathered, self.run_dir, f"eval/step-{self.step:07d}", self.tracker)

    # ------------------------------------------------------------------------------------------------ tracking
    def _start_tracking(self) -> None:
        """Rank 0 starts the MLflow run (the server must answer), or continues the checkpoint's run (no server
        needed: records wait in the run directory's journal); a failure stops every rank at once with one line."""
        tr = self.cfg.tracking
        error, fresh = None, not self.run_id
        if self.rt.main and tr.enabled:
            if fresh and self.cfg.train.resume == "auto" and (earlier := journal_run_id(self.run_dir / JOURNAL)):
                self.run_id, fresh = earlier, False  # restarted before its first checkpoint: the same MLflow run
            try:
                self.tracker = Tracker(tr, self.run_dir / JOURNAL)
                if fresh:
                    tags = run_tags(self.cfg, self.rt.world, self.run_dir)
                    self.run_id = self.tracker.start(tr.run_name or run_name(self.cfg), tags, tr.parent_run_id)
                else:
                    self.tracker.resume(self.run_id)
            except Exception as e:  # noqa: BLE001 - rank 0 must not fail alone while the others wait
                self.tracker = None
                why = (str(e) or type(e).__name__).splitlines()[0][:200]
                error = str(e) if isinstance(e, ConfigError) else \
                    f"tracking.uri: cannot start the MLflow run at {tr.uri} ({why})"
        error = self.rt.broadcast_object(error)  # every rank fails together, at once
        if error:
            raise ConfigError(error)
        if self.tracker and fresh:  # a resumed run logged its params and config when it started
            self.tracker.log_params(experiment_params(flatten(to_dict(self.cfg)), type(self.method).uses))
            self.tracker.log_inputs([i for i in dataset_inputs(self.stream_cfg) if self.cfg.train.evaluate_on == "fold"
                                     or i["tags"]["mlflow.data.context"] != "eval"])  # val: the fold is not read
            self.tracker.log_metrics({"data/label_drop_fraction": self.drop["fraction"],
                                      "data/hidden_images": self.drop["hidden_images"]}
                                     | ({"data/labelled_subjects": self.drop["labelled_subjects"]}
                                        if self.drop["labelled_subjects"] else {}), 0)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg_path = self.run_dir / "config.yaml"
            atomic_write(cfg_path, yaml.safe_dump(to_dict(self.cfg), sort_keys=False).encode())
            self.tracker.log_artifact(cfg_path)

    def _finish(self, metrics: dict) -> None:
        model, card = self.run_dir / "model.pt", card_of_config(self.cfg, metrics)
        atomic_save(model_state(self.method.inference_state(), self.cfg, self.aus, card), model)
        if not self.tracker:
            return
        for p in result_artifacts(metrics, [au_name(a) for a in self.aus], self.run_dir / "eval"):  # root: compare view
            self.tracker.log_artifact(p)
        if "per_au" in metrics:
            self.tracker.log_tags({"mlflow.loggedArtifacts": json.dumps([{"path": "per_au.json", "type": "table"}])})
        self.tracker.log_model(model, card, self.aus)  # model/model.pt, and the MLflow model `model`
        self.tracker.log_metrics({"train/refused_updates": self.skipped_updates}, self.step)
        self.tracker.end()
