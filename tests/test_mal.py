"""Method `mal` (Li & Shan, Alg. 1): the meta-gradient against finite differences of an independent reference, the
global batch across real ranks, the zero-initialised meta net, weight normalisation, the AU validation set."""

from __future__ import annotations

import copy
from collections import Counter
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
from ssau.data.sources import SourceConfig, StreamConfig, resolve_aus
from ssau.data.stream import TrainStream
from ssau.data.trainset import validation_split
from ssau.methods.base import SetupInfo
from ssau.methods.mal import MAL, MALParams
from ssau.train.setup import load_run_config

AUS = (1, 2, 4, 6)
J, S = len(AUS), 8  # 8x8 images: the tiny base net below is a linear layer over pixels


def tiny_mal(seed: int = 0, zero_meta: bool = False, **params) -> MAL:
    torch.manual_seed(seed)
    m = MAL(MALParams(**params), AUS, ModelConfig(backbone="tiny"))
    m.backbone, dim = PixelNet(S), 5
    m.head, m.expr_head, m.meta = nn.Linear(dim, J), nn.Linear(dim, 7), nn.Linear(dim, 1)
    if zero_meta:
        nn.init.zeros_(m.meta.weight)
        nn.init.zeros_(m.meta.bias)
    m.double()
    bank = torch.tensor([[1.0, 0, 0, 1], [0, 0, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]])
    m.setup(SetupInfo(AUS, bank, torch.ones_like(bank), validation_targets=bank, validation_mask=torch.ones_like(bank)))
    return m


