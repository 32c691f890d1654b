"""The bogus zoo: artefacts of real survey cameras, rendered into the frames of the synthetic sky.

:func:`rbflow.sky.simulate_frame` calls these renderers at the point of the frame's making where the
artefact arises (light before the photon noise, electronics after it, pipeline masks last), each with
its own random generator ``derive(seed, frame, kind)``, so that changing one kind's rate leaves every
other kind's draws unchanged. Each renderer returns the :class:`Artefact` rows that go into the
frame's truth table, with the geometry of the truth contract: ``x, y`` (and ``x1, y1`` for a linear
feature: its two ends), ``extent`` (radius of influence beyond the point or segment, px), ``flux``
(ADU the artefact put into the frame, or its amplitude for frame-wide patterns) and ``host`` (the id
of the star that caused it or that a trail was aimed through).

The kinds follow the bogus taxonomies the surveys published:

* DES autoScan (Goldstein et al. 2015, AJ 150, 82): bad subtractions around bright stars and
  galaxies, CCD edges and defects, saturated stars, cosmic rays, moving objects.
* Pan-STARRS1 (Wright et al. 2015, MNRAS 449, 451): diffraction spikes, ghosts and crosstalk of
  bright stars, bad pixels and cells, edges of masked regions, convolution residuals.
* ZTF braai (Duev et al. 2019, MNRAS 489, 3582): bright-star residuals, ghosts, dipoles, pixel and
  column defects, satellite trails, dim spurious detections; ZTF's own data system (Masci et al.
  2019, PASP 131, 018003) masks ghosts, bleeds, crosstalk and detector edges; its i-band frames
  fringe (Medford et al. 2021, PASP 133, 064503).
* ZTF satellite streaks (Mróz et al. 2022, ApJL 924, L30): Starlink streaks in 18 % of twilight
  images of the 47 deg² camera in 2021 August (0.5 % in late 2019); one streak covers < 0.1 % of
  the pixels.
* ATLAS (Smith et al. 2020, PASP 132, 085002; Weston et al. 2024, RASTI 3, 385): bogus about three
  times as many as reals in the labelled stream: trails, bright-star residuals, edges.
* GOTO (Killestein et al. 2021, MNRAS 503, 4838): bright-star and saturation residuals, satellite
  trails and glints, minor planets as real moving sources.
* MeerLICHT (Stoppa et al. 2024, A&A 692, A199): satellite trails in its full-field images, many
  of them dotted or of varying brightness (tumbling or glinting satellites).

Where a survey published no rate for a kind, its rate in ``sky.artefacts`` is a choice, and the
schema says so. Units: pixels (0-based, centres at integers), ADU, e- where stated.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "Artefact",
    "Stars",
    "ZOO_KINDS",
    "active",
    "moffat_peak",
    "segment_in_frame",
    "add_segment",
    "satellite_trails",
    "glints",
    "flares",
    "ghosts",
    "spikes",
    "halos",
    "asteroids",
    "fringing",
    "chip_edges",
    "masked_blocks",
    "crosstalk",
    "amp_steps",
    "pattern_noise",
    "amplifier_bounds",
]

#: Truth kinds this module renders (``satellite`` is the existing kind, now a segment).
ZOO_KINDS = (
    "glint",
    "flare",
    "ghost",
    "spike",
    "halo",
    "crosstalk",
    "amp_step",
    "chip_edge",
    "masked",
    "fringe",
    "pattern_noise",
    "asteroid",
)

#: A function that adds PSF point sources ``(image, x, y, flux_adu)`` into an image in place.
PointRenderer = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], None]


@dataclass(frozen=True)
class Artefact:
    """One truth row of an artefact (see the module docstring for the geometry).

    Attributes
    ----------
    kind : str
        Truth kind.
    x, y : float
        Centre of a compact artefact, or one end of a linear one (0-based px).
    x1, y1 : float
        The other end of a linear artefact; NaN for compact ones.
    extent : float
        Radius of influence beyond the point or segment (px).
    flux : float
        ADU the artefact added to the frame (for frame-wide patterns and steps: their amplitude).
    host : str
        Id of the star that caused it or that a trail was aimed through ('' if none).
    mag : float
        Magnitude (real sources: asteroids); NaN otherwise.
    """

    kind: str
    x: float
    y: float
    x1: float = math.nan
    y1: float = math.nan
    extent: float = 0.0
    flux: float = 0.0
    host: str = ""
    mag: float = math.nan


@dataclass(frozen=True)
class Stars:
    """Point sources of a frame that optics artefacts follow (centres in the frame).

    Attributes
    ----------
    id : numpy.ndarray
        Object ids (str).
    x, y : numpy.ndarray
        True pixel positions (0-based).
    flux : numpy.ndarray
        Total flux (ADU).
    peak : numpy.ndarray
        Brightest pixel of the star, sky included, before clipping (ADU): the star saturates where
        it reaches the saturation level.
    """

    id: np.ndarray
    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray
    peak: np.ndarray


def moffat_peak(flux: np.ndarray, fwhm: np.ndarray, beta: float) -> np.ndarray:
    """Central surface brightness (ADU/px) of a round Moffat of total ``flux`` and ``fwhm`` (px)."""
    alpha = np.asarray(fwhm, float) / (2 * math.sqrt(2 ** (1 / beta) - 1))
    return np.asarray(flux, float) * (beta - 1) / (math.pi * alpha**2)


def active(cfg: dict[str, Any], epoch: int) -> bool:
    """Whether a kind (its ``sky.artefacts`` entry) acts in a frame: ``frames`` science/reference/both."""
    return cfg["frames"] == "both" or (cfg["frames"] == "reference") == (epoch == 0)


def _probability(rate: float, scale: float) -> float:
    return min(1.0, max(0.0, rate * scale))


def _span_factor(shape: tuple[int, int]) -> float:
    """Trails cross a frame in proportion to its size: the diagonal over the 1024² frame's."""
    return math.hypot(*shape) / math.hypot(1024, 1024)


