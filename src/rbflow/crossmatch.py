"""Matching candidates to injected sources and known variables, and the labelled training folders.

:func:`crossmatch` decides, per injected source, whether it was detected, and per candidate,
whether it is real ('true'), bogus ('false') or left to a person ('unsorted'). Ambiguous
geometry (two injected sources within the radius of one candidate, or one source with several
candidates) is flagged in the ``ambiguous`` and ``note`` columns instead of being guessed:
a candidate that is the nearest of some injected source is 'true'; any further candidate
within the radius of an injected source is 'unsorted'.

:func:`label_cutouts` links the cutout files into ``training/{true,false,unsorted}/``. The
folder is the label: a person may move files between these folders, and a later run never
moves them back. :func:`relabel_digest` summarises the moves made since the last labelling, so that the
workflow rebuilds the datacube when a file is moved.

On a synthetic telescope, :func:`truth_kinds` tells what each candidate sits on in the frames' truth
tables (a star, a cosmic ray, a bleed trail of the reference...); :func:`run_crossmatch` writes it in
the ``truth_kind`` column, which :func:`label_cutouts` carries into ``labels.ecsv``. It describes the
candidate, not its label: a person moving a cutout between folders changes the label only.
"""

from __future__ import annotations

import contextlib
import fcntl
import filecmp
import hashlib
import logging
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from astropy.coordinates import SkyCoord
from astropy.table import Table

from rbflow import __version__
from rbflow.cutouts import MANIFEST
from rbflow.errors import InputError
from rbflow.io import made_by, read_table, write_table

if TYPE_CHECKING:
    from astropy.wcs import WCS

__all__ = [
    "LABELS",
    "RETIRED",
    "REF_PREFIX",
    "TRUTH_MATCHED_KINDS",
    "table_pixel_scale",
    "crossmatch",
    "read_catalogue",
    "truth_kinds",
    "run_crossmatch",
    "write_dat",
    "label_cutouts",
    "relabel_digest",
    "training_lock",
]

log = logging.getLogger(__name__)

#: Label folders of the training set.
LABELS = ("true", "false", "unsorted")
#: Folder of a training folder that receives the cutout files of candidates a rerun no longer makes.
RETIRED = "retired"
#: Prefix of the truth kinds found in the reference frame's truth table (e.g. ``ref:bleed``).
REF_PREFIX = "ref:"
#: Real truth kinds (of :data:`rbflow.sky.REAL_KINDS`) that label an otherwise unmatched candidate true,
#: with ``match_kind='truth'``: the demo's stand-in for a match with known solar-system objects (as a
#: survey does with the MPC's orbits). Variables and transients are matched through the catalogue already.
TRUTH_MATCHED_KINDS = ("asteroid",)
#: Truth rows reaching further than this (pixels: half their length plus their extent) are compared with
#: every candidate; shorter ones are found through a k-d tree of their centres.
_TREE_REACH = 16.0


def _xy(table: Table) -> np.ndarray:
    return np.column_stack([np.asarray(table["x"], dtype=float), np.asarray(table["y"], dtype=float)])


def table_pixel_scale(*tables: Table) -> float:
    """Pixel scale (arcsec/px) from the (x, y) <-> (ra, dec) pairs of the given tables (affine fit)."""
    rows = [t for t in tables if len(t) and {"ra", "dec"} <= set(t.colnames)]
    if not rows:
        return float("nan")
    x = np.concatenate([np.asarray(t["x"], dtype=float) for t in rows])
    y = np.concatenate([np.asarray(t["y"], dtype=float) for t in rows])
    ra = np.concatenate([np.asarray(t["ra"], dtype=float) for t in rows])
    dec = np.concatenate([np.asarray(t["dec"], dtype=float) for t in rows])
    dra = (ra - ra[0] + 180.0) % 360.0 - 180.0
    sky = np.column_stack([dra * np.cos(np.radians(dec[0])), dec - dec[0]]) * 3600.0
    pix = np.column_stack([x - x[0], y - y[0], np.ones_like(x)])
    if np.linalg.matrix_rank(pix) < 3:
        return float("nan")
    coef = np.linalg.lstsq(pix, sky, rcond=None)[0]
    return float(np.sqrt(abs(np.linalg.det(coef[:2]))))


def _catalogue_matches(
    candidates: Table, catalogues: Sequence[Table], radius: float, wcs: WCS | None, injected: Table
) -> tuple[np.ndarray, np.ndarray]:
    """Per candidate: matched to a catalogue source (bool) and the separation (px)."""
    n = len(candidates)
    hit = np.zeros(n, dtype=bool)
    sep = np.full(n, np.nan)
    cats = [c for c in catalogues if len(c)]
    if not cats or n == 0:
        return hit, sep
    ra = np.concatenate([np.asarray(c["ra"], dtype=float) for c in cats])
    dec = np.concatenate([np.asarray(c["dec"], dtype=float) for c in cats])
    if wcs is not None:
        from scipy.spatial import cKDTree

        cxy = np.column_stack(wcs.world_to_pixel_values(ra, dec))
        cxy = cxy[np.all(np.isfinite(cxy), axis=1)]  # sources behind the tangent plane have no pixel
        if len(cxy) == 0:
            return hit, sep
        dist, _ = cKDTree(cxy).query(_xy(candidates))
    else:
        scale = table_pixel_scale(candidates, injected)
        if not np.isfinite(scale) or scale <= 0:
            raise InputError(
                "crossmatch with catalogues needs the pixel scale: give the image WCS (wcs=...) or at "
                "least 3 candidates/injected sources with x, y, ra, dec that are not collinear"
            )
        cand = SkyCoord(np.asarray(candidates["ra"], float), np.asarray(candidates["dec"], float), unit="deg")
        _, d2d, _ = cand.match_to_catalog_sky(SkyCoord(ra, dec, unit="deg"))
        dist = d2d.arcsec / scale
    hit = dist <= radius
    sep[hit] = dist[hit]
    return hit, sep


