"""Reference frames made from a public survey's images (Pan-STARRS1 3pi, Legacy Surveys), for telescopes without their own.

For each science frame, the survey images covering it in the frame's filter (or the survey band
``frames.reference.filters`` maps it to) are found through the survey's file-listing service,
fetched as FITS cutouts and cached (:func:`rbflow.download.cached_fetch`: a rerun downloads
nothing), reprojected onto the science frame's pixel grid with flux conserved
(:func:`reproject.reproject_adaptive`, an anti-aliased resampling suited to going from the
survey's fine pixels to coarser ones), scaled to the zeropoint of the first image and combined
by an inverse-variance weighted mean (pixels masked in an image are left out of it).

Pan-STARRS1 (Chambers et al. 2016; Flewelling et al. 2020), through the STScI image service:

* ``ps1filenames.py?ra=&dec=&filters=&type=`` lists the sky cells' files containing a position
  (a space-separated table: ``projcell subcell ra dec filter mjd type filename shortname badflag``);
  rbflow asks at the frame's centre, corners and edge midpoints, so every cell touching it is found;
* ``fitscut.cgi?ra=&dec=&size=&format=fits&red=<filename>`` cuts a FITS image (0.25 arcsec/px).

``mode: stack`` uses the 3pi stacks (``type=stack``, mosaicked where the frame spans several
sky cells); ``mode: individual`` uses every single-exposure warp (``type=warp``) and stacks
them here. Stack pixels are stored as asinh "luptitudes": linear flux = ``BOFFSET + BSOFTEN * 2
sinh(v / (2.5 / ln 10))``. The zeropoint of a stack is ``25 + 2.5 log10(EXPTIME)`` (PS1 image
documentation); of a warp, the header's ``FPA.ZP`` plus ``2.5 log10(EXPTIME)`` when present, else
the same formula. Mask images (``type=stack.mask`` / ``warp.mask``) remove the pixels with any of
``mask_bits``. The reference header carries the telescope's header keys: zeropoint, gain (from
``gain``, e-/ADU of the survey image), read noise (the measured sky noise, in e-, since survey
images are sky-subtracted), a saturation above every valid pixel (the survey masks its saturated
pixels) and the frame's filter, FWHM and exposure from the survey (``EXPTIME`` of the first image).

DESI Legacy Imaging Surveys (Dey et al. 2019), through the sky viewer's
``fits-cutout?ra=&dec=&layer=&pixscale=0.262&bands=&size=`` service: one coadd cutout (already a
mosaic; at most 3000 px, i.e. frames up to ~13 arcmin across) in nanomaggies, zeropoint 22.5;
blank (0) pixels are outside the footprint; no mask or individual exposures are served.
"""

from __future__ import annotations

import logging
import math
import os
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from rbflow.download import cached_fetch
from rbflow.errors import InputError
from rbflow.frames import frame_hdu, frame_info
from rbflow.io import read_image, write_fits

__all__ = [
    "PS1_URL",
    "PS1_BANDS",
    "LEGACY_URL",
    "LEGACY_BANDS",
    "SURVEY_URLS",
    "SurveyImage",
    "ps1_listing",
    "ps1_cutout_url",
    "read_ps1",
    "legacy_cutout_url",
    "read_legacy",
    "survey_reference",
]

log = logging.getLogger(__name__)

#: Base URL of the Pan-STARRS1 image services at STScI (``frames.reference.url`` overrides it).
PS1_URL = "https://ps1images.stsci.edu/cgi-bin"

#: Filters of Pan-STARRS1.
PS1_BANDS = ("g", "r", "i", "z", "y")

#: PS1 pixel scale (arcsec/px) of stacks and warps.
PS1_SCALE = 0.25

#: Base URL of the Legacy Surveys sky viewer (its ``fits-cutout`` service).
LEGACY_URL = "https://www.legacysurvey.org/viewer"

#: Filters of the Legacy Surveys DR10 coadds.
LEGACY_BANDS = ("g", "r", "i", "z")

#: Native pixel scale (arcsec/px) of the Legacy Surveys coadds.
LEGACY_SCALE = 0.262

#: Legacy Surveys coadds are in nanomaggies: zeropoint 22.5 (AB) for 1 unit.
LEGACY_ZP = 22.5

#: Largest cutout side the Legacy Surveys viewer serves (px).
LEGACY_MAX_SIZE = 3000

#: Default base URL of each survey's services.
SURVEY_URLS = {"ps1": PS1_URL, "legacysurvey": LEGACY_URL}

