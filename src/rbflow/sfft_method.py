"""The ``sfft`` subtraction method: Lei Hu's Fourier-space kernel fit (sfft ``Customized_Packet``).

An Alard-Lupton style subtraction (Hu et al. 2022, ApJ 936, 157): a convolution kernel whose
pixels vary as a polynomial over the frame, plus a polynomial differential background, are fitted
in Fourier space by sfft on its numpy backend (numba JIT, pyFFTW), here on tiles of a fixed size
so that numba's compiled functions are reused between tiles and, through their on-disk cache,
between jobs. It is robust to PSF-model errors (it needs no PSF for the kernel), at the cost of
10-35 s per 1024² tile on two cores and about 5 GB of memory per 1024² tile.

The narrower-PSF image is convolved, so that the difference D has the PSF of the other one. Its
score map, which the detection stage reads as SCORR, is a matched filter of D with that PSF
divided by the noise predicted from the variance map (white noise), then normalised on the empty
sky by :func:`rbflow.subtract.subtract_images` like the ZOGY S_corr: the noise of D is correlated
(a plain matched filter over-estimates the S/N by about 1.4x), so its normalisation is measured
from the image itself.

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
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from rbflow.difference import Difference, PreparedPair, PSFLike, ref_psf_on_sci_grid
from rbflow.errors import ConfigError
from rbflow.stars import FWHM_TO_SIGMA

__all__ = ["DEFAULTS", "numba_cache_dir", "require_sfft", "sfft_difference"]

log = logging.getLogger(__name__)

#: Defaults of the telescope's ``subtract.sfft`` block (see src/rbflow/schemas/telescope.schema.yaml).
DEFAULTS: dict[str, Any] = {
    "kernel_half_width": None,
    "kernel_poly_order": 2,
    "bg_poly_order": 2,
    "tile": 1024,
    "overlap": 64,
}
#: Kernel half width (px) per FWHM of the broader PSF when ``kernel_half_width`` is null, and its limits.
_KERHW_PER_FWHM = 2.0
_KERHW_LIMITS = (2, 20)


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


def _kernel_sq_sum(fwhm_broad: float, fwhm_narrow: float) -> float:
    """Sum of squares of the unit-sum kernel matching two Gaussian PSFs (1 for equal PSFs)."""
    var = max(fwhm_broad**2 - fwhm_narrow**2, 0.0) * FWHM_TO_SIGMA**2
    return 1.0 if var <= 0 else min(1.0, 1.0 / (4 * math.pi * var))


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
) -> np.ndarray:
    """One ``Customized_Packet`` subtraction of a NaN-free pair; returns sfft's difference:
    ``SCI - K * REF`` when the reference is convolved, ``K * SCI - REF`` when the science is."""
    import numba

    ref, sci = (conv, other) if conv_side == "REF" else (other, conv)
    with tempfile.TemporaryDirectory(prefix="rbflow-sfft-") as tmp:
        paths = {}
        for name, data in (("ref", ref), ("sci", sci)):
            paths[name] = Path(tmp) / f"{name}.fits"
            fits.PrimaryHDU(np.ascontiguousarray(data, np.float32)).writeto(paths[name])
        out = io.StringIO()
        set_threads(threads)
        try:
            with contextlib.redirect_stdout(out), warnings.catch_warnings():
                warnings.simplefilter("ignore", numba.NumbaWarning)
                _, diff = cp(
                    str(paths["ref"]),
                    str(paths["sci"]),
                    str(paths["ref"]),
                    str(paths["sci"]),
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
    return np.asarray(diff, np.float32).T


def _score(
    D: np.ndarray, V: np.ndarray, psfs: list[np.ndarray], boxes: list[tuple[slice, slice, slice, slice]]
) -> np.ndarray:
    """Matched filter of D with the PSF of each tile, over its white-noise prediction from V.

    ``boxes`` holds each tile's window and core (y, x slices); the filter runs on the window and
    fills the core.
    """
    from scipy.signal import fftconvolve

    SC = np.zeros_like(D)
    for pd, (wy, wx, cy, cx) in zip(psfs, boxes):
        flip = pd[::-1, ::-1]
        s = fftconvolve(D[wy, wx], flip, mode="same")
        v = fftconvolve(V[wy, wx], flip**2, mode="same")
        core = (slice(cy.start - wy.start, cy.stop - wy.start), slice(cx.start - wx.start, cx.stop - wx.start))
        SC[cy, cx] = (s / np.sqrt(np.maximum(v, np.finfo(np.float32).tiny)))[core]
    return SC


def sfft_difference(
    pp: PreparedPair, psf_sci: PSFLike, psf_ref: PSFLike, cfg: dict[str, Any], *, threads: int = 1
) -> Difference:
    """Difference of a prepared pair by sfft's ``Customized_Packet`` (numpy backend) on tiles.

    Parameters
    ----------
    pp : rbflow.difference.PreparedPair
        Aligned, masked, background-subtracted pair (masked pixels are 0 in both, so they do not
        weigh in the kernel fit).
    psf_sci, psf_ref : PSFLike
        PSF models; they give the PSF of D (for the score map and photometry) and the default
        kernel size, not the kernel itself.
    cfg : dict
        The telescope's ``subtract`` block; its ``sfft`` block holds ``kernel_half_width`` (px,
        null: twice the broader FWHM, within 2-20), ``kernel_poly_order`` and ``bg_poly_order``
        (polynomial degrees, 0-3, of the kernel's and the differential background's variation
        over a tile), ``tile`` (px, side of the square tiles; smaller frames are one tile) and
        ``overlap`` (px, common margin of neighbouring tiles).
    threads : int, optional
        Threads of sfft's numpy backend and of numba.

    Returns
    -------
    rbflow.difference.Difference
        D in science flux units, its variance (science and reference Poisson plus sky noise, the
        reference term smoothed by the kernel, approximated as Gaussian), the raw score map, the
        PSF of D at the centre of each tile's core and the header cards.

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
    conv_side = "REF" if pp.fwhm_r <= pp.fwhm_s else "SCI"
    ksq = _kernel_sq_sum(max(pp.fwhm_s, pp.fwhm_r), min(pp.fwhm_s, pp.fwhm_r))
    ny, nx = pp.N.shape
    D = np.zeros((ny, nx), np.float32)
    boxes, psfs, centres = [], [], []
    for wy0, wy1, cy0, cy1 in _windows(ny, tile, overlap):
        for wx0, wx1, cx0, cx1 in _windows(nx, tile, overlap):
            win = (slice(wy0, wy1), slice(wx0, wx1))
            conv, other = (pp.R[win], pp.N[win]) if conv_side == "REF" else (pp.N[win], pp.R[win])
            diff = _run_packet(
                cp,
                set_threads,
                conv,
                other,
                conv_side=conv_side,
                kerhw=kerhw,
                kpo=int(scfg["kernel_poly_order"]),
                bpo=int(scfg["bg_poly_order"]),
                threads=threads,
            )
            D[cy0:cy1, cx0:cx1] = diff[cy0 - wy0 : cy1 - wy0, cx0 - wx0 : cx1 - wx0]
            tx, ty = (cx0 + cx1 - 1) // 2, (cy0 + cy1 - 1) // 2
            if conv_side == "REF":
                psfs.append(psf_sci.stamp(tx, ty, pp.size, centred=True))
            else:
                psfs.append(ref_psf_on_sci_grid(psf_ref, pp.ainfo["to_ref"], tx, ty, pp.size))
            boxes.append((*win, slice(cy0, cy1), slice(cx0, cx1)))
            centres.append((tx, ty))
    if conv_side == "REF":  # D = N - K * R, science units
        V = pp.var_n + ksq * pp.var_r / pp.fr**2
    else:  # D = K * N - R in reference units
        D /= pp.fr
        V = ksq * pp.var_n + pp.var_r / pp.fr**2
    V = V.astype(np.float32)
    SC = _score(D, V, psfs, boxes)
    cards = [
        ("METHOD", "sfft", "Hu et al. 2022, sfft Customized_Packet"),
        ("NTILES", len(centres), "sfft tiles, each with its own kernel fit"),
        ("TILE", tile, "[pix] sfft tile size (subtract.sfft.tile)"),
        ("OVERLAP", overlap, "[pix] sfft tile overlap"),
        ("KERHW", kerhw, "[pix] sfft kernel half width"),
        ("KERORDER", int(scfg["kernel_poly_order"]), "sfft kernel polynomial degree"),
        ("BGORDER", int(scfg["bg_poly_order"]), "sfft background polynomial degree"),
        ("CONVD", conv_side, "image convolved by sfft"),
    ]
    return Difference(D, V, SC, [p.astype(np.float32) for p in psfs], centres, cards)