def _pairs(candidates: Table, injected: Table, radius: float) -> list[tuple[int, int, float]]:
    """All (injected index, candidate index, separation px) within ``radius``, same image only."""
    if len(candidates) == 0 or len(injected) == 0:
        return []
    from scipy.spatial import cKDTree

    tree = cKDTree(_xy(candidates))
    same_image = "image" in candidates.colnames and "image" in injected.colnames
    cimg = np.asarray(candidates["image"]).astype(str) if same_image else None
    iimg = np.asarray(injected["image"]).astype(str) if same_image else None
    ixy = _xy(injected)
    cxy = _xy(candidates)
    pairs = []
    for i, near in enumerate(tree.query_ball_point(ixy, r=radius)):
        for c in near:
            if same_image and cimg[c] != iimg[i]:
                continue
            pairs.append((i, c, float(np.hypot(*(cxy[c] - ixy[i])))))
    return pairs


def crossmatch(
    candidates: Table,
    injected: Table,
    *,
    radius: float,
    catalogues: Sequence[Table] = (),
    wcs: WCS | None = None,
) -> tuple[Table, Table]:
    """Match candidates to injected sources (and catalogue sources) within ``radius`` pixels.

    Parameters
    ----------
    candidates : astropy.table.Table
        Candidates (columns id, x, y, ra, dec, mag, mag_err, snr; ``image`` optional).
    injected : astropy.table.Table
        Injected sources (columns x, y, mag; ``image`` optional). When both tables have an
        ``image`` column, only candidates of the same image match.
    radius : float
        Match radius (pixels, 0-based frame coordinates).
    catalogues : sequence of astropy.table.Table, optional
        Known real sources (columns ra, dec in deg). A candidate within ``radius`` of one, and not
        already matched to an injected source, is labelled true with ``match_kind='catalogue'``.
    wcs : astropy.wcs.WCS, optional
        WCS of the candidates' image, used to place catalogue sources in pixels. Without it the
        match uses sky separations with ``radius`` times a pixel scale fitted to the tables' x, y,
        ra, dec.

    Returns
    -------
    per_injected : astropy.table.Table
        The injected columns plus detected (bool), cand_id, sep (px), mag_meas, mag_err_meas, snr,
        n_cand (candidates within the radius), ambiguous (bool) and note.
    labels : astropy.table.Table
        One row per candidate: id, image, label ('true', 'false' or 'unsorted'), match_kind
        ('injected', 'catalogue' or ''), inj_id, sep (px), mag_inj, ambiguous (bool), note.

    Raises
    ------
    ValueError
        ``radius`` is not positive.
    InputError
        Catalogues are given but neither a WCS nor enough positions to fit a pixel scale.
    """
    if not radius > 0:
        raise ValueError(f"crossmatch radius must be > 0 (pixels), got {radius}: set 'crossmatch.radius'")
    n_inj, n_cand = len(injected), len(candidates)
    pairs = _pairs(candidates, injected, radius)
    by_inj: dict[int, list[tuple[int, float]]] = {}
    by_cand: dict[int, list[tuple[int, float]]] = {}
    for i, c, d in pairs:
        by_inj.setdefault(i, []).append((c, d))
        by_cand.setdefault(c, []).append((i, d))
    cand_ids = np.asarray(candidates["id"]).astype(str) if n_cand else np.array([], dtype=str)
    inj_ids = np.asarray(injected["id"]).astype(str) if "id" in injected.colnames else np.arange(n_inj).astype(str)

    nearest = {i: min(lst, key=lambda t: t[1]) for i, lst in by_inj.items()}
    chosen_by: dict[int, list[tuple[int, float]]] = {}
    for i, (c, d) in nearest.items():
        chosen_by.setdefault(c, []).append((i, d))

    per = injected.copy(copy_data=True)
    detected = np.zeros(n_inj, dtype=bool)
    cid = np.full(n_inj, "", dtype=object)
    sep = np.full(n_inj, np.nan)
    mag_meas = np.full(n_inj, np.nan)
    mag_err_meas = np.full(n_inj, np.nan)
    snr = np.full(n_inj, np.nan)
    n_near = np.zeros(n_inj, dtype=np.int64)
    amb_inj = np.zeros(n_inj, dtype=bool)
    note_inj = np.full(n_inj, "", dtype=object)
    for i, (c, d) in nearest.items():
        detected[i], cid[i], sep[i] = True, cand_ids[c], d
        mag_meas[i] = float(candidates["mag"][c])
        mag_err_meas[i] = float(candidates["mag_err"][c])
        snr[i] = float(candidates["snr"][c])
        n_near[i] = len(by_inj[i])
        notes = []
        if len(by_inj[i]) > 1:
            others = sorted(cand_ids[o] for o, _ in by_inj[i] if o != c)
            notes.append(f"{len(by_inj[i])} candidates within radius (also {', '.join(others)})")
        if len(by_cand[c]) > 1:
            others = sorted(inj_ids[o] for o, _ in by_cand[c] if o != i)
            notes.append(f"candidate {cand_ids[c]} also within radius of injected {', '.join(others)}")
        amb_inj[i] = bool(notes)
        note_inj[i] = "; ".join(notes)
    per["detected"] = detected
    per["cand_id"] = cid.astype(str) if n_inj else np.array([], dtype="U1")
    per["sep"] = sep
    per["mag_meas"] = mag_meas
    per["mag_err_meas"] = mag_err_meas
    per["snr"] = snr
    per["n_cand"] = n_near
    per["ambiguous"] = amb_inj
    per["note"] = note_inj.astype(str) if n_inj else np.array([], dtype="U1")
    per["sep"].unit = "pix"

    label = np.full(n_cand, "false", dtype="U8")
    kind = np.full(n_cand, "", dtype="U9")
    lsep = np.full(n_cand, np.nan)
    mag_inj = np.full(n_cand, np.nan)
    linj = np.full(n_cand, "", dtype=object)
    amb = np.zeros(n_cand, dtype=bool)
    note = np.full(n_cand, "", dtype=object)
    inj_mag = np.asarray(injected["mag"], dtype=float) if n_inj else np.array([])
    for c, lst in by_cand.items():
        if c in chosen_by:
            i, d = min(chosen_by[c], key=lambda t: t[1])
            label[c], kind[c] = "true", "injected"
        else:
            i, d = min(lst, key=lambda t: t[1])
            label[c], kind[c] = "unsorted", "injected"
            note[c] = f"within radius of injected {inj_ids[i]} but not its nearest candidate"
            amb[c] = True
        lsep[c], mag_inj[c], linj[c] = d, inj_mag[i], inj_ids[i]
        if len(lst) > 1:
            amb[c] = True
            others = ", ".join(sorted(inj_ids[o] for o, _ in lst))
            note[c] = "; ".join(filter(None, [note[c], f"{len(lst)} injected sources within radius ({others})"]))
    hit, csep = _catalogue_matches(candidates, catalogues, radius, wcs, injected)
    cat = hit & (label != "true")
    label[cat], kind[cat], lsep[cat] = "true", "catalogue", csep[cat]

    labels = Table(
        {
            "id": cand_ids,
            "image": np.asarray(candidates["image"]).astype(str)
            if "image" in candidates.colnames and n_cand
            else np.full(n_cand, "", dtype="U1"),
            "label": label,
            "match_kind": kind,
            "inj_id": linj.astype(str) if n_cand else np.array([], dtype="U1"),
            "sep": lsep,
            "mag_inj": mag_inj,
            "ambiguous": amb,
            "note": note.astype(str) if n_cand else np.array([], dtype="U1"),
        }
    )
    labels["sep"].unit = "pix"
    meta = {"made_by": made_by("rbflow.crossmatch.crossmatch"), "radius_px": float(radius)}
    per.meta.update(meta)
    labels.meta.update(meta)
    log.info(
        "crossmatch: %d/%d injected detected; %d true (%d from catalogues), %d unsorted, %d false candidates",
        detected.sum(),
        n_inj,
        (label == "true").sum(),
        cat.sum(),
        (label == "unsorted").sum(),
        (label == "false").sum(),
    )
    return per, labels