def _area_factor(shape: tuple[int, int]) -> float:
    return shape[0] * shape[1] / (1024 * 1024)


def segment_in_frame(px: float, py: float, ang: float, shape: tuple[int, int]) -> tuple[float, float, float, float]:
    """Ends of the line through (px, py) at angle ``ang`` (rad from +x) clipped to the frame's pixel centres.

    Parameters
    ----------
    px, py : float
        A point on the line inside the frame (px).
    ang : float
        Direction (rad, counter-clockwise from +x).
    shape : tuple of int
        (ny, nx).

    Returns
    -------
    x0, y0, x1, y1 : float
        The two ends (px), on the frame's outermost pixel centres.
    """
    ny, nx = shape
    c, s = math.cos(ang), math.sin(ang)
    lo, hi = -math.inf, math.inf
    for p, d, n in ((px, c, nx), (py, s, ny)):
        if abs(d) < 1e-12:
            continue
        a, b = (0 - p) / d, (n - 1 - p) / d
        lo, hi = max(lo, min(a, b)), min(hi, max(a, b))
    return px + lo * c, py + lo * s, px + hi * c, py + hi * s


def add_segment(
    image: np.ndarray,
    x0: float,
    y0: float,
    x1: float,
    y1: float,
    *,
    sigma: float,
    along: Callable[[np.ndarray], np.ndarray],
) -> float:
    """Add a line of light of Gaussian cross-section between two points, in place.

    Parameters
    ----------
    image : numpy.ndarray
        Image (ADU), changed in place.
    x0, y0, x1, y1 : float
        Ends of the segment (px).
    sigma : float
        Gaussian sigma of the cross-section (px).
    along : callable
        Light per pixel of length (ADU/px) at the distance ``s`` (px) from (x0, y0) along the segment.

    Returns
    -------
    float
        ADU added to the image (the light beyond the frame is lost).
    """
    ny, nx = image.shape
    reach = 5 * sigma
    xa, xb = int(max(0, math.floor(min(x0, x1) - reach))), int(min(nx, math.ceil(max(x0, x1) + reach) + 1))
    ya, yb = int(max(0, math.floor(min(y0, y1) - reach))), int(min(ny, math.ceil(max(y0, y1) + reach) + 1))
    if xa >= xb or ya >= yb:
        return 0.0
    length = math.hypot(x1 - x0, y1 - y0)
    ux, uy = ((x1 - x0) / length, (y1 - y0) / length) if length > 0 else (1.0, 0.0)
    gx = np.arange(xa, xb, dtype=float)[None, :] - x0
    gy = np.arange(ya, yb, dtype=float)[:, None] - y0
    s = gx * ux + gy * uy
    d = -gx * uy + gy * ux
    inside = (s >= 0) & (s <= length)
    # Round caps: beyond an end the light falls off with the distance to that end.
    dist2 = np.where(inside, d**2, np.where(s < 0, s**2 + d**2, (s - length) ** 2 + d**2))
    near = dist2 < reach**2
    light = np.where(near, np.exp(-0.5 * dist2 / sigma**2) / (math.sqrt(2 * math.pi) * sigma), 0.0)
    light *= along(np.clip(s, 0.0, length))
    image[ya:yb, xa:xb] += light
    return float(light.sum())


def _trail_line(
    g: np.random.Generator, shape: tuple[int, int], stars: Stars, through_star: float
) -> tuple[float, float, float, str]:
    """A random line across the frame: a point on it, its angle (rad) and the star it is aimed through."""
    ny, nx = shape
    px, py, ang = g.uniform(0, nx - 1), g.uniform(0, ny - 1), g.uniform(0, np.pi)
    host = ""
    if len(stars.x) and g.random() < through_star:
        k = int(g.integers(len(stars.x)))
        px, py, host = float(stars.x[k]), float(stars.y[k]), str(stars.id[k])
    return float(px), float(py), float(ang), host


