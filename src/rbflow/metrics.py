"""Metrics of a binary real/bogus classifier, shared by training, diagnostics and benchmarks.

Every function takes labels ``y`` (1 = real, 0 = bogus) and scores ``p`` (P(real), or any score
that grows with the belief in "real"), as numpy arrays, and returns plain floats, arrays or dicts.

Threshold convention
--------------------
A candidate is called real when ``p >= t``. FNR is the fraction of real stamps with ``p < t``,
FPR the fraction of bogus stamps with ``p >= t``.
"""

from __future__ import annotations

import math

import numpy as np
from astropy.table import Table

__all__ = [
    "ECE_BINS",
    "BOOTSTRAP_RESAMPLES",
    "roc_auc",
    "roc_curve",
    "confusion_counts",
    "confusion_rates",
    "expected_calibration_error",
    "reliability",
    "best_mcc_threshold",
    "operating_points",
    "point_metrics",
    "binary_metrics",
    "efficiency",
]

#: Equal-width P(real) bins of the expected calibration error and the reliability diagram.
ECE_BINS = 15
#: Bootstrap resamples of the 95 % intervals of :func:`binary_metrics`.
BOOTSTRAP_RESAMPLES = 200


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U statistic, ties counted half).

    Parameters
    ----------
    y : numpy.ndarray
        Labels (1 = real).
    p : numpy.ndarray
        Scores.

    Returns
    -------
    float
        The probability that a random real stamp scores above a random bogus one (ties count
        one half); NaN when a class is absent.
    """
    from scipy.stats import rankdata

    n_pos = int((y == 1).sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(p)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def confusion_counts(y: np.ndarray, p: np.ndarray, thresholds: np.ndarray | float) -> dict[str, np.ndarray]:
    """Confusion counts when candidates with ``p >= t`` are called real, for each threshold.

    Parameters
    ----------
    y : numpy.ndarray
        Labels (1 = real).
    p : numpy.ndarray
        Scores.
    thresholds : float or numpy.ndarray
        Threshold(s) ``t``.

    Returns
    -------
    dict
        ``tp``, ``fp``, ``tn``, ``fn`` as int64 arrays shaped like ``thresholds``.
    """
    y = np.asarray(y)
    p = np.asarray(p, dtype=float)
    t = np.asarray(thresholds, dtype=float)
    pos = np.sort(p[y == 1])
    neg = np.sort(p[y == 0])
    fn = np.searchsorted(pos, t, side="left").astype(np.int64)
    tn = np.searchsorted(neg, t, side="left").astype(np.int64)
    return {"tp": len(pos) - fn, "fp": len(neg) - tn, "tn": tn, "fn": fn}


def confusion_rates(counts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rates and scores from confusion counts.

    Parameters
    ----------
    counts : dict
        ``tp``, ``fp``, ``tn``, ``fn`` (arrays of one shape), e.g. from :func:`confusion_counts`.

    Returns
    -------
    dict
        ``accuracy``, ``precision``, ``recall``, ``f1``, ``mcc`` (Matthews correlation), ``fpr``,
        ``fnr`` as float arrays; NaN where a rate is undefined (an empty denominator), except the
        MCC, which is 0 when a margin of the confusion matrix is empty.
    """
    tp, fp, tn, fn = (np.asarray(counts[k]).astype(float) for k in ("tp", "fp", "tn", "fn"))
    with np.errstate(invalid="ignore", divide="ignore"):
        den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        return {
            "accuracy": (tp + tn) / (tp + fp + tn + fn),
            "precision": tp / (tp + fp),
            "recall": tp / (tp + fn),
            "f1": 2 * tp / (2 * tp + fp + fn),
            "mcc": np.where(den > 0, (tp * tn - fp * fn) / np.where(den > 0, den, 1.0), 0.0),
            "fpr": fp / (fp + tn),
            "fnr": fn / (tp + fn),
        }


