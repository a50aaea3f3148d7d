"""MLCR (Niu et al.): each loss term against a hand computation, the AU relation graph, the GCN, the stage switch
(groups, learning rates, W^0 through checkpoint and resume), per-view evaluation, and selective learning's global
counts on 2 real ranks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from ranks import run_ranks

from ssau.cli import main
from ssau.config import ModelConfig
from ssau.methods.mlcr import GCN, js_divergence, multi_view_loss, normalise_adjacency, relation_matrix
from ssau.methods.parts import a_c_values, selective_mask
from ssau.methods.registry import build_method, resolve_params

BP4D = (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24)


def test_selective_learning_keeps_ceil_ac_n_negatives():
    # 10 images: AU a has 1 positive (< 0.3 * 10): ceil(3) of its 9 negatives kept; AU b has 5 positives: all kept;
    # AU c: 2 unknown, 1 positive of 8 known -> ceil(0.3 * 8) = 3 negatives of 7.
    t = torch.zeros(10, 3)
    t[0, 0] = 1
    t[:5, 1] = 1
    t[0, 2] = 1
    mask = torch.ones(10, 3)
    mask[8:, 2] = 0
    torch.manual_seed(0)
    m = selective_mask(t, mask, [0.3, 0.3, 0.3])
    assert m[0, 0] == 1 and m[1:, 0].sum() == 3  # the positive and 3 negatives
    assert torch.equal(m[:, 1], mask[:, 1])
    assert m[0, 2] == 1 and m[1:8, 2].sum() == 3 and m[8:, 2].sum() == 0
    # kept negatives are a random choice: another draw, another set, the same count
    torch.manual_seed(1)
    m2 = selective_mask(t, mask, [0.3, 0.3, 0.3])
    assert m2[1:, 0].sum() == 3 and not torch.equal(m[:, 0], m2[:, 0])
    # no negative to drop: nothing masked (1 negative left over would be dropped; none here)
    assert torch.equal(selective_mask(t[:2], mask[:2], [0.9, 0.9, 0.9]), mask[:2])
    # Through the method's own a_c (exact Python floats: a float32 0.3 times 10 rounds up to 4 negatives)
    m = build_method(resolve_params({"name": "mlcr"}), BP4D, ModelConfig(backbone="tiny"))
    t12, mask12 = torch.zeros(10, 12), torch.ones(10, 12)
    t12[0] = 1
    kept = selective_mask(t12, mask12, m.a_c)
    assert m.a_c[0] == 0.3 and kept[1:, 0].sum() == 3  # ceil(0.3 * 10)
    assert kept[1:, 2].sum() == 5  # AU04's a_c 0.5: ceil(5)


def test_a_c_tables_follow_the_corpus_au_list():
    p = lambda **kw: build_method(resolve_params({"name": "mlcr", **kw}), BP4D, ModelConfig(backbone="tiny")).params  # noqa: E731
    assert a_c_values(BP4D, p()) == [.3, .3, .5, .3, .3, .5, .3, .5, .3, .3, .3, .3]
    emo = (1, 2, 4, 5, 6, 9, 12, 17, 20, 25, 26, 43)
    assert a_c_values(emo, p()) == [.2, .3, .2, .2, .5, .2, .5, .2, .1, .5, .2, .3]
    assert a_c_values((1, 2, 4, 6, 9, 12, 25, 26), p()) == [0.3] * 8  # DISFA: the default
    assert a_c_values((1, 2), p(a_c_default=0.4)) == [0.4, 0.4]


def test_multi_view_loss_parallel_orthogonal_antiparallel():
    w = torch.tensor([[1.0, 2.0, 0.5], [0.0, 1.0, -1.0]])
    orth = torch.tensor([[2.0, -1.0, 0.0], [0.0, 1.0, 1.0]])  # row-wise orthogonal to w
    for absolute in (True, False):
        assert multi_view_loss(w, 3 * w, absolute).item() == pytest.approx(1.0)
        assert multi_view_loss(w, orth, absolute).item() == pytest.approx(0.0, abs=1e-7)
    assert multi_view_loss(w, -w, True).item() == pytest.approx(1.0)  # the code's |cos|: anti-parallel is bad
    assert multi_view_loss(w, -w, False).item() == pytest.approx(-1.0)  # the paper's signed cosine prefers it
    mixed = torch.stack([w[0], orth[1]])  # AU 1 parallel, AU 2 orthogonal: the mean over AUs
    assert multi_view_loss(w, mixed, True).item() == pytest.approx(0.5)


def test_js_divergence_zero_for_equal_views_and_a_worked_pair():
    p = torch.tensor([[0.2, 0.7, 0.5]])
    assert torch.allclose(js_divergence(p, p), torch.zeros_like(p), atol=1e-7)
    h = lambda x: -(x * math.log(x) + (1 - x) * math.log(1 - x))  # noqa: E731
    got = js_divergence(torch.tensor([[0.9]]), torch.tensor([[0.1]])).item()
    assert got == pytest.approx(h(0.5) - (h(0.9) + h(0.1)) / 2, rel=1e-5)
    assert got == pytest.approx(0.36806, abs=1e-4)
    # saturated outputs are clamped to [1e-3, 1 - 1e-3], not masked: a finite term
    edge = js_divergence(torch.tensor([[0.0]]), torch.tensor([[1.0]])).item()
    assert edge == pytest.approx(h(0.5) - h(1e-3), rel=1e-4)


def test_relation_matrix_independent_dependent_and_worked_values():
    # AU1 and AU2 independent (each combination once): no link. AU3 = AU1: full link; AU4 = 1 - AU1: full link too.
    y = torch.tensor([[0, 0, 0, 1], [0, 1, 0, 1], [1, 0, 1, 0], [1, 1, 1, 0]], dtype=torch.float32)
    a = relation_matrix(y, torch.ones_like(y))
    assert a[0, 1] == 0 and a[1, 0] == 0
    assert a[0, 2] == 1 and a[0, 3] == 1 and torch.equal(a.diag(), torch.ones(4))
    # Worked: a = [1,1,0,0,0], b = [1,0,0,0,0]. P(a=1|b=1) = 1, P(a=0|b=0) = 3/4 -> P_dep 0.875 -> A[a,b] = 0.75;
    # P(b=1|a=1) = 1/2, P(b=0|a=0) = 1 -> 0.75 -> A[b,a] = 0.5. A sixth image with b unknown is left out.
    y = torch.tensor([[1, 1], [1, 0], [0, 0], [0, 0], [0, 0], [1, 1]], dtype=torch.float32)
    m = torch.ones_like(y)
    m[5, 1] = 0
    a = relation_matrix(y, m)
    assert a[0, 1].item() == pytest.approx(0.75) and a[1, 0].item() == pytest.approx(0.5)
    # A conditional on no image at all is "no information": 0.5, no link.
    y = torch.tensor([[0, 1], [0, 0]], dtype=torch.float32)  # AU1 never positive
    assert relation_matrix(y, torch.ones_like(y))[1, 0].item() == pytest.approx(abs(2 * ((0.5 + 0.5) / 2 - 0.5)))
    adj = normalise_adjacency(torch.tensor([[1.0, 0.5], [0.25, 1.0]]))
    d = torch.tensor([1.5, 1.25]).pow(-0.5)
    assert torch.allclose(adj, d[:, None] * torch.tensor([[1.0, 0.25], [0.5, 1.0]]) * d[None, :])


def test_gcn_identity_initialisation_reproduces_w0_and_random_does_not():
    torch.manual_seed(0)
    w0, adj = torch.randn(5, 9), normalise_adjacency(torch.rand(5, 5) + torch.eye(5))
    assert torch.allclose(GCN(9, "identity")(w0, adj), w0)
    random = GCN(9, "random")
    assert not torch.allclose(random(w0, adj), w0)
    x = torch.nn.functional.leaky_relu(adj @ (w0 @ random.h0), 0.2)  # Eq. 6 as written
    assert torch.allclose(random(w0, adj), adj @ (x @ random.h1))


def test_gcn_start_reproduces_w0_by_identity_or_fit_from_the_seeded_draw_whatever_was_loaded():
    torch.manual_seed(1)
    w0, adj = torch.randn(2, 5, 13), normalise_adjacency(torch.rand(5, 5) + torch.eye(5))
    torch.manual_seed(7)
    drawn = GCN(13, "random").h0.detach().clone()
    got = {}
    for init in ("identity", "fit", "random"):
        torch.manual_seed(7)
        g = GCN(13, init)
        with torch.no_grad():  # what a warm start from another run's GCN would leave
            g.h0.fill_(0.3)
            g.h1.fill_(-0.2)
        g.start(w0, adj)
        got[init] = torch.stack([g(w, adj) for w in w0]).detach()
        if init != "identity":
            assert torch.equal(g.h0, drawn)  # Eq. 6 from the seeded draw, not from what was loaded
    assert torch.equal(got["identity"], w0)  # exactly W^0 of each view, one GCN shared by both
    assert (got["fit"] - w0).abs().max() < 1e-4 * w0.abs().max()  # 2J = 10 rows <= D+1 = 13: an exact fit
    cos = torch.nn.functional.cosine_similarity(got["random"].flatten(1), w0.flatten(1))
    assert cos.abs().max() < 0.5 and not torch.allclose(got["random"], w0, atol=0.1)  # a new classifier
    # Too few columns for an exact fit (2J = 10 > D+1 = 4): the least-squares H1, which no nudge improves.
    w, g = torch.randn(2, 5, 4), GCN(4, "fit")
    g.start(w, adj)
    err = lambda: (torch.stack([g(v, adj) for v in w]) - w).norm().item()  # noqa: E731
    best, h1 = err(), g.h1.detach().clone()
    assert best > 1e-3
    for k in range(5):
        with torch.no_grad():
            g.h1.copy_(h1 + 1e-2 * torch.randn(4, 4, generator=torch.Generator().manual_seed(k)))
        assert err() > best


def test_twins_are_initialised_differently_and_predict_is_their_ensemble():
    torch.manual_seed(0)
    m = build_method(resolve_params({"name": "mlcr"}), BP4D, ModelConfig(backbone="tiny")).eval()
    assert not torch.equal(m.twins[0].head.weight, m.twins[1].head.weight)
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        v = m.predict_views(x)
        assert not torch.allclose(v["view1"], v["view2"])
        assert torch.allclose(m.predict(x), (v["view1"] + v["view2"]) / 2)


def test_train_steps_must_be_the_two_stages():
    from ssau.errors import ConfigError
    from ssau.train.setup import load_run_config

    with pytest.raises(ConfigError, match="is not method.stage1_steps \\+ method.stage2_steps"):
        load_run_config(None, ["data.labelled=[x]", "method.name=mlcr", "train.steps=5"])
    load_run_config(None, ["data.labelled=[x]", "method.name=mlcr", "train.steps=5", "method.stage1_steps=5",
                       "method.stage2_steps=0"])


# ---------------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def shards(corpora) -> Path:
    return corpora.bp4d(shard_size=3)


def _args(shards: Path, out: Path, name: str, *extra: str) -> list[str]:
    return ["train", f"data.labelled=[{shards}]", "model.backbone=tiny", "data.image_size=32", "data.m1=4",
            "data.m2=4", "data.label_drop=0.5", "data.workers=0", "data.eval_batch=8", "train.steps=4",
            "method.name=mlcr", "method.stage1_steps=2", "method.stage2_steps=2", "optim.schedule=constant",
            f"train.out={out}", f"train.name={name}", "train.checkpoint_every=1", "train.keep_checkpoints=10",
            "train.log_every=1", "train.progress=false", f"tracking.uri=sqlite:///{out / 'mlflow.db'}", *extra]


def _ckpt(run: Path, step: int) -> dict:
    return torch.load(run / "checkpoints" / f"step-{step:07d}.pt", weights_only=True)


def test_stage_switch_groups_learning_rates_and_w0_through_resume(shards, tmp_path):
    from ssau.data.stream import TrainStream
    from ssau.train.setup import load_run_config
    from ssau.train.trainer import Trainer

    assert main(_args(shards, tmp_path, "a")) == 0
    run = tmp_path / "a"
    s1, s2, s3, s4 = (_ckpt(run, k)["method"] for k in (1, 2, 3, 4))
    # Stage 1 (steps 1-2): the twins train, the GCN does not, no W^0 yet.
    assert s1["switched"] == 0 and torch.equal(s1["gcn.h0"], s2["gcn.h0"])
    assert not torch.equal(s1["twins.0.head.weight"], s2["twins.0.head.weight"])
    # The switch after step 2: W^0 = the stage-1 classifiers [w b] of each view, then frozen.
    assert s2["switched"] == 1
    for i in (0, 1):
        assert torch.equal(s2["w0"][i], torch.cat([s2[f"twins.{i}.head.weight"], s2[f"twins.{i}.head.bias"][:, None]], 1))
    # Stage 2 (steps 3-4): the GCN and the backbones train; the stage-1 classifiers and W^0 stay. The GCN starts
    # as the identity (H0 = I, H1 = 0: no gradient reaches H0 until H1 has moved, one step later).
    assert torch.equal(s2["gcn.h0"], torch.eye(len(s2["gcn.h0"]))) and not s2["gcn.h1"].any()
    assert torch.equal(s2["gcn.h0"], s3["gcn.h0"]) and not torch.equal(s2["gcn.h1"], s3["gcn.h1"])
    assert not torch.equal(s3["gcn.h0"], s4["gcn.h0"]) and not torch.equal(s3["gcn.h1"], s4["gcn.h1"])
    assert not torch.equal(s2["twins.1.backbone.body.0.weight"], s3["twins.1.backbone.body.0.weight"])
    assert torch.equal(s2["twins.0.head.weight"], s4["twins.0.head.weight"]) and torch.equal(s2["w0"], s4["w0"])
    # Learning rates by stage (constant schedule): 1e-3 for the twins in stage 1, then 1e-4; the GCN at 1e-3.
    cfg = load_run_config(None, _args(shards, tmp_path, "lr")[1:])
    t = Trainer(cfg)
    lrs = lambda: {g: o.param_groups[0]["lr"] for g, o in t.optimizers.items()}  # noqa: E731
    assert [(u.groups, u.freeze) for u in t.method.updates(0)] == [(("twins", "heads"), ("gcn",))]
    assert [(u.groups, u.freeze) for u in t.method.updates(2)] == [(("twins", "gcn"), ("heads",))]
    assert lrs() == pytest.approx({"twins": 1e-3, "heads": 1e-3, "gcn": 1e-3})
    batches = iter(TrainStream(t.stream_cfg, 0, 1, t.trainset))
    for _ in range(2):
        t.train_step(batches)
    assert lrs() == pytest.approx({"twins": 1e-4, "heads": 1e-3, "gcn": 1e-3})
    # A cosine schedule starts afresh at the switch: the paper's initial rates for stage 2 (1e-3 GCN, 1e-4 twins).
    cos = Trainer(load_run_config(None, [*_args(shards, tmp_path, "cos")[1:], "optim.schedule=cosine"]))
    assert cos._lr("twins", 0) == 1.0 and cos._lr("twins", 1) == pytest.approx(0.5)  # within stage 1 (2 steps)
    assert cos._lr("twins", 2) == pytest.approx(0.1) and cos._lr("gcn", 2) == pytest.approx(1.0)
    assert cos._lr("gcn", 3) == pytest.approx(0.5)
    # Resume from the step-3 checkpoint: W^0 and the switch come back from it and stay.
    resumed = tmp_path / "b"
    (resumed / "checkpoints").mkdir(parents=True)
    (resumed / "checkpoints" / "step-0000003.pt").write_bytes((run / "checkpoints" / "step-0000003.pt").read_bytes())
    assert main(_args(shards, tmp_path, "b", "train.resume=auto", "tracking.enabled=false")) == 0
    end = torch.load(resumed / "model.pt", weights_only=True)["method"]
    assert end["switched"] == 1 and torch.equal(end["w0"], s3["w0"])
    assert torch.equal(end["adj"], s4["adj"]) and not torch.equal(end["adj"], torch.eye(12))


def test_stage2_warm_started_from_a_stage1_model_takes_w0_from_its_classifiers(shards, tmp_path):
    from ssau.train.setup import load_run_config
    from ssau.train.trainer import Trainer

    off = ("tracking.enabled=false", "data.fold=0")
    assert main(_args(shards, tmp_path, "s1", "method.stage2_steps=0", "train.steps=2", *off)) == 0
    model = tmp_path / "s1" / "model.pt"
    s1 = torch.load(model, weights_only=True)["method"]
    heads = torch.stack([torch.cat([s1[f"twins.{i}.head.weight"], s1[f"twins.{i}.head.bias"][:, None]], 1)
                         for i in (0, 1)])
    stage2 = ("method.stage1_steps=0", "method.stage2_steps=2", "train.steps=2", f"train.init_from={model}", *off)
    for init in ("identity", "fit", "random"):
        t = Trainer(load_run_config(None, _args(shards, tmp_path, f"t-{init}", *stage2, f"method.gcn_init={init}")[1:]))
        m = t.method
        assert m.switched == 1 and torch.equal(m.w0, heads)  # the loaded classifiers, not this run's own init
        assert not torch.equal(m.adj, torch.eye(12))  # the relation graph, computed after the warm start
        gcn = torch.stack([m.gcn(w, m.adj) for w in m.w0]).detach()
        if init == "identity":
            assert torch.equal(gcn, heads)
        elif init == "fit":
            assert (gcn - heads).abs().max() < 1e-4 * heads.abs().max()
        else:  # Eq. 6 from the seeded draw, not from the checkpoint's GCN (the identity: a zero classifier here)
            assert torch.equal(s1["gcn.h0"], torch.eye(129)) and torch.equal(m.gcn.h0, m.gcn.drawn[0])
            assert not torch.equal(m.gcn.h0, s1["gcn.h0"]) and gcn.abs().max() > 0.01
    # Trained: the step-1 checkpoint still holds the loaded classifiers as W^0 and as the frozen heads.
    assert main(_args(shards, tmp_path, "s2", *stage2, "train.seed=5")) == 0
    after = _ckpt(tmp_path / "s2", 1)["method"]
    assert torch.equal(after["w0"], heads) and torch.equal(after["twins.1.head.weight"], s1["twins.1.head.weight"])
    # The control arm (the same steps without the GCN, from the same checkpoint) stays in stage 1 from the heads.
    ctl = Trainer(load_run_config(None, _args(shards, tmp_path, "ctl", "method.stage1_steps=2", "method.stage2_steps=0",
                                              "train.steps=2", f"train.init_from={model}", *off)[1:]))
    assert ctl.method.switched == 0 and torch.equal(ctl.method.twins[0].weights().detach(), heads[0])


def test_evaluation_logs_each_view_their_mean_and_inconsistency(shards, tmp_path):
    from mlflow.tracking import MlflowClient

    assert main(_args(shards, tmp_path, "v", "method.gcn_init=identity")) == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("ssau").experiment_id])
    m = run.data.metrics
    assert m["val/f1_views"] == pytest.approx((m["val/view1/f1_mean"] + m["val/view2/f1_mean"]) / 2)
    incons = [m[f"val/inconsistency/AU{a:02d}"] for a in BP4D]
    assert m["val/inconsistency_mean"] == pytest.approx(sum(incons) / 12)
    assert all(0 <= x <= 1 for x in incons) and m["val/inconsistency_any"] >= max(incons)
    assert "val/view1/f1/AU01" in m and "val/f1_mean" in m  # the ensemble keeps the common name


def _two_rank_selective(rank: int, world: int) -> list[float]:
    torch.manual_seed(rank)
    t = torch.zeros(10, 2)
    t[0, 0] = 1  # AU1: 1 positive per rank -> 2 of 20 known globally, ceil(0.3 * 20) = 6 negatives kept
    mask = torch.ones(10, 2)
    if rank == 1:
        mask[:4, 1] = 0  # AU2: no positive; 10 + 6 = 16 known, ceil(4.8) = 5 kept, split 10:6 -> 3 + 2
    m = selective_mask(t, mask, [0.3, 0.3])
    assert torch.distributed.get_world_size() == 2
    return [float(((m > 0) & (t == 0))[:, j].sum()) for j in (0, 1)]


def test_selective_learning_counts_the_global_batch_on_two_ranks():
    kept = run_ranks(_two_rank_selective, 2)
    assert [k[0] for k in kept] == [3, 3]  # 6 negatives of AU1 in all, shared in proportion to 9 : 9
    assert [k[1] for k in kept] == [3, 2]  # 5 of AU2's, in proportion to 10 : 6 (largest remainder)


def test_a_supervised_warm_start_starts_the_first_twin_or_both(shards, tmp_path):
    """`ssau compare --warm-start` gives every method a supervised run's model.pt; MLCR's first twin (both with
    warm_twins=both) takes its backbone and head (their names differ: twins.0.backbone.* against backbone.*), where
    the start used to be refused."""
    from ssau.train.setup import load_run_config
    from ssau.train.trainer import Trainer

    off = ("tracking.enabled=false", "data.fold=0")
    sup = [a for a in _args(shards, tmp_path, "sup", "train.steps=1", *off) if not a.startswith("method.")]
    assert main([*sup, "method.name=supervised"]) == 0
    given = torch.load(tmp_path / "sup" / "model.pt", weights_only=True)["method"]
    parts = [k for k in given if k.startswith(("backbone.", "head."))]
    assert len(parts) > 10
    for mode, started in (("first", (0,)), ("both", (0, 1))):
        t = Trainer(load_run_config(None, _args(shards, tmp_path, f"m-{mode}", f"method.warm_twins={mode}",
                                                f"train.init_from={tmp_path / 'sup' / 'model.pt'}", *off)[1:]))
        mine = t.method.state_dict()
        for i in (0, 1):  # the default starts view 2 at its own draw: the paper's views start apart
            same = [torch.equal(mine[f"twins.{i}.{k}"], given[k]) for k in parts if given[k].is_floating_point()]
            assert all(same) if i in started else not any(same), (mode, i)