def satellite_trails(
    image: np.ndarray, g: np.random.Generator, *, rate: float, seeing: float, stars: Stars, through_star: float
) -> list[Artefact]:
    """A satellite trail (probability ``rate`` per frame): a PSF-wide line of constant light across the frame.

    Parameters
    ----------
    image : numpy.ndarray
        Expected light (ADU), changed in place.
    g : numpy.random.Generator
        The kind's generator.
    rate : float
        Probability of a trail (already multiplied by the frame's ``artefact_scale``).
    seeing : float
        PSF FWHM (px): the trail's width.
    stars : Stars
        Stars a trail may be aimed through.
    through_star : float
        Probability that the trail is aimed through a star.

    Returns
    -------
    list of Artefact
        One ``satellite`` segment, or none.
    """
    if not g.random() < rate:
        return []
    ny, nx = image.shape
    px, py, ang = g.uniform(0, nx - 1), g.uniform(0, ny - 1), g.uniform(0, np.pi)
    peak = 10 ** g.uniform(math.log10(30.0), math.log10(3000.0))  # ADU at the trail's centre line
    host = ""
    if len(stars.x) and g.random() < through_star:
        k = int(g.integers(len(stars.x)))
        px, py, host = float(stars.x[k]), float(stars.y[k]), str(stars.id[k])
    sigma = seeing / 2.3548
    x0, y0, x1, y1 = segment_in_frame(px, py, ang, image.shape)
    per_px = peak * math.sqrt(2 * math.pi) * sigma
    added = add_segment(image, x0, y0, x1, y1, sigma=sigma, along=lambda s: np.full_like(s, per_px))
    return [Artefact("satellite", x0, y0, x1, y1, 3 * sigma, added, host)]


def glints(
    image: np.ndarray,
    g: np.random.Generator,
    cfg: dict[str, Any],
    *,
    scale: float,
    zeropoint: float,
    fwhm: float,
    stars: Stars,
    through_star: float,
    render_points: PointRenderer,
) -> list[Artefact]:
    """Dotted satellite glints: rows of point-like flashes, equally spaced along a line.

    A tumbling satellite with a reflective face flashes at a fixed period; in a 30 s exposure the
    flashes draw a row of PSF-like dots (ZTF braai, GOTO and MeerLICHT list them among the bogus).

    Parameters
    ----------
    image : numpy.ndarray
        Expected light (ADU), changed in place.
    g : numpy.random.Generator
        The kind's generator.
    cfg : dict
        ``sky.artefacts.glints``: ``rate`` (mean per 1024² frame, scaled by the frame diagonal),
        ``dots`` [min, max] (count), ``spacing`` [min, max] (px), ``mags`` [bright, faint] (mag per dot).
    scale : float
        The frame's ``artefact_scale``.
    zeropoint : float
        The frame's MAGZP (mag).
    fwhm : float
        PSF FWHM (px): the segment's extent.
    stars : Stars
        Stars a row may be aimed through.
    through_star : float
        Probability that a row is aimed through a star.
    render_points : callable
        Adds PSF point sources into an image.

    Returns
    -------
    list of Artefact
        One ``glint`` segment (first to last dot in the frame) per row.
    """
    ny, nx = image.shape
    out, dots = [], []
    for _ in range(int(g.poisson(cfg["rate"] * scale * _span_factor(image.shape)))):
        px, py, ang, host = _trail_line(g, image.shape, stars, through_star)
        n = int(g.integers(cfg["dots"][0], cfg["dots"][1] + 1))
        step = g.uniform(*cfg["spacing"])
        k = np.arange(n) - g.uniform(0, n - 1)  # the aimed-at point falls somewhere along the row
        dx, dy = px + k * step * math.cos(ang), py + k * step * math.sin(ang)
        mags = g.uniform(*cfg["mags"], n)
        keep = (dx >= -0.5) & (dx < nx - 0.5) & (dy >= -0.5) & (dy < ny - 0.5)
        if not keep.any():
            continue
        dx, dy, flux = dx[keep], dy[keep], 10 ** (-0.4 * (mags[keep] - zeropoint))
        dots.append((dx, dy, flux))
        out.append(Artefact("glint", dx[0], dy[0], dx[-1], dy[-1], fwhm, float(flux.sum()), host))
    if dots:  # one call: the renderer groups the stamps of all rows
        render_points(image, *(np.concatenate(v) for v in zip(*dots)))
    return out


def flares(
    image: np.ndarray,
    g: np.random.Generator,
    cfg: dict[str, Any],
    *,
    scale: float,
    seeing: float,
    stars: Stars,
    through_star: float,
) -> list[Artefact]:
    """Tumbling-satellite flares: a trail across the frame whose brightness rises and falls along it.

    Parameters
    ----------
    image : numpy.ndarray
        Expected light (ADU), changed in place.
    g : numpy.random.Generator
        The kind's generator.
    cfg : dict
        ``sky.artefacts.flares``: ``rate`` (mean per 1024² frame, scaled by the frame diagonal),
        ``peak`` [min, max] (ADU at the brightest point of the centre line), ``period`` [min, max]
        (px along the trail between flashes), ``floor`` (brightness between flashes, fraction of the peak).
    scale : float
        The frame's ``artefact_scale``.
    seeing : float
        PSF FWHM (px): the trail's width.
    stars : Stars
        Stars a trail may be aimed through.
    through_star : float
        Probability that a trail is aimed through a star.

    Returns
    -------
    list of Artefact
        One ``flare`` segment per trail.
    """
    out = []
    sigma = seeing / 2.3548
    for _ in range(int(g.poisson(cfg["rate"] * scale * _span_factor(image.shape)))):
        px, py, ang, host = _trail_line(g, image.shape, stars, through_star)
        peak = 10 ** g.uniform(*np.log10(cfg["peak"]))
        period, phase = g.uniform(*cfg["period"]), g.uniform(0, 1)
        floor = cfg["floor"]
        x0, y0, x1, y1 = segment_in_frame(px, py, ang, image.shape)
        per_px = peak * math.sqrt(2 * math.pi) * sigma

        def along(s, per_px=per_px, period=period, phase=phase, floor=floor):
            return per_px * (floor + (1 - floor) * np.abs(np.sin(np.pi * (s / period + phase))) ** 4)

        added = add_segment(image, x0, y0, x1, y1, sigma=sigma, along=along)
        out.append(Artefact("flare", x0, y0, x1, y1, 3 * sigma, added, host))
    return out


