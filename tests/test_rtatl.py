"""RTATL (issue 23) against hand-worked examples: AU centres from known landmarks (with a flip), regions that follow
the image, the cropped AU's absence from the supervised loss, G/D/C shapes and losses, the flow mask, and which
networks each update moves."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from helpers import make_batch

from ssau.config import ModelConfig
from ssau.errors import ConfigError
from ssau.faces.template import flip_landmarks, mean_landmarks
from ssau.methods.base import SetupInfo
from ssau.methods.registry import build_method, resolve_params
from ssau.methods.rtatl.inpaint import patches, white_out
from ssau.methods.rtatl.regions import RULES, au_centres, boxes, overlaps, rule_table

AUS = (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24)
J = len(AUS)
SMALL = {"d": 32, "heads": 4, "fused_width": 16}


class Fn(nn.Module):
    """A stand-in network computing ``fn`` (monkeypatching a child module needs a module)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *x):
        return self.fn(*x)


def rtatl(**extra):
    torch.manual_seed(0)
    m = build_method(resolve_params({"name": "rtatl", **SMALL, **extra}), AUS, ModelConfig(backbone="tiny"))
    bank = torch.ones(1, J)
    m.setup(SetupInfo(AUS, bank, bank, steps=10, seed=5))
    return m.train()


# ---------------------------------------------------------------------------------------------------- regions
def test_au_centres_by_hand_for_every_au():
    # point i at (i, 2 i): the ruler |x39 - x42| is 3, so r/2 = 1.5, r/3 = 1, r = 3
    lm = torch.tensor([[i, 2.0 * i] for i in range(68)])[None]
    got = au_centres(lm, rule_table(AUS, "jaa"))[0]
    want = {1: [(21, 40.5), (22, 42.5)], 2: [(18, 35), (25, 49)], 4: [(19, 39), (24, 49)], 6: [(41, 85), (46, 95)],
            7: [(38, 76), (43, 86)], 10: [(61, 122), (63, 126)], 12: [(48, 96), (54, 108)], 14: [(48, 96), (54, 108)],
            15: [(48, 96), (54, 108)], 17: [(56, 113.5), (58, 117.5)], 23: [(51, 102), (57, 114)],
            24: [(51, 102), (57, 114)]}
    assert got.tolist() == [[list(map(float, c)) for c in want[a]] for a in AUS]
    eac = au_centres(lm, rule_table(AUS, "eac"))[0]
    assert eac[AUS.index(10)].tolist() == [[49, 98], [53, 106]]
    assert eac[AUS.index(17)].tolist() == [[51, 102], [57, 114]]
    assert eac[AUS.index(23)].tolist() == [[61, 122], [63, 126]]


def test_au_centres_by_hand_for_the_aus_outside_bp4d():
    lm = torch.tensor([[i, 2.0 * i] for i in range(68)])[None]
    extra = (5, 9, 20, 25, 26, 27, 43, 45)
    want = {5: [(37, 74), (44, 88)], 9: [(32, 62.5), (34, 66.5)], 20: [(48, 96), (54, 108)],
            25: [(51, 102), (57, 114)], 26: [(56, 113.5), (58, 117.5)], 27: [(56, 113.5), (58, 117.5)],
            43: [(38, 76), (43, 86)], 45: [(38, 76), (43, 86)]}
    for rule in ("jaa", "eac"):
        assert au_centres(lm, rule_table(extra, rule))[0].tolist() == [[list(map(float, c)) for c in want[a]]
                                                                      for a in extra]


@pytest.mark.parametrize("rule", ["jaa", "eac"])
def test_centres_of_a_flipped_face_are_the_mirrored_centres(rule):
    size = 200
    aus = tuple(sorted(RULES[rule]))
    lm = mean_landmarks(size, size) + np.random.default_rng(0).normal(0, 1.5, (68, 2)).astype(np.float32)
    table = rule_table(aus, rule)
    plain = au_centres(torch.from_numpy(lm)[None].double(), table)[0]
    flipped = au_centres(torch.from_numpy(flip_landmarks(lm, size))[None].double(), table)[0]
    mirrored = plain.clone()
    mirrored[..., 0] = size - 1 - plain[..., 0]
    for j, au in enumerate(aus):  # left/right pairs swap places; centres on the midline (51, 57) stay
        midline = RULES[rule][au][0] in (51, 57)
        want = mirrored[j] if midline else mirrored[j].flip(0)
        assert torch.allclose(flipped[j], want, atol=1e-4), au


def test_unknown_au_and_rule_are_refused():
    with pytest.raises(ConfigError, match="AU16"):
        rule_table((1, 16), "jaa")
    with pytest.raises(ConfigError, match="regions"):
        rtatl(regions="openface")