def make_batch(m1: int = 6, me: int = 4, mv: int = 8, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    img = lambda n: torch.randint(0, 256, (n, 3, S, S), dtype=torch.uint8, generator=g)  # noqa: E731
    mask = (torch.rand(m1, J, generator=g) < 0.8).double()
    vmask = (torch.rand(mv, J, generator=g) < 0.9).double()
    return Batch(images=img(m1), targets=(torch.rand(m1, J, generator=g) < 0.4).double() * mask, mask=mask,
                 keys=[f"a{i}" for i in range(m1)], expr_images=img(me),
                 expr_labels=torch.randint(0, 7, (me,), generator=g), expr_keys=[f"e{i}" for i in range(me)],
                 val_images=img(mv), val_targets=(torch.rand(mv, J, generator=g) < 0.4).double() * vmask,
                 val_mask=vmask)


def rank_slice(b: Batch, rank: int, world: int) -> Batch:
    """Rank r's share of a global batch: a contiguous 1/world of each part."""
    def part(t):
        n = len(t) // world
        return t[rank * n:(rank + 1) * n]
    return Batch(images=part(b.images), targets=part(b.targets), mask=part(b.mask), keys=part(b.keys),
                 expr_images=part(b.expr_images), expr_labels=part(b.expr_labels), expr_keys=part(b.expr_keys),
                 val_images=part(b.val_images), val_targets=part(b.val_targets), val_mask=part(b.val_mask))


# ---------------------------------------------------------------------------------------------------- reference
def reference_validation_loss(m: MAL, batch: Batch, psi: torch.Tensor) -> float:
    """Eq. 4-7 written out plainly, without the method's code: weights from psi, the weighted loss, one SGD step
    on a copy of the base net (first-order autograd only), the class-balanced validation loss at theta*."""
    net = copy.deepcopy(m)
    with torch.no_grad():
        net.meta.weight.copy_(psi[:-1].view_as(net.meta.weight))
        net.meta.bias.copy_(psi[-1:])
    base = [p for n, p in net.named_parameters() if not n.startswith("meta.")]
    x = torch.cat([batch.images, batch.expr_images])
    f, au, fe = net(x)
    w = torch.sigmoid(net.meta(f.detach())).squeeze(1).detach()
    w = w / w.sum()  # Sec. 4.1.2 as written: AU and FE weights of the batch sum to one
    m1 = len(batch.images)
    l_au = (nn.functional.binary_cross_entropy_with_logits(au[:m1], batch.targets, reduction="none") * batch.mask).sum(1)
    l_fe = nn.functional.cross_entropy(fe[m1:], batch.expr_labels, reduction="none")
    grads = torch.autograd.grad((w * torch.cat([l_au, l_fe])).sum(), base)
    with torch.no_grad():
        for p, g in zip(base, grads):
            p -= net.params.alpha * g
        _, v, _ = net(batch.val_images)
        t, mk = batch.val_targets, batch.val_mask
        ce = nn.functional.binary_cross_entropy_with_logits(v, t, reduction="none")
        c = t * net.val_pos_w + (1 - t) * net.val_neg_w
        return float((c * ce * mk).sum(1).mean())


def meta_gradient(m: MAL, batch: Batch) -> torch.Tensor:
    m.zero_grad(set_to_none=True)
    m.meta_loss(batch, 0)["loss"].backward(inputs=list(m.meta.parameters()))
    return torch.cat([m.meta.weight.grad.reshape(-1), m.meta.bias.grad.reshape(-1)])


def test_meta_gradient_matches_finite_differences_through_the_inner_step():
    m = tiny_mal(alpha=0.5)  # a large inner step: the validation loss depends on psi strongly enough to measure
    batch = make_batch()
    psi = torch.cat([m.meta.weight.detach().reshape(-1), m.meta.bias.detach().reshape(-1)])
    assert m.meta_loss(batch, 0)["loss"].item() == pytest.approx(reference_validation_loss(m, batch, psi), rel=1e-12)
    eps, numeric = 1e-5, torch.zeros_like(psi)
    for k in range(len(psi)):
        d = torch.zeros_like(psi)
        d[k] = eps
        numeric[k] = (reference_validation_loss(m, batch, psi + d) - reference_validation_loss(m, batch, psi - d)) / (2 * eps)
    analytic = meta_gradient(m, batch)
    assert numeric[:-1].abs().max() > 1e-4  # the meta-gradient is far from zero ...
    # ... which a first-order shortcut (theta* treated as a constant of psi) would report: it must match.
    assert torch.allclose(analytic, numeric, rtol=1e-5, atol=1e-9), (analytic, numeric)


def test_meta_net_is_zero_initialised_so_every_weight_starts_at_one_half():
    m = MAL(MALParams(), AUS, ModelConfig(backbone="tiny"))
    assert not m.meta.weight.any() and not m.meta.bias.any()  # Sec. 4.1.1
    w = m.weights(torch.randn(10, m.head.in_features) * 5)
    assert torch.equal(w, torch.full((10,), 0.5))
    wn = m.normalise_weights(w, 6, differentiable=False)  # 6 AU + 4 FE samples
    assert torch.allclose(wn, torch.full((10,), 0.1))  # every sample equal at the start


def test_weights_normalise_over_the_batch():
    m = MAL(MALParams(), AUS, ModelConfig(backbone="tiny"))
    raw = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4])
    wn = m.normalise_weights(raw, 5, differentiable=False)
    assert wn.sum().item() == pytest.approx(1.0)  # Sec. 4.1.2 as written: all weights of the batch sum to one
    assert torch.allclose(wn, raw / raw.sum())
    assert torch.allclose(m.normalise_weights(3 * raw, 5, differentiable=False), wn)  # only relative weights count
    m.params.normalise = "mean"  # the reading where the mean AU weight and the mean FE weight sum to one
    wn = m.normalise_weights(raw, 5, differentiable=False)
    assert (wn[:5].mean() + wn[5:].mean()).item() == pytest.approx(1.0)
    assert torch.allclose(wn / wn.sum(), raw / raw.sum())


def test_class_balanced_validation_weights():
    m = MAL(MALParams(), (1, 2), ModelConfig(backbone="tiny"))
    t = torch.tensor([[1.0, 0], [0, 0], [0, 0], [0, 1]])
    mask = torch.tensor([[1.0, 1], [1, 1], [1, 1], [1, 0]])  # AU2's only positive is unknown
    m.setup(SetupInfo((1, 2), t, mask, validation_targets=t * mask, validation_mask=mask))
    # AU1: 4 known, 1 positive -> positives 4/2, negatives 4/6. AU2: 3 known, no positive -> 3/2 (unused), 3/6.
    assert torch.allclose(m.val_pos_w, torch.tensor([2.0, 1.5])) and torch.allclose(m.val_neg_w, torch.tensor([4 / 6, 0.5]))


