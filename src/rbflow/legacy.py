"""The older tool's files: its labelled cutout folders in, its text tables back.

rbflow replaces gmadet's CNN workflow (https://github.com/dcorre/gmadet) and reads what it, and
its successor O'TRAIN (https://github.com/dcorre/otrain), left behind:

* :func:`import_cutouts` turns a labelled folder (``true/`` and ``false/`` of FITS stamps, gmadet's
  ``candidates_training/`` or O'TRAIN's) into a datacube that :func:`rbflow.train.train` accepts.
  gmadet's ``checksim`` writes single-image stamps: the primary image is the difference stamp
  (channel DIFF), the header holds ``CANDID MAG MAGERR FWHM FWHMPSF FILTER RA DEC XPOS YPOS FILE
  EDGE``. O'TRAIN also reads multi-extension files whose image HDUs are named (``DIFF``, possibly
  ``SCI``, ``REF``...), with the keys in the primary header (``FILTER`` possibly in the DIFF HDU's).
* :func:`read_simulated_objects_list`, :func:`read_crossmatch_dat` and
  :func:`read_infer_results_dat` read ``simulated_objects.list``, ``crossmatch.dat`` and
  ``infer_results.dat`` as the older tool's scripts do (``astropy.io.ascii``, commented header),
  whether gmadet or rbflow (:mod:`rbflow.inject`, :func:`rbflow.crossmatch.write_dat`,
  :func:`rbflow.infer.write_infer_dat`) wrote them.

Import decisions
----------------
* Channels: those every stamp has, among rbflow's (:data:`rbflow.cutouts.CHANNELS`, in that order),
  or the ones asked for, in the order asked; the datacube (and so the model) records them.
* Sizes: the older tool's stamps are even (32 or 64 px) and rbflow's models take odd ones, so every
  stamp is cropped around its centre pixel (``H // 2``) to the largest odd size all stamps share
  (or to ``crop``). Stamps cut by the frame edge (header ``EDGE`` true) are skipped, as O'TRAIN
  skips them; a stamp that is not square, or whose planes differ in shape, is an error.
* Pixels: as :func:`rbflow.datacube.build_datacube` does, a stamp with a channel without any finite
  pixel is skipped (logged, listed in the meta's ``skipped``); other NaN pixels become 0 after
  :func:`rbflow.datacube.normalise`. An unreadable file is an error naming it.
* Per-stamp fields: ``ids`` from ``CANDID`` (else the file name), ``mag`` from ``MAG``, ``snr`` from
  ``SNR`` or ``1.0857 / MAGERR``, ``image`` from ``IMAGE`` or the base name of ``FILE``, ``frame``
  from ``FRAME`` or the image; a missing key gives NaN or ''. Without any image name a stamp is its
  own frame (the train/validation/test split is then per stamp; a warning says so). ``FILTER``
  values are summarised in the meta; ``FWHM`` has no datacube field.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import ascii, fits
from astropy.table import Table

from rbflow import __version__
from rbflow.cutouts import CHANNELS
from rbflow.datacube import (
    NORMALISATION,
    balance_classes,
    crop_stamps,
    labelled_files,
    listing_digest,
    normalise,
    write_datacube,
)
from rbflow.errors import InputError
from rbflow.frames import parse_image

__all__ = [
    "FORMATS",
    "import_cutouts",
    "read_legacy_stamp",
    "read_simulated_objects_list",
    "read_crossmatch_dat",
    "read_infer_results_dat",
]

log = logging.getLogger(__name__)

#: Names of the two stamp formats, as recorded in the datacube's meta.
FORMATS = {"single": "older-tool", "mef": "O'TRAIN"}

#: Columns the older tool's scripts use, per file (a file without one of them is refused).
_REQUIRED = {
    "simulated_objects.list": ("filename", "Xpos", "Ypos", "RA", "Dec", "mag"),
    "crossmatch.dat": ("idx", "filename", "RA", "Dec", "mag", "Nmatches", "closest_candID"),
    "infer_results.dat": ("filename", "label0", "label1"),
}

_TRUE = {"TRUE", "T", "Y", "YES", "1"}
_MAGERR_TO_SNR = 2.5 / math.log(10.0)


@dataclass
class _Stamp:
    """One file of an import folder, after its header is read."""

    label: int
    path: Path
    header: fits.Header
    shapes: dict[str, tuple[int, ...]]
    fmt: str


def _value(header: fits.Header, key: str, default: Any = None) -> Any:
    value = header.get(key, default)
    return default if value is None or (isinstance(value, str) and not value.strip()) else value


def _float(header: fits.Header, key: str) -> float:
    try:
        return float(_value(header, key, math.nan))
    except (TypeError, ValueError):
        return math.nan


def _open(path: Path) -> fits.HDUList:
    try:
        return fits.open(path, memmap=False)
    except Exception as exc:
        raise InputError(
            f"cutout '{path}' is not a readable FITS file ({type(exc).__name__}: {exc}): remove it from the "
            "folder or replace it"
        ) from exc


def _planes(hdul: fits.HDUList, path: Path) -> tuple[dict[str, fits.ImageHDU | fits.PrimaryHDU], fits.Header, str]:
    """Image HDUs by channel name, the header holding the candidate keys, and the format."""
    if len(hdul) == 1:
        if hdul[0].header.get("NAXIS", 0) != 2:
            raise InputError(
                f"cutout '{path}' is a single-image file with {hdul[0].header.get('NAXIS', 0)} axes: the older "
                "tool's stamps are 2-D difference images; remove it from the folder"
            )
        return {"DIFF": hdul[0]}, hdul[0].header.copy(), FORMATS["single"]
    planes = {h.name.upper(): h for h in hdul[1:] if h.name and h.header.get("NAXIS", 0) == 2}
    if "DIFF" not in planes:
        raise InputError(
            f"cutout '{path}' has HDUs {[h.name for h in hdul]} but no 2-D 'DIFF' image: name the difference "
            "stamp's HDU DIFF, or remove the file from the folder"
        )
    header = hdul[0].header.copy()
    for key in ("CANDID", "MAG", "MAGERR", "SNR", "FILTER", "FWHM", "EDGE", "FILE", "IMAGE", "FRAME"):
        if key not in header and key in planes["DIFF"].header:
            header[key] = planes["DIFF"].header[key]
    return planes, header, FORMATS["mef"]


def _inspect(label: int, path: Path) -> _Stamp:
    with _open(path) as hdul:
        try:
            planes, header, fmt = _planes(hdul, path)
            shapes = {name: tuple(int(n) for n in h.shape) for name, h in planes.items()}
        except InputError:
            raise
        except Exception as exc:
            raise InputError(
                f"cutout '{path}' has a damaged header ({type(exc).__name__}: {exc}): remove it from the folder "
                "or replace it"
            ) from exc
    return _Stamp(label, path, header, shapes, fmt)


def read_legacy_stamp(path: str | os.PathLike, channels: list[str]) -> tuple[np.ndarray, fits.Header]:
    """Read the requested channels of one stamp of the older tool or O'TRAIN.

    Parameters
    ----------
    path : path-like
        Single-image FITS file (channel DIFF) or multi-extension file with named image HDUs.
    channels : list of str
        Channels to stack, in order.

    Returns
    -------
    stamp : numpy.ndarray
        float32 ``(C, H, W)`` raw pixels (NaN where invalid).
    header : astropy.io.fits.Header
        Primary header, completed with the candidate keys found only in the DIFF HDU.

    Raises
    ------
    InputError
        Unreadable or damaged file, a missing channel, or planes of different shapes.
    """
    path = Path(path)
    with _open(path) as hdul:
        try:
            planes, header, _ = _planes(hdul, path)
            missing = [c for c in channels if c not in planes]
            if missing:
                raise InputError(
                    f"cutout '{path}' has no {missing} image (has {sorted(planes)}): remove it from the folder, "
                    f"or import only the channels every file has"
                )
            data = [np.asarray(planes[c].data, dtype=np.float32) for c in channels]
        except InputError:
            raise
        except Exception as exc:
            raise InputError(
                f"cutout '{path}' has damaged data ({type(exc).__name__}: {exc}): remove it from the folder or "
                "replace it"
            ) from exc
    if len({d.shape for d in data}) != 1:
        raise InputError(
            f"cutout '{path}' has planes of shapes {[d.shape for d in data]}: they must be equal; remove it"
        )
    return np.stack(data), header


def _is_edge(header: fits.Header) -> bool:
    return str(_value(header, "EDGE", "False")).strip().upper() in _TRUE


def _choose_channels(stamps: list[_Stamp], channels: list[str] | None, folder: Path) -> list[str]:
    if channels is not None:
        return [str(c).upper() for c in channels]
    common = set.intersection(*(set(s.shapes) for s in stamps))
    chosen = [c for c in CHANNELS if c in common]
    if not chosen:
        raise InputError(f"the stamps of '{folder}' share no channel among {list(CHANNELS)}: pass the channels")
    return chosen


def _stamp_size(stamps: list[_Stamp], channels: list[str], crop: int | None) -> tuple[int, int]:
    """``(cutout size, stamp size)``: the smallest side of the stamps, and the odd size they are cropped to."""
    for s in stamps:
        missing = [c for c in channels if c not in s.shapes]
        if missing:
            raise InputError(
                f"cutout '{s.path}' has no {missing} image (has {sorted(s.shapes)}): remove it from the folder, "
                "or import only the channels every file has"
            )
        shapes = {s.shapes[c] for c in channels}
        if any(len(sh) != 2 or sh[0] != sh[1] for sh in shapes) or len(shapes) > 1:
            raise InputError(
                f"cutout '{s.path}' has planes of shapes {sorted(shapes)}: stamps must be square and equal; "
                "remove it, or set its header EDGE = 'True' if it was cut by the frame edge"
            )
    sizes = sorted({s.shapes[channels[0]][0] for s in stamps})
    smallest = sizes[0]
    size = smallest if smallest % 2 else smallest - 1
    if crop is not None:
        if crop % 2 == 0 or crop > size:
            raise InputError(
                f"crop = {crop} must be odd and <= {size} (the largest odd size the stamps of sizes {sizes} share)"
            )
        size = crop
    if size < 5:
        raise InputError(f"stamps of {smallest} px are too small: the model needs at least 5 px")
    if len(sizes) > 1:
        log.warning("stamps of sizes %s px: all are cropped around their centre to %d px", sizes, size)
    return smallest, size


def import_cutouts(
    folder: str | os.PathLike,
    out_npz: str | os.PathLike,
    *,
    channels: list[str] | None = None,
    crop: int | None = None,
    frac_true: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Convert a labelled folder of the older tool's (or O'TRAIN's) stamps into an rbflow datacube.

    See the module docstring for the decisions (channels, sizes, NaN pixels, header keys).

    Parameters
    ----------
    folder : path-like
        Folder holding ``true/*.fits`` (label 1) and ``false/*.fits`` (label 0).
    out_npz : path-like
        Datacube to write, in the format of :func:`rbflow.datacube.build_datacube`.
    channels : list of str, optional
        Channels to stack, in order; default: those every stamp has, in rbflow's order.
    crop : int, optional
        Odd stamp size to crop to; default: the largest odd size every stamp has.
    frac_true : float, optional
        Fraction of true stamps after randomly dropping stamps of the majority class; None keeps all.
    seed : int, optional
        Seed of the class balancing.

    Returns
    -------
    dict
        The datacube's meta (also stored in the file).

    Raises
    ------
    InputError
        A missing or empty class folder, an unreadable or malformed file, a missing channel, a bad
        ``crop``, or no usable stamp in a class.
    """
    folder = Path(folder)
    files = labelled_files(folder)
    for label, sub in ((1, "true"), (0, "false")):
        if not any(lab == label for lab, _ in files):
            raise InputError(
                f"import folder '{folder / sub}' has no stamp (*.fits): give the folder holding the older tool's "
                "true/ and false/ (e.g. candidates_training/)"
            )
    skipped: dict[str, str] = {}
    stamps = []
    for label, path in files:
        stamp = _inspect(label, path)
        if _is_edge(stamp.header):
            skipped[f"{path.parent.name}/{path.name}"] = "EDGE: cut by the frame edge (skipped, as O'TRAIN does)"
            continue
        stamps.append(stamp)
    if not stamps:
        raise InputError(f"every stamp of '{folder}' has EDGE = True: there is nothing to import")
    channels = _choose_channels(stamps, channels, folder)
    cutout_size, size = _stamp_size(stamps, channels, crop)

    X = np.empty((len(stamps), len(channels), size, size), np.float32)
    y, ids, images, frames, mags, snrs, filters, formats = [], [], [], [], [], [], set(), set()
    own_frame = 0
    for s in stamps:
        data, header = read_legacy_stamp(s.path, channels)
        empty = [c for c, plane in zip(channels, data) if not np.isfinite(plane).any()]
        if empty:
            reason = f"channel(s) {empty} without any finite pixel (NaN-only stamp)"
            log.warning("skipping cutout '%s': %s", s.path, reason)
            skipped[f"{s.path.parent.name}/{s.path.name}"] = reason
            continue
        X[len(y)] = normalise(crop_stamps(data, size))
        image = str(_value(header, "IMAGE", "")) or Path(str(_value(header, "FILE", ""))).stem
        frame = str(_value(header, "FRAME", "")) or (parse_image(image)[0] if image else "")
        if not frame:
            frame = f"{s.path.parent.name}/{s.path.stem}"
            own_frame += 1
        magerr = _float(header, "MAGERR")
        snr = _float(header, "SNR")
        y.append(s.label)
        ids.append(str(_value(header, "CANDID", s.path.stem)))
        images.append(image)
        frames.append(frame)
        mags.append(_float(header, "MAG"))
        snrs.append(snr if math.isfinite(snr) else (_MAGERR_TO_SNR / magerr if magerr > 0 else math.nan))
        filters.add(str(_value(header, "FILTER", "")))
        formats.add(s.fmt)
    if own_frame:
        log.warning(
            "%d stamps of '%s' name no image (header IMAGE, FILE or FRAME): each is its own frame, so the "
            "train/validation/test split is per stamp for them, not per frame",
            own_frame,
            folder,
        )
    y_arr = np.asarray(y, dtype=np.int64)
    for label, sub in ((1, "true"), (0, "false")):
        if not (y_arr == label).any():
            raise InputError(
                f"import folder '{folder / sub}' has no usable stamp ({len(skipped)} skipped, see the log): "
                "fix or replace the stamps"
            )
    keep = (
        np.arange(len(y_arr)) if frac_true is None else balance_classes(y_arr, frac_true, np.random.default_rng(seed))
    )
    fmt = "+".join(sorted(formats))
    counts = {
        "true": int(y_arr[keep].sum()),
        "false": int((y_arr[keep] == 0).sum()),
        "skipped": len(skipped),
        "dropped_by_balance": len(y_arr) - len(keep),
    }
    meta = {
        "cutout_size": cutout_size,
        "stamp_size": size,
        "crop": None if size == cutout_size else size,
        "channels": channels,
        "normalisation": NORMALISATION,
        "counts": counts,
        "frac_true": frac_true,
        "seed": seed,
        "source": f"imported from {folder}, format {fmt}",
        "imported_from": {
            "folder": str(folder),
            "format": fmt,
            "filters": sorted(filters - {""}),
            "stamps_without_frame": own_frame,
        },
        "file_list_sha256": listing_digest(folder),
        "skipped": skipped,
        "rbflow_version": __version__,
    }
    write_datacube(
        out_npz,
        X[: len(y_arr)][keep],
        y_arr[keep],
        ids=np.asarray(ids, dtype=str)[keep],
        image=np.asarray(images, dtype=str)[keep],
        frame=np.asarray(frames, dtype=str)[keep],
        mag=np.asarray(mags, dtype=np.float64)[keep],
        snr=np.asarray(snrs, dtype=np.float64)[keep],
        channels=channels,
        meta=meta,
    )
    log.info(
        "imported %s (%s): %d true, %d false stamps of %s, %d px (%d skipped, %d dropped by balancing) -> %s",
        folder,
        fmt,
        counts["true"],
        counts["false"],
        channels,
        size,
        counts["skipped"],
        counts["dropped_by_balance"],
        out_npz,
    )
    return meta


