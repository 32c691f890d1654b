"""Cheap per-frame checks before any work, so that one bad frame can be skipped instead of losing the night.

With ``on_bad_frame: skip`` in the run configuration, the workflow runs :func:`run_validate` on every
frame (rule ``validate_frame``) and :func:`write_bad_frames` on a telescope's statuses (checkpoint
``bad_frames``); the aggregate rules then use only the frames that passed. The checks, in order
(the first failure is the frame's reason):

``read``
    The file is a readable FITS file with a 2-D numeric image, finite and not constant
    (:func:`rbflow.io.read_image`).
``frame facts``
    Gain, read noise, saturation, filter and zeropoint are in the telescope file or the header
    (:func:`rbflow.frames.frame_info`).
``saturation``
    At most half of the finite pixels are at or above the saturation level.
``wcs``
    A celestial WCS whose pixel scale is within a factor :data:`MAX_SCALE_RATIO` of the telescope's
    ``pixel_scale`` and that maps every corner to a finite sky position.
``psf stars``
    The PSF stage's own star selection finds at least one usable star (unless
    ``psf.analytic_fallback`` is true).
``reference``
    (science frames) The reference frame passed its checks.
``overlap``
    (science frames) At least :data:`MIN_OVERLAP` of the frame lies on the reference.
``matched stars``
    (science frames) At least :data:`MIN_MATCHED` of its stars (isolated stars of S/N >= :data:`STAR_SNR`
    found by :func:`rbflow.stars.find_stars`, the 300 brightest) have a star of the reference within :data:`MATCH_RADIUS` FWHM on the sky, as the
    flux ratio of the subtraction needs (a proxy: the subtraction selects its own stars).

A frame's status is a small JSON file. Passing frames record their WCS, shape and the sky positions
of their stars, so that the checks of a science frame read its reference's status, not its pixels.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS, FITSFixedWarning
from astropy.wcs.utils import proj_plane_pixel_scales

from rbflow import __version__
from rbflow.errors import InputError
from rbflow.frames import FrameInfo, frame_hdu, frame_info, pixel_scale_of
from rbflow.io import Image, made_by, read_image, read_table, write_json, write_table

__all__ = [
    "CHECKS",
    "MIN_OVERLAP",
    "MIN_MATCHED",
    "MATCH_RADIUS",
    "MAX_SCALE_RATIO",
    "MAX_SATURATED",
    "STAR_SNR",
    "FrameCheckError",
    "check_frame",
    "run_validate",
    "bad_frames_table",
    "write_bad_frames",
    "read_bad_frames",
]

log = logging.getLogger(__name__)

#: Checks in the order they run; the ``stage`` column of the bad-frames table is one of them.
CHECKS = ("read", "frame facts", "saturation", "wcs", "psf stars", "reference", "overlap", "matched stars")
#: Smallest fraction of a science frame that must lie on its reference.
MIN_OVERLAP = 0.25
#: Fewest science PSF stars with a reference PSF star nearby (the flux ratio needs 3).
MIN_MATCHED = 3
#: Sky match radius of the star check, in FWHM of the science frame.
MATCH_RADIUS = 2.0
#: Largest ratio between the WCS pixel scale and the telescope's ``pixel_scale`` (either way).
MAX_SCALE_RATIO = 1.5
#: Largest fraction of saturated pixels.
MAX_SATURATED = 0.5
#: Peak S/N of the stars matched between a frame and its reference.
STAR_SNR = 5.0
_MAX_STARS = 300  # brightest stars kept in a status file


class FrameCheckError(InputError):
    """A frame failed one of the checks of :data:`CHECKS`.

    Parameters
    ----------
    check : str
        The check that failed (one of :data:`CHECKS`).
    path : path-like
        The file at fault.
    message : str
        What is wrong and how to fix it (names the file).
    """

    def __init__(self, check: str, path: str | os.PathLike, message: str):
        super().__init__(message)
        self.check = check
        self.path = str(path)


def _check_saturation(image: Image, saturation: float) -> None:
    finite = np.isfinite(image.data)
    frac = float(np.count_nonzero(image.data[finite] >= saturation)) / max(int(finite.sum()), 1)
    if frac > MAX_SATURATED:
        raise FrameCheckError(
            "saturation",
            image.path,
            f"image '{image.path}': {frac:.0%} of its pixels are at or above the saturation level {saturation:g} ADU: "
            "the exposure is saturated, remove the frame (or fix 'saturation' in the telescope file)",
        )


def _check_wcs(image: Image, pixel_scale: float | None) -> WCS:
    """The frame's celestial WCS, checked at the corners and against the telescope's pixel scale (if set)."""
    try:
        wcs = image.require_wcs()
    except InputError as exc:
        raise FrameCheckError("wcs", image.path, str(exc)) from None
    ny, nx = image.data.shape
    corners = wcs.pixel_to_world_values(np.array([0, nx - 1, 0, nx - 1]), np.array([0, 0, ny - 1, ny - 1]))
    scale = float(np.mean(proj_plane_pixel_scales(wcs.celestial))) * 3600.0
    if not np.all(np.isfinite(corners)) or not np.isfinite(scale) or scale <= 0:
        raise FrameCheckError(
            "wcs",
            image.path,
            f"image '{image.path}': its WCS does not map the frame onto the sky (non-finite positions): "
            "solve its astrometry again (e.g. astrometry.net or SCAMP)",
        )
    if pixel_scale is not None and not 1 / MAX_SCALE_RATIO <= scale / pixel_scale <= MAX_SCALE_RATIO:
        raise FrameCheckError(
            "wcs",
            image.path,
            f"image '{image.path}': its WCS pixel scale is {scale:.4g} arcsec/px but the telescope's 'pixel_scale' "
            f"is {pixel_scale:g}: the WCS is wrong, solve its astrometry again (or fix 'pixel_scale')",
        )
    return wcs


def _check_psf_stars(image: Image, info: FrameInfo, telescope: dict[str, Any], name: str) -> float:
    """Raise when the PSF stage would find no usable star; return the FWHM (px) it measures."""
    from rbflow.psf import select_psf_stars

    cfg = telescope["psf"]
    guess = info.fwhm_guess or float(cfg["fallback_fwhm"]) / pixel_scale_of(telescope, image.wcs, path=image.path)
    stars, fwhm = select_psf_stars(image, info, cfg, fwhm_guess=guess, name=name)
    if len(stars) == 0 and not cfg["analytic_fallback"]:
        raise FrameCheckError(
            "psf stars",
            image.path,
            f"image '{image.path}': no usable PSF star (isolated, unsaturated, S/N >= {cfg['snr_min']}): check the "
            "frame, lower 'psf.snr_min' or set 'psf.analytic_fallback: true' in the telescope file",
        )
    return float(fwhm)


def _sky_stars(image: Image, wcs: WCS, saturation: float, fwhm: float) -> np.ndarray:
    """Sky positions (ra, dec; brightest first, at most 300) of the isolated stars of S/N >= STAR_SNR.

    They are found as the subtraction finds its alignment and flux-ratio stars
    (:func:`rbflow.stars.find_stars`).
    """
    from rbflow.background import background
    from rbflow.stars import find_stars

    data = image.data.astype(np.float32)
    bad = ~np.isfinite(data) | (data >= saturation)
    sky, rms = background(data, bad)
    found = find_stars(np.where(bad, 0.0, data - sky), rms, bad, fwhm=fwhm, snr_min=STAR_SNR, max_stars=_MAX_STARS)
    if found["x"].size == 0:
        return np.zeros((0, 2))
    return np.c_[wcs.pixel_to_world_values(found["x"], found["y"])]


def _overlap(wcs: WCS, shape: tuple[int, int], ref_wcs: WCS, ref_shape: tuple[int, int]) -> float:
    """Fraction of a 16 x 16 grid of frame pixels whose sky position lies on the reference."""
    ny, nx = shape
    gx, gy = np.meshgrid(np.linspace(0, nx - 1, 16), np.linspace(0, ny - 1, 16))
    ra, dec = wcs.pixel_to_world_values(gx.ravel(), gy.ravel())
    rx, ry = ref_wcs.world_to_pixel_values(ra, dec)
    inside = (rx >= -0.5) & (rx <= ref_shape[1] - 0.5) & (ry >= -0.5) & (ry <= ref_shape[0] - 0.5)
    return float(np.mean(inside))


def _unit_vectors(sky: np.ndarray) -> np.ndarray:
    """Unit vectors of (n, 2) ra, dec positions in degrees."""
    ra, dec = np.deg2rad(sky[:, 0]), np.deg2rad(sky[:, 1])
    return np.c_[np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)]


def _matched(sky: np.ndarray, ref_sky: np.ndarray, radius_deg: float) -> int:
    """Stars of ``sky`` with a star of ``ref_sky`` within ``radius_deg`` (both (n, 2) ra, dec in degrees)."""
    if len(sky) == 0 or len(ref_sky) == 0:
        return 0
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(_unit_vectors(ref_sky)).query(_unit_vectors(sky))
    return int(np.count_nonzero(dist <= np.deg2rad(radius_deg)))  # chord = angle at these scales


def _check_against_reference(image: Image, wcs: WCS, sky: np.ndarray, fwhm: float, reference: dict[str, Any]) -> None:
    """Raise when the reference is bad, does not overlap the frame, or shares too few stars with it."""
    ref_file = reference["file"]
    if not reference["ok"]:
        raise FrameCheckError(
            "reference",
            ref_file,
            f"image '{image.path}': its reference '{ref_file}' is bad ({reference['message']})",
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        ref_wcs = WCS(fits.Header.fromstring(reference["wcs"]))
    frac = _overlap(wcs, image.data.shape, ref_wcs, tuple(reference["shape"]))
    if frac < MIN_OVERLAP:
        raise FrameCheckError(
            "overlap",
            image.path,
            f"image '{image.path}': only {frac:.0%} of it lies on its reference '{ref_file}' (at least "
            f"{MIN_OVERLAP:.0%} needed): check that the frame belongs to the reference's field and that both WCS "
            "are right",
        )
    scale = float(np.mean(proj_plane_pixel_scales(wcs.celestial)))
    n = _matched(sky, np.asarray(reference["stars"], float).reshape(-1, 2), MATCH_RADIUS * fwhm * scale)
    if n < MIN_MATCHED:
        raise FrameCheckError(
            "matched stars",
            image.path,
            f"image '{image.path}': only {n} of its stars have a star of its reference '{ref_file}' within "
            f"{MATCH_RADIUS:g} FWHM (the flux ratio needs {MIN_MATCHED}): check both WCS and the saturation level "
            "in the telescope file, or remove the frame",
        )


def check_frame(
    frame_path: str | os.PathLike, telescope: dict[str, Any], *, reference: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run the checks of :data:`CHECKS` on one frame; return what a science frame's checks need.

    Parameters
    ----------
    frame_path : path-like
        FITS frame.
    telescope : dict
        Validated telescope configuration (``pixel_scale``, ``psf`` and the frame facts are used).
    reference : dict, optional
        Status of the frame's reference (as written by :func:`run_validate`); None for a reference.

    Returns
    -------
    dict
        ``shape`` (ny, nx), ``wcs`` (header text), ``stars`` (sky positions of the PSF stars,
        brightest first, at most 300) and ``fwhm`` (px, as measured by the PSF star selection).

    Raises
    ------
    FrameCheckError
        The first failed check, with the file at fault and a message naming the fix.
    """
    frame_path = Path(frame_path)
    try:
        image = read_image(frame_path, hdu=frame_hdu(telescope))
    except InputError as exc:
        raise FrameCheckError("read", frame_path, str(exc)) from None
    try:
        info = frame_info(image.header, telescope, path=frame_path)
    except InputError as exc:
        raise FrameCheckError("frame facts", frame_path, str(exc)) from None
    _check_saturation(image, info.saturation)
    wcs = _check_wcs(image, telescope["pixel_scale"])
    fwhm = _check_psf_stars(image, info, telescope, frame_path.name.split(".fits")[0])
    sky = _sky_stars(image, wcs, info.saturation, fwhm)
    if reference is not None:
        _check_against_reference(image, wcs, sky, fwhm, reference)
    return {
        "shape": list(image.data.shape),
        "wcs": wcs.to_header_string(relax=True),
        "stars": sky.tolist(),
        "fwhm": fwhm,
    }


