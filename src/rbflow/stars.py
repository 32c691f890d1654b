"""Stars of a background-subtracted frame: the star finder and the windowed centroid.

:func:`find_stars` finds bright, isolated point sources as peaks of the frame smoothed by a
Gaussian of the PSF's width (a matched filter, so its peak S/N is the optimal detection S/N of a
Gaussian star), and centres them with :func:`windowed_centroids`: Gaussian-windowed first moments
iterated to convergence (SExtractor's ``XWIN_IMAGE``), unbiased for symmetric profiles.
:func:`grow_mask` dilates a mask of invalid pixels (stars next to them are not used).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["FWHM_TO_SIGMA", "find_stars", "grow_mask", "windowed_centroids"]

#: Ratio of a Gaussian's standard deviation to its FWHM, 1 / (2 sqrt(2 ln 2)).
FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


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
    if not mask.any():
        return np.zeros(mask.shape, bool)
    from scipy import ndimage

    return ndimage.binary_dilation(mask, iterations=iterations)


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


def find_stars(
    data: np.ndarray,
    sigma: float,
    bad: np.ndarray,
    *,
    fwhm: float,
    snr_min: float,
    max_stars: int = 300,
) -> dict[str, np.ndarray]:
    """Bright, isolated, unmasked point-like peaks of a background-subtracted image.

    The image (masked pixels set to 0) is smoothed by a Gaussian of the PSF's sigma; a peak is
    a local maximum within ``2 round(fwhm) + 1`` px above 5 times the smoothed noise. Kept are the
    peaks at least ``3 fwhm`` from the edges, ``2 fwhm`` from a masked pixel, with no other peak
    within ``3 fwhm`` brighter than 1 % of theirs and S/N >= ``snr_min``; they are centred with
    :func:`windowed_centroids` (a centroid more than 1.5 px from its peak is dropped).

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

    Returns
    -------
    dict of numpy.ndarray
        ``x``, ``y`` (windowed centroids, px) and ``snr`` (matched-filter peak S/N), sorted by
        decreasing S/N.
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
    if px.size > 1:
        i, j = cKDTree(np.c_[px, py]).query_pairs(3 * fwhm, output_type="ndarray").T
        keep[i[snr[j] > 0.01 * snr[i]]] = False
        keep[j[snr[i] > 0.01 * snr[j]]] = False
    keep &= snr >= snr_min
    order = np.argsort(-snr[keep])[:max_stars]
    xs, ys, sn = px[keep][order].astype(float), py[keep][order].astype(float), snr[keep][order]
    xc, yc = windowed_centroids(filled, xs, ys, sig_g)
    good = (np.hypot(xc - xs, yc - ys) < 1.5) & np.isfinite(xc) & np.isfinite(yc)
    return {"x": xc[good], "y": yc[good], "snr": sn[good]}
