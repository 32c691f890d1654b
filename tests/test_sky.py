"""Tests of rbflow.sky: the synthetic frames must obey their own truth (noise, PSF, zeropoint, WCS)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from helpers import CLEAN_SKY
from numpy.testing import assert_allclose
from photutils.aperture import CircularAperture, aperture_photometry
from scipy import ndimage, optimize

from rbflow import sky
from rbflow.config import check_schema, load_telescope
from rbflow.errors import ConfigError, InputError
from rbflow.frames import frames_of
from rbflow.io import read_image, read_table

DEMO = Path(__file__).resolve().parents[1] / "config" / "telescopes" / "demo.yaml"
SEED = 12345
CLEAN = CLEAN_SKY


def telescope(**sky_block) -> dict:
    """The demo telescope with a small sky (1 field, 2 epochs, 256^2) and the given overrides."""
    tel = load_telescope(DEMO)
    tel["sky"] = {"fields": 1, "epochs": 2, "size": [256, 256], **sky_block}
    check_schema(tel["sky"], "sky.schema.yaml", "test sky block")
    return tel


def moffat_fraction(r, alpha, beta):
    """Fraction of a circular Moffat's light within radius r."""
    return 1 - (1 + (r / alpha) ** 2) ** (1 - beta)


def isolated(truth, *, radius: float, ratio: float = 0.01):
    """Rows of point sources with no other object brighter than ``ratio`` of their flux within ``radius`` px."""
    obj = truth[np.isin(truth["kind"], ["star", "variable", "transient", "galaxy"])]
    keep = []
    for row in obj[np.isin(obj["kind"], ["star", "variable", "transient"])]:
        d = np.hypot(obj["x"] - row["x"], obj["y"] - row["y"])
        near = (d < radius) & (d > 0) & (obj["flux"] > ratio * row["flux"])
        if not near.any():
            keep.append(row["id"])
    return truth[np.isin(truth["id"], keep)]


def fit_moffat(data, x, y, beta, *, half=10, oversample=5):
    """Least-squares fit of a pixel-integrated elliptical Moffat (fixed beta): returns x0, y0, FWHM (geometric mean)."""
    ix, iy = int(round(x)), int(round(y))
    stamp = data[iy - half : iy + half + 1, ix - half : ix + half + 1].astype(float)
    sub = (np.arange(oversample) + 0.5) / oversample - 0.5
    g = (np.arange(-half, half + 1)[:, None] + sub[None, :]).ravel()

    def model(p):
        amp, x0, y0, la, lb, th, bkg = p
        gx, gy = g[None, :] - x0, g[:, None] - y0
        u, v = gx * np.cos(th) + gy * np.sin(th), gy * np.cos(th) - gx * np.sin(th)
        m = (1 + (u / np.exp(la)) ** 2 + (v / np.exp(lb)) ** 2) ** (-beta)
        n = 2 * half + 1
        return amp * m.reshape(n, oversample, n, oversample).mean(axis=(1, 3)) + bkg

    a0 = np.log(1.5)
    p0 = [stamp.max() - np.median(stamp), x - ix, y - iy, a0, a0, 0.0, np.median(stamp)]
    res = optimize.least_squares(lambda p: (model(p) - stamp).ravel(), p0, method="lm")
    amp, x0, y0, la, lb, th, bkg = res.x
    fwhm = 2 * np.exp(0.5 * (la + lb)) * np.sqrt(2 ** (1 / beta) - 1)
    return ix + x0, iy + y0, fwhm


# ------------------------------------------------------------------------------------------------
# noise
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("frame", ["fld00_r_ref", "fld00_r_e1"])
def test_noise_matches_sky_poisson_read_noise(frame):
    tel = telescope(**CLEAN, stars=2000, star_mags=[16.0, 23.5])
    hdu, truth = sky.simulate_frame(tel, frame, seed=SEED)
    data, h = hdu.data.astype(float), hdu.header
    gain, rn = tel["gain"], tel["read_noise"]
    # The sky model from the configuration alone: mu (mag/arcsec^2) through this frame's zeropoint.
    sky_adu = tel["pixel_scale"] ** 2 * 10 ** (-0.4 * (tel["sky"]["sky_brightness"]["r"] - h["MAGZP"]))
    assert_allclose(h["SKYLEVEL"], sky_adu, rtol=1e-5)
    sigma = np.sqrt(sky_adu * gain + rn**2) / gain
    # Mask each object out to where its Moffat profile falls below 1 % of the pixel noise.
    alpha = truth["fwhm"] / (2 * np.sqrt(2 ** (1 / 2.5) - 1))
    peak = truth["flux"] * 1.5 / (np.pi * alpha**2)
    radius = alpha * np.sqrt(np.maximum((0.01 * sigma / peak) ** (-1 / 2.5) - 1, 0)) + 2
    yy, xx = np.mgrid[: data.shape[0], : data.shape[1]]
    mask = np.zeros(data.shape, bool)
    for x, y, r in zip(truth["x"], truth["y"], radius):
        mask |= (xx - x) ** 2 + (yy - y) ** 2 < r**2
    border = 40  # stars outside the frame are not in the truth table; their wings reach < 40 px here
    mask[:border], mask[-border:], mask[:, :border], mask[:, -border:] = True, True, True, True
    pix = data[~mask]
    assert pix.size > 10000
    # Mean: standard error sigma/sqrt(N) ~ 0.03 ADU (sci) / 0.1 ADU (ref); allow 6 of them plus 0.05 %
    # of the sky for the masked faint wings.
    assert abs(pix.mean() - sky_adu) < 6 * sigma / np.sqrt(pix.size) + 5e-4 * sky_adu
    # Variance: the relative standard error of a sample variance is sqrt(2/N) < 1.5 %; allow 4 %.
    assert_allclose(pix.var(), sigma**2, rtol=0.04)
    # Poisson through the gain, not a Gaussian: the variance in e- equals the mean in e- (+ rn^2).
    assert_allclose((pix.var() * gain**2 - rn**2) / (pix.mean() * gain), 1.0, rtol=0.05)


