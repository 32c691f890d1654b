"""The ``sfft`` subtraction method: Lei Hu's Fourier-space kernel fit (sfft ``Customized_Packet``).

An Alard-Lupton style subtraction (Hu et al. 2022, ApJ 936, 157): a convolution kernel whose
pixels vary as a polynomial over the frame, plus a polynomial differential background, are fitted
in Fourier space by sfft on its numpy backend (numba JIT, pyFFTW), here on tiles of a fixed size
so that numba's compiled functions are reused between tiles and, through their on-disk cache,
between jobs. It is robust to PSF-model errors (it needs no PSF for the kernel), at the cost of
10-35 s per 1024² tile on two cores and about 5 GB of memory per 1024² tile.

The narrower-PSF image is convolved, so that sfft's difference ``D0 = O - K * C`` (O the other
image, C the convolved one, K the fitted matching kernel, ``*`` convolution) has the PSF of O.
Which one is narrower is measured on the matched alignment stars of the two aligned images
(:func:`relative_width`: Gaussian fits, independent of the PSF models, which from 4-7 stars got
the order of two similar widths wrong on the ``realpsf`` test frames, so that sfft deconvolved).
When the widths differ by less than a pixel's variance plus 3 times the measurement's error, or
the narrower image is the noisier one (:func:`convolution_sides`), sfft runs both ways and keeps
the difference with the smaller residuals at those stars (:func:`star_chi2`); header CONVD,
CONVWHY, CONVDW, CONVDWE, CONVDWN, CONVNRAT. On the DECam frames below the single frames are
1.9-2.7 px² narrower (sigma²) than the stacked reference but noisier, and convolving the stack
leaves the smaller star chi² (1.9-3.7 against 4.7-8.9) and DIFF std / robust std 1.03-1.09
(1.13-1.17 with the frame convolved).
Its noise is correlated (K smooths the noise of C), so D0 is decorrelated per tile with the sfft
authors' kernel (Hu et al. 2022, sfft ``DeCorrelation_Calculator``, after Reiss & Lupton 2016):
``DC(k) = 1 / sqrt(s_o² + s_c² |K(k)|²)`` in Fourier space, normalised to unit sum and truncated
to twice the kernel size, with K realised at the tile centre from sfft's solution and s_o, s_c
the background noises of O and C. ``D = DC * D0`` has white noise of variance
``var_o + K0² var_c`` (K0 the sum of K) and the PSF ``DC * P_o``; it is ZOGY's D (Zackay et al.
2016, eq. 13) for the PSF pair related by the fitted kernel (P_c * K = P_o), so the PSF ratio
comes from the data instead of two PSF models. The score map, which the detection stage reads as
SCORR, is the matched filter of D with its PSF over the white-noise prediction of the variance
map (ZOGY's S), then normalised on the empty sky by :func:`rbflow.subtract.subtract_images` like
the ZOGY S_corr (the normalisation stays near 1 because the noise is white).

Three corrections for real frames with few stars (issue 15, measured on the DECam frames of
``../shared/data/decam-sfft``, 4-6 alignment stars per 256² frame):

* Stars that moved between the epochs (:func:`astrometric_outliers`: a galaxy whose light
  centroid a transient shifts by 1.5 px there) are left out of the kernel fit through sfft's
  prior-ban images, so that the kernel is not bent to follow them. A motion counts when it is
  significant against the star's own centroid error and the other stars' real scatter: there
  the galaxy's is 8-10 sigma, and the brightest star's proper motion (below) 3.6-4.7 sigma
  against the others' 0.03-0.10 px scatter, so the kernel keeps following that star (left out,
  its own 0.3 px dipole at S/N 1000-2000 is the worse residual).
* ZOGY's astrometric noise (Zackay et al. 2016, sec. 3.3) is part of VAR and of the score map's
  variance: ``sigma_x² (∂M/∂x)² + sigma_y² (∂M/∂y)²`` for each of the two images M as they enter
  D (their matched-filtered versions for the score), sigma_x, sigma_y the rms scatter of the
  offsets of the alignment stars that did not move. There a star 2000 sigma bright moved
  0.3 px between the epochs relative to the others (a proper motion of ~80 mas, the same in all
  five OBS18 frames and under 0.07 px within each epoch): no smooth registration takes out such
  residuals, which without the term are 5-15 sigma at every bright star; with it they count at
  their expected size. The cost is sensitivity on the flanks of bright stars (see the schema).
* The kernel's own errors (:func:`kernel_error`): with few stars the degree-2 kernel cannot
  match every star. There the stars' profiles differ with brightness: the brightest star, which
  sfft's least squares follow, is matched, and the others come out too broad (the single frame
  convolved; too narrow, by 0.4-0.5 px², with the stacked reference convolved) (size moments
  0.1 px² for the brightest, 0.3-1.6 px² for the 10^4-10^5 ADU stars), keeping core deficits
  and rings of 5-20 % of their peak. Near each star the difference is fitted with the first terms of a small kernel
  error acting on the flux common to both epochs (:func:`moment_images`: flux, shift, size,
  ellipticity); each term's scatter over the stars, its measurement noise taken out, gives the
  variance ``Σ s_j² B_j²`` (:func:`kernel_error_variance`) added to VAR and, with the
  matched-filtered common flux, to the score's variance. A transient, or a source that faded,
  is not in the common flux, and smooth light (a galaxy's) has small derivatives, so both keep
  their significance; a point source on a bright star's core needs more flux to be found.

Pixels within a kernel half width of a saturated (masked) pixel are left out of the kernel fit
as well: masked pixels are 0 in both images, so the convolved image lacks the saturated core's
light there and the fit bends towards a ring. On the ``realpsf`` test telescope (seeds 3, 5, 7,
11) a star 28 px from a saturated reference star kept a 5-17 sigma dipole in all three epochs of
its field; with the ban, 7 of the 146 stars > 100 sigma keep a >= 5 sigma residual, 11 without.

sfft is an optional dependency (``pip install "rbflow[sfft]"``); it is imported only when the
method is chosen.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from rbflow.align import MASK_BITS
from rbflow.difference import Difference, PreparedPair, PSFLike, astrometric_variance, ref_psf_on_sci_grid
from rbflow.errors import ConfigError
from rbflow.stars import grow_disc

__all__ = [
    "DEFAULTS",
    "astrometric_outliers",
    "convolution_sides",
    "decorrelation_kernel",
    "excess_scatter",
    "kernel_error",
    "kernel_error_variance",
    "moment_images",
    "matching_kernel",
    "numba_cache_dir",
    "random_effects_mean",
    "relative_width",
    "require_sfft",
    "sfft_difference",
    "star_chi2",
    "star_widths",
]

log = logging.getLogger(__name__)

#: Defaults of the telescope's ``subtract.sfft`` block (see src/rbflow/schemas/telescope.schema.yaml).
DEFAULTS: dict[str, Any] = {
    "kernel_half_width": None,
    "kernel_poly_order": 2,
    "bg_poly_order": 2,
    "tile": 1024,
    "overlap": 64,
    "astrometric_noise": False,
    "moved_star_offset": 0.5,
    "moved_star_sigma": 5.0,
    "moved_star_floor": 0.03,
    "kernel_error": False,
    "convolve": "auto",
}
#: Kernel half width (px) per FWHM of the broader PSF when ``kernel_half_width`` is null, and its limits.
_KERHW_PER_FWHM = 2.0
_KERHW_LIMITS = (2, 20)
#: Size of the decorrelation kernel in matching-kernel sizes (as sfft's ``DeCorrelation_Calculator``).
_DECORR_SIZE_RATIO = 2.0
#: Radius (broader FWHMs) of the disc around each star where :func:`kernel_error` fits the kernel's local error.
_KERR_RADIUS = 2.0
#: Terms of the kernel-error expansion (:func:`moment_images`).
_N_MOMENTS = 6
#: Largest condition number of a star's normal matrix in :func:`kernel_error` (above: no star in C there).
_MAX_COND = 1e12
#: Bisection steps of the Paule-Mandel scatter in :func:`kernel_error` (relative precision 2^-60).
_PM_ITER = 60
#: Robust std per median absolute deviation (Gaussian noise).
_MAD_TO_STD = 1.4826
#: Clipping (sigma) and its iterations in the scatter of the stars' offsets (:func:`_field_statistics`).
_CLIP, _CLIP_ITER = 3.0, 5
#: Most stars for which :func:`astrometric_outliers` tests each star against the others only.
_LOO_MAX = 64
#: Radius (broader FWHMs) of the disc around a star that moved (:func:`astrometric_outliers`) left out of the kernel fit.
_BAN_RADIUS = 3.0
#: Significance (sigma of its own error) beyond which the stars' width difference sets the convolved image
#: (:func:`convolution_sides`); below, sfft runs both ways.
_DIR_SIGMA = 3.0
#: Variance (px²) of a pixel's box (1/12): the least kernel width (:func:`convolution_sides`) that sets the direction.
_PIXEL_VAR = 1.0 / 12.0
#: Most function evaluations of a star's Gaussian fit in :func:`star_widths`.
_FIT_NFEV = 200


def numba_cache_dir() -> Path:
    """Directory of numba's on-disk cache of sfft's compiled functions.

    ``NUMBA_CACHE_DIR`` when set, else ``$XDG_CACHE_HOME/rbflow/numba`` (``~/.cache/rbflow/numba``):
    the first sfft job compiles for 15-35 s, later jobs (any process) load the cache in about 1 s.
    """
    env = os.environ.get("NUMBA_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rbflow" / "numba"


def require_sfft() -> tuple[Callable[..., Any], Callable[[int], None]]:
    """sfft's ``Customized_Packet.CP`` and numba's ``set_num_threads``, with numba's cache directory set.

    Raises
    ------
    ConfigError
        sfft (or numba) is not installed.
    """
    cache = numba_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("NUMBA_CACHE_DIR", str(cache))
    try:
        import numba
        from numba.np.ufunc.parallel import set_num_threads
        from sfft.CustomizedPacket import Customized_Packet
    except ImportError as exc:
        raise ConfigError(
            f"key 'subtract.method' is 'sfft' but sfft cannot be imported ({exc}): install the optional "
            'dependency with `pip install "rbflow[sfft]"`, or set subtract.method to zogy'
        ) from exc
    if not numba.config.CACHE_DIR:  # numba was imported before NUMBA_CACHE_DIR was set
        numba.config.CACHE_DIR = str(cache)
    return Customized_Packet.CP, set_num_threads


def _windows(n: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Windows of ``tile`` px (all the same size, for numba's cache) covering ``n`` px with at least
    ``overlap`` px in common; returns (window start, stop, core start, stop), the cores tiling ``n``."""
    if n <= tile:
        return [(0, n, 0, n)]
    k = math.ceil((n - overlap) / (tile - overlap))
    starts = np.rint(np.linspace(0, n - tile, k)).astype(int)
    cuts = [0, *((starts[1:] + starts[:-1] + tile) // 2), n]
    return [(int(s), int(s) + tile, int(cuts[i]), int(cuts[i + 1])) for i, s in enumerate(starts)]


def _kernel_half_width(scfg: dict[str, Any], fwhm_s: float, fwhm_r: float) -> int:
    """The configured kernel half width, or ``_KERHW_PER_FWHM`` times the broader FWHM (px)."""
    if scfg["kernel_half_width"] is not None:
        return int(scfg["kernel_half_width"])
    lo, hi = _KERHW_LIMITS
    return int(np.clip(math.ceil(_KERHW_PER_FWHM * max(fwhm_s, fwhm_r)), lo, hi))


def matching_kernel(
    solution: np.ndarray, shape: tuple[int, int], x: float, y: float, *, kerhw: int, kpo: int, bpo: int
) -> np.ndarray:
    """sfft's fitted matching kernel at pixel (x, y) of the tile it was fitted on.

    Parameters
    ----------
    solution : numpy.ndarray
        Solution vector returned by sfft's ``Customized_Packet.CP``.
    shape : tuple of int
        ``(ny, nx)`` of the tile (numpy order).
    x, y : float
        Position in the tile (0-based pixels).
    kerhw, kpo, bpo : int
        Kernel half width (px), kernel and background polynomial degrees of the fit.

    Returns
    -------
    numpy.ndarray
        ``(2 kerhw + 1)²`` kernel, numpy ``(y, x)`` order, its sum the flux scaling of the fit.
    """
    from sfft.utils.SFFTSolutionReader import Realize_MatchingKernel

    size = 2 * kerhw + 1
    fpq = (bpo + 1) * (bpo + 2) // 2
    # sfft arrays are (x, y) with 1-based (Fortran) coordinates
    ker = Realize_MatchingKernel(np.array([[x + 1.0, y + 1.0]])).FromArray(
        np.asarray(solution, np.float64), shape[1], shape[0], size, size, kpo, fpq
    )[0]
    return np.asarray(ker, np.float64).T


def decorrelation_kernel(kernel: np.ndarray, s_other: float, s_conv: float) -> np.ndarray:
    """Noise decorrelation kernel of ``O - K * C`` (sfft's ``DeCorrelation_Calculator``).

    Parameters
    ----------
    kernel : numpy.ndarray
        Matching kernel K (odd square, centred), applied to C.
    s_other, s_conv : float
        Background noise of O and of C (ADU, each in its own flux units; K converts C's).

    Returns
    -------
    numpy.ndarray
        Unit-sum kernel ``DC(k) ∝ 1 / sqrt(s_other² + s_conv² |K(k)|²)``, truncated to
        :data:`_DECORR_SIZE_RATIO` times the size of K (odd), centred.
    """
    size = kernel.shape[0]
    n = 2 ** (math.ceil(math.log2(_DECORR_SIZE_RATIO * size)) + 1)
    padded = np.zeros((n, n))
    padded[:size, :size] = kernel
    padded = np.roll(padded, (-(size // 2), -(size // 2)), axis=(0, 1))
    power = np.abs(np.fft.fft2(padded)) ** 2
    dc = np.fft.ifft2(1.0 / np.sqrt(s_other**2 + s_conv**2 * power)).real
    m = int(round(_DECORR_SIZE_RATIO * size)) | 1
    dc = np.roll(dc, (m // 2, m // 2), axis=(0, 1))[:m, :m]
    return dc / dc.sum()


def _run_packet(
    cp: Callable[..., Any],
    set_threads: Callable[[int], None],
    conv: np.ndarray,
    other: np.ndarray,
    *,
    conv_side: str,
    kerhw: int,
    kpo: int,
    bpo: int,
    threads: int,
    ban: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One ``Customized_Packet`` subtraction of a NaN-free pair; returns sfft's solution vector and
    difference: ``SCI - K * REF`` when the reference is convolved, ``K * SCI - REF`` when the science is.
    Pixels where ``ban`` is True are left out of the kernel fit (sfft's prior-ban mask: 0 in both
    fitted images) but subtracted like the others."""
    import numba

    ref, sci = (conv, other) if conv_side == "REF" else (other, conv)
    with tempfile.TemporaryDirectory(prefix="rbflow-sfft-") as tmp:
        paths = {}
        planes = [("ref", ref), ("sci", sci)]
        if ban is not None and ban.any():
            planes += [("mref", np.where(ban, 0.0, ref)), ("msci", np.where(ban, 0.0, sci))]
        for name, data in planes:
            paths[name] = Path(tmp) / f"{name}.fits"
            fits.PrimaryHDU(np.ascontiguousarray(data, np.float32)).writeto(paths[name])
        out = io.StringIO()
        set_threads(threads)
        try:
            with contextlib.redirect_stdout(out), warnings.catch_warnings():
                warnings.simplefilter("ignore", numba.NumbaWarning)
                solution, diff = cp(
                    str(paths["ref"]),
                    str(paths["sci"]),
                    str(paths.get("mref", paths["ref"])),
                    str(paths.get("msci", paths["sci"])),
                    conv_side,
                    kerhw,
                    KerPolyOrder=kpo,
                    BGPolyOrder=bpo,
                    ConstPhotRatio=True,
                    BACKEND_4SUBTRACT="Numpy",
                    NUM_CPU_THREADS_4SUBTRACT=threads,
                    NUMBA_CACHE=True,
                    VERBOSE_LEVEL=0,
                )
        finally:
            numba.set_num_threads = set_threads  # sfft 1.7.3 assigns an int to it
        log.debug("sfft: %s", out.getvalue().strip())
    return np.asarray(solution), np.asarray(diff, np.float32).T


def _centroid_errors(data: np.ndarray, var: np.ndarray, x: np.ndarray, y: np.ndarray, sigma_w: float) -> np.ndarray:
    """1-sigma errors (px, per axis) of Gaussian-windowed centroids at (x, y) from the variance map.

    The linearised error of :func:`rbflow.stars.windowed_centroids` (SExtractor's ``ERRX2WIN``):
    ``err_x² = 4 Σ w² (x_i - x)² var_i / (Σ w I_i)²``, w the Gaussian window of ``sigma_w`` (px), I
    the pixels within ``4 sigma_w + 1`` px; inf where the windowed flux is not positive. Returns
    ``(n, 2)``: x and y errors.
    """
    r = int(math.ceil(4 * sigma_w)) + 1
    ny, nx = data.shape
    err = np.full((x.size, 2), np.inf)
    for k, (xc, yc) in enumerate(zip(x, y)):
        ix, iy = int(round(xc)), int(round(yc))
        y0, y1, x0, x1 = max(iy - r, 0), min(iy + r + 1, ny), max(ix - r, 0), min(ix + r + 1, nx)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        dx, dy = xx - xc, yy - yc
        w = np.exp(-(dx**2 + dy**2) / (2 * sigma_w**2))
        flux = float((w * np.nan_to_num(data[y0:y1, x0:x1])).sum())
        v = np.nan_to_num(var[y0:y1, x0:x1], nan=0.0, posinf=0.0)
        if flux > 0:
            err[k] = 2 * np.sqrt([(w**2 * dx**2 * v).sum(), (w**2 * dy**2 * v).sum()]) / flux
    return err


def _paule_mandel(r2: np.ndarray, e2: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per row and axis of ``(m, k, 2)`` squared deviations ``r2``, squared errors ``e2`` and 0/1
    weights ``w``: the s² with ``Σ w r² / (e² + s²) = Σ w`` (bisection), 0 when the errors explain
    the spread; ``(m, 2)``."""
    n = w.sum(axis=1)

    def mean_ratio(s2: np.ndarray) -> np.ndarray:
        return (w * r2 / (e2 + s2[:, None, :])).sum(axis=1) / n

    lo = np.zeros(n.shape)
    hi = (w * r2).sum(axis=1) / n + np.finfo(float).tiny  # there the mean ratio is <= 1
    for _ in range(_PM_ITER):
        mid = 0.5 * (lo + hi)
        up = mean_ratio(mid) > 1.0
        lo, hi = np.where(up, mid, lo), np.where(up, hi, mid)
    return np.where(mean_ratio(np.zeros(n.shape)) > 1.0, 0.5 * (lo + hi), 0.0)


def _field_statistics(d: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Median offset, excess scatter² and the median's error² of rows of stars' offsets.

    ``d``, ``e``: ``(m, k, 2)`` offsets (px) and their errors, k stars per row. Per row and axis the
    scatter² s² beyond the errors is the Paule-Mandel estimate about the median (as
    :func:`excess_scatter`: ``mean(r² / (e² + s²)) = 1``, r the offsets from their median; 0 when
    the errors explain the spread), clipped: stars beyond :data:`_CLIP` sigma of it are left out
    and s² found again (:data:`_CLIP_ITER` times), so that a few moved stars among many do not
    inflate it (3 of 100 moved by 0.4 px make a 0.05 px scatter 0.08 px unclipped). The
    median's error² is ``π/2 · mean(e² + s²) / k``. Returns three ``(m, 2)`` arrays.
    """
    med = np.median(d, axis=1)
    r2 = (d - med[:, None, :]) ** 2
    e2 = e**2
    w = np.ones(r2.shape)
    for _ in range(_CLIP_ITER):
        s2 = _paule_mandel(r2, e2, w)
        w_new = (r2 <= _CLIP**2 * (e2 + s2[:, None, :])).astype(float)
        if np.array_equal(w_new, w):
            break
        w = w_new
    return med, s2, math.pi / 2 * np.mean(e2 + s2[:, None, :], axis=1) / d.shape[1]


def astrometric_outliers(
    pp: PreparedPair, *, nsigma: float | None, floor: float, offset: float | None
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Alignment stars that moved relative to the others, their motion, and the registration noise of the rest.

    Each matched alignment star's offset reference - science (Gaussian-windowed centroids in
    each image, the window of its PSF) is compared with the median offset of the other stars,
    against the error that difference should have if the star did not move:

    ``z² = Σ_axis (d - median)² / (e² + s² + floor² + e_med²)``

    with ``e`` the star's centroid error (both images, from their variance maps: the linearised
    error of the windowed centroid, SExtractor's ``ERRX2WIN``), ``s`` the scatter of the other
    stars' offsets about their median beyond their own centroid errors (Paule-Mandel, per
    axis, clipped at 3 sigma, :func:`_field_statistics`: the registration's real star-to-star
    scatter, from distortion and the stars' own small motions), ``floor`` the least error of any
    offset (what centroids cannot resolve however bright the star: PSF asymmetries that change
    over the field and between frames) and ``e_med`` the median's error
    (``π/2 · mean(e² + s²) / n``). The star with the largest z, when beyond ``nsigma`` (or
    farther than ``offset`` px from the median), moved between the epochs (proper motion, the
    differential chromatic refraction of an odd colour, or a galaxy whose light centroid a
    transient moves) and is set aside, and the test repeats on the rest while more than 3
    remain (above :data:`_LOO_MAX` stars, the median and scatter of all of them stand for the
    others'). A bright star's offset is then tested against what it can be (its centroid error is
    ~0.003 px at S/N 1000), a faint one's against its own noise: among faint stars that agree
    within their noise a bright star's 0.3 px motion is found while a faint star's 0.2 px of
    noise is not; where the other stars scatter for real (0.03-0.10 px per axis on the DECam
    frames) the test's sigma does too. The fixed ``offset`` catches motions that several moved
    stars among few hide from each other. The registration noise is the rms scatter of the
    remaining stars about their mean, per axis (ZOGY's sigma_x, sigma_y).

    Parameters
    ----------
    pp : rbflow.difference.PreparedPair
        The prepared pair (its ``ainfo['stars']`` are the matched alignment stars).
    nsigma : float or None
        Least significance z of a motion; None: no significance test.
    floor : float
        Least error (px) of an offset, added in quadrature.
    offset : float or None
        Least distance (px) from the other stars' median offset that marks a star as moved
        whatever its significance; None: no such cap. Both None: no star is marked.

    Returns
    -------
    moved : numpy.ndarray
        bool per alignment star.
    motion : numpy.ndarray
        ``(n, 2)`` each star's offset (px, x and y) from the median offset of the stars that did
        not move (NaN where not measured).
    sigma_x, sigma_y : float
        Registration noise (px) of the stars that did not move (0 with fewer than 2).
    """
    from rbflow.stars import FWHM_TO_SIGMA, windowed_centroids

    xs = np.asarray(pp.ainfo["stars"]["x"], float)
    ys = np.asarray(pp.ainfo["stars"]["y"], float)
    moved = np.zeros(xs.size, bool)
    if xs.size == 0:
        return moved, np.zeros((0, 2)), 0.0, 0.0
    sw_n, sw_r = pp.fwhm_s * FWHM_TO_SIGMA, pp.fwhm_r * FWHM_TO_SIGMA
    xn, yn = windowed_centroids(pp.N, xs, ys, sw_n)
    xr, yr = windowed_centroids(pp.R, xs, ys, sw_r)
    d = np.c_[xr - xn, yr - yn]
    e = np.hypot(_centroid_errors(pp.N, pp.var_n, xn, yn, sw_n), _centroid_errors(pp.R, pp.var_r, xr, yr, sw_r))
    ok = np.all(np.isfinite(d), axis=1) & np.all(np.isfinite(e), axis=1)
    while (nsigma is not None or offset is not None) and (ok & ~moved).sum() > 3:
        idx = np.flatnonzero(ok & ~moved)
        if idx.size <= _LOO_MAX:  # each star against the others
            rows = np.broadcast_to(idx, (idx.size, idx.size))[~np.eye(idx.size, dtype=bool)].reshape(idx.size, -1)
            med, s2, e_med2 = _field_statistics(d[rows], e[rows])
        else:  # each star's own weight in the robust statistics of all is under 1 / _LOO_MAX
            med, s2, e_med2 = _field_statistics(d[idx][None], e[idx][None])
        r = d[idx] - med
        dist = np.hypot(r[:, 0], r[:, 1])
        z = np.sqrt((r**2 / (e[idx] ** 2 + s2 + floor**2 + e_med2)).sum(axis=1))
        fails = np.zeros(idx.size, bool)
        if nsigma is not None:
            fails |= z > nsigma
        if offset is not None:
            fails |= dist > offset
        if not fails.any():
            break
        j = int(np.argmax(np.where(fails, z if nsigma is not None else dist, -np.inf)))
        log.debug(
            "sfft: star at (%.1f, %.1f) off the field by %.3f px, %.1f sigma", xs[idx[j]], ys[idx[j]], dist[j], z[j]
        )
        moved[idx[j]] = True
    keep = ok & ~moved
    motion = d - (np.median(d[keep], axis=0) if keep.any() else np.nan)
    if keep.sum() < 2:
        return moved, motion, 0.0, 0.0
    sx, sy = np.std(d[keep], axis=0)
    return moved, motion, float(sx), float(sy)


def _gaussian_residuals(p: np.ndarray, x: np.ndarray, y: np.ndarray, d: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted residuals of a circular Gaussian (amplitude, x0, y0, sigma²) at pixels (x, y) holding d."""
    return (p[0] * np.exp(-((x - p[1]) ** 2 + (y - p[2]) ** 2) / (2 * p[3])) - d) * w


def star_widths(
    image: np.ndarray,
    var: np.ndarray,
    xs: np.ndarray,
    ys: np.ndarray,
    *,
    bad: np.ndarray,
    radius: float,
    sigma0: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian widths of stars: ``sigma²`` (px²) of a circular Gaussian fitted to each star, and its error.

    Each star's pixels within ``radius`` of (x, y) are fitted (least squares weighted by
    ``1 / var``; free amplitude, centre and width, no background: the image is
    background-subtracted) with a point-sampled Gaussian. The width is that of the core: a halo
    or coma that the Gaussian lacks biases it, alike in two images of similar PSFs. Its error is
    the fit's (inverse normal matrix) times the reduced chi² when above 1 (the profile is not
    a Gaussian). A star with an invalid pixel within ``radius``, too near the edge, or whose fit
    fails (no convergence, sigma² outside (0, radius²)) gets NaN.

    Parameters
    ----------
    image, var : numpy.ndarray
        Background-subtracted image and its variance (ADU²).
    xs, ys : numpy.ndarray
        Star positions (px).
    bad : numpy.ndarray
        Invalid pixels.
    radius : float
        Fit radius (px).
    sigma0 : float
        Starting width (px).

    Returns
    -------
    s2, err : numpy.ndarray
        ``sigma²`` and its 1-sigma error per star (px²).
    """
    from scipy.optimize import least_squares

    h = int(math.ceil(radius))
    ny, nx = image.shape
    s2 = np.full(len(xs), np.nan)
    err = np.full(len(xs), np.nan)
    for i, (x, y) in enumerate(zip(xs, ys)):
        ix, iy = int(round(x)), int(round(y))
        if ix - h < 0 or iy - h < 0 or ix + h >= nx or iy + h >= ny:
            continue
        win = (slice(iy - h, iy + h + 1), slice(ix - h, ix + h + 1))
        yy, xx = np.mgrid[iy - h : iy + h + 1, ix - h : ix + h + 1]
        disc = (xx - x) ** 2 + (yy - y) ** 2 <= radius**2
        if bad[win][disc].any():
            continue
        d = np.asarray(image[win][disc], np.float64)
        w = 1.0 / np.sqrt(np.asarray(var[win][disc], np.float64))
        amp = float(d.max())
        if not (amp > 0 and np.isfinite(w).all()):
            continue
        fit = least_squares(
            _gaussian_residuals,
            [amp, x, y, sigma0**2],
            args=(xx[disc], yy[disc], d, w),
            max_nfev=_FIT_NFEV,
            x_scale="jac",
        )
        if not fit.success or not 0 < fit.x[3] < radius**2:
            continue
        normal = fit.jac.T @ fit.jac
        if np.linalg.cond(normal) > _MAX_COND:
            continue
        chi2 = 2 * fit.cost / max(d.size - 4, 1)
        s2[i] = fit.x[3]
        err[i] = math.sqrt(np.linalg.inv(normal)[3, 3] * max(chi2, 1.0))
    return s2, err


def random_effects_mean(m: np.ndarray, e: np.ndarray) -> tuple[float, float]:
    """Mean of estimates with errors, their real scatter included (Paule & Mandel 1982), and its error.

    ``mu = Σ w m / Σ w`` with ``w = 1 / (e² + s²)``, s² the scatter beyond the errors
    (``Σ w (m - mu)² = n - 1``, 0 when the errors explain the spread); its error ``1 / sqrt(Σ w)``.
    NaN, NaN without estimates.
    """
    if m.size == 0:
        return math.nan, math.nan

    def mean_and_q(s2: float) -> tuple[float, float]:
        w = 1.0 / (e**2 + s2)
        mu = float((w * m).sum() / w.sum())
        return mu, float((w * (m - mu) ** 2).sum())

    s2 = _excess_root(lambda s2: mean_and_q(s2)[1] - (m.size - 1), float(np.ptp(m)) ** 2 + float((e**2).max()))
    mu, _ = mean_and_q(s2)
    return mu, float(1.0 / math.sqrt((1.0 / (e**2 + s2)).sum()))


def relative_width(pp: PreparedPair, *, radius: float) -> tuple[float, float, int]:
    """How much broader the aligned reference's stars are than the science's, measured on the stars.

    The matched alignment stars' Gaussian widths (:func:`star_widths`, within ``radius`` px) in
    the science image and in the reference aligned onto it (so on the same pixels, the
    resampling's blur included, as sfft sees them): the mean of ``sigma_R² - sigma_N²`` over the
    stars measured in both, the stars' real scatter included (:func:`random_effects_mean`), with
    its error. Independent of the PSF models, which from 4-7 stars can get the order of two
    similar widths wrong. A Gaussian convolved with a Gaussian of ``sigma_K²`` gains ``sigma_K²``,
    so the value is the width the matching kernel needs (< 0: the science is broader).

    Parameters
    ----------
    pp : rbflow.difference.PreparedPair
        The prepared pair (its ``ainfo['stars']`` are the matched alignment stars).
    radius : float
        Fit radius (px) around each star.

    Returns
    -------
    width, error : float
        Mean ``sigma_R² - sigma_N²`` (px², science pixels) and its error; NaN without stars.
    n : int
        Stars measured in both images.
    """
    from rbflow.stars import FWHM_TO_SIGMA

    xs = np.asarray(pp.ainfo["stars"]["x"], float)
    ys = np.asarray(pp.ainfo["stars"]["y"], float)
    sigma0 = FWHM_TO_SIGMA * math.sqrt(pp.fwhm_s * pp.fwhm_r)
    s2n, en = star_widths(pp.N, pp.var_n, xs, ys, bad=pp.bad, radius=radius, sigma0=sigma0)
    s2r, er = star_widths(pp.R, pp.var_r, xs, ys, bad=pp.bad, radius=radius, sigma0=sigma0)
    ok = np.isfinite(s2n) & np.isfinite(s2r)
    mu, err = random_effects_mean(s2r[ok] - s2n[ok], np.hypot(en[ok], er[ok]))
    return mu, err, int(ok.sum())


def convolution_sides(
    width: float, error: float, *, nsigma: float, floor: float, noise_sci: float, noise_ref: float
) -> tuple[str, ...]:
    """The image(s) sfft should convolve: ``('SCI',)``, ``('REF',)`` or both, ``('REF', 'SCI')``.

    sfft fits ``O = K * C`` by least squares, which the convolved image C should suit on two
    counts: it should be the narrower one (else the kernel must sharpen, which a kernel of a few
    pixels does with rings at bright stars), and the less noisy one (the fit takes C as exact: its
    noise biases K, and K carries it into the difference). The kernel's width is ``|width|``
    (``sigma_R² - sigma_N²``, px², :func:`relative_width`); the noises are the background noises
    per pixel in one flux unit (``noise_sci``, ``noise_ref``). One side is returned only when both
    counts agree: ``|width|`` beyond ``floor`` by more than ``nsigma`` times its ``error`` and the
    narrower image not the noisier. Otherwise both are tried, and what decides is measured
    (:func:`star_chi2`): the stars cannot tell the widths apart, or the kernel is narrower than
    ``floor`` (a pixel, :data:`_PIXEL_VAR`: a delta function plus a sub-pixel correction that a
    kernel on the pixel grid makes as well by sharpening as by smoothing; there the PSFs' halo
    and coma, and the reference's resampling, which the widths leave out, decide), or the
    narrower image is the noisier (a sharp single epoch against a deep stacked reference: on the
    DECam frames, sharpening the stack by 2 px² left fewer residuals at the stars).
    """
    narrower = "SCI" if width > 0 else "REF"
    noisier = "SCI" if noise_sci > noise_ref else "REF"
    if abs(width) > floor + nsigma * error and narrower != noisier:
        return (narrower,)
    return ("REF", "SCI")


def _discs(shape: tuple[int, int], xs: np.ndarray, ys: np.ndarray, radius: float) -> np.ndarray:
    """Pixels of an image of ``shape`` within ``radius`` px of any of the points (xs, ys)."""
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    out = np.zeros(shape, bool)
    for x, y in zip(xs, ys):
        out |= (xx - x) ** 2 + (yy - y) ** 2 <= radius**2
    return out


def star_chi2(D: np.ndarray, V: np.ndarray, xs: np.ndarray, ys: np.ndarray, *, bad: np.ndarray, radius: float) -> float:
    """Mean ``D² / V`` over the valid pixels within ``radius`` of the stars, V scaled to D's measured noise.

    V is first multiplied by the robust variance of ``D / sqrt(V)`` over all valid pixels (as in
    :func:`kernel_error`), so that the measure is the stars' residuals in units of each
    difference's own noise: 1 where the kernel matches the stars, more for residuals. inf
    without pixels.
    """
    ok = ~bad & np.isfinite(D) & (V > 0)
    k2 = _noise_scale(D, V, ok)
    sel = _discs(D.shape, xs, ys, radius) & ok
    if not sel.any():
        return math.inf
    return float((D[sel].astype(np.float64) ** 2 / (k2 * V[sel])).mean())


def common_flux(D: np.ndarray, M: np.ndarray, conv_side: str) -> np.ndarray:
    """The flux common to both epochs as they enter D: ``min(science part, reference part)``, each clipped at 0.

    ``D = M - (convolved part)`` (science flux units, see :func:`sfft_difference`); the science
    part is ``M`` when the reference is convolved, else ``D - M``; the reference part the other
    one. A source in one epoch only (a transient, one that faded) has no common flux.
    """
    if conv_side == "REF":
        sci_part, ref_part = M, M - D
    else:
        sci_part, ref_part = D - M, -M
    return np.minimum(np.maximum(sci_part, 0), np.maximum(ref_part, 0)).astype(np.float32)


def _derivatives(C: np.ndarray) -> tuple[np.ndarray, ...]:
    """First and second derivatives of an image (x, y, xx, yy, xy): central differences of step 1
    (``[1, -2, 1]`` for the second ones), the edge pixels repeated beyond the edges."""
    c = np.pad(np.asarray(C, np.float64), 1, mode="edge")
    mid = c[1:-1, 1:-1]
    gx = (c[1:-1, 2:] - c[1:-1, :-2]) / 2
    gy = (c[2:, 1:-1] - c[:-2, 1:-1]) / 2
    gxx = c[1:-1, 2:] - 2 * mid + c[1:-1, :-2]
    gyy = c[2:, 1:-1] - 2 * mid + c[:-2, 1:-1]
    gxy = (c[2:, 2:] - c[2:, :-2] - c[:-2, 2:] + c[:-2, :-2]) / 4
    return gx, gy, gxx, gyy, gxy


def moment_images(C: np.ndarray) -> np.ndarray:
    """The images a small kernel error makes of ``C``: its first terms in the kernel error's moments.

    A kernel wrong by a small ``dK`` leaves ``dK * C`` in the difference; for an image that is smooth
    on the scale of ``dK`` this is, to second order in its moments, a sum of the stacked images

    ``C, dC/dx, dC/dy, (d²C/dx² + d²C/dy²) / 2, (d²C/dx² - d²C/dy²) / 2, d²C/dxdy``

    with the moments of ``dK`` as coefficients: its flux (a fraction), its centroid (px, sign
    reversed) and its second moments (px²: size, and the two components of ellipticity). Central
    differences of step 1 (:func:`_derivatives`).

    Parameters
    ----------
    C : numpy.ndarray
        The image (2-D).

    Returns
    -------
    numpy.ndarray
        ``(6, ny, nx)`` float64.
    """
    gx, gy, gxx, gyy, gxy = _derivatives(C)
    return np.stack([np.asarray(C, np.float64), gx, gy, (gxx + gyy) / 2, (gxx - gyy) / 2, gxy])


def kernel_error(
    D: np.ndarray,
    V: np.ndarray,
    C: np.ndarray,
    xs: np.ndarray,
    ys: np.ndarray,
    *,
    bad: np.ndarray,
    radius: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The scatter of the kernel's local errors, measured at the stars it was fitted on.

    Near each star the difference is fitted (least squares weighted by ``1 / V``, pixels within
    ``radius``) with the :func:`moment_images` of the common flux ``C``: the flux fraction, the
    shift and the second moments by which the fitted kernel misses that star. Over the stars,
    each moment's rms about 0 with its measurement noise taken out is the Paule-Mandel estimate
    (Paule & Mandel 1982; the random-effects variance of meta-analysis): the ``s`` with
    ``Σ m² / (e² + s²) = n`` for the n estimates m with errors e, 0 when the errors explain
    their spread. V is first scaled to D's measured noise (robust std of D/sqrt(V) over the
    valid pixels), so that the errors are right.

    A star that varies between the epochs puts its change into its flux moment, and raises the
    flux scatter by its change over sqrt(n); the stars that moved (:func:`astrometric_outliers`)
    are best left out by the caller.

    Parameters
    ----------
    D, V : numpy.ndarray
        Difference and its predicted variance (white noise, ADU²).
    C : numpy.ndarray
        The flux of D's two parts common to both epochs (:func:`common_flux`).
    xs, ys : numpy.ndarray
        Positions (px) of the stars the kernel was fitted on.
    bad : numpy.ndarray
        Invalid pixels; a star with one within ``radius`` is not used, nor one within
        ``radius + 2`` px of the edge.
    radius : float
        Radius (px) of the fit around each star.

    Returns
    -------
    scatter : numpy.ndarray
        ``(6,)`` rms of the moments over the stars, in the order of :func:`moment_images` (flux
        fraction; x and y shift, px; size and the two ellipticity terms, px²); 0 without usable
        stars.
    moments, errors : numpy.ndarray
        ``(n, 6)`` each star's moments and their errors (NaN for the stars not used).
    """
    ok = ~bad & np.isfinite(D) & (V > 0)
    k2 = _noise_scale(D, V, ok)
    h = int(math.ceil(radius))
    u = np.arange(-h, h + 1)
    disc = u[None, :] ** 2 + u[:, None] ** 2 <= radius**2
    ny, nx = D.shape
    moments = np.full((len(xs), _N_MOMENTS), np.nan)
    errors = np.full_like(moments, np.nan)
    for i, (x, y) in enumerate(zip(xs, ys)):
        ix, iy = int(round(x)), int(round(y))
        g = h + 2  # margin for the central differences
        if ix - g < 0 or iy - g < 0 or ix + g >= nx or iy + g >= ny:
            continue
        win = (slice(iy - h, iy + h + 1), slice(ix - h, ix + h + 1))
        if bad[win][disc].any():
            continue
        A = moment_images(C[iy - g : iy + g + 1, ix - g : ix + g + 1])[:, 2:-2, 2:-2][:, disc].T
        w = 1.0 / (k2 * V[win][disc].astype(np.float64))
        normal = A.T @ (A * w[:, None])
        if not np.isfinite(normal).all() or np.linalg.cond(normal) > _MAX_COND:  # no star in C there
            continue
        cov = np.linalg.inv(normal)
        moments[i] = cov @ (A.T @ (w * D[win][disc]))
        errors[i] = np.sqrt(np.diag(cov))
    good = np.all(np.isfinite(moments), axis=1)
    scatter = np.zeros(_N_MOMENTS)
    if good.any():
        for j in range(_N_MOMENTS):
            scatter[j] = excess_scatter(moments[good, j], errors[good, j])
    return scatter, moments, errors


def excess_scatter(m: np.ndarray, e: np.ndarray) -> float:
    """Scatter of estimates about 0 beyond their errors (Paule & Mandel 1982).

    Parameters
    ----------
    m, e : numpy.ndarray
        The estimates and their (1 sigma) errors.

    Returns
    -------
    float
        The s with ``Σ m² / (e² + s²) = n`` (found by bisection), 0 when the errors explain the spread.
    """

    def excess(s2: float) -> float:
        return float((m**2 / (e**2 + s2)).sum()) - m.size

    return math.sqrt(_excess_root(excess, float((m**2).max()) + float((e**2).max())))


def _excess_root(excess: Callable[[float], float], hi: float) -> float:
    """The s² in [0, ``hi``] where the decreasing ``excess(s²)`` crosses 0 (bisection, ``_PM_ITER``
    steps): Paule & Mandel's scatter beyond the errors; 0 when ``excess(0) <= 0`` (the errors
    explain the spread)."""
    if excess(0.0) <= 0:
        return 0.0
    lo = 0.0
    for _ in range(_PM_ITER):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if excess(mid) > 0 else (lo, mid)
    return 0.5 * (lo + hi)


def kernel_error_variance(C: np.ndarray, scatter: np.ndarray) -> np.ndarray:
    """Variance the kernel's errors leave in an image: ``Σ_j scatter_j² B_j²`` over the
    :func:`moment_images` B_j of ``C``, the moments taken independent (float64, C's shape)."""
    s2 = np.asarray(scatter, np.float64) ** 2
    gx, gy, gxx, gyy, gxy = _derivatives(C)
    out = s2[0] * np.asarray(C, np.float64) ** 2 + s2[1] * gx**2 + s2[2] * gy**2
    out += s2[3] * ((gxx + gyy) / 2) ** 2 + s2[4] * ((gxx - gyy) / 2) ** 2 + s2[5] * gxy**2
    return out


def _score(
    D: np.ndarray,
    V: np.ndarray,
    M: np.ndarray | None,
    psfs: list[np.ndarray],
    boxes: list[tuple[slice, slice, slice, slice]],
    *,
    sx: float,
    sy: float,
    C: np.ndarray | None = None,
    scatter: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Matched filter S of D with the PSF of each tile, its white-noise variance from V and the extra variance.

    With the source image ``M`` (the unconvolved image decorrelated, in D's units; D's
    convolved part is then ``M - D``), the extra variance holds the astrometric noise of ZOGY's
    S_corr (Zackay et al. 2016, sec. 3.3): ``sx² (∂S_M/∂x)² + sy² (∂S_M/∂y)²`` for each part,
    S_M its matched-filtered image; with the common flux ``C`` and the kernel error's
    ``scatter``, :func:`kernel_error_variance` of the matched-filtered C. ``boxes`` holds each
    tile's window and core (y, x slices); the filter runs on the window and fills the core.
    """
    from scipy.signal import fftconvolve

    S, VS, XS = (np.zeros_like(D) for _ in range(3))
    for pd, (wy, wx, cy, cx) in zip(psfs, boxes):
        flip = pd[::-1, ::-1]
        core = (slice(cy.start - wy.start, cy.stop - wy.start), slice(cx.start - wx.start, cx.stop - wx.start))
        s = fftconvolve(D[wy, wx], flip, mode="same")
        S[cy, cx] = s[core]
        VS[cy, cx] = fftconvolve(V[wy, wx], flip**2, mode="same")[core]
        x = np.zeros(s.shape)
        if M is not None:
            s_o = fftconvolve(M[wy, wx], flip, mode="same")
            x += astrometric_variance(s_o, sx, sy) + astrometric_variance(s_o - s, sx, sy)
        if C is not None and scatter is not None:
            x += kernel_error_variance(fftconvolve(C[wy, wx], flip, mode="same"), scatter)
        XS[cy, cx] = x[core]
    return S, VS, XS


def _noise_scale(a: np.ndarray, v: np.ndarray, ok: np.ndarray) -> float:
    """Robust variance (1.4826 MAD, squared) of ``a / sqrt(v)`` over the ``ok`` pixels: measured over
    predicted noise, by which an absolute extra variance is divided before the empty-sky rescaling
    of :func:`rbflow.subtract.subtract_images` (so that it stays absolute)."""
    z = a[ok] / np.sqrt(v[ok])
    z = z[np.isfinite(z)]
    if z.size == 0:
        return 1.0
    return float((_MAD_TO_STD * np.median(np.abs(z - np.median(z)))) ** 2) or 1.0


@dataclass
class _Tiles:
    """One direction's decorrelated difference over the tiles (see :func:`_tiled_difference`)."""

    D: np.ndarray
    V: np.ndarray
    M: np.ndarray | None
    psfs: list[np.ndarray]
    boxes: list[tuple[slice, slice, slice, slice]]
    centres: list[tuple[int, int]]
    k0s: list[float]
    dc_size: int


def _tiled_difference(
    cp: Callable[..., Any],
    set_threads: Callable[[int], None],
    pp: PreparedPair,
    psf_sci: PSFLike,
    psf_ref: PSFLike,
    *,
    conv_side: str,
    kerhw: int,
    kpo: int,
    bpo: int,
    tile: int,
    overlap: int,
    ban: np.ndarray,
    threads: int,
    with_source: bool,
) -> _Tiles:
    """sfft on each tile with ``conv_side`` convolved, decorrelated: D, its variance (science units),
    the unconvolved image decorrelated and signed so that D = M - (convolved part) when
    ``with_source``, and each tile's PSF of D, window and core, centre, kernel sum."""
    from scipy.signal import fftconvolve

    if conv_side == "REF":  # D0 = N - K * R (science units)
        conv_img, other_img, var_c, var_o, s_c, s_o = pp.R, pp.N, pp.var_r, pp.var_n, pp.sr, pp.sn
    else:  # D0 = K * N - R (reference units)
        conv_img, other_img, var_c, var_o, s_c, s_o = pp.N, pp.R, pp.var_n, pp.var_r, pp.sn, pp.sr
    ny, nx = pp.N.shape
    D = np.zeros((ny, nx), np.float32)
    V = np.zeros((ny, nx), np.float32)
    M = np.zeros((ny, nx), np.float32) if with_source else None
    boxes, psfs, centres, k0s = [], [], [], []
    dc_size = 0
    for wy0, wy1, cy0, cy1 in _windows(ny, tile, overlap):
        for wx0, wx1, cx0, cx1 in _windows(nx, tile, overlap):
            win = (slice(wy0, wy1), slice(wx0, wx1))
            solution, diff = _run_packet(
                cp,
                set_threads,
                conv_img[win],
                other_img[win],
                conv_side=conv_side,
                kerhw=kerhw,
                kpo=kpo,
                bpo=bpo,
                threads=threads,
                ban=ban[win],
            )
            tx, ty = (cx0 + cx1 - 1) // 2, (cy0 + cy1 - 1) // 2
            kernel = matching_kernel(solution, diff.shape, tx - wx0, ty - wy0, kerhw=kerhw, kpo=kpo, bpo=bpo)
            k0 = float(kernel.sum())
            dc = decorrelation_kernel(kernel, s_o, s_c)
            dc_size = dc.shape[0]
            diff = fftconvolve(diff, dc, mode="same")
            var = var_o[win] + k0**2 * var_c[win]
            core = (slice(cy0 - wy0, cy1 - wy0), slice(cx0 - wx0, cx1 - wx0))
            D[cy0:cy1, cx0:cx1] = diff[core]
            V[cy0:cy1, cx0:cx1] = var[core]
            if M is not None:
                m = fftconvolve(other_img[win], dc, mode="same")
                M[cy0:cy1, cx0:cx1] = (m if conv_side == "REF" else -m)[core]
            if conv_side == "REF":
                p = psf_sci.stamp(tx, ty, pp.size, centred=True)
            else:
                p = ref_psf_on_sci_grid(psf_ref, pp.ainfo["to_ref"], tx, ty, pp.size)
            p = fftconvolve(p, dc, mode="same")
            psfs.append(p / p.sum())
            boxes.append((*win, slice(cy0, cy1), slice(cx0, cx1)))
            centres.append((tx, ty))
            k0s.append(k0)
    if conv_side == "SCI":  # reference units -> science units
        D /= pp.fr
        V /= pp.fr**2
        if M is not None:
            M /= pp.fr
    return _Tiles(D, V, M, psfs, boxes, centres, k0s, dc_size)


def sfft_difference(
    pp: PreparedPair, psf_sci: PSFLike, psf_ref: PSFLike, cfg: dict[str, Any], *, threads: int = 1
) -> Difference:
    """Decorrelated difference of a prepared pair by sfft's ``Customized_Packet`` (numpy backend) on tiles.

    Parameters
    ----------
    pp : rbflow.difference.PreparedPair
        Aligned, masked, background-subtracted pair (masked pixels are 0 in both, so they do not
        weigh in the kernel fit).
    psf_sci, psf_ref : PSFLike
        PSF models; the one of the image that is not convolved, convolved with the decorrelation
        kernel, is the PSF of D (for the score map and photometry); they also set the default
        kernel size. The kernel itself is fitted on the data, and which image is convolved is
        set by the stars' widths (:func:`convolution_sides`; when those are close, both
        directions run and the one with the smaller :func:`star_chi2` is kept), the models'
        FWHMs only when no star could be measured.
    cfg : dict
        The telescope's ``subtract`` block; its ``sfft`` block holds ``kernel_half_width`` (px,
        null: twice the broader FWHM, within 2-20), ``kernel_poly_order`` and ``bg_poly_order``
        (polynomial degrees, 0-3, of the kernel's and the differential background's variation
        over a tile), ``tile`` (px, side of the square tiles; smaller frames are one tile),
        ``overlap`` (px, common margin of neighbouring tiles), ``astrometric_noise`` (bool: ZOGY's
        astrometric-noise variance in VAR and the score), ``moved_star_sigma`` (or None),
        ``moved_star_floor`` (px) and ``moved_star_offset`` (px, or None: alignment stars off the
        others' median offset by more than ``moved_star_sigma`` sigma, or by more than
        ``moved_star_offset`` px, are left out of the kernel fit; see
        :func:`astrometric_outliers`), ``kernel_error`` (bool: the variance
        the kernel's errors leave, measured at the stars by :func:`kernel_error`, in VAR and the
        score) and ``convolve`` ('auto', 'sci' or 'ref': the image convolved, 'auto' by
        :func:`convolution_sides`).
    threads : int, optional
        Threads of sfft's numpy backend and of numba.

    Returns
    -------
    rbflow.difference.Difference
        D in science flux units, decorrelated per tile (white noise); its variance
        ``var_o + K0² var_c`` (background plus source Poisson noise, K0 the flux scaling of the
        fitted kernel at the tile centre), plus the astrometric noise and the kernel error when
        asked (absolute variances: divided by the measured-over-predicted noise ratio that the
        empty-sky normalisation multiplies back); the raw score map; the PSF of D at the centre
        of each tile's core (decorrelation kernel * PSF of the unconvolved image) and the header
        cards.

    Raises
    ------
    ConfigError
        sfft is not installed, or the overlap is not less than half the tile.
    """
    cp, set_threads = require_sfft()
    scfg = {**DEFAULTS, **(cfg.get("sfft") or {})}
    tile, overlap = int(scfg["tile"]), int(scfg["overlap"])
    if 2 * overlap >= tile:
        raise ConfigError(f"subtract.sfft: overlap ({overlap} px) must be less than half the tile ({tile} px)")
    kerhw = _kernel_half_width(scfg, pp.fwhm_s, pp.fwhm_r)
    kpo, bpo = int(scfg["kernel_poly_order"]), int(scfg["bg_poly_order"])
    ny, nx = pp.N.shape
    astro = bool(scfg["astrometric_noise"])
    moved_px, moved_z = scfg["moved_star_offset"], scfg["moved_star_sigma"]
    outlier, motion, sx, sy = astrometric_outliers(
        pp,
        nsigma=None if moved_z is None else float(moved_z),
        floor=float(scfg["moved_star_floor"]),
        offset=None if moved_px is None else float(moved_px),
    )
    if not astro:
        sx = sy = 0.0
    moved_x, moved_y = pp.ainfo["stars"]["x"][outlier], pp.ainfo["stars"]["y"][outlier]
    ban = _discs((ny, nx), moved_x, moved_y, _BAN_RADIUS * max(pp.fwhm_s, pp.fwhm_r))
    # K * R (or K * N) within a kernel half width of a saturated (masked, 0) core lacks that core's
    # light: those pixels would bend the kernel towards a ring, so they are left out of its fit
    ban |= grow_disc(pp.mask & MASK_BITS["SATURATED"] != 0, kerhw) & ~pp.bad
    for x, y, (mx, my) in zip(moved_x, moved_y, motion[outlier]):
        log.info(
            "sfft: star at (%.1f, %.1f) moved by (%.3f, %.3f) px relative to the field; left out of the kernel fit",
            x,
            y,
            mx,
            my,
        )
    kerr = bool(scfg["kernel_error"])
    star_radius = _KERR_RADIUS * max(pp.fwhm_s, pp.fwhm_r)  # the stars' pixels: widths, chi2, kernel error
    width, width_err, n_width = relative_width(pp, radius=star_radius)
    if scfg["convolve"] != "auto":  # set by the telescope file (one sfft run)
        sides = (str(scfg["convolve"]).upper(),)
        why = f"subtract.sfft.convolve {scfg['convolve']}; sig2 R-S {width:+.3f} px2"
    elif n_width:
        sides = convolution_sides(
            width, width_err, nsigma=_DIR_SIGMA, floor=_PIXEL_VAR, noise_sci=pp.sn, noise_ref=pp.sr / pp.fr
        )
        why = f"sig2 R-S {width:+.3f}+-{width_err:.3f} px2"
    else:  # no star to measure: the PSF models' order
        sides = ("REF" if pp.fwhm_r <= pp.fwhm_s else "SCI",)
        why = "no star widths: PSF model FWHMs"
    passes = {}
    for side in sides:
        passes[side] = _tiled_difference(
            cp,
            set_threads,
            pp,
            psf_sci,
            psf_ref,
            conv_side=side,
            kerhw=kerhw,
            kpo=kpo,
            bpo=bpo,
            tile=tile,
            overlap=overlap,
            ban=ban,
            threads=threads,
            with_source=astro or kerr,
        )
    if len(sides) == 1:
        conv_side = sides[0]
    else:  # the direction whose difference leaves the smaller residuals at the stars it was fitted on
        keep_xy = (pp.ainfo["stars"]["x"][~outlier], pp.ainfo["stars"]["y"][~outlier])
        chi2 = {side: star_chi2(p.D, p.V, *keep_xy, bad=pp.bad, radius=star_radius) for side, p in passes.items()}
        conv_side = min(sides, key=lambda side: chi2[side])
        why = f"{why}; chi2 R {chi2['REF']:.2g} S {chi2['SCI']:.2g}"
    log.info("sfft: convolved %s (%s)", conv_side, why)
    best = passes[conv_side]
    D, V, M, psfs, boxes, centres, k0s = best.D, best.V, best.M, best.psfs, best.boxes, best.centres, best.k0s
    # the extra variances (astrometric noise, kernel error) are absolute: VAR and the score's
    # variance get them divided by the measured/predicted noise ratio that the empty-sky
    # normalisation (rbflow.subtract) multiplies back
    ok = ~pp.bad & (V > 0)
    extra = np.zeros((ny, nx))
    if astro:  # ZOGY's astrometric noise (Zackay et al. 2016, sec. 3.3) of D itself
        extra += astrometric_variance(M, sx, sy) + astrometric_variance(M - D, sx, sy)
    C, scatter, n_kerr = None, np.zeros(_N_MOMENTS), 0
    if kerr:
        C = common_flux(D, M, conv_side)
        keep = ~outlier
        scatter, moments, _ = kernel_error(
            D,
            V,
            C,
            pp.ainfo["stars"]["x"][keep],
            pp.ainfo["stars"]["y"][keep],
            bad=pp.bad,
            radius=star_radius,
        )
        n_kerr = int(np.all(np.isfinite(moments), axis=1).sum())
        for x, y, m in zip(pp.ainfo["stars"]["x"][keep], pp.ainfo["stars"]["y"][keep], moments):
            log.debug("sfft: kernel error at the star at (%.1f, %.1f): %s", x, y, np.array2string(m, precision=4))
        if astro:  # the astrometric term already holds sx, sy of the shifts
            scatter[1] = math.sqrt(max(scatter[1] ** 2 - sx**2, 0.0))
            scatter[2] = math.sqrt(max(scatter[2] ** 2 - sy**2, 0.0))
        log.info(
            "sfft: kernel error from %d stars: flux %.4f, shift %.3f %.3f px, size %.3f px², ellipticity %.3f %.3f px²",
            n_kerr,
            *scatter,
        )
        extra += kernel_error_variance(C, scatter)
    S, VS, XS = _score(D, V, M if astro else None, psfs, boxes, sx=sx, sy=sy, C=C, scatter=scatter)
    if astro or kerr:
        VS = VS + XS / _noise_scale(S, VS, ok)
        V = (V + extra / _noise_scale(D, V, ok)).astype(np.float32)
    SC = (S / np.sqrt(np.maximum(VS, np.finfo(np.float32).tiny))).astype(np.float32)
    cards = [
        ("METHOD", "sfft", "Hu et al. 2022, sfft Customized_Packet"),
        ("NTILES", len(centres), "sfft tiles, each with its own kernel fit"),
        ("TILE", tile, "[pix] sfft tile size (subtract.sfft.tile)"),
        ("OVERLAP", overlap, "[pix] sfft tile overlap"),
        ("KERHW", kerhw, "[pix] sfft kernel half width"),
        ("KERORDER", kpo, "sfft kernel polynomial degree"),
        ("BGORDER", bpo, "sfft background polynomial degree"),
        ("CONVD", conv_side, "image convolved by sfft (CONVWHY)"),
        ("CONVWHY", why, "why CONVD"),
        ("CONVDW", width, "[pix2] mean star sigma2, REF - SCI (aligned)"),
        ("CONVDWE", width_err, "[pix2] its error"),
        ("CONVDWN", n_width, "stars measured in both (Gaussian fits)"),
        ("CONVNRAT", pp.sr / pp.fr / pp.sn, "bkg noise REF / SCI, same flux units"),
        ("KERSUM", float(np.median(k0s)), "sfft kernel flux scaling (median of tiles)"),
        ("DECORR", True, "DIFF noise decorrelated (sfft DeCorrelation)"),
        ("DCSIZE", best.dc_size, "[pix] decorrelation kernel size"),
        ("NMOVERS", int(outlier.sum()), "alignment stars that moved, not in kernel fit"),
        ("ASTNOISE", astro, "VAR, SCORR incl. ZOGY astrometric noise"),
        ("ASTSIGX", sx, "[pix] its sigma_x, stars that did not move"),
        ("ASTSIGY", sy, "[pix] its sigma_y"),
        ("KERNERR", kerr, "VAR, SCORR incl. kernel-error variance"),
        ("KERRNSTR", n_kerr, "stars it was measured on (moment fits)"),
        ("KERRFLX", scatter[0], "its rms flux fraction over the stars"),
        ("KERRSHX", scatter[1], "[pix] its rms x shift beyond ASTSIGX"),
        ("KERRSHY", scatter[2], "[pix] its rms y shift beyond ASTSIGY"),
        ("KERRSIZ", scatter[3], "[pix2] its rms size (2nd moment)"),
        ("KERRE1", scatter[4], "[pix2] its rms ellipticity, x-y"),
        ("KERRE2", scatter[5], "[pix2] its rms ellipticity, xy"),
    ]
    return Difference(D, V, SC, [p.astype(np.float32) for p in psfs], centres, cards)