def _bright(stars: Stars, g: np.random.Generator, rate: float, min_peak: float) -> np.ndarray:
    """Indices of the stars whose peak is at least ``min_peak`` ADU, each kept with probability ``rate``."""
    draw = g.random(len(stars.x))  # one draw per star, so that the choice does not depend on the threshold
    return np.flatnonzero((stars.peak >= min_peak) & (draw < rate))


def ghosts(
    image: np.ndarray,
    g: np.random.Generator,
    cfg: dict[str, Any],
    *,
    scale: float,
    saturation: float,
    stars: Stars,
) -> list[Artefact]:
    """Internal-reflection ghosts of bright stars: out-of-focus donuts offset radially from the star.

    A reflection between the filter, the window and the detector images the pupil out of focus: a
    ring (the central obstruction makes the hole) displaced from the star along the line to the
    optical axis, away from it (``offset`` > 0) or towards it (< 0).

    Parameters
    ----------
    image : numpy.ndarray
        Expected light (ADU), changed in place.
    g : numpy.random.Generator
        The kind's generator.
    cfg : dict
        ``sky.artefacts.ghosts``: ``rate`` (probability per star whose peak reaches ``min_peak``),
        ``min_peak`` (fraction of the saturation level), ``fraction`` (ghost flux over the star's),
        ``radius`` [min, max] (px, outer radius), ``obstruction`` (inner over outer radius),
        ``axis`` [x, y] (optical axis, fractions of the frame size), ``offset`` (ghost position
        ``axis + (1 + offset) (star - axis)``).
    scale : float
        The frame's ``artefact_scale``.
    saturation : float
        Saturation level (ADU).
    stars : Stars
        Point sources with their centre in the frame.

    Returns
    -------
    list of Artefact
        One ``ghost`` per bright star whose ghost centre falls in the frame (``extent`` = outer radius).
    """
    ny, nx = image.shape
    ax, ay = cfg["axis"][0] * (nx - 1), cfg["axis"][1] * (ny - 1)
    out = []
    for k in _bright(stars, g, _probability(cfg["rate"], scale), cfg["min_peak"] * saturation):
        radius = g.uniform(*cfg["radius"])
        gx = ax + (1 + cfg["offset"]) * (stars.x[k] - ax)
        gy = ay + (1 + cfg["offset"]) * (stars.y[k] - ay)
        if not (-0.5 <= gx < nx - 0.5 and -0.5 <= gy < ny - 0.5):
            continue
        added = _add_ring(image, gx, gy, radius, cfg["obstruction"] * radius, cfg["fraction"] * stars.flux[k])
        out.append(Artefact("ghost", gx, gy, extent=radius, flux=added, host=str(stars.id[k])))
    return out


def _add_ring(image: np.ndarray, x: float, y: float, r_out: float, r_in: float, flux: float) -> float:
    """Add a uniform annulus (soft 1 px edges) holding ``flux`` ADU in total; returns the ADU in the frame."""
    ny, nx = image.shape
    h = int(math.ceil(r_out + 2))
    ix, iy = int(round(x)), int(round(y))
    gx = np.arange(ix - h, ix + h + 1, dtype=float)[None, :] - x
    gy = np.arange(iy - h, iy + h + 1, dtype=float)[:, None] - y
    r = np.hypot(gx, gy)
    ring = np.clip(r_out + 0.5 - r, 0, 1) * np.clip(r - r_in + 0.5, 0, 1)
    ring *= flux / ring.sum()
    return _paste(image, ring, ix - h, iy - h)


def _paste(image: np.ndarray, stamp: np.ndarray, x0: int, y0: int) -> float:
    """Add ``stamp`` with its corner at pixel (x0, y0), cut to the frame; returns the ADU added."""
    ny, nx = image.shape
    sy, sx = stamp.shape
    xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + sx, nx), min(y0 + sy, ny)
    if xa >= xb or ya >= yb:
        return 0.0
    part = stamp[ya - y0 : yb - y0, xa - x0 : xb - x0]
    image[ya:yb, xa:xb] += part
    return float(part.sum())


