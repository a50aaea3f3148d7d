"""The training loop: build, train in steps, evaluate, checkpoint, track.

One training step runs the method's ordered updates; every update goes through ``Trainer._run_update``: freeze,
zero_grad, forward/backward over micro-batches, average gradients across ranks, clip, finite check, step. Then the
no-gradient state, the LR schedules, logging, evaluation and checkpoints, in that order.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from ssau.aus import au_name
from ssau.config import Config, ConfigError, flatten, to_dict
from ssau.data.stream import (SourceConfig, StreamConfig, TrainStream, eval_loader, label_drop_report,
                              labelled_rows, read_dataset, resolve_aus, validation_split)
from ssau.methods import Method, SetupInfo, Update, build_method
from ssau.metrics import au_metrics
from ssau.runtime import (Runtime, average_buffers, average_gradients, broadcast_module, deepspeed_engine,
                          init_runtime, rng_state, seed_all, set_rng_state)


def stream_config(cfg: Config, aus: tuple[int, ...]) -> StreamConfig:
    d = cfg.data
    train_folds = None if d.fold == 0 else tuple(k for k in range(1, d.folds + 1) if k != d.fold)
    src = lambda dirs, w, folds=None: SourceConfig(tuple(dirs), tuple(w) if w else None, folds)  # noqa: E731
    return StreamConfig(labelled=src(d.labelled, d.labelled_weights, train_folds),
                        unlabelled=src(d.unlabelled, d.unlabelled_weights) if d.unlabelled else None,
                        expression=src(d.expression, None) if d.expression else None, aus=aus, m1=d.m1, m2=d.m2,
                        m_expr=d.m_expr, image_size=d.image_size, label_drop=d.label_drop,
                        label_drop_mode=d.label_drop_mode, seed=cfg.train.seed, workers=d.workers,
                        shuffle_buffer=d.shuffle_buffer, validation=d.validation, val_batch=d.val_batch)


def label_bank(s: StreamConfig, exclude: frozenset[str] = frozenset()) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """AU vectors of the labelled training samples, their masks and keys: never the evaluation fold, never hidden
    labels (image mode drops the sample, AU mode masks the AU), never the keys in ``exclude`` (the AU validation
    set)."""
    rows = [(key, t, m) for _, key, _, t, m in labelled_rows(s) if key not in exclude]
    J = len(s.aus)
    return (torch.tensor([r[1] for r in rows]).reshape(-1, J), torch.tensor([r[2] for r in rows]).reshape(-1, J),
            [r[0] for r in rows])


class Trainer:
    def __init__(self, cfg: Config, rt: Runtime | None = None):
        self.cfg = cfg
        self.rt = rt or init_runtime(cfg.train)
        rt = self.rt
        t = cfg.train
        seed_all(t.seed)  # the same initialisation on every rank (and rank 0's is broadcast anyway)
        self.aus = tuple(cfg.data.aus) if cfg.data.aus else resolve_aus(
            StreamConfig(labelled=SourceConfig(tuple(cfg.data.labelled))))
        self.stream_cfg = stream_config(cfg, self.aus)
        self.run_dir = self._run_dir()
        self.method: Method = build_method(cfg.method, self.aus, cfg.model).to(rt.device)
        if rt.channels_last:
            self.method.to(memory_format=torch.channels_last)
        self.validation = validation_split(self.stream_cfg)
        bank, bank_mask, self.bank_keys = label_bank(self.stream_cfg, frozenset(self.validation.keys))
        self.drop = label_drop_report(self.stream_cfg)
        if self.validation.keys and rt.main and t.progress:
            tqdm.write(f"AU validation set: {len(self.validation.keys)} images from {self.validation.subjects} "
                       f"subjects, excluded from training ({len(bank)} training images remain)", file=sys.stderr)
        self.method.setup(SetupInfo(self.aus, bank, bank_mask, validation_targets=self.validation.targets,
                                    validation_mask=self.validation.mask))
        broadcast_module(self.method, rt)
        self.groups = self.method.groups()
        self._check_groups()
        self.optimizers, self.schedulers, self.engines = {}, {}, {}
        for name, g in self.groups.items():
            opt = self._optimizer(g.params, cfg.optim.lr * g.lr_scale)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, self._lr_lambda)
            if t.deepspeed and g.deepspeed:
                self.engines[name] = deepspeed_engine(g.params, opt, sched, t.deepspeed, cfg.data.m1,
                                                      cfg.optim.accumulate, cfg.optim.clip_grad)
                opt, sched = self.engines[name].optimizer, self.engines[name].lr_scheduler
            self.optimizers[name], self.schedulers[name] = opt, sched
        self.step, self.starts, self.skipped_updates, self.skipped_samples, self.run_id = 0, 0, 0, 0, ""
        self.tracker = None

    # ------------------------------------------------------------------------------------------------ building
    def _run_dir(self) -> Path:
        t = self.cfg.train
        if t.resume == "auto" and not t.name:
            raise ConfigError("train.resume=auto needs train.name (the run directory to continue)")
        name = t.name or f"{self.cfg.method['name']}-fold{self.cfg.data.fold}-{time.strftime('%Y%m%d-%H%M%S')}"
        return Path(t.out) / self.rt.broadcast_object(name)

    def _check_groups(self) -> None:
        seen = {}
        for name, g in self.groups.items():
            for p in g.params:
                if id(p) in seen:
                    raise ValueError(f"{self.cfg.method['name']}: a parameter is in groups {seen[id(p)]} and {name}")
                seen[id(p)] = name

    def _optimizer(self, params, lr: float) -> torch.optim.Optimizer:
        o = self.cfg.optim
        if o.name == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)
        cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
        return cls(params, lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay)

    def _lr_lambda(self, step: int) -> float:
        o, total = self.cfg.optim, self.cfg.train.steps
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    # ------------------------------------------------------------------------------------------------ one update
    def _run_update(self, upd: Update, batches, previous):
        """Freeze, zero_grad, forward/backward over micro-batches, average, clip, finite check, step."""
        rt, params = self.rt, self.groups[upd.group].params
        frozen = [p for g in upd.freeze for p in self.groups[g].params if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)  # e.g. D while R trains: no gradient, and ZeRO-2 sees one reduction per param
        engine = self.engines.get(upd.group)
        opt = self.optimizers[upd.group]
        if engine is None:
            opt.zero_grad(set_to_none=True)
        parts, batch, accumulate = defaultdict(float), previous, self.cfg.optim.accumulate
        for micro in range(accumulate):
            if upd.new_batch or batch is None or micro > 0:
                batch = self._to_device(next(batches))
                self.skipped_samples += batch.skipped
            with rt.autocast():
                out = upd.loss(batch, self.step)
            loss = out["loss"]
            for k, v in out.items():
                parts[k] += float(v.detach() if torch.is_tensor(v) else v) / accumulate
            if rt.any_true(not bool(torch.isfinite(loss.detach()))):  # every rank refuses together
                parts["nonfinite"] = 1.0
                break
            if engine is not None:
                engine.backward(loss)  # DeepSpeed scales by accumulation itself
            else:  # gradients for this group only: nothing else is stepped (MAL's inner-step copies need none)
                (loss / accumulate).backward(inputs=params)
        for p in frozen:
            p.requires_grad_(True)
        if parts.get("nonfinite"):
            self._refuse(upd, "non-finite loss")
            if engine is None:
                opt.zero_grad(set_to_none=True)
            return batch, parts
        if engine is not None:
            engine.step()  # reduce, clip, step, zero_grad (ZeRO)
            return batch, parts
        average_gradients(params, rt)
        clip = self.cfg.optim.clip_grad or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        if not torch.isfinite(norm):  # gradients are averaged, so every rank sees the same norm
            self._refuse(upd, "non-finite gradient norm")
            opt.zero_grad(set_to_none=True)
            return batch, parts
        opt.step()
        parts["grad_norm"] = float(norm)
        return batch, parts

    def _refuse(self, upd: Update, why: str) -> None:
        self.skipped_updates += 1
        if self.rt.main:
            tqdm.write(f"step {self.step + 1}: update {upd.name!r} refused: {why}; parameters left unchanged",
                       file=sys.stderr)

    def _to_device(self, batch):
        b = batch.to(self.rt.device)
        if self.rt.channels_last:
            for name in ("images", "unlabelled", "expr_images"):
                if getattr(b, name) is not None:
                    setattr(b, name, getattr(b, name).contiguous(memory_format=torch.channels_last))
        return b

    # ------------------------------------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        cfg, rt, t = self.cfg, self.rt, self.cfg.train
        self._resume()
        self._start_tracking()
        stream = TrainStream(self.stream_cfg, rt.rank, rt.world, self.validation)
        stream.set_epoch(self.starts)  # a resumed run draws fresh shard orders (no loader position exists)
        batches = iter(stream)
        bar = tqdm(total=t.steps, initial=self.step, desc=f"train {cfg.method['name']}", unit="step",
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
            if self.step % t.log_every == 0 or self.step == t.steps:
                self._log_window(window, window_steps, seen / (time.perf_counter() - t0), bar)
                window, seen, t0, window_steps = defaultdict(float), 0, time.perf_counter(), 0
            last = self.step == t.steps
            if cfg.data.fold and ((t.eval_every and self.step % t.eval_every == 0) or last):
                metrics = self.evaluate()
                self.method.train()
            if last or (cfg.data.fold and t.eval_every and self.step % t.eval_every == 0):
                self._log_reports()
            if (t.checkpoint_every and self.step % t.checkpoint_every == 0) or last:
                self.save_checkpoint()
        bar.close()
        if t.rank_report:
            self._rank_report(first_keys)
        if rt.main:
            self._finish(metrics)
        return metrics

    def train_step(self, batches) -> tuple:
        """One step: the method's ordered updates, then no-gradient state, buffer averaging and LR schedules."""
        batch, window = None, defaultdict(float)
        for upd in self.method.updates(self.step):
            for _ in range(upd.repeat):
                batch, parts = self._run_update(upd, batches, batch)
                for k, v in parts.items():
                    window[f"train/{upd.name}/{k}"] += v / upd.repeat
        with torch.no_grad():
            self.method.after_step(batch, self.step)
        average_buffers(self.method, self.rt)
        for name, s in self.schedulers.items():
            if name not in self.engines:  # DeepSpeed engines step their own schedules
                s.step()
        self.step += 1
        return batch, window

    def _log_window(self, window: dict, steps: int, img_s: float, bar) -> None:
        keys = sorted(window)
        vec = self.rt.all_mean(torch.tensor([window[k] for k in keys] + [self.skipped_samples], dtype=torch.float64))
        values = {k: v / steps for k, v in zip(keys, vec.tolist())}
        values["train/images_per_s"] = img_s  # labelled images per second, all ranks
        values["train/lr"] = self.schedulers[next(iter(self.schedulers))].get_last_lr()[0]
        values["train/skipped_samples"] = vec[-1].item() * self.rt.world  # corrupt samples, all ranks, so far
        if self.rt.main:
            bar.set_postfix({k.split("/")[-2] + "." + k.split("/")[-1]: f"{v:.3g}" for k, v in values.items()
                             if k.endswith("/loss")} | {"img/s": f"{img_s:.0f}"})
            if self.tracker:
                self.tracker.log_metrics(values, self.step)

    # ------------------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Exact-once evaluation of the held-out fold over all ranks; metrics on rank 0 (others get {})."""
        metrics = evaluate_method(self.method, self.cfg, self.aus, self.rt)
        if self.rt.main and metrics and self.tracker:
            from ssau.tracking import eval_metric_dict

            self.tracker.log_metrics(eval_metric_dict(metrics), self.step)
        return metrics

    def _log_reports(self) -> None:
        """The method's tables since the last evaluation (MAL: sample weights) from every rank: CSV + histogram
        under the run directory's eval/step-N/, and in MLflow."""
        gathered = self.rt.gather_objects(self.method.report())
        if not self.rt.main or not gathered[0]:
            return
        from ssau.tracking import table_artifacts

        folder = f"eval/step-{self.step:07d}"
        for name, cols in gathered[0].items():
            table = {c: [v for g in gathered for v in g[name][c]] for c in cols}
            for path in table_artifacts(name, table, self.run_dir / folder):
                if self.tracker:
                    self.tracker.log_artifact(path, folder)

    # ------------------------------------------------------------------------------------------------ state
    def save_checkpoint(self) -> Path:
        rt = self.rt
        ckpt_dir = self.run_dir / "checkpoints"
        rngs = rt.gather_objects(rng_state())
        path = ckpt_dir / f"step-{self.step:07d}.pt"
        if self.engines:  # ZeRO partitions optimiser state: every rank saves its part
            for name, e in self.engines.items():
                e.save_checkpoint(str(ckpt_dir / "deepspeed" / name), tag=f"step-{self.step:07d}")
        if rt.main:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            state = {"step": self.step, "starts": self.starts, "method": self.method.state_dict(),
                     "optimizers": {k: o.state_dict() for k, o in self.optimizers.items() if k not in self.engines},
                     "schedulers": {k: s.state_dict() for k, s in self.schedulers.items() if k not in self.engines},
                     "rng": rngs, "config": to_dict(self.cfg), "aus": list(self.aus), "run_id": self.run_id,
                     "skipped_updates": self.skipped_updates}
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            torch.save(state, tmp)
            os.replace(tmp, path)  # atomic: a killed save never leaves a half checkpoint
            last = ckpt_dir / ".last.tmp"
            last.write_text(path.name + "\n")
            os.replace(last, ckpt_dir / "last")
        rt.barrier()
        return path

    def _resume(self) -> None:
        t = self.cfg.train
        if t.resume == "never":
            return
        if t.resume == "auto":
            pointer = self.run_dir / "checkpoints" / "last"
            if not pointer.is_file():
                return  # nothing to continue: a fresh run under this name
            path = self.run_dir / "checkpoints" / pointer.read_text().strip()
        else:
            path = Path(t.resume)
        state = torch.load(path, map_location=self.rt.device, weights_only=False)
        self.method.load_state_dict(state["method"])
        for k, o in state["optimizers"].items():
            self.optimizers[k].load_state_dict(o)
        for k, s in state["schedulers"].items():
            self.schedulers[k].load_state_dict(s)
        for name, e in self.engines.items():
            e.load_checkpoint(str(path.parent / "deepspeed" / name), tag=path.stem)
        self.step, self.starts = state["step"], state["starts"] + 1
        self.skipped_updates, self.run_id = state["skipped_updates"], state["run_id"]
        if len(state["rng"]) == self.rt.world:
            set_rng_state(state["rng"][self.rt.rank])
        if self.rt.main:
            tqdm.write(f"resumed {self.run_dir.name} at step {self.step} from {path}", file=sys.stderr)

    def _rank_report(self, first_keys) -> None:
        digest = hashlib.sha256()
        for name, p in sorted(self.method.state_dict().items()):
            digest.update(name.encode())
            digest.update(p.detach().cpu().contiguous().numpy().tobytes())
        world = dist.get_world_size() if dist.is_initialized() else 1
        out = self.run_dir / "ranks" / f"rank{self.rt.rank}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"rank": dist.get_rank() if dist.is_initialized() else 0, "world_size": world,
                                   "first_keys": first_keys, "state_sha256": digest.hexdigest(),
                                   "step": self.step, "backend": dist.get_backend() if dist.is_initialized() else "",
                                   "deepspeed": bool(self.engines)}))

    # ------------------------------------------------------------------------------------------------ tracking
    def _start_tracking(self) -> None:
        tr = self.cfg.tracking
        error = None
        if self.rt.main and tr.enabled:
            from ssau.tracking import Tracker, git_commit

            try:
                self.tracker = Tracker(tr)
            except ConfigError as e:
                error = str(e)
        error = self.rt.broadcast_object(error)  # every rank fails together, at once
        if error:
            raise ConfigError(error)
        if not self.tracker:
            return
        tags = {"method": self.cfg.method["name"], "corpus": ",".join(read_dataset(d)["corpus"] for d in self.cfg.data.labelled),
                "fold": self.cfg.data.fold, "label_drop": self.cfg.data.label_drop, "world_size": self.rt.world,
                "git_commit": git_commit(), "deepspeed": Path(self.cfg.train.deepspeed).name if self.cfg.train.deepspeed else "off"}
        if self.run_id:
            self.tracker.run_id = self.run_id
            self.tracker.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.tracker.start(self.cfg.tracking.run_name or self.run_dir.name, tags,
                                             self.cfg.tracking.parent_run_id)
            self.tracker.log_params(flatten(to_dict(self.cfg)))
            self.tracker.log_metrics({"data/label_drop_fraction": self.drop["fraction"],
                                      "data/hidden_images": self.drop["hidden_images"]}, 0)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg_path = self.run_dir / "config.yaml"
            cfg_path.write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
            self.tracker.log_artifact(cfg_path)

    def _finish(self, metrics: dict) -> None:
        model = self.run_dir / "model.pt"
        torch.save({"method": self.method.state_dict(), "config": to_dict(self.cfg), "aus": list(self.aus)}, model)
        if not self.tracker:
            return
        from ssau.tracking import eval_artifacts

        if metrics:
            for p in eval_artifacts(metrics, [au_name(a) for a in self.aus], self.run_dir / "eval"):
                self.tracker.log_artifact(p, "eval")
        self.tracker.log_artifact(model, "model")
        self.tracker.log_metrics({"train/refused_updates": self.skipped_updates}, self.step)
        self.tracker.end()


