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

:func:`kernel_stars` picks the stars, :func:`star_products` computes each one's share of the
least squares once, :func:`fit_kernel` sets up the fit on those of a region and
:meth:`KernelFit.kernel` solves it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["KernelFit", "StarProducts", "kernel_stars", "star_products", "fit_kernel", "kernel_half_size"]

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


def _kkt(normal: np.ndarray, constraints: np.ndarray) -> np.ndarray:
    """The matrix of the least squares of ``normal`` under the linear equality ``constraints``
    (rows), with their Lagrange multipliers."""
    k = len(constraints)
    return np.block([[normal, constraints.T], [constraints, np.zeros((k, k))]])


def _solve(normal: np.ndarray, projected: np.ndarray, constraints: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The least-squares coefficients of ``normal``, ``projected`` with ``constraints`` @ c = ``values``."""
    return np.linalg.solve(_kkt(normal, constraints), np.concatenate([projected, values]))[: len(projected)]


@dataclass
class KernelFit:
    """The weighted least-squares system of a kernel fit (:func:`fit_kernel`) on the stars
    ``stars`` (indices into its :class:`StarProducts`; ``n_clipped`` left out): normal matrix,
    projected data and the linear constraints (first moments 0, the gradients' sums 0) on the
    coefficients, the kernel's sum last; ``chi2`` the median reduced chi² of the stars."""

    half: int
    normal: np.ndarray
    projected: np.ndarray
    constraints: np.ndarray
    stars: np.ndarray
    n_clipped: int
    chi2: float

    @property
    def n_stars(self) -> int:
        """How many stars the kernel is fitted on."""
        return len(self.stars)

    def coefficients(self, total: float | None = None) -> np.ndarray:
        """All fitted coefficients (kernel, gradients, background), the kernel's sum ``total``
        (None: as the stars say)."""
        if total is None:
            return _solve(self.normal, self.projected, self.constraints[:-1], np.zeros(len(self.constraints) - 1))
        values = np.zeros(len(self.constraints))
        values[-1] = total
        return _solve(self.normal, self.projected, self.constraints, values)

    def sum_error(self) -> float:
        """Standard error of the kernel's sum fitted free (the flux ratio the stars say): from
        the constrained covariance, scaled by the stars' reduced chi² where it exceeds 1."""
        n = len(self.projected)
        cov = np.linalg.inv(_kkt(self.normal, self.constraints[:-1]))[:n, :n]
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


def kernel_stars(image: np.ndarray, bad: np.ndarray, noise: float, fwhm: float) -> tuple[np.ndarray, np.ndarray]:
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


@dataclass
class StarProducts:
    """Each usable star's weighted least-squares products for :func:`fit_kernel`, computed once
    per image pair (:func:`star_products`): the stars' integer positions ``xs``, ``ys``; ``gram``
    (n, m, m) and ``projected`` (n, m), the products of the design [source shifted by each of the
    kernel's offsets, 1] with itself and with the target over the star's stamp, each pixel weighed
    by the inverse variance (m = (2 half + 1)² + 1); ``energy`` (n,) the target's weighted sum of
    squares; ``half`` and ``pixels`` (per stamp)."""

    xs: np.ndarray
    ys: np.ndarray
    gram: np.ndarray
    projected: np.ndarray
    energy: np.ndarray
    half: int
    pixels: int


def star_products(
    target: np.ndarray,
    source: np.ndarray,
    variance: np.ndarray,
    bad: np.ndarray,
    xs: np.ndarray,
    ys: np.ndarray,
    *,
    half: int,
    stamp: int,
) -> StarProducts:
    """The products of :class:`StarProducts` for the stars at (``xs``, ``ys``) where ``target ≈
    kernel ⊛ source + c`` is to be fitted.

    Parameters
    ----------
    target, source : numpy.ndarray
        The broader and the sharper image, aligned and background-subtracted (same shape).
    variance : numpy.ndarray
        Variance of ``target - kernel ⊛ source`` per pixel (ADU², target units).
    bad : numpy.ndarray
        Invalid pixels; a star with one within its stamp widened by the kernel is left out, as is
        one whose stamp so widened leaves the frame.
    xs, ys : numpy.ndarray
        Integer pixel positions of the stars.
    half : int
        Half-size of the kernel (px): (2 half + 1)² delta functions.
    stamp : int
        Half-size of a star's stamp (px).
    """
    from numpy.lib.stride_tricks import sliding_window_view

    ny, nx = target.shape
    reach = half + stamp
    side = 2 * stamp + 1
    m = (2 * half + 1) ** 2 + 1
    keep, gram, projected, energy = [], [], [], []
    for i, (x, y) in enumerate(zip(xs, ys)):
        if x < reach or y < reach or x + reach >= nx or y + reach >= ny:
            continue
        win = (slice(y - reach, y + reach + 1), slice(x - reach, x + reach + 1))
        if bad[win].any():
            continue
        core = (slice(y - stamp, y + stamp + 1), slice(x - stamp, x + stamp + 1))
        w = 1.0 / np.sqrt(np.maximum(variance[core], np.finfo(np.float32).tiny)).ravel()
        # column (v, u): the source shifted by (v - half, u - half) under the stamp; last, 1
        design = np.empty((side * side, m))
        design[:, :-1] = sliding_window_view(source[win], (side, side)).reshape(-1, side * side).T
        design[:, -1] = 1.0
        design *= w[:, None]
        b = target[core].ravel() * w
        keep.append(i)
        gram.append(design.T @ design)
        projected.append(design.T @ b)
        energy.append(b @ b)
    keep_ = np.asarray(keep, int)
    return StarProducts(
        np.asarray(xs)[keep_],
        np.asarray(ys)[keep_],
        np.asarray(gram).reshape(-1, m, m),
        np.asarray(projected).reshape(-1, m),
        np.asarray(energy, float),
        half,
        side * side,
    )


def fit_kernel(
    products: StarProducts,
    index: np.ndarray,
    weights: np.ndarray,
    *,
    min_stars: int,
    centre: tuple[float, float] | None = None,
    scale: float = 1.0,
) -> KernelFit | None:
    """Set up the fit of ``target ≈ kernel ⊛ source + c`` on the stars ``index`` of ``products``.

    Parameters
    ----------
    products : StarProducts
        The stars' products (:func:`star_products`).
    index : numpy.ndarray
        Which of them to fit on.
    weights : numpy.ndarray
        Each of those stars' weight (> 0) in the fit, on top of its pixels' variance (e.g. the
        blending weight of a ZOGY tile at the star).
    min_stars : int
        Fewest stars; fewer, or fewer stamp pixels than 10 per unknown, returns None.
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
        The system (with a constant background) on the stars but those whose mean chi² per
        pixel, with the kernel's sum free, exceeds :data:`CLIP` times the median.
    """
    half = products.half
    n_par = (2 * half + 1) ** 2
    grad = max(1, half // 2)
    # the gradient terms use the central (2 grad + 1)² of the kernel's delta functions
    inner_mask = np.zeros((2 * half + 1, 2 * half + 1), bool)
    inner_mask[half - grad : half + grad + 1, half - grad : half + grad + 1] = True
    inner = np.flatnonzero(inner_mask.ravel())
    blocks = [half] + ([grad, grad] if centre is not None else [])
    n_all = sum((2 * h + 1) ** 2 for h in blocks) + 1
    index = np.asarray(index, int)
    if len(index) < min_stars or len(index) * products.pixels < 10 * n_all:
        return None
    # each star's design is its base design [S, 1] mapped onto all the coefficients: the parts
    # [S, gx S_inner, gy S_inner, 1], each the base columns `parts[a]` times the star's factor
    # `factors[kind[a]]` (1, gx or gy)
    parts = [np.arange(n_par)] + ([inner, inner] if centre is not None else []) + [np.array([n_par])]
    kind = [0, 1, 2, 0] if centre is not None else [0, 0]
    factors = np.ones((3, len(index)))
    if centre is not None:
        factors[1] = (products.xs[index] - centre[0]) / scale
        factors[2] = (products.ys[index] - centre[1]) / scale
    offsets = np.cumsum([0] + [len(p) for p in parts])
    omega = np.asarray(weights, float)
    gram, projected = products.gram[index], products.projected[index]

    def normal_equations(use: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The normal matrix and projected data of the stars ``use``."""
        w, f = omega[use], factors[:, use]
        keys = [(i, j) for i in sorted(set(kind)) for j in sorted(set(kind)) if i <= j]
        weighted = np.stack([w * f[i] * f[j] for i, j in keys]) @ gram[use].reshape(len(w), -1)
        sums = dict(zip(keys, weighted.reshape(len(keys), *gram.shape[1:])))
        normal = np.empty((n_all, n_all))
        rhs = np.empty(n_all)
        for a, pa in enumerate(parts):
            rhs[offsets[a] : offsets[a + 1]] = (w * f[kind[a]]) @ projected[use][:, pa]
            for b, pb in enumerate(parts):
                block = sums[min(kind[a], kind[b]), max(kind[a], kind[b])][np.ix_(pa, pb)]
                normal[offsets[a] : offsets[a + 1], offsets[b] : offsets[b + 1]] = block
        return normal, rhs

    # constraints on the correlation coefficients (the kernel is them flipped): each block's first
    # moments (0), the gradients' sums (0), and last the kernel's sum
    rows = []
    start = 0
    for i, h in enumerate(blocks):
        offs = np.arange(-h, h + 1, dtype=float)
        block = slice(start, start + (2 * h + 1) ** 2)
        for values in (np.tile(offs, 2 * h + 1), np.repeat(offs, 2 * h + 1)) + ((1.0,) if i else ()):
            rows.append(np.zeros(n_all))
            rows[-1][block] = values
        start = block.stop
    rows.append(np.zeros(n_all))
    rows[-1][:n_par] = 1.0
    constraints = np.array(rows)
    use = np.ones(len(index), bool)
    normal, rhs = normal_equations(use)
    for _ in range(_CLIP_ITERATIONS):
        coef = _solve(normal, rhs, constraints[:-1], np.zeros(len(constraints) - 1))
        # each star's base coefficients u = E coef, and its chi² per pixel (without its weight)
        u = np.zeros((len(index), n_par + 1))
        for a, pa in enumerate(parts):
            u[:, pa] += factors[kind[a], :, None] * coef[offsets[a] : offsets[a + 1]][None, :]
        quadratic = np.einsum("sj,sj->s", np.matmul(gram, u[:, :, None])[:, :, 0], u)
        chi2 = products.energy[index] - 2 * np.einsum("sj,sj->s", u, projected) + quadratic
        chi2 /= products.pixels
        clipped = chi2 <= CLIP * np.median(chi2[use])
        if np.array_equal(clipped, use):
            break
        use = clipped
        normal, rhs = normal_equations(use)
    return KernelFit(half, normal, rhs, constraints, index[use], int((~use).sum()), float(np.median(chi2[use])))
