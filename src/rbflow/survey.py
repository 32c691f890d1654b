"""Reference frames made from a public survey's images (Pan-STARRS1, Legacy Surveys, SkyMapper, any HiPS), for telescopes without their own.

For each science frame, the survey images covering it in the frame's filter (or the survey band
``frames.reference.filters`` maps it to, or the bands a colour term makes it from) are found
through the survey's file-listing service,
fetched as FITS cutouts and cached (:func:`rbflow.download.cached_fetch`: a rerun downloads
nothing), reprojected onto the science frame's pixel grid with flux conserved
(:func:`reproject.reproject_adaptive`, an anti-aliased resampling suited to going from the
survey's fine pixels to coarser ones), scaled to the zeropoint of the first image and combined
by an inverse-variance weighted mean (pixels masked in an image are left out of it, and so is
every output pixel whose resampling kernel reaches a masked or blank survey pixel: the valid-pixel
map is resampled alike).

Pan-STARRS1 (Chambers et al. 2016; Flewelling et al. 2020), through the STScI image service:

* ``ps1filenames.py?ra=&dec=&filters=&type=`` lists the sky cells' files containing a position
  (a space-separated table: ``projcell subcell ra dec filter mjd type filename shortname badflag``);
  rbflow asks at the frame's centre, corners and edge midpoints, so every cell touching it is found;
* ``fitscut.cgi?ra=&dec=&size=&format=fits&red=<filename>`` cuts a FITS image (0.25 arcsec/px).

``mode: stack`` uses the 3pi stacks (``type=stack``, mosaicked where the frame spans several
sky cells); ``mode: individual`` uses every single-exposure warp (``type=warp``) and stacks
them here. Pixels are counts: fitscut.cgi cutouts are linear; full sky-cell stack files store
asinh "luptitudes" with ``BSOFTEN``/``BOFFSET`` cards, linear flux = ``BOFFSET + BSOFTEN * 2
sinh(v / (2.5 / ln 10))``, applied whenever the cards are present (PS1 image documentation:
cutouts are converted to linear fluxes and warps never use the asinh scaling). The zeropoint of a stack is ``25 + 2.5 log10(EXPTIME)`` (PS1 image
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

SkyMapper Southern Survey DR4 (Onken et al. 2024), through its Simple Image Access service:
``query?POS=&SIZE=&BAND=&FORMAT=image/fits&INTERSECT=overlaps&RESPONSEFORMAT=CSV`` lists the
single CCD exposures overlapping the frame (columns ``unique_image_id``, ``band``,
``image_type``...; only ``main`` 100 s exposures are used, not the 5 s ``short`` ones) and
``get_image?IMAGE=&SIZE=&POS=&FORMAT=fits`` cuts each (at most 0.17 deg; 0.496 arcsec/px; TPV
WCS). Pixels are ADU with the sky left in (rbflow subtracts the clipped median) and ``ZPAPPROX``
the AB zeropoint of 1 ADU; pixels at or above ``SATURATE`` are masked. Only ``mode: individual``.

Any HiPS image survey, through CDS hips2fits (Fernique et al. 2015; Boch et al. 2020):
``hips2fits?hips=&width=&height=&projection=TAN&fov=&ra=&dec=&coordsys=icrs&rotation_angle=0&format=fits``
resamples the HiPS tiles onto a TAN grid at ``frames.reference.pixscale`` (the HiPS's own
``hips_pixel_scale``), in the HiPS's units, whose zeropoint ``frames.reference.zeropoint`` gives;
blank (NaN) pixels are outside its coverage.

When the survey lacks the frame's filter, a colour term makes it from the survey's bands (see
:data:`COLOUR_TERMS`; ``frames.reference.colour_terms`` adds others): ``X = m_base + a0 + a1 c + a2 c^2``
with the colour ``c = m_1 - m_2``. Both bands' references are built, the colour of every pixel is
measured on the two images smoothed by a Gaussian (:data:`COLOUR_SMOOTH` px) where their S/N is
above :data:`COLOUR_SNR` (elsewhere the median of those colours), clipped to the term's range,
and the base band's reference is scaled by ``10^(-0.4 P(c))``: each star is transformed with its
own colour. The term, its citation and its published scatter go into the reference header; the
reference's zeropoint is then in the term's system (Vega for Tonry et al.'s B V R I).
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
    "SKYMAPPER_URL",
    "SKYMAPPER_BANDS",
    "HIPS2FITS_URL",
    "SURVEY_URLS",
    "ColourTerm",
    "COLOUR_TERMS",
    "colour_term",
    "SurveyImage",
    "ps1_listing",
    "ps1_cutout_url",
    "read_ps1",
    "legacy_cutout_url",
    "read_legacy",
    "skymapper_query_url",
    "skymapper_cutout_url",
    "read_skymapper",
    "hips2fits_url",
    "read_hips2fits",
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

#: Base URL of the SkyMapper DR4 Simple Image Access service (``query`` and ``get_image``).
SKYMAPPER_URL = "https://api.skymapper.nci.org.au/public/siap/dr4"

#: Filters of SkyMapper.
SKYMAPPER_BANDS = ("u", "v", "g", "r", "i", "z")

#: Pixel scale (arcsec/px) of SkyMapper's CCD images.
SKYMAPPER_SCALE = 0.496

#: Largest cutout side (deg) SkyMapper's get_image serves.
SKYMAPPER_MAX_DEG = 0.17

#: CDS hips2fits service.
HIPS2FITS_URL = "https://alasky.cds.unistra.fr/hips-image-services/hips2fits"

#: Default base URL of each survey's services (``decals`` is the Legacy Surveys viewer too).
SURVEY_URLS = {
    "ps1": PS1_URL,
    "legacysurvey": LEGACY_URL,
    "decals": LEGACY_URL,
    "skymapper": SKYMAPPER_URL,
    "hips2fits": HIPS2FITS_URL,
}

#: Filters of each survey (hips2fits: the keys of ``frames.reference.hips``).
_BANDS = {
    "ps1": PS1_BANDS,
    "legacysurvey": LEGACY_BANDS,
    "decals": LEGACY_BANDS,
    "skymapper": SKYMAPPER_BANDS,
}

#: Gaussian sigma (px of the frame) of the smoothing the pixel colours of a colour term are measured on.
COLOUR_SMOOTH = 2.0

#: S/N (of the smoothed images) above which a pixel's own colour is used; elsewhere the median colour.
COLOUR_SNR = 5.0


@dataclass(frozen=True)
class ColourTerm:
    """A published transformation ``X = m_base + a0 + a1 c + a2 c^2`` with ``c = m_colour[0] - m_colour[1]`` (AB/Vega as published).

    Attributes
    ----------
    base : str
        Survey band the transformed magnitude starts from.
    colour : tuple of str
        The two survey bands of the colour.
    coefficients : tuple of float
        a0, a1, a2 (mag).
    colour_range : tuple of float
        Colours (mag) the term is applied over; pixel colours are clipped to it.
    scatter : float
        Published rms of stars about the term (mag).
    citation : str
        Where the term is published.
    """

    base: str
    colour: tuple[str, str]
    coefficients: tuple[float, ...]
    colour_range: tuple[float, float]
    scatter: float
    citation: str

    def offset(self, c: np.ndarray) -> np.ndarray:
        """``X - m_base`` (mag) at colours ``c`` (mag)."""
        return sum(a * np.asarray(c, float) ** k for k, a in enumerate(self.coefficients))

    def formula(self, band: str) -> str:
        """The term as a string, e.g. ``V = r + 0.005 + 0.462 (g-r) + 0.013 (g-r)^2``."""
        c = f"({self.colour[0]}-{self.colour[1]})"
        parts = [f"{self.coefficients[0]:+.3f}"] + [
            f"{a:+.3f} {c}" + (f"^{k}" if k > 1 else "") for k, a in enumerate(self.coefficients[1:], start=1)
        ]
        return f"{band} = {self.base} " + " ".join(p[0] + " " + p[1:] for p in parts)


_TONRY = "Tonry et al. 2012, ApJ 750, 99, Table 6 (quadratic fit)"

#: Colour terms from a survey's bands to a filter it lacks, per survey. Pan-STARRS1 to Johnson B,
#: V and Cousins R (Vega): Tonry et al. (2012) Table 6, x = (g-r)_P1, scatter of stars 0.032,
#: 0.012, 0.015 mag; applied over -0.3 < g-r < 1.6 (F to mid-M stars).
COLOUR_TERMS: dict[str, dict[str, ColourTerm]] = {
    "ps1": {
        "B": ColourTerm("g", ("g", "r"), (0.212, 0.556, 0.034), (-0.3, 1.6), 0.032, _TONRY),
        "V": ColourTerm("r", ("g", "r"), (0.005, 0.462, 0.013), (-0.3, 1.6), 0.012, _TONRY),
        "R": ColourTerm("r", ("g", "r"), (-0.137, -0.108, -0.029), (-0.3, 1.6), 0.015, _TONRY),
        "I": ColourTerm("i", ("g", "r"), (-0.366, -0.136, -0.018), (-0.3, 1.6), 0.017, _TONRY),
    },
}

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


def read_ps1(
    path: str | os.PathLike, *, kind: str = "stack", mask: np.ndarray | None = None, mask_bits: int = 0
) -> SurveyImage:
    """A PS1 cutout as linear flux with its zeropoint (stack or warp), masked pixels set to NaN.

    Parameters
    ----------
    path : path-like
        The cutout (FITS).
    kind : {'stack', 'warp'}, optional
        Stacks have the zeropoint ``25 + 2.5 log10(EXPTIME)`` (PS1 stack image documentation),
        warps ``FPA.ZP + 2.5 log10(EXPTIME)`` (their header's zeropoint of 1 count/s).
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
    zp0 = 25.0 if kind == "stack" else float(header.get("FPA.ZP", 25.0))
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
        image = read_ps1(path, kind=kind, mask=mask, mask_bits=settings["mask_bits"])
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
            f"survey '{settings['survey']}' serves coadds only: set 'frames.reference.mode: stack' "
            "(individual exposures: use ps1 or skymapper)"
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


def skymapper_query_url(ra: float, dec: float, size_deg: float, band: str, *, url: str) -> str:
    """SIAP ``query`` URL listing (as CSV) the SkyMapper images overlapping a ``size_deg`` square centred on (ra, dec) (deg)."""
    query = urllib.parse.urlencode(
        {
            "POS": f"{ra:.6f},{dec:.6f}",
            "SIZE": f"{size_deg:.5f}",
            "BAND": band,
            "FORMAT": "image/fits",
            "INTERSECT": "overlaps",
            "RESPONSEFORMAT": "CSV",
        }
    )
    return f"{url.rstrip('/')}/query?{query}"


def skymapper_cutout_url(image_id: str, ra: float, dec: float, size_deg: float, *, url: str) -> str:
    """``get_image`` URL of a ``size_deg`` square FITS cutout of SkyMapper image ``image_id`` centred on (ra, dec) (deg)."""
    query = urllib.parse.urlencode(
        {"IMAGE": image_id, "SIZE": f"{size_deg:.5f}", "POS": f"{ra:.6f},{dec:.6f}", "FORMAT": "fits"}
    )
    return f"{url.rstrip('/')}/get_image?{query}"


def read_skymapper(path: str | os.PathLike) -> SurveyImage:
    """A SkyMapper cutout: ADU less the clipped median sky, zeropoint ``ZPAPPROX``, pixels at ``SATURATE`` or above NaN.

    Parameters
    ----------
    path : path-like
        The cutout (FITS).

    Returns
    -------
    SurveyImage

    Raises
    ------
    InputError
        Not a FITS image with a celestial WCS and ``ZPAPPROX``.
    """
    try:
        with fits.open(path) as hdul:
            hdu = next(h for h in hdul if h.data is not None and h.data.ndim == 2)
            data = hdu.data.astype(np.float64)
            header = hdu.header.copy()
    except (OSError, StopIteration, ValueError) as exc:
        raise InputError(f"SkyMapper cutout '{path}' is not a FITS image ({exc}); delete it and rerun") from None
    if "ZPAPPROX" not in header:
        raise InputError(f"SkyMapper cutout '{path}' has no ZPAPPROX card (its zeropoint); delete it and rerun")
    wcs = WCS(header).celestial
    if not wcs.has_celestial:
        raise InputError(f"SkyMapper cutout '{path}' has no celestial WCS; delete it and rerun")
    if "SATURATE" in header:
        data[data >= float(header["SATURATE"])] = np.nan
    data -= _sky_level(data)
    return SurveyImage(data, wcs, float(header["ZPAPPROX"]), float(header.get("EXPTIME", 100.0)), str(path))


def _fetch_skymapper(
    wcs: WCS, shape: tuple[int, int], band: str, settings: dict[str, Any], cache: Path
) -> list[SurveyImage]:
    """The SkyMapper main (100 s) exposures overlapping a frame, as cutouts around its centre."""
    if settings["mode"] != "individual":
        raise InputError(
            "survey 'skymapper' serves single exposures only (stacked here): set 'frames.reference.mode: individual'"
        )
    positions, diag = _footprint(wcs, shape)
    ra_c, dec_c = positions[0]
    size_deg = (diag + 10.0) / 3600.0
    if size_deg > SKYMAPPER_MAX_DEG:
        raise InputError(
            f"the frame's diagonal ({diag / 60:.1f} arcmin) needs a {size_deg:.3f} deg SkyMapper cutout; get_image "
            f"serves at most {SKYMAPPER_MAX_DEG} deg: use ps1 or hips2fits for frames this large"
        )
    url = settings["url"] or SKYMAPPER_URL
    listing = cached_fetch(
        skymapper_query_url(ra_c, dec_c, size_deg, band, url=url),
        cache,
        timeout=settings["timeout"],
        what="SkyMapper image query",
    )
    try:
        table = Table.read(listing.read_text().splitlines(), format="ascii.csv", guess=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure is reported with the file
        raise InputError(f"SkyMapper image query '{listing}' is not a CSV table ({exc}); delete it and rerun") from None
    if not {"unique_image_id", "band", "image_type"} <= set(table.colnames):
        raise InputError(
            f"SkyMapper image query '{listing}' lacks the columns unique_image_id/band/image_type (has "
            f"{table.colnames}): check 'frames.reference.url'; delete the file and rerun"
        )
    ids = sorted({str(r["unique_image_id"]) for r in table if r["band"] == band and r["image_type"] == "main"})
    if not ids:
        raise InputError(
            f"SkyMapper has no main exposure in band {band} at ({ra_c:.5f}, {dec_c:.5f}) (it covers the southern sky): "
            "choose another survey or give the reference frames yourself"
        )
    images = []
    for image_id in ids:
        path = cached_fetch(
            skymapper_cutout_url(image_id, ra_c, dec_c, size_deg, url=url),
            cache,
            timeout=settings["timeout"],
            what="SkyMapper cutout",
        )
        image = read_skymapper(path)
        image.source = f"skymapper_{image_id}"
        images.append(image)
    return images


def hips2fits_url(hips: str, ra: float, dec: float, size: int, scale: float, *, url: str) -> str:
    """hips2fits URL of a ``size`` x ``size`` TAN image of HiPS ``hips`` at ``scale`` arcsec/px, north up, centred on (ra, dec) (deg)."""
    query = urllib.parse.urlencode(
        {
            "hips": hips,
            "width": int(size),
            "height": int(size),
            "projection": "TAN",
            "fov": f"{size * scale / 3600.0:.6f}",
            "ra": f"{ra:.6f}",
            "dec": f"{dec:.6f}",
            "coordsys": "icrs",
            "rotation_angle": 0.0,
            "format": "fits",
        }
    )
    return f"{url.rstrip('/')}?{query}"


def read_hips2fits(path: str | os.PathLike, *, zeropoint: float) -> SurveyImage:
    """A hips2fits image in its HiPS's units (``zeropoint``: mag of 1 unit), blank pixels NaN.

    Parameters
    ----------
    path : path-like
        The image (FITS).
    zeropoint : float
        Magnitude of 1 unit of the HiPS's pixels.

    Returns
    -------
    SurveyImage

    Raises
    ------
    InputError
        Not a FITS image with a celestial WCS.
    """
    try:
        with fits.open(path) as hdul:
            hdu = next(h for h in hdul if h.data is not None and h.data.ndim == 2)
            data = hdu.data.astype(np.float64)  # BLANK / BSCALE applied by astropy
            header = hdu.header.copy()
    except (OSError, StopIteration, ValueError) as exc:
        raise InputError(f"hips2fits image '{path}' is not a FITS image ({exc}); delete it and rerun") from None
    wcs = WCS(header).celestial
    if not wcs.has_celestial:
        raise InputError(f"hips2fits image '{path}' has no celestial WCS; delete it and rerun")
    return SurveyImage(data, wcs, float(zeropoint), 1.0, str(path))


def _fetch_hips2fits(
    wcs: WCS, shape: tuple[int, int], band: str, settings: dict[str, Any], cache: Path
) -> list[SurveyImage]:
    """The HiPS of ``band`` resampled by hips2fits around a frame (one image)."""
    if settings["mode"] != "stack":
        raise InputError("survey 'hips2fits' serves a HiPS's all-sky image only: set 'frames.reference.mode: stack'")
    for key in ("pixscale", "zeropoint"):
        if settings.get(key) is None:
            raise InputError(
                f"survey 'hips2fits' needs 'frames.reference.{key}' (the HiPS's pixel scale in arcsec/px from its "
                "properties' hips_pixel_scale, and the magnitude of 1 unit of its pixels)"
            )
    positions, diag = _footprint(wcs, shape)
    ra_c, dec_c = positions[0]
    scale = float(settings["pixscale"])
    size = int(math.ceil((diag + 10.0) / scale))
    hips = settings["hips"][band]
    path = cached_fetch(
        hips2fits_url(hips, ra_c, dec_c, size, scale, url=settings["url"] or HIPS2FITS_URL),
        cache,
        timeout=settings["timeout"],
        what="hips2fits image",
    )
    image = read_hips2fits(path, zeropoint=settings["zeropoint"])
    image.source = f"{hips}_{ra_c:.5f}_{dec_c:+.5f}"
    return [image]


def _sky_level(data: np.ndarray) -> float:
    """Clipped median (3 sigma) of the finite pixels."""
    import warnings

    from astropy.stats import sigma_clipped_stats
    from astropy.utils.exceptions import AstropyUserWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyUserWarning)
        return float(sigma_clipped_stats(data[np.isfinite(data)], sigma=3.0, maxiters=10)[1])


def _sky_sigma(data: np.ndarray) -> float:
    """Clipped standard deviation (3 sigma) of the finite pixels."""
    import warnings

    from astropy.stats import sigma_clipped_stats
    from astropy.utils.exceptions import AstropyUserWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyUserWarning)
        return float(sigma_clipped_stats(data[np.isfinite(data)], sigma=3.0, maxiters=10)[2])


