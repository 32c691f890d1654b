"""Alignment of a reference onto a science frame and image subtraction (ZOGY, or sfft).

The reference is resampled onto the science pixel grid through the two WCSs (cubic spline),
optionally refined by an affine fit to matched bright stars. The default subtraction follows
Zackay, Ofek & Gal-Yam (2016, ApJ 830, 27; "ZOGY"), run on overlapping tiles, each with the PSFs
of its centre, blended with linear-interpolation weights, so that a spatially varying PSF is
followed. The tiles run on :data:`_WORKERS` threads, in single precision with real FFTs; each
tile's kernels are transformed once (:func:`zogy_kernels`) and applied to the four images of
the tile (science, reference and their variance maps) in one batched transform
(:func:`zogy_apply`). The ``sfft`` method (:mod:`rbflow.sfft_method`, optional) shares the
alignment, masks, backgrounds, flux ratio and output format.

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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import scipy.fft as sfft
from astropy.io import fits
from astropy.wcs import WCS
from scipy import ndimage
from scipy.interpolate import BSpline, RectBivariateSpline
from scipy.spatial import cKDTree

from rbflow.errors import ConfigError, InputError
from rbflow.frames import FrameInfo, frame_hdu, frame_info
from rbflow.io import Image, read_image, write_fits
from rbflow.psf import PSFModel

__all__ = [
    "MASK_BITS",
    "METHODS",
    "PSFLike",
    "PreparedPair",
    "Difference",
    "prepare_pair",
    "ZogyKernels",
    "zogy",
    "zogy_kernels",
    "zogy_apply",
    "align",
    "subtract_images",
    "run_subtract",
]

log = logging.getLogger(__name__)

#: Bits of the ``MASK`` extension (nonzero = invalid pixel).
MASK_BITS = {"SCI_BAD": 1, "REF_BAD": 2, "SATURATED": 4}

#: Subtraction methods (``subtract.method``).
METHODS = ("zogy", "sfft")
#: Threads of the FFTs, of the ZOGY tiles and of sfft.
_WORKERS = 2
#: Mesh (px) of the background fitted to S and D after the subtraction (see :func:`subtract_images`).
_RESID_BOX = 32
#: Size of the grid of the squared ZOGY kernels, in PSF stamp sizes (see :func:`zogy_kernels`).
_KERNEL_GRID = 4
_FWHM2SIG = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


class PSFLike(Protocol):
    """What the subtraction needs from a PSF model (see :class:`rbflow.psf.PSFModel`)."""

    def stamp(self, x: float, y: float, size: int, *, centred: bool = False) -> np.ndarray: ...

    def fwhm(self, x: float, y: float) -> float: ...


# --------------------------------------------------------------------------------------------
# ZOGY core
# --------------------------------------------------------------------------------------------


def _fast_len(n: int) -> int:
    """Smallest length >= n that is a multiple of 8 with no prime factor above 7: pocketfft's real
    transforms are fastest there (measured: 1120 is 20 % faster than scipy's 5-smooth 1125)."""
    m = -(-n // 8) * 8
    while True:
        k = m
        for p in (2, 3, 5, 7):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 8


def _fft_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """Fast real-FFT shape at least ``shape`` (see :func:`_fast_len`)."""
    return _fast_len(shape[0]), _fast_len(shape[1])


def _stamp_rfft2(stamps: np.ndarray, shape: tuple[int, int], workers: int) -> np.ndarray:
    """``rfft2`` on a periodic grid of ``shape`` of centred stamps ``(k, h, w)``, each placed with its
    central pixel (index ``h // 2, w // 2``) at (0, 0). Only the ``h`` non-zero rows are transformed
    along x before the transform along y."""
    k, h, w = stamps.shape
    rows = np.zeros((k, h, shape[1]), stamps.dtype)
    rows[:, :, (np.arange(w) - w // 2) % shape[1]] = stamps
    rows_hat = sfft.rfft(rows, axis=2, workers=workers)
    full = np.zeros((k, shape[0], rows_hat.shape[2]), rows_hat.dtype)
    full[:, (np.arange(h) - h // 2) % shape[0]] = rows_hat
    return sfft.fft(full, axis=1, workers=workers, overwrite_x=True)


@dataclass(frozen=True)
class ZogyKernels:
    """Fourier transforms (rfft2 layout, complex64) of the ZOGY kernels of one PSF pair.

    ``D = kdn * N - kdr * R`` (science flux units) and ``S = kn * N - kr * R`` (``*``: convolution);
    ``sq`` stacks the transforms of the pixel-wise squares of kn, kr, kdn, kdr (variance kernels).
    """

    shape: tuple[int, int]
    kdn: np.ndarray
    kdr: np.ndarray
    kn: np.ndarray
    kr: np.ndarray
    sq: np.ndarray
    #: Unit-sum PSF of D (float32 stamp of the size of the science PSF stamp).
    pd: np.ndarray
    #: Flux zero point of the normalised D of the paper.
    f_d: float


def _kernel_spectra(
    Pn: np.ndarray,
    Pr: np.ndarray,
    sn: float,
    sr: float,
    fr: float,
    fn: float,
    shape: tuple[int, int],
    workers: int,
) -> tuple[np.ndarray, float]:
    """Transforms (complex64) of kdn, kdr, kn, kr and P_D on a periodic grid of ``shape``, and F_D.

    The PSF transforms are taken in double precision (the kernels are ratios of them where both
    are small, so their rounding errors must stay far below the clip of ``a``), the rest in single.
    """
    otf = _stamp_rfft2(np.stack([Pn, Pr]).astype(np.float64), shape, workers).astype(np.complex64)
    pn_hat, pr_hat = otf[0], otf[1]
    pn2 = pn_hat.real**2 + pn_hat.imag**2
    pr2 = pr_hat.real**2 + pr_hat.imag**2
    a = sn**2 * fr**2 * pr2 + sr**2 * fn**2 * pn2
    a = np.maximum(a, np.float32(1e-12) * a.max())
    den = np.sqrt(a)
    f_d = fr * fn / math.sqrt(sn**2 * fr**2 + sr**2 * fn**2)
    scale = fn / f_d  # D in science flux units
    spectra = np.empty((5, *pn_hat.shape), np.complex64)
    spectra[0] = scale * fr * pr_hat / den  # kdn
    spectra[1] = scale * fn * pn_hat / den  # kdr
    spectra[2] = fn * fr**2 * np.conj(pn_hat) * (pr2 / a)  # kn
    spectra[3] = fr * fn**2 * np.conj(pr_hat) * (pn2 / a)  # kr
    spectra[4] = fr * fn * pr_hat * pn_hat / (f_d * den)  # P_D
    return spectra, f_d


def zogy_kernels(
    Pn: np.ndarray,
    Pr: np.ndarray,
    sn: float,
    sr: float,
    fr: float,
    fn: float,
    shape: tuple[int, int],
    *,
    workers: int = _WORKERS,
) -> ZogyKernels:
    """ZOGY kernels of one PSF pair on a periodic grid of ``shape`` (see :func:`zogy` for the symbols).

    The kernels of D and S are exact on the grid. The squared kernels (for the variance maps) and
    P_D are computed on a smaller periodic grid, :data:`_KERNEL_GRID` times the stamp size (the
    kernels are compact), then zero-padded.
    """
    spectra, f_d = _kernel_spectra(Pn, Pr, sn, sr, fr, fn, shape, workers)
    small = _fft_shape(tuple(min(n, _KERNEL_GRID * max(Pn.shape[0], Pr.shape[0])) for n in shape))
    if small != shape:
        spectra_small, _ = _kernel_spectra(Pn, Pr, sn, sr, fr, fn, small, workers)
    else:
        spectra_small = spectra
    real = sfft.irfft2(spectra_small, s=small, axes=(1, 2), workers=workers)
    h, w = Pn.shape
    pd = np.roll(real[4], (h // 2, w // 2), axis=(0, 1))[:h, :w].astype(np.float64)
    sq = np.fft.fftshift(real[[2, 3, 0, 1]] ** 2, axes=(1, 2))  # kn², kr², kdn², kdr², centred
    sq_hat = _stamp_rfft2(sq.astype(np.float32), shape, workers)
    return ZogyKernels(
        shape=shape,
        kdn=spectra[0],
        kdr=spectra[1],
        kn=spectra[2],
        kr=spectra[3],
        sq=sq_hat,
        pd=(pd / pd.sum()).astype(np.float32),
        f_d=f_d,
    )


def _grad_sq(a: np.ndarray, core: tuple[slice, slice], dx: float, dy: float) -> np.ndarray:
    """``dx² (da/dx)² + dy² (da/dy)²`` on ``core`` (central differences, one-sided at the array edges)."""
    ys, xs = core
    y0, x0 = max(ys.start - 1, 0), max(xs.start - 1, 0)
    sub = a[y0 : min(ys.stop + 1, a.shape[0]), x0 : min(xs.stop + 1, a.shape[1])]
    gy, gx = np.gradient(sub)
    inner = (slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0))
    return dx**2 * gx[inner] ** 2 + dy**2 * gy[inner] ** 2


def zogy_apply(
    k: ZogyKernels,
    N: np.ndarray,
    R: np.ndarray,
    sn: float,
    sr: float,
    *,
    var_n: np.ndarray | None = None,
    var_r: np.ndarray | None = None,
    dx: float = 0.0,
    dy: float = 0.0,
    core: tuple[slice, slice] | None = None,
    workers: int = _WORKERS,
) -> dict[str, np.ndarray]:
    """Apply precomputed ZOGY kernels to one (tile of an) image pair; see :func:`zogy`.

    Returns ``D``, ``var_D``, ``S`` and ``Scorr`` (float32; D and var_D may be views) on ``core``
    (default: the whole input).
    """
    core = core or (slice(0, N.shape[0]), slice(0, N.shape[1]))
    with_var = var_n is not None or var_r is not None
    inputs = [N, R]
    if with_var:
        inputs += [
            np.full(N.shape, sn**2, np.float32) if var_n is None else var_n,
            np.full(N.shape, sr**2, np.float32) if var_r is None else var_r,
        ]
    hats = sfft.rfft2(np.stack(inputs).astype(np.float32, copy=False), s=k.shape, axes=(1, 2), workers=workers)
    spec = np.empty((5 if with_var else 3, *hats.shape[1:]), np.complex64)
    np.multiply(k.kdn, hats[0], out=spec[0])
    np.multiply(k.kdr, hats[1], out=spec[1])
    spec[0] -= spec[1]  # D
    np.multiply(k.kn, hats[0], out=spec[1])  # S = s_n - s_r
    np.multiply(k.kr, hats[1], out=spec[2])
    if with_var:  # variance maps of S and D; the transforms of the inputs are overwritten
        np.multiply(k.sq[0], hats[2], out=spec[3])
        np.multiply(k.sq[2], hats[2], out=spec[4])
        spec[3] += np.multiply(k.sq[1], hats[3], out=hats[2])
        spec[4] += np.multiply(k.sq[3], hats[3], out=hats[3])
    real = sfft.irfft2(spec, s=k.shape, axes=(1, 2), workers=workers)
    D, s_n, s_r = real[0][core], real[1], real[2]
    S = s_n[core] - s_r[core]
    if with_var:
        v_s, v_d = real[3][core], real[4][core]
    else:
        v_s = np.float32(sn**2 * k.sq[0][0, 0].real + sr**2 * k.sq[1][0, 0].real)
        v_d = np.broadcast_to(np.float32(sn**2 * k.sq[2][0, 0].real + sr**2 * k.sq[3][0, 0].real), D.shape).copy()
    if dx > 0 or dy > 0:
        v_s = v_s + _grad_sq(s_n, core, dx, dy) + _grad_sq(s_r, core, dx, dy)
    scorr = S / np.sqrt(np.maximum(v_s, np.finfo(np.float32).tiny))
    return {"D": D, "var_D": v_d, "S": S, "Scorr": scorr}


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
    k = zogy_kernels(Pn, Pr, sn, sr, fr, fn, _fft_shape(N.shape))
    res = zogy_apply(k, N, R, sn, sr, var_n=var_n, var_r=var_r, dx=dx, dy=dy)
    return {**res, "P_D": k.pd, "F_D": k.f_d}


# --------------------------------------------------------------------------------------------
# Backgrounds, stars, centroids
# --------------------------------------------------------------------------------------------


def _mesh_axis(n: int, box: int) -> tuple[int, np.ndarray]:
    """Number of meshes along an axis of ``n`` pixels and their centres (the last one may be partial)."""
    k = -(-n // box)
    start = np.arange(k) * box
    return k, start + (np.minimum(start + box, n) - start - 1) / 2.0


def _range_median(s: np.ndarray, rows: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Median of the row-sorted ``s[rows]`` over their columns ``lo:hi`` (NaN where empty)."""
    n = hi - lo
    i1 = np.clip(lo + (n - 1) // 2, 0, s.shape[1] - 1)
    i2 = np.clip(lo + n // 2, 0, s.shape[1] - 1)
    med = 0.5 * (s[rows, i1].astype(np.float64) + s[rows, i2])
    return np.where(n > 0, med, np.nan)


def _range_std(
    d: np.ndarray, d2: np.ndarray, width: int, rows: np.ndarray, lo: np.ndarray, hi: np.ndarray
) -> np.ndarray:
    """Population std of rows ``rows`` over their columns ``lo:hi``.

    ``d`` and ``d2 = d²`` (float64) are the rows (of ``width`` values) flattened, plus one spare last
    value so that every range end lies inside them.
    """
    n = hi - lo
    starts = rows * width
    idx = np.c_[starts + lo, starts + np.maximum(hi, lo)].ravel()
    s1 = np.where(n > 0, np.add.reduceat(d, idx)[::2], np.nan)
    s2 = np.where(n > 0, np.add.reduceat(d2, idx)[::2], np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sqrt(np.maximum(s2 / n - (s1 / n) ** 2, 0.0))


def _row_search(s: np.ndarray, rows: np.ndarray, v: np.ndarray, *, right: bool) -> np.ndarray:
    """``searchsorted`` of ``v[i]`` in the sorted row ``s[rows[i]]`` (NaNs last), by bisection."""
    m = s.shape[1]
    lo = np.zeros(rows.size, np.intp)
    hi = np.full(rows.size, m, np.intp)
    for _ in range(int(m).bit_length()):
        mid = (lo + hi) // 2
        val = s[rows, np.minimum(mid, m - 1)]
        with np.errstate(invalid="ignore"):
            up = (val <= v if right else val < v) & (mid < hi)
        lo = np.where(up, mid + 1, lo)
        hi = np.where(up, hi, mid)
    return lo


def _clipped_stats(cells: np.ndarray, sigma: float = 3.0, maxiters: int = 5) -> tuple[np.ndarray, ...]:
    """Sigma-clipped median, std and number of kept values along the last axis of ``cells``.

    Same result as astropy's ``SigmaClip(sigma, maxiters)`` (median centre, population std, NaN
    ignored; the kept values are those inside the last bounds), computed on rows sorted once, so
    that every clipped set is a range of columns; rows that have converged are left alone.
    """
    lead = cells.shape[:-1]
    s = np.sort(cells.reshape(-1, cells.shape[-1]), axis=1)  # NaN last
    nrow, m = s.shape
    rows = np.arange(nrow)
    lo = np.zeros(nrow, np.intp)
    hi = m - np.isnan(s).sum(axis=1)
    d = np.zeros(nrow * m + 1)
    shifted = d[:-1].reshape(nrow, m)
    np.subtract(s, np.nan_to_num(_range_median(s, rows, lo, hi))[:, None], out=shifted)  # precise sums
    shifted[np.isnan(shifted)] = 0.0
    d2 = d * d
    keep_lo, keep_hi = lo.copy(), hi.copy()
    for it in range(maxiters):
        cen, std = _range_median(s, rows, lo, hi), _range_std(d, d2, m, rows, lo, hi)
        below = _row_search(s, rows, cen - sigma * std, right=False)
        upto = np.maximum(_row_search(s, rows, cen + sigma * std, right=True), below)
        new_lo = np.maximum(lo, below)
        new_hi = np.maximum(np.minimum(hi, upto), new_lo)
        stop = (new_hi - new_lo == hi - lo) | (new_hi == new_lo) | (it == maxiters - 1)
        keep_lo[rows[stop]], keep_hi[rows[stop]] = below[stop], upto[stop]
        rows, lo, hi = rows[~stop], new_lo[~stop], new_hi[~stop]
        if not rows.size:
            break
    every = np.arange(nrow)
    med, rms = _range_median(s, every, keep_lo, keep_hi), _range_std(d, d2, m, every, keep_lo, keep_hi)
    return med.reshape(lead), rms.reshape(lead), (keep_hi - keep_lo).reshape(lead)


def _neighbour_nanmedian(a: np.ndarray) -> np.ndarray:
    """NaN-ignoring median of each 3x3 neighbourhood (edges repeated), NaN where all are NaN."""
    p = np.pad(a, 1, mode="edge")
    ny, nx = a.shape
    stack = np.stack([p[i : i + ny, j : j + nx] for i in range(3) for j in range(3)], axis=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN neighbourhoods give NaN
        return np.nanmedian(stack, axis=-1)


def _spline_grid(spl: RectBivariateSpline, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Values (float32) of a bivariate spline on the grid ``y`` x ``x``: a product of B-spline design matrices."""
    ty, tx = spl.get_knots()
    ky, kx = spl.degrees
    by = BSpline.design_matrix(y, ty, ky).toarray()
    bx = BSpline.design_matrix(x, tx, kx).toarray()
    coef = spl.get_coeffs().reshape(by.shape[1], bx.shape[1])
    return (by @ coef).astype(np.float32) @ bx.T.astype(np.float32)


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
    med, rms, ngood = _clipped_stats(cells)
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
    local = _neighbour_nanmedian(resid)
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
    out = _spline_grid(spl, py, px)
    out += coef[2] * (np.arange(ny) - py)[:, None] + coef[1] * (np.arange(nx) - px)[None, :]
    return out.astype(np.float32), sig


def _backgrounds(
    images: list[np.ndarray], bads: list[np.ndarray], *, box: int | None = None
) -> list[tuple[np.ndarray, float]]:
    """:func:`_background` of several images, on :data:`_WORKERS` threads."""
    with ThreadPoolExecutor(_WORKERS) as pool:
        return list(pool.map(lambda args: _background(*args, box=box), zip(images, bads)))


def _dilate(mask: np.ndarray, iterations: int) -> np.ndarray:
    """Binary dilation by ``iterations`` steps of the 4-connected cross (quick when nothing is set)."""
    if not mask.any():
        return np.zeros(mask.shape, bool)
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
    near_bad = _dilate(bad, max(1, int(round(2 * fwhm))))
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
    yy, xx = np.arange(ny, dtype=float), np.arange(nx, dtype=float)
    fx = _spline_grid(RectBivariateSpline(gy, gx, rx, kx=3, ky=3), yy, xx)
    fy = _spline_grid(RectBivariateSpline(gy, gx, ry, kx=3, ky=3), yy, xx)
    return fx.astype(np.float32), fy.astype(np.float32)


def _resample(coeffs: np.ndarray, bad_ref: np.ndarray, to_ref: Callable, shape: tuple[int, int], grow: int):
    """Resample the spline coefficients of the reference and its bad-pixel mask onto the science grid."""
    fx, fy = _full_map(to_ref, shape)
    out = ndimage.map_coordinates(coeffs, [fy, fx], order=3, prefilter=False, mode="mirror", output=np.float32)
    nyr, nxr = coeffs.shape
    outside = (fx < 0.5) | (fx > nxr - 1.5) | (fy < 0.5) | (fy > nyr - 1.5)  # spline boundary rows
    bad = outside
    if bad_ref.any():
        bad |= ndimage.map_coordinates(bad_ref.astype(np.float32), [fy, fx], order=1, mode="nearest") > 0.01
    if grow > 0:
        bad = _dilate(bad, grow)
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
    if bad.all():
        raise InputError(
            f"science '{sci.path}' does not overlap reference '{ref.path}' (no valid reference pixel on its grid): "
            "check that the frames are of one field and both WCS are right"
        )
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
            n_match,
            sci.path,
            ref.path,
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
        ref.path,
        sci.path,
        n_match,
        refined,
        off["dx"],
        off["dy"],
        off["rms"],
    )
    mask = np.zeros(shape, np.uint8)
    mask[bad] |= MASK_BITS["REF_BAD"]
    if sat_ref.any():
        fx, fy = _full_map(to_ref, shape)
        sat_al = ndimage.map_coordinates(sat_ref.astype(np.float32), [fy, fx], order=1) > 0.01
        mask[_dilate(sat_al, max(grow, 1))] |= MASK_BITS["SATURATED"]
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
    N: np.ndarray,
    R: np.ndarray,
    bad: np.ndarray,
    stars: dict,
    psf_sci: PSFLike,
    psf_ref: PSFLike,
    to_ref: Callable,
    size: int,
    radius: float,
    max_stars: int = 100,
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


def _tile_zogy(
    planes: list[np.ndarray],
    pn: np.ndarray,
    pr: np.ndarray,
    win: tuple[slice, slice],
    core: tuple[slice, slice],
    sn: float,
    sr: float,
    fr: float,
    dx: float,
    dy: float,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """ZOGY on one tile window of the padded N, R, var_n, var_r; results on the core, and P_D."""
    n, r, vn, vr = (p[win] for p in planes)
    k = zogy_kernels(pn, pr, sn, sr, fr, 1.0, _fft_shape(n.shape), workers=1)
    return zogy_apply(k, n, r, sn, sr, var_n=vn, var_r=vr, dx=dx, dy=dy, core=core, workers=1), k.pd


def _zogy_tiled(
    N: np.ndarray,
    R: np.ndarray,
    var_n: np.ndarray,
    var_r: np.ndarray,
    psf_sci: PSFLike,
    psf_ref: PSFLike,
    to_ref: Callable,
    *,
    sn: float,
    sr: float,
    fr: float,
    dx: float,
    dy: float,
    size: int,
    tile: int,
    margin: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray], list[tuple[int, int]]]:
    """ZOGY on overlapping tiles (PSFs of each tile's centre) blended with interpolation weights.

    Tiles run on :data:`_WORKERS` threads. Returns D, var_D, S_corr, the P_D of every tile and
    the tile centres.
    """
    ny, nx = N.shape
    pads = ((margin, margin), (margin, margin))
    planes = [np.pad(a, pads, mode="reflect") for a in (N, R, var_n, var_r)]
    jobs, places = [], []
    for y0, y1, ty, wy in _tiles(ny, tile):
        for x0, x1, tx, wx in _tiles(nx, tile):
            pn = psf_sci.stamp(tx, ty, size, centred=True)
            pr = _ref_psf_on_sci_grid(psf_ref, to_ref, tx, ty, size)
            win = (slice(y0, y1 + 2 * margin), slice(x0, x1 + 2 * margin))
            core = (slice(margin, margin + y1 - y0), slice(margin, margin + x1 - x0))
            jobs.append((planes, pn, pr, win, core, sn, sr, fr, dx, dy))
            places.append(((slice(y0, y1), slice(x0, x1)), wy[:, None] * wx[None, :], (tx, ty)))
    D = np.zeros((ny, nx), np.float32)
    V = np.zeros_like(D)
    SC = np.zeros_like(D)
    psfd = []
    with ThreadPoolExecutor(_WORKERS) as pool:
        for (res, pd), (out, w, _) in zip(pool.map(lambda job: _tile_zogy(*job), jobs), places):
            D[out] += w * res["D"]
            V[out] += w * res["var_D"]
            SC[out] += w * res["Scorr"]
            psfd.append(pd)
    return D, V, SC, psfd, [c for *_, c in places]


def _robust_std(v: np.ndarray) -> float:
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan")
    return float(1.4826 * np.median(np.abs(v - np.median(v))))


@dataclass
class PreparedPair:
    """A science frame and its reference aligned, masked, background-subtracted and flux-scaled.

    ``N``, ``R`` are the background-subtracted science and aligned reference (float32, masked
    pixels set to 0, R in reference flux units), ``var_n``, ``var_r`` their variance maps (ADU²,
    sky plus source Poisson noise), ``mask`` the :data:`MASK_BITS` (``bad = mask != 0``),
    ``nbkg`` the science background; ``sn``, ``sr`` the background noises (ADU), ``fr`` the flux
    ratio F_r/F_n with its error ``fr_err`` from ``n_flux`` stars; ``fwhm_s``, ``fwhm_r`` the
    FWHMs (science pixels) at the frame centre; ``size`` the PSF stamp size; ``ainfo`` the
    alignment information of :func:`align`; ``gain_n``, ``gain_r`` the gains (e-/ADU).
    """

    N: np.ndarray
    R: np.ndarray
    var_n: np.ndarray
    var_r: np.ndarray
    mask: np.ndarray
    bad_sci: np.ndarray
    nbkg: np.ndarray
    sn: float
    sr: float
    fr: float
    fr_err: float
    n_flux: int
    fwhm_s: float
    fwhm_r: float
    size: int
    ainfo: dict[str, Any]
    gain_n: float
    gain_r: float

    @property
    def bad(self) -> np.ndarray:
        """Invalid pixels (any mask bit)."""
        return self.mask != 0


@dataclass
class Difference:
    """What a subtraction method returns: D (science flux units), its variance, the raw score map
    (S/N, normalised afterwards), the PSF of D per tile with the tile centres, and header cards."""

    D: np.ndarray
    V: np.ndarray
    SC: np.ndarray
    psfd: list[np.ndarray]
    centres: list[tuple[int, int]]
    cards: list[tuple[str, Any, str]]


def prepare_pair(
    sci: Image,
    ref: Image,
    psf_sci: PSFLike,
    psf_ref: PSFLike,
    info_sci: FrameInfo,
    info_ref: FrameInfo,
    cfg: dict[str, Any],
) -> PreparedPair:
    """Align, mask, subtract the backgrounds and fit the flux ratio (see :func:`subtract_images`)."""
    ny, nx = sci.data.shape
    cx, cy = (nx - 1) / 2.0, (ny - 1) / 2.0
    fwhm_s = float(psf_sci.fwhm(cx, cy))
    fwhm_r_native = float(psf_ref.fwhm((ref.data.shape[1] - 1) / 2.0, (ref.data.shape[0] - 1) / 2.0))
    aligned, mask, ainfo = align(
        sci,
        ref,
        refine=bool(cfg.get("refine_astrometry", True)),
        saturation_sci=info_sci.saturation,
        saturation_ref=info_ref.saturation,
        fwhm_sci=fwhm_s,
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
    mask[_dilate(bad_sci, 2)] |= MASK_BITS["SCI_BAD"]
    mask[_dilate(sat_sci, 2)] |= MASK_BITS["SATURATED"]
    bad = mask != 0

    (nbkg, sn), (rbkg, sr) = _backgrounds([sci.data, aligned], [bad, bad])
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
    log.info("flux ratio F_r/F_n = %.4f +- %.4f (%d stars); sigma_n %.3f, sigma_r %.3f", fr, fr_err, n_flux, sn, sr)
    var_n = (sn**2 + np.maximum(N, 0) / info_sci.gain).astype(np.float32)
    var_r = (sr**2 + np.maximum(R, 0) / info_ref.gain).astype(np.float32)
    return PreparedPair(
        N=N,
        R=R,
        var_n=var_n,
        var_r=var_r,
        mask=mask,
        bad_sci=bad_sci,
        nbkg=nbkg,
        sn=sn,
        sr=sr,
        fr=fr,
        fr_err=fr_err,
        n_flux=n_flux,
        fwhm_s=fwhm_s,
        fwhm_r=fwhm_r,
        size=size,
        ainfo=ainfo,
        gain_n=info_sci.gain,
        gain_r=info_ref.gain,
    )


def _zogy_difference(pp: PreparedPair, psf_sci: PSFLike, psf_ref: PSFLike, cfg: dict[str, Any]) -> Difference:
    """ZOGY on overlapping tiles (the ``zogy`` method)."""
    margin = max(int(cfg.get("overlap", 32)), pp.size)
    tile = int(cfg.get("tile", 512))
    D, V, SC, psfd, centres = _zogy_tiled(
        pp.N,
        pp.R,
        pp.var_n,
        pp.var_r,
        psf_sci,
        psf_ref,
        pp.ainfo["to_ref"],
        sn=pp.sn,
        sr=pp.sr,
        fr=pp.fr,
        dx=pp.ainfo["sigma_x"],
        dy=pp.ainfo["sigma_y"],
        size=pp.size,
        tile=tile,
        margin=margin,
    )
    cards = [
        ("METHOD", "zogy", "Zackay, Ofek & Gal-Yam 2016"),
        ("NTILES", len(centres), "ZOGY tiles, each with its own PSFs"),
        ("TILE", tile, "[pix] tile spacing (subtract.tile)"),
        ("OVERLAP", margin, "[pix] tile margin used"),
    ]
    return Difference(D, V, SC, psfd, centres, cards)


Method = Callable[[PreparedPair, PSFLike, PSFLike, dict[str, Any]], Difference]


def _method(name: str) -> Method:
    """The difference function of a subtraction method (sfft is imported here, only when chosen).

    Raises
    ------
    ConfigError
        Unknown method, or sfft chosen but not installed.
    """
    if name == "zogy":
        return _zogy_difference
    if name == "sfft":
        from rbflow.sfft_method import require_sfft, sfft_difference

        require_sfft()  # fail before the alignment when sfft is missing
        return sfft_difference
    raise ConfigError(f"key 'subtract.method' is {name!r}: expected one of {', '.join(METHODS)}")


def subtract_images(
    sci: Image,
    ref: Image,
    psf_sci: PSFLike,
    psf_ref: PSFLike,
    info_sci: FrameInfo,
    info_ref: FrameInfo,
    cfg: dict[str, Any],
) -> fits.HDUList:
    """Align ``ref`` onto ``sci`` and subtract them (ZOGY on overlapping tiles, or sfft).

    Parameters
    ----------
    sci, ref : rbflow.io.Image
        Science and reference frames (with WCS).
    psf_sci, psf_ref : PSFLike
        PSF models of each frame, in its own pixels (e.g. :class:`rbflow.psf.PSFModel`).
    info_sci, info_ref : rbflow.frames.FrameInfo
        Gains (e-/ADU) and saturation levels (ADU) of the frames.
    cfg : dict
        The telescope's ``subtract`` block: ``method`` ('zogy' or 'sfft'); ``tile`` (px): spacing
        of the ZOGY tile centres where the PSFs are evaluated, each tile's ZOGY result reaching the
        neighbouring centres and blended with linear-interpolation weights; ``overlap`` (px):
        extra margin of each ZOGY tile (at least the PSF stamp size is used); ``refine_astrometry``;
        ``sfft`` (the sfft parameters, see :func:`rbflow.sfft_method.sfft_difference`).

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
        With sfft, SCORR is the matched filter of DIFF with its PSF divided by its predicted noise
        (white noise of VAR), then normalised the same way.

    Raises
    ------
    InputError
        A frame has no WCS, or fewer than three stars are usable for the flux ratio (the message
        names both files).
    ConfigError
        ``cfg['method']`` is not a known method, or sfft is chosen but not installed.
    """
    difference = _method(cfg.get("method", "zogy"))
    pp = prepare_pair(sci, ref, psf_sci, psf_ref, info_sci, info_ref, cfg)
    return _assemble(sci, pp, difference(pp, psf_sci, psf_ref, cfg))


def _normalise(pp: PreparedPair, diff: Difference) -> tuple[float, float]:
    """Remove smooth sky residuals from D and the score map and normalise them on the empty sky.

    Returns the robust std of the raw score map and of D/sqrt(V) there (SCORRNRM, DIFFNRM);
    masked pixels (mask grown by a FWHM) become NaN.
    """
    D, V, SC, mask = diff.D, diff.V, diff.SC, pp.mask
    # empty sky: no source above 3 sigma in either image (grown), no masked pixel
    src = (pp.N > 3 * pp.sn) | (pp.R > 3 * pp.sr)
    empty = ~_dilate(src, max(2, int(round(pp.fwhm_s)))) & ~pp.bad
    # sky-level errors of N and R that the mesh backgrounds leave (flat-field residuals on the mesh
    # scale, faint extended light) are smooth; the matched filter S sums them over the PSF area,
    # so they are removed from S and D with a mesh background of the empty sky of each
    (sc_bkg, _), (d_bkg, _) = _backgrounds([SC, D], [~empty] * 2, box=_RESID_BOX)
    SC -= sc_bkg
    D -= d_bkg
    k_s = _robust_std(SC[empty])
    k_d = _robust_std((D / np.sqrt(V))[empty])
    SC /= k_s
    V *= k_d**2
    log.info("SCORR robust std in empty sky %.3f (normalised), DIFF/sqrt(VAR) %.3f (VAR rescaled)", k_s, k_d)
    # pixels next to a masked area hold truncated, PSF-mismatched profiles: grow the mask by a FWHM
    grow = max(1, int(math.ceil(pp.fwhm_s)))
    for bit in MASK_BITS.values():
        mask[_dilate((mask & bit) != 0, grow)] |= bit
    for arr in (D, SC, V):
        arr[mask != 0] = np.nan
    return k_s, k_d


def _assemble(sci: Image, pp: PreparedPair, diff: Difference) -> fits.HDUList:
    """Normalise a method's result and pack it with the prepared frames into the output MEF."""
    k_s, k_d = _normalise(pp, diff)
    ainfo = pp.ainfo
    whdr = sci.wcs.to_header(relax=True)
    prim = fits.PrimaryHDU()
    h = prim.header
    cards = [
        *diff.cards[:1],
        ("FLXRATIO", pp.fr, "F_r/F_n reference/science flux ratio"),
        ("FLXRERR", pp.fr_err, "error of FLXRATIO"),
        ("NFLXSTAR", pp.n_flux, "stars used for FLXRATIO"),
        ("SIGMAN", pp.sn, "[adu] background noise of SCI"),
        ("SIGMAR", pp.sr, "[adu] bkg noise of aligned REF, unscaled"),
        ("GAINN", pp.gain_n, "[e-/adu] science gain"),
        ("GAINR", pp.gain_r, "[e-/adu] reference gain"),
        ("ALIGNRMS", ainfo["rms"], "[pix] rms star offset REF-SCI, aligned"),
        ("ALIGNDX", ainfo["dx"], "[pix] mean x offset REF-SCI, aligned"),
        ("ALIGNDY", ainfo["dy"], "[pix] mean y offset REF-SCI, aligned"),
        ("ALIGNSX", ainfo["sigma_x"], "[pix] astrometric scatter x (sigma_x)"),
        ("ALIGNSY", ainfo["sigma_y"], "[pix] astrometric scatter y (sigma_y)"),
        ("NSTARS", ainfo["nstars"], "stars matched for the alignment"),
        ("REFINED", ainfo["refined"], "affine astrometric refinement applied"),
        *diff.cards[1:],
        ("PSFSIZE", pp.size, "[pix] PSF stamp size"),
        ("FWHMSCI", pp.fwhm_s, "[pix] science PSF FWHM, frame centre"),
        ("FWHMREF", pp.fwhm_r, "[pix] ref PSF FWHM, science px"),
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
    for key in (
        "SIMPLE",
        "EXTEND",
        "XTENSION",
        "PCOUNT",
        "GCOUNT",
        "EXTNAME",
        "BITPIX",
        "NAXIS",
        "NAXIS1",
        "NAXIS2",
        "BSCALE",
        "BZERO",
        "BLANK",
        "CHECKSUM",
        "DATASUM",
    ):
        sci_hdr.remove(key, ignore_missing=True, remove_all=True)
    sci_hdr["BUNIT"] = "adu"

    def hdu(data: np.ndarray, name: str, header: fits.Header | None = None) -> fits.ImageHDU:
        hd = (header or whdr).copy()
        return fits.ImageHDU(data, header=hd, name=name)

    ref_scaled = np.where(pp.mask & MASK_BITS["REF_BAD"], np.nan, pp.R / pp.fr).astype(np.float32)
    sci_out = np.where(pp.bad_sci, np.nan, sci.data - pp.nbkg).astype(np.float32)
    psfd_hdu = fits.ImageHDU(np.asarray(diff.psfd, np.float32), name="PSFD")
    psfd_hdu.header["NTILES"] = (len(diff.centres), "PSF of DIFF per tile (axis 3)")
    for k, (tx, ty) in enumerate(diff.centres):
        psfd_hdu.header[f"TCX{k}"] = (tx, f"[pix] x centre of tile {k}")
        psfd_hdu.header[f"TCY{k}"] = (ty, f"[pix] y centre of tile {k}")
    return fits.HDUList(
        [
            prim,
            hdu(sci_out, "SCI", sci_hdr),
            hdu(ref_scaled, "REF"),
            hdu(diff.D, "DIFF"),
            hdu(diff.SC, "SCORR"),
            hdu(diff.V, "VAR"),
            hdu(pp.mask, "MASK"),
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
    sci = read_image(sci_path, hdu=frame_hdu(telescope))
    ref = read_image(ref_path, hdu=frame_hdu(telescope))
    info_sci = frame_info(sci.header, telescope, path=sci_path)
    info_ref = frame_info(ref.header, telescope, path=ref_path)
    hdul = subtract_images(
        sci,
        ref,
        PSFModel.read(sci_psf_path),
        PSFModel.read(ref_psf_path),
        info_sci,
        info_ref,
        telescope["subtract"],
    )
    hdul[0].header["SCIFILE"] = (Path(sci_path).name, "science frame")
    hdul[0].header["REFFILE"] = (Path(ref_path).name, "reference frame")
    write_fits(hdul, out_path)
