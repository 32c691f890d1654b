"""Tests of the bogus zoo (rbflow.artefacts through rbflow.sky.simulate_frame): each kind appears where
and as often as the ``sky.artefacts`` block says, and its truth row says where its light is."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
from helpers import CLEAN_SKY
from numpy.testing import assert_allclose
from scipy import ndimage

from rbflow import artefacts, sky
from rbflow.config import check_schema, load_telescope
from rbflow.io import read_table

DEMO = Path(__file__).resolve().parents[1] / "config" / "telescopes" / "demo.yaml"
SEED = 777
#: A sky with nothing but the sky: every excess is the artefact under test.
BARE = dict(CLEAN_SKY, stars=0, flat_residual=0.0, sky_gradient=0.0)


def telescope(zoo: dict | None = None, **sky_block) -> dict:
    """The demo telescope with a small sky (1 field, 256^2) and the given ``artefacts`` block."""
    tel = load_telescope(DEMO)
    tel["sky"] = {"fields": 1, "epochs": 2, "size": [256, 256], **sky_block, "artefacts": copy.deepcopy(zoo or {})}
    check_schema(tel["sky"], "sky.schema.yaml", "test sky block")
    return tel


def frames(tel: dict) -> list[str]:
    n = tel["sky"]["epochs"]
    return ["fld00_r_ref", *(f"fld00_r_e{e}" for e in range(1, n + 1))]


def seg_distance(xx, yy, row) -> np.ndarray:
    """Distance (px) of pixels from a truth row's segment (or point)."""
    x0, y0 = row["x"], row["y"]
    if not np.isfinite(row["x1"]):
        return np.hypot(xx - x0, yy - y0)
    dx, dy = row["x1"] - x0, row["y1"] - y0
    t = np.clip(((xx - x0) * dx + (yy - y0) * dy) / max(dx * dx + dy * dy, 1e-12), 0, 1)
    return np.hypot(xx - x0 - t * dx, yy - y0 - t * dy)


def excess_near(hdu, row, radius: float) -> tuple[float, float]:
    """Sum of (data - sky) within ``radius`` of a truth row's geometry, and its noise (ADU)."""
    data = hdu.data.astype(float)
    h = hdu.header
    yy, xx = np.mgrid[: data.shape[0], : data.shape[1]]
    near = seg_distance(xx, yy, row) <= radius
    sigma = math.sqrt(h["SKYLEVEL"] * h["GAIN"] + h["RDNOISE"] ** 2) / h["GAIN"]
    return float((data[near] - h["SKYLEVEL"]).sum()), sigma * math.sqrt(near.sum())


# ------------------------------------------------------------------------------------------------
# switches, rates, independence, determinism
# ------------------------------------------------------------------------------------------------
def test_every_kind_is_off_by_default_and_truth_has_the_contract_columns():
    tel = telescope(stars=300, star_mags=[9.0, 20.0])
    hdu, truth = sky.simulate_frame(tel, "fld00_r_ref", seed=SEED)
    assert not set(truth["kind"]) & set(artefacts.ZOO_KINDS)
    assert {"x1", "y1", "ra1", "dec1", "extent"} <= set(truth.colnames)
    assert truth["x1"].unit == "pix" and truth["ra1"].unit == "deg" and truth["extent"].unit == "pix"
    for card in ("NGLINT", "NGHOST", "NASTEROI", "NMASKED"):
        assert hdu.header[card] == 0
    assert hdu.header["ARTSCALE"] == 1.0
    assert set(sky.REAL_KINDS) <= set(sky.TRUTH_KINDS) and "asteroid" in sky.REAL_KINDS
    assert set(artefacts.ZOO_KINDS) <= set(sky.TRUTH_KINDS)
    # Compact things have no far end; bad columns and bleed trails are segments along a column.
    pts = truth[np.isin(truth["kind"], ["star", "hot_pixel"])]
    assert np.all(np.isnan(pts["x1"])) and np.all(np.isnan(pts["ra1"])) and np.all(pts["extent"] == 0)
    for kind in ("bad_column", "bleed"):
        rows = truth[truth["kind"] == kind]
        assert len(rows) and np.all(rows["x1"] == rows["x"]) and np.all(rows["y1"] >= rows["y"])
    cond = sky.frame_conditions(tel, "fld00_r_ref", seed=SEED)
    lin = truth[np.isfinite(truth["x1"])]
    ra1, dec1 = cond.pixel_to_world(lin["x1"], lin["y1"])
    assert_allclose(lin["ra1"], ra1, atol=1e-10) and assert_allclose(lin["dec1"], dec1, atol=1e-10)


