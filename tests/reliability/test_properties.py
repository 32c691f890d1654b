"""Property-based tests (hypothesis) of the geometry helpers: cutouts, pixel <-> sky, crossmatch.

Examples are derandomized (the same on every run, so CI is deterministic) and few (the cutout
property writes files).
"""

from __future__ import annotations

import math
import string
import tempfile
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS, FITSFixedWarning
from helpers import REPO
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from rbflow.config import load_telescope
from rbflow.crossmatch import crossmatch
from rbflow.cutouts import CHANNELS, EDGE, read_cutout, write_cutouts
from rbflow.frames import frames_of, image_name, parse_image
from rbflow.sky import frame_conditions

TELESCOPES = {
    name: load_telescope(path)
    for name, path in [
        ("demo", REPO / "config/telescopes/demo.yaml"),
        ("tiny", REPO / "tests/data/telescopes/tiny.yaml"),
    ]
}
#: 1e-6 px: the round-trip tolerance asked of every pixel <-> sky pair.
PIXEL_TOL = 1e-6

deterministic = settings(derandomize=True, deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])


def _sky_header(nx: int, ny: int, rot_deg: float, sip: list[float] | None) -> fits.Header:
    """A TAN (or TAN-SIP, coefficients ``sip`` of A_2_0, A_1_1, A_0_2, B_2_0, B_1_1, B_0_2) header."""
    c, s = math.cos(math.radians(rot_deg)), math.sin(math.radians(rot_deg))
    scale = 1.01 / 3600
    h = fits.Header()
    h["CTYPE1"], h["CTYPE2"] = ("RA---TAN-SIP", "DEC--TAN-SIP") if sip else ("RA---TAN", "DEC--TAN")
    h["CRVAL1"], h["CRVAL2"] = 150.0, 2.2
    h["CRPIX1"], h["CRPIX2"] = (nx + 1) / 2, (ny + 1) / 2
    h["CD1_1"], h["CD1_2"], h["CD2_1"], h["CD2_2"] = -scale * c, scale * s, scale * s, scale * c
    if sip:
        h["A_ORDER"] = h["B_ORDER"] = 2
        for key, value in zip(["A_2_0", "A_1_1", "A_0_2", "B_2_0", "B_1_1", "B_0_2"], sip):
            h[key] = value
    return h


def _wcs(header: fits.Header) -> WCS:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(header)


# --------------------------------------------------------------------------------------------
# Cutouts
# --------------------------------------------------------------------------------------------


@st.composite
def cutout_cases(draw):
    """A frame shape, an odd stamp size, candidate positions (edges and corners included), a WCS."""
    nx, ny = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    size = draw(st.sampled_from([3, 5, 7, 11, 15, 31]))

    def coordinate(n: int):
        # anywhere a detection can be (pixel centres -0.5 .. n-0.5), with the edges themselves likely
        return st.one_of(st.floats(-0.5, n - 0.5, allow_nan=False), st.sampled_from([-0.5, 0.0, n - 1.0, n - 0.5]))

    n = draw(st.integers(1, 6))
    xs = draw(st.lists(coordinate(nx), min_size=n, max_size=n))
    ys = draw(st.lists(coordinate(ny), min_size=n, max_size=n))
    flags = draw(st.lists(st.sampled_from([0, 2, 4, 8, 16, 2 | 16]), min_size=n, max_size=n))
    sip = draw(st.one_of(st.none(), st.lists(st.floats(-1e-4, 1e-4), min_size=6, max_size=6)))
    return nx, ny, size, xs, ys, flags, draw(st.floats(-180, 180)), sip


def _write_case(folder: Path, nx: int, ny: int, xs, ys, flags, rot: float, sip) -> tuple[Path, Path, dict]:
    """Subtraction MEF whose pixels encode (channel, x, y), and a candidate table."""
    yy, xx = np.mgrid[0:ny, 0:nx]
    planes = {name: (1e6 * k + 1000.0 * yy + xx).astype(np.float32) for k, name in enumerate(CHANNELS)}
    header = _sky_header(nx, ny, rot, sip)
    hdus = [fits.PrimaryHDU()] + [fits.ImageHDU(planes[name], header=header, name=name) for name in CHANNELS]
    fits.HDUList(hdus).writeto(folder / "sub.fits")
    n = len(xs)
    image = image_name("fld00_r_e1", 0)
    cands = Table(
        {
            "id": [f"{image}_{i}" for i in range(n)],
            "image": [image] * n,
            "x": np.asarray(xs, float),
            "y": np.asarray(ys, float),
            "ra": np.zeros(n),
            "dec": np.zeros(n),
            "mag": np.full(n, 18.0),
            "mag_err": np.full(n, 0.01),
            "snr": np.full(n, 50.0),
            "fwhm": np.full(n, 2.5),
            "flags": np.asarray(flags, dtype=np.int64),
        }
    )
    cands.write(folder / "cands.ecsv", format="ascii.ecsv")
    return folder / "sub.fits", folder / "cands.ecsv", planes


