"""Detection efficiency of injected sources: statistics and the checksim plots.

From the per-injected-source tables of :func:`rbflow.crossmatch.run_crossmatch` this module
computes the detection efficiency per magnitude bin (with Wilson 68 % intervals), fits a
logistic efficiency curve by maximum likelihood, and draws the diagnostic plots: injected
magnitude histograms, efficiency versus magnitude, photometric bias and S/N versus magnitude.
Figures are made with :class:`matplotlib.figure.Figure` (Agg canvas), never with pyplot state.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from astropy.table import Table, vstack

from rbflow.errors import InputError
from rbflow.io import jsonable, made_by, read_table, write_figure, write_json, write_table
from rbflow.metrics import efficiency

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "efficiency",
    "expected_snr",
    "fit_logistic",
    "gaussian_nea",
    "logistic",
    "limiting_mag",
    "frame_limits",
    "image_limit",
    "image_offsets",
    "run_checksim",
]

log = logging.getLogger(__name__)

#: Gaussian sigma per unit FWHM (FWHM = 2 sqrt(2 ln 2) sigma).
_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
#: Columns run_checksim needs in each crossmatch table.
_COLUMNS = ("mag", "detected", "mag_meas", "snr")


def logistic(mag: np.ndarray | float, m50: float, width: float) -> np.ndarray:
    """Efficiency model ``1 / (1 + exp((mag - m50) / width))``."""
    from scipy.special import expit

    return expit(-(np.asarray(mag, dtype=float) - m50) / width)


def fit_logistic(mags: np.ndarray, detected: np.ndarray) -> tuple[float, float]:
    """Maximum-likelihood fit of ``eff(m) = 1 / (1 + exp((m - m50) / width))`` to Bernoulli outcomes.

    Parameters
    ----------
    mags : array-like
        Injected magnitudes.
    detected : array-like of bool
        Whether each source was detected.

    Returns
    -------
    m50, width : float
        Magnitude of 50 % efficiency and the width (mag, > 0); ``m90 = m50 - width * ln 9``.
        Both NaN (with a warning) when the data cannot constrain them: fewer than 2 sources, or
        all detected, or none detected.
    """
    mags = np.asarray(mags, dtype=float)
    detected = np.asarray(detected, dtype=bool)
    ok = np.isfinite(mags)
    mags, detected = mags[ok], detected[ok]
    if len(mags) < 2 or detected.all() or not detected.any():
        log.warning(
            "logistic efficiency fit impossible with %d sources of which %d detected: m50 and width set to NaN",
            len(mags),
            int(detected.sum()),
        )
        return float("nan"), float("nan")
    from scipy.optimize import minimize

    y = detected.astype(float)
    scale = max(float(np.std(mags)), 1e-3)

    def nll(params: np.ndarray) -> float:
        m50, log_w = params
        z = (mags - m50) / np.exp(log_w)
        # log p = -log(1 + e^z), log(1 - p) = z - log(1 + e^z)
        return float(np.sum(np.logaddexp(0.0, z) - (1.0 - y) * z))

    start = np.array([0.5 * (mags[detected].mean() + mags[~detected].mean()), math.log(0.2 * scale)])
    res = minimize(nll, start, method="Nelder-Mead", options={"xatol": 1e-6, "fatol": 1e-9, "maxiter": 4000})
    m50, width = float(res.x[0]), float(math.exp(res.x[1]))
    if not res.success:
        log.warning("logistic efficiency fit did not converge (%s): m50=%.3f width=%.3f", res.message, m50, width)
    return m50, width


def limiting_mag(nea_px: float, sky_sigma_adu: float, zeropoint: float, *, flux_err_corr: float = 1.0) -> float:
    """Theoretical 5-sigma limit of a PSF-weighted point-source measurement on a sky-limited image.

    The optimal (PSF-fit) flux error of a point source with unit-sum PSF ``P`` on white noise
    ``sky_sigma`` is ``sky_sigma * sqrt(NEA)``, ``NEA = 1 / sum(P**2)`` the noise-equivalent area
    (``4 pi sigma**2`` for a well-sampled Gaussian); on a difference image, ``P`` is its PSF
    (``PSFD``, broader than the science PSF: it carries the reference's noise) and the error is
    multiplied by the correlated-noise factor ``FLXECORR`` of the subtraction, as in
    :func:`expected_snr`: the limit is the flux where the expected S/N is 5.

    Parameters
    ----------
    nea_px : float
        Noise-equivalent area (px²) of the image's PSF.
    sky_sigma_adu : float
        Per-pixel noise (ADU).
    zeropoint : float
        Magnitude of 1 ADU.
    flux_err_corr : float, optional
        Factor on the white-noise flux error for correlated noise (``FLXECORR``).

    Returns
    -------
    float
        ``-2.5 log10(5 * sky_sigma * sqrt(nea) * flux_err_corr) + zeropoint`` (mag).

    Raises
    ------
    ValueError
        Non-positive area, noise or factor.
    """
    if not (nea_px > 0 and sky_sigma_adu > 0 and flux_err_corr > 0):
        raise ValueError(
            f"limiting_mag needs NEA > 0 (px²), sky sigma > 0 (ADU) and flux_err_corr > 0, got {nea_px}, "
            f"{sky_sigma_adu} and {flux_err_corr}"
        )
    noise = sky_sigma_adu * math.sqrt(nea_px) * flux_err_corr
    return -2.5 * math.log10(5.0 * noise) + zeropoint


def gaussian_nea(fwhm_px: float) -> float:
    """Noise-equivalent area ``4 pi sigma**2`` (px²) of a well-sampled Gaussian PSF of this FWHM (px)."""
    return 4.0 * math.pi * (fwhm_px * _FWHM_TO_SIGMA) ** 2


def image_limit(crossmatch_path: str | os.PathLike, subtract_path: str | os.PathLike) -> tuple[str, float]:
    """Band and theoretical 5-sigma limiting magnitude of one difference image.

    From its subtraction file: the noise is the median of ``sqrt(VAR)`` (the noise the detection
    sees), the noise-equivalent area ``1 / sum(PSFD**2)`` (median over the tiles) and the
    correlated-noise factor ``FLXECORR``; the zeropoint is the median of the injected sources'
    ``zeropoint``. See :func:`limiting_mag`: the limit is where :func:`expected_snr` is 5 on
    uniform noise.

    Parameters
    ----------
    crossmatch_path, subtract_path : path-like
        The image's per-injected-source crossmatch table and its subtraction MEF.

    Returns
    -------
    tuple of (str, float)
        The band (``filter`` of the table, ``'all'`` without one) and the limit (mag; NaN when the
        table is empty).
    """
    return _table_limit(read_table(crossmatch_path), subtract_path)


def _table_limit(table: Table, subtract_path: str | os.PathLike) -> tuple[str, float]:
    """:func:`image_limit` of a crossmatch table already read."""
    from astropy.io import fits

    band = str(table["filter"][0]) if "filter" in table.colnames and len(table) else "all"
    if len(table) == 0:
        return band, float("nan")
    with fits.open(subtract_path, memmap=True) as hdul:
        var = np.asarray(hdul["VAR"].data)
        sigma = float(np.sqrt(np.nanmedian(var[np.isfinite(var) & (var > 0)])))
        psfd = np.asarray(hdul["PSFD"].data, float)
        corr = float(hdul[0].header.get("FLXECORR", 1.0))
    nea = float(np.median([1.0 / np.sum(p**2) for p in psfd.reshape(-1, *psfd.shape[-2:])]))
    return band, limiting_mag(nea, sigma, float(np.nanmedian(table["zeropoint"])), flux_err_corr=corr)


def frame_limits(
    crossmatch_paths: Sequence[str | os.PathLike], subtract_paths: Sequence[str | os.PathLike]
) -> dict[str, float]:
    """Median theoretical 5-sigma limiting magnitude per band of a set of difference images.

    Parameters
    ----------
    crossmatch_paths, subtract_paths : sequences of path-like
        Per-injected-source crossmatch tables and the matching subtraction MEFs, in the same order
        (see :func:`image_limit`).

    Returns
    -------
    dict of str to float
        Band -> median limiting magnitude over its images (mag).
    """
    per_band: dict[str, list[float]] = {}
    for cm_path, sub_path in zip(crossmatch_paths, subtract_paths, strict=True):
        band, mag = image_limit(cm_path, sub_path)
        if np.isfinite(mag):
            per_band.setdefault(band, []).append(mag)
    return {band: float(np.median(mags)) for band, mags in per_band.items()}


def expected_snr(subtract_path: str | os.PathLike, x: np.ndarray, y: np.ndarray, flux: np.ndarray) -> np.ndarray:
    """Expected S/N of point sources on a difference image, from its local noise.

    The optimal (PSF-weighted) S/N of a source of flux ``f`` in a difference image with PSF
    ``P_D`` and per-pixel variance ``V`` is ``f sqrt(sum(P_D**2 / V))``, divided by the
    correlated-noise factor ``FLXECORR`` of the subtraction. ``VAR`` holds the background and the
    Poisson noise of both frames' sources (a host galaxy or a neighbouring star lowers the S/N),
    but not ZOGY's astrometric-noise term, which only matters on bright-star profiles.

    Parameters
    ----------
    subtract_path : path-like
        MEF written by :func:`rbflow.subtract.run_subtract` (``VAR``, ``PSFD`` with tile centres).
    x, y : numpy.ndarray
        Source positions (0-based pixels of the science frame).
    flux : numpy.ndarray
        Source fluxes (ADU in the science frame).

    Returns
    -------
    numpy.ndarray
        Expected S/N; 0 where the PSF footprint touches a masked (NaN) or off-frame pixel.
    """
    from astropy.io import fits

    with fits.open(subtract_path, memmap=False) as hdul:
        var = np.asarray(hdul["VAR"].data, dtype=float)
        psfd = np.asarray(hdul["PSFD"].data, dtype=float)
        head = hdul["PSFD"].header
        corr = float(hdul[0].header.get("FLXECORR", 1.0))
    centres = np.array([[head[f"TCX{k}"], head[f"TCY{k}"]] for k in range(int(head["NTILES"]))], dtype=float)
    half = psfd.shape[-1] // 2
    out = np.zeros(len(x))
    for k, (xk, yk, fk) in enumerate(zip(np.asarray(x, float), np.asarray(y, float), np.asarray(flux, float))):
        p = psfd[int(np.argmin(np.hypot(centres[:, 0] - xk, centres[:, 1] - yk)))]
        ix, iy = int(round(xk)), int(round(yk))
        v = var[max(iy - half, 0) : iy + half + 1, max(ix - half, 0) : ix + half + 1]
        if v.shape == p.shape and np.all(np.isfinite(v) & (v > 0)):
            out[k] = fk * math.sqrt(float(np.sum(p**2 / v))) / corr
    return out


def image_offsets(crossmatch_paths: Sequence[str | os.PathLike], subtract_paths: Sequence[str | os.PathLike]) -> Table:
    """Each image's 50 % completeness against its own 5-sigma limit.

    The limit is a property of one image (its noise, PSF and zeropoint: :func:`image_limit`), so
    completeness is compared with it image by image: ``m50`` is the logistic fit
    (:func:`fit_logistic`) of the image's isolated injected sources (``on_host`` false, where the
    table has that column: a host adds its own photon noise, which the sky-limited limit leaves
    out). A band's efficiency curve pooled over images of different depths is a mixture whose 50 %
    point is not the median of their limits, however right each limit is.

    Parameters
    ----------
    crossmatch_paths, subtract_paths : sequences of path-like
        Per-injected-source crossmatch tables (one image each) and the matching subtraction MEFs.

    Returns
    -------
    astropy.table.Table
        One row per image: ``image`` (the table's file stem), ``band``, ``n`` (isolated sources),
        ``limiting_mag``, ``m50``, ``width`` and ``offset`` = ``limiting_mag - m50`` (mag; NaN where
        the fit is impossible, e.g. every source detected).
    """
    rows = []
    for cm_path, sub_path in zip(crossmatch_paths, subtract_paths, strict=True):
        table = read_table(cm_path)
        band, limit = _table_limit(table, sub_path)
        iso = ~np.asarray(table["on_host"], bool) if "on_host" in table.colnames else np.ones(len(table), bool)
        m50, width = (
            fit_logistic(np.asarray(table["mag"], float)[iso], np.asarray(table["detected"], bool)[iso])
            if iso.any()
            else (float("nan"), float("nan"))
        )
        rows.append((Path(cm_path).stem, band, int(iso.sum()), limit, m50, width, limit - m50))
    names = ("image", "band", "n", "limiting_mag", "m50", "width", "offset")
    if not rows:
        return Table(names=names, dtype=(str, str, int, float, float, float, float))
    return Table(rows=rows, names=names)


def _offset_summary(per_image: Table | None, band: str) -> dict[str, float | int]:
    """Median per-image ``limiting_mag - m50`` of a band (``'all'``: every image) and how many images gave it."""
    if per_image is None:
        return {}
    sel = np.isfinite(np.asarray(per_image["offset"], float))
    if band != "all":
        sel &= np.asarray(per_image["band"]).astype(str) == band
    offsets = np.asarray(per_image["offset"], float)[sel]
    return {
        "limit_minus_m50_median": float(np.median(offsets)) if len(offsets) else float("nan"),
        "n_images_fitted": int(sel.sum()),
    }


def _bins(mags: np.ndarray) -> np.ndarray:
    """Magnitude bin edges: 0.25 mag with many sources, else 0.5 mag, aligned on multiples."""
    step = 0.25 if len(mags) >= 400 else 0.5
    if len(mags) == 0:
        return np.array([0.0, step])
    lo = math.floor(float(np.min(mags)) / step) * step
    hi = math.floor(float(np.max(mags)) / step) * step + step
    return np.arange(lo, hi + step / 2, step)


def _bias(mags: np.ndarray, delta: np.ndarray, bins: np.ndarray) -> list[dict[str, float]]:
    """Median and robust scatter (1.4826 MAD) of measured - injected magnitude per bin."""
    out = []
    for lo, hi in zip(bins[:-1], bins[1:]):
        d = delta[(mags >= lo) & (mags < hi) & np.isfinite(delta)]
        med = float(np.median(d)) if len(d) else float("nan")
        mad = float(1.4826 * np.median(np.abs(d - med))) if len(d) else float("nan")
        out.append({"mag_mid": float(0.5 * (lo + hi)), "n": int(len(d)), "bias": med, "scatter": mad})
    return out


def _legend(ax: Axes) -> None:
    """Draw the legend only when something is labelled (an empty legend warns)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def _save(fig: Figure, path: Path) -> None:
    write_figure(fig, path, dpi=110)


def run_checksim(
    crossmatch_paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    limiting: dict[str, float] | None = None,
    subtract_paths: Sequence[str | os.PathLike] | None = None,
) -> dict:
    """Efficiency statistics and plots of the injection-recovery test.

    Parameters
    ----------
    crossmatch_paths : sequence of path-like
        Per-injected-source ECSV tables of :func:`rbflow.crossmatch.run_crossmatch` (columns mag,
        detected, mag_meas, snr; ``filter`` optional).
    out_dir : path-like
        Folder of the outputs: ``hist_mag.png``, ``efficiency.png``, ``mag_bias.png``,
        ``snr_mag.png``, ``efficiency.ecsv``, ``summary.json`` and, with ``subtract_paths``,
        ``limits.ecsv`` (:func:`image_offsets`).
    limiting : dict of str to float, optional
        5-sigma limiting magnitude per band (see :func:`limiting_mag`), drawn on the efficiency plot.
    subtract_paths : sequence of path-like, optional
        Subtraction MEFs matching ``crossmatch_paths``; when given, each image's m50 is compared
        with its own limit (:func:`image_offsets`) and, unless ``limiting`` is given, a band's
        limit is the median of its images' limits.

    Returns
    -------
    dict
        The summary written to ``summary.json``: per band and ``all``: n_injected, n_detected,
        m50, m90, width, limiting_mag, bias (per bin: mag_mid, n, bias, scatter) and, with
        ``subtract_paths``, limit_minus_m50_median (median over the images of their limit minus
        their m50, mag) and n_images_fitted.

    Raises
    ------
    InputError
        A table is missing, unreadable or lacks the needed columns.
    """
    out_dir = Path(out_dir)
    per_image = None if subtract_paths is None else image_offsets(crossmatch_paths, subtract_paths)
    if limiting is None and per_image is not None:
        limiting = {
            b: float(
                np.median(per_image["limiting_mag"][(per_image["band"] == b) & np.isfinite(per_image["limiting_mag"])])
            )
            for b in sorted(set(per_image["band"]))
            if np.isfinite(per_image["limiting_mag"][per_image["band"] == b]).any()
        }
    limiting = limiting or {}
    tables = []
    for path in crossmatch_paths:
        table = read_table(path)
        missing = [c for c in _COLUMNS if c not in table.colnames]
        if missing:
            raise InputError(
                f"crossmatch table '{path}' lacks column(s) {', '.join(missing)}: rerun the crossmatch stage"
            )
        tables.append(table[[c for c in (*_COLUMNS, "filter") if c in table.colnames]])
    if tables:
        data = vstack(tables, metadata_conflicts="silent")
    else:
        data = Table({c: np.array([], dtype=bool if c == "detected" else float) for c in _COLUMNS})
    if "filter" not in data.colnames:
        data["filter"] = np.full(len(data), "-", dtype="U1")
    if len(data) == 0:
        log.warning("checksim: no injected source in %d crossmatch table(s): plots will be empty", len(tables))
    mag = np.asarray(data["mag"], dtype=float)
    det = np.asarray(data["detected"], dtype=bool)
    meas = np.asarray(data["mag_meas"], dtype=float)
    snr = np.asarray(data["snr"], dtype=float)
    band = np.asarray(data["filter"]).astype(str)
    bands = sorted(set(band))
    groups = [("all", np.ones(len(data), dtype=bool))] + [(b, band == b) for b in bands]
    bins = _bins(mag)

    summary: dict = {"made_by": made_by("rbflow.checksim.run_checksim"), "bands": {}}
    eff_tables = []
    fitted: dict[str, tuple[float, float]] = {}
    for name, sel in groups:
        eff = efficiency(mag[sel], det[sel], bins)
        eff.add_column(np.full(len(eff), name), name="band", index=0)
        eff_tables.append(eff)
        m50, width = fit_logistic(mag[sel], det[sel])
        fitted[name] = (m50, width)
        summary["bands"][name] = {
            "n_injected": int(sel.sum()),
            "n_detected": int(det[sel].sum()),
            "m50": m50,
            "m90": m50 - width * math.log(9.0),
            "width": width,
            "limiting_mag": limiting.get(name, float("nan")),
            **_offset_summary(per_image, name),
            "bias": _bias(mag[sel & det], meas[sel & det] - mag[sel & det], bins),
        }
    summary = jsonable(summary)  # NaN (no fit, no limit, empty bin) as None, in the file and the result
    eff_all = vstack(eff_tables)
    eff_all.meta.update({"made_by": summary["made_by"], "interval": "Wilson score, 68.3 %"})
    out_dir.mkdir(parents=True, exist_ok=True)
    write_table(eff_all, out_dir / "efficiency.ecsv")
    if per_image is not None:
        per_image.meta["made_by"] = summary["made_by"]
        write_table(per_image, out_dir / "limits.ecsv")
    write_json(summary, out_dir / "summary.json")

    _plot_hist(mag, det, groups, bins, out_dir / "hist_mag.png")
    _plot_efficiency(eff_all, groups, fitted, limiting, bins, out_dir / "efficiency.png", per_image)
    _plot_bias(mag, meas, det, band, bands, bins, out_dir / "mag_bias.png")
    _plot_snr(mag, snr, det, band, bands, out_dir / "snr_mag.png")
    log.info("checksim: %d injected, %d detected; plots in '%s'", len(mag), int(det.sum()), out_dir)
    return summary


def _plot_hist(mag: np.ndarray, det: np.ndarray, groups: list, bins: np.ndarray, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.0 * len(groups), 3.4), layout="constrained")
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    for ax, (name, sel) in zip(axes, groups):
        ax.hist(mag[sel], bins=bins, color="0.7", label=f"injected ({sel.sum()})")
        ax.hist(mag[sel & det], bins=bins, histtype="step", color="C0", lw=2, label=f"detected ({(sel & det).sum()})")
        ax.set(title=f"band {name}", xlabel="injected magnitude", ylabel="sources")
        _legend(ax)
    _save(fig, path)