def colour_term(survey: str, band: str, settings: dict[str, Any]) -> ColourTerm | None:
    """The colour term making ``band`` from ``survey``'s bands (``frames.reference.colour_terms`` first), or None.

    Parameters
    ----------
    survey : str
        Survey name.
    band : str
        The filter wanted (after ``frames.reference.filters``).
    settings : dict
        The ``frames.reference`` block.

    Returns
    -------
    ColourTerm or None
    """
    given = settings.get("colour_terms", {}).get(band)
    if given is not None:
        return ColourTerm(
            given["base"],
            tuple(given["colour"]),
            tuple(float(a) for a in given["coefficients"]),
            tuple(float(c) for c in given["range"]),
            float(given["scatter"]),
            given["citation"],
        )
    return COLOUR_TERMS.get(survey, {}).get(band)


_FETCH = {
    "ps1": _fetch_ps1,
    "legacysurvey": _fetch_legacy,
    "decals": _fetch_legacy,
    "skymapper": _fetch_skymapper,
    "hips2fits": _fetch_hips2fits,
}


def _band_reference(
    wcs: WCS, shape: tuple[int, int], band: str, settings: dict[str, Any], cache: Path, *, science: Any
) -> tuple[np.ndarray, np.ndarray, list[SurveyImage]]:
    """One band's survey images reprojected onto the frame and combined (inverse-variance mean) at the first one's zeropoint."""
    from reproject import reproject_adaptive

    images = _FETCH[settings["survey"]](wcs, shape, band, settings, cache)
    zp0 = images[0].zeropoint
    area_out = float(np.abs(np.linalg.det(wcs.pixel_scale_matrix)))
    stack = np.full((len(images), *shape), np.nan)
    sig = np.zeros(len(images))
    for k, im in enumerate(images):
        area_in = float(np.abs(np.linalg.det(im.wcs.pixel_scale_matrix)))
        # flux per output pixel = surface brightness x output area; then scaled to the first zeropoint
        flux = im.data * (area_out / area_in) * 10 ** (0.4 * (zp0 - im.zeropoint))
        valid = np.isfinite(flux)
        opts = {"shape_out": shape, "conserve_flux": False, "boundary_mode": "strict"}
        out, foot = reproject_adaptive((np.where(valid, flux, 0.0), im.wcs), wcs, **opts)
        # the same resampling of the valid-pixel map: an output pixel whose kernel reaches a masked
        # (NaN) survey pixel is left out (renormalising over the rest biases it towards its valid side)
        cover, _ = reproject_adaptive((valid.astype(np.float64), im.wcs), wcs, **opts)
        out[(foot < 0.999) | ~(cover > 0.999)] = np.nan
        stack[k] = out
        sig[k] = _sky_sigma(out) if np.isfinite(out).any() else np.nan
    usable = np.isfinite(sig) & (sig > 0)
    if not usable.any():
        raise InputError(f"survey reference for '{science}': no {settings['survey']} {band} pixel falls on the frame")
    weights = np.where(usable, 1.0 / np.where(usable, sig, 1.0) ** 2, 0.0)
    good = np.isfinite(stack) & (weights[:, None, None] > 0)
    w = np.where(good, weights[:, None, None], 0.0)
    wsum = w.sum(axis=0)
    ref = np.where(wsum > 0, np.nansum(np.where(good, stack, 0.0) * w, axis=0) / np.where(wsum > 0, wsum, 1.0), np.nan)
    return ref, good.sum(axis=0), images