def test_regions_follow_the_image():
    """A region cut at the augmented landmarks holds what the same region held before a flip or a shift."""
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8, generator=g)
    lm = mean_landmarks(64, 64)
    table = rule_table(AUS, "jaa")
    b = boxes(au_centres(torch.from_numpy(lm)[None].double(), table), 15.0)[0]  # [J, 2, 4]
    before = patches(img, b.reshape(1, -1, 4), 15)
    flipped = boxes(au_centres(torch.from_numpy(flip_landmarks(lm, 64))[None].double(), table), 15.0)[0]
    after = patches(img.flip(-1), flipped.reshape(1, -1, 4), 15).view(J, 2, 3, 15, 15)
    for j, au in enumerate(AUS):
        want = before.view(J, 2, 3, 15, 15)[j].flip(-1)
        want = want if au in (23, 24) else want.flip(0)
        assert torch.allclose(after[j], want, atol=1e-5), au
    shifted_img = torch.roll(img, shifts=(3, -2), dims=(2, 3))  # down 3, left 2 (regions stay inside the face)
    moved = boxes(au_centres(torch.from_numpy(lm + np.array([-2, 3], np.float32))[None].double(), table), 15.0)
    inside = ((b >= 0) & (b <= 63) & (moved[0] >= 0) & (moved[0] <= 63)).all(-1).reshape(-1)  # no edge padding
    assert inside.sum() >= 16  # the brows' regions reach past the top edge of a 64 px face
    assert torch.allclose(patches(shifted_img, moved.reshape(1, -1, 4), 15)[inside], before[inside], atol=1e-5)


def test_white_out_fills_exactly_the_boxes():
    img = torch.zeros(1, 3, 10, 10, dtype=torch.uint8)
    out = white_out(img, torch.tensor([[[2.0, 3.0, 4.0, 5.0], [7.5, 7.5, 8.5, 8.5]]]))
    want = torch.zeros(10, 10, dtype=torch.bool)
    want[3:6, 2:5] = True  # x 2..4, y 3..5
    want[8, 8] = True
    assert torch.equal(out[0, 0] == 255, want) and torch.equal(out[0, 1], out[0, 0])


# ---------------------------------------------------------------------------------------------------- losses
def test_a_cropped_au_and_those_sharing_its_regions_leave_the_supervised_loss(monkeypatch):
    import ssau.methods.rtatl.method as method_module

    m = rtatl(flow=False)
    b = make_batch(m1=2, m2=3)  # unlabelled images after the labelled ones: the exclusion must stay on its rows
    b.mask = torch.ones_like(b.mask)
    lip, brow = AUS.index(12), AUS.index(1)
    monkeypatch.setattr(method_module, "choose", lambda keys, seed, step, n: [lip] + [brow] * (len(keys) - 1))
    keep = ~overlaps(m.regions(b.landmarks, 2, 32, "cpu"), torch.tensor([lip, lip]), 0.5)
    left_out = {AUS[j] for j in range(J) if not keep[0, j]}
    assert {12, 14, 15} <= left_out and not left_out & {1, 2, 4, 6, 7}  # the lip corners' AUs, none of the brows'
    base = m.main_loss(b, 0)["bce"].item()
    for au in AUS:  # image 0 lost AU12's regions, image 1 AU1's
        other = make_batch(m1=2, m2=3)
        other.mask = torch.ones_like(other.mask)
        other.targets[0, AUS.index(au)] = 1 - other.targets[0, AUS.index(au)]
        assert (m.main_loss(other, 0)["bce"].item() == pytest.approx(base, rel=1e-6)) == (au in left_out), au
    other = make_batch(m1=2, m2=3)
    other.mask = torch.ones_like(other.mask)
    other.targets[1, brow] = 1 - other.targets[1, brow]
    assert m.main_loss(other, 0)["bce"].item() == pytest.approx(base, rel=1e-6)  # image 1's AU1 was cropped


