"""Calibrated injection of artificial point sources into a frame.

Each source is the frame's own PSF (:class:`rbflow.psf.PSFModel`) at its exact sub-pixel
position, scaled to a flux from its magnitude and the frame's zeropoint
(``flux = 10 ** (-0.4 (mag - ZP))`` ADU), with the Poisson noise of its own photons drawn
through the gain, and added to the frame; the sum is clipped at saturation like a real pixel.

Positions are uniform over the usable area: at least the cutout half-size plus a margin from
the edges, away from NaN and saturated pixels, and ``min_separation`` from one another. When
the reference the frame will be subtracted against is given, the usable area is also restricted
to its footprint on the frame (the same margin from its edges, away from its NaN and saturated
pixels): a source the reference does not cover cannot be recovered by the subtraction, and
would only lower the measured completeness. A
fraction ``host_fraction`` is put on galaxies found in the frame itself (segmentation,
sources clearly larger than the PSF), offset from the host centre by a 2-D Gaussian whose
median radius is ``host_offset`` times the host half-light radius, stretched along the host's
shape.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from astropy import units as u
from astropy.io import fits
from astropy.table import Table

from rbflow import __version__
from rbflow.errors import ConfigError, InputError
from rbflow.frames import FrameInfo, frame_hdu, frame_info, image_name
from rbflow.io import Image, made_by, read_image, write_fits, write_table

if TYPE_CHECKING:
    from astropy.wcs import WCS

    from rbflow.psf import PSFModel

__all__ = ["draw_magnitudes", "find_hosts", "inject_sources", "reference_footprint", "run_inject"]

log = logging.getLogger(__name__)

_EDGE_MARGIN = 5  # pixels beyond the cutout half-size kept free at the frame edges
_TRIES = 50  # candidate positions drawn per source before giving up
_MAX_HOST_AXIS_RATIO = 8.0  # segments more elongated than this are trails or columns, not galaxies
_GRID_STEP = 16  # pixels between exact WCS evaluations of the frame -> reference mapping


def draw_magnitudes(cfg: dict[str, Any], n: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``n`` magnitudes following the ``inject`` block.

    Parameters
    ----------
    cfg : dict
        Validated ``inject`` block (``mag_range``, ``distribution``, ``mags``).
    n : int
        Number of magnitudes.
    rng : numpy.random.Generator
        Random generator.

    Returns
    -------
    numpy.ndarray
        Magnitudes (mag).

    Raises
    ------
    ConfigError
        ``distribution: list`` with an empty ``mags`` list.
    """
    bright, faint = sorted(float(m) for m in cfg["mag_range"])
    kind = cfg["distribution"]
    if kind == "uniform_mag":
        return rng.uniform(bright, faint, n)
    if kind == "uniform_flux":
        f_hi, f_lo = 10 ** (-0.4 * bright), 10 ** (-0.4 * faint)
        return -2.5 * np.log10(rng.uniform(f_lo, f_hi, n))
    mags = np.asarray(cfg["mags"], dtype=float)
    if mags.size == 0:
        raise ConfigError("telescope file: 'inject.distribution' is 'list' but 'inject.mags' is empty; give magnitudes")
    return np.resize(mags, n)


def _no_hosts() -> Table:
    return Table(names=("x", "y", "r_half", "a_over_b", "theta"), dtype=(float,) * 5)