COUNTED = {
    "masked": {"rate": 128.0},  # 128 per 1024^2 = 2 per 128^2 frame
    "asteroids": {"rate": 128.0},  # science frames only
    "chip_edges": {"rate": 0.5},  # probability per frame
    "glints": {"rate": 8.0},  # per 1024^2 frame, scaled by the diagonal: 1 per 128^2 frame
}


@pytest.fixture(scope="module")
def counted():
    """Truth of 25 small frames (1 reference, 24 epochs) with counted kinds on, at artefact_scale 1 and 2."""
    tel = telescope(COUNTED, **BARE, size=[128, 128], epochs=24)
    out = {1.0: {f: sky.simulate_frame(tel, f, seed=SEED)[1] for f in frames(tel)}}
    real = sky.frame_conditions
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sky, "frame_conditions", lambda *a, **k: dataclasses.replace(real(*a, **k), artefact_scale=2.0))
        out[2.0] = {f: sky.simulate_frame(tel, f, seed=SEED)[1] for f in frames(tel)}
    return tel, out


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_rates_give_their_poisson_means(counted, scale):
    tel, out = counted
    truths = out[scale]
    sci = [t for f, t in truths.items() if not f.endswith("_ref")]
    area = 128 * 128 / 1024**2
    # Poisson counts summed over frames: expect the mean, within 4 standard deviations.
    for kind, per_frame, pool in (
        ("masked", 128.0 * area, list(truths.values())),
        ("asteroid", 128.0 * area, sci),
        ("glint", 8.0 * 128 / 1024, sci),
    ):
        mean = scale * per_frame * len(pool)
        n = sum(int((t["kind"] == kind).sum()) for t in pool)
        assert abs(n - mean) < 4 * math.sqrt(mean), (kind, n, mean)
    # A probability per frame: binomial, within 4 standard deviations.
    p = min(1.0, 0.5 * scale)
    n = sum(int((t["kind"] == "chip_edge").sum()) for t in truths.values())
    assert abs(n - p * len(truths)) <= 4 * math.sqrt(len(truths) * p * (1 - p)) + 1e-9
    assert "asteroid" not in set(truths["fld00_r_ref"]["kind"])  # a stack rejects moving objects


def test_one_kinds_rate_leaves_the_others_draws(counted):
    tel, out = counted
    zoo = dict(COUNTED, glints={"rate": 40.0})
    tel2 = telescope(zoo, **BARE, size=[128, 128], epochs=24)
    for frame in ("fld00_r_e3", "fld00_r_e7"):
        a, b = out[1.0][frame], sky.simulate_frame(tel2, frame, seed=SEED)[1]
        for kind in ("masked", "asteroid", "chip_edge", "cosmic_ray"):
            ra, rb = a[a["kind"] == kind], b[b["kind"] == kind]
            assert len(ra) == len(rb)
            for col in ("x", "y", "x1", "y1", "extent", "mag"):
                assert_allclose(ra[col], rb[col], equal_nan=True)


def test_all_kinds_on_is_byte_identical_for_a_seed(tmp_path):
    zoo = {k: {"rate": 1.0} for k in ("ghosts", "spikes", "halos", "crosstalk", "amp_steps", "chip_edges")}
    zoo.update(masked={"rate": 100.0}, asteroids={"rate": 200.0}, glints={"rate": 30.0}, flares={"rate": 30.0})
    zoo.update(fringing={"rate": 1.0, "filters": ["r"]}, pattern_noise={"rate": 1.0}, trails_through_stars=0.5)
    tel = telescope(zoo, stars=200, star_mags=[9.0, 21.0], size=[160, 160])
    paths = [(tmp_path / f"{n}.fits", tmp_path / f"{n}.ecsv") for n in "ab"]
    for fits_path, ecsv in paths:
        sky.write_frame(tel, "fld00_r_e1", fits_path, ecsv, seed=SEED)
    assert paths[0][0].read_bytes() == paths[1][0].read_bytes()
    assert paths[0][1].read_bytes() == paths[1][1].read_bytes()
    truth = read_table(paths[0][1])
    assert {"asteroid", "masked", "glint", "flare", "fringe", "pattern_noise"} <= set(truth["kind"])