@deterministic
@given(cutout_cases())
def test_cutout_at_any_position(case):
    nx, ny, size, xs, ys, flags, rot, sip = case
    half = size // 2
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sub, cands, planes = _write_case(folder, nx, ny, xs, ys, flags, rot, sip)
        manifest = write_cutouts(sub, cands, folder / "out", size=size, png=False)
        frame_wcs = _wcs(_sky_header(nx, ny, rot, sip))
        for k, row in enumerate(manifest):
            header, stamps = read_cutout(folder / "out" / row["file"])
            cx, cy = math.floor(xs[k] + 0.5), math.floor(ys[k] + 0.5)  # pixel holding the position
            x0, y0 = cx - half, cy - half
            assert (row["xpix0"], row["ypix0"]) == (x0, y0) == (header["XPIX0"], header["YPIX0"])
            crosses = x0 < 0 or y0 < 0 or x0 + size > nx or y0 + size > ny
            assert row["flags"] == flags[k] | (EDGE if crosses else 0) == header["FLAGS"]
            j, i = np.mgrid[0:size, 0:size]
            fx, fy = x0 + i, y0 + j
            inside = (fx >= 0) & (fx < nx) & (fy >= 0) & (fy < ny)
            for name in CHANNELS:
                stamp = stamps[name]
                assert stamp.shape == (size, size)
                assert np.all(np.isnan(stamp[~inside]))  # FILLVAL NaN off the frame
                np.testing.assert_array_equal(stamp[inside], planes[name][fy[inside], fx[inside]])
            if 0 <= cx < nx and 0 <= cy < ny:  # the centre pixel is the requested one
                assert stamps["SCI"][half, half] == planes["SCI"][cy, cx]
            # the stamp's WCS is the frame's, shifted: same sky position for the same pixel
            stamp_wcs = _wcs(fits.getheader(folder / "out" / row["file"], "SCI"))
            got = np.array(stamp_wcs.pixel_to_world_values(i.ravel()[:: size + 1], j.ravel()[:: size + 1]))
            want = np.array(frame_wcs.pixel_to_world_values(fx.ravel()[:: size + 1], fy.ravel()[:: size + 1]))
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)


# --------------------------------------------------------------------------------------------
# Pixel <-> sky
# --------------------------------------------------------------------------------------------


@deterministic
@given(
    st.sampled_from(sorted(TELESCOPES)),
    st.data(),
    st.integers(0, 2**62),
    st.floats(0.0, 1.0),
    st.floats(0.0, 1.0),
)
def test_demo_frame_geometry_round_trips(tel_name, data, seed, u, v):
    """The true (distorted) geometry of a demo frame and its header WCS both invert to 1e-6 px."""
    tel = TELESCOPES[tel_name]
    frame = data.draw(st.sampled_from([f.name for f in frames_of(tel)]))
    cond = frame_conditions(tel, frame, seed=seed)
    ny, nx = cond.shape
    x, y = np.array([u * nx - 0.5]), np.array([v * ny - 0.5])
    ra, dec = cond.pixel_to_world(x, y)
    x2, y2 = cond.world_to_pixel(ra, dec)
    assert np.hypot(x2 - x, y2 - y).max() < PIXEL_TOL
    wcs = cond.header_wcs
    x3, y3 = wcs.world_to_pixel_values(*wcs.pixel_to_world_values(x, y))
    assert np.hypot(x3 - x, y3 - y).max() < PIXEL_TOL


@deterministic
@given(
    st.integers(64, 4096),
    st.integers(64, 4096),
    st.floats(-180, 180),
    st.one_of(st.none(), st.lists(st.floats(-1.0, 1.0), min_size=6, max_size=6)),
    st.floats(0.0, 1.0),
    st.floats(0.0, 1.0),
)
def test_tan_and_sip_round_trip(nx, ny, rot, sip_shape, u, v):
    """pixel -> sky -> pixel with the calls rbflow makes (``*_values``) returns within 1e-6 px (TAN).

    SIP coefficients are scaled so that the distortion reaches at most 4 px at the frame corner, as in
    real cameras. With SIP the inverse is astropy's iteration (tolerance 1e-4 px), which stops within
    a few 1e-6 px at the corners: 1e-5 px is asked there, still 10^4 times below a centroid error.
    """
    r2 = ((nx / 2) ** 2 + (ny / 2) ** 2) or 1.0
    sip = None if sip_shape is None else [4.0 / 3 * c / r2 for c in sip_shape]
    wcs = _wcs(_sky_header(nx, ny, rot, sip))
    x, y = np.array([u * nx - 0.5]), np.array([v * ny - 0.5])
    x2, y2 = wcs.world_to_pixel_values(*wcs.pixel_to_world_values(x, y))
    assert np.hypot(x2 - x, y2 - y).max() < (PIXEL_TOL if sip is None else 10 * PIXEL_TOL)


