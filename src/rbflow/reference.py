"""Stacking the frames of one epoch into a deep reference frame.

Every frame is resampled onto the pixel grid of the first one through the WCSs (astropy evaluates
any distortion, e.g. DECam's TPV polynomials), refined on matched stars
(:func:`rbflow.align.align`), background-matched (constant offset: the clipped median of its
difference with the first frame), flux-scaled to the first frame (median flux ratio of the
alignment stars; the zeropoint ratio when fewer than 3 stars are matched) and combined by an
inverse-variance weighted mean (or a median), with a per-pixel rejection of outliers (cosmic
rays, satellite trails) against the median of the frames.

The stack keeps the first frame's WCS and photometric scale (its zeropoint and ``EXPTIME``), and
carries the noise facts of the combination under the telescope's header keys, so that
:func:`rbflow.frames.frame_info` reads it like any frame. For normalised weights ``W_i`` and flux
scales ``s_i``:

* effective gain ``g = 1 / sum(W_i**2 s_i / g_i)`` (``N g_1`` for N equal frames);
* read noise ``r = g sqrt(sum(W_i**2 s_i**2 r_i**2 / g_i**2))`` (e-, ``sqrt(N) r_1``);
* saturation ``min_i s_i (sat_i - b_i)`` (ADU, ``b_i`` the background offset removed); a pixel
  saturated in any frame is set to that level so that later stages mask it.

A median is ``pi/2`` times noisier than the mean of Gaussian frames; the gain is divided by that
factor (and the read noise scaled to match) when ``combine='median'``.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.stats import sigma_clipped_stats
from astropy.utils.exceptions import AstropyUserWarning

from rbflow.align import MASK_BITS, align
from rbflow.errors import InputError
from rbflow.frames import FrameInfo, frame_hdu, frame_info
from rbflow.io import Image, read_image, write_fits

__all__ = ["COMBINE", "stack_reference", "run_reference"]

log = logging.getLogger(__name__)

#: Combination methods of :func:`stack_reference`.
COMBINE = ("mean", "median")

#: Fraction of the median signal added to the noise of the rejection test, so that seeing
#: differences between the frames do not reject the cores of stars.
_CLIP_SIGNAL_FRACTION = 0.1


def _clipped(values: np.ndarray) -> tuple[float, float]:
    """Sigma-clipped median and standard deviation (3 sigma) of the finite values."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyUserWarning)
        _, med, std = sigma_clipped_stats(values[np.isfinite(values)], sigma=3.0, maxiters=10)
    return float(med), float(std)


