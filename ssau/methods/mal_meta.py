"""MAL's meta-gradient with second-order work on psi only (issue 26), and the meta-train forward kept for
base-learning. ``ssau.methods.mal`` holds the algorithm; this module holds the calculus it leans on.

Eq. 6 is theta*(psi) = theta - alpha * sum_i wn_i(psi) grad l_i(theta), summed over the global batch, where l_i is
sample i's loss (Eq. 1 or 2) and wn_i its normalised weight (Eq. 4, Sec. 4.1.2). The weights read f(x) detached, so
they are constants of theta, and by the chain rule

    d L_val(theta*(psi)) / d psi = sum_i c_i * d wn_i / d psi,   c_i = -alpha * <grad l_i(theta), V>,

with V = grad L_val at theta* (the global validation loss, Eq. 7-8). The numbers <grad l_i, V> are one
Jacobian-vector product J V of the per-sample loss vector l(theta) in the direction V: a forward-mode pass
(``jvp_losses``), about three forwards' work, instead of differentiating the whole inner step a second time
(``autograd.grad(create_graph=True)`` through the backbone, then a double backward). J is the loss vector's full
Jacobian, so BatchNorm's coupling of the samples of a batch is inside it, as it was inside the old double backward.

Torch's functional all-reduce passes no tangent in forward mode (it drops it without an error), and
``nn.SyncBatchNorm`` has no forward-mode rule, so where BatchNorm statistics are all-reduced across ranks
(``model.sync_bn`` on more than one rank) J V is taken by reverse mode twice on the retained meta-train graph
(``double_backward_losses``): as exact, and about as costly as before.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.autograd.forward_ad as fwad
from torch import nn
from torch.func import functional_call

from ssau.data.batch import Batch
from ssau.dist.collectives import sum_across_ranks, world_size
from ssau.methods.syncbn import GlobalBatchNorm


def flat_sum_across_ranks(grads: tuple[torch.Tensor | None, ...], like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-parameter gradients summed over ranks in one flat all-reduce; a missing one counts as zeros."""
    if world_size() == 1:  # no copy through a flat buffer
        return [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, like)]
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, like)])
    flat = sum_across_ranks(flat)
    return [t.view_as(p) for t, p in zip(flat.split([p.numel() for p in like]), like)]


def buffer_copies(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of ``module``'s buffers, for a ``functional_call`` whose BatchNorm running statistics must not move."""
    return {n: b.clone() for n, b in module.named_buffers()}


def reduces_statistics(module: nn.Module) -> bool:
    """Whether a forward of ``module`` all-reduces BatchNorm statistics (``model.sync_bn`` on several ranks)."""
    return world_size() > 1 and any(isinstance(m, (GlobalBatchNorm, nn.SyncBatchNorm)) for m in module.modules())


class RngState:
    """The random state before a forward, to draw the same dropout masks again in a later forward."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextmanager
    def replayed(self) -> Iterator[None]:
        """Draws inside start from the captured state; the state outside is left as it was."""
        with torch.random.fork_rng(devices=[self.device] if self.cuda is not None else []):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def jvp_losses(module: nn.Module, params: dict[str, torch.Tensor], tangents: list[torch.Tensor], x: torch.Tensor,
               losses_of: Callable[[tuple], torch.Tensor], rng: RngState) -> torch.Tensor:
    """J V by forward mode: the per-sample losses ``losses_of(module(x))`` differentiated along ``tangents`` (one
    per parameter of ``params``) -> [N]. The forward draws the dropout masks of the forward that ``rng`` preceded,
    on copies of the buffers (BatchNorm's running statistics stay as they are); no reverse graph is built."""
    with torch.no_grad(), fwad.dual_level():
        duals = {n: fwad.make_dual(p.detach(), t) for (n, p), t in zip(params.items(), tangents)}
        with rng.replayed():
            out = functional_call(module, {**duals, **buffer_copies(module)}, (x,))
        primal, tangent = fwad.unpack_dual(losses_of(out))
    return torch.zeros_like(primal) if tangent is None else tangent


def double_backward_losses(losses: torch.Tensor, params: list[torch.Tensor],
                           tangents: list[torch.Tensor]) -> torch.Tensor:
    """J V by reverse mode twice (for forwards with collectives, see the module docstring): J^T u with a graph,
    then the gradient of <J^T u, V> in u, on the graph ``losses`` came from (kept alive) -> [N]."""
    u = torch.zeros_like(losses, requires_grad=True)  # J^T u is linear in u: its value does not matter
    vjp = torch.autograd.grad(losses, params, grad_outputs=u, create_graph=True, allow_unused=True)
    dot = sum(((g * t).sum() for g, t in zip(vjp, tangents) if g is not None), losses.new_zeros(()))
    (jv,) = torch.autograd.grad(dot, u, allow_unused=True)
    return torch.zeros_like(losses) if jv is None else jv


@dataclass
class TrainForward:
    """The meta-train forward at theta, kept for base-learning: Eq. 10's losses are Eq. 5's (the same samples, the same
    theta); only the weights change, so base-learning backpropagates through this graph instead of a new forward."""
    batch: Batch
    features: torch.Tensor  # f(x), detached: Eq. 9 reads it with psi-hat
    au_losses: torch.Tensor  # L^AU_i(theta) with their graph
    fe_losses: torch.Tensor
    buffers: dict[str, torch.Tensor]  # the buffers as that forward left them (BatchNorm running statistics)
    versions: list[int]  # theta's version counters: any in-place change of theta after it makes the graph stale

    def fits(self, batch: Batch, params: list[torch.Tensor]) -> bool:
        return batch is self.batch and self.versions == [p._version for p in params]


class ForwardSlot:
    """Holds at most one ``TrainForward`` between the two updates of a step. A copy of the method (``copy.deepcopy``)
    or a pickle starts empty: the graph belongs to this step of this object."""

    def __init__(self):
        self.value: TrainForward | None = None

    def take(self) -> TrainForward | None:
        value, self.value = self.value, None
        return value

    def __deepcopy__(self, memo) -> "ForwardSlot":
        return ForwardSlot()

    def __getstate__(self) -> dict:
        return {"value": None}