# ------------------------------------------------------------------------------------------------
# geometry: the light is where the truth says
# ------------------------------------------------------------------------------------------------
def test_trails_put_their_truth_flux_along_their_segment():
    tel = telescope({"flares": {"rate": 4.0}}, **dict(BARE, satellite_rate=0.5), epochs=8)
    checked = set()
    for frame in frames(tel)[1:]:
        hdu, truth = sky.simulate_frame(tel, frame, seed=SEED)
        rows = truth[np.isin(truth["kind"], ["satellite", "flare"])]
        if len(rows) != 1:  # crossing trails share light: measure frames with one trail
            continue
        row = rows[0]
        # Ends on the frame's border pixels: a trail crosses the whole frame.
        ends = np.array([[row["x"], row["y"]], [row["x1"], row["y1"]]])
        assert (np.isclose(ends, 0, atol=1e-6) | np.isclose(ends, 255, atol=1e-6)).any(axis=1).all()
        # Within 2 extents (6 sigma) of the segment lies all of the light the truth records: 5 sigma of noise.
        excess, noise = excess_near(hdu, row, 2 * row["extent"])
        assert abs(excess - row["flux"]) < 5 * noise
        checked.add(row["kind"])
    assert checked == {"satellite", "flare"}


def test_glint_dots_and_asteroid_trails_hold_their_flux_on_the_segment():
    tel = telescope({"glints": {"rate": 24.0}, "asteroids": {"rate": 64.0}}, **BARE)
    hdu, truth = sky.simulate_frame(tel, "fld00_r_e1", seed=SEED)
    rows = truth[np.isin(truth["kind"], ["glint", "asteroid"])]
    assert {"glint", "asteroid"} <= set(rows["kind"])
    zp, fwhm = hdu.header["MAGZP"], hdu.header["SEEING"]
    checked = set()
    for row in rows:
        if row["kind"] == "asteroid":
            assert_allclose(row["flux"], 10 ** (-0.4 * (row["mag"] - zp)), rtol=1e-12)
            assert row["host"] == ""
        # Rows whose light overlaps another's are not measured (sampled along the others' segments).
        others = rows[rows["id"] != row["id"]]
        t = np.linspace(0, 1, 200)[:, None]
        ox = np.concatenate([o["x"] + t * (np.nan_to_num(o["x1"], nan=o["x"]) - o["x"]) for o in others] or [[]])
        oy = np.concatenate([o["y"] + t * (np.nan_to_num(o["y1"], nan=o["y"]) - o["y"]) for o in others] or [[]])
        if len(ox) and seg_distance(ox.ravel(), oy.ravel(), row).min() < 10 * fwhm:
            continue
        # Within 4 FWHM of the segment a Moffat (beta 2.5) holds 99 % of its light: 1.5 % plus 5 sigma.
        excess, noise = excess_near(hdu, row, 4 * fwhm)
        assert abs(excess - 0.99 * row["flux"]) < 0.015 * row["flux"] + 5 * noise
        checked.add(row["kind"])
    assert checked == {"glint", "asteroid"}


@pytest.fixture(scope="module")
def bright():
    """A field of bright stars with every bright-star kind on, and without ghosts or without crosstalk."""
    zoo = {k: {"rate": 1.0} for k in ("ghosts", "spikes", "halos", "crosstalk")}
    zoo["ghosts"].update(axis=[0.2, 0.3], offset=0.15, min_peak=1.0)
    block = dict(BARE, stars=600, star_mags=[9.5, 13.0], bleed_trails=True)
    out = {}
    for name, off in (("on", None), ("no_ghosts", "ghosts"), ("no_crosstalk", "crosstalk")):
        z = copy.deepcopy(zoo)
        if off:
            z[off]["rate"] = 0.0
        tel = telescope(z, **block)
        out[name] = {f: sky.simulate_frame(tel, f, seed=SEED) for f in ("fld00_r_ref", "fld00_r_e1")}
    return out


