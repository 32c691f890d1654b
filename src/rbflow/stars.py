"""Stars of a background-subtracted frame: the star finder, its FWHM estimate and the windowed centroid.

:func:`find_stars` (the one star finder of every stage: psf, align, validate) finds point sources
as peaks of the frame smoothed by a Gaussian of the PSF's width (a matched filter, so its peak
S/N is the optimal detection S/N of a Gaussian star), rejects what is not shaped like a star
with DAOFIND's sharpness (cosmic rays and hot pixels are far sharper than the PSF) and a
second-moment roundness (satellite and bleed trails are elongated), and centres them with
:func:`windowed_centroids`: Gaussian-windowed first moments iterated to convergence
(SExtractor's ``XWIN_IMAGE``), unbiased for symmetric profiles. :func:`estimate_fwhm` measures
the FWHM of found stars (to correct a first guess); :func:`grow_mask` dilates a mask of invalid
pixels (stars next to them are not used), :func:`grow_disc` by a disc (a reach in every direction).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
    "FWHM_TO_SIGMA",
    "SHARPNESS_RANGE",
    "MAX_ROUNDNESS",
    "estimate_fwhm",
    "find_stars",
    "grow_mask",
    "grow_disc",
    "windowed_centroids",
    "windowed_offsets",
]

#: Ratio of a Gaussian's standard deviation to its FWHM, 1 / (2 sqrt(2 ln 2)).
FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))

#: Accepted DAOFIND sharpness (DAOFIND's default is 0.2-1.0; 0.9 rejects two-pixel cosmic rays
#: of FWHM 2.5 px frames, 1.1-1.2). A star of the given FWHM has 0.4-0.6 (Gaussian or Moffat,
#: FWHM 2.5-6 px); a single hot pixel 1.4 (FWHM 2.5 px) to 4 (FWHM 6 px).
SHARPNESS_RANGE = (0.2, 0.9)

_SHARPNESS_SIGMAS = 2.0  # the sharpness range is widened by this many times its sky-noise error

#: Largest accepted roundness (second-moment ellipticity in a Gaussian window of twice the PSF's
#: sigma, see :func:`find_stars`). A round star has 0 plus sky noise (at matched-filter S/N
#: 10-20: median 0.15, 95 % below 0.31; at S/N > 50: < 0.06), a PSF of axis ratio 0.8 0.18;
#: a trail 3 FWHM long 0.57, an infinite one 0.66 (FWHM 2.5-6 px, noiseless).
MAX_ROUNDNESS = 0.4


def grow_mask(mask: np.ndarray, iterations: int) -> np.ndarray:
    """Grow a mask by ``iterations`` pixels (binary dilation by the 4-connected cross).

    Parameters
    ----------
    mask : numpy.ndarray
        Boolean mask.
    iterations : int
        Dilation steps (px).

    Returns
    -------
    numpy.ndarray
        The grown mask (a new boolean array; quick when nothing is set).
    """
    return _dilate(mask, iterations=iterations)


def grow_disc(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels within ``radius`` px (a disc, Euclidean) of any set pixel of ``mask``, these included.

    :func:`grow_mask` grows by a diamond (city-block distance), which reaches only
    ``radius / sqrt(2)`` along the diagonals; a reach in every direction needs the disc. Returns
    a new boolean array, as :func:`grow_mask` does.
    """
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return _dilate(mask, structure=xx * xx + yy * yy <= radius * radius)


def _dilate(mask: np.ndarray, **kwargs: Any) -> np.ndarray:
    """``scipy.ndimage.binary_dilation(mask, **kwargs)``, skipped (all False) when nothing is set."""
    if not mask.any():
        return np.zeros(mask.shape, bool)
    from scipy import ndimage

    return ndimage.binary_dilation(mask, **kwargs)