def _read(path: str | os.PathLike, kind: str) -> Table:
    """Read one of the older tool's tables (commented header, whitespace columns) and check its columns."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{kind} '{path}' does not exist: check the path")
    try:
        table = ascii.read(path, format="commented_header")
    except Exception as exc:
        raise InputError(
            f"{kind} '{path}' is not a whitespace table under a '# name name ...' header ({type(exc).__name__}: "
            f"{exc}): rewrite it with rbflow or the older tool"
        ) from exc
    missing = [c for c in _REQUIRED[kind] if c not in table.colnames]
    if missing:
        raise InputError(
            f"{kind} '{path}' lacks column(s) {missing} (has {table.colnames}): it is not the older tool's "
            f"{kind}; rewrite it with rbflow"
        )
    return table


def read_simulated_objects_list(path: str | os.PathLike) -> Table:
    """Read a ``simulated_objects.list`` as gmadet's ``checksim`` does.

    Parameters
    ----------
    path : path-like
        Written by gmadet's ``sim`` or rbflow's inject stage.

    Returns
    -------
    astropy.table.Table
        gmadet's columns: ``idx filename Xpos Ypos RA Dec mag filter count_ADU`` (the older lists lack
        ``idx``, ``filter`` and ``count_ADU``).

    Raises
    ------
    InputError
        A missing or malformed file, or one without ``filename Xpos Ypos RA Dec mag``.
    """
    return _read(path, "simulated_objects.list")


def read_crossmatch_dat(path: str | os.PathLike) -> Table:
    """Read a ``crossmatch.dat`` as gmadet's ``cnn_checkinfer`` does.

    Parameters
    ----------
    path : path-like
        Written by gmadet's ``checksim`` or :func:`rbflow.crossmatch.write_dat`.

    Returns
    -------
    astropy.table.Table
        The columns of ``simulated_objects.list`` plus ``filename2 Nmatches closest_candID all_candIDs
        edge`` (``None`` where nothing matched); rbflow's files add ``mag_meas`` and ``sep``.

    Raises
    ------
    InputError
        A missing or malformed file, or one without the columns gmadet's scripts use.
    """
    return _read(path, "crossmatch.dat")


def read_infer_results_dat(path: str | os.PathLike) -> Table:
    """Read an ``infer_results.dat`` as gmadet's ``cnn_checkinfer`` and ``filter_candidates`` do.

    gmadet names the candidate id ``candID``, O'TRAIN ``cand_ID``; the table returned has both.

    Parameters
    ----------
    path : path-like
        Written by gmadet's or O'TRAIN's ``cnn_infer``, or :func:`rbflow.infer.write_infer_dat`.

    Returns
    -------
    astropy.table.Table
        ``filename RA Dec originalFile Xpos Ypos mag magerr FWHM FWHMPSF candID cand_ID label0 label1``
        (label0 = P(bogus), label1 = P(real)).

    Raises
    ------
    InputError
        A missing or malformed file, or one without ``filename label0 label1`` and a candidate id.
    """
    table = _read(path, "infer_results.dat")
    ids = [c for c in ("candID", "cand_ID") if c in table.colnames]
    if not ids:
        raise InputError(
            f"infer_results.dat '{path}' has no candidate id column (candID or cand_ID): rewrite it with rbflow"
        )
    for name in ("candID", "cand_ID"):
        if name not in table.colnames:
            table.add_column(table[ids[0]].copy(), name=name, index=table.colnames.index(ids[0]) + 1)
    return table