#: Filters of each survey.
_BANDS = {"ps1": PS1_BANDS, "legacysurvey": LEGACY_BANDS}

#: Columns of the PS1 file-listing table.
_LISTING_COLUMNS = ("projcell", "subcell", "ra", "dec", "filter", "mjd", "type", "filename", "shortname", "badflag")


@dataclass
class SurveyImage:
    """One survey image as fetched: linear flux, mask, WCS and photometric facts.

    Attributes
    ----------
    data : numpy.ndarray
        Linear flux (ADU of the survey image; NaN where masked).
    wcs : astropy.wcs.WCS
        Its celestial WCS.
    zeropoint : float
        Magnitude giving 1 ADU.
    exptime : float
        Exposure time (s).
    source : str
        The survey file it was cut from (the cached cutout until :func:`_fetch_ps1` names the survey file).
    """

    data: np.ndarray
    wcs: WCS
    zeropoint: float
    exptime: float
    source: str


def ps1_listing(
    positions: Sequence[tuple[float, float]],
    band: str,
    *,
    kind: str,
    url: str,
    cache: str | os.PathLike,
    timeout: float,
) -> Table:
    """The PS1 files of ``kind`` (``stack``, ``warp``, ``stack.mask`` ...) containing any of the positions.

    Parameters
    ----------
    positions : sequence of (float, float)
        (ra, dec) in deg.
    band : str
        PS1 filter.
    kind : str
        PS1 image type.
    url : str
        Base URL of the PS1 services.
    cache : path-like
        Cache folder.
    timeout : float
        Seconds to wait for the service.

    Returns
    -------
    astropy.table.Table
        The listing's rows, one per distinct file (sorted by file name).

    Raises
    ------
    InputError
        Failed query or an answer that is not the listing table.
    """
    rows: dict[str, dict[str, Any]] = {}
    for ra, dec in positions:
        query = urllib.parse.urlencode({"ra": f"{ra:.6f}", "dec": f"{dec:.6f}", "filters": band, "type": kind})
        path = cached_fetch(
            f"{url.rstrip('/')}/ps1filenames.py?{query}", cache, timeout=timeout, what="PS1 file listing"
        )
        text = path.read_text()
        try:
            table = Table.read(text.splitlines(), format="ascii.basic", guess=False)
        except Exception as exc:  # noqa: BLE001 - any parse failure is reported with the file
            raise InputError(
                f"PS1 file listing '{path}' is not the expected table ({exc}); delete it and rerun"
            ) from None
        if not set(("filename", "filter", "type")) <= set(table.colnames):
            raise InputError(
                f"PS1 file listing '{path}' lacks the columns filename/filter/type (has {table.colnames}): "
                "check 'frames.reference.url'; delete the file and rerun"
            )
        for row in table:
            rows.setdefault(str(row["filename"]), {c: row[c] for c in table.colnames})
    return (
        Table(rows=[rows[k] for k in sorted(rows)], names=list(_LISTING_COLUMNS))
        if rows
        else Table(names=list(_LISTING_COLUMNS), dtype=[int, int, float, float, str, float, str, str, str, int])
    )


def ps1_cutout_url(filename: str, ra: float, dec: float, size: int, *, url: str) -> str:
    """``fitscut.cgi`` URL of a ``size`` x ``size`` pixel FITS cutout of a PS1 file centred on (ra, dec) (deg)."""
    query = urllib.parse.urlencode(
        {"ra": f"{ra:.6f}", "dec": f"{dec:.6f}", "size": int(size), "format": "fits", "red": filename}
    )
    return f"{url.rstrip('/')}/fitscut.cgi?{query}"


