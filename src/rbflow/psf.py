"""Spatially varying PSF models built from the stars of a frame.

Method
------
1. The sky is estimated with :func:`rbflow.background.background` (the estimator every stage
   uses) and sources are found with :func:`rbflow.stars.find_stars` (the star finder of every
   stage), at 5 sigma, isolated or not: its sharpness and roundness cuts reject cosmic rays,
   hot pixels and trails. When the FWHM measured on them (:func:`rbflow.stars.estimate_fwhm`)
   differs from the guess by more than 20 %, they are found again with the measured one.
2. PSF stars are the isolated (no source within 3 FWHM, no source brighter than 2 % of the
   star within the stamp), round, unsaturated (no saturated pixel, core below 80 % of
   saturation) sources with S/N >= ``snr_min`` whose stamp lies inside the frame and holds no
   NaN pixel. Each stamp gets a local sky (median of its corners: box backgrounds are biased
   high by star wings, which would make the ePSF too sharp); faint neighbours are masked.
   Centres are Gaussian-windowed centroids (:func:`rbflow.stars.windowed_centroids`, unbiased
   for symmetric profiles). Galaxies and blends that pass these cuts are then dropped by their
   concentration (:func:`_concentration`: the flux a pixel-integrated Gaussian of the FWHM fits
   at the star's centre over the light within 2.5 FWHM, nearly independent of the sub-pixel
   phase): the stars of a frame form the tightest cluster of concentrations at the top of the
   range, the *stellar locus* (PSFEx selects within ``SAMPLE_VARIABILITY`` of the mode of its
   candidates' FWHM alike), and a candidate more than 12 % below it by more than 3 times its
   own uncertainty is not a star (6 or more candidates; fewer are left to the profile fit's own
   test). On the demo's sparse field (a tenth of the stars) 46 of the reference's 70 candidates
   were galaxies, which the solve's own test below (each star against a model they dominate)
   did not catch: the model's peak was half the truth's, 14-42 % of the peak off; 1.7-2.8 %
   without them. On dense 512^2 demo frames it drops 1-5 of 80-110 (blends of two stars, galaxies),
   and the models stay as close to the truth as before (largest error of 5 positions on 8
   dense 512^2 frames: 2.4-4.4 % either way).
3. The *effective PSF* (ePSF, Anderson & King 2000) is the pixel-integrated PSF sampled on a
   grid ``oversampling`` times finer than the pixels. As in PSFEx, every node is a polynomial
   in (x, y) across the frame (degree 2 for a grid of 3 or more cells along an axis, 1 for 2,
   lowered when there are fewer than ``min_stars`` stars per term), fitted jointly to all the
   stars (at most ``max_stars`` per cell, brightest first): the linear least-squares solution
   that, resampled with a cubic-convolution kernel at every star's sub-pixel position and
   scaled by its flux, best matches the star pixels (inverse-variance weights, a weak
   curvature penalty). Only the nodes within 2.5 FWHM of the centre vary with position (the
   wings do not measurably), which keeps the sparse normal equations small enough for a
   direct solve (~1 s for 100 stars). Between the four solves, each star's flux and position
   are refitted on the model (windowed centroids are biased for undersampled stars), pixels
   beyond 5 sigma are clipped afresh, outlier stars are rejected (a chi^2 far above the
   others, or significantly more flux in the wings than in the core: galaxies), and each star
   moves to where its model's light centroid lies (the first moment within the varying nodes'
   radius), so that the next solve centres the ePSF on its light: a star's position is its
   light's centroid, as the renderer and the injector take it. Each stored cell
   ePSF is finally resampled onto that centre (the fit leaves a few hundredths of a pixel).
   Without this an asymmetric PSF kept the windowed centroids' offset towards its peak:
   measured with a coma of 6.7 % (``tests/test_psf.py``, 28-30 stars), 5.7-8.7 % of the peak
   and 0.05-0.10 px off the truth, against 3.1-3.3 % and <= 0.03 px centred.

   A constant ePSF solved from fewer than ``prior_below`` (default 11) stars also leans on a prior:
   an analytic profile fitted to those stars (:func:`_profile_pixels`: an elliptical Moffat
   core with its third-order Gauss-Hermite asymmetry, coma and trefoil, plus a round Moffat halo
   at least twice as broad; each star with its own flux and position; a star the fit finds
   extended is dropped and the profile fitted again), weighing as ``_PRIOR_STARS`` (20) stars.
   A handful of mostly faint, undersampled stars leaves the free-form ePSF unconstrained, its
   wings least, and wrong wings make a wrong core and centre (a unit native sum). Measured on
   tests/data/telescopes/realpsf.yaml (4-17 PSF stars per frame; halo, coma 0.09-0.11 pointing
   one way, 1.5-2 px cores; the 8 frames of seeds 3, 5, 7 and 11), as the largest pixel error
   against the truth at 3 positions: free-form 6.3-38 % of the peak (seed 7); with a
   point-symmetric prior (no asymmetry terms) the frames' median 7.6-8.1 % per seed, largest
   10.0-11.0 %, and 26.6 % where a compact galaxy was one of 4 stars (seed 5); with this prior
   3.0-3.6 % and 4.6-6.0 %, and 2.7-3.3 % and 4.8-5.7 % when the stars also get back the wing
   light their local sky (the stamp corners) took, as the fitted profile estimates it (the
   models' excess of light within 4 px of the centre, 1.6 % on average, falls to 1.2 %). The
   first moment stays within 0.15 px but on one 5-star frame
   (0.37 px: noise in the wings the 5 stars reach, which the prior does not outweigh). The
   third-order terms are generic (the aberrations of lowest order that break the point
   symmetry), not the renderer's coma (a displaced copy of the core); what the 5 % per-pixel
   target still misses is mostly the core's width (the constant model fitted to faint stars,
   the halo below their noise), not the asymmetry. How many stars the free ePSF needs to beat
   the analytic fit depends on the PSF: on rendered few-star frames of that telescope's PSF
   (coma changing across the frame) it did not at 40 stars, on a constant PSF with 12 % coma
   it did at 4 (both with the point-symmetric prior). The default of 11 is the fewest stars a
   constant ePSF of the starter model's test frames is solved from, so that frames with more
   stars, the starter's and the demo's, are as before bit for bit; a telescope of few-star
   frames may raise it (realpsf sets 20).

   The halo is what a few faint stars show least, and a halo missed puts its light into the
   unit-sum model's core: on the realpsf frames the fitted halo held 0-5 % of the light on the
   worst frames (the truth 20 %; the stamps' corner sky also takes part of it), and a prior
   fitted to the noise-free truth at the same stars brought those frames from 5.1-6.0 % to
   1.9-3.0 %. So a telescope may hold the prior's halo at ``psf.halo`` (fraction of the light,
   FWHM over the core's), measured once from many of its frames by :func:`measure_halo`
   (``rbflow psf-halo``): realpsf's, measured on seeds 1 and 2, puts the frames of seeds 3, 5,
   7 and 11 at 4.2-5.5 % at worst per seed (median of the frames' largest 3.0 %), against
   4.8-6.0 % (3.2 %) fitted per frame.
4. The polynomial is evaluated at the centre of each ``psf.grid`` cell: the stored model is one
   ePSF per cell. A cell with fewer than ``min_stars`` own stars but enough in its 3 x 3
   neighbourhood is marked ``neighbours``; with too few there too it takes the frame-wide
   (degree 0) ePSF (``frame``); a frame with fewer than ``min_stars`` stars gets, in every
   cell, a Moffat fitted to the stars it has (``moffat``). Every fallback is logged and
   recorded per cell. A frame without any usable star raises, unless ``analytic_fallback``
   (``analytic``: a Moffat of ``fallback_fwhm``).
5. :meth:`PSFModel.stamp` interpolates the cell ePSFs in the cell centres: quadratically
   (Lagrange, three cells per axis) for 3 or more cells along an axis, which reproduces the
   degree-2 polynomial exactly, linearly for 2; extrapolated in the outer half cells.

FWHM values are those of the pixel-integrated PSF (what a star on the frame shows), measured
as the diameter of the circle with the area above half maximum.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from astropy.io import fits

from rbflow.background import background
from rbflow.errors import InputError
from rbflow.frames import FrameInfo, frame_hdu, pixel_scale_of
from rbflow.io import Image, read_image, write_figure, write_fits
from rbflow.stars import FWHM_TO_SIGMA, estimate_fwhm, find_stars, windowed_centroids

if TYPE_CHECKING:
    from collections.abc import Sequence

    import scipy.sparse as sp
    from astropy.table import Table

__all__ = [
    "PSFModel",
    "PSFStars",
    "build_psf",
    "run_psf",
    "measure_halo",
    "moffat_epsf",
    "select_psf_stars",
    "FALLBACKS",
]

log = logging.getLogger(__name__)

#: How a cell's ePSF was obtained, from best to worst.
FALLBACKS = ("cell", "neighbours", "frame", "moffat", "analytic")

_KIND = "rbflow.psf"  # value of the RBKIND card that marks a PSF model file
_FORMAT = 1
_MARGIN = 2  # oversampled nodes beyond the stamp half-size (room for sub-pixel shifts)
_MOFFAT_BETA = 2.5  # Moffat index of the analytic fallback (typical seeing-limited wings)
_FIT_ITERATIONS = 4  # solves; between them: refit positions and fluxes, clip pixels and stars
_RECENTRE_STEP = 0.05  # finite-difference step (px) of the position refit
_MAX_EXTENDED = 0.02  # wing-to-core flux excess above which a significantly extended source is rejected
_CLIP_SIGMA = 5.0  # pixel clipping threshold (sigma)
_N_TERMS = (1, 3, 6)  # polynomial terms of degree 0, 1, 2 in (x, y)
_SMOOTHING = 3e-4  # curvature penalty relative to the mean data weight per node
_VAR_RADIUS = 2.5  # radius (FWHM) of the ePSF nodes that vary with position
_HALO_BETA = 2.0  # Moffat index of the prior's halo (wings ~ r^-4, a seeing aureole's)
# Weight of the analytic prior, in stars of average weight (see _solve_epsf). Measured on the 8
# realpsf frames (the version with coma growing from the frame's centre), all with the prior:
# largest pixel error 3.0-15.5 % (median 7.1 %) at 5 stars,
# 2.6-13.6 % (6.8 %) at 10, 2.5-12.1 % (6.7 %) at 20. With the asymmetry terms, on the off-axis
# frame (seeds 3, 5, 7, 11; largest error per seed, median of the frames in brackets): 4.6-6.0 %
# (3.0-3.6 %) at 20, 4.5-7.5 % (2.8-3.6 %) at 60, 4.4-8.4 % (2.8-3.7 %) from the profile alone.
_PRIOR_STARS = 20.0
_LOCUS_TOLERANCE = 0.12  # largest relative distance of a PSF star's concentration from the locus
_COLD_SIGMA = 5.0  # a star's pixel this many sky sigma below the sky is a defect
_LOCUS_MIN = 6  # fewest PSF stars whose concentrations show a locus (fewer: the profile fit tests each)


# --------------------------------------------------------------------------------------------
# Resampling of an oversampled grid
# --------------------------------------------------------------------------------------------


def _keys_weights(t: np.ndarray) -> np.ndarray:
    """Cubic-convolution (Keys, a = -0.5) weights of the 4 nodes around fractional positions ``t``.

    Returns an array of shape ``t.shape + (4,)`` for nodes ``floor - 1 .. floor + 2``.
    """
    a = -0.5
    d = t[..., None] - np.arange(-1, 3)
    s = np.abs(d)
    near = ((a + 2) * s - (a + 3)) * s * s + 1
    far = ((a * s - 5 * a) * s + 8 * a) * s - 4 * a
    return np.where(s <= 1, near, np.where(s < 2, far, 0.0))


def _resample_matrix(offsets: np.ndarray, n_nodes: int, oversampling: int) -> np.ndarray:
    """Dense matrix mapping oversampled nodes to samples at native offsets ``offsets`` (pixels).

    Node ``k`` sits at offset ``(k - (n_nodes - 1) / 2) / oversampling`` from the PSF centre.
    Nodes outside the grid count as zero.
    """
    q = offsets * oversampling + (n_nodes - 1) / 2
    base = np.floor(q).astype(int) - 1
    w = _keys_weights(q - base - 1)
    mat = np.zeros((offsets.size, n_nodes))
    for j in range(4):
        idx = base + j
        ok = (idx >= 0) & (idx < n_nodes)
        np.add.at(mat, (np.nonzero(ok)[0], idx[ok]), w[ok, j])
    return mat


def _sample(epsf: np.ndarray, dx: float, dy: float, size: int, oversampling: int) -> np.ndarray:
    """Native-pixel stamp of ``size`` px whose profile centre is at (centre + dx, centre + dy)."""
    half = size // 2
    pix = np.arange(-half, half + 1, dtype=float)
    wx = _resample_matrix(pix - dx, epsf.shape[1], oversampling)
    wy = _resample_matrix(pix - dy, epsf.shape[0], oversampling)
    return wy @ epsf @ wx.T


def _fwhm_of(epsf: np.ndarray, oversampling: int) -> float:
    """FWHM (pixels) of an ePSF: diameter of the circle with the area above half maximum."""
    step = 1.0 / 8.0
    centre = (epsf.shape[0] - 1) / 2
    # The half-maximum area lies within the nodes above a quarter of the peak (+ 1 px margin):
    # sampling only there makes this ~20 times faster than sampling the whole stamp.
    # The profile peaks within 2 px of the centre (noise in the outer nodes must not count).
    k, r = int(centre), 2 * oversampling
    peak = epsf[k - r : k + r + 1, k - r : k + r + 1].max()
    rows, cols = np.nonzero(epsf >= peak / 4)
    reach = max(np.abs(rows - centre).max(), np.abs(cols - centre).max()) / oversampling + 1.0
    half_extent = min(np.ceil(reach / step) * step, centre / oversampling)
    pos = np.arange(-half_extent, half_extent + step / 2, step)
    wx = _resample_matrix(pos, epsf.shape[1], oversampling)
    wy = _resample_matrix(pos, epsf.shape[0], oversampling)
    fine = wy @ epsf @ wx.T
    area = np.count_nonzero(fine >= peak / 2) * step * step
    return float(2 * np.sqrt(area / np.pi))


def _centred(epsf: np.ndarray, oversampling: int, radius: float) -> np.ndarray:
    """The ePSF resampled (cubic convolution) so that its first moment within ``radius`` px lies on the centre.

    A star's position is its light's centroid (the renderer's, the injector's, a catalogue's):
    a PSF model whose centroid is off puts every injected source off its catalogue position and,
    for a PSF asymmetric in one image only, every subtracted star off by the difference. The fit
    (:func:`_solve_epsf`) converges to within a few hundredths of a pixel; this removes the rest.
    """
    n = epsf.shape[0]
    centre = (n - 1) / 2
    off = (np.arange(n) - centre) / oversampling
    ap = np.hypot(off[None, :], off[:, None]) <= radius
    total = (epsf * ap).sum()
    if not total > 0:
        return epsf
    mx = (epsf * ap * off[None, :]).sum() / total
    my = (epsf * ap * off[:, None]).sum() / total
    wx = _resample_matrix(off + mx, n, oversampling)
    wy = _resample_matrix(off + my, n, oversampling)
    return wy @ epsf @ wx.T


def _native_sum(epsf: np.ndarray, oversampling: int) -> float:
    """Sum of the centred native-pixel stamp of an ePSF (the nodes at integer offsets)."""
    first = ((epsf.shape[0] - 1) // 2) % oversampling
    return float(epsf[first::oversampling, first::oversampling].sum())


def _unit_native_sum(epsf: np.ndarray, oversampling: int) -> np.ndarray:
    """Scale an ePSF so that its centred native-pixel stamp sums to 1."""
    return epsf / _native_sum(epsf, oversampling)


# --------------------------------------------------------------------------------------------
# Analytic Moffat
# --------------------------------------------------------------------------------------------


def _moffat_pixels(dx: np.ndarray, dy: np.ndarray, fwhm: float, beta: float, *, sub: int = 5) -> np.ndarray:
    """Unit-flux circular Moffat integrated over native pixels centred at offsets (dx, dy)."""
    alpha = fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1))
    s = (np.arange(sub) + 0.5) / sub - 0.5
    ux = dx[..., None, None] + s[None, :]
    uy = dy[..., None, None] + s[:, None]
    r2 = (ux * ux + uy * uy) / alpha**2
    prof = (beta - 1) / (np.pi * alpha**2) * (1 + r2) ** (-beta)
    return prof.mean(axis=(-1, -2))


def moffat_epsf(fwhm: float, *, size: int, oversampling: int, beta: float = _MOFFAT_BETA) -> np.ndarray:
    """Oversampled ePSF of a circular Moffat profile, normalised to a unit native-pixel sum.

    Parameters
    ----------
    fwhm : float
        FWHM of the Moffat profile before pixel integration (pixels).
    size : int
        Native stamp size (pixels, odd).
    oversampling : int
        Nodes per native pixel.
    beta : float, optional
        Moffat index.

    Returns
    -------
    numpy.ndarray
        Square array of ``oversampling * (size - 1) + 1 + 2 * margin`` nodes.
    """
    n = oversampling * (size - 1) + 1 + 2 * _MARGIN
    off = (np.arange(n) - (n - 1) / 2) / oversampling
    epsf = _moffat_pixels(off[None, :] + 0 * off[:, None], off[:, None] + 0 * off[None, :], fwhm, beta)
    return _unit_native_sum(epsf, oversampling)


def _profile_pixels(dx: np.ndarray, dy: np.ndarray, params: np.ndarray, *, sub: int = 5) -> np.ndarray:
    """Unit-flux core-plus-halo profile integrated over native pixels centred at offsets (dx, dy).

    ``params`` = (FWHM px, beta, g1, g2, halo fraction, halo FWHM / core FWHM, a30, a21, a12,
    a03): an elliptical Moffat core (shape ``g1``, ``g2``: axis ratio
    ``sqrt((1 - |g|) / (1 + |g|))``, the FWHM the geometric mean of the axes) plus a round Moffat
    halo of index ``_HALO_BETA``, plus the core's third-order asymmetry: the four Gauss-Hermite
    functions ``a_jk He_j(u) He_k(v) exp(-(u^2 + v^2) / 2) / (2 pi s^2)`` of order j + k = 3
    (``u = dx / s``, ``v = dy / s``, ``s`` the core FWHM / 2.3548), which span coma and trefoil,
    the lowest-order aberrations that break the point symmetry. Each has zero flux and zero
    first moment (``He_3`` and ``He_2 He_1`` are orthogonal to 1 and to ``He_1`` under that
    weight), so the profile keeps unit flux and its centroid on the source.
    """
    fwhm, beta, g1, g2, frac, ratio = (float(v) for v in params[:6])
    a30, a21, a12, a03 = (float(v) for v in params[6:10])
    s = (np.arange(sub) + 0.5) / sub - 0.5
    ux = dx[..., None, None] + s[None, :]
    uy = dy[..., None, None] + s[:, None]
    alpha = fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1))
    det = np.sqrt(max(1 - g1 * g1 - g2 * g2, 1e-6))
    r2 = ((1 - g1) * ux * ux - 2 * g2 * ux * uy + (1 + g1) * uy * uy) / (det * alpha**2)
    core = (beta - 1) / (np.pi * alpha**2) * (1 + r2) ** (-beta)
    sg = fwhm / (2 * np.sqrt(2 * np.log(2)))
    u, v = ux / sg, uy / sg
    h1u, h1v, h2u, h2v = u, v, u * u - 1, v * v - 1
    odd = a30 * (u * u * u - 3 * u) + a21 * h2u * h1v + a12 * h1u * h2v + a03 * (v * v * v - 3 * v)
    core = core + odd * np.exp(-(u * u + v * v) / 2) / (2 * np.pi * sg * sg)
    ah = ratio * fwhm / (2 * np.sqrt(2 ** (1 / _HALO_BETA) - 1))
    halo = (_HALO_BETA - 1) / (np.pi * ah**2) * (1 + (ux * ux + uy * uy) / ah**2) ** (-_HALO_BETA)
    return ((1 - frac) * core + frac * halo).mean(axis=(-1, -2))


def _profile_epsf(params: np.ndarray, *, size: int, oversampling: int) -> np.ndarray:
    """Oversampled ePSF of :func:`_profile_pixels` with ``params``, unit native-pixel sum."""
    n = oversampling * (size - 1) + 1 + 2 * _MARGIN
    off = (np.arange(n) - (n - 1) / 2) / oversampling
    epsf = _profile_pixels(off[None, :] + 0 * off[:, None], off[:, None] + 0 * off[None, :], params)
    return _unit_native_sum(epsf, oversampling)


def _corners(size: int) -> np.ndarray:
    """``(size, size)`` bool: the stamp's corners beyond its inscribed circle (r > size // 2 + 0.5
    px), where :func:`select_psf_stars` measures each star's local sky."""
    g = np.arange(size) - size // 2
    return g[None, :] ** 2 + g[:, None] ** 2 >= (size // 2 + 0.5) ** 2


def _corner_levels(stamps: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``(n_stars,)`` median of each stamp ``(n_stars, s, s)`` over its used corner pixels
    (:func:`_corners`, ``weights`` > 0; 0 where none is used): a star's local sky, or, on a
    unit-flux model of it, the share of its own wings that local sky took."""
    where = _corners(stamps.shape[-1])[None] & (weights > 0)
    return np.array([np.median(p[w]) if w.any() else 0.0 for p, w in zip(stamps, where)])


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class PSFModel:
    """A PSF that varies across a frame: one oversampled ePSF per grid cell, interpolated between cells.

    Parameters
    ----------
    cube : numpy.ndarray
        ePSFs, shape ``(ny_grid * nx_grid, n, n)``, cell index ``iy * nx_grid + ix``; node
        ``k`` is at offset ``(k - (n - 1) / 2) / oversampling`` pixels from the PSF centre.
    oversampling : int
        Nodes per native pixel.
    size : int
        Native stamp size the model was built for (pixels, odd).
    shape : tuple of int
        Frame shape ``(ny, nx)``.
    grid : tuple of int
        ``(nx_grid, ny_grid)``: cells along x and y (equal slices of the frame).
    n_stars : sequence of int
        PSF stars in each cell's own area (``cell`` and ``neighbours``: the local constraint of
        the frame-wide polynomial, a ``neighbours`` cell having fewer than ``psf.min_stars``), or
        that made a ``frame`` or ``moffat`` cell's ePSF (the frame's).
    sources : sequence of str
        How each cell's ePSF was obtained (one of :data:`FALLBACKS`).
    name : str, optional
        Frame the model belongs to (for messages and the file header).
    """

    def __init__(
        self,
        cube: np.ndarray,
        *,
        oversampling: int,
        size: int,
        shape: tuple[int, int],
        grid: tuple[int, int],
        n_stars: list[int] | np.ndarray,
        sources: list[str],
        name: str = "",
    ):
        self.cube = np.asarray(cube, dtype=float)
        self.oversampling = int(oversampling)
        self.size = int(size)
        self.shape = (int(shape[0]), int(shape[1]))
        self.grid = (int(grid[0]), int(grid[1]))
        self.n_stars = np.asarray(n_stars, dtype=int)
        self.sources = [str(s) for s in sources]
        self.name = name
        n_cells = self.grid[0] * self.grid[1]
        if self.cube.shape[0] != n_cells or len(self.sources) != n_cells or self.n_stars.size != n_cells:
            raise ValueError(f"PSF model of '{name}': cube, n_stars and sources must have one entry per cell")
        self.cell_fwhm = np.array([_fwhm_of(c, self.oversampling) for c in self.cube])

    @property
    def cell_centres(self) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates of the cell centres along x and along y."""
        gx, gy = self.grid
        ny, nx = self.shape
        return (np.arange(gx) + 0.5) * nx / gx - 0.5, (np.arange(gy) + 0.5) * ny / gy - 0.5

    @staticmethod
    def _axis_weights(pos: float, n_grid: int, length: int) -> list[tuple[int, float]]:
        """Cells and weights interpolating along one axis at pixel position ``pos``.

        Linear between the two nearest cell centres for 2 cells; quadratic (Lagrange) through the
        three nearest for 3 or more, which reproduces the degree-2 polynomial the cell ePSFs are
        sampled from (bilinear interpolation would not, and its extrapolation in the outer half
        cells underestimates a PSF that widens towards the corners). Positions beyond the outer
        cell centres are extrapolated up to the frame edge.
        """
        if n_grid == 1:
            return [(0, 1.0)]
        t = float(np.clip((pos + 0.5) * n_grid / length - 0.5, -0.5, n_grid - 0.5))
        if n_grid == 2:
            return [(0, 1.0 - t), (1, t)]
        i = int(np.clip(np.round(t), 1, n_grid - 2))
        u = t - i
        return [(i - 1, 0.5 * u * (u - 1)), (i, 1.0 - u * u), (i + 1, 0.5 * u * (u + 1))]

    def _cell_weights(self, x: float, y: float) -> list[tuple[int, float]]:
        """Cube indices and weights of the cell ePSFs that make the PSF at (x, y)."""
        gx, gy = self.grid
        wx = self._axis_weights(x, gx, self.shape[1])
        wy = self._axis_weights(y, gy, self.shape[0])
        return [(jy * gx + jx, ay * ax) for jy, ay in wy for jx, ax in wx if ay * ax != 0]

    def epsf_at(self, x: float, y: float) -> np.ndarray:
        """Oversampled ePSF at frame position (x, y), interpolated in the cell centres.

        Parameters
        ----------
        x, y : float
            0-based pixel position (column, row).

        Returns
        -------
        numpy.ndarray
            Oversampled ePSF (same layout as one slice of ``cube``).
        """
        out = np.zeros_like(self.cube[0])
        for c, w in self._cell_weights(x, y):
            out += w * self.cube[c]
        return out

    def stamp(self, x: float, y: float, size: int, *, centred: bool = False) -> np.ndarray:
        """The PSF at frame position (x, y) on native pixels, normalised to unit sum.

        Parameters
        ----------
        x, y : float
            0-based pixel position (column, row) where the PSF is evaluated.
        size : int
            Stamp size (pixels, odd).
        centred : bool, optional
            If False, the profile centre is at the stamp centre plus the sub-pixel offset
            ``(x - round(x), y - round(y))``, so that the stamp adds onto the frame with its
            centre pixel at ``(round(x), round(y))``. If True, exactly at the centre pixel.

        Returns
        -------
        numpy.ndarray
            ``(size, size)`` float array summing to 1.
        """
        if size % 2 != 1 or size < 1:
            raise ValueError(f"PSF stamp size must be odd and positive, got {size}")
        dx, dy = (0.0, 0.0) if centred else (x - np.round(x), y - np.round(y))
        st = _sample(self.epsf_at(x, y), dx, dy, size, self.oversampling)
        return st / st.sum()

    def fwhm(self, x: float, y: float) -> float:
        """FWHM of the pixel-integrated PSF at (x, y) (pixels), measured on :meth:`epsf_at` (~0.2 ms)."""
        return _fwhm_of(self.epsf_at(x, y), self.oversampling)

    def cells_table(self) -> Table:
        """Per-cell summary: grid indices, centre, stars used, FWHM and source."""

        from astropy.table import Table

        gx, gy = self.grid
        xc, yc = self.cell_centres
        iy, ix = np.divmod(np.arange(gx * gy), gx)
        return Table(
            {
                "ix": ix,
                "iy": iy,
                "x_centre": xc[ix],
                "y_centre": yc[iy],
                "n_stars": self.n_stars,
                "fwhm": self.cell_fwhm,
                "source": np.array(self.sources, dtype="U10"),
            }
        )

    def write(self, path: str | os.PathLike) -> None:
        """Write the model as one FITS file (atomically).

        Primary HDU: the ePSF cube with the model geometry in its header; ``CELLS`` binary table:
        per-cell centre, number of stars, FWHM (px) and source (fallback used).

        Parameters
        ----------
        path : path-like
            Destination FITS file.
        """
        hdr = fits.Header()
        hdr["RBKIND"] = (_KIND, "this file is an rbflow PSF model")
        hdr["RBPSFFMT"] = (_FORMAT, "PSF model file format version")
        hdr["FRAME"] = (self.name, "frame the PSF belongs to")
        hdr["PSFOVER"] = (self.oversampling, "ePSF nodes per native pixel")
        hdr["PSFSIZE"] = (self.size, "native stamp size (px)")
        hdr["FRAMENX"] = (self.shape[1], "frame width (px)")
        hdr["FRAMENY"] = (self.shape[0], "frame height (px)")
        hdr["GRIDNX"] = (self.grid[0], "cells along x")
        hdr["GRIDNY"] = (self.grid[1], "cells along y")
        hdr["NSTARS"] = (int(self.n_stars.sum()), "stars summed over cells")
        hdr["FWHMMED"] = (float(np.median(self.cell_fwhm)), "median cell FWHM (px)")
        fallbacks = [s for s in self.sources if s != "cell"]
        hdr["NFALLBK"] = (len(fallbacks), "cells whose ePSF is a fallback")
        for k, src in enumerate(self.sources):
            hdr[f"PSFSRC{k}"] = (src, f"source of cell {k} ePSF (cell=own stars)")
        primary = fits.PrimaryHDU(self.cube.astype(np.float32), header=hdr)
        cells = fits.BinTableHDU(self.cells_table(), name="CELLS")
        for col in (3, 4, 6):  # x_centre, y_centre, fwhm
            cells.header[f"TUNIT{col}"] = "pix"
        write_fits(fits.HDUList([primary, cells]), path)

    @classmethod
    def read(cls, path: str | os.PathLike) -> PSFModel:
        """Read a model written by :meth:`write`.

        Parameters
        ----------
        path : path-like
            PSF model FITS file.

        Returns
        -------
        PSFModel

        Raises
        ------
        InputError
            Missing file, or a FITS file that is not an rbflow PSF model.
        """

        from astropy.table import Table

        path = Path(path)
        if not path.exists():
            raise InputError(f"PSF model '{path}' does not exist: run the psf stage for this frame first")
        try:
            with fits.open(path, memmap=False) as hdul:
                hdr = hdul[0].header
                if hdr.get("RBKIND") != _KIND:
                    raise InputError(
                        f"'{path}' is not an rbflow PSF model (no RBKIND = '{_KIND}' card): give the "
                        "file written by the psf stage (results/{tel}/psf/{frame}.fits), or delete it and rerun"
                    )
                cube = np.asarray(hdul[0].data, dtype=float)
                cells = Table(hdul["CELLS"].data)
                return cls(
                    cube,
                    oversampling=hdr["PSFOVER"],
                    size=hdr["PSFSIZE"],
                    shape=(hdr["FRAMENY"], hdr["FRAMENX"]),
                    grid=(hdr["GRIDNX"], hdr["GRIDNY"]),
                    n_stars=np.asarray(cells["n_stars"]),
                    sources=[str(s).strip() for s in cells["source"]],
                    name=str(hdr.get("FRAME", "")),
                )
        except InputError:
            raise
        except Exception as exc:
            raise InputError(
                f"PSF model '{path}' is unreadable ({type(exc).__name__}: {exc}); delete it and rerun the psf stage"
            ) from exc