def spikes(
    image: np.ndarray,
    g: np.random.Generator,
    cfg: dict[str, Any],
    *,
    scale: float,
    saturation: float,
    seeing: float,
    stars: Stars,
) -> list[Artefact]:
    """Diffraction spikes of bright stars: two perpendicular lines through the star, fading outwards.

    Parameters
    ----------
    image : numpy.ndarray
        Expected light (ADU), changed in place.
    g : numpy.random.Generator
        The kind's generator.
    cfg : dict
        ``sky.artefacts.spikes``: ``rate`` (probability per star whose peak reaches ``min_peak``),
        ``min_peak`` (fraction of the saturation level), ``fraction`` (flux in all spikes over the
        star's), ``length`` (px: half-length of a spike of a star whose peak is the saturation level;
        it grows as the square root of the peak, up to 400 px), ``angle`` (deg from +x of the vanes).
    scale : float
        The frame's ``artefact_scale``.
    saturation : float
        Saturation level (ADU).
    seeing : float
        PSF FWHM (px): the spikes' width and the scale of their fall-off.
    stars : Stars
        Point sources with their centre in the frame.

    Returns
    -------
    list of Artefact
        Two ``spike`` segments (tip to tip through the star) per bright star.
    """
    sigma = seeing / 2.3548
    out = []
    for k in _bright(stars, g, _probability(cfg["rate"], scale), cfg["min_peak"] * saturation):
        half = min(400.0, cfg["length"] * math.sqrt(stars.peak[k] / saturation))
        s0 = 2 * seeing
        # Light per px of length ~ 1 / (1 + (r/s0)^2) from the star: normalised over each line.
        norm = 2 * s0 * math.atan(half / s0)
        per_line = 0.5 * cfg["fraction"] * stars.flux[k]
        for ang in np.radians([cfg["angle"], cfg["angle"] + 90.0]):
            c, s = math.cos(ang), math.sin(ang)
            x0, y0 = stars.x[k] - half * c, stars.y[k] - half * s
            x1, y1 = stars.x[k] + half * c, stars.y[k] + half * s

            def along(t, half=half, s0=s0, norm=norm, per_line=per_line):
                return per_line / norm / (1 + ((t - half) / s0) ** 2)

            added = add_segment(image, x0, y0, x1, y1, sigma=sigma, along=along)
            out.append(Artefact("spike", x0, y0, x1, y1, 3 * sigma, added, str(stars.id[k])))
    return out


def halos(
    image: np.ndarray,
    g: np.random.Generator,
    cfg: dict[str, Any],
    *,
    scale: float,
    saturation: float,
    seeing: float,
    stars: Stars,
) -> list[Artefact]:
    """Scattered-light halos of saturated stars: a broad disc of light around the star.

    The deep reference saturates far more stars than a science exposure, so its halos are where a
    difference image shows rings around stars that look normal in the science frame.

    Parameters
    ----------
    image : numpy.ndarray
        Expected light (ADU), changed in place.
    g : numpy.random.Generator
        The kind's generator.
    cfg : dict
        ``sky.artefacts.halos``: ``rate`` (probability per star whose peak reaches the saturation
        level), ``fraction`` (halo flux over the star's), ``radius`` [min, max] (px).
    scale : float
        The frame's ``artefact_scale``.
    saturation : float
        Saturation level (ADU).
    seeing : float
        PSF FWHM (px).
    stars : Stars
        Point sources with their centre in the frame.

    Returns
    -------
    list of Artefact
        One ``halo`` per saturated star (``extent`` = halo radius).
    """
    out = []
    for k in _bright(stars, g, _probability(cfg["rate"], scale), saturation):
        radius = g.uniform(*cfg["radius"])
        h = int(math.ceil(radius + 1))
        ix, iy = int(round(stars.x[k])), int(round(stars.y[k]))
        gx = np.arange(ix - h, ix + h + 1, dtype=float)[None, :] - stars.x[k]
        gy = np.arange(iy - h, iy + h + 1, dtype=float)[:, None] - stars.y[k]
        r = np.hypot(gx, gy)
        core = max(seeing, 0.3 * radius)
        prof = (1 + (r / core) ** 2) ** -1.5 * np.clip(radius + 0.5 - r, 0, 1)
        prof *= cfg["fraction"] * stars.flux[k] / prof.sum()
        added = _paste(image, prof, ix - h, iy - h)
        out.append(
            Artefact("halo", float(stars.x[k]), float(stars.y[k]), extent=radius, flux=added, host=str(stars.id[k]))
        )
    return out