def _plot_efficiency(
    eff: Table,
    groups: list,
    fitted: dict,
    limiting: dict[str, float],
    bins: np.ndarray,
    path: Path,
    per_image: Table | None,
) -> None:
    """Efficiency per band with its fit and limits; with ``per_image``, a second panel of each image's
    m50 against its own limit (the comparison the pooled curve cannot make)."""
    from matplotlib.figure import Figure

    panels = 1 if per_image is None or len(per_image) == 0 else 2
    fig = Figure(figsize=(6.4 * panels, 4.4), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    ax = axes[0]
    grid = np.linspace(bins[0], bins[-1], 300)
    text = []
    for k, (name, _) in enumerate(groups):
        colour = f"C{k}"
        rows = eff[(eff["band"] == name) & (eff["n"] > 0)]
        ax.errorbar(
            rows["mag_mid"],
            rows["eff"],
            yerr=[rows["eff"] - rows["eff_lo"], rows["eff_hi"] - rows["eff"]],
            fmt="o",
            color=colour,
            ms=4,
            capsize=2,
            label=f"{name}",
        )
        m50, width = fitted[name]
        if np.isfinite(m50):
            ax.plot(grid, logistic(grid, m50, width), color=colour, lw=1)
            text.append(f"{name}: m50={m50:.2f}  m90={m50 - width * math.log(9.0):.2f}")
        if name in limiting and np.isfinite(limiting[name]):
            ax.axvline(limiting[name], color=colour, ls="--", lw=1)
            text.append(f"{name}: 5σ limit={limiting[name]:.2f} (median of the images)")
    ax.text(0.02, 0.03, "\n".join(text), transform=ax.transAxes, fontsize="small", va="bottom")
    ax.set(xlabel="injected magnitude", ylabel="detection efficiency", ylim=(-0.03, 1.05))
    _legend(ax)
    if panels == 2:
        ax = axes[1]
        lim = np.asarray(per_image["limiting_mag"], float)
        m50 = np.asarray(per_image["m50"], float)
        ok = np.isfinite(lim) & np.isfinite(m50)
        text = []
        for k, (name, _) in enumerate(groups[1:], start=1):
            sel = ok & (np.asarray(per_image["band"]).astype(str) == name)
            ax.plot(lim[sel], m50[sel], "o", ms=4, color=f"C{k}", label=name)
            if sel.any():
                text.append(
                    f"{name}: median limit - m50 = {np.median(lim[sel] - m50[sel]):+.2f} mag ({sel.sum()} images)"
                )
        if ok.any():
            lo, hi = float(min(lim[ok].min(), m50[ok].min())) - 0.2, float(max(lim[ok].max(), m50[ok].max())) + 0.2
            line = np.array([lo, hi])
            ax.plot(line, line, color="0.3", lw=1, label="m50 = limit")
            ax.fill_between(line, line - 0.1, line + 0.1, color="0.85", label="± 0.1 mag")
            ax.set(xlim=(lo, hi), ylim=(lo, hi))
        ax.text(0.02, 0.97, "\n".join(text), transform=ax.transAxes, fontsize="small", va="top")
        ax.set(
            xlabel="5σ limit of the image (mag)",
            ylabel="m50 of its isolated injected sources (mag)",
            title="each image against its own limit",
        )
        _legend(ax)
    _save(fig, path)


def _plot_bias(
    mag: np.ndarray, meas: np.ndarray, det: np.ndarray, band: np.ndarray, bands: list[str], bins: np.ndarray, path: Path
) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    delta = meas - mag
    for k, b in enumerate(bands, start=1):
        sel = (band == b) & det & np.isfinite(delta)
        ax.plot(mag[sel], delta[sel], ".", ms=2, alpha=0.4, color=f"C{k}", label=b)
    stats = _bias(mag[det], delta[det], bins)
    mid = np.array([s["mag_mid"] for s in stats])
    med = np.array([s["bias"] for s in stats])
    sca = np.array([s["scatter"] for s in stats])
    ax.errorbar(mid, med, yerr=sca, fmt="s-", color="k", ms=4, capsize=2, label="median ± 1.48 MAD")
    ax.axhline(0.0, color="0.5", lw=0.8)
    finite = delta[det & np.isfinite(delta)]
    if len(finite):
        lim = max(0.2, float(np.percentile(np.abs(finite), 98)))
        ax.set_ylim(-lim, lim)
    ax.set(xlabel="injected magnitude", ylabel="measured - injected (mag)")
    _legend(ax)
    _save(fig, path)


def _plot_snr(
    mag: np.ndarray, snr: np.ndarray, det: np.ndarray, band: np.ndarray, bands: list[str], path: Path
) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    for k, b in enumerate(bands, start=1):
        sel = (band == b) & det & (snr > 0)
        ax.plot(mag[sel], snr[sel], ".", ms=2, alpha=0.5, color=f"C{k}", label=b)
    ax.axhline(5.0, color="0.5", ls="--", lw=0.8)
    if np.any(det & (snr > 0)):
        ax.set_yscale("log")
    ax.set(xlabel="injected magnitude", ylabel="S/N of the matched candidate")
    _legend(ax)
    _save(fig, path)