def read_catalogue(path: str | os.PathLike) -> Table:
    """Read a catalogue of known sources (ECSV, or CSV when the name ends in ``.csv``).

    Parameters
    ----------
    path : path-like
        Catalogue file with columns ``ra`` and ``dec`` (deg).

    Returns
    -------
    astropy.table.Table

    Raises
    ------
    InputError
        Missing or unreadable file, or no ``ra``/``dec`` columns.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"catalogue '{path}' does not exist: fix 'crossmatch.catalogues' in the telescope file")
    fmt = "ascii.csv" if path.suffix.lower() == ".csv" else "ascii.ecsv"
    try:
        table = Table.read(path, format=fmt)
    except Exception as exc:
        raise InputError(
            f"catalogue '{path}' is not a readable {fmt[6:].upper()} table ({exc}): give an ECSV file, "
            "or a CSV file named *.csv, with columns ra and dec (deg)"
        ) from exc
    missing = [c for c in ("ra", "dec") if c not in table.colnames]
    if missing:
        raise InputError(
            f"catalogue '{path}' lacks column(s) {', '.join(missing)}: it needs columns ra and dec in degrees "
            f"(found: {', '.join(table.colnames)})"
        )
    return table


def _column(table: Table, name: str, default: float) -> np.ndarray:
    """A float column of ``table``, ``default`` where it is absent or NaN."""
    if name not in table.colnames:
        return np.full(len(table), default)
    values = np.asarray(table[name], dtype=float)
    return np.where(np.isfinite(values), values, default)


def _segments(x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray) -> np.ndarray:
    """Rows (x0, y0, x1, y1): the far end is the near one where it is NaN (a compact thing)."""
    far = np.isfinite(x1) & np.isfinite(y1)
    return np.column_stack([x0, y0, np.where(far, x1, x0), np.where(far, y1, y0)])


def _segment_distance(px: np.ndarray, py: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """Distance (px) of points to segments (rows x0, y0, x1, y1; a point when both ends are equal), paired."""
    dx, dy = seg[:, 2] - seg[:, 0], seg[:, 3] - seg[:, 1]
    length2 = dx * dx + dy * dy
    t = ((px - seg[:, 0]) * dx + (py - seg[:, 1]) * dy) / np.where(length2 > 0, length2, 1.0)
    t = np.clip(t, 0.0, 1.0)
    return np.hypot(px - (seg[:, 0] + t * dx), py - (seg[:, 1] + t * dy))


def _tangent(ra: np.ndarray, dec: np.ndarray, ra0: float, dec0: float) -> tuple[np.ndarray, np.ndarray]:
    """Gnomonic projection (deg) about (ra0, dec0): great circles, hence truth segments, stay straight."""
    a, d = np.radians(ra - ra0), np.radians(dec)
    d0 = math.radians(dec0)
    cos_c = math.sin(d0) * np.sin(d) + math.cos(d0) * np.cos(d) * np.cos(a)
    xi = np.cos(d) * np.sin(a) / cos_c
    eta = (math.cos(d0) * np.sin(d) - math.sin(d0) * np.cos(d) * np.cos(a)) / cos_c
    return np.degrees(xi), np.degrees(eta)


def _sky_to_pixels(truth: Table) -> Any:
    """Affine map from the tangent plane to the pixels of ``truth``'s frame, fitted to its rows (None: too few)."""
    x, y = _column(truth, "x", np.nan), _column(truth, "y", np.nan)
    ra, dec = _column(truth, "ra", np.nan), _column(truth, "dec", np.nan)
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(ra) & np.isfinite(dec)
    if ok.sum() < 3:
        return None
    ra0, dec0 = float(np.median(ra[ok])), float(np.median(dec[ok]))
    xi, eta = _tangent(ra[ok], dec[ok], ra0, dec0)
    design = np.column_stack([xi, eta, np.ones_like(xi)])
    if np.linalg.matrix_rank(design) < 3:
        return None
    coef = np.linalg.lstsq(design, np.column_stack([x[ok], y[ok]]), rcond=None)[0]

    def to_pixels(ra_: np.ndarray, dec_: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = np.column_stack([*_tangent(ra_, dec_, ra0, dec0), np.ones(len(ra_))]) @ coef
        return t[:, 0], t[:, 1]

    return to_pixels


def truth_kinds(
    candidates: Table,
    truth: Table,
    *,
    radius: float,
    reference: Table | None = None,
) -> np.ndarray:
    """The truth kind each candidate sits on: that of the nearest truth row within ``radius``.

    A truth row is a point ``(x, y)`` or, where ``x1, y1`` are finite, the segment ``(x, y)-(x1, y1)``
    (a trail, a bleed, a bad column...), widened by ``extent`` (pixels; a ghost's radius, half the
    width of a masked block). The distance of a candidate to a row is its distance to the point or
    segment minus the extent, never below 0; the nearest row at a distance ``<= radius`` gives the
    kind. Among rows at the same distance the one whose point or segment is nearer wins, then the
    first (the science frame's before the reference's). Tables without ``x1, y1, extent`` (truth
    tables of older rbflow versions) are read as points of extent 0.

    The reference frame's rows are placed in the science frame through their ``ra, dec`` (and
    ``ra1, dec1``): an affine map from the tangent plane to the science pixels, fitted to the science
    truth table's own ``x, y, ra, dec``; their extent is scaled by the ratio of the two frames' pixel
    scales. Their kinds get the prefix :data:`REF_PREFIX`. A reference row with the ``id`` of a
    science row (the same star or galaxy, seen in both frames) is left out: the science row stands for it.

    Parameters
    ----------
    candidates : astropy.table.Table
        Candidates (columns x, y: 0-based pixels of the science frame).
    truth : astropy.table.Table
        Truth table of the science frame (columns kind, x, y; ra, dec when ``reference`` is given;
        optional id, x1, y1, extent, ra1, dec1).
    radius : float
        Match radius (pixels).
    reference : astropy.table.Table, optional
        Truth table of the reference frame (columns kind, ra, dec, x, y; optional id, ra1, dec1,
        extent).

    Returns
    -------
    numpy.ndarray of str
        Per candidate: the kind, ``'ref:<kind>'`` for a reference-frame row, ``''`` when no row is
        within ``radius``.

    Raises
    ------
    ValueError
        ``radius`` is not positive.
    InputError
        A table lacks a needed column, or ``reference`` is given and the science truth table has
        fewer than 3 rows with finite x, y, ra, dec that are not collinear (no map between the frames).
    """
    if not radius > 0:
        raise ValueError(f"truth_kinds radius must be > 0 (pixels), got {radius}: set 'crossmatch.radius'")
    needed = [("science", truth, ("kind", "x", "y") + (("ra", "dec") if reference is not None else ()))]
    if reference is not None:
        needed.append(("reference", reference, ("kind", "x", "y", "ra", "dec")))
    for which, table, cols in needed:
        missing = [c for c in cols if c not in table.colnames]
        if missing:
            raise InputError(
                f"{which} truth table lacks column(s) {', '.join(missing)}: remake it (rule sky_frame) with this rbflow"
            )
    seg = _segments(
        _column(truth, "x", np.nan),
        _column(truth, "y", np.nan),
        _column(truth, "x1", np.nan),
        _column(truth, "y1", np.nan),
    )
    extent = np.maximum(_column(truth, "extent", 0.0), 0.0)
    kinds = np.asarray(truth["kind"]).astype(str)
    if reference is not None and len(reference):
        to_pixels = _sky_to_pixels(truth)
        if to_pixels is None:
            raise InputError(
                "the science truth table has fewer than 3 rows with finite x, y, ra, dec that are not collinear: "
                "the reference frame's truth cannot be placed in the science frame; remake the truth tables"
            )
        ref = reference
        if "id" in ref.colnames and "id" in truth.colnames:
            ref = ref[~np.isin(np.asarray(ref["id"]).astype(str), np.asarray(truth["id"]).astype(str))]
        x0, y0 = to_pixels(_column(ref, "ra", np.nan), _column(ref, "dec", np.nan))
        x1, y1 = to_pixels(_column(ref, "ra1", np.nan), _column(ref, "dec1", np.nan))
        scales = table_pixel_scale(reference), table_pixel_scale(truth)
        ratio = scales[0] / scales[1] if all(np.isfinite(scales)) and scales[1] > 0 else 1.0
        seg = np.vstack([seg, _segments(x0, y0, x1, y1)])
        extent = np.concatenate([extent, ratio * np.maximum(_column(ref, "extent", 0.0), 0.0)])
        kinds = np.concatenate([kinds, np.char.add(REF_PREFIX, np.asarray(ref["kind"]).astype(str))])
    out = np.full(len(candidates), "", dtype=object)
    cx, cy = _column(candidates, "x", np.nan), _column(candidates, "y", np.nan)
    usable = np.flatnonzero(np.isfinite(cx) & np.isfinite(cy))
    rows = np.flatnonzero(np.all(np.isfinite(seg), axis=1))
    if len(usable) == 0 or len(rows) == 0:
        return out.astype(str)
    reach = 0.5 * np.hypot(seg[:, 2] - seg[:, 0], seg[:, 3] - seg[:, 1]) + extent
    short, long_ = rows[reach[rows] <= _TREE_REACH], rows[reach[rows] > _TREE_REACH]
    pairs_c, pairs_r = [np.repeat(usable, len(long_))], [np.tile(long_, len(usable))]
    if len(short):
        from scipy.spatial import cKDTree

        mid = 0.5 * (seg[short, :2] + seg[short, 2:])
        near = cKDTree(mid).query_ball_point(np.column_stack([cx[usable], cy[usable]]), r=radius + reach[short].max())
        pairs_c.append(np.repeat(usable, [len(n) for n in near]))
        pairs_r.append(short[np.concatenate([np.asarray(n, dtype=np.int64) for n in near])])
    c, r = np.concatenate(pairs_c), np.concatenate(pairs_r)
    raw = _segment_distance(cx[c], cy[c], seg[r])
    dist = np.maximum(raw - extent[r], 0.0)
    within = dist <= radius
    c, r, raw, dist = c[within], r[within], raw[within], dist[within]
    order = np.lexsort((r, raw, dist, c))
    first = np.unique(c[order], return_index=True)[1]
    out[c[order][first]] = kinds[r[order][first]]
    return out.astype(str)


def write_dat(per_injected: Table, path: str | os.PathLike) -> None:
    """Write the older tool's ``crossmatch.dat`` (gmadet ``checksim``).

    An ``ascii.commented_header`` table with gmadet's columns: those of ``simulated_objects.list``
    (``idx filename Xpos Ypos RA Dec mag filter count_ADU``), then ``filename2`` (base name of
    ``filename``), ``Nmatches`` (candidates within the radius), ``closest_candID`` (the nearest
    candidate's id), ``all_candIDs`` (comma-separated, nearest first) and ``edge`` (``N``: injected
    sources lie half a cutout from the frame edges); ``None`` where nothing matched, as gmadet writes.
    rbflow adds ``mag_meas`` (the nearest candidate's magnitude) and ``sep`` (pixels), ``nan`` when
    undetected. ``idx`` is the row number (gmadet's checkinfer indexes rows with it); Xpos, Ypos are
    0-based pixels (a comment line says so). :func:`rbflow.legacy.read_crossmatch_dat` reads it back.

    Parameters
    ----------
    per_injected : astropy.table.Table
        First output of :func:`crossmatch`.
    path : path-like
        Destination.
    """
    n = len(per_injected)
    cols = per_injected.colnames
    images = np.asarray(per_injected["image"]).astype(str) if "image" in cols else np.full(n, "-")
    closest = np.where(per_injected["detected"], np.asarray(per_injected["cand_id"]).astype(str), "None")
    all_ids = []
    for row, nearest in zip(per_injected, closest):
        # crossmatch() lists the further candidates of a source in its note: "... (also id1, id2)"
        note = str(row["note"]) if "note" in cols else ""
        _, also, rest = note.partition("candidates within radius (also ")
        all_ids.append(",".join([nearest, *rest.split(")")[0].split(", ")]) if also else nearest)
    table = Table(
        {
            "idx": np.arange(n),
            "filename": images,
            "Xpos": np.asarray(per_injected["x"], dtype=float),
            "Ypos": np.asarray(per_injected["y"], dtype=float),
            "RA": np.asarray(per_injected["ra"], dtype=float) if "ra" in cols else np.full(n, np.nan),
            "Dec": np.asarray(per_injected["dec"], dtype=float) if "dec" in cols else np.full(n, np.nan),
            "mag": np.asarray(per_injected["mag"], dtype=float),
            "filter": np.asarray(per_injected["filter"]).astype(str) if "filter" in cols else np.full(n, "-"),
            "count_ADU": np.asarray(per_injected["flux"], dtype=float) if "flux" in cols else np.full(n, np.nan),
            "filename2": np.array([Path(i).name for i in images], dtype=str),
            "Nmatches": np.asarray(per_injected["n_cand"], dtype=np.int64),
            "closest_candID": closest,
            "all_candIDs": np.asarray(all_ids, dtype=str),
            "edge": np.where(per_injected["detected"], "N", "None"),
            "mag_meas": np.asarray(per_injected["mag_meas"], dtype=float),
            "sep": np.asarray(per_injected["sep"], dtype=float),
        }
    )
    table.meta["comments"] = [
        f"crossmatch of injected sources (rbflow {__version__}); pixel coordinates are 0-based "
        "(first pixel centre at 0, 0; Xpos = column, Ypos = row); sep in pixels",
    ]
    formats = {
        "Xpos": "%.3f",
        "Ypos": "%.3f",
        "RA": "%.8f",
        "Dec": "%.8f",
        "mag": "%.4f",
        "count_ADU": "%.6g",
        "mag_meas": "%.4f",
        "sep": "%.3f",
    }
    write_table(table, path, format="ascii.commented_header", formats=formats)


def run_crossmatch(
    candidates_path: str | os.PathLike,
    injected_path: str | os.PathLike,
    out_table: str | os.PathLike,
    out_dat: str | os.PathLike,
    out_per_candidate: str | os.PathLike,
    *,
    radius: float,
    catalogues: Sequence[str] = (),
    label_unmatched: str = "false",
    truth_path: str | os.PathLike | None = None,
    reference_truth_path: str | os.PathLike | None = None,
) -> tuple[Table, Table]:
    """Crossmatch one image's candidates with its injected sources and write the three outputs.

    Every candidate gets a ``truth_kind``: ``'injected'`` or ``'catalogue'`` when it matched, else
    the kind :func:`truth_kinds` finds in the truth tables of its frames (``''`` without them, e.g. on
    real frames). An unmatched candidate on a kind of :data:`TRUTH_MATCHED_KINDS` that
    :data:`rbflow.sky.REAL_KINDS` counts as real (an asteroid of the science frame) is labelled true
    with ``match_kind='truth'``; the other unmatched candidates get ``label_unmatched``.

    Parameters
    ----------
    candidates_path : path-like
        Candidate ECSV of the detect stage.
    injected_path : path-like
        Injection truth ECSV (``simulated_objects``) of the same image.
    out_table : path-like
        Per-injected-source ECSV (see :func:`crossmatch`).
    out_dat : path-like
        ``crossmatch.dat`` compatibility file (see :func:`write_dat`).
    out_per_candidate : path-like
        Per-candidate ECSV (match and automatic label of each candidate; ``{image}.per_candidate.ecsv``).
    radius : float
        Match radius (pixels).
    catalogues : sequence of str, optional
        ECSV/CSV catalogues of known real sources (ra, dec in deg).
    label_unmatched : {'false', 'unsorted'}
        Label of candidates that match nothing.
    truth_path : path-like, optional
        Truth table of the image's science frame (``resources/{telescope}/truth/{frame}.ecsv``, synthetic
        telescopes only).
    reference_truth_path : path-like, optional
        Truth table of the frame's reference frame (needs ``truth_path``).

    Returns
    -------
    per_injected, labels : astropy.table.Table
        ``labels`` has the columns of :func:`crossmatch` plus ``truth_kind``.

    Raises
    ------
    ValueError
        ``label_unmatched`` is not 'false' or 'unsorted', or ``reference_truth_path`` comes without
        ``truth_path``.
    InputError
        Missing or malformed input tables or catalogues.
    """
    if label_unmatched not in ("false", "unsorted"):
        raise ValueError(
            f"label_unmatched must be 'false' or 'unsorted', got {label_unmatched!r}: fix 'crossmatch.label_unmatched'"
        )
    if reference_truth_path is not None and truth_path is None:
        raise ValueError("a reference truth table needs the science frame's truth table (truth_path)")
    cands = read_table(candidates_path)
    inj = read_table(injected_path)
    for path, table, cols in (
        (candidates_path, cands, ("id", "x", "y", "ra", "dec", "mag", "mag_err", "snr")),
        (injected_path, inj, ("x", "y", "mag")),
    ):
        missing = [c for c in cols if c not in table.colnames]
        if missing:
            raise InputError(
                f"table '{path}' lacks column(s) {', '.join(missing)}: delete it and rerun the stage that made it"
            )
    if len(inj) == 0:
        log.warning("injection table '%s' is empty: no source to match", injected_path)
    if len(cands) == 0:
        log.warning("candidate table '%s' is empty: every injected source is undetected", candidates_path)
    cats = [read_catalogue(p) for p in catalogues]
    per, labels = crossmatch(cands, inj, radius=radius, catalogues=cats)
    matched = np.asarray(labels["match_kind"]) != ""
    kinds = np.full(len(labels), "", dtype=object)
    promoted = np.zeros(len(labels), dtype=bool)
    if truth_path is not None:
        from rbflow import sky

        names = ", ".join(f"'{p}'" for p in (truth_path, reference_truth_path) if p is not None)
        reference = read_table(reference_truth_path) if reference_truth_path is not None else None
        try:
            kinds[:] = truth_kinds(cands, read_table(truth_path), radius=radius, reference=reference)
        except InputError as exc:
            raise InputError(f"truth table(s) {names}: {exc}") from exc
        real = set(sky.REAL_KINDS)
        promoted = ~matched & np.isin(kinds.astype(str), [k for k in TRUTH_MATCHED_KINDS if k in real])
    kinds[matched] = np.asarray(labels["match_kind"])[matched]
    labels["truth_kind"] = kinds.astype(str) if len(kinds) else np.array([], dtype="U1")
    labels["label"][promoted] = "true"
    labels["match_kind"][promoted] = "truth"
    unmatched = labels["match_kind"] == ""
    labels["label"][unmatched] = label_unmatched
    for table in (per, labels):
        table.meta.update(
            {
                "candidates": str(candidates_path),
                "injected": str(injected_path),
                "catalogues": list(map(str, catalogues)),
                "truth": [str(p) for p in (truth_path, reference_truth_path) if p is not None],
            }
        )
    labels.meta["label_unmatched"] = label_unmatched
    if promoted.any():
        log.info("crossmatch: %d unmatched candidates on real truth kinds labelled true", int(promoted.sum()))
    write_table(per, out_table)
    write_dat(per, out_dat)
    write_table(labels, out_per_candidate)
    return per, labels


def _link(src: Path, dst: Path) -> str:
    """Hard-link ``src`` to ``dst`` (copy when linking is impossible); return 'linked' or 'copied'."""
    try:
        os.link(src, dst)
        return "linked"
    except OSError:
        shutil.copy2(src, dst)
        return "copied"


def _refresh(src: Path, dst: Path) -> bool:
    """Replace ``dst`` by ``src`` in place when their contents differ (a rerun of the cutouts stage)."""
    if os.path.samefile(src, dst) or filecmp.cmp(src, dst, shallow=False):
        return False
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    _link(src, tmp)
    os.replace(tmp, dst)
    return True


def _identity(row: Any) -> str:
    """A candidate's identity across reruns: its image and position to 0.1 px."""
    image = str(row["image"]) if "image" in row.colnames else ""
    return f"{image}:{float(row['x']):.1f},{float(row['y']):.1f}"


def _previous_labels(path: Path) -> dict[str, tuple[str, str]] | None:
    """id -> (key, folder rbflow or the person left the file in) of the last labelling, if any."""
    if not path.exists():
        return None
    table = read_table(path)
    if "key" not in table.colnames:
        return None
    return dict(
        zip(
            np.asarray(table["id"]).astype(str),
            zip(np.asarray(table["key"]).astype(str), np.asarray(table["label_auto"]).astype(str)),
        )
    )


@contextlib.contextmanager
def training_lock(training_dir: str | os.PathLike) -> Iterator[None]:
    """Hold the exclusive lock of a training folder (``training_dir/.lock``, ``flock``) for a block.

    :func:`label_cutouts` and the scanning page (:mod:`rbflow.scan`) move files and rewrite
    ``labels.ecsv`` only while holding it, so neither sees the other's work half done.

    Parameters
    ----------
    training_dir : path-like
        Training folder (created if missing).
    """
    training_dir = Path(training_dir)
    training_dir.mkdir(parents=True, exist_ok=True)
    with open(training_dir / ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def label_cutouts(
    per_candidate_paths: Sequence[str | os.PathLike],
    cutout_dirs: Sequence[str | os.PathLike],
    training_dir: str | os.PathLike,
) -> Table:
    """Put every labelled cutout (FITS and PNG) into ``training_dir/{true,false,unsorted}/``.

    A person may move files between the folders, and that choice wins over the automatic label,
    as long as it is a choice about the same candidate. The previous ``labels.ecsv`` records
    where rbflow put each file and the candidate's identity (its image and position to 0.1 px,
    column ``key``). On a new labelling a file found in a folder is

    - kept where it is when the previous labelling put it elsewhere (a person moved it) and the
      candidate is the same; its content is refreshed in place when the cutout was rewritten
      (e.g. a new stamp size);
    - moved to its new automatic label when nobody moved it (the crossmatch may have changed),
      or when the candidate behind the name is another one (an upstream stage was rerun, e.g.
      new injections: candidate ids are per-image numbers), which voids a person's earlier move;
      the voided moves are counted in the log.

    Folders without a previous ``labels.ecsv`` (or one without ``key``) are trusted as they are.
    Files in the label folders that belong to no candidate of this labelling (a rerun with other
    settings made fewer candidates, or other images) are moved to ``training_dir/retired/``
    (:data:`RETIRED`), so that the datacube holds only the current candidates; they are kept there,
    not deleted, and counted in the log.

    Parameters
    ----------
    per_candidate_paths : sequence of path-like
        Per-candidate ECSV tables of :func:`run_crossmatch` (columns id, label; truth_kind optional).
    cutout_dirs : sequence of path-like
        Cutout folders of :func:`rbflow.cutouts.write_cutouts` (each with its manifest).
    training_dir : path-like
        Training folder; ``labels.ecsv`` is written there.

    Returns
    -------
    astropy.table.Table
        id, key (candidate identity), label_auto, label_folder (where the FITS file now is),
        action ('linked', 'copied', 'kept' or 'relabelled'), refreshed (a kept file's content
        was updated from the cutout folder) and truth_kind (of the per-candidate table, ``''`` when
        it has none; a person's move changes the label, never the truth kind).

    Raises
    ------
    InputError
        A label table or cutout manifest is missing or malformed.
    """
    with training_lock(training_dir):
        return _label_cutouts(per_candidate_paths, cutout_dirs, Path(training_dir))


def _label_cutouts(
    per_candidate_paths: Sequence[str | os.PathLike], cutout_dirs: Sequence[str | os.PathLike], training_dir: Path
) -> Table:
    """:func:`label_cutouts` under the training folder's lock."""
    auto: dict[str, str] = {}
    truth_kind: dict[str, str] = {}
    for path in per_candidate_paths:
        table = read_table(path)
        if not {"id", "label"} <= set(table.colnames):
            raise InputError(f"per-candidate table '{path}' lacks columns id/label: rerun the crossmatch stage")
        ids = np.asarray(table["id"]).astype(str)
        auto.update(zip(ids, np.asarray(table["label"]).astype(str)))
        if "truth_kind" in table.colnames:  # per-candidate tables of older rbflow versions have none
            # ECSV reads '' back as masked: fill it
            truth_kind.update(zip(ids, np.asarray(np.ma.filled(table["truth_kind"], "")).astype(str)))
    folders = {lab: training_dir / lab for lab in LABELS}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    present = {lab: {p.name for p in folder.iterdir()} for lab, folder in folders.items()}
    previous = _previous_labels(training_dir / "labels.ecsv")

    rows: list[tuple[str, str, str, str, str, bool, str]] = []
    placed: set[str] = set()  # file names of this labelling's candidates
    unlabelled = voided = 0
    for cdir in map(Path, cutout_dirs):
        manifest = read_table(cdir / MANIFEST)
        for row in manifest:
            cand_id, fname = str(row["id"]), str(row["file"])
            lab = auto.get(cand_id)
            if lab is None:
                unlabelled += 1
                continue
            if lab not in folders:
                raise InputError(f"label {lab!r} of candidate {cand_id} is not one of {', '.join(LABELS)}")
            key = _identity(row)
            files = [fname, Path(fname).with_suffix(".png").name]
            placed.update(files)
            where = next((f for f in LABELS if fname in present[f]), None)
            if where is not None and where != lab and previous is not None:
                before = previous.get(cand_id)
                if before is None or before[0] != key or before[1] == where:
                    voided += before is not None and before[0] != key and before[1] != where
                    for name in files:
                        if name in present[where]:
                            os.replace(folders[where] / name, folders[lab] / name)
                            present[where].discard(name)
                            present[lab].add(name)
                    _refresh(cdir / fname, folders[lab] / fname)
                    if (cdir / files[1]).exists() and files[1] in present[lab]:
                        _refresh(cdir / files[1], folders[lab] / files[1])
                    rows.append((cand_id, key, lab, lab, "relabelled", True, truth_kind.get(cand_id, "")))
                    continue
            if where is not None:
                refreshed = _refresh(cdir / fname, folders[where] / fname)
                if (cdir / files[1]).exists() and (folders[where] / files[1]).exists():
                    _refresh(cdir / files[1], folders[where] / files[1])
                rows.append((cand_id, key, lab, where, "kept", refreshed, truth_kind.get(cand_id, "")))
                continue
            done = _link(cdir / fname, folders[lab] / fname)
            if (cdir / files[1]).exists() and not any(files[1] in present[f] for f in LABELS):
                _link(cdir / files[1], folders[lab] / files[1])
            rows.append((cand_id, key, lab, lab, done, False, truth_kind.get(cand_id, "")))
    retired = _retire_stale(folders, present, placed, training_dir / RETIRED)
    if retired:
        log.warning(
            "%d files of candidates that no longer exist (an upstream stage was rerun with other settings) moved "
            "from the label folders to '%s', so that they leave the training set",
            retired,
            training_dir / RETIRED,
        )
    if voided:
        log.warning(
            "%d files a person had moved now hold other candidates (an upstream stage was rerun): "
            "they follow their new automatic labels; review them again",
            voided,
        )
    if unlabelled:
        log.warning("%d cutouts have no label in the given per-candidate tables and were not placed", unlabelled)
    out = Table(
        rows=rows or None,
        names=("id", "key", "label_auto", "label_folder", "action", "refreshed", "truth_kind"),
        dtype=[str, str, str, str, str, bool, str],
        meta={"made_by": made_by("rbflow.crossmatch.label_cutouts"), "training_dir": str(training_dir)},
    )
    if not rows:
        log.warning("no labelled cutout found for training folder '%s'", training_dir)
    moved = int(np.sum(out["label_auto"] != out["label_folder"]))
    log.info(
        "training folder '%s': %d cutouts (%d kept where they were, %d moved by hand)",
        training_dir,
        len(out),
        int(np.sum(out["action"] == "kept")),
        moved,
    )
    write_table(out, training_dir / "labels.ecsv")
    return out


def _retire_stale(folders: dict[str, Path], present: dict[str, set[str]], placed: set[str], retired: Path) -> int:
    """Move the cutout files (FITS, PNG) of the label folders that belong to no candidate of this
    labelling into ``retired`` (kept, not deleted: a person may have sorted them); returns how many."""
    n = 0
    for lab, folder in folders.items():
        for name in sorted(present[lab] - placed):
            if Path(name).suffix not in (".fits", ".png") or not (folder / name).is_file():
                continue
            retired.mkdir(exist_ok=True)
            os.replace(folder / name, retired / name)
            n += name.endswith(".fits")
    return n


def relabel_digest(training_dir: str | os.PathLike) -> str:
    """Summarise the moves a person made between ``true/`` and ``false/`` since the last labelling.

    Snakemake does not see files moved inside folders; the workflow passes this value as a
    parameter of the datacube rule, so a move reruns it, while a fresh labelling does not.

    Parameters
    ----------
    training_dir : path-like
        Training folder holding ``labels.ecsv`` (written by :func:`label_cutouts`) and the label
        folders.

    Returns
    -------
    str
        ``"auto"`` when the FITS files of ``true/`` and ``false/`` are exactly where the last
        labelling put them (or nothing was labelled yet); otherwise ``"moved:"`` and a SHA-256 of
        the sorted differences, which changes with every further move.
    """
    training_dir = Path(training_dir)
    labels_path = training_dir / "labels.ecsv"
    if not labels_path.exists():
        return "auto"
    placed = read_table(labels_path)
    expected = {
        (str(folder), f"{cand_id}.fits")
        for cand_id, folder in zip(placed["id"], placed["label_folder"])
        if folder in ("true", "false")
    }
    current = {
        (lab, p.name)
        for lab in ("true", "false")
        if (training_dir / lab).is_dir()
        for p in (training_dir / lab).glob("*.fits")
        if not p.name.startswith(".")
    }
    moves = sorted(expected ^ current)
    if not moves:
        return "auto"
    return "moved:" + hashlib.sha256("".join(f"{lab}/{name}\n" for lab, name in moves).encode()).hexdigest()
