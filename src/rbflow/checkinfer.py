"""Threshold diagnostics of a trained real/bogus model on its test frames (the older tool's cnn_checkinfer).

:func:`evaluate_test_split` classifies every datacube stamp of the frames that ``model.json`` holds
out as the test set (no stamp of a training or validation frame), with the same model loading and
prediction path as :mod:`rbflow.infer`. :func:`run_checkinfer` turns these predictions into the
plots and numbers needed to choose a threshold: score histograms, ROC and DET curves, error rates
and precision/recall/F1/MCC against the threshold, detection efficiency against injected magnitude,
a reliability diagram, the confusion matrix, galleries of the worst mistakes and the FWHM ratio of
the candidates. Figures are made with :class:`matplotlib.figure.Figure` (Agg canvas), never pyplot.

Threshold conventions
---------------------
A candidate is kept (called real) when ``P(real) >= t``. FNR is the fraction of true stamps with
``P < t``, FPR the fraction of false stamps with ``P >= t``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.table import Table
from matplotlib.figure import Figure
from scipy.stats import norm

from rbflow import __version__
from rbflow.checksim import efficiency
from rbflow.datacube import crop_stamps, load_datacube, normalise
from rbflow.errors import InputError
from rbflow.frames import parse_image
from rbflow.infer import check_compatible, load_model, predict
from rbflow.io import atomic_path, read_table, write_table
from rbflow.seeds import derive
from rbflow.train import binary_metrics, expected_calibration_error, roc_auc

__all__ = [
    "FILES",
    "evaluate_test_split",
    "confusion_counts",
    "operating_points",
    "run_checkinfer",
]

log = logging.getLogger(__name__)

#: Output files of :func:`run_checkinfer` (key -> file name in ``out_dir``).
FILES: dict[str, str] = {
    "histogram": "p_real_hist.png",
    "roc": "roc.png",
    "det": "det.png",
    "error_rates": "error_rates.png",
    "metrics": "metrics_vs_threshold.png",
    "efficiency": "efficiency_mag.png",
    "reliability": "reliability.png",
    "confusion": "confusion.png",
    "false_positives": "worst_false_positives.png",
    "false_negatives": "worst_false_negatives.png",
    "fwhm_ratio": "fwhm_ratio.png",
    "summary": "summary.json",
    "predictions": "test_predictions.ecsv",
}

#: Target error rate of the FNR and FPR operating points.
_TARGET_RATE = 0.01
#: Reliability-diagram bins (equal width in P(real)); the ECE uses the same bins.
_CAL_BINS = 15
#: Stamps per gallery of worst mistakes.
_GALLERY = 16
#: Display range of normalised stamps (robust sigma units).
_VMIN, _VMAX = -4.0, 12.0


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def evaluate_test_split(datacube_path: str | os.PathLike, model_path: str | os.PathLike) -> Table:
    """P(real) of every datacube stamp of the model's test frames.

    Parameters
    ----------
    datacube_path : path-like
        Datacube of :func:`rbflow.datacube.build_datacube` (normalised stamps).
    model_path : path-like
        ``model.pt`` with its ``model.json`` (whose ``split.test`` lists the test frames).

    Returns
    -------
    astropy.table.Table
        One row per test stamp, in datacube order: id, image, frame, y (1 = real), mag (injected
        magnitude of injected trues, NaN otherwise), snr, label0 = P(bogus), label1 = P(real).

    Raises
    ------
    InputError
        Unreadable datacube or model, a model without a test split, stamps incompatible with the
        model, or no stamp of a test frame in the datacube.
    """
    datacube_path = Path(datacube_path)
    cube = load_datacube(datacube_path)
    model, meta = load_model(model_path)
    test_frames = [str(f) for f in meta.get("split", {}).get("test", [])]
    if not test_frames:
        raise InputError(
            f"model '{model_path}': model.json has no test frames (key 'split.test'): retrain it with this rbflow"
        )
    trained_on = meta.get("datacube", {}).get("sha256")
    if trained_on and trained_on != _sha256(datacube_path):
        log.warning(
            "datacube '%s' is not the one model '%s' was trained on: the test frames are still never trained on, "
            "but the stamps may differ",
            datacube_path,
            model_path,
        )
    channels = [str(c) for c in cube["channels"]]
    X = cube["X"]
    check_compatible(meta, channels, int(X.shape[-1]))
    sel = np.flatnonzero(np.isin(cube["frame"].astype(str), test_frames))
    if len(sel) == 0:
        raise InputError(
            f"datacube '{datacube_path}' holds no stamp of the test frames {test_frames} of model '{model_path}': "
            "use the datacube the model was trained on, or retrain"
        )
    order = [channels.index(c) for c in meta["channels"]]
    X = X[sel][:, order]
    if X.shape[-1] != int(meta["stamp_size"]):
        # the datacube's stamps are normalised already; crop and normalise again as training did
        X = normalise(crop_stamps(X, int(meta["stamp_size"])))
    p_real = predict(model, meta, X)
    table = Table(
        {
            "id": cube["ids"][sel].astype(str),
            "image": cube["image"][sel].astype(str),
            "frame": cube["frame"][sel].astype(str),
            "y": cube["y"][sel].astype(np.int64),
            "mag": cube["mag"][sel].astype(np.float64),
            "snr": cube["snr"][sel].astype(np.float64),
            "label0": 1.0 - p_real,
            "label1": p_real,
        }
    )
    table.meta.update(
        {
            "made_by": f"rbflow.checkinfer.evaluate_test_split {__version__}",
            "datacube": str(datacube_path),
            "model": str(model_path),
            "test_frames": test_frames,
            "model_threshold": float(meta["threshold"]),
            "columns": "y = label (1 real); label0 = P(bogus), label1 = P(real), calibrated",
        }
    )
    log.info("test split: %d stamps of %d frames (%d true)", len(table), len(test_frames), int(table["y"].sum()))
    return table


def confusion_counts(y: np.ndarray, p: np.ndarray, thresholds: np.ndarray | float) -> dict[str, np.ndarray]:
    """Confusion counts when candidates with ``P(real) >= t`` are called real, for each threshold.

    Parameters
    ----------
    y : numpy.ndarray
        Labels (1 = real).
    p : numpy.ndarray
        P(real).
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