def asteroids(
    image: np.ndarray,
    g: np.random.Generator,
    cfg: dict[str, Any],
    *,
    scale: float,
    zeropoint: float,
    exptime: float,
    pixel_scale: float,
    fwhm: float,
    render_points: PointRenderer,
) -> list[Artefact]:
    """Fast-moving asteroids: real point sources trailed over the exposure.

    Parameters
    ----------
    image : numpy.ndarray
        Expected light (ADU), changed in place.
    g : numpy.random.Generator
        The kind's generator.
    cfg : dict
        ``sky.artefacts.asteroids``: ``rate`` (mean per 1024² frame, scaled by area), ``mags``
        [bright, faint] (total magnitude), ``motion`` [min, max] (deg/day, drawn log-uniform).
    scale : float
        The frame's ``artefact_scale``.
    zeropoint : float
        The frame's MAGZP (mag).
    exptime : float
        Exposure time (s).
    pixel_scale : float
        arcsec/px.
    fwhm : float
        PSF FWHM (px).
    render_points : callable
        Adds PSF point sources into an image.

    Returns
    -------
    list of Artefact
        One ``asteroid`` per object: start and end of its trail, ``mag``, flux in the frame.
    """
    ny, nx = image.shape
    out, pts = [], []
    for _ in range(int(g.poisson(cfg["rate"] * scale * _area_factor(image.shape)))):
        x0, y0 = g.uniform(8, nx - 9), g.uniform(8, ny - 9)
        speed = 10 ** g.uniform(*np.log10(cfg["motion"]))
        length = speed * exptime / 86400.0 * 3600.0 / pixel_scale
        ang = g.uniform(0, 2 * np.pi)
        mag = g.uniform(*cfg["mags"])
        x1, y1 = x0 + length * math.cos(ang), y0 + length * math.sin(ang)
        n = max(1, int(math.ceil(length / 0.25)) + 1)  # PSF copies every 1/4 px: a smooth trail
        t = (np.arange(n) + 0.5) / n
        flux = 10 ** (-0.4 * (mag - zeropoint))
        pts.append((x0 + t * (x1 - x0), y0 + t * (y1 - y0), np.full(n, flux / n)))
        out.append(Artefact("asteroid", x0, y0, x1, y1, 0.5 * fwhm, flux, mag=mag))
    if pts:
        render_points(image, *(np.concatenate(v) for v in zip(*pts)))
    return out


def fringing(
    sky_map: np.ndarray,
    g: np.random.Generator,
    pattern_rng: np.random.Generator,
    cfg: dict[str, Any],
    *,
    scale: float,
    band: str,
) -> tuple[np.ndarray | None, list[Artefact]]:
    """Fringes of red filters: a smooth interference pattern, a few per cent of the sky.

    The pattern is fixed to the detector (drawn from ``pattern_rng``, the same in every frame); its
    amplitude changes from frame to frame with the night-sky lines, so a difference keeps a residual.

    Parameters
    ----------
    sky_map : numpy.ndarray
        Sky level (ADU per pixel).
    g : numpy.random.Generator
        The frame's generator of the kind (amplitude, occurrence).
    pattern_rng : numpy.random.Generator
        The detector's generator of the pattern.
    cfg : dict
        ``sky.artefacts.fringing``: ``rate`` (probability per frame in one of ``filters``),
        ``filters``, ``amplitude`` (peak, fraction of the sky), ``period`` [min, max] (px).
    scale : float
        The frame's ``artefact_scale``.
    band : str
        The frame's filter.

    Returns
    -------
    fringe : numpy.ndarray or None
        Additive pattern (ADU), or None when the frame has none.
    rows : list of Artefact
        One ``fringe`` row (frame centre, ``extent`` = half diagonal, ``flux`` = peak ADU) or none.
    """
    ny, nx = sky_map.shape
    comps = [
        (pattern_rng.uniform(*cfg["period"]), pattern_rng.uniform(0, np.pi), pattern_rng.uniform(0, 2 * np.pi))
        for _ in range(3)
    ]
    if band not in cfg["filters"] or not g.random() < _probability(cfg["rate"], scale):
        return None, []
    amp = cfg["amplitude"] * g.uniform(0.5, 1.0)
    xs, ys = np.arange(nx, dtype=float), np.arange(ny, dtype=float)
    pattern = np.zeros((ny, nx))
    for period, ang, phase in comps:
        kx, ky = 2 * np.pi * math.cos(ang) / period, 2 * np.pi * math.sin(ang) / period
        # cos(a + b) as two outer products: no transcendental on the full frame.
        pattern += np.outer(np.cos(ky * ys + phase), np.cos(kx * xs)) - np.outer(
            np.sin(ky * ys + phase), np.sin(kx * xs)
        )
    pattern /= 3.0
    fringe = amp * sky_map * pattern
    peak = float(np.abs(fringe).max())
    return fringe, [Artefact("fringe", (nx - 1) / 2, (ny - 1) / 2, extent=0.5 * math.hypot(nx, ny), flux=peak)]


def chip_edges(
    g: np.random.Generator, cfg: dict[str, Any], *, scale: float, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray | None, list[Artefact]]:
    """A chip edge or gap along one side of the frame, with vignetted rows next to it.

    Parameters
    ----------
    g : numpy.random.Generator
        The kind's generator.
    cfg : dict
        ``sky.artefacts.chip_edges``: ``rate`` (probability per frame), ``width`` [min, max] (px of
        gap), ``vignetting`` (px over which the light falls to half towards the gap), ``nan_fraction``
        (probability that the gap reads NaN rather than 0).
    scale : float
        The frame's ``artefact_scale``.
    shape : tuple of int
        (ny, nx).

    Returns
    -------
    gap : numpy.ndarray
        Boolean mask of the gap's pixels.
    vignette : numpy.ndarray or None
        Multiplicative throughput (1 away from the edge), or None without an edge.
    rows : list of Artefact
        One ``chip_edge`` segment along the gap's centre line (``extent`` = half gap + vignetting;
        ``flux`` = the fill value: NaN or 0), or none.
    """
    ny, nx = shape
    gap = np.zeros(shape, bool)
    if not g.random() < _probability(cfg["rate"], scale):
        return gap, None, []
    side = int(g.integers(4))  # 0: x = 0, 1: x = nx - 1, 2: y = 0, 3: y = ny - 1
    width = int(g.integers(cfg["width"][0], cfg["width"][1] + 1))
    fill = math.nan if g.random() < cfg["nan_fraction"] else 0.0
    n = nx if side < 2 else ny
    dist = np.arange(n, dtype=float) if side in (0, 2) else np.arange(n, dtype=float)[::-1]
    vig_len = cfg["vignetting"]
    ramp = np.clip(0.5 + 0.5 * (dist - width + 1) / max(vig_len, 1e-9), 0.5, 1.0) if vig_len > 0 else np.ones(n)
    vignette = np.broadcast_to(ramp[None, :] if side < 2 else ramp[:, None], shape).copy()
    centre = (width - 1) / 2
    if side < 2:
        line = centre if side == 0 else nx - 1 - centre
        gap[:, (slice(0, width) if side == 0 else slice(nx - width, nx))] = True
        ends = (line, 0.0, line, ny - 1.0)
    else:
        line = centre if side == 2 else ny - 1 - centre
        gap[(slice(0, width) if side == 2 else slice(ny - width, ny)), :] = True
        ends = (0.0, line, nx - 1.0, line)
    return gap, vignette, [Artefact("chip_edge", *ends, extent=width / 2 + vig_len, flux=fill)]


