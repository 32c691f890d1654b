"""Astrometric calibration of a frame against a reference star catalogue.

The frame's stars (:func:`rbflow.stars.find_stars`) are matched to the catalogue stars projected
through the frame's current WCS. The first match tolerates a WCS off by tens of arcseconds and a
small rotation: for each trial rotation about the frame centre, the offsets between every
detected star and every catalogue star within ``max_offset`` vote in a 2-D histogram (bins of
``match_radius``); the rotation and shift with the most votes win. The matched pairs then give a
TAN WCS (:func:`astropy.wcs.utils.fit_wcs_from_points`), stars are matched again through it, and
SIP distortion polynomials of increasing degree are fitted: a degree is kept only while it lowers
the rms residual by more than ``sip_gain`` (a fraction) with at least 3 stars per coefficient.
A fit with too few matched stars or an rms above ``max_rms`` is an :class:`InputError`, so that
``on_bad_frame`` handles the frame.

Frames without a usable WCS can first be solved blind by astrometry.net's ``solve-field``
(Debian/Ubuntu package ``astrometry.net``, with index files of the right scale in the folder
the telescope file names); its solution is then refined as above.

The catalogue is a local ECSV/FITS table (columns ``ra``, ``dec`` in deg and ``mag``) or Gaia DR3
queried through the archive's TAP interface (ADQL, CSV answer), cached under a folder with its
URL and checksum (:func:`rbflow.download.cached_fetch`).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from rbflow.background import background
from rbflow.download import cached_fetch
from rbflow.errors import InputError
from rbflow.frames import frame_hdu, frame_info
from rbflow.io import read_image, read_table, write_fits
from rbflow.stars import find_stars

__all__ = [
    "GAIA_TAP",
    "gaia_query_url",
    "load_catalogue",
    "initial_match",
    "fit_wcs",
    "solve_blind",
    "calibrate_frame",
    "run_astrometry",
]

log = logging.getLogger(__name__)

#: TAP service of the Gaia archive (ESA); ``astrometry.url`` overrides it.
GAIA_TAP = "https://gea.esac.esa.int/tap-server/tap"

#: Header cards of a WCS that a new solution replaces.
_WCS_CARD = (
    "WCSAXES",
    "CTYPE",
    "CUNIT",
    "CRVAL",
    "CRPIX",
    "CDELT",
    "CROTA",
    "CD1_",
    "CD2_",
    "PC1_",
    "PC2_",
    "PV1_",
    "PV2_",
    "A_",
    "B_",
    "AP_",
    "BP_",
    "LONPOLE",
    "LATPOLE",
    "RADESYS",
    "EQUINOX",
    "MJDREF",
)


def gaia_query_url(ra: float, dec: float, radius: float, *, mag_limit: float, url: str = GAIA_TAP) -> str:
    """Synchronous TAP query (ADQL, CSV) of Gaia DR3 sources within ``radius`` of a position.

    Parameters
    ----------
    ra, dec : float
        Centre (deg, ICRS).
    radius : float
        Cone radius (deg).
    mag_limit : float
        Faintest G magnitude.
    url : str, optional
        TAP service base URL (``/sync`` is appended).

    Returns
    -------
    str
        The query URL; its CSV answer has columns ``ra``, ``dec`` and ``mag``.
    """
    adql = (
        "SELECT ra, dec, phot_g_mean_mag AS mag FROM gaiadr3.gaia_source WHERE 1=CONTAINS("
        f"POINT('ICRS', ra, dec), CIRCLE('ICRS', {ra:.6f}, {dec:.6f}, {radius:.6f})) "
        f"AND phot_g_mean_mag < {mag_limit:.2f}"
    )
    query = urllib.parse.urlencode({"REQUEST": "doQuery", "LANG": "ADQL", "FORMAT": "csv", "QUERY": adql})
    return f"{url.rstrip('/')}/sync?{query}"


def load_catalogue(
    source: str,
    *,
    ra: float,
    dec: float,
    radius: float,
    mag_limit: float,
    url: str = GAIA_TAP,
    cache: str | os.PathLike | None = None,
    timeout: float = 60.0,
) -> Table:
    """Reference stars around a position: Gaia DR3 (``source='gaia'``) or a local table.

    Parameters
    ----------
    source : str
        ``'gaia'`` or the path of an ECSV/FITS table with ``ra``, ``dec`` (deg) and ``mag``.
    ra, dec, radius : float
        Cone (deg).
    mag_limit : float
        Faintest magnitude kept.
    url : str, optional
        Gaia TAP base URL.
    cache : path-like, optional
        Folder caching the Gaia answers (required for Gaia).
    timeout : float, optional
        Seconds to wait for the service.

    Returns
    -------
    astropy.table.Table
        ``ra``, ``dec``, ``mag`` of the stars in the cone, brightest first.

    Raises
    ------
    InputError
        Unreadable table, missing columns, failed query.
    """
    if source == "gaia":
        if cache is None:
            raise InputError("astrometry: Gaia needs a cache folder ('astrometry.cache')")
        query = gaia_query_url(ra, dec, radius, mag_limit=mag_limit, url=url)
        path = cached_fetch(query, cache, timeout=timeout, what="Gaia DR3 query", name=None)
        try:
            table = Table.read(path, format="ascii.csv")
        except Exception as exc:  # noqa: BLE001 - any parse failure of the answer is reported the same way
            raise InputError(
                f"Gaia DR3 query: the answer '{path}' is not a CSV table ({exc}); delete it and rerun"
            ) from None
    else:
        table = read_table(source)
    missing = [c for c in ("ra", "dec", "mag") if c not in table.colnames]
    if missing:
        raise InputError(
            f"astrometry catalogue '{source}' lacks column(s) {', '.join(missing)}: give ra, dec (deg), mag"
        )
    ra_c = np.asarray(table["ra"], float)
    dec_c = np.asarray(table["dec"], float)
    mag = np.asarray(table["mag"], float)
    cos_d = np.sin(np.radians(dec)) * np.sin(np.radians(dec_c)) + np.cos(np.radians(dec)) * np.cos(
        np.radians(dec_c)
    ) * np.cos(np.radians(ra_c - ra))
    keep = (cos_d >= math.cos(math.radians(radius))) & np.isfinite(mag) & (mag < mag_limit)
    order = np.argsort(mag[keep])
    return Table({"ra": ra_c[keep][order], "dec": dec_c[keep][order], "mag": mag[keep][order]})


def initial_match(
    xy: np.ndarray,
    cat_xy: np.ndarray,
    *,
    centre: tuple[float, float],
    max_offset: float,
    max_rotation: float,
    radius: float,
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Match detected stars to catalogue stars despite an unknown shift and small rotation.

    Parameters
    ----------
    xy : numpy.ndarray
        ``(n, 2)`` detected positions (px).
    cat_xy : numpy.ndarray
        ``(m, 2)`` catalogue positions projected through the current WCS (px).
    centre : tuple of float
        Rotation centre (px).
    max_offset : float
        Largest shift searched (px).
    max_rotation : float
        Largest rotation searched (deg); trial steps keep the frame's corners within ``radius``.
    radius : float
        Vote bin and final match radius (px).

    Returns
    -------
    i, j : numpy.ndarray
        Indices of the matched detected and catalogue stars.
    found : dict
        ``rotation`` (deg), ``dx``, ``dy`` (px, catalogue minus detected) and ``votes``.
    """
    from scipy.spatial import cKDTree

    cx, cy = centre
    extent = max(float(np.max(np.hypot(xy[:, 0] - cx, xy[:, 1] - cy))), 1.0)
    step = math.degrees(0.5 * radius / extent)
    n_rot = int(math.ceil(max_rotation / step)) if max_rotation > 0 else 0
    trials = sorted(range(-n_rot, n_rot + 1), key=abs)  # no rotation first: ties keep the smallest
    best = {"votes": -1, "rotation": 0.0, "dx": 0.0, "dy": 0.0}
    tree = cKDTree(cat_xy)
    nbins = int(math.ceil(2 * max_offset / radius)) + 1
    for k in trials:
        rot = k * step
        c, s = math.cos(math.radians(rot)), math.sin(math.radians(rot))
        rx = cx + c * (xy[:, 0] - cx) - s * (xy[:, 1] - cy)
        ry = cy + s * (xy[:, 0] - cx) + c * (xy[:, 1] - cy)
        pts = np.c_[rx, ry]
        pairs = tree.query_ball_point(pts, max_offset)
        di = np.fromiter((len(p) for p in pairs), int, len(pairs))
        if di.sum() == 0:
            continue
        jj = np.concatenate([np.asarray(p, int) for p in pairs])
        ii = np.repeat(np.arange(len(pts)), di)
        d = cat_xy[jj] - pts[ii]
        # two staggered grids so that a peak on a bin edge is not split
        for half in (0.0, 0.5):
            edges = (np.arange(nbins + 1) - nbins / 2 + half) * radius
            hist, _, _ = np.histogram2d(d[:, 0], d[:, 1], bins=[edges, edges])
            ix, iy = np.unravel_index(np.argmax(hist), hist.shape)
            if hist[ix, iy] > best["votes"]:
                sel = (np.abs(d[:, 0] - 0.5 * (edges[ix] + edges[ix + 1])) <= radius) & (
                    np.abs(d[:, 1] - 0.5 * (edges[iy] + edges[iy + 1])) <= radius
                )
                best = {
                    "votes": int(hist[ix, iy]),
                    "rotation": rot,
                    "dx": float(np.median(d[sel, 0])),
                    "dy": float(np.median(d[sel, 1])),
                }
    if best["votes"] <= 0:
        return np.zeros(0, int), np.zeros(0, int), best
    c, s = math.cos(math.radians(best["rotation"])), math.sin(math.radians(best["rotation"]))
    rx = cx + c * (xy[:, 0] - cx) - s * (xy[:, 1] - cy) + best["dx"]
    ry = cy + s * (xy[:, 0] - cx) + c * (xy[:, 1] - cy) + best["dy"]
    i, j = _unique_nearest(np.c_[rx, ry], tree, radius)
    return i, j, best