def _rates(c: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rates and scores from confusion counts (NaN where undefined; MCC 0 when a margin is empty)."""
    tp, fp, tn, fn = (c[k].astype(float) for k in ("tp", "fp", "tn", "fn"))
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = tp / (tp + fp)
        recall = tp / (tp + fn)
        den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        out = {
            "accuracy": (tp + tn) / (tp + fp + tn + fn),
            "precision": precision,
            "recall": recall,
            "f1": 2 * tp / (2 * tp + fp + fn),
            "mcc": np.where(den > 0, (tp * tn - fp * fn) / np.where(den > 0, den, 1.0), 0.0),
            "fpr": fp / (fp + tn),
            "fnr": fn / (tp + fn),
        }
    return out


def operating_points(y: np.ndarray, p: np.ndarray, *, rate: float = _TARGET_RATE) -> dict[str, dict[str, float]]:
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
    r = _rates(confusion_counts(y, p, grid))
    k = int(np.argmin(np.abs(r["fnr"] - r["fpr"])))
    out: dict[str, dict[str, float]] = {}
    for name, t in (("fnr_target", t_fnr), ("fpr_target", t_fpr), ("equal_error", float(grid[k]))):
        rt = _rates(confusion_counts(y, p, np.array([t])))
        out[name] = {"threshold": t, "fnr": float(rt["fnr"][0]), "fpr": float(rt["fpr"][0])}
    out["equal_error"]["rate"] = 0.5 * (out["equal_error"]["fnr"] + out["equal_error"]["fpr"])
    return out


def _jsonable(obj: Any) -> Any:
    """NaN/inf floats -> None, numpy scalars -> Python, so that the JSON is strict."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer, np.floating)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _save(fig: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def run_checkinfer(
    datacube_path: str | os.PathLike,
    model_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    threshold: float | None = None,
    thresholds: Sequence[float] = (0.1, 0.5, 0.7),
    training_dir: str | os.PathLike | None = None,
    inject_dir: str | os.PathLike | None = None,
    crossmatch_paths: Sequence[str | os.PathLike] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Threshold diagnostics of a model on its test frames: plots, ``summary.json`` and the predictions.

    Files written in ``out_dir`` (names in :data:`FILES`):

    * ``p_real_hist.png``: P(real) histograms of true and false stamps (log counts), chosen threshold;
    * ``roc.png``: ROC curve with its AUC; ``det.png``: DET curve (FNR vs FPR, probit axes);
    * ``error_rates.png``: FNR and FPR vs threshold with the equal-error point and the 1 % points;
    * ``metrics_vs_threshold.png``: precision, recall, F1 and MCC vs threshold;
    * ``efficiency_mag.png``: fraction of the injected trues with ``P >= t`` per injected-magnitude
      bin for each of ``thresholds`` (Wilson 68 % intervals), over the plain detection efficiency of
      the test frames when ``crossmatch_paths`` are given;
    * ``reliability.png``: reliability diagram (15 equal-width bins) with the ECE;
    * ``confusion.png``: confusion matrix at the chosen threshold;
    * ``worst_false_positives.png``, ``worst_false_negatives.png``: the 16 false stamps with the
      highest P(real) and the 16 true stamps with the lowest, titled with P(real) and id (stamps of
      the cutout files in ``training_dir`` when given, else of the datacube; normalised);
    * ``fwhm_ratio.png``: candidate FWHM (cutout header) / PSF FWHM of its image (median
      ``psf_fwhm`` of the injection truth table) for the true and all test candidates; only with
      ``training_dir`` and existing truth tables, else skipped with a warning;
    * ``summary.json`` (the returned dict) and ``test_predictions.ecsv`` (:func:`evaluate_test_split`).

    Parameters
    ----------
    datacube_path : path-like
        The datacube the model was trained on.
    model_path : path-like
        ``model.pt`` (``model.json`` next to it).
    out_dir : path-like
        Output folder (created).
    threshold : float, optional
        Threshold of the confusion matrix and point metrics; default: model.json's suggested threshold.
    thresholds : sequence of float, optional
        Thresholds of the efficiency plot.
    training_dir : path-like, optional
        Folder with ``true/`` and ``false/`` cutout files (``{id}.fits``): gallery stamps and FWHMs.
    inject_dir : path-like, optional
        Folder of the injection truth tables ``{image}.ecsv`` (column ``psf_fwhm``, pixels); default:
        ``training_dir/../sim/inject`` (the workflow's layout).
    crossmatch_paths : sequence of path-like, optional
        Per-injected-source crossmatch tables (columns mag, detected; ``image`` or the file name
        gives the image); only rows of test frames are used.
    seed : int, optional
        Seed of the bootstrap intervals of AUC, accuracy, MCC and ECE.

    Returns
    -------
    dict
        Content of ``summary.json``: ``threshold`` (chosen, and its source), ``auc``, the operating
        points of :func:`operating_points` (``fnr_1pct``, ``fpr_1pct``, ``equal_error``),
        ``at_threshold`` (accuracy, precision, recall, f1, mcc, fpr, fnr, ece and the confusion
        counts tp, fp, tn, fn), ``bootstrap`` (95 % intervals of auc, accuracy, mcc, ece),
        ``efficiency`` (per threshold: injected trues with ``P >= t``), ``counts`` and ``files``.

    Raises
    ------
    InputError
        Bad datacube or model, an empty test split, or a test split with a single class.
    """
    out_dir = Path(out_dir)
    table = evaluate_test_split(datacube_path, model_path)
    y = np.asarray(table["y"], dtype=np.int64)
    p = np.asarray(table["label1"], dtype=float)
    n_true, n_false = int((y == 1).sum()), int((y == 0).sum())
    if n_true == 0 or n_false == 0:
        raise InputError(
            f"the test frames of model '{model_path}' hold only {'true' if n_true else 'false'} stamps "
            f"({len(y)}): threshold diagnostics need both classes; add labelled stamps of the other class "
            "or retrain with more frames (key 'train.test_frac')"
        )
    source = "argument" if threshold is not None else "model.json"
    threshold = float(table.meta["model_threshold"] if threshold is None else threshold)
    thresholds = [float(t) for t in thresholds]

    points = operating_points(y, p)
    at = confusion_counts(y, p, np.array([threshold]))
    at_rates = {k: float(v[0]) for k, v in _rates(at).items()}
    boot = binary_metrics(y, p, threshold=threshold, seed=derive(seed, "checkinfer", "bootstrap"))
    ece = expected_calibration_error(y, p, bins=_CAL_BINS)
    auc = roc_auc(y, p)
    injected = (y == 1) & np.isfinite(np.asarray(table["mag"], dtype=float))
    summary: dict[str, Any] = {
        "made_by": f"rbflow.checkinfer.run_checkinfer {__version__}",
        "datacube": str(datacube_path),
        "model": str(model_path),
        "convention": "real when P(real) >= threshold; FNR = trues below, FPR = falses at or above",
        "threshold": {"value": threshold, "source": source},
        "auc": auc,
        "fnr_1pct": points["fnr_target"],
        "fpr_1pct": points["fpr_target"],
        "equal_error": points["equal_error"],
        "at_threshold": {
            **{k: at_rates[k] for k in ("accuracy", "precision", "recall", "f1", "mcc", "fpr", "fnr")},
            "ece": ece,
            **{k: int(v[0]) for k, v in at.items()},
        },
        "bootstrap": {k: boot[k] for k in ("roc_auc", "accuracy", "mcc", "ece")},
        "efficiency": {
            f"{t:g}": {"n_injected": int(injected.sum()), "n_kept": int((injected & (p >= t)).sum())}
            for t in thresholds
        },
        "counts": {
            "n": len(y),
            "n_true": n_true,
            "n_false": n_false,
            "n_injected_true": int(injected.sum()),
            "test_frames": list(table.meta["test_frames"]),
        },
    }

    out_dir.mkdir(parents=True, exist_ok=True)
    table.meta["threshold"] = threshold
    write_table(table, out_dir / FILES["predictions"])
    _plot_histograms(y, p, threshold, out_dir / FILES["histogram"])
    _plot_roc(y, p, auc, out_dir / FILES["roc"])
    _plot_det(y, p, points, out_dir / FILES["det"])
    _plot_error_rates(y, p, points, threshold, out_dir / FILES["error_rates"])
    _plot_metrics(y, p, threshold, out_dir / FILES["metrics"])
    plain = _plain_efficiency(crossmatch_paths, set(table.meta["test_frames"])) if crossmatch_paths else None
    _plot_efficiency(
        np.asarray(table["mag"], dtype=float)[injected], p[injected], thresholds, plain, out_dir / FILES["efficiency"]
    )
    _plot_reliability(y, p, ece, out_dir / FILES["reliability"])
    _plot_confusion(at, threshold, out_dir / FILES["confusion"])
    X, channels = _gallery_source(datacube_path, table)
    fp_idx = np.flatnonzero(y == 0)[np.argsort(-p[y == 0], kind="stable")][:_GALLERY]
    fn_idx = np.flatnonzero(y == 1)[np.argsort(p[y == 1], kind="stable")][:_GALLERY]
    for key, idx, what in (
        ("false_positives", fp_idx, f"false stamps with the highest P(real) ({at['fp'][0]} at P >= {threshold:.3f})"),
        ("false_negatives", fn_idx, f"true stamps with the lowest P(real) ({at['fn'][0]} at P < {threshold:.3f})"),
    ):
        stamps = [_stamp(training_dir, table, i, X[i], channels) for i in idx]
        _plot_gallery(stamps, [f"P={p[i]:.3f}\n{table['id'][i]}" for i in idx], channels, what, out_dir / FILES[key])
    files = [v for k, v in FILES.items() if k != "fwhm_ratio"]
    if _fwhm_ratio(table, training_dir, inject_dir, threshold, out_dir / FILES["fwhm_ratio"]):
        files.append(FILES["fwhm_ratio"])
    summary["files"] = sorted(files)
    with atomic_path(out_dir / FILES["summary"]) as tmp:
        tmp.write_text(json.dumps(_jsonable(summary), indent=2, allow_nan=False) + "\n")
    log.info(
        "checkinfer: %d test stamps (%d true), AUC %.4f; at t=%.3f FNR %.3f FPR %.3f; equal error %.3f at t=%.3f",
        len(y),
        n_true,
        auc,
        threshold,
        at_rates["fnr"],
        at_rates["fpr"],
        points["equal_error"]["rate"],
        points["equal_error"]["threshold"],
    )
    return _jsonable(summary)


def _plot_histograms(y: np.ndarray, p: np.ndarray, threshold: float, path: Path) -> None:
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    bins = np.linspace(0.0, 1.0, 51)
    ax.hist(p[y == 1], bins=bins, histtype="stepfilled", alpha=0.5, color="C0", label=f"true ({(y == 1).sum()})")
    ax.hist(p[y == 0], bins=bins, histtype="step", lw=2, color="C3", label=f"false ({(y == 0).sum()})")
    ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:.3f}")
    ax.set_yscale("log")
    ax.set(xlabel="P(real)", ylabel="test stamps", title="P(real) of the test frames")
    ax.legend(fontsize="small")
    _save(fig, path)


def _roc_points(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FPR and TPR at every score threshold, from (1, 1) down to (0, 0)."""
    grid = np.r_[-np.inf, np.unique(p), np.inf]
    r = _rates(confusion_counts(y, p, grid))
    return r["fpr"], 1.0 - r["fnr"]


def _plot_roc(y: np.ndarray, p: np.ndarray, auc: float, path: Path) -> None:
    fpr, tpr = _roc_points(y, p)
    fig = Figure(figsize=(5.0, 4.6), layout="constrained")
    ax = fig.subplots()
    ax.plot(fpr, tpr, color="C0", label=f"AUC = {auc:.4f}")
    ax.plot([0, 1], [0, 1], color="0.6", ls=":", lw=1)
    ax.set(
        xlabel="false positive rate",
        ylabel="true positive rate",
        title="ROC (test frames)",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    ax.legend(loc="lower right")
    _save(fig, path)


def _plot_det(y: np.ndarray, p: np.ndarray, points: dict, path: Path) -> None:
    fpr, tpr = _roc_points(y, p)
    fnr = 1.0 - tpr
    # probit axes; rates of 0 or 1 are drawn at half a stamp from the edge
    lo = 0.5 / max(len(y), 1)

    def z(rate: np.ndarray | float) -> np.ndarray:
        return norm.ppf(np.clip(rate, lo, 1 - lo))

    fig = Figure(figsize=(5.0, 4.6), layout="constrained")
    ax = fig.subplots()
    ax.plot(z(fpr), z(fnr), color="C0")
    ee = points["equal_error"]
    ax.plot(z(ee["fpr"]), z(ee["fnr"]), "o", color="C3", label=f"equal error {ee['rate']:.3f}")
    ticks = np.array([0.0001, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8])
    for setter in (ax.set_xticks, ax.set_yticks):
        setter(norm.ppf(ticks), [f"{100 * t:g}" for t in ticks])
    lim = (float(norm.ppf(0.7 * min(lo, 0.001))), float(norm.ppf(0.9)))
    ax.set(
        xlim=lim,
        ylim=lim,
        xlabel="false positive rate (%)",
        ylabel="false negative rate (%)",
        title="DET (probit axes)",
    )
    ax.legend(fontsize="small")
    _save(fig, path)


def _plot_error_rates(y: np.ndarray, p: np.ndarray, points: dict, threshold: float, path: Path) -> None:
    t = np.linspace(0.0, 1.0, 1001)
    r = _rates(confusion_counts(y, p, t))
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    ax.plot(t, r["fnr"], color="C0", label="FNR (trues below t)")
    ax.plot(t, r["fpr"], color="C3", label="FPR (falses at or above t)")
    ee = points["equal_error"]
    ax.plot(ee["threshold"], ee["rate"], "ko", label=f"equal error {ee['rate']:.3f} at t={ee['threshold']:.3f}")
    for key, colour, name in (("fnr_target", "C0", "FNR"), ("fpr_target", "C3", "FPR")):
        if points[key]["threshold"] <= 1.0:
            ax.axvline(
                points[key]["threshold"],
                color=colour,
                ls=":",
                lw=1,
                label=f"{name} 1 % at t={points[key]['threshold']:.3f}",
            )
    ax.axvline(threshold, color="k", ls="--", lw=1, label=f"chosen t={threshold:.3f}")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set(xlabel="threshold t on P(real)", ylabel="error rate", ylim=(0, 1.05), title="error rates")
    ax.legend(fontsize="small")
    _save(fig, path)


def _plot_metrics(y: np.ndarray, p: np.ndarray, threshold: float, path: Path) -> None:
    t = np.linspace(0.0, 1.0, 1001)
    r = _rates(confusion_counts(y, p, t))
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    for k, name in enumerate(("precision", "recall", "f1", "mcc")):
        ax.plot(t, r[name], color=f"C{k}", label=name)
    best = int(np.argmax(r["mcc"]))
    ax.plot(t[best], r["mcc"][best], "o", color="C3", label=f"max MCC {r['mcc'][best]:.3f} at t={t[best]:.3f}")
    ax.axvline(threshold, color="k", ls="--", lw=1, label=f"chosen t={threshold:.3f}")
    ax.set(xlabel="threshold t on P(real)", ylabel="score", ylim=(-0.05, 1.05), title="scores vs threshold")
    ax.legend(fontsize="small", loc="lower center")
    _save(fig, path)


def _mag_bins(mags: np.ndarray) -> np.ndarray:
    """0.5-mag bins aligned on multiples of 0.5 (one bin when there is no magnitude)."""
    if len(mags) == 0:
        return np.array([0.0, 0.5])
    lo = math.floor(float(mags.min()) / 0.5) * 0.5
    hi = math.floor(float(mags.max()) / 0.5) * 0.5 + 0.5
    return np.arange(lo, hi + 0.25, 0.5)


def _plain_efficiency(paths: Sequence[str | os.PathLike], test_frames: set[str]) -> tuple[np.ndarray, np.ndarray]:
    """Injected magnitudes and detected flags of the crossmatch rows of the test frames."""
    mags, det = [], []
    for path in paths:
        t = read_table(path)
        if not {"mag", "detected"} <= set(t.colnames):
            raise InputError(f"crossmatch table '{path}' lacks column mag or detected: rerun the crossmatch stage")
        images = np.asarray(t["image"]).astype(str) if "image" in t.colnames else np.full(len(t), Path(path).stem)
        keep = np.array([parse_image(i)[0] in test_frames for i in images], dtype=bool)
        mags.append(np.asarray(t["mag"], dtype=float)[keep])
        det.append(np.asarray(t["detected"], dtype=bool)[keep])
    return (np.concatenate(mags), np.concatenate(det)) if mags else (np.zeros(0), np.zeros(0, dtype=bool))


def _plot_efficiency(
    mags: np.ndarray, p: np.ndarray, thresholds: list[float], plain: tuple[np.ndarray, np.ndarray] | None, path: Path
) -> None:
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    all_mags = mags if plain is None else np.concatenate([mags, plain[0][np.isfinite(plain[0])]])
    bins = _mag_bins(all_mags)
    if plain is not None and len(plain[0]):
        eff = efficiency(plain[0], plain[1], bins)
        ok = eff["n"] > 0
        ax.step(eff["mag_mid"][ok], eff["eff"][ok], where="mid", color="k", ls="--", label="detected (plain)")
    for k, t in enumerate(thresholds):
        eff = efficiency(mags, p >= t, bins)
        ok = eff["n"] > 0
        ax.errorbar(
            eff["mag_mid"][ok],
            eff["eff"][ok],
            yerr=[(eff["eff"] - eff["eff_lo"])[ok], (eff["eff_hi"] - eff["eff"])[ok]],
            fmt="o-",
            ms=4,
            capsize=2,
            color=f"C{k}",
            label=f"P(real) >= {t:g}",
        )
    if len(mags) == 0:
        log.warning("checkinfer: no injected true stamp with a magnitude in the test frames: efficiency plot empty")
        ax.text(0.5, 0.5, "no injected true stamp", transform=ax.transAxes, ha="center")
    ax.set(
        xlabel="injected magnitude",
        ylabel="fraction of injected trues kept",
        ylim=(-0.03, 1.05),
        title="efficiency of the classifier (test frames)",
    )
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    _save(fig, path)


def _plot_reliability(y: np.ndarray, p: np.ndarray, ece: float, path: Path) -> None:
    edges = np.linspace(0.0, 1.0, _CAL_BINS + 1)
    idx = np.minimum((p * _CAL_BINS).astype(int), _CAL_BINS - 1)
    n = np.bincount(idx, minlength=_CAL_BINS)
    ok = n > 0
    mean_p = np.bincount(idx, weights=p, minlength=_CAL_BINS)[ok] / n[ok]
    frac = np.bincount(idx, weights=y.astype(float), minlength=_CAL_BINS)[ok] / n[ok]
    fig = Figure(figsize=(5.0, 5.6), layout="constrained")
    ax, ax_n = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    ax.plot([0, 1], [0, 1], color="0.6", ls=":", lw=1)
    ax.plot(mean_p, frac, "o-", color="C0", label=f"ECE = {ece:.4f}")
    ax.set(ylabel="fraction of true stamps", title="reliability (test frames)", ylim=(-0.03, 1.03))
    ax.legend(loc="upper left")
    ax_n.bar(0.5 * (edges[:-1] + edges[1:]), n, width=1.0 / _CAL_BINS, color="0.6")
    ax_n.set_yscale("log")
    ax_n.set(xlabel="mean P(real) in bin", ylabel="stamps", xlim=(0, 1))
    _save(fig, path)


def _plot_confusion(at: dict[str, np.ndarray], threshold: float, path: Path) -> None:
    counts = np.array([[at["tn"][0], at["fp"][0]], [at["fn"][0], at["tp"][0]]], dtype=float)
    frac = counts / counts.sum(axis=1, keepdims=True)
    fig = Figure(figsize=(4.6, 4.0), layout="constrained")
    ax = fig.subplots()
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(2):
        for j in range(2):
            ax.text(
                j,
                i,
                f"{int(counts[i, j])}\n{100 * frac[i, j]:.1f} %",
                ha="center",
                va="center",
                color="white" if frac[i, j] > 0.5 else "black",
            )
    ax.set_xticks([0, 1], ["bogus", "real"])
    ax.set_yticks([0, 1], ["false", "true"])
    ax.set(xlabel="predicted", ylabel="label", title=f"confusion at P(real) >= {threshold:.3f}")
    _save(fig, path)


def _gallery_source(datacube_path: str | os.PathLike, table: Table) -> tuple[np.ndarray, list[str]]:
    """Normalised datacube stamps of the table's rows (in table order) and the channel names."""
    cube = load_datacube(datacube_path)
    sel = np.flatnonzero(np.isin(cube["frame"].astype(str), list(table.meta["test_frames"])))
    return cube["X"][sel], [str(c) for c in cube["channels"]]


def _stamp(
    training_dir: str | os.PathLike | None, table: Table, i: int, fallback: np.ndarray, channels: list[str]
) -> np.ndarray:
    """Normalised stamp of row ``i``: its cutout file in ``training_dir`` when found, else the datacube's."""
    if training_dir is not None:
        for sub in ("true", "false"):
            path = Path(training_dir) / sub / f"{table['id'][i]}.fits"
            if path.exists():
                with fits.open(path, memmap=False) as hdul:
                    names = [h.name for h in hdul]
                    if all(c in names for c in channels):
                        return normalise(np.stack([np.asarray(hdul[c].data, dtype=np.float32) for c in channels]))
    return fallback


def _plot_gallery(stamps: list[np.ndarray], titles: list[str], channels: list[str], what: str, path: Path) -> None:
    ncol = 4
    nrow = max(1, math.ceil(len(stamps) / ncol))
    fig = Figure(figsize=(3.2 * ncol, 1.7 * nrow + 0.6), layout="constrained")
    axes = fig.subplots(nrow, ncol, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, stamp, title in zip(axes, stamps, titles):
        gap = np.full((stamp.shape[-2], 1), np.nan, dtype=np.float32)
        row = np.hstack([part for c in stamp for part in (c, gap)][:-1])
        ax.imshow(row, origin="lower", cmap="gray", vmin=_VMIN, vmax=_VMAX, interpolation="nearest")
        ax.set_title(title, fontsize=7)
    fig.suptitle(f"{what} ({' | '.join(channels)}, robust sigma units)", fontsize=9)
    if not stamps:
        axes[0].text(0.5, 0.5, "none", ha="center", transform=axes[0].transAxes)
    _save(fig, path)


def _fwhm_ratio(
    table: Table,
    training_dir: str | os.PathLike | None,
    inject_dir: str | os.PathLike | None,
    threshold: float,
    path: Path,
) -> bool:
    """Draw the FWHM ratio histogram; False (with a warning) when the FWHMs are not available."""
    if training_dir is None:
        log.warning("checkinfer: no training_dir given: FWHM ratio plot skipped (the FWHMs are in the cutout headers)")
        return False
    inject_dir = Path(training_dir).parent / "sim" / "inject" if inject_dir is None else Path(inject_dir)
    psf_fwhm: dict[str, float] = {}
    for image in sorted(set(table["image"])):
        truth = inject_dir / f"{image}.ecsv"
        if truth.exists():
            t = read_table(truth)
            if "psf_fwhm" in t.colnames and len(t):
                psf_fwhm[image] = float(np.nanmedian(np.asarray(t["psf_fwhm"], dtype=float)))
    ratio = np.full(len(table), np.nan)
    for i, (cid, image) in enumerate(zip(table["id"], table["image"])):
        if image not in psf_fwhm:
            continue
        for sub in ("true", "false"):
            cutout = Path(training_dir) / sub / f"{cid}.fits"
            if cutout.exists():
                value = fits.getheader(cutout, 0).get("FWHM")
                if isinstance(value, (int, float)):
                    ratio[i] = float(value) / psf_fwhm[image]
                break
    ok = np.isfinite(ratio)
    if not ok.any():
        log.warning(
            "checkinfer: no test candidate has both a cutout FWHM in '%s' and a psf_fwhm in '%s': FWHM ratio "
            "plot skipped",
            training_dir,
            inject_dir,
        )
        return False
    y = np.asarray(table["y"])
    p = np.asarray(table["label1"], dtype=float)
    hi = max(3.0, float(np.nanpercentile(ratio[ok], 99)))
    bins = np.linspace(0.0, hi, 61)
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    ax.hist(ratio[ok], bins=bins, histtype="stepfilled", color="0.8", label=f"all candidates ({ok.sum()})")
    ax.hist(
        ratio[ok & (y == 1)],
        bins=bins,
        histtype="step",
        lw=2,
        color="C0",
        label=f"simulated (true) ({(ok & (y == 1)).sum()})",
    )
    ax.hist(
        ratio[ok & (p >= threshold)],
        bins=bins,
        histtype="step",
        lw=1,
        ls="--",
        color="C3",
        label=f"P(real) >= {threshold:.3f} ({(ok & (p >= threshold)).sum()})",
    )
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set(xlabel="candidate FWHM / PSF FWHM of its image", ylabel="test candidates", title="FWHM ratio")
    ax.legend(fontsize="small")
    _save(fig, path)
    return True
