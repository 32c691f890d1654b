"""Candidate stamps: one small multi-extension FITS file (and a PNG preview) per candidate.

Each candidate of a detection table gets ``{id}.fits`` holding square stamps of the science,
aligned reference, difference and Scorr images of the subtraction MEF, centred on the pixel
nearest the candidate's sub-pixel position, and ``{id}.png``, the four stamps side by side.
Stamps that cross the frame edge are padded with NaN and get the EDGE flag bit; no candidate is
dropped. The folder also holds ``cutouts.ecsv``, the candidate table with the updated flags and
the file names.

Thousands of stamps are written per frame, so the FITS files are assembled directly from
pre-formatted header cards (standard FITS, read back by :func:`read_cutout` or any FITS reader)
and the previews are written with Pillow (a dependency of matplotlib) without a figure.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS, FITSFixedWarning

from rbflow import __version__
from rbflow.errors import InputError
from rbflow.frames import parse_image
from rbflow.io import made_by, read_table

__all__ = ["CHANNELS", "EDGE", "MANIFEST", "write_cutouts", "read_cutout", "preview"]

log = logging.getLogger(__name__)

#: Image HDUs of every cutout file, in order.
CHANNELS = ("SCI", "REF", "DIFF", "SCORR")
#: Candidate flag bit: the stamp crosses the frame edge (same value as ``rbflow.detect.FLAGS``).
EDGE = 1
#: File name of the manifest inside a cutout folder.
MANIFEST = "cutouts.ecsv"

_REQUIRED = ("id", "image", "x", "y", "ra", "dec", "mag", "mag_err", "snr", "fwhm", "flags")
_BLOCK = 2880
#: Upscaling factor of the PNG previews (pixels per stamp pixel).
_PNG_ZOOM = 3


def _format_value(value: object) -> str | None:
    """Fixed-format FITS value string (right-justified to 20), or None to let astropy format it."""
    if value is None:
        return " " * 20
    if isinstance(value, (bool, np.bool_)):
        return f"{'T' if value else 'F':>20}"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):>20d}"
    if isinstance(value, (float, np.floating)):
        if not np.isfinite(value):
            return " " * 20  # FITS has no NaN: an undefined value
        text = repr(float(value)).upper()
        digits = 16
        while len(text) > 20:
            digits -= 1
            text = f"{float(value):.{digits}G}"
        if "." not in text and "E" not in text:
            text += ".0"
        return f"{text:>20}"
    if isinstance(value, str) and len(value) <= 66 and value.isascii() and value.isprintable():
        return f"{chr(39) + f'{value.replace(chr(39), chr(39) * 2):<8}' + chr(39):<20}"
    return None


def _card(key: str, value: object, comment: str = "") -> bytes:
    """One 80-byte header card; non-finite floats become an undefined value.

    Formatted here rather than by :class:`astropy.io.fits.Card` (ten times slower) for the plain
    values cutouts need; anything else (long strings) falls back to astropy.
    """
    text = _format_value(value)
    if text is None:
        return fits.Card(key, value, comment).image.encode("ascii")
    card = f"{key:<8}= {text}"
    if comment:
        card += f" / {comment}"
    return card[:80].ljust(80).encode("ascii")


def _header(cards: list[bytes]) -> bytes:
    """Header bytes: cards, END, padded with blanks to a whole FITS block."""
    raw = b"".join(cards) + b"END".ljust(80)
    return raw + b" " * (-len(raw) % _BLOCK)


def _data(stamp: np.ndarray) -> bytes:
    """Big-endian float32 data bytes padded with zeros to a whole FITS block."""
    raw = stamp.astype(">f4").tobytes()
    return raw + b"\0" * (-len(raw) % _BLOCK)


def _wcs_cards(header: fits.Header) -> tuple[list[bytes], tuple[float, float] | None]:
    """Pre-formatted celestial WCS cards of ``header`` without CRPIX, and CRPIX1/2 (None: no WCS)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        wcs = WCS(header, naxis=2)
    if not wcs.has_celestial:
        return [], None
    whdr = wcs.to_header(relax=True)
    cards = [
        _card(k, whdr[k], whdr.comments[k])
        for k in whdr
        if k not in ("CRPIX1", "CRPIX2") and not k.startswith(("DATE", "MJD"))
    ]
    return cards, (float(whdr["CRPIX1"]), float(whdr["CRPIX2"]))