def test_ghosts_sit_at_the_stated_offset_from_their_star(bright):
    # Positions, in a crowded field of bright stars with every kind on.
    hdu, truth = bright["on"]["fld00_r_ref"]
    ny, nx = hdu.data.shape
    ax, ay = 0.2 * (nx - 1), 0.3 * (ny - 1)
    ghosts = truth[truth["kind"] == "ghost"]
    assert len(ghosts) >= 2 and hdu.header["NGHOST"] == len(ghosts)
    for g in ghosts:
        star = truth[truth["id"] == g["host"]][0]
        assert star["kind"] == "star"
        assert_allclose([g["x"], g["y"]], [ax + 1.15 * (star["x"] - ax), ay + 1.15 * (star["y"] - ay)], atol=1e-9)
    # Light: a few very bright stars, ghosts far from them (offset 0.6), nothing else; on minus off.
    zoo = {"ghosts": {"rate": 1.0, "axis": [0.5, 0.5], "offset": 0.6, "radius": [10.0, 20.0]}}
    block = dict(BARE, stars=60, star_mags=[9.5, 10.0], bleed_trails=False)
    hdu, truth = sky.simulate_frame(telescope(zoo, **block), "fld00_r_ref", seed=SEED)
    hdu0 = sky.simulate_frame(telescope({}, **block), "fld00_r_ref", seed=SEED)[0]
    diff = hdu.data.astype(float) - hdu0.data.astype(float)
    yy, xx = np.mgrid[:ny, :nx]
    measured = 0
    for g in truth[truth["kind"] == "ghost"]:
        star = truth[truth["id"] == g["host"]][0]
        r = np.hypot(xx - g["x"], yy - g["y"])
        if not (g["extent"] + 2 < g["x"] < nx - 3 - g["extent"] and g["extent"] + 2 < g["y"] < ny - 3 - g["extent"]):
            continue
        if np.hypot(g["x"] - star["x"], g["y"] - star["y"]) < g["extent"] + 15:
            continue
        assert_allclose(g["flux"], 0.005 * star["flux"], rtol=1e-9)  # wholly in the frame
        # A donut: the ring holds the light (its noise: two frames, 5 sigma), the hole is empty.
        ring = (r <= g["extent"] + 1) & (r >= 0.4 * g["extent"] - 1)
        sigma = math.sqrt(2 * hdu.header["SKYLEVEL"] / hdu.header["GAIN"])
        assert abs(diff[ring].sum() - g["flux"]) < 5 * sigma * math.sqrt(ring.sum())
        hole = r < 0.4 * g["extent"] - 1
        assert abs(diff[hole].mean()) < 5 * sigma / math.sqrt(hole.sum())
        w = diff[ring]
        centroid = [np.sum(w * xx[ring]) / w.sum(), np.sum(w * yy[ring]) / w.sum()]
        assert_allclose(centroid, [g["x"], g["y"]], atol=0.5)
        measured += 1
    assert measured >= 1