def _unique_nearest(pts: np.ndarray, tree: Any, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (point, nearest tree point within radius), keeping one point per tree point (the nearest)."""
    d, j = tree.query(pts, distance_upper_bound=radius)
    ok = np.isfinite(d)
    i, j, d = np.nonzero(ok)[0], j[ok], d[ok]
    order = np.argsort(d)
    _, first = np.unique(j[order], return_index=True)
    keep = np.sort(order[first])
    return i[keep], j[keep]


def _residuals_mas(wcs: WCS, xy: np.ndarray, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """Angular distance (mas) between the WCS position of each pixel and its catalogue position."""
    r, d = wcs.all_pix2world(xy[:, 0], xy[:, 1], 0)
    dra = (r - ra + 180.0) % 360.0 - 180.0
    return np.hypot(dra * np.cos(np.radians(dec)), d - dec) * 3.6e6


def fit_wcs(
    xy: np.ndarray,
    ra: np.ndarray,
    dec: np.ndarray,
    *,
    sip_degree: int | None,
    clip: float = 4.0,
) -> tuple[WCS, np.ndarray]:
    """TAN (+ SIP of ``sip_degree``) WCS through matched pixel and sky positions, sigma-clipped.

    Parameters
    ----------
    xy : numpy.ndarray
        ``(n, 2)`` pixel positions (0-based).
    ra, dec : numpy.ndarray
        Their catalogue positions (deg).
    sip_degree : int or None
        SIP polynomial degree (None: a linear TAN WCS).
    clip : float, optional
        Pairs off by more than ``clip`` times the robust rms are dropped and the fit repeated (3 rounds).

    Returns
    -------
    wcs : astropy.wcs.WCS
        The fitted WCS.
    used : numpy.ndarray
        Boolean mask of the pairs of the last fit.
    """
    import warnings

    from astropy.coordinates import SkyCoord
    from astropy.wcs.utils import fit_wcs_from_points

    used = np.ones(len(xy), bool)
    sky = SkyCoord(ra, dec, unit="deg")
    wcs = None
    for _ in range(3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            wcs = fit_wcs_from_points(
                (xy[used, 0], xy[used, 1]), sky[used], proj_point="center", projection="TAN", sip_degree=sip_degree
            )
        res = _residuals_mas(wcs, xy, ra, dec)
        lim = max(clip * 1.4826 * float(np.median(res[used])), 1.0)
        new = res < lim
        if np.array_equal(new, used) or new.sum() < 6:
            break
        used = new
    return wcs, used


def _sip_terms(degree: int | None) -> int:
    """Number of free coefficients of a TAN (+SIP) fit: 6 linear plus two polynomials of order 2..degree."""
    if not degree:
        return 6
    return 6 + 2 * sum(k + 1 for k in range(2, degree + 1))


def solve_blind(
    path: str | os.PathLike,
    *,
    index_dir: str | os.PathLike | None,
    pixel_scale: float | None,
    timeout: float = 300.0,
) -> WCS:
    """Blind astrometric solution of a frame by astrometry.net's ``solve-field``.

    Parameters
    ----------
    path : path-like
        The frame (FITS).
    index_dir : path-like
        Folder with astrometry.net index files (``index-*.fits``) covering the frame's scale.
    pixel_scale : float or None
        Expected scale (arcsec/px): searched within 20 %; None searches every scale.
    timeout : float, optional
        CPU-time limit of the solver (s).

    Returns
    -------
    astropy.wcs.WCS
        The solution (TAN + SIP as ``solve-field`` writes it).

    Raises
    ------
    InputError
        ``solve-field`` or the index files missing, or no solution.
    """
    exe = shutil.which("solve-field")
    if exe is None:
        raise InputError(
            f"astrometry: frame '{path}' needs a blind solution but 'solve-field' is not installed: install "
            "astrometry.net (Debian/Ubuntu: apt install astrometry.net; conda: conda-forge astrometry) and index "
            "files (e.g. apt install astrometry-data-4200-2mass, or index-52xx from data.astrometry.net) and name "
            "their folder in 'astrometry.index_dir'"
        )
    if index_dir is None or not any(Path(index_dir).glob("index-*.fits*")):
        raise InputError(
            f"astrometry: frame '{path}' needs a blind solution but the index folder "
            f"'{index_dir}' ('astrometry.index_dir') holds no astrometry.net index files (index-*.fits): download "
            "the 4100/5200 series covering your field size from http://data.astrometry.net and put them there"
        )
    with tempfile.TemporaryDirectory(prefix="rbflow-solve-") as tmp:
        cfg = Path(tmp) / "backend.cfg"
        cfg.write_text(f"inparallel\ncpulimit {int(timeout)}\nadd_path {Path(index_dir).resolve()}\nautoindex\n")
        cmd = [exe, "--config", str(cfg), "--dir", tmp, "--no-plots", "--overwrite", "--new-fits", "none"]
        cmd += ["--corr", "none", "--rdls", "none", "--match", "none", "--solved", "none", "--index-xyls", "none"]
        cmd += ["--cpulimit", str(int(timeout)), "--wcs", str(Path(tmp) / "out.wcs")]
        if pixel_scale is not None:
            cmd += ["--scale-units", "arcsecperpix", "--scale-low", f"{0.8 * pixel_scale}"]
            cmd += ["--scale-high", f"{1.2 * pixel_scale}"]
        cmd.append(str(path))
        log.info("astrometry: blind solve: %s", " ".join(cmd))
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 60, check=False)  # noqa: S603
        except subprocess.TimeoutExpired:
            raise InputError(f"astrometry: solve-field found no solution for '{path}' within {timeout:g} s") from None
        out = Path(tmp) / "out.wcs"
        if done.returncode != 0 or not out.exists():
            tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
            raise InputError(
                f"astrometry: solve-field found no solution for '{path}' (exit {done.returncode}): "
                + " | ".join(tail)
                + "; check the index files cover the field's size and 'pixel_scale'"
            )
        import warnings

        from astropy.wcs import FITSFixedWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)  # a header without an image (NAXIS = 0)
            return WCS(fits.getheader(out), naxis=2)


def _replace_wcs(header: fits.Header, wcs: WCS) -> fits.Header:
    """``header`` without its WCS cards, with those of ``wcs`` (SIP included)."""
    out = header.copy()
    for key in list(out.keys()):
        if key.startswith(_WCS_CARD):
            out.remove(key, ignore_missing=True, remove_all=True)
    out.update(wcs.to_header(relax=True))
    return out


def calibrate_frame(
    path: str | os.PathLike,
    out_path: str | os.PathLike,
    telescope: dict[str, Any],
    *,
    catalogue: Table,
    settings: dict[str, Any],
) -> dict[str, Any]:
    """Refine (or solve blind, then refine) a frame's WCS against a catalogue; write the frame with it.

    Parameters
    ----------
    path : path-like
        Input frame.
    out_path : path-like
        Output FITS (atomic): the frame's pixels and header with the new WCS and the cards
        ``ASTRRMS`` (mas), ``ASTRNMAT``, ``ASTRSIP``, ``ASTRSHFT`` (arcsec), ``ASTRCAT``.
    telescope : dict
        Validated telescope configuration (frame facts, ``pixel_scale``, ``frames.hdu``).
    catalogue : astropy.table.Table
        Reference stars (``ra``, ``dec``, ``mag``), e.g. from :func:`load_catalogue`.
    settings : dict
        The ``astrometry`` block of the telescope file.

    Returns
    -------
    dict
        ``rms_mas``, ``n_matched``, ``sip_degree``, ``shift_arcsec`` (WCS change at the frame
        centre), ``rotation_deg`` (of the first match), ``blind`` (bool), ``rms_by_degree``.

    Raises
    ------
    InputError
        No WCS and no blind solver, too few matched stars, or an rms above ``max_rms``.
    """
    from scipy.spatial import cKDTree

    image = read_image(path, hdu=frame_hdu(telescope))
    info = frame_info(image.header, telescope, path=path)
    data = image.data
    bad = ~np.isfinite(data) | (np.nan_to_num(data) >= info.saturation)
    sky, sigma = background(data, bad)
    fwhm = info.fwhm_guess or 3.0
    stars = find_stars(
        np.where(bad, 0.0, data - sky),
        sigma,
        bad,
        fwhm=fwhm,
        snr_min=settings["snr_min"],
        max_stars=settings["max_stars"],
    )
    xy = np.c_[stars["x"], stars["y"]]
    ny, nx = data.shape
    centre = ((nx - 1) / 2, (ny - 1) / 2)
    blind = settings["blind"] == "always" or (settings["blind"] == "if_needed" and image.wcs is None)
    if blind:
        wcs0 = solve_blind(
            path, index_dir=settings["index_dir"], pixel_scale=telescope["pixel_scale"], timeout=settings["timeout"]
        )
    else:
        wcs0 = image.require_wcs()
    min_n = settings["min_matches"]
    if len(xy) < min_n:
        raise InputError(
            f"astrometry: frame '{path}' has {len(xy)} stars with S/N >= {settings['snr_min']} (need "
            f"{min_n}, 'astrometry.min_matches'): too shallow or cloudy"
        )
    cx, cy = wcs0.all_world2pix(catalogue["ra"], catalogue["dec"], 0)
    inside = np.isfinite(cx) & (cx > -50) & (cx < nx + 50) & (cy > -50) & (cy < ny + 50)
    cat = catalogue[inside][: 2 * settings["max_stars"]]
    cat_xy = np.c_[cx[inside], cy[inside]][: 2 * settings["max_stars"]]
    scale = math.sqrt(abs(np.linalg.det(wcs0.pixel_scale_matrix))) * 3600.0  # arcsec/px
    radius = settings["match_radius"]
    i, j, found = initial_match(
        xy,
        cat_xy,
        centre=centre,
        max_offset=settings["max_offset"] / scale,
        max_rotation=settings["max_rotation"],
        radius=radius,
    )
    if len(i) < min_n and settings["blind"] == "if_needed" and not blind:
        log.warning("astrometry: '%s': %d matches through the header WCS; solving blind", path, len(i))
        return calibrate_frame(path, out_path, telescope, catalogue=catalogue, settings={**settings, "blind": "always"})
    if len(i) < min_n:
        raise InputError(
            f"astrometry: frame '{path}': {len(i)} of {len(xy)} stars match the catalogue (need {min_n}, "
            "'astrometry.min_matches'): the WCS is off by more than 'astrometry.max_offset' / 'max_rotation', "
            "or the catalogue does not cover the frame; use 'astrometry.blind: if_needed'"
        )
    ra_c = np.asarray(cat["ra"], float)
    dec_c = np.asarray(cat["dec"], float)
    wcs, _ = fit_wcs(xy[i], ra_c[j], dec_c[j], sip_degree=None)
    results: dict[int, tuple[WCS, np.ndarray, np.ndarray, float]] = {}
    best_deg = 0
    for deg in range(0, settings["max_sip"] + 1):
        sip = deg if deg >= 2 else None
        if deg == 1:
            continue
        for _ in range(2):  # re-match through the current fit, then refit
            px, py = wcs.all_world2pix(ra_c, dec_c, 0)
            i, j = _unique_nearest(xy, cKDTree(np.c_[px, py]), radius)
            if len(i) < max(min_n, 3 * _sip_terms(sip)):
                break
            wcs, used = fit_wcs(xy[i], ra_c[j], dec_c[j], sip_degree=sip)
        else:
            res = _residuals_mas(wcs, xy[i][used], ra_c[j][used], dec_c[j][used])
            rms = float(np.sqrt(np.mean(res**2)))
            results[deg] = (wcs, i[used], j[used], rms)
            log.info("astrometry: '%s': SIP degree %s: %d stars, rms %.1f mas", path, sip or 0, used.sum(), rms)
            if deg == 0 or rms < (1.0 - settings["sip_gain"]) * results[best_deg][3]:
                best_deg = deg
                continue
        break
    if not results:
        raise InputError(
            f"astrometry: frame '{path}': too few stars left after matching through the fitted WCS (need {min_n})"
        )
    wcs, i_used, _, rms = results[best_deg]
    if rms > settings["max_rms"] * 1000.0:
        raise InputError(
            f"astrometry: frame '{path}': the fit's rms residual is {rms:.0f} mas (limit {settings['max_rms']} arcsec, "
            "'astrometry.max_rms'): wrong matches or a catalogue that does not fit the frame"
        )
    r0, d0 = wcs0.all_pix2world([centre[0]], [centre[1]], 0)
    r1, d1 = wcs.all_pix2world([centre[0]], [centre[1]], 0)
    shift = float(np.hypot((r1[0] - r0[0]) * math.cos(math.radians(d0[0])), d1[0] - d0[0]) * 3600.0)
    header = _replace_wcs(image.header, wcs)
    header["ASTRRMS"] = (rms, "[mas] rms residual of the astrometric fit")
    header["ASTRNMAT"] = (len(i_used), "stars matched to the astrometric catalogue")
    header["ASTRSIP"] = (best_deg, "SIP distortion degree (0: none)")
    header["ASTRSHFT"] = (shift, "[arcsec] WCS change at the frame centre")
    header["ASTRCAT"] = (Path(settings["catalogue"]).name[-40:], "astrometric catalogue")
    header["ASTRBLND"] = (blind, "solved blind by astrometry.net first")
    write_fits(fits.PrimaryHDU(data, header=header), out_path)
    log.info(
        "astrometry: '%s' -> '%s': %d stars, SIP %d, rms %.1f mas, WCS moved %.2f arcsec",
        path,
        out_path,
        len(i_used),
        best_deg,
        rms,
        shift,
    )
    return {
        "rms_mas": rms,
        "n_matched": len(i_used),
        "sip_degree": best_deg,
        "shift_arcsec": shift,
        "rotation_deg": found["rotation"],
        "blind": blind,
        "rms_by_degree": {k: v[3] for k, v in results.items()},
    }


def run_astrometry(
    *, frame: str, out_fits: str, telescope: dict[str, Any], settings: dict[str, Any], skip_bad: bool = False
) -> dict[str, Any]:
    """Entry point of the ``astrometry`` rule: the catalogue around the frame, then :func:`calibrate_frame`.

    Parameters
    ----------
    frame : str
        The frame as delivered.
    out_fits : str
        The calibrated frame.
    telescope : dict
        Instrument facts of the telescope file.
    settings : dict
        The ``astrometry`` block.
    skip_bad : bool, optional
        ``on_bad_frame: skip``: a frame that cannot be calibrated is written without a WCS (cards
        ``ASTRFAIL`` and ``HISTORY`` say why), so that the frame checks list it as bad, instead of
        failing the job.

    Returns
    -------
    dict
        What :func:`calibrate_frame` returns (``failed``: the message, with ``skip_bad``).

    Raises
    ------
    InputError
        A frame that cannot be calibrated (without ``skip_bad``).
    """
    try:
        return _calibrate(frame, out_fits, telescope, settings)
    except InputError as exc:
        if not skip_bad:
            raise
        log.warning("astrometry: frame '%s' is bad (on_bad_frame: skip): %s", frame, exc)
        image = read_image(frame, hdu=frame_hdu(telescope))
        header = image.header.copy()
        for key in list(header.keys()):
            if key.startswith(_WCS_CARD):
                header.remove(key, ignore_missing=True, remove_all=True)
        header["ASTRFAIL"] = (True, "astrometric calibration failed (see HISTORY)")
        header.add_history(f"rbflow.astrometry: {exc}")
        write_fits(fits.PrimaryHDU(image.data, header=header), out_fits)
        return {"failed": str(exc)}


def _calibrate(frame: str, out_fits: str, telescope: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """The catalogue around the frame (its WCS centre, else its RA/DEC cards), then :func:`calibrate_frame`."""
    image = read_image(frame, hdu=frame_hdu(telescope))
    ny, nx = image.data.shape
    if image.wcs is not None:
        ra, dec = image.wcs.all_pix2world([(nx - 1) / 2], [(ny - 1) / 2], 0)
        ra, dec = float(ra[0]), float(dec[0])
    elif "RA" in image.header and "DEC" in image.header:
        from astropy.coordinates import SkyCoord

        pos = SkyCoord(image.header["RA"], image.header["DEC"], unit=("hourangle", "deg"))
        ra, dec = float(pos.ra.deg), float(pos.dec.deg)
    else:
        raise InputError(
            f"astrometry: frame '{frame}' has neither a WCS nor RA/DEC cards to query the catalogue around"
        )
    scale = telescope["pixel_scale"] or 3600.0 * math.sqrt(abs(np.linalg.det(image.wcs.pixel_scale_matrix)))
    radius = 0.5 * math.hypot(nx, ny) * scale / 3600.0 + settings["max_offset"] / 3600.0
    catalogue = load_catalogue(
        settings["catalogue"],
        ra=ra,
        dec=dec,
        radius=radius,
        mag_limit=settings["mag_limit"],
        url=settings["url"],
        cache=settings["cache"],
        timeout=settings["timeout"],
    )
    return calibrate_frame(frame, out_fits, telescope, catalogue=catalogue, settings=settings)