# ------------------------------------------------------------------------------------------------
# PSF and zeropoint
# ------------------------------------------------------------------------------------------------
PSF_SKY = dict(CLEAN, stars=500, star_mags=[15.0, 17.0], psf_variation=0.3, psf_ellipticity=0.1)


@pytest.fixture(scope="module")
def psf_frames():
    tel = telescope(**PSF_SKY)
    return tel, {f: sky.simulate_frame(tel, f, seed=SEED) for f in ("fld00_r_ref", "fld00_r_e1", "fld00_r_e2")}


def test_psf_fwhm_matches_configuration_across_frame(psf_frames):
    tel, frames = psf_frames
    beta = tel["sky"]["moffat_beta"]
    seeings = []
    for frame, (hdu, truth) in frames.items():
        h = hdu.header
        seeings.append(h["SEEING"])
        cond = sky.frame_conditions(tel, frame, seed=SEED)
        # The configured seeing: reference fixed, science within the configured range (arcsec -> px).
        if h["EPOCHID"] == "ref":
            assert_allclose(h["SEEING"], tel["sky"]["ref_seeing"] / tel["pixel_scale"])
        else:
            lo, hi = np.array(tel["sky"]["seeing"]) / tel["pixel_scale"]
            assert lo <= h["SEEING"] <= hi
        # Truth FWHM: SEEING at the centre, (1 + psf_variation) x SEEING at the corners.
        assert_allclose(cond.psf_at(127.5, 127.5)[0], h["SEEING"])
        assert_allclose(cond.psf_at(0, 0)[0], h["SEEING"] * 1.3)
        stars = isolated(truth[~truth["saturated"]], radius=15)
        stars = stars[(stars["x"] > 12) & (stars["x"] < 243) & (stars["y"] > 12) & (stars["y"] < 243)]
        assert len(stars) >= 8
        fwhm = np.array([fit_moffat(hdu.data, s["x"], s["y"], beta)[2] for s in stars])
        # Each bright (S/N > 100) star's FWHM within 5 % of the configured value at its position.
        assert_allclose(fwhm, stars["fwhm"], rtol=0.05)
        rho2 = ((stars["x"] - 127.5) ** 2 + (stars["y"] - 127.5) ** 2) / (2 * 127.5**2)
        assert rho2.min() < 0.2 and rho2.max() > 0.3  # the stars sample centre and outskirts
        # The measured FWHM grows outwards as configured: slope of fwhm/SEEING vs rho^2 ~ 0.3 (+-0.1).
        slope = np.polyfit(rho2, fwhm / h["SEEING"], 1)[0]
        assert 0.2 < slope < 0.4
    assert len(set(seeings)) == 3  # different seeing in every frame
    assert seeings[0] < min(seeings[1:])  # the reference is the sharpest


def test_zeropoint_recovered_by_aperture_photometry(psf_frames):
    tel, frames = psf_frames
    beta = tel["sky"]["moffat_beta"]
    for _frame, (hdu, truth) in frames.items():
        h = hdu.header
        stars = isolated(truth[~truth["saturated"]], radius=25)
        r = 6 * stars["fwhm"]
        stars = stars[(stars["x"] > r) & (stars["x"] < 255 - r) & (stars["y"] > r) & (stars["y"] < 255 - r)]
        assert len(stars) >= 5
        r = 6 * stars["fwhm"]
        alpha = stars["fwhm"] / (2 * np.sqrt(2 ** (1 / beta) - 1))
        flux = []
        for s, radius in zip(stars, r):
            ap = CircularAperture((s["x"], s["y"]), radius)
            total = aperture_photometry(hdu.data.astype(float), ap, method="exact")["aperture_sum"][0]
            flux.append(total - h["SKYLEVEL"] * ap.area)
        # Analytic aperture correction of the Moffat (96-97 % within 6 FWHM).
        mag = -2.5 * np.log10(np.array(flux) / moffat_fraction(r, alpha, beta)) + h["MAGZP"]
        # 15-17 mag stars: photon noise 0.2-1 %; spec: median offset < 0.02 mag.
        assert abs(np.median(mag - stars["mag"])) < 0.02
        assert np.all(np.abs(mag - stars["mag"]) < 0.1)  # single stars: noise up to 0.02 mag, faint neighbours


def test_zeropoint_differs_between_epochs_and_reference_is_deeper(psf_frames):
    tel, frames = psf_frames
    zp = {f: hdu.header["MAGZP"] for f, (hdu, _) in frames.items()}
    base = tel["sky"]["zeropoint"]["r"]
    assert_allclose(zp["fld00_r_ref"], base + 2.5 * np.log10(tel["sky"]["ref_exptime"]))
    # Science epochs: 2.5 log10(30 s) plus a transparency change of RMS 0.05 mag (bounded at 5 sigma).
    for f in ("fld00_r_e1", "fld00_r_e2"):
        assert 0 < abs(zp[f] - base - 2.5 * np.log10(30.0)) < 0.25
    assert zp["fld00_r_e1"] != zp["fld00_r_e2"]

    # Deeper reference: sky noise relative to a star's flux is lower by ~sqrt(300/30).
    def rel_noise(frame):
        h = frames[frame][0].header
        return np.sqrt(h["SKYLEVEL"] * h["GAIN"] + h["RDNOISE"] ** 2) / h["GAIN"] / 10 ** (0.4 * h["MAGZP"])

    ratio = rel_noise("fld00_r_e1") / rel_noise("fld00_r_ref")
    assert 2.5 < ratio < 3.8