def read_ps1(path: str | os.PathLike, *, mask: np.ndarray | None = None, mask_bits: int = 0) -> SurveyImage:
    """A PS1 cutout as linear flux with its zeropoint (stack or warp), masked pixels set to NaN.

    Parameters
    ----------
    path : path-like
        The cutout (FITS).
    mask : numpy.ndarray, optional
        The matching mask cutout (integer bits).
    mask_bits : int, optional
        Bits of ``mask`` that make a pixel bad.

    Returns
    -------
    SurveyImage

    Raises
    ------
    InputError
        Not a FITS image with a WCS and ``EXPTIME``.
    """
    try:
        with fits.open(path) as hdul:
            hdu = next(h for h in hdul if h.data is not None and h.data.ndim == 2)
            data = hdu.data.astype(np.float64)
            header = hdu.header.copy()
    except (OSError, StopIteration, ValueError) as exc:
        raise InputError(f"PS1 cutout '{path}' is not a FITS image ({exc}); delete it and rerun") from None
    if "BSOFTEN" in header and "BOFFSET" in header:  # asinh-scaled stack pixels
        a = 2.5 / math.log(10.0)
        data = header["BOFFSET"] + header["BSOFTEN"] * 2.0 * np.sinh(data / a)
    if "EXPTIME" not in header:
        raise InputError(f"PS1 cutout '{path}' has no EXPTIME card (needed for its zeropoint); delete it and rerun")
    exptime = float(header["EXPTIME"])
    zp0 = float(header.get("FPA.ZP", header.get("HIERARCH FPA.ZP", 25.0)))
    wcs = WCS(header).celestial
    if not wcs.has_celestial:
        raise InputError(f"PS1 cutout '{path}' has no celestial WCS; delete it and rerun")
    if mask is not None:
        data[(mask.astype(np.int64) & mask_bits) != 0] = np.nan
    return SurveyImage(data, wcs, zp0 + 2.5 * math.log10(exptime), exptime, str(path))


def _footprint(wcs: WCS, shape: tuple[int, int]) -> tuple[list[tuple[float, float]], float]:
    """Sky positions of a frame's centre, corners and edge midpoints (deg), and its diagonal (arcsec)."""
    ny, nx = shape
    xs = np.array([0.5, 0, 1, 0, 1, 0.5, 0.5, 0, 1]) * (nx - 1)
    ys = np.array([0.5, 0, 0, 1, 1, 0, 1, 0.5, 0.5]) * (ny - 1)
    ra, dec = wcs.all_pix2world(xs, ys, 0)
    c = np.cos(np.radians(dec[0]))
    diag = float(np.hypot((ra[4] - ra[1]) * c, dec[4] - dec[1]) * 3600.0)
    return list(zip(ra.tolist(), dec.tolist(), strict=True)), diag


def _fetch_ps1(wcs: WCS, shape: tuple[int, int], band: str, settings: dict[str, Any], cache: Path) -> list[SurveyImage]:
    """The PS1 images (stacks or warps) covering a frame, as cutouts around its centre."""
    kind = "stack" if settings["mode"] == "stack" else "warp"
    positions, diag = _footprint(wcs, shape)
    ra_c, dec_c = positions[0]
    size = int(math.ceil((diag + 10.0) / PS1_SCALE))
    url = settings["url"] or PS1_URL
    opts = {"url": url, "cache": cache, "timeout": settings["timeout"]}
    files = ps1_listing(positions, band, kind=kind, **opts)
    if len(files) == 0:
        raise InputError(
            f"PS1 has no {kind} image in band {band} at ({ra_c:.5f}, {dec_c:.5f}) (3pi covers dec > -30 deg): "
            "choose another survey or give the reference frames yourself"
        )
    masks = set()
    if settings["masks"]:
        masks = {str(r["filename"]) for r in ps1_listing(positions, band, kind=f"{kind}.mask", **opts)}
    timeout = settings["timeout"]
    images = []
    for row in files:
        name = str(row["filename"])
        path = cached_fetch(ps1_cutout_url(name, ra_c, dec_c, size, url=url), cache, timeout=timeout, what="PS1 cutout")
        mask = None
        if settings["masks"]:
            mask_name = name.removesuffix(".fits") + ".mask.fits"
            if mask_name not in masks:
                raise InputError(
                    f"PS1 lists no mask '{mask_name}' for '{name}'; set 'frames.reference.masks: false' to go without"
                )
            mask_url = ps1_cutout_url(mask_name, ra_c, dec_c, size, url=url)
            mask = fits.getdata(cached_fetch(mask_url, cache, timeout=timeout, what="PS1 mask cutout"))
        image = read_ps1(path, mask=mask, mask_bits=settings["mask_bits"])
        image.source = name.rsplit("/", 1)[-1]
        images.append(image)
    return images


def legacy_cutout_url(ra: float, dec: float, size: int, band: str, *, layer: str, url: str) -> str:
    """``fits-cutout`` URL of a Legacy Surveys coadd cutout at the native 0.262 arcsec/px, centred on (ra, dec) (deg)."""
    query = urllib.parse.urlencode(
        {
            "ra": f"{ra:.6f}",
            "dec": f"{dec:.6f}",
            "layer": layer,
            "pixscale": LEGACY_SCALE,
            "bands": band,
            "size": int(size),
        }
    )
    return f"{url.rstrip('/')}/fits-cutout?{query}"