def _aperture_flux(data: np.ndarray, bad: np.ndarray, x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
    """Sum of background-subtracted pixels within ``radius`` of each position (NaN if it has a bad pixel)."""
    r = int(math.ceil(radius))
    off = np.arange(-r, r + 1)
    inside = (off[None, :] ** 2 + off[:, None] ** 2) <= radius**2
    ix = np.rint(x).astype(int)
    iy = np.rint(y).astype(int)
    ny, nx = data.shape
    flux = np.full(x.size, np.nan)
    for k in range(x.size):
        y0, y1, x0, x1 = iy[k] - r, iy[k] + r + 1, ix[k] - r, ix[k] + r + 1
        if y0 < 0 or x0 < 0 or y1 > ny or x1 > nx:
            continue
        if bad[y0:y1, x0:x1][inside].any():
            continue
        flux[k] = float(data[y0:y1, x0:x1][inside].sum())
    return flux


def _flux_scale(
    first: np.ndarray, other: np.ndarray, bad: np.ndarray, stars: dict[str, np.ndarray], radius: float
) -> tuple[float, int]:
    """Median ratio first/other of aperture fluxes of the alignment stars, and the stars used."""
    f0 = _aperture_flux(first, bad, stars["x"], stars["y"], radius)
    f1 = _aperture_flux(other, bad, stars["x"], stars["y"], radius)
    ok = np.isfinite(f0) & np.isfinite(f1) & (f0 > 0) & (f1 > 0)
    if ok.sum() < 3:
        return float("nan"), int(ok.sum())
    return float(np.median(f0[ok] / f1[ok])), int(ok.sum())


def stack_reference(
    paths: Sequence[str | os.PathLike],
    out_path: str | os.PathLike,
    telescope: dict[str, Any],
    *,
    combine: str = "mean",
    clip: float | None = 5.0,
    refine: bool = True,
    smooth: bool = False,
    scale: bool = True,
) -> dict[str, Any]:
    """Align, background-match, scale and combine frames of one epoch into a reference frame.

    Parameters
    ----------
    paths : sequence of path-like
        Frames to stack (at least one); the first one gives the pixel grid, WCS and photometric scale.
    out_path : path-like
        Output FITS file (written atomically): float32 primary image (NaN where no frame is valid)
        with the first frame's header and WCS, updated noise cards, and an ``NCOMB`` extension
        (uint8, number of frames combined per pixel).
    telescope : dict
        Validated telescope configuration (instrument facts and ``header`` keys).
    combine : {'mean', 'median'}, optional
        Inverse-variance weighted mean, or median.
    clip : float or None, optional
        Reject a pixel of a frame deviating from the median of the frames by more than ``clip``
        times its expected noise (sky, Poisson and 10 % of the signal); None or fewer than 3
        frames: no rejection.
    refine : bool, optional
        Refine the WCS alignment with an affine fit to matched stars.
    smooth : bool, optional
        With ``refine``: and a smooth map of what the affine leaves, when cross-validation
        prefers it (:func:`rbflow.align.fit_smooth`).
    scale : bool, optional
        Scale each frame to the first one's flux scale (matched stars; zeropoints as fallback).
        False only applies the zeropoint ratio.

    Returns
    -------
    dict
        ``n`` (frames), ``gain`` (e-/ADU), ``read_noise`` (e-), ``saturation`` (ADU),
        ``zeropoint`` (mag), ``sky_sigma`` (ADU, clipped std of the stack), ``scales``,
        ``offsets`` (ADU), ``weights`` (normalised), ``align_rms`` (px, per frame).

    Raises
    ------
    InputError
        No frame given, an unknown ``combine``, unreadable frames or frames without a WCS.
    """
    if not paths:
        raise InputError(f"reference '{out_path}': no frame to stack; list the epoch's files in 'frames.reference'")
    if combine not in COMBINE:
        raise InputError(f"reference '{out_path}': combine {combine!r} is not one of {', '.join(COMBINE)}")
    images: list[Image] = [read_image(p, hdu=frame_hdu(telescope)) for p in paths]
    infos: list[FrameInfo] = [frame_info(im.header, telescope, path=im.path) for im in images]
    first, info0 = images[0], infos[0]
    shape = first.data.shape
    fwhm0 = info0.fwhm_guess or 4.0
    n = len(images)

    data = np.empty((n, *shape), np.float32)
    bad = np.zeros((n, *shape), bool)
    sat = np.zeros((n, *shape), bool)
    data[0] = first.data
    sat[0] = np.nan_to_num(first.data, nan=0.0) >= info0.saturation
    bad[0] = ~np.isfinite(first.data) | sat[0]
    rms = [float("nan")]
    stars: list[dict[str, np.ndarray]] = [{"x": np.zeros(0), "y": np.zeros(0)}]
    if n > 1:
        first.require_wcs()
    for k in range(1, n):
        im, info = images[k], infos[k]
        aligned, mask, ainfo = align(
            first,
            im,
            refine=refine,
            smooth=smooth,
            saturation_sci=info0.saturation,
            saturation_ref=info.saturation,
            fwhm_sci=fwhm0,
            fwhm_ref=info.fwhm_guess or fwhm0,
            grow=1,
        )
        data[k] = aligned
        sat[k] = (mask & MASK_BITS["SATURATED"]) > 0
        bad[k] = (mask != 0) | ~np.isfinite(aligned)
        rms.append(float(ainfo["rms"]))
        stars.append(ainfo["stars"])

    # background offsets against the first frame, on the pixels valid in both (stars cancel)
    offsets = np.zeros(n)
    for k in range(1, n):
        both = ~bad[0] & ~bad[k]
        offsets[k] = _clipped((data[k] - data[0])[both])[0] if both.any() else 0.0
    data -= offsets[:, None, None].astype(np.float32)

    # flux scales to the first frame
    scales = np.ones(n)
    radius = 2.0 * max([fwhm0] + [i.fwhm_guess or fwhm0 for i in infos])
    for k in range(1, n):
        zp_ratio = 10 ** (-0.4 * (infos[k].zeropoint - info0.zeropoint))
        measured, used = (float("nan"), 0)
        if scale:
            measured, used = _flux_scale(data[0], data[k], bad[0] | bad[k], stars[k], radius)
        scales[k] = measured if math.isfinite(measured) else zp_ratio
        log.info(
            "stack: frame '%s': offset %.2f ADU, flux scale %.4f (%s), alignment rms %.3f px",
            images[k].path,
            offsets[k],
            scales[k],
            f"{used} stars" if math.isfinite(measured) else "zeropoints",
            rms[k],
        )
    data *= scales[:, None, None].astype(np.float32)

    sky_sig = np.array([_clipped(data[k][~bad[k]])[1] for k in range(n)])
    gains = np.array([i.gain for i in infos])
    read_noise = np.array([i.read_noise for i in infos])
    weights = 1.0 / sky_sig**2
    weights /= weights.sum()

    values = np.where(bad, np.nan, data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels
        med = np.nanmedian(values, axis=0)
    if clip is not None and n >= 3:
        signal = np.maximum(np.nan_to_num(med), 0.0)
        noise = np.sqrt(
            sky_sig[:, None, None] ** 2
            + signal[None] * (scales / gains)[:, None, None]
            + (_CLIP_SIGNAL_FRACTION * signal[None]) ** 2
        )
        reject = np.abs(values - med[None]) > clip * noise
        log.info("stack: %d pixels rejected (> %.1f sigma from the median)", int(reject.sum()), clip)
        values = np.where(reject, np.nan, values)
    good = np.isfinite(values)
    ncomb = good.sum(axis=0)
    if combine == "mean":
        w = np.where(good, weights[:, None, None], 0.0)
        wsum = w.sum(axis=0)
        out = np.where(ncomb > 0, np.nansum(values * w, axis=0) / np.where(wsum > 0, wsum, 1.0), np.nan)
        w_eff = weights
        efficiency = 1.0
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out = np.nanmedian(values, axis=0)
        w_eff = np.full(n, 1.0 / n)
        efficiency = 2.0 / math.pi
    out = out.astype(np.float32)

    gain = efficiency / float(np.sum(w_eff**2 * scales / gains))
    rn = gain * math.sqrt(float(np.sum(w_eff**2 * scales**2 * read_noise**2 / gains**2)) / efficiency)
    saturation = float(np.min(scales * (np.array([i.saturation for i in infos]) - offsets)))
    any_sat = sat.any(axis=0)
    out[any_sat] = saturation
    sky_sigma = _clipped(out[np.isfinite(out) & ~any_sat])[1]

    hdr = first.header.copy()
    for key in ("CHECKSUM", "DATASUM", "BSCALE", "BZERO", "EXTNAME"):
        hdr.remove(key, ignore_missing=True, remove_all=True)
    keys = telescope["header"]
    hdr[keys["gain"]] = (gain, "[e-/ADU] stack effective gain")
    hdr[keys["read_noise"]] = (rn, "[e-] stack effective read noise")
    hdr[keys["saturation"]] = (saturation, "[ADU] lowest scaled input saturation")
    hdr[keys["zeropoint"]] = (info0.zeropoint, "[mag] zeropoint for 1 ADU")
    hdr[keys["exptime"]] = (info0.exptime, "[s] exposure of the first frame")
    fwhms = [i.fwhm_guess for i in infos if i.fwhm_guess]
    if fwhms:
        hdr[keys["fwhm"]] = (float(np.median(fwhms)), "[px] median input seeing")
    hdr["TEXPTIME"] = (float(sum(i.exptime for i in infos)), "[s] total input exposure")
    hdr["NCOMBINE"] = (n, "frames combined")
    hdr["STACKMTH"] = (combine, "stack combination")
    hdr["STACKCLP"] = (clip if clip is not None else "none", "[sigma] rejection threshold")
    for k, p in enumerate(paths, start=1):
        hdr[f"IMCMB{k:03d}"] = (Path(p).name, "input frame")
        hdr[f"SCALE{k:03d}"] = (float(scales[k - 1]), "flux scale to frame 1")
        hdr[f"OFFST{k:03d}"] = (float(offsets[k - 1]), "[ADU] background offset")
        hdr[f"WGHT{k:03d}"] = (float(w_eff[k - 1]), "normalised weight")
    primary = fits.PrimaryHDU(out, header=hdr)
    write_fits(fits.HDUList([primary, fits.ImageHDU(ncomb.astype(np.uint8), name="NCOMB")]), out_path)
    log.info(
        "stack: %d frames -> '%s' (%s): gain %.2f e-/ADU, read noise %.1f e-, saturation %.0f ADU, sky rms %.2f ADU",
        n,
        out_path,
        combine,
        gain,
        rn,
        saturation,
        sky_sigma,
    )
    return {
        "n": n,
        "gain": gain,
        "read_noise": rn,
        "saturation": saturation,
        "zeropoint": info0.zeropoint,
        "sky_sigma": sky_sigma,
        "scales": scales.tolist(),
        "offsets": offsets.tolist(),
        "weights": w_eff.tolist(),
        "align_rms": rms,
    }


def _usable_frames(paths: Sequence[str], telescope: dict[str, Any], out_fits: str) -> list[str]:
    """The frames that read, have their facts and a WCS; the others are logged and left out."""
    usable = []
    for path in paths:
        try:
            image = read_image(path, hdu=frame_hdu(telescope))
            frame_info(image.header, telescope, path=path)
            image.require_wcs()
        except InputError as exc:
            log.warning("reference '%s': leaving a bad frame out of the stack (on_bad_frame: skip): %s", out_fits, exc)
            continue
        usable.append(path)
    if not usable:
        raise InputError(
            f"reference '{out_fits}': every frame of the reference epoch is bad (see the log): fix or replace "
            "the files listed in 'frames.reference'"
        )
    return usable


def run_reference(
    *,
    frames: Sequence[str],
    out_fits: str,
    telescope: dict[str, Any],
    stack: dict[str, Any],
    skip_bad: bool = False,
) -> dict[str, Any]:
    """Entry point of the ``reference`` rule: :func:`stack_reference` with the ``frames.stack`` settings.

    Parameters
    ----------
    frames : sequence of str
        Frames of the reference epoch, the first one giving the grid.
    out_fits : str
        Output file.
    telescope : dict
        Instrument facts of the telescope file.
    stack : dict
        The ``frames.stack`` block (``combine``, ``clip``, ``refine_astrometry``, ``scale``).
    skip_bad : bool, optional
        Leave out (with a warning) the frames that are unreadable, lack a frame fact or a WCS,
        instead of failing (``on_bad_frame: skip``); the ``IMCMBnnn`` cards list those stacked.

    Returns
    -------
    dict
        What :func:`stack_reference` returns.

    Raises
    ------
    InputError
        A bad frame (or, with ``skip_bad``, every frame is bad).
    """
    frames = _usable_frames(list(frames), telescope, out_fits) if skip_bad else list(frames)
    return stack_reference(
        frames,
        out_fits,
        telescope,
        combine=stack["combine"],
        clip=stack["clip"],
        refine=stack["refine_astrometry"],
        smooth=stack["smooth_astrometry"],
        scale=stack["scale"],
    )