# ------------------------------------------------------------------------------------------------
# WCS
# ------------------------------------------------------------------------------------------------
def test_truth_positions_follow_true_mapping_and_image(psf_frames):
    tel, frames = psf_frames
    for frame, (hdu, truth) in frames.items():
        cond = sky.frame_conditions(tel, frame, seed=SEED)
        x, y = cond.world_to_pixel(truth["ra"], truth["dec"])
        stars = truth["kind"] == "star"
        assert np.max(np.hypot(x - truth["x"], y - truth["y"])[stars]) < 1e-6
        ra, dec = cond.pixel_to_world(truth["x"], truth["y"])
        assert np.max(np.abs(ra - truth["ra"])[stars]) * 3600 < 1e-6
        # The light is where the truth says: centroids of bright isolated stars (S/N > 100, fit
        # precision ~0.01 px) agree with the truth to < 0.05 px.
        iso = isolated(truth[~truth["saturated"]], radius=15)
        iso = iso[(iso["x"] > 12) & (iso["x"] < 243) & (iso["y"] > 12) & (iso["y"] < 243)]
        fits_ = np.array([fit_moffat(hdu.data, s["x"], s["y"], tel["sky"]["moffat_beta"])[:2] for s in iso])
        offset = np.hypot(fits_[:, 0] - iso["x"], fits_[:, 1] - iso["y"])
        assert np.median(offset) < 0.05


def test_header_wcs_error_is_real_and_bounded(tmp_path):
    tel = telescope(wcs_error=0.3, distortion_residual=0.2, stars=300)
    hdu, truth = sky.simulate_frame(tel, "fld00_r_e1", seed=SEED)
    img = read_image_from_hdu(hdu, tmp_path)
    cond = sky.frame_conditions(tel, "fld00_r_e1", seed=SEED)
    hx, hy = img.wcs.world_to_pixel_values(truth["ra"], truth["dec"])
    dx, dy = hx - truth["x"], hy - truth["y"]
    # Header minus truth = the reference-pixel shift minus the distortion (|D| <= 0.2 px per axis).
    assert np.all(np.abs(dx - cond.wcs_shift[0]) <= 0.2 + 1e-6)
    assert np.all(np.abs(dy - cond.wcs_shift[1]) <= 0.2 + 1e-6)
    assert np.std(dx) + np.std(dy) > 0.02  # the distortion is not a constant shift
    assert np.hypot(dx, dy).max() > 0.01  # the error is real
    # Switched off: the header WCS is the true mapping.
    tel0 = telescope(wcs_error=0.0, distortion_residual=0.0, stars=300)
    hdu0, truth0 = sky.simulate_frame(tel0, "fld00_r_e1", seed=SEED)
    hx, hy = read_image_from_hdu(hdu0, tmp_path).wcs.world_to_pixel_values(truth0["ra"], truth0["dec"])
    assert np.max(np.hypot(hx - truth0["x"], hy - truth0["y"])) < 1e-6


def test_wcs_shift_has_configured_rms():
    tel = telescope(wcs_error=0.15)
    tel["sky"].update(fields=10, epochs=4)
    shifts = np.array([sky.frame_conditions(tel, f.name, seed=SEED).wcs_shift for f in frames_of(tel)])
    # 100 values: the relative standard error of an RMS is 1/sqrt(2N) = 7 %; allow 25 %.
    assert_allclose(np.sqrt(np.mean(shifts**2)), 0.15, rtol=0.25)


def read_image_from_hdu(hdu, tmp_path: Path):
    """Round-trip an HDU through rbflow.io.read_image (so the header is what a reader sees)."""
    path = tmp_path / f"frame{len(list(tmp_path.iterdir()))}.fits"
    hdu.writeto(path)
    return read_image(path)


def test_header_cards():
    tel = telescope(stars=100)
    hdu, _ = sky.simulate_frame(tel, "fld00_r_ref", seed=SEED)
    h = hdu.header
    assert hdu.data.dtype == np.float32
    for key in (
        "GAIN",
        "RDNOISE",
        "SATURATE",
        "FILTER",
        "EXPTIME",
        "DATE-OBS",
        "MJD-OBS",
        "MAGZP",
        "SEEING",
        "FIELD",
        "EPOCHID",
        "SKYSEED",
        "CD1_1",
        "CD2_2",
        "CRPIX1",
        "CRVAL2",
    ):
        assert key in h, key
    assert h["CTYPE1"] == "RA---TAN" and h["CTYPE2"] == "DEC--TAN"
    assert h["EPOCHID"] == "ref" and h["FIELD"] == "fld00" and h["FILTER"] == "r" and h["EXPTIME"] == 300.0
    h1 = sky.simulate_frame(tel, "fld00_r_e2", seed=SEED)[0].header
    assert h1["EPOCHID"] == 2 and h1["EXPTIME"] == 30.0 and h1["MJD-OBS"] > h["MJD-OBS"]
    assert "DATE" not in h
    # A plain astropy WCS parses the header without any warning (pytest turns warnings into errors).
    for header in (h, h1):
        w = WCS(header)
        assert w.has_celestial and not w.has_distortion