def test_spikes_cross_their_star_and_halos_follow_saturated_stars(bright):
    ref_hdu, ref = bright["on"]["fld00_r_ref"]
    sci_hdu, sci = bright["on"]["fld00_r_e1"]
    spikes = ref[ref["kind"] == "spike"]
    assert len(spikes) >= 4 and len(spikes) % 2 == 0
    for s in spikes:
        star = ref[ref["id"] == s["host"]][0]
        assert_allclose([(s["x"] + s["x1"]) / 2, (s["y"] + s["y1"]) / 2], [star["x"], star["y"]], atol=1e-9)
        assert np.isclose(s["x"], s["x1"]) or np.isclose(s["y"], s["y1"])  # vanes along the axes (angle 0)
    # The deep reference saturates more stars, so it has more halos; a halo's host is a saturated star.
    halos_ref, halos_sci = ref[ref["kind"] == "halo"], sci[sci["kind"] == "halo"]
    assert len(halos_ref) > len(halos_sci) >= 1
    for t, h in ((ref, halos_ref), (sci, halos_sci)):
        hosts = [t[t["id"] == host][0] for host in h["host"]]
        for star in hosts:  # saturated, or within 2 % of it (the peak is estimated before bleeding)
            hdu = ref_hdu if t is ref else sci_hdu
            ix, iy = int(round(star["x"])), int(round(star["y"]))
            assert star["saturated"] or hdu.data[iy - 1 : iy + 2, ix - 1 : ix + 2].max() > 0.98 * hdu.header["SATURATE"]
        assert_allclose(h["x"], [star["x"] for star in hosts], atol=1e-9)
        assert_allclose(h["y"], [star["y"] for star in hosts], atol=1e-9)
    assert ref_hdu.header["NHALO"] == len(halos_ref) and sci_hdu.header["NSPIKE"] == (sci["kind"] == "spike").sum()


def test_crosstalk_mirrors_saturated_sources_into_the_other_amplifier(bright):
    hdu, truth = bright["on"]["fld00_r_ref"]
    hdu0 = bright["no_crosstalk"]["fld00_r_ref"][0]
    xt = truth[truth["kind"] == "crosstalk"]
    assert len(xt) >= 2
    data = hdu.data.astype(float)
    ny, nx = data.shape
    to_saturated = ndimage.distance_transform_edt(data < hdu.header["SATURATE"])
    diff = data - hdu0.data.astype(float)
    yy, xx = np.mgrid[:ny, :nx]
    for row in xt:
        # The mirror image (about the amplifier boundary nx/2) of the row's position (both ends of a
        # streak) lies on a saturated region: within the row's extent of a saturated pixel.
        ys = [row["y"], row["y1"]] if np.isfinite(row["y1"]) else [row["y"]]
        for y in ys:
            assert to_saturated[int(round(y)), int(round(nx - 1 - row["x"]))] <= row["extent"] + 1, row
        # Its signal is in the image: on minus off around it holds the truth flux, within the noise
        # of both frames (5 sigma) where the victim pixels are not clipped.
        region = (seg_distance(xx, yy, row) <= row["extent"] + 1) & (data < hdu.header["SATURATE"])
        sigma = math.sqrt(hdu.header["SKYLEVEL"] / hdu.header["GAIN"])
        assert diff[region].sum() > 0.5 * row["flux"] - 5 * math.sqrt(2 * region.sum()) * sigma


