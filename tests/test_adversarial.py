"""Method `adversarial` (Wang et al., Alg. 1): loss terms by hand, update isolation, the label bank's provenance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from corpora import shard_bp4d
from ssau.config import ModelConfig, load_config
from ssau.data.sources import is_hidden
from ssau.data.stream import Batch
from ssau.methods.adversarial import Adversarial, AdversarialParams
from ssau.methods.base import SetupInfo
from ssau.trainer import Trainer

J = 3


def linear_d(method: Adversarial, w: list[float], b: float) -> None:
    """Make D(y) = sigmoid(w . y + b), computable by hand."""
    lin = torch.nn.Linear(J, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([w]))
        lin.bias.fill_(b)
    method.discriminator.net = torch.nn.Sequential(lin)


def sig(x):
    return 1 / (1 + np.exp(-x))


def test_loss_terms_match_hand_computation(monkeypatch):
    m = Adversarial(AdversarialParams(alpha=0.3), (1, 2, 4), ModelConfig(backbone="tiny"))
    m.setup(SetupInfo((1, 2, 4), torch.tensor([[1.0, 0, 1]]), torch.ones(1, J)))  # one bank vector: y^r fixed
    linear_d(m, [1.0, -2.0, 0.5], 0.1)
    p = torch.tensor([[0.9, 0.2, 0.6], [0.3, 0.8, 0.1], [0.5, 0.5, 0.5]])  # 2 labelled + 1 unlabelled
    monkeypatch.setattr(m, "probs", lambda images: p[: images.shape[0]])
    batch = Batch(images=torch.zeros(2, 3, 8, 8, dtype=torch.uint8), targets=torch.tensor([[1.0, 0, 1], [0, 1, 0]]),
                  mask=torch.tensor([[1.0, 1, 0], [1, 1, 1]]), keys=["a", "b"],
                  unlabelled=torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    w, b = np.array([1.0, -2.0, 0.5]), 0.1
    d = lambda y: sig(np.asarray(y) @ w + b)  # noqa: E731
    pn = p.numpy().astype(np.float64)
    # Eq. 3 with m = 3 images and 3 bank draws (all the same vector)
    want_d = -np.mean([np.log(d([1, 0, 1])) + np.log(1 - d(pn[i])) for i in range(3)])
    assert m.discriminator_loss(batch, 0)["loss"].item() == pytest.approx(want_d, rel=1e-5)
    # line 10: -(a/m) sum log D(R(x)) + ((1-a)/m1) sum masked CE
    adv = -np.mean([np.log(d(pn[i])) for i in range(3)])
    t, mk = batch.targets.numpy(), batch.mask.numpy()
    ce = -(t * np.log(pn[:2]) + (1 - t) * np.log(1 - pn[:2])) * mk
    want_r = 0.3 * adv + 0.7 * ce.sum() / 2
    out = m.classifier_loss(batch, 0)
    assert out["loss"].item() == pytest.approx(want_r, rel=1e-5)
    assert out["adv"].item() == pytest.approx(adv, rel=1e-5) and out["sup"].item() == pytest.approx(ce.sum() / 2, rel=1e-5)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return shard_bp4d(tmp_path_factory.mktemp("adv"), shard_size=4)


def make_trainer(shards: Path, tmp: Path, *extra: str) -> Trainer:
    cfg = load_config(None, [f"data.labelled=[{shards}]", "method.name=adversarial", "model.backbone=tiny",
                             "data.image_size=32", "data.m1=4", "data.m2=4", "data.workers=0", "data.label_drop=0.5",
                             f"train.out={tmp}", "tracking.enabled=false", "train.steps=2", *extra])
    return Trainer(cfg)


def test_each_update_leaves_the_other_network_unchanged(shards, tmp_path):
    from ssau.data.stream import TrainStream

    tr = make_trainer(shards, tmp_path)
    batches = iter(TrainStream(tr.stream_cfg))
    d_ids = {id(p) for p in tr.groups["discriminator"].params}
    snap = lambda: {n: p.detach().clone() for n, p in tr.method.named_parameters()}  # noqa: E731
    d_upd, r_upd = tr.method.updates(0)
    before = snap()
    tr._run_update(d_upd, batches, None)
    after = snap()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(n.startswith("discriminator.") for n in changed)
    tr._run_update(r_upd, batches, None)
    final = snap()
    changed = {n for n in after if not torch.equal(after[n], final[n])}
    assert changed and not any(n.startswith("discriminator.") for n in changed)
    assert all(p.requires_grad for p in tr.method.parameters())  # D unfrozen again after the classifier update
    assert d_ids


def test_bank_never_holds_the_evaluation_fold_or_hidden_labels(shards, tmp_path):
    import pyarrow.parquet as pq

    tr = make_trainer(shards, tmp_path, "data.fold=2")
    idx = {r["key"]: r for r in pq.read_table(shards / "index.parquet").to_pylist()}
    assert tr.bank_keys
    for k in tr.bank_keys:
        assert idx[k]["fold"] != 2 and not is_hidden(k, 0.5, 0)
    train_visible = [k for k, r in idx.items() if r["fold"] != 2 and not is_hidden(k, 0.5, 0)]
    assert sorted(tr.bank_keys) == sorted(train_visible)
    # D's real vectors: exactly the fully known ones among them, in index order.
    aus = [f"AU{a:02d}" for a in tr.aus]
    full = [[idx[k][a] for a in aus] for k in tr.bank_keys if all(idx[k][a] != -1 for a in aus)]
    assert tr.method.bank.tolist() == [[float(v) for v in row] for row in full]
