"""How clean a difference image is: noise tails, significant blobs and bright-star residuals.

The measures of issue 15, shared by ``bench/realpair.py`` and the real-frame tests, on a
difference image ``DIFF`` (NaN where masked) with its variance map ``VAR`` and the science
frame ``SCI`` (background-subtracted), all on one pixel grid:

* :func:`noise_ratio`: std of DIFF over its robust std (1.4826 x MAD) over the finite pixels;
  1.00 for Gaussian noise, artefacts (residuals, trails) raise it.
* :func:`blobs`: connected regions of the 3x3-box-smoothed DIFF beyond +-5 of its own robust
  std, a 16 px border cut (positive, negative).
* :func:`bright_stars` and :func:`bright_residuals`: stars of SCI brighter than 100 sigma
  (aperture of radius 1 FWHM, background noise only), and how many of them have a >= 5 sigma
  pixel of the smoothed DIFF within 2 FWHM, sigma being the smoothed DIFF's robust std scaled by
  ``sqrt(local VAR / median VAR)`` (so a star's own photon noise is not a residual).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = [
    "BORDER",
    "BLOB_SIGMA",
    "BRIGHT_SNR",
    "robust_std",
    "smoothed",
    "noise_ratio",
    "blobs",
    "bright_stars",
    "bright_residuals",
    "difference_quality",
]

#: Pixels cut from each edge before counting blobs and bright stars.
BORDER = 16
#: Significance (sigma) of a blob or a bright-star residual.
BLOB_SIGMA = 5.0
#: Aperture S/N above which a star is bright.
BRIGHT_SNR = 100.0
_MAD_TO_STD = 1.4826


def robust_std(values: np.ndarray, *, dtype: npt.DTypeLike = float) -> float:
    """1.4826 x the median absolute deviation of the finite values (NaN when there are none).

    ``dtype`` is the precision the medians are taken in (default float64); ``subtract`` keeps its
    float32 planes' own, so that its noise normalisations stay as they were.
    """
    v = np.asarray(values, dtype)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan")
    return float(_MAD_TO_STD * np.median(np.abs(v - np.median(v))))


def smoothed(diff: np.ndarray) -> np.ndarray:
    """3x3 box mean of ``diff`` (NaN counted as 0), NaN where ``diff`` is NaN."""
    from scipy import ndimage

    bad = ~np.isfinite(diff)
    out = ndimage.uniform_filter(np.where(bad, 0.0, diff).astype(np.float64), size=3, mode="constant")
    out[bad] = np.nan
    return out


def noise_ratio(diff: np.ndarray) -> float:
    """std of the finite pixels of ``diff`` over their robust std (1 for Gaussian noise)."""
    finite = np.asarray(diff, float)[np.isfinite(diff)]
    return float(np.std(finite)) / robust_std(finite)


def blobs(diff: np.ndarray) -> tuple[int, int]:
    """Connected regions of the smoothed ``diff`` beyond +-:data:`BLOB_SIGMA` of its robust std
    (:data:`BORDER` cut): (positive, negative)."""
    from scipy import ndimage

    s = smoothed(diff)
    s = s / robust_std(s)
    core = s[BORDER:-BORDER, BORDER:-BORDER]
    with np.errstate(invalid="ignore"):
        return int(ndimage.label(core > BLOB_SIGMA)[1]), int(ndimage.label(core < -BLOB_SIGMA)[1])


def bright_stars(sci: np.ndarray, fwhm: float, *, sigma: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Peaks of ``sci`` (:data:`BORDER` cut) whose aperture flux (radius 1 FWHM, px) exceeds
    :data:`BRIGHT_SNR` times the background noise in the aperture; returns (x, y) in pixels.

    ``sigma`` is the background noise per pixel (default: the robust std of ``sci``): give the
    science frame's to select, on the reference scaled to science flux units, the static stars
    that are bright in the science frame.
    """
    from scipy import ndimage

    sigma = robust_std(sci) if sigma is None else float(sigma)
    work = np.where(np.isfinite(sci), sci, 0.0)
    sm = ndimage.gaussian_filter(work, fwhm / 2.3548)
    peaks = (sm == ndimage.maximum_filter(sm, size=int(2 * fwhm) | 1)) & (sm > 5 * sigma / fwhm)
    h = math.ceil(fwhm)
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    disk = (xx**2 + yy**2) <= fwhm**2
    noise = sigma * math.sqrt(disk.sum())
    xs, ys = [], []
    for y, x in zip(*np.nonzero(peaks)):
        if BORDER <= y < sci.shape[0] - BORDER and BORDER <= x < sci.shape[1] - BORDER:
            if work[y - h : y + h + 1, x - h : x + h + 1][disk].sum() > BRIGHT_SNR * noise:
                xs.append(x)
                ys.append(y)
    return np.asarray(xs, float), np.asarray(ys, float)


def bright_residuals(
    diff: np.ndarray, var: np.ndarray, xs: np.ndarray, ys: np.ndarray, fwhm: float
) -> tuple[int, float]:
    """How many of the stars at (xs, ys) have a >= :data:`BLOB_SIGMA` pixel of the smoothed ``diff``
    within 2 FWHM (px), and the median over the stars of the largest |significance| there (NaN
    without stars)."""
    s = smoothed(diff)
    local = np.sqrt(np.maximum(smoothed(var), 0) / np.nanmedian(var))
    s = np.abs(s / (robust_std(s) * local))
    yy, xx = np.indices(diff.shape)
    peaks = np.array(
        [np.nanmax(np.where((xx - x) ** 2 + (yy - y) ** 2 <= (2 * fwhm) ** 2, s, 0.0)) for x, y in zip(xs, ys)]
    )
    return int((peaks >= BLOB_SIGMA).sum()), float(np.median(peaks)) if len(peaks) else float("nan")


def difference_quality(diff: np.ndarray, var: np.ndarray, sci: np.ndarray, fwhm: float) -> dict[str, float]:
    """All the measures of one difference image.

    Parameters
    ----------
    diff, var, sci : numpy.ndarray
        DIFF (NaN where masked), its variance (ADU²) and the background-subtracted science frame
        (ADU), on one grid (the ``DIFF``, ``VAR``, ``SCI`` planes of a subtraction file).
    fwhm : float
        Science PSF FWHM (px).

    Returns
    -------
    dict
        ``noise`` (:func:`noise_ratio`), ``blobs_pos``, ``blobs_neg`` (:func:`blobs`),
        ``bright_n`` (stars brighter than 100 sigma), ``bright_hit`` (of them with a >= 5 sigma
        residual), ``bright_peak`` (median largest residual, sigma), ``bright_frac``
        (``bright_hit / bright_n``, NaN without bright stars).
    """
    pos, neg = blobs(diff)
    xs, ys = bright_stars(sci, fwhm)
    hit, peak = bright_residuals(diff, var, xs, ys, fwhm)
    return {
        "noise": noise_ratio(diff),
        "blobs_pos": pos,
        "blobs_neg": neg,
        "bright_n": len(xs),
        "bright_hit": hit,
        "bright_peak": peak,
        "bright_frac": hit / len(xs) if len(xs) else float("nan"),
    }