def roc_curve(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FPR and TPR at every distinct score threshold.

    Parameters
    ----------
    y : numpy.ndarray
        Labels (1 = real); both classes must be present.
    p : numpy.ndarray
        Scores.

    Returns
    -------
    fpr, tpr : numpy.ndarray
        From (1, 1) (everything called real) down to (0, 0) (nothing called real).
    """
    grid = np.r_[-np.inf, np.unique(p), np.inf]
    r = confusion_rates(confusion_counts(y, p, grid))
    return r["fpr"], 1.0 - r["fnr"]


def expected_calibration_error(y: np.ndarray, p: np.ndarray, *, bins: int = ECE_BINS) -> float:
    """Expected calibration error of the probabilities ``p``.

    Parameters
    ----------
    y : numpy.ndarray
        Labels (1 = real).
    p : numpy.ndarray
        P(real), in [0, 1].
    bins : int, optional
        Number of equal-width bins of [0, 1] (``p = 1`` falls in the last).

    Returns
    -------
    float
        Sum over bins of (fraction of stamps in the bin) x ``|mean p - fraction real|``; NaN when
        ``y`` is empty.
    """
    if len(y) == 0:
        return float("nan")
    idx = np.minimum((p * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            ece += sel.mean() * abs(p[sel].mean() - y[sel].mean())
    return float(ece)


def reliability(y: np.ndarray, p: np.ndarray, *, bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Reliability-diagram points: per equal-width P(real) bin, the mean P(real) and the fraction real.

    Parameters
    ----------
    y : numpy.ndarray
        Labels (1 = real).
    p : numpy.ndarray
        P(real), in [0, 1].
    bins : int, optional
        Number of equal-width bins (as :func:`expected_calibration_error`).

    Returns
    -------
    dict
        ``edges`` (``bins + 1``), ``n`` (stamps per bin), and for the non-empty bins only
        ``mean_p`` and ``frac_real``.
    """
    idx = np.minimum((p * bins).astype(int), bins - 1)
    n = np.bincount(idx, minlength=bins)
    ok = n > 0
    return {
        "edges": np.linspace(0.0, 1.0, bins + 1),
        "n": n,
        "mean_p": np.bincount(idx, weights=p, minlength=bins)[ok] / n[ok],
        "frac_real": np.bincount(idx, weights=np.asarray(y, dtype=float), minlength=bins)[ok] / n[ok],
    }


def best_mcc_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """Threshold on P(real) maximising the Matthews correlation.

    The candidates are 0.01, 0.02, ..., 0.99 and the 0, 0.005, ..., 1 quantiles of ``p`` (those in
    (0, 1)).

    Parameters
    ----------
    y : numpy.ndarray
        Labels (1 = real).
    p : numpy.ndarray
        P(real).

    Returns
    -------
    float
        The best threshold; among equally good ones (a plateau when the classes separate) the one
        nearest 0.5; 0.5 when a class is absent.
    """
    if len(np.unique(y)) < 2:
        return 0.5
    grid = np.unique(np.concatenate([np.linspace(0.01, 0.99, 99), np.quantile(p, np.linspace(0, 1, 201))]))
    grid = grid[(grid > 0) & (grid < 1)]
    scores = confusion_rates(confusion_counts(y, p, grid))["mcc"]
    best = grid[scores >= scores.max() - 1e-12]
    return float(best[np.argmin(np.abs(best - 0.5))])


def operating_points(y: np.ndarray, p: np.ndarray, *, rate: float = 0.01) -> dict[str, dict[str, float]]:
    """Thresholds reaching a target FNR and FPR, and the equal-error threshold.

    Parameters
    ----------
    y : numpy.ndarray
        Labels (1 = real); both classes must be present.
    p : numpy.ndarray
        P(real).
    rate : float, optional
        Target error rate (0.01 = 1 %).

    Returns
    -------
    dict
        ``fnr_target``: the largest threshold with FNR <= ``rate`` (at most ``floor(rate * n_true)``
        trues below it); ``fpr_target``: the smallest threshold with FPR <= ``rate`` (just above the
        ``floor(rate * n_false) + 1``-th highest false score; above 1 when that score is 1);
        ``equal_error``: the score threshold where ``|FNR - FPR|`` is smallest, with
        ``rate = (FNR + FPR) / 2``. Each holds ``threshold``, ``fnr`` and ``fpr``.
    """
    y = np.asarray(y)
    p = np.asarray(p, dtype=float)
    pos = np.sort(p[y == 1])
    neg_desc = np.sort(p[y == 0])[::-1]
    t_fnr = float(pos[math.floor(rate * len(pos))])
    t_fpr = float(np.nextafter(neg_desc[math.floor(rate * len(neg_desc))], np.inf))
    grid = np.unique(p)
    r = confusion_rates(confusion_counts(y, p, grid))
    k = int(np.argmin(np.abs(r["fnr"] - r["fpr"])))
    out: dict[str, dict[str, float]] = {}
    for name, t in (("fnr_target", t_fnr), ("fpr_target", t_fpr), ("equal_error", float(grid[k]))):
        rt = confusion_rates(confusion_counts(y, p, np.array([t])))
        out[name] = {"threshold": t, "fnr": float(rt["fnr"][0]), "fpr": float(rt["fpr"][0])}
    out["equal_error"]["rate"] = 0.5 * (out["equal_error"]["fnr"] + out["equal_error"]["fpr"])
    return out


def point_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """The test metrics of one sample (no intervals).

    Parameters
    ----------
    y : numpy.ndarray
        Labels (1 = real).
    p : numpy.ndarray
        Calibrated P(real).
    threshold : float
        Threshold of accuracy and MCC.

    Returns
    -------
    dict
        ``roc_auc``; ``fnr_at_fpr1`` (fraction of reals below the 99th percentile of the bogus
        scores); ``fpr_at_fnr1`` (fraction of bogus at or above the 1st percentile of the real
        scores); ``accuracy`` and ``mcc`` at ``threshold``; ``ece``. NaN where undefined.
    """
    pos, neg = p[y == 1], p[y == 0]
    nan = float("nan")
    both = len(neg) > 0 and len(pos) > 0
    fnr = float((pos < np.quantile(neg, 0.99)).mean()) if both else nan
    fpr = float((neg >= np.quantile(pos, 0.01)).mean()) if both else nan
    pred = (p >= threshold).astype(int)
    return {
        "roc_auc": roc_auc(y, p),
        "fnr_at_fpr1": fnr,
        "fpr_at_fnr1": fpr,
        "accuracy": float((pred == y).mean()) if len(y) else nan,
        "mcc": float(confusion_rates(confusion_counts(y, p, threshold))["mcc"]) if len(y) else nan,
        "ece": expected_calibration_error(y, p),
    }


def binary_metrics(
    y: np.ndarray, p: np.ndarray, *, threshold: float, seed: int, n_boot: int = BOOTSTRAP_RESAMPLES
) -> dict[str, dict[str, float]]:
    """The metrics of :func:`point_metrics` with bootstrap 95 % intervals.

    Parameters
    ----------
    y : numpy.ndarray
        Labels (1 = real).
    p : numpy.ndarray
        Calibrated P(real).
    threshold : float
        Threshold of accuracy and MCC.
    seed : int
        Seed of the bootstrap.
    n_boot : int, optional
        Number of bootstrap resamples.

    Returns
    -------
    dict
        ``{metric: {"value", "lo", "hi"}}`` for roc_auc, fnr_at_fpr1, fpr_at_fnr1, accuracy, mcc, ece
        (interval: 2.5 and 97.5 percentiles of the finite resampled values, NaN when none), plus
        ``{"n": ..., "n_true": ...}`` under ``"counts"``.
    """
    point = point_metrics(y, p, threshold)
    rng = np.random.default_rng(seed)
    boots: dict[str, list[float]] = {k: [] for k in point}
    if len(y):
        for _ in range(n_boot):
            i = rng.integers(0, len(y), len(y))
            for k, v in point_metrics(y[i], p[i], threshold).items():
                boots[k].append(v)
    out: dict[str, dict[str, float]] = {}
    for k, v in point.items():
        b = np.asarray(boots[k], dtype=float)
        b = b[np.isfinite(b)]
        lo, hi = np.quantile(b, [0.025, 0.975]) if len(b) else (math.nan, math.nan)
        out[k] = {"value": v, "lo": float(lo), "hi": float(hi)}
    out["counts"] = {"n": int(len(y)), "n_true": int((y == 1).sum())}
    return out


def efficiency(mags: np.ndarray, detected: np.ndarray, bins: np.ndarray) -> Table:
    """Detection efficiency per magnitude bin with Wilson-score 68 % intervals.

    Parameters
    ----------
    mags : array-like
        Injected magnitudes.
    detected : array-like of bool
        Whether each source was detected (or kept).
    bins : array-like
        Bin edges (mag, increasing); sources outside are ignored.

    Returns
    -------
    astropy.table.Table
        mag_lo, mag_hi, mag_mid, n, n_det, eff, eff_lo, eff_hi (NaN for empty bins).
    """
    mags = np.asarray(mags, dtype=float)
    detected = np.asarray(detected, dtype=bool)
    bins = np.asarray(bins, dtype=float)
    n = np.histogram(mags, bins=bins)[0]
    k = np.histogram(mags[detected], bins=bins)[0]
    z = 1.0  # 68.3 % two-sided interval
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
        half = z / (1 + z**2 / n) * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    empty = n == 0
    p, lo, hi = (np.where(empty, np.nan, a) for a in (p, centre - half, centre + half))
    return Table(
        {
            "mag_lo": bins[:-1],
            "mag_hi": bins[1:],
            "mag_mid": 0.5 * (bins[:-1] + bins[1:]),
            "n": n.astype(np.int64),
            "n_det": k.astype(np.int64),
            "eff": p,
            # The Wilson interval contains p; min/max only remove rounding at p = 0 or 1.
            "eff_lo": np.clip(np.fmin(lo, p), 0.0, 1.0),
            "eff_hi": np.clip(np.fmax(hi, p), 0.0, 1.0),
        }
    )