# --------------------------------------------------------------------------------------------
# Star selection
# --------------------------------------------------------------------------------------------


@dataclass
class PSFStars:
    """PSF stars of a frame (see :func:`select_psf_stars`): positions, stamps (sky subtracted), weights."""

    x: np.ndarray  # windowed centroid (frame pixels)
    y: np.ndarray
    flux: np.ndarray  # aperture flux (ADU), first guess
    snr: np.ndarray
    stamps: np.ndarray  # (n, size, size), sky subtracted
    weights: np.ndarray  # (n, size, size), 1 = use the pixel, 0 = ignore it (neighbour, clipped)
    x0: np.ndarray  # frame column of stamp centre pixel
    y0: np.ndarray
    sky_var: np.ndarray  # (n, size, size) sky variance (ADU^2)

    def take(self, idx: np.ndarray) -> PSFStars:
        """The stars at indices ``idx``."""
        return PSFStars(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))

    def __len__(self) -> int:
        return self.x.size


def select_psf_stars(
    image: Image, info: FrameInfo, cfg: dict[str, Any], *, fwhm_guess: float, name: str
) -> tuple[PSFStars, float]:
    """Find, vet and cut out the PSF stars of a frame (step 2 of the module's method).

    Parameters
    ----------
    image : rbflow.io.Image
        The frame (NaN = invalid).
    info : rbflow.frames.FrameInfo
        Frame facts (gain, saturation).
    cfg : dict
        The telescope's validated ``psf`` block (``size``, ``snr_min`` are used).
    fwhm_guess : float
        First guess of the FWHM (px); replaced by the measured one when they differ by > 20 %.
    name : str
        Frame name, for messages.

    Returns
    -------
    stars : PSFStars
        The PSF stars, by decreasing S/N (empty when none is usable).
    fwhm : float
        The FWHM (px) the stars were found with.
    """

    from scipy.spatial import cKDTree

    data = image.data.astype(float)
    size = int(cfg["size"])
    half = size // 2
    ny, nx = data.shape
    bad = ~np.isfinite(data) | (data >= info.saturation)
    sky, noise = background(data, bad)
    sigma = noise if noise > 0 else 1.0
    rms = np.full(data.shape, sigma)
    sub = np.where(np.isfinite(data), data - sky, 0.0)

    fwhm = fwhm_guess
    found = find_stars(sub, sigma, bad, fwhm=fwhm, snr_min=5.0, max_stars=data.size, isolated=False)
    if found["x"].size >= 3:
        measured = estimate_fwhm(sub, found["x"], found["y"])
        if measured is not None and abs(measured / fwhm - 1) > 0.2:
            log.info("frame '%s': FWHM guess %.2f px, measured %.2f px; finding stars again", name, fwhm, measured)
            fwhm = measured
            found = find_stars(sub, sigma, bad, fwhm=fwhm, snr_min=5.0, max_stars=data.size, isolated=False)
    empty = PSFStars(*(np.zeros((0,) * k) for k in (1, 1, 1, 1, 3, 3, 1, 1, 3)))
    if found["x"].size == 0:
        return empty, fwhm

    xs, ys, peak = found["x"], found["y"], found["snr"]  # matched-filter S/N: proportional to the flux
    # Aperture S/N within 1.5 FWHM (sky and source Poisson noise).
    r_ap = 1.5 * fwhm
    keep = (xs >= half) & (xs <= nx - 1 - half) & (ys >= half) & (ys <= ny - 1 - half)
    idx_all = np.arange(xs.size)
    tree = cKDTree(np.column_stack([xs, ys]))
    cand = idx_all[keep]
    x0 = np.round(xs[cand]).astype(int)
    y0 = np.round(ys[cand]).astype(int)
    rows = y0[:, None, None] + np.arange(-half, half + 1)[None, :, None]
    cols = x0[:, None, None] + np.arange(-half, half + 1)[None, None, :]
    raw = data[rows, cols]
    stamps = sub[rows, cols]
    var_sky = rms[rows, cols] ** 2
    rr2 = (np.arange(-half, half + 1)[None, :] ** 2 + np.arange(-half, half + 1)[:, None] ** 2).astype(float)
    ap = rr2[None] <= r_ap**2
    flux = (stamps * ap).sum(axis=(1, 2))
    noise = np.sqrt((var_sky * ap).sum(axis=(1, 2)) + np.maximum(flux, 0) / info.gain)
    snr = flux / noise
    good = np.isfinite(raw).all(axis=(1, 2))
    good &= np.nanmax(raw, axis=(1, 2)) < info.saturation  # no saturated pixel in the stamp
    good &= (raw * (rr2[None] <= (2 * fwhm) ** 2)).max(axis=(1, 2)) < 0.8 * info.saturation
    good &= snr >= cfg["snr_min"]
    # Isolation: nothing within 3 FWHM, nothing brighter than 2 % of the star within the stamp.
    isolated = np.ones(cand.size, bool)
    faint_nb: list[list[int]] = []
    for k, j in enumerate(cand):
        nb = [i for i in tree.query_ball_point((xs[j], ys[j]), r=half * np.sqrt(2)) if i != j]
        d = np.hypot(xs[nb] - xs[j], ys[nb] - ys[j])
        if np.any(d < 3 * fwhm) or np.any(peak[nb] > 0.02 * peak[j]):
            isolated[k] = False
        faint_nb.append(nb)
    good &= isolated
    sel = np.nonzero(good)[0]
    if sel.size == 0:
        return empty, fwhm
    weights = np.ones((sel.size, size, size))
    grid_y, grid_x = np.mgrid[-half : half + 1, -half : half + 1]
    for k, s in enumerate(sel):
        for i in faint_nb[s]:
            weights[k][(grid_x + x0[s] - xs[i]) ** 2 + (grid_y + y0[s] - ys[i]) ** 2 <= (1.5 * fwhm) ** 2] = 0.0
    # No pixel of a star lies far below the sky: one that does is a defect (a dead column, a cold
    # pixel), left out of the local sky and the fit; unmasked, a dead column through a bright star's
    # stamp outweighed its light in the first solve (the starter sky's fld08_r_ref: a model 50-80 %
    # of the peak off).
    weights[stamps[sel] < -_COLD_SIGMA * np.sqrt(var_sky[sel])] = 0.0
    # Local sky: median of the stamp corners (r > half + 0.5 px, neighbours masked), where the PSF
    # is < 0.1 % of its peak. Box backgrounds are biased by star wings, which would sharpen the ePSF.
    # The corners still hold some wing light: the few-star path (build_psf) gives it back.
    local = _corner_levels(stamps[sel], weights)
    # centred on the frame with the local sky removed around each star (a constant offset does not
    # move the fixed point of a symmetric window, only slows the iteration: 20 steps leave < 1e-3 px)
    xc, yc = windowed_centroids(sub, x0[sel], y0[sel], fwhm * FWHM_TO_SIGMA, niter=20, sky=local)
    stars = PSFStars(
        x=xc,
        y=yc,
        flux=flux[sel],
        snr=snr[sel],
        stamps=stamps[sel] - local[:, None, None],
        weights=weights,
        x0=x0[sel],
        y0=y0[sel],
        sky_var=var_sky[sel],
    )
    concentration, sigma = _concentration(stars, fwhm, info.gain)
    on_locus = _on_stellar_locus(concentration, sigma)
    log.info(
        "frame '%s': %d PSF stars out of %d detections (FWHM ~ %.2f px); %d below the stellar locus of "
        "concentration %.3f (galaxies, blends)",
        name,
        int(on_locus.sum()),
        xs.size,
        fwhm,
        int((~on_locus).sum()),
        float(np.median(concentration[on_locus])),
    )
    stars = stars.take(np.nonzero(on_locus)[0])
    order = np.argsort(-stars.snr)
    return stars.take(order), fwhm


