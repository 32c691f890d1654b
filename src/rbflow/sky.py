"""The embedded synthetic telescope: a small survey of realistic frames with known truth.

A demo telescope file (``config/telescopes/demo.yaml``) has a ``sky`` block instead of real frames.
Each *field* holds a fixed astrophysical scene drawn from ``derive(seed, field)`` in sky coordinates
(stars with dN/dm ∝ 10^(0.3 m), Sérsic galaxies, variable stars, supernova-like and fast transients).
Each *frame* of the field (one deep reference ``{field}_{band}_ref`` and science epochs
``{field}_{band}_e{n}``) observes that scene under its own conditions drawn from
``derive(seed, frame, ...)``: pointing offset and rotation, seeing, a spatially varying Moffat PSF
(optionally with what real PSFs add: a broad halo, coma-like asymmetry growing outwards, and
small-scale changes across the frame; see :func:`psf_stamp`), transparency (zeropoint), sky with a gradient, flat-field residuals, Poisson and read noise,
saturation with bleed trails, cosmic rays, satellite trails, and the detector's hot pixels and bad
columns (drawn from ``derive(seed, telescope, 'detector')``, the same in every frame). The
``artefacts`` block adds the bogus zoo of real survey cameras (:mod:`rbflow.artefacts`).

Domain randomisation
--------------------
With ``sky.randomise.enabled`` each field is seen through its own camera, drawn by
:func:`field_randomisation` from ``derive(seed, field, 'randomise')``: sampling (an effective pixel
scale at fixed seeing in arcsec, which rescales the sky's angular sizes and densities while the WCS
keeps the telescope's ``pixel_scale``), depth, read noise, PSF family, astrometric errors, star
density and a factor on the artefact rates (:attr:`FrameConditions.artefact_scale`).

Geometry
--------
The *true* mapping from the sky to a frame's pixels is a TAN projection (the frame's pointing and
rotation) followed by a smooth distortion residual ``D(x, y)``. The header WCS is the same TAN
projection with its reference pixel shifted by ``wcs_error``: it is close to, but not exactly, the
truth, as a real astrometric solution would be. :func:`frame_conditions` exposes both.

Units: pixel positions are 0-based (pixel centres at integers); fluxes are ADU in the frame's
exposure; magnitudes are ``-2.5 log10(flux) + MAGZP``; FWHM is in pixels unless stated.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass
from dataclasses import field as dc_field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.table import Table, vstack
from astropy.wcs import WCS, FITSFixedWarning
from scipy import ndimage, signal

from rbflow import __version__, artefacts
from rbflow.artefacts import ZOO_KINDS
from rbflow.errors import ConfigError, InputError
from rbflow.frames import frames_of
from rbflow.io import write_fits, write_table
from rbflow.seeds import derive

__all__ = [
    "FieldScene",
    "FrameConditions",
    "field_randomisation",
    "field_scene",
    "frame_conditions",
    "simulate_frame",
    "write_frame",
    "psf_stamp",
    "variables_catalogue",
    "write_variables_catalogue",
    "TRUTH_KINDS",
    "REAL_KINDS",
]

log = logging.getLogger(__name__)

#: Values of the ``kind`` column of a frame's truth table.
TRUTH_KINDS = (
    "star",
    "galaxy",
    "variable",
    "transient",
    "cosmic_ray",
    "hot_pixel",
    "bad_column",
    "satellite",
    "bleed",
    *ZOO_KINDS,
)

#: Kinds that are real astrophysical sources: a candidate on one of them is real.
REAL_KINDS = ("variable", "transient", "asteroid")

#: Densities in the ``sky`` block (stars, galaxies, cosmic rays, hot pixels) are per this many pixels.
_REF_AREA = 1024 * 1024
#: Stamp half-sizes (pixels) that point sources are grouped into, to vectorise their rendering.
_HALF_SIZES = np.array([4, 6, 8, 11, 16, 23, 32, 45, 64, 91, 128])
#: Core half-size (pixels) and oversampling of the pixel integration of point sources.
_CORE, _OVERSAMPLE = 3, 5
#: Days between science epochs; the reference stack is dated 40 days before the first epoch.
_CADENCE, _REF_LEAD = 4.0, 40.0
_MJD0 = 61000.25
_MJD_EPOCH = datetime(1858, 11, 17)


# --------------------------------------------------------------------------------------------
# Field scene: the astrophysical content, common to all frames of a field
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FieldScene:
    """What a field holds on the sky, the same for all its frames.

    Attributes
    ----------
    field : str
        Field id (``fld00``).
    filter : str
        The field's filter.
    ra_c, dec_c : float
        Field centre (deg).
    mjd : numpy.ndarray
        Observation date (MJD) of the reference (index 0) and of each science epoch (1..n).
    objects : astropy.table.Table
        One row per object: ``id, kind, ra, dec`` (deg), ``mags`` (shape (n_epochs + 1,), mag; index
        0 is the reference, NaN where the object is absent), ``r_eff`` (arcsec, galaxies), ``sersic_n``,
        ``q`` (axis ratio), ``pa`` (deg, east of north), ``host`` (galaxy id or '').
    """

    field: str
    filter: str
    ra_c: float
    dec_c: float
    mjd: np.ndarray
    objects: Table


def _tel_source(telescope: dict[str, Any]) -> str:
    return f"telescope file '{telescope.get('name', '?')}.yaml'"


def _sky_block(telescope: dict[str, Any]) -> dict[str, Any]:
    if "sky" not in telescope:
        raise ConfigError(f"{_tel_source(telescope)} has no 'sky' block: only demo telescopes can be simulated")
    rand = telescope["sky"].get("randomise", {})
    drawn_rn = rand.get("enabled", False) and rand.get("read_noise") is not None
    for key in ("gain", "read_noise", "saturation"):
        if telescope.get(key) is None and not (key == "read_noise" and drawn_rn):
            raise ConfigError(f"{_tel_source(telescope)}: key '{key}' must be a number for a synthetic telescope")
    if drawn_rn and telescope.get("read_noise") is not None:
        raise ConfigError(
            f"{_tel_source(telescope)}: 'sky.randomise.read_noise' draws each field's read noise, but "
            f"'read_noise: {telescope['read_noise']}' would make every stage use that value instead of the "
            "frames' RDNOISE cards; set 'read_noise: null' (or 'sky.randomise.read_noise: null')"
        )
    return telescope["sky"]


#: Keys of ``sky.randomise`` drawn log-uniform (the others uniform), and every drawn key in drawing order.
_LOG_UNIFORM = ("sampling", "exptime_scale", "read_noise", "star_density", "artefact_scale")
_RANDOMISED = (
    "sampling",
    "exptime_scale",
    "zeropoint_offset",
    "sky_offset",
    "read_noise",
    "moffat_beta",
    "psf_variation",
    "psf_ellipticity",
    "psf_halo_fraction",
    "psf_coma",
    "psf_ripple",
    "wcs_error",
    "distortion_residual",
    "star_density",
    "artefact_scale",
)


def field_randomisation(telescope: dict[str, Any], field: str, *, seed: int) -> dict[str, float]:
    """The camera and conditions one field is seen with (``sky.randomise``; the sky block's own when off).

    Parameters
    ----------
    telescope : dict
        Validated demo telescope (with its ``sky`` block).
    field : str
        Field id, e.g. ``"fld00"``.
    seed : int
        Global seed; the draws use ``derive(seed, field, 'randomise')``.

    Returns
    -------
    dict
        ``pixel_scale`` (effective arcsec/pixel of the field: the sky's angular sizes are scaled by
        the telescope's ``pixel_scale`` over it), ``exptime_scale`` (factor), ``zeropoint_offset``
        (mag), ``sky_offset`` (mag/arcsec^2), ``read_noise`` (e-), ``moffat_beta``,
        ``psf_variation``, ``psf_ellipticity``, ``psf_halo_fraction``, ``psf_coma``, ``psf_ripple``
        (as the sky keys), ``wcs_error``, ``distortion_residual`` (pixels), ``star_density`` and
        ``artefact_scale`` (factors; ``star_density`` times the field's ``sky.field_star_density``).
        With randomisation off: the telescope's pixel scale and read noise, the sky block's values,
        factors 1 (but that one) and offsets 0.

    Raises
    ------
    ConfigError
        The telescope is not a valid synthetic telescope.
    """
    sky = _sky_block(telescope)
    rand = sky.get("randomise", {})
    out = {
        "pixel_scale": float(telescope["pixel_scale"]),
        "exptime_scale": 1.0,
        "zeropoint_offset": 0.0,
        "sky_offset": 0.0,
        "read_noise": telescope["read_noise"],
        "moffat_beta": sky["moffat_beta"],
        "star_density": 1.0,
        "artefact_scale": 1.0,
        **{
            k: sky[k]
            for k in (
                "psf_variation",
                "psf_ellipticity",
                "psf_halo_fraction",
                "psf_coma",
                "psf_ripple",
                "wcs_error",
                "distortion_residual",
            )
        },
    }
    if rand.get("enabled", False):
        g = np.random.default_rng(derive(seed, field, "randomise"))
        for key in _RANDOMISED:
            bounds = rand[key]
            if bounds is None:  # read_noise: null keeps the telescope's (draw anyway: the others stay put)
                g.random()
                continue
            lo, hi = sorted(float(b) for b in bounds)
            if key in _LOG_UNIFORM and lo > 0:
                out[key] = float(math.exp(g.uniform(math.log(lo), math.log(hi))))
            else:
                out[key] = float(g.uniform(lo, hi))
        out["pixel_scale"] = 0.5 * (sky["seeing"][0] + sky["seeing"][1]) / out.pop("sampling")
    density = sky.get("field_star_density", [])
    if density:
        out["star_density"] *= float(density[_field_spec(telescope, field)[0] % len(density)])
    out["read_noise"] = float(out["read_noise"])
    return out


def _filter_value(telescope: dict[str, Any], key: str, band: str) -> float:
    table = telescope["sky"][key]
    if band not in table:
        raise ConfigError(
            f"{_tel_source(telescope)}: key 'sky.{key}' has no entry for filter {band!r}; add '{band}: <value>' to it"
        )
    return float(table[band])


def _field_spec(telescope: dict[str, Any], field: str) -> tuple[int, str]:
    for spec in frames_of(telescope):
        if spec.field == field:
            return int(field[3:]), spec.filter
    known = sorted({s.field for s in frames_of(telescope)})
    raise InputError(f"field {field!r} is not in {_tel_source(telescope)}; its fields are {', '.join(known)}")


def _tan_header(ra: float, dec: float, crpix: tuple[float, float], scale_deg: float, rot_deg: float) -> fits.Header:
    c, s = math.cos(math.radians(rot_deg)), math.sin(math.radians(rot_deg))
    h = fits.Header()
    h["WCSAXES"] = 2
    h["CTYPE1"], h["CTYPE2"] = "RA---TAN", "DEC--TAN"
    h["CUNIT1"], h["CUNIT2"] = "deg", "deg"
    h["CRVAL1"], h["CRVAL2"] = ra, dec
    h["CRPIX1"], h["CRPIX2"] = crpix
    h["CD1_1"], h["CD1_2"] = -scale_deg * c, scale_deg * s
    h["CD2_1"], h["CD2_2"] = scale_deg * s, scale_deg * c
    h["RADESYS"] = "ICRS"
    return h


def _wcs(header: fits.Header) -> WCS:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(header)


def _margin(sky: dict[str, Any]) -> int:
    """Extra border (pixels) around a frame over which the field scene is drawn."""
    nx, ny = sky["size"]
    rot = 0.5 * math.hypot(nx, ny) * math.sin(math.radians(5 * sky["rotation"]))
    return int(math.ceil(5 * sky["pointing_offset"] + rot + 32))


def _field_centre(telescope: dict[str, Any], index: int) -> tuple[float, float]:
    """Centre (deg) of field number ``index``: fields step east by 1.5 frame diagonals, without overlap."""
    sky = telescope["sky"]
    spacing = 1.5 * math.hypot(*sky["size"]) * telescope["pixel_scale"] / 3600.0
    dec = float(sky["dec0"])
    return float((sky["ra0"] + index * spacing / math.cos(math.radians(dec))) % 360.0), dec


def _power_law_mags(rng: np.random.Generator, n: int, lo: float, hi: float, slope: float) -> np.ndarray:
    """Magnitudes in [lo, hi] with dN/dm ∝ 10^(slope m) (inverse-CDF sampling)."""
    a, b = 10 ** (slope * lo), 10 ** (slope * hi)
    return np.log10(a + rng.random(n) * (b - a)) / slope


def field_scene(telescope: dict[str, Any], field: str, *, seed: int) -> FieldScene:
    """Draw the astrophysical content of one field (identical for all its frames).

    Parameters
    ----------
    telescope : dict
        Validated demo telescope (with its ``sky`` block).
    field : str
        Field id, e.g. ``"fld00"``.
    seed : int
        Global seed; the scene uses ``derive(seed, field)``.

    Returns
    -------
    FieldScene

    Raises
    ------
    ConfigError
        The telescope has no ``sky`` block or misses a per-filter value.
    InputError
        ``field`` is not one of the telescope's fields.
    """
    sky = _sky_block(telescope)
    index, band = _field_spec(telescope, field)
    rng = np.random.default_rng(derive(seed, field))
    nx, ny = sky["size"]
    scale = telescope["pixel_scale"] / 3600.0
    # Randomised sampling: the sky's angular sizes shrink by this factor (pixel_scale / effective scale)
    # and its surface densities per pixel grow by its inverse square, as a coarser pixel would see them.
    draw = field_randomisation(telescope, field, seed=seed)
    shrink = telescope["pixel_scale"] / draw["pixel_scale"]
    ra_c, dec_c = _field_centre(telescope, index)
    m = _margin(sky)
    wx, wy = nx + 2 * m, ny + 2 * m
    area = wx * wy / _REF_AREA
    fwcs = _wcs(_tan_header(ra_c, dec_c, ((wx + 1) / 2, (wy + 1) / 2), scale, 0.0))
    n_ep = sky["epochs"]
    mjd = np.concatenate([[_MJD0 - _REF_LEAD], _MJD0 + _CADENCE * np.arange(n_ep)]) + 0.01 * index

    inner = m + 20  # variables and transients stay > 20 px inside every frame of the field

    def positions(n: int, *, border: int = 0) -> tuple[np.ndarray, np.ndarray]:
        px = rng.uniform(border - 0.5, wx - border - 0.5, n)
        py = rng.uniform(border - 0.5, wy - border - 0.5, n)
        return fwcs.wcs_pix2world(px, py, 0)

    rows: dict[str, list] = {k: [] for k in ("id", "kind", "ra", "dec", "mags", "r_eff", "sersic_n", "q", "pa", "host")}

    def add(kind: str, prefix: str, ra, dec, mags, *, r_eff=None, n=None, q=None, pa=None, host=None) -> None:
        k = len(ra)
        rows["id"] += [f"{field}_{prefix}{i:05d}" for i in range(k)]
        rows["kind"] += [kind] * k
        rows["ra"] += list(ra)
        rows["dec"] += list(dec)
        rows["mags"] += list(mags)
        nan = np.full(k, np.nan)
        rows["r_eff"] += list(nan if r_eff is None else r_eff)
        rows["sersic_n"] += list(nan if n is None else n)
        rows["q"] += list(nan if q is None else q)
        rows["pa"] += list(nan if pa is None else pa)
        rows["host"] += [""] * k if host is None else list(host)

    # Stars: a power-law luminosity function, constant in time.
    n_star = int(rng.poisson(sky["stars"] * area * draw["star_density"] / shrink**2))
    ra, dec = positions(n_star)
    mag = _power_law_mags(rng, n_star, *sky["star_mags"], 0.3)
    add("star", "s", ra, dec, np.repeat(mag[:, None], n_ep + 1, axis=1))

    # Galaxies: Sérsic n = 1..4, half-light radius growing with brightness.
    n_gal = int(rng.poisson(sky["galaxies"] * area / shrink**2))
    g_ra, g_dec = positions(n_gal)
    g_mag = _power_law_mags(rng, n_gal, *sky["galaxy_mags"], 0.35)
    g_re = np.clip(1.2 * 10 ** (-0.15 * (g_mag - 19.0) + rng.normal(0, 0.15, n_gal)), 0.4, 10.0) * shrink
    g_n = rng.uniform(1.0, 4.0, n_gal)
    g_q = rng.uniform(0.3, 1.0, n_gal)
    g_pa = rng.uniform(0.0, 180.0, n_gal)
    g_ids = [f"{field}_g{i:05d}" for i in range(n_gal)]
    add("galaxy", "g", g_ra, g_dec, np.repeat(g_mag[:, None], n_ep + 1, axis=1), r_eff=g_re, n=g_n, q=g_q, pa=g_pa)

    # Variable stars: mean magnitude in the reference stack, a sinusoid sampled at each epoch.
    n_var = sky["variables"]
    ra, dec = positions(n_var, border=inner)
    base = rng.uniform(*sky["variable_mags"], n_var)
    amp = rng.uniform(0.2, 1.5, n_var)
    period = 10 ** rng.uniform(math.log10(0.3), math.log10(30.0), n_var)
    phase = rng.random(n_var)
    t = mjd[None, 1:] - mjd[0]
    var_mags = base[:, None] + 0.5 * amp[:, None] * np.sin(2 * np.pi * (phase[:, None] + t / period[:, None]))
    add("variable", "v", ra, dec, np.column_stack([base, var_mags]))

    # Transients: supernova-like on galaxies (60 %; a fraction at the nucleus; hosts chosen by flux^bias)
    # and isolated fast ones; never in the reference.
    n_tr = sky["transients"]
    gx, gy = fwcs.wcs_world2pix(g_ra, g_dec, 0)
    inside = (gx > inner) & (gx < wx - inner) & (gy > inner) & (gy < wy - inner)
    hosts_ok = np.flatnonzero((g_mag < 21.5) & inside)
    n_sn = int(round(0.6 * n_tr)) if hosts_ok.size else 0
    tr_mags = np.full((n_tr, n_ep + 1), np.nan)
    tr_ra, tr_dec, tr_host = np.zeros(n_tr), np.zeros(n_tr), [""] * n_tr
    if n_sn:
        bias = sky["transient_host_bias"]
        if bias:
            weight = 10 ** (-0.4 * bias * (g_mag[hosts_ok] - g_mag[hosts_ok].min()))
            host = rng.choice(hosts_ok, n_sn, p=weight / weight.sum())
        else:
            host = rng.choice(hosts_ok, n_sn)
        # Offset from the core: 0.3-1.5 half-light radii along the host's ellipse; nuclear ones within 0.1.
        rad = g_re[host] * rng.uniform(0.3, 1.5, n_sn) / 3600.0
        if sky["transient_nuclear_fraction"]:
            nuclear = rng.random(n_sn) < sky["transient_nuclear_fraction"]
            rad[nuclear] = g_re[host[nuclear]] * rng.uniform(0.0, 0.1, int(nuclear.sum())) / 3600.0
        ang = rng.uniform(0, 2 * np.pi, n_sn)
        u, v = rad * np.cos(ang), rad * g_q[host] * np.sin(ang)
        pa = np.radians(g_pa[host])
        d_north, d_east = u * np.cos(pa) - v * np.sin(pa), u * np.sin(pa) + v * np.cos(pa)
        tr_dec[:n_sn] = g_dec[host] + d_north
        tr_ra[:n_sn] = g_ra[host] + d_east / np.cos(np.radians(g_dec[host]))
        for i, h in enumerate(host):
            tr_host[i] = g_ids[h]
        peak = rng.uniform(*sky["transient_mags"], n_sn)
        t0 = rng.uniform(mjd[1] - 30.0, mjd[-1] - 0.5, n_sn)  # explosion date: visible at the last epoch
        t_peak = t0 + 15.0
        dt = mjd[None, 1:] - t_peak[:, None]
        lc = np.where(dt < 0, peak[:, None] + 3.0 * (dt / 15.0) ** 2, peak[:, None] + 0.03 * dt)
        tr_mags[:n_sn, 1:] = np.where(mjd[None, 1:] >= t0[:, None], lc, np.nan)
    n_fast = n_tr - n_sn
    if n_fast:
        tr_ra[n_sn:], tr_dec[n_sn:] = positions(n_fast, border=inner)
        for i in range(n_sn, n_tr):
            present = np.ones(n_ep, bool)
            while n_ep > 1 and (present.all() or not present.any()):
                present = rng.random(n_ep) < 0.5
            mags = rng.uniform(*sky["transient_mags"]) + rng.uniform(0.0, 1.0, n_ep)
            tr_mags[i, 1:] = np.where(present, mags, np.nan)
    add("transient", "t", tr_ra, tr_dec, tr_mags, host=tr_host)

    objects = Table(
        {
            "id": np.array(rows["id"], dtype=str),
            "kind": np.array(rows["kind"], dtype=str),
            "ra": np.array(rows["ra"], dtype=float),
            "dec": np.array(rows["dec"], dtype=float),
            "mags": np.array(rows["mags"], dtype=float).reshape(-1, n_ep + 1),
            "r_eff": np.array(rows["r_eff"], dtype=float),
            "sersic_n": np.array(rows["sersic_n"], dtype=float),
            "q": np.array(rows["q"], dtype=float),
            "pa": np.array(rows["pa"], dtype=float),
            "host": np.array(rows["host"], dtype=str),
        }
    )
    return FieldScene(field, band, ra_c, dec_c, mjd, objects)


# --------------------------------------------------------------------------------------------
# Frame conditions: how one frame sees its field
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FrameConditions:
    """Observing conditions and geometry of one frame.

    Attributes
    ----------
    frame, field, filter : str
        Names.
    epoch : int
        0 for the reference, 1..n for science epochs.
    shape : tuple of int
        (ny, nx) pixels.
    exptime : float
        Exposure time (s).
    mjd : float
        Date of the observation (MJD).
    zeropoint : float
        True magnitude of 1 ADU in this exposure (header ``MAGZP``).
    seeing : float
        PSF FWHM at the frame centre (pixels, geometric mean of the major and minor axes).
    beta : float
        Moffat beta.
    psf_variation : float
        Fractional FWHM increase from the optical axis to the field radius (quadratic in the
        distance from the axis).
    psf_ellipticity : float
        PSF ellipticity ``1 - b/a`` at the field radius (quadratic in the distance from the
        optical axis, 0 there).
    psf_angle : float
        Angle (rad) added to the polar angle about the optical axis to give the PSF major axis
        direction.
    sky : float
        Mean sky level (ADU per pixel).
    sky_slope : tuple of float
        Fractional sky change across the frame along x and y.
    read_noise : float
        Read noise (e-; the header's ``RDNOISE``).
    true_header : astropy.io.fits.Header
        TAN WCS cards of the true projection (before the distortion residual).
    header_wcs_cards : astropy.io.fits.Header
        TAN WCS cards written to the frame (the true projection with ``wcs_shift`` on CRPIX).
    wcs_shift : tuple of float
        Shift (pixels) of the header WCS reference pixel from the truth.
    distortion : numpy.ndarray
        Shape (2, 4): per axis, amplitude (px), wave numbers along x and y (cycles per frame), phase.
    halo_fraction : float
        Fraction of a point source's light in a round Moffat halo (0: the PSF is the core alone).
    halo_fwhm : float
        Halo FWHM over the core FWHM.
    halo_beta : float
        Moffat beta of the halo.
    coma : float
        Coma-like asymmetry at the field radius: fraction of the core's light in a copy of the core
        one FWHM away along the PSF's major axis (linear in the distance from the optical axis, 0
        there).
    ripple : numpy.ndarray
        Small-scale PSF change across the frame: fractional FWHM amplitude, wave numbers along x
        and y (cycles per frame), phase (all 0: none).
    wcs_error : float
        RMS (per axis) that ``wcs_shift`` was drawn with (pixels).
    pixel_scale : float
        Effective pixel scale the field is seen with (arcsec/pixel; the telescope's unless
        ``sky.randomise`` changes the sampling; the header WCS keeps the telescope's).
    artefact_scale : float
        Multiplier of every artefact rate of ``sky.artefacts`` (and of ``satellite_rate``) in this
        frame (``sky.randomise.artefact_scale``; 1 when off).
    psf_field_offset : tuple of float
        Position of the camera's optical axis relative to the frame centre (pixels, x and y): the
        centre of the PSF's field pattern (``sky.psf_field_offset``; (0, 0): the frame centre).
    psf_field_radius : float or None
        Distance from the optical axis (pixels) at which ``psf_variation``, ``psf_ellipticity`` and
        ``coma`` reach their values (``sky.psf_field_radius``; None: the frame's half-diagonal).
    """

    frame: str
    field: str
    filter: str
    epoch: int
    shape: tuple[int, int]
    exptime: float
    mjd: float
    zeropoint: float
    seeing: float
    beta: float
    psf_variation: float
    psf_ellipticity: float
    psf_angle: float
    sky: float
    sky_slope: tuple[float, float]
    read_noise: float
    true_header: fits.Header = dc_field(repr=False)
    header_wcs_cards: fits.Header = dc_field(repr=False)
    wcs_shift: tuple[float, float] = (0.0, 0.0)
    distortion: np.ndarray = dc_field(default_factory=lambda: np.zeros((2, 4)), repr=False)
    halo_fraction: float = 0.0
    halo_fwhm: float = 3.0
    halo_beta: float = 2.0
    coma: float = 0.0
    ripple: np.ndarray = dc_field(default_factory=lambda: np.zeros(4), repr=False)
    wcs_error: float = 0.0
    pixel_scale: float = 1.0
    artefact_scale: float = 1.0
    psf_field_offset: tuple[float, float] = (0.0, 0.0)
    psf_field_radius: float | None = None

    @property
    def header_wcs(self) -> WCS:
        """The (slightly wrong) WCS written to the frame header."""
        return _wcs(self.header_wcs_cards)

    def _distortion(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ny, nx = self.shape
        u, v = np.asarray(x) / nx, np.asarray(y) / ny
        out = [a * np.sin(2 * np.pi * (kx * u + ky * v) + ph) for a, kx, ky, ph in self.distortion]
        return out[0], out[1]

    def world_to_pixel(self, ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """True 0-based pixel position of sky positions (deg) in this frame.

        Parameters
        ----------
        ra, dec : array-like
            Sky position (deg).

        Returns
        -------
        x, y : numpy.ndarray
            0-based pixel coordinates (x = column).
        """
        x0, y0 = _wcs(self.true_header).wcs_world2pix(np.atleast_1d(ra), np.atleast_1d(dec), 0)
        dx, dy = self._distortion(x0, y0)
        return x0 + dx, y0 + dy

    def pixel_to_world(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inverse of :meth:`world_to_pixel` (deg), by fixed-point iteration on the distortion."""
        x, y = np.atleast_1d(np.asarray(x, float)), np.atleast_1d(np.asarray(y, float))
        x0, y0 = x.copy(), y.copy()
        for _ in range(6):  # |grad D| < 2 pi A / n << 1: converges to 1e-9 px in a few steps
            dx, dy = self._distortion(x0, y0)
            x0, y0 = x - dx, y - dy
        return _wcs(self.true_header).wcs_pix2world(x0, y0, 0)

    def _field(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float, np.ndarray, np.ndarray, np.ndarray, float]:
        """The focal plane at pixel positions.

        Returns the optical axis (ax, ay), the offsets (dx, dy) from it, their squared distance
        over the field radius squared, and the frame centre's.
        """
        ny, nx = self.shape
        xc, yc = (nx - 1) / 2, (ny - 1) / 2
        ox, oy = self.psf_field_offset
        ax, ay = xc + ox, yc + oy
        r2 = xc**2 + yc**2 if self.psf_field_radius is None else self.psf_field_radius**2
        dx, dy = np.asarray(x, float) - ax, np.asarray(y, float) - ay
        return ax, ay, dx, dy, (dx**2 + dy**2) / r2, (ox**2 + oy**2) / r2

    def psf_at(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Moffat PSF parameters at pixel positions.

        The FWHM is ``seeing`` at the frame centre and grows quadratically with the distance from
        the optical axis (``psf_field_offset``), by ``psf_variation`` from the axis to the field
        radius; the ellipticity grows likewise from 0, and the major axis turns with the polar
        angle about the axis.

        Returns
        -------
        fwhm : numpy.ndarray
            FWHM (pixels) of the Moffat core, geometric mean of the major and minor axes.
        ellipticity : numpy.ndarray
            ``1 - b/a``.
        theta : numpy.ndarray
            Major-axis angle (rad, counter-clockwise from +x).
        """
        ny, nx = self.shape
        ax, ay, dx, dy, rho2, rho2_centre = self._field(x, y)
        fwhm = self.seeing * (1 + self.psf_variation * rho2) / (1 + self.psf_variation * rho2_centre)
        if self.ripple[0]:
            amp, kx, ky, ph = self.ripple
            fwhm = fwhm * (1 + amp * np.sin(2 * np.pi * (kx * (ax + dx) / nx + ky * (ay + dy) / ny) + ph))
        return fwhm, self.psf_ellipticity * rho2, np.arctan2(dy, dx) + self.psf_angle

    def coma_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Coma fraction at pixel positions: ``coma`` times the distance from the optical axis over the field radius."""
        return self.coma * np.sqrt(self._field(x, y)[4])

    @property
    def plain_moffat(self) -> bool:
        """True when the PSF is the Moffat core alone (no halo, no coma)."""
        return self.halo_fraction == 0 and self.coma == 0

    def sky_map(self) -> np.ndarray:
        """Sky level (ADU per pixel) with its gradient, before flat-field residuals (float64)."""
        ny, nx = self.shape
        u = np.linspace(-0.5, 0.5, nx)[None, :]
        v = np.linspace(-0.5, 0.5, ny)[:, None]
        return self.sky * (1 + self.sky_slope[0] * u + self.sky_slope[1] * v)


def _frame_spec(telescope: dict[str, Any], frame: str):
    for spec in frames_of(telescope):
        if spec.name == frame:
            return spec
    names = [s.name for s in frames_of(telescope)]
    raise InputError(
        f"frame {frame!r} is not a frame of {_tel_source(telescope)}; its frames are "
        f"{', '.join(names[:6])}{', ...' if len(names) > 6 else ''} (see rbflow.frames.frames_of)"
    )


def frame_conditions(telescope: dict[str, Any], frame: str, *, seed: int) -> FrameConditions:
    """Draw the observing conditions and geometry of one frame.

    Parameters
    ----------
    telescope : dict
        Validated demo telescope.
    frame : str
        Frame name from :func:`rbflow.frames.frames_of` (``fld00_r_ref``, ``fld00_r_e1``...).
    seed : int
        Global seed; each part uses ``derive(seed, frame, part)``.

    Returns
    -------
    FrameConditions

    Raises
    ------
    InputError
        ``frame`` is not a frame of the telescope.
    ConfigError
        Missing per-filter values in the ``sky`` block.
    """
    sky = _sky_block(telescope)
    spec = _frame_spec(telescope, frame)
    index = int(spec.field[3:])
    epoch = 0 if spec.reference is None else int(frame.rsplit("_e", 1)[1])
    nx, ny = sky["size"]

    def rng(part: str) -> np.random.Generator:
        return np.random.default_rng(derive(seed, frame, part))

    draw = field_randomisation(telescope, spec.field, seed=seed)

    scale = telescope["pixel_scale"] / 3600.0
    ra_c, dec_c = _field_centre(telescope, index)
    g = rng("pointing")
    offset = g.normal(0.0, sky["pointing_offset"], 2)
    rot = float(g.normal(0.0, sky["rotation"]))
    crpix = ((nx + 1) / 2 + offset[0], (ny + 1) / 2 + offset[1])
    true_header = _tan_header(ra_c, dec_c, crpix, scale, rot)
    g = rng("wcs")
    shift = g.normal(0.0, draw["wcs_error"], 2)
    header_cards = _tan_header(ra_c, dec_c, (crpix[0] + shift[0], crpix[1] + shift[1]), scale, rot)
    distortion = np.column_stack(
        [
            np.full(2, draw["distortion_residual"]),
            g.uniform(0.3, 1.0, 2) * g.choice([-1, 1], 2),
            g.uniform(0.3, 1.0, 2) * g.choice([-1, 1], 2),
            g.uniform(0, 2 * np.pi, 2),
        ]
    )
    g = rng("psf")
    seeing_arcsec = sky["ref_seeing"] if epoch == 0 else g.uniform(*sky["seeing"])
    psf_angle = float(g.uniform(0, np.pi))
    g = rng("zeropoint")
    exptime = (sky["ref_exptime"] if epoch == 0 else sky["exptime"]) * draw["exptime_scale"]
    dzp = 0.0 if epoch == 0 else float(g.normal(0.0, sky["zeropoint_scatter"]))
    zp0 = _filter_value(telescope, "zeropoint", spec.filter) + draw["zeropoint_offset"]
    zp = zp0 + 2.5 * math.log10(exptime) + dzp
    mu = _filter_value(telescope, "sky_brightness", spec.filter) + draw["sky_offset"]
    sky_adu = draw["pixel_scale"] ** 2 * 10 ** (-0.4 * (mu - zp))
    ang = rng("sky").uniform(0, 2 * np.pi)
    slope = (sky["sky_gradient"] * math.cos(ang), sky["sky_gradient"] * math.sin(ang))
    mjd = _MJD0 - _REF_LEAD if epoch == 0 else _MJD0 + _CADENCE * (epoch - 1)
    ripple = np.zeros(4)
    if draw["psf_ripple"] > 0:
        g = rng("psf_ripple")
        ripple = np.array(
            [draw["psf_ripple"], *(g.uniform(2.0, 4.0, 2) * g.choice([-1, 1], 2)), g.uniform(0, 2 * np.pi)]
        )
    return FrameConditions(
        frame=frame,
        field=spec.field,
        filter=spec.filter,
        epoch=epoch,
        shape=(ny, nx),
        exptime=float(exptime),
        mjd=mjd + 0.01 * index,
        zeropoint=zp,
        seeing=float(seeing_arcsec / draw["pixel_scale"]),
        beta=float(draw["moffat_beta"]),
        psf_variation=float(draw["psf_variation"]),
        psf_ellipticity=float(draw["psf_ellipticity"]),
        psf_angle=psf_angle,
        sky=float(sky_adu),
        sky_slope=slope,
        read_noise=draw["read_noise"],
        true_header=true_header,
        header_wcs_cards=header_cards,
        wcs_shift=(float(shift[0]), float(shift[1])),
        distortion=distortion,
        halo_fraction=float(draw["psf_halo_fraction"]),
        halo_fwhm=float(sky["psf_halo_fwhm"]),
        halo_beta=float(sky["psf_halo_beta"]),
        coma=float(draw["psf_coma"]),
        ripple=ripple,
        wcs_error=float(draw["wcs_error"]),
        pixel_scale=draw["pixel_scale"],
        artefact_scale=draw["artefact_scale"],
        psf_field_offset=(float(sky["psf_field_offset"][0]), float(sky["psf_field_offset"][1])),
        psf_field_radius=None if sky["psf_field_radius"] is None else float(sky["psf_field_radius"]),
    )


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
def _moffat_alphas(fwhm: np.ndarray, ell: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """Moffat core widths along the major and minor axes; their geometric mean gives ``fwhm``."""
    alpha = fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1))
    return alpha / np.sqrt(1 - ell), alpha * np.sqrt(1 - ell)


def _moffat_grid(gx, gy, ca, sa, aa, ab, beta):
    """Unnormalised elliptical Moffat at offsets (gx, gy) from the centre, broadcasting over sources."""
    u = gx * ca + gy * sa
    v = gy * ca - gx * sa
    return (1 + (u / aa) ** 2 + (v / ab) ** 2) ** (-beta)


def _psf_stamps(dx, dy, fwhm, ell, theta, beta: float, half: int) -> np.ndarray:
    """Pixel-integrated, unit-sum Moffat stamps (K, 2h+1, 2h+1) of sources offset by (dx, dy) from the centre pixel.

    The central (2*_CORE+1)^2 pixels are integrated on a _OVERSAMPLE^2 sub-grid; outer pixels, where the
    profile is smooth, are sampled at their centres.
    """
    k = len(dx)
    aa, ab = _moffat_alphas(fwhm, ell, beta)
    shp = (k, 1, 1)
    ca, sa, aa, ab = (np.cos(theta).reshape(shp), np.sin(theta).reshape(shp), aa.reshape(shp), ab.reshape(shp))
    g = np.arange(-half, half + 1, dtype=float)
    gx = g[None, None, :] - dx.reshape(shp)
    gy = g[None, :, None] - dy.reshape(shp)
    stamps = _moffat_grid(gx, gy, ca, sa, aa, ab, beta)
    c = min(_CORE, half)
    sub = (np.arange(_OVERSAMPLE) + 0.5) / _OVERSAMPLE - 0.5
    gc = (np.arange(-c, c + 1)[:, None] + sub[None, :]).ravel()
    cx = gc[None, None, :] - dx.reshape(shp)
    cy = gc[None, :, None] - dy.reshape(shp)
    core = _moffat_grid(cx, cy, ca, sa, aa, ab, beta)
    n = 2 * c + 1
    core = core.reshape(k, n, _OVERSAMPLE, n, _OVERSAMPLE).mean(axis=(2, 4))
    stamps[:, half - c : half + c + 1, half - c : half + c + 1] = core
    return stamps / stamps.sum(axis=(1, 2), keepdims=True)


def _point_stamps(dx, dy, fwhm, ell, theta, coma, cond: FrameConditions, half: int) -> np.ndarray:
    """Unit-sum stamps (K, 2h+1, 2h+1) of the frame's full PSF for sources offset by (dx, dy) from the centre pixel.

    The PSF is ``(1 - f) [(1 - c) M(-c d) + c M((1 - c) d)] + f H``: the Moffat core ``M`` and its
    coma copy (fraction ``c``, at ``d`` = one FWHM along the major axis; the offsets keep the
    light's centroid on the source), plus the round Moffat halo ``H`` (fraction ``f``). Each term
    has unit sum over the stamp, so the stamp holds exactly the source's flux.
    """
    if cond.plain_moffat:
        return _psf_stamps(dx, dy, fwhm, ell, theta, cond.beta, half)
    f = cond.halo_fraction
    c = np.asarray(coma, float)
    sx, sy = fwhm * np.cos(theta), fwhm * np.sin(theta)
    core = _psf_stamps(dx - c * sx, dy - c * sy, fwhm, ell, theta, cond.beta, half)
    if cond.coma:
        copy = _psf_stamps(dx + (1 - c) * sx, dy + (1 - c) * sy, fwhm, ell, theta, cond.beta, half)
        core = (1 - c)[:, None, None] * core + c[:, None, None] * copy
    if f == 0:
        return core
    halo = _psf_stamps(dx, dy, fwhm * cond.halo_fwhm, np.zeros_like(ell), theta, cond.halo_beta, half)
    return (1 - f) * core + f * halo


def psf_stamp(cond: FrameConditions, x: float, y: float, *, half: int) -> np.ndarray:
    """The PSF a point source at (x, y) gets in this frame, as rendered: unit sum, centred on the nearest pixel.

    Parameters
    ----------
    cond : FrameConditions
        The frame (:func:`frame_conditions`).
    x, y : float
        Source position (0-based pixels).
    half : int
        Stamp half size (pixels): the stamp is ``2 half + 1`` pixels square, its centre pixel
        ``(round(x), round(y))``.

    Returns
    -------
    numpy.ndarray
        Pixel-integrated PSF, float64, summing to 1 over the stamp (the light beyond it is
        dropped and the rest rescaled, as in the frames).
    """
    xs, ys = np.atleast_1d(float(x)), np.atleast_1d(float(y))
    fwhm, ell, theta = cond.psf_at(xs, ys)
    dx, dy = xs - np.rint(xs), ys - np.rint(ys)
    return _point_stamps(dx, dy, fwhm, ell, theta, cond.coma_at(xs, ys), cond, int(half))[0]


def _splat(image: np.ndarray, stamps: np.ndarray, ix: np.ndarray, iy: np.ndarray) -> None:
    """Add stamps (K, S, S) centred on integer pixels (ix, iy) into ``image`` in place."""
    ny, nx = image.shape
    half = stamps.shape[1] // 2
    g = np.arange(-half, half + 1)
    rows = iy[:, None, None] + g[None, :, None]
    cols = ix[:, None, None] + g[None, None, :]
    ok = (rows >= 0) & (rows < ny) & (cols >= 0) & (cols < nx)
    flat = (rows * nx + cols)[ok]
    image += np.bincount(flat, weights=stamps[ok], minlength=nx * ny).reshape(ny, nx)


def _half_size(flux, fwhm, ell, cond: FrameConditions, noise: float) -> np.ndarray:
    """Stamp half-size: the light left outside is < noise/2 ADU in total (at least 2.5 FWHM, at most 128 px)."""
    beta = cond.beta
    aa, _ = _moffat_alphas(fwhm, ell, beta)
    frac = np.clip(0.5 * noise / np.maximum(flux, 1e-9), 1e-12, 1.0)
    need = aa * np.sqrt(np.maximum(frac ** (1 / (1 - beta)) - 1, 0))
    need = np.maximum(need, 2.5 * fwhm)
    if not cond.plain_moffat:
        need = need + fwhm  # the coma copy sits up to one FWHM off
        if cond.halo_fraction:
            ah, _ = _moffat_alphas(fwhm * cond.halo_fwhm, np.zeros_like(ell), cond.halo_beta)
            fh = np.clip(frac / cond.halo_fraction, 1e-12, 1.0)
            need = np.maximum(need, ah * np.sqrt(np.maximum(fh ** (1 / (1 - cond.halo_beta)) - 1, 0)))
    idx = np.minimum(np.searchsorted(_HALF_SIZES, need), len(_HALF_SIZES) - 1)
    return _HALF_SIZES[idx]


def _render_points(image, x, y, flux, cond: FrameConditions, noise: float) -> None:
    """Add point sources (ADU) with the local PSF into ``image``, grouped by stamp size."""
    if len(x) == 0:
        return
    fwhm, ell, theta = cond.psf_at(x, y)
    coma = cond.coma_at(x, y)
    halves = _half_size(flux, fwhm, ell, cond, noise)
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    for half in np.unique(halves):
        sel = np.flatnonzero(halves == half)
        # Chunks keep the temporary arrays near 10^7 elements.
        step = max(1, int(2e6 // (2 * half + 1) ** 2))
        for s in range(0, len(sel), step):
            i = sel[s : s + step]
            st = _point_stamps(x[i] - ix[i], y[i] - iy[i], fwhm[i], ell[i], theta[i], coma[i], cond, int(half))
            _splat(image, st * flux[i, None, None], ix[i], iy[i])


def _sersic_b(n: np.ndarray) -> np.ndarray:
    """Sérsic b_n such that r_eff encloses half the light (Ciotti & Bertin 1999 expansion)."""
    return 2 * n - 1 / 3 + 4 / (405 * n) + 46 / (25515 * n**2)


def _render_galaxies(image, x, y, flux, r_eff_px, n, q, pa_px, cond: FrameConditions) -> None:
    """Sérsic profiles (oversampled 3x) convolved with the local pixel-integrated PSF, unit-normalised × flux."""
    if len(x) == 0:
        return
    fwhm, ell, theta = cond.psf_at(x, y)
    coma = cond.coma_at(x, y)
    reach = fwhm * max(1.0, cond.halo_fwhm if cond.halo_fraction else 1.0)  # of the PSF's light
    halves = np.clip(np.ceil(3 * r_eff_px * np.sqrt(n) + 3 * fwhm), 8, 64).astype(int)
    halves = _HALF_SIZES[np.searchsorted(_HALF_SIZES, halves)]
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    os_ = 3
    for half in np.unique(halves):
        i = np.flatnonzero(halves == half)
        k, s = len(i), 2 * half + 1
        sub = (np.arange(os_) + 0.5) / os_ - 0.5
        grid = (np.arange(-half, half + 1)[:, None] + sub[None, :]).ravel()
        shp = (k, 1, 1)
        gx = grid[None, None, :] - (x[i] - ix[i]).reshape(shp)
        gy = grid[None, :, None] - (y[i] - iy[i]).reshape(shp)
        c, sn = np.cos(pa_px[i]).reshape(shp), np.sin(pa_px[i]).reshape(shp)
        u = gx * c + gy * sn
        v = gy * c - gx * sn
        r = np.sqrt(u**2 + (v / q[i].reshape(shp)) ** 2) / r_eff_px[i].reshape(shp)
        nn = n[i].reshape(shp)
        prof = np.exp(-_sersic_b(nn) * (np.maximum(r, 1e-3) ** (1 / nn) - 1))
        prof = prof.reshape(k, s, os_, s, os_).mean(axis=(2, 4))
        ph = int(min(half, np.ceil(2.5 * reach[i].max())))
        psf = _point_stamps(np.zeros(k), np.zeros(k), fwhm[i], ell[i], theta[i], coma[i], cond, ph)
        conv = signal.fftconvolve(prof, psf, mode="same", axes=(1, 2))
        conv = np.clip(conv, 0, None)
        conv /= conv.sum(axis=(1, 2), keepdims=True)
        _splat(image, conv * flux[i, None, None], ix[i], iy[i])


def _bleed(expected: np.ndarray, saturation: float, *, trails: bool) -> tuple[np.ndarray, list[tuple]]:
    """Saturated pixels; with ``trails`` the charge above saturation spills up and down the column.

    Returns the saturated-pixel mask and one (x, y, charge_adu) per saturated region that bled.
    """
    sat = expected >= saturation
    out: list[tuple] = []
    if not trails or not sat.any():
        return sat, out
    labels, _ = ndimage.label(sat)
    ny = expected.shape[0]
    for lab, sl in enumerate(ndimage.find_objects(labels), start=1):
        region = labels[sl] == lab
        excess = np.where(region, expected[sl] - saturation, 0.0).sum(axis=0)
        rows = np.arange(sl[0].start, sl[0].stop)
        total = 0.0
        for j in np.flatnonzero(excess > 0):
            col = sl[1].start + j
            in_col = rows[region[:, j]]
            spill = excess[j] / 2
            for start, step in ((in_col.max() + 1, 1), (in_col.min() - 1, -1)):
                stop = ny if step > 0 else -1
                idx = np.arange(start, stop, step)
                room = np.cumsum(np.maximum(saturation - expected[idx, col], 0.0))
                n_fill = min(int(np.searchsorted(room, spill)) + 1, len(idx))
                expected[idx[:n_fill], col] = saturation
                sat[idx[:n_fill], col] = True
            total += excess[j]
        if total > 0:
            cy = 0.5 * (sl[0].start + sl[0].stop - 1)
            cx = 0.5 * (sl[1].start + sl[1].stop - 1)
            out.append((cx, cy, total))
    return sat, out


def _detector(telescope: dict[str, Any], shape: tuple[int, int], seed: int) -> dict[str, np.ndarray]:
    """Fixed defects of the detector: hot pixels (ADU in a science exposure), bad columns, pixel flat."""
    sky = telescope["sky"]
    ny, nx = shape
    g = np.random.default_rng(derive(seed, telescope["name"], "detector"))
    n_hot = int(round(sky["hot_pixels"] * nx * ny / _REF_AREA))
    hot = {
        "x": g.integers(0, nx, n_hot),
        "y": g.integers(0, ny, n_hot),
        "adu": 10 ** g.uniform(math.log10(200.0), math.log10(20000.0), n_hot),
    }
    n_bad = sky["bad_columns"]
    start = g.integers(0, ny // 2, n_bad)
    from_top = g.random(n_bad) < 0.5
    bad = {
        "x": g.choice(nx, n_bad, replace=False) if n_bad <= nx else g.integers(0, nx, n_bad),
        "y0": np.where(from_top, start, 0),
        "y1": np.where(from_top, ny, ny - start),
        "hot": g.random(n_bad) < 0.5,
        "level": g.uniform(50.0, 400.0, n_bad),  # hot column: ADU added in a science exposure
        "qe": g.uniform(0.1, 0.4, n_bad),  # dead column: fraction of the light recorded
    }
    pixel_flat = g.normal(0.0, 1.0, shape)
    return {"hot": hot, "bad": bad, "pixel_flat": pixel_flat}


def _flat(cond: FrameConditions, detector: dict, amplitude: float, seed: int) -> np.ndarray:
    """Multiplicative flat-field residual: smooth per-frame pattern plus the detector's pixel pattern.

    The total RMS is ``amplitude`` (0.8 of it smooth, 0.6 pixel-to-pixel, added in quadrature).
    """
    ny, nx = cond.shape
    if amplitude == 0:
        return np.ones(cond.shape)
    g = np.random.default_rng(derive(seed, cond.frame, "flat"))
    coarse = g.normal(0.0, 1.0, (6, 6))
    smooth = ndimage.zoom(coarse, (ny / 6, nx / 6), order=3, mode="nearest")[:ny, :nx]
    smooth = (smooth - smooth.mean()) / max(smooth.std(), 1e-12)
    return 1 + amplitude * (0.8 * smooth + 0.6 * detector["pixel_flat"])


def simulate_frame(telescope: dict[str, Any], frame: str, *, seed: int) -> tuple[fits.PrimaryHDU, Table]:
    """Render one frame of the synthetic sky and its truth table.

    Parameters
    ----------
    telescope : dict
        Validated demo telescope (instrument facts and ``sky`` block).
    frame : str
        Frame name from :func:`rbflow.frames.frames_of`.
    seed : int
        Global seed. The same seed gives byte-identical output.

    Returns
    -------
    hdu : astropy.io.fits.PrimaryHDU
        float32 image (ADU) with TAN WCS and the cards GAIN, RDNOISE, SATURATE, FILTER, EXPTIME,
        DATE-OBS, MJD-OBS, MAGZP, SEEING (px), FIELD, EPOCHID ('ref' or the epoch number; not
        ``EPOCH``, which FITS reserves as an old synonym of EQUINOX), plus the seed and realism switches.
    truth : astropy.table.Table
        One row per rendered object and artefact with its centre in the frame: ``id, kind`` (one of
        :data:`TRUTH_KINDS`), ``x, y`` (true 0-based pixel position; one end of a linear artefact),
        ``x1, y1`` (its other end; NaN for compact things), ``ra, dec, ra1, dec1`` (deg, the same
        points), ``mag`` (NaN for artefacts but asteroids), ``flux`` (ADU; see
        :class:`rbflow.artefacts.Artefact`), ``fwhm`` (PSF FWHM there, px), ``saturated``,
        ``r_eff`` (galaxy half-light radius, px), ``host`` (host galaxy of a transient; the star
        that made a ghost, spike or halo or that a trail was aimed through), ``extent`` (radius of
        influence beyond the point or segment, px; 0 for objects).

    Raises
    ------
    InputError
        ``frame`` is not a frame of the telescope.
    ConfigError
        The telescope is not a valid synthetic telescope.
    """
    sky = _sky_block(telescope)
    cond = frame_conditions(telescope, frame, seed=seed)
    scene = field_scene(telescope, cond.field, seed=seed)
    gain, rn, satur = float(telescope["gain"]), cond.read_noise, float(telescope["saturation"])
    ny, nx = cond.shape
    noise = math.sqrt(cond.sky * gain + rn**2) / gain
    obj = scene.objects
    mags = obj["mags"][:, cond.epoch]
    present = np.isfinite(mags)
    x, y = cond.world_to_pixel(obj["ra"], obj["dec"])
    flux = 10 ** (-0.4 * (mags - cond.zeropoint))
    reach = _HALF_SIZES[-1] + 12  # objects this far outside still spill light into the frame
    near = present & (x > -reach) & (x < nx + reach) & (y > -reach) & (y < ny + reach)

    expected = np.zeros(cond.shape)
    is_gal = np.asarray(obj["kind"] == "galaxy")
    pts = np.flatnonzero(near & ~is_gal)
    _render_points(expected, x[pts], y[pts], flux[pts], cond, noise)
    gal = np.flatnonzero(near & is_gal)
    scale = telescope["pixel_scale"]
    rot = math.degrees(math.atan2(cond.true_header["CD1_2"], -cond.true_header["CD1_1"]))
    # Sky PA (east of north) to pixel angle from +x: north is +y and east is -x when the rotation is 0.
    pa_px = np.radians(np.asarray(obj["pa"][gal]) + 90.0 - rot)
    _render_galaxies(
        expected,
        x[gal],
        y[gal],
        flux[gal],
        np.asarray(obj["r_eff"][gal]) / scale,
        np.asarray(obj["sersic_n"][gal]),
        np.asarray(obj["q"][gal]),
        pa_px,
        cond,
    )

    detector = _detector(telescope, cond.shape, seed)
    sky_map = cond.sky_map()
    flat = _flat(cond, detector, sky["flat_residual"], seed)
    science = cond.epoch > 0
    zoo = sky["artefacts"]
    a_scale = cond.artefact_scale

    def rng(kind: str) -> np.random.Generator:
        return np.random.default_rng(derive(seed, frame, kind))

    def points(image: np.ndarray, px: np.ndarray, py: np.ndarray, f: np.ndarray) -> None:
        _render_points(image, px, py, f, cond, noise)

    def on(kind: str) -> bool:
        return artefacts.active(zoo[kind], cond.epoch)

    inside = present & (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)
    stars = _frame_stars(obj, np.flatnonzero(inside & ~is_gal), x, y, flux, cond, satur)
    aim = _subset(stars, stars.flux > 100 * noise)  # trails are aimed through visible stars
    through = zoo["trails_through_stars"]
    rows: list[artefacts.Artefact] = []

    # Light of the optics and of moving things joins the objects' before the flat and the noise.
    g = rng("satellite")
    if science:
        rate = min(1.0, sky["satellite_rate"] * a_scale)
        rows += artefacts.satellite_trails(expected, g, rate=rate, seeing=cond.seeing, stars=aim, through_star=through)
    if on("glints"):
        rows += artefacts.glints(
            expected,
            rng("glint"),
            zoo["glints"],
            scale=a_scale,
            zeropoint=cond.zeropoint,
            fwhm=cond.seeing,
            stars=aim,
            through_star=through,
            render_points=points,
        )
    if on("flares"):
        rows += artefacts.flares(
            expected, rng("flare"), zoo["flares"], scale=a_scale, seeing=cond.seeing, stars=aim, through_star=through
        )
    optics = dict(scale=a_scale, saturation=satur, stars=stars)
    if on("ghosts"):
        rows += artefacts.ghosts(expected, rng("ghost"), zoo["ghosts"], **optics)
    if on("spikes"):
        rows += artefacts.spikes(expected, rng("spike"), zoo["spikes"], seeing=cond.seeing, **optics)
    if on("halos"):
        rows += artefacts.halos(expected, rng("halo"), zoo["halos"], seeing=cond.seeing, **optics)
    if on("asteroids"):
        rows += artefacts.asteroids(
            expected,
            rng("asteroid"),
            zoo["asteroids"],
            scale=a_scale,
            zeropoint=cond.zeropoint,
            exptime=cond.exptime,
            pixel_scale=float(telescope["pixel_scale"]),
            fwhm=cond.seeing,
            render_points=points,
        )
    if on("fringing"):
        fringe, found = artefacts.fringing(
            sky_map,
            rng("fringe"),
            np.random.default_rng(derive(seed, telescope["name"], "fringe")),
            zoo["fringing"],
            scale=a_scale,
            band=cond.filter,
        )
        if fringe is not None:
            sky_map = sky_map + fringe
        rows += found
    gap, vignette, gap_rows = None, None, []
    if on("chip_edges"):
        gap, vignette, gap_rows = artefacts.chip_edges(
            rng("chip_edge"), zoo["chip_edges"], scale=a_scale, shape=cond.shape
        )
        rows += gap_rows
    expected = (expected + sky_map) * flat
    if vignette is not None:
        expected *= vignette

    # Dead columns record a fraction of the light.
    bad = detector["bad"]
    for k in np.flatnonzero(~bad["hot"]):
        expected[bad["y0"][k] : bad["y1"][k], bad["x"][k]] *= bad["qe"][k]

    sat_mask, trails = _bleed(expected, satur, trails=bool(sky["bleed_trails"]))
    rows += _bleed_rows(sat_mask, trails)

    g = rng("noise")
    data = g.poisson(np.clip(expected, 0, None) * gain).astype(float)
    data += g.normal(0.0, rn, cond.shape)
    data /= gain

    # Hot columns, hot pixels (dark current scales with exposure) and cosmic rays add charge.
    dark = cond.exptime / sky["exptime"]
    for k in np.flatnonzero(bad["hot"]):
        data[bad["y0"][k] : bad["y1"][k], bad["x"][k]] += bad["level"][k] * dark
    rows += [
        artefacts.Artefact(
            "bad_column",
            float(bad["x"][k]),
            float(bad["y0"][k]),
            float(bad["x"][k]),
            float(bad["y1"][k] - 1),
            flux=float(bad["level"][k] * dark if bad["hot"][k] else 0.0),
        )
        for k in range(len(bad["x"]))
    ]
    hot = detector["hot"]
    np.add.at(data, (hot["y"], hot["x"]), hot["adu"] * dark)
    rows += [
        artefacts.Artefact("hot_pixel", float(hot["x"][k]), float(hot["y"][k]), flux=float(hot["adu"][k] * dark))
        for k in range(len(hot["x"]))
    ]
    g = rng("cosmic_rays")
    n_cr = int(g.poisson(sky["cosmic_rays"] * nx * ny / _REF_AREA)) if science else 0
    for _ in range(n_cr):
        cx, cy = g.uniform(-0.5, nx - 0.5), g.uniform(-0.5, ny - 0.5)
        length, ang = g.exponential(2.5), g.uniform(0, np.pi)
        per_px = 10 ** g.uniform(math.log10(150.0), math.log10(3000.0))
        steps = np.arange(0.0, length + 1e-9, 0.25)
        px = np.clip(np.rint(cx + steps * math.cos(ang)).astype(int), 0, nx - 1)
        py = np.clip(np.rint(cy + steps * math.sin(ang)).astype(int), 0, ny - 1)
        deposit = per_px * max(length, 1.0) / len(steps)
        np.add.at(data, (py, px), deposit)
        end = (cx + length * math.cos(ang), cy + length * math.sin(ang))
        rows.append(artefacts.Artefact("cosmic_ray", cx, cy, *end, extent=0.5, flux=deposit * len(steps)))

    # The electronics: crosstalk of saturated sources, amplifier steps, correlated read noise.
    n_amp = zoo["amplifiers"]
    if on("crosstalk"):
        rows += artefacts.crosstalk(
            data,
            expected,
            sat_mask,
            rng("crosstalk"),
            zoo["crosstalk"],
            scale=a_scale,
            saturation=satur,
            amplifiers=n_amp,
        )
    if on("amp_steps"):
        rows += artefacts.amp_steps(
            data, rng("amp_step"), zoo["amp_steps"], scale=a_scale, sky=cond.sky, amplifiers=n_amp
        )
    if on("pattern_noise"):
        rows += artefacts.pattern_noise(data, rng("pattern_noise"), zoo["pattern_noise"], scale=a_scale, gain=gain)
    data[sat_mask] = satur
    np.minimum(data, satur, out=data)

    # The pipeline's masks come last: chip gaps and masked blocks read NaN or 0.
    if gap_rows:
        data[gap] = gap_rows[0].flux
    if on("masked"):
        blocks, found = artefacts.masked_blocks(rng("masked"), zoo["masked"], scale=a_scale, shape=cond.shape)
        for ys, xs, fill in blocks:
            data[ys, xs] = fill
        rows += found

    table, counts = _truth_table(obj, np.flatnonzero(inside), x, y, mags, flux, sat_mask, rows, cond, frame, scale)
    table.meta.update(
        {
            "description": "truth of a synthetic frame: every rendered object and artefact "
            "(0-based true pixel positions; linear artefacts run from x, y to x1, y1)",
            "made_by": "rbflow.sky.simulate_frame",
            "telescope": telescope["name"],
            "frame": frame,
            "field": cond.field,
            "epoch": "ref" if cond.epoch == 0 else cond.epoch,
            "seed": int(seed),
            "magzp": cond.zeropoint,
            "seeing_px": cond.seeing,
            "sky_adu": cond.sky,
        }
    )
    header = _frame_header(telescope, cond, seed, n_cr, counts)
    hdu = fits.PrimaryHDU(data.astype(np.float32), header=header)
    log.info(
        "%s: %d objects, %d artefacts, seeing %.2f px, MAGZP %.3f, sky %.1f ADU, %d saturated pixels",
        frame,
        int(inside.sum()),
        len(rows),
        cond.seeing,
        cond.zeropoint,
        cond.sky,
        int(sat_mask.sum()),
    )
    return hdu, table


_HEADER_COUNTS = {
    "glint": ("NGLINT", "dotted satellite glint rows"),
    "flare": ("NFLARE", "tumbling-satellite flare trails"),
    "ghost": ("NGHOST", "internal-reflection ghosts of bright stars"),
    "spike": ("NSPIKE", "diffraction spike lines"),
    "halo": ("NHALO", "scattered-light halos of saturated stars"),
    "crosstalk": ("NXTALK", "crosstalk images of saturated sources"),
    "amp_step": ("NAMPSTEP", "amplifier level steps"),
    "chip_edge": ("NCHIPEDG", "chip edges or gaps"),
    "masked": ("NMASKED", "masked blocks (NaN or 0)"),
    "fringe": ("NFRINGE", "fringe patterns"),
    "pattern_noise": ("NPATTERN", "correlated read-noise patterns"),
    "asteroid": ("NASTEROI", "trailed asteroids"),
}


def _frame_stars(obj: Table, idx: np.ndarray, x, y, flux, cond: FrameConditions, saturation: float) -> artefacts.Stars:
    """The point sources of a frame (centres inside it) with their brightest pixel, sky included (ADU).

    A round Moffat's central surface brightness bounds the peak from above; the stars it puts above
    5 % of the saturation level (the optics artefacts start at half of it) get their brightest
    pixel from the rendered PSF itself.
    """
    px, py, f = x[idx], y[idx], flux[idx]
    fwhm, ell, theta = cond.psf_at(px, py)
    peak = artefacts.moffat_peak(f, fwhm, cond.beta) + cond.sky
    near = np.flatnonzero(peak >= 0.05 * saturation)
    if near.size:
        ix, iy = np.rint(px[near]), np.rint(py[near])
        coma = cond.coma_at(px[near], py[near])
        stamps = _point_stamps(px[near] - ix, py[near] - iy, fwhm[near], ell[near], theta[near], coma, cond, 8)
        peak[near] = f[near] * stamps.max(axis=(1, 2)) + cond.sky
    return artefacts.Stars(np.asarray(obj["id"][idx], dtype=str), px, py, f, peak)


def _subset(stars: artefacts.Stars, keep: np.ndarray) -> artefacts.Stars:
    return artefacts.Stars(stars.id[keep], stars.x[keep], stars.y[keep], stars.flux[keep], stars.peak[keep])


def _bleed_rows(sat_mask: np.ndarray, trails: list[tuple]) -> list[artefacts.Artefact]:
    """Bleed trails as segments: the top and bottom rows of the saturated region of each bled star."""
    if not trails:
        return []
    labels, _ = ndimage.label(sat_mask)
    boxes = ndimage.find_objects(labels)
    out = []
    for cx, cy, total in trails:
        lab = labels[int(round(cy)), int(round(cx))]
        if lab == 0:  # the centre of an odd-shaped region can miss it: the nearest saturated pixel's
            ys, xs = np.nonzero(sat_mask)
            k = int(np.argmin((xs - cx) ** 2 + (ys - cy) ** 2))
            lab = labels[ys[k], xs[k]]
        rs, cs = boxes[lab - 1]
        half_width = 0.5 * (cs.stop - cs.start)
        out.append(artefacts.Artefact("bleed", cx, float(rs.start), cx, float(rs.stop - 1), half_width, total))
    return out


def _truth_table(
    obj: Table,
    idx: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    mags: np.ndarray,
    flux: np.ndarray,
    sat_mask: np.ndarray,
    rows: list[artefacts.Artefact],
    cond: FrameConditions,
    frame: str,
    pixel_scale: float,
) -> tuple[Table, dict[str, int]]:
    """The truth table: objects with their centre in the frame, then the artefacts; and the count per kind."""
    ny, nx = cond.shape
    ix = np.clip(np.rint(x[idx]).astype(int), 0, nx - 1)
    iy = np.clip(np.rint(y[idx]).astype(int), 0, ny - 1)
    n_o, n_a = len(idx), len(rows)

    def col(name: str) -> np.ndarray:
        return np.array([getattr(r, name) for r in rows], dtype=float)

    a_x, a_y, a_x1, a_y1 = col("x"), col("y"), col("x1"), col("y1")
    a_ra, a_dec = cond.pixel_to_world(a_x, a_y) if n_a else (np.zeros(0), np.zeros(0))
    a_ra1, a_dec1 = np.full(n_a, np.nan), np.full(n_a, np.nan)
    lin = np.isfinite(a_x1)
    if lin.any():
        a_ra1[lin], a_dec1[lin] = cond.pixel_to_world(a_x1[lin], a_y1[lin])
    counts: dict[str, int] = {}
    a_ids = []
    for r in rows:
        a_ids.append(f"{frame}_{r.kind}{counts.get(r.kind, 0):03d}")
        counts[r.kind] = counts.get(r.kind, 0) + 1
    nan_o = np.full(n_o, np.nan)
    table = Table(
        {
            "id": np.concatenate([np.asarray(obj["id"][idx], dtype=str), np.array(a_ids, dtype=str)]),
            "kind": np.concatenate(
                [np.asarray(obj["kind"][idx], dtype=str), np.array([r.kind for r in rows], dtype=str)]
            ),
            "x": np.concatenate([x[idx], a_x]),
            "y": np.concatenate([y[idx], a_y]),
            "x1": np.concatenate([nan_o, a_x1]),
            "y1": np.concatenate([nan_o, a_y1]),
            "ra": np.concatenate([np.asarray(obj["ra"][idx]), a_ra]),
            "dec": np.concatenate([np.asarray(obj["dec"][idx]), a_dec]),
            "ra1": np.concatenate([nan_o, a_ra1]),
            "dec1": np.concatenate([nan_o, a_dec1]),
            "mag": np.concatenate([mags[idx], col("mag")]),
            "flux": np.concatenate([flux[idx], col("flux")]),
            "fwhm": np.concatenate([cond.psf_at(x[idx], y[idx])[0], cond.psf_at(a_x, a_y)[0]]),
            "saturated": np.concatenate([sat_mask[iy, ix], np.zeros(n_a, bool)]),
            "r_eff": np.concatenate([np.asarray(obj["r_eff"][idx]) / pixel_scale, np.full(n_a, np.nan)]),
            "host": np.concatenate(
                [np.asarray(obj["host"][idx], dtype=str), np.array([r.host for r in rows], dtype=str)]
            ),
            "extent": np.concatenate([np.zeros(n_o), col("extent")]),
        }
    )
    for name, unit in (
        ("x", "pix"),
        ("y", "pix"),
        ("x1", "pix"),
        ("y1", "pix"),
        ("ra", "deg"),
        ("dec", "deg"),
        ("ra1", "deg"),
        ("dec1", "deg"),
        ("mag", "mag"),
        ("flux", "adu"),
        ("fwhm", "pix"),
        ("r_eff", "pix"),
        ("extent", "pix"),
    ):
        table[name].unit = unit
    return table, counts


def _frame_header(
    telescope: dict[str, Any], cond: FrameConditions, seed: int, n_cr: int, counts: dict[str, int]
) -> fits.Header:
    """Header of a frame: WCS cards, observation facts and the realism switches."""
    sky = telescope["sky"]
    h = fits.Header()
    h["BUNIT"] = ("adu", "pixel unit")
    h.extend(cond.header_wcs_cards.cards)
    date = (_MJD_EPOCH + timedelta(days=cond.mjd)).isoformat(timespec="milliseconds")
    for key, value, comment in (
        ("TELESCOP", telescope["name"], "synthetic telescope (rbflow.sky)"),
        ("OBJECT", cond.field, "field"),
        ("FIELD", cond.field, "field id"),
        ("EPOCHID", "ref" if cond.epoch == 0 else cond.epoch, "'ref' or science epoch number"),
        ("IMAGETYP", "reference" if cond.epoch == 0 else "science", "frame type"),
        ("FILTER", cond.filter, "filter"),
        ("EXPTIME", cond.exptime, "[s] exposure time"),
        ("DATE-OBS", date, "UTC start of exposure"),
        ("MJD-OBS", cond.mjd, "[d] MJD of DATE-OBS"),
        ("GAIN", float(telescope["gain"]), "[e-/ADU] gain"),
        ("RDNOISE", cond.read_noise, "[e-] read noise"),
        ("SATURATE", float(telescope["saturation"]), "[ADU] saturation level"),
        ("MAGZP", cond.zeropoint, "[mag] magnitude of 1 ADU in this exposure"),
        ("SEEING", cond.seeing, "[px] PSF FWHM at the frame centre"),
        ("SKYLEVEL", cond.sky, "[ADU] mean sky level"),
        ("PSFBETA", cond.beta, "Moffat beta"),
        ("SKYSEED", int(seed), "global seed of rbflow.sky"),
        ("PSFVAR", cond.psf_variation, "FWHM change centre->corner (fraction)"),
        ("PSFELL", cond.psf_ellipticity, "PSF ellipticity at the corners"),
        ("SKYGRAD", float(sky["sky_gradient"]), "fractional sky gradient across the frame"),
        ("FLATRES", float(sky["flat_residual"]), "RMS flat-field residual (fraction)"),
        ("BLEED", bool(sky["bleed_trails"]), "saturated stars bleed along columns"),
        ("CRMEAN", float(sky["cosmic_rays"]), "mean cosmic rays per 1024^2 science frame"),
        ("NCOSMIC", int(n_cr), "cosmic rays in this frame"),
        ("HOTPIX", int(sky["hot_pixels"]), "hot pixels per 1024^2 detector area"),
        ("BADCOLS", int(sky["bad_columns"]), "bad columns of the detector"),
        ("SATRATE", float(sky["satellite_rate"]), "probability of a satellite trail"),
        ("SATTRAIL", "satellite" in counts, "this frame has a satellite trail"),
        ("WCSERR", cond.wcs_error, "[px] RMS error of the header WCS zero point"),
        ("DISTRES", float(cond.distortion[0, 0]), "[px] distortion residual not in the WCS"),
        ("ARTSCALE", float(cond.artefact_scale), "multiplier of the sky.artefacts rates"),
        *((card, int(counts.get(kind, 0)), text) for kind, (card, text) in _HEADER_COUNTS.items()),
        ("RBFLOWV", __version__, "rbflow version that wrote this file"),
    ):
        h[key] = (value, comment)
    if not cond.plain_moffat or cond.ripple[0]:  # the real-PSF switches, when on
        for key, value, comment in (
            ("PSFHALO", cond.halo_fraction, "fraction of the light in the PSF halo"),
            ("PSFHALOW", cond.halo_fwhm, "halo FWHM / core FWHM"),
            ("PSFHALOB", cond.halo_beta, "Moffat beta of the halo"),
            ("PSFCOMA", cond.coma, "coma fraction at the corners"),
            ("PSFRIPL", float(cond.ripple[0]), "small-scale FWHM ripple (fraction)"),
        ):
            h.insert("RBFLOWV", (key, value, comment))
    if cond.psf_field_offset != (0.0, 0.0) or cond.psf_field_radius is not None:  # a cut-out of a focal plane
        ny, nx = cond.shape
        radius = math.hypot((nx - 1) / 2, (ny - 1) / 2) if cond.psf_field_radius is None else cond.psf_field_radius
        for key, value, comment in (
            ("PSFAXISX", cond.psf_field_offset[0], "[px] optical axis x - frame centre x"),
            ("PSFAXISY", cond.psf_field_offset[1], "[px] optical axis y - frame centre y"),
            ("PSFFIELD", radius, "[px] field radius of PSFVAR, PSFELL, PSFCOMA"),
        ):
            h.insert("RBFLOWV", (key, value, comment))
    if sky.get("randomise", {}).get("enabled", False):  # the field's drawn camera (sky.randomise)
        for key, value, comment in (
            ("RANDOMIS", True, "field drawn by sky.randomise"),
            ("PIXSCEFF", cond.pixel_scale, "[arcsec/px] effective pixel scale of the sky"),
        ):
            h.insert("RBFLOWV", (key, value, comment))
    return h


def write_frame(
    telescope: dict[str, Any],
    frame: str,
    out_fits: str | os.PathLike,
    out_truth: str | os.PathLike,
    *,
    seed: int,
) -> None:
    """Simulate one frame and write its FITS image and ECSV truth table atomically.

    Parameters
    ----------
    telescope : dict
        Validated demo telescope.
    frame : str
        Frame name.
    out_fits, out_truth : path-like
        Destinations of the image and of the truth table.
    seed : int
        Global seed.
    """
    hdu, truth = simulate_frame(telescope, frame, seed=seed)
    write_fits(hdu, out_fits)
    write_table(truth, out_truth)


def variables_catalogue(telescope: dict[str, Any], *, seed: int) -> Table:
    """Catalogue of the real (not injected) variable stars and transients of every field.

    Parameters
    ----------
    telescope : dict
        Validated demo telescope.
    seed : int
        Global seed (the same as for the frames).

    Returns
    -------
    astropy.table.Table
        Columns ``id, field, kind`` ('variable' or 'transient'), ``ra, dec`` (deg), ``host`` (galaxy
        id or ''), ``mag_ref`` and ``mag_e1``... ``mag_e{n}`` (mag; NaN where the object is absent).
        ``meta['mjd']`` maps each column to its date.
    """
    sky = _sky_block(telescope)
    n_ep = sky["epochs"]
    parts = []
    mjd: dict[str, list[float]] = {}
    for fld in sorted({s.field for s in frames_of(telescope)}):
        scene = field_scene(telescope, fld, seed=seed)
        o = scene.objects[np.isin(scene.objects["kind"], ["variable", "transient"])]
        t = Table(
            {
                "id": o["id"],
                "field": np.full(len(o), fld),
                "kind": o["kind"],
                "ra": o["ra"],
                "dec": o["dec"],
                "host": o["host"],
            }
        )
        for e in range(n_ep + 1):
            t[f"mag_{'ref' if e == 0 else f'e{e}'}"] = np.asarray(o["mags"][:, e], float)
        parts.append(t)
        mjd[fld] = [float(m) for m in scene.mjd]
    table = vstack(parts)
    if len(table) == 0:
        log.warning("%s: no variables or transients (sky.variables = sky.transients = 0)", _tel_source(telescope))
    for col in ("ra", "dec"):
        table[col].unit = "deg"
    for col in table.colnames:
        if col.startswith("mag_"):
            table[col].unit = "mag"
    table.meta.update(
        {
            "description": "real variable stars and transients of the synthetic sky (truth; not injections)",
            "made_by": "rbflow.sky.variables_catalogue",
            "telescope": telescope["name"],
            "seed": int(seed),
            "mjd": mjd,
        }
    )
    return table


def write_variables_catalogue(telescope: dict[str, Any], out: str | os.PathLike, *, seed: int) -> None:
    """Write :func:`variables_catalogue` atomically as ECSV.

    Parameters
    ----------
    telescope : dict
        Validated demo telescope.
    out : path-like
        Destination.
    seed : int
        Global seed.
    """
    write_table(variables_catalogue(telescope, seed=seed), out)
