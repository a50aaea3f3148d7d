"""The label-distribution metrics of paper 000 (Sec. 4.2.2, Fig. 5-6) against hand-worked matrices, and the eval
artifacts that show them (ssau/metrics.py, ssau/tracking/naming.py eval_metric_dict, ssau/tracking/artifacts.py)."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from ssau.metrics import au_metrics, conditional_matrix, format_table
from ssau.tracking.artifacts import eval_artifacts
from ssau.tracking.naming import eval_metric_dict

AUS = (1, 2, 4)  # a, b, c below
NAMES = ["AU01", "AU02", "AU04"]
# Six samples. AU04 (c) is never predicted. AU02 (b) is on in truth only where AU01 (a) is unknown (s2, s3), so
# P_gt(a|b) is undefined on the pair's samples although AU02 does occur.
#                 truth a b c      mask a b c      pred a b c
Y = np.array([[1, 0, 1], [1, 0, 0], [0, 1, 0], [0, 1, 1], [0, 0, 1], [1, 0, 0]])
MASK = np.array([[1, 1, 1], [1, 1, 1], [0, 1, 1], [0, 1, 1], [1, 1, 1], [1, 1, 0]])
PRED = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0], [0, 1, 0]])
PROBS = np.where(PRED == 1, 0.9, 0.1)
# By hand, P(i|j) over the samples where both i and j are known:
#   (a, b): s0 s1 s4 s5. truth: b never on -> P_gt(a|b) undefined -> 0; a on s0 s1 s5, b on none -> P_gt(b|a) = 0
#           pred: a on s0 s1, b on s0 s5 -> P_pred(a|b) = 1/2, P_pred(b|a) = 1/2
#   (a, c): s0 s1 s4. truth: a on s0 s1, c on s0 s4 -> P_gt(a|c) = 1/2, P_gt(c|a) = 1/2
#           pred: c never on -> P_pred(a|c) undefined -> 0; P_pred(c|a) = 0/2
#   (b, c): s0..s4. truth: b on s2 s3, c on s0 s3 s4 -> P_gt(b|c) = 1/3, P_gt(c|b) = 1/2
#           pred: c never on -> P_pred(b|c) undefined -> 0; b on s0 s2 s3 -> P_pred(c|b) = 0/3
# rows i, columns j (given):
TRUE = np.array([[1, 0, 1 / 2], [0, 1, 1 / 3], [1 / 2, 1 / 2, 1]])
PREDICTED = np.array([[1, 1 / 2, 0], [1 / 2, 1, 0], [0, 0, 1]])
GAPS = np.array([[0, 1 / 2, 1 / 2], [1 / 2, 0, 1 / 3], [1 / 2, 1 / 2, 0]])
GAP = (5 * 1 / 2 + 1 / 3) / 9  # = 17/54, all nine entries, the zero diagonal included
OLD_GAP = 1 / 2  # the old rule: off-diagonal only, pairs undefined in truth or prediction left out


def test_hand_worked_conditional_gap_with_an_au_never_predicted():
    m = au_metrics(PROBS, Y, MASK, AUS)
    np.testing.assert_allclose(m["conditional_true"], TRUE, atol=1e-12)
    np.testing.assert_allclose(m["conditional_pred"], PREDICTED, atol=1e-12)
    np.testing.assert_allclose(m["conditional_gaps"], GAPS, atol=1e-12)
    assert m["conditional_gap"] == pytest.approx(17 / 54) == pytest.approx(GAP)
    assert m["conditional_gap"] != pytest.approx(OLD_GAP)
    assert m["conditional_pairs"] == 9
    assert m["conditional_undefined_pred"] == 2 and m["conditional_undefined_true"] == 1


def test_diagonal_counts_as_zero_in_the_mean():
    m = au_metrics(PROBS, Y, MASK, AUS)
    gaps = m["conditional_gaps"]
    assert np.all(np.diag(gaps) == 0)  # also for AU04, never predicted: P(c|c) is 1 by definition, not 0/0
    off = gaps[~np.eye(3, dtype=bool)].mean()
    assert m["conditional_gap"] == pytest.approx(gaps.sum() / 9) == pytest.approx(off * 6 / 9)


def test_marginals_per_au_over_known_samples():
    m = au_metrics(PROBS, Y, MASK, AUS)
    # a: known s0 s1 s4 s5, truth on s0 s1 s5, pred on s0 s1 (its s2 prediction is on an unknown label)
    # b: known everywhere, truth on s2 s3, pred on s0 s2 s3 s5;  c: known s0..s4, truth on s0 s3 s4, pred never
    expect = {"AU01": (1 / 2, 3 / 4), "AU02": (2 / 3, 1 / 3), "AU04": (0.0, 3 / 5)}
    for name, (p_pred, p_true) in expect.items():
        assert m["per_au"][name]["p_pred"] == pytest.approx(p_pred), name
        assert m["per_au"][name]["p_true"] == pytest.approx(p_true), name
    assert m["marginal_gap"] == pytest.approx((1 / 4 + 1 / 3 + 3 / 5) / 3)


def test_unknown_labels_are_excluded_per_pair():
    rng = np.random.default_rng(0)
    hidden = MASK == 0
    y2 = np.where(hidden, rng.integers(0, 2, Y.shape), Y)
    y2[hidden] = 1 - Y[hidden]  # whatever sits under mask 0 must not matter, e.g. the opposite label
    probs2 = np.where(hidden, 1 - PROBS, PROBS)
    a, b = au_metrics(PROBS, Y, MASK, AUS), au_metrics(probs2, y2, MASK, AUS)
    for key in ("conditional_gaps", "conditional_true", "conditional_pred"):
        np.testing.assert_array_equal(a[key], b[key])
    assert (a["conditional_gap"], a["marginal_gap"]) == (b["conditional_gap"], b["marginal_gap"])
    # Per pair, not per AU: counting AU02's s2/s3 positives (where AU01 is unknown) would define P_gt(a|b) = 0/2.
    c = conditional_matrix(Y, MASK)
    assert np.isnan(c[0, 1]) and c[1, 0] == 0


def test_pair_set_is_fixed_whatever_the_model_predicts():
    never = au_metrics(np.zeros(Y.shape), Y, MASK, AUS)
    always = au_metrics(np.ones(Y.shape), Y, MASK, AUS)
    assert never["conditional_pairs"] == always["conditional_pairs"] == 9
    assert never["conditional_undefined_pred"] == 6 and always["conditional_undefined_pred"] == 0
    # nothing predicted: every off-diagonal P_pred is 0/0 := 0, so the gap is the truth's off-diagonal sum / 9
    assert never["conditional_gap"] == pytest.approx((TRUE.sum() - 3) / 9)
    # two AUs never labelled on the same sample: undefined in both, gap 0, still counted
    m = au_metrics(np.array([[0.9, 0.1], [0.1, 0.9]]), np.array([[1, 0], [0, 1]]), np.array([[1, 0], [0, 1]]),
                   (1, 2))
    assert m["conditional_pairs"] == 4 and m["conditional_gap"] == 0.0
    assert m["conditional_undefined_true"] == m["conditional_undefined_pred"] == 2


def test_metric_dict_logs_marginals_and_pair_counts():
    m = au_metrics(PROBS, Y, MASK, AUS)
    d = eval_metric_dict(m)
    assert d["val/conditional_gap"] == pytest.approx(GAP) and d["val/conditional_pairs"] == 9
    assert d["val/conditional_undefined_pred"] == 2 and d["val/conditional_undefined_true"] == 1
    assert d["val/p_pred/AU04"] == 0.0 and d["val/p_true/AU04"] == pytest.approx(3 / 5)
    assert d["val/p_pred/AU01"] == pytest.approx(1 / 2) and d["val/f1/AU02"] == m["per_au"]["AU02"]["f1"]
    assert "9 pairs; undefined, taken as 0: 1 true, 2 predicted" in format_table(m).splitlines()[-1]


def test_eval_artifacts_write_the_figures_and_csv_atomically(tmp_path):
    m = au_metrics(PROBS, Y, MASK, AUS)
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / ".marginal.png.tmp-99999").write_bytes(b"half")  # left by a process killed mid-write
    paths = eval_artifacts(m, NAMES, folder)
    names = {"per_au.csv", "per_au.json", "f1_bar.png", "marginal.png", "conditional.png"}
    assert {p.name for p in paths} == names and all(p.parent == folder for p in paths)
    assert {p.name for p in folder.iterdir()} == names  # no temporary file, stale or new
    for p in paths:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", p.name
    with open(folder / "per_au.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["au"] for r in rows] == NAMES
    assert list(rows[0]) == ["au", "f1", "auc", "acc", "n", "positives", "p_pred", "p_true"]
    assert float(rows[0]["p_pred"]) == pytest.approx(1 / 2) and float(rows[0]["p_true"]) == pytest.approx(3 / 4)
    assert float(rows[2]["p_pred"]) == 0.0 and int(rows[2]["n"]) == 5
    table = json.loads((folder / "per_au.json").read_text())  # MLflow's table format (pandas orient="split")
    assert table["columns"] == list(rows[0]) and [r[0] for r in table["data"]] == NAMES
    assert table["data"][0][-1] == pytest.approx(3 / 4)


def test_a_failed_figure_write_keeps_the_previous_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    m = au_metrics(PROBS, Y, MASK, AUS)
    folder = tmp_path / "eval"
    eval_artifacts(m, NAMES, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def disk_full(self, fname, *args, **kwargs):
        (fname.write if hasattr(fname, "write") else Path(fname).write_bytes)(b"\x89PNG half")
        raise OSError(28, os.strerror(28))

    monkeypatch.setattr(Figure, "savefig", disk_full)
    with pytest.raises(OSError):
        eval_artifacts(m, NAMES, folder)
    after = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert set(after) == set(before)  # no temporary file left behind
    assert after["f1_bar.png"] == before["f1_bar.png"] and after["marginal.png"] == before["marginal.png"]


def test_one_std_in_every_report():
    """`ssau cv` (over folds) and `ssau compare` (over seeds) report the same spread: the sample std, ddof 1."""
    from ssau.compare.report import summarize
    from ssau.metrics import sample_std, standard_error
    from ssau.train.commands import summarize_folds

    xs = [0.50, 0.56, 0.62]
    assert sample_std(xs) == pytest.approx(0.06) and standard_error(xs) == pytest.approx(0.06 / 3 ** 0.5)
    assert math.isnan(sample_std([0.5])) and math.isnan(standard_error([0.5]))
    fold = lambda f1: {"f1_mean": f1, "auc_mean": f1, "acc_mean": f1, "marginal_gap": 0.0, "conditional_gap": 0.0,  # noqa: E731
                       "per_au": {"AU01": {"f1": f1}}}
    cv = summarize_folds([fold(x) for x in xs])
    assert cv["cv/f1_mean_std"] == pytest.approx(0.06) and cv["cv/f1_std/AU01"] == pytest.approx(0.06)
    cells = [{"method": "supervised", "drop": 0.0, "seed": s, "fold": 1, "metrics": {"val/f1_mean": x}}
             for s, x in enumerate(xs)]
    rep = summarize(cells, ("supervised",), (0.0,), "supervised")
    assert rep.summary[0]["f1_std"] == pytest.approx(cv["cv/f1_mean_std"])
