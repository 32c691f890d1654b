"""Alignment of a reference onto a science frame and ZOGY image subtraction.

The reference is resampled onto the science pixel grid through the two WCSs (cubic spline),
optionally refined by an affine fit to matched bright stars. The subtraction follows Zackay,
Ofek & Gal-Yam (2016, ApJ 830, 27; "ZOGY"), run on overlapping tiles, each with the PSFs of
its centre, blended with linear-interpolation weights, so that a spatially varying PSF is followed.

Outputs (see :func:`subtract_images`) are in science flux units: a transient of flux ``f`` (ADU)
in the science frame has flux ``f`` in ``DIFF``, with PSF ``PSFD``.

The PSF models only need two methods (the duck type of :class:`rbflow.psf.PSFModel`):
``stamp(x, y, size, *, centred=False)`` returning a unit-sum ``(size, size)`` array whose central
pixel is ``(round(x), round(y))`` (the profile sits at the sub-pixel position ``(x, y)``, or on
the central pixel with ``centred=True``), and ``fwhm(x, y)`` in pixels.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import scipy.fft as sfft
from astropy.io import fits
from astropy.stats import SigmaClip
from astropy.utils.exceptions import AstropyUserWarning
from astropy.wcs import WCS
from scipy import ndimage
from scipy.interpolate import RectBivariateSpline
from scipy.spatial import cKDTree

from rbflow.frames import FrameInfo, frame_info
from rbflow.errors import ConfigError, InputError
from rbflow.io import Image, read_image, write_fits
from rbflow.psf import PSFModel

__all__ = [
    "MASK_BITS",
    "PSFLike",
    "zogy",
    "align",
    "subtract_images",
    "run_subtract",
]

log = logging.getLogger(__name__)

#: Bits of the ``MASK`` extension (nonzero = invalid pixel).
MASK_BITS = {"SCI_BAD": 1, "REF_BAD": 2, "SATURATED": 4}

_WORKERS = 2
#: Mesh (px) of the background fitted to S and D after the subtraction (see :func:`subtract_images`).
_RESID_BOX = 32
_FWHM2SIG = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


class PSFLike(Protocol):
    """What the subtraction needs from a PSF model (see :class:`rbflow.psf.PSFModel`)."""

    def stamp(self, x: float, y: float, size: int, *, centred: bool = False) -> np.ndarray: ...

    def fwhm(self, x: float, y: float) -> float: ...


# --------------------------------------------------------------------------------------------
# ZOGY core
# --------------------------------------------------------------------------------------------


def _otf(p: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Real FFT (complex128) of a centred stamp placed with its central pixel at (0, 0)."""
    full = np.zeros(shape, np.float64)
    h, w = p.shape
    full[:h, :w] = p
    full = np.roll(full, (-(h // 2), -(w // 2)), axis=(0, 1))
    return sfft.rfft2(full, workers=_WORKERS)


def _irfft(x_hat: np.ndarray, shape: tuple[int, int], out: tuple[int, int]) -> np.ndarray:
    """Single-precision inverse real FFT, cropped to ``out``."""
    res = sfft.irfft2(x_hat.astype(np.complex64, copy=False), s=shape, workers=_WORKERS)
    return res[: out[0], : out[1]]


def _kernel_sq_hat(k_hat: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Fourier transform of the pixel-wise square of the kernel whose transform is ``k_hat``."""
    k = sfft.irfft2(k_hat.astype(np.complex64), s=shape, workers=_WORKERS)
    return sfft.rfft2(k * k, workers=_WORKERS)


def zogy(
    N: np.ndarray,
    R: np.ndarray,
    Pn: np.ndarray,
    Pr: np.ndarray,
    sn: float,
    sr: float,
    fr: float,
    fn: float = 1.0,
    *,
    var_n: np.ndarray | None = None,
    var_r: np.ndarray | None = None,
    dx: float = 0.0,
    dy: float = 0.0,
) -> dict[str, Any]:
    """ZOGY subtraction of one (tile of an) image pair.

    Parameters
    ----------
    N, R : numpy.ndarray
        Background-subtracted science and aligned reference, same shape, no NaN (inpaint first).
        Computations are periodic: pad or keep a margin wider than the PSFs.
    Pn, Pr : numpy.ndarray
        Unit-sum PSF stamps (odd sizes) of N and R, centred on their central pixel.
    sn, sr : float
        Background noise (ADU) of N and R.
    fr, fn : float
        Flux zero points of R and N; only the ratio ``fr / fn`` matters for D in science units.
    var_n, var_r : numpy.ndarray, optional
        Variance maps (ADU², background plus source Poisson noise) of N and R. Default: ``sn²``, ``sr²``.
    dx, dy : float, optional
        Astrometric registration noise (px, rms per axis), the paper's σ_x, σ_y.

    Returns
    -------
    dict
        ``D`` difference in science flux units (``fn`` units: a transient of flux f in N has flux f
        in D), ``var_D`` its variance map, ``S`` the matched-filter image, ``Scorr`` S in sigma
        corrected for source noise and astrometric noise, ``P_D`` the unit-sum PSF of D (stamp of
        the size of ``Pn``), ``F_D`` the flux zero point of the normalised D of the paper.
    """
    shape_in = N.shape
    shape = (sfft.next_fast_len(shape_in[0], real=True), sfft.next_fast_len(shape_in[1], real=True))

    def fwd(img: np.ndarray) -> np.ndarray:
        return sfft.rfft2(img.astype(np.float32, copy=False), s=shape, workers=_WORKERS)

    n_hat, r_hat = fwd(N), fwd(R)
    pn_hat = _otf(Pn, shape)
    pr_hat = _otf(Pr, shape)
    pn2 = np.abs(pn_hat) ** 2
    pr2 = np.abs(pr_hat) ** 2
    a = sn**2 * fr**2 * pr2 + sr**2 * fn**2 * pn2
    a = np.maximum(a, 1e-12 * a.max())
    den = np.sqrt(a)
    f_d = fr * fn / math.sqrt(sn**2 * fr**2 + sr**2 * fn**2)
    scale = fn / f_d  # D in science flux units

    kdn_hat = scale * fr * pr_hat / den  # D = kdn * N - kdr * R
    kdr_hat = scale * fn * pn_hat / den
    kn_hat = fn * fr**2 * np.conj(pn_hat) * pr2 / a  # S = kn * N - kr * R
    kr_hat = fr * fn**2 * np.conj(pr_hat) * pn2 / a
    pd_hat = fr * fn * pr_hat * pn_hat / (f_d * den)

    D = _irfft(kdn_hat * n_hat - kdr_hat * r_hat, shape, shape_in)
    s_n = _irfft(kn_hat * n_hat, shape, shape_in)
    s_r = _irfft(kr_hat * r_hat, shape, shape_in)
    S = s_n - s_r

    kn2_hat, kr2_hat = _kernel_sq_hat(kn_hat, shape), _kernel_sq_hat(kr_hat, shape)
    kdn2_hat, kdr2_hat = _kernel_sq_hat(kdn_hat, shape), _kernel_sq_hat(kdr_hat, shape)
    if var_n is None and var_r is None:
        v_s = np.float32(sn**2 * kn2_hat[0, 0].real + sr**2 * kr2_hat[0, 0].real)
        v_d = np.float32(sn**2 * kdn2_hat[0, 0].real + sr**2 * kdr2_hat[0, 0].real)
    else:
        vn = np.full(shape_in, sn**2, np.float32) if var_n is None else var_n
        vr = np.full(shape_in, sr**2, np.float32) if var_r is None else var_r
        vn_hat, vr_hat = fwd(vn), fwd(vr)
        v_s = _irfft(kn2_hat * vn_hat + kr2_hat * vr_hat, shape, shape_in)
        v_d = _irfft(kdn2_hat * vn_hat + kdr2_hat * vr_hat, shape, shape_in)
    if dx > 0 or dy > 0:
        for part in (s_n, s_r):
            gy, gx = np.gradient(part)
            v_s = v_s + dx**2 * gx**2 + dy**2 * gy**2
    scorr = S / np.sqrt(np.maximum(v_s, np.finfo(np.float32).tiny))

    pd = sfft.irfft2(pd_hat, s=shape, workers=_WORKERS)
    h, w = Pn.shape
    pd = np.roll(pd, (h // 2, w // 2), axis=(0, 1))[:h, :w]
    pd = (pd / pd.sum()).astype(np.float32)
    return {
        "D": D.astype(np.float32, copy=False),
        "var_D": np.broadcast_to(v_d, shape_in).astype(np.float32),
        "S": S.astype(np.float32, copy=False),
        "Scorr": scorr.astype(np.float32, copy=False),
        "P_D": pd,
        "F_D": f_d,
    }


# --------------------------------------------------------------------------------------------
# Backgrounds, stars, centroids
# --------------------------------------------------------------------------------------------


def _mesh_axis(n: int, box: int) -> tuple[int, np.ndarray]:
    """Number of meshes along an axis of ``n`` pixels and their centres (the last one may be partial)."""
    k = -(-n // box)
    start = np.arange(k) * box
    return k, start + (np.minimum(start + box, n) - start - 1) / 2.0


def _background(data: np.ndarray, bad: np.ndarray, *, box: int | None = None) -> tuple[np.ndarray, float]:
    """Sigma-clipped mesh background and its median rms (ADU).

    Mesh medians (boxes of ``box`` px; default: a quarter of the frame, 16 to 64 px) are
    interpolated with a bicubic spline through the mesh centres, which follows a sky gradient up
    to the frame edges (photutils' median filter of the mesh flattens a gradient in the outer
    meshes: a 5 % ramp across a 256 px deep reference left errors of 0.2-0.6 sigma there, which
    the matched filter S of ZOGY turned into ~1 sigma of large-scale structure). Outlier meshes are
    replaced by the median of their neighbours first.
    """
    ny, nx = data.shape
    box = int(box or min(64, max(16, min(data.shape) // 4)))
    ky, cy = _mesh_axis(ny, box)
    kx, cx = _mesh_axis(nx, box)
    pad = np.full((ky * box, kx * box), np.nan, np.float32)
    pad[:ny, :nx] = np.where(bad | ~np.isfinite(data), np.nan, data)
    cells = pad.reshape(ky, box, kx, box).transpose(0, 2, 1, 3).reshape(ky, kx, box * box)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN meshes give NaN
        warnings.simplefilter("ignore", AstropyUserWarning)  # masked pixels are NaN on purpose
        clipped = SigmaClip(sigma=3.0, maxiters=5)(cells, axis=2, masked=False)
        med = np.nanmedian(clipped, axis=2)
        rms = np.nanstd(clipped, axis=2)
        ngood = np.isfinite(clipped).sum(axis=2)
    full = np.minimum(box, ny - np.arange(ky) * box)[:, None] * np.minimum(box, nx - np.arange(kx) * box)[None, :]
    ok = np.isfinite(med) & (ngood >= 0.25 * full)
    if not ok.any():
        fill = float(np.nanmedian(np.where(bad, np.nan, data)))
        return np.full(data.shape, fill, np.float32), float(np.nanstd(np.where(bad, np.nan, data)))
    sig = float(np.median(rms[ok]))
    # plane through the good meshes; residual meshes that are missing or deviate are replaced by
    # the median of their neighbours (of the residual, so that a gradient is kept at the edges)
    gy, gx = np.meshgrid(cy, cx, indexing="ij")
    design = np.c_[np.ones(ok.sum()), gx[ok], gy[ok]]
    coef, *_ = np.linalg.lstsq(design, med[ok], rcond=None)
    plane = coef[0] + coef[1] * gx + coef[2] * gy
    resid = np.where(ok, med - plane, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        local = ndimage.generic_filter(resid, np.nanmedian, size=3, mode="nearest", cval=np.nan)
    local = np.where(np.isfinite(local), local, 0.0)
    outlier = ~ok | (np.abs(resid - local) > 3 * sig / math.sqrt(max(box * box / 4, 1)) + 0.1 * sig)
    resid = np.where(outlier, local, resid)
    surface = plane + resid
    if ky < 2 or kx < 2:  # too small for a spline: the plane plus the mean residual
        yy, xx = np.mgrid[0:ny, 0:nx]
        return (coef[0] + coef[1] * xx + coef[2] * yy + float(resid.mean())).astype(np.float32), sig
    # spline between the outer mesh centres; beyond them (half a mesh) the plane's slope carries
    # on, as a cubic extrapolation would amplify the noise of the outer meshes
    spl = RectBivariateSpline(cy, cx, surface, kx=min(3, ky - 1), ky=min(3, kx - 1))
    py = np.clip(np.arange(ny, dtype=float), cy[0], cy[-1])
    px = np.clip(np.arange(nx, dtype=float), cx[0], cx[-1])
    out = spl(py, px)
    out += coef[2] * (np.arange(ny) - py)[:, None] + coef[1] * (np.arange(nx) - px)[None, :]
    return out.astype(np.float32), sig


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


def _window_centroids(
    data: np.ndarray, x: np.ndarray, y: np.ndarray, sigma_w: float, *, niter: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-windowed first moments (SExtractor XWIN-like), iterated from (x, y)."""
    x = np.asarray(x, float).copy()
    y = np.asarray(y, float).copy()
    if x.size == 0:
        return x, y
    r = int(math.ceil(4 * sigma_w)) + 1
    st, xx, yy = _stamps(data, x, y, r)
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


def _find_stars(
    data: np.ndarray,
    sigma: float,
    bad: np.ndarray,
    *,
    fwhm: float,
    snr_min: float,
    max_stars: int = 300,
) -> dict[str, np.ndarray]:
    """Bright, isolated, unmasked point-like peaks of a background-subtracted image.

    Returns windowed centroids ``x``, ``y`` and the matched-filter peak S/N ``snr``.
    """
    sig_g = max(fwhm * _FWHM2SIG, 0.5)
    filled = np.where(bad, 0.0, data).astype(np.float32)
    smooth = ndimage.gaussian_filter(filled, sig_g)
    noise = sigma / (2 * math.sqrt(math.pi) * sig_g)
    size = 2 * int(round(fwhm)) + 1
    peaks = (smooth == ndimage.maximum_filter(smooth, size=size)) & (smooth > 5 * noise)
    py, px = np.nonzero(peaks)
    snr = smooth[py, px] / noise
    edge = int(math.ceil(3 * fwhm))
    keep = (px >= edge) & (px < data.shape[1] - edge) & (py >= edge) & (py < data.shape[0] - edge)
    near_bad = ndimage.binary_dilation(bad, iterations=max(1, int(round(2 * fwhm))))
    keep &= ~near_bad[py, px]
    # isolation: no other peak (>= 5 sigma) within 3 FWHM unless it is 100x fainter
    if px.size > 1:
        i, j = cKDTree(np.c_[px, py]).query_pairs(3 * fwhm, output_type="ndarray").T
        keep[i[snr[j] > 0.01 * snr[i]]] = False
        keep[j[snr[i] > 0.01 * snr[j]]] = False
    keep &= snr >= snr_min
    order = np.argsort(-snr[keep])[:max_stars]
    xs, ys, sn = px[keep][order].astype(float), py[keep][order].astype(float), snr[keep][order]
    xc, yc = _window_centroids(filled, xs, ys, sig_g)
    good = (np.hypot(xc - xs, yc - ys) < 1.5) & np.isfinite(xc) & np.isfinite(yc)
    return {"x": xc[good], "y": yc[good], "snr": sn[good]}


# --------------------------------------------------------------------------------------------
# Alignment
# --------------------------------------------------------------------------------------------


def _affine_apply(aff: np.ndarray | None, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if aff is None:
        return x, y
    return aff[0, 0] * x + aff[0, 1] * y + aff[0, 2], aff[1, 0] * x + aff[1, 1] * y + aff[1, 2]


def _make_to_ref(sci_wcs: WCS, ref_wcs: WCS, aff: np.ndarray | None) -> Callable[[Any, Any], tuple]:
    """Pointwise map from science pixels to reference pixels (WCS, then the affine correction)."""

    def to_ref(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        px, py = _affine_apply(aff, np.asarray(x, float), np.asarray(y, float))
        ra, dec = sci_wcs.pixel_to_world_values(px, py)
        rx, ry = ref_wcs.world_to_pixel_values(ra, dec)
        return np.asarray(rx, float), np.asarray(ry, float)

    return to_ref


def _full_map(to_ref: Callable, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Reference pixel coordinates of every science pixel, by a cubic spline through a coarse grid."""
    ny, nx = shape
    step_x = max(1, min(32, (nx - 1) // 6))
    step_y = max(1, min(32, (ny - 1) // 6))
    gx = np.unique(np.r_[np.arange(0, nx, step_x), nx - 1]).astype(float)
    gy = np.unique(np.r_[np.arange(0, ny, step_y), ny - 1]).astype(float)
    gxx, gyy = np.meshgrid(gx, gy)
    rx, ry = to_ref(gxx, gyy)
    fx = RectBivariateSpline(gy, gx, rx, kx=3, ky=3)(np.arange(ny), np.arange(nx))
    fy = RectBivariateSpline(gy, gx, ry, kx=3, ky=3)(np.arange(ny), np.arange(nx))
    return fx.astype(np.float32), fy.astype(np.float32)


def _resample(coeffs: np.ndarray, bad_ref: np.ndarray, to_ref: Callable, shape: tuple[int, int], grow: int):
    """Resample the spline coefficients of the reference and its bad-pixel mask onto the science grid."""
    fx, fy = _full_map(to_ref, shape)
    out = ndimage.map_coordinates(coeffs, [fy, fx], order=3, prefilter=False, mode="mirror", output=np.float32)
    nyr, nxr = coeffs.shape
    outside = (fx < 0.5) | (fx > nxr - 1.5) | (fy < 0.5) | (fy > nyr - 1.5)  # spline boundary rows
    bad = ndimage.map_coordinates(bad_ref.astype(np.float32), [fy, fx], order=1, mode="nearest") > 0.01
    bad |= outside
    if grow > 0:
        bad = ndimage.binary_dilation(bad, iterations=grow)
    return out, bad


def _match(sci_st: dict, ref_st: dict, *, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices of matched stars: a coarse median offset first, then nearest neighbours within 1.5 px."""
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


def _fit_affine(p: np.ndarray, q: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted, sigma-clipped affine (or shift, for few stars) fit q = A p + b; returns A|b and inliers."""
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


def _offsets(sci_data, ref_data, xs, ys, sig_s, sig_r, snr) -> dict[str, float]:
    """Offsets of the reference stars from the science stars after alignment (px, weighted)."""
    xr, yr = _window_centroids(ref_data, xs, ys, sig_r)
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


def align(
    sci: Image,
    ref: Image,
    *,
    refine: bool,
    saturation_sci: float = np.inf,
    saturation_ref: float = np.inf,
    fwhm_sci: float | None = None,
    fwhm_ref: float | None = None,
    grow: int = 2,
    snr_min: float = 30.0,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Resample ``ref`` onto the pixel grid of ``sci`` through the WCSs, optionally refined on stars.

    Parameters
    ----------
    sci, ref : rbflow.io.Image
        Science and reference frames, both with a celestial WCS.
    refine : bool
        Fit an affine correction (shift, rotation, scale, shear) to matched bright isolated stars
        and resample again. When False the residual offset is still measured and reported.
    saturation_sci, saturation_ref : float, optional
        Saturation levels (ADU, as stored); pixels at or above are masked.
    fwhm_sci, fwhm_ref : float, optional
        PSF FWHM (science pixels) for star finding; default: 4 px.
    grow : int, optional
        Dilation (px) of the invalid-pixel masks.
    snr_min : float, optional
        Minimum matched-filter S/N of an alignment star.

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
        map, or None), ``stars`` (dict of the matched science stars x, y, snr) and ``to_ref``
        (callable: science pixel -> reference pixel).

    Raises
    ------
    InputError
        One of the frames has no celestial WCS (the message names the file).
    """
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
    sbkg, s_sig = _background(sci.data, bad_sci)
    sci_sub = np.where(bad_sci, 0.0, sci.data - sbkg).astype(np.float32)
    sci_st = _find_stars(sci_sub, s_sig, bad_sci, fwhm=fwhm_sci, snr_min=snr_min)

    aff = None
    to_ref = _make_to_ref(sci_wcs, ref_wcs, aff)
    aligned, bad = _resample(coeffs, bad_ref_raw, to_ref, shape, grow)
    rbkg, r_sig = _background(aligned, bad | bad_sci)
    ref_sub = np.where(bad, 0.0, aligned - rbkg).astype(np.float32)
    ref_st = _find_stars(ref_sub, r_sig, bad | bad_sci, fwhm=fwhm_ref, snr_min=snr_min)
    i, j = _match(sci_st, ref_st, radius=max(10.0, 3 * fwhm_sci))
    p = np.c_[sci_st["x"][i], sci_st["y"][i]]
    q = np.c_[ref_st["x"][j], ref_st["y"][j]]
    w = 1.0 / (1.0 / sci_st["snr"][i] ** 2 + 1.0 / ref_st["snr"][j] ** 2)
    n_match = len(i)
    if n_match < 3:
        log.warning(
            "align: only %d stars matched between '%s' and '%s'; alignment relies on the WCS alone",
            n_match, sci.path, ref.path,
        )
    refined = False
    if refine and n_match >= 3:
        aff, inl = _fit_affine(p, q, w)
        to_ref = _make_to_ref(sci_wcs, ref_wcs, aff)
        aligned, bad = _resample(coeffs, bad_ref_raw, to_ref, shape, grow)
        ref_sub = np.where(bad, 0.0, aligned - rbkg).astype(np.float32)
        p, w = p[inl], w[inl]
        refined = True
    snr = np.sqrt(w) if n_match else np.zeros(0)
    if n_match:
        off = _offsets(sci_sub, ref_sub, p[:, 0], p[:, 1], fwhm_sci * _FWHM2SIG, fwhm_ref * _FWHM2SIG, snr)
    else:
        off = {"rms": float("nan"), "dx": float("nan"), "dy": float("nan"), "sigma_x": 0.0, "sigma_y": 0.0}
    log.info(
        "align %s -> %s: %d stars, refined=%s, offset (%.3f, %.3f) px, rms %.3f px",
        ref.path, sci.path, n_match, refined, off["dx"], off["dy"], off["rms"],
    )
    mask = np.zeros(shape, np.uint8)
    mask[bad] |= MASK_BITS["REF_BAD"]
    if sat_ref.any():
        fx, fy = _full_map(to_ref, shape)
        sat_al = ndimage.map_coordinates(sat_ref.astype(np.float32), [fy, fx], order=1) > 0.01
        mask[ndimage.binary_dilation(sat_al, iterations=max(grow, 1))] |= MASK_BITS["SATURATED"]
    info = {
        **off,
        "nstars": int(len(p)),
        "refined": refined,
        "affine": aff,
        "stars": {"x": p[:, 0] if len(p) else np.zeros(0), "y": p[:, 1] if len(p) else np.zeros(0), "snr": snr},
        "to_ref": to_ref,
    }
    return aligned, mask, info


# --------------------------------------------------------------------------------------------
# PSFs on the science grid, flux ratio
# --------------------------------------------------------------------------------------------


def _ref_psf_on_sci_grid(psf_ref: PSFLike, to_ref: Callable, x: float, y: float, size: int) -> np.ndarray:
    """PSF of the aligned reference for a source at science pixel (x, y), on the stamp grid
    centred at (round(x), round(y)); includes the rotation/scale of the map and the blur of the
    cubic-spline resampling at the local pixel phase."""
    r0x, r0y = (float(v) for v in to_ref(x, y))
    e = 1.0
    jx = np.array(to_ref(x + e, y)) - np.array([r0x, r0y])
    jy = np.array(to_ref(x, y + e)) - np.array([r0x, r0y])
    jac = np.c_[jx, jy] / e  # d(ref)/d(sci), columns: x, y
    big = 2 * int(math.ceil(size * max(1.0, np.abs(jac).sum(axis=0).max()) / 2)) + 5
    st = psf_ref.stamp(r0x, r0y, big)
    h = size // 2
    u = np.arange(-h, h + 1, dtype=float)
    ux, uy = np.meshgrid(u + round(x) - x, u + round(y) - y)
    rx = r0x + jac[0, 0] * ux + jac[0, 1] * uy - round(r0x) + big // 2
    ry = r0y + jac[1, 0] * ux + jac[1, 1] * uy - round(r0y) + big // 2
    out = ndimage.map_coordinates(st.astype(np.float64), [ry, rx], order=3, mode="constant", cval=0.0)
    return out / out.sum()


def _psf_flux(data: np.ndarray, bad: np.ndarray, x: float, y: float, psf: np.ndarray, radius: float) -> float:
    """Linear least-squares flux of a unit-sum PSF stamp centred at pixel (round(x), round(y))."""
    h = psf.shape[0] // 2
    ix, iy = int(round(x)), int(round(y))
    if ix - h < 0 or iy - h < 0 or ix + h >= data.shape[1] or iy + h >= data.shape[0]:
        return float("nan")
    sub = data[iy - h : iy + h + 1, ix - h : ix + h + 1]
    b = bad[iy - h : iy + h + 1, ix - h : ix + h + 1]
    u = np.arange(-h, h + 1)
    r = np.hypot(u[None, :] + ix - x, u[:, None] + iy - y)
    use = (r <= radius) & ~b
    if b[r <= 1.5].any():
        return float("nan")
    p = psf[use]
    return float((p * sub[use]).sum() / (p * p).sum())


def _flux_ratio(
    N: np.ndarray, R: np.ndarray, bad: np.ndarray, stars: dict, psf_sci: PSFLike, psf_ref: PSFLike,
    to_ref: Callable, size: int, radius: float, max_stars: int = 100,
) -> tuple[float, float, int]:
    """Robust ratio F_r/F_n of PSF-fit fluxes of matched stars; returns (ratio, error, n)."""
    ratios = []
    for x, y in list(zip(stars["x"], stars["y"]))[:max_stars]:
        fn_ = _psf_flux(N, bad, x, y, psf_sci.stamp(x, y, size), radius)
        fr_ = _psf_flux(R, bad, x, y, _ref_psf_on_sci_grid(psf_ref, to_ref, x, y, size), radius)
        if np.isfinite(fn_) and np.isfinite(fr_) and fn_ > 0 and fr_ > 0:
            ratios.append(fr_ / fn_)
    ratios = np.asarray(ratios)
    if ratios.size < 3:
        raise ValueError(f"only {ratios.size} usable stars to fit the flux ratio")
    use = np.ones(ratios.size, bool)
    for _ in range(5):
        med = np.median(ratios[use])
        sig = 1.4826 * np.median(np.abs(ratios[use] - med))
        new = np.abs(ratios - med) <= 3 * max(sig, 1e-6 * med)
        if np.array_equal(new, use):
            break
        use = new
    med = float(np.median(ratios[use]))
    err = float(1.2533 * 1.4826 * np.median(np.abs(ratios[use] - med)) / math.sqrt(use.sum()))
    return med, err, int(use.sum())


# --------------------------------------------------------------------------------------------
# Whole-frame subtraction
# --------------------------------------------------------------------------------------------


def _tiles(n: int, tile: int) -> list[tuple[int, int, int, np.ndarray]]:
    """Tiles along one axis: (window start, window stop, centre, weights on the window).

    Tile centres are about ``tile`` apart (``n`` split evenly). The weights are linear
    interpolation between neighbouring centres and linear extrapolation from the two outer
    centres to the frame edges; they sum to 1 everywhere, so that the blended result follows a
    PSF interpolated linearly between tile centres.
    """
    k = max(1, int(round(n / tile)))
    step = n / k
    centres = (np.arange(k) + 0.5) * step
    pos = np.arange(n, dtype=float)
    if k == 1:
        return [(0, n, int(round(centres[0])), np.ones(n, np.float32))]
    # interpolation/extrapolation weights of every pixel for every centre
    j = np.clip(np.floor((pos - centres[0]) / step).astype(int), 0, k - 2)
    t = (pos - centres[j]) / step
    weights = np.zeros((k, n))
    weights[j, np.arange(n)] = 1.0 - t
    weights[j + 1, np.arange(n)] = t
    out = []
    for i, c in enumerate(centres):
        nz = np.nonzero(weights[i])[0]
        lo, hi = int(nz[0]), int(nz[-1]) + 1
        out.append((lo, hi, int(round(c)), weights[i, lo:hi].astype(np.float32)))
    return out


def _robust_std(v: np.ndarray) -> float:
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan")
    return float(1.4826 * np.median(np.abs(v - np.median(v))))


def subtract_images(
    sci: Image,
    ref: Image,
    psf_sci: PSFLike,
    psf_ref: PSFLike,
    info_sci: FrameInfo,
    info_ref: FrameInfo,
    cfg: dict[str, Any],
) -> fits.HDUList:
    """Align ``ref`` onto ``sci`` and subtract them with ZOGY on overlapping tiles.

    Parameters
    ----------
    sci, ref : rbflow.io.Image
        Science and reference frames (with WCS).
    psf_sci, psf_ref : PSFLike
        PSF models of each frame, in its own pixels (e.g. :class:`rbflow.psf.PSFModel`).
    info_sci, info_ref : rbflow.frames.FrameInfo
        Gains (e-/ADU) and saturation levels (ADU) of the frames.
    cfg : dict
        The telescope's ``subtract`` block: ``method`` ('zogy'); ``tile`` (px): spacing of the
        tile centres where the PSFs are evaluated, each tile's ZOGY result reaching the
        neighbouring centres and blended with linear-interpolation weights; ``overlap`` (px):
        extra margin of each tile (at least the PSF stamp size is used); ``refine_astrometry``.

    Returns
    -------
    astropy.io.fits.HDUList
        Primary (fit cards) + SCI, REF, DIFF, SCORR, VAR, MASK, PSFD (cube of P_D per tile, centres
        in cards TCXk/TCYk); the images carry the science WCS. Masked pixels (MASK != 0, grown by
        one FWHM) are NaN in DIFF, SCORR and VAR.
        Smooth sky-level residuals (mesh of 32 px over the empty sky) are removed from DIFF and SCORR.
        SCORR is normalised to unit robust std in empty sky (factor ``SCORRNRM``) and VAR rescaled
        so that DIFF/sqrt(VAR) has unit robust std (``DIFFNRM``). ``FLXECORR`` is the factor by
        which a white-noise PSF-fit error on DIFF must be multiplied for the correlated noise.

    Raises
    ------
    InputError
        A frame has no WCS, or fewer than three stars are usable for the flux ratio (the message
        names both files).
    ConfigError
        ``cfg['method']`` is not 'zogy'.
    """
    if cfg.get("method", "zogy") != "zogy":
        raise ConfigError(f"key 'subtract.method' is {cfg['method']!r}: only 'zogy' is implemented")
    ny, nx = sci.data.shape
    cx, cy = (nx - 1) / 2.0, (ny - 1) / 2.0
    fwhm_s = float(psf_sci.fwhm(cx, cy))
    fwhm_r_native = float(psf_ref.fwhm((ref.data.shape[1] - 1) / 2.0, (ref.data.shape[0] - 1) / 2.0))
    aligned, mask, ainfo = align(
        sci, ref, refine=bool(cfg.get("refine_astrometry", True)),
        saturation_sci=info_sci.saturation, saturation_ref=info_ref.saturation, fwhm_sci=fwhm_s,
        fwhm_ref=fwhm_r_native,
    )
    to_ref = ainfo["to_ref"]
    rcx, rcy = to_ref(cx, cy)
    jx = np.array(to_ref(cx + 1, cy)) - np.array([rcx, rcy])
    det = abs(float(np.linalg.det(np.c_[jx, np.array(to_ref(cx, cy + 1)) - np.array([rcx, rcy])])))
    fwhm_r = fwhm_r_native / math.sqrt(det)
    size = 2 * int(math.ceil(4 * max(fwhm_s, fwhm_r))) + 1

    bad_sci = ~np.isfinite(sci.data)
    sat_sci = np.nan_to_num(sci.data, nan=0.0) >= info_sci.saturation
    mask[ndimage.binary_dilation(bad_sci, iterations=2)] |= MASK_BITS["SCI_BAD"]
    mask[ndimage.binary_dilation(sat_sci, iterations=2)] |= MASK_BITS["SATURATED"]
    bad = mask != 0

    nbkg, sn = _background(sci.data, bad)
    rbkg, sr = _background(aligned, bad)
    N = np.where(bad, 0.0, sci.data - nbkg).astype(np.float32)
    R = np.where(bad, 0.0, aligned - rbkg).astype(np.float32)
    try:
        fr, fr_err, n_flux = _flux_ratio(
            N, R, bad, ainfo["stars"], psf_sci, psf_ref, to_ref, size, radius=2.0 * max(fwhm_s, fwhm_r)
        )
    except ValueError as exc:
        raise InputError(
            f"science '{sci.path}' / reference '{ref.path}': cannot fit the flux ratio ({exc}); the pair "
            "needs at least 3 unsaturated isolated stars in common with S/N > 30: check the overlap of "
            "the frames, their WCS and the saturation level in the telescope file"
        ) from exc
    log.info(
        "flux ratio F_r/F_n = %.4f +- %.4f (%d stars); sigma_n %.3f, sigma_r %.3f", fr, fr_err, n_flux, sn, sr
    )
    var_n = (sn**2 + np.maximum(N, 0) / info_sci.gain).astype(np.float32)
    var_r = (sr**2 + np.maximum(R, 0) / info_ref.gain).astype(np.float32)

    margin = max(int(cfg.get("overlap", 32)), size)
    pads = ((margin, margin), (margin, margin))
    Np, Rp = np.pad(N, pads, mode="reflect"), np.pad(R, pads, mode="reflect")
    VNp, VRp = np.pad(var_n, pads, mode="reflect"), np.pad(var_r, pads, mode="reflect")
    D = np.zeros((ny, nx), np.float32)
    V = np.zeros_like(D)
    SC = np.zeros_like(D)
    tile = int(cfg.get("tile", 512))
    psfd, centres = [], []
    for y0, y1, ty, wy in _tiles(ny, tile):
        for x0, x1, tx, wx in _tiles(nx, tile):
            pn = psf_sci.stamp(tx, ty, size, centred=True)
            pr = _ref_psf_on_sci_grid(psf_ref, to_ref, tx, ty, size)
            win = (slice(y0, y1 + 2 * margin), slice(x0, x1 + 2 * margin))
            res = zogy(
                Np[win], Rp[win], pn, pr, sn, sr, fr, 1.0, var_n=VNp[win], var_r=VRp[win],
                dx=ainfo["sigma_x"], dy=ainfo["sigma_y"],
            )
            core = (slice(margin, margin + y1 - y0), slice(margin, margin + x1 - x0))
            w = wy[:, None] * wx[None, :]
            D[y0:y1, x0:x1] += w * res["D"][core]
            V[y0:y1, x0:x1] += w * res["var_D"][core]
            SC[y0:y1, x0:x1] += w * res["Scorr"][core]
            psfd.append(res["P_D"])
            centres.append((tx, ty))

    # empty sky: no source above 3 sigma in either image (grown), no masked pixel
    src = (N > 3 * sn) | (R > 3 * sr)
    empty = ~ndimage.binary_dilation(src, iterations=max(2, int(round(fwhm_s)))) & ~bad
    # sky-level errors of N and R that the mesh backgrounds leave (flat-field residuals on the mesh
    # scale, faint extended light) are smooth; the matched filter S sums them over the PSF area,
    # so they are removed from S and D with a mesh background of the empty sky of each
    sc_bkg, _ = _background(SC, ~empty, box=_RESID_BOX)
    d_bkg, _ = _background(D, ~empty, box=_RESID_BOX)
    SC -= sc_bkg
    D -= d_bkg
    k_s = _robust_std(SC[empty])
    k_d = _robust_std((D / np.sqrt(V))[empty])
    SC /= k_s
    V *= k_d**2
    log.info("SCORR robust std in empty sky %.3f (normalised), DIFF/sqrt(VAR) %.3f (VAR rescaled)", k_s, k_d)
    # pixels next to a masked area hold truncated, PSF-mismatched profiles: grow the mask by a FWHM
    grow = max(1, int(math.ceil(fwhm_s)))
    for bit in MASK_BITS.values():
        mask[ndimage.binary_dilation((mask & bit) != 0, iterations=grow)] |= bit
    for arr in (D, SC, V):
        arr[mask != 0] = np.nan

    whdr = sci.wcs.to_header(relax=True)
    prim = fits.PrimaryHDU()
    h = prim.header
    cards = [
        ("METHOD", "zogy", "Zackay, Ofek & Gal-Yam 2016"),
        ("FLXRATIO", fr, "F_r/F_n reference/science flux ratio"),
        ("FLXRERR", fr_err, "error of FLXRATIO"),
        ("NFLXSTAR", n_flux, "stars used for FLXRATIO"),
        ("SIGMAN", sn, "[adu] background noise of SCI"),
        ("SIGMAR", sr, "[adu] bkg noise of aligned REF, unscaled"),
        ("GAINN", info_sci.gain, "[e-/adu] science gain"),
        ("GAINR", info_ref.gain, "[e-/adu] reference gain"),
        ("ALIGNRMS", ainfo["rms"], "[pix] rms star offset REF-SCI, aligned"),
        ("ALIGNDX", ainfo["dx"], "[pix] mean x offset REF-SCI, aligned"),
        ("ALIGNDY", ainfo["dy"], "[pix] mean y offset REF-SCI, aligned"),
        ("ALIGNSX", ainfo["sigma_x"], "[pix] astrometric scatter x (sigma_x)"),
        ("ALIGNSY", ainfo["sigma_y"], "[pix] astrometric scatter y (sigma_y)"),
        ("NSTARS", ainfo["nstars"], "stars matched for the alignment"),
        ("REFINED", ainfo["refined"], "affine astrometric refinement applied"),
        ("NTILES", len(centres), "ZOGY tiles, each with its own PSFs"),
        ("TILE", tile, "[pix] tile spacing (subtract.tile)"),
        ("OVERLAP", margin, "[pix] tile margin used"),
        ("PSFSIZE", size, "[pix] PSF stamp size"),
        ("FWHMSCI", fwhm_s, "[pix] science PSF FWHM, frame centre"),
        ("FWHMREF", fwhm_r, "[pix] ref PSF FWHM, science px"),
        ("SCORRNRM", k_s, "robust std of raw SCORR (divided out)"),
        ("DIFFNRM", k_d, "robust std DIFF/sqrt(raw VAR), in VAR"),
        ("FLXECORR", k_s / k_d, "PSF-fit error factor, correlated noise"),
        ("MASKBITS", ", ".join(f"{k}={v}" for k, v in MASK_BITS.items()), "MASK bits"),
    ]
    for key, value, comment in cards:
        if isinstance(value, float) and not math.isfinite(value):
            value = -1.0
            comment = "undefined (no star)"
        h[key] = (value, comment)

    sci_hdr = sci.header.copy()
    for key in ("SIMPLE", "EXTEND", "XTENSION", "PCOUNT", "GCOUNT", "EXTNAME", "BITPIX", "NAXIS", "NAXIS1",
                "NAXIS2", "BSCALE", "BZERO", "BLANK", "CHECKSUM", "DATASUM"):
        sci_hdr.remove(key, ignore_missing=True, remove_all=True)
    sci_hdr["BUNIT"] = "adu"

    def hdu(data: np.ndarray, name: str, header: fits.Header | None = None) -> fits.ImageHDU:
        hd = (header or whdr).copy()
        return fits.ImageHDU(data, header=hd, name=name)

    ref_scaled = np.where(mask & MASK_BITS["REF_BAD"], np.nan, R / fr).astype(np.float32)
    sci_out = np.where(bad_sci, np.nan, sci.data - nbkg).astype(np.float32)
    psfd_hdu = fits.ImageHDU(np.asarray(psfd, np.float32), name="PSFD")
    psfd_hdu.header["NTILES"] = (len(centres), "PSF of DIFF per tile (axis 3)")
    for k, (tx, ty) in enumerate(centres):
        psfd_hdu.header[f"TCX{k}"] = (tx, f"[pix] x centre of tile {k}")
        psfd_hdu.header[f"TCY{k}"] = (ty, f"[pix] y centre of tile {k}")
    return fits.HDUList(
        [
            prim,
            hdu(sci_out, "SCI", sci_hdr),
            hdu(ref_scaled, "REF"),
            hdu(D, "DIFF"),
            hdu(SC, "SCORR"),
            hdu(V, "VAR"),
            hdu(mask, "MASK"),
            psfd_hdu,
        ]
    )


def run_subtract(
    sci_path: str | os.PathLike,
    ref_path: str | os.PathLike,
    sci_psf_path: str | os.PathLike,
    ref_psf_path: str | os.PathLike,
    out_path: str | os.PathLike,
    telescope: dict[str, Any],
) -> None:
    """Read a science/reference pair and their PSF models, subtract, and write the MEF file.

    Parameters
    ----------
    sci_path, ref_path : path-like
        Science and reference FITS frames.
    sci_psf_path, ref_psf_path : path-like
        PSF model files (:meth:`rbflow.psf.PSFModel.read`).
    out_path : path-like
        Output MEF (see :func:`subtract_images`).
    telescope : dict
        Validated telescope configuration (its ``subtract`` block and frame facts are used).

    Raises
    ------
    InputError
        Missing/unreadable inputs, missing WCS or frame facts.
    """
    sci = read_image(sci_path)
    ref = read_image(ref_path)
    info_sci = frame_info(sci.header, telescope, path=sci_path)
    info_ref = frame_info(ref.header, telescope, path=ref_path)
    hdul = subtract_images(
        sci, ref, PSFModel.read(sci_psf_path), PSFModel.read(ref_psf_path), info_sci, info_ref,
        telescope["subtract"],
    )
    hdul[0].header["SCIFILE"] = (Path(sci_path).name, "science frame")
    hdul[0].header["REFFILE"] = (Path(ref_path).name, "reference frame")
    write_fits(hdul, out_path)
