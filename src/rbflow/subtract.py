"""Image subtraction of a science frame and its reference (ZOGY, or sfft).

:func:`prepare_pair` aligns the reference onto the science grid (:func:`rbflow.align.align`),
masks invalid pixels, subtracts the backgrounds (:func:`rbflow.background.background`) and fits
the flux ratio on matched stars. The default subtraction follows Zackay, Ofek & Gal-Yam (2016,
ApJ 830, 27; "ZOGY"), run on overlapping tiles, each with the PSFs of its centre, blended with
linear-interpolation weights, so that a spatially varying PSF is followed; the broader of each
tile's two PSFs is the sharper one convolved with a matching kernel fitted on the tile's stars
(:mod:`rbflow.matching`), so that where the models are off by a per cent, or the resampled
reference's undersampled stars are not its PSF shifted, D follows the stars. The tiles run on
``threads`` threads, in single precision with real FFTs; each tile's kernels are transformed
once (:func:`zogy_kernels`) and applied to the four images of the tile (science, reference and
their variance maps) in one batched transform (:func:`zogy_apply`). The ``sfft`` method
(:mod:`rbflow.sfft_method`, optional) shares the preparation, the result type
(:mod:`rbflow.difference`), the normalisation and the output format. The default method,
``auto``, chooses per pair (:func:`auto_method`): ZOGY when both PSF models are built from enough
stars, else sfft, whose matching kernel is fitted on the data (on real frames with few PSF
stars, ZOGY's division by slightly wrong PSF models leaves rings at every bright star).

Outputs (see :func:`subtract_images`) are in science flux units: a transient of flux ``f`` (ADU)
in the science frame has flux ``f`` in ``DIFF``, with PSF ``PSFD``. The PSF models are any
:class:`rbflow.difference.PSFLike` (e.g. :class:`rbflow.psf.PSFModel`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from rbflow.align import MASK_BITS, PixelMap, align
from rbflow.background import backgrounds
from rbflow.difference import Difference, Method, PreparedPair, PSFLike, astrometric_variance, ref_psf_on_sci_grid
from rbflow.errors import ConfigError, InputError
from rbflow.frames import FrameInfo, frame_hdu, frame_info
from rbflow.io import Image, read_image, write_fits
from rbflow.matching import STAMP_FWHM, KernelFit, fit_kernel, kernel_half_size, kernel_stars, star_products
from rbflow.psf import PSFModel
from rbflow.quality import bright_stars, robust_std
from rbflow.stars import grow_mask

__all__ = [
    "MASK_BITS",
    "METHODS",
    "auto_method",
    "prepare_pair",
    "ZogyKernels",
    "zogy",
    "zogy_kernels",
    "zogy_apply",
    "subtract_images",
    "run_subtract",
]

log = logging.getLogger(__name__)

#: Subtraction methods (``subtract.method``); 'auto' picks zogy or sfft per frame (:func:`auto_method`).
METHODS = ("auto", "zogy", "sfft")
#: PSF-model cell sources (:data:`rbflow.psf.FALLBACKS`) that mean the model is not fitted to the
#: frame's own stars well enough for ZOGY: a frame-wide ePSF, or an analytic profile.
_WEAK_PSF_SOURCES = ("frame", "moffat", "analytic")
#: Mesh (px) of the background fitted to S and D after the subtraction (see :func:`subtract_images`).
_RESID_BOX = 32
#: Fewest bright static stars on which ``subtract.psf_error: auto`` measures the PSF-model error.
_PSF_ERROR_MIN_STARS = 5
#: Size of the grid of the squared ZOGY kernels, in PSF stamp sizes (see :func:`zogy_kernels`).
_KERNEL_GRID = 4
#: Bins along each axis of the sub-pixel phase of the reference grid, and points along each
#: axis of a ZOGY tile's footprint at which the phase is taken (:func:`_tile_psfs`).
_TILE_PHASE_BINS = 4
_TILE_PHASE_POINTS = 16
#: Fewest stars on which a ZOGY tile's PSF-matching kernel is fitted (``subtract.fit_kernel``):
#: with 12-14 (``tests``' pairs of 80 stars in 256²) the transients' flux pulls widened from
#: 1.09 to 1.15 and their mean moved from 0.19 to 0.30, a kernel of 172 unknowns that noisy.
_KERNEL_MIN_STARS = 16
#: Relative error within which the fitted kernels' flux ratio is taken for the pair's.
_KERNEL_RATIO_PRECISION = 0.01
#: Relative error of a tile's kernel sum, fitted free, and relative difference from the pair's
#: flux ratio (and 3 sigma), beyond which the tile keeps the models (the demo's flat-field
#: residual moves the tiles' sums by 1-2 %).
_KERNEL_RATIO_TOLERANCE = 0.03


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
    from scipy import fft as spfft

    k, h, w = stamps.shape
    rows = np.zeros((k, h, shape[1]), stamps.dtype)
    rows[:, :, (np.arange(w) - w // 2) % shape[1]] = stamps
    rows_hat = spfft.rfft(rows, axis=2, workers=workers)
    full = np.zeros((k, shape[0], rows_hat.shape[2]), rows_hat.dtype)
    full[:, (np.arange(h) - h // 2) % shape[0]] = rows_hat
    return spfft.fft(full, axis=1, workers=workers, overwrite_x=True)


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
    workers: int = 1,
) -> ZogyKernels:
    """ZOGY kernels of one PSF pair on a periodic grid of ``shape`` (see :func:`zogy` for the symbols).

    The kernels of D and S are exact on the grid. The squared kernels (for the variance maps) and
    P_D are computed on a smaller periodic grid, :data:`_KERNEL_GRID` times the stamp size (the
    kernels are compact), then zero-padded.
    """
    from scipy import fft as spfft

    spectra, f_d = _kernel_spectra(Pn, Pr, sn, sr, fr, fn, shape, workers)
    small = _fft_shape(tuple(min(n, _KERNEL_GRID * max(Pn.shape[0], Pr.shape[0])) for n in shape))
    if small != shape:
        spectra_small, _ = _kernel_spectra(Pn, Pr, sn, sr, fr, fn, small, workers)
    else:
        spectra_small = spectra
    real = spfft.irfft2(spectra_small, s=small, axes=(1, 2), workers=workers)
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
    workers: int = 1,
    envelope: int = 0,
) -> dict[str, np.ndarray]:
    """Apply precomputed ZOGY kernels to one (tile of an) image pair; see :func:`zogy`.

    Returns ``D``, ``var_D``, ``S`` and ``Scorr`` (float32; D and var_D may be views) on ``core``
    (default: the whole input). With ``envelope`` (px, odd, > 0) also ``Q``, the static term of
    the PSF-model error: the flux common to both images in S's matched filter,
    min(s_n, s_r) (negative values as 0), its largest value within a box of ``envelope`` px
    (a wrong PSF leaves its residual over the star's footprint, not only at its peak), squared
    over var(S). A static star of PSF-model error eps (a fraction of its matched-filter flux)
    leaves |S_corr| ~ eps sqrt(Q); a source in one image only has Q ~ 0 (a transient's own flux
    is not penalised, its host's is). :func:`subtract_images` divides S_corr by
    sqrt(1 + eps² Q) (``subtract.psf_error``), as ZOGY's astrometric term adds the variance
    that a registration error leaves at every source.
    """
    from scipy import fft as spfft

    core = core or (slice(0, N.shape[0]), slice(0, N.shape[1]))
    with_var = var_n is not None or var_r is not None
    inputs = [N, R]
    if with_var:
        inputs += [
            np.full(N.shape, sn**2, np.float32) if var_n is None else var_n,
            np.full(N.shape, sr**2, np.float32) if var_r is None else var_r,
        ]
    hats = spfft.rfft2(np.stack(inputs).astype(np.float32, copy=False), s=k.shape, axes=(1, 2), workers=workers)
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
    real = spfft.irfft2(spec, s=k.shape, axes=(1, 2), workers=workers)
    D, s_n, s_r = real[0][core], real[1], real[2]
    S = s_n[core] - s_r[core]
    if with_var:
        v_s, v_d = real[3][core], real[4][core]
    else:
        v_s = np.float32(sn**2 * k.sq[0][0, 0].real + sr**2 * k.sq[1][0, 0].real)
        v_d = np.broadcast_to(np.float32(sn**2 * k.sq[2][0, 0].real + sr**2 * k.sq[3][0, 0].real), D.shape).copy()
    if dx > 0 or dy > 0:
        v_s = v_s + astrometric_variance(s_n, dx, dy, core=core) + astrometric_variance(s_r, dx, dy, core=core)
    v_s = np.maximum(v_s, np.finfo(np.float32).tiny)
    scorr = S / np.sqrt(v_s)
    out = {"D": D, "var_D": v_d, "S": S, "Scorr": scorr}
    if envelope:
        from scipy import ndimage

        static = np.minimum(np.maximum(s_n, 0), np.maximum(s_r, 0))
        out["Q"] = ndimage.maximum_filter(static, size=envelope)[core] ** 2 / v_s
    return out


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
    to_ref: PixelMap,
    size: int,
    radius: float,
    max_stars: int = 100,
) -> tuple[float, float, int]:
    """Robust ratio F_r/F_n of PSF-fit fluxes of matched stars; returns (ratio, error, n)."""
    ratios = []
    for x, y in list(zip(stars["x"], stars["y"]))[:max_stars]:
        fn_ = _psf_flux(N, bad, x, y, psf_sci.stamp(x, y, size), radius)
        fr_ = _psf_flux(R, bad, x, y, ref_psf_on_sci_grid(psf_ref, to_ref, x, y, size), radius)
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


def _tile_psfs(
    psf_sci: PSFLike,
    psf_ref: PSFLike,
    to_ref: PixelMap,
    xs: tuple[int, int, int, np.ndarray],
    ys: tuple[int, int, int, np.ndarray],
    size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The science and the aligned reference PSF of one ZOGY tile (unit sum, centred stamps).

    ``xs``, ``ys``: the tile along each axis as :func:`_tiles` gives it (window start, stop,
    centre, blending weights). The science PSF is the model's at the tile centre. The aligned
    reference's also carries the blur of the cubic-spline resampling, which depends on the
    sub-pixel phase of the reference grid at each star: several per cent of an undersampled
    core between whole and half-pixel phases. That phase drifts across a tile wherever the
    frames are turned or scaled against each other (0.1° moves it by 0.45 px over 256 px), so
    the stamp of the tile centre's phase alone fits the stars of the tile by chance, and the
    result changed with the tile size (the demo's dense field: noise ratio 1.09, 1.04, 1.03 for
    tiles of 128, 256, 512 px). Here it is the mean of the stamps at the phases found over the
    tile's footprint (a grid of :data:`_TILE_PHASE_BINS` ² bins, each at its mean phase, weighed
    by the blending weight of the points that fall in it): the single PSF closest to every
    star of the tile.
    """
    (x0, x1, tx, wx), (y0, y1, ty, wy) = xs, ys
    pn = psf_sci.stamp(tx, ty, size, centred=True)
    # the reference grid's sub-pixel phases over the footprint, with their blending weights
    frac = (np.arange(_TILE_PHASE_POINTS) + 0.5) / _TILE_PHASE_POINTS
    px = x0 + (frac * (x1 - x0)).astype(int)
    py = y0 + (frac * (y1 - y0)).astype(int)
    weight = np.outer(np.maximum(wy[py - y0], 0.0), np.maximum(wx[px - x0], 0.0)).ravel()
    gx, gy = np.meshgrid(px.astype(float), py.astype(float))
    rx, ry = (np.ravel(v) for v in to_ref(gx, gy))
    phx, phy = rx - np.floor(rx), ry - np.floor(ry)
    cell = np.minimum((phy * _TILE_PHASE_BINS).astype(int), _TILE_PHASE_BINS - 1) * _TILE_PHASE_BINS + np.minimum(
        (phx * _TILE_PHASE_BINS).astype(int), _TILE_PHASE_BINS - 1
    )
    r0x, r0y = (float(v) for v in to_ref(tx, ty))
    pr = np.zeros((size, size))
    for c in np.unique(cell[weight > 0]):
        w = weight * (cell == c)
        dx = float((w * phx).sum() / w.sum()) - (r0x - math.floor(r0x))
        dy = float((w * phy).sum() / w.sum()) - (r0y - math.floor(r0y))

        def shifted(x: Any, y: Any, dx: float = dx, dy: float = dy) -> tuple[Any, Any]:
            rx_, ry_ = to_ref(x, y)
            return rx_ + dx, ry_ + dy

        pr += w.sum() * ref_psf_on_sci_grid(psf_ref, shifted, tx, ty, size)
    return pn, pr / pr.sum()


@dataclass
class _TileKernels:
    """Each ZOGY tile's PSF-matching kernel (:func:`rbflow.matching.fit_kernel`) fitted on its stars.

    The broader image (by the PSF models' FWHMs at the frame centre) is fitted as the sharper one
    convolved with a kernel that varies linearly across the tile, each star weighed by the tile's
    blending weight there; the broader image's PSF of the tile becomes the kernel at its centre
    convolved with the sharper one's (unit sum). The flux ratio F_r/F_n held for every tile's
    kernel is the one their free sums say (median over the tiles, error 1.4826 MAD over the
    square root of their number, or the fit's own error for one or two tiles) where that is
    known to :data:`_KERNEL_RATIO_PRECISION`, else the pair's PSF-fit ratio; a tile whose free
    sum is not known to :data:`_KERNEL_RATIO_TOLERANCE` or disagrees with that ratio by more than
    3 sigma and that tolerance (variables among few stars) keeps the models, as does one with
    fewer than :data:`_KERNEL_MIN_STARS` stars.

    ``fits``: the fit of each tile centre (None: the models); ``ratio``, ``ratio_err``: the flux
    ratio held and its error; ``from_kernels``: whether the kernels measured it;
    ``sci_broader``: which image was fitted; ``half``: the kernels' half-size (px);
    ``n_discordant``: tiles left to the models for their flux ratio.
    """

    fits: dict[tuple[int, int], KernelFit | None]
    ratio: float
    ratio_err: float
    from_kernels: bool
    sci_broader: bool
    half: int
    n_discordant: int

    @classmethod
    def of(cls, pp: PreparedPair, tile: int) -> _TileKernels:
        """Fit the tiles of :func:`_tiles` (``tile`` px apart) of a prepared pair on the
        reference's stars in science units (:func:`rbflow.matching.kernel_stars`: a transient is
        not one)."""
        broad = max(pp.fwhm_s, pp.fwhm_r)
        half = kernel_half_size(broad)
        sci_broader = pp.fwhm_s >= pp.fwhm_r
        if sci_broader:
            target, source, variance = pp.N, pp.R, pp.var_n + pp.var_r / pp.fr**2
        else:
            target, source, variance = pp.R, pp.N, pp.var_r + pp.var_n * pp.fr**2
        stars = star_products(
            target,
            source,
            variance,
            pp.bad,
            *kernel_stars(pp.R / pp.fr, pp.bad, pp.sn, broad),
            half=half,
            stamp=int(math.ceil(STAMP_FWHM * broad)),
        )
        fits: dict[tuple[int, int], KernelFit | None] = {}
        for y0, y1, ty, wy in _tiles(pp.N.shape[0], tile):
            for x0, x1, tx, wx in _tiles(pp.N.shape[1], tile):
                inside = np.flatnonzero((stars.xs >= x0) & (stars.xs < x1) & (stars.ys >= y0) & (stars.ys < y1))
                weight = np.maximum(wx[stars.xs[inside] - x0], 0.0) * np.maximum(wy[stars.ys[inside] - y0], 0.0)
                fits[tx, ty] = fit_kernel(
                    stars,
                    inside[weight > 0],
                    weight[weight > 0],
                    min_stars=_KERNEL_MIN_STARS,
                    centre=(tx, ty),
                    scale=float(max(x1 - x0, y1 - y0)),
                )
        # each fitted tile's flux ratio F_r/F_n with its error, from the kernel's free sum
        free = {}
        for key, fit in fits.items():
            if fit is not None:
                total, err = float(fit.kernel().sum()), fit.sum_error()
                free[key] = (1.0 / total, err / total**2) if sci_broader else (total, err)
        ratio, ratio_err, from_kernels = pp.fr, pp.fr_err, False
        if free:
            values = np.array([r for r, _ in free.values()])
            measured = float(np.median(values))
            if len(values) >= 3:
                error = 1.4826 * float(np.median(np.abs(values - measured))) / math.sqrt(len(values))
            else:
                error = float(np.sqrt(np.mean([e**2 for _, e in free.values()]) / len(values)))
            if measured > 0 and error <= _KERNEL_RATIO_PRECISION * measured:
                ratio, ratio_err, from_kernels = measured, error, True
        tolerance = _KERNEL_RATIO_TOLERANCE * ratio
        discordant = [
            key
            for key, (r, e) in free.items()
            if e > tolerance or abs(r - ratio) > max(3 * math.hypot(e, ratio_err), tolerance)
        ]
        for key in discordant:
            fits[key] = None
        return cls(fits, ratio, ratio_err, from_kernels, sci_broader, half, len(discordant))

    def psfs(self, pn: np.ndarray, pr: np.ndarray, tx: int, ty: int) -> tuple[np.ndarray, np.ndarray, int]:
        """The PSFs of the tile centred at (``tx``, ``ty``), the broader one fitted (unit sum),
        and the stars of the fit (0: none, the models unchanged)."""
        from scipy import ndimage

        fit = self.fits[tx, ty]
        if fit is None:
            return pn, pr, 0
        kernel = fit.kernel(1.0 / self.ratio if self.sci_broader else self.ratio)
        fitted = ndimage.convolve(pr if self.sci_broader else pn, kernel, mode="constant")
        fitted /= fitted.sum()
        return (fitted, pr, fit.n_stars) if self.sci_broader else (pn, fitted, fit.n_stars)


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
    envelope: int,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """ZOGY on one tile window of the padded N, R, var_n, var_r; results on the core, and P_D."""
    n, r, vn, vr = (p[win] for p in planes)
    k = zogy_kernels(pn, pr, sn, sr, fr, 1.0, _fft_shape(n.shape), workers=1)
    return zogy_apply(k, n, r, sn, sr, var_n=vn, var_r=vr, dx=dx, dy=dy, core=core, workers=1, envelope=envelope), k.pd


def _zogy_tiled(
    N: np.ndarray,
    R: np.ndarray,
    var_n: np.ndarray,
    var_r: np.ndarray,
    psf_sci: PSFLike,
    psf_ref: PSFLike,
    to_ref: PixelMap,
    *,
    sn: float,
    sr: float,
    fr: float,
    dx: float,
    dy: float,
    size: int,
    tile: int,
    margin: int,
    threads: int,
    envelope: int,
    kernels: _TileKernels | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[np.ndarray], list[tuple[int, int]], list[int]]:
    """ZOGY on overlapping tiles (PSFs of each tile's centre) blended with interpolation weights.

    Tiles run on ``threads`` threads. With ``kernels``, each tile's broader PSF is the one its
    stars fit (:class:`_TileKernels`). Returns D, var_D, S_corr, the static term Q of the
    PSF-model error (zeros without ``envelope``; see :func:`zogy_apply`), the P_D of every tile,
    the tile centres and the stars each tile's kernel was fitted on (0: the models).
    """
    ny, nx = N.shape
    pads = ((margin, margin), (margin, margin))
    planes = [np.pad(a, pads, mode="reflect") for a in (N, R, var_n, var_r)]
    jobs, places, fitted = [], [], []
    for y0, y1, ty, wy in _tiles(ny, tile):
        for x0, x1, tx, wx in _tiles(nx, tile):
            pn, pr = _tile_psfs(psf_sci, psf_ref, to_ref, (x0, x1, tx, wx), (y0, y1, ty, wy), size)
            n_fit = 0
            if kernels is not None:
                pn, pr, n_fit = kernels.psfs(pn, pr, tx, ty)
            fitted.append(n_fit)
            win = (slice(y0, y1 + 2 * margin), slice(x0, x1 + 2 * margin))
            core = (slice(margin, margin + y1 - y0), slice(margin, margin + x1 - x0))
            jobs.append((planes, pn, pr, win, core, sn, sr, fr, dx, dy, envelope))
            places.append(((slice(y0, y1), slice(x0, x1)), wy[:, None] * wx[None, :], (tx, ty)))
    D = np.zeros((ny, nx), np.float32)
    V = np.zeros_like(D)
    SC = np.zeros_like(D)
    Q = np.zeros_like(D)
    psfd = []
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for (res, pd), (out, w, _) in zip(pool.map(lambda job: _tile_zogy(*job), jobs), places):
            D[out] += w * res["D"]
            V[out] += w * res["var_D"]
            SC[out] += w * res["Scorr"]
            if envelope:
                Q[out] += w * res["Q"]
            psfd.append(pd)
    return D, V, SC, Q, psfd, [c for *_, c in places], fitted


def prepare_pair(
    sci: Image,
    ref: Image,
    psf_sci: PSFLike,
    psf_ref: PSFLike,
    info_sci: FrameInfo,
    info_ref: FrameInfo,
    cfg: dict[str, Any],
    *,
    threads: int = 1,
) -> PreparedPair:
    """Align, mask, subtract the backgrounds and fit the flux ratio.

    Parameters
    ----------
    sci, ref, psf_sci, psf_ref, info_sci, info_ref, cfg
        As for :func:`subtract_images`.
    threads : int, optional
        Threads of the two background estimates.

    Returns
    -------
    rbflow.difference.PreparedPair

    Raises
    ------
    InputError
        A frame has no WCS, the frames do not overlap, or fewer than three stars are usable for
        the flux ratio (the message names both files).
    """
    ny, nx = sci.data.shape
    cx, cy = (nx - 1) / 2.0, (ny - 1) / 2.0
    fwhm_s = float(psf_sci.fwhm(cx, cy))
    fwhm_r_native = float(psf_ref.fwhm((ref.data.shape[1] - 1) / 2.0, (ref.data.shape[0] - 1) / 2.0))
    aligned, mask, ainfo = align(
        sci,
        ref,
        refine=bool(cfg.get("refine_astrometry", True)),
        smooth=bool(cfg.get("smooth_astrometry", False)),
        saturation_sci=info_sci.saturation,
        saturation_ref=info_ref.saturation,
        fwhm_sci=fwhm_s,
        fwhm_ref=fwhm_r_native,
        psf_sci=psf_sci.stamp,
        psf_ref=lambda to_ref, x, y, size: ref_psf_on_sci_grid(psf_ref, to_ref, x, y, size),
    )
    to_ref = ainfo["to_ref"]
    rcx, rcy = to_ref(cx, cy)
    jx = np.array(to_ref(cx + 1, cy)) - np.array([rcx, rcy])
    det = abs(float(np.linalg.det(np.c_[jx, np.array(to_ref(cx, cy + 1)) - np.array([rcx, rcy])])))
    fwhm_r = fwhm_r_native / math.sqrt(det)
    size = 2 * int(math.ceil(4 * max(fwhm_s, fwhm_r))) + 1

    bad_sci = ~np.isfinite(sci.data)
    sat_sci = np.nan_to_num(sci.data, nan=0.0) >= info_sci.saturation
    mask[grow_mask(bad_sci, 2)] |= MASK_BITS["SCI_BAD"]
    mask[grow_mask(sat_sci, 2)] |= MASK_BITS["SATURATED"]
    bad = mask != 0

    (nbkg, sn), (rbkg, sr) = backgrounds([sci.data, aligned], [bad, bad], threads=threads)
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


def _zogy_difference(
    pp: PreparedPair, psf_sci: PSFLike, psf_ref: PSFLike, cfg: dict[str, Any], *, threads: int
) -> Difference:
    """ZOGY on overlapping tiles (the ``zogy`` method), the tiles on ``threads`` threads."""
    margin = max(int(cfg.get("overlap", 32)), pp.size)
    tile = int(cfg.get("tile", 512))
    psf_error = cfg.get("psf_error", 0.0)
    # the PSF-model error term's envelope: a box of half-width one FWHM (the rings' reach)
    envelope = 2 * int(math.ceil(max(pp.fwhm_s, pp.fwhm_r))) + 1 if psf_error != 0 else 0
    kernels = _TileKernels.of(pp, tile) if cfg.get("fit_kernel", True) else None
    flux_ratio = None
    if kernels is not None and kernels.from_kernels:
        log.info(
            "zogy: flux ratio F_r/F_n %.4f +- %.4f from the fitted kernels (%.4f from PSF fits)",
            kernels.ratio,
            kernels.ratio_err,
            pp.fr,
        )
        # each star once, though the tiles' windows overlap
        n_stars = len(np.unique(np.concatenate([f.stars for f in kernels.fits.values() if f is not None])))
        flux_ratio = (kernels.ratio, kernels.ratio_err, n_stars)
        pp = replace(pp, fr=kernels.ratio, fr_err=kernels.ratio_err, n_flux=n_stars)
    D, V, SC, Q, psfd, centres, fitted = _zogy_tiled(
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
        threads=threads,
        envelope=envelope,
        kernels=kernels,
    )
    n_fit = sum(n > 0 for n in fitted)
    if kernels is not None:
        log.info(
            "zogy: PSF-matching kernel (half-size %d px) fitted in %d of %d tiles on %s stars (%d left to the "
            "models for their flux ratio)",
            kernels.half,
            n_fit,
            len(fitted),
            "-".join(str(f(n for n in fitted if n)) for f in (min, max)) if n_fit else "no",
            kernels.n_discordant,
        )
    eps, n_eps = _psf_error(pp, SC, Q) if psf_error == "auto" else (float(psf_error), 0)
    divisor = None
    if eps > 0:
        divisor = np.sqrt(1.0 + np.float32(eps**2) * Q)
        log.info("zogy: PSF-model error %.4f in S_corr (%s)", eps, f"{n_eps} stars" if psf_error == "auto" else "set")
    cards = [
        ("METHOD", "zogy", "Zackay, Ofek & Gal-Yam 2016"),
        ("PSFERR", eps, "PSF-model error in SCORR (subtract.psf_error)"),
        ("NPSFERR", n_eps, "stars PSFERR was measured on (0: set)"),
        ("NTILES", len(centres), "ZOGY tiles, each with its own PSFs"),
        ("KERNFIT", n_fit, "tiles whose broader PSF was fitted (fit_kernel)"),
        ("KERNHALF", kernels.half if kernels is not None else 0, "[pix] half-size of the fitted kernels"),
        ("KERNSTAR", int(np.median([n for n in fitted if n])) if n_fit else 0, "median stars of a tile's kernel fit"),
        ("TILE", tile, "[pix] tile spacing (subtract.tile)"),
        ("OVERLAP", margin, "[pix] tile margin used"),
    ]
    return Difference(D, V, SC, psfd, centres, cards, sc_divisor=divisor, flux_ratio=flux_ratio)


def _psf_error(pp: PreparedPair, SC: np.ndarray, Q: np.ndarray) -> tuple[float, int]:
    """The pair's fractional PSF-model error, measured at its bright static stars (``psf_error: auto``).

    At each star of the reference (science flux units, :func:`rbflow.quality.bright_stars` with
    the science noise: aperture S/N > 100 in the science frame) with no masked pixel within 2 FWHM,
    the largest |S_corr| there, z, at a pixel of static term Q (see :func:`zogy_apply`) gives
    eps² = (z² - 1) / Q (0 when z < 1): the error that brings that residual to 1 sigma. The
    pair's eps is the square root of the median over the stars, so that a star's residual
    stays above 5 sigma only where its error is ~5 times the typical one.

    Returns
    -------
    tuple
        ``(eps, n)``: eps is 0 when fewer than :data:`_PSF_ERROR_MIN_STARS` stars qualify.
    """
    fw = pp.fwhm_s
    xs, ys = bright_stars(np.where(pp.bad, np.nan, pp.R / pp.fr), fw, sigma=pp.sn)
    r = int(math.ceil(2 * fw))
    eps2 = []
    for x, y in zip(xs.astype(int), ys.astype(int)):
        win = (slice(max(0, y - r), y + r + 1), slice(max(0, x - r), x + r + 1))
        if pp.bad[win].any():
            continue
        z = np.abs(SC[win])
        k = np.unravel_index(np.argmax(z), z.shape)
        eps2.append(max(0.0, float(z[k]) ** 2 - 1.0) / max(float(Q[win][k]), 1e-12))
    if len(eps2) < _PSF_ERROR_MIN_STARS:
        return 0.0, len(eps2)
    return float(np.sqrt(np.median(eps2))), len(eps2)


def _neighbourhood_counts(n_stars: np.ndarray, sources: Sequence[str], grid: tuple[int, int]) -> np.ndarray:
    """Each PSF cell's own stars, but for a ``neighbours`` cell those of the 3 x 3 cells around it.

    ``n_stars`` in cell order ``iy * nx + ix`` (:class:`rbflow.psf.PSFModel`), ``grid`` ``(nx, ny)``.
    """
    nx, ny = grid
    own = n_stars.reshape(ny, nx)
    out = n_stars.copy()
    for c, source in enumerate(sources):
        if source == "neighbours":
            iy, ix = divmod(c, nx)
            out[c] = own[max(iy - 1, 0) : iy + 2, max(ix - 1, 0) : ix + 2].sum()
    return out


def auto_method(psf_sci: PSFLike, psf_ref: PSFLike, cfg: dict[str, Any]) -> tuple[str, str]:
    """The method 'auto' runs for a pair, from the quality of its PSF models, and why.

    ZOGY divides by the PSF models' transforms (its D is exact only for exact PSFs): a model built
    from few stars is wrong by a few per cent in the core, which leaves a ring of >5 sigma
    residuals at every bright star. sfft fits the matching kernel on the data and does not need
    the models to be right. So 'auto' takes zogy when both models are well constrained: the
    median over their cells of each cell's PSF stars is at least ``cfg['auto_min_stars']`` and
    no cell fell back to a frame-wide or analytic PSF; else sfft. A cell's stars are its own
    (``cfg['auto_star_count']`` 'own', the default) or, for a ``neighbours`` cell, those of the
    3 x 3 cells around it that it borrows ('neighbourhood'). On the demo's sparse field
    (``sky.field_star_density``; its first epoch against the reference, static sky) every epoch
    cell borrowed (own medians 3 and 8, borrowed counts >= 8): 'neighbourhood' took zogy, which
    left >= 5 sigma residuals at 12 of the 12 stars > 100 sigma, 'own' sfft (2 of 12).
    A PSF without star counts (an analytic or known PSF, no ``n_stars`` attribute) counts as exact.

    Parameters
    ----------
    psf_sci, psf_ref : PSFLike
        PSF models of the pair (:class:`rbflow.psf.PSFModel` carries ``n_stars`` and ``sources``
        per cell).
    cfg : dict
        The telescope's ``subtract`` block (``auto_min_stars``, default 8; ``auto_star_count``,
        default 'own').

    Returns
    -------
    tuple of str
        ``('zogy' | 'sfft', reason)``, the reason short enough for a FITS card (<= 68 characters).
    """
    need = int(cfg.get("auto_min_stars", 8))
    own = cfg.get("auto_star_count", "own") == "own"
    counts, weak = [], []
    for psf in (psf_sci, psf_ref):
        n_stars = getattr(psf, "n_stars", None)
        if n_stars is not None and not own and "neighbours" in getattr(psf, "sources", ()):
            n_stars = _neighbourhood_counts(np.asarray(n_stars), psf.sources, psf.grid)
        counts.append(None if n_stars is None else float(np.median(np.asarray(n_stars))))
        weak.extend(str(s) for s in getattr(psf, "sources", ()) if str(s) in _WEAK_PSF_SOURCES)
    if counts == [None, None]:
        return "zogy", "analytic PSFs (no star counts)"

    def fmt(c: float | None) -> str:
        return "-" if c is None else f"{c:g}"

    stars = f"PSF stars per cell sci {fmt(counts[0])}, ref {fmt(counts[1])}"
    if weak:
        return "sfft", f"{stars}; PSF fallback {sorted(set(weak))[0]}"
    if any(c is not None and c < need for c in counts):
        return "sfft", f"{stars} < {need}"
    return "zogy", f"{stars} >= {need}"


def _method(name: str, *, why: str = "") -> Method:
    """The difference function of a subtraction method (sfft is imported here, only when chosen).

    ``why`` is the reason 'auto' chose it (empty when the method was set explicitly).

    Raises
    ------
    ConfigError
        Unknown method, or sfft chosen but not installed.
    """
    if name == "zogy":
        return _zogy_difference
    if name == "sfft":
        from rbflow.sfft_method import require_sfft, sfft_difference

        try:
            require_sfft()  # fail before the alignment when sfft is missing
        except ConfigError as exc:
            if not why:
                raise
            raise ConfigError(
                f"key 'subtract.method' is 'auto' and chose sfft for this frame ({why}), but sfft is not "
                'installed: install it with `pip install "rbflow[sfft]"`, or set subtract.method to zogy '
                f"(cause: {exc})"
            ) from exc
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
    *,
    threads: int = 1,
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
        The telescope's ``subtract`` block: ``method`` ('auto', 'zogy' or 'sfft'; 'auto' chooses
        per pair from the PSF models, see :func:`auto_method`, with ``auto_min_stars``); ``tile`` (px): spacing
        of the ZOGY tile centres where the PSFs are evaluated, each tile's ZOGY result reaching the
        neighbouring centres and blended with linear-interpolation weights; ``overlap`` (px):
        extra margin of each ZOGY tile (at least the PSF stamp size is used); ``fit_kernel``
        (default True): each ZOGY tile's broader PSF fitted on its stars (:mod:`rbflow.matching`);
        ``refine_astrometry``; ``sfft`` (the sfft parameters, see
        :func:`rbflow.sfft_method.sfft_difference`).
    threads : int, optional
        Threads of the backgrounds, the ZOGY tiles, the FFTs and sfft (the rule's ``threads``);
        the result does not depend on it.

    Returns
    -------
    astropy.io.fits.HDUList
        Primary (fit cards; METHOD the method that ran, METHAUTO why) + SCI, REF, DIFF, SCORR, VAR, MASK, PSFD (cube of P_D per tile, centres
        in cards TCXk/TCYk); the images carry the science WCS. Masked pixels (MASK != 0, grown by
        one FWHM) are NaN in DIFF, SCORR and VAR.
        Smooth sky-level residuals (mesh of 32 px over the empty sky) are removed from DIFF and SCORR.
        SCORR is normalised to unit robust std in empty sky (factor ``SCORRNRM``) and VAR rescaled
        so that DIFF/sqrt(VAR) has unit robust std (``DIFFNRM``). ``FLXECORR`` is the factor by
        which a white-noise PSF-fit error on DIFF must be multiplied for the correlated noise.
        With sfft, DIFF is decorrelated (white noise) and SCORR is the matched filter of DIFF with
        its PSF divided by its predicted noise (VAR), then normalised the same way.

    Raises
    ------
    InputError
        A frame has no WCS, or fewer than three stars are usable for the flux ratio (the message
        names both files).
    ConfigError
        ``cfg['method']`` is not a known method, or sfft is chosen but not installed.
    """
    name = cfg.get("method", "auto")
    if name == "auto":
        name, why = auto_method(psf_sci, psf_ref, cfg)
        log.info("subtract.method auto: %s (%s)", name, why)
        difference = _method(name, why=why)
    else:
        why = ""
        difference = _method(name)
    pp = prepare_pair(sci, ref, psf_sci, psf_ref, info_sci, info_ref, cfg, threads=threads)
    diff = difference(pp, psf_sci, psf_ref, cfg, threads=threads)
    if diff.flux_ratio is not None:
        fr, fr_err, n_flux = diff.flux_ratio
        pp = replace(pp, fr=fr, fr_err=fr_err, n_flux=n_flux)
    diff.cards.insert(1, ("METHAUTO", f"{name}: {why}" if why else "set by subtract.method", "why METHOD ran"))
    return _assemble(sci, pp, diff, threads=threads)


def _clean_and_scale(pp: PreparedPair, diff: Difference, *, threads: int) -> tuple[float, float]:
    """Remove smooth sky residuals from D and the score map and normalise them on the empty sky.

    Returns the robust std of the raw score map and of D/sqrt(V) there (SCORRNRM, DIFFNRM);
    masked pixels (mask grown by a FWHM) become NaN.
    """
    D, V, SC, mask = diff.D, diff.V, diff.SC, pp.mask
    # empty sky: no source above 3 sigma in either image (grown), no masked pixel
    src = (pp.N > 3 * pp.sn) | (pp.R > 3 * pp.sr)
    empty = ~grow_mask(src, max(2, int(round(pp.fwhm_s)))) & ~pp.bad
    # sky-level errors of N and R that the mesh backgrounds leave (flat-field residuals on the mesh
    # scale, faint extended light) are smooth; the matched filter S sums them over the PSF area,
    # so they are removed from S and D with a mesh background of the empty sky of each
    (sc_bkg, _), (d_bkg, _) = backgrounds([SC, D], [~empty] * 2, box=_RESID_BOX, threads=threads)
    SC -= sc_bkg
    D -= d_bkg
    k_s = robust_std(SC[empty], dtype=SC.dtype)
    z = (D / np.sqrt(V))[empty]
    k_d = robust_std(z, dtype=z.dtype)
    SC /= k_s
    if diff.sc_divisor is not None:
        SC /= diff.sc_divisor
    V *= k_d**2
    log.info("SCORR robust std in empty sky %.3f (normalised), DIFF/sqrt(VAR) %.3f (VAR rescaled)", k_s, k_d)
    # pixels next to a masked area hold truncated, PSF-mismatched profiles: grow the mask by a FWHM
    grow = max(1, int(math.ceil(pp.fwhm_s)))
    for bit in MASK_BITS.values():
        mask[grow_mask((mask & bit) != 0, grow)] |= bit
    for arr in (D, SC, V):
        arr[mask != 0] = np.nan
    return k_s, k_d


def _map_card(ainfo: dict[str, Any]) -> str:
    """``ALIGNMAP``: the astrometric map used beyond the WCS (``shift``, ``affine``, ``spline MxM`` or ``wcs``)."""
    if not ainfo["refined"]:
        return "wcs"
    if ainfo["smooth"] is not None:
        return f"spline {ainfo['smooth'].intervals}x{ainfo['smooth'].intervals}"
    return "shift" if np.array_equal(ainfo["affine"][:, :2], np.eye(2)) else "affine"


def _assemble(sci: Image, pp: PreparedPair, diff: Difference, *, threads: int) -> fits.HDUList:
    """Normalise a method's result and pack it with the prepared frames into the output MEF."""
    k_s, k_d = _clean_and_scale(pp, diff, threads=threads)
    ainfo = pp.ainfo
    whdr = sci.wcs.to_header(relax=True)
    prim = fits.PrimaryHDU()
    h = prim.header
    cards = [
        *diff.cards[:2],  # METHOD, METHAUTO
        ("FLXRATIO", pp.fr, "F_r/F_n reference/science flux ratio"),
        ("FLXRERR", pp.fr_err, "error of FLXRATIO"),
        ("NFLXSTAR", pp.n_flux, "stars used for FLXRATIO"),
        ("FLXRFROM", "PSF fits" if diff.flux_ratio is None else "kernel sums", "how FLXRATIO was measured"),
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
        ("ALIGNMAP", _map_card(ainfo), "star-fitted map on top of the WCS"),
        ("ALIGNCVA", (ainfo["cv"] or {}).get("rms_affine", math.nan), "[pix] cross-validated rms, affine"),
        ("ALIGNCVS", (ainfo["cv"] or {}).get("rms_smooth", math.nan), "[pix] cross-validated rms, smooth map"),
        *diff.cards[2:],
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
        # a comment goes only where it fits the 80-character card (the value field is padded to
        # column 30); astropy would truncate it with a warning (a 58-character METHAUTO reason)
        if max(len(fits.Card(key, value).image.rstrip()), 30) + 3 + len(comment) > 80:
            comment = ""
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
    *,
    threads: int = 1,
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
    threads : int, optional
        Threads of the subtraction (see :func:`subtract_images`).

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
        threads=threads,
    )
    hdul[0].header["SCIFILE"] = (Path(sci_path).name, "science frame")
    hdul[0].header["REFFILE"] = (Path(ref_path).name, "reference frame")
    write_fits(hdul, out_path)