def find_hosts(data: np.ndarray, psf_fwhm: float, *, bad: np.ndarray) -> Table:
    """Find galaxies (sources clearly more extended than the PSF) in a frame.

    Parameters
    ----------
    data : numpy.ndarray
        The frame (NaN = invalid).
    psf_fwhm : float
        PSF FWHM (pixels).
    bad : numpy.ndarray
        Boolean mask of invalid or saturated pixels.

    Returns
    -------
    astropy.table.Table
        Columns x, y (centroid), r_half (half-light radius, px), a_over_b, theta (rad);
        empty when none is found.
    """
    from astropy.convolution import Gaussian2DKernel, convolve
    from astropy.stats import sigma_clipped_stats
    from photutils.segmentation import SourceCatalog, detect_sources

    empty = _no_hosts()
    filled = np.where(bad, np.nan, data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # astropy warns about clipped NaNs and interpolated masked pixels
        _, sky, rms = sigma_clipped_stats(filled, sigma=3.0, maxiters=5)
        sub = np.where(bad, 0.0, data - sky)
        smooth = convolve(sub, Gaussian2DKernel(max(psf_fwhm, 1.0) / 2.3548), boundary="extend")
    npix = int(max(10, 3 * psf_fwhm**2))
    segm = detect_sources(smooth, 3.0 * rms / 2.0, npix, mask=bad)
    if segm is None:
        return empty
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cat = SourceCatalog(sub, segm, mask=bad)
        fwhm = np.asarray(cat.fwhm.value, dtype=float)
        r_half = np.asarray(cat.flux_radius(0.5).value, dtype=float)
        a = np.asarray(cat.semimajor_axis.value, dtype=float)
        b = np.asarray(cat.semiminor_axis.value, dtype=float)
        theta = np.deg2rad(np.asarray(cat.orientation.value, dtype=float))
        peak = np.asarray(cat.max_value, dtype=float)
        flux = np.asarray(cat.segment_flux, dtype=float)
    # Extended: moment FWHM 1.5x the PSF's and a peak lower than a point source of that flux has;
    # resolved across too (a galaxy is at least PSF-wide in every direction, a bad column or a
    # bleed trail is narrower) and not a trail (axis ratio at most _MAX_HOST_AXIS_RATIO).
    point_peak = flux / (1.133 * psf_fwhm**2)
    psf_sigma = psf_fwhm / 2.3548
    ok = np.isfinite(fwhm) & np.isfinite(r_half) & (fwhm > 1.5 * psf_fwhm) & (peak < 0.5 * point_peak)
    ok &= (b > 0.8 * psf_sigma) & (a < _MAX_HOST_AXIS_RATIO * b)
    if not ok.any():
        return empty
    return Table(
        {
            "x": np.asarray(cat.x_centroid, dtype=float)[ok],
            "y": np.asarray(cat.y_centroid, dtype=float)[ok],
            "r_half": r_half[ok],
            "a_over_b": (a / np.where(b > 0, b, 1))[ok],
            "theta": theta[ok],
        }
    )


def _usable(data: np.ndarray, saturation: float, *, border: int, clearance: float) -> np.ndarray:
    """Pixels where a source may be centred: inside the border, ``clearance`` px from invalid pixels."""
    from scipy.ndimage import distance_transform_edt

    bad = ~np.isfinite(data) | (data >= saturation)
    ok = np.zeros(data.shape, bool)
    ny, nx = data.shape
    ok[border : ny - border, border : nx - border] = True
    if bad.any():
        ok &= distance_transform_edt(~bad) > clearance
    return ok


def _frame_to_reference(sci_wcs: WCS, ref_wcs: WCS, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Reference pixel coordinates of every frame pixel centre.

    The two WCS are evaluated exactly on a grid every ``_GRID_STEP`` pixels (and on the last
    row/column) and interpolated bilinearly in between: the mapping is smooth (TAN, SIP, TPV),
    so the interpolation error is far below a pixel while the cost stays a few milliseconds.
    """
    from scipy.interpolate import RegularGridInterpolator

    ny, nx = shape
    gy = np.unique(np.r_[np.arange(0, ny, _GRID_STEP), ny - 1]).astype(float)
    gx = np.unique(np.r_[np.arange(0, nx, _GRID_STEP), nx - 1]).astype(float)
    xx, yy = np.meshgrid(gx, gy)
    ra, dec = sci_wcs.all_pix2world(xx.ravel(), yy.ravel(), 0)
    rx, ry = (c.reshape(xx.shape) for c in ref_wcs.all_world2pix(ra, dec, 0))
    py, px = np.mgrid[0:ny, 0:nx]
    points = np.column_stack([py.ravel(), px.ravel()])
    fx = RegularGridInterpolator((gy, gx), rx)(points).reshape(shape)
    fy = RegularGridInterpolator((gy, gx), ry)(points).reshape(shape)
    return fx, fy


def reference_footprint(
    sci_wcs: WCS,
    shape: tuple[int, int],
    reference: Image,
    ref_saturation: float,
    *,
    border: int,
    clearance: float,
) -> np.ndarray:
    """Pixels of the frame where the reference can subtract a source centred there.

    Parameters
    ----------
    sci_wcs : astropy.wcs.WCS
        WCS of the frame sources are injected into.
    shape : tuple of int
        Shape of that frame.
    reference : rbflow.io.Image
        The reference the frame is subtracted against (with a celestial WCS).
    ref_saturation : float
        Saturation level of the reference (ADU).
    border : int
        Minimum distance from the reference's edges (pixels).
    clearance : float
        Minimum distance from the reference's NaN and saturated pixels (pixels).

    Returns
    -------
    numpy.ndarray
        Boolean mask of the frame's shape.
    """
    ref_ok = _usable(reference.data, ref_saturation, border=border, clearance=clearance)
    fx, fy = _frame_to_reference(sci_wcs, reference.require_wcs(), shape)
    ix, iy = np.rint(fx), np.rint(fy)
    rny, rnx = ref_ok.shape
    inside = (ix >= 0) & (ix < rnx) & (iy >= 0) & (iy < rny)
    ok = np.zeros(shape, bool)
    ok[inside] = ref_ok[iy[inside].astype(int), ix[inside].astype(int)]
    return ok


def _place(
    rng: np.random.Generator,
    n: int,
    usable: np.ndarray,
    hosts: Table,
    *,
    host_fraction: float,
    host_offset: float,
    min_separation: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw positions: ``host_fraction`` on hosts, the rest uniform; keep them ``min_separation`` apart."""
    ys_ok, xs_ok = np.nonzero(usable)
    ny, nx = usable.shape
    n_host = int(round(host_fraction * n)) if len(hosts) else 0
    if host_fraction > 0 and len(hosts) == 0:
        log.warning("no galaxy found in the frame: all %d sources are placed in the field", n)
    xs: list[float] = []
    ys: list[float] = []
    on_host: list[bool] = []
    moved = 0
    for k in range(n):
        want_host = k < n_host
        placed = False
        for attempt in range(2 * _TRIES):
            if want_host and attempt == _TRIES:
                want_host = False  # the hosts are crowded: put this one in the field
                moved += 1
            if want_host:
                h = hosts[int(rng.integers(len(hosts)))]
                sigma = host_offset * h["r_half"] / np.sqrt(2 * np.log(2))  # median radius = host_offset * r_half
                along, across = rng.normal(0.0, sigma), rng.normal(0.0, sigma / h["a_over_b"])
                c, s = np.cos(h["theta"]), np.sin(h["theta"])
                x, y = h["x"] + along * c - across * s, h["y"] + along * s + across * c
                ix, iy = int(round(x)), int(round(y))
                if not (0 <= ix < nx and 0 <= iy < ny and usable[iy, ix]):
                    continue
            else:
                j = int(rng.integers(xs_ok.size))
                x, y = xs_ok[j] + rng.uniform(-0.5, 0.5), ys_ok[j] + rng.uniform(-0.5, 0.5)
            if xs and np.min(np.hypot(np.array(xs) - x, np.array(ys) - y)) < min_separation:
                continue
            xs.append(float(x))
            ys.append(float(y))
            on_host.append(want_host)
            placed = True
            break
        if not placed and not want_host:
            break
    if moved:
        log.warning("%d of %d host sources found no free place on a galaxy and went to the field", moved, n_host)
    if len(xs) < n:
        log.warning(
            "only %d of %d sources could be placed (usable area, min_separation = %.1f px): "
            "lower 'inject.n' or 'inject.min_separation'",
            len(xs),
            n,
            min_separation,
        )
    return np.array(xs), np.array(ys), np.array(on_host, bool)


def inject_sources(
    image: Image,
    psf: PSFModel,
    info: FrameInfo,
    cfg: dict[str, Any],
    *,
    cutout_size: int,
    seed: int,
    frame: str,
    image_name: str,
    reference: Image | None = None,
    ref_saturation: float = np.inf,
) -> tuple[np.ndarray, Table]:
    """Inject point sources into a frame.

    Parameters
    ----------
    image : rbflow.io.Image
        The frame; it must have a celestial WCS.
    psf : rbflow.psf.PSFModel
        PSF model of the frame (same shape).
    info : rbflow.frames.FrameInfo
        Frame facts (zeropoint, gain, saturation, filter).
    cfg : dict
        Validated ``inject`` block.
    cutout_size : int
        Candidate cutout size (px); sources stay its half-size plus a margin from the edges.
    seed : int
        Seed of this frame and realization (``rbflow.seeds.derive(seed, frame, k, 'inject')``).
    frame, image_name : str
        Names of the frame and of the injected image (for the table).
    reference : rbflow.io.Image, optional
        The reference the frame will be subtracted against: sources are placed only inside its
        footprint (see :func:`reference_footprint`).
    ref_saturation : float, optional
        Saturation level of the reference (ADU).

    Returns
    -------
    data : numpy.ndarray
        The injected frame (float32).
    truth : astropy.table.Table
        ``simulated_objects``: id, image, frame, x, y, ra, dec, mag, flux, filter, zeropoint,
        psf_fwhm, on_host.

    Raises
    ------
    InputError
        The frame has no WCS, the PSF model is for a frame of another shape, or no pixel is
        usable (edges, invalid pixels, outside the reference).
    """
    wcs = image.require_wcs()
    data = image.data
    if tuple(data.shape) != tuple(psf.shape):
        raise InputError(
            f"PSF model of '{psf.name}' is for a {psf.shape} frame but image '{image.path}' is {data.shape}: "
            "rerun the psf stage for this frame"
        )
    rng = np.random.default_rng(seed)
    n = int(cfg["n"])
    stamp_size = psf.size
    half = stamp_size // 2
    fwhm0 = float(np.median(psf.cell_fwhm))
    border = cutout_size // 2 + _EDGE_MARGIN
    clearance = max(2 * fwhm0, 3.0)
    usable = _usable(data, info.saturation, border=max(border, half), clearance=clearance)
    if reference is not None:
        usable &= reference_footprint(
            wcs, data.shape, reference, ref_saturation, border=max(border, half), clearance=clearance
        )
    if not usable.any():
        where = f" and reference '{reference.path}'" if reference is not None else ""
        raise InputError(
            f"image '{image.path}'{where}: no pixel is usable for injection (edges, NaN or saturated pixels, "
            f"or no overlap with the reference, cover it all with cutout size {cutout_size}): check that the "
            "reference covers the frame (WCS of both files)"
        )
    log.info("image '%s': %.1f %% of the pixels are usable for injection", image_name, 100.0 * usable.mean())
    host_fraction = float(cfg["host_fraction"])
    bad = ~np.isfinite(data) | (data >= info.saturation)
    hosts = find_hosts(data, fwhm0, bad=bad) if host_fraction > 0 else _no_hosts()
    xs, ys, on_host = _place(
        rng,
        n,
        usable,
        hosts,
        host_fraction=host_fraction,
        host_offset=float(cfg["host_offset"]),
        min_separation=float(cfg["min_separation"]),
    )
    mags = draw_magnitudes(cfg, xs.size, rng)
    flux = 10 ** (-0.4 * (mags - info.zeropoint))
    out = data.astype(np.float32).copy()
    fwhm = np.empty(xs.size)
    ny, nx = data.shape
    for k in range(xs.size):
        x0, y0 = int(round(xs[k])), int(round(ys[k]))
        model = flux[k] * psf.stamp(xs[k], ys[k], stamp_size)
        expected = np.maximum(model, 0.0) * info.gain
        noisy = model + (rng.poisson(expected) - expected) / info.gain  # Poisson noise of the source photons
        r0, r1 = max(0, y0 - half), min(ny, y0 + half + 1)
        c0, c1 = max(0, x0 - half), min(nx, x0 + half + 1)
        patch = out[r0:r1, c0:c1]
        add = noisy[r0 - (y0 - half) : r1 - (y0 - half), c0 - (x0 - half) : c1 - (x0 - half)]
        summed = patch + add
        out[r0:r1, c0:c1] = np.where(summed > info.saturation, np.maximum(patch, info.saturation), summed)
        fwhm[k] = psf.fwhm(xs[k], ys[k])
    ra, dec = wcs.all_pix2world(xs, ys, 0) if xs.size else (np.zeros(0), np.zeros(0))
    truth = Table(
        {
            "id": np.array([f"{image_name}_inj{k}" for k in range(xs.size)], dtype=str),
            "image": np.array([image_name] * xs.size, dtype=str),
            "frame": np.array([frame] * xs.size, dtype=str),
            "x": xs * u.pix,
            "y": ys * u.pix,
            "ra": np.asarray(ra) * u.deg,
            "dec": np.asarray(dec) * u.deg,
            "mag": mags * u.mag,
            "flux": flux * u.adu,
            "filter": np.array([info.filter] * xs.size, dtype=str),
            "zeropoint": np.full(xs.size, info.zeropoint) * u.mag,
            "psf_fwhm": fwhm * u.pix,
            "on_host": on_host,
        }
    )
    truth.meta.update(
        {
            "table": "simulated_objects",
            "made_by": made_by("rbflow.inject.inject_sources"),
            "frame": frame,
            "image": image_name,
            "seed": int(seed),
            "inject": {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in cfg.items()},
            "coordinates": "0-based pixels (x = column, y = row); ra/dec ICRS deg from the frame WCS",
            "n_hosts_found": len(hosts),
        }
    )
    log.info(
        "image '%s': injected %d sources (%d on hosts), mag %.2f-%.2f, ZP %.3f",
        image_name,
        xs.size,
        int(on_host.sum()),
        mags.min() if mags.size else np.nan,
        mags.max() if mags.size else np.nan,
        info.zeropoint,
    )
    return out, truth


def _write_list(truth: Table, path: str | os.PathLike) -> None:
    """Write the older tool's ``simulated_objects.list`` (gmadet ``sim``).

    An ``ascii.commented_header`` table, as gmadet writes it: the first line is ``# idx filename Xpos
    Ypos RA Dec mag filter count_ADU``, so ``astropy.io.ascii.read`` finds the names. ``filename`` is
    the injected image, ``count_ADU`` the injected flux (ADU); Xpos, Ypos are rbflow's 0-based pixels
    (a comment line says so; the older tool's scripts match on RA, Dec).
    :func:`rbflow.legacy.read_simulated_objects_list` reads it back.
    """
    table = Table(
        {
            "idx": np.arange(len(truth)),
            "filename": np.asarray(truth["image"], dtype=str),
            "Xpos": np.asarray(truth["x"], dtype=float),
            "Ypos": np.asarray(truth["y"], dtype=float),
            "RA": np.asarray(truth["ra"], dtype=float),
            "Dec": np.asarray(truth["dec"], dtype=float),
            "mag": np.asarray(truth["mag"], dtype=float),
            "filter": np.asarray(truth["filter"], dtype=str),
            "count_ADU": np.asarray(truth["flux"], dtype=float),
        }
    )
    table.meta["comments"] = [
        f"simulated_objects.list written by rbflow {__version__}",
        "Xpos Ypos are 0-based pixel coordinates (centre of the first pixel = 0), x = column, y = row",
    ]
    formats = {"Xpos": "%.3f", "Ypos": "%.3f", "RA": "%.8f", "Dec": "%.8f", "mag": "%.4f", "count_ADU": "%.6g"}
    write_table(table, path, format="ascii.commented_header", formats=formats)


def run_inject(
    frame_path: str | os.PathLike,
    psf_path: str | os.PathLike,
    out_fits: str | os.PathLike,
    out_table: str | os.PathLike,
    out_list: str | os.PathLike,
    telescope: dict[str, Any],
    *,
    frame: str,
    realization: int,
    seed: int,
    reference_path: str | os.PathLike | None = None,
) -> Table:
    """Inject one realization into a frame and write the frame, its truth table and the ``.list``.

    Parameters
    ----------
    frame_path, psf_path : path-like
        The frame and its PSF model.
    out_fits, out_table, out_list : path-like
        Injected frame (FITS), truth table (ECSV) and compatibility list.
    telescope : dict
        Validated telescope configuration (uses ``inject``, ``cutout.size`` and frame facts).
    frame : str
        Frame name.
    realization : int
        Realization index; the image is ``{frame}_sim{realization}``.
    seed : int
        Seed of this frame and realization.
    reference_path : path-like, optional
        The reference the frame is subtracted against; sources stay inside its footprint.

    Returns
    -------
    astropy.table.Table
        The truth table.
    """
    image = read_image(frame_path, hdu=frame_hdu(telescope))
    image.require_wcs()
    info = frame_info(image.header, telescope, path=frame_path)
    from rbflow.psf import PSFModel

    psf = PSFModel.read(psf_path)
    name = image_name(frame, realization)
    cfg = telescope["inject"]
    reference, ref_saturation = None, np.inf
    if reference_path is not None:
        reference = read_image(reference_path, hdu=frame_hdu(telescope))
        reference.require_wcs()
        ref_saturation = frame_info(reference.header, telescope, path=reference_path).saturation
    data, truth = inject_sources(
        image,
        psf,
        info,
        cfg,
        cutout_size=int(telescope["cutout"]["size"]),
        seed=seed,
        frame=frame,
        image_name=name,
        reference=reference,
        ref_saturation=ref_saturation,
    )
    header = image.header.copy()
    for key in ("XTENSION", "PCOUNT", "GCOUNT", "EXTNAME", "BSCALE", "BZERO", "BLANK"):
        header.remove(key, ignore_missing=True)
    header["INJIMAGE"] = (name, "injected image name")
    header["INJFRAME"] = (frame, "frame the sources were injected into")
    header["INJREAL"] = (int(realization), "injection realization")
    header["INJSEED"] = (int(seed), "seed of this injection")
    header["INJN"] = (len(truth), "sources injected")
    header["INJDIST"] = (cfg["distribution"], "magnitude distribution")
    header["INJMAG1"] = (float(min(cfg["mag_range"])), "brightest magnitude drawn")
    header["INJMAG2"] = (float(max(cfg["mag_range"])), "faintest magnitude drawn")
    header["INJMSEP"] = (float(cfg["min_separation"]), "min separation (px)")
    header["INJHOSTF"] = (float(cfg["host_fraction"]), "fraction on host galaxies")
    header["INJHOSTO"] = (float(cfg["host_offset"]), "host offset scale (half-light radii)")
    header["INJZP"] = (info.zeropoint, "zeropoint used (mag for 1 ADU)")
    header["INJPSF"] = (Path(psf_path).name, "PSF model used")
    if reference_path is not None:
        header["INJREF"] = (Path(reference_path).name, "reference whose footprint bounds the sources")
    write_fits(fits.PrimaryHDU(data.astype(np.float32), header=header), out_fits)
    write_table(truth, out_table)
    _write_list(truth, out_list)
    return truth
