"""The generic semi-supervised baselines (pseudo_label, fixmatch, mean_teacher) against hand-worked examples: the
per-AU confidence masks, the unsupervised losses, the EMA teacher, the augmentations' determinism and alignment."""

from __future__ import annotations

import math

import pytest
import torch

from ssau.config import ModelConfig
from ssau.data.batch import Batch
from ssau.errors import ConfigError
from ssau.methods.augment import strong, weak
from ssau.methods.base import SetupInfo
from ssau.methods.parts import frozen_bn, ramp
from ssau.methods.pseudo_targets import confident_targets
from ssau.methods.registry import build_method, resolve_params

AUS = (1, 2, 4, 6)
J = len(AUS)
P_UNLABELLED = torch.tensor([[0.97, 0.50, 0.02, 0.94],
                             [0.60, 0.99, 0.96, 0.01]], dtype=torch.float64)
LOGITS = torch.log(P_UNLABELLED / (1 - P_UNLABELLED))


def method(name: str, *extra: str, steps: int = 0):
    section = resolve_params({"name": name, **dict(e.split("=") for e in extra)})
    torch.manual_seed(0)
    m = build_method(section, AUS, ModelConfig(backbone="tiny"))
    bank = torch.ones(1, J)
    m.setup(SetupInfo(AUS, bank, bank, steps=steps, seed=3))
    return m.train()


def batch(n: int = 2, u: int = 2, size: int = 32) -> Batch:
    g = torch.Generator().manual_seed(0)
    img = lambda k: torch.randint(0, 256, (k, 3, size, size), dtype=torch.uint8, generator=g)  # noqa: E731
    return Batch(images=img(n), targets=torch.zeros(n, J), mask=torch.zeros(n, J), keys=[f"l{i}" for i in range(n)],
                 unlabelled=img(u), unlabelled_keys=[f"u{i}" for i in range(u)])


def test_confident_targets_per_au_by_hand():
    t, m = confident_targets(P_UNLABELLED, torch.full((J,), 0.95, dtype=torch.float64))
    assert t.tolist() == [[1, 0, 0, 0], [0, 1, 1, 0]]
    assert m.tolist() == [[1, 0, 1, 0], [0, 1, 1, 1]]  # 0.50, 0.94 and 0.60 are not confident either way
    t, m = confident_targets(P_UNLABELLED, torch.tensor([0.95, 0.6, 0.99, 0.9], dtype=torch.float64))
    assert m.tolist() == [[1, 0, 0, 1], [0, 1, 0, 1]]  # per AU: 0.94 >= 0.9 counts for AU6, 0.02 > 1 - 0.99 does not
    assert t.tolist() == [[1, 0, 0, 1], [0, 1, 0, 0]]


def _bce_by_hand(p_model: torch.Tensor, p_target: torch.Tensor) -> float:
    """sum over confident pairs (cutoff 0.95) of -log p(target), over all 2 x 4 pairs."""
    total = 0.0
    for pm, pt in zip(p_model.flatten().tolist(), p_target.flatten().tolist()):
        if pt >= 0.95:
            total -= math.log(pm)
        elif pt <= 0.05:
            total -= math.log(1 - pm)
    return total / p_model.numel()


def test_pseudo_label_loss_by_hand(monkeypatch):
    m = method("pseudo_label", steps=10)
    b = batch()
    monkeypatch.setattr(m, "logits", lambda x: LOGITS.clone().requires_grad_() if x.shape[0] == 2 and x is b.unlabelled
                        else torch.zeros(len(x), J, dtype=torch.float64, requires_grad=True))
    out = m.loss(b, 2)
    # -log .97 - log .98 - log .99 - log .96 - log .99 over 8 pairs; ramp 2 / (0.4 x 10) = 0.5
    assert out["unsup"].item() == pytest.approx(_bce_by_hand(P_UNLABELLED, P_UNLABELLED), rel=1e-9)
    assert out["weight"] == pytest.approx(0.5)
    assert out["bce"].item() == 0  # no label known: the supervised part is empty
    assert out["loss"].item() == pytest.approx(0.5 * out["unsup"].item(), rel=1e-9)
    assert m.step_metrics() == pytest.approx({"mask_ratio": 5 / 8, "positive_share": 3 / 5})


def test_fixmatch_masks_by_the_weak_view_and_scores_the_strong_one(monkeypatch):
    m = method("fixmatch")
    b = batch()
    strong_p = torch.tensor([[0.90, 0.20, 0.30, 0.50], [0.50, 0.80, 0.70, 0.40]], dtype=torch.float64)
    strong_logits = torch.log(strong_p / (1 - strong_p))
    monkeypatch.setattr(m, "logits", lambda x: torch.cat([torch.zeros(2, J, dtype=torch.float64), LOGITS,
                                                          strong_logits]).requires_grad_())
    out = m.loss(b, 0)
    assert out["unsup"].item() == pytest.approx(_bce_by_hand(strong_p, P_UNLABELLED), rel=1e-9)
    assert m.step_metrics() == pytest.approx({"mask_ratio": 5 / 8, "positive_share": 3 / 5})


