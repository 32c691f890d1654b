"""Survey alert packets: read ZTF and Rubin alerts, score them with an rbflow model, learn from them.

Alert packets are what brokers and most users hold: one Avro record per candidate with its
measurements and three cutouts (science, template, difference), each a small FITS file
(gzip-compressed for ZTF). This module reads them from

* single- and multi-alert Avro files (null, deflate or snappy codec; snappy needs ``cramjam``),
* folders of such files (searched recursively),
* ``.tar.gz`` / ``.tgz`` nightly archives of Avro files, read as a stream (nothing extracted to disk),
* Parquet dumps holding the same nested fields (one row per alert),

and turns each alert into a stamp triplet in rbflow's channel order (:data:`CHANNELS`: SCI, REF,
DIFF) plus one row of identifiers and survey scores (:data:`ALERT_COLUMNS`).

Schemas. ZTF's (``ztf.alert``, any ``schemavsn``) and Rubin's (``lsst.vMAJOR_MINOR.alert``,
:data:`RUBIN_MAJORS`: the versions 7 to 11 that ``lsst-alert-packet`` ships and Rubin serves). The
survey and version are read from the writer schema stored in each Avro file (for Parquet: from the
columns and ``schemavsn``). Rubin's fields map onto ZTF's names: candid = ``diaSourceId``,
objectId = ``diaObjectId`` (``ss`` + ``ssObjectId`` for solar-system sources), jd =
``midpointMjdTai`` + 2400000.5 (TAI), filter = ``band``, magpsf = 31.4 - 2.5 log10 |psfFlux/nJy|,
isdiffpos = ``t`` when ``psfFlux`` >= 0, survey score ``reliability``.

Stamps. Every stamp is placed on a ``size`` x ``size`` grid (63 px, ZTF's cutout size). A ZTF cutout
cut at the CCD edge is smaller than 63 px: it is padded with NaN on the side of the edge (the side
where the candidate's ``xpos``/``ypos`` is within one cutout of the frame's low border, else the
high side), so the candidate sits on the centre pixel as in rbflow's own edge cutouts, and the
``edge`` column is set. Other stamps of another size (Rubin's) are centred (pixel ``h // 2`` on pixel
``size // 2``, the :func:`rbflow.datacube.crop_stamps` convention) and NaN-padded, or centre-cropped
when larger. ZTF also sends full 63-px cutouts at frame edges, with NaN (science, difference) or
-FLT_MAX (template) outside the frame: that sentinel is read as NaN, and ``edge`` is set when a border
row or column of the science stamp is all NaN.

Negative differences (ZTF ``isdiffpos`` = ``f``; Rubin ``psfFlux`` < 0): the difference cutout shows
the candidate as a negative source, whereas rbflow's models see positive transients. ``negative``
selects what is done (:data:`NEGATIVE_POLICIES`): ``flip`` (default) multiplies DIFF by -1 and sets
the ``diff_flipped`` column; ``keep`` leaves the stamps as they are; ``skip`` drops such alerts
(counted in the summary, not scored).

A packet that cannot be read (a broken file, a truncated stream, a missing cutout, a cutout that is
not FITS, an unknown schema) is logged with its file and candid (when known) and skipped; every
such failure is listed in :class:`AlertFailure` records returned alongside the alerts and stored in
the output table's ``meta['failures']``. Nothing is lost silently.

Cutouts are decoded by :func:`read_fits_image`, a small reader of the simple FITS images alerts carry
(header cards + ``numpy.frombuffer``, the layout parsed once per distinct header), a hundred times
faster than ``astropy.io.fits`` on the decompressed bytes (bench/alerts.py) so that gunzip is what
decoding costs, and tested equal to astropy's reading on every development packet. Gunzip is
python-isal's ``isal_zlib`` (Intel ISA-L's inflate: 1.6 times faster than zlib on the cutouts).

Speed. Avro files are memory-mapped and walked block by block (:mod:`rbflow.avro`), each record
decoded by a decoder compiled from the writer schema and its projection on the fields rbflow reads
(nested ``candidate`` / ``diaSource`` included): regular expressions over the binary encoding match
whole runs of fields and each record of the history arrays in one call, 4 times faster than
``fastavro.schemaless_reader`` with the same projection, which reads what they do not match. A writer
schema is parsed and compiled once per distinct schema, so the single-alert files of a nightly archive
read as fast as one multi-alert file. Alerts are decoded 256
at a time into one preallocated array. :func:`score_alerts` with ``workers`` > 1 spreads decoding,
cropping and normalising over worker processes (pieces of about 8 MiB: groups of files or archive
members, runs of blocks of a large Avro file, Parquet row groups) while the calling process infers
and writes, in input order; the table is the same as with one worker. Measured CPU costs per alert
are printed by ``bench/alerts.py``.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import csv
import functools
import importlib.util
import io
import itertools
import json
import logging
import mmap
import os
import re
import sys
import tarfile
import types
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from isal import isal_zlib

from rbflow import __version__
from rbflow.avro import (
    CODECS,
    SYNC_SIZE,
    RecordDecoder,
    blocks,
    codec_of,
    compile_decoder,
    read_header,
    read_long,
)
from rbflow.errors import InputError

if TYPE_CHECKING:
    from astropy.table import Table

__all__ = [
    "CHANNELS",
    "ALERT_SIZE",
    "ALERT_COLUMNS",
    "NEGATIVE_POLICIES",
    "ENGINES",
    "RUBIN_MAJORS",
    "AlertFailure",
    "Alert",
    "read_fits_image",
    "iter_alerts",
    "read_alerts",
    "alerts_table",
    "score_alerts",
    "import_alerts",
]

log = logging.getLogger(__name__)

#: Channel order of the stamps (rbflow's, see :data:`rbflow.cutouts.CHANNELS`, without SCORR).
CHANNELS = ("SCI", "REF", "DIFF")
#: Side (pixels) of the grid every stamp is placed on: ZTF's cutout size.
ALERT_SIZE = 63
#: What to do with negative differences: flip DIFF's sign, keep it, or skip the alert.
NEGATIVE_POLICIES = ("flip", "keep", "skip")
#: Runtimes :func:`score_alerts` infers with: ``auto`` is ONNX Runtime when ``model.onnx`` lies next to
#: ``model.pt`` and ``onnxruntime`` is installed (2 to 3 times faster on CPU, same scores within 1e-7),
#: else torch.
ENGINES = ("auto", "onnx", "torch")
#: Rubin alert schema major versions read (``lsst.v7_x`` ... ``lsst.v11_x``).
RUBIN_MAJORS = (7, 8, 9, 10, 11)
#: Columns of an alert table: (name, dtype, description).
ALERT_COLUMNS: tuple[tuple[str, type, str], ...] = (
    ("source", str, "file (archive:member) the packet came from"),
    ("index", int, "position of the alert in its file"),
    ("survey", str, "ztf or rubin"),
    ("schema", str, "schema name and version, e.g. ztf.alert 4.02 or lsst.v9_0.alert"),
    ("candid", np.int64, "candidate id (Rubin: diaSourceId)"),
    ("objectId", str, "object id (Rubin: diaObjectId, or ss + ssObjectId)"),
    ("ra", float, "right ascension (deg)"),
    ("dec", float, "declination (deg)"),
    ("jd", float, "Julian date of the exposure (d; Rubin: TAI)"),
    ("filter", str, "band"),
    ("magpsf", float, "PSF magnitude of the difference (AB mag)"),
    ("isdiffpos", str, "t: positive difference, f: negative"),
    ("rb", float, "ZTF random-forest real/bogus score (NaN elsewhere)"),
    ("drb", float, "ZTF deep real/bogus score (NaN elsewhere)"),
    ("reliability", float, "Rubin reliability score (NaN elsewhere)"),
    ("edge", bool, "the stamps cross the frame edge: a cutout smaller than the grid (NaN-padded) or a NaN border"),
    ("diff_flipped", bool, "DIFF was multiplied by -1 (negative difference, policy flip)"),
)

_CUTOUT_FIELDS = ("cutoutScience", "cutoutTemplate", "cutoutDifference")
_ZTF_FILTERS = {1: "g", 2: "r", 3: "i"}
_ZTF_CANDIDATE = ("candid", "jd", "fid", "isdiffpos", "ra", "dec", "magpsf", "rb", "drb", "xpos", "ypos")
_RUBIN_SOURCE = (
    "diaSourceId",
    "diaObjectId",
    "ssObjectId",
    "midpointMjdTai",
    "ra",
    "dec",
    "band",
    "psfFlux",
    "reliability",
)
_RUBIN_NAME = re.compile(r"^lsst\.v(\d+)_(\d+)\.alert$")
_FITS_BLOCK = 2880
#: Pixel values at least this large (float32's maximum) are "no data" sentinels, read as NaN.
_NO_DATA = np.finfo(np.float32).max
_BITPIX = {8: np.dtype("u1"), 16: np.dtype(">i2"), 32: np.dtype(">i4"), 64: np.dtype(">i8")}
_BITPIX.update({-32: np.dtype(">f4"), -64: np.dtype(">f8")})
_AVRO_SUFFIXES = (".avro",)
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")
_PARQUET_SUFFIXES = (".parquet", ".parq")


class _PacketError(Exception):
    """One packet cannot be turned into stamps (message: the reason)."""


@dataclass(frozen=True)
class AlertFailure:
    """A packet that was not read, with why.

    Attributes
    ----------
    source : str
        File (``archive:member`` for archives).
    candid : int or None
        Candidate id when it could be read.
    reason : str
        What went wrong.
    """

    source: str
    candid: int | None
    reason: str

    def __str__(self) -> str:
        cand = "" if self.candid is None else f" candid {self.candid}"
        return f"'{self.source}'{cand}: {self.reason}"


@dataclass
class _Container:
    """One Avro or Parquet file the alerts came from (needed to write the kept packets).

    ``data`` holds the bytes of archive members (files are read from ``path``); ``n_records`` counts
    the records read, the kept packets of a single-alert file being its original bytes.
    """

    source: str
    kind: str
    path: Path | None
    data: bytes | None
    n_records: int = 0


@dataclass
class _Piece:
    """What one decoding step reads: a container, or part of one (sent to a worker process).

    ``span``: the blocks from byte ``start`` to ``stop`` of an Avro file, or the row groups ``start``
    to ``stop`` of a Parquet file; None for all of it. ``first`` is the index of the piece's first
    record in its container.
    """

    source: str
    kind: str
    path: Path | None
    data: bytes | None
    span: tuple[int, ...] | None = None
    first: int = 0


@dataclass
class Alert:
    """One decoded alert.

    Attributes
    ----------
    info : dict
        Its row of :data:`ALERT_COLUMNS`.
    stamps : numpy.ndarray
        float32 ``(3, size, size)`` SCI, REF, DIFF raw pixels, NaN outside the cutout.
    """

    info: dict[str, Any]
    stamps: np.ndarray
    container: _Container = field(repr=False)


# --------------------------------------------------------------------------------------------- FITS


def _card_value(card: bytes) -> str:
    return card[10:].split(b"/", 1)[0].strip().decode("ascii", "replace")


def _parse_header(raw: bytes, start: int) -> tuple[dict[str, str], int]:
    """Keyword -> value text of the header starting at ``start``, and the offset of its data."""
    cards: dict[str, str] = {}
    pos = start
    while True:
        if pos + 80 > len(raw):
            raise ValueError("the FITS header has no END card (truncated)")
        card = raw[pos : pos + 80]
        pos += 80
        key = card[:8].rstrip().decode("ascii", "replace")
        if key == "END":
            break
        if card[8:10] == b"= ":
            cards[key] = _card_value(card)
    return cards, start + -(-(pos - start) // _FITS_BLOCK) * _FITS_BLOCK


def read_fits_image(data: bytes) -> np.ndarray:
    """Decode one alert cutout: a (gzip-compressed) FITS file with a 2-D image.

    The image is the primary HDU's, or the first extension's when the primary holds no data (as
    Rubin's cutouts may). Integer images are scaled with ``BSCALE``/``BZERO`` and their ``BLANK``
    pixels set to NaN, as astropy does.

    Parameters
    ----------
    data : bytes
        The cutout bytes (``stampData`` for ZTF), gzip-compressed or plain FITS.

    Returns
    -------
    numpy.ndarray
        Native float32 ``(NAXIS2, NAXIS1)`` array (row = y), as ``astropy.io.fits`` reads it.

    Raises
    ------
    ValueError
        Not gzip or FITS, truncated, or not a 2-D image (the message says which).
    """
    raw, scaling = _fits_data(data)
    return _scaled(raw, scaling)


def _fits_data(data: bytes) -> tuple[np.ndarray, tuple[float, float, int | None] | None]:
    """The pixels of a cutout as stored (a view in the file's byte order), and their integer scaling.

    The scaling is ``(BSCALE, BZERO, BLANK)`` for integer images, None for float images; raises
    ValueError as :func:`read_fits_image` documents.
    """
    if data[:2] == b"\x1f\x8b":
        try:
            data = isal_zlib.decompress(data, 31)  # the gzip member as zlib reads it, 1.6 times faster
        except isal_zlib.error as exc:
            raise ValueError(f"the cutout is not valid gzip ({exc})") from exc
    if not data.startswith(b"SIMPLE  ="):
        raise ValueError(f"the cutout is not a FITS file (starts with {data[:16]!r})")
    # a survey's cutouts share a handful of headers: their layout is parsed once
    first = data[:_FITS_BLOCK]
    layout = _LAYOUTS.get(first)
    if layout is None:
        layout = _image_layout(data)
        if layout[0] == _FITS_BLOCK:  # the layout depends on the first block alone
            if len(_LAYOUTS) > 256:
                _LAYOUTS.clear()
            _LAYOUTS[first] = layout
    offset, shape, dtype, scaling = layout
    count = shape[0] * shape[1]
    if offset + count * dtype.itemsize > len(data):
        raise ValueError(
            f"the cutout's FITS data is truncated ({len(data) - offset} of {count * dtype.itemsize} bytes)"
        )
    return np.frombuffer(data, dtype, count=count, offset=offset).reshape(shape), scaling


def _scaled(raw: np.ndarray, scaling: tuple[float, float, int | None] | None) -> np.ndarray:
    """Native float32 pixels of :func:`_fits_data`'s output (BSCALE, BZERO applied, BLANK set to NaN)."""
    if scaling is None:
        return raw.astype(np.float32)
    bscale, bzero, blank = scaling
    out = raw.astype(np.float64) * bscale + bzero
    if blank is not None:
        out[raw == blank] = np.nan
    return out.astype(np.float32)


_LAYOUTS: dict[bytes, tuple[int, tuple[int, int], np.dtype, tuple[float, float, int | None] | None]] = {}


def _image_layout(data: bytes) -> tuple[int, tuple[int, int], np.dtype, tuple[float, float, int | None] | None]:
    """Data offset, shape, dtype and integer scaling (BSCALE, BZERO, BLANK; None for floats) of a FITS image."""
    cards, offset = _parse_header(data, 0)
    if int(cards.get("NAXIS", "0")) == 0 and offset < len(data):
        cards, offset = _parse_header(data, offset)
    try:
        naxis = int(cards["NAXIS"])
        bitpix = int(cards["BITPIX"])
        shape = (int(cards["NAXIS2"]), int(cards["NAXIS1"])) if naxis == 2 else (0, 0)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"the cutout's FITS header lacks or garbles {exc}") from exc
    if naxis != 2 or bitpix not in _BITPIX:
        raise ValueError(f"the cutout is not a 2-D FITS image (NAXIS = {naxis}, BITPIX = {bitpix})")
    if bitpix < 0:
        return offset, shape, _BITPIX[bitpix], None
    bscale = float(cards.get("BSCALE", "1").replace("D", "E"))
    bzero = float(cards.get("BZERO", "0").replace("D", "E"))
    blank = int(cards["BLANK"]) if "BLANK" in cards else None
    return offset, shape, _BITPIX[bitpix], (bscale, bzero, blank)


# ------------------------------------------------------------------------------------------ schemas


def _survey_of_schema(name: str) -> str:
    """``ztf`` or ``rubin`` from a writer schema's name; raises _PacketError for anything else."""
    if name == "ztf.alert":
        return "ztf"
    match = _RUBIN_NAME.match(name)
    if match:
        if int(match.group(1)) not in RUBIN_MAJORS:
            raise _PacketError(
                f"Rubin alert schema {name} is not read (rbflow reads lsst.v{RUBIN_MAJORS[0]}_x to "
                f"lsst.v{RUBIN_MAJORS[-1]}_x, the versions Rubin serves)"
            )
        return "rubin"
    raise _PacketError(f"unknown alert schema {name!r}: rbflow reads ZTF (ztf.alert) and Rubin (lsst.vN_M.alert)")


def _record_of(schema: Any) -> dict | None:
    """The record schema of a field type (the record itself, or the record in a union)."""
    if isinstance(schema, dict) and schema.get("type") == "record":
        return schema
    if isinstance(schema, list):
        return next((s for s in schema if isinstance(s, dict) and s.get("type") == "record"), None)
    return None


def _projection(writer: dict, survey: str) -> dict | None:
    """Reader schema holding only the fields rbflow uses (the rest is skipped, by the compiled decoder or by fastavro).

    Built from the writer schema itself, so every name resolves; None when the schema has an
    unexpected layout (then the full records are read).
    """
    if survey == "ztf":
        top, sub, subfields = (
            {"schemavsn", "objectId", "candid", "candidate", *_CUTOUT_FIELDS},
            "candidate",
            _ZTF_CANDIDATE,
        )
    else:
        top, sub, subfields = {"diaSourceId", "alertId", "diaSource", *_CUTOUT_FIELDS}, "diaSource", _RUBIN_SOURCE
    proj = copy.deepcopy(writer)
    proj["fields"] = [f for f in proj["fields"] if f["name"] in top]
    for f in proj["fields"]:
        if f["name"] == sub:
            record = _record_of(f["type"])
            if record is None:
                return None
            record["fields"] = [g for g in record["fields"] if g["name"] in subfields]
    names = [f["name"] for f in proj["fields"]]
    if sub not in names or not all(c in names for c in _CUTOUT_FIELDS):
        return None
    return proj


# ---------------------------------------------------------------------------------------- packets


def _num(value: Any) -> float:
    try:
        return float("nan") if value is None else float(value)
    except (TypeError, ValueError):
        return float("nan")


def _candid_of(record: dict) -> int | None:
    for value in (
        record.get("candid"),
        (record.get("diaSource") or {}).get("diaSourceId"),
        record.get("diaSourceId"),
        record.get("alertId"),
    ):
        if value is not None:
            return int(value)
    return None


def _info_ztf(record: dict, schema: str) -> dict[str, Any]:
    cand = record.get("candidate")
    if not cand:
        raise _PacketError("the packet has no 'candidate' record")
    isdiffpos = str(cand.get("isdiffpos", "t")).strip().lower()
    fid = cand.get("fid")
    return {
        "survey": "ztf",
        "schema": f"{schema} {record.get('schemavsn', '')}".strip(),
        "candid": int(record.get("candid") or cand["candid"]),
        "objectId": str(record.get("objectId", "")),
        "ra": _num(cand.get("ra")),
        "dec": _num(cand.get("dec")),
        "jd": _num(cand.get("jd")),
        "filter": _ZTF_FILTERS.get(fid, str(fid)),
        "magpsf": _num(cand.get("magpsf")),
        "isdiffpos": "f" if isdiffpos in ("f", "0") else "t",
        "rb": _num(cand.get("rb")),
        "drb": _num(cand.get("drb")),
        "reliability": float("nan"),
        "_pos": (_num(cand.get("xpos")), _num(cand.get("ypos"))),
    }


def _info_rubin(record: dict, schema: str) -> dict[str, Any]:
    src = record.get("diaSource")
    if not src:
        raise _PacketError("the packet has no 'diaSource' record")
    flux = _num(src.get("psfFlux"))
    obj = src.get("diaObjectId")
    if obj is None and src.get("ssObjectId") is not None:
        obj = f"ss{src['ssObjectId']}"
    with np.errstate(divide="ignore", invalid="ignore"):
        mag = 31.4 - 2.5 * np.log10(abs(flux)) if np.isfinite(flux) and flux != 0 else float("nan")
    return {
        "survey": "rubin",
        "schema": schema,
        "candid": int(src["diaSourceId"]),
        "objectId": "" if obj is None else str(obj),
        "ra": _num(src.get("ra")),
        "dec": _num(src.get("dec")),
        "jd": _num(src.get("midpointMjdTai")) + 2400000.5,
        "filter": str(src.get("band") or ""),
        "magpsf": float(mag),
        "isdiffpos": "f" if flux < 0 else "t",
        "rb": float("nan"),
        "drb": float("nan"),
        "reliability": _num(src.get("reliability")),
        "_pos": (float("nan"), float("nan")),
    }


def _place(stamp: np.ndarray, size: int, pos: tuple[float, float]) -> tuple[np.ndarray, bool]:
    """Put ``stamp`` on a NaN ``size`` x ``size`` grid; True when it was an edge cutout (padded)."""
    h, w = stamp.shape
    if h == size and w == size:
        return stamp, False
    out = np.full((size, size), np.nan, np.float32)
    offsets = []
    for n, p in ((h, pos[1]), (w, pos[0])):
        if n >= size:
            offsets.append((n // 2 - size // 2, 0, size))  # crop: source rows/cols start, dest start, length
        elif np.isfinite(p):
            # an edge cutout: the missing pixels are on the side of the frame border the candidate is near
            offsets.append((0, size - n if p < size else 0, n))
        else:
            offsets.append((0, size // 2 - n // 2, n))
    (sy, dy, ly), (sx, dx, lx) = offsets
    out[dy : dy + ly, dx : dx + lx] = stamp[sy : sy + ly, sx : sx + lx]
    return out, True


def _fill(planes: np.ndarray, record: dict, info: dict, survey: str) -> bool:
    """Decode the three cutouts of ``record`` into ``planes`` (3, size, size); True for a ZTF edge cutout.

    A full-size float cutout is copied straight from the FITS bytes (byte order swapped in the copy);
    others are scaled and placed by :func:`_place`. No-data sentinels are set to NaN by :func:`_finish`.
    """
    size = planes.shape[-1]
    edge = False
    for plane, name, channel in zip(planes, _CUTOUT_FIELDS, CHANNELS):
        cutout = record.get(name)
        blob = cutout.get("stampData") if isinstance(cutout, dict) else cutout
        if not blob:
            raise _PacketError(f"the packet has no {name} ({channel}) cutout")
        try:
            raw, scaling = _fits_data(blob)
        except ValueError as exc:
            raise _PacketError(f"{name}: {exc}") from exc
        if scaling is None and raw.shape == (size, size):
            plane[...] = raw
            continue
        image = _scaled(raw, scaling)
        plane[...], padded = _place(image, size, info["_pos"])
        edge |= padded and survey == "ztf" and min(image.shape) < size
    return edge


def _finish(stamps: np.ndarray, infos: list[dict[str, Any]], edges: list[bool], negative: str) -> np.ndarray:
    """Sentinels to NaN, the ``edge`` and ``diff_flipped`` columns, DIFF flipped: for a chunk of alerts at once."""
    # ZTF's templates mark pixels without data with -FLT_MAX (science and difference use NaN): the
    # planes holding any found by two NaN-ignoring reductions (no temporary array), then replaced
    planes = stamps.reshape(-1, stamps.shape[-2] * stamps.shape[-1])
    hit = (np.fmin.reduce(planes, axis=1) <= -_NO_DATA) | (np.fmax.reduce(planes, axis=1) >= _NO_DATA)
    for i in np.flatnonzero(hit).tolist():
        planes[i][np.abs(planes[i]) >= _NO_DATA] = np.nan
    sci = np.isnan(stamps[:, 0])
    ends = slice(None, None, max(stamps.shape[-1] - 1, 1))  # first and last row or column
    border = (sci[:, ends].all(axis=2).any(axis=1) | sci[:, :, ends].all(axis=1).any(axis=1)).tolist()
    flipped = []
    for i, (info, edge, nan_border) in enumerate(zip(infos, edges, border)):
        info["edge"] = edge or nan_border
        info["diff_flipped"] = negative == "flip" and info["isdiffpos"] == "f"
        if info["diff_flipped"]:
            flipped.append(i)
    if flipped:
        stamps[flipped, 2] = -stamps[flipped, 2]
    return stamps


def _sources(paths: Iterable[str | os.PathLike]) -> Iterator[_Container]:
    """Every Avro/Parquet container under ``paths`` (archive members with their bytes), in order."""
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files = sorted(
                f
                for f in p.rglob("*")
                if f.is_file() and f.name.endswith(_AVRO_SUFFIXES + _ARCHIVE_SUFFIXES + _PARQUET_SUFFIXES)
            )
            if not files:
                log.warning("folder '%s' holds no .avro, .tar.gz or .parquet file", p)
            yield from _sources(files)
        elif not p.exists():
            raise InputError(f"alert input '{p}' does not exist: give Avro files, folders, .tar.gz archives or Parquet")
        elif p.name.endswith(_ARCHIVE_SUFFIXES):
            yield from _archive_members(p)
        elif p.name.endswith(_PARQUET_SUFFIXES):
            yield _Container(str(p), "parquet", p, None)
        else:
            yield _Container(str(p), "avro", p, None)


def _archive_members(path: Path) -> Iterator[_Container]:
    """Avro members of a ``.tar.gz`` read as a stream (one pass, nothing written to disk; ISA-L's gunzip)."""
    from isal import igzip

    try:
        with igzip.open(path, "rb") as gz, tarfile.open(fileobj=gz, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if not member.name.endswith(_AVRO_SUFFIXES):
                    log.info("archive '%s': skipping member %s (not .avro)", path, member.name)
                    continue
                fh = tar.extractfile(member)
                yield _Container(f"{path}:{member.name}", "avro", None, fh.read() if fh is not None else b"")
    except (tarfile.TarError, OSError, EOFError, zlib.error, isal_zlib.error) as exc:
        yield _Container(str(path), "broken-archive", path, str(exc).encode())


# ------------------------------------------------------------------------------------------- Avro

#: schema JSON -> (survey, schema name, parsed writer schema, parsed projection or None, decoder or None)
_SCHEMAS: dict[bytes, tuple[str, str, dict, dict | None, RecordDecoder | None]] = {}


def _avro_schema(meta: dict[bytes, bytes]) -> tuple[str, str, dict, dict | None, RecordDecoder | None]:
    """(survey, schema name, writer schema, projection, decoder) of a header, parsed once per distinct schema.

    The writer schema of a nightly archive's files is the same JSON: parsing it (30 kB for ZTF) once
    instead of per file makes single-alert files as fast to read as one multi-alert file.
    """
    import fastavro

    text = meta.get(b"avro.schema")
    if text is None:
        raise ValueError("the Avro header holds no schema")
    if text not in _SCHEMAS:
        writer = fastavro.parse_schema(json.loads(text))
        name = str(writer.get("name", ""))
        survey = _survey_of_schema(name)
        proj = _projection({k: v for k, v in writer.items() if not k.startswith("__")}, survey)
        reader = None if proj is None else fastavro.parse_schema(proj)
        if len(_SCHEMAS) > 64:
            _SCHEMAS.clear()
        _SCHEMAS[text] = (survey, name, writer, reader, None if reader is None else compile_decoder(writer, reader))
    return _SCHEMAS[text]


def _avro_records(piece: _Piece) -> Iterator[tuple[str, str, dict]]:
    """(survey, schema name, record) of an Avro piece, projected on the fields rbflow uses.

    The object container's blocks are walked by :func:`rbflow.avro.blocks` (sizes and sync
    markers checked) and each record decoded by the schema's compiled decoder
    (:func:`rbflow.avro.compile_decoder`), or by ``fastavro.schemaless_reader`` for schemas it does
    not compile. Files are memory-mapped (not copied into memory), and only the blocks of the
    piece's span are read.
    """
    mapped = None
    if piece.data is not None:
        data: Any = piece.data
    elif piece.path.stat().st_size == 0:
        raise ValueError("the file is empty")
    else:
        with open(piece.path, "rb") as fh:
            data = mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        meta, sync, pos = read_header(data)
        survey, name, writer, reader, decoder = _avro_schema(meta)
        decode = decoder or functools.partial(_fastavro_record, writer, reader)
        codec = codec_of(meta)
        if codec not in CODECS:
            raise _PacketError(f"Avro codec {codec!r} is not read: rbflow reads {', '.join(CODECS)}")
        start, stop = piece.span if piece.span is not None else (pos, None)
        try:
            for count, block in blocks(data, start, sync, stop, codec=codec):
                at = 0
                for _ in range(count):
                    record, at = decode(block, at)
                    yield survey, name, record
                if at != len(block):
                    raise ValueError(f"a block's {count} record(s) do not fill its {len(block)} bytes (corrupt file)")
        except ModuleNotFoundError as exc:  # snappy without cramjam: the same for every packet
            raise _PacketError(str(exc)) from exc
    finally:
        if mapped is not None:
            mapped.close()


def _fastavro_record(writer: dict, reader: dict | None, block: bytes, at: int) -> tuple[dict, int]:
    """The record at offset ``at`` of a block, read by fastavro, and the offset after it."""
    from fastavro import schemaless_reader

    stream = io.BytesIO(block)
    stream.seek(at)
    return schemaless_reader(stream, writer, reader), stream.tell()


def _avro_spans(path: Path, split_bytes: int) -> list[tuple[tuple[int, int], int]] | None:
    """Pieces of about ``split_bytes`` of a large Avro file: ((start, stop) bytes of blocks, first record index).

    Only block headers are read. None when the header cannot be read (the file is then decoded whole,
    which reports why). Whatever cannot be scanned goes into the last piece, whose decoding reports it.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        try:
            _, _, header_end = read_header(fh.read(1 << 20))
        except (ValueError, EOFError):
            return None
        spans: list[tuple[tuple[int, int], int]] = []
        start = pos = header_end
        first = count_in = 0
        while pos < size:
            try:
                count, q = read_long(head := os.pread(fh.fileno(), 20, pos), 0)  # no read-ahead buffer filled
                nbytes, q = read_long(head, q)
            except EOFError:
                break
            if count < 0 or nbytes < 0:
                break
            pos += q + nbytes + SYNC_SIZE
            count_in += count
            if pos - start >= split_bytes:
                spans.append(((start, pos), first))
                first, count_in, start = first + count_in, 0, pos
    if start < size:
        spans.append(((start, size), first))
    return spans


# ---------------------------------------------------------------------------------------- Parquet


def _parquet_layout(names: set[str]) -> tuple[str, str, str, tuple[str, ...], list[str]]:
    """(survey, schema, sub-record, its fields, top-level columns) of a Parquet dump's column names."""
    if "candidate" in names:
        top = ["schemavsn", "objectId", "candid", "candidate", *_CUTOUT_FIELDS]
        return "ztf", "ztf.alert", "candidate", _ZTF_CANDIDATE, [c for c in top if c in names]
    if "diaSource" in names:
        top = ["diaSourceId", "diaSource", *_CUTOUT_FIELDS]
        return "rubin", "lsst.alert (parquet)", "diaSource", _RUBIN_SOURCE, [c for c in top if c in names]
    raise _PacketError(f"Parquet columns {sorted(names)[:8]} are neither ZTF's (candidate) nor Rubin's (diaSource)")


def _parquet_records(piece: _Piece) -> Iterator[tuple[str, str, dict]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(piece.path)
    survey, schema, sub, subfields, columns = _parquet_layout(set(pf.schema_arrow.names))
    groups = None if piece.span is None else list(range(*piece.span))
    for batch in pf.iter_batches(batch_size=1024, columns=columns, row_groups=groups):
        for row in batch.to_pylist():
            row[sub] = {k: v for k, v in (row.get(sub) or {}).items() if k in subfields}
            yield survey, schema, row


def _parquet_spans(path: Path, split_bytes: int) -> list[tuple[tuple[int, int], int]] | None:
    """Row-group pieces of about ``split_bytes`` of a Parquet file: ((start, stop), first row); None if unreadable."""
    import pyarrow.parquet as pq

    try:
        md = pq.ParquetFile(path).metadata
    except Exception:  # pyarrow raises several types for a broken file; decoding it whole reports why
        return None
    spans: list[tuple[tuple[int, int], int]] = []
    start = first = rows = nbytes = 0
    for i in range(md.num_row_groups):
        nbytes += md.row_group(i).total_byte_size
        rows += md.row_group(i).num_rows
        if nbytes >= split_bytes or i == md.num_row_groups - 1:
            spans.append(((start, i + 1), first))
            start, first, nbytes = i + 1, first + rows, 0
            rows = 0
    return spans


# ---------------------------------------------------------------------------------------- decoding


def _pieces(container: _Container, split_bytes: int | None) -> list[_Piece]:
    """The pieces a container is decoded in: itself, or parts of ``split_bytes`` of a large file."""
    whole = [_Piece(container.source, container.kind, container.path, container.data)]
    if split_bytes is None or container.path is None or container.data is not None:
        return whole
    if container.kind == "avro" and container.path.stat().st_size >= 2 * split_bytes:
        spans = _avro_spans(container.path, split_bytes)
    elif container.kind == "parquet":
        spans = _parquet_spans(container.path, split_bytes)
    else:
        return whole
    if not spans:
        return whole
    return [_Piece(container.source, container.kind, container.path, None, span, first) for span, first in spans]


def _decode(
    piece: _Piece, failures: list[tuple[AlertFailure, int]], *, size: int, negative: str, chunk: int = 256
) -> Iterator[tuple[list[dict[str, Any]], np.ndarray, int]]:
    """Decode a piece, ``chunk`` alerts at a time: (their rows, their ``(n, 3, size, size)`` stamps, records read).

    Packets that cannot be read are appended to ``failures`` with their log level (the caller logs
    them). The last item is always yielded, possibly empty, with the piece's final record count.
    """
    # grown as alerts come (a single-alert file needs one plane triplet, not a chunk's 12 MB)
    stamps = np.empty((1, len(CHANNELS), size, size), np.float32)
    infos: list[dict[str, Any]] = []
    edges: list[bool] = []
    n_read = 0
    last: int | None = None

    def fail(candid: int | None, reason: str, level: int = logging.WARNING) -> None:
        failures.append((AlertFailure(piece.source, candid, reason), level))

    try:
        if piece.kind == "broken-archive":
            raise _PacketError(f"the archive cannot be read to its end ({piece.data.decode()})")
        records = _parquet_records(piece) if piece.kind == "parquet" else _avro_records(piece)
        for survey, schema, record in records:
            n_read += 1
            candid = _candid_of(record)
            try:
                info = _info_ztf(record, schema) if survey == "ztf" else _info_rubin(record, schema)
                if negative == "skip" and info["isdiffpos"] == "f":
                    fail(candid, "negative difference (policy 'skip')", logging.INFO)
                    continue
                if len(infos) == len(stamps):
                    stamps = np.concatenate([stamps, np.empty_like(stamps[: min(len(stamps), chunk - len(stamps))])])
                edges.append(_fill(stamps[len(infos)], record, info, survey))
            except (_PacketError, KeyError, TypeError, ValueError) as exc:
                fail(candid, str(exc) if isinstance(exc, _PacketError) else f"{exc!r}")
                continue
            last = info["candid"]
            del info["_pos"]
            info["source"], info["index"] = piece.source, piece.first + n_read - 1
            infos.append(info)
            if len(infos) == chunk:
                yield infos, _finish(stamps, infos, edges, negative), n_read
                stamps = np.empty_like(stamps)  # a full chunk: the next one will be too, most likely
                infos, edges = [], []
    except _PacketError as exc:
        fail(None, str(exc))
    except Exception as exc:  # fastavro/pyarrow raise many types for broken or truncated files
        where = f"after {piece.first + n_read} alert(s)" + (f" (last candid {last})" if last is not None else "")
        fail(None, f"unreadable {where}: {type(exc).__name__}: {exc}")
    yield infos, _finish(stamps[: len(infos)], infos, edges, negative), n_read


def _report(found: list[tuple[AlertFailure, int]], failures: list[AlertFailure]) -> None:
    """Log the failures ``found`` (at their level), move them to ``failures``."""
    for failure, level in found:
        failures.append(failure)
        log.log(level, "skipping alert packet %s", failure)
    found.clear()


def iter_alerts(
    paths: Iterable[str | os.PathLike],
    *,
    failures: list[AlertFailure],
    size: int = ALERT_SIZE,
    negative: str = "flip",
    keep_bytes: bool = False,
) -> Iterator[Alert]:
    """Decode every alert under ``paths``, one at a time.

    Parameters
    ----------
    paths : iterable of path-like
        Avro files, ``.tar.gz`` archives of Avro files, Parquet files, or folders of these.
    failures : list of AlertFailure
        Receives one entry per packet (or unreadable file) skipped; each is also logged.
    size : int, optional
        Side (pixels) of the grid the stamps are placed on (see the module docstring).
    negative : {'flip', 'keep', 'skip'}, optional
        Policy for negative differences (see :data:`NEGATIVE_POLICIES`).
    keep_bytes : bool, optional
        Keep the bytes of archive members, so that the kept packets can be written.

    Yields
    ------
    Alert
        In file order.

    Raises
    ------
    InputError
        A path does not exist, or ``negative`` is not a policy.
    """
    _check_negative(negative)
    for container in _sources(paths):
        found: list[tuple[AlertFailure, int]] = []
        piece = _Piece(container.source, container.kind, container.path, container.data)
        for infos, stamps, n_read in _decode(piece, found, size=size, negative=negative):
            container.n_records = n_read
            _report(found, failures)
            for info, planes in zip(infos, stamps):
                yield Alert(info, planes, container)
        if not keep_bytes:
            container.data = None  # the alerts keep a reference to their container: free the member's bytes


def _check_negative(negative: str) -> None:
    if negative not in NEGATIVE_POLICIES:
        raise InputError(f"negative-difference policy {negative!r} is unknown: use one of {NEGATIVE_POLICIES}")


def read_alerts(
    paths: Iterable[str | os.PathLike], *, size: int = ALERT_SIZE, negative: str = "flip"
) -> tuple[Table, np.ndarray, list[AlertFailure]]:
    """Read every alert under ``paths`` into a table and a stamp array.

    Parameters
    ----------
    paths : iterable of path-like
        As for :func:`iter_alerts`.
    size : int, optional
        Stamp grid side (pixels).
    negative : {'flip', 'keep', 'skip'}, optional
        Policy for negative differences.

    Returns
    -------
    table : astropy.table.Table
        One row per alert read (:data:`ALERT_COLUMNS`).
    stamps : numpy.ndarray
        float32 ``(N, 3, size, size)`` raw SCI, REF, DIFF pixels (NaN outside the cutouts).
    failures : list of AlertFailure
        Packets skipped, with the reason.
    """
    failures: list[AlertFailure] = []
    alerts = list(iter_alerts(paths, failures=failures, size=size, negative=negative))
    stamps = np.stack([a.stamps for a in alerts]) if alerts else np.zeros((0, 3, size, size), np.float32)
    return alerts_table([a.info for a in alerts]), stamps, failures


def alerts_table(rows: list[dict[str, Any]]) -> Table:
    """Typed table of alert rows (:data:`ALERT_COLUMNS`; empty rows give an empty typed table).

    Parameters
    ----------
    rows : list of dict
        The ``info`` of :class:`Alert` objects.

    Returns
    -------
    astropy.table.Table
        Columns in :data:`ALERT_COLUMNS` order, with descriptions.
    """
    return _table(_columns(rows))


def _columns(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """The typed column arrays of alert rows (:data:`ALERT_COLUMNS`)."""
    return {
        name: np.asarray([r[name] for r in rows], dtype=dtype) if rows else np.zeros(0, dtype=dtype)
        for name, dtype, _ in ALERT_COLUMNS
    }


def _table(columns: dict[str, np.ndarray]) -> Table:
    from astropy.table import Table

    table = Table()
    for name, _, desc in ALERT_COLUMNS:
        table[name] = columns[name]
        table[name].description = desc
    return table


# ------------------------------------------------------------------------------------------ scoring


class _KeptWriter:
    """Writes the kept packets of each container: original bytes, or the kept records re-written."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.current: _Container | None = None
        self.indices: list[int] = []
        self.names: set[str] = set()
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, container: _Container, index: int) -> None:
        if container is not self.current:
            self.flush()
            self.current = container
        self.indices.append(index)

    def flush(self) -> None:
        from rbflow.io import atomic_path

        c, indices = self.current, self.indices
        self.current, self.indices = None, []
        if c is None or not indices:
            return
        name = c.source.rsplit(":", 1)[-1] if c.path is None else c.path.name
        name = Path(name).name
        if name in self.names:
            name = f"{len(self.names)}_{name}"
        self.names.add(name)
        with atomic_path(self.folder / name) as tmp:
            if c.kind == "parquet":
                import pyarrow.parquet as pq

                pq.write_table(pq.read_table(c.path).take(indices), tmp)
            elif c.n_records == 1:
                tmp.write_bytes(c.data if c.data is not None else c.path.read_bytes())
            else:
                import fastavro

                data = c.data if c.data is not None else c.path.read_bytes()
                wanted = set(indices)
                reader = fastavro.reader(io.BytesIO(data))
                records = [r for i, r in enumerate(reader) if i in wanted]
                with open(tmp, "wb") as fh:
                    fastavro.writer(fh, fastavro.parse_schema(reader.writer_schema), records, codec=reader.codec)


def _model_size(meta: dict[str, Any], model_path: Path, size: int) -> int:
    """The stamp size the model takes, after checking alerts (``size`` px, SCI/REF/DIFF) can feed it.

    A model needing a channel alerts lack (SCORR) is refused by :func:`rbflow.infer.check_compatible`.
    """
    from rbflow.infer import check_compatible

    stamp = int(meta["stamp_size"])
    if stamp > size:
        raise InputError(
            f"model '{model_path}' takes {stamp}-px stamps, larger than the {size}-px alert cutouts: "
            f"train a model on stamps of at most {size} px (key 'convert.crop')"
        )
    if stamp % 2 == 0:
        raise InputError(f"model '{model_path}' takes even {stamp}-px stamps; alerts are centred on an odd grid")
    check_compatible(meta, list(CHANNELS), stamp, source=f"alerts for model '{model_path}'")
    return stamp


def score_alerts(
    paths: Iterable[str | os.PathLike],
    model_path: str | os.PathLike,
    out_table: str | os.PathLike,
    *,
    kept_dir: str | os.PathLike | None = None,
    threshold: float | None = None,
    negative: str = "flip",
    batch_size: int = 256,
    progress: bool | None = None,
    threads: int | None = None,
    engine: str = "auto",
    workers: int = 1,
) -> Table:
    """P(real) of every alert under ``paths``; one table, and optionally the kept packets.

    The stamps are given in the model's channel order (``model.json``'s ``channels``, any order of
    SCI, REF, DIFF). A model trained on stamps smaller than the 63-px alert grid is applied to the central
    ``stamp_size`` x ``stamp_size`` crop (:func:`rbflow.datacube.crop_stamps`, then
    :func:`rbflow.datacube.normalise`, as a datacube built with ``convert.crop`` is); a model taking
    larger stamps is refused.

    Parameters
    ----------
    paths : iterable of path-like
        Avro files, ``.tar.gz`` archives, Parquet files, folders of these.
    model_path : path-like
        ``model.pt`` (``model.json`` next to it).
    out_table : path-like
        ECSV: :data:`ALERT_COLUMNS`, ``label0`` (P(bogus)), ``label1`` (P(real)), ``kept``;
        ``meta['failures']`` lists the packets skipped.
    kept_dir : path-like, optional
        Folder receiving the kept packets: single-alert files with their original bytes,
        multi-alert Avro files re-written with the kept records only (same schema and codec),
        Parquet files with the kept rows.
    threshold : float, optional
        Keep alerts with ``label1 >= threshold``; default: model.json's suggested threshold.
    negative : {'flip', 'keep', 'skip'}, optional
        Policy for negative differences.
    batch_size : int, optional
        Alerts per forward pass (256: torch's fastest on CPU for the compact network; ONNX Runtime is
        as fast at any size from 256).
    progress : bool, optional
        Show a progress bar (default: when stderr is a terminal).
    threads : int, optional
        CPU threads of the network: torch's operators (``torch.set_num_threads``; default: torch's
        own choice) or ONNX Runtime's intra-op threads (default 1). Decoding runs in one more thread
        beside them.
    engine : {'auto', 'onnx', 'torch'}, optional
        Inference runtime (see :data:`ENGINES`); the table's ``meta['engine']`` says which ran.
    workers : int, optional
        Decoding processes. 1: decoding runs in a thread beside inference, in this process. N > 1: N
        worker processes (``spawn`` start method, safe beside torch's threads) decode pieces of the
        input (groups of files or archive members, runs of blocks of a large Avro file, row groups of
        Parquet), crop and normalise them and, with the ONNX engine, score them (one ONNX Runtime
        thread each; with torch this process infers), while this process writes; the table is the
        same as with 1 (same order; scores within 1e-6: other inference batches).

    Returns
    -------
    astropy.table.Table
        The table written; ``meta['workers']`` says how many decoding processes ran (0: a thread).

    Raises
    ------
    InputError
        Bad model, model larger than the alerts, missing inputs, no alert read at all while some
        failed, an unknown engine, engine ``onnx`` without ``model.onnx`` or ``onnxruntime``, or
        ``workers`` < 1.
    """
    from tqdm import tqdm

    from rbflow.infer import load_model
    from rbflow.io import made_by, write_table

    _check_negative(negative)
    if int(workers) < 1:
        raise InputError(f"workers must be at least 1 (got {workers})")
    if threads is not None:
        import torch

        torch.set_num_threads(int(threads))
    paths = list(paths)
    model_path = Path(model_path)
    model, meta = load_model(model_path)
    stamp = _model_size(meta, model_path, ALERT_SIZE)
    engine, infer = _inference(model, meta, model_path, engine=engine, threads=threads, batch_size=batch_size)
    threshold = float(meta["threshold"] if threshold is None else threshold)
    order = [CHANNELS.index(c) for c in meta["channels"]]  # the model's channel order
    failures: list[AlertFailure] = []
    writer = _KeptWriter(Path(kept_dir)) if kept_dir is not None else None
    columns: list[dict[str, np.ndarray]] = []
    p_real: list[np.ndarray] = []
    pending: list[np.ndarray] = []  # normalised stamps not yet inferred
    owners: list[_Container] = []  # container of each alert not yet inferred
    indices: list[np.ndarray] = []  # their index in it
    # with worker processes and ONNX Runtime, each worker also scores what it decoded (one thread
    # each): only the scores come back, and both cores run the whole chain
    onnx = (str(model_path.with_name("model.onnx")), batch_size) if engine == "onnx" and int(workers) > 1 else None
    task = functools.partial(_score_task, size=ALERT_SIZE, stamp=stamp, order=order, negative=negative, onnx=onnx)

    def take(p: np.ndarray, bar: Any) -> None:
        # the scores of the next len(p) alerts in input order: the table's column and the kept packets
        p_real.append(p)
        if writer is not None:
            index = np.concatenate(indices)
            for k in np.flatnonzero(p >= threshold).tolist():
                writer.add(owners[k], int(index[k]))
            del owners[: len(p)]
            indices[:] = [index[len(p) :]]
        bar.update(len(p))

    def score(bar: Any, *, final: bool) -> None:
        # whole batches only (the rest waits for the next task): the same batches whatever the tasks
        n_pending = sum(len(x) for x in pending)
        n = n_pending if final else n_pending - n_pending % batch_size
        if n == 0:
            return
        X = np.concatenate(pending) if len(pending) > 1 else pending[0]
        pending[:] = [X[n:]] if n < n_pending else []
        take(infer(X[:n]), bar)

    processes, results = _run_tasks(_tasks(paths, keep_bytes=writer is not None), task, int(workers))
    bar = tqdm(unit="alert", disable=(None if progress is None else not progress), desc="alerts")
    with bar, contextlib.closing(results):  # an error here stops the decoding thread or processes at once
        for pieces, (counts, cols, out) in results:
            for (container, _), (n_read, found, n_alerts) in zip(pieces, counts):
                container.n_records += n_read
                _report(found, failures)
                owners.extend([container] * (n_alerts if writer is not None else 0))
            columns.append(cols)
            if writer is not None:
                indices.append(cols["index"])
            if out.ndim == 1:  # P(real), scored where it was decoded
                take(out, bar)
            else:
                pending.append(out)
                score(bar, final=False)
        score(bar, final=True)
    if writer is not None:
        writer.flush()
    rows = {name: np.concatenate([c[name] for c in columns]) for name in columns[0]} if columns else _columns([])
    if not len(rows["candid"]) and failures:
        raise InputError(
            f"no alert could be read from {[str(p) for p in paths]} ({len(failures)} failure(s), first: {failures[0]})"
        )
    if not len(rows["candid"]):
        log.warning("no alert packet under %s: writing an empty table", [str(p) for p in paths])
    table = _table(rows)
    p = np.concatenate(p_real) if p_real else np.zeros(0)
    table["label0"] = 1.0 - p
    table["label1"] = p
    table["kept"] = p >= threshold
    table.meta.update(
        {
            "made_by": made_by("rbflow.alerts.score_alerts"),
            "model": str(model_path),
            "threshold": threshold,
            "temperature": meta.get("temperature", 1.0),
            "stamp_size": stamp,
            "crop": f"central {stamp} px of the {ALERT_SIZE}-px alert grid" if stamp < ALERT_SIZE else None,
            "negative": negative,
            "engine": engine,
            "workers": processes,
            "columns": "label0 = P(bogus), label1 = P(real), calibrated; kept = label1 >= threshold",
            "kept_dir": None if kept_dir is None else str(kept_dir),
            "n_failures": len(failures),
            "failures": [{"source": f.source, "candid": f.candid, "reason": f.reason} for f in failures],
        }
    )
    write_table(table, out_table)
    _summary(len(table), int(table["kept"].sum()), threshold, failures)
    return table


def _inference(
    model: Any, meta: dict[str, Any], model_path: Path, *, engine: str, threads: int | None, batch_size: int
) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    """The engine that runs (see :data:`ENGINES`) and its function: normalised stamps -> P(real)."""
    from rbflow.infer import predict

    if engine not in ENGINES:
        raise InputError(f"inference engine {engine!r} is unknown: use one of {ENGINES}")
    onnx_path = model_path.with_name("model.onnx")
    if engine == "auto":
        engine = "onnx" if onnx_path.exists() and importlib.util.find_spec("onnxruntime") is not None else "torch"
    if engine == "torch":
        return engine, lambda X: predict(model, meta, X, batch_size=batch_size)
    if not onnx_path.exists():
        raise InputError(
            f"engine 'onnx' needs model.onnx next to '{model_path}' (rbflow train writes it): retrain, or use "
            "engine 'torch'"
        )
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise InputError("engine 'onnx' needs onnxruntime (pip install onnxruntime), or use engine 'torch'") from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1 if threads is None else int(threads)
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def run(X: np.ndarray) -> np.ndarray:
        out = [np.zeros(0)]
        for i in range(0, len(X), batch_size):
            xb = np.ascontiguousarray(X[i : i + batch_size], dtype=np.float32)
            out.append(session.run(["p_real"], {"x": xb})[0].astype(np.float64))
        return np.concatenate(out)

    log.info("scoring with ONNX Runtime (%s)", onnx_path)
    return engine, run


#: Input bytes one decoding task reads (about 180 ZTF alerts); Avro files of twice this or more, and
#: Parquet files, are split into pieces of about this size so that every worker has its share.
_TASK_BYTES = 8 << 20
#: ONNX Runtime sessions of this process by model path (:func:`_onnx_session`: one per worker process).
_SESSIONS: dict[str, Any] = {}


def _tasks(paths: Iterable[str | os.PathLike], *, keep_bytes: bool) -> Iterator[list[tuple[_Container, _Piece]]]:
    """The input in decoding tasks of about :data:`_TASK_BYTES`: lists of (container, piece), in order."""
    task: list[tuple[_Container, _Piece]] = []
    nbytes = 0
    for container in _sources(paths):
        for piece in _pieces(container, _TASK_BYTES):
            task.append((container, piece))
            if piece.data is not None:
                nbytes += len(piece.data)
            elif piece.span is None:
                nbytes += piece.path.stat().st_size
            else:
                nbytes += piece.span[1] - piece.span[0] if piece.kind == "avro" else _TASK_BYTES
            if nbytes >= _TASK_BYTES:
                yield task
                task, nbytes = [], 0
        if not keep_bytes:
            container.data = None  # its piece holds the member's bytes until it is decoded
    if task:
        yield task


def _onnx_session(path: str) -> Any:
    """This process's ONNX Runtime session of ``path`` (one intra-op thread), made on first use."""
    if path not in _SESSIONS:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        _SESSIONS[path] = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return _SESSIONS[path]


def _score_task(
    pieces: list[_Piece], *, size: int, stamp: int, order: list[int], negative: str, onnx: tuple[str, int] | None
) -> tuple[list[tuple[int, list[tuple[AlertFailure, int]], int]], dict[str, np.ndarray], np.ndarray]:
    """Decode, crop and normalise the alerts of some pieces (in a worker process, or a thread).

    Returns, per piece, (records read, failures with their log level, alerts decoded); the alerts'
    columns (:data:`ALERT_COLUMNS`); their normalised ``(n, C, stamp, stamp)`` stamps in the model's
    channel ``order`` or, with ``onnx`` = (model.onnx path, batch size), their P(real) ``(n,)``
    from that model.
    """
    from rbflow.datacube import crop_stamps, normalise

    counts: list[tuple[int, list[tuple[AlertFailure, int]], int]] = []
    infos: list[dict[str, Any]] = []
    parts: list[np.ndarray] = [np.zeros((0, len(order), stamp, stamp), np.float32)]
    for piece in pieces:
        found: list[tuple[AlertFailure, int]] = []
        n_read = n_alerts = 0
        for chunk, stamps, read in _decode(piece, found, size=size, negative=negative):
            n_read = read
            infos.extend(chunk)
            parts.append(crop_stamps(stamps, stamp)[:, order])  # a copy: the chunk's 63-px planes are freed
            n_alerts += len(chunk)
        counts.append((n_read, found, n_alerts))
    X = normalise(np.concatenate(parts))  # once per task (single-alert pieces)
    if onnx is None:
        return counts, _columns(infos), X
    session, batch = _onnx_session(onnx[0]), onnx[1]
    p = [np.zeros(0)] + [
        session.run(["p_real"], {"x": X[i : i + batch]})[0].astype(np.float64) for i in range(0, len(X), batch)
    ]
    return counts, _columns(infos), np.concatenate(p)


def _run_tasks(
    tasks: Iterator[list[tuple[_Container, _Piece]]], func: Callable[[list[_Piece]], Any], workers: int
) -> tuple[int, Iterator[tuple[list[tuple[_Container, _Piece]], Any]]]:
    """The decoding processes used, and ``(task, func(its pieces))`` for every task, in order.

    With one worker (or a single task) ``func`` runs in a thread of this process (:func:`_prefetch`;
    0 processes); otherwise in ``workers`` processes started with ``spawn`` (a fresh interpreter: no
    torch thread pool or lock inherited), at most ``2 * workers + 1`` tasks in flight.
    """
    head = list(itertools.islice(tasks, 2))
    tasks = itertools.chain(head, tasks)
    if workers == 1 or len(head) < 2:
        return 0, _prefetch((task, func([piece for _, piece in task])) for task in tasks)
    return workers, _in_pool(tasks, func, workers)


def _in_pool(
    tasks: Iterator[list[tuple[_Container, _Piece]]], func: Callable[[list[_Piece]], Any], workers: int
) -> Iterator[tuple[list[tuple[_Container, _Piece]], Any]]:
    """``(task, func(its pieces))`` computed by ``workers`` spawned processes, in order; leaving early stops them."""
    import multiprocessing

    # spawn re-runs the caller's main module in every worker: an unguarded script would run again,
    # and its imports (torch) be paid per worker. The workers run rbflow code only: started without it.
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        pool = multiprocessing.get_context("spawn").Pool(workers)
    finally:
        sys.modules["__main__"] = main
    flight: collections.deque = collections.deque()
    try:
        for task in tasks:
            flight.append((task, pool.apply_async(func, ([piece for _, piece in task],))))
            if len(flight) > 2 * workers:
                done, result = flight.popleft()
                yield done, result.get()
        while flight:
            done, result = flight.popleft()
            yield done, result.get()
    finally:
        pool.terminate()  # every result was fetched, or the caller stopped: nothing left to wait for
        pool.join()


def _prefetch(items: Iterator[Any], *, depth: int = 2) -> Iterator[Any]:
    """Yield ``items`` computed ``depth`` ahead by a background thread.

    Reading alerts (fastavro, Python) and inferring (torch, outside the GIL) then share two cores:
    inflating the cutouts (ISA-L) and the network's kernels release the GIL, so decoding the next batch runs
    while the current one is scored. An error in the thread is raised here; leaving the loop early
    stops the thread.
    """
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(end)
        except BaseException as exc:  # handed to the consumer, raised there
            put(exc)

    thread = threading.Thread(target=work, name="rbflow-alerts-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is end:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def _summary(n: int, kept: int, threshold: float, failures: list[AlertFailure]) -> None:
    log.info("%d alerts scored, %d with P(real) >= %.3f", n, kept, threshold)
    if failures:
        log.warning("%d packet(s) skipped:\n  %s", len(failures), "\n  ".join(str(f) for f in failures))


# ------------------------------------------------------------------------------------------ import


def _csv_labels(path: Path) -> dict[int, int]:
    """candid -> label (1 real, 0 bogus) from a CSV with columns candid and label."""
    words = {"1": 1, "0": 0, "real": 1, "bogus": 0, "true": 1, "false": 0, "t": 1, "f": 0}
    labels: dict[int, int] = {}
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or not {"candid", "label"} <= set(reader.fieldnames):
                raise InputError(f"labels file '{path}' needs columns 'candid' and 'label' (has {reader.fieldnames})")
            for line, row in enumerate(reader, start=2):
                label = words.get(str(row["label"]).strip().lower())
                if label is None:
                    raise InputError(
                        f"labels file '{path}' line {line}: label {row['label']!r} is not 1/0, real/bogus or true/false"
                    )
                labels[int(row["candid"])] = label
    except OSError as exc:
        raise InputError(f"labels file '{path}' cannot be read ({exc})") from exc
    return labels


def import_alerts(
    paths: Iterable[str | os.PathLike],
    out_npz: str | os.PathLike,
    *,
    labels_csv: str | os.PathLike | None = None,
    score_column: str | None = None,
    bogus_below: float | None = None,
    real_above: float | None = None,
    crop: int | None = None,
    negative: str = "flip",
) -> dict[str, Any]:
    """Build a datacube (:mod:`rbflow.datacube`'s ``.npz`` contract) from labelled alert packets.

    Labels come from a CSV (``candid``, ``label``) or from a survey score (weak labels):
    ``score < bogus_below`` is bogus, ``score > real_above`` real, anything between is left out.
    The cube's ``frame`` array holds each stamp's objectId, the unit :func:`rbflow.train.train`
    splits by, so one object never sits on both sides of a split (``meta['group_by']``).

    Parameters
    ----------
    paths : iterable of path-like
        Alert inputs, as for :func:`iter_alerts`.
    out_npz : path-like
        Datacube to write (atomically).
    labels_csv : path-like, optional
        CSV of candid, label (1/0, real/bogus, true/false); alerts not in it are left out.
    score_column : str, optional
        Column of :data:`ALERT_COLUMNS` holding the survey score (``drb``, ``rb``, ``reliability``).
    bogus_below, real_above : float, optional
        Thresholds on ``score_column``.
    crop : int, optional
        Odd stamp size to crop to (default: the 63-px alert grid).
    negative : {'flip', 'keep', 'skip'}, optional
        Policy for negative differences.

    Returns
    -------
    dict
        The datacube's meta.

    Raises
    ------
    InputError
        Neither or both label sources, a bad CSV or score column, a bad crop, or a class without stamps.
    """
    from rbflow.datacube import NORMALISATION, crop_stamps, normalise, write_datacube
    from rbflow.io import made_by

    paths = list(paths)
    if (labels_csv is None) == (score_column is None):
        raise InputError("give labels either from a CSV (--labels) or from a score column (--score-column), not both")
    score_names = [n for n, t, _ in ALERT_COLUMNS if t is float and n not in ("ra", "dec", "jd", "magpsf")]
    if score_column is not None:
        if score_column not in score_names:
            raise InputError(f"score column {score_column!r} is not one of {score_names}")
        if bogus_below is None or real_above is None or not bogus_below <= real_above:
            raise InputError(
                "--bogus-below and --real-above are both needed with --score-column, bogus-below <= real-above"
            )
    if crop is not None and (crop % 2 == 0 or not 5 <= crop <= ALERT_SIZE):
        raise InputError(f"crop {crop} must be odd, between 5 and {ALERT_SIZE} px")
    table, stamps, failures = read_alerts(paths, negative=negative)
    if labels_csv is not None:
        csv_labels = _csv_labels(Path(labels_csv))
        y = np.array([csv_labels.get(int(c), -1) for c in table["candid"]], dtype=np.int64)
        how = {"labels_csv": str(labels_csv)}
    else:
        score = np.asarray(table[score_column], dtype=float)
        y = np.where(score < bogus_below, 0, np.where(score > real_above, 1, -1)).astype(np.int64)
        how = {"score_column": score_column, "bogus_below": bogus_below, "real_above": real_above}
    keep = y >= 0
    table, stamps, y = table[keep], stamps[keep], y[keep]
    for label, word in ((1, "real"), (0, "bogus")):
        if not (y == label).any():
            raise InputError(
                f"no alert of {list(map(str, paths))} is labelled {word} ({how}): label some or move the thresholds"
            )
    if crop is not None:
        stamps = crop_stamps(stamps, crop)
    X = normalise(stamps)
    meta = {
        "cutout_size": ALERT_SIZE,
        "stamp_size": int(X.shape[-1]),
        "crop": crop,
        "channels": list(CHANNELS),
        "normalisation": NORMALISATION,
        "counts": {
            "true": int(y.sum()),
            "false": int((y == 0).sum()),
            "unlabelled": int((~keep).sum()),
            "skipped": len(failures),
        },
        "labels": how,
        "negative": negative,
        "group_by": "objectId (stored in 'frame': rbflow.train splits by it, so an object is on one side only)",
        "n_objects": int(len(np.unique(table["objectId"]))),
        "source": [str(p) for p in paths],
        "skipped": {f"{f.source} {f.candid}": f.reason for f in failures},
        "made_by": made_by("rbflow.alerts.import_alerts"),
        "rbflow_version": __version__,
    }
    write_datacube(
        out_npz,
        X,
        y,
        ids=np.asarray(table["candid"]).astype(str),
        image=np.asarray(table["source"], dtype=str),
        frame=np.asarray(table["objectId"], dtype=str),
        mag=np.asarray(table["magpsf"], dtype=np.float64),
        snr=np.full(len(table), np.nan),
        channels=list(CHANNELS),
        meta=meta,
    )
    log.info(
        "datacube %s: %d real, %d bogus alerts of %d objects (%d unlabelled left out, %d skipped)",
        out_npz,
        meta["counts"]["true"],
        meta["counts"]["false"],
        meta["n_objects"],
        meta["counts"]["unlabelled"],
        len(failures),
    )
    return meta


# ---------------------------------------------------------------------------------------------- CLI