def read_legacy(path: str | os.PathLike) -> SurveyImage:
    """A Legacy Surveys cutout (nanomaggies, one band; zeropoint 22.5), blank (0 or NaN) pixels set to NaN.

    Parameters
    ----------
    path : path-like
        The cutout (FITS; a single-band cube is taken as its plane).

    Returns
    -------
    SurveyImage
        ``exptime`` is 1 (coadds carry no exposure time of their own).

    Raises
    ------
    InputError
        Not a FITS image with a celestial WCS.
    """
    try:
        with fits.open(path) as hdul:
            hdu = next(h for h in hdul if h.data is not None and h.data.ndim in (2, 3))
            data = np.asarray(hdu.data, np.float64)
            header = hdu.header.copy()
    except (OSError, StopIteration, ValueError) as exc:
        raise InputError(f"Legacy Surveys cutout '{path}' is not a FITS image ({exc}); delete it and rerun") from None
    if data.ndim == 3:
        data = data[0]
    wcs = WCS(header, naxis=2)
    if not wcs.has_celestial:
        raise InputError(f"Legacy Surveys cutout '{path}' has no celestial WCS; delete it and rerun")
    data[data == 0] = np.nan  # outside the survey's footprint
    return SurveyImage(data, wcs, LEGACY_ZP, 1.0, str(path))


def _fetch_legacy(
    wcs: WCS, shape: tuple[int, int], band: str, settings: dict[str, Any], cache: Path
) -> list[SurveyImage]:
    """The Legacy Surveys coadd cutout covering a frame (one image: the coadds are already a mosaic)."""
    if settings["mode"] != "stack":
        raise InputError(
            "survey 'legacysurvey' serves coadds only: set 'frames.reference.mode: stack' (individual exposures: use ps1)"
        )
    positions, diag = _footprint(wcs, shape)
    ra_c, dec_c = positions[0]
    size = int(math.ceil((diag + 10.0) / LEGACY_SCALE))
    if size > LEGACY_MAX_SIZE:
        raise InputError(
            f"the frame's diagonal ({diag / 60:.1f} arcmin) needs a {size} px Legacy Surveys cutout; the viewer serves "
            f"at most {LEGACY_MAX_SIZE} px: use ps1 for frames this large"
        )
    url = legacy_cutout_url(ra_c, dec_c, size, band, layer=settings["layer"], url=settings["url"] or LEGACY_URL)
    path = cached_fetch(url, cache, timeout=settings["timeout"], what="Legacy Surveys cutout")
    image = read_legacy(path)
    image.source = f"{settings['layer']}_{band}_{ra_c:.5f}_{dec_c:+.5f}"
    return [image]


def _sky_sigma(data: np.ndarray) -> float:
    """Clipped standard deviation (3 sigma) of the finite pixels."""
    import warnings

    from astropy.stats import sigma_clipped_stats
    from astropy.utils.exceptions import AstropyUserWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyUserWarning)
        return float(sigma_clipped_stats(data[np.isfinite(data)], sigma=3.0, maxiters=10)[2])