@deterministic
@given(
    st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=20).filter(lambda s: s[0].isalnum()),
    st.one_of(st.none(), st.integers(0, 99)),
)
def test_image_names_round_trip(frame, realization):
    """Frame names (as the workflow's wildcard constraint allows them) and realizations round-trip."""
    assume(parse_image(frame) == (frame, None))  # science frames named like a realization are skipped
    assert parse_image(image_name(frame, realization)) == (frame, realization)


# --------------------------------------------------------------------------------------------
# Crossmatch
# --------------------------------------------------------------------------------------------


def _points(prefix: str, xy: list[tuple[float, float, int]]) -> Table:
    n = len(xy)
    return Table(
        {
            "id": [f"{prefix}{i}" for i in range(n)],
            "image": [f"img{im}" for _, _, im in xy],
            "x": np.array([p[0] for p in xy], dtype=float),
            "y": np.array([p[1] for p in xy], dtype=float),
            "mag": np.full(n, 18.0),
            "mag_err": np.full(n, 0.01),
            "snr": np.full(n, 50.0),
        }
    )


def _nearest(per: Table) -> dict[str, str]:
    return {str(r["id"]): str(r["cand_id"]) for r in per if r["detected"]}


point_lists = st.lists(st.tuples(st.floats(0, 30), st.floats(0, 30), st.integers(0, 1)), max_size=12)


@deterministic
@given(point_lists, point_lists, st.floats(0.5, 8.0))
def test_crossmatch_is_symmetric_and_matches_each_candidate_once(a_xy, b_xy, radius):
    # exact distance ties make "the nearest" a matter of order: excluded
    d = [round(math.hypot(p[0] - q[0], p[1] - q[1]), 9) for p in a_xy for q in b_xy if p[2] == q[2]]
    assume(len(set(d)) == len(d) and all(abs(v - radius) > 1e-9 for v in d))
    A, B = _points("a", a_xy), _points("b", b_xy)
    per_ab, lab_ab = crossmatch(B, A, radius=radius)  # A injected, B candidates
    per_ba, lab_ba = crossmatch(A, B, radius=radius)  # and the other way round
    for per, lab, _inj, cand in ((per_ab, lab_ab, A, B), (per_ba, lab_ba, B, A)):
        # every candidate has exactly one label; separations within the radius; same image only
        assert sorted(lab["id"]) == sorted(cand["id"])
        matched = per[per["detected"]]
        assert np.all(matched["sep"] <= radius)
        assert np.all(lab["sep"][lab["match_kind"] == "injected"] <= radius)
        images = dict(zip(cand["id"], cand["image"]))
        assert all(images[c] == im for c, im in zip(matched["cand_id"], matched["image"]))
        # the nearest candidate: no candidate of the same image is closer, none within the radius is missed
        for row in per:
            same = cand[cand["image"] == row["image"]]
            dist = np.hypot(same["x"] - row["x"], same["y"] - row["y"])
            assert row["detected"] == bool(np.any(dist <= radius))
            if row["detected"]:
                assert math.isclose(row["sep"], dist.min(), abs_tol=1e-9)
        # no injected source makes two candidates true; a candidate nearest to two sources is flagged
        true_inj = lab["inj_id"][(lab["label"] == "true") & (lab["match_kind"] == "injected")]
        assert len(set(true_inj)) == len(true_inj)
        ids, counts = np.unique(np.asarray(matched["cand_id"]), return_counts=True)
        assert np.all(matched["ambiguous"][np.isin(matched["cand_id"], ids[counts > 1])])
    ab, ba = _nearest(per_ab), _nearest(per_ba)
    mutual = {(a, b) for a, b in ab.items() if ba.get(b) == a}
    assert mutual == {(a, b) for b, a in ba.items() if ab.get(a) == b}
    # the true pairs of one direction, transposed, meet those of the other exactly in the mutual pairs
    true_ab = {(str(r["inj_id"]), str(r["id"])) for r in lab_ab if r["label"] == "true"}
    true_ba = {(str(r["id"]), str(r["inj_id"])) for r in lab_ba if r["label"] == "true"}
    assert mutual <= true_ab and mutual <= true_ba
    assert true_ab & true_ba == mutual
