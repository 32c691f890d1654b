"""Candidate detection and forced PSF photometry on a ZOGY difference image.

Candidates are local maxima of ``SCORR`` (S/N in sigma, empirically normalised by
:mod:`rbflow.subtract`) above ``detect.threshold`` whose connected region above the threshold has
at least ``detect.min_pixels`` pixels. Each gets a sub-pixel position (parabola through the SCORR
peak), a forced PSF-fit flux on ``DIFF`` with the PSF of the difference (``PSFD`` of the nearest
tile; ``DIFF`` is in science flux units) with a constant local background, its error from
``VAR`` scaled for the noise correlation (header card ``FLXECORR`` of the subtraction), shape
moments and flags (:data:`FLAGS`).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import numpy as np
from astropy import units as u
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from rbflow.errors import InputError
from rbflow.frames import FrameInfo, frame_info
from rbflow.io import write_table
from rbflow.psf import PSFModel
from rbflow.stars import FWHM_TO_SIGMA, windowed_centroids

__all__ = ["FLAGS", "COLUMNS", "empty_table", "detect", "run_detect"]

log = logging.getLogger(__name__)

#: Candidate flag bits.
FLAGS = {"EDGE": 1, "NEGATIVE": 2, "DIPOLE": 4, "SATURATED": 8, "NEAR_BRIGHT": 16, "STREAK": 32}

#: Output columns: name, dtype, unit, description.
COLUMNS: list[tuple[str, str, u.UnitBase | None, str]] = [
    ("id", "U64", None, "candidate id {image}_{n}, n by decreasing snr"),
    ("image", "U64", None, "image name"),
    ("x", "f8", u.pix, "x (column), 0-based"),
    ("y", "f8", u.pix, "y (row), 0-based"),
    ("ra", "f8", u.deg, "right ascension"),
    ("dec", "f8", u.deg, "declination"),
    ("flux", "f8", u.adu, "forced PSF-fit flux on DIFF (science flux units)"),
    ("flux_err", "f8", u.adu, "error of flux"),
    ("mag", "f8", u.mag, "-2.5 log10(flux) + zeropoint (NaN for flux <= 0)"),
    ("mag_err", "f8", u.mag, "1.0857 flux_err / flux (NaN for flux <= 0)"),
    ("snr", "f8", None, "flux / flux_err"),
    ("scorr_peak", "f8", None, "SCORR at the peak pixel (sigma)"),
    ("fwhm", "f8", u.pix, "FWHM from windowed second moments on DIFF"),
    ("ellipticity", "f8", None, "1 - b/a from windowed second moments on DIFF"),
    ("dist_bright_star", "f8", u.pix, "distance to the nearest bright star (NaN if none)"),
    ("flags", "i4", None, "bitmask of rbflow.detect.FLAGS"),
]

#: Peak of a bright star, in units of the science background noise.
_BRIGHT_PEAK_SIGMA = 50.0
#: Flag STREAK (:func:`_on_streak`): the lowest |SCORR| (3 x 3 mean) level of a streak's pixels
#: (sigma; the higher levels step by sqrt 2), the half length of the line tried through a
#: candidate (FWHM), the fraction of it the feature must cover, and the most it may cover across.
_STREAK_SIGMA = 3.0
_STREAK_HALF = 6.0
_STREAK_ALONG = 0.85
_STREAK_ACROSS = 0.4
#: Directions tried (over 180 degrees).
_STREAK_ANGLES = 36
#: Flag STREAK for collinear candidates (:func:`_collinear`): the half width of the line (FWHM),
#: its shortest and longest span (FWHM), the closest two members may be along it to count apart
#: (FWHM), and the expected number of such lines among uniformly scattered candidates (the
#: a-contrario number of false alarms) below which a line is taken.
_CHAIN_HALF_WIDTH = 0.5
_CHAIN_SPAN = (8.0, 40.0)
_CHAIN_APART = 1.5
_CHAIN_NFA = 0.01


def empty_table(image_name: str = "") -> Table:
    """A candidate table with no rows but every column, dtype and unit.

    Parameters
    ----------
    image_name : str, optional
        Stored in ``meta['image']``.

    Returns
    -------
    astropy.table.Table
    """
    t = Table()
    for name, dtype, unit, desc in COLUMNS:
        t[name] = np.zeros(0, dtype=dtype)
        t[name].unit = unit
        t[name].description = desc
    t.meta["image"] = image_name
    return t


def _peaks(sc: np.ndarray, thr: float, min_pixels: int, sep: int) -> tuple[np.ndarray, np.ndarray]:
    """Local maxima of ``sc`` above ``thr`` in regions of >= min_pixels pixels, >= sep px apart."""
    from scipy import ndimage

    above = sc > thr
    lab, n = ndimage.label(above, structure=np.ones((3, 3)))
    if n == 0:
        return np.zeros(0, int), np.zeros(0, int)
    sizes = np.bincount(lab.ravel())
    footprint = np.hypot(*np.mgrid[-sep : sep + 1, -sep : sep + 1]) <= sep
    peak = above & (sc == ndimage.maximum_filter(sc, footprint=footprint, mode="constant", cval=-np.inf))
    peak &= sizes[lab] >= min_pixels
    py, px = np.nonzero(peak)
    return px, py


def _on_streak(score: np.ndarray, x: float, y: float, fwhm: float) -> bool:
    """Whether a candidate at (x, y) lies on a straight, thin feature of ``score`` (|SCORR|, 3 x 3 mean).

    Lines of half length :data:`_STREAK_HALF` FWHM are laid through the candidate in
    :data:`_STREAK_ANGLES` directions. At a level of ``score`` (from :data:`_STREAK_SIGMA` up to
    the largest value near the line, in steps of sqrt 2: a bright trail's wings are wide at a low
    level, a faint one only shows at a low level), the feature covers a line where a pixel above
    the level lies within 1 px of it. The candidate is on a streak when, at some level, a line
    is covered over at least :data:`_STREAK_ALONG` of its length and the line across it over at
    most :data:`_STREAK_ACROSS`: a satellite trail, a bad column or a chip edge, and not a point
    source, a dipole or a blob (which cover every direction alike, or none far enough), nor a
    short asteroid trail. Two trails that cross are both streaks.
    """
    from scipy import ndimage

    r = int(math.ceil(_STREAK_HALF * fwhm))
    ny, nx = score.shape
    ix, iy = int(round(x)), int(round(y))
    y0, x0 = max(0, iy - r - 1), max(0, ix - r - 1)
    win = score[y0 : min(ny, iy + r + 2), x0 : min(nx, ix + r + 2)]
    theta = np.pi * np.arange(_STREAK_ANGLES) / _STREAK_ANGLES
    t = np.arange(-r, r + 1, dtype=float)
    px = np.rint(x - x0 + np.cos(theta)[:, None] * t).astype(int)
    py = np.rint(y - y0 + np.sin(theta)[:, None] * t).astype(int)
    inside = (px >= 0) & (px < win.shape[1]) & (py >= 0) & (py < win.shape[0])
    pxc, pyc = np.clip(px, 0, win.shape[1] - 1), np.clip(py, 0, win.shape[0] - 1)
    level, top = _STREAK_SIGMA, float(np.max(win)) if win.size else 0.0
    while level < top:
        hit = ndimage.maximum_filter(win > level, size=3)[pyc, pxc] & inside
        cover = hit.sum(axis=1) / np.maximum(inside.sum(axis=1), 1)
        along = cover >= _STREAK_ALONG
        if not along.any():  # a higher level covers less
            return False
        if (along & (np.roll(cover, _STREAK_ANGLES // 2) <= _STREAK_ACROSS)).any():
            return True
        level *= math.sqrt(2.0)
    return False


def _collinear(x: np.ndarray, y: np.ndarray, fwhm: float, area: float, *, n_all: int | None = None) -> np.ndarray:
    """Candidates on a line of candidates too long to be chance: a dashed or broken trail.

    A trail that blinks (a tumbling satellite, a glint) or fades below the threshold between
    bright stretches leaves a row of separate candidates, which :func:`_on_streak` does not
    see: it needs the feature itself to cover a line. Every pair of candidates
    :data:`_CHAIN_SPAN` FWHM apart spans a segment; its members are the candidates within
    :data:`_CHAIN_HALF_WIDTH` FWHM of it, counted once per :data:`_CHAIN_APART` FWHM along it
    (candidates around one bright star or one blob count once). The segment is taken when its
    number of false alarms (Desolneux, Moisan & Morel 2000, IJCV 40 7), the number of segments
    tested times the chance that uniformly scattered candidates of the frame's density put as
    many members on it, is below :data:`_CHAIN_NFA`: over many frames of uniform candidates, at
    most about one in a hundred has such a line.

    Parameters
    ----------
    x, y : numpy.ndarray
        Candidate positions (px).
    fwhm : float
        FWHM (px).
    area : float
        Area (px^2) the candidates were searched in (the valid pixels of the frame).
    n_all : int, optional
        Candidates of the frame, when ``x``, ``y`` are some of them (those not yet flagged: the
        density, and so the chance of a line, is that of all). Default: ``x.size``.

    Returns
    -------
    numpy.ndarray
        Bool per candidate: a member of a taken segment.
    """
    from scipy.spatial import cKDTree

    # the binomial tail P(X >= k) is I_p(k, n - k + 1) (scipy.stats takes 0.4-0.65 s to import)
    from scipy.special import betainc

    n = x.size if n_all is None else max(int(n_all), x.size)
    out = np.zeros(x.size, bool)
    if x.size < 4 or area <= 0:
        return out
    lo, hi = (f * fwhm for f in _CHAIN_SPAN)
    pairs = cKDTree(np.c_[x, y]).query_pairs(hi, output_type="ndarray")
    if not len(pairs):
        return out
    i, j = pairs[:, 0], pairs[:, 1]
    length = np.hypot(x[j] - x[i], y[j] - y[i])
    keep = length >= lo
    i, j, length = i[keep], j[keep], length[keep]
    if not i.size:
        return out
    half = _CHAIN_HALF_WIDTH * fwhm
    apart = _CHAIN_APART * fwhm
    n_tests = i.size
    # chance that one other candidate falls within a segment's box
    p_in = np.minimum(2 * half * length / area, 1.0)
    for k in range(0, i.size, 2000):
        a, b, ln = i[k : k + 2000], j[k : k + 2000], length[k : k + 2000]
        ux, uy = (x[b] - x[a]) / ln, (y[b] - y[a]) / ln
        dx, dy = x[None, :] - x[a, None], y[None, :] - y[a, None]
        t = dx * ux[:, None] + dy * uy[:, None]
        s = np.abs(dx * uy[:, None] - dy * ux[:, None])
        member = (s <= half) & (t >= -1e-9) & (t <= ln[:, None] + 1e-9)
        rows = np.flatnonzero(member.sum(axis=1) >= 4)
        if not rows.size:
            continue
        along = np.sort(np.where(member[rows], t[rows], np.inf), axis=1)
        # members closer than `apart` along the segment count once; the ends are not counted
        with np.errstate(invalid="ignore"):  # inf - inf past the members
            count = (np.isfinite(along[:, 1:]) & (np.diff(along, axis=1) >= apart)).sum(axis=1) - 1
        # the chance of `count` or more of the n - 2 other candidates in the box (count >= 1)
        chance = betainc(np.maximum(count, 1), np.maximum(n - 1 - count, 1), p_in[k + rows])
        taken = rows[(count >= 2) & (n_tests * chance < _CHAIN_NFA)]
        out |= member[taken].any(axis=0)
    return out


def _subpixel(sc: np.ndarray, px: np.ndarray, py: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Parabola through the 3 pixels around each peak, per axis (offset clipped to +-0.5 px)."""
    ny, nx = sc.shape

    def offset(m: np.ndarray, c: np.ndarray, p: np.ndarray) -> np.ndarray:
        den = m - 2 * c + p
        with np.errstate(invalid="ignore", divide="ignore"):
            o = 0.5 * (m - p) / den
        return np.clip(np.where(np.isfinite(o) & (den < 0), o, 0.0), -0.5, 0.5)

    xm, xp = np.clip(px - 1, 0, nx - 1), np.clip(px + 1, 0, nx - 1)
    ym, yp = np.clip(py - 1, 0, ny - 1), np.clip(py + 1, 0, ny - 1)
    c = sc[py, px]
    ox = offset(sc[py, xm], c, sc[py, xp])
    oy = offset(sc[ym, px], c, sc[yp, px])
    inner = (px > 0) & (px < nx - 1) & (py > 0) & (py < ny - 1)
    return px + np.where(inner, ox, 0.0), py + np.where(inner, oy, 0.0)


