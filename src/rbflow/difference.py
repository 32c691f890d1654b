"""What the subtraction methods share: the PSF duck type, the prepared pair, the result type.

:func:`rbflow.subtract.prepare_pair` aligns, masks, background-subtracts and flux-scales a
science frame and its reference into a :class:`PreparedPair`; a method (ZOGY in
:mod:`rbflow.subtract`, sfft in :mod:`rbflow.sfft_method`) turns it into a :class:`Difference`,
which :func:`rbflow.subtract.subtract_images` normalises and writes. Both methods import this
module, never each other.

The PSF models only need two methods (the duck type of :class:`rbflow.psf.PSFModel`):
``stamp(x, y, size, *, centred=False)`` returning a unit-sum ``(size, size)`` array whose central
pixel is ``(round(x), round(y))`` (the profile sits at the sub-pixel position ``(x, y)``, or on
the central pixel with ``centred=True``), and ``fwhm(x, y)`` in pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from rbflow.align import PixelMap

__all__ = ["PSFLike", "PreparedPair", "Difference", "Method", "astrometric_variance", "ref_psf_on_sci_grid"]


class PSFLike(Protocol):
    """What the subtraction needs from a PSF model (see :class:`rbflow.psf.PSFModel`)."""

    def stamp(self, x: float, y: float, size: int, *, centred: bool = False) -> np.ndarray: ...

    def fwhm(self, x: float, y: float) -> float: ...


@dataclass
class PreparedPair:
    """A science frame and its reference aligned, masked, background-subtracted and flux-scaled.

    ``N``, ``R`` are the background-subtracted science and aligned reference (float32, masked
    pixels set to 0, R in reference flux units), ``var_n``, ``var_r`` their variance maps (ADU²,
    sky plus source Poisson noise), ``mask`` the :data:`rbflow.align.MASK_BITS` (``bad = mask != 0``),
    ``bad_sci`` the science's own invalid (non-finite) pixels, ``nbkg`` the science background; ``sn``, ``sr`` the background noises (ADU), ``fr`` the flux
    ratio F_r/F_n with its error ``fr_err`` from ``n_flux`` stars; ``fwhm_s``, ``fwhm_r`` the
    FWHMs (science pixels) at the frame centre; ``size`` the PSF stamp size; ``ainfo`` the
    alignment information of :func:`rbflow.align.align`; ``gain_n``, ``gain_r`` the gains (e-/ADU).
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
    (S/N, normalised afterwards), the PSF of D per tile with the tile centres, and header cards.

    ``sc_divisor``, when given, divides the score map after its empty-sky normalisation: a term
    of the score's error that the empty sky does not show (ZOGY's PSF-model error, which faint
    stars there would otherwise pull into the normalisation). ``flux_ratio``, when given, is the
    flux ratio F_r/F_n the method measured and used, with its error and number of stars, in
    place of the pair's (ZOGY's fitted kernels)."""

    D: np.ndarray
    V: np.ndarray
    SC: np.ndarray
    psfd: list[np.ndarray]
    centres: list[tuple[int, int]]
    cards: list[tuple[str, Any, str]]
    sc_divisor: np.ndarray | None = None
    flux_ratio: tuple[float, float, int] | None = None


#: A subtraction method: ``(pair, psf_sci, psf_ref, cfg, *, threads) -> Difference``.
Method = Callable[..., Difference]


def ref_psf_on_sci_grid(psf_ref: PSFLike, to_ref: PixelMap, x: float, y: float, size: int) -> np.ndarray:
    """PSF of the aligned reference for a source at science pixel (x, y), on the science grid.

    The reference PSF at the mapped position is resampled (cubic spline) through the local
    Jacobian of the pixel map, so it carries the rotation and scale of the map and the blur of
    the cubic-spline resampling at the local pixel phase.

    Parameters
    ----------
    psf_ref : PSFLike
        PSF model of the reference, in reference pixels.
    to_ref : rbflow.align.PixelMap
        Map from science to reference pixels (``info["to_ref"]`` of :func:`rbflow.align.align`).
    x, y : float
        Science pixel position of the source.
    size : int
        Stamp size (px, odd).

    Returns
    -------
    numpy.ndarray
        ``(size, size)`` unit-sum stamp centred at pixel ``(round(x), round(y))``.
    """
    from scipy import ndimage

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


def astrometric_variance(a: np.ndarray, dx: float, dy: float, *, core: tuple[slice, slice] | None = None) -> np.ndarray:
    """ZOGY's astrometric-noise variance of an image: ``dx² (da/dx)² + dy² (da/dy)²``.

    Zackay, Ofek & Gal-Yam (2016), sec. 3.3: a registration error of ``dx``, ``dy`` pixels (rms)
    moves every source of ``a`` and leaves this variance in the difference.

    Parameters
    ----------
    a : numpy.ndarray
        The image (or its matched-filtered version for the score's variance).
    dx, dy : float
        Registration noise (px) along x and y.
    core : tuple of slice, optional
        (y, x) slices: the variance on that part only (central differences, one-sided at the
        array's edges, as on the whole array); default the whole array.

    Returns
    -------
    numpy.ndarray
    """
    if core is None:
        core = (slice(0, a.shape[0]), slice(0, a.shape[1]))
    ys, xs = core
    y0, x0 = max(ys.start - 1, 0), max(xs.start - 1, 0)
    sub = a[y0 : min(ys.stop + 1, a.shape[0]), x0 : min(xs.stop + 1, a.shape[1])]
    gy, gx = np.gradient(sub)
    inner = (slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0))
    return dx**2 * gx[inner] ** 2 + dy**2 * gy[inner] ** 2
