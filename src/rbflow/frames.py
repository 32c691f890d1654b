"""Which frames a telescope has, how they pair with references, and their header facts.

A *frame* is one science or reference image, named without extension (e.g. ``fld00_r_e1``).
In the simulation path each science frame gives several *images*, one per injection
realization, named ``{frame}_sim{k}``; in the observed path the image is the frame itself.
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rbflow.errors import ConfigError, InputError

if TYPE_CHECKING:
    from astropy.io import fits

__all__ = [
    "FrameSpec",
    "FrameInfo",
    "frames_of",
    "science_frames",
    "reference_frames",
    "image_name",
    "parse_image",
    "frame_info",
    "pixel_scale_of",
    "frame_hdu",
    "astrometry_sources",
    "RESOURCES",
]

#: Root folder of inputs; the demo writes its frames here.
RESOURCES = Path("resources")

_SIM = re.compile(r"^(?P<frame>.+)_sim(?P<realization>\d+)$")


@dataclass(frozen=True)
class FrameSpec:
    """One frame of a telescope.

    Attributes
    ----------
    name : str
        Frame id, unique within the telescope.
    path : str
        FITS file of the frame.
    reference : str or None
        Name of the reference frame to subtract (None for a reference itself).
    filter : str or None
        Filter, when known without reading the header.
    field : str or None
        Field id, when known.
    inputs : tuple of str
        Frames stacked into this one by the ``reference`` rule (empty for a file that exists);
        for a survey reference, the science frame it is made for (rule ``survey_reference``).
    """

    name: str
    path: str
    reference: str | None
    filter: str | None = None
    field: str | None = None
    inputs: tuple[str, ...] = ()


def _demo_frames(telescope: dict[str, Any]) -> list[FrameSpec]:
    sky = telescope["sky"]
    root = RESOURCES / telescope["name"] / "frames"
    frames: list[FrameSpec] = []
    for f in range(sky["fields"]):
        band = telescope["filters"][f % len(telescope["filters"])]
        field = f"fld{f:02d}"
        ref = f"{field}_{band}_ref"
        frames.append(FrameSpec(ref, str(root / f"{ref}.fits"), None, band, field))
        for e in range(1, sky["epochs"] + 1):
            name = f"{field}_{band}_e{e}"
            frames.append(FrameSpec(name, str(root / f"{name}.fits"), ref, band, field))
    return frames


def _glob(pattern: str, telescope: dict[str, Any], key: str) -> list[str]:
    matches = sorted(glob.glob(pattern))
    if not matches:
        raise ConfigError(
            f"telescope '{telescope['name']}': key '{key}' entry {pattern!r} matches no file; "
            "check the path (relative to the working directory)"
        )
    return matches


def _frame_name(path: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", Path(path).name.split(".fits")[0])


def _calibrated(path: str, telescope: dict[str, Any]) -> str:
    """Where the pipeline reads a delivered frame: itself, or its astrometric calibration (``astrometry`` block)."""
    if "astrometry" not in telescope:
        return path
    return str(RESOURCES / telescope["name"] / "astrometry" / f"{_frame_name(path)}.fits")


def _survey_frames(telescope: dict[str, Any]) -> list[FrameSpec]:
    survey = telescope["frames"]["reference"]["survey"]
    root = RESOURCES / telescope["name"] / "survey"
    frames: list[FrameSpec] = []
    seen: dict[str, str] = {}
    for pattern in telescope["frames"]["science"]:
        for m in _glob(pattern, telescope, "frames.science"):
            name = _frame_name(m)
            if _SIM.match(name) or name in seen:
                continue
            seen[name] = m
            path = _calibrated(m, telescope)
            ref = f"{name}_{survey}"
            frames += [FrameSpec(ref, str(root / f"{ref}.fits"), None, inputs=(path,)), FrameSpec(name, path, ref)]
    return frames


def _real_frames(telescope: dict[str, Any]) -> list[FrameSpec]:
    spec = telescope["frames"]
    reference = spec["reference"]
    if isinstance(reference, dict):  # a survey: one reference per science frame (rule survey_reference)
        return _survey_frames(telescope)
    if isinstance(reference, str):  # one existing frame
        ref_name = _frame_name(reference)
        frames = [FrameSpec(ref_name, _calibrated(reference, telescope), None)]
        seen = {ref_name: reference}
    else:  # frames of one epoch, stacked by the `reference` rule
        inputs = tuple(m for pattern in reference for m in _glob(pattern, telescope, "frames.reference"))
        ref_name = f"{telescope['name']}_ref"
        path = RESOURCES / telescope["name"] / "reference" / f"{ref_name}.fits"
        stacked = tuple(_calibrated(m, telescope) for m in dict.fromkeys(inputs))
        frames = [FrameSpec(ref_name, str(path), None, inputs=stacked)]
        seen = {ref_name: str(path), **{_frame_name(m): m for m in inputs}}
    for pattern in spec["science"]:
        for m in _glob(pattern, telescope, "frames.science"):
            name = _frame_name(m)
            if _SIM.match(name):
                continue
            if name in seen:
                if Path(seen[name]).resolve() != Path(m).resolve():
                    raise ConfigError(
                        f"telescope '{telescope['name']}': frames '{seen[name]}' and '{m}' both get the frame name "
                        f"'{name}' (characters other than letters, digits, '-' and '_' become '_'): rename one"
                    )
                continue  # listed twice, or a frame of the stacked reference epoch
            seen[name] = m
            frames.append(FrameSpec(name, _calibrated(m, telescope), ref_name))
    return frames


def astrometry_sources(telescope: dict[str, Any]) -> dict[str, str]:
    """Delivered file of every frame the ``astrometry`` rule calibrates, by frame name (empty when it is off).

    Parameters
    ----------
    telescope : dict
        Validated configuration of a real telescope (or the demo one: no frame is calibrated).

    Returns
    -------
    dict of str
        Frame name to the path of the file as delivered (science frames, the reference or the
        frames of the stacked reference epoch).
    """
    if "astrometry" not in telescope or "sky" in telescope:
        return {}
    spec = telescope["frames"]
    reference = [] if isinstance(spec["reference"], dict) else spec["reference"]  # a survey: none delivered
    files = (
        [reference]
        if isinstance(reference, str)
        else [m for p in reference for m in _glob(p, telescope, "frames.reference")]
    )
    files += [m for p in spec["science"] for m in _glob(p, telescope, "frames.science")]
    return {_frame_name(m): m for m in reversed(files)}  # the first file of a name wins, as in frames_of


def frames_of(telescope: dict[str, Any]) -> list[FrameSpec]:
    """List every frame (references first within a field) of a validated telescope config.

    Parameters
    ----------
    telescope : dict
        Output of :func:`rbflow.config.load_telescope`.

    Returns
    -------
    list of FrameSpec
        With an ``astrometry`` block, a delivered frame's path is that of its calibrated copy
        (``resources/<name>/astrometry/<frame>.fits``).

    Raises
    ------
    ConfigError
        An ``astrometry`` block on the demo telescope.
    """
    if "sky" in telescope and "astrometry" in telescope:
        raise ConfigError(
            f"telescope '{telescope['name']}': the embedded demo sky writes frames with their WCS; "
            "'astrometry' is for real telescopes (remove the block)"
        )
    return _demo_frames(telescope) if "sky" in telescope else _real_frames(telescope)


def science_frames(telescope: dict[str, Any]) -> list[FrameSpec]:
    """Frames that have a reference (the ones that are subtracted)."""
    return [f for f in frames_of(telescope) if f.reference is not None]


def reference_frames(telescope: dict[str, Any]) -> list[FrameSpec]:
    """Frames that serve as references."""
    return [f for f in frames_of(telescope) if f.reference is None]


def frame_hdu(telescope: dict[str, Any]) -> int | str | None:
    """The HDU holding a frame's pixels in the telescope's files (``frames.hdu``), for :func:`rbflow.io.read_image`.

    Parameters
    ----------
    telescope : dict
        Validated telescope configuration, or the part of it a stage gets.

    Returns
    -------
    int, str or None
        HDU index or EXTNAME; None (first 2-D image HDU) for the demo telescope or when unset.
    """
    return (telescope.get("frames") or {}).get("hdu")


def image_name(frame: str, realization: int | None) -> str:
    """Name of the image made from ``frame``: itself (observed) or its injection realization."""
    return frame if realization is None else f"{frame}_sim{realization}"


def parse_image(image: str) -> tuple[str, int | None]:
    """Inverse of :func:`image_name`: ``(frame, realization or None)``."""
    m = _SIM.match(image)
    return (m["frame"], int(m["realization"])) if m else (image, None)


@dataclass(frozen=True)
class FrameInfo:
    """Facts about one frame, from the telescope file or its header.

    Attributes
    ----------
    gain : float
        e-/ADU.
    read_noise : float
        e-.
    saturation : float
        ADU.
    filter : str
    exptime : float
        s.
    date : str
        ISO date of the observation ('' when the header has none).
    zeropoint : float
        Magnitude that gives 1 ADU in this frame.
    fwhm_guess : float or None
        Seeing from the header (pixels), a first guess only.
    """

    gain: float
    read_noise: float
    saturation: float
    filter: str
    exptime: float
    date: str
    zeropoint: float
    fwhm_guess: float | None


def pixel_scale_of(telescope: dict[str, Any], wcs: Any, *, path: str | Path = "?") -> float:
    """The telescope's pixel scale, or the one of the frame's WCS where the telescope file says null.

    Parameters
    ----------
    telescope : dict
        Validated telescope configuration.
    wcs : astropy.wcs.WCS or None
        The frame's WCS.
    path : str or Path, optional
        The frame's file, for messages.

    Returns
    -------
    float
        Pixel scale (arcsec/pixel).

    Raises
    ------
    InputError
        ``pixel_scale`` is null and the frame has no celestial WCS.
    """
    if telescope.get("pixel_scale") is not None:
        return float(telescope["pixel_scale"])
    if wcs is None or not wcs.has_celestial:
        raise InputError(
            f"frame '{path}': telescope file '{telescope['name']}.yaml' sets 'pixel_scale: null' (read it from the "
            "WCS) but the frame has no celestial WCS: solve its astrometry, or give 'pixel_scale' in arcsec/pixel"
        )
    from astropy.wcs.utils import proj_plane_pixel_scales

    return float(np.mean(proj_plane_pixel_scales(wcs.celestial))) * 3600.0


def frame_info(header: fits.Header, telescope: dict[str, Any], *, path: str | Path = "?") -> FrameInfo:
    """Collect a frame's facts: the telescope file wins, then the header key it names.

    A survey reference (header card ``SURVEY``, written by :func:`rbflow.survey.survey_reference`)
    is in the survey's units: its header's gain, read noise, saturation and zeropoint win over the
    telescope file's, which describe the telescope's own detector (its 50,000 ADU saturation would
    mask every star of a survey stack whose peak exceeds that many survey counts).

    Parameters
    ----------
    header : astropy.io.fits.Header
        The frame's header.
    telescope : dict
        Validated telescope configuration.
    path : str or Path, optional
        The frame's file, for messages.

    Returns
    -------
    FrameInfo

    Raises
    ------
    InputError
        A fact is neither in the telescope file nor in the header, or has a wrong value.
    """
    keys = telescope["header"]
    tname = telescope["name"]
    survey = "SURVEY" in header  # a survey reference: its own facts

    def fact(name: str, unit: str) -> float:
        value = None if survey and keys[name] in header else telescope.get(name)
        if value is None:
            key = keys[name]
            if key not in header:
                raise InputError(
                    f"frame '{path}': '{name}' ({unit}) is not set in telescope file '{tname}.yaml' "
                    f"and header key '{key}' is missing; set '{name}' in the telescope file or "
                    f"'header.{name}' to the key that holds it"
                )
            value = header[key]
        try:
            value = float(value)
        except (TypeError, ValueError) as exc:
            raise InputError(f"frame '{path}': '{name}' = {value!r} is not a number ({unit})") from exc
        return value

    filt = str(header.get(keys["filter"], "")).strip()
    if not filt:
        filt = telescope["filters"][0] if len(telescope["filters"]) == 1 else ""
    if not filt:
        raise InputError(
            f"frame '{path}': header key '{keys['filter']}' (filter) is missing; set 'header.filter' "
            f"in telescope file '{tname}.yaml'"
        )
    zp = None if survey and keys["zeropoint"] in header else telescope["zeropoints"].get(filt)
    if zp is None:
        key = keys["zeropoint"]
        if key not in header:
            raise InputError(
                f"frame '{path}': no zeropoint for filter {filt!r}: add 'zeropoints: {{{filt}: ...}}' to "
                f"telescope file '{tname}.yaml' or give the frame a '{key}' header card (mag for 1 ADU)"
            )
        zp = header[key]
    gain = fact("gain", "e-/ADU")
    if gain <= 0:
        raise InputError(f"frame '{path}': gain must be > 0 (e-/ADU), got {gain}")
    fwhm = header.get(keys["fwhm"])
    return FrameInfo(
        gain=gain,
        read_noise=fact("read_noise", "e-"),
        saturation=fact("saturation", "ADU"),
        filter=filt,
        exptime=float(header.get(keys["exptime"], 0.0)),
        date=str(header.get(keys["date"], "")),
        zeropoint=float(zp),
        fwhm_guess=float(fwhm) if isinstance(fwhm, (int, float)) and fwhm > 0 else None,
    )
