"""MAL's meta-gradient as issue 26 computes it (J V by forward mode, second-order work on psi only) against the
formulation before it (a differentiable inner step through the whole base net), kept here as the reference; and
base-learning through the meta-train forward against a new forward."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from ranks import run_ranks
from test_mal import J, make_batch, rank_slice, tiny_mal
from torch import nn
from torch.func import functional_call

from ssau.data.batch import Batch
from ssau.dist.collectives import sum_across_ranks
from ssau.methods import mal_meta
from ssau.methods.backbones import TinyCNN
from ssau.methods.mal import MAL


def reference_meta_loss(m: MAL, batch: Batch) -> torch.Tensor:
    """``MAL.meta_loss`` before issue 26: theta* built with ``create_graph=True`` on detached copies of theta, the
    inner gradient summed over ranks with a differentiable all-reduce, the validation loss at theta* differentiated
    back through the inner step."""
    n = batch.images.shape[0]
    theta = {k: p.detach().requires_grad_() for k, p in m.named_parameters() if not k.startswith("meta.")}
    buffers = {k: b.clone() for k, b in m.named_buffers()}
    f, au, fe = functional_call(m, {**theta, **buffers}, (m.images(batch),))
    wn = m.normalise_weights(m.weights(f), n, differentiable=True)
    losses = torch.cat([m.au_losses(au[:n], batch.targets, batch.mask), m.fe_losses(fe[n:], batch.expr_labels)])
    grads = torch.autograd.grad((wn * losses).sum(), list(theta.values()), create_graph=True, allow_unused=True)
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, theta.values())])
    flat = sum_across_ranks(flat, differentiable=True)
    star, offset = {}, 0
    for k, p in theta.items():
        star[k] = p - m.params.alpha * flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    _, val_logits, _ = functional_call(m, {**star, **buffers}, (batch.val_images,))
    return m.validation_loss(val_logits, batch.val_targets, batch.val_mask)


def psi_gradient(m: MAL, loss: torch.Tensor) -> torch.Tensor:
    m.zero_grad(set_to_none=True)
    loss.backward(inputs=list(m.meta.parameters()))
    return torch.cat([m.meta.weight.grad.reshape(-1), m.meta.bias.grad.reshape(-1)])


def bn_mal(seed: int = 0, dropout: float = 0.0, **params) -> MAL:
    """``tiny_mal`` with a BatchNorm backbone (the samples of a batch coupled through its statistics) in float64."""
    m = tiny_mal(seed, **params)
    torch.manual_seed(seed + 1)
    m.backbone = TinyCNN(width=4)
    dim = m.backbone.dim
    m.head, m.expr_head, m.meta = nn.Linear(dim, J), nn.Linear(dim, 7), nn.Linear(dim, 1)
    m.dropout = nn.Dropout(dropout)
    return m.double()


CASES = {"linear": lambda: tiny_mal(alpha=0.5),
         "batchnorm": lambda: bn_mal(alpha=0.5),
         "batchnorm+mean+dropout": lambda: bn_mal(alpha=0.5, dropout=0.3, normalise="mean")}


@pytest.mark.parametrize("path", ["forward", "double_backward"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_meta_gradient_equals_the_differentiable_inner_step(case, path, monkeypatch):
    if path == "double_backward":  # the path taken where BatchNorm statistics are all-reduced (sync_bn, ranks > 1)
        monkeypatch.setattr("ssau.methods.mal.reduces_statistics", lambda module: True)
    new = CASES[case]()
    old = copy.deepcopy(new)
    batch = make_batch()
    torch.manual_seed(7)  # the same dropout masks for both (drawn in the same order: meta-train, then meta-test)
    want_loss = reference_meta_loss(old, batch)
    torch.manual_seed(7)
    got_loss = new.meta_loss(batch, 0)["loss"]
    assert got_loss.item() == pytest.approx(want_loss.item(), rel=1e-12)  # L_val(theta*) itself
    want, got = psi_gradient(old, want_loss), psi_gradient(new, got_loss)
    assert want.abs().max() > 1e-3
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-9), (got, want)


def test_forward_mode_skips_the_second_order_pass_through_the_base_net():
    m = bn_mal(alpha=0.5)
    batch = make_batch()
    loss = m.meta_loss(batch, 0)["loss"]
    # The meta loss's graph holds psi's weights and constants: nothing of the base net's forward.
    seen, todo = set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        assert "Convolution" not in type(node).__name__
        todo += [nxt for nxt, _ in node.next_functions]
    assert len(seen) < 40
    assert psi_gradient(m, loss).abs().max() > 1e-3


def test_base_learning_through_the_meta_train_forward_equals_a_new_forward():
    reused, fresh = bn_mal(alpha=0.5), bn_mal(alpha=0.5)
    batch = make_batch()
    calls = {"reused": 0, "fresh": 0}
    for name, m in (("reused", reused), ("fresh", fresh)):
        m.backbone.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
        m.meta_loss(batch, 0)["loss"].backward(inputs=list(m.meta.parameters()))
        with torch.no_grad():
            m.meta.weight -= 0.1 * m.meta.weight.grad  # psi -> psi-hat (Eq. 7): theta is untouched
        if name == "fresh":
            m._train_forward.take()  # as before issue 26: base-learning runs its own forward
        out = m.base_loss(batch, 0)
        m.zero_grad(set_to_none=True)
        out["loss"].backward(inputs=m.groups()["base"].params)
    assert calls["reused"] == calls["fresh"] - 1  # one forward of the training batch fewer
    for (name, a), b in zip(reused.named_parameters(), fresh.parameters()):
        if a.grad is not None or b.grad is not None:
            assert torch.allclose(a.grad, b.grad, rtol=1e-12, atol=1e-15), name
    for (name, a), b in zip(reused.named_buffers(), fresh.buffers()):  # running statistics moved once, alike
        assert torch.equal(a, b), name
    assert reused.backbone.body[1].num_batches_tracked.item() == 1
    # Kept: the same batch at the same theta. New forward: another batch (a later micro-batch under optim.accumulate)
    # or theta changed in place since (a stale graph).
    other = make_batch(seed=3)
    for meta_batch, change_theta, forwards in ((other, False, 0), (batch, False, 1), (other, True, 1)):
        reused.meta_loss(meta_batch, 0)
        if change_theta:
            with torch.no_grad():
                reused.head.bias.add_(0.0)
        before = calls["reused"]
        assert torch.allclose(reused.base_loss(other, 0)["loss"], fresh.base_loss(other, 0)["loss"], rtol=1e-12)
        assert calls["reused"] == before + forwards


def test_a_copy_of_the_method_leaves_the_kept_forward_behind():
    m = bn_mal()
    m.meta_loss(make_batch(), 0)
    assert m._train_forward.value is not None and copy.deepcopy(m)._train_forward.value is None


def _rank_grads_sync_bn(rank: int, world: int, batch: Batch) -> dict:
    from ssau.dist.collectives import average_gradients
    from ssau.dist.ranks import Runtime
    from ssau.methods.syncbn import convert_sync_bn

    m = convert_sync_bn(bn_mal(alpha=0.5), torch.device("cpu"))
    assert mal_meta.reduces_statistics(m) and not mal_meta.reduces_statistics(bn_mal())  # the double backward
    local = rank_slice(batch, rank, world)
    rt = Runtime(rank, world, torch.device("cpu"), bf16=False, channels_last=False)
    meta, base = list(m.meta.parameters()), m.groups()["base"].params
    m.meta_loss(local, 0)["loss"].backward(inputs=meta)
    average_gradients(meta, rt)
    m.base_loss(local, 0)["loss"].backward(inputs=base)
    average_gradients(base, rt)
    return {"meta": [p.grad.numpy().copy() for p in meta], "base": [p.grad.numpy().copy() for p in base]}


def test_two_ranks_with_global_batchnorm_equal_one_process_of_2b():
    """model.sync_bn: J V by the double backward (forward mode through torch's functional all-reduce loses the
    tangent without an error), the meta-train forward reused, the same gradients as one process."""
    batch = make_batch(m1=8, me=6, mv=10)
    single = bn_mal(alpha=0.5)
    meta, base = list(single.meta.parameters()), single.groups()["base"].params
    single.meta_loss(batch, 0)["loss"].backward(inputs=meta)
    single.base_loss(batch, 0)["loss"].backward(inputs=base)
    assert any(p.grad.abs().max() > 1e-4 for p in meta)
    for r in run_ranks(_rank_grads_sync_bn, 2, batch):  # GlobalBatchNorm computes in float32
        for got, want in zip(r["meta"] + r["base"], [p.grad for p in meta + base]):
            assert np.allclose(got, want.numpy(), rtol=1e-4, atol=1e-6), (got, want)


def test_step_cost_benchmark_times_mal_against_mtl_in_interleaved_rounds(corpora, tmp_path):
    from ssau.bench.mal_steps import interleaved

    recipe = str(Path(__file__).parents[1] / "launch/recipes/compare-synthetic.yaml")
    overrides = [f"data.labelled=[{corpora.bp4d(frames=10)}]", f"data.expression=[{corpora.rafdb()}]",
                 "model.backbone=tiny", "data.image_size=32", "data.m1=4", "data.m_expr=4", "data.m2=0",
                 "data.val_batch=6", "data.validation=0.05", "data.workers=0", "train.steps=100"]
    out = interleaved(recipe, overrides, ["mtl", "mal"], warmup=1, steps=1, rounds=2)
    assert set(out["s_per_step"]) == {"mtl", "mal"} and all(s > 0 for s in out["s_per_step"].values())
    assert out["ratio"]["mtl"] == 1.0 and len(out["round_ratios"]["mal"]) == 2
