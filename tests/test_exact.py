"""Exact across ranks: per-rank draws, global normalisers, global BatchNorm, per-group optimisers, no leakage of
the evaluation fold, one read of the training set, the split seed and warm starts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from nets import PixelNet
from ranks import run_ranks
from torch import nn

from ssau.config import ModelConfig
from ssau.data.batch import Batch
from ssau.dist.ranks import Runtime
from ssau.errors import ConfigError
from ssau.faces.template import mean_landmarks
from ssau.methods.base import SetupInfo
from ssau.train.setup import load_run_config

AUS = (1, 2, 4, 6)
J, S = len(AUS), 8


@pytest.fixture(scope="module")
def shards(corpora) -> Path:
    return corpora.bp4d(frames=8, shard_size=4)


def tiny_cfg(shards: Path, tmp: Path, *extra: str):
    return load_run_config(None, [f"data.labelled=[{shards}]", "model.backbone=tiny", "data.image_size=32", "data.m1=4",
                              "data.m2=4", "data.workers=0", "data.eval_batch=16", "train.steps=3",
                              "train.checkpoint_every=0", f"train.out={tmp / 'runs'}", "train.progress=false",
                              "tracking.enabled=false", *extra])


def cpu_rt(rank: int = 0, world: int = 1) -> Runtime:
    return Runtime(rank, world, torch.device("cpu"), bf16=False, channels_last=False)


# ---------------------------------------------------------------------------------------------------- draws
def _train_two_ranks(rank: int, world: int, shards: Path, tmp: Path) -> dict:
    import torch.distributed as dist

    from ssau.train.trainer import Trainer

    assert dist.get_world_size() == world == 2
    tr = Trainer(tiny_cfg(shards, tmp, "method.name=adversarial", "model.dropout=0.5", "data.label_drop=0.5",
                          "data.fold=0"), cpu_rt(rank, world))
    drawn, masks = [], []
    sample = tr.method.sample_bank
    tr.method.sample_bank = lambda m, device: drawn.append(sample(m, device)) or drawn[-1]
    tr.method.dropout.register_forward_hook(lambda mod, inp, out: masks.append((out == 0).clone()))
    tr.fit()
    return {"drawn": torch.cat(drawn).numpy(), "masks": torch.cat([m.flatten() for m in masks]).numpy(),
            "params": [p.detach().numpy().copy() for p in tr.method.parameters()]}


def test_ranks_draw_apart_yet_hold_identical_parameters(shards, tmp_path):
    r0, r1 = run_ranks(_train_two_ranks, 2, shards, tmp_path)
    assert r0["drawn"].shape == r1["drawn"].shape and not np.array_equal(r0["drawn"], r1["drawn"])
    assert r0["masks"].shape == r1["masks"].shape and not np.array_equal(r0["masks"], r1["masks"])
    assert 0.3 < r0["masks"].mean() < 0.7  # dropout was on
    for a, b in zip(r0["params"], r1["params"]):
        assert np.array_equal(a, b)


def test_draws_are_a_function_of_seed_rank_step_and_update():
    from ssau.dist.rng import seed_draws

    def draw(*key):
        seed_draws(*key)
        return torch.rand(4)

    assert torch.equal(draw(0, 0, 5, "discriminator", 0), draw(0, 0, 5, "discriminator", 0))  # resumable
    others = [draw(0, 1, 5, "discriminator", 0), draw(0, 0, 6, "discriminator", 0), draw(0, 0, 5, "classifier", 0),
              draw(0, 0, 5, "discriminator", 1), draw(1, 0, 5, "discriminator", 0)]
    assert all(not torch.equal(draw(0, 0, 5, "discriminator", 0), o) for o in others)


# ---------------------------------------------------------------------------------------------------- 2 x B = 1 x 2B


def small_method(name: str, bn: bool = False):
    from ssau.methods.registry import build_method

    name, _, rule = name.partition("+")  # "fixmatch+class_aware": CAP's thresholds from every rank's rows
    torch.manual_seed(0)
    # MLCR's selective learning keeps a random choice of negatives (its count is global, tests/test_mlcr.py)
    extra = {"mlcr": {"selective": False},  # pseudo-labels confident enough to count at this init:
             "pseudo_label": {"p_cutoff": 0.51}, "fixmatch": {"p_cutoff": 0.51}}.get(name, {})
    if name == "rtatl":  # small RoI modules and transformer; every part on (flow, inpainting, relation)
        extra = {"d": 16, "heads": 2, "fused_width": 8}
    if rule:
        extra = {"threshold": rule, "cap_queue": 12}  # 8 rows, then 4 more wrapping: whole global batches stay
    m = build_method({"name": name, **extra}, AUS, ModelConfig(backbone="tiny"))
    if name == "mlcr":  # two BatchNorm-free twins
        for t in m.twins:
            t.backbone, t.head, t.dropout = PixelNet(S), nn.Linear(5, J), nn.Identity()
        m.double()
    elif name == "large_margin":  # centroids already seen, so that L_M (a global mean too) takes part
        m.backbone, m.embed, m.head = PixelNet(S), nn.Linear(5, 4), nn.Linear(4, J)
        m.centroids = torch.randn(len(m.classes), 4, generator=torch.Generator().manual_seed(2))
        m.counts.fill_(1.0)
        m.double()
    elif name == "rtatl":  # the tiny pyramid's BatchNorm (bn=True: global statistics)
        pass
    elif not bn:
        m.backbone = PixelNet(S)
        m.head = nn.Linear(5, J)
        if hasattr(m, "expr_head"):
            m.expr_head = nn.Linear(5, 7)
        if hasattr(m, "discriminator"):
            from ssau.methods.adversarial import Discriminator

            class Discriminator64(Discriminator):  # the method's D reads float32 vectors
                def forward(self, y):
                    return torch.sigmoid(self.net(y.double())).squeeze(1)

            m.discriminator = Discriminator64(J, 8)
        m.double()
    bank = torch.tensor([[1.0, 0, 1, 1]])  # one real vector: D's inputs are the same however they are drawn
    if rule:  # positive rates 1/4 and 1/2: CAP's quantiles fall inside the batch
        bank = torch.tensor([[1.0, 0, 1, 1], [0, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0]])
    m.setup(SetupInfo(AUS, bank, torch.ones_like(bank)))
    return m


def global_batch(n: int = 8, size: int = S) -> Batch:
    g = torch.Generator().manual_seed(1)
    img = lambda k: torch.randint(0, 256, (k, 3, size, size), dtype=torch.uint8, generator=g)  # noqa: E731
    mask = (torch.rand(n, J, generator=g) < 0.7).double()
    mask[: n // 2, 1:] = 0  # rank 0 knows far fewer labels than rank 1: a mean of per-rank means would differ
    lm = lambda: torch.from_numpy(mean_landmarks(size, size)) + torch.rand(n, 68, 2, generator=g)  # noqa: E731
    return Batch(images=img(n), targets=(torch.rand(n, J, generator=g) < 0.4).double() * mask, mask=mask,
                 keys=[f"a{i}" for i in range(n)], unlabelled=img(n), unlabelled_keys=[f"u{i}" for i in range(n)],
                 expr_images=img(n),
                 expr_labels=torch.randint(0, 7, (n,), generator=g), expr_keys=[f"e{i}" for i in range(n)],
                 landmarks=lm(), unlabelled_landmarks=lm(), flow=torch.randn(n, 2, size, size, generator=g),
                 flow_valid=torch.arange(n) % 3 > 0, unlabelled_flow=torch.randn(n, 2, size, size, generator=g),
                 unlabelled_flow_valid=torch.arange(n) % 2 > 0)


def rank_part(b: Batch, rank: int, world: int) -> Batch:
    def part(t):
        k = len(t) // world
        return t[rank * k:(rank + 1) * k]
    return Batch(images=part(b.images), targets=part(b.targets), mask=part(b.mask), keys=part(b.keys),
                 unlabelled=part(b.unlabelled), unlabelled_keys=part(b.unlabelled_keys), expr_images=part(b.expr_images),
                 expr_labels=part(b.expr_labels),
                 expr_keys=part(b.expr_keys), landmarks=part(b.landmarks), unlabelled_landmarks=part(b.unlabelled_landmarks),
                 flow=part(b.flow), flow_valid=part(b.flow_valid), unlabelled_flow=part(b.unlabelled_flow),
                 unlabelled_flow_valid=part(b.unlabelled_flow_valid))


def update_grads(m, batch: Batch, rt: Runtime, sync_bn: bool = False) -> dict:
    from ssau.dist.collectives import average_gradients

    if sync_bn:
        from ssau.methods.syncbn import convert_sync_bn

        convert_sync_bn(m, torch.device("cpu"))
    m.train()
    groups, out = m.groups(), {}
    for upd in m.updates(0):
        params = [p for g in upd.groups for p in groups[g].params]
        frozen = [p for g in upd.freeze for p in groups[g].params]
        for p in frozen:
            p.requires_grad_(False)
        for p in params:
            p.grad = None
        upd.loss(batch, 0)["loss"].backward(inputs=params)
        for p in frozen:
            p.requires_grad_(True)
        average_gradients(params, rt)
        out[upd.name] = [p.grad.detach().double().numpy().copy() for p in params]
    out["buffers"] = {k: v.double().numpy().copy() for k, v in m.state_dict().items()
                      if "running" in k or k.startswith("labeller.")}  # CAP's queue: every rank's rows, rank order
    return out


def _rank_update_grads(rank: int, world: int, name: str, bn: bool) -> dict:
    import torch.distributed as dist

    assert dist.get_world_size() == world == 2
    m = small_method(name, bn)
    out = update_grads(m, rank_part(global_batch(), rank, world), cpu_rt(rank, world), bn)
    return out | {"state": m.step_metrics()}


@pytest.mark.parametrize("name,bn", [("supervised", False), ("adversarial", False), ("mtl", False),
                                     ("mlcr", False), ("large_margin", False), ("supervised", True),
                                     ("pseudo_label", False), ("mean_teacher", False), ("fixmatch", False),
                                     ("pseudo_label", True), ("mean_teacher", True), ("fixmatch", True),
                                     ("pseudo_label+class_aware", False), ("fixmatch+class_aware", False),
                                     ("rtatl", True)])
def test_two_ranks_of_b_equal_one_process_of_2b(name, bn):
    """bn=True: the tiny backbone's BatchNorm layers with model.sync_bn (global-batch statistics)."""
    one = small_method(name, bn)
    single = update_grads(one, global_batch(), cpu_rt())
    ranks = run_ranks(_rank_update_grads, 2, name, bn)
    if name.split("+")[0] in ("pseudo_label", "fixmatch"):  # the pseudo-labelled part took part, monitors global
        assert one.step_metrics()["mask_ratio"] > 0.5
        assert all(r["state"] == pytest.approx(one.step_metrics()) for r in ranks)
    tol = dict(rtol=1e-4, atol=1e-6) if bn else dict(rtol=1e-9, atol=1e-12)  # float32 BatchNorm nets
    for r in ranks:
        for upd, want in single.items():
            if upd in ("buffers", "state"):
                continue
            assert any(np.abs(w).max() > 1e-6 for w in want)
            for got, w in zip(r[upd], want):
                assert np.allclose(got, w, **tol), (name, upd)
        for k, want in single["buffers"].items():  # global statistics: the same running stats as one process
            assert np.allclose(r["buffers"][k], want, rtol=1e-4, atol=1e-6), k