# ------------------------------------------------------------------------------------------------
# determinism, variables, transients, saturation, artefacts
# ------------------------------------------------------------------------------------------------
def test_same_seed_gives_identical_bytes(tmp_path):
    tel = telescope(size=[128, 128], satellite_rate=1.0)
    paths = {}
    for name, seed in (("a", SEED), ("b", SEED), ("c", SEED + 1)):
        paths[name] = (tmp_path / f"{name}.fits", tmp_path / f"{name}.ecsv")
        sky.write_frame(tel, "fld00_r_e1", *paths[name], seed=seed)
    assert paths["a"][0].read_bytes() == paths["b"][0].read_bytes()
    assert paths["a"][1].read_bytes() == paths["b"][1].read_bytes()
    assert paths["a"][0].read_bytes() != paths["c"][0].read_bytes()
    truth = read_table(paths["a"][1])
    assert truth["x"].unit == "pix" and truth.meta["frame"] == "fld00_r_e1"
    assert set(truth["kind"]) <= set(sky.TRUTH_KINDS)


def test_field_content_agrees_between_epochs():
    tel = telescope(stars=400)
    t1 = sky.simulate_frame(tel, "fld00_r_e1", seed=SEED)[1]
    t2 = sky.simulate_frame(tel, "fld00_r_e2", seed=SEED)[1]
    common = set(t1["id"][t1["kind"] == "star"]) & set(t2["id"][t2["kind"] == "star"])
    assert len(common) > 10
    a = t1[np.isin(t1["id"], list(common))]
    b = t2[np.isin(t2["id"], list(common))]
    a.sort("id")
    b.sort("id")
    assert np.all(a["ra"] == b["ra"]) and np.all(a["mag"] == b["mag"])
    # Different pointing: the same stars sit at different pixels (offset RMS 8 px).
    assert np.median(np.hypot(a["x"] - b["x"], a["y"] - b["y"])) > 0.5


def test_variables_differ_between_epochs_and_transients_not_in_reference(tmp_path):
    tel = telescope(variables=30, transients=12, epochs=3, size=[384, 384])
    out = tmp_path / "variables.ecsv"
    sky.write_variables_catalogue(tel, out, seed=SEED)
    cat = read_table(out)
    assert {"id", "field", "kind", "ra", "dec", "host", "mag_ref", "mag_e1", "mag_e2", "mag_e3"} <= set(cat.colnames)
    var = cat[cat["kind"] == "variable"]
    tr = cat[cat["kind"] == "transient"]
    assert len(var) == 30 and len(tr) == 12
    mags = np.array([var[f"mag_e{e}"] for e in (1, 2, 3)])
    spread = mags.max(axis=0) - mags.min(axis=0)
    assert np.all(spread > 0) and np.all(spread <= 1.5) and np.median(spread) > 0.2
    assert np.all(np.isfinite(var["mag_ref"]))
    assert np.all(np.isnan(tr["mag_ref"]))  # never in the reference
    tmags = np.array([tr[f"mag_e{e}"] for e in (1, 2, 3)])
    assert np.all(np.isfinite(tmags).any(axis=0))  # every transient is seen at least once
    fast = np.ma.filled(tr["host"], "") == ""  # ECSV reads '' back as masked
    assert fast.any() and (~fast).any()
    assert not np.isfinite(tmags[:, fast]).all(axis=0).any()  # fast ones miss at least one epoch
    ref_truth = sky.simulate_frame(tel, "fld00_r_ref", seed=SEED)[1]
    assert "transient" not in set(ref_truth["kind"])
    # Frames render the catalogue: a variable's truth magnitude in e2 is the catalogue's mag_e2.
    t2 = sky.simulate_frame(tel, "fld00_r_e2", seed=SEED)[1]
    for row in t2[np.isin(t2["kind"], ["variable", "transient"])]:
        assert_allclose(row["mag"], cat["mag_e2"][cat["id"] == row["id"]][0])
    # Supernovae sit on their host galaxy: at its nucleus (transient_nuclear_fraction) or off its core.
    e = sky.field_scene(tel, "fld00", seed=SEED).objects
    for row in tr[~fast]:
        host = e[e["id"] == row["host"]][0]
        sep = np.hypot((row["ra"] - host["ra"]) * np.cos(np.radians(host["dec"])), row["dec"] - host["dec"]) * 3600
        nuclear = sep <= 0.1 * host["r_eff"] + 1e-9
        assert nuclear or 0.3 * host["q"] * host["r_eff"] - 1e-9 <= sep <= 1.5 * host["r_eff"] + 1e-9