@torch.no_grad()
def evaluate_method(method: Method, cfg: Config, aus: tuple[int, ...], rt: Runtime,
                    dirs: tuple[str, ...] | None = None, folds: tuple[int, ...] | None = None) -> dict:
    method.eval()
    d = cfg.data
    dirs = dirs or tuple(d.labelled)
    folds = folds if folds is not None else ((d.fold,) if d.fold else None)
    probs, targets, masks = [], [], []
    for b in eval_loader(dirs, folds, aus, d.eval_batch, d.image_size, rt.rank, rt.world, min(d.workers, 2)):
        images = b.images.to(rt.device)
        if rt.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with rt.autocast():
            p = method.predict(images).float()
        rows = torch.cat([p, b.targets.to(rt.device), b.mask.to(rt.device), b.valid.to(rt.device).float()[:, None]], 1)
        if rt.world > 1:  # every rank yields the same number of equally sized batches
            gathered = [torch.empty_like(rows) for _ in range(rt.world)]
            dist.all_gather(gathered, rows)
            rows = torch.cat(gathered)
        rows = rows[rows[:, -1] > 0].cpu()
        J = len(aus)
        probs.append(rows[:, :J])
        targets.append(rows[:, J:2 * J])
        masks.append(rows[:, 2 * J:3 * J])
    if not rt.main:
        return {}
    if not probs:
        warnings.warn("evaluation fold is empty", stacklevel=2)
        return {}
    return au_metrics(torch.cat(probs).numpy(), torch.cat(targets).numpy(), torch.cat(masks).numpy(), aus)