def test_per_au_cutoffs_are_checked():
    with pytest.raises(ConfigError, match="p_cutoffs"):
        method("pseudo_label", "p_cutoffs=[0.9,0.9]")


def test_mean_teacher_ema_by_hand():
    m = method("mean_teacher", "ema=0.9")
    w = m.head.weight
    t0 = w.detach().clone()
    assert torch.equal(m.teacher.get_buffer("head__weight"), t0)  # the teacher starts as the student
    with torch.no_grad():
        w.add_(1.0)
    m.after_step(None, 0)  # decay min(1 - 1/2, 0.9) = 0.5
    t1 = 0.5 * t0 + 0.5 * (t0 + 1)
    assert torch.allclose(m.teacher.get_buffer("head__weight"), t1, atol=1e-6)
    with torch.no_grad():
        w.add_(2.0)
    m.after_step(None, 1)  # min(1 - 1/3, 0.9) = 2/3
    t2 = (2 / 3) * t1 + (1 / 3) * (t0 + 3)
    assert torch.allclose(m.teacher.get_buffer("head__weight"), t2, atol=1e-6)
    m.after_step(None, 100)  # min(1 - 1/102, 0.9) = 0.9
    assert torch.allclose(m.teacher.get_buffer("head__weight"), 0.9 * t2 + 0.1 * (t0 + 3), atol=1e-6)
    assert m.decay(10**6) == 0.9


def test_mean_teacher_consistency_and_frozen_batchnorm():
    m = method("mean_teacher", "lambda_u=2.0", "unsup_warmup=0.0")
    b = batch(n=4, u=4)
    m.eval()
    assert torch.allclose(m.teacher_logits(b.images), m.logits(b.images))  # equal networks, equal outputs
    m.train()
    stats = {k: v.clone() for k, v in m.state_dict().items() if "running" in k}
    out = m.loss(b, 0)
    labelled_only = method("mean_teacher")
    labelled_only.logits(b.images)  # the labelled forward alone moves the statistics as the loss did
    for k, v in labelled_only.state_dict().items():
        if "running" in k:
            assert torch.allclose(m.state_dict()[k], v), k
            assert not torch.equal(stats[k], v), k
    assert 0 < out["consistency"].item() < 1 and out["weight"] == 2.0
    assert out["loss"].item() == pytest.approx(out["bce"].item() + 2.0 * out["consistency"].item(), rel=1e-6)
    with frozen_bn(m):
        m.logits(b.images)
    for k, v in labelled_only.state_dict().items():
        if "running" in k:
            assert torch.allclose(m.state_dict()[k], v), k


def test_ramp_is_usbs_linear_warmup():
    assert [ramp(s, 100, 0.4) for s in (0, 20, 40, 90)] == [0.0, 0.5, 1.0, 1.0]
    assert ramp(0, 100, 0.0) == 1.0


def test_augmentations_are_drawn_per_image_key():
    b = batch(u=6)
    s = strong(b.unlabelled, b.unlabelled_keys, 3, 7)
    # the same image under the same key augments alike wherever it sits in the batch (any split over ranks)
    part = strong(b.unlabelled[3:5], b.unlabelled_keys[3:5], 3, 7)
    assert torch.equal(part, s[3:5]) and s.dtype == torch.uint8
    assert not torch.equal(strong(b.unlabelled, b.unlabelled_keys, 3, 8), s)  # another step, other draws
    w = weak(b.unlabelled, b.unlabelled_keys, 3, 7, shift=0.125)
    assert torch.equal(weak(b.unlabelled[1:2], b.unlabelled_keys[1:2], 3, 7, shift=0.125), w[1:2])


def test_strong_augmentation_keeps_the_face_where_it_was():
    """A bright vertical bar stays in its columns: no operation left in the pool moves pixels (Cutout off)."""
    img = torch.full((64, 3, 32, 32), 40, dtype=torch.uint8)
    img[:, :, :, 20:23] = 230
    out = strong(img, [f"k{i}" for i in range(64)], 0, 0, n_ops=3, cutout=0.0).float()
    profile = out.mean(dim=(1, 2))  # [N, W]
    assert (out != img.float()).flatten(1).any(1).float().mean() > 0.5  # the operations did act
    deviation = (profile - profile[:, :1]).abs()  # from the background (column 0); solarize may darken the bar
    flat = deviation.max(1).values < 1  # an image an operation made uniform
    bar = deviation.argmax(1)
    assert (((bar >= 19) & (bar <= 23)) | flat).all()  # the bar did not move (a shift or rotation would move it)
    # beyond the blur of up to three Sharpness passes (one pixel each), the background is untouched
    assert (deviation[:, :17].max(1).values < 1).all() and (deviation[:, 26:].max(1).values < 1).all()
    assert flat.float().mean() < 0.5


@pytest.fixture(scope="module")
def shards(corpora):
    return corpora.bp4d(frames=6, shard_size=4)