# ------------------------------------------------------------------------------------------------
# detector and pipeline kinds
# ------------------------------------------------------------------------------------------------
def test_amp_step_chip_edge_and_masked_blocks_are_where_the_truth_says():
    zoo = {"amp_steps": {"rate": 1.0, "offset": 20.0}, "chip_edges": {"rate": 1.0}, "masked": {"rate": 64.0}}
    tel = telescope(zoo, **BARE)
    hdu, truth = sky.simulate_frame(tel, "fld00_r_e1", seed=SEED)
    data = hdu.data.astype(float)
    ny, nx = data.shape
    step = truth[truth["kind"] == "amp_step"][0]
    assert step["x"] == step["x1"] == nx / 2 - 0.5 and step["y"] == 0 and step["y1"] == ny - 1
    masked = np.zeros(data.shape, bool)
    for row in truth[np.isin(truth["kind"], ["chip_edge", "masked"])]:
        yy, xx = np.mgrid[:ny, :nx]
        if row["kind"] == "masked":
            box = (np.abs(xx - row["x"]) <= row["extent"]) & (np.abs(yy - row["y"]) <= row["extent"])
            hit = box & ((data == 0) | np.isnan(data))
            assert hit.sum() >= 8 * 8 * 0.5  # the block (side >= 8 px) reads its fill value
            assert np.isnan(row["flux"]) == np.isnan(data[hit]).all()
        else:
            gap = seg_distance(xx, yy, row) <= row["extent"] - 8.0  # extent = half gap + 8 px of vignetting
            assert gap.sum() >= ny and np.all(np.isnan(data[gap]) if np.isnan(row["flux"]) else data[gap] == 0)
        masked |= (data == 0) | np.isnan(data)
    # The step at the boundary: right minus left medians of the sky is the truth step (ADU).
    left = data[:, nx // 2 - 40 : nx // 2][~masked[:, nx // 2 - 40 : nx // 2]]
    right = data[:, nx // 2 : nx // 2 + 40][~masked[:, nx // 2 : nx // 2 + 40]]
    sigma = hdu.header["SKYLEVEL"] ** 0.5 / hdu.header["GAIN"] ** 0.5
    assert abs((np.median(right) - np.median(left)) - step["flux"]) < 6 * 1.25 * sigma / math.sqrt(
        min(left.size, right.size)
    )


def test_reference_only_kinds_stay_in_the_reference():
    zoo = {"masked": {"rate": 64.0, "frames": "reference"}, "asteroids": {"rate": 64.0}, "pattern_noise": {"rate": 1.0}}
    tel = telescope(zoo, **BARE)
    (ref_hdu, ref), (sci_hdu, sci) = (sky.simulate_frame(tel, f, seed=SEED) for f in ("fld00_r_ref", "fld00_r_e1"))
    assert (ref["kind"] == "masked").sum() >= 1 and "masked" not in set(sci["kind"])
    assert not ((sci_hdu.data == 0) | np.isnan(sci_hdu.data)).any()
    # Science-only kinds by default: asteroids and pattern noise.
    assert {"asteroid", "pattern_noise"} <= set(sci["kind"]) and not {"asteroid", "pattern_noise"} & set(ref["kind"])


def test_fringing_only_in_its_filters_and_pattern_noise_correlates_rows():
    zoo = {"fringing": {"rate": 1.0, "filters": ["g"]}, "pattern_noise": {"rate": 1.0, "rows": 20.0}}
    tel = telescope(zoo, **BARE, fields=2)
    r_truth = sky.simulate_frame(tel, "fld00_r_e1", seed=SEED)[1]
    g_hdu, g_truth = sky.simulate_frame(tel, "fld01_g_e1", seed=SEED)
    assert "fringe" not in set(r_truth["kind"]) and (g_truth["kind"] == "fringe").sum() == 1
    fringe = g_truth[g_truth["kind"] == "fringe"][0]
    # Peak fringe at most 3 % of the sky (0.5-1 times the amplitude).
    assert 0 < fringe["flux"] <= 0.03 * g_hdu.header["SKYLEVEL"] * (1 + 1e-9)
    # Row offsets of 20 e- RMS: the scatter of the row means is far above white noise's.
    data = g_hdu.data.astype(float)
    sigma_rows = np.std(data.mean(axis=1))
    white = math.sqrt(g_hdu.header["SKYLEVEL"] / g_hdu.header["GAIN"]) / math.sqrt(data.shape[1])
    assert sigma_rows > 3 * white
    assert_allclose(sigma_rows, 20.0 / g_hdu.header["GAIN"], rtol=0.3)  # 256 rows: 9 % sampling error, + fringes


def test_trails_aimed_through_stars_cross_their_host():
    zoo = {"trails_through_stars": 1.0, "glints": {"rate": 24.0}, "flares": {"rate": 24.0}}
    tel = telescope(zoo, **dict(CLEAN_SKY, satellite_rate=1.0), stars=400, star_mags=[14.0, 18.0])
    truth = sky.simulate_frame(tel, "fld00_r_e1", seed=SEED)[1]
    rows = truth[np.isin(truth["kind"], ["satellite", "glint", "flare"])]
    assert len(rows) >= 3 and np.all(rows["host"] != "")
    for row in rows:
        star = truth[truth["id"] == row["host"]][0]
        dx, dy = row["x1"] - row["x"], row["y1"] - row["y"]
        if math.hypot(dx, dy) < 1:  # a glint with one dot in the frame: that dot is on the line
            continue
        # Perpendicular distance of the star from the line of the trail (a glint's dots step past it).
        dist = abs(dx * (star["y"] - row["y"]) - dy * (star["x"] - row["x"])) / math.hypot(dx, dy)
        assert dist < 1e-6
