"""Alignment of a reference frame onto a science frame's pixel grid.

The reference is resampled onto the science grid through the two WCSs (cubic spline of its
pixels, evaluated at a map from science to reference pixels that is itself a cubic spline
through a coarse grid of exact WCS transforms). With ``refine``, bright isolated stars
(:func:`rbflow.stars.find_stars`) of both frames are matched and an affine correction (shift,
rotation, scale, shear; a shift for fewer than 8 stars) of the science pixels is fitted to them,
sigma-clipped, and the reference resampled again. With ``smooth`` and enough matched stars, a
smooth map of what the affine leaves (a penalised cubic B-spline surface per axis,
:func:`fit_smooth`) is added when cross-validation over the stars says it predicts their offsets
better: a header WCS often lacks part of the optics' distortion or an epoch's atmospheric
distortion, and an affine cannot follow it. The residual star offsets after alignment
(windowed centroids of the reference stars at the science stars' positions) are reported in
any case: their scatter is the astrometric noise that ZOGY's S_corr accounts for.

The stars' positions are windowed centroids (:func:`rbflow.stars.windowed_centroids`), which lie
on the light's centroid of a symmetric PSF only. Given the two frames' PSF models (as the
subtraction gives them), each centroid is first moved by its model's own windowed offset
(:func:`rbflow.stars.windowed_offsets`), so that the frames are aligned on the points the models
are centred on (their light's centroid), as a subtraction with those models needs. On the demo's
dense field (coma of 5-8.5 % of the light, FWHM 2.3 px against the reference's 2.1 px) the
centroids put the aligned reference (0.027, 0.081) px off the truth, which left >= 5 sigma
dipoles at 62 of the 75 stars brighter than 100 sigma in ZOGY's difference (static sky without
the distortion residual); aligned on the models' centres, 25 of 75 (exact PSFs: 13 of 75).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from rbflow.background import background, spline_grid
from rbflow.errors import InputError
from rbflow.io import Image
from rbflow.stars import FWHM_TO_SIGMA, find_stars, grow_mask, windowed_centroids, windowed_offsets

if TYPE_CHECKING:
    from astropy.wcs import WCS

__all__ = ["MASK_BITS", "PixelMap", "SmoothMap", "align", "fit_affine", "fit_smooth", "match_stars", "pixel_map"]

log = logging.getLogger(__name__)

#: Bits of the mask of an aligned pair (and of the difference's ``MASK`` extension); nonzero = invalid pixel.
MASK_BITS = {"SCI_BAD": 1, "REF_BAD": 2, "SATURATED": 4}

#: A map from science pixels ``(x, y)`` to reference pixels ``(x_ref, y_ref)`` (arrays or scalars).
PixelMap = Callable[[Any, Any], tuple[np.ndarray, np.ndarray]]

#: The science frame's PSF model at a science pixel: ``stamp(x, y, size)``, unit sum, centred on
#: pixel ``(round(x), round(y))`` (:meth:`rbflow.psf.PSFModel.stamp`).
SciStamp = Callable[[float, float, int], np.ndarray]

#: The reference's PSF model resampled through a pixel map onto the science grid:
#: ``stamp(to_ref, x, y, size)`` at science pixel (x, y) (:func:`rbflow.difference.ref_psf_on_sci_grid`).
RefStamp = Callable[[PixelMap, float, float, int], np.ndarray]


#: Least number of matched (affine-inlier) stars for which :func:`fit_smooth` is tried.
SMOOTH_MIN_STARS = 40

#: Floor (px) of an alignment star's offset error in :func:`fit_smooth`'s weights: the brightest
#: stars' centroids are not better than this (pixel response, the PSF's own change).
OFFSET_FLOOR = 0.01


def _affine_apply(aff: np.ndarray | None, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``aff`` (2x3: A|b) applied to pixel positions; the identity when None."""
    if aff is None:
        return x, y
    return aff[0, 0] * x + aff[0, 1] * y + aff[0, 2], aff[1, 0] * x + aff[1, 1] * y + aff[1, 2]