def _forced_flux(
    D: np.ndarray, V: np.ndarray, psf: np.ndarray, x: float, y: float, radius: float
) -> tuple[float, float]:
    """Least-squares flux of the unit-sum ``psf`` shifted to (x, y), fitted with a constant local
    background within ``radius``; the error propagates the per-pixel variance ``V`` (white noise)."""
    from scipy import ndimage

    h = psf.shape[0] // 2
    ix, iy = int(round(x)), int(round(y))
    shifted = ndimage.shift(psf.astype(np.float64), (y - iy, x - ix), order=3, mode="constant", cval=0.0)
    y0, y1 = max(0, iy - h), min(D.shape[0], iy + h + 1)
    x0, x1 = max(0, ix - h), min(D.shape[1], ix + h + 1)
    p = shifted[y0 - iy + h : y1 - iy + h, x0 - ix + h : x1 - ix + h]
    d = D[y0:y1, x0:x1]
    v = V[y0:y1, x0:x1]
    yy, xx = np.mgrid[y0:y1, x0:x1]
    use = np.isfinite(d) & np.isfinite(v) & (v > 0) & (np.hypot(xx - x, yy - y) <= radius)
    if use.sum() < 4:
        return float("nan"), float("nan")
    # uniform weights: weights from VAR would include the candidate's own Poisson noise and bias low
    design = np.c_[p[use], np.ones(use.sum())]
    cov = np.linalg.pinv(design.T @ design)
    sol = cov @ (design.T @ d[use])
    var = cov @ (design.T * v[use]) @ design @ cov
    return float(sol[0]), float(math.sqrt(max(var[0, 0], 0.0)))