def test_generator_shape_and_d_c_losses_by_hand(monkeypatch):
    m = rtatl(flow=False)
    assert m.generator(torch.randn(5, 32), 15).shape == (5, 3, 15, 15)
    assert m.generator(torch.randn(2, 32), 48).shape == (2, 3, 48, 48)
    b = make_batch(m1=2, m2=1)
    m.main_loss(b, 0)
    keys, real, fake, y2, c2 = m._made
    assert real.shape == fake.shape == (6, 3, 9, 9)  # 3 images x 2 regions; 48/200 x 1.143 of 32 px
    chosen = m._made[4][::2]
    assert torch.equal(c2, chosen.repeat_interleave(2))  # both regions of an image carry its AU and its target
    # Stubs whose outputs depend on the patch (its mean) and, for C, on the AU read (its index / 4)
    monkeypatch.setattr(m, "discriminator", Fn(lambda x: x.mean((1, 2, 3))[:, None] * 3 + 0.5))
    monkeypatch.setattr(m, "classifier", Fn(lambda x: x.mean((1, 2, 3))[:, None] + torch.arange(J) / 4))
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    bce = lambda z, t: -math.log(sig(z)) if t else -math.log(1 - sig(z))  # noqa: E731
    d_real = [3 * real[i].mean().item() + 0.5 for i in range(6)]
    d_fake = [3 * fake[i].mean().item() + 0.5 for i in range(6)]
    c_real = [real[i].mean().item() + int(c2[i]) / 4 for i in range(6)]
    out = m.discriminator_loss(b, 0)
    assert out["d"].item() == pytest.approx(np.mean([bce(r, 1) + bce(f, 0) for r, f in zip(d_real, d_fake)]), rel=1e-5)
    assert out["c"].item() == pytest.approx(np.mean([bce(c, y) for c, y in zip(c_real, y2.tolist())]), rel=1e-5)
    g = m.main_loss(b, 0)  # the same draws: the same generated patches
    _, _, fake2, _, _ = m._made
    d_gen = [3 * fake2[i].mean().item() + 0.5 for i in range(6)]
    c_gen = [fake2[i].mean().item() + int(c2[i]) / 4 for i in range(6)]
    assert g["g_adv"].item() == pytest.approx(np.mean([bce(v, 1) for v in d_gen]), rel=1e-5)
    assert g["g_cls"].item() == pytest.approx(np.mean([bce(c, y) for c, y in zip(c_gen, y2.tolist())]), rel=1e-5)
    assert g["g_rec"].item() == pytest.approx(np.mean([(fake2[i] - real[i]).abs().mean().item() for i in range(6)]),
                                              rel=1e-5)


def test_c_targets_are_known_labels_else_the_intact_images_pseudo_labels(monkeypatch):
    m = rtatl(flow=False)
    b = make_batch(m1=2, m2=2)
    b.mask[0], b.mask[1] = 1, 0
    b.targets[0], b.targets[1] = 0, 1  # image 1's label is unknown: its 1 must not be read
    logits = torch.tensor([3.0, -3.0, 3.0, 3.0])[:, None].expand(4, J)  # the intact pass says 1, 0, 1, 1
    monkeypatch.setattr(m, "recognise", lambda images, regions: (logits, None, None))
    y = m._targets_for_c(torch.cat([b.images, b.unlabelled]), None, torch.tensor([0, 1, 2, 3]), b)
    assert y.tolist() == [0.0, 0.0, 1.0, 1.0]  # image 0: its known 0 over the pass's 1; image 1: the pass's 0