def test_transient_light_appears_only_when_present():
    tel = telescope(
        **dict(CLEAN, transients=6), stars=100, star_mags=[18.0, 23.0], transient_mags=[16.0, 16.5], epochs=3
    )
    names = ("fld00_r_ref", "fld00_r_e1", "fld00_r_e2", "fld00_r_e3")
    frames = {f: sky.simulate_frame(tel, f, seed=SEED) for f in names}
    scene = sky.field_scene(tel, "fld00", seed=SEED).objects
    checked = 0
    for row in scene[scene["kind"] == "transient"]:
        for frame, (hdu, truth) in frames.items():
            cond = sky.frame_conditions(tel, frame, seed=SEED)
            x, y = (v[0] for v in cond.world_to_pixel(row["ra"], row["dec"]))
            if not (15 < x < 240 and 15 < y < 240):
                continue
            ap = CircularAperture((x, y), 3 * cond.seeing)
            flux = aperture_photometry(hdu.data.astype(float), ap)["aperture_sum"][0] - hdu.header["SKYLEVEL"] * ap.area
            expected = truth["flux"][truth["id"] == row["id"]]
            if len(expected):
                assert flux > 0.5 * expected[0]  # a 16-16.5 mag point source, >= 75 % inside 3 FWHM
            else:
                # Absent: only faint (> 18 mag) stars may add light; a 16.5 mag source would give > 10^4 ADU.
                assert flux < 0.05 * 10 ** (-0.4 * (16.5 - hdu.header["MAGZP"]))
            checked += 1
    assert checked >= 8


def test_saturated_stars_clipped_with_bleed_trails():
    base = dict(CLEAN, stars=300, star_mags=[9.0, 12.0])
    hdu, truth = sky.simulate_frame(telescope(**base), "fld00_r_e1", seed=SEED)
    hdu0, truth0 = sky.simulate_frame(telescope(**base, bleed_trails=False), "fld00_r_e1", seed=SEED)
    sat = hdu.header["SATURATE"]
    assert hdu.data.max() == sat and hdu0.data.max() == sat  # clipped at SATURATE
    stars = truth[(truth["kind"] == "star") & truth["saturated"]]
    assert len(stars) >= 3
    assert (truth["kind"] == "bleed").sum() >= 1 and "bleed" not in set(truth0["kind"])

    def extent(data, star):
        labels, _ = ndimage.label(data >= sat)
        lab = labels[int(round(star["y"])), int(round(star["x"]))]
        assert lab > 0  # the saturated star's centre is clipped
        rows, cols = np.nonzero(labels == lab)
        return np.ptp(rows) + 1, np.ptp(cols) + 1

    grown = []
    for star in stars:
        (h1, _), (h0, w0) = extent(hdu.data, star), extent(hdu0.data, star)
        assert h1 >= h0
        assert abs(h0 - w0) <= 2  # without bleeding the saturated core is round
        grown.append(h1 - h0)
    assert max(grown) >= 4  # the brightest stars grow visible trails
    # The charge bleeds along columns only: no new column saturates, more pixels do.
    cols1, cols0 = (set(np.nonzero(d >= sat)[1]) for d in (hdu.data, hdu0.data))
    assert cols1 == cols0
    assert (hdu.data >= sat).sum() > (hdu0.data >= sat).sum()


def test_artefacts_cosmic_rays_hot_pixels_bad_columns():
    tel = telescope(stars=200, cosmic_rays=400, hot_pixels=800, bad_columns=2, satellite_rate=1.0)
    ref_hdu, ref = sky.simulate_frame(tel, "fld00_r_ref", seed=SEED)
    e1_hdu, e1 = sky.simulate_frame(tel, "fld00_r_e1", seed=SEED)
    assert "cosmic_ray" not in set(ref["kind"]) and "satellite" not in set(ref["kind"])  # clean stack
    assert (e1["kind"] == "cosmic_ray").sum() > 5 and (e1["kind"] == "satellite").sum() == 1
    assert e1_hdu.header["NCOSMIC"] == (e1["kind"] == "cosmic_ray").sum()
    # Linear artefacts are segments: the satellite trail crosses the frame from border to border, a
    # cosmic ray runs from its entry to its exit, a bad column along its column.
    trail = e1[e1["kind"] == "satellite"][0]
    ends = np.array([[trail["x"], trail["y"]], [trail["x1"], trail["y1"]]])
    assert (np.isclose(ends, 0) | np.isclose(ends, 255)).any(axis=1).all() and trail["extent"] > 0
    cr = e1[e1["kind"] == "cosmic_ray"]
    assert np.all(np.isfinite(cr["x1"])) and np.all(np.hypot(cr["x1"] - cr["x"], cr["y1"] - cr["y"]) < 40)
    cols = e1[e1["kind"] == "bad_column"]
    assert np.all(cols["x1"] == cols["x"]) and np.all(cols["y1"] > cols["y"])
    # Hot pixels and bad columns belong to the detector: the same pixels in every frame.
    for kind in ("hot_pixel", "bad_column"):
        assert_allclose(ref["x"][ref["kind"] == kind], e1["x"][e1["kind"] == kind])
    # Hot pixels stand out of the sky by far more than the noise.
    hot = e1[(e1["kind"] == "hot_pixel") & (e1["flux"] > 1000)]
    vals = e1_hdu.data[hot["y"].astype(int), hot["x"].astype(int)]
    assert np.median(vals - e1_hdu.header["SKYLEVEL"]) > 500
    # Cosmic rays are sharp: most of a hit's charge sits in one or a few pixels.
    cr = e1[(e1["kind"] == "cosmic_ray") & (e1["flux"] > 1000)]
    sky_level = e1_hdu.header["SKYLEVEL"]
    for row in cr[:5]:
        x, y = int(round(row["x"])), int(round(row["y"]))
        box = e1_hdu.data[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2] - sky_level
        assert box.max() > 100


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------
def test_unknown_frame_is_an_input_error():
    with pytest.raises(InputError, match="fld00_r_e9.*is not a frame"):
        sky.simulate_frame(telescope(), "fld00_r_e9", seed=SEED)