def _shape(D: np.ndarray, x: float, y: float, sigma_w: float, sign: float) -> tuple[float, float]:
    """FWHM and ellipticity from Gaussian-windowed second moments, corrected for the window."""
    r = int(math.ceil(3 * sigma_w))
    ix, iy = int(round(x)), int(round(y))
    y0, y1 = max(0, iy - r), min(D.shape[0], iy + r + 1)
    x0, x1 = max(0, ix - r), min(D.shape[1], ix + r + 1)
    d = np.nan_to_num(sign * D[y0:y1, x0:x1])
    yy, xx = np.mgrid[y0:y1, x0:x1]
    dx, dy = xx - x, yy - y
    w = np.exp(-(dx**2 + dy**2) / (2 * sigma_w**2)) * np.clip(d, 0, None)
    s = w.sum()
    if s <= 0:
        return float("nan"), float("nan")
    mxx, myy, mxy = (w * dx * dx).sum() / s, (w * dy * dy).sum() / s, (w * dx * dy).sum() / s
    tr, det = mxx + myy, mxx * myy - mxy**2
    disc = math.sqrt(max(tr**2 / 4 - det, 0.0))
    l1, l2 = tr / 2 + disc, tr / 2 - disc
    inv_w = 1.0 / sigma_w**2
    # a Gaussian of variance s2 seen through a Gaussian window of variance sw2 has moment 1/(1/s2 + 1/sw2)
    a2 = 1.0 / (1.0 / l1 - inv_w) if 0 < l1 and 1.0 / l1 > inv_w else float("nan")
    b2 = 1.0 / (1.0 / l2 - inv_w) if 0 < l2 and 1.0 / l2 > inv_w else float("nan")
    if not (np.isfinite(a2) and np.isfinite(b2)):
        return float("nan"), float("nan")
    fwhm = 2.0 * math.sqrt(2.0 * math.log(2.0)) * math.sqrt(math.sqrt(a2 * b2))
    return fwhm, 1.0 - math.sqrt(b2 / a2)