def _rank_grads(rank: int, world: int, batch: Batch) -> dict:
    import torch.distributed as dist

    from ssau.dist.collectives import average_gradients
    from ssau.dist.ranks import Runtime

    assert dist.get_world_size() == world == 2
    m = tiny_mal(alpha=0.5)
    local = rank_slice(batch, rank, world)
    rt = Runtime(rank, world, torch.device("cpu"), bf16=False, channels_last=False)
    meta = list(m.meta.parameters())
    m.meta_loss(local, 0)["loss"].backward(inputs=meta)
    average_gradients(meta, rt)
    base = m.groups()["base"].params
    m.base_loss(local, 0)["loss"].backward(inputs=base)
    average_gradients(base, rt)
    return {"meta": [p.grad.numpy().copy() for p in meta], "base": [p.grad.numpy().copy() for p in base]}


def test_two_ranks_of_b_equal_one_process_of_2b():
    batch = make_batch(m1=8, me=6, mv=10)
    single = tiny_mal(alpha=0.5)
    meta, base = list(single.meta.parameters()), single.groups()["base"].params
    single.meta_loss(batch, 0)["loss"].backward(inputs=meta)
    single.base_loss(batch, 0)["loss"].backward(inputs=base)
    ranks = run_ranks(_rank_grads, 2, batch)
    assert any(p.grad.abs().max() > 1e-6 for p in meta)
    for r in ranks:  # the same averaged gradients on both ranks, equal to the global-batch ones (float64)
        for got, want in zip(r["meta"], [p.grad for p in meta]):
            assert np.allclose(got, want.numpy(), rtol=1e-9, atol=1e-12), (got, want)
        for got, want in zip(r["base"], [p.grad for p in base]):
            assert np.allclose(got, want.numpy(), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def mal_corpora(corpora) -> tuple[Path, Path]:
    return corpora.bp4d(frames=10), corpora.rafdb()


def test_validation_set_is_per_subject_and_never_trained_on(mal_corpora):
    bp4d, _ = mal_corpora
    cfg = StreamConfig(labelled=SourceConfig((str(bp4d),), folds=(2, 3)), m1=8, m2=0, image_size=32,
                       validation=0.1, val_batch=6, workers=0, shuffle_buffer=10)
    split = validation_split(cfg)
    assert split.keys == validation_split(cfg).keys  # the same on every rank and run
    index = pq.read_table(bp4d / "index.parquet", columns=["key", "subject", "fold"]).to_pylist()
    subject = {r["key"]: r["subject"] for r in index}
    per_subject = Counter(subject[k] for k in split.keys)
    assert split.subjects == 4 and sorted(per_subject.values()) == [2, 2, 2, 2]  # round(0.1 * 20 frames) each
    assert {r["fold"] for r in index if r["key"] in split.keys} == {2, 3}  # never the evaluation fold
    stream = iter(TrainStream(cfg))
    seen, val_seen = set(), set()
    for _ in range(15):
        b = next(stream)
        seen.update(b.keys)
        assert b.val_images.shape == (6, 3, 32, 32) and b.val_targets.shape == (6, len(resolve_aus(cfg)))
        val_seen.update(b.val_keys)
    assert not seen & set(split.keys) and len(seen) > 40  # reserved images never reach AU training ...
    assert val_seen == set(split.keys)  # ... and are the validation batches, all of them


def test_mal_trains_and_logs_weights_and_histograms(mal_corpora, tmp_path):
    from mlflow.tracking import MlflowClient

    from ssau.train.trainer import Trainer

    bp4d, rafdb = mal_corpora
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_run_config(None, [f"data.labelled=[{bp4d}]", f"data.expression=[{rafdb}]", "method.name=mal",
                             "model.backbone=tiny", "data.image_size=32", "data.m1=4", "data.m_expr=4", "data.m2=0",
                             "data.validation=0.05", "data.val_batch=6", "data.workers=0", "train.steps=3",
                             "train.log_every=1", f"train.out={tmp_path}", "train.name=mal", "train.progress=false",
                             f"tracking.uri={db}"])
    trainer = Trainer(cfg)
    psi0 = trainer.method.meta.weight.detach().clone()
    trainer.fit()
    assert not torch.equal(psi0, trainer.method.meta.weight)  # the meta net learned
    client = MlflowClient(tracking_uri=db)
    (run,) = client.search_runs([client.get_experiment_by_name("ssau").experiment_id])
    hist = client.get_metric_history(run.info.run_id, "train/base/w_fe")
    assert [h.step for h in hist] == [1, 2, 3] and all(0 < h.value < 1 for h in hist)
    assert client.get_metric_history(run.info.run_id, "train/meta/w_au")[0].value == pytest.approx(0.5)  # zero init
    names = {a.path for a in client.list_artifacts(run.info.run_id, "eval/step-0000003")}
    assert {"eval/step-0000003/expression_weights.png", "eval/step-0000003/expression_weights.csv"} <= names
    rows = (tmp_path / "mal" / "eval" / "step-0000003" / "expression_weights.csv").read_text().splitlines()
    assert rows[0] == "step,key,group,weight" and len(rows) == 1 + 3 * 4  # every expression sample, every step
    w = np.array([float(r.split(",")[-1]) for r in rows[1:]])
    assert ((w > 0) & (w < 1)).all()


def test_config_names_what_mal_lacks(mal_corpora):
    from ssau.errors import ConfigError

    bp4d, rafdb = mal_corpora
    with pytest.raises(ConfigError, match="data.expression: method mal needs an expression corpus"):
        load_run_config(None, [f"data.labelled=[{bp4d}]", "method.name=mal", "data.validation=0.02"])
    with pytest.raises(ConfigError, match="data.validation: method mal needs"):
        load_run_config(None, [f"data.labelled=[{bp4d}]", f"data.expression=[{rafdb}]", "method.name=mal"])


def test_unreadable_validation_samples_are_skipped_and_counted_once():
    import json

    from corpora import jpeg_bytes

    from ssau.data.stream import _ValidationDataset

    meta = json.dumps({"aus": [1], "occurrence": [1], "mask": [1]}).encode()
    samples = [{"__key__": f"k{i}", "jpg": jpeg_bytes(i), "json": meta} for i in range(3)]
    samples.append({"__key__": "broken", "jpg": b"not a jpeg", "json": meta})
    cfg = StreamConfig(labelled=SourceConfig(("x",)), aus=(1,), image_size=16, val_batch=3)
    it = iter(_ValidationDataset(samples, cfg, (1,), rank=0))
    batches = [next(it) for _ in range(6)]
    assert all("broken" not in b["keys"] and len(b["keys"]) == 3 for b in batches)
    assert sum(b["skipped"] for b in batches) == 1
    assert all(b["targets"].tolist() == [[1.0]] * 3 for b in batches)


def test_mtl_loss_is_au_plus_rho_times_expression_loss():
    from ssau.methods.mtl import MTLParams, MultiTask

    m = MultiTask(MTLParams(rho=0.25), AUS, ModelConfig(backbone="tiny"))
    m.backbone, m.head, m.expr_head = PixelNet(S), nn.Linear(5, J), nn.Linear(5, 7)
    m.double()
    batch = make_batch()
    f, au, fe = m(torch.cat([batch.images, batch.expr_images]))
    l_au = (nn.functional.binary_cross_entropy_with_logits(au[:6], batch.targets, reduction="none") * batch.mask).sum(1)
    want = l_au.mean() + 0.25 * nn.functional.cross_entropy(fe[6:], batch.expr_labels)
    assert m.loss(batch, 0)["loss"].item() == pytest.approx(want.item(), rel=1e-12)


def test_weight_separation_statistic():
    from ssau.bench.mal_weights import separation

    assert separation(np.array([0.9, 0.8]), np.array([0.1, 0.2])) == 1.0
    assert separation(np.array([0.1]), np.array([0.9])) == 0.0
    assert separation(np.array([0.5, 0.5]), np.array([0.5])) == 0.5  # ties count half
    assert separation(np.array([0.3, 0.7]), np.array([0.5])) == 0.5


def test_bad_ambiguous_fraction_is_one_line(tmp_path, capsys):
    from ssau.cli import main

    assert main(["synth", "--out", str(tmp_path / "syn"), "--ambiguous", "1.5", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ssau: error: --ambiguous: 1.5 is not a fraction in [0, 1]"]
    assert not (tmp_path / "syn").exists()  # nothing written