def test_missing_filter_value_is_a_config_error():
    tel = telescope(zeropoint={"g": 22.6})
    with pytest.raises(ConfigError, match=r"sky.zeropoint.*'r'"):
        sky.simulate_frame(tel, "fld00_r_e1", seed=SEED)


def test_telescope_without_sky_is_a_config_error():
    tel = telescope()
    del tel["sky"]
    with pytest.raises(ConfigError, match="no 'sky' block"):
        sky.variables_catalogue(tel, seed=SEED)


def test_misspelt_sky_key_fails_validation():
    with pytest.raises(ConfigError, match="cosmic_ray"):
        telescope(cosmic_ray=3)


def test_write_fits_is_readable_by_rbflow(tmp_path):
    tel = telescope(size=[128, 128], stars=200)
    sky.write_frame(tel, "fld00_r_e1", tmp_path / "f.fits", tmp_path / "f.ecsv", seed=SEED)
    img = read_image(tmp_path / "f.fits")
    assert img.wcs is not None and img.data.shape == (128, 128)
    with fits.open(tmp_path / "f.fits") as hdul:
        assert hdul[0].header["RBFLOWV"]


def test_galaxies_are_extended_and_keep_their_flux():
    n = 768
    tel = telescope(**dict(CLEAN, galaxies=150, galaxy_mags=[15.5, 17.5]), stars=0, size=[n, n])
    hdu, truth = sky.simulate_frame(tel, "fld00_r_e1", seed=SEED)
    data = hdu.data.astype(float) - hdu.header["SKYLEVEL"]
    gal = truth[truth["kind"] == "galaxy"]
    reach = 3 * gal["r_eff"] * 2 + 3 * gal["fwhm"]  # rendered stamp half-size for n <= 4
    ratios, r_half, r_true = [], [], []
    for g, radius in zip(gal, reach):
        d = np.hypot(gal["x"] - g["x"], gal["y"] - g["y"])
        crowded = ((d > 0) & (d < radius + reach)).any()
        if crowded or not (radius < g["x"] < n - 1 - radius and radius < g["y"] < n - 1 - radius):
            continue
        radii = np.linspace(0.5, radius, 40)
        grow = aperture_photometry(data, [CircularAperture((g["x"], g["y"]), r) for r in radii])
        grow = np.array([grow[f"aperture_sum_{k}"][0] for k in range(len(radii))])
        ratios.append(grow[-1] / g["flux"])
        r_half.append(np.interp(0.5 * grow[-1], grow, radii))
        r_true.append(g["r_eff"])
    assert len(ratios) >= 5
    # The light is conserved: the stamp (renormalised Sersic * PSF) lies inside this radius but
    # for its corners; sky noise in these large apertures is 1-5 % of a 15.5-17.5 mag galaxy.
    assert 0.93 < np.median(ratios) < 1.04
    # Resolved: half-light radii exceed a point source's (~0.6 FWHM for this Moffat) and grow with r_eff.
    assert np.median(np.array(r_half) / hdu.header["SEEING"]) > 0.7
    rank = np.corrcoef(np.argsort(np.argsort(r_half)), np.argsort(np.argsort(r_true)))[0, 1]
    assert rank > 0.5


def test_empty_variables_catalogue_is_typed_and_logged(caplog):
    tel = telescope(variables=0, transients=0)
    with caplog.at_level("WARNING", logger="rbflow.sky"):
        cat = sky.variables_catalogue(tel, seed=SEED)
    assert len(cat) == 0 and {"id", "ra", "dec", "mag_ref", "mag_e2"} <= set(cat.colnames)
    assert "no variables or transients" in caplog.text


# ------------------------------------------------------------------------------------------------
# the real PSF's hard parts (halo, coma, undersampling, small-scale change, few stars)
# ------------------------------------------------------------------------------------------------
REALPSF = Path(__file__).resolve().parent / "data" / "telescopes" / "realpsf.yaml"
#: A round PSF that does not change across the frame, to compare with the analytic profiles.
ROUND = dict(CLEAN, psf_variation=0.0, psf_ellipticity=0.0)


def alpha_of(fwhm, beta):
    return fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1))


def outside(stamp, r):
    """Fraction of a centred stamp's light beyond radius r (exact circular aperture)."""
    c = stamp.shape[0] // 2
    return 1 - aperture_photometry(stamp, CircularAperture((c, c), r), method="exact")["aperture_sum"][0]


@pytest.mark.parametrize("seeing", [1.6, 2.4, 4.0])  # arcsec = 1.6-4 px at 1.01"/px: undersampled to well sampled
def test_psf_core_has_the_stated_fwhm(seeing):
    tel = telescope(**ROUND, seeing=[seeing, seeing])
    cond = sky.frame_conditions(tel, "fld00_r_e1", seed=SEED)
    c = 127.0
    stamp = sky.psf_stamp(cond, c + 0.3, c - 0.2, half=15)
    assert_allclose(stamp.sum(), 1.0, rtol=1e-12)
    # A pixel-integrated Moffat fit (5x5 sub-pixels, the frame's beta) recovers the configured FWHM.
    # The model is the one that made the stamp (noise-free): 1 % covers the fit's sub-pixel sampling.
    x0, y0, fwhm = fit_moffat(stamp, 15 + 0.3, 15 - 0.2, cond.beta, half=10)
    assert_allclose(fwhm, seeing / tel["pixel_scale"], rtol=0.01)
    assert_allclose([x0, y0], [15.3, 14.8], atol=0.01)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3])
