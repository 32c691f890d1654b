"""The datacube: labelled cutouts turned into one normalised array for training.

The one normalisation of rbflow, :func:`normalise`, lives here; training and inference both call it,
and its name and parameters (:data:`NORMALISATION`) are stored in the datacube and in ``model.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rbflow import __version__
from rbflow.errors import InputError
from rbflow.frames import parse_image

if TYPE_CHECKING:
    from astropy.io import fits

__all__ = [
    "NORMALISATION",
    "normalise",
    "read_stamp",
    "build_datacube",
    "write_datacube",
    "load_datacube",
    "crop_stamps",
    "listing_digest",
    "labelled_files",
    "balance_classes",
]

log = logging.getLogger(__name__)

#: The normalisation applied to every stamp, per channel: ``clip((x - median) / scale, -clip, clip)``
#: with ``scale = max(1.4826 * MAD, scale_floor)`` over the finite pixels, then NaN -> 0.
NORMALISATION: dict[str, Any] = {"name": "robust_mad", "mad_factor": 1.4826, "scale_floor": 1e-6, "clip": 20.0}


def normalise(x: np.ndarray) -> np.ndarray:
    """Normalise stamps per stamp and per channel, robustly (see :data:`NORMALISATION`).

    Each ``(H, W)`` plane becomes ``clip((x - median) / max(mad_factor * MAD, scale_floor))`` with the
    median and the MAD (median absolute deviation) of its valid (non-NaN) pixels, the median of an
    even count being the mean of the two middle values: the values ``numpy.nanmedian`` gives, computed
    from one sort of every plane (several times faster than ``nanmedian`` on many small planes), and
    without its float32 overflow on planes holding values near +-FLT_MAX (such pixels end at
    +-``clip``).

    Parameters
    ----------
    x : numpy.ndarray
        Stamps, shape ``(..., H, W)`` (e.g. ``(N, C, H, W)`` or ``(C, H, W)``), NaN = invalid pixel.

    Returns
    -------
    numpy.ndarray
        float32 array of the same shape: median 0 and robust sigma 1 per ``(H, W)`` plane, clipped to
        ``+-clip``; invalid pixels and all-invalid planes are 0.
    """
    x = np.asarray(x, dtype=np.float32)
    flat = x.reshape(-1, x.shape[-2] * x.shape[-1])
    out = np.empty(flat.shape, np.float32)
    # in chunks of planes: the temporaries stay a few MB whatever the size of a training set
    for i in range(0, len(flat), _PLANES_PER_CHUNK):
        out[i : i + _PLANES_PER_CHUNK] = _normalise_planes(flat[i : i + _PLANES_PER_CHUNK])
    return out.reshape(x.shape)


_PLANES_PER_CHUNK = 4096


def _normalise_planes(flat: np.ndarray) -> np.ndarray:
    """:func:`normalise` of the rows of a float32 ``(planes, pixels)`` array."""
    # |x - med| and (x - med) / scale beyond float32's range are +-inf (then clipped to +-clip); inf - inf
    # (planes holding infinities) is NaN, an invalid pixel: both defined results, not warnings
    with np.errstate(over="ignore", invalid="ignore"):
        med = _sorted_median(np.sort(flat, axis=1), flat)[:, None]
        dev = np.abs(flat - med)
        mad = _sorted_median(np.sort(dev, axis=1), dev)
        scale = np.maximum(NORMALISATION["mad_factor"] * np.nan_to_num(mad), NORMALISATION["scale_floor"])
        out = np.clip((flat - med) / scale[:, None], -NORMALISATION["clip"], NORMALISATION["clip"])
    out[np.isnan(out)] = 0.0
    return out


def _sorted_median(ordered: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Median of the non-NaN values of each row of ``values``, given the rows sorted (NaN last).

    The mean of the two middle values for an even count is taken in float64 (no overflow), then
    rounded to float32: the float32 value numpy gives, wherever numpy's does not overflow. NaN for
    an all-NaN row.
    """
    n = values.shape[1] - np.count_nonzero(np.isnan(values), axis=1)
    low = np.take_along_axis(ordered, ((n - 1) // 2)[:, None], axis=1)[:, 0]
    high = np.take_along_axis(ordered, (n // 2)[:, None], axis=1)[:, 0]
    return ((low.astype(np.float64) + high) * 0.5).astype(np.float32)


def crop_stamps(x: np.ndarray, size: int) -> np.ndarray:
    """Central crop of ``(..., H, W)`` stamps to ``size`` x ``size`` (odd ``size`` <= H).

    The centre is pixel ``H // 2``: the middle of an odd stamp, and the pixel a source lands on in an
    even stamp cut around it (astropy ``Cutout2D``'s convention, used by the older tool's cutouts).
    """
    h = x.shape[-1]
    lo = h // 2 - size // 2
    return x[..., lo : lo + size, lo : lo + size]


def read_stamp(
    path: str | os.PathLike, channels: list[str], *, require_finite: bool = True
) -> tuple[np.ndarray, fits.Header]:
    """Read the requested channels of one cutout file.

    Parameters
    ----------
    path : path-like
        Cutout FITS file (primary header + image HDUs named after the channels).
    channels : list of str
        EXTNAMEs to stack, in order.
    require_finite : bool, optional
        Refuse a channel without any finite pixel (training); inference accepts it (it normalises to 0).

    Returns
    -------
    stamp : numpy.ndarray
        float32 ``(C, S, S)`` raw pixels (NaN where invalid).
    header : astropy.io.fits.Header
        Primary header (ID, IMAGE, FRAME, X, Y, MAG, SNR...).

    Raises
    ------
    InputError
        Unreadable file, missing channel, non-square/even/unequal stamps, or (``require_finite``) a
        channel without any finite pixel.
    """
    from astropy.io import fits

    path = Path(path)
    try:
        with fits.open(path, memmap=False) as hdul:
            header = hdul[0].header.copy()
            names = [h.name for h in hdul]
            planes = []
            for ch in channels:
                if ch not in names and len(names) == 1:
                    raise InputError(
                        f"cutout '{path}' is a single-image FITS file (the older tool's cutout format), not an "
                        f"rbflow cutout with HDUs {channels}: convert a labelled folder of such files with "
                        "'rbflow import', and classify cutouts made by rbflow (snakemake cutouts)"
                    )
                if ch not in names:
                    raise InputError(
                        f"cutout '{path}' has no {ch} HDU (has {names[1:]}): remake it, or drop {ch} from "
                        "key 'convert.channels' (or use a model trained without it)"
                    )
                planes.append(np.asarray(hdul[ch].data, dtype=np.float32))
    except InputError:
        raise
    except Exception as exc:
        raise InputError(
            f"cutout '{path}' is not a readable FITS file ({type(exc).__name__}: {exc}): remake the cutouts"
        ) from exc
    shapes = {p.shape for p in planes}
    shape = planes[0].shape
    if len(shapes) != 1 or len(shape) != 2 or shape[0] != shape[1] or shape[0] % 2 == 0:
        raise InputError(f"cutout '{path}' has stamps of shapes {sorted(shapes)}: they must be equal, square and odd")
    for ch, p in zip(channels, planes):
        if require_finite and not np.isfinite(p).any():
            raise InputError(f"cutout '{path}': channel {ch} has no finite pixel (NaN-only stamp)")
    return np.stack(planes), header


def _header_float(header: fits.Header, key: str) -> float:
    value = header.get(key)
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def balance_classes(y: np.ndarray, frac_true: float, rng: np.random.Generator) -> np.ndarray:
    """Indices keeping a random subset of the majority class so that the reals make ``frac_true``.

    Parameters
    ----------
    y : numpy.ndarray
        Labels, 1 = real, 0 = bogus (both classes present).
    frac_true : float
        Wanted fraction of reals, in (0, 1).
    rng : numpy.random.Generator
        Draws the subset (seeded by the caller).

    Returns
    -------
    numpy.ndarray
        Sorted indices into ``y``: every stamp of the minority class, a random subset of the other.
    """
    t = np.flatnonzero(y == 1)
    f = np.flatnonzero(y == 0)
    if len(t) / len(y) > frac_true:
        t = rng.choice(t, size=max(1, round(frac_true / (1 - frac_true) * len(f))), replace=False)
    else:
        f = rng.choice(f, size=max(1, round((1 - frac_true) / frac_true * len(t))), replace=False)
    return np.sort(np.concatenate([t, f]))


def labelled_files(training_dir: Path) -> list[tuple[int, Path]]:
    """The labelled cutout files of a training folder: ``true/*.fits`` then ``false/*.fits``, sorted by name.

    Parameters
    ----------
    training_dir : pathlib.Path
        Folder holding ``true/`` and ``false/`` (a missing one counts as empty).

    Returns
    -------
    list of (int, pathlib.Path)
        ``(label, path)`` pairs, label 1 for ``true/``, 0 for ``false/``.
    """
    files: list[tuple[int, Path]] = []
    for label, sub in ((1, "true"), (0, "false")):
        folder = training_dir / sub
        files += [(label, p) for p in (sorted(folder.glob("*.fits")) if folder.is_dir() else [])]
    return files


def listing_digest(training_dir: str | os.PathLike) -> str:
    """SHA-256 of the sorted ``true/`` and ``false/`` file listing of a training folder.

    Recorded in the datacube's meta as provenance: which files, under which label, it was built
    from. (The workflow notices a person's moves through :func:`rbflow.crossmatch.relabel_digest`.)

    Parameters
    ----------
    training_dir : path-like
        Folder holding ``true/`` and ``false/``.

    Returns
    -------
    str
        Hexadecimal digest (stored as ``file_list_sha256`` in the datacube's meta).
    """
    files = labelled_files(Path(training_dir))
    return hashlib.sha256("\n".join(f"{p.parent.name}/{p.name}" for _, p in files).encode()).hexdigest()


def _truth_kinds(labels_path: Path) -> dict[str, str]:
    """Candidate id -> truth kind of a training folder's ``labels.ecsv`` (empty when it has none)."""
    from rbflow.io import read_table

    if not labels_path.exists():
        return {}
    table = read_table(labels_path)
    if not {"id", "truth_kind"} <= set(table.colnames):
        return {}
    # ECSV reads '' back as masked: fill it
    return dict(zip(np.asarray(table["id"]).astype(str), np.asarray(np.ma.filled(table["truth_kind"], "")).astype(str)))


def build_datacube(
    training_dir: str | os.PathLike,
    out_npz: str | os.PathLike,
    *,
    channels: list[str],
    crop: int | None,
    frac_true: float | None,
    seed: int,
) -> dict[str, Any]:
    """Read ``training_dir/true/*.fits`` and ``training_dir/false/*.fits`` into a normalised datacube.

    Files are read one at a time; a bad cutout (unreadable, missing channel, NaN-only channel, shape
    different from the first good cutout) is logged with its reason and skipped. ``unsorted/`` is ignored.
    The truth kind of each stamp (what it sits on in a synthetic sky) comes from the ``truth_kind``
    column of ``training_dir/labels.ecsv`` (:func:`rbflow.crossmatch.label_cutouts`), ``''`` when that
    table or column is missing or the candidate is not in it; the folder still gives the label.

    Parameters
    ----------
    training_dir : path-like
        Folder holding ``true/`` and ``false/`` (the folder is the label).
    out_npz : path-like
        Datacube to write (atomically): arrays X (N, C, H, W) float32 normalised, y (1 = real),
        ids, image, frame, mag, snr, truth_kind, channels and meta (JSON text).
    channels : list of str
        Channels (EXTNAMEs) to stack, in order.
    crop : int or None
        Odd size (pixels) to crop stamps to around their centre; None keeps the cutout size.
    frac_true : float or None
        Fraction of true stamps after randomly dropping stamps of the majority class; None keeps all.
    seed : int
        Seed of the class balancing.

    Returns
    -------
    dict
        The datacube's meta (also stored in the file).

    Raises
    ------
    InputError
        A class folder is missing or has no usable cutout, or ``crop`` is larger than the cutouts.
    """
    training_dir = Path(training_dir)
    channels = [str(c) for c in channels]
    files = labelled_files(training_dir)
    for label, sub in ((1, "true"), (0, "false")):
        if not any(lab == label for lab, _ in files):
            raise InputError(
                f"training folder '{training_dir / sub}' has no cutout (*.fits): label some candidates "
                f"{'real' if label else 'bogus'} (move their cutouts there) or rerun the label stage"
            )
    digest = listing_digest(training_dir)
    kinds = _truth_kinds(training_dir / "labels.ecsv")

    X: np.ndarray | None = None
    size = 0
    y, ids, images, frames, mags, snrs = [], [], [], [], [], []
    skipped: dict[str, str] = {}
    for label, path in files:
        try:
            stamp, header = read_stamp(path, channels)
            if size and stamp.shape[-1] != size:
                raise InputError(f"cutout '{path}' is {stamp.shape[-1]} px wide, the first cutouts are {size} px")
        except InputError as exc:
            log.warning("skipping %s", exc)
            skipped[f"{path.parent.name}/{path.name}"] = str(exc)
            continue
        if X is None:
            size = stamp.shape[-1]
            if crop is not None and (crop > size or crop % 2 == 0):
                raise InputError(
                    f"key 'convert.crop' = {crop} must be odd and <= the cutout size {size} (first cutout '{path}')"
                )
            out_size = size if crop is None else crop
            X = np.empty((len(files), len(channels), out_size, out_size), np.float32)
        if crop is not None:
            stamp = crop_stamps(stamp, crop)
        X[len(y)] = normalise(stamp)
        image = str(header.get("IMAGE", ""))
        y.append(label)
        ids.append(str(header.get("ID", path.stem)))
        images.append(image)
        frames.append(str(header.get("FRAME", "")) or parse_image(image)[0])
        mags.append(_header_float(header, "MAG"))
        snrs.append(_header_float(header, "SNR"))
    y_arr = np.asarray(y, dtype=np.int64)
    for label, sub in ((1, "true"), (0, "false")):
        if not (y_arr == label).any():
            raise InputError(
                f"training folder '{training_dir / sub}' has no usable cutout ({len(skipped)} skipped, see the "
                "log): fix or remake the cutouts"
            )
    keep = np.arange(len(y_arr))
    if frac_true is not None:
        keep = balance_classes(y_arr, frac_true, np.random.default_rng(seed))
    X = X[keep] if frac_true is not None else X[: len(y_arr)]
    y_arr = y_arr[keep]
    counts = {
        "true": int(y_arr.sum()),
        "false": int((y_arr == 0).sum()),
        "skipped": len(skipped),
        "dropped_by_balance": len(y) - len(keep),
    }
    truth_kind = np.asarray([kinds.get(i, "") for i in ids], dtype=str)[keep]
    meta = {
        "cutout_size": size,
        "stamp_size": int(X.shape[-1]),
        "crop": crop,
        "channels": channels,
        "normalisation": NORMALISATION,
        "counts": counts,
        "frac_true": frac_true,
        "seed": seed,
        "source": str(training_dir),
        "file_list_sha256": digest,
        "skipped": skipped,
        "rbflow_version": __version__,
    }
    write_datacube(
        out_npz,
        X,
        y_arr,
        ids=np.asarray(ids, dtype=str)[keep],
        image=np.asarray(images, dtype=str)[keep],
        frame=np.asarray(frames, dtype=str)[keep],
        mag=np.asarray(mags, dtype=np.float64)[keep],
        snr=np.asarray(snrs, dtype=np.float64)[keep],
        truth_kind=truth_kind,
        channels=channels,
        meta=meta,
    )
    log.info(
        "datacube %s: %d true, %d false stamps of %s px (%d skipped, %d dropped by balancing)",
        out_npz,
        counts["true"],
        counts["false"],
        X.shape[1:],
        counts["skipped"],
        counts["dropped_by_balance"],
    )
    return meta


def write_datacube(
    out_npz: str | os.PathLike,
    X: np.ndarray,
    y: np.ndarray,
    *,
    ids: np.ndarray,
    image: np.ndarray,
    frame: np.ndarray,
    mag: np.ndarray,
    snr: np.ndarray,
    channels: list[str],
    meta: dict[str, Any],
    truth_kind: np.ndarray | None = None,
) -> None:
    """Write a datacube ``.npz`` atomically, in the format :func:`load_datacube` reads.

    Parameters
    ----------
    out_npz : path-like
        Destination.
    X : numpy.ndarray
        float32 ``(N, C, H, W)`` normalised stamps.
    y : numpy.ndarray
        int64 ``(N,)`` labels, 1 = real.
    ids, image, frame : numpy.ndarray of str
        Per stamp: candidate id, image and frame (the unit of the train/validation/test split).
    mag, snr : numpy.ndarray of float
        Per stamp: magnitude and S/N (NaN when unknown).
    channels : list of str
        Channel names, in the order of ``X``'s axis 1.
    meta : dict
        JSON-serialisable description (cutout size, normalisation, source...).
    truth_kind : numpy.ndarray of str, optional
        Per stamp: what it sits on in a synthetic sky (:func:`rbflow.crossmatch.truth_kinds`);
        default ``''`` (unknown) for every stamp.
    """
    from rbflow.io import atomic_path

    if truth_kind is None:
        truth_kind = np.full(len(y), "", dtype="U1")
    with atomic_path(out_npz) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                X=np.asarray(X, dtype=np.float32),
                y=np.asarray(y, dtype=np.int64),
                ids=np.asarray(ids, dtype=str),
                image=np.asarray(image, dtype=str),
                frame=np.asarray(frame, dtype=str),
                mag=np.asarray(mag, dtype=np.float64),
                snr=np.asarray(snr, dtype=np.float64),
                truth_kind=np.asarray(truth_kind, dtype=str),
                channels=np.asarray(channels, dtype=str),
                meta=np.asarray(json.dumps(meta)),
            )


def load_datacube(path: str | os.PathLike) -> dict[str, Any]:
    """Load a datacube written by :func:`build_datacube` (no pickle).

    Parameters
    ----------
    path : path-like
        The ``.npz`` file.

    Returns
    -------
    dict
        Arrays X, y, ids, image, frame, mag, snr, truth_kind, channels and ``meta`` parsed from JSON.
        Datacubes of older rbflow versions have no truth_kind: it is ``''`` for every stamp.

    Raises
    ------
    InputError
        Missing or unreadable file, or a key is missing.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            cube = {k: npz[k] for k in npz.files}
        cube["meta"] = json.loads(str(cube["meta"]))
    except FileNotFoundError as exc:
        raise InputError(f"datacube '{path}' does not exist: run the convert stage first") from exc
    except Exception as exc:
        raise InputError(f"datacube '{path}' is not readable ({exc}): delete it and rerun the convert stage") from exc
    missing = {"X", "y", "ids", "image", "frame", "mag", "snr", "channels"} - set(cube)
    if missing:
        raise InputError(f"datacube '{path}' lacks {sorted(missing)}: rerun the convert stage with this rbflow")
    cube.setdefault("truth_kind", np.full(len(cube["y"]), "", dtype="U1"))
    return cube
