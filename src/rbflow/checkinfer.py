"""Threshold diagnostics of a trained real/bogus model on its test frames (the older tool's cnn_checkinfer).

:func:`evaluate_test_split` classifies every datacube stamp of the frames that ``model.json`` holds
out as the test set (no stamp of a training or validation frame), with the same model loading and
prediction path as :mod:`rbflow.infer`. :func:`run_checkinfer` turns these predictions into the
plots and numbers needed to choose a threshold: score histograms, ROC and DET curves, error rates
and precision/recall/F1/MCC against the threshold, detection efficiency against injected magnitude,
a reliability diagram, the confusion matrix, galleries of the worst mistakes and the FWHM ratio of
the candidates. On a synthetic sky, :func:`kind_table` and its plots show the scores per truth kind
(what each candidate sits on: a star, a cosmic ray, the reference's bleed trail...), so that one sees
which artefacts the model still lets through. Figures are made with :class:`matplotlib.figure.Figure`
(Agg canvas), never pyplot.

Threshold conventions
---------------------
A candidate is kept (called real) when ``P(real) >= t``. FNR is the fraction of true stamps with
``P < t``, FPR the fraction of false stamps with ``P >= t``.
"""

from __future__ import annotations

import html
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from astropy.io import fits
from astropy.table import Table

from rbflow.datacube import crop_stamps, load_datacube, normalise
from rbflow.errors import InputError
from rbflow.frames import parse_image
from rbflow.infer import check_compatible, load_model, predict
from rbflow.io import atomic_path, file_sha256, jsonable, made_by, read_table, write_figure, write_json, write_table
from rbflow.metrics import (
    ECE_BINS,
    binary_metrics,
    confusion_counts,
    confusion_rates,
    efficiency,
    expected_calibration_error,
    operating_points,
    reliability,
    roc_auc,
    roc_curve,
)
from rbflow.seeds import derive

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["FILES", "evaluate_test_split", "kind_table", "run_checkinfer"]

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
    "kinds": "kinds.png",
    "kinds_gallery": "kinds_gallery.png",
    "kinds_table": "kinds.ecsv",
    "kinds_html": "kinds.html",
    "summary": "summary.json",
    "predictions": "test_predictions.ecsv",
}

#: Target error rate of the FNR and FPR operating points.
_TARGET_RATE = 0.01
#: Stamps per gallery of worst mistakes.
_GALLERY = 16
#: Example stamps per row (truth kind and label) of the kind gallery.
_KIND_EXAMPLES = 4
#: How a kind shows in the plots and the HTML table when a candidate sits on nothing known.
_NO_KIND = "(none)"
#: Display range of normalised stamps (robust sigma units).
_VMIN, _VMAX = -4.0, 12.0


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
        magnitude of injected trues, NaN otherwise), snr, truth_kind (``''`` when unknown), label0 =
        P(bogus), label1 = P(real).

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
    if trained_on and trained_on != file_sha256(datacube_path):
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
            "truth_kind": cube["truth_kind"][sel].astype(str),
            "label0": 1.0 - p_real,
            "label1": p_real,
        }
    )
    table.meta.update(
        {
            "made_by": made_by("rbflow.checkinfer.evaluate_test_split"),
            "datacube": str(datacube_path),
            "model": str(model_path),
            "test_frames": test_frames,
            "model_threshold": float(meta["threshold"]),
            "columns": "y = label (1 real); label0 = P(bogus), label1 = P(real), calibrated",
        }
    )
    log.info("test split: %d stamps of %d frames (%d true)", len(table), len(test_frames), int(table["y"].sum()))
    return table