def test_psf_halo_holds_the_stated_wing_fraction(fraction):
    tel = telescope(**ROUND, seeing=[2.5, 2.5], psf_halo_fraction=fraction, psf_halo_fwhm=3.0, psf_halo_beta=2.0)
    cond = sky.frame_conditions(tel, "fld00_r_e1", seed=SEED)
    stamp = sky.psf_stamp(cond, 127.0, 127.0, half=128)
    assert_allclose(stamp.sum(), 1.0, rtol=1e-12)
    fwhm = cond.seeing
    a_core, a_halo = alpha_of(fwhm, cond.beta), alpha_of(3 * fwhm, 2.0)
    for r in (1.5 * fwhm, 3 * fwhm, 6 * fwhm, 12 * fwhm):
        expect = (1 - fraction) * (1 + (r / a_core) ** 2) ** (1 - cond.beta) + fraction * (1 + (r / a_halo) ** 2) ** -1
        # Pixel integration (0.3 % at 1.5 FWHM, less beyond) and the renormalisation of the light
        # beyond the 257-px stamp (< 0.2 % of the halo's) move the fractions by < 0.005.
        assert abs(outside(stamp, r) - expect) < 0.005, r
    if fraction:  # the wings hold far more light than the Moffat alone: 3x at 6 FWHM for 10 %
        plain = sky.psf_stamp(
            sky.frame_conditions(telescope(**ROUND, seeing=[2.5, 2.5]), "fld00_r_e1", seed=SEED), 127.0, 127.0, half=128
        )
        assert outside(stamp, 6 * fwhm) > 3 * outside(plain, 6 * fwhm)


def test_coma_is_asymmetric_keeps_the_centroid_and_grows_outwards():
    tel = telescope(**ROUND, seeing=[3.0, 3.0], psf_coma=0.2)
    cond = sky.frame_conditions(tel, "fld00_r_e1", seed=SEED)
    half = 20
    g = np.arange(-half, half + 1)
    skews = []
    for x, y in ((127.0, 127.0), (191.0, 191.0), (255.0, 255.0)):  # centre, half-way, corner
        stamp = sky.psf_stamp(cond, x, y, half=half)
        # Centroid on the source (the offsets balance; stamp truncation moves it < 0.01 px).
        cx, cy = (stamp.sum(axis=0) * g).sum(), (stamp.sum(axis=1) * g).sum()
        assert_allclose([cx, cy], [0.0, 0.0], atol=0.01)
        # Third moment along the major axis (the coma direction): zero for a symmetric PSF.
        theta = float(cond.psf_at(x, y)[2])
        u = (g[None, :] - cx) * np.cos(theta) + (g[:, None] - cy) * np.sin(theta)
        skews.append(float((stamp * u**3).sum() / (stamp * u**2).sum() ** 1.5))
    assert abs(skews[0]) < 0.01
    # Coma fraction 0.1 half-way, 0.2 at the corner: skewness c(1-c)(1-2c) d^3 / sigma^3 grows with it.
    assert 0.05 < skews[1] < skews[2]
    assert_allclose(cond.coma_at(np.array([127.5, 255.0]), np.array([127.5, 255.0])), [0.0, 0.2])


def test_psf_field_offset_makes_the_frame_a_cut_out_of_a_focal_plane():
    # Default: the pattern is centred on the frame, coma 0 there and pointing opposite ways at
    # opposite corners. With the optical axis 3000 px off (-x) and a 4000 px field radius, the
    # frame sees one part of the pattern: coma 0.15 at its centre (3/4 of 0.2), the same direction
    # everywhere within atan(127.5 / 2872.5) = 2.5 deg, and SEEING still the FWHM at the centre.
    kw = dict(ROUND, seeing=[3.0, 3.0], psf_coma=0.2, psf_variation=0.2)
    centred = sky.frame_conditions(telescope(**kw), "fld00_r_e1", seed=SEED)
    cut = sky.frame_conditions(
        telescope(**kw, psf_field_offset=[-3000.0, 0.0], psf_field_radius=4000.0), "fld00_r_e1", seed=SEED
    )
    corners = np.array([0.0, 255.0, 0.0, 255.0]), np.array([0.0, 0.0, 255.0, 255.0])
    assert_allclose(centred.coma_at(*corners), 0.2)
    theta = np.unwrap(centred.psf_at(*corners)[2])
    assert_allclose(abs(theta[3] - theta[0]), np.pi)  # opposite corners: opposite directions
    yy, xx = np.mgrid[0:256:15, 0:256:15].astype(float)
    theta = cut.psf_at(xx.ravel(), yy.ravel())[2]
    assert np.degrees(np.ptp(np.unwrap(theta))) < 5.2  # 2 x 2.54 deg between the corners
    coma = cut.coma_at(xx.ravel(), yy.ravel())
    assert 0.14 < coma.min() and coma.max() < 0.16
    assert_allclose(cut.coma_at(127.5, 127.5), 0.15)
    assert_allclose(cut.psf_at(127.5, 127.5)[0], cut.seeing)
    # the truth's stamps: skewed the same way at opposite corners, the light's centroid on the source
    half = 20
    g = np.arange(-half, half + 1)
    skews = []
    for cond, (x, y) in (
        (cut, (10.0, 10.0)),
        (cut, (245.0, 245.0)),
        (centred, (10.0, 10.0)),
        (centred, (245.0, 245.0)),
    ):
        stamp = sky.psf_stamp(cond, x, y, half=half)
        cx, cy = (stamp.sum(axis=0) * g).sum(), (stamp.sum(axis=1) * g).sum()
        assert_allclose([cx, cy], [0.0, 0.0], atol=0.01)
        r2 = g[None, :] ** 2 + g[:, None] ** 2  # (x r^2, y r^2): the coma's direction (third moments)
        skews.append([(stamp * g[None, :] * r2).sum(), (stamp * g[:, None] * r2).sum()])
    cosines = [np.dot(a, b) / np.hypot(*a) / np.hypot(*b) for a, b in (skews[:2], skews[2:])]
    assert cosines[0] > 0.99 and cosines[1] < -0.99, cosines
    # the default is the frame-centred pattern: the offset [0, 0] and radius null change nothing
    explicit = sky.frame_conditions(
        telescope(**kw, psf_field_offset=[0.0, 0.0], psf_field_radius=None), "fld00_r_e1", seed=SEED
    )
    assert np.array_equal(sky.psf_stamp(explicit, 10.0, 10.0, half=half), sky.psf_stamp(centred, 10.0, 10.0, half=half))