def survey_reference(
    science: str | os.PathLike,
    out_path: str | os.PathLike,
    telescope: dict[str, Any],
    *,
    settings: dict[str, Any],
) -> dict[str, Any]:
    """Fetch the survey images covering a science frame, reproject and combine them into its reference.

    Parameters
    ----------
    science : path-like
        The science frame (its WCS, shape and filter are used).
    out_path : path-like
        Output FITS (atomic): float32 primary image on the science grid (NaN where no survey
        pixel), the telescope's header keys (zeropoint, gain, read noise, saturation, filter,
        exposure), ``SURVEY``, ``SURVMODE``, ``SRVIMnnn`` (sources) and an ``NCOMB`` extension.
    telescope : dict
        Validated telescope configuration.
    settings : dict
        The ``frames.reference`` block (``survey``, ``mode``, ``url``, ``layer``, ``cache``,
        ``timeout``, ``filters``, ``masks``, ``mask_bits``, ``gain``).

    Returns
    -------
    dict
        ``n`` (images combined), ``zeropoint`` (mag), ``gain`` (e-/ADU), ``read_noise`` (e-),
        ``sky_sigma`` (ADU), ``sources`` (file names).

    Raises
    ------
    InputError
        No WCS on the science frame, a band the survey lacks, an unreachable service (naming the
        URL, the cache folder and the file to put there by hand), no image covering the frame.
    """
    from reproject import reproject_adaptive

    image = read_image(science, hdu=frame_hdu(telescope))
    wcs = image.require_wcs()
    info = frame_info(image.header, telescope, path=science)
    band = settings["filters"].get(info.filter, info.filter)
    survey = settings["survey"]
    bands = _BANDS[survey]
    if band not in bands:
        raise InputError(
            f"survey reference for '{science}': {survey} has no filter {band!r} (has {', '.join(bands)}); map the "
            f"frame's filter {info.filter!r} to one in 'frames.reference.filters'"
        )
    cache = Path(settings["cache"])
    shape = image.data.shape
    fetch = _fetch_ps1 if survey == "ps1" else _fetch_legacy
    images = fetch(wcs, shape, band, settings, cache)
    zp0 = images[0].zeropoint
    area_out = float(np.abs(np.linalg.det(wcs.pixel_scale_matrix)))
    stack = np.full((len(images), *shape), np.nan)
    sig = np.zeros(len(images))
    for k, im in enumerate(images):
        area_in = float(np.abs(np.linalg.det(im.wcs.pixel_scale_matrix)))
        # flux per output pixel = surface brightness x output area; then scaled to the first zeropoint
        flux = im.data * (area_out / area_in) * 10 ** (0.4 * (zp0 - im.zeropoint))
        out, foot = reproject_adaptive(
            (flux, im.wcs), wcs, shape_out=shape, conserve_flux=False, boundary_mode="strict", bad_value_mode="ignore"
        )
        out[foot < 0.999] = np.nan
        stack[k] = out
        sig[k] = _sky_sigma(out) if np.isfinite(out).any() else np.nan
    usable = np.isfinite(sig) & (sig > 0)
    if not usable.any():
        raise InputError(f"survey reference for '{science}': no survey pixel falls on the frame")
    weights = np.where(usable, 1.0 / np.where(usable, sig, 1.0) ** 2, 0.0)
    good = np.isfinite(stack) & (weights[:, None, None] > 0)
    w = np.where(good, weights[:, None, None], 0.0)
    wsum = w.sum(axis=0)
    ncomb = good.sum(axis=0)
    ref = np.where(wsum > 0, np.nansum(np.where(good, stack, 0.0) * w, axis=0) / np.where(wsum > 0, wsum, 1.0), np.nan)
    ref = ref.astype(np.float32)
    sky_sigma = _sky_sigma(ref)
    gain = float(settings["gain"])
    read_noise = gain * sky_sigma
    saturation = float(np.nanmax(ref)) * 1.01 + 1.0
    keys = telescope["header"]
    hdr = wcs.to_header(relax=True)
    hdr[keys["filter"]] = (info.filter, "science frame's filter")
    hdr[keys["zeropoint"]] = (zp0, "[mag] zeropoint for 1 ADU (survey's)")
    hdr[keys["exptime"]] = (images[0].exptime, "[s] exposure of the first survey image")
    hdr[keys["gain"]] = (gain, "[e-/ADU] survey gain (frames.reference.gain)")
    hdr[keys["read_noise"]] = (read_noise, "[e-] sky noise of the reprojected survey")
    hdr[keys["saturation"]] = (saturation, "[ADU] above every pixel: survey masks its own")
    hdr["SURVEY"] = (settings["survey"], "survey the reference comes from")
    hdr["SURVMODE"] = (settings["mode"], "survey images: stack or individual exposures")
    hdr["SURVBAND"] = (band, "survey filter")
    for k, im in enumerate(images, start=1):
        hdr[f"SRVIM{k:03d}"] = (im.source[-60:], "survey file")
    write_fits(
        fits.HDUList([fits.PrimaryHDU(ref, header=hdr), fits.ImageHDU(ncomb.astype(np.uint8), name="NCOMB")]), out_path
    )
    log.info(
        "survey reference: %d %s %s image(s) in %s -> '%s': zeropoint %.3f, sky rms %.3f ADU",
        len(images),
        settings["survey"],
        settings["mode"],
        band,
        out_path,
        zp0,
        sky_sigma,
    )
    return {
        "n": len(images),
        "zeropoint": zp0,
        "gain": gain,
        "read_noise": read_noise,
        "sky_sigma": sky_sigma,
        "sources": [im.source for im in images],
    }