def _concentration(stars: PSFStars, fwhm: float, gain: float) -> tuple[np.ndarray, np.ndarray]:
    """Each star's concentration and its uncertainty.

    The concentration is the flux a round Gaussian of the frame's FWHM, integrated over the
    pixels at the star's sub-pixel centre, fits to the star (unweighted least squares) over the
    light within 2.5 FWHM (sky subtracted, masked pixels left out): about 1 for a point source,
    less for light spread beyond the core (a galaxy, a blend), nearly independent of where in its
    pixel the star falls (an aperture of pixel centres is not: a 1.7 px core loses 17 % of its
    light from a 1.3 px radius when a third of a pixel off-centre in both axes). Its
    uncertainty follows from the pixel variances (sky and the star's Poisson noise).

    Returns
    -------
    concentration, sigma : numpy.ndarray
        ``(n_stars,)`` each.
    """
    from scipy.special import erf

    half = stars.stamps.shape[1] // 2
    pix = np.arange(-half, half + 1, dtype=float)
    scale = np.sqrt(2.0) * fwhm * FWHM_TO_SIGMA

    def integrated(offset: np.ndarray) -> np.ndarray:
        edges = (pix[None, :] - offset[:, None])[..., None] + np.array([-0.5, 0.5])
        e = erf(edges / scale)
        return 0.5 * (e[..., 1] - e[..., 0])  # (n_stars, size)

    gx, gy = integrated(stars.x - stars.x0), integrated(stars.y - stars.y0)
    template = gy[:, :, None] * gx[:, None, :]
    r = np.hypot(
        pix[None, None, :] - (stars.x - stars.x0)[:, None, None],
        pix[None, :, None] - (stars.y - stars.y0)[:, None, None],
    )
    use = (r < 2.5 * fwhm) & (stars.weights > 0)
    var = stars.sky_var + np.maximum(stars.stamps, 0) / gain
    t2 = (template**2 * use).sum(axis=(1, 2))
    fit = (template * stars.stamps * use).sum(axis=(1, 2)) / t2
    light = np.maximum((stars.stamps * use).sum(axis=(1, 2)), 1e-300)
    var_fit = (template**2 * var * use).sum(axis=(1, 2)) / t2**2
    var_light = (var * use).sum(axis=(1, 2))
    cov = (template * var * use).sum(axis=(1, 2)) / t2
    c = fit / light
    var_c = c**2 * (
        var_fit / np.maximum(fit, 1e-300) ** 2 + var_light / light**2 - 2 * cov / (np.maximum(fit, 1e-300) * light)
    )
    return c, np.sqrt(np.maximum(var_c, 0.0))


