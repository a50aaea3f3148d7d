"""Gradient averaging that overlaps backward: DDP's bucketed reducer, shaped for ssau's update contract.

``average_gradients`` (``ssau.dist.collectives``) waits for backward to end, then all-reduces each group's
gradients in one flat tensor: nothing overlaps. ``BucketReducer`` does DDP's arithmetic while backward runs. Each
plain (non-DeepSpeed) group's parameters are cut into buckets of about ``train.bucket_mb`` MB, in reverse order of
registration, which is roughly the order backward reaches them. A post-accumulate-grad hook on every parameter
counts the gradients that are ready. Once a bucket is complete, its gradients are flattened and summed across ranks
with an asynchronous all-reduce while backward goes on.

Buckets are launched strictly in their index order on every rank. A complete bucket waits for the ones before it,
so every rank issues the same collectives in the same order whatever order its backward reaches them (DDP's rule).
``finish()`` launches the buckets whose parameters got no gradient in this backward (a gradient counts as zeros,
as in ``average_gradients``), waits, divides by the world size and copies the means back into ``.grad``.

What the update contract keeps:
- Per-group averaging: a bucket never spans two groups, so clipping and the finite check stay per group.
- Frozen groups get no hooks armed: only the groups of the update under way are reduced.
- ``optim.accumulate``: hooks are armed on the final micro-batch only, so non-final micro-batches make no
  communication. The final backward's hooks fire after the earlier micro-batches' gradients have been accumulated.
- The finite check: the update's "this rank's loss was not finite" flag travels as one extra element of bucket 0.
  Its sum says whether any rank saw a non-finite loss without a separate collective or host read. A non-finite
  gradient on any rank makes the averaged gradient non-finite, and so the group's norm, on every rank alike.
- Second-order methods: ``torch.autograd.grad`` (MAL's inner step) accumulates into no ``.grad`` and fires no hook.

``slow_network`` is for the benchmark only (``python -m ssau.bench.overlap``): a modelled link, (latency in seconds,
bytes per second), on which each collective takes latency + bytes / rate, one at a time in launch order, so that
the overlap shows on one machine as it would between nodes.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn


class _Bucket:
    def __init__(self, params: list[nn.Parameter]):
        self.params, self.flag = params, False
        self.ready, self.flat, self.work, self.done_at = 0, None, None, 0.0


class BucketReducer:
    """Averages the gradients of the plain groups ``groups`` (name -> parameters) across ranks, overlapping
    backward. Use ``arm(update, names, flag)`` around an update's final backward, then ``finish()``."""

    def __init__(self, groups: dict[str, list[nn.Parameter]], world: int, bucket_mb: float = 25.0,
                 overlap: bool = True, slow_network: tuple[float, float] | None = None):
        """``overlap=False``: the same buckets, launched only in ``finish()`` (after backward), for comparison."""
        self.groups, self.world, self.overlap, self.slow = groups, world, overlap, slow_network
        self.limit = max(1, int(bucket_mb * 2**20))
        self.layouts: dict[tuple, list[_Bucket]] = {}  # (update, its groups) -> buckets in launch order
        for p in (p for params in groups.values() for p in params) if world > 1 and overlap else ():
            p.register_post_accumulate_grad_hook(self._ready)  # for the parameters' lifetime, like DDP's
        self._owner: dict[int, _Bucket] = {}
        self._order: list[_Bucket] = []
        self._seen: list[nn.Parameter] | None = None  # the order gradients arrive in, learnt once per update
        self._key: tuple = ()
        self._next, self._link_free = 0, 0.0
        self.flag: torch.Tensor | None = None
        # A process group of the buckets' own: when a bucket goes out depends on which gradients a rank has, so on
        # the default group it could pair with another collective running inside backward (SyncBatchNorm, MAL's
        # normaliser, a ZeRO-2 engine's reduction) on one rank and not on another. Every rank builds the trainer's
        # updates in one order, so every rank creates this group at the same point.
        self.pg = dist.new_group() if world > 1 else None
        self.early = 0  # buckets of the last update launched while backward ran (the overlap; read by tests)

    def _layout(self, order: list[tuple[str, nn.Parameter]]) -> list[_Bucket]:
        """Buckets over ``order`` (group, parameter): about ``bucket_mb`` each, never spanning two groups."""
        buckets, cur, group, size = [], [], None, 0
        for g, p in order:
            if cur and g != group:
                buckets.append(_Bucket(cur))
                cur, size = [], 0
            cur.append(p)
            group, size = g, size + p.numel() * p.element_size()
            if size >= self.limit:
                buckets.append(_Bucket(cur))
                cur, size = [], 0
        return buckets + ([_Bucket(cur)] if cur or not buckets else [])

    # --------------------------------------------------------------------------------------------- one update
    def arm(self, update: str, names: list[str], flag: torch.Tensor) -> None:
        """Reduce groups ``names`` of update ``update`` during the next backward. ``flag``: a float scalar tensor, 1
        if this rank's loss was not finite; its sum over ranks is ``self.flag`` after ``finish()``.

        An update's first reduction uses buckets in reverse order of registration and records the order in which
        its gradients arrive; later ones use buckets in rank 0's recorded order (parameters that got no gradient
        last), as DDP rebuilds its buckets after the first iteration. Every rank takes rank 0's order."""
        self._key = (update, tuple(names))
        self._order = []
        if self.world > 1:
            layout = self.layouts.get(self._key)
            self._seen = [] if layout is None and self.overlap else None
            self._order = layout or self._layout([(g, p) for g in names for p in reversed(self.groups[g])])
        for i, b in enumerate(self._order):
            b.ready, b.flat, b.work, b.flag = 0, None, None, i == 0
            for p in b.params:
                self._owner[id(p)] = b
        self._next, self.flag, self.early = 0, flag.detach().float().reshape(1), 0

    def _ready(self, p: torch.Tensor) -> None:
        b = self._owner.get(id(p))
        if b is None or b.flat is not None:
            return  # not armed for this group, or launched already (a second backward before finish)
        b.ready += 1
        if self._seen is not None:
            self._seen.append(p)
        while self._next < len(self._order) and self._order[self._next].ready == len(self._order[self._next].params):
            self._launch(self._order[self._next])
            self._next += 1
            self.early += 1

    def _launch(self, b: _Bucket) -> None:
        grads = []
        for p in b.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)  # no gradient on this rank: zeros, the same layout on every rank
            grads.append(p.grad.reshape(-1))
        if b.flag:
            grads.append(self.flag.to(grads[0].dtype if grads else torch.float32))
        b.flat = torch.cat(grads) if grads else torch.zeros(0)
        b.work = dist.all_reduce(b.flat, group=self.pg, async_op=True)
        if self.slow:  # the modelled link: one collective at a time, each latency + bytes / rate long
            latency, rate = self.slow
            seconds = latency + b.flat.numel() * b.flat.element_size() / rate
            self._link_free = max(time.perf_counter(), self._link_free) + seconds
            b.done_at = self._link_free

    def finish(self) -> None:
        """Launch what backward did not reach, wait for every bucket, and write the means back into ``.grad``."""
        for b in self._order[self._next:]:
            self._launch(b)
        self._next = len(self._order)
        for b in self._order:
            b.work.wait()
            if self.slow:
                time.sleep(max(0.0, b.done_at - time.perf_counter()))
            offset = 0
            for p in b.params:
                n = p.numel()
                p.grad.copy_(b.flat[offset:offset + n].view_as(p.grad).div_(self.world))
                offset += n
            if b.flag:
                self.flag = b.flat[offset:offset + 1].float()
            b.flat, b.work = None, None
            for p in b.params:
                self._owner.pop(id(p), None)
        if self._seen is not None:
            self._learn()
        self._order, self._seen = [], None

    def _learn(self) -> None:
        """This update's buckets from now on: rank 0's arrival order, then what got no gradient."""
        _, names = self._key
        every = [(g, p) for g in names for p in reversed(self.groups[g])]
        index = {id(p): i for i, (_, p) in enumerate(every)}
        box = [[index[id(p)] for p in self._seen]]
        dist.broadcast_object_list(box, src=0)
        arrived = list(dict.fromkeys(box[0]))
        rest = sorted(set(range(len(every))) - set(arrived))
        self.layouts[self._key] = self._layout([every[i] for i in arrived + rest])
