"""Tests of rbflow.inject: calibrated point-source injection, checked by PSF photometry."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from helpers import GAIN, star_frame
from scipy.optimize import least_squares

from rbflow.errors import ConfigError, InputError
from rbflow.frames import FrameInfo
from rbflow.inject import draw_magnitudes, find_hosts, inject_sources, run_inject
from rbflow.io import Image, read_table
from rbflow.psf import PSFModel, moffat_epsf

SHAPE = (256, 256)
ZP = 28.0
INFO = FrameInfo(
    gain=GAIN, read_noise=5.0, saturation=60000.0, filter="r", exptime=30.0, date="", zeropoint=ZP, fwhm_guess=3.5
)
CFG = dict(
    n=40,
    mag_range=[17.0, 20.0],
    distribution="uniform_mag",
    mags=[],
    realizations=1,
    min_separation=25.0,
    host_fraction=0.0,
    host_offset=1.0,
)


@pytest.fixture(scope="module")
def frame():
    data, hdr, _ = star_frame(SHAPE, spacing=60, seed=11, flux_range=(3.0, 4.0))
    return Image(data, hdr, WCS(hdr))


@pytest.fixture(scope="module")
def psf():
    # Known PSF: Moffat FWHM 3.5 px on a 2x2 grid (slightly wider at the right) so that the
    # injection uses the position-dependent model.
    cube = np.array([moffat_epsf(f, size=25, oversampling=2) for f in (3.4, 3.6, 3.4, 3.6)])
    return PSFModel(cube, oversampling=2, size=25, shape=SHAPE, grid=(2, 2), n_stars=[10] * 4, sources=["cell"] * 4)


def _inject(frame, psf, seed, **cfg):
    return inject_sources(frame, psf, INFO, dict(CFG, **cfg), cutout_size=31, seed=seed, frame="f", image_name="f_sim0")


def _fit(diff, psf, x, y, *, free_position):
    """PSF fit of the difference image: flux (and position) by least squares on a 15x15 box."""
    half = 7
    x0, y0 = int(round(x)), int(round(y))
    box = diff[y0 - half : y0 + half + 1, x0 - half : x0 + half + 1].astype(float)
    if not free_position:
        p = psf.stamp(x, y, 25)[12 - half : 13 + half, 12 - half : 13 + half]
        return (p * box).sum() / (p * p).sum(), x, y

    def resid(q):
        # The stamp is anchored at (round(x), round(y)): cut it around the box centre (x0, y0).
        cx, cy = 14 - (round(q[1]) - x0), 14 - (round(q[2]) - y0)
        p = psf.stamp(q[1], q[2], 29)[cy - half : cy + half + 1, cx - half : cx + half + 1]
        return (q[0] * p - box).ravel()

    sol = least_squares(resid, [box.sum(), x + 0.2, y - 0.2], x_scale=[box.sum(), 0.1, 0.1])
    return sol.x[0], sol.x[1], sol.x[2]


def test_flux_recovered_within_1_percent_with_unit_pull(frame, psf):
    ratios, pulls = [], []
    for seed in range(6):
        out, truth = _inject(frame, psf, seed)
        diff = out - frame.data
        for row in truth:
            f, _, _ = _fit(diff, psf, row["x"], row["y"], free_position=False)
            p = psf.stamp(row["x"], row["y"], 25)[5:20, 5:20]
            # Variance of the linear PSF fit when the only noise is the source's Poisson noise.
            var = (p**2 * (row["flux"] * p / GAIN)).sum() / (p * p).sum() ** 2
            ratios.append(f / row["flux"])
            pulls.append((f - row["flux"]) / np.sqrt(var))
    ratios, pulls = np.array(ratios), np.array(pulls)
    assert len(ratios) >= 200
    # Median ratio: the fit box holds ~97 % of the unit-sum stamp but the estimator is unbiased; 1 % is the goal.
    assert np.median(ratios) == pytest.approx(1.0, abs=0.01)
    # Pull width 1.0 +- 0.1: the std of ~240 unit Gaussians is known to ~5 %.
    assert np.std(pulls) == pytest.approx(1.0, abs=0.1)


def test_flux_follows_zeropoint_and_table_is_complete(frame, psf):
    _, truth = _inject(frame, psf, 1)
    np.testing.assert_allclose(truth["flux"], 10 ** (-0.4 * (truth["mag"] - ZP)), rtol=1e-12)
    assert truth.colnames == [
        "id",
        "image",
        "frame",
        "x",
        "y",
        "ra",
        "dec",
        "mag",
        "flux",
        "filter",
        "zeropoint",
        "psf_fwhm",
        "on_host",
    ]
    assert str(truth["flux"].unit) == "adu" and str(truth["x"].unit) == "pix" and str(truth["ra"].unit) == "deg"
    assert truth["id"][3] == "f_sim0_inj3"
    ra, dec = frame.wcs.all_pix2world(truth["x"], truth["y"], 0)
    np.testing.assert_allclose(truth["ra"], ra)
    assert np.all((truth["mag"] >= 17) & (truth["mag"] <= 20))
    assert truth.meta["seed"] == 1 and truth.meta["table"] == "simulated_objects"


def test_bright_centroids_within_005_px(frame, psf):
    out, truth = _inject(frame, psf, 2, mag_range=[16.0, 17.0])
    diff = out - frame.data
    for row in truth:
        _, x, y = _fit(diff, psf, row["x"], row["y"], free_position=True)
        # 0.05 px: design goal; S/N ~ 300-500 sources give ~0.01 px statistical errors.
        assert abs(x - row["x"]) < 0.05 and abs(y - row["y"]) < 0.05


def test_deterministic_from_seed(frame, psf):
    a, ta = _inject(frame, psf, 7)
    b, tb = _inject(frame, psf, 7)
    c, tc = _inject(frame, psf, 8)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ta["x"], tb["x"])
    assert not np.array_equal(ta["x"], tc["x"])


def test_positions_respect_edges_separation_and_nan_region(frame, psf):
    data = frame.data.copy()
    data[100:160, 100:160] = np.nan
    image = Image(data, frame.header, frame.wcs)
    out, truth = inject_sources(
        image, psf, INFO, dict(CFG, n=60, min_separation=15.0), cutout_size=31, seed=3, frame="f", image_name="f_sim0"
    )
    x, y = np.asarray(truth["x"]), np.asarray(truth["y"])
    border = 31 // 2
    assert np.all((x >= border) & (x <= SHAPE[1] - 1 - border) & (y >= border) & (y <= SHAPE[0] - 1 - border))
    d = np.hypot(x[:, None] - x[None], y[:, None] - y[None]) + np.eye(x.size) * 1e9
    assert d.min() >= 15.0
    inside = (x > 99) & (x < 161) & (y > 99) & (y < 161)
    assert not inside.any()
    assert np.isnan(out[100:160, 100:160]).all()


def test_saturation_clips_like_a_real_pixel(frame, psf):
    info = FrameInfo(**{**INFO.__dict__, "saturation": 3000.0})
    out, truth = inject_sources(
        frame, psf, info, dict(CFG, mag_range=[14.0, 14.5], n=5), cutout_size=31, seed=4, frame="f", image_name="f_sim0"
    )
    assert out.max() <= 3000.0
    assert (out == 3000.0).sum() >= 5


def test_sources_on_galaxies(psf):
    data, hdr, _ = star_frame(SHAPE, spacing=80, seed=12, flux_range=(3.0, 3.5), galaxies=6)
    image = Image(data, hdr, WCS(hdr))
    hosts = find_hosts(data, 3.5, bad=~np.isfinite(data))
    assert len(hosts) >= 3
    out, truth = inject_sources(
        image,
        psf,
        INFO,
        dict(CFG, n=20, host_fraction=0.5, min_separation=5.0),
        cutout_size=31,
        seed=5,
        frame="f",
        image_name="f_sim0",
    )
    on = truth[truth["on_host"]]
    assert len(on) >= 5
    dist = np.hypot(np.asarray(on["x"])[:, None] - hosts["x"][None], np.asarray(on["y"])[:, None] - hosts["y"][None])
    # Offsets have a median of host_offset x r_half (a few px): all within 6 half-light radii of a host.
    assert np.all(dist.min(axis=1) < 6 * np.max(hosts["r_half"]))


def test_magnitude_distributions():
    rng = np.random.default_rng(0)
    m = draw_magnitudes(dict(CFG, distribution="uniform_flux", mag_range=[16.0, 21.0]), 20000, rng)
    f = 10 ** (-0.4 * m)
    # Uniform in flux: the mean flux is the mid-range flux (5 sigma of 20000 draws is ~1 %).
    assert f.mean() == pytest.approx((10 ** (-0.4 * 16) + 10 ** (-0.4 * 21)) / 2, rel=0.02)
    assert list(draw_magnitudes(dict(CFG, distribution="list", mags=[18.0, 19.0]), 5, rng)) == [18, 19, 18, 19, 18]
    with pytest.raises(ConfigError, match="inject.mags"):
        draw_magnitudes(dict(CFG, distribution="list", mags=[]), 5, rng)


def test_frame_without_wcs_is_a_clear_error(frame, psf):
    with pytest.raises(InputError, match="no celestial WCS"):
        _inject(Image(frame.data, fits.Header(), None), psf, 1)


def test_psf_of_another_shape_is_rejected(frame):
    small = PSFModel(
        moffat_epsf(3.5, size=25, oversampling=2)[None],
        oversampling=2,
        size=25,
        shape=(100, 100),
        grid=(1, 1),
        n_stars=[1],
        sources=["moffat"],
    )
    with pytest.raises(InputError, match="rerun the psf stage"):
        _inject(frame, small, 1)


def test_run_inject_writes_frame_table_and_list(tmp_path, frame, psf, demo_telescope):
    path = tmp_path / "fld00_r_e1.fits"
    fits.PrimaryHDU(frame.data, header=frame.header).writeto(path)
    psf_path = tmp_path / "psf.fits"
    psf.write(psf_path)
    demo_telescope.update(gain=GAIN, read_noise=5.0, saturation=60000.0)
    demo_telescope["inject"].update(n=10, min_separation=20.0)
    out = tmp_path / "sim"
    truth = run_inject(
        path,
        psf_path,
        out / "f_sim1.fits",
        out / "f_sim1.ecsv",
        out / "f_sim1.list",
        demo_telescope,
        frame="fld00_r_e1",
        realization=1,
        seed=99,
    )
    hdr = fits.getheader(out / "f_sim1.fits")
    assert hdr["INJSEED"] == 99 and hdr["INJIMAGE"] == "fld00_r_e1_sim1" and hdr["INJN"] == len(truth) == 10
    assert hdr["INJZP"] == ZP and hdr["CTYPE1"] == "RA---TAN"
    back = read_table(out / "f_sim1.ecsv")
    assert back["id"][0] == "fld00_r_e1_sim1_inj0" and str(back["mag"].unit) == "mag"
    lines = (out / "f_sim1.list").read_text().splitlines()
    assert any("0-based" in line for line in lines if line.startswith("#"))
    first = lines[3].split()
    assert first[1] == "fld00_r_e1_sim1" and float(first[2]) == pytest.approx(truth["x"][0], abs=1e-3)
    with pytest.raises(InputError, match="not an rbflow PSF model"):
        run_inject(
            path,
            path,
            out / "x.fits",
            out / "x.ecsv",
            out / "x.list",
            demo_telescope,
            frame="fld00_r_e1",
            realization=1,
            seed=1,
        )


def test_sources_stay_inside_the_reference_footprint(frame, psf):
    # The reference is offset by 70 px in x (as a dithered reference epoch would be) and has a NaN
    # block (a masked region): a source the reference does not cover can never be recovered.
    hdr = frame.header.copy()
    hdr["CRPIX1"] = hdr["CRPIX1"] - 70
    ref_data = frame.data.copy()
    ref_data[150:210, 120:200] = np.nan
    reference = Image(ref_data, hdr, WCS(hdr))
    _, truth = inject_sources(
        frame,
        psf,
        INFO,
        dict(CFG, n=60, min_separation=10.0),
        cutout_size=31,
        seed=5,
        frame="f",
        image_name="f_sim0",
        reference=reference,
        ref_saturation=INFO.saturation,
    )
    assert len(truth) >= 40
    rx, ry = WCS(hdr).all_world2pix(truth["ra"], truth["dec"], 0)
    border = 31 // 2 + 5
    assert np.all((rx >= border) & (rx < SHAPE[1] - border) & (ry >= border) & (ry < SHAPE[0] - border))
    # reference x = frame x - 70: the frame's 70 + border leftmost columns are not covered
    assert np.min(truth["x"]) >= border + 70 - 0.5
    clearance = 2 * 3.5
    near_nan = (rx > 120 - clearance) & (rx < 200 + clearance) & (ry > 150 - clearance) & (ry < 210 + clearance)
    assert not near_nan.any()


def test_reference_not_overlapping_is_a_clear_error(frame, psf):
    hdr = frame.header.copy()
    hdr["CRPIX1"] = hdr["CRPIX1"] - 400
    reference = Image(frame.data.copy(), hdr, WCS(hdr), path="ref.fits")
    with pytest.raises(InputError, match="ref.fits.*reference covers the frame"):
        inject_sources(
            frame,
            psf,
            INFO,
            CFG,
            cutout_size=31,
            seed=5,
            frame="f",
            image_name="f_sim0",
            reference=reference,
            ref_saturation=INFO.saturation,
        )


def test_bad_columns_and_trails_are_not_hosts():
    data, hdr, _ = star_frame(SHAPE, spacing=80, seed=12, flux_range=(3.0, 3.5), galaxies=6)
    galaxies = find_hosts(data, 3.5, bad=~np.isfinite(data))
    hot = data.copy()
    hot[:, 40] += 200.0  # a hot column, as in the demo sky and real CCDs
    rr = np.arange(20, 230)
    hot[rr, (rr * 0.4 + 100).astype(int)] += 150.0  # a one-pixel trail
    hosts = find_hosts(hot, 3.5, bad=~np.isfinite(hot))
    assert len(hosts) >= len(galaxies) - 1  # the trail may run into one galaxy and spoil its segment
    on_column = np.abs(hosts["x"] - 40) < 3
    on_trail = np.abs(hosts["x"] - (hosts["y"] * 0.4 + 100)) < 3
    assert not (on_column | on_trail).any()