def _bright_stars(ref: np.ndarray, sigma_n: float) -> np.ndarray:
    """Positions (x, y) of bright stars: local maxima of REF (science flux units) above 50 sigma_n."""
    from scipy import ndimage

    r = np.nan_to_num(ref)
    peak = (r == ndimage.maximum_filter(r, size=5)) & (r > _BRIGHT_PEAK_SIGMA * sigma_n)
    py, px = np.nonzero(peak)
    return np.c_[px, py].astype(float)


def detect(
    hdul: fits.HDUList,
    psf: Any,
    info: FrameInfo,
    cfg: dict[str, Any],
    *,
    image_name: str,
    cutout_size: int,
    negative: bool = False,
) -> Table:
    """Find candidates on the SCORR map of a subtraction and measure them on DIFF.

    Parameters
    ----------
    hdul : astropy.io.fits.HDUList
        Output of :func:`rbflow.subtract.subtract_images` (SCI, REF, DIFF, SCORR, VAR, MASK, PSFD).
    psf : PSF model
        Science PSF (anything with ``fwhm(x, y)`` in pixels); sets the search radii.
    info : rbflow.frames.FrameInfo
        Science frame facts (the zeropoint is used for magnitudes).
    cfg : dict
        The telescope's ``detect`` block: ``threshold`` (sigma), ``min_pixels``.
    image_name : str
        Image name; ids are ``{image_name}_{n}``.
    cutout_size : int
        Stamp size (px) of the cutouts stage; a stamp crossing the frame edge sets flag EDGE.
    negative : bool, optional
        Also report negative peaks (flag NEGATIVE). Default: positive peaks only.

    Returns
    -------
    astropy.table.Table
        Columns :data:`COLUMNS`, sorted by decreasing snr; typed and empty (with a logged warning)
        when nothing is found.
    """
    from scipy import ndimage
    from scipy.spatial import cKDTree

    sc = hdul["SCORR"].data.astype(np.float64)
    D = hdul["DIFF"].data.astype(np.float64)
    V = hdul["VAR"].data.astype(np.float64)
    M = hdul["MASK"].data
    ref = hdul["REF"].data
    prim = hdul[0].header
    sigma_n = float(prim.get("SIGMAN", np.nanstd(hdul["SCI"].data)))
    psfd = hdul["PSFD"].data
    psfd = psfd[None] if psfd.ndim == 2 else psfd
    ph = hdul["PSFD"].header
    centres = np.array([[ph[f"TCX{k}"], ph[f"TCY{k}"]] for k in range(psfd.shape[0])], float)
    ny, nx = sc.shape
    thr = float(cfg.get("threshold", 5.0))
    min_pixels = int(cfg.get("min_pixels", 3))
    fwhm0 = max(float(psf.fwhm((nx - 1) / 2, (ny - 1) / 2)), 1.0)
    # science FWHM at each tile centre (evaluating a PSF model can be slow: once per tile)
    tile_fwhm = [max(float(psf.fwhm(cx, cy)), 1.0) for cx, cy in centres] if len(centres) > 1 else [fwhm0]
    sep = max(2, int(round(fwhm0)))

    # white-noise fit errors are scaled for the correlated noise of DIFF (see rbflow.subtract)
    corr = float(prim.get("FLXECORR", 1.0))
    finite = np.isfinite(sc)
    sc0 = np.where(finite, sc, 0.0)
    d0 = np.nan_to_num(D)
    signs = [1.0, -1.0] if negative else [1.0]
    rows: list[dict[str, Any]] = []
    bright = _bright_stars(ref, sigma_n)
    tree = cKDTree(bright) if len(bright) else None
    score = ndimage.uniform_filter(np.abs(sc0), size=3)
    wcs = WCS(hdul["DIFF"].header)
    half = cutout_size // 2
    ctree = cKDTree(centres)
    t_meta = {"flux_err_scale": corr}
    for sign in signs:
        px, py = _peaks(sign * sc0, thr, min_pixels, sep)
        xs, ys = _subpixel(sign * sc0, px, py)
        # the SCORR peak is flattened and pushed away from bright stars by the source-noise term:
        # refine on DIFF itself
        xw, yw = windowed_centroids(sign * d0, xs, ys, fwhm0 * FWHM_TO_SIGMA)
        moved = np.hypot(xw - xs, yw - ys)
        keep = np.isfinite(moved) & (moved < 0.6 * fwhm0)
        xs, ys = np.where(keep, xw, xs), np.where(keep, yw, ys)
        for ipx, ipy, x, y in zip(px, py, xs, ys):
            tile = int(ctree.query([x, y])[1])
            fw, pd = tile_fwhm[tile], psfd[tile]
            flux, err = _forced_flux(D, V, pd, x, y, radius=2.0 * fw)
            err *= corr
            flags = 0 if sign > 0 else FLAGS["NEGATIVE"]
            ix, iy = int(round(x)), int(round(y))
            if ix - half < 0 or iy - half < 0 or ix + half >= nx or iy + half >= ny:
                flags |= FLAGS["EDGE"]
            rr = int(math.ceil(2.0 * fw))
            win = (slice(max(0, iy - rr), min(ny, iy + rr + 1)), slice(max(0, ix - rr), min(nx, ix + rr + 1)))
            yy, xx = np.mgrid[win]
            disc = np.hypot(xx - x, yy - y) <= 2.0 * fw
            if np.min(np.where(disc, sign * sc0[win], np.inf)) < -thr:
                flags |= FLAGS["DIPOLE"]
            if (M[win][np.hypot(xx - x, yy - y) <= 1.5 * fw] != 0).any():
                flags |= FLAGS["SATURATED"]
            dist = float(tree.query([x, y])[0]) if tree is not None else float("nan")
            if np.isfinite(dist) and dist <= 3.0 * fw:
                flags |= FLAGS["NEAR_BRIGHT"]
            if _on_streak(score, x, y, fw):
                flags |= FLAGS["STREAK"]
            fwhm_m, ell = _shape(D, x, y, fw * FWHM_TO_SIGMA, sign)
            ok = np.isfinite(flux) and flux > 0
            rows.append(
                {
                    "x": float(x),
                    "y": float(y),
                    "flux": flux,
                    "flux_err": err,
                    "mag": -2.5 * math.log10(flux) + info.zeropoint if ok else float("nan"),
                    "mag_err": 1.0857362047581294 * err / flux if ok else float("nan"),
                    "snr": flux / err if np.isfinite(err) and err > 0 else float("nan"),
                    "scorr_peak": float(sc[ipy, ipx]),
                    "fwhm": fwhm_m,
                    "ellipticity": ell,
                    "dist_bright_star": dist,
                    "flags": flags,
                }
            )
    # rows of candidates: the ones not on a streak yet, in a frame of all of them
    free = np.array([not r["flags"] & FLAGS["STREAK"] for r in rows], bool)
    if free.any():
        xy = np.array([[r["x"], r["y"]] for r in rows])[free]
        chained = _collinear(xy[:, 0], xy[:, 1], fwhm0, float(finite.sum()), n_all=len(rows))
        for r in np.flatnonzero(free)[chained]:
            rows[r]["flags"] |= FLAGS["STREAK"]
    if not rows:
        log.warning("detect: no candidate above %.1f sigma on image '%s'", thr, image_name)
        empty = empty_table(image_name)
        empty.meta.update(t_meta)
        return empty
    order = sorted(range(len(rows)), key=lambda i: -np.nan_to_num(rows[i]["snr"], nan=-np.inf))
    t = empty_table(image_name)
    x = np.array([rows[i]["x"] for i in order])
    y = np.array([rows[i]["y"] for i in order])
    ra, dec = wcs.pixel_to_world_values(x, y)
    data: dict[str, Any] = {
        "id": [f"{image_name}_{n}" for n in range(len(order))],
        "image": [image_name] * len(order),
        "ra": np.asarray(ra, float),
        "dec": np.asarray(dec, float),
    }
    for name, *_ in COLUMNS:
        if name not in data:
            data[name] = [rows[i][name] for i in order]
    out = Table()
    for name, dtype, unit, desc in COLUMNS:
        out[name] = np.asarray(data[name], dtype=dtype)
        out[name].unit = unit
        out[name].description = desc
    out.meta.update(t.meta)
    out.meta.update(t_meta)
    out.meta["threshold"] = thr
    out.meta["min_pixels"] = min_pixels
    log.info("detect: %d candidates on image '%s'", len(out), image_name)
    return out