def _on_stellar_locus(concentration: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Stars not significantly less concentrated than the stellar locus.

    The stars of a frame share one PSF and form the tightest cluster of concentrations at the
    top of the range: galaxies (a PSF convolved with their light) and blends spread below it.
    PSFEx keeps its candidates within ``SAMPLE_VARIABILITY`` of the mode of their FWHM alike.
    The locus is found as the median of the tightest run of a third of the (sorted)
    concentrations above their median, then as the median of those within ``_LOCUS_TOLERANCE``
    of it: where galaxies outnumber stars, their broad spread below holds no run as tight as
    the stars'. A star is dropped when its concentration is more than ``_LOCUS_TOLERANCE``
    below the locus and by more than 3 times its uncertainty (a faint star's concentration is
    noisy). Above the locus nothing is dropped: a star centred on a pixel concentrates more
    light there than one on a corner, and a PSF that changes across the frame moves its stars'
    concentrations both ways. With fewer than ``_LOCUS_MIN`` stars all are kept.
    """
    n = concentration.size
    if n < _LOCUS_MIN:
        return np.ones(n, bool)
    upper = np.sort(concentration[concentration >= np.median(concentration)])
    k = min(upper.size, max(3, -(-upper.size // 3)))
    start = int(np.argmin(upper[k - 1 :] - upper[: upper.size - k + 1]))
    locus = float(np.median(upper[start : start + k]))
    locus = float(np.median(concentration[np.abs(concentration / locus - 1) <= _LOCUS_TOLERANCE]))
    shortfall = locus * (1 - _LOCUS_TOLERANCE) - concentration
    return ~((shortfall > 0) & (shortfall > 3 * sigma))


# --------------------------------------------------------------------------------------------
# ePSF solve
# --------------------------------------------------------------------------------------------


def _second_differences(n: int) -> sp.csr_matrix:
    """Second differences along both axes of an n x n node grid (rows: differences, columns: nodes)."""

    import scipy.sparse as sp

    d2 = sp.diags([1.0, -2.0, 1.0], [0, 1, 2], shape=(n - 2, n))
    eye = sp.identity(n)
    return sp.vstack([sp.kron(eye, d2), sp.kron(d2, eye)]).tocsr()


def _design(stars: PSFStars, n: int, oversampling: int) -> sp.csr_matrix:
    """Sparse matrix mapping ePSF nodes to every star pixel (cubic convolution at sub-pixel offsets)."""

    import scipy.sparse as sp

    ns, s, _ = stars.stamps.shape
    half = s // 2
    pix = np.arange(-half, half + 1, dtype=float)
    qx = (pix[None, :] - (stars.x - stars.x0)[:, None]) * oversampling + (n - 1) / 2  # (ns, s)
    qy = (pix[None, :] - (stars.y - stars.y0)[:, None]) * oversampling + (n - 1) / 2
    bx = np.floor(qx).astype(int) - 1
    by = np.floor(qy).astype(int) - 1
    wx = _keys_weights(qx - bx - 1)  # (ns, s, 4)
    wy = _keys_weights(qy - by - 1)
    # rows: star k, pixel (r, c); cols: node (by[k, r] + j, bx[k, c] + i)
    ix = bx[:, None, :, None, None] + np.arange(4)[None, None, None, None, :]  # (ns,1,s,1,4)
    iy = by[:, :, None, None, None] + np.arange(4)[None, None, None, :, None]  # (ns,s,1,4,1)
    ix, iy = np.broadcast_arrays(ix, iy)
    w = wy[:, :, None, :, None] * wx[:, None, :, None, :]
    ok = (ix >= 0) & (ix < n) & (iy >= 0) & (iy < n)
    row = np.broadcast_to(np.arange(ns * s * s).reshape(ns, s, s, 1, 1), ok.shape)
    return sp.csr_matrix((w[ok], (row[ok], (iy * n + ix)[ok])), shape=(ns * s * s, n * n))


def _solve_epsf(
    stars: PSFStars,
    terms: np.ndarray,
    *,
    size: int,
    oversampling: int,
    gain: float,
    var_radius: float,
    name: str,
    prior: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """Least-squares ePSF whose nodes are polynomials in the star position.

    The constant term spans the whole stamp; the position-dependent terms only the nodes within
    ``var_radius`` of the centre (the PSF core, where a change of width or shape shows), which
    keeps the sparse normal equations small enough for a direct solve.

    Parameters
    ----------
    stars : PSFStars
        PSF stars.
    terms : numpy.ndarray
        ``(n_stars, n_terms)`` values of the polynomial terms at each star (first column 1).
    var_radius : float
        Radius (native pixels) of the nodes that vary with position.
    prior : numpy.ndarray, optional
        ``(n, n)`` ePSF (unit native sum) the ePSF is pulled towards with the weight of
        ``_PRIOR_STARS`` stars of average weight: where the stars do not constrain a node (few,
        undersampled stars; the wings) it follows the prior. Only for a constant ePSF (``terms``
        of one column). None: no prior.

    Returns
    -------
    coefficients : numpy.ndarray
        ``(n_terms, n, n)``: the ePSF at a position is ``sum_k terms_k * coefficients[k]``.
    used : int
        Stars kept after outlier rejection.
    """

    import scipy.sparse as sp
    from scipy.sparse.linalg import spsolve

    n = oversampling * (size - 1) + 1 + 2 * _MARGIN
    n_terms = terms.shape[1]
    n_nodes = n * n
    centre = (n - 1) / 2
    node_y, node_x = np.divmod(np.arange(n_nodes), n)
    inner = np.flatnonzero(np.hypot(node_x - centre, node_y - centre) <= var_radius * oversampling)
    row_terms = np.repeat(terms, size * size, axis=0)  # (n_stars * npix, n_terms)

    def design_at(st: PSFStars) -> sp.csr_matrix:
        a1 = _design(st, n, oversampling)
        return sp.hstack([a1] + [sp.diags(row_terms[:, k]) @ a1[:, inner] for k in range(1, n_terms)], format="csr")

    stars = stars.take(np.arange(len(stars)))  # positions are refined below: work on a copy
    design = design_at(stars)
    # Curvature penalty; the varying terms are zero beyond var_radius, so theirs also pulls them
    # smoothly to zero at that edge.
    d2 = _second_differences(n)
    pen = sp.block_diag([d2] + [d2[:, inner]] * (n_terms - 1), format="csr")
    penalty = (pen.T @ pen).tocsc()
    n_unknowns = design.shape[1]
    # A ridge: weak everywhere; strong on the nodes beyond the inscribed circle of the stamp
    # (its corners and the margin), which few star pixels reach and where the PSF is < 1e-4
    # of its peak: unpinned, a stray neighbour pixel can raise them above the core.
    ridge_diag = np.full(n_unknowns, 1e-6)
    ridge_diag[:n_nodes][np.hypot(node_x - centre, node_y - centre) > (size // 2) * oversampling] = 1.0
    ridge = sp.diags(ridge_diag, format="csc")
    if prior is not None and n_terms != 1:
        raise ValueError("an ePSF prior needs a constant ePSF (one polynomial term)")
    d = stars.stamps.reshape(len(stars), -1)
    sky_var = stars.sky_var.reshape(len(stars), -1)
    flux = stars.flux.copy()
    base_use = stars.weights.reshape(len(stars), -1)
    use = base_use.copy()
    keep_star = np.ones(len(stars), bool)
    source = np.maximum(d, 0)
    for it in range(_FIT_ITERATIONS):
        w = (use * keep_star[:, None] / (sky_var + source / gain) * flux[:, None] ** 2).reshape(-1)
        normal = (design.T @ sp.diags(w) @ design).tocsc()
        scale = normal.diagonal()[:n_nodes].mean()
        rhs = design.T @ (w * (d / flux[:, None]).reshape(-1))
        if prior is not None:
            # scale is about n_kept times one star's weight per node: the prior weighs as
            # _PRIOR_STARS stars
            wp = _PRIOR_STARS * scale / int(keep_star.sum())
            normal = normal + wp * sp.identity(n_unknowns, format="csc")
            rhs = rhs + wp * prior.ravel()
        normal = normal + _SMOOTHING * scale * penalty + scale * ridge
        sol = spsolve(normal, rhs)
        sol /= _native_sum(sol[:n_nodes].reshape(n, n), oversampling)
        model = (design @ sol).reshape(len(stars), -1)
        ws = use / (sky_var + np.maximum(flux[:, None] * model, 0) / gain)
        if it == _FIT_ITERATIONS - 1:
            break
        # Refit each star's flux and position (linearised, finite-difference derivatives of the
        # model): windowed centroids are biased towards pixel centres for undersampled stars.
        step = _RECENTRE_STEP
        shifted = stars.take(np.arange(len(stars)))
        shifted.x = stars.x + step
        mx = ((design_at(shifted) @ sol).reshape(len(stars), -1) - model) / step
        shifted.x, shifted.y = stars.x, stars.y + step
        my = ((design_at(shifted) @ sol).reshape(len(stars), -1) - model) / step
        basis = np.stack([model, mx, my], axis=-1)  # (n_stars, npix, 3)
        lhs = np.einsum("sp,spi,spj->sij", ws, basis, basis)
        rhs_s = np.einsum("sp,spi,sp->si", ws, basis, d)
        p = np.linalg.solve(lhs + 1e-12 * np.eye(3), rhs_s[..., None])[..., 0]
        ok = p[:, 0] > 0
        shift_x = np.where(ok, np.clip(p[:, 1] / np.where(ok, p[:, 0], 1), -0.5, 0.5), 0.0)
        shift_y = np.where(ok, np.clip(p[:, 2] / np.where(ok, p[:, 0], 1), -0.5, 0.5), 0.0)
        stars.x = stars.x + shift_x
        stars.y = stars.y + shift_y
        design = design_at(stars)
        model = (design @ sol).reshape(len(stars), -1)
        ws = use / (sky_var + np.maximum(flux[:, None] * model, 0) / gain)
        # a star whose every pixel was clipped (rejected below, or already) keeps its flux: 0 / 0
        # would put NaN into the next solve's weights and every node (a dense 512^2 demo frame)
        den = (ws * model * model).sum(1)
        flux = np.where(den > 0, np.maximum((ws * model * d).sum(1) / np.where(den > 0, den, 1.0), 1e-12), flux)
        source = np.maximum(flux[:, None] * model, 0)
        # Pixels are clipped from scratch (the previous model was worse), so the residuals are
        # weighed without the previous clipping: weighed with it, a clipped pixel (weight 0) came
        # back unclipped in the next iteration, and the clipping of cosmic rays alternated.
        base_ws = base_use / (sky_var + source / gain)
        resid = (d - flux[:, None] * model) * np.sqrt(base_ws)
        use = base_use * (np.abs(resid) < _CLIP_SIGMA)
        chi2 = (resid**2 * (use > 0)).sum(1) / np.maximum((use > 0).sum(1), 1)
        med = np.median(chi2[keep_star])
        mad = np.median(np.abs(chi2[keep_star] - med)) * 1.4826
        # extension is judged on the unclipped pixels: a cosmic ray in the wings is not extended light
        bad = (chi2 > med + 5 * max(mad, 0.1 * med)) | _extended_stars(d, model, base_ws * (use > 0))
        if np.count_nonzero(keep_star & ~bad) >= max(n_terms, keep_star.sum() // 2):
            if np.any(keep_star & bad):
                log.debug("frame '%s': %d PSF stars rejected as outliers", name, np.count_nonzero(keep_star & bad))
            keep_star &= ~bad
        # Each star's position moves to where its model's light centroid lies, so that the next
        # solve centres the ePSF on its first moment (the convention of a star's position): the
        # refit above only matches the model, and the windowed centroids it started from sit
        # between an asymmetric PSF's peak and its centroid (0.1 px for a 10 % coma).
        mx, my = _model_centroids(sol, terms, inner, n=n, radius=var_radius * oversampling)
        stars.x = stars.x + np.clip(mx / oversampling, -0.5, 0.5)
        stars.y = stars.y + np.clip(my / oversampling, -0.5, 0.5)
        design = design_at(stars)
    coef = np.zeros((n_terms, n_nodes))
    coef[0] = sol[:n_nodes]
    coef[1:, inner] = sol[n_nodes:].reshape(n_terms - 1, inner.size)
    return coef.reshape(n_terms, n, n), int(keep_star.sum())


def _model_centroids(
    sol: np.ndarray, terms: np.ndarray, inner: np.ndarray, *, n: int, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """First moment of the ePSF at each star, within ``radius`` nodes of the grid's centre.

    Parameters
    ----------
    sol : numpy.ndarray
        The solve's unknowns: the constant ePSF's ``n * n`` nodes, then each varying term's
        ``inner`` nodes (:func:`_solve_epsf`).
    terms : numpy.ndarray
        ``(n_stars, n_terms)`` polynomial terms at each star.
    inner : numpy.ndarray
        Flat indices of the nodes that vary with position.
    n : int
        Nodes per side of the grid.
    radius : float
        Aperture radius (nodes): the varying nodes' radius (2.5 FWHM), the PSF's core and near wings.

    Returns
    -------
    mx, my : numpy.ndarray
        ``(n_stars,)`` offsets (nodes) of each star's model centroid from the grid's centre.
    """
    centre = (n - 1) / 2
    node_y, node_x = np.divmod(np.arange(n * n), n)
    dx, dy = node_x - centre, node_y - centre
    ap = (np.hypot(dx, dy) <= radius).astype(float)
    basis = np.stack([ap, ap * dx, ap * dy])  # (3, n_nodes): sum, x and y moments
    n_nodes = n * n
    parts = [basis @ sol[:n_nodes]]
    for k in range(1, terms.shape[1]):
        parts.append(basis[:, inner] @ sol[n_nodes + (k - 1) * inner.size : n_nodes + k * inner.size])
    moments = terms @ np.array(parts)  # (n_stars, 3)
    total = np.where(moments[:, 0] > 0, moments[:, 0], np.inf)
    return moments[:, 1] / total, moments[:, 2] / total


def _extended_stars(d: np.ndarray, model: np.ndarray, ws: np.ndarray) -> np.ndarray:
    """Significantly extended sources among PSF stars (galaxies): more light in the wings than a point source's.

    Parameters
    ----------
    d : numpy.ndarray
        ``(n_stars, n_pix)`` star pixels (ADU).
    model : numpy.ndarray
        ``(n_stars, n_pix)`` unit-flux PSF model of each star's pixels.
    ws : numpy.ndarray
        ``(n_stars, n_pix)`` inverse-variance pixel weights (0: not used).

    Returns
    -------
    numpy.ndarray
        ``(n_stars,)`` bool: the flux fitted to the wings (1 % to 30 % of the model's peak)
        exceeds that fitted to the core by more than ``_MAX_EXTENDED`` and by 5 sigma.
    """
    peak = model.max(1, keepdims=True)
    core, wing = model >= 0.3 * peak, (model < 0.3 * peak) & (model >= 0.01 * peak)
    wc, ww = (ws * model * model * core).sum(1), (ws * model * model * wing).sum(1)
    f_core = (ws * model * d * core).sum(1) / np.maximum(wc, 1e-300)
    f_wing = (ws * model * d * wing).sum(1) / np.maximum(ww, 1e-300)
    excess = f_wing / np.maximum(f_core, 1e-12) - 1
    sigma = np.sqrt(1 / np.maximum(wc, 1e-300) + 1 / np.maximum(ww, 1e-300)) / np.maximum(f_core, 1e-12)
    return (excess > _MAX_EXTENDED) & (excess > 5 * sigma)


def _poly_terms(x: np.ndarray, y: np.ndarray, shape: tuple[int, int], degree: int) -> np.ndarray:
    """Polynomial terms 1, u, v, u^2, uv, v^2 (up to ``degree``) of positions scaled to [-1, 1]."""
    ny, nx = shape
    u = (np.asarray(x, float) - (nx - 1) / 2) / (nx / 2)
    v = (np.asarray(y, float) - (ny - 1) / 2) / (ny / 2)
    cols = [u**i * v**j for total in range(degree + 1) for j in range(total + 1) for i in [total - j]]
    return np.column_stack(cols)


def _fit_moffat(stars: PSFStars, *, fwhm_guess: float, gain: float) -> tuple[float, float]:
    """Fit one circular Moffat (FWHM px, beta) to the stars, each with its own flux."""

    from scipy.optimize import least_squares

    s = stars.stamps.shape[1]
    half = s // 2
    pix = np.arange(-half, half + 1, dtype=float)
    dx = pix[None, None, :] - (stars.x - stars.x0)[:, None, None]
    dy = pix[None, :, None] - (stars.y - stars.y0)[:, None, None]
    dx, dy = np.broadcast_arrays(dx, dy)
    sig = np.sqrt(stars.sky_var + np.maximum(stars.stamps, 0) / gain)
    wt = stars.weights / sig

    def resid(p: np.ndarray) -> np.ndarray:
        prof = _moffat_pixels(dx, dy, p[0], p[1], sub=3)
        fl = (wt**2 * prof * stars.stamps).sum(axis=(1, 2)) / (wt**2 * prof * prof).sum(axis=(1, 2))
        return ((stars.stamps - fl[:, None, None] * prof) * wt).ravel()

    fit = least_squares(resid, [fwhm_guess, _MOFFAT_BETA], bounds=([0.5, 1.2], [50.0, 20.0]), x_scale=[1.0, 1.0])
    return float(fit.x[0]), float(fit.x[1])


def _fit_profile(
    stars: PSFStars,
    *,
    fwhm_guess: float,
    gain: float,
    halo: tuple[float, float] | None = None,
    corner_sky: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Fit :func:`_profile_pixels` (core, ellipticity, halo, asymmetry) to the stars, each with its own flux and position.

    Parameters
    ----------
    stars : PSFStars
        PSF stars (their windowed centroids start the positions, which may move by 1 px).
    fwhm_guess : float
        First guess of the core FWHM (px).
    gain : float
        Gain (e-/ADU), for the source Poisson noise of the pixel weights.
    halo : tuple of float, optional
        The halo's (fraction of the light, FWHM over the core's), held there (``psf.halo``);
        default: fitted.
    corner_sky : bool, optional
        Model each star as its stamp was made: less the profile's own median over the stamp's
        used corners, the light the local sky took from its wings (:func:`measure_halo`).
        Default: the profile as it is (the correction is made after the fit, see ``wing_sky``).

    Returns
    -------
    params : numpy.ndarray
        The 10 profile parameters of :func:`_profile_pixels`. The halo is at least twice as
        broad as the core (a narrower one trades against the core's beta) and holds at most 60 %
        of the light; each third-order coefficient lies within +-0.5. The stars the first fit
        finds extended (:func:`_extended_stars`: a compact galaxy that passed the selection)
        are dropped and the profile fitted again, as long as half of them remain.
    wing_sky : numpy.ndarray
        ``(n_stars,)`` ADU each star's local sky (:func:`select_psf_stars`) took from its own
        wings: the fitted profile's median over the used stamp corners times the star's flux.
        Added back to the stamps, it gives the ePSF the wing light the profile sees there (a
        halo with a fifth of the light in Moffat wings 3 times broader than the core is 2 % of
        a star's flux over a 25 px stamp). It is a partial correction, as the profile was fitted
        to stamps without that light: modelling it in the fit (``corner_sky``) makes a broad halo
        and the sky interchangeable within the stamp of a few stars (hence ``psf.halo``, measured
        that way over many frames) (on a 6-star realpsf-like frame, a halo 5.5 times the
        core's width and a PSF 5.9 % of the peak off, instead of 3.6 %).
    """

    import scipy.sparse as sp
    from scipy.optimize import least_squares

    n_shape = 10
    _, s, _ = stars.stamps.shape
    half = s // 2
    pix = np.arange(-half, half + 1, dtype=float)
    px, py = np.broadcast_arrays(pix[None, None, :], pix[None, :, None])
    sig = np.sqrt(stars.sky_var + np.maximum(stars.stamps, 0) / gain)
    wt = stars.weights / sig
    # where each star's local sky was measured (:func:`_corner_levels`; none: it was not lowered)
    corners = _corners(s)[None] & (stars.weights > 0)
    measured = corners.any(axis=(1, 2))
    corners[~measured] = _corners(s)
    free = np.ones(n_shape, bool)
    if halo is not None:
        free[4:6] = False  # the halo's fraction and width
    shape0 = np.r_[fwhm_guess, _MOFFAT_BETA, 0.0, 0.0, 0.1, 3.0, np.zeros(4)]
    if halo is not None:
        shape0[4:6] = halo
    n_free = int(free.sum())

    def fit(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Profile parameters and the unit-flux star models ``(len(k), s, s)``, fitted to stars ``k``."""
        ns = k.size
        x0, y0 = (stars.x - stars.x0)[k], (stars.y - stars.y0)[k]
        d, w2 = stars.stamps[k], wt[k] ** 2

        def models(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            shape = shape0.copy()
            shape[free] = p[:n_free]
            sx, sy = p[n_free::2], p[n_free + 1 :: 2]
            prof = _profile_pixels(px - (x0 + sx)[:, None, None], py - (y0 + sy)[:, None, None], shape)
            if corner_sky:
                level = np.nanmedian(np.where(corners[k], prof, np.nan), axis=(1, 2)) * measured[k]
                prof = prof - level[:, None, None]
            return (w2 * prof * d).sum(axis=(1, 2)) / (w2 * prof * prof).sum(axis=(1, 2)), prof

        def resid(p: np.ndarray) -> np.ndarray:
            fl, prof = models(p)
            return ((d - fl[:, None, None] * prof) * wt[k]).ravel()

        # each star's pixels depend on the shape and on that star's own shift
        sparsity = sp.lil_matrix((ns * s * s, n_free + 2 * ns), dtype=int)
        sparsity[:, :n_free] = 1
        for j in range(ns):
            sparsity[j * s * s : (j + 1) * s * s, n_free + 2 * j : n_free + 2 * j + 2] = 1
        lo = np.r_[np.r_[0.5, 1.2, -0.5, -0.5, 0.0, 2.0, np.full(4, -0.5)][free], np.full(2 * ns, -1.0)]
        hi = np.r_[np.r_[50.0, 20.0, 0.5, 0.5, 0.6, 6.0, np.full(4, 0.5)][free], np.full(2 * ns, 1.0)]
        sol = least_squares(
            resid,
            np.r_[shape0[free], np.zeros(2 * ns)],
            bounds=(lo, hi),
            jac_sparsity=sparsity.tocsr(),
            x_scale=np.r_[np.r_[1, 1, 0.1, 0.1, 0.1, 1, np.full(4, 0.05)][free], np.full(2 * ns, 0.1)],
        ).x
        shape = shape0.copy()
        shape[free] = sol[:n_free]
        return shape, models(sol)[1]

    every = np.arange(len(stars))
    params, prof = fit(every)
    n_pix = s * s
    bad = _extended_stars(stars.stamps.reshape(-1, n_pix), prof.reshape(-1, n_pix), (wt**2).reshape(-1, n_pix))
    if bad.any() and np.count_nonzero(~bad) >= max(2, len(stars) // 2 + len(stars) % 2):
        params = fit(every[~bad])[0]
    # each star's wing level in its corners, from the profile at the star's centroid
    prof = _profile_pixels(px - (stars.x - stars.x0)[:, None, None], py - (stars.y - stars.y0)[:, None, None], params)
    level = _corner_levels(prof, stars.weights)
    prof = prof - level[:, None, None]
    w2 = wt**2
    flux = (w2 * prof * stars.stamps).sum(axis=(1, 2)) / (w2 * prof * prof).sum(axis=(1, 2))
    return params, np.maximum(flux, 0.0) * level


def _fwhm_guess(info: FrameInfo, cfg: dict[str, Any], pixel_scale: float) -> float:
    """The FWHM (px) star finding starts from: the frame's header value, else ``psf.fallback_fwhm``."""
    return info.fwhm_guess if info.fwhm_guess else float(cfg["fallback_fwhm"]) / pixel_scale


def _read_frame(path: str | os.PathLike, telescope: dict[str, Any]) -> tuple[Image, FrameInfo, str, float]:
    """A frame as the PSF stage reads it: its image, facts, name (file name before ``.fits``) and pixel scale."""
    from rbflow.frames import frame_info

    image = read_image(path, hdu=frame_hdu(telescope))
    info = frame_info(image.header, telescope, path=path)
    return image, info, Path(path).name.split(".fits")[0], pixel_scale_of(telescope, image.wcs, path=path)


def build_psf(image: Image, info: FrameInfo, cfg: dict[str, Any], *, pixel_scale: float, name: str) -> PSFModel:
    """Build the spatially varying PSF model of a frame from its stars.

    Parameters
    ----------
    image : rbflow.io.Image
        The frame (float32, NaN = invalid).
    info : rbflow.frames.FrameInfo
        Frame facts (gain, saturation, FWHM guess).
    cfg : dict
        The telescope's validated ``psf`` block (grid, oversampling, size, min_stars, max_stars,
        snr_min, prior_below, halo, analytic_fallback, fallback_fwhm).
    pixel_scale : float
        Pixel scale (arcsec/pixel), to convert ``fallback_fwhm`` to pixels.
    name : str
        Frame name, for messages and the file header.

    Returns
    -------
    PSFModel

    Raises
    ------
    InputError
        Every pixel is saturated, or no usable PSF star in the frame and ``analytic_fallback`` is false.
    """
    size = int(cfg["size"])
    if size % 2 == 0:
        size += 1
    os_ = int(cfg["oversampling"])
    gx, gy = (int(v) for v in cfg["grid"])
    min_stars, max_stars = int(cfg["min_stars"]), int(cfg["max_stars"])
    ny, nx = image.data.shape
    fallback_fwhm = float(cfg["fallback_fwhm"]) / pixel_scale
    guess = _fwhm_guess(info, cfg, pixel_scale)
    if not np.any(image.data < info.saturation):  # NaN compares False: no finite unsaturated pixel
        raise InputError(
            f"frame '{image.path or name}': every pixel is saturated (>= {info.saturation:g} ADU) or invalid, so "
            "no PSF star is usable: remove the frame, or fix 'saturation' in the telescope file"
        )
    stars, fwhm_est = select_psf_stars(image, info, cfg, fwhm_guess=guess, name=name)
    n_cells = gx * gy
    if len(stars) == 0:
        if not cfg["analytic_fallback"]:
            raise InputError(
                f"frame '{image.path or name}': no usable PSF star (isolated, unsaturated, S/N >= "
                f"{cfg['snr_min']}); check the frame, lower 'psf.snr_min' or set 'psf.analytic_fallback: true' "
                "in the telescope file"
            )
        log.warning(
            "frame '%s': NO usable PSF star; using an analytic Moffat PSF (FWHM %.2f px = %.2f arcsec, beta %.1f) "
            "because psf.analytic_fallback is true: subtractions of this frame will be poor",
            name,
            fallback_fwhm,
            cfg["fallback_fwhm"],
            _MOFFAT_BETA,
        )
        cube = np.repeat(moffat_epsf(fallback_fwhm, size=size, oversampling=os_)[None], n_cells, axis=0)
        return PSFModel(
            cube,
            oversampling=os_,
            size=size,
            shape=(ny, nx),
            grid=(gx, gy),
            n_stars=[0] * n_cells,
            sources=["analytic"] * n_cells,
            name=name,
        )

    cx = np.clip((stars.x + 0.5) * gx / nx, 0, gx - 1e-9).astype(int)
    cy = np.clip((stars.y + 0.5) * gy / ny, 0, gy - 1e-9).astype(int)
    cell_of = cy * gx + cx
    # At most max_stars per cell (stars are sorted by decreasing S/N).
    rank = np.zeros(len(stars), int)
    for c in np.unique(cell_of):
        members = np.nonzero(cell_of == c)[0]
        rank[members] = np.arange(members.size)
    chosen = np.nonzero(rank < max_stars)[0]
    counts = np.bincount(cell_of[chosen], minlength=n_cells)
    n_total = chosen.size
    degree = min(2, max(gx, gy) - 1)
    while degree > 0 and _N_TERMS[degree] * min_stars > n_total:
        degree -= 1
    xc = (np.arange(gx) + 0.5) * nx / gx - 0.5
    yc = (np.arange(gy) + 0.5) * ny / gy - 0.5
    cube: list[np.ndarray] = []
    n_used: list[int] = []
    sources: list[str] = []
    var_radius = min(size // 2, _VAR_RADIUS * fwhm_est)
    if n_total >= min_stars:
        fit_stars, prior = stars.take(chosen), None
        if n_total < int(cfg["prior_below"]):
            # few stars: a constant ePSF leans on an analytic profile, and the stars get back the
            # wing light their local sky took
            halo = cfg.get("halo")
            params, wing_sky = _fit_profile(
                fit_stars, fwhm_guess=fwhm_est, gain=info.gain, halo=None if halo is None else tuple(halo)
            )
            log.info("frame '%s': ePSF prior from %d stars: %s", name, n_total, np.round(params, 3).tolist())
            prior = _profile_epsf(params, size=size, oversampling=os_)
            fit_stars.stamps = fit_stars.stamps + wing_sky[:, None, None]

        coef, used = _solve_epsf(
            fit_stars,
            _poly_terms(stars.x[chosen], stars.y[chosen], (ny, nx), degree),
            size=size,
            oversampling=os_,
            gain=info.gain,
            var_radius=var_radius,
            name=name,
            prior=prior if degree == 0 else None,
        )
        log.info("frame '%s': ePSF polynomial of degree %d in (x, y) from %d stars", name, degree, used)
        frame_epsf = None
        cells = np.arange(n_cells)
        for c in range(n_cells):
            iy, ix = divmod(c, gx)
            near = (np.abs(cells % gx - ix) <= 1) & (np.abs(cells // gx - iy) <= 1)
            if counts[c] >= min_stars or counts[near].sum() >= min_stars:
                source = "cell" if counts[c] >= min_stars else "neighbours"
                at = _poly_terms(np.array([xc[ix]]), np.array([yc[iy]]), (ny, nx), degree)[0]
                epsf = np.tensordot(at, coef, axes=1)
                n_used.append(int(counts[c]))  # own stars: a 'neighbours' cell has fewer than min_stars
            else:
                source = "frame"
                if frame_epsf is None:
                    frame_epsf = (
                        coef[0]
                        if degree == 0
                        else _solve_epsf(
                            fit_stars,
                            np.ones((n_total, 1)),
                            size=size,
                            oversampling=os_,
                            gain=info.gain,
                            var_radius=var_radius,
                            name=name,
                            prior=prior,
                        )[0][0]
                    )
                epsf = frame_epsf
                n_used.append(used)
            if source != "cell":
                log.warning(
                    "frame '%s': PSF cell (%d, %d) has %d stars (< psf.min_stars = %d): using the %s fallback",
                    name,
                    ix,
                    iy,
                    counts[c],
                    min_stars,
                    source,
                )
            cube.append(_unit_native_sum(_centred(epsf, os_, var_radius), os_))
            sources.append(source)
    else:
        fw, beta = _fit_moffat(stars, fwhm_guess=fwhm_est, gain=info.gain)
        log.warning(
            "frame '%s': only %d PSF stars (< psf.min_stars = %d): every cell uses a Moffat fitted to them "
            "(FWHM %.2f px, beta %.2f)",
            name,
            len(stars),
            min_stars,
            fw,
            beta,
        )
        cube = [moffat_epsf(fw, size=size, oversampling=os_, beta=beta)] * n_cells
        n_used = [len(stars)] * n_cells
        sources = ["moffat"] * n_cells
    model = PSFModel(
        np.array(cube),
        oversampling=os_,
        size=size,
        shape=(ny, nx),
        grid=(gx, gy),
        n_stars=n_used,
        sources=sources,
        name=name,
    )
    log.info(
        "frame '%s': PSF model from %d stars, cell FWHM %.2f-%.2f px, %d fallback cells",
        name,
        len(stars),
        model.cell_fwhm.min(),
        model.cell_fwhm.max(),
        sum(s != "cell" for s in sources),
    )
    return model


def measure_halo(frames: Sequence[str | os.PathLike], telescope: dict[str, Any]) -> tuple[tuple[float, float], Table]:
    """A telescope's PSF halo, measured once from many of its frames, for its ``psf.halo``.

    Few faint stars do not show a halo: a fifth of the light in wings three times broader than the
    core is below their noise, and the local sky of each stamp (the median of its corners) takes
    part of it. Fitted per frame, the few-star prior then holds little halo and its unit-sum core
    too much light (measured on the ``realpsf`` test telescope: 0-5 % of the light in the halo on
    the worst frames against the truth's 20 %, the core 3-5 % of the peak too high). Each frame's
    PSF stars are fitted here with the analytic profile of the prior, modelled as their stamps
    were made (less the profile's own corner level, so that the halo the corners took counts),
    and the halo is the median over the frames with at least ``psf.min_stars`` stars of each
    fit's (fraction of the light, FWHM over the core's).

    Parameters
    ----------
    frames : sequence of path-like
        Frames of the telescope (any epochs and fields; the more the better: one frame's halo
        scatters by ~0.07 in fraction on 4-17 star frames).
    telescope : dict
        Validated telescope configuration (``psf`` and the frame facts).

    Returns
    -------
    halo : tuple of float
        (fraction, FWHM ratio): the value of ``psf.halo``.
    table : astropy.table.Table
        One row per frame: ``frame``, ``n_stars``, ``fwhm`` (px), ``beta``, ``fraction``,
        ``ratio`` (NaN where the frame has too few stars) and ``used``.

    Raises
    ------
    InputError
        No frame has ``psf.min_stars`` PSF stars.
    """
    from astropy.table import Table

    cfg = telescope["psf"]
    rows: list[tuple[str, int, float, float, float, float, bool]] = []
    for path in frames:
        image, info, name, scale = _read_frame(path, telescope)
        stars, fwhm = select_psf_stars(image, info, cfg, fwhm_guess=_fwhm_guess(info, cfg, scale), name=name)
        stars = stars.take(np.arange(min(len(stars), int(cfg["max_stars"]))))
        used = len(stars) >= int(cfg["min_stars"])
        params = (
            _fit_profile(stars, fwhm_guess=fwhm, gain=info.gain, corner_sky=True)[0] if used else np.full(10, np.nan)
        )
        rows.append((name, len(stars), params[0], params[1], params[4], params[5], used))
    table = Table(rows=rows, names=("frame", "n_stars", "fwhm", "beta", "fraction", "ratio", "used"))
    if not table["used"].any():
        raise InputError(
            f"no frame among the {len(rows)} given has psf.min_stars = {cfg['min_stars']} PSF stars: give more "
            "frames (or deeper ones, a reference), or leave psf.halo null"
        )
    good = table[table["used"]]
    halo = (float(np.median(good["fraction"])), float(np.median(good["ratio"])))
    log.info("PSF halo from %d of %d frames: fraction %.3f, FWHM ratio %.2f", len(good), len(table), *halo)
    return halo, table


def _plot(model: PSFModel, path: str | os.PathLike) -> None:
    """Small PNG of the cell ePSFs (top row = high y) with FWHM and source per cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gx, gy = model.grid
    fig, axes = plt.subplots(gy, gx, figsize=(1.6 * gx + 0.4, 1.6 * gy + 0.4), squeeze=False)
    for c in range(gx * gy):
        iy, ix = divmod(c, gx)
        ax = axes[gy - 1 - iy][ix]
        ax.imshow(np.arcsinh(model.cube[c] / model.cube[c].max() * 50), origin="lower", cmap="magma")
        ax.set_title(f"{model.cell_fwhm[c]:.2f} px\n{model.sources[c]} ({model.n_stars[c]})", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"PSF {model.name}", fontsize=8)
    fig.tight_layout()
    write_figure(fig, path, dpi=80)
    plt.close(fig)


def run_psf(
    frame_path: str | os.PathLike, out_fits: str | os.PathLike, out_png: str | os.PathLike, telescope: dict[str, Any]
) -> PSFModel:
    """Read a frame, build its PSF model, write the model FITS and a PNG of the cell ePSFs.

    Parameters
    ----------
    frame_path : path-like
        FITS frame.
    out_fits, out_png : path-like
        Destinations of the model and its picture.
    telescope : dict
        Validated telescope configuration (uses ``psf``, ``pixel_scale`` and the frame facts).

    Returns
    -------
    PSFModel
    """
    image, info, name, scale = _read_frame(frame_path, telescope)
    model = build_psf(image, info, telescope["psf"], pixel_scale=scale, name=name)
    model.write(out_fits)
    _plot(model, out_png)
    return model