def _load_mef(path: Path) -> tuple[dict[str, np.ndarray], fits.Header, fits.Header]:
    """Read the four channels once as native float32 arrays, with the primary and SCI headers."""
    if not path.exists():
        raise InputError(f"subtraction file '{path}' does not exist: run the subtract stage first")
    try:
        with fits.open(path, memmap=True) as hdul:
            names = {h.name for h in hdul}
            missing = [c for c in CHANNELS if c not in names]
            if missing:
                raise InputError(
                    f"subtraction file '{path}' lacks HDU(s) {', '.join(missing)}: "
                    "delete it and rerun the subtract stage"
                )
            shape = hdul["SCI"].data.shape
            planes = {}
            for name in CHANNELS:
                data = hdul[name].data
                if data is None or data.shape != shape:
                    raise InputError(
                        f"subtraction file '{path}': HDU {name} is not a 2-D image of shape {shape}: "
                        "delete it and rerun the subtract stage"
                    )
                planes[name] = np.asarray(data, dtype=np.float32)
            return planes, hdul[0].header.copy(), hdul["SCI"].header.copy()
    except InputError:
        raise
    except Exception as exc:
        raise InputError(
            f"subtraction file '{path}' is not a readable FITS file ({type(exc).__name__}: {exc}); "
            "delete it and rerun the subtract stage"
        ) from exc


def _scale(stamp: np.ndarray, *, symmetric: bool) -> np.ndarray:
    """Map a stamp to [0, 1]: asinh stretch for images, linear symmetric about 0 for differences."""
    finite = stamp[np.isfinite(stamp)]
    if finite.size == 0:
        return np.zeros(stamp.shape, dtype=np.float32)
    if symmetric:
        lim = float(np.max(np.abs(finite))) or 1.0
        out = 0.5 + 0.5 * stamp / lim
    else:
        lo = float(np.median(finite))
        hi = float(finite.max())
        span = hi - lo if hi > lo else 1.0
        # asinh stretch with a soft knee at 5 % of the range: faint wings and the peak both visible.
        out = np.arcsinh(np.clip(stamp - lo, 0.0, None) / (0.05 * span)) / np.arcsinh(20.0)
    return np.nan_to_num(np.clip(out, 0.0, 1.0), nan=0.0)


def preview(stamps: dict[str, np.ndarray], path: str | os.PathLike) -> None:
    """Write the stamps side by side as an 8-bit grey PNG (NaN shown black, 1-px white separators).

    SCI and REF are shown with an asinh stretch from the stamp median to its maximum; DIFF and
    SCORR linearly and symmetric about zero (grey = 0), so negative residuals are visible.

    Parameters
    ----------
    stamps : dict of str to numpy.ndarray
        Stamps of equal shape, in display order.
    path : path-like
        Destination PNG.
    """
    parts = []
    for name, stamp in stamps.items():
        if parts:
            parts.append(np.ones((stamp.shape[0], 1), dtype=np.float32))
        parts.append(_scale(stamp, symmetric=name in ("DIFF", "SCORR")))
    # Row 0 of a FITS image is at the bottom: flip so that the preview looks like ds9.
    img = (np.hstack(parts)[::-1] * 255.0 + 0.5).astype(np.uint8)
    img = np.repeat(np.repeat(img, _PNG_ZOOM, axis=0), _PNG_ZOOM, axis=1)
    from PIL import Image as PILImage

    PILImage.fromarray(img).save(path, format="PNG", compress_level=1)


def _check_candidates(cands: Table, path: Path) -> None:
    missing = [c for c in _REQUIRED if c not in cands.colnames]
    if missing:
        raise InputError(
            f"candidate table '{path}' lacks column(s) {', '.join(missing)}: delete it and rerun the detect stage"
        )
    if len(cands) and not (np.all(np.isfinite(cands["x"])) and np.all(np.isfinite(cands["y"]))):
        raise InputError(f"candidate table '{path}' has non-finite x/y: delete it and rerun the detect stage")


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Rename the finished folder ``tmp`` onto ``out_dir``, replacing any previous one."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old)