def run_validate(
    frame_path: str | os.PathLike,
    out_status: str | os.PathLike,
    telescope: dict[str, Any],
    *,
    frame: str,
    reference_status: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Check one frame and write its status JSON (a failed check is recorded, not raised).

    Parameters
    ----------
    frame_path : path-like
        FITS frame.
    out_status : path-like
        Status file: ``frame``, ``file``, ``ok``; ``check`` and ``message`` when bad; ``shape``,
        ``wcs``, ``stars`` and ``fwhm`` when good.
    telescope : dict
        Validated telescope configuration.
    frame : str
        Frame name (the table of bad frames lists it).
    reference_status : path-like, optional
        Status file of the frame's reference (science frames).

    Returns
    -------
    dict
        The status written.
    """
    status: dict[str, Any] = {"frame": frame, "file": str(frame_path), "rbflow_version": __version__}
    reference = json.loads(Path(reference_status).read_text()) if reference_status else None
    try:
        status.update(ok=True, **check_frame(frame_path, telescope, reference=reference))
        log.info("frame '%s' (%s) passed every check", frame, frame_path)
    except FrameCheckError as exc:
        status.update(ok=False, check=exc.check, file=exc.path, message=str(exc))
        log.warning("frame '%s' is bad (%s check): %s", frame, exc.check, exc)
    write_json(status, out_status)
    return status


def bad_frames_table(statuses: Sequence[dict[str, Any]]) -> Table:
    """The bad frames among frame statuses: columns ``frame``, ``stage``, ``file``, ``message``.

    Parameters
    ----------
    statuses : sequence of dict
        Status dicts of :func:`run_validate`.

    Returns
    -------
    astropy.table.Table
        One row per bad frame (typed and empty when every frame passed).
    """
    bad = [s for s in statuses if not s["ok"]]
    return Table(
        {
            "frame": np.array([s["frame"] for s in bad], dtype="U64"),
            "stage": np.array([s["check"] for s in bad], dtype="U16"),
            "file": np.array([s["file"] for s in bad], dtype="U256"),
            "message": np.array([s["message"] for s in bad], dtype="U1024"),
        },
        meta={
            "made_by": made_by("rbflow.validate.write_bad_frames"),
            "description": "frames skipped (on_bad_frame: skip): the check that failed, the file at fault and why",
        },
    )


def write_bad_frames(status_paths: Sequence[str | os.PathLike], out_table: str | os.PathLike) -> Table:
    """Collect frame statuses into the table of bad frames (ECSV), logging each bad frame.

    Parameters
    ----------
    status_paths : sequence of path-like
        Status files of :func:`run_validate`.
    out_table : path-like
        Destination ECSV (see :func:`bad_frames_table`).

    Returns
    -------
    astropy.table.Table

    Raises
    ------
    InputError
        A status file is missing or not valid JSON.
    """
    statuses = []
    for path in map(Path, status_paths):
        try:
            statuses.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            raise InputError(f"frame status '{path}' is not readable ({exc}): delete it and rerun") from exc
    table = bad_frames_table(statuses)
    for row in table:
        log.warning("skipping frame '%s' (%s check): %s", row["frame"], row["stage"], row["message"])
    log.info("%d of %d frames are bad and skipped", len(table), len(statuses))
    write_table(table, out_table)
    return table


def read_bad_frames(path: str | os.PathLike) -> frozenset[str]:
    """Names of the frames listed in a bad-frames table.

    Parameters
    ----------
    path : path-like
        ECSV of :func:`write_bad_frames`.

    Returns
    -------
    frozenset of str
    """
    return frozenset(str(f) for f in read_table(path)["frame"])
