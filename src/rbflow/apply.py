"""What the apply path kept: candidates before and after the threshold, and known reals among them.

The apply path classifies every candidate of the frames as observed (no injection). This module
summarises its result per frame: candidates before and after filtering (the reduction factor), and,
when catalogues of known real variables/transients are configured (the demo ships its truth
catalogue), how many of those sources were detected and kept, and how many survivors are known reals
rather than artefacts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import astropy.units as u
import numpy as np
from astropy.coordinates import SkyCoord
from astropy.table import Table, vstack

from rbflow.crossmatch import read_catalogue, table_pixel_scale
from rbflow.errors import ConfigError
from rbflow.io import made_by, read_table, write_figure, write_json

__all__ = ["summarise_apply"]

log = logging.getLogger(__name__)


def _near(cands: Table, sources: SkyCoord, radius: u.Quantity) -> tuple[np.ndarray, np.ndarray]:
    """(candidate matches a source, source has a candidate) within ``radius``."""
    if len(cands) == 0 or len(sources) == 0:
        return np.zeros(len(cands), bool), np.zeros(len(sources), bool)
    coords = SkyCoord(np.asarray(cands["ra"], float) * u.deg, np.asarray(cands["dec"], float) * u.deg)
    _, sep_c, _ = coords.match_to_catalog_sky(sources)
    _, sep_s, _ = sources.match_to_catalog_sky(coords)
    return sep_c < radius, sep_s < radius


def summarise_apply(
    infer_paths: Sequence[str | os.PathLike],
    kept_paths: Sequence[str | os.PathLike],
    out_json: str | os.PathLike,
    out_png: str | os.PathLike,
    *,
    catalogues: Sequence[str | os.PathLike] = (),
    radius_arcsec: float | None = None,
    radius_px: float | None = None,
) -> dict:
    """Summarise the apply path per frame and overall; draw candidates before/after per frame.

    Parameters
    ----------
    infer_paths : sequence of path-like
        ``infer/{image}.ecsv`` tables (columns id, ra, dec, label1).
    kept_paths : sequence of path-like
        The kept list of each (``infer/{image}_kept.ecsv``), in the order of ``infer_paths``.
    out_json, out_png : path-like
        Summary (JSON) and bar chart (PNG).
    catalogues : sequence of path-like, optional
        Known real variables/transients (columns ra, dec in deg).
    radius_arcsec : float, optional
        Match radius (arcsec).
    radius_px : float, optional
        Match radius (pixels), used when ``radius_arcsec`` is None (a telescope whose pixel scale
        is read from the WCS): each frame's scale is fitted to its candidates' x, y, ra, dec.

    Returns
    -------
    dict
        ``frames`` (per image: n_candidates, n_kept, reduction, known_detected, known_kept,
        kept_known, kept_other) and ``total`` (the same summed, plus the fractions).
    """
    known = vstack([read_catalogue(p)["ra", "dec"] for p in catalogues]) if catalogues else Table(names=("ra", "dec"))
    sources = SkyCoord(np.asarray(known["ra"], float) * u.deg, np.asarray(known["dec"], float) * u.deg)
    if radius_arcsec is None and radius_px is None:
        raise ConfigError("summarise_apply needs radius_arcsec or radius_px")
    if len(kept_paths) != len(infer_paths):
        raise ConfigError(
            f"summarise_apply got {len(infer_paths)} inference tables but {len(kept_paths)} kept lists: "
            "give one kept list per table, in the same order"
        )
    frames = {}
    for path, kept_path in zip(infer_paths, kept_paths, strict=True):
        path = Path(path)
        cands, kept = read_table(path), read_table(kept_path)
        if radius_arcsec is not None:
            radius = radius_arcsec * u.arcsec
        else:
            scale = table_pixel_scale(cands) if {"x", "y"} <= set(cands.colnames) else float("nan")
            if not np.isfinite(scale):
                log.warning("'%s': fewer than 3 candidates, no pixel scale: its known reals are not matched", path)
            radius = (radius_px * scale if np.isfinite(scale) else 0.0) * u.arcsec
        _, detected = _near(cands, sources, radius)
        kept_is_known, kept_src = _near(kept, sources, radius)
        frames[path.stem] = {
            "n_candidates": len(cands),
            "n_kept": len(kept),
            "reduction": len(cands) / len(kept) if len(kept) else None,
            "known_detected": int(detected.sum()),
            "known_kept": int(kept_src.sum()),
            "kept_known": int(kept_is_known.sum()),
            "kept_other": int((~kept_is_known).sum()),
        }
    keys = ("n_candidates", "n_kept", "known_detected", "known_kept", "kept_known", "kept_other")
    total = {k: int(sum(f[k] for f in frames.values())) for k in keys}
    total["reduction"] = total["n_candidates"] / total["n_kept"] if total["n_kept"] else None
    total["known_kept_of_detected"] = total["known_kept"] / total["known_detected"] if total["known_detected"] else None
    total["survivors_known_fraction"] = total["kept_known"] / total["n_kept"] if total["n_kept"] else None
    summary = {
        "made_by": made_by("rbflow.apply.summarise_apply"),
        "catalogues": [str(p) for p in catalogues],
        "radius_arcsec": radius_arcsec,
        "radius_px": radius_px,
        "note": "known_* count catalogue sources with a candidate (detected) or a kept candidate within the radius; "
        "kept_known/kept_other split the survivors by whether a catalogue source is within the radius",
        "frames": frames,
        "total": total,
    }
    log.info(
        "apply path: %d candidates -> %d kept (%.1fx fewer); %d of %d detected known reals kept; %d of %d survivors known",
        total["n_candidates"],
        total["n_kept"],
        total["reduction"] or float("nan"),
        total["known_kept"],
        total["known_detected"],
        total["kept_known"],
        total["n_kept"],
    )
    write_json(summary, out_json)
    _plot(frames, Path(out_png))
    return summary


def _plot(frames: dict[str, dict], path: Path) -> None:
    from matplotlib.figure import Figure

    names = list(frames)
    pos = np.arange(len(names))
    fig = Figure(figsize=(max(6.0, 0.6 * len(names) + 2), 4), layout="constrained")
    ax = fig.subplots()
    ax.bar(pos - 0.2, [frames[n]["n_candidates"] for n in names], 0.4, label="candidates")
    ax.bar(pos + 0.2, [frames[n]["kept_known"] for n in names], 0.4, label="kept: known real")
    ax.bar(
        pos + 0.2,
        [frames[n]["kept_other"] for n in names],
        0.4,
        bottom=[frames[n]["kept_known"] for n in names],
        label="kept: other",
    )
    ax.set_yscale("log")
    ax.set_xticks(pos, names, rotation=45, ha="right")
    ax.set_ylabel("candidates per frame")
    ax.legend()
    write_figure(fig, path, dpi=100)