def _bn_running_stats(rank: int, world: int, x: torch.Tensor) -> dict:
    import torch.distributed as dist

    from ssau.dist.collectives import average_buffers

    assert dist.get_world_size() == world == 2
    bn = nn.BatchNorm2d(3, momentum=0.1).double().train()
    bn(x[rank * len(x) // 2:(rank + 1) * len(x) // 2])
    average_buffers(bn, cpu_rt(rank, world))
    return {"mean": bn.running_mean.numpy().copy(), "var": bn.running_var.numpy().copy()}


def test_averaged_running_variance_holds_the_between_rank_term():
    # Without sync_bn: each rank normalises by its own statistics, but the running variance after averaging must
    # be the global batch's, also when the ranks' batches differ in mean (the between-rank term).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 4, 4, generator=g, dtype=torch.float64)
    x[32:] += torch.tensor([3.0, -2.0, 0.5], dtype=torch.float64).view(1, 3, 1, 1)  # rank 1's images differ
    one = nn.BatchNorm2d(3, momentum=0.1).double().train()
    one(x)
    for r in run_ranks(_bn_running_stats, 2, x):
        assert np.allclose(r["mean"], one.running_mean.numpy(), rtol=1e-12)
        assert np.allclose(r["var"], one.running_var.numpy(), rtol=2e-3), (r["var"], one.running_var)


# ---------------------------------------------------------------------------------------------------- optimisers
def test_per_group_optimiser_settings_reach_the_optimisers(shards, tmp_path):
    from ssau.train.trainer import Trainer

    tr = Trainer(tiny_cfg(shards, tmp_path, "method.name=adversarial", "optim.groups.discriminator.name=sgd",
                          "optim.groups.discriminator.lr=0.05", "optim.groups.discriminator.momentum=0"),
                 cpu_rt())
    d, r = tr.optimizers["discriminator"], tr.optimizers["classifier"]
    assert type(d) is torch.optim.SGD and d.param_groups[0]["lr"] == 0.05 and d.param_groups[0]["momentum"] == 0
    assert type(r) is torch.optim.Adam and r.param_groups[0]["lr"] == 1e-3
    for bad, message in (("optim.groups.critic.name=sgd", "optim.groups.critic: this method has no optimiser group"),
                         ("optim.groups.discriminator.nesterov=1", "unknown key 'optim.groups.discriminator.nesterov'"),
                         ("optim.groups.discriminator.name=lbfgs", "optim.groups.discriminator.name: 'lbfgs' is not")):
        with pytest.raises(ConfigError) as e:
            Trainer(tiny_cfg(shards, tmp_path, "method.name=adversarial", bad), cpu_rt())
        assert message in str(e.value) and "\n" not in str(e.value)


def test_mal_meta_net_steps_by_plain_gradient_descent():
    from ssau.methods.registry import build_method
    from ssau.train.optim import build_optimizer, group_config

    cfg = load_run_config(None, ["data.labelled=[x]", "optim.lr=0.002"])
    groups = build_method({"name": "mal"}, AUS, ModelConfig(backbone="tiny")).groups()
    meta = build_optimizer(group_config(cfg.optim, "meta", 0.002, groups["meta"].optim), groups["meta"].params)
    base = build_optimizer(group_config(cfg.optim, "base", 0.002, groups["base"].optim), groups["base"].params)
    assert type(meta) is torch.optim.SGD and meta.param_groups[0]["momentum"] == 0  # Eq. 7
    assert type(base) is torch.optim.Adam
    cfg = load_run_config(None, ["data.labelled=[x]", "optim.groups.meta.name=adam"])
    assert type(build_optimizer(group_config(cfg.optim, "meta", 1e-3, groups["meta"].optim), groups["meta"].params)) \
        is torch.optim.Adam  # the user's word wins


# ---------------------------------------------------------------------------------------------------- data
def test_unlabelled_source_never_reads_the_evaluation_fold(shards, tmp_path, capsys):
    from ssau.train.trainer import Trainer

    # The leak: data.unlabelled pointed at the labelled shards themselves.
    tr = Trainer(tiny_cfg(shards, tmp_path, f"data.unlabelled=[{shards}]", "data.fold=2", "train.progress=true"),
                 cpu_rt())
    assert "fold 2, the evaluation fold, and are not read" in capsys.readouterr().err
    from ssau.data.stream import TrainStream

    fold = {r["key"]: r["fold"] for r in pq.read_table(shards / "index.parquet").to_pylist()}
    it = iter(TrainStream(tr.stream_cfg, 0, 1, tr.trainset))
    seen = [k for _ in range(12) for k in next(it).unlabelled_keys]
    assert seen and all(fold[k] != 2 for k in seen)
    assert {fold[k] for k in seen} == {1, 3}


def test_the_training_set_index_is_read_once(shards, tmp_path, monkeypatch):
    import ssau.data.sources as sources
    import ssau.data.trainset as trainset
    from ssau.train.trainer import Trainer

    reads = []
    real = sources.index_batches

    def counted(d, columns):
        reads.append(str(d))
        return real(d, columns)

    monkeypatch.setattr(sources, "index_batches", counted)
    monkeypatch.setattr(trainset, "index_batches", counted)
    tr = Trainer(tiny_cfg(shards, tmp_path, "method.name=adversarial", "data.validation=0.2", "data.label_drop=0.3"),
                 cpu_rt())
    from ssau.data.stream import TrainStream

    TrainStream(tr.stream_cfg, 0, 1, tr.trainset)
    assert reads == [str(shards)]
    assert tr.validation.keys and len(tr.bank_keys) and tr.drop["hidden_images"] > 0


def test_split_seed_not_train_seed_decides_the_split(shards, tmp_path):
    from ssau.data.sources import stream_config
    from ssau.data.trainset import TrainingSet

    def split(*extra):
        cfg = tiny_cfg(shards, tmp_path, "data.label_drop=0.5", "data.validation=0.2", *extra)
        ts = TrainingSet.read(stream_config(cfg, AUS))
        return ts.hidden_images, tuple(ts.validation.keys)

    assert split("train.seed=0") == split("train.seed=5")
    assert split("data.split_seed=0")[0] != split("data.split_seed=1")[0]


def test_validation_batches_of_ranks_are_disjoint(shards):
    from ssau.data.sources import SourceConfig, StreamConfig
    from ssau.data.stream import TrainStream

    cfg = StreamConfig(labelled=SourceConfig((str(shards),), folds=(1, 2, 3)), m1=2, m2=0, image_size=32,
                       validation=0.3, val_batch=4, workers=0)
    seen = []
    for rank in (0, 1):
        it = iter(TrainStream(cfg, rank=rank, world=2))
        seen.append({k for _ in range(6) for k in next(it).val_keys})
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_warm_start_loads_matching_tensors_only(shards, tmp_path, capsys):
    from ssau.train.trainer import Trainer

    sup = Trainer(tiny_cfg(shards, tmp_path, "train.name=sup", "data.fold=0"), cpu_rt())
    sup.fit()
    model = tmp_path / "runs" / "sup" / "model.pt"
    adv = Trainer(tiny_cfg(shards, tmp_path, "method.name=adversarial", f"train.init_from={model}",
                           "train.progress=true"), cpu_rt())
    want, got = sup.method.state_dict(), adv.method.state_dict()
    common = want.keys() & got.keys()
    assert {k for k in got if not k.startswith("discriminator.")} == common  # backbone, head, BatchNorm statistics
    assert all(torch.equal(got[k], want[k]) for k in common)
    assert f"warm start: {len(common)} of {len(got)} tensors from {model}" in capsys.readouterr().err
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    for bad, message in ((tmp_path / "nope.pt", "does not exist"), (tmp_path / "garbage.pt", "garbage.pt")):
        with pytest.raises(Exception) as e:
            Trainer(tiny_cfg(shards, tmp_path, f"train.init_from={bad}"), cpu_rt())
        assert message in str(e.value) and "\n" not in str(e.value)
