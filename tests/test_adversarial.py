"""Method `adversarial` (Wang et al., Alg. 1): loss terms by hand, update isolation, the label bank's provenance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ssau.config import ModelConfig
from ssau.data.batch import Batch
from ssau.data.sources import is_hidden
from ssau.methods.adversarial import Adversarial, AdversarialParams
from ssau.methods.base import SetupInfo
from ssau.train.setup import load_run_config
from ssau.train.trainer import Trainer

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
def shards(corpora) -> Path:
    return corpora.bp4d(shard_size=4)


def make_trainer(shards: Path, tmp: Path, *extra: str) -> Trainer:
    cfg = load_run_config(None, [f"data.labelled=[{shards}]", "method.name=adversarial", "model.backbone=tiny",
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


# ---------------------------------------------------------------------------------------------------- remedies
class RecordingD(torch.nn.Module):
    """D(y) = sigmoid(w . y + b), remembering every input it is shown."""

    def __init__(self, w: list[float], b: float):
        super().__init__()
        self.lin = torch.nn.Linear(len(w), 1)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([w]))
            self.lin.bias.fill_(b)
        self.seen: list[torch.Tensor] = []

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        self.seen.append(y.detach().clone())
        return self.lin(y)


W, B = [1.0, -2.0, 0.5], 0.1
BANK = [1.0, 0, 1]


def make_method(monkeypatch, p: torch.Tensor, **params) -> tuple[Adversarial, RecordingD]:
    """A method whose R outputs ``p`` (a leaf the tests can differentiate) and whose D records its inputs."""
    m = Adversarial(AdversarialParams(**params), (1, 2, 4), ModelConfig(backbone="tiny"))
    m.setup(SetupInfo((1, 2, 4), torch.tensor([BANK]), torch.ones(1, J)))
    d = RecordingD(W, B)
    m.discriminator.net = d
    monkeypatch.setattr(m, "probs", lambda images: p[: images.shape[0]])
    return m, d


def make_batch(m1: int, m2: int, targets=None, mask=None) -> Batch:
    t = torch.zeros(m1, J) if targets is None else torch.as_tensor(targets, dtype=torch.float32)
    return Batch(images=torch.zeros(m1, 3, 1, 1, dtype=torch.uint8), targets=t,
                 mask=torch.ones(m1, J) if mask is None else torch.as_tensor(mask, dtype=torch.float32),
                 keys=[str(i) for i in range(m1)], unlabelled=torch.zeros(m2, 3, 1, 1, dtype=torch.uint8))


P3 = [[0.9, 0.2, 0.6], [0.3, 0.8, 0.1], [0.5, 0.5, 0.5]]


def test_defaults_are_the_papers_form_and_draw_nothing_more(monkeypatch):
    p = torch.tensor(P3)
    m, d = make_method(monkeypatch, p, alpha=0.3)
    assert "balance" not in m.state_dict()  # the paper's form checkpoints exactly what it did
    torch.manual_seed(5)
    m.discriminator_loss(make_batch(2, 1), 0)
    after = torch.get_rng_state()
    torch.manual_seed(5)
    torch.randint(1, (3,))  # the label-bank draw, and nothing else
    assert torch.equal(after, torch.get_rng_state())
    assert torch.equal(d.seen[0], torch.tensor([BANK] * 3)) and torch.equal(d.seen[1], p)  # 0/1 reals, soft fakes
    out = m.classifier_loss(make_batch(2, 1, [[1.0, 0, 1], [0, 1, 0]]), 0)
    assert torch.equal(d.seen[2], p) and out["alpha"] == 0.3


def test_diagnostics_on_a_constructed_batch(monkeypatch):
    # D(y) = sigmoid(y . W + B); the real [1,0,1] scores 1.6 -> D > 0.5. Fakes scoring <0 are "caught".
    p = torch.tensor([[0.99, 0.01, 0.5], [0.1, 0.9, 0.02], [0.96, 0.97, 0.04], [0.5, 0.5, 0.5]])
    m, _ = make_method(monkeypatch, p, alpha=0.25)
    out = m.discriminator_loss(make_batch(2, 2), 0)
    logit = p.numpy() @ np.array(W) + B  # 1.26, -1.69, -0.86, -0.15: three of four fakes below 0.5
    assert (logit < 0).sum() == 3
    assert out["acc_real"].item() == 1.0 and out["acc_fake"].item() == 0.75
    assert out["d_acc"].item() == pytest.approx((4 + 3) / 8)
    targets = [[1.0, 0, 1], [0, 1, 0]]
    out = m.classifier_loss(make_batch(2, 2, targets), 0)
    assert out["r_sat"].item() == pytest.approx(6 / 12)  # 0.99 0.01 0.02 0.96 0.97 0.04 (0.9 and 0.1 are not)
    pn = p.numpy().astype(np.float64)
    adv = -np.mean(np.log(sig(pn @ np.array(W) + B)))
    t = np.array(targets)
    sup = (-(t * np.log(pn[:2]) + (1 - t) * np.log(1 - pn[:2]))).sum() / 2
    assert out["ratio"].item() == pytest.approx(adv / sup, rel=1e-5)
    assert out["wratio"].item() == pytest.approx(0.25 * adv / (0.75 * sup), rel=1e-5)


def test_straight_through_is_hard_forward_with_the_soft_gradient(monkeypatch):
    p = torch.tensor(P3[:2] + [[0.7, 0.4, 0.2]], requires_grad=True)
    m, d = make_method(monkeypatch, p, alpha=1.0, fake="straight_through")  # alpha 1: the adversarial term alone
    hard = (p.detach() > 0.5).float()
    m.discriminator_loss(make_batch(2, 1), 0)
    assert torch.equal(d.seen[-1], hard)  # D trains on hard fakes
    m.classifier_loss(make_batch(2, 1), 0)["loss"].backward()
    assert torch.equal(d.seen[-1], hard)  # ... and judges hard fakes in R's update
    # -(1/m) sum log D(y): d/dy = -(1/m)(1 - D(y)) W, taken at the hard vector and passed to p unchanged
    dh = sig(hard.numpy().astype(np.float64) @ np.array(W) + B)
    want = -(1 - dh)[:, None] * np.array(W)[None, :] / 3
    np.testing.assert_allclose(p.grad.numpy(), want, rtol=1e-5)
    # the soft form's gradient has the same expression at p itself: only the point where D is read differs
    q = p.detach().clone().requires_grad_(True)
    ms, _ = make_method(monkeypatch, q, alpha=1.0)
    ms.classifier_loss(make_batch(2, 1), 0)["loss"].backward()
    ds = sig(q.detach().numpy().astype(np.float64) @ np.array(W) + B)
    np.testing.assert_allclose(q.grad.numpy(), -(1 - ds)[:, None] * np.array(W)[None, :] / 3, rtol=1e-5)


def test_threshold_hardens_fakes_for_ds_update_only(monkeypatch):
    p = torch.tensor(P3, requires_grad=True)
    m, d = make_method(monkeypatch, p, fake="threshold")
    m.discriminator_loss(make_batch(2, 1), 0)
    assert torch.equal(d.seen[-1], (p.detach() > 0.5).float())
    m.classifier_loss(make_batch(2, 1), 0)["loss"].backward()
    assert torch.equal(d.seen[-1], p.detach()) and p.grad.abs().sum() > 0  # R's update: the soft p, with gradient


def test_instance_noise_reaches_both_inputs_in_both_updates_and_anneals(monkeypatch):
    n = 4000
    p = torch.rand(n, J, generator=torch.Generator().manual_seed(1))
    clean, dn = make_method(monkeypatch, p)
    m, d = make_method(monkeypatch, p, d_noise=0.2, d_noise_steps=100)
    for step, std in ((0, 0.2), (50, 0.1)):
        for meth in (clean, m):
            torch.manual_seed(3)
            meth.discriminator_loss(make_batch(n // 2, n // 2), step)
            meth.classifier_loss(make_batch(n // 2, n // 2), step)
        real, fake, fake_r = (d.seen[i] - dn.seen[i] for i in range(3))  # noise on reals, fakes (D), fakes (R)
        assert torch.equal(dn.seen[0], torch.tensor([BANK] * n))  # the same bank draw with and without noise
        for noise in (real, fake, fake_r):
            assert noise.std().item() == pytest.approx(std, rel=0.05) and noise.mean().abs().item() < 0.01
        assert not torch.equal(real, fake)  # independent draws
        d.seen.clear()
        dn.seen.clear()
    torch.manual_seed(3)
    m.discriminator_loss(make_batch(2, 2), 100)  # annealed away: the clean inputs, no draw
    state = torch.get_rng_state()
    torch.manual_seed(3)
    torch.randint(1, (4,))
    assert torch.equal(state, torch.get_rng_state()) and torch.equal(d.seen[1], p[:4])


def test_real_smoothing_reaches_d_exactly(monkeypatch):
    p = torch.tensor(P3)
    m, d = make_method(monkeypatch, p, real_smooth=0.2)
    m.discriminator_loss(make_batch(2, 1), 0)
    assert torch.allclose(d.seen[0], torch.tensor([[0.9, 0.1, 0.9]] * 3), atol=1e-7, rtol=0)
    assert torch.equal(d.seen[1], p)  # fakes untouched


def test_alpha_balance_moves_the_weighted_ratio_to_its_target(monkeypatch):
    p = torch.tensor(P3)
    m, _ = make_method(monkeypatch, p, alpha=0.01, alpha_balance=1 / 15)
    batch = make_batch(2, 1, [[1.0, 0, 1], [0, 1, 0]])
    first = m.classifier_loss(batch, 0)
    assert first["alpha"] == 0.01 and abs(first["wratio"].item() - 1 / 15) > 0.01  # no measurement yet
    m.after_step(batch, 0)
    second = m.classifier_loss(batch, 1)
    adv, sup = first["adv"].item(), first["sup"].item()
    assert second["alpha"] == pytest.approx((sup / 15) / (adv + sup / 15), rel=1e-5)
    assert second["wratio"].item() == pytest.approx(1 / 15, rel=1e-5)
    assert second["loss"].item() == pytest.approx(second["alpha"] * adv + (1 - second["alpha"]) * sup, rel=1e-5)
    m.after_step(batch, 1)
    before = m.balance.clone()
    m._pending.append(torch.tensor([float("inf"), 1.0]))  # a refused update's measurement is left out
    m.after_step(batch, 2)
    assert torch.equal(m.balance, before)


def test_alpha_balance_means_averaged_over_ranks_equal_one_process(monkeypatch):
    """The trainer averages floating buffers after each step; the EMA is linear, so averaging two ranks'
    buffers gives the EMA of the global-batch mean (what one process holding both batches measures)."""
    ranks = [make_method(monkeypatch, torch.tensor(P3), alpha_balance=0.1, balance_decay=0.9)[0] for _ in range(3)]
    for meth, x in zip(ranks, ([2.0, 4.0], [6.0, 1.0], [4.0, 2.5])):  # rank 0, rank 1, one process (the mean)
        meth.balance.copy_(torch.tensor([1.0, 3.0]))
        meth._pending.append(torch.tensor(x))
        meth.after_step(None, 0)
    assert torch.allclose((ranks[0].balance + ranks[1].balance) / 2, ranks[2].balance, rtol=1e-6)


@pytest.mark.parametrize("bad", ["method.fake=hard", "method.d_noise=-0.1", "method.real_smooth=1.0",
                                 "method.alpha_balance=-1", "method.d_noise_steps=-5"])
def test_bad_remedy_settings_are_one_line_config_errors(shards, bad):
    from ssau.errors import ConfigError

    with pytest.raises(ConfigError, match=bad.split("=")[0] + ": "):  # the option's own check, not "unknown key"
        load_run_config(None, [f"data.labelled=[{shards}]", "method.name=adversarial", bad])


def test_remedies_run_through_the_trainer_and_log_their_diagnostics(shards, tmp_path):
    from ssau.data.stream import TrainStream

    tr = make_trainer(shards, tmp_path, "method.d_noise=0.1", "method.real_smooth=0.1",
                      "method.fake=straight_through", "method.alpha_balance=0.1")
    batches = iter(TrainStream(tr.stream_cfg))
    _, parts = tr.train_step(batches)
    for key in ("discriminator/d_acc", "discriminator/acc_real", "discriminator/acc_fake", "classifier/r_sat",
                "classifier/ratio", "classifier/wratio", "classifier/alpha"):
        assert np.isfinite(parts[f"train/{key}"]), key
    assert parts["train/classifier/alpha"] == 0.01 and (tr.method.balance > 0).all()  # measured after step 1
    _, parts = tr.train_step(batches)
    assert parts["train/classifier/alpha"] != 0.01
