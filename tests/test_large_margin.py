"""Method `large_margin` (Racoviteanu et al., Eq. 1-7): pseudo-emotions, the large-margin and centre losses with
their gradients against hand computations, centroids over real ranks, the balance rule, the expression task's
metrics and evaluation, intensity targets, and what a run logs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from corpora import jpeg_bytes, shard_bp4d, shard_rafdb
from nets import PixelNet
from ranks import run_ranks
from torch import nn

from ssau.aus import EXPRESSIONS, STANDARD_AUS
from ssau.config import ModelConfig
from ssau.data.batch import Batch
from ssau.data.decode import check_meta
from ssau.data.sources import SourceConfig, StreamConfig
from ssau.data.stream import TrainStream
from ssau.errors import ConfigError, DecodeError
from ssau.methods.large_margin import LargeMargin, LargeMarginParams, margin_terms, prototype_matrix, pseudo_classes
from ssau.metrics import expression_metrics
from ssau.train.setup import load_run_config

BP4D = STANDARD_AUS["bp4d"]
S = 8


# ---------------------------------------------------------------------------------------------------- pseudo-emotions
def test_prototypes_the_bp4d_list_expresses_and_their_normalisation():
    names, w = prototype_matrix(BP4D, 0.5, neutral=False)
    # disgust (9, 15, 16) has only AU15 in BP4D's list: below half coverage, left out; contempt is not in the table
    assert names == ("surprise", "fear", "happiness", "sadness", "anger")  # in EXPRESSIONS order
    col = {au: j for j, au in enumerate(BP4D)}
    fear = w[names.index("fear")]
    assert torch.allclose(fear[[col[1], col[2], col[4], col[7]]], torch.full((4,), 0.25))  # 4 of 7 AUs held
    assert fear.sum() == pytest.approx(1.0) and w[names.index("happiness")][col[12]] == 0.5
    names_all, _ = prototype_matrix(BP4D, 0.3, neutral=True)
    assert "disgust" in names_all and names_all[-1] == "neutral"


def test_pseudo_classes_on_hand_made_predictions():
    names, w = prototype_matrix(BP4D, 0.5, neutral=True)
    col = {au: j for j, au in enumerate(BP4D)}

    def face(**aus):
        a = torch.full((len(BP4D),), 0.05)
        for au, v in aus.items():
            a[col[int(au[2:])]] = v
        return a

    a = torch.stack([face(AU6=0.9, AU12=0.8),  # happiness: (0.9 + 0.8) / 2
                     face(AU1=0.9, AU4=0.8, AU15=0.7),  # sadness: 0.8, beats fear's (0.9 + .05 + .8 + .05) / 4
                     face(AU1=0.9, AU2=0.9),  # surprise (1, 2 of 1, 2, 5, 26 held): 0.9; fear: (.9+.9+.05+.05)/4
                     face(AU4=0.9, AU7=0.9, AU23=0.9),  # anger: 0.9 over (4, 7, 23)
                     face()])  # nothing active: neutral scores 1 - 0.05
    got = [names[k] for k in pseudo_classes(a, w, neutral=True)]
    assert got == ["happiness", "sadness", "surprise", "anger", "neutral"]
    names6, w6 = prototype_matrix(BP4D, 0.5, neutral=False)
    assert "neutral" not in [names6[k] for k in pseudo_classes(a, w6, neutral=False)]


def test_an_au_list_expressing_fewer_than_two_prototypes_is_refused():
    with pytest.raises(ConfigError, match="expresses 1 EMFACS prototype"):
        LargeMargin(LargeMarginParams(), (6, 12), ModelConfig(backbone="tiny"))


# ---------------------------------------------------------------------------------------------------- losses
C3 = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]], dtype=torch.float64)  # raw centroids (norms 1, 2, 3)


def hand_large_margin(x: np.ndarray, j: int, cents: np.ndarray, seen: list[int], squared: bool):
    """Eq. 3 for one sample and its gradient in x, written out: the distance's gradient in x^ times the exact
    Jacobian of the normalisation (I - x^ x^T) / ||x|| (Eq. 5 with its chain rule)."""
    n = np.linalg.norm(x)
    xh = x / n
    ch = [c / np.linalg.norm(c) for c in cents]
    d = lambda k: np.sum((xh - ch[k]) ** 2) if squared else np.linalg.norm(xh - ch[k])  # noqa: E731
    g = lambda k: 2 * (xh - ch[k]) if squared else (xh - ch[k]) / np.linalg.norm(xh - ch[k])  # noqa: E731
    others = [k for k in seen if k != j]
    value = d(j) - sum(d(k) for k in others) / len(others)
    grad_hat = g(j) - sum(g(k) for k in others) / len(others)
    jac = (np.eye(len(x)) - np.outer(xh, xh)) / n
    return value, jac @ grad_hat


@pytest.mark.parametrize("squared", [False, True])
def test_large_margin_loss_and_gradient_against_a_hand_computation(squared):
    x = torch.tensor([[2.0, 2.0], [0.5, -1.0]], dtype=torch.float64, requires_grad=True)
    classes = torch.tensor([0, 2])
    terms, valid = margin_terms(x, classes, C3, torch.tensor([True, True, True]), "large", squared)
    assert valid.all()
    terms.sum().backward()
    for i in range(2):
        v, g = hand_large_margin(x[i].detach().numpy(), int(classes[i]), C3.numpy(), [0, 1, 2], squared)
        assert terms[i].item() == pytest.approx(v, abs=1e-12)
        assert np.allclose(x.grad[i].numpy(), g, atol=1e-12)
    if not squared:  # the worked value: x^ = (1, 1)/sqrt 2 against c^ = (1, 0), (0, 1), (-1, 0)
        want = math.sqrt(2 - math.sqrt(2)) - (math.sqrt(2 - math.sqrt(2)) + math.sqrt(2 + math.sqrt(2))) / 2
        assert terms[0].item() == pytest.approx(want, abs=1e-12)
    # normalised: the loss does not see the embedding's scale, and its gradient is orthogonal to x
    t2, _ = margin_terms(10 * x.detach(), classes, C3, torch.tensor([True, True, True]), "large", squared)
    assert torch.allclose(t2, terms.detach())
    assert abs(float(x.grad[0] @ x.detach()[0])) < 1e-12


def test_centre_loss_variant_on_raw_embeddings():
    x = torch.tensor([[2.0, 2.0]], dtype=torch.float64, requires_grad=True)
    terms, _ = margin_terms(x, torch.tensor([0]), C3, torch.tensor([True, True, True]), "center")
    assert terms.item() == pytest.approx(math.sqrt(5))  # ||(2, 2) - (1, 0)||, Eq. 1
    terms.sum().backward()
    assert torch.allclose(x.grad, torch.tensor([[1.0, 2.0]], dtype=torch.float64) / math.sqrt(5))


def test_unseen_classes_are_left_out():
    x = torch.tensor([[2.0, 2.0], [1.0, 3.0]], dtype=torch.float64, requires_grad=True)
    seen = torch.tensor([True, False, True])
    terms, valid = margin_terms(x, torch.tensor([0, 1]), C3, seen, "large")
    assert valid.tolist() == [True, False] and terms[1] == 0
    v, _ = hand_large_margin(x[0].detach().numpy(), 0, C3.numpy(), [0, 2], squared=False)  # pushed from class 2 only
    assert terms[0].item() == pytest.approx(v, abs=1e-12)
    terms.sum().backward()
    assert not x.grad[1].any()  # a sample of an unseen class gets no gradient from L_M
    lonely, _ = margin_terms(x.detach(), torch.tensor([0, 0]), C3, torch.tensor([True, False, False]), "large")
    xh = x.detach()[0] / x.detach()[0].norm()
    assert lonely[0].item() == pytest.approx(float((xh - torch.tensor([1.0, 0.0], dtype=torch.float64)).norm()))


# ---------------------------------------------------------------------------------------------------- centroids
def tiny(seed: int = 0, **params) -> LargeMargin:
    torch.manual_seed(seed)
    m = LargeMargin(LargeMarginParams(embedding=3, **params), BP4D, ModelConfig(backbone="tiny"))
    m.backbone, m.embed = PixelNet(S), nn.Linear(5, 3)
    return m.double()


def global_batch(seed: int, n: int = 8) -> Batch:
    g = torch.Generator().manual_seed(seed)
    img = lambda k: torch.randint(0, 256, (k, 3, S, S), dtype=torch.uint8, generator=g)  # noqa: E731
    mask = (torch.rand(n, len(BP4D), generator=g) < 0.8).double()
    return Batch(images=img(n), targets=(torch.rand(n, len(BP4D), generator=g) < 0.4).double() * mask, mask=mask,
                 keys=[f"a{i}" for i in range(n)], unlabelled=img(n))


def part(b: Batch, rank: int, world: int) -> Batch:
    cut = lambda t: t[rank * len(t) // world:(rank + 1) * len(t) // world]  # noqa: E731
    return Batch(images=cut(b.images), targets=cut(b.targets), mask=cut(b.mask), keys=cut(b.keys),
                 unlabelled=cut(b.unlabelled))


def centroid_steps(m: LargeMargin, rank: int = 0, world: int = 1, steps: int = 3) -> dict:
    out = {"lambda": []}
    for step in range(steps):
        b = part(global_batch(step), rank, world)
        m.loss(b, step)
        with torch.no_grad():
            m.after_step(b, step)
        out["lambda"].append(m.lambda_m(step + 1))
    out |= {"centroids": m.centroids.numpy().copy(), "counts": m.counts.numpy().copy(),
            "lambda_auto": float(m.lambda_auto), "shift": m.step_metrics()["shift"]}
    return out


def _rank_centroids(rank: int, world: int, update: str) -> dict:
    import torch.distributed as dist

    assert dist.get_world_size() == world == 2
    return centroid_steps(tiny(centroid_update=update, balance="auto", balance_steps=2), rank, world)


@pytest.mark.parametrize("update", ["running", "cumulative"])
def test_centroids_from_two_ranks_equal_one_process_holding_both_batches(update):
    single = centroid_steps(tiny(centroid_update=update, balance="auto", balance_steps=2))
    assert single["counts"].sum() == 3 * 16 and (single["counts"] > 0).sum() >= 2
    assert single["lambda_auto"] > 0 and single["lambda"][-1] == single["lambda_auto"] != 1.0  # measured, then fixed
    r0, r1 = run_ranks(_rank_centroids, 2, update)
    assert np.array_equal(r0["centroids"], r1["centroids"]) and r0["lambda_auto"] == r1["lambda_auto"]
    for r in (r0, r1):
        assert np.allclose(r["centroids"], single["centroids"], atol=1e-9)
        assert np.array_equal(r["counts"], single["counts"])
        assert r["lambda_auto"] == pytest.approx(single["lambda_auto"], rel=1e-9)
        assert r["shift"] == pytest.approx(single["shift"], rel=1e-9)


def test_running_and_cumulative_updates_by_hand():
    m = tiny(centroid_update="cumulative")
    b0, b1 = global_batch(0), global_batch(1)  # two different batches: the second moves what the first set
    m.loss(b0, 0)
    x, cls = m._stash[0]
    m.after_step(b0, 0)
    for c in cls.unique():
        assert torch.allclose(m.centroids[c], x[cls == c].mean(0))  # a class's first batch sets its centroid
    m.loss(b1, 1)
    x2, cls2 = m._stash[0]
    m.after_step(b1, 1)
    again = [int(c) for c in cls2.unique() if (cls == c).any()]
    assert again  # a class in both batches
    for c in again:
        both = torch.cat([x[cls == c], x2[cls2 == c]])
        assert torch.allclose(m.centroids[c], both.mean(0))
        assert not torch.allclose(m.centroids[c], x[cls == c].mean(0))
    r = tiny(centroid_rate=0.25)
    r.loss(b0, 0)
    r.after_step(b0, 0)
    before = r.centroids.clone()
    r.loss(b1, 1)
    x2, cls2 = r._stash[0]
    r.after_step(b1, 1)
    for c in again:
        assert torch.allclose(r.centroids[c], 0.75 * before[c] + 0.25 * x2[cls2 == c].mean(0))
        assert not torch.allclose(r.centroids[c], before[c])


def test_balance_rule_and_decay():
    m = tiny(balance="auto", balance_steps=2, balance_ratio=0.8, lambda_s=2.0)
    seen = []
    for step in range(6):
        defined = int((m.counts > 0).sum()) >= 2  # L_M measured only with two seen classes (a push term)
        out = m.loss(global_batch(step), step)
        seen.append((out["supervised"].item(), out["margin_abs"].item(), m.lambda_m(step), defined,
                     out["margin"].item(), out["loss"].item()))
        m.after_step(global_batch(step), step)
    measured = [v for v in seen if v[3]][:2]
    assert len(measured) == 2 and not seen[0][3]
    last = max(i for i, v in enumerate(seen) if v in measured)
    s = sum(v[0] for v in measured) / 2
    mm = sum(v[1] for v in measured) / 2  # the mean per-sample |term|, not |mean L_M|
    assert all(v[1] >= abs(v[4]) - 1e-12 for v in measured) and mm > 0
    assert all(v[2] == 0.0 for v in seen[:last + 1])  # lambda_4 = 0 while it is measured: L_S alone trains
    assert all(v[5] == 2.0 * v[0] for v in seen[:last + 1]) and any(v[4] != 0 for v in measured)
    assert seen[-1][5] == pytest.approx(2.0 * seen[-1][0] + float(m.lambda_auto) * seen[-1][4], rel=1e-12)
    assert float(m.lambda_auto) == pytest.approx(2.0 * s / (0.8 * mm), rel=1e-9) == seen[last + 1][2]
    capped = tiny(balance="auto", balance_steps=1, balance_max=1e-3)
    centroid_steps(capped)
    assert float(capped.lambda_auto) == 1e-3
    d = tiny(balance="fixed", lambda_m=3.0, decay_steps=10)
    assert [d.lambda_m(t) for t in (0, 5, 10, 20)] == [3.0, 1.5, 0.0, 0.0]


def test_a_non_finite_step_in_the_balance_window_is_not_measured():
    m = tiny(balance="auto", balance_steps=2)
    m._balance([torch.tensor([float("nan"), 1.0], dtype=torch.float64)], defined=True)
    m._balance([torch.tensor([0.5, float("inf")], dtype=torch.float64)], defined=True)
    assert m.balance_sums.tolist() == [0.0, 0.0, 0.0] and not m.balanced()
    m._balance([torch.tensor([0.5, 0.25], dtype=torch.float64)], defined=True)
    m._balance([torch.tensor([0.5, 0.25], dtype=torch.float64)], defined=False)  # one class seen: not measured
    m._balance([torch.tensor([0.3, 0.05], dtype=torch.float64)], defined=True)
    assert m.balanced() and float(m.lambda_auto) == pytest.approx(0.4 / (0.8 * 0.15))


def test_centroids_and_balance_survive_a_checkpoint():
    m = tiny(balance="auto", balance_steps=1)
    centroid_steps(m)
    fresh = tiny(seed=3, balance="auto", balance_steps=1)
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh.centroids, m.centroids) and torch.equal(fresh.counts, m.counts)
    assert float(fresh.lambda_auto) == float(m.lambda_auto) > 0


# ---------------------------------------------------------------------------------------------------- expression task
def test_expression_accuracy_and_mean_class_accuracy_worked_example():
    labels = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 0, 2])
    m = expression_metrics(np.eye(7)[pred], labels, EXPRESSIONS)
    assert m["acc"] == pytest.approx(4 / 6)
    assert m["mean_class_acc"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)  # classes without images left out
    assert m["per_class"]["surprise"] == {"acc": pytest.approx(2 / 3), "n": 3}
    assert math.isnan(m["per_class"]["neutral"]["acc"]) and m["per_class"]["neutral"]["n"] == 0
    assert m["confusion"][0].tolist() == [2, 1, 0, 0, 0, 0, 0] and m["confusion"].sum() == 6


def test_expression_task_needs_an_expression_corpus(tmp_path):
    with pytest.raises(ConfigError, match="data.expression"):
        load_run_config(None, ["data.labelled=[x]", "method.name=large_margin", "method.task=expression"])


# ---------------------------------------------------------------------------------------------------- intensity
def test_intensity_reaches_the_batch_and_crafted_intensities_are_refused(tmp_path):
    from ssau.cli import main

    aus = STANDARD_AUS["disfa"]
    frames = tmp_path / "frames"
    for sn in ("SN001", "SN002"):
        (tmp_path / "ActionUnit_Labels" / sn).mkdir(parents=True)
        for au in aus:
            (tmp_path / "ActionUnit_Labels" / sn / f"{sn}_au{au}.txt").write_text(
                "".join(f"{f},{(f + au) % 6}\n" for f in range(1, 5)))
        (frames / sn).mkdir(parents=True)
        for f in range(1, 5):
            (frames / sn / f"{f:05d}.jpg").write_bytes(jpeg_bytes(f))
    out = tmp_path / "disfa"
    assert main(["shard", "disfa", "--images", str(frames), "--labels", str(tmp_path / "ActionUnit_Labels"),
                 "--out", str(out), "--frame-template", "{subject}/{frame:05d}.jpg", "--quiet"]) == 0
    stream = TrainStream(StreamConfig(labelled=SourceConfig((str(out),)), m1=8, image_size=32, workers=0,
                                      shuffle_buffer=1))
    batch = next(iter(stream))
    for key, v, m in zip(batch.keys, batch.intensity, batch.intensity_mask):
        frame = int(key.rsplit("_", 1)[1])
        assert v.tolist() == [float((frame + au) % 6) for au in aus] and m.all()
    bp4d = shard_bp4d(tmp_path / "b")  # occurrence-only labels: no intensity known
    b = next(iter(TrainStream(StreamConfig(labelled=SourceConfig((str(bp4d),)), m1=4, image_size=32, workers=0))))
    assert not b.intensity_mask.any() and b.mask.any()
    meta = {"aus": [1, 2], "occurrence": [1, 0], "mask": [1, 1]}
    check_meta(meta | {"intensity": [3.0, -1.0]})
    for bad in (["3", 0], [3.0], [9.0, 0.0], [True, 0], [float("nan"), 0]):
        with pytest.raises(DecodeError, match="intensity"):
            check_meta(meta | {"intensity": bad}, "k")


def test_intensity_target_regresses_intensity_and_predicts_at_the_active_threshold():
    m = tiny(target="intensity", intensity_active=2.0)
    b = global_batch(0)
    b.intensity = torch.full_like(b.targets, 5.0)
    b.intensity_mask = torch.zeros_like(b.targets)
    b.intensity_mask[0, 0] = 1.0
    with torch.no_grad():
        z = m(b.images[:1])[1][0, 0].double()
    assert m._supervised_au(m(b.images)[1], b).item() == pytest.approx(float((torch.sigmoid(z) - 1.0) ** 2))
    m.head = nn.Linear(3, len(BP4D)).double()
    nn.init.zeros_(m.head.weight)
    for v, want in ((2.0, 0.5), (5.0, 1.0), (1.0, 0.25), (3.5, 0.75)):
        nn.init.constant_(m.head.bias, math.log(v / 5 / (1 - v / 5 + 1e-12)) if v < 5 else 40.0)
        assert m.predict(b.images[:1])[0, 0].item() == pytest.approx(want, abs=1e-6)


# ---------------------------------------------------------------------------------------------------- runs
def _args(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return [f"data.labelled=[{tmp_path.parent / 'bp4d'}]", "model.backbone=tiny", "data.image_size=32",
            "data.m1=4", "data.m2=4", "data.workers=0", "data.eval_batch=8", "train.steps=5",
            f"train.out={tmp_path}", f"train.name={name}", "train.progress=false", "train.log_every=1",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "method.name=large_margin",
            "method.balance_steps=2", *extra]


def _train(tmp_path: Path, name: str, *extra: str) -> Path:
    from ssau.train.commands import train

    train(None, _args(tmp_path, name, *extra))
    return tmp_path / name


@pytest.fixture(scope="module")
def local_corpora(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lm")
    shard_bp4d(root, shard_size=3)
    shard_rafdb(root, shard_size=4)
    (root / "runs").mkdir()
    return root / "runs"


def _client(runs: Path):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")
    return c, c.search_runs([c.get_experiment_by_name("ssau").experiment_id], order_by=["attributes.start_time DESC"])


def test_au_run_logs_centroid_counts_shift_and_the_convergence_plot(local_corpora):
    run = _train(local_corpora, "au", "data.label_drop=0.5", "method.balance=auto")
    client, runs = _client(local_corpora)
    rid = runs[0].info.run_id
    shift = client.get_metric_history(rid, "train/state/shift")
    assert [m.step for m in shift] == [1, 2, 3, 4, 5] and shift[0].value == 0 and shift[-1].value > 0
    names = LargeMargin(LargeMarginParams(), BP4D, ModelConfig(backbone="tiny")).classes
    counts = [client.get_metric_history(rid, f"train/state/count/{n}")[0].value for n in names]
    assert sum(counts) == 8  # step 1: every image of the batch (4 labelled + 4 unlabelled) in one pseudo-class
    table = (run / "eval" / "step-0000005" / "centroids.csv").read_text().splitlines()
    assert table[0] == "step,group,count,shift,norm" and len(table) == 1 + 5 * len(names)
    png = run / "eval" / "step-0000005" / "centroids.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    arts = {a.path for a in client.list_artifacts(rid, "eval/step-0000005")}
    assert {"eval/step-0000005/centroids.csv", "eval/step-0000005/centroids.png"} <= arts
    lam = [m.value for m in client.get_metric_history(rid, "train/large_margin/lambda_m")]
    k = next(i for i, v in enumerate(lam) if v != 0.0)  # measured over 2 steps after the first centroids, at 0
    assert k in (3, 4) and all(v == lam[k] for v in lam[k:]) and all(v == 0.0 for v in lam[:k])
    state = torch.load(run / "model.pt", weights_only=True)["method"]
    assert state["counts"].sum() == 5 * 8 and float(state["lambda_auto"]) == pytest.approx(lam[-1])
    assert "val/f1_mean" in runs[0].data.metrics


def test_expression_variant_trains_on_the_train_split_and_scores_the_test_split(local_corpora):
    raf = local_corpora.parent / "rafdb"
    run = _train(local_corpora, "fer", f"data.expression=[{raf}]", "data.m_expr=4", "method.task=expression")
    client, runs = _client(local_corpora)
    m = runs[0].data.metrics
    assert "val/f1_mean" not in m  # no AU output
    rows = (run / "eval" / "per_expression.csv").read_text().splitlines()
    per = {r.split(",")[0]: r.split(",") for r in rows[1:]}
    doc = json.loads((raf / "dataset.json").read_text())
    n_test = sum(s["samples"] for s in doc["shards"] if s["split"] == "test")
    assert sum(int(v[2]) for v in per.values()) == n_test == m["val/expr_samples_scored"]
    right = sum(float(v[1]) * int(v[2]) for v in per.values() if v[1])
    assert m["val/expr_acc"] == pytest.approx(right / n_test, abs=1e-6)
    present = [float(v[1]) for v in per.values() if int(v[2])]
    assert m["val/expr_mean_class_acc"] == pytest.approx(sum(present) / len(present), abs=1e-6)
    assert {a.path for a in client.list_artifacts(runs[0].info.run_id)} >= {"confusion.png", "per_expression.csv"}


def test_tools_that_score_au_refuse_the_expression_task_in_one_line(local_corpora, capsys):
    from ssau.cli import main

    raf, bp4d = local_corpora.parent / "rafdb", local_corpora.parent / "bp4d"
    args = [f"data.labelled=[{bp4d}]", f"data.expression=[{raf}]", "method.name=large_margin", "method.task=expression"]
    assert main(["cv", *args]) == 2
    assert main(["compare", "--methods", "supervised,large_margin", "--seeds", "0", "--label-drop", "0", *args[:2],
                 "large_margin.task=expression"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ssau: error")]
    assert len(errors) == 2 and "scored on expressions" in errors[0] and "scored on expressions" in errors[1]
    fer = local_corpora / "fer" / "model.pt"
    if not fer.is_file():  # the expression run above leaves it; run alone, train one
        _train(local_corpora, "fer", f"data.expression=[{raf}]", "data.m_expr=4", "method.task=expression")
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(fer), "--shards", str(bp4d)]) == 2
    assert "has no AU output" in capsys.readouterr().err
    no_test = local_corpora.parent / "rafdb-train-only"
    no_test.mkdir(exist_ok=True)
    doc = json.loads((raf / "dataset.json").read_text())
    doc["shards"] = [s for s in doc["shards"] if s["split"] != "test"]
    (no_test / "dataset.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="no test split"):
        load_run_config(None, [f"data.labelled=[{bp4d}]", f"data.expression=[{no_test}]", "method.name=large_margin",
                           "method.task=expression"])


def test_the_expression_training_stream_never_reads_the_test_split(local_corpora):
    raf = local_corpora.parent / "rafdb"
    cfg = StreamConfig(labelled=SourceConfig((str(local_corpora.parent / "bp4d"),)),
                       expression=SourceConfig((str(raf),), exclude_split="test"), m1=2, m_expr=4, image_size=32,
                       workers=0)
    cfg_run = load_run_config(None, [f"data.labelled=[{local_corpora.parent / 'bp4d'}]", f"data.expression=[{raf}]"])
    from ssau.data.sources import stream_config

    assert stream_config(cfg_run, BP4D).expression.exclude_split == "test"  # what a run streams
    it = iter(TrainStream(cfg))
    keys = {k for _ in range(12) for k in next(it).expr_keys}
    assert keys and all(k.startswith("train") for k in keys), keys


# ---------------------------------------------------------------------------------------------------- warm start
def test_a_run_started_from_a_lambda_0_checkpoint_resumes_its_centroids(local_corpora):
    from ssau.data.stream import TrainStream
    from ssau.train.trainer import Trainer

    run = _train(local_corpora, "lm0", "method.lambda_m=0", "tracking.enabled=false", "data.fold=0")
    ckpt = torch.load(run / "model.pt", weights_only=True)["method"]
    assert ckpt["counts"].sum() == 5 * 4 and ckpt["centroids"].abs().sum() > 0  # 4 labelled images a step
    for lam in ("0.05", "0"):
        t = Trainer(load_run_config(None, _args(local_corpora, f"from-lm0-{lam}", f"train.init_from={run / 'model.pt'}",
                                                f"method.lambda_m={lam}", "tracking.enabled=false",
                                                "data.fold=0")))
        m = t.method
        assert torch.equal(m.centroids, ckpt["centroids"]) and torch.equal(m.counts, ckpt["counts"])
        _, parts = t.train_step(iter(TrainStream(t.stream_cfg, 0, 1, t.trainset)))
        # Step 1's L_M already ran against the loaded centroids: samples of seen classes count (none in a fresh run).
        assert parts["train/large_margin/valid"] > 0 and parts["train/large_margin/margin"] != 0
        assert parts["train/large_margin/lambda_m"] == float(lam)
        assert m.counts.sum() == ckpt["counts"].sum() + 4  # counted on from the checkpoint's
    fresh = Trainer(load_run_config(None, _args(local_corpora, "fresh", "tracking.enabled=false", "data.fold=0")))
    assert fresh.method.counts.sum() == 0
    _, parts = fresh.train_step(iter(TrainStream(fresh.stream_cfg, 0, 1, fresh.trainset)))
    assert parts["train/large_margin/valid"] == 0 and parts["train/large_margin/margin"] == 0
    # A run measures its own balance: setup clears a warm start's measurement, keeps its centroids.
    measured = tiny(balance="auto", balance_steps=1)
    centroid_steps(measured)
    other = tiny(seed=3, balance="auto", balance_steps=1)
    other.load_state_dict(measured.state_dict())
    other.setup(None)
    assert float(measured.lambda_auto) > 0 and float(other.lambda_auto) == 0 and not other.balance_sums.any()
    assert torch.equal(other.centroids, measured.centroids) and not other.balanced()


# ---------------------------------------------------------------------------------------------------- collapse
def test_largest_share_is_the_global_batch_share_of_the_largest_pseudo_class():
    m = tiny()
    b = global_batch(0)
    m.loss(b, 0)
    cls = m._stash[0][1]
    m.after_step(b, 0)
    counts = torch.bincount(cls, minlength=len(m.classes)).double()
    assert m.step_metrics()["largest_share"] == pytest.approx(float(counts.max() / counts.sum()), rel=1e-12)
    assert [m.step_metrics()[f"count/{c}"] for c in m.classes] == counts.tolist()


def test_the_collapse_warning_fires_once_on_a_collapsed_run_and_not_on_a_healthy_one(local_corpora, monkeypatch,
                                                                                     capsys):
    import ssau.methods.large_margin as lm

    def run_of(name: str):
        client, runs = _client(local_corpora)
        (r,) = [r for r in runs if r.data.tags["run_dir"].endswith(f"/{name}")]
        return r, {m.step: m.value for m in client.get_metric_history(r.info.run_id, "train/state/largest_share")}

    capsys.readouterr()
    monkeypatch.setattr(lm, "pseudo_classes", lambda a, w, neutral: torch.zeros(len(a), dtype=torch.long))
    _train(local_corpora, "collapsed", "data.fold=0", "train.collapse_window=3")  # every image in one class
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("collapse warning")]
    assert lines == [("collapse warning: large_margin's train/state/largest_share averages 1.000 over the 3 steps "
                      "to step 3, above train.collapse_share 0.6")], err[-2000:]  # once the window is full, once
    r, share = run_of("collapsed")
    assert share == {s: 1.0 for s in range(1, 6)}
    assert r.data.tags["collapse_warning"] == "largest_share=1.000 over steps 1-3"
    # Healthy: images dealt round the 5 classes (4 labelled images a step: 1, 1, 1, 1, 0), a largest share of 0.25.
    monkeypatch.setattr(lm, "pseudo_classes", lambda a, w, neutral: torch.arange(len(a)) % len(w))
    _train(local_corpora, "healthy", "data.fold=0", "train.collapse_window=3")
    assert "collapse warning" not in capsys.readouterr().err
    r, share = run_of("healthy")
    assert share == {s: 0.25 for s in range(1, 6)} and "collapse_warning" not in r.data.tags
    # The limit is "above": a share of exactly train.collapse_share=1.0 does not warn.
    monkeypatch.setattr(lm, "pseudo_classes", lambda a, w, neutral: torch.zeros(len(a), dtype=torch.long))
    _train(local_corpora, "at-limit", "data.fold=0", "train.collapse_share=1.0", "train.collapse_window=2")
    assert "collapse warning" not in capsys.readouterr().err
    assert "collapse_warning" not in run_of("at-limit")[0].data.tags


def test_collapse_share_must_be_a_share():
    for bad in ("0", "1.5", "-0.1"):
        with pytest.raises(ConfigError, match="train.collapse_share"):
            load_run_config(None, ["data.labelled=[x]", f"train.collapse_share={bad}"])
    assert load_run_config(None, ["data.labelled=[x]"]).train.collapse_share == 0.6


def test_the_collapse_monitor_judges_a_window_not_a_step():
    """A healthy but noisy share (mean 0.45, single steps above 0.6) and an untrained start (the first steps all in
    one class) stay silent; a share that stays high warns once, when the window's mean passes the limit."""
    import random

    from ssau.train.monitor import CollapseMonitor

    rng = random.Random(0)
    noisy = CollapseMonitor(0.6, 50, "large_margin", main=False)
    shares = [1.0] * 5 + [min(1.0, max(0.0, rng.gauss(0.45, 0.09))) for _ in range(995)]
    assert max(shares[5:]) > 0.6  # single steps do cross the limit
    assert [noisy.check({"largest_share": s}, i + 1) for i, s in enumerate(shares)] == [None] * 1000
    collapsing = CollapseMonitor(0.6, 50, "large_margin", main=False)
    fired = [(i, w) for i, s in enumerate([0.4] * 100 + [0.9] * 100) if (w := collapsing.check({"largest_share": s},
                                                                                             i + 1))]
    assert len(fired) == 1 and fired[0][0] in (119, 120) and fired[0][1][1] > 0.6  # 21 steps of 0.9: mean 0.61
