"""One update of the method contract (ssau/methods/base.py), in one visible place: freeze the listed groups,
zero_grad, forward + backward over ``optim.accumulate`` micro-batches (one backward for all of the update's
groups), then per group: average gradients across ranks, clip to the group's own norm, finite check (a NaN/Inf
update is refused on every rank and reported), step. Under DeepSpeed one of an update's groups may be an engine,
which reduces, clips and steps its own parameters.

Gradients of plain groups are averaged by ``ssau.dist.buckets.BucketReducer`` while the final micro-batch's backward
runs (buckets of ``train.bucket_mb``). The step waits on the host only where a decision needs it:
- Loss parts stay tensors on the device; the trainer reads them back once per ``train.log_every``.
- The finite check is one device flag: "some rank's loss was not finite" travels inside the gradient all-reduce,
  and a non-finite gradient on any rank shows in the averaged norms. With fused optimisers (``optim.fused``: on by
  default on CUDA) the flag goes to the optimiser as its ``found_inf`` (the AMP contract: a flagged step changes
  neither parameters nor state), so no host read is needed; otherwise one host read per update decides.
- What a step made (NaN or inf in the parameters, e.g. a far too large optim.lr) is checked on the device after every
  update and read back by ``flush()``, which the trainer calls before anything is logged, checkpointed or evaluated.
  Refusals found on the device are reported there too, naming their steps.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from typing import Callable

import torch
from tqdm import tqdm

from ssau.config import OptimConfig
from ssau.data.batch import Batch
from ssau.dist.buckets import BucketReducer
from ssau.dist.ranks import Runtime
from ssau.errors import ConfigError, RunStopped
from ssau.methods.base import Group, Update


class Updates:
    """Runs updates over the trainer's groups, optimisers and engines (shared, not copied); counts refusals."""

    def __init__(self, optim: OptimConfig, rt: Runtime, groups: dict[str, Group], optimizers: dict, engines: dict,
                 bucket_mb: float = 25.0, overlap: bool = True, slow_network: tuple[float, float] | None = None):
        self.optim, self.rt, self.groups, self.optimizers, self.engines = optim, rt, groups, optimizers, engines
        self.refused = 0  # updates refused (non-finite loss or gradient), checkpointed by the trainer
        self.reducer = BucketReducer({g: grp.params for g, grp in groups.items() if g not in engines}, rt.world,
                                     bucket_mb, overlap, slow_network)
        self._pending: list[tuple[int, str, torch.Tensor]] = []  # (step, update, [refused, params bad]) to read

    def run(self, upd: Update, draw: Callable[[], Batch], previous: Batch | None, step: int) -> tuple[Batch, dict]:
        """``upd`` at training step ``step`` (0-based); ``draw()`` gives the next batch, ``previous`` is the last
        update's (``new_batch=False``). Returns the batch used and the loss parts (and grad norms, tensors) to log."""
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
        plain = [g for g in names if g not in self.engines]
        for g in plain:
            self.optimizers[g].zero_grad(set_to_none=True)
        parts: dict = defaultdict(float)
        batch, accumulate = previous, self.optim.accumulate
        bad = torch.zeros((), dtype=torch.bool, device=rt.device)  # this rank saw a non-finite loss
        for micro in range(accumulate):
            if upd.new_batch or batch is None or micro > 0:
                batch = draw()
            with rt.autocast():
                out = upd.loss(batch, step)
            loss = out["loss"]
            for k, v in out.items():
                parts[k] = parts[k] + (v.detach().float() if torch.is_tensor(v) else v) / accumulate
            bad = bad | ~torch.isfinite(loss.detach())
            if engine is not None:  # an engine reduces inside its backward: it must not see a NaN loss at all
                if rt.any_true(bool(bad)):
                    return self._refuse_loss(upd, names, frozen, batch, parts, step)
            if micro == accumulate - 1:
                self.reducer.arm(upd.name, plain, bad)  # the final backward reduces as it goes
            if engine is not None:  # one engine.step() per update: say which backward ends the accumulation
                engine.set_gradient_accumulation_boundary(micro == accumulate - 1)  # (its own count would not)
                engine.backward(loss)  # DeepSpeed scales by accumulation itself (and fills plain groups' grads)
            else:  # gradients for this update's groups only: nothing else is stepped (MAL's inner-step copies)
                (loss / accumulate).backward(inputs=params)
        for p in frozen:
            p.requires_grad_(True)
        self.reducer.finish()
        # Each group is averaged and clipped to its own norm, as a DeepSpeed engine clips its own parameters: plain
        # averaging and ZeRO then reach the same state. Any non-finite plain group refuses every plain group.
        norms = {g: torch.nn.utils.clip_grad_norm_(self.groups[g].params, self.optim.clip_grad or float("inf"))
                 for g in plain}
        loss_bad = (self.reducer.flag.reshape(()) > 0) if rt.world > 1 and plain else bad  # on any rank
        refused = loss_bad
        if norms:
            refused = refused | ~torch.isfinite(torch.stack(list(norms.values()))).all()
        for g in plain:
            parts["grad_norm" if len(names) == 1 else f"grad_norm_{g}"] = norms[g].detach()
        fused = plain and all(pg.get("fused") for g in plain for pg in self.optimizers[g].param_groups)
        if fused:  # the verdict stays on the device: a flagged fused step leaves parameters and state as they were
            for g in plain:
                self.optimizers[g].found_inf = refused.float()
        elif plain and bool(refused):  # one host read per update on the unfused path
            for g in plain:
                self.optimizers[g].zero_grad(set_to_none=True)
            if bool(loss_bad):
                parts["nonfinite"] = 1.0
            self._report(upd.name, step, "non-finite loss" if bool(loss_bad) else "non-finite gradient norm" + (
                f" in {', '.join(plain)}; the DeepSpeed engine steps alone" if engine is not None else ""))
            plain = []
        if engine is not None:
            engine.step()  # reduce, clip, step, zero_grad (ZeRO)
        for g in plain:
            self.optimizers[g].step()
        if engine is not None or plain:  # what the step made, read back by flush()
            finite = torch.isfinite(torch.stack(torch._foreach_norm([p.detach() for p in params]))).all()
            self._pending.append((step, upd.name, torch.stack([refused if fused else torch.zeros_like(refused),
                                                               ~finite])))
            if len(self._pending) >= 4096:  # a caller that never flushes (a benchmark loop) keeps memory bounded
                self.flush()
        return batch, parts

    def flush(self, last_good: str = "") -> None:
        """Read back what the updates since the last flush left on the device (one host read): report refusals
        decided there, and stop (RunStopped, on every rank alike) at the first update that left NaN or inf in the
        parameters, before anything is logged or saved. ``last_good`` names the checkpoint to go back to."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        flags = self.rt.all_max(torch.stack([f for _, _, f in pending]).to(torch.int32))
        for (step, name, _), (refused, broken) in zip(pending, flags.tolist()):
            if refused:
                self._report(name, step, "non-finite loss or gradient")
            if broken:
                raise RunStopped(f"step {step + 1}: update {name!r} left NaN or inf in the parameters "
                                 f"(optim.lr={self.optim.lr:g}); stopped without saving them; "
                                 f"the last good checkpoint is {last_good or 'none'}")

    def _refuse_loss(self, upd: Update, names: list[str], frozen: list, batch: Batch, parts: dict, step: int):
        for p in frozen:
            p.requires_grad_(True)
        for g in names:
            if g not in self.engines:
                self.optimizers[g].zero_grad(set_to_none=True)
        self._report(upd.name, step, "non-finite loss")
        parts["nonfinite"] = 1.0
        return batch, parts

    def _report(self, name: str, step: int, why: str) -> None:
        self.refused += 1
        if self.rt.main:
            tqdm.write(f"step {step + 1}: update {name!r} refused: {why}; parameters left unchanged", file=sys.stderr)
