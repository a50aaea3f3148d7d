"""Every registered method through the same checks (the registry is walked, so a new method is tested on the day
it is registered): finite losses, gradients reach exactly the updated group, unknown labels never matter,
predict's shape and range."""

from __future__ import annotations

import pytest
import torch
from helpers import make_batch

from ssau.config import ModelConfig
from ssau.methods.base import SetupInfo
from ssau.methods.registry import METHODS, build_method, resolve_params

AUS = (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24)


def make_method(name: str):
    torch.manual_seed(0)
    m = build_method(resolve_params({"name": name}), AUS, ModelConfig(backbone="tiny"))
    bank = (torch.rand(50, len(AUS)) < 0.3).float()
    m.setup(SetupInfo(AUS, bank, torch.ones_like(bank), validation_targets=bank[:10],
                      validation_mask=torch.ones_like(bank[:10])))
    return m


@pytest.mark.parametrize("name", sorted(METHODS))
def test_updates_are_finite_and_reach_exactly_their_group(name):
    method = make_method(name)
    groups = method.groups()
    batch = make_batch()
    for upd in method.updates(0):
        method.zero_grad(set_to_none=True)
        frozen = [p for g in upd.freeze for p in groups[g].params]
        for p in frozen:
            p.requires_grad_(False)
        out = upd.loss(batch, 0)
        assert set(out) >= {"loss"} and torch.isfinite(out["loss"]), (upd.name, out)
        out["loss"].backward()
        for p in frozen:
            p.requires_grad_(True)
        mine = {id(p) for g in upd.groups for p in groups[g].params}
        for g in upd.groups:
            got = [p for p in groups[g].params if p.grad is not None and p.grad.abs().sum() > 0]
            assert got, f"{upd.name}: no gradient reached group {g}"
        assert all(p.grad is None for p in frozen), f"{upd.name}: a frozen group received gradients"
        strays = [p for p in method.parameters() if id(p) not in mine and p.grad is not None]
        assert not strays, f"{upd.name}: gradients reached parameters outside groups {upd.groups}"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_unknown_labels_never_change_a_loss(name):
    method = make_method(name)
    batch = make_batch()
    flipped = make_batch()
    flipped.targets = torch.where(batch.mask > 0, batch.targets, 1 - batch.targets)  # only unknown cells change
    flipped.val_targets = torch.where(batch.val_mask > 0, batch.val_targets, 1 - batch.val_targets)
    for upd in method.updates(0):
        torch.manual_seed(1)
        a = upd.loss(batch, 0)["loss"].item()
        torch.manual_seed(1)
        b = upd.loss(flipped, 0)["loss"].item()
        assert a == pytest.approx(b, rel=1e-6), upd.name


@pytest.mark.parametrize("name", sorted(METHODS))
def test_predict_gives_probabilities_per_au(name):
    method = make_method(name).eval()
    with torch.no_grad():
        p = method.predict(make_batch().images)
    assert p.shape == (6, len(AUS)) and (p >= 0).all() and (p <= 1).all()


def test_every_parameter_belongs_to_one_group():
    for name in METHODS:
        method = make_method(name)
        ids = [id(p) for g in method.groups().values() for p in g.params]
        assert len(ids) == len(set(ids)) == len(list(method.parameters())), name


def test_every_shipped_recipe_is_a_valid_config():
    from pathlib import Path

    from ssau.train.setup import load_run_config

    recipes = sorted((Path(__file__).resolve().parents[1] / "launch" / "recipes").glob("*.yaml"))
    assert len(recipes) >= 10
    for path in recipes:
        cfg = load_run_config(path)  # strict: an unknown key or a bad value fails here
        assert cfg.method["name"] in METHODS, path.name


def test_supervised_selective_loss_keeps_ceil_a_c_n_negatives_of_a_rare_au(monkeypatch):
    """loss=selective is MLCR's Eq. 2 balance on the one classifier: an AU with 1 positive among 10 known labels keeps
    the positive and ceil(0.3 * 10) = 3 negatives; an AU with 5 positives keeps every label; loss=plain keeps all."""
    import ssau.methods.supervised as supervised

    seen = []
    real = supervised.masked_bce
    monkeypatch.setattr(supervised, "masked_bce", lambda logits, t, m, w=None: seen.append(m) or real(logits, t, m, w))
    aus = (1, 2)
    targets = torch.zeros(10, 2)
    targets[0, 0] = 1
    targets[:5, 1] = 1
    batch = make_batch(0, m1=10, aus=aus)
    batch.targets, batch.mask = targets, torch.ones(10, 2)
    for loss in ("selective", "plain"):
        m = build_method(resolve_params({"name": "supervised", "loss": loss, "a_c_table": "default"}), aus,
                         ModelConfig(backbone="tiny"))
        out = m.loss(batch, 0)
        assert torch.isfinite(out["loss"])
    selective, plain = seen
    assert selective[0, 0] == 1 and selective[:, 0].sum() == 4  # the positive and 3 of 9 negatives
    assert torch.equal(selective[:, 1], torch.ones(10)) and torch.equal(plain, torch.ones(10, 2))


def test_supervised_selective_settings_are_checked():
    from ssau.errors import ConfigError

    with pytest.raises(ConfigError, match="method.loss"):
        resolve_params({"name": "supervised", "loss": "focal"})
    with pytest.raises(ConfigError, match="a_c_default"):
        resolve_params({"name": "supervised", "loss": "selective", "a_c_default": 0.0})
