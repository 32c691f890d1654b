"""Tests of rbflow.metrics against hand-computed and brute-force values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rbflow.metrics import (
    best_mcc_threshold,
    binary_metrics,
    confusion_counts,
    confusion_rates,
    efficiency,
    expected_calibration_error,
    operating_points,
    point_metrics,
    reliability,
    roc_auc,
    roc_curve,
)


def brute_auc(y: np.ndarray, p: np.ndarray) -> float:
    """P(score of a real > score of a bogus) over every pair, ties counted half."""
    pos, neg = p[y == 1][:, None], p[y == 0][None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


def test_roc_auc_perfect_inverted_constant_and_one_class():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    assert roc_auc(y, np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9])) == 1.0
    assert roc_auc(y, np.array([0.6, 0.7, 0.8, 0.9, 0.1, 0.2, 0.3, 0.4])) == 0.0
    assert roc_auc(y, np.full(8, 0.5)) == 0.5
    # one pair tied (0.7 vs 0.7) of 16: it counts half
    assert roc_auc(y, np.array([0.1, 0.2, 0.3, 0.7, 0.6, 0.7, 0.8, 0.9])) == pytest.approx(14.5 / 16)
    assert math.isnan(roc_auc(np.ones(4, int), np.linspace(0, 1, 4)))


def test_roc_auc_equals_brute_force_and_trapezoid_with_ties():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    p = np.round(rng.normal(y * 0.8, 1.0), 1)  # rounding makes many ties
    auc = roc_auc(y, p)
    # rank formula and pair count are the same number up to float rounding of the rank sums
    assert auc == pytest.approx(brute_auc(y, p), abs=1e-12)
    fpr, tpr = roc_curve(y, p)
    # the trapezoidal area of the ROC curve counts a tied pair half, as the Mann-Whitney statistic
    assert -np.trapezoid(tpr, fpr) == pytest.approx(auc, abs=1e-12)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (1.0, 1.0, 0.0, 0.0)


def test_random_classifier_auc_near_half():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 10_000)
    p = rng.uniform(size=10_000)
    n1 = int(y.sum())
    n0 = len(y) - n1
    # null distribution of the AUC: mean 1/2, sigma sqrt((n0 + n1 + 1) / (12 n0 n1)) ~ 0.0029; 4 sigma
    sigma = math.sqrt((n0 + n1 + 1) / (12 * n0 * n1))
    assert abs(roc_auc(y, p) - 0.5) < 4 * sigma


def test_confusion_counts_and_rates_match_brute_force():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    p = np.round(rng.uniform(size=200), 2)
    t = np.array([0.0, 0.25, 0.5, 0.505, 0.99, 1.5])
    c = confusion_counts(y, p, t)
    r = confusion_rates(c)
    for i, ti in enumerate(t):
        pred = p >= ti
        tp, fp = int((pred & (y == 1)).sum()), int((pred & (y == 0)).sum())
        tn, fn = int((~pred & (y == 0)).sum()), int((~pred & (y == 1)).sum())
        assert (c["tp"][i], c["fp"][i], c["tn"][i], c["fn"][i]) == (tp, fp, tn, fn)
        den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        assert r["mcc"][i] == pytest.approx((tp * tn - fp * fn) / den if den else 0.0, abs=1e-12)
        assert r["fnr"][i] == pytest.approx(fn / (tp + fn)) and r["fpr"][i] == pytest.approx(fp / (fp + tn))
    # everything called real at t = 0, nothing at t = 1.5: precision undefined there, MCC 0
    assert c["fn"][0] == 0 and c["tp"][-1] == 0 and math.isnan(r["precision"][-1]) and r["mcc"][-1] == 0.0


def test_mcc_perfect_and_inverted():
    y = np.array([0, 0, 1, 1])
    assert confusion_rates(confusion_counts(y, np.array([0.1, 0.2, 0.8, 0.9]), 0.5))["mcc"] == 1.0
    assert confusion_rates(confusion_counts(y, np.array([0.8, 0.9, 0.1, 0.2]), 0.5))["mcc"] == -1.0


def test_ece_known_values():
    # perfectly calibrated: stamps at P = 0.2 of which 20 % real, at P = 0.9 of which 90 % real
    y = np.array([1] + [0] * 4 + [1] * 9 + [0])
    p = np.array([0.2] * 5 + [0.9] * 10)
    assert expected_calibration_error(y, p) == pytest.approx(0.0, abs=1e-15)
    # confidently wrong: P = 0.9 for bogus stamps only -> ECE 0.9
    assert expected_calibration_error(np.zeros(4, int), np.full(4, 0.9)) == pytest.approx(0.9)
    # two bins: 0.5 of the stamps off by 0.3, 0.5 off by 0.1 -> 0.2
    assert expected_calibration_error(np.array([0, 1]), np.array([0.3, 0.9]), bins=2) == pytest.approx(0.2)
    assert math.isnan(expected_calibration_error(np.zeros(0), np.zeros(0)))


def test_reliability_points_and_ece_agree():
    rng = np.random.default_rng(2)
    p = rng.uniform(size=500)
    y = (rng.uniform(size=500) < p**2).astype(int)  # over-confident at low P
    rel = reliability(y, p)
    assert rel["n"].sum() == 500 and len(rel["edges"]) == 16
    ok = rel["n"] > 0
    ece = np.sum(rel["n"][ok] / 500 * np.abs(rel["mean_p"] - rel["frac_real"]))
    assert ece == pytest.approx(expected_calibration_error(y, p), rel=1e-12)


def test_best_mcc_threshold():
    y = np.array([0] * 5 + [1] * 5)
    # separable with a gap between 0.3 and 0.8: every threshold in (0.3, 0.8] is perfect; 0.5 is nearest 0.5
    p = np.array([0.0, 0.1, 0.1, 0.2, 0.3, 0.8, 0.85, 0.9, 0.95, 1.0])
    assert best_mcc_threshold(y, p) == pytest.approx(0.5)
    # gap between 0.6 and 0.7: the best thresholds lie in (0.6, 0.7]; the candidate nearest 0.5 is the
    # 0.445 quantile of p2 (position 9 * 0.445 = 4.005 in the sorted scores: 0.6 + 0.005 * 0.1)
    p2 = np.array([0.1, 0.2, 0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95])
    t = best_mcc_threshold(y, p2)
    assert 0.6 < t <= 0.7
    assert t == pytest.approx(0.6005)
    assert best_mcc_threshold(np.ones(4, int), np.linspace(0, 1, 4)) == 0.5


def test_operating_points_known_set():
    y = np.array([0] * 5 + [1] * 5)
    p = np.array([0.05, 0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9, 0.95])
    c = confusion_counts(y, p, np.array([0.5, 0.35]))
    # t = 0.5: trues below are 0.4 (fn = 1); falses at or above are 0.6 (fp = 1)
    assert list(c["fn"]) == [1, 0] and list(c["fp"]) == [1, 1] and list(c["tp"]) == [4, 5] and list(c["tn"]) == [4, 4]
    pts = operating_points(y, p)
    # 1 % of 5 trues is 0 stamps: the largest threshold with no true below is the lowest true score
    assert pts["fnr_target"] == {"threshold": 0.4, "fnr": 0.0, "fpr": 0.2}
    # no false at or above: just above the highest false score 0.6
    assert pts["fpr_target"]["threshold"] == np.nextafter(0.6, 1) and pts["fpr_target"]["fnr"] == 0.2
    # at t = 0.4 FNR = 0, FPR = 0.2; at t = 0.6 FNR = FPR = 0.2 (equal); at 0.7 FNR 0.2, FPR 0
    assert pts["equal_error"] == {"threshold": 0.6, "fnr": 0.2, "fpr": 0.2, "rate": 0.2}


def test_point_and_bootstrap_metrics():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.7, 0.6, 0.7, 0.8, 0.9])
    pt = point_metrics(y, p, 0.5)
    assert pt["accuracy"] == 7 / 8 and pt["roc_auc"] == pytest.approx(14.5 / 16)
    # the 99th percentile of the bogus scores is 0.688: the real at 0.6 is below it
    assert pt["fnr_at_fpr1"] == 0.25
    # the 1st percentile of the real scores is 0.603: the bogus at 0.7 is at or above it
    assert pt["fpr_at_fnr1"] == 0.25
    # at 0.5: tp 4, fp 1, tn 3, fn 0 -> MCC 12 / sqrt(5 * 4 * 3 * 4)
    assert pt["mcc"] == pytest.approx(12 / math.sqrt(240))
    m = binary_metrics(y, p, threshold=0.5, seed=0, n_boot=50)
    assert m["counts"] == {"n": 8, "n_true": 4}
    for k, v in pt.items():
        assert m[k]["value"] == v
        assert m[k]["lo"] <= m[k]["hi"]
    assert m == binary_metrics(y, p, threshold=0.5, seed=0, n_boot=50)
    empty = binary_metrics(np.zeros(0, int), np.zeros(0), threshold=0.5, seed=0)
    assert math.isnan(empty["roc_auc"]["value"]) and math.isnan(empty["accuracy"]["lo"])


def test_efficiency_wilson_interval():
    mags = np.array([18.2, 18.4, 18.6, 18.8, 19.2, 19.4])
    det = np.array([True, True, True, False, False, False])
    eff = efficiency(mags, det, np.array([18.0, 19.0, 20.0, 21.0]))
    assert list(eff["n"]) == [4, 2, 0] and list(eff["n_det"]) == [3, 0, 0]
    assert eff["eff"][0] == 0.75 and eff["eff"][1] == 0.0 and math.isnan(eff["eff"][2])
    # Wilson 68 % interval of 3/4 (z = 1): centre (0.75 + 1/8) / 1.25 = 0.7, half-width
    # sqrt(0.75 * 0.25 / 4 + 1 / 64) / 1.25
    half = math.sqrt(0.75 * 0.25 / 4 + 1 / 64) / 1.25
    assert eff["eff_lo"][0] == pytest.approx(0.7 - half) and eff["eff_hi"][0] == pytest.approx(0.7 + half)
    assert eff["eff_lo"][1] == 0.0
