"""One update of the method contract (ssau/methods/base.py), in one visible place: freeze the listed groups,
zero_grad, forward + backward over ``optim.accumulate`` micro-batches (one backward for all of the update's
groups), then per group: average gradients across ranks, clip to the group's own norm, finite check (a NaN/Inf
update is refused on every rank and reported), step; then a check of what the step made. Under DeepSpeed one of an
update's groups may be an engine, which reduces, clips and steps its own parameters."""

from __future__ import annotations

import sys
from collections import defaultdict
from typing import Callable

import torch
from tqdm import tqdm

from ssau.config import OptimConfig
from ssau.data.batch import Batch
from ssau.dist.collectives import average_gradients
from ssau.dist.ranks import Runtime
from ssau.errors import ConfigError, RunStopped
from ssau.methods.base import Group, Update


class Updates:
    """Runs updates over the trainer's groups, optimisers and engines (shared, not copied); counts refusals."""

    def __init__(self, optim: OptimConfig, rt: Runtime, groups: dict[str, Group], optimizers: dict, engines: dict):
        self.optim, self.rt, self.groups, self.optimizers, self.engines = optim, rt, groups, optimizers, engines
        self.refused = 0  # updates refused (non-finite loss or gradient), checkpointed by the trainer

    def run(self, upd: Update, draw: Callable[[], Batch], previous: Batch | None, step: int,
            last_good: str = "") -> tuple[Batch, dict]:
        """``upd`` at training step ``step`` (0-based); ``draw()`` gives the next batch, ``previous`` is the last
        update's (``new_batch=False``); ``last_good`` names the checkpoint a stopped run can go back to. Returns the
        batch used and the loss parts (and grad norms) to log."""
        rt, names = self.rt, upd.groups
        params = [p for g in names for p in self.groups[g].params]
        frozen = [p for g in upd.freeze for p in self.groups[g].params if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)  # e.g. D while R trains: no gradient, and ZeRO-2 sees one reduction per param
        engines = [g for g in names if g in self.engines]
        if len(engines) > 1:
            raise ConfigError(f"update {upd.name!r} steps DeepSpeed engines {', '.join(engines)} from one backward; "
                              f"at most one of its groups may be an engine (declare the others deepspeed=False)")
        engine = self.engines[engines[0]] if engines else None
        for g in names:
            if g not in self.engines:
                self.optimizers[g].zero_grad(set_to_none=True)
        parts, batch, accumulate = defaultdict(float), previous, self.optim.accumulate
        for micro in range(accumulate):
            if upd.new_batch or batch is None or micro > 0:
                batch = draw()
            with rt.autocast():
                out = upd.loss(batch, step)
            loss = out["loss"]
            for k, v in out.items():
                parts[k] += float(v.detach() if torch.is_tensor(v) else v) / accumulate
            if rt.any_true(not bool(torch.isfinite(loss.detach()))):  # every rank refuses together
                parts["nonfinite"] = 1.0
                break
            if engine is not None:
                engine.backward(loss)  # DeepSpeed scales by accumulation itself (and fills plain groups' grads)
            else:  # gradients for this update's groups only: nothing else is stepped (MAL's inner-step copies)
                (loss / accumulate).backward(inputs=params)
        for p in frozen:
            p.requires_grad_(True)
        if parts.get("nonfinite"):
            self._refuse(upd, "non-finite loss", step)
            for g in names:
                if g not in self.engines:
                    self.optimizers[g].zero_grad(set_to_none=True)
            return batch, parts
        # Each group is averaged and clipped to its own norm, as a DeepSpeed engine clips its own parameters: plain
        # averaging and ZeRO then reach the same state. Any non-finite plain group refuses every plain group.
        plain, norms = [g for g in names if g not in self.engines], {}
        for g in plain:
            average_gradients(self.groups[g].params, rt)
            norms[g] = torch.nn.utils.clip_grad_norm_(self.groups[g].params, self.optim.clip_grad or float("inf"))
        if not all(torch.isfinite(n) for n in norms.values()):  # averaged gradients: the same verdict on every rank
            for g in plain:
                self.optimizers[g].zero_grad(set_to_none=True)
            # An engine has reduced its share already and DeepSpeed has no call to discard it: it steps alone.
            self._refuse(upd, "non-finite gradient norm" + (f" in {', '.join(plain)}; the DeepSpeed engine steps "
                                                            "alone" if engine is not None else ""), step)
            plain = []
        for g in plain:
            parts["grad_norm" if len(names) == 1 else f"grad_norm_{g}"] = float(norms[g])
        if engine is not None:
            engine.step()  # reduce, clip, step, zero_grad (ZeRO)
        for g in plain:
            self.optimizers[g].step()
        if engine is not None or plain:
            self._check_params(upd, params, step, last_good)
        return batch, parts

    def _check_params(self, upd: Update, params: list, step: int, last_good: str) -> None:
        """A finite loss and gradient can still step into inf (optim.lr far too large): check what the step made,
        with one fused norm per update, and stop before anything non-finite is logged or saved."""
        norms = torch._foreach_norm([p.detach() for p in params])
        if self.rt.any_true(not bool(torch.isfinite(torch.stack(norms)).all())):
            raise RunStopped(f"step {step + 1}: update {upd.name!r} left NaN or inf in the parameters "
                             f"(optim.lr={self.optim.lr:g}); stopped without saving them; "
                             f"the last good checkpoint is {last_good or 'none'}")

    def _refuse(self, upd: Update, why: str, step: int) -> None:
        self.refused += 1
        if self.rt.main:
            tqdm.write(f"step {step + 1}: update {upd.name!r} refused: {why}; parameters left unchanged",
                       file=sys.stderr)