def masked_blocks(
    g: np.random.Generator, cfg: dict[str, Any], *, scale: float, shape: tuple[int, int]
) -> tuple[list[tuple[slice, slice, float]], list[Artefact]]:
    """Rectangles a pipeline masked (set to NaN or 0): bad regions, masked satellites, dead cells.

    Parameters
    ----------
    g : numpy.random.Generator
        The kind's generator.
    cfg : dict
        ``sky.artefacts.masked``: ``rate`` (mean per 1024² frame, scaled by area), ``size``
        [min, max] (px, each side), ``nan_fraction`` (probability a block reads NaN rather than 0).
    scale : float
        The frame's ``artefact_scale``.
    shape : tuple of int
        (ny, nx).

    Returns
    -------
    blocks : list of (slice, slice, float)
        Row slice, column slice and fill value of each block.
    rows : list of Artefact
        One ``masked`` row per block (centre; ``extent`` = half the longer side; ``flux`` = fill).
    """
    ny, nx = shape
    blocks, rows = [], []
    for _ in range(int(g.poisson(cfg["rate"] * scale * _area_factor(shape)))):
        w, h = (int(v) for v in g.integers(cfg["size"][0], cfg["size"][1] + 1, 2))
        x0, y0 = int(g.integers(0, max(nx - w, 0) + 1)), int(g.integers(0, max(ny - h, 0) + 1))
        fill = math.nan if g.random() < cfg["nan_fraction"] else 0.0
        w, h = min(w, nx - x0), min(h, ny - y0)
        blocks.append((slice(y0, y0 + h), slice(x0, x0 + w), fill))
        rows.append(Artefact("masked", x0 + (w - 1) / 2, y0 + (h - 1) / 2, extent=max(w, h) / 2, flux=fill))
    return blocks, rows


def amplifier_bounds(nx: int, n: int) -> np.ndarray:
    """Column where each of ``n`` side-by-side amplifiers starts, and the frame's width at the end."""
    return np.rint(np.linspace(0, nx, n + 1)).astype(int)


def crosstalk(
    data: np.ndarray,
    source: np.ndarray,
    sat_mask: np.ndarray,
    g: np.random.Generator,
    cfg: dict[str, Any],
    *,
    scale: float,
    saturation: float,
    amplifiers: int,
) -> list[Artefact]:
    """Crosstalk: a faint mirror image of each saturated source in the neighbouring amplifier.

    Amplifiers ``2j`` and ``2j + 1`` read out towards opposite sides, so a source at column ``x``
    of one appears at ``2 b - 1 - x`` in the other (``b``: their common boundary), scaled by the
    crosstalk coefficient. A pipeline removes the linear part; what is left is the image of the
    saturated pixels, whose true charge the electronics never saw.

    Parameters
    ----------
    data : numpy.ndarray
        Frame (ADU) after the noise, changed in place.
    source : numpy.ndarray
        Expected light (ADU) that drives the crosstalk (clipped at ``saturation``).
    sat_mask : numpy.ndarray
        Saturated pixels (bleed trails included).
    g : numpy.random.Generator
        The kind's generator.
    cfg : dict
        ``sky.artefacts.crosstalk``: ``rate`` (probability per saturated region), ``coefficient``
        (victim ADU per source ADU).
    scale : float
        The frame's ``artefact_scale``.
    saturation : float
        Saturation level (ADU).
    amplifiers : int
        Amplifiers side by side along x.

    Returns
    -------
    list of Artefact
        One ``crosstalk`` row per mirrored region: a segment for a region taller than 3x its width
        (a bleed trail), else its centre; ``extent`` = half the region's width (segment) or half its
        larger side; ``host`` is '' (the source is the saturated region at the mirrored position).
    """
    from scipy import ndimage

    ny, nx = data.shape
    bounds = amplifier_bounds(nx, amplifiers)
    if amplifiers < 2 or not sat_mask.any():
        return []
    labels, n = ndimage.label(ndimage.binary_dilation(sat_mask, iterations=2))
    draws = g.random(n)
    p = _probability(cfg["rate"], scale)
    out = []
    for lab, sl in enumerate(ndimage.find_objects(labels), start=1):
        if not draws[lab - 1] < p:
            continue
        cx = 0.5 * (sl[1].start + sl[1].stop - 1)
        amp = int(np.searchsorted(bounds, cx, side="right") - 1)
        partner = amp ^ 1
        if partner >= amplifiers:
            continue
        b = bounds[max(amp, partner)]
        region = labels[sl] == lab
        ys, xs = np.nonzero(region)
        ys, xs = ys + sl[0].start, xs + sl[1].start
        xm = 2 * b - 1 - xs
        ok = (xm >= 0) & (xm < nx)
        if not ok.any():
            continue
        signal = cfg["coefficient"] * np.minimum(source[ys[ok], xs[ok]], saturation)
        np.add.at(data, (ys[ok], xm[ok]), signal)
        x_lo, x_hi = xm[ok].min(), xm[ok].max()
        y_lo, y_hi = ys[ok].min(), ys[ok].max()
        w, h = x_hi - x_lo + 1, y_hi - y_lo + 1
        mx = 0.5 * (x_lo + x_hi)
        if h > 3 * w:
            out.append(Artefact("crosstalk", mx, float(y_lo), mx, float(y_hi), w / 2, float(signal.sum())))
        else:
            out.append(Artefact("crosstalk", mx, 0.5 * (y_lo + y_hi), extent=max(w, h) / 2, flux=float(signal.sum())))
    return out


