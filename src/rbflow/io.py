"""Atomic file writing and validated reading of FITS images and ECSV tables.

Conventions used throughout rbflow
----------------------------------
* Pixel coordinates are 0-based with the centre of the first pixel at (0, 0), as in numpy,
  photutils and ``astropy.wcs.WCS.pixel_to_world``. ``x`` is the column, ``y`` the row.
* Images are float32 in memory and on disk; invalid pixels are NaN.
* Every write goes to a temporary file in the destination folder, then is renamed into place,
  so a reader never sees half a file and a killed job leaves the previous file intact.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import io
import json
import logging
import lzma
import math
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from rbflow import __version__
from rbflow.errors import InputError

if TYPE_CHECKING:
    from astropy.table import Table
    from matplotlib.figure import Figure

__all__ = [
    "atomic_path",
    "made_by",
    "jsonable",
    "write_json",
    "write_figure",
    "file_sha256",
    "write_fits",
    "write_table",
    "read_table",
    "read_image",
    "Image",
]

log = logging.getLogger(__name__)

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    Parameters
    ----------
    path : path-like
        Final destination. Its parent folder is created if needed.

    Yields
    ------
    pathlib.Path
        Temporary file to write to. It is removed if the block raises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs follow the umask like any file
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def made_by(qualname: str) -> str:
    """Provenance stamp of an artefact: the function that made it and the rbflow version.

    Parameters
    ----------
    qualname : str
        Dotted name of the making function, e.g. ``"rbflow.detect.run_detect"``.

    Returns
    -------
    str
        ``"<qualname> <rbflow version>"``, the value of every ``made_by`` entry rbflow writes.
    """
    return f"{qualname} {__version__}"


def jsonable(obj: Any) -> Any:
    """Convert ``obj`` to what strict JSON can hold.

    Non-finite floats become ``None`` (``null``), numpy scalars and arrays become Python
    numbers and lists, tuples become lists; dict keys are kept.

    Parameters
    ----------
    obj : object
        Nested dicts, lists, tuples, numbers, strings, numpy scalars or arrays.

    Returns
    -------
    object
        The same structure with only JSON types.
    """
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` as strict JSON (indent 2, NaN as ``null``), atomically.

    Parameters
    ----------
    obj : object
        Anything :func:`jsonable` accepts.
    path : path-like
        Destination.
    """
    text = json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_figure(fig: Figure, path: str | os.PathLike, *, dpi: int = 100) -> None:
    """Save a matplotlib figure as PNG, atomically.

    Parameters
    ----------
    fig : matplotlib.figure.Figure
        The figure. The caller closes it.
    path : path-like
        Destination (``.png``).
    dpi : int, optional
        Resolution in dots per inch.
    """
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 digest of a file's bytes, read in 1 MiB blocks.

    Parameters
    ----------
    path : path-like
        The file.

    Returns
    -------
    str
        Hexadecimal digest.
    """
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_fits(hdul: fits.HDUList | fits.PrimaryHDU, path: str | os.PathLike) -> None:
    """Write a FITS HDU list atomically, stamping ``RBFLOWV`` into the primary header.

    Parameters
    ----------
    hdul : astropy.io.fits.HDUList or PrimaryHDU
        What to write.
    path : path-like
        Destination.
    """
    if isinstance(hdul, fits.PrimaryHDU):
        hdul = fits.HDUList([hdul])
    hdul[0].header["RBFLOWV"] = (__version__, "rbflow version that wrote this file")
    with atomic_path(path) as tmp:
        hdul.writeto(tmp, overwrite=True, output_verify="silentfix")


def write_table(
    table: Table, path: str | os.PathLike, *, format: str = "ascii.ecsv", formats: dict[str, str] | None = None
) -> None:
    """Write an astropy Table atomically (ECSV by default), stamping the rbflow version in ``meta``.

    Parameters
    ----------
    table : astropy.table.Table
        Table to write. Its ``meta`` should say what made it.
    path : path-like
        Destination.
    format : str, optional
        Any astropy Table writer format.
    formats : dict of str to str, optional
        Column formats (e.g. ``{"RA": "%.8f"}``) for the ASCII writers.
    """
    table.meta.setdefault("rbflow_version", __version__)
    with atomic_path(path) as tmp:
        table.write(tmp, format=format, formats=formats or {}, overwrite=True)


def read_table(path: str | os.PathLike) -> Table:
    """Read an ECSV table written by rbflow, with a clear error when it is missing or broken.

    Parameters
    ----------
    path : path-like
        ECSV file.

    Returns
    -------
    astropy.table.Table

    Raises
    ------
    InputError
        The file is missing or not a readable ECSV table.
    """
    from astropy.table import Table

    path = Path(path)
    if not path.exists():
        raise InputError(f"table '{path}' does not exist: run the stage that makes it first")
    try:
        return Table.read(path, format="ascii.ecsv")
    except Exception as exc:  # astropy raises many types for malformed tables
        raise InputError(
            f"table '{path}' is not a readable ECSV table ({exc}); delete it and rerun the stage that made it"
        ) from exc


class Image:
    """A 2-D frame as rbflow uses it: float32 data (NaN = invalid), header and celestial WCS.

    Parameters
    ----------
    data : numpy.ndarray
        2-D float32 array.
    header : astropy.io.fits.Header
        Header of the HDU the data came from.
    wcs : astropy.wcs.WCS or None
        Celestial WCS, or None when the frame has none.
    path : pathlib.Path or None
        File the image came from (for error messages).
    """

    def __init__(self, data: np.ndarray, header: fits.Header, wcs: WCS | None, path: Path | None = None):
        self.data = data
        self.header = header
        self.wcs = wcs
        self.path = path

    def require_wcs(self) -> WCS:
        """Return the WCS, or raise a clear error naming the file when there is none.

        Raises
        ------
        InputError
            The image has no celestial WCS.
        """
        if self.wcs is None:
            raise InputError(
                f"image '{self.path}' has no celestial WCS (CTYPE1/2, CRVAL, CRPIX, CD or CDELT): "
                "solve its astrometry first (e.g. astrometry.net or SCAMP; 'subtract.refine_astrometry' "
                "only refines an existing WCS)"
            )
        return self.wcs


#: Leading bytes of the whole-file compressions a frame may come in, and how to undo them.
_COMPRESSIONS = ((b"\x1f\x8b", gzip), (b"BZh", bz2), (b"\xfd7zXZ\x00", lzma))

#: Primary-header cards an extension does not inherit (structure, checksums, commentary).
_NOT_INHERITED = frozenset(
    ("SIMPLE", "BITPIX", "EXTEND", "NEXTEND", "INHERIT", "CHECKSUM", "DATASUM", "COMMENT", "HISTORY", "")
)


def _decompressed(raw: bytes) -> bytes:
    """The FITS bytes of a whole file compressed with gzip, bzip2 or xz (found by its leading bytes)."""
    for magic, module in _COMPRESSIONS:
        if raw.startswith(magic):
            return module.decompress(raw)
    return raw


def _hdu_list(hdul: fits.HDUList) -> str:
    """The HDUs of a file as ``index 'NAME' (shape)``, for messages."""
    return ", ".join(
        f"{i} {h.name!r} ({'x'.join(map(str, h.data.shape)) if getattr(h, 'data', None) is not None else 'no data'})"
        for i, h in enumerate(hdul)
    )


def _choose_hdu(hdul: fits.HDUList, hdu: int | str | None, path: Path) -> Any:
    """The HDU holding the frame; see :func:`read_image` for the rules."""
    if hdu is not None and "RBFLOWV" in hdul[0].header and getattr(hdul[0].data, "ndim", 0) == 2:
        return hdul[0]  # a file rbflow wrote (stacked reference, injected image) holds its image there
    if hdu is None:
        return next((h for h in hdul if h.data is not None and getattr(h.data, "ndim", 0) == 2), None)
    try:
        return hdul[hdu]
    except (KeyError, IndexError) as exc:
        raise InputError(
            f"image '{path}' has no HDU {hdu!r} (set by 'frames.hdu' in the telescope file); its HDUs are: "
            f"{_hdu_list(hdul)}: set 'frames.hdu' to the index or EXTNAME of the one holding the pixels"
        ) from exc


def read_image(path: str | os.PathLike, *, hdu: int | str | None = None) -> Image:
    """Read a 2-D image from a FITS file with checks that name the file and the fix.

    The file may be plain FITS, FITS compressed as a whole with gzip (``.fits.gz``), bzip2
    (``.fits.bz2``) or xz (recognised by their leading bytes, whatever the file name), or hold
    tile-compressed image HDUs (``.fits.fz``, fpack, in any extension). When the image comes from
    an extension whose header says ``INHERIT = T``, the primary header's cards that the
    extension lacks are added to its header (the FITS inheritance convention).

    Parameters
    ----------
    path : path-like
        FITS file.
    hdu : int or str, optional
        HDU index or EXTNAME of the frame in files the telescope lists (``frames.hdu``). By
        default, the first HDU holding a 2-D image. A file rbflow wrote (``RBFLOWV`` card in the
        primary header: a stacked reference, an injected image) always holds its image in the
        primary HDU, which is read whatever ``hdu`` says.

    Returns
    -------
    Image
        Data converted to float32 (integers and float64 accepted), header and WCS (or None).

    Raises
    ------
    InputError
        Missing or corrupt file, no such HDU (the message lists the file's HDUs), no 2-D image
        HDU, or all pixels non-finite or constant.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"image '{path}' does not exist: check the frame paths in the telescope file")
    try:
        # read the bytes first: astropy leaves the file handle open when a truncated file fails to parse
        with fits.open(io.BytesIO(_decompressed(path.read_bytes())), memmap=False) as hdul:
            hdul.verify("silentfix")
            chosen = _choose_hdu(hdul, hdu, path)
            if chosen is None or chosen.data is None or chosen.data.ndim != 2:
                raise InputError(
                    f"image '{path}' has no 2-D image HDU"
                    + (f" named {hdu!r}" if hdu is not None else "")
                    + f" (its HDUs: {_hdu_list(hdul)}): give the file holding the frame's pixels"
                    + (
                        ", or set 'frames.hdu' in the telescope file to the HDU that holds them"
                        if hdu is not None
                        else ""
                    )
                )
            data = np.asarray(chosen.data, dtype=np.float32)
            header = chosen.header.copy()
            if chosen is not hdul[0] and header.get("INHERIT") is True:
                for card in hdul[0].header.cards:
                    if card.keyword not in _NOT_INHERITED and card.keyword not in header:
                        header.append(card)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(
            f"image '{path}' is not a readable FITS file ({type(exc).__name__}: {exc}); "
            "it may be truncated: copy it again from the source"
        ) from exc
    finite = np.isfinite(data)
    if not finite.any():
        raise InputError(f"image '{path}' has no finite pixel (all NaN/inf): the frame is empty, remove it")
    if np.ptp(data[finite]) == 0:
        raise InputError(f"image '{path}' is constant ({data[finite][0]}): the frame holds no signal, remove it")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        try:
            wcs = WCS(header, naxis=2)
        except Exception as exc:
            raise InputError(f"image '{path}' has a WCS that astropy cannot parse ({exc}): fix its header") from exc
    wcs = wcs if wcs.has_celestial else None
    return Image(data, header, wcs, path)
