"""Tests of rbflow.psf against simulated frames with a known PSF (a spatially varying Moffat; a core + halo)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from helpers import GAIN, moffat_pixels, star_frame, static_demo_frames, true_fwhm
from helpers import STAR_SHAPE as SHAPE

from rbflow.config import load_telescope
from rbflow.errors import InputError
from rbflow.frames import FrameInfo
from rbflow.io import Image, read_image
from rbflow.psf import PSFModel, build_psf, measure_halo, moffat_epsf, run_psf, select_psf_stars

CFG = dict(
    grid=[3, 3],
    oversampling=2,
    size=25,
    min_stars=8,
    max_stars=40,
    snr_min=30,
    prior_below=11,
    analytic_fallback=False,
    fallback_fwhm=2.0,
)
REALPSF = Path(__file__).resolve().parent / "data" / "telescopes" / "realpsf.yaml"
INFO = FrameInfo(
    gain=GAIN, read_noise=5.0, saturation=60000.0, filter="r", exptime=30.0, date="", zeropoint=28.0, fwhm_guess=3.5
)


def true_stamp(x, y, size=25, shape=SHAPE):
    """True PSF at (x, y) on native pixels around (round(x), round(y)), normalised like PSFModel.stamp."""
    g = np.arange(size) - size // 2
    dx = g[None, :] + round(x) - x + 0 * g[:, None]
    dy = g[:, None] + round(y) - y + 0 * g[None, :]
    st = moffat_pixels(dx, dy, true_fwhm(x, y, shape))
    return st / st.sum()


def true_epsf_fwhm(x, y, shape=SHAPE):
    """FWHM of the true pixel-integrated PSF, measured as PSFModel.fwhm measures it (area above half max)."""
    off = np.arange(-12, 12.001, 1 / 8)
    fine = moffat_pixels(
        off[None, :] + 0 * off[:, None], off[:, None] + 0 * off[None, :], true_fwhm(x, y, shape), sub=5
    )
    return 2 * np.sqrt(np.count_nonzero(fine >= fine.max() / 2) / 64 / np.pi)


@pytest.fixture(scope="module")
def varying():
    data, hdr, truth = star_frame()
    model = build_psf(Image(data, hdr, WCS(hdr)), INFO, CFG, pixel_scale=1.0, name="varying")
    return model, truth


def _probe_stars(truth):
    """Indices of the stars nearest the centre and the four corners of the frame."""
    xs, ys, _ = truth
    ny, nx = SHAPE
    return [
        int(np.argmin(np.hypot(xs - cx, ys - cy))) for cx, cy in ((nx / 2, ny / 2), (0, 0), (nx, 0), (0, ny), (nx, ny))
    ]


def test_residual_below_3_percent_of_peak_at_centre_and_corners(varying):
    model, truth = varying
    assert model.sources == ["cell"] * 9
    xs, ys, _ = truth
    for k in _probe_stars(truth):
        st = model.stamp(xs[k], ys[k], 25)
        ref = true_stamp(xs[k], ys[k])
        # Goal of the design (ZOGY needs it); the ePSF of ~170 stars at S/N 30-1000 has ~1 % noise per node.
        assert np.abs(st - ref).max() < 0.03 * ref.max(), (xs[k], ys[k])


def test_fwhm_within_3_percent_at_several_positions(varying):
    model, truth = varying
    xs, ys, _ = truth
    for k in _probe_stars(truth):
        # 3 %: design goal; the area-based FWHM is quantised to ~0.1 % and the true FWHM varies 28 %.
        assert model.fwhm(xs[k], ys[k]) == pytest.approx(true_epsf_fwhm(xs[k], ys[k]), rel=0.03)
    # The model follows the gradient: the far corner is much wider than the origin.
    assert model.fwhm(370, 370) > 1.2 * model.fwhm(15, 15)


def test_stamp_unit_sum_and_subpixel_centre(varying):
    model, _ = varying
    for x, y in ((100.3, 200.0), (250.0, 99.6), (192.45, 192.2)):
        st = model.stamp(x, y, 25)
        assert st.sum() == pytest.approx(1.0, abs=1e-12)
        ref = true_stamp(x, y)
        # Profile at the sub-pixel offset: matches the truth there (3 %, as above) ...
        assert np.abs(st - ref).max() < 0.03 * ref.max()
        # ... and a shift of 0.3 px would leave a > 5 % residual, so the test sees placement errors.
        assert np.abs(st - true_stamp(x + 0.3, y + 0.3)).max() > 0.05 * ref.max()
        centred = model.stamp(x, y, 25, centred=True)
        ref_c = true_stamp(round(x), round(y))
        assert np.abs(centred - ref_c).max() < 0.03 * ref_c.max()
    with pytest.raises(ValueError, match="odd"):
        model.stamp(10, 10, 24)


def test_write_read_round_trip(varying, tmp_path):
    model, _ = varying
    path = tmp_path / "psf.fits"
    model.write(path)
    back = PSFModel.read(path)
    assert back.shape == SHAPE and back.grid == (3, 3) and back.oversampling == 2
    assert back.sources == model.sources and list(back.n_stars) == list(model.n_stars)
    np.testing.assert_allclose(back.stamp(33.3, 301.7, 25), model.stamp(33.3, 301.7, 25), atol=1e-7)
    with fits.open(path) as hdul:
        assert hdul[0].header["NFALLBK"] == 0
        assert hdul[0].data.shape[0] == 9
        np.testing.assert_allclose(hdul["CELLS"].data["fwhm"], model.cell_fwhm, rtol=1e-6)


def test_read_rejects_a_fits_that_is_not_a_psf_model(tmp_path):
    path = tmp_path / "frame.fits"
    fits.PrimaryHDU(np.zeros((5, 5), np.float32)).writeto(path)
    with pytest.raises(InputError, match="not an rbflow PSF model"):
        PSFModel.read(path)
    with pytest.raises(InputError, match="does not exist"):
        PSFModel.read(tmp_path / "missing.fits")


def test_few_stars_fall_back_to_a_fitted_moffat_and_record_it(tmp_path, caplog):
    xs, ys, fl = [60.0, 190.2, 70.7, 180.4, 128.3], [60.0, 70.5, 190.1, 185.6, 128.8], [1e5] * 5
    data, hdr, _ = star_frame((256, 256), stars=(xs, ys, fl), seed=4)
    with caplog.at_level(logging.WARNING, logger="rbflow.psf"):
        model = build_psf(Image(data, hdr, None), INFO, CFG, pixel_scale=1.0, name="few")
    assert model.sources == ["moffat"] * 9
    assert "Moffat fitted" in caplog.text
    # 3 %: Moffat fitted to five S/N ~ 600 stars of FWHM 3.2-4.0 px, evaluated near their middle.
    assert model.fwhm(128, 128) == pytest.approx(true_epsf_fwhm(128, 128, (256, 256)), rel=0.05)
    model.write(tmp_path / "few.fits")
    assert fits.getheader(tmp_path / "few.fits")["NFALLBK"] == 9


def few_star_frame(seed: int, n: int = 6, *, coma: float = 0.0, side: int = 192) -> tuple[Image, FrameInfo, object]:
    """A ``side``^2 frame of ``n`` faint stars (S/N 38-350) of a known non-Moffat PSF, and that PSF's conditions.

    The PSF is the realpsf test telescope's (tests/data/telescopes/realpsf.yaml) held constant:
    a 1.7 px FWHM Moffat core (beta 2.5) with a fifth of the light in a halo 3 times broader
    (beta 2), drawn by :func:`rbflow.sky.psf_stamp`; with ``coma``, that fraction of the core's
    light in a copy one FWHM away (the light's centroid stays on the source).
    """
    import dataclasses

    from rbflow.sky import frame_conditions, psf_stamp

    tel = load_telescope(REALPSF)
    cond = dataclasses.replace(
        frame_conditions(tel, "fld00_r_e1", seed=7), psf_variation=0.0, psf_ellipticity=0.0, coma=coma
    )
    gain, rn = tel["gain"], tel["read_noise"]
    rng = np.random.default_rng(seed)
    img = np.full((side, side), cond.sky)
    pts: list[tuple[float, float]] = []
    while len(pts) < n:
        x, y = rng.uniform(20, side - 20, 2)
        if all(np.hypot(x - a, y - b) > 25 for a, b in pts):
            pts.append((x, y))
    for x, y in pts:
        ix, iy = int(np.rint(x)), int(np.rint(y))
        img[iy - 15 : iy + 16, ix - 15 : ix + 16] += 10 ** rng.uniform(3.0, 4.5) * psf_stamp(cond, x, y, half=15)
    data = ((rng.poisson(img * gain) + rng.normal(0, rn, img.shape)) / gain).astype(np.float32)
    info = FrameInfo(
        gain=gain, read_noise=rn, saturation=50000.0, filter="r", exptime=30.0, date="", zeropoint=28.0, fwhm_guess=1.7
    )
    return Image(data, fits.Header(), None), info, cond


def few_star_error(model: PSFModel, cond) -> tuple[float, float]:
    """Largest pixel error (fraction of the true peak) and first-moment offset (px) near the frame centre."""
    from rbflow.sky import psf_stamp

    x, y = 95.3, 96.6
    truth, got = psf_stamp(cond, x, y, half=15), model.stamp(x, y, 31)
    g = np.arange(-15, 16)
    shift = [((got - truth).sum(axis=a) * g).sum() for a in (0, 1)]
    return float(np.abs(got - truth).max() / truth.max()), float(np.hypot(*shift))


@pytest.mark.parametrize("seed", range(1, 7))
def test_constant_epsf_from_a_handful_of_faint_stars_stays_near_the_truth(seed):
    # 6 stars: the constant ePSF leans on its prior, an analytic core fitted to them with the halo
    # of realpsf.yaml's psf.halo. Measured: 1.8-3.0 % of the peak (1.7-3.6 % with the halo fitted
    # to the 6 stars), first moment <= 0.03 px off; without the prior 2.7-9.9 %
    # and up to 0.23 px (test below). Issue 15's targets: 5 % (a 5 % core error leaves < 5 sigma
    # at a 100 sigma star) and 0.1 px (a 0.1 px shift of a 2 px core is a ~5 % dipole).
    image, info, cond = few_star_frame(seed)
    tel = load_telescope(REALPSF)
    model = build_psf(image, info, tel["psf"], pixel_scale=1.0, name="few")
    assert model.sources == ["cell"] and model.n_stars.tolist() == [6]
    err, shift = few_star_error(model, cond)
    assert err < 0.05 and shift < 0.1, (err, shift)


@pytest.fixture(scope="module")
def halo_frames(tmp_path_factory):
    """The frames of the realpsf telescope for seeds 1 and 2 (those its psf.halo was measured on)."""
    from rbflow.frames import frames_of
    from rbflow.sky import write_frame

    tel = load_telescope(REALPSF)
    root = tmp_path_factory.mktemp("halo")
    paths = []
    for seed in (1, 2):
        for spec in frames_of(tel):
            path = root / f"s{seed}_{spec.name}.fits"
            write_frame(tel, spec.name, path, root / f"s{seed}_{spec.name}.ecsv", seed=seed)
            paths.append(path)
    return tel, paths


def test_the_telescopes_psf_halo_is_what_psf_halo_measures(halo_frames, capsys):
    # realpsf.yaml's psf.halo is `rbflow psf-halo`'s measure on these frames (12 of the 16 with
    # >= psf.min_stars = 4 PSF stars), not the sky's own halo (a fifth of the light in a Moffat
    # of beta 2, 3 times the core's FWHM, which the prior's profile family spans differently):
    # the median of the frames' fits is 0.181 of the light at 2.43 times the core's FWHM, the
    # frames scatter over 0.09-0.25 in fraction.
    from rbflow.cli import main

    tel, paths = halo_frames
    (fraction, ratio), table = measure_halo(paths, tel)
    assert table["used"].sum() == 12 and np.all(table["n_stars"][~table["used"]] < 4)
    assert (fraction, ratio) == pytest.approx(tuple(tel["psf"]["halo"]), abs=5e-4)
    assert main(["psf-halo", str(REALPSF), *map(str, paths[:8])]) == 0
    assert "halo: [" in capsys.readouterr().out


def test_psf_halo_needs_a_frame_with_enough_stars(halo_frames):
    tel, paths = halo_frames
    few = [p for p in paths if p.name == "s1_fld00_r_e1.fits"]  # 1 PSF star
    with pytest.raises(InputError, match="min_stars"):
        measure_halo(few, tel)


def test_without_the_prior_a_handful_of_faint_stars_misshape_the_epsf():
    # The same frame (seed 1) without the prior (psf.prior_below 0): 10.0 % of the peak (with it
    # 3.6 %), so the test above judges the prior. (Its first moment was 0.23 px off before the
    # ePSF was centred on its light, 0.09 px since.)
    image, info, cond = few_star_frame(1)
    cfg = dict(load_telescope(REALPSF)["psf"], prior_below=0)
    model = build_psf(image, info, cfg, pixel_scale=1.0, name="few")
    err, _ = few_star_error(model, cond)
    assert err > 0.05, err


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_an_asymmetric_epsf_is_centred_on_its_light(seed):
    # 28-30 stars of a PSF with coma (6.7 % of the core's light one FWHM off, as rbflow.sky renders
    # it, the light's centroid on the source) and a halo; enough stars for no prior. Windowed
    # centroids sit between the peak and the centroid, and the fit kept that offset: 5.7-8.7 % of
    # the peak and 0.05-0.10 px off. Centred on its first moment within 2.5 FWHM: 3.1-3.3 % and
    # 0.007-0.026 px. 4.5 % and 0.04 px: between the two, within issue 15's 5 % and 0.1 px.
    image, info, cond = few_star_frame(seed, n=30, coma=0.1, side=400)
    model = build_psf(image, info, load_telescope(REALPSF)["psf"], pixel_scale=1.0, name="coma")
    assert model.n_stars[0] >= load_telescope(REALPSF)["psf"]["prior_below"]
    err, shift = few_star_error(model, cond)
    assert err < 0.045 and shift < 0.04, (err, shift)


def test_a_dead_column_through_psf_stars_is_left_out_of_the_fit():
    # 30 stars of the realpsf PSF (seed 3); a dead column (5 % of the sky) 5 px from the two
    # brightest. Measured: clean 2.8 % of the peak and 0.014 px; with the columns 2.7 % and
    # 0.005 px, and 6.0 % and 0.24 px when such pixels were fitted (the starter sky's
    # fld08_r_ref: a model 49-82 % off). Bounds: 3.5 % and 0.05 px.
    image, info, cond = few_star_frame(3, n=30, side=400)
    tel = load_telescope(REALPSF)
    stars, _ = select_psf_stars(image, info, tel["psf"], fwhm_guess=info.fwhm_guess, name="clean")
    data = image.data.copy()
    for k in (0, 1):
        data[:, int(stars.x0[k]) + 5] = 0.05 * np.median(data)
    model = build_psf(Image(data, image.header, None), info, tel["psf"], pixel_scale=1.0, name="dead")
    assert model.n_stars.tolist() == [30]
    err, shift = few_star_error(model, cond)
    assert err < 0.035 and shift < 0.05, (err, shift)


def test_empty_cells_borrow_from_neighbours_or_frame(caplog):
    # Stars only in the left two thirds: the right column of cells has none.
    gy, gx = np.mgrid[20:290:26, 20:190:26]
    rng = np.random.default_rng(5)
    stars = (gx.ravel() + rng.uniform(-3, 3, gx.size), gy.ravel() + rng.uniform(-3, 3, gx.size), np.full(gx.size, 3e4))
    data, hdr, _ = star_frame((300, 300), stars=stars, seed=5)
    with caplog.at_level(logging.WARNING, logger="rbflow.psf"):
        model = build_psf(Image(data, hdr, None), INFO, CFG, pixel_scale=1.0, name="half")
    assert model.sources[0] == "cell"
    assert all(model.sources[k] in ("neighbours", "frame") for k in (2, 5, 8))
    # a borrowing cell records its own stars, not those it borrows: subtract's 'auto' reads the
    # median of these counts as how well the model is constrained
    assert all(model.n_stars[k] == 0 for k in (2, 5, 8) if model.sources[k] == "neighbours")
    assert model.n_stars[0] >= CFG["min_stars"]
    assert "fallback" in caplog.text


def test_no_star_raises_or_uses_analytic_fallback(caplog):
    data, hdr, _ = star_frame((128, 128), stars=([], [], []), seed=6)
    image = Image(data, hdr, None)
    with pytest.raises(InputError, match="no usable PSF star"):
        build_psf(image, INFO, CFG, pixel_scale=1.0, name="empty")
    cfg = dict(CFG, analytic_fallback=True, fallback_fwhm=2.0)
    with caplog.at_level(logging.WARNING, logger="rbflow.psf"):
        model = build_psf(image, INFO, cfg, pixel_scale=0.5, name="empty")
    assert model.sources == ["analytic"] * 9
    assert "NO usable PSF star" in caplog.text
    # 2 arcsec / 0.5 arcsec/px = 4 px before pixel integration; integration widens it by ~1-2 %.
    assert model.fwhm(64, 64) == pytest.approx(4.0, rel=0.03)


def test_moffat_epsf_is_normalised_and_has_its_fwhm():
    epsf = moffat_epsf(5.0, size=25, oversampling=2)
    model = PSFModel(
        epsf[None], oversampling=2, size=25, shape=(50, 50), grid=(1, 1), n_stars=[0], sources=["analytic"]
    )
    assert model.stamp(25, 25, 25, centred=True).sum() == pytest.approx(1.0)
    assert model.fwhm(25, 25) == pytest.approx(5.0, rel=0.02)  # pixel integration adds ~1 % at 5 px


def test_run_psf_writes_model_and_png(tmp_path, demo_telescope):
    data, hdr, _ = star_frame((256, 256), spacing=28, seed=7)
    frame = tmp_path / "fld00_r_e1.fits"
    fits.PrimaryHDU(data, header=hdr).writeto(frame)
    demo_telescope.update(gain=GAIN, read_noise=5.0, saturation=60000.0)
    demo_telescope["psf"].update(grid=[2, 2])
    model = run_psf(frame, tmp_path / "psf" / "fld00_r_e1.fits", tmp_path / "psf" / "fld00_r_e1.png", demo_telescope)
    assert (tmp_path / "psf" / "fld00_r_e1.png").stat().st_size > 1000
    back = PSFModel.read(tmp_path / "psf" / "fld00_r_e1.fits")
    assert back.name == "fld00_r_e1" and back.grid == (2, 2)
    assert model.fwhm(128, 128) == pytest.approx(true_epsf_fwhm(128, 128, (256, 256)), rel=0.03)


def dense_demo_frame(demo_tel: dict, seed: int) -> tuple[Image, FrameInfo, dict]:
    """A 512^2 demo-sky reference frame made denser in bright stars, its facts and its telescope.

    The demo PSF is an elliptical Moffat core (beta 2.5) with coma, whose FWHM, ellipticity and
    coma change across the frame (config/telescopes/demo.yaml). The star field is made denser in
    bright stars (1000 stars of 14-19 mag per 1024^2) so that a 512^2 frame holds the ~100 PSF
    stars of a full demo frame; no cosmic rays, hot pixels, bad columns or satellites.
    """
    import copy

    from rbflow.frames import frame_info
    from rbflow.sky import simulate_frame

    tel = copy.deepcopy(demo_tel)
    tel["sky"].update(
        size=[512, 512],
        stars=1000,
        star_mags=[14.0, 19.0],
        cosmic_rays=0,
        hot_pixels=0,
        bad_columns=0,
        satellite_rate=0,
    )
    hdu, _ = simulate_frame(tel, "fld00_r_ref", seed=seed)
    return Image(hdu.data, hdu.header, None), frame_info(hdu.header, tel), tel


@pytest.fixture(scope="module")
def demo_sky(_demo_telescope):
    """PSF model of :func:`dense_demo_frame` (seed 1) and the frame's true conditions."""
    from rbflow.sky import frame_conditions

    image, info, tel = dense_demo_frame(_demo_telescope, 1)
    model = build_psf(image, info, tel["psf"], pixel_scale=tel["pixel_scale"], name="demo")
    return model, frame_conditions(tel, "fld00_r_ref", seed=1)


def test_demo_sky_residual_within_3_percent_of_peak_at_centre_and_corners(demo_sky):
    from rbflow.sky import psf_stamp

    model, cond = demo_sky
    assert model.sources.count("cell") >= 5
    assert cond.coma > 0 and cond.halo_fraction > 0
    errors = []
    for x, y in ((255.8, 255.3), (85.3, 84.8), (426.3, 84.8), (85.3, 426.8), (426.3, 426.8)):
        # The truth is drawn exactly as rbflow.sky draws the stars (pixel-integrated core, coma, halo).
        ref = psf_stamp(cond, x, y, half=12)
        ref /= ref.sum()
        errors.append(np.abs(model.stamp(x, y, 25) - ref).max() / ref.max())
        # 3 %: design goal; the area-based FWHM is quantised to ~0.5 % at 1.7-1.9 px.
        assert model.fwhm(x, y) == pytest.approx(demo_true_fwhm(cond, x, y), rel=0.03), (x, y)
    # 3 %: design goal (ZOGY needs it). ~90 stars leave ~1 % noise per node, more where a cell's
    # 7-13 stars pin a corner of the degree-2 polynomial, and a 1.7 px FWHM sampled at
    # oversampling 2 cannot be represented better than ~1-2.5 % (cubic-convolution resampling of
    # the nodes). Measured on this frame (seed 1): mean of the five positions 2.2 %, largest 3.2 %
    # at (426, 427), whose cell lost a blend of two 17.7-17.8 mag stars to the stellar-locus cut
    # (1.8 % and 2.2 % with it); over seeds 1-8 the largest is 2.4-4.4 % and the mean 2.0-3.6 %,
    # with or without the cut (the coma before the ePSF was centred on its light: 3.5-6.2 %).
    assert np.mean(errors) < 0.025 and max(errors) < 0.035, np.round(errors, 4)


def test_galaxies_that_outnumber_the_stars_stay_out_of_the_psf(tmp_path, caplog):
    # The demo's sparse field fld03 (a tenth of the stars) on its static sky, the demo seed: its
    # reference has 70 isolated candidates of S/N >= 30 and 46 of them are galaxies (Sersic, half-
    # light radii from 0.4 px), whose spread of concentrations lies below the stars' tight locus.
    # Measured (largest pixel error over the peak at the centre and the four cell centres of the
    # corners): 14-42 % with the galaxies in (the model's peak half the truth's), 1.7-2.8 % with
    # the 24 stars and the 9 faint galaxies within 3 sigma of the locus. Bound: 5 %, issue 15's.
    from rbflow.frames import frame_info
    from rbflow.sky import frame_conditions, psf_stamp

    tel = static_demo_frames(tmp_path, ("fld03_g_ref",), psf=False)
    image = read_image(tmp_path / "fld03_g_ref.fits")
    with caplog.at_level(logging.INFO, logger="rbflow.psf"):
        model = build_psf(image, frame_info(image.header, tel), tel["psf"], pixel_scale=1.0, name="sparse")
    assert "below the stellar locus" in caplog.text
    cond = frame_conditions(tel, "fld03_g_ref", seed=20261124)
    for x, y in ((511.8, 512.3), (170.3, 170.8), (853.3, 170.8), (170.3, 853.8), (853.3, 853.8)):
        ref = psf_stamp(cond, x, y, half=12)
        ref /= ref.sum()
        assert np.abs(model.stamp(x, y, 25) - ref).max() < 0.05 * ref.max(), (x, y)


def test_a_star_that_loses_every_pixel_to_clipping_does_not_poison_the_model(_demo_telescope):
    # A dense 512^2 demo frame (seed 6) had a PSF star whose every pixel was clipped: its flux
    # refit was 0 / 0 and the NaN reached every node, so building the model raised in its FWHM.
    image, info, tel = dense_demo_frame(_demo_telescope, 6)
    model = build_psf(image, info, tel["psf"], pixel_scale=1.0, name="seed6")
    assert np.isfinite(model.cube).all() and np.all((model.cell_fwhm > 1.5) & (model.cell_fwhm < 3.5))


def demo_true_fwhm(cond, x, y, sub=8):
    """FWHM of the demo's true pixel-integrated PSF at (x, y), measured as PSFModel.fwhm measures it.

    The rendered PSF (:func:`rbflow.sky.psf_stamp`) of sources at ``sub`` x ``sub`` sub-pixel
    offsets, interleaved: the pixel-integrated PSF on a grid ``sub`` times finer than the pixels.
    """
    from rbflow.sky import psf_stamp

    half = 8
    fine = np.zeros(((2 * half + 1) * sub, (2 * half + 1) * sub))
    shifts = (np.arange(sub) - (sub - 1) / 2) / sub
    for j, dy in enumerate(shifts):
        for i, dx in enumerate(shifts):
            # pixel k of a source at offset d holds the pixel-integrated PSF at k - d
            fine[sub - 1 - j :: sub, sub - 1 - i :: sub] = psf_stamp(cond, round(x) + dx, round(y) + dy, half=half)
    return 2 * np.sqrt(np.count_nonzero(fine >= fine.max() / 2) / sub**2 / np.pi)


def test_psf_of_a_demo_frame_with_many_cosmic_rays_and_hot_pixels(_demo_telescope):
    # a science frame with 25x the demo's cosmic rays and 17x its hot pixels (~500 spikes in
    # 512^2 px): the star finder's sharpness cut keeps nearly all of them out of the PSF stars
    # (without a cut the FWHM came out 55-75 % too small) and the solve rejects the few left, so
    # the model FWHM stays within the 3 % design goal at the centre. With the demo's halo: measured
    # 0.4 % (seeds 3, 4: 1.9, 0.2 %); 23 % small when a clipped pixel came back in the next iteration
    # and cosmic rays in the wings counted as extended light (the rejection dropped 37 of 57 stars)
    import copy

    from rbflow.frames import frame_info
    from rbflow.psf import select_psf_stars
    from rbflow.sky import frame_conditions
    from rbflow.sky import simulate_frame as simulate_demo_frame

    tel = copy.deepcopy(_demo_telescope)
    tel["sky"].update(size=[512, 512], stars=1000, star_mags=[14.0, 19.0], cosmic_rays=1000, hot_pixels=1000)
    hdu, truth = simulate_demo_frame(tel, "fld00_r_e1", seed=2)
    image, info = Image(hdu.data, hdu.header, None), frame_info(hdu.header, tel)
    spikes = truth[np.isin(truth["kind"], ["cosmic_ray", "hot_pixel"])]
    assert len(spikes) > 400
    stars, _ = select_psf_stars(image, info, tel["psf"], fwhm_guess=info.fwhm_guess or 3.0, name="demo")
    assert len(stars) >= 40

    def nearest(table):
        x, y = np.asarray(table["x"]), np.asarray(table["y"])
        return np.hypot(stars.x[:, None] - x[None], stars.y[:, None] - y[None]).min(axis=1)

    points = truth[np.isin(truth["kind"], ["star", "variable", "transient"])]
    on_spike = (nearest(spikes) < 1.5) & (nearest(points) > 1.5)
    # measured: 3-4 of 59 PSF stars sit on a cosmic ray (tracks of several pixels, some on a faint
    # star); photutils' DAOStarFinder, which the PSF stage used before, let 5 through here
    assert np.count_nonzero(on_spike) <= 0.1 * len(stars)
    model = build_psf(image, info, tel["psf"], pixel_scale=tel["pixel_scale"], name="demo")
    cond = frame_conditions(tel, "fld00_r_e1", seed=2)
    assert model.fwhm(255.5, 255.5) == pytest.approx(demo_true_fwhm(cond, 255.5, 255.5), rel=0.03)