def write_cutouts(
    subtract_path: str | os.PathLike,
    candidates_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    size: int,
    png: bool,
    filter: str = "",
) -> Table:
    """Write one stamp file (and preview) per candidate, and the manifest, into ``out_dir``.

    Parameters
    ----------
    subtract_path : path-like
        Subtraction MEF with HDUs SCI, REF, DIFF and SCORR (the science WCS on SCI).
    candidates_path : path-like
        Candidate ECSV table of the detect stage.
    out_dir : path-like
        Folder to create (replaced as a whole: written to a temporary sibling, then renamed).
    size : int
        Stamp side (pixels, odd, >= 3).
    png : bool
        Also write ``{id}.png`` previews.
    filter : str, optional
        Filter written to the FILTER card; by default the FILTER card of the MEF (SCI, then primary).

    Returns
    -------
    astropy.table.Table
        The manifest: the candidate columns (EDGE bit added to ``flags`` where the stamp crosses
        the frame edge), ``xpix0``, ``ypix0`` (frame pixel of stamp [0, 0]) and ``file``.

    Raises
    ------
    InputError
        Missing or malformed subtraction file or candidate table.
    ValueError
        ``size`` is even or smaller than 3.
    """
    if size < 3 or size % 2 == 0:
        raise ValueError(f"cutout size must be odd and >= 3 (pixels), got {size}: set 'cutout.size' to e.g. 31")
    subtract_path, candidates_path, out_dir = Path(subtract_path), Path(candidates_path), Path(out_dir)
    half = size // 2
    cands = read_table(candidates_path)
    _check_candidates(cands, candidates_path)
    manifest = cands.copy(copy_data=True)
    manifest["flags"] = np.asarray(manifest["flags"], dtype=np.int64)
    manifest["xpix0"] = np.zeros(len(cands), dtype=np.int64)
    manifest["ypix0"] = np.zeros(len(cands), dtype=np.int64)
    manifest["file"] = np.array([f"{i}.fits" for i in cands["id"]], dtype=str) if len(cands) else np.array([], "U1")
    manifest.meta.update(
        {
            "made_by": made_by("rbflow.cutouts.write_cutouts"),
            "subtraction": str(subtract_path),
            "candidates": str(candidates_path),
            "size": size,
            "channels": list(CHANNELS),
            "pixels": "0-based; xpix0/ypix0 = frame pixel of stamp [0, 0]",
        }
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
        if len(cands) == 0:
            log.warning("candidate table '%s' is empty: writing an empty cutout folder '%s'", candidates_path, out_dir)
        else:
            _write_stamps(subtract_path, manifest, tmp, half=half, png=png, filter=filter)
        manifest.write(tmp / MANIFEST, format="ascii.ecsv")
        _replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log.info("wrote %d cutouts of %d px to '%s'", len(manifest), size, out_dir)
    return manifest


def _write_stamps(subtract_path: Path, manifest: Table, folder: Path, *, half: int, png: bool, filter: str) -> None:
    """Cut and write every candidate's stamps (updates flags, xpix0, ypix0 of ``manifest`` in place)."""
    planes, primary, sci_header = _load_mef(subtract_path)
    ny, nx = planes["SCI"].shape
    size = 2 * half + 1
    band = filter or str(sci_header.get("FILTER", primary.get("FILTER", ""))).strip()
    wcs_cards, crpix = _wcs_cards(sci_header)
    ext_start = {
        name: [
            _card("XTENSION", "IMAGE", "image extension"),
            _card("BITPIX", -32, "32-bit floats"),
            _card("NAXIS", 2),
            _card("NAXIS1", size),
            _card("NAXIS2", size),
            _card("PCOUNT", 0),
            _card("GCOUNT", 1),
            _card("EXTNAME", name),
        ]
        for name in CHANNELS
    }
    fixed = [
        _card("SIMPLE", True, "conforms to FITS standard"),
        _card("BITPIX", 8),
        _card("NAXIS", 0),
        _card("EXTEND", True),
    ]
    tail = [
        _card("FILTER", band, "filter"),
        _card("FILLVAL", "NaN", "value of stamp pixels outside the frame"),
        _card("SUBFILE", subtract_path.name, "subtraction the stamps come from"),
        _card("RBFLOWV", __version__, "rbflow version that wrote this file"),
    ]
    xs = np.floor(np.asarray(manifest["x"], dtype=float) + 0.5).astype(np.int64)
    ys = np.floor(np.asarray(manifest["y"], dtype=float) + 0.5).astype(np.int64)
    for k, row in enumerate(manifest):
        x0, y0 = int(xs[k]) - half, int(ys[k]) - half
        if x0 < 0 or y0 < 0 or x0 + size > nx or y0 + size > ny:
            row["flags"] |= EDGE
        row["xpix0"], row["ypix0"] = x0, y0
        # Overlap of the stamp with the frame, in frame (f) and stamp (s) pixels.
        fx0, fx1 = max(x0, 0), min(x0 + size, nx)
        fy0, fy1 = max(y0, 0), min(y0 + size, ny)
        stamps = {}
        for name in CHANNELS:
            cut = np.full((size, size), np.nan, dtype=np.float32)
            if fx1 > fx0 and fy1 > fy0:
                cut[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0] = planes[name][fy0:fy1, fx0:fx1]
            stamps[name] = cut
        cards = fixed + [
            _card("ID", str(row["id"]), "candidate id"),
            _card("IMAGE", str(row["image"]), "image (frame or injection realization)"),
            _card("FRAME", parse_image(str(row["image"]))[0], "frame"),
            _card("X", float(row["x"]), "candidate x (0-based frame pixel)"),
            _card("Y", float(row["y"]), "candidate y (0-based frame pixel)"),
            _card("RA", float(row["ra"]), "deg"),
            _card("DEC", float(row["dec"]), "deg"),
            _card("MAG", float(row["mag"]), "candidate magnitude"),
            _card("MAGERR", float(row["mag_err"]), "magnitude error"),
            _card("SNR", float(row["snr"]), "signal-to-noise ratio"),
            _card("FWHM", float(row["fwhm"]), "pixels"),
            _card("FLAGS", int(row["flags"]), "1 EDGE 2 NEG 4 DIP 8 SAT 16 NEARBR 32 STREAK"),
            _card("XPIX0", x0, "frame x of stamp pixel [0, 0] (0-based)"),
            _card("YPIX0", y0, "frame y of stamp pixel [0, 0] (0-based)"),
            *tail,
        ]
        if crpix is not None:
            wcs = [_card("CRPIX1", crpix[0] - x0), _card("CRPIX2", crpix[1] - y0), *wcs_cards]
        else:
            wcs = []
        parts = [_header(cards)]
        for name in CHANNELS:
            parts.append(_header(ext_start[name] + wcs))
            parts.append(_data(stamps[name]))
        (folder / f"{row['id']}.fits").write_bytes(b"".join(parts))
        if png:
            preview(stamps, folder / f"{row['id']}.png")


def read_cutout(path: str | os.PathLike) -> tuple[fits.Header, dict[str, np.ndarray]]:
    """Read a cutout file written by :func:`write_cutouts`.

    Parameters
    ----------
    path : path-like
        ``{id}.fits`` of a cutout folder.

    Returns
    -------
    header : astropy.io.fits.Header
        Primary header (ID, IMAGE, FRAME, X, Y, RA, DEC, MAG, MAGERR, SNR, FILTER, FWHM, FLAGS,
        XPIX0, YPIX0, FILLVAL).
    stamps : dict of str to numpy.ndarray
        Native float32 stamps keyed by channel (SCI, REF, DIFF, SCORR), NaN outside the frame.

    Raises
    ------
    InputError
        The file is missing, unreadable or lacks a channel.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"cutout '{path}' does not exist: rerun the cutouts stage")
    try:
        with fits.open(path, memmap=False) as hdul:
            header = hdul[0].header.copy()
            stamps = {h.name: np.asarray(h.data, dtype=np.float32) for h in hdul[1:] if h.data is not None}
    except Exception as exc:
        raise InputError(
            f"cutout '{path}' is not a readable FITS file ({type(exc).__name__}: {exc}): rerun the cutouts stage"
        ) from exc
    missing = [c for c in CHANNELS if c not in stamps]
    if missing:
        raise InputError(f"cutout '{path}' lacks channel(s) {', '.join(missing)}: rerun the cutouts stage")
    return header, stamps