def _figure(figsize: tuple[float, float]) -> Figure:
    """A matplotlib figure on the Agg canvas with constrained layout (matplotlib imported here, when plotting)."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def _save(fig: Figure, path: Path) -> None:
    write_figure(fig, path, dpi=110)


def run_checkinfer(
    datacube_path: str | os.PathLike,
    model_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    threshold: float | None = None,
    thresholds: Sequence[float] = (0.1, 0.5, 0.7),
    cutout_dirs: Sequence[str | os.PathLike] = (),
    truth_paths: Sequence[str | os.PathLike] = (),
    crossmatch_paths: Sequence[str | os.PathLike] | None = None,
    seed: int = 0,
    threads: int | None = None,
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
      the cutout files in ``cutout_dirs`` when found there, else of the datacube; normalised);
    * ``fwhm_ratio.png``: candidate FWHM (cutout header) / PSF FWHM of its image (median
      ``psf_fwhm`` of the injection truth table) for the true and all test candidates; it says so
      (and a warning is logged) when no candidate has both FWHMs;
    * ``kinds.png``: P(real) of the test stamps per truth kind and label (:func:`kind_table`), each
      stamp a dot, with the median, the threshold and per row the count and the fraction kept;
      ``kinds_gallery.png``: up to 4 stamps per row, the bogus ones with the highest P(real) (what
      gets through) and the real ones with the lowest; ``kinds.ecsv`` and ``kinds.html``: the table
      (also under ``kinds`` in ``summary.json``); the kind is ``''`` (shown ``(none)``) for stamps that
      sit on nothing known and on real frames;
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
    cutout_dirs : sequence of path-like, optional
        Folders of cutout files ``{id}.fits`` (e.g. the per-image cutout folders, or ``true/`` and
        ``false/`` of the training folder): gallery stamps and candidate FWHMs (header ``FWHM``,
        pixels). The first file of an id wins.
    truth_paths : sequence of path-like, optional
        Injection truth tables ``{image}.ecsv`` (the file name gives the image; column ``psf_fwhm``,
        pixels).
    crossmatch_paths : sequence of path-like, optional
        Per-injected-source crossmatch tables (columns mag, detected; ``image`` or the file name
        gives the image); only rows of test frames are used.
    seed : int, optional
        Seed of the bootstrap intervals of AUC, accuracy, MCC and ECE, and of the jitter of the dots
        of ``kinds.png``.
    threads : int, optional
        CPU threads of torch's operators for the test-split inference (``torch.set_num_threads``);
        default: torch's own choice.

    Returns
    -------
    dict
        Content of ``summary.json``: ``threshold`` (chosen, and its source), ``auc``, the operating
        points of :func:`operating_points` (``fnr_1pct``, ``fpr_1pct``, ``equal_error``),
        ``at_threshold`` (accuracy, precision, recall, f1, mcc, fpr, fnr, ece and the confusion
        counts tp, fp, tn, fn), ``bootstrap`` (95 % intervals of auc, accuracy, mcc, ece),
        ``efficiency`` (per threshold: injected trues with ``P >= t``), ``counts`` (with
        ``n_fwhm_ratio``, the candidates of the FWHM-ratio plot), ``kinds`` (the rows of
        :func:`kind_table`) and ``files``.

    Raises
    ------
    InputError
        Bad datacube or model, an empty test split, or a test split with a single class.
    """
    out_dir = Path(out_dir)
    if threads is not None:
        import torch

        torch.set_num_threads(int(threads))
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

    points = operating_points(y, p, rate=_TARGET_RATE)
    at = confusion_counts(y, p, np.array([threshold]))
    at_rates = {k: float(v[0]) for k, v in confusion_rates(at).items()}
    boot = binary_metrics(y, p, threshold=threshold, seed=derive(seed, "checkinfer", "bootstrap"))
    ece = expected_calibration_error(y, p, bins=ECE_BINS)
    auc = roc_auc(y, p)
    injected = (y == 1) & np.isfinite(np.asarray(table["mag"], dtype=float))
    summary: dict[str, Any] = {
        "made_by": made_by("rbflow.checkinfer.run_checkinfer"),
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

    cutouts = _cutout_index(cutout_dirs)
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
    cube = load_datacube(datacube_path)
    X = cube["X"][np.flatnonzero(np.isin(cube["frame"].astype(str), list(table.meta["test_frames"])))]
    channels = [str(c) for c in cube["channels"]]
    del cube
    _plot_galleries(X, channels, table, cutouts, at, threshold, out_dir)
    summary["counts"]["n_fwhm_ratio"] = _fwhm_ratio(
        table, cutouts, truth_paths, threshold, out_dir / FILES["fwhm_ratio"]
    )
    kinds = kind_table(table, threshold)
    write_table(kinds, out_dir / FILES["kinds_table"])
    _write_kind_html(kinds, threshold, out_dir / FILES["kinds_html"])
    _plot_kinds(table, kinds, threshold, derive(seed, "checkinfer", "kinds"), out_dir / FILES["kinds"])
    _plot_kind_gallery(X, channels, table, kinds, cutouts, out_dir / FILES["kinds_gallery"])
    summary["kinds"] = [{name: row[name] for name in kinds.colnames} for row in kinds]
    summary["files"] = sorted(FILES.values())
    write_json(summary, out_dir / FILES["summary"])
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
    return jsonable(summary)


def _plot_histograms(y: np.ndarray, p: np.ndarray, threshold: float, path: Path) -> None:
    fig = _figure((6.4, 4.4))
    ax = fig.subplots()
    bins = np.linspace(0.0, 1.0, 51)
    ax.hist(p[y == 1], bins=bins, histtype="stepfilled", alpha=0.5, color="C0", label=f"true ({(y == 1).sum()})")
    ax.hist(p[y == 0], bins=bins, histtype="step", lw=2, color="C3", label=f"false ({(y == 0).sum()})")
    ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:.3f}")
    ax.set_yscale("log")
    ax.set(xlabel="P(real)", ylabel="test stamps", title="P(real) of the test frames")
    ax.legend(fontsize="small")
    _save(fig, path)