def run_detect(
    subtract_path: str | os.PathLike,
    sci_psf_path: str | os.PathLike,
    out_table: str | os.PathLike,
    telescope: dict[str, Any],
    *,
    image_name: str,
) -> None:
    """Detect candidates on a subtraction file and write them as ECSV.

    Parameters
    ----------
    subtract_path : path-like
        MEF written by :func:`rbflow.subtract.run_subtract`.
    sci_psf_path : path-like
        Science PSF model (:meth:`rbflow.psf.PSFModel.read`).
    out_table : path-like
        Output ECSV table.
    telescope : dict
        Validated telescope configuration (blocks ``detect`` and ``cutout``, frame facts).
    image_name : str
        Image name for the ids.

    Raises
    ------
    InputError
        The subtraction file is missing or lacks an extension.
    """
    if not os.path.exists(subtract_path):
        raise InputError(f"subtraction '{subtract_path}' does not exist: run the subtract stage first")
    with fits.open(subtract_path, memmap=False) as hdul:
        missing = [e for e in ("SCI", "REF", "DIFF", "SCORR", "VAR", "MASK", "PSFD") if e not in hdul]
        if missing:
            raise InputError(
                f"subtraction '{subtract_path}' lacks extension(s) {', '.join(missing)}: "
                "delete it and rerun the subtract stage"
            )
        info = frame_info(hdul["SCI"].header, telescope, path=subtract_path)
        table = detect(
            hdul,
            PSFModel.read(sci_psf_path),
            info,
            telescope["detect"],
            image_name=image_name,
            cutout_size=int(telescope["cutout"]["size"]),
        )
    table.meta["source"] = f"rbflow.detect on {os.path.basename(str(subtract_path))}"
    write_table(table, out_table)