def test_mean_teacher_resumes_its_teacher_and_a_warm_start_starts_it_from_the_student(shards, tmp_path):
    from helpers import tiny_train

    from ssau.cli import main
    from ssau.dist.ranks import Runtime
    from ssau.train.setup import load_run_config
    from ssau.train.trainer import Trainer

    args = ["method.name=mean_teacher", "data.label_drop=0.5", "data.m2=4", "tracking.enabled=false"]
    assert main(tiny_train(shards, tmp_path, *args, "train.steps=2", "train.checkpoint_every=2", "train.name=a")) == 0
    run = tmp_path / "runs" / "a"
    saved = torch.load(run / "model.pt", weights_only=True)["method"]
    assert not torch.equal(saved["teacher.head__weight"], saved["head.weight"])  # the EMA lags the student
    cfg = lambda *extra: load_run_config(None, tiny_train(shards, tmp_path, *args, *extra)[1:])  # noqa: E731
    rt = Runtime(0, 1, torch.device("cpu"), bf16=False, channels_last=False)
    warm = Trainer(cfg("train.name=b", f"train.init_from={run / 'model.pt'}"), rt)  # teacher = the loaded student
    assert torch.equal(warm.method.teacher.get_buffer("head__weight"), saved["head.weight"])
    resumed = Trainer(cfg("train.name=a", "train.steps=3", "train.resume=auto"), rt)
    resumed._resume()  # the checkpoint's teacher, not a copy of its student
    assert torch.equal(resumed.method.teacher.get_buffer("head__weight"), saved["teacher.head__weight"])
    assert resumed.step == 2


def test_the_baselines_refuse_a_run_without_unlabelled_images(shards):
    from ssau.train.setup import load_run_config

    for name in ("pseudo_label", "mean_teacher", "fixmatch"):
        with pytest.raises(ConfigError, match="needs unlabelled images"):
            load_run_config(None, [f"data.labelled=[{shards}]", f"method.name={name}", "data.m2=4"])
    load_run_config(None, [f"data.labelled=[{shards}]", "method.name=fixmatch", "data.m2=4",
                           "data.labelled_subjects=2"])


# ---------------------------------------------------------------------------------------------------- CAP's thresholds
def _labeller(cap_queue: int = 8, pos_per: float = 1.0, neg_per: float = 1.0, prior=(0.25, 0.0)):
    from ssau.methods.pseudo_targets import PseudoTargets, ThresholdParams

    t = PseudoTargets(ThresholdParams(threshold="class_aware", cap_queue=cap_queue, pos_per=pos_per,
                                      neg_per=neg_per), (1, 2))
    bank = torch.tensor([[1.0, 0], [0, 0], [0, 0], [0, 0]]) if prior[0] else torch.zeros(4, 2)
    t.setup(bank, torch.ones_like(bank))
    assert t.prior.tolist() == list(prior)
    return t


CAP_P = torch.tensor([[0.10, 0.9], [0.20, 0.8], [0.30, 0.1], [0.90, 0.2]])


def test_class_aware_thresholds_keep_the_labels_positive_rate_by_hand():
    # AU1: pi = 1/4, the queue's 4 rows sorted 0.1 0.2 0.3 0.9; q = 1 - 1/4 -> index floor(4 x 0.75) = 3 -> 0.9:
    # only the top quarter is labelled 1. AU2: no known positive -> never 1. CAP's defaults: every pair counts.
    targets, mask = _labeller()(CAP_P)
    assert targets.tolist() == [[0, 0], [0, 0], [0, 0], [1, 0]]
    assert mask.tolist() == [[1, 1]] * 4
    # pos_per = neg_per = 1/2: positives count above q(1 - 1/8) -> index 3 (0.9), negatives below q(3/8) -> index 1
    # (AU1: 0.2; AU2, pi 0: q(1/2) -> index 2 -> 0.8): the pairs between are masked.
    targets, mask = _labeller(pos_per=0.5, neg_per=0.5)(CAP_P)
    assert targets[:, 0].tolist() == [0, 0, 0, 1]
    assert mask.tolist() == [[1, 0], [1, 1], [0, 1], [1, 1]]


def test_class_aware_queue_keeps_the_newest_rows_and_is_checkpointed():
    t = _labeller(cap_queue=3)
    t(CAP_P[:2])
    assert int(t.filled) == 2 and int(t.head) == 2
    t(CAP_P[2:])  # rows 3 and 4: row 4 overwrites row 1, the oldest
    assert int(t.filled) == 3 and int(t.head) == 1
    assert sorted(t.rows[:, 0].tolist()) == pytest.approx([0.2, 0.3, 0.9])
    state = t.state_dict()
    assert {"rows", "filled", "head"} <= set(state) and "prior" not in state  # the prior comes from the label bank
    again = _labeller(cap_queue=3)
    again.load_state_dict(state)
    probe = torch.tensor([[0.25, 0.5], [0.35, 0.5]])
    assert torch.equal(again(probe)[0], t(probe)[0])


def test_class_aware_rule_is_checked():
    with pytest.raises(ConfigError, match="threshold"):
        method("fixmatch", "threshold=median")
    with pytest.raises(ConfigError, match="cap_queue"):
        method("pseudo_label", "threshold=class_aware", "cap_queue=0")