def _plot_roc(y: np.ndarray, p: np.ndarray, auc: float, path: Path) -> None:
    fpr, tpr = roc_curve(y, p)
    fig = _figure((5.0, 4.6))
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
    from scipy.stats import norm

    fpr, tpr = roc_curve(y, p)
    fnr = 1.0 - tpr
    # probit axes; rates of 0 or 1 are drawn at half a stamp from the edge
    lo = 0.5 / max(len(y), 1)

    def z(rate: np.ndarray | float) -> np.ndarray:
        return norm.ppf(np.clip(rate, lo, 1 - lo))

    fig = _figure((5.0, 4.6))
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
    r = confusion_rates(confusion_counts(y, p, t))
    fig = _figure((6.4, 4.4))
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
    r = confusion_rates(confusion_counts(y, p, t))
    fig = _figure((6.4, 4.4))
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
    fig = _figure((6.4, 4.4))
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
    rel = reliability(y, p, bins=ECE_BINS)
    edges = rel["edges"]
    fig = _figure((5.0, 5.6))
    ax, ax_n = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    ax.plot([0, 1], [0, 1], color="0.6", ls=":", lw=1)
    ax.plot(rel["mean_p"], rel["frac_real"], "o-", color="C0", label=f"ECE = {ece:.4f}")
    ax.set(ylabel="fraction of true stamps", title="reliability (test frames)", ylim=(-0.03, 1.03))
    ax.legend(loc="upper left")
    ax_n.bar(0.5 * (edges[:-1] + edges[1:]), rel["n"], width=1.0 / ECE_BINS, color="0.6")
    ax_n.set_yscale("log")
    ax_n.set(xlabel="mean P(real) in bin", ylabel="stamps", xlim=(0, 1))
    _save(fig, path)


def _plot_confusion(at: dict[str, np.ndarray], threshold: float, path: Path) -> None:
    counts = np.array([[at["tn"][0], at["fp"][0]], [at["fn"][0], at["tp"][0]]], dtype=float)
    frac = counts / counts.sum(axis=1, keepdims=True)
    fig = _figure((4.6, 4.0))
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


def _cutout_index(cutout_dirs: Sequence[str | os.PathLike]) -> dict[str, Path]:
    """Candidate id -> its cutout file ``{id}.fits``, over the folders (the first folder holding an id wins)."""
    index: dict[str, Path] = {}
    for folder in map(Path, cutout_dirs):
        if not folder.is_dir():
            raise InputError(f"cutout folder '{folder}' does not exist: run the cutouts stage or fix the path")
        for path in sorted(folder.glob("*.fits")):
            if not path.name.startswith("."):
                index.setdefault(path.stem, path)
    return index