def _stamps(data: np.ndarray, x: np.ndarray, y: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stack of (2r+1)² stamps around integer centres (outside pixels are 0) and their pixel grids."""
    ix = np.rint(x).astype(int)
    iy = np.rint(y).astype(int)
    off = np.arange(-r, r + 1)
    yy = iy[:, None, None] + off[None, :, None]
    xx = ix[:, None, None] + off[None, None, :]
    inside = (yy >= 0) & (yy < data.shape[0]) & (xx >= 0) & (xx < data.shape[1])
    st = np.where(inside, data[np.clip(yy, 0, data.shape[0] - 1), np.clip(xx, 0, data.shape[1] - 1)], 0.0)
    st = np.nan_to_num(st.astype(np.float64))
    return st, np.broadcast_to(xx, st.shape).astype(float), np.broadcast_to(yy, st.shape).astype(float)


def windowed_centroids(
    data: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    sigma_w: float,
    *,
    niter: int = 10,
    sky: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-windowed centroids (SExtractor's ``XWIN_IMAGE``), iterated from (x, y).

    Each step moves the position by twice the first moment of the pixels weighted by a circular
    Gaussian of ``sigma_w`` centred on it (the fixed point is the centre of a symmetric profile;
    the factor 2 makes the step exact for a Gaussian star of the window's width), at most 1 px
    per step, over pixels within ``4 sigma_w + 1`` of the start (outside the frame: 0). The
    iteration stops when every source moved less than 0.001 px.

    Parameters
    ----------
    data : numpy.ndarray
        Background-subtracted image (NaN counts as 0).
    x, y : numpy.ndarray
        Start positions (0-based pixels, column and row).
    sigma_w : float
        Window standard deviation (px); the PSF's (``FWHM * FWHM_TO_SIGMA``) is optimal.
    niter : int, optional
        Maximum number of steps.
    sky : numpy.ndarray, optional
        Local sky of each source (ADU), subtracted from its pixels (a constant offset does not
        move the fixed point of the symmetric window, only slows the iteration).

    Returns
    -------
    x, y : numpy.ndarray
        Centroids (px), new arrays.
    """
    x = np.asarray(x, float).copy()
    y = np.asarray(y, float).copy()
    if x.size == 0:
        return x, y
    r = int(math.ceil(4 * sigma_w)) + 1
    st, xx, yy = _stamps(data, x, y, r)
    if sky is not None:
        st = st - np.asarray(sky, float)[:, None, None]
    return _iterate_windowed(st, xx, yy, x, y, sigma_w, niter)


def _iterate_windowed(
    st: np.ndarray, xx: np.ndarray, yy: np.ndarray, x: np.ndarray, y: np.ndarray, sigma_w: float, niter: int
) -> tuple[np.ndarray, np.ndarray]:
    """The steps of :func:`windowed_centroids` on stamps ``st`` with pixel grids ``xx``, ``yy``, from (x, y) (updated in place)."""
    for _ in range(niter):
        dxg = xx - x[:, None, None]
        dyg = yy - y[:, None, None]
        w = np.exp(-(dxg**2 + dyg**2) / (2 * sigma_w**2)) * st
        norm = w.sum(axis=(1, 2))
        ok = norm > 0
        sx = np.where(ok, 2 * (w * dxg).sum(axis=(1, 2)) / np.where(ok, norm, 1), 0.0)
        sy = np.where(ok, 2 * (w * dyg).sum(axis=(1, 2)) / np.where(ok, norm, 1), 0.0)
        sx = np.clip(sx, -1.0, 1.0)
        sy = np.clip(sy, -1.0, 1.0)
        x += sx
        y += sy
        if np.all(np.abs(sx) < 1e-3) and np.all(np.abs(sy) < 1e-3):
            break
    return x, y


def windowed_offsets(
    stamp: Callable[[float, float, int], np.ndarray], x: np.ndarray, y: np.ndarray, sigma_w: float
) -> tuple[np.ndarray, np.ndarray]:
    """How far the windowed centroid of a PSF model lies from the model's centre, at each (x, y).

    A windowed centroid (:func:`windowed_centroids`) is the centre of a symmetric profile, but
    not of an asymmetric one: coma or an elongated core shift it from the point the PSF model is
    centred on, by a few hundredths of a pixel that differ between two frames' PSFs (the demo's
    dense field: -0.074 and -0.048 px in x, -0.031 and +0.042 px in y). Subtracting this offset
    from a star's windowed centroid gives the position in the PSF model's convention, which is
    what a subtraction with those models needs the two frames aligned on.

    Parameters
    ----------
    stamp : callable
        ``stamp(x, y, size)``: the unit-sum PSF of a source at (x, y), on a ``size`` square stamp
        centred on pixel ``(round(x), round(y))`` (:meth:`rbflow.psf.PSFModel.stamp`).
    x, y : numpy.ndarray
        Positions (px).
    sigma_w : float
        The window (px), as given to :func:`windowed_centroids`.

    Returns
    -------
    dx, dy : numpy.ndarray
        Windowed centroid minus (x, y) of the model's PSF at each position (px).
    """
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    if x.size == 0:
        return np.zeros(0), np.zeros(0)
    r = int(math.ceil(4 * sigma_w)) + 1
    h = r + 2  # room for the centroid's steps
    st = np.stack([stamp(float(xi), float(yi), 2 * h + 1) for xi, yi in zip(x, y)]).astype(np.float64)
    grid = np.arange(-h, h + 1, dtype=float)
    px = np.rint(x)[:, None, None] + grid[None, None, :]
    py = np.rint(y)[:, None, None] + grid[None, :, None]
    xx, yy = np.broadcast_to(px, st.shape), np.broadcast_to(py, st.shape)
    xc, yc = _iterate_windowed(st, xx, yy, x.copy(), y.copy(), sigma_w, 10)
    return xc - x, yc - y


def _shapes(
    data: np.ndarray, px: np.ndarray, py: np.ndarray, sig: float, noise: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DAOFIND sharpness, its sky-noise error and the second-moment roundness of the sources peaking at (px, py)."""
    if px.size == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    # sharpness: (peak pixel - mean of the other footprint pixels) / amplitude of the best-fitting
    # Gaussian + constant over the footprint (radius max(2, 1.5 sigma), as DAOFIND)
    r_fp = max(2.0, 1.5 * sig)
    st, xx, yy = _stamps(data, px, py, int(r_fp))
    d2 = (xx - px[:, None, None]) ** 2 + (yy - py[:, None, None]) ** 2
    foot = d2[0] <= r_fp**2
    g = np.exp(-d2[0] / (2 * sig**2))[foot]
    g -= g.mean()
    vals = st[:, foot]
    amp = vals @ g / (g @ g)
    centre = st[:, st.shape[1] // 2, st.shape[2] // 2]
    others = (vals.sum(axis=1) - centre) / (foot.sum() - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        sharp = np.where(amp > 0, (centre - others) / amp, np.inf)
        # first-order error from the sky noise of the numerator and of the amplitude
        n_fp = foot.sum()
        err = noise * np.sqrt(1 + 1 / (n_fp - 1) + sharp**2 / (g @ g)) / np.abs(amp)
    # roundness: ellipticity |(Ixx - Iyy, 2 Ixy)| / (Ixx + Iyy) of the second moments about the
    # windowed first moment, in a Gaussian window of 2 sigma (wide enough to see a trail's length)
    sw = 2 * sig
    st, xx, yy = _stamps(data, px, py, int(math.ceil(3 * sw)))
    dx = xx - px[:, None, None]
    dy = yy - py[:, None, None]
    w = np.exp(-(dx**2 + dy**2) / (2 * sw**2)) * st
    norm = w.sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        mx = (w * dx).sum(axis=(1, 2)) / norm
        my = (w * dy).sum(axis=(1, 2)) / norm
        ux = dx - mx[:, None, None]
        uy = dy - my[:, None, None]
        ixx = (w * ux * ux).sum(axis=(1, 2)) / norm
        iyy = (w * uy * uy).sum(axis=(1, 2)) / norm
        ixy = (w * ux * uy).sum(axis=(1, 2)) / norm
        rnd = np.hypot(ixx - iyy, 2 * ixy) / (ixx + iyy)
    return sharp, err, np.where((norm > 0) & (ixx + iyy > 0), rnd, np.inf)


def find_stars(
    data: np.ndarray,
    sigma: float,
    bad: np.ndarray,
    *,
    fwhm: float,
    snr_min: float,
    max_stars: int = 300,
    isolated: bool = True,
    sharpness: tuple[float, float] = SHARPNESS_RANGE,
    max_roundness: float = MAX_ROUNDNESS,
) -> dict[str, np.ndarray]:
    """Unmasked, star-shaped (and by default isolated) peaks of a background-subtracted image.

    The image (masked pixels set to 0) is smoothed by a Gaussian of the PSF's sigma; a peak is
    a local maximum within ``2 round(fwhm) + 1`` px above 5 times the smoothed noise. Kept are the
    peaks at least ``3 fwhm`` from the edges, ``2 fwhm`` from a masked pixel, shaped like a star
    and with S/N >= ``snr_min``; with ``isolated``, also no other peak (star or not) within
    ``3 fwhm`` brighter than 1 % of theirs. They are centred with :func:`windowed_centroids`
    (a centroid more than 1.5 px from its peak is dropped).

    Star-shaped means a DAOFIND sharpness (Stetson 1987: the peak pixel minus the mean of the
    other pixels within ``max(2, 1.5 sigma)`` px, over the amplitude of the best-fitting
    Gaussian of the PSF's sigma plus a constant there) within ``sharpness`` widened by 2 times
    its sky-noise error (cosmic rays and hot pixels are far sharper, and their S/N is in one or
    two pixels, so their sharpness is precise; a faint star's peak pixel is noisy: at
    matched-filter S/N 10-20 its sharpness scatters by 0.16 at FWHM 2.5 px and 0.29 at 4.5 px,
    as the error predicts) and a roundness (ellipticity ``|(Ixx - Iyy, 2 Ixy)| / (Ixx + Iyy)``
    of the second moments about the centre in a Gaussian window of twice the PSF's
    sigma) at most ``max_roundness`` (trails are elongated).

    Parameters
    ----------
    data : numpy.ndarray
        Background-subtracted image (ADU).
    sigma : float
        Its sky noise (ADU per pixel).
    bad : numpy.ndarray
        Boolean mask of invalid pixels.
    fwhm : float
        PSF FWHM (px).
    snr_min : float
        Minimum matched-filter peak S/N.
    max_stars : int, optional
        At most this many stars, the brightest.
    isolated : bool, optional
        Drop stars with a neighbouring peak (False: every star, e.g. to mask neighbours).
    sharpness : tuple of float, optional
        Accepted DAOFIND sharpness range.
    max_roundness : float, optional
        Largest accepted roundness.

    Returns
    -------
    dict of numpy.ndarray
        ``x``, ``y`` (windowed centroids, px), ``snr`` (matched-filter peak S/N),
        ``sharpness`` and ``roundness``, sorted by decreasing S/N.
    """
    from scipy import ndimage
    from scipy.spatial import cKDTree

    sig_g = max(fwhm * FWHM_TO_SIGMA, 0.5)
    filled = np.where(bad, 0.0, data).astype(np.float32)
    smooth = ndimage.gaussian_filter(filled, sig_g)
    noise = sigma / (2 * math.sqrt(math.pi) * sig_g)
    size = 2 * int(round(fwhm)) + 1
    peaks = (smooth == ndimage.maximum_filter(smooth, size=size)) & (smooth > 5 * noise)
    py, px = np.nonzero(peaks)
    snr = smooth[py, px] / noise
    edge = int(math.ceil(3 * fwhm))
    keep = (px >= edge) & (px < data.shape[1] - edge) & (py >= edge) & (py < data.shape[0] - edge)
    near_bad = grow_mask(bad, max(1, int(round(2 * fwhm))))
    keep &= ~near_bad[py, px]
    # isolation: no other peak (>= 5 sigma) within 3 FWHM unless it is 100x fainter
    if isolated and px.size > 1:
        i, j = cKDTree(np.c_[px, py]).query_pairs(3 * fwhm, output_type="ndarray").T
        keep[i[snr[j] > 0.01 * snr[i]]] = False
        keep[j[snr[i] > 0.01 * snr[j]]] = False
    keep &= snr >= snr_min
    sharp, err, rnd = np.full(px.size, np.nan), np.full(px.size, np.nan), np.full(px.size, np.nan)
    sharp[keep], err[keep], rnd[keep] = _shapes(filled, px[keep], py[keep], sig_g, sigma)
    tol = _SHARPNESS_SIGMAS * err
    keep &= (sharp >= sharpness[0] - tol) & (sharp <= sharpness[1] + tol) & (rnd <= max_roundness)
    order = np.argsort(-snr[keep])[:max_stars]
    xs, ys, sn = px[keep][order].astype(float), py[keep][order].astype(float), snr[keep][order]
    xc, yc = windowed_centroids(filled, xs, ys, sig_g)
    good = (np.hypot(xc - xs, yc - ys) < 1.5) & np.isfinite(xc) & np.isfinite(yc)
    return {
        "x": xc[good],
        "y": yc[good],
        "snr": sn[good],
        "sharpness": sharp[keep][order][good],
        "roundness": rnd[keep][order][good],
    }


def estimate_fwhm(data: np.ndarray, x: np.ndarray, y: np.ndarray, *, n: int = 20) -> float | None:
    """Crude FWHM (px) of stars: the median over the first ``n`` of the pixel-count diameter.

    For each star, the diameter ``2 sqrt(N / pi)`` of the circle with the area of the ``N``
    pixels at or above half the highest pixel within 7 px of it (a 15 x 15 px box). Pixel
    counting and a peak pixel below the true peak make it coarse (~10 % for FWHM 3-6 px): it is
    meant to correct a first guess of the FWHM that is off by more than that, not to measure it.

    Parameters
    ----------
    data : numpy.ndarray
        Background-subtracted image (any unit; NaN ignored).
    x, y : numpy.ndarray
        Star positions (px), the brightest first (e.g. from :func:`find_stars`).
    n : int, optional
        Stars used.

    Returns
    -------
    float or None
        The FWHM (px); None without any star.
    """
    sizes = []
    for xi, yi in zip(np.asarray(x)[:n], np.asarray(y)[:n]):
        ix, iy = int(round(float(xi))), int(round(float(yi)))
        cut = data[max(0, iy - 7) : iy + 8, max(0, ix - 7) : ix + 8]
        peak = np.nanmax(cut)
        sizes.append(2 * np.sqrt(np.count_nonzero(cut >= peak / 2) / np.pi))
    return float(np.median(sizes)) if sizes else None
