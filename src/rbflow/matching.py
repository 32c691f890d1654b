"""A PSF-matching kernel fitted on the stars of an aligned image pair.

ZOGY (:mod:`rbflow.subtract`) convolves each image with the other's PSF and so leaves at every
static star the mismatch of the two PSF models: a model a per cent of the peak off, or a
resampled reference whose stars the cubic spline blurs by a different amount at each sub-pixel
phase (an undersampled core), leaves rings. The kernel fitted here maps one image onto the other
at their bright stars, the way Alard & Lupton (1998, ApJ 503, 325) fit theirs, in a basis of delta
functions (Bramich 2008, MNRAS 386, L77), varying linearly across the stars, with its first
moment held to zero: it changes shapes, not positions (the astrometry is the alignment's, and its
residual dipoles stay, as a survey's differences keep them). Its sum is the flux ratio the stars
show, or one held fixed (a photometric scale constant over the frame). Convolving the sharper
image's PSF with it gives the broader image's PSF as the data see it, in place of its model.

:func:`match_stars` picks the stars, :func:`fit_kernel` sets up the fit on those of a region and
:meth:`KernelFit.kernel` solves it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["KernelFit", "match_stars", "fit_kernel", "kernel_half_size"]

#: Peak S/N (of the image smoothed by a Gaussian of the FWHM, in units of the per-pixel noise
#: over the FWHM) of the stars a kernel is fitted on.
STAR_SNR = 30.0
#: Half-size of a star's stamp, in FWHMs of the broader image.
STAMP_FWHM = 2.0
#: Stars whose mean chi² exceeds this multiple of the median are left out of the next fit
#: (variables, a blend with a cosmic ray), until none changes (at most four fits).
CLIP = 4.0
#: Most fits of the clipping (the last one's stars are those fitted).
_CLIP_ITERATIONS = 4


@dataclass
class KernelFit:
    """The weighted least-squares system of a kernel fit (:func:`fit_kernel`) on its ``n_stars``
    stars (``n_clipped`` left out): normal matrix, projected data and the linear constraints
    (first moments 0, the gradients' sums 0) on the coefficients, the kernel's sum last; ``chi2``
    the median reduced chi² of the stars."""

    half: int
    normal: np.ndarray
    projected: np.ndarray
    constraints: np.ndarray
    n_stars: int
    n_clipped: int
    chi2: float

    def coefficients(self, total: float | None = None) -> np.ndarray:
        """All fitted coefficients (kernel, gradients, background), the kernel's sum ``total``
        (None: as the stars say)."""
        c = self.constraints if total is not None else self.constraints[:-1]
        values = np.zeros(len(c))
        if total is not None:
            values[-1] = total
        kkt = np.block([[self.normal, c.T], [c, np.zeros((len(c), len(c)))]])
        return np.linalg.solve(kkt, np.concatenate([self.projected, values]))[: len(self.projected)]

    def sum_error(self) -> float:
        """Standard error of the kernel's sum fitted free (the flux ratio the stars say): from
        the constrained covariance, scaled by the stars' reduced chi² where it exceeds 1."""
        c = self.constraints[:-1]
        kkt = np.block([[self.normal, c.T], [c, np.zeros((len(c), len(c)))]])
        n = len(self.projected)
        cov = np.linalg.inv(kkt)[:n, :n]
        total = self.constraints[-1]
        return float(math.sqrt(max(total @ cov @ total, 0.0) * max(self.chi2, 1.0)))

    def kernel(self, total: float | None = None) -> np.ndarray:
        """The convolution kernel at the fit's centre (odd square array), its sum ``total``
        (None: the flux ratio target / source the stars say)."""
        side = 2 * self.half + 1
        return np.ascontiguousarray(self.coefficients(total)[: side * side].reshape(side, side)[::-1, ::-1])


def kernel_half_size(fwhm: float) -> int:
    """Half-size (px) of the kernel for the broader image's FWHM (px): 2 FWHM, within 3-5 px.

    Measured with ZOGY on the demo's dense field (static sky, epoch 2 against its reference):
    at its seeing (FWHM 2.3 px), noise ratio 1.017 / 1.016 / 1.015 / 1.033 with half-sizes
    3 / 4 / 5 / 6 (at 6, 268 unknowns: 3 of the 16 tiles too few stars to fit, the others
    noisy); seen at 3.4-3.8" (FWHM ~3.5 px), 1.017 / 1.016 / 1.019 with 4 / 5 / 6.
    """
    return int(min(5, max(3, math.ceil(2.0 * fwhm))))


def match_stars(image: np.ndarray, bad: np.ndarray, noise: float, fwhm: float) -> tuple[np.ndarray, np.ndarray]:
    """Peaks of ``image`` (background-subtracted, ``bad`` pixels ignored) to fit a kernel on.

    A peak is a pixel of the image smoothed by a Gaussian of ``fwhm`` (px) that is the largest
    within one FWHM and above :data:`STAR_SNR` ``* noise / fwhm`` (``noise``: the per-pixel
    background noise, ADU). Returns the integer (x, y) of the peaks, brightest first.
    """
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(np.where(bad, 0.0, image).astype(np.float32), fwhm / 2.3548)
    size = int(2 * fwhm) | 1
    peaks = (smooth == ndimage.maximum_filter(smooth, size=size)) & (smooth > STAR_SNR * noise / fwhm)
    ys, xs = np.nonzero(peaks)
    order = np.argsort(-smooth[ys, xs])
    return xs[order], ys[order]


def fit_kernel(
    target: np.ndarray,
    source: np.ndarray,
    variance: np.ndarray,
    bad: np.ndarray,
    xs: np.ndarray,
    ys: np.ndarray,
    weights: np.ndarray,
    *,
    half: int,
    stamp: int,
    min_stars: int,
    centre: tuple[float, float] | None = None,
    scale: float = 1.0,
) -> KernelFit | None:
    """Set up the fit of ``target ≈ kernel ⊛ source + c`` on stamps around the stars at (``xs``, ``ys``).

    Parameters
    ----------
    target, source : numpy.ndarray
        The broader and the sharper image, aligned and background-subtracted (same shape).
    variance : numpy.ndarray
        Variance of ``target - kernel ⊛ source`` per pixel (ADU², target units).
    bad : numpy.ndarray
        Invalid pixels; a star with one within its stamp widened by the kernel is not used.
    xs, ys : numpy.ndarray
        Integer pixel positions of the stars.
    weights : numpy.ndarray
        Each star's weight (> 0) in the fit, on top of its pixels' variance (e.g. the blending
        weight of a ZOGY tile at the star).
    half : int
        Half-size of the kernel (px): (2 half + 1)² delta functions.
    stamp : int
        Half-size of a star's stamp (px).
    min_stars : int
        Fewest usable stars; fewer, or fewer stamp pixels than 10 per unknown, returns None.
    centre : tuple of float, optional
        With it, the kernel varies linearly across the stars: ``K + (x - cx) / scale Kx +
        (y - cy) / scale Ky``, the gradients of half-size ``max(1, half // 2)`` with sum and first
        moments 0 (the flux ratio stays constant); the kernel solved for is the one at the
        centre, wherever the brightest stars lie. Without it, one kernel for every star.
    scale : float, optional
        Length (px) of the gradient terms' unit.

    Returns
    -------
    KernelFit or None
        The system (with a constant background) on the usable stars but those whose mean chi²
        per pixel, with the kernel's sum free, exceeds :data:`CLIP` times the median.
    """
    from numpy.lib.stride_tricks import sliding_window_view

    ny, nx = target.shape
    reach = half + stamp
    side = 2 * stamp + 1
    grad = max(1, half // 2)
    # the gradient terms use the central (2 grad + 1)² of the kernel's delta functions
    inner = np.zeros((2 * half + 1, 2 * half + 1), bool)
    inner[half - grad : half + grad + 1, half - grad : half + grad + 1] = True
    normal, projected, energy, kept = [], [], [], []
    for x, y, weight in zip(xs, ys, weights):
        if x < reach or y < reach or x + reach >= nx or y + reach >= ny:
            continue
        win = (slice(y - reach, y + reach + 1), slice(x - reach, x + reach + 1))
        if bad[win].any():
            continue
        core = (slice(y - stamp, y + stamp + 1), slice(x - stamp, x + stamp + 1))
        w = np.sqrt(weight / np.maximum(variance[core], np.finfo(np.float32).tiny)).ravel()
        # column (v, u): the source shifted by (v - half, u - half) under the stamp
        shifted = sliding_window_view(source[win], (side, side)).reshape(-1, side * side).T
        terms = [shifted]
        if centre is not None:
            terms += [shifted[:, inner.ravel()] * ((c - c0) / scale) for c, c0 in ((x, centre[0]), (y, centre[1]))]
        a = np.column_stack([*terms, np.ones(side * side)]) * w[:, None]
        b = target[core].ravel() * w
        normal.append(a.T @ a)
        projected.append(a.T @ b)
        energy.append(b @ b)
        kept.append(weight)
    blocks = [half] + ([grad, grad] if centre is not None else [])
    n_all = sum((2 * h + 1) ** 2 for h in blocks) + 1
    if len(normal) < min_stars or len(normal) * side * side < 10 * n_all:
        return None
    # constraints on the correlation coefficients (the kernel is them flipped): each block's first
    # moments (0), the gradients' sums (0), and last the kernel's sum
    rows = []
    start = 0
    for i, h in enumerate(blocks):
        offsets = np.arange(-h, h + 1, dtype=float)
        block = slice(start, start + (2 * h + 1) ** 2)
        for values in (np.tile(offsets, 2 * h + 1), np.repeat(offsets, 2 * h + 1)) + ((1.0,) if i else ()):
            rows.append(np.zeros(n_all))
            rows[-1][block] = values
        start = block.stop
    rows.append(np.zeros(n_all))
    rows[-1][: (2 * half + 1) ** 2] = 1.0
    normal_, projected_, scale_ = np.array(normal), np.array(projected), np.array(kept) * side * side
    constraints = np.array(rows)
    use = np.ones(len(normal), bool)
    for _ in range(_CLIP_ITERATIONS):
        coef = KernelFit(half, normal_[use].sum(0), projected_[use].sum(0), constraints, 0, 0, 1.0).coefficients()
        # each star's chi² from its normal equations, per pixel, without its blending weight
        chi2 = (np.array(energy) - 2 * projected_ @ coef + np.einsum("i,sij,j->s", coef, normal_, coef)) / scale_
        clipped = chi2 <= CLIP * np.median(chi2[use])
        if np.array_equal(clipped, use):
            break
        use = clipped
    return KernelFit(
        half,
        normal_[use].sum(0),
        projected_[use].sum(0),
        constraints,
        int(use.sum()),
        int((~use).sum()),
        float(np.median(chi2[use])),
    )