def _stamp(cutouts: dict[str, Path], cand_id: str, fallback: np.ndarray, channels: list[str]) -> np.ndarray:
    """Normalised stamp of a candidate: of its cutout file when indexed and holding the channels, else ``fallback``."""
    path = cutouts.get(cand_id)
    if path is not None:
        with fits.open(path, memmap=False) as hdul:
            names = [h.name for h in hdul]
            if all(c in names for c in channels):
                return normalise(np.stack([np.asarray(hdul[c].data, dtype=np.float32) for c in channels]))
    return fallback


def _plot_galleries(
    X: np.ndarray,
    channels: list[str],
    table: Table,
    cutouts: dict[str, Path],
    at: dict[str, np.ndarray],
    threshold: float,
    out_dir: Path,
) -> None:
    """The galleries of the worst false positives and false negatives (stamps of ``cutouts``, else ``X``'s)."""
    y = np.asarray(table["y"])
    p = np.asarray(table["label1"], dtype=float)
    fp_idx = np.flatnonzero(y == 0)[np.argsort(-p[y == 0], kind="stable")][:_GALLERY]
    fn_idx = np.flatnonzero(y == 1)[np.argsort(p[y == 1], kind="stable")][:_GALLERY]
    for key, idx, what in (
        ("false_positives", fp_idx, f"false stamps with the highest P(real) ({at['fp'][0]} at P >= {threshold:.3f})"),
        ("false_negatives", fn_idx, f"true stamps with the lowest P(real) ({at['fn'][0]} at P < {threshold:.3f})"),
    ):
        stamps = [_stamp(cutouts, str(table["id"][i]), X[i], channels) for i in idx]
        _plot_gallery(stamps, [f"P={p[i]:.3f}\n{table['id'][i]}" for i in idx], channels, what, out_dir / FILES[key])


def _channel_row(stamp: np.ndarray) -> np.ndarray:
    """The channels of a ``(C, S, S)`` stamp side by side, one NaN column between them."""
    gap = np.full((stamp.shape[-2], 1), np.nan, dtype=np.float32)
    return np.hstack([part for c in stamp for part in (c, gap)][:-1])