def test_flow_loss_masks_images_without_flow(monkeypatch):
    m = rtatl(inpaint=False)
    b = make_batch(m1=3, m2=2)  # flow valid for labelled images 1 and 2 only
    monkeypatch.setattr(m, "flow_head", Fn(lambda last, size: torch.zeros(len(last), 2, size // 2, size // 2)))
    got = m.main_loss(b, 0)["flow"].item()
    target = torch.nn.functional.interpolate(b.flow, size=(16, 16), mode="area")
    assert got == pytest.approx(target[1:].abs().mean().item(), rel=1e-6)
    b.flow[0] += 100.0  # an image without flow: nothing changes
    b.unlabelled_flow += 100.0
    assert m.main_loss(b, 0)["flow"].item() == pytest.approx(got, rel=1e-6)


def test_each_update_moves_only_its_own_networks():
    """Both updates through the trainer's runner (SGD): the main update leaves D and C as they were, the D/C update
    leaves every recognition network as it was."""
    from test_exact import cpu_rt

    from ssau.config import OptimConfig
    from ssau.train.updates import Updates

    m = rtatl()
    groups = m.groups()
    assert {id(p) for p in groups["discriminator"].params} == {
        id(p) for p in [*m.discriminator.parameters(), *m.classifier.parameters()]}
    runner = Updates(OptimConfig(name="sgd", lr=0.5), cpu_rt(), groups,
                     {g: torch.optim.SGD(groups[g].params, lr=0.5) for g in groups}, {})
    snap = lambda g: [p.detach().clone() for p in groups[g].params]  # noqa: E731
    same = lambda a, g: all(torch.equal(x, p) for x, p in zip(a, groups[g].params))  # noqa: E731
    main, disc = m.updates(0)
    d0, m0 = snap("discriminator"), snap("model")
    batch, _ = runner.run(main, lambda: make_batch(), None, 0)
    assert same(d0, "discriminator") and not same(m0, "model")
    m1 = snap("model")
    runner.run(disc, lambda: make_batch(seed=9), batch, 0)
    assert same(m1, "model") and not same(d0, "discriminator")
    m._made = None  # no patches from this step (a resumed step): the D/C update makes them, still moving only D/C
    d1 = snap("discriminator")
    runner.run(disc, lambda: make_batch(seed=9), batch, 0)
    assert same(m1, "model") and not same(d1, "discriminator")


def test_model_pt_keeps_the_recognition_path_only():
    m = rtatl()
    state = m.inference_state()
    assert not [k for k in state if k.split(".")[0] in ("generator", "discriminator", "classifier", "flow_head")]
    assert any(k.startswith("relation.") for k in state) and any(k.startswith("heads.") for k in state)
    fresh = build_method(resolve_params({"name": "rtatl", **SMALL}), AUS, ModelConfig(backbone="tiny")).for_inference()
    fresh.load_state_dict(state)  # strict: the inference model has exactly these tensors
    fresh.eval()
    m.eval()
    img = make_batch().images
    assert torch.equal(fresh.predict(img), m.predict(img))


def test_flow_task_needs_flow_in_the_stream():
    from ssau.train.setup import load_run_config

    with pytest.raises(ConfigError, match="data.flow"):
        load_run_config(None, ["method.name=rtatl", "data.labelled=[x]"])
    assert load_run_config(None, ["method.name=rtatl", "method.flow=false", "data.labelled=[x]"])
    with pytest.raises(ConfigError, match="optim.accumulate"):  # D/C would judge patches update 1 never made
        load_run_config(None, ["method.name=rtatl", "method.flow=false", "data.labelled=[x]", "optim.accumulate=2"])


def test_a_supervised_run_warm_starts_the_backbone(tmp_path):
    from ssau.checkpoints import warm_start

    torch.manual_seed(1)
    sup = build_method(resolve_params({"name": "supervised"}), AUS, ModelConfig(backbone="tiny"))
    torch.save({"method": sup.state_dict(), "config": {}, "aus": list(AUS)}, tmp_path / "model.pt")
    m = rtatl()
    taken, _ = warm_start(m, tmp_path / "model.pt")
    assert taken == len([k for k in sup.state_dict() if k.startswith("backbone.")])
    assert torch.equal(m.backbone.body[0].weight, sup.backbone.body[0].weight)


def test_each_image_gets_its_own_landmarks_regions_and_the_template_stands_in():
    from ssau.methods.rtatl.regions import template_landmarks

    m = rtatl()
    b = make_batch(m1=3, m2=2)
    images, keys, regions = m._step_data(b)
    assert keys == b.keys + b.unlabelled_keys and len(images) == 5
    assert torch.equal(regions[:3], m.regions(b.landmarks, 3, 32, "cpu"))
    assert torch.equal(regions[3:], m.regions(b.unlabelled_landmarks, 2, 32, "cpu"))
    b.unlabelled_landmarks = None
    _, _, regions = m._step_data(b)
    assert torch.equal(regions[3:], m.regions(template_landmarks(2, 32), 2, 32, "cpu"))
    # evaluation's geometry: the stored face resized by 1.143 and centre-cropped, so the template is enlarged too
    t = template_landmarks(1, 64)[0]
    big = mean_landmarks(73, 73)
    assert torch.allclose(t, torch.from_numpy(big) - 4)


def test_train_then_eval_model_pt_and_a_step_checkpoint_alike(corpora, tmp_path, capsys):
    """A real run on shards with flow: model.pt (the recognition path) and a step checkpoint (every network) score
    the same through `ssau eval`."""
    from ssau.cli import main
    from ssau.train.commands import evaluate

    shards = corpora.bp4d_flow()
    assert main(["train", f"data.labelled=[{shards}]", "method.name=rtatl", "method.d=16", "method.heads=2",
                 "method.fused_width=8", "data.flow=true", "model.backbone=tiny", "data.image_size=32", "data.m1=4",
                 "data.m2=4", "data.label_drop=0.5", "data.workers=0", "train.steps=2", "train.checkpoint_every=2",
                 f"train.out={tmp_path}", "train.name=r", "tracking.enabled=false", "train.progress=false"]) == 0
    run = tmp_path / "r"
    model = torch.load(run / "model.pt", weights_only=True)["method"]
    assert "relation.indicators" in model and not [k for k in model if k.startswith(("generator.", "flow_head."))]
    a = evaluate(str(run / "model.pt"), [str(shards)], [1], 8, 0, "fail")
    b = evaluate(str(next((run / "checkpoints").glob("step-*.pt"))), [str(shards)], [1], 8, 0, "fail")
    assert repr(a["per_au"]) == repr(b["per_au"]) and a["f1_mean"] == b["f1_mean"]  # repr: nan where no label
    assert sum(v["n"] for v in a["per_au"].values()) > 0


def test_cost_script_counts_training_above_inference():
    from ssau.bench.rtatl_cost import model_cost

    c = model_cost(32, "tiny")
    assert c["params_train_M"] > c["params_infer_M"] > 0 and c["gflops_train"] > 2 * c["gflops_infer"] > 0