def test_psf_ripple_changes_the_fwhm_on_small_scales():
    tel = telescope(**ROUND, psf_ripple=0.1)
    cond = sky.frame_conditions(tel, "fld00_r_e1", seed=SEED)
    yy, xx = np.mgrid[0:256:4, 0:256:4]
    ratio = cond.psf_at(xx.ravel(), yy.ravel())[0] / cond.seeing
    assert 0.9 - 1e-9 <= ratio.min() < 0.92 and 1.08 < ratio.max() <= 1.1 + 1e-9
    # 2-4 cycles per frame: the FWHM changes by > 10 % within 128 px, where a 2x2 PSF grid has one cell.
    amp, kx, ky, _ = cond.ripple
    assert 2 <= abs(kx) <= 4 and 2 <= abs(ky) <= 4 and amp == 0.1


def test_real_psf_frame_keeps_the_truth_flux_of_isolated_stars():
    """Few stars, undersampled cores with halo, coma and ripple: the light in an aperture is the truth flux."""
    tel = load_telescope(REALPSF)
    tel["sky"].update(CLEAN, star_mags=[13.5, 15.5], stars=100)
    check_schema(tel["sky"], "sky.schema.yaml", "realpsf test sky")
    hdu, truth = sky.simulate_frame(tel, "fld00_r_e1", seed=SEED)
    h = hdu.header
    assert h["PSFHALO"] == 0.2 and h["SEEING"] < 2.0  # the switches are on and recorded
    cond = sky.frame_conditions(tel, "fld00_r_e1", seed=SEED)
    r = 25.0  # px: ~ 5 halo FWHM
    # Neighbours within 60 px are fainter than 5 % of the star: their light beyond 35 px (< 1 %
    # of theirs) adds < 0.05 % to its aperture.
    stars = isolated(truth[~truth["saturated"]], radius=60, ratio=0.05)
    stars = stars[(stars["x"] > r) & (stars["x"] < 255 - r) & (stars["y"] > r) & (stars["y"] < 255 - r)]
    assert len(stars) >= 2
    gain, rn = h["GAIN"], h["RDNOISE"]
    for s in stars:
        ap = CircularAperture((s["x"], s["y"]), r)
        total = aperture_photometry(hdu.data.astype(float), ap, method="exact")["aperture_sum"][0]
        flux = total - h["SKYLEVEL"] * ap.area
        # The light beyond r, from the analytic halo and core at this star's FWHM (coma and ripple
        # move light by about one FWHM, well inside r).
        a_core, a_halo = alpha_of(s["fwhm"], cond.beta), alpha_of(3 * s["fwhm"], 2.0)
        lost = 0.8 * (1 + (r / a_core) ** 2) ** (1 - cond.beta) + 0.2 * (1 + (r / a_halo) ** 2) ** -1
        sigma = np.sqrt(ap.area * (h["SKYLEVEL"] * gain + rn**2) + s["flux"] * gain) / gain
        assert abs(flux - s["flux"] * (1 - lost)) < 4 * sigma, (s["id"], flux, s["flux"], sigma)
        assert sigma < 0.02 * s["flux"]  # the test has teeth: a 2 % flux error would fail it


def test_real_psf_switches_are_deterministic_and_off_by_default(tmp_path):
    tel = load_telescope(REALPSF)
    paths = [(tmp_path / f"{k}.fits", tmp_path / f"{k}.ecsv") for k in "ab"]
    for fits_path, table_path in paths:
        sky.write_frame(tel, "fld00_r_e1", fits_path, table_path, seed=SEED)
    assert paths[0][0].read_bytes() == paths[1][0].read_bytes()
    assert paths[0][1].read_bytes() == paths[1][1].read_bytes()
    # Off (the defaults): no card, and the same pixels as switches explicitly at zero.
    plain = sky.simulate_frame(telescope(size=[128, 128]), "fld00_r_e1", seed=SEED)[0]
    zero = telescope(size=[128, 128], psf_halo_fraction=0.0, psf_coma=0.0, psf_ripple=0.0)
    assert "PSFHALO" not in plain.header and "PSFAXISX" not in plain.header
    # The realpsf frame, a cut-out of a focal plane, says where the optical axis is.
    h = fits.getheader(paths[0][0])
    assert (h["PSFAXISX"], h["PSFAXISY"], h["PSFFIELD"]) == (
        *tel["sky"]["psf_field_offset"],
        tel["sky"]["psf_field_radius"],
    )
    assert sky.simulate_frame(zero, "fld00_r_e1", seed=SEED)[0].data.tobytes() == plain.data.tobytes()