def _plot_gallery(stamps: list[np.ndarray], titles: list[str], channels: list[str], what: str, path: Path) -> None:
    ncol = 4
    nrow = max(1, math.ceil(len(stamps) / ncol))
    fig = _figure((3.2 * ncol, 1.7 * nrow + 0.6))
    axes = fig.subplots(nrow, ncol, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, stamp, title in zip(axes, stamps, titles):
        ax.imshow(_channel_row(stamp), origin="lower", cmap="gray", vmin=_VMIN, vmax=_VMAX, interpolation="nearest")
        ax.set_title(title, fontsize=7)
    fig.suptitle(f"{what} ({' | '.join(channels)}, robust sigma units)", fontsize=9)
    if not stamps:
        axes[0].text(0.5, 0.5, "none", ha="center", transform=axes[0].transAxes)
    _save(fig, path)


def _fwhm_ratio(
    table: Table,
    cutouts: dict[str, Path],
    truth_paths: Sequence[str | os.PathLike],
    threshold: float,
    path: Path,
) -> int:
    """Draw the FWHM ratio histogram; return the number of candidates in it (0: the plot says why, with a warning)."""
    psf_fwhm: dict[str, float] = {}
    for truth in map(Path, truth_paths):
        t = read_table(truth)
        if "psf_fwhm" in t.colnames and len(t):
            psf_fwhm[truth.stem] = float(np.nanmedian(np.asarray(t["psf_fwhm"], dtype=float)))
    ratio = np.full(len(table), np.nan)
    for i, (cid, image) in enumerate(zip(table["id"], table["image"])):
        cutout = cutouts.get(str(cid))
        if image in psf_fwhm and cutout is not None:
            value = fits.getheader(cutout, 0).get("FWHM")
            if isinstance(value, (int, float)):
                ratio[i] = float(value) / psf_fwhm[image]
    ok = np.isfinite(ratio)
    y = np.asarray(table["y"])
    p = np.asarray(table["label1"], dtype=float)
    fig = _figure((6.4, 4.4))
    ax = fig.subplots()
    if ok.any():
        hi = max(3.0, float(np.nanpercentile(ratio[ok], 99)))
        bins = np.linspace(0.0, hi, 61)
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
        ax.legend(fontsize="small")
    else:
        log.warning(
            "checkinfer: no test candidate has both a cutout FWHM (%d cutout files given) and a psf_fwhm (%d truth "
            "tables given): FWHM ratio plot empty",
            len(cutouts),
            len(truth_paths),
        )
        ax.text(0.5, 0.5, "no candidate with a cutout FWHM and a PSF FWHM", transform=ax.transAxes, ha="center")
    ax.set(xlabel="candidate FWHM / PSF FWHM of its image", ylabel="test candidates", title="FWHM ratio")
    _save(fig, path)
    return int(ok.sum())


def kind_table(table: Table, threshold: float) -> Table:
    """P(real) per truth kind and label of the test stamps: which artefacts the model lets through.

    Parameters
    ----------
    table : astropy.table.Table
        Test-split predictions of :func:`evaluate_test_split` (columns truth_kind, y, label1).
    threshold : float
        Threshold on P(real): a stamp is kept when ``P(real) >= threshold``.

    Returns
    -------
    astropy.table.Table
        One row per (kind, label) present: kind (``''``: nothing known under the stamp, or no truth,
        e.g. real frames), label ('true' or 'false', the folder's), n, median_p_real, n_kept and
        frac_kept. The bogus rows come first, most kept first; then the real rows, least kept first
        (ties by kind).
    """
    kinds = np.asarray(table["truth_kind"]).astype(str)
    y = np.asarray(table["y"], dtype=np.int64)
    p = np.asarray(table["label1"], dtype=float)
    rows = []
    for kind in sorted(set(kinds)):
        for label in (0, 1):
            sel = (kinds == kind) & (y == label)
            if sel.any():
                kept = int((p[sel] >= threshold).sum())
                rows.append(
                    (
                        kind,
                        "true" if label else "false",
                        int(sel.sum()),
                        float(np.median(p[sel])),
                        kept,
                        kept / sel.sum(),
                    )
                )
    rows.sort(key=lambda r: (r[1] == "true", -r[5] if r[1] == "false" else r[5], r[0]))
    out = Table(
        rows=rows or None,
        names=("kind", "label", "n", "median_p_real", "n_kept", "frac_kept"),
        dtype=[str, str, np.int64, float, np.int64, float],
    )
    out.meta.update(
        {
            "made_by": made_by("rbflow.checkinfer.kind_table"),
            "threshold": float(threshold),
            "columns": "kind = truth kind under the stamp ('' = none known; 'ref:' = in the reference frame); "
            "label = the training folder's; kept = P(real) >= threshold",
        }
    )
    return out


def _kind_name(kind: str) -> str:
    return kind or _NO_KIND


def _write_kind_html(kinds: Table, threshold: float, path: Path) -> None:
    """The per-kind table as a small self-contained HTML page (shown in the Snakemake report)."""
    head = "".join(f"<th>{h}</th>" for h in ("truth kind", "label", "n", "median P(real)", "kept", "fraction kept"))
    body = "".join(
        f"<tr class='{row['label']}'><td>{html.escape(_kind_name(str(row['kind'])))}</td><td>{row['label']}</td>"
        f"<td>{row['n']}</td><td>{row['median_p_real']:.3f}</td><td>{row['n_kept']}</td>"
        f"<td>{100 * row['frac_kept']:.1f} %</td></tr>"
        for row in kinds
    )
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>P(real) per truth kind</title><style>"
        "body{font-family:sans-serif;font-size:14px}table{border-collapse:collapse}"
        "td,th{border:1px solid #bbb;padding:2px 8px;text-align:right}td:first-child{text-align:left}"
        "tr.false td:last-child{color:#b00}</style></head><body>"
        f"<p>Test stamps per truth kind and label; kept: P(real) &ge; {threshold:.3f}. {_NO_KIND}: nothing known "
        "under the stamp; ref:&lt;kind&gt;: a feature of the reference frame.</p>"
        f"<table><tr>{head}</tr>{body}</table></body></html>\n"
    )
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")