def _knots(shape: tuple[int, int], intervals: int) -> tuple[np.ndarray, np.ndarray]:
    """Knot vectors (x, y) of clamped cubic B-splines with ``intervals`` equal intervals over a frame."""
    ny, nx = shape
    tx = np.r_[[0.0] * 3, np.linspace(0.0, nx - 1.0, intervals + 1), [nx - 1.0] * 3]
    ty = np.r_[[0.0] * 3, np.linspace(0.0, ny - 1.0, intervals + 1), [ny - 1.0] * 3]
    return tx, ty


def _basis(t: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Cubic B-spline basis of knots ``t`` at ``x`` (clipped to the knot range): ``(len(x), len(t) - 4)``."""
    from scipy.interpolate import BSpline

    x = np.clip(np.ravel(x), t[0], t[-1])
    return BSpline.design_matrix(x, t, 3).toarray()


def _tensor(tx: np.ndarray, ty: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Tensor-product basis at the points ``(x, y)``: ``(n, nx_coeff * ny_coeff)``."""
    bx, by = _basis(tx, x), _basis(ty, y)
    return (by[:, :, None] * bx[:, None, :]).reshape(len(bx), -1)


def _penalty(m: int) -> np.ndarray:
    """Second-difference roughness penalty on an ``m x m`` grid of coefficients (both axes)."""
    d = np.diff(np.eye(m), 2, axis=0)
    dd = d.T @ d
    eye = np.eye(m)
    return np.kron(eye, dd) + np.kron(dd, eye)


@dataclass(frozen=True)
class SmoothMap:
    """A smooth correction of science pixel positions: cubic B-spline surfaces for x and y.

    Attributes
    ----------
    tx, ty : numpy.ndarray
        Knot vectors in x and y (px); outside them the surface is held at its edge value.
    cx, cy : numpy.ndarray
        Coefficients of the x and y corrections (px).
    intervals : int
        Knot intervals per axis.
    """

    tx: np.ndarray
    ty: np.ndarray
    cx: np.ndarray
    cy: np.ndarray
    intervals: int

    def __call__(self, x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        """The correction ``(dx, dy)`` (px) at science pixels ``(x, y)`` (arrays of one shape, or scalars)."""
        x, y = np.asarray(x, float), np.asarray(y, float)
        b = _tensor(self.tx, self.ty, x, y)
        return (b @ self.cx).reshape(x.shape), (b @ self.cy).reshape(x.shape)


def _solve_smooth(b: np.ndarray, r: np.ndarray, w: np.ndarray, pen: np.ndarray, lam: float) -> np.ndarray:
    """Weighted, penalised least squares of ``b c = r`` (``r`` of shape (n, 2)): coefficients (k, 2)."""
    bw = b * w[:, None]
    normal = b.T @ bw
    lam_abs = lam * float(np.trace(normal)) / len(normal)
    return np.linalg.solve(normal + lam_abs * pen + 1e-12 * np.eye(len(normal)), bw.T @ r)


def fit_smooth(
    p: np.ndarray,
    r: np.ndarray,
    sigma: np.ndarray,
    shape: tuple[int, int],
    *,
    folds: int = 5,
    min_gain: float = 0.2,
    lam: float = 1e-3,
) -> tuple[SmoothMap | None, np.ndarray, dict[str, float]]:
    """A smooth map of the offsets an affine left at matched stars, if it predicts them better.

    The offsets ``r`` of the stars at ``p`` are fitted per axis by a cubic B-spline surface with
    ``m x m`` equal knot intervals over the frame and a small second-difference penalty (so that a
    region without stars is bridged smoothly, not left free). ``m`` is chosen among 1, 2, 3, 4, 6
    and 8 (at least 2 stars per coefficient) by ``folds``-fold cross-validation: the weighted mean
    square of the held-out stars' offsets left by the fit to the others. The map is returned only
    when the best one lowers that mean square by more than ``min_gain`` of what the affine alone
    leaves (every star's offset predicted as 0), so an offset field of centroid noise keeps the
    affine. Stars whose offset misses the fitted map by more than 5 times the robust spread of
    the normalised misses (blends, a moved star) are dropped and the choice made again, up to
    three rounds, keeping at least 80 % of the stars.

    Parameters
    ----------
    p : numpy.ndarray
        ``(n, 2)`` science star positions (px).
    r : numpy.ndarray
        ``(n, 2)`` their offsets left by the affine (reference minus corrected science, px).
    sigma : numpy.ndarray
        ``(n,)`` offset errors (px), the weights being ``1 / sigma**2``.
    shape : tuple of int
        Frame shape (ny, nx): the knots span it.
    folds : int, optional
        Cross-validation folds (stars assigned in turn).
    min_gain : float, optional
        Least fractional drop of the cross-validated mean square for the map to be used.
    lam : float, optional
        Penalty weight relative to the mean diagonal of the normal matrix.

    Returns
    -------
    smooth : SmoothMap or None
        The map fitted to the kept stars, or None when the affine is as good.
    kept : numpy.ndarray
        Boolean mask of the stars the map was fitted to (all when it is None).
    cv : dict
        ``rms_affine`` and ``rms_smooth`` (px, cross-validated weighted rms; ``rms_smooth`` nan when
        no map was tried) and ``intervals`` (0 when none is used).
    """
    w_all = 1.0 / np.asarray(sigma, float) ** 2
    use = np.ones(len(p), bool)
    for _ in range(3):
        pu, ru, w = p[use], r[use], w_all[use]
        base = float(np.average((ru**2).sum(axis=1), weights=w))
        cv = {"rms_affine": math.sqrt(base), "rms_smooth": float("nan"), "intervals": 0}
        best = _cross_validate(pu, ru, w, shape, folds, lam)
        if best is None:
            return None, np.ones(len(p), bool), cv
        cv["rms_smooth"] = math.sqrt(best[0])
        if best[0] > (1.0 - min_gain) * base:
            return None, np.ones(len(p), bool), cv
        m = best[1]
        tx, ty = _knots(shape, m)
        c = _solve_smooth(_tensor(tx, ty, pu[:, 0], pu[:, 1]), ru, w, _penalty(m + 3), lam)
        chi = np.hypot(*(r - _tensor(tx, ty, p[:, 0], p[:, 1]) @ c).T) * np.sqrt(w_all)
        new = chi < 5 * 1.4826 * np.median(chi[use])
        if np.array_equal(new, use) or new.sum() < 0.8 * len(p):
            break
        use = new
    cv["intervals"] = m
    return SmoothMap(tx, ty, c[:, 0], c[:, 1], m), use, cv


def _cross_validate(
    p: np.ndarray, r: np.ndarray, w: np.ndarray, shape: tuple[int, int], folds: int, lam: float
) -> tuple[float, int] | None:
    """The knot intervals with the least cross-validated weighted mean square, and that mean square."""
    fold = np.arange(len(p)) % folds
    best: tuple[float, int] | None = None
    for m in (1, 2, 3, 4, 6, 8):
        if len(p) < 2 * (m + 3) ** 2:
            break
        b = _tensor(*_knots(shape, m), p[:, 0], p[:, 1])
        pen = _penalty(m + 3)
        sq = 0.0
        for f in range(folds):
            train = fold != f
            c = _solve_smooth(b[train], r[train], w[train], pen, lam)
            res = r[~train] - b[~train] @ c
            sq += float((w[~train] * (res**2).sum(axis=1)).sum())
        score = sq / float(w.sum())
        if best is None or score < best[0]:
            best = (score, m)
    return best


def pixel_map(
    sci_wcs: WCS, ref_wcs: WCS, affine: np.ndarray | None = None, smooth: SmoothMap | None = None
) -> PixelMap:
    """Map from science pixels to reference pixels: the affine and smooth corrections, then the two WCSs.

    Parameters
    ----------
    sci_wcs, ref_wcs : astropy.wcs.WCS
        Celestial WCSs of the science and reference frames.
    affine : numpy.ndarray, optional
        2x3 correction ``A|b`` applied to science pixels before the WCS transform (see
        :func:`fit_affine`); None for the WCSs alone.
    smooth : SmoothMap, optional
        Correction (px) of the science pixels, evaluated at the original pixels and added to the
        affine's result (see :func:`fit_smooth`).

    Returns
    -------
    PixelMap
        ``to_ref(x, y) -> (x_ref, y_ref)`` (0-based pixels, float arrays).
    """
    aff = affine

    def to_ref(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        x, y = np.asarray(x, float), np.asarray(y, float)
        px, py = _affine_apply(aff, x, y)
        if smooth is not None:
            dx, dy = smooth(x, y)
            px, py = px + dx, py + dy
        ra, dec = sci_wcs.pixel_to_world_values(px, py)
        rx, ry = ref_wcs.world_to_pixel_values(ra, dec)
        return np.asarray(rx, float), np.asarray(ry, float)

    return to_ref


def _full_map(to_ref: PixelMap, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Reference pixel coordinates of every science pixel, by a cubic spline through a coarse grid."""
    ny, nx = shape
    step_x = max(1, min(32, (nx - 1) // 6))
    step_y = max(1, min(32, (ny - 1) // 6))
    gx = np.unique(np.r_[np.arange(0, nx, step_x), nx - 1]).astype(float)
    gy = np.unique(np.r_[np.arange(0, ny, step_y), ny - 1]).astype(float)
    gxx, gyy = np.meshgrid(gx, gy)
    rx, ry = to_ref(gxx, gyy)
    yy, xx = np.arange(ny, dtype=float), np.arange(nx, dtype=float)
    from scipy.interpolate import RectBivariateSpline

    fx = spline_grid(RectBivariateSpline(gy, gx, rx, kx=3, ky=3), yy, xx)
    fy = spline_grid(RectBivariateSpline(gy, gx, ry, kx=3, ky=3), yy, xx)
    return fx.astype(np.float32), fy.astype(np.float32)


def _resample(
    coeffs: np.ndarray, bad_ref: np.ndarray, to_ref: PixelMap, shape: tuple[int, int], grow: int
) -> tuple[np.ndarray, np.ndarray]:
    """Resample the spline coefficients of the reference and its bad-pixel mask onto the science grid."""
    from scipy import ndimage

    fx, fy = _full_map(to_ref, shape)
    out = ndimage.map_coordinates(coeffs, [fy, fx], order=3, prefilter=False, mode="mirror", output=np.float32)
    nyr, nxr = coeffs.shape
    outside = (fx < 0.5) | (fx > nxr - 1.5) | (fy < 0.5) | (fy > nyr - 1.5)  # spline boundary rows
    bad = outside
    if bad_ref.any():
        bad |= ndimage.map_coordinates(bad_ref.astype(np.float32), [fy, fx], order=1, mode="nearest") > 0.01
    if grow > 0:
        bad = grow_mask(bad, grow)
    return out, bad


def match_stars(
    sci_st: dict[str, np.ndarray], ref_st: dict[str, np.ndarray], *, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """Match two star lists on one pixel grid: a coarse median offset, then nearest neighbours.

    Every science star's nearest reference star within ``radius`` gives the median offset; the
    science stars shifted by it are then matched to their nearest reference star within 1.5 px.

    Parameters
    ----------
    sci_st, ref_st : dict of numpy.ndarray
        Stars with ``x`` and ``y`` (px), e.g. from :func:`rbflow.stars.find_stars`.
    radius : float
        Search radius of the coarse offset (px).

    Returns
    -------
    i, j : numpy.ndarray
        Indices of the matched science and reference stars (pairwise; empty when none match).
    """
    from scipy.spatial import cKDTree

    if sci_st["x"].size == 0 or ref_st["x"].size == 0:
        return np.zeros(0, int), np.zeros(0, int)
    ps = np.c_[sci_st["x"], sci_st["y"]]
    pr = np.c_[ref_st["x"], ref_st["y"]]
    tree = cKDTree(pr)
    d, j = tree.query(ps, distance_upper_bound=radius)
    ok = np.isfinite(d)
    if ok.sum() == 0:
        return np.zeros(0, int), np.zeros(0, int)
    shift = np.median(pr[j[ok]] - ps[ok], axis=0)
    d, j = tree.query(ps + shift, distance_upper_bound=1.5)
    ok = np.isfinite(d)
    return np.nonzero(ok)[0], j[ok]


def fit_affine(p: np.ndarray, q: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted, sigma-clipped fit of ``q = A p + b`` (a shift alone for fewer than 8 points).

    Up to four rounds; each drops the points farther from the fit than 5 times the robust rms of
    the residuals (at least 0.05 px), and stops when the inliers no longer change or fewer than
    3 would remain.

    Parameters
    ----------
    p, q : numpy.ndarray
        ``(n, 2)`` matched positions (px).
    w : numpy.ndarray
        ``(n,)`` weights (e.g. inverse variances of the offsets).

    Returns
    -------
    affine : numpy.ndarray
        2x3 ``A|b``.
    inliers : numpy.ndarray
        Boolean mask of the points used by the last fit.
    """
    use = np.ones(len(p), bool)
    aff = np.eye(2, 3)
    for _ in range(4):
        if use.sum() >= 8:
            design = np.c_[p[use], np.ones(use.sum())] * np.sqrt(w[use])[:, None]
            sol, *_ = np.linalg.lstsq(design, q[use] * np.sqrt(w[use])[:, None], rcond=None)
            aff = sol.T
        else:
            aff = np.eye(2, 3)
            aff[:, 2] = np.average(q[use] - p[use], axis=0, weights=w[use])
        res = q - (p @ aff[:, :2].T + aff[:, 2])
        r = np.hypot(res[:, 0], res[:, 1])
        lim = max(5 * 1.4826 * np.median(r[use]), 0.05)
        new = r < lim
        if np.array_equal(new, use) or new.sum() < 3:
            break
        use = new
    return aff, use


def _offsets(
    ref_data: np.ndarray,
    xs: np.ndarray,
    ys: np.ndarray,
    sig_r: float,
    snr: np.ndarray,
    model: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, float]:
    """Offsets of the reference stars from the science stars after alignment (px, S/N²-weighted).

    ``model``: the windowed offsets of the reference's PSF model at (xs, ys), taken from its
    centroids so that they are compared in the PSF models' convention, as the science stars were.
    """
    xr, yr = windowed_centroids(ref_data, xs, ys, sig_r)
    if model is not None:
        xr, yr = xr - model[0], yr - model[1]
    d = np.c_[xr - xs, yr - ys]
    ok = np.all(np.isfinite(d), axis=1) & (np.hypot(d[:, 0], d[:, 1]) < 3)
    if ok.sum() == 0:
        return {"rms": float("nan"), "dx": float("nan"), "dy": float("nan"), "sigma_x": 0.0, "sigma_y": 0.0}
    w = snr[ok] ** 2
    d = d[ok]
    mean = np.average(d, axis=0, weights=w)
    sx = math.sqrt(np.average((d[:, 0] - mean[0]) ** 2, weights=w))
    sy = math.sqrt(np.average((d[:, 1] - mean[1]) ** 2, weights=w))
    rms = math.sqrt(np.average((d**2).sum(axis=1), weights=w))
    return {"rms": rms, "dx": float(mean[0]), "dy": float(mean[1]), "sigma_x": sx, "sigma_y": sy}


#: Nodes per axis of the grid of whole pixels on which the PSF models' windowed offsets are
#: evaluated (bilinear between): the models change smoothly across a frame (a quadratic over
#: their cells).
OFFSET_GRID = 5

#: Sub-pixel phases per axis at which the offsets' pixel-phase part is evaluated, at the frame
#: centre (periodic bilinear between). An undersampled star's windowed centroid depends on where it
#: falls within its pixel; left out (the whole-pixel grid alone), the few-star ``realpsf`` test sky
#: (1.5-2 px cores) had 9 of its 144 stars > 100 sigma with a >= 5 sigma residual, against 7 with
#: the offsets evaluated at every star (and 7 with the centroids alone).
OFFSET_PHASES = 4


def _model_offsets(stamp: SciStamp, shape: tuple[int, int], sigma_w: float) -> Callable[[Any, Any], np.ndarray]:
    """The windowed offsets of a PSF model over a frame: ``f(x, y) -> (2, n)``.

    :func:`rbflow.stars.windowed_offsets` at :data:`OFFSET_GRID` x :data:`OFFSET_GRID` whole
    pixels spanning the frame (bilinear between, extrapolated linearly beyond), plus their change
    with the sub-pixel phase, evaluated at :data:`OFFSET_PHASES` x :data:`OFFSET_PHASES` phases at
    the frame's centre pixel (periodic bilinear between): 41 model stamps instead of one per star.
    """
    from scipy.interpolate import RegularGridInterpolator

    gy, gx = (np.round(np.linspace(0, n - 1, OFFSET_GRID)) for n in shape)
    xx, yy = np.meshgrid(gx, gy)
    dx, dy = windowed_offsets(stamp, xx.ravel(), yy.ravel(), sigma_w)
    spatial = RegularGridInterpolator(
        (gy, gx), np.stack([dx, dy], axis=-1).reshape(gy.size, gx.size, 2), bounds_error=False, fill_value=None
    )
    k = OFFSET_PHASES
    cy, cx = (n // 2 for n in shape)
    ph = np.arange(k + 1) / k  # the last node is phase 0 again
    px, py = np.meshgrid(ph[:k], ph[:k])
    dx, dy = windowed_offsets(stamp, cx + px.ravel(), cy + py.ravel(), sigma_w)
    table = np.stack([dx, dy], axis=-1).reshape(k, k, 2)
    table = table - table[0, 0]
    table = np.concatenate([table, table[:1]], axis=0)
    table = np.concatenate([table, table[:, :1]], axis=1)
    phase = RegularGridInterpolator((ph, ph), table)

    def offsets(x: Any, y: Any) -> np.ndarray:
        x, y = np.ravel(x).astype(float), np.ravel(y).astype(float)
        return (spatial(np.c_[y, x]) + phase(np.c_[y - np.floor(y), x - np.floor(x)])).T

    return offsets


def _to_model_centres(stars: dict[str, np.ndarray], offsets: Callable[[Any, Any], np.ndarray]) -> None:
    """Move the windowed centroids of :func:`rbflow.stars.find_stars` (in place) to the PSF model's centres."""
    if stars["x"].size:
        dx, dy = offsets(stars["x"], stars["y"])
        stars["x"] = stars["x"] - dx
        stars["y"] = stars["y"] - dy


def align(
    sci: Image,
    ref: Image,
    *,
    refine: bool,
    smooth: bool = False,
    saturation_sci: float = np.inf,
    saturation_ref: float = np.inf,
    fwhm_sci: float | None = None,
    fwhm_ref: float | None = None,
    grow: int = 2,
    snr_min: float = 30.0,
    psf_sci: SciStamp | None = None,
    psf_ref: RefStamp | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Resample ``ref`` onto the pixel grid of ``sci`` through the WCSs, optionally refined on stars.

    Parameters
    ----------
    sci, ref : rbflow.io.Image
        Science and reference frames, both with a celestial WCS.
    refine : bool
        Fit an affine correction (shift, rotation, scale, shear) to matched bright isolated stars
        and resample again. When False the residual offset is still measured and reported.
    smooth : bool, optional
        With ``refine``: add a smooth map of the offsets the affine leaves when at least
        :data:`SMOOTH_MIN_STARS` stars are matched and cross-validation prefers it
        (:func:`fit_smooth`).
    saturation_sci, saturation_ref : float, optional
        Saturation levels (ADU, as stored); pixels at or above are masked.
    fwhm_sci, fwhm_ref : float, optional
        PSF FWHM (science pixels) for star finding; default: 4 px.
    grow : int, optional
        Dilation (px) of the invalid-pixel masks.
    snr_min : float, optional
        Minimum matched-filter S/N of an alignment star.
    psf_sci, psf_ref : callable, optional
        The two frames' PSF models (:data:`SciStamp`, :data:`RefStamp`). When given, each
        star's windowed centroid is moved by its frame's model's own windowed offset
        (:func:`rbflow.stars.windowed_offsets`), so that the frames are aligned on the points
        the PSF models are centred on rather than on the centroids of two differently
        asymmetric PSFs. Without them (e.g. stacking an epoch), on the windowed centroids.

    Returns
    -------
    ref_aligned : numpy.ndarray
        Reference on the science grid (float32, not background-subtracted; invalid pixels keep an
        interpolated value, see ``mask``).
    mask : numpy.ndarray
        uint8 bits of :data:`MASK_BITS` (``REF_BAD``, ``SATURATED``) on the science grid.
    info : dict
        ``rms`` (px, S/N²-weighted rms of the star offsets after alignment), ``dx``, ``dy`` (mean
        offset, px), ``sigma_x``, ``sigma_y`` (scatter about it, px), ``nstars`` (matched stars),
        ``refined`` (bool), ``affine`` (2×3 correction applied to science pixels before the WCS
        map, or None), ``smooth`` (the :class:`SmoothMap` added to it, or None), ``cv`` (the
        cross-validated rms of :func:`fit_smooth`, or None when it was not tried), ``stars`` (dict of the matched science stars x, y, snr) and ``to_ref``
        (callable: science pixel -> reference pixel).

    Raises
    ------
    InputError
        One of the frames has no celestial WCS (the message names the file).
    """
    from scipy import ndimage

    sci_wcs = sci.require_wcs()
    ref_wcs = ref.require_wcs()
    fwhm_sci = fwhm_sci or 4.0
    fwhm_ref = fwhm_ref or fwhm_sci
    shape = sci.data.shape

    sat_ref = ref.data >= saturation_ref
    bad_ref_raw = ~np.isfinite(ref.data) | sat_ref
    fill = np.nanmedian(ref.data)
    coeffs = ndimage.spline_filter(np.where(np.isfinite(ref.data), ref.data, fill), 3, output=np.float32)

    bad_sci = ~np.isfinite(sci.data) | (sci.data >= saturation_sci)
    sbkg, s_sig = background(sci.data, bad_sci)
    sci_sub = np.where(bad_sci, 0.0, sci.data - sbkg).astype(np.float32)
    sci_st = find_stars(sci_sub, s_sig, bad_sci, fwhm=fwhm_sci, snr_min=snr_min)
    sig_s, sig_r = max(fwhm_sci * FWHM_TO_SIGMA, 0.5), max(fwhm_ref * FWHM_TO_SIGMA, 0.5)
    if psf_sci is not None:
        _to_model_centres(sci_st, _model_offsets(psf_sci, shape, sig_s))

    aff = None
    to_ref = pixel_map(sci_wcs, ref_wcs, aff)
    aligned, bad = _resample(coeffs, bad_ref_raw, to_ref, shape, grow)
    if bad.all():
        raise InputError(
            f"science '{sci.path}' does not overlap reference '{ref.path}' (no valid reference pixel on its grid): "
            "check that the frames are of one field and both WCS are right"
        )
    rbkg, r_sig = background(aligned, bad | bad_sci)
    ref_sub = np.where(bad, 0.0, aligned - rbkg).astype(np.float32)
    ref_st = find_stars(ref_sub, r_sig, bad | bad_sci, fwhm=fwhm_ref, snr_min=snr_min)
    if psf_ref is not None:
        _to_model_centres(ref_st, _model_offsets(lambda x, y, n, m=to_ref: psf_ref(m, x, y, n), shape, sig_r))
    i, j = match_stars(sci_st, ref_st, radius=max(10.0, 3 * fwhm_sci))
    p = np.c_[sci_st["x"][i], sci_st["y"][i]]
    q = np.c_[ref_st["x"][j], ref_st["y"][j]]
    w = 1.0 / (1.0 / sci_st["snr"][i] ** 2 + 1.0 / ref_st["snr"][j] ** 2)
    n_match = len(i)
    if n_match < 3:
        log.warning(
            "align: only %d stars matched between '%s' and '%s'; alignment relies on the WCS alone",
            n_match,
            sci.path,
            ref.path,
        )
    refined = False
    smap, cv = None, None
    if refine and n_match >= 3:
        aff, inl = fit_affine(p, q, w)
        if smooth and inl.sum() >= SMOOTH_MIN_STARS:
            pi = p[inl]
            sigma = np.sqrt((fwhm_sci * FWHM_TO_SIGMA) ** 2 / w[inl] + OFFSET_FLOOR**2)
            smap, kept, cv = fit_smooth(pi, q[inl] - (pi @ aff[:, :2].T + aff[:, 2]), sigma, shape)
            inl[inl] = kept
        to_ref = pixel_map(sci_wcs, ref_wcs, aff, smap)
        aligned, bad = _resample(coeffs, bad_ref_raw, to_ref, shape, grow)
        ref_sub = np.where(bad, 0.0, aligned - rbkg).astype(np.float32)
        p, w = p[inl], w[inl]
        refined = True
    snr = np.sqrt(w) if n_match else np.zeros(0)
    if n_match:
        model = None
        if psf_ref is not None:
            model = _model_offsets(lambda x, y, n: psf_ref(to_ref, x, y, n), shape, sig_r)(p[:, 0], p[:, 1])
        off = _offsets(ref_sub, p[:, 0], p[:, 1], sig_r, snr, model)
    else:
        off = {"rms": float("nan"), "dx": float("nan"), "dy": float("nan"), "sigma_x": 0.0, "sigma_y": 0.0}
    log.info(
        "align %s -> %s: %d stars, refined=%s, smooth map %s, offset (%.3f, %.3f) px, rms %.3f px",
        ref.path,
        sci.path,
        n_match,
        refined,
        f"{smap.intervals}x{smap.intervals} (cross-validated rms {cv['rms_affine']:.3f} -> {cv['rms_smooth']:.3f} px)"
        if smap is not None and cv is not None
        else "none",
        off["dx"],
        off["dy"],
        off["rms"],
    )
    mask = np.zeros(shape, np.uint8)
    mask[bad] |= MASK_BITS["REF_BAD"]
    if sat_ref.any():
        fx, fy = _full_map(to_ref, shape)
        sat_al = ndimage.map_coordinates(sat_ref.astype(np.float32), [fy, fx], order=1) > 0.01
        mask[grow_mask(sat_al, max(grow, 1))] |= MASK_BITS["SATURATED"]
    info = {
        **off,
        "nstars": int(len(p)),
        "refined": refined,
        "affine": aff,
        "smooth": smap,
        "cv": cv,
        "stars": {"x": p[:, 0] if len(p) else np.zeros(0), "y": p[:, 1] if len(p) else np.zeros(0), "snr": snr},
        "to_ref": to_ref,
    }
    return aligned, mask, info