def amp_steps(
    data: np.ndarray, g: np.random.Generator, cfg: dict[str, Any], *, scale: float, sky: float, amplifiers: int
) -> list[Artefact]:
    """A level step at an amplifier boundary: gain mismatch and bias offset of one amplifier.

    Parameters
    ----------
    data : numpy.ndarray
        Frame (ADU) after the noise, changed in place.
    g : numpy.random.Generator
        The kind's generator.
    cfg : dict
        ``sky.artefacts.amp_steps``: ``rate`` (probability per frame), ``gain_mismatch`` (fraction),
        ``offset`` (ADU); each drawn with a random sign and 0.5-1 times its size.
    scale : float
        The frame's ``artefact_scale``.
    sky : float
        Mean sky level (ADU): the step's size at the sky is ``offset + gain_mismatch * sky``.
    amplifiers : int
        Amplifiers side by side along x.

    Returns
    -------
    list of Artefact
        One ``amp_step`` segment along the boundary (``flux`` = step at the sky level, ADU), or none.
    """
    ny, nx = data.shape
    if amplifiers < 2 or not g.random() < _probability(cfg["rate"], scale):
        return []
    bounds = amplifier_bounds(nx, amplifiers)
    amp = int(g.integers(1, amplifiers))
    sign = g.choice([-1.0, 1.0], 2)
    dg = sign[0] * cfg["gain_mismatch"] * g.uniform(0.5, 1.0)
    off = sign[1] * cfg["offset"] * g.uniform(0.5, 1.0)
    cols = slice(bounds[amp], bounds[amp + 1])
    data[:, cols] = data[:, cols] * (1 + dg) + off
    edge = bounds[amp] - 0.5
    return [Artefact("amp_step", edge, 0.0, edge, ny - 1.0, flux=off + dg * sky)]


def pattern_noise(
    data: np.ndarray,
    g: np.random.Generator,
    cfg: dict[str, Any],
    *,
    scale: float,
    gain: float,
) -> list[Artefact]:
    """Correlated read noise: row offsets and a herringbone wave along the readout.

    Parameters
    ----------
    data : numpy.ndarray
        Frame (ADU) after the noise, changed in place.
    g : numpy.random.Generator
        The kind's generator.
    cfg : dict
        ``sky.artefacts.pattern_noise``: ``rate`` (probability per frame), ``rows`` (e- RMS of the
        row offsets), ``herringbone`` (e- amplitude), ``period`` [min, max] (px of readout per cycle).
    scale : float
        The frame's ``artefact_scale``.
    gain : float
        e-/ADU.

    Returns
    -------
    list of Artefact
        One ``pattern_noise`` row (frame centre, ``extent`` = half diagonal, ``flux`` = herringbone
        amplitude, ADU), or none.
    """
    ny, nx = data.shape
    if not g.random() < _probability(cfg["rate"], scale):
        return []
    rows = g.normal(0.0, cfg["rows"] / gain, ny)
    amp = cfg["herringbone"] / gain
    period = g.uniform(*cfg["period"])
    phase = g.uniform(0, 2 * np.pi)
    # The readout runs along rows: pixel index y nx + x; a period that does not divide nx tilts the
    # wave from row to row (the herringbone). sin(a + b) as outer products: cheap on a full frame.
    w = 2 * np.pi / period
    a = w * nx * np.arange(ny, dtype=float) + phase
    b = w * np.arange(nx, dtype=float)
    data += rows[:, None] + amp * (np.outer(np.sin(a), np.cos(b)) + np.outer(np.cos(a), np.sin(b)))
    return [Artefact("pattern_noise", (nx - 1) / 2, (ny - 1) / 2, extent=0.5 * math.hypot(nx, ny), flux=amp)]