def _plot_kinds(table: Table, kinds: Table, threshold: float, seed: int, path: Path) -> None:
    """P(real) per truth kind and label: a dot per stamp (jittered), the median, count and fraction kept."""
    k = np.asarray(table["truth_kind"]).astype(str)
    y = np.asarray(table["y"], dtype=np.int64)
    p = np.asarray(table["label1"], dtype=float)
    rng = np.random.default_rng(seed)
    n_rows = len(kinds)
    fig = _figure((8.0, 1.4 + 0.32 * max(n_rows, 1)))
    ax = fig.subplots()
    for i, row in enumerate(kinds):
        sel = (k == row["kind"]) & (y == (row["label"] == "true"))
        colour = "C0" if row["label"] == "true" else "C3"
        ax.scatter(p[sel], i + rng.uniform(-0.28, 0.28, sel.sum()), s=6, color=colour, alpha=0.5, lw=0)
        ax.plot([row["median_p_real"]] * 2, [i - 0.38, i + 0.38], color="k", lw=2)
    ax.axvline(threshold, color="k", ls="--", lw=1)
    ax.set_yticks(range(n_rows), [f"{_kind_name(str(r['kind']))} ({r['label']})" for r in kinds], fontsize=8)
    right = ax.secondary_yaxis("right")
    right.set_yticks(range(n_rows), [f"n={r['n']}, kept {100 * r['frac_kept']:.0f} %" for r in kinds], fontsize=8)
    ax.set_ylim(n_rows - 0.5, -0.5)
    ax.set(xlim=(-0.02, 1.02), xlabel="P(real)")
    ax.set_title(
        f"P(real) per truth kind (test frames; red bogus, blue real; bar: median; dashed: t={threshold:.3f})",
        fontsize=9,
    )
    if n_rows == 0:
        ax.text(0.5, 0.5, "no test stamp", transform=ax.transAxes, ha="center")
    _save(fig, path)


def _plot_kind_gallery(
    X: np.ndarray, channels: list[str], table: Table, kinds: Table, cutouts: dict[str, Path], path: Path
) -> None:
    """Up to 4 stamps per kind and label: the bogus with the highest P(real), the reals with the lowest."""
    k = np.asarray(table["truth_kind"]).astype(str)
    y = np.asarray(table["y"], dtype=np.int64)
    p = np.asarray(table["label1"], dtype=float)
    nrow = max(1, len(kinds))
    fig = _figure((3.2 * _KIND_EXAMPLES + 1.6, 1.5 * nrow + 0.6))
    # first column: the row's kind, label and count; then the example stamps
    axes = fig.subplots(nrow, 1 + _KIND_EXAMPLES, squeeze=False, width_ratios=[0.5] + [1.0] * _KIND_EXAMPLES)
    for ax in axes.ravel():
        ax.set_axis_off()
    for r, row in enumerate(kinds):
        real = row["label"] == "true"
        idx = np.flatnonzero((k == row["kind"]) & (y == real))
        idx = idx[np.argsort(p[idx] if real else -p[idx], kind="stable")][:_KIND_EXAMPLES]
        axes[r, 0].text(
            0.5,
            0.5,
            f"{_kind_name(str(row['kind']))}\n({row['label']}, n={row['n']})",
            transform=axes[r, 0].transAxes,
            ha="center",
            va="center",
            fontsize=8,
        )
        for c, i in enumerate(idx, start=1):
            stamp = _stamp(cutouts, str(table["id"][i]), X[i], channels)
            axes[r, c].imshow(
                _channel_row(stamp), origin="lower", cmap="gray", vmin=_VMIN, vmax=_VMAX, interpolation="nearest"
            )
            axes[r, c].set_title(f"P={p[i]:.3f}  {table['id'][i]}", fontsize=6)
    if len(kinds) == 0:
        axes[0, 1].text(0.5, 0.5, "none", ha="center", transform=axes[0, 1].transAxes)
    fig.suptitle(
        f"per truth kind: the bogus stamps with the highest P(real), the real ones with the lowest "
        f"({' | '.join(channels)}, robust sigma units)",
        fontsize=9,
    )
    _save(fig, path)