def _apply_colour_term(term: ColourTerm, refs: dict[str, np.ndarray]) -> tuple[np.ndarray, float]:
    """The base band's reference scaled pixel by pixel by ``10^(-0.4 P(c))``; returns it and the median colour (mag).

    ``refs`` are the bands' references on one zeropoint (AB, so flux ratios are colours).
    """
    from scipy.ndimage import gaussian_filter

    def smooth(a: np.ndarray) -> np.ndarray:
        return gaussian_filter(np.nan_to_num(a, nan=0.0), COLOUR_SMOOTH)

    f1, f2 = smooth(refs[term.colour[0]]), smooth(refs[term.colour[1]])
    # noise of the smoothed images: sky sigma / (2 sqrt(pi) sigma) for a Gaussian kernel
    n1, n2 = (_sky_sigma(refs[b]) / (2 * math.sqrt(math.pi) * COLOUR_SMOOTH) for b in term.colour)
    bright = (f1 > COLOUR_SNR * n1) & (f2 > COLOUR_SNR * n2)
    colour = np.full(f1.shape, np.nan)
    colour[bright] = -2.5 * np.log10(f1[bright] / f2[bright])
    median = (
        float(np.clip(np.median(colour[bright]), *term.colour_range)) if bright.any() else 0.5 * sum(term.colour_range)
    )
    colour = np.clip(np.where(bright, colour, median), *term.colour_range)
    return refs[term.base] * 10 ** (-0.4 * term.offset(colour)), median


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
        exposure), ``SURVEY``, ``SURVMODE``, ``SURVBAND``, ``SRVIMnnn`` (sources), the colour
        term when one is used (``SURVCTRM`` formula, ``SURVCREF`` citation, ``SURVCSIG`` its
        published scatter in mag, ``SURVCMED`` the median colour) and an ``NCOMB`` extension.
    telescope : dict
        Validated telescope configuration.
    settings : dict
        The ``frames.reference`` block (``survey``, ``mode``, ``url``, ``layer``, ``hips``,
        ``pixscale``, ``zeropoint``, ``cache``, ``timeout``, ``filters``, ``colour_terms``,
        ``masks``, ``mask_bits``, ``gain``).

    Returns
    -------
    dict
        ``n`` (images combined), ``zeropoint`` (mag), ``gain`` (e-/ADU), ``read_noise`` (e-),
        ``sky_sigma`` (ADU), ``sources`` (file names), ``colour_term`` (formula or None).

    Raises
    ------
    InputError
        No WCS on the science frame, a band the survey lacks with no colour term, an unreachable
        service (naming the URL, the cache folder and the file to put there by hand), no image
        covering the frame.
    """
    image = read_image(science, hdu=frame_hdu(telescope))
    wcs = image.require_wcs()
    info = frame_info(image.header, telescope, path=science)
    band = settings["filters"].get(info.filter, info.filter)
    survey = settings["survey"]
    bands = tuple(settings.get("hips") or {}) if survey == "hips2fits" else _BANDS[survey]
    term = None if band in bands else colour_term(survey, band, settings)
    if term is None and band not in bands:
        raise InputError(
            f"survey reference for '{science}': {survey} has no filter {band!r} (has {', '.join(bands)}) and no colour "
            f"term makes it: map the frame's filter {info.filter!r} to one in 'frames.reference.filters' or give one "
            "in 'frames.reference.colour_terms'"
        )
    need = (band,) if term is None else tuple(dict.fromkeys((term.base, *term.colour)))
    missing = [b for b in need if b not in bands]
    if missing:
        raise InputError(
            f"survey reference for '{science}': the colour term for {band!r} needs {survey} band(s) "
            f"{', '.join(missing)} it lacks (has {', '.join(bands)}): fix 'frames.reference.colour_terms'"
        )
    cache = Path(settings["cache"])
    shape = image.data.shape
    refs, ncombs, images, zps = {}, {}, [], {}
    for b in need:
        refs[b], ncombs[b], ims = _band_reference(wcs, shape, b, settings, cache, science=science)
        zps[b] = ims[0].zeropoint
        images += ims
    base = need[0]
    zp0 = zps[base]
    for b in need:  # every band on the base band's zeropoint (AB magnitudes: equal flux, equal magnitude)
        refs[b] = refs[b] * 10 ** (0.4 * (zp0 - zps[b]))
    median_colour = None
    if term is None:
        ref = refs[band]
    else:
        ref, median_colour = _apply_colour_term(term, refs)
    ncomb = np.min(np.stack([ncombs[b] for b in need]), axis=0)
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
    hdr["SURVEY"] = (survey, "survey the reference comes from")
    hdr["SURVMODE"] = (settings["mode"], "survey images: stack or individual exposures")
    hdr["SURVBAND"] = (",".join(need), "survey filter(s) used")
    if term is not None:
        hdr["SURVCTRM"] = term.formula(band)[:68]  # the colour term applied per pixel
        hdr["SURVCREF"] = term.citation[:68]  # where it is published
        hdr["SURVCSIG"] = (term.scatter, "[mag] published rms of stars about it")
        hdr["SURVCMED"] = (median_colour, "[mag] median colour of bright pixels")
    for k, im in enumerate(images, start=1):
        hdr[f"SRVIM{k:03d}"] = (im.source[-60:], "survey file")
    write_fits(
        fits.HDUList([fits.PrimaryHDU(ref, header=hdr), fits.ImageHDU(ncomb.astype(np.uint8), name="NCOMB")]), out_path
    )
    log.info(
        "survey reference: %d %s %s image(s) in %s -> '%s': zeropoint %.3f, sky rms %.3f ADU%s",
        len(images),
        survey,
        settings["mode"],
        ",".join(need),
        out_path,
        zp0,
        sky_sigma,
        f"; colour term {term.formula(band)} ({term.citation})" if term is not None else "",
    )
    return {
        "n": len(images),
        "zeropoint": zp0,
        "gain": gain,
        "read_noise": read_noise,
        "sky_sigma": sky_sigma,
        "sources": [im.source for im in images],
        "colour_term": term.formula(band) if term is not None else None,
    }
