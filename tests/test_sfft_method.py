"""Tests of the sfft subtraction method (rbflow.sfft_method) on a small synthetic pair.

The first sfft run of a machine compiles numba functions (15-35 s); they are cached on disk
(rbflow.sfft_method.numba_cache_dir), so later runs take a few seconds. One subtraction is shared.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys

import numpy as np
import pytest
from helpers import PAIR_CFG as CFG
from helpers import PAIR_INFO as INFO
from helpers import CountedPSF, make_pair, subtract_pair
from scipy import ndimage, signal
from scipy.spatial import cKDTree

from rbflow import sfft_method
from rbflow import subtract as sub
from rbflow.detect import FLAGS, detect
from rbflow.difference import PreparedPair
from rbflow.errors import ConfigError

SFFT = {**CFG, "method": "sfft"}
TRANSIENTS = np.array([[x, y, 4000.0] for x in (40.0, 100.0, 160.0, 220.0) for y in (50.0, 128.0, 205.0)])


@pytest.fixture(scope="module")
def sfft_run():
    pytest.importorskip("sfft")
    pair = make_pair(seed=11, nstars=160, transients=TRANSIENTS)
    return pair, subtract_pair(pair, SFFT)


def test_outputs_follow_the_zogy_contract(sfft_run):
    pair, h = sfft_run
    assert [x.name for x in h] == ["PRIMARY", "SCI", "REF", "DIFF", "SCORR", "VAR", "MASK", "PSFD"]
    hdr = h[0].header
    assert hdr["METHOD"] == "sfft" and hdr["CONVD"] == "REF"  # the reference is the sharper image
    assert hdr["KERHW"] == 8 and hdr["NTILES"] == 1  # twice the science FWHM of 4 px; 256 px < tile
    assert hdr["FLXRATIO"] == pytest.approx(1.6, rel=0.01)
    # exact registration: no star moved; the astrometric-noise term is off by default (sigma 0)
    assert hdr["ASTNOISE"] is False and hdr["NMOVERS"] == 0
    assert hdr["ASTSIGX"] == 0 and hdr["ASTSIGY"] == 0
    for name in ("DIFF", "SCORR", "VAR"):
        assert h[name].data.dtype == np.float32
    assert np.array_equal(np.isnan(h["DIFF"].data), h["MASK"].data != 0)
    assert h["PSFD"].data.shape == (1, hdr["PSFSIZE"], hdr["PSFSIZE"])
    assert h["PSFD"].data.sum() == pytest.approx(1.0, abs=1e-5)


def test_score_map_has_unit_noise_away_from_sources(sfft_run):
    pair, h = sfft_run
    sc = h["SCORR"].data
    xs, ys, fl = pair["stars"]
    near = np.zeros(sc.shape, bool)
    for x, y in np.r_[np.c_[xs, ys], TRANSIENTS[:, :2]]:
        if 0 <= x < 256 and 0 <= y < 256:
            near[int(y), int(x)] = True
    far = ~ndimage.binary_dilation(near, iterations=10) & np.isfinite(sc)
    assert far.sum() > 10000
    # normalised on the empty sky by construction; the plain std over ~40000 correlated pixels
    # (~1500 PSF areas) is known to ~3 %, so 10 % tests that no structure is left
    assert np.std(sc[far]) == pytest.approx(1.0, abs=0.1)
    # D is decorrelated, so the matched filter over its white-noise prediction is right as it is
    # (it was ~1.4 before decorrelation); the robust std of ~1500 independent PSF areas is known to
    # ~2.5 %, so 5 %
    assert h[0].header["SCORRNRM"] == pytest.approx(1.0, abs=0.05)


def _lag1(z: np.ndarray, ok: np.ndarray) -> tuple[float, float]:
    """Correlation of z with its neighbour along x and along y, over pairs of ``ok`` pixels."""
    out = []
    for a, b, m in ((z[:, :-1], z[:, 1:], ok[:, :-1] & ok[:, 1:]), (z[:-1], z[1:], ok[:-1] & ok[1:])):
        u, v = a[m] - a[m].mean(), b[m] - b[m].mean()
        out.append(float(np.mean(u * v) / np.sqrt(np.mean(u * u) * np.mean(v * v))))
    return out[0], out[1]


def test_decorrelation_kernel_whitens_the_difference_of_white_noise():
    rng = np.random.default_rng(5)
    s_o, s_c = 4.0, 10.0  # a shallow image O against a noisier (reference-unit) C, as after flux scaling
    g = np.exp(-0.5 * (np.arange(-8, 9) / 1.0) ** 2)
    kernel = 0.7 * np.outer(g, g) / np.outer(g, g).sum()  # unit-less matching kernel, flux scaling 0.7
    other = rng.normal(0, s_o, (512, 512))
    conv = rng.normal(0, s_c, (512, 512))
    raw = other - signal.fftconvolve(conv, kernel, mode="same")
    dc = sfft_method.decorrelation_kernel(kernel, s_o, s_c)
    assert dc.shape == (35, 35) and dc.sum() == pytest.approx(1.0)
    d = signal.fftconvolve(raw, dc, mode="same")
    inner = np.zeros(raw.shape, bool)
    inner[40:-40, 40:-40] = True
    # the raw difference is positively correlated (K smooths C's noise): lag-1 correlation 0.15
    # here; white noise over ~187000 pixel pairs has lag-1 correlation 0 +- 0.0023
    assert min(_lag1(raw, inner)) > 0.1
    assert max(abs(c) for c in _lag1(d, inner)) < 0.01
    # unit-sum DC keeps fluxes; the white noise then has variance s_o² + K0² s_c²
    assert np.std(d[inner]) == pytest.approx(math.hypot(s_o, 0.7 * s_c), rel=0.01)


def test_difference_noise_is_white_and_matches_var(sfft_run):
    pair, h = sfft_run
    z = h["DIFF"].data / np.sqrt(h["VAR"].data)
    xs, ys, fl = pair["stars"]
    near = np.zeros(z.shape, bool)
    for x, y in np.r_[np.c_[xs, ys], TRANSIENTS[:, :2]]:
        if 0 <= x < 256 and 0 <= y < 256:
            near[int(y), int(x)] = True
    far = ~ndimage.binary_dilation(near, iterations=10) & np.isfinite(z)
    far[:20] = far[-20:] = False
    far[:, :20] = far[:, -20:] = False
    # ~20000 empty-sky pixel pairs: white noise gives 0 +- 0.007; without decorrelation 0.3-0.4
    assert max(abs(c) for c in _lag1(z, far)) < 0.05
    # VAR predicts the noise of D before the empty-sky rescaling (DIFFNRM): measured 0.948, ZOGY
    # 0.962 on the same pair (the background noise estimates are ~2 % high; robust std known to ~1 %)
    assert h[0].header["DIFFNRM"] == pytest.approx(1.0, abs=0.06)
    # after the rescaling the plain std (outliers included) stays at the robust one: no tails
    assert np.std(z[far]) == pytest.approx(1.0, abs=0.03)
    hdr = h[0].header
    assert hdr["DECORR"] is True and hdr["DCSIZE"] == 2 * (2 * hdr["KERHW"] + 1) + 1
    assert hdr["KERSUM"] == pytest.approx(1 / hdr["FLXRATIO"], rel=0.02)


def test_injected_sources_are_recovered_with_their_flux(sfft_run):
    pair, h = sfft_run
    cands = detect(h, pair["psf_sci"], INFO, {"threshold": 5.0, "min_pixels": 1}, image_name="s", cutout_size=31)
    dist, idx = cKDTree(np.c_[cands["x"], cands["y"]]).query(TRANSIENTS[:, :2])
    found = dist < 2
    # S/N ~ 20 each: all 12 should be found; one may fall on a bright star's residual
    assert found.sum() >= 11
    ratio = np.asarray(cands["flux"])[idx[found]] / TRANSIENTS[found, 2]
    # 19x19 px kernel truncates the wings of the kernel (sfft reports ~1-4 % low scalings)
    assert np.median(ratio) == pytest.approx(1.0, abs=0.08)
    false = cKDTree(TRANSIENTS[:, :2]).query(np.c_[cands["x"], cands["y"]])[0] > 2
    isolated = (np.asarray(cands["flags"]) & (FLAGS["NEAR_BRIGHT"] | FLAGS["EDGE"])) == 0
    assert (false & isolated).sum() <= 2


def test_sharper_science_is_convolved_and_d_stays_in_science_units():
    pytest.importorskip("sfft")
    pair = make_pair(seed=12, nstars=160, fwhm_sci=3.0, fwhm_ref=4.0, transients=TRANSIENTS)
    h = subtract_pair(pair, SFFT)
    assert h[0].header["CONVD"] == "SCI"
    cands = detect(h, pair["psf_sci"], INFO, {"threshold": 5.0, "min_pixels": 1}, image_name="c", cutout_size=31)
    dist, idx = cKDTree(np.c_[cands["x"], cands["y"]]).query(TRANSIENTS[:, :2])
    assert (dist < 2).sum() >= 11
    # D = (K * N - R) / F_r: the PSF of D is the reference's, the flux the science's
    assert np.median(np.asarray(cands["flux"])[idx[dist < 2]] / 4000.0) == pytest.approx(1.0, abs=0.08)


def test_missing_sfft_is_a_config_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sfft.CustomizedPacket", None)
    pair = make_pair((128, 128), seed=7, nstars=60)
    with pytest.raises(ConfigError, match=r'pip install "rbflow\[sfft\]"'):
        subtract_pair(pair, SFFT)


@pytest.mark.parametrize("n, tile, overlap", [(256, 1024, 64), (2048, 1024, 64), (3000, 1024, 100), (1100, 1024, 64)])
def test_tiles_have_one_size_and_their_cores_cover_the_frame(n, tile, overlap):
    wins = sfft_method._windows(n, tile, overlap)
    assert {w1 - w0 for w0, w1, _, _ in wins} == {min(n, tile)}
    assert wins[0][2] == 0 and wins[-1][3] == n
    assert all(a[3] == b[2] for a, b in zip(wins, wins[1:]))
    for w0, w1, c0, c1 in wins:
        assert w0 <= c0 < c1 <= w1
        # every core pixel has half the overlap (or the frame edge) on each side within its window
        assert c0 - w0 >= overlap // 2 or w0 == 0
        assert w1 - c1 >= overlap // 2 or w1 == n


def test_numba_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "nb"))
    assert sfft_method.numba_cache_dir() == tmp_path / "nb"
    monkeypatch.delenv("NUMBA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert sfft_method.numba_cache_dir() == tmp_path / "rbflow" / "numba"
    assert "sfft" in sub.METHODS


def test_auto_runs_decorrelated_sfft_for_few_star_psf_models():
    pytest.importorskip("sfft")
    pair = make_pair((128, 128), seed=7, nstars=60)
    few = {**pair, "psf_sci": CountedPSF(4, [4]), "psf_ref": CountedPSF(3, [7])}
    hdr = subtract_pair(few, {**CFG, "method": "auto"})[0].header
    assert hdr["METHOD"] == "sfft" and hdr["DECORR"] is True
    assert hdr["METHAUTO"] == "sfft: PSF stars per cell sci 4, ref 7 < 8"


def _gaussian_stars(shape, xs, ys, fluxes, sigma):
    yy, xx = np.indices(shape)
    img = np.zeros(shape)
    for x, y, f in zip(xs, ys, fluxes):
        img += f / (2 * np.pi * sigma**2) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    return img.astype(np.float32)


XS6, YS6 = np.array([40.0, 100.3, 160.6, 40.2, 100.5, 160.1]), np.array([50.0, 50.4, 49.8, 150.2, 149.7, 150.5])


def _pair_with_offsets(
    offsets,
    xs=XS6,
    ys=YS6,
    fluxes=(4e5, 1e5, 5e4, 5e4, 3e4, 2e4),
    *,
    sky=0.0,
    seed=0,
    shape=(200, 200),
    fwhm_s=3.7,
    fwhm_r=4.9,
):
    """A PreparedPair of isolated Gaussian stars (FWHM ``fwhm_s`` and ``fwhm_r`` px), the reference's
    displaced by ``offsets`` (px): noise-free with unit variance when ``sky`` is 0, else with Gaussian
    noise of ``sky`` ADU rms plus the stars' Poisson noise (gain 4 e-/ADU), and that variance."""
    fluxes = np.asarray(fluxes, float)
    N = _gaussian_stars(shape, xs, ys, fluxes, fwhm_s / 2.3548).astype(float)
    R = _gaussian_stars(shape, xs + offsets[:, 0], ys + offsets[:, 1], fluxes, fwhm_r / 2.3548).astype(float)
    var_n, var_r = (np.full(N.shape, 1.0), np.full(N.shape, 1.0)) if sky == 0 else (sky**2 + N / 4, sky**2 + R / 4)
    if sky > 0:
        rng = np.random.default_rng(seed)
        N, R = N + rng.normal(0, np.sqrt(var_n)), R + rng.normal(0, np.sqrt(var_r))
    zero = np.zeros_like(N)
    ainfo = {"stars": {"x": xs, "y": ys, "snr": np.sqrt(fluxes)}}
    return PreparedPair(
        N=N.astype(np.float32), R=R.astype(np.float32), var_n=var_n, var_r=var_r, mask=zero.astype(np.uint8),
        bad_sci=zero.astype(bool), nbkg=zero, sn=max(sky, 1.0), sr=max(sky, 1.0), fr=1.0, fr_err=0.0,
        n_flux=xs.size, fwhm_s=fwhm_s, fwhm_r=fwhm_r, size=41, ainfo=ainfo, gain_n=4.0, gain_r=4.0,
    )  # fmt: skip


def test_stars_that_moved_are_found_and_the_rest_give_the_registration_noise():
    # a common shift (the kernel takes it), a scatter of ~0.05 px, and the brightest star moved by
    # 1 px (a galaxy whose centroid a transient shifted); DECam: 1.5 px for such a galaxy, 0.33 px
    # for a proper-motion star, under 0.07 px for the others
    jitter = np.array([[0.0, 0.0], [0.05, -0.04], [-0.06, 0.03], [0.02, 0.07], [-0.03, -0.05], [0.04, 0.0]])
    offsets = np.array([0.3, -0.1]) + jitter
    offsets[0] += [1.0, 0.0]
    moved, motion, sx, sy = sfft_method.astrometric_outliers(
        _pair_with_offsets(offsets), nsigma=5.0, floor=0.03, offset=0.5
    )
    assert moved.tolist() == [True, False, False, False, False, False]
    # its motion from the others' median: 1 px in x (the median of the jitter is ~0.01 px)
    assert motion[0] == pytest.approx([1.0, 0.0], abs=0.03)
    # windowed centroids of noise-free Gaussians recover the offsets to ~1e-3 px
    assert sx == pytest.approx(np.std(jitter[1:, 0]), abs=0.005)
    assert sy == pytest.approx(np.std(jitter[1:, 1]), abs=0.005)
    # the fixed cap alone: a 0.33 px motion stays under 0.5 px; nothing set: nothing flagged
    offsets[0] -= [0.67, 0.0]
    assert not sfft_method.astrometric_outliers(_pair_with_offsets(offsets), nsigma=None, floor=0.03, offset=0.5)[
        0
    ].any()
    offsets[0] += [0.67, 0.0]
    moved, _, sx_all, _ = sfft_method.astrometric_outliers(
        _pair_with_offsets(offsets), nsigma=None, floor=0.03, offset=None
    )
    assert not moved.any() and sx_all > 0.3


def test_a_small_significant_motion_of_a_bright_star_is_found_and_faint_noise_is_not():
    # one bright star (S/N ~2000, centroid error ~0.002 px) moved by 0.3 px (the DECam
    # proper-motion star's size) among 48 faint ones (S/N ~30-60: offset errors 0.05-0.1 px, so
    # their offsets reach 0.2-0.4 px by noise alone): the significance test finds the bright one
    # and none of the faint ones, where a fixed distance could not separate them. The bright
    # star's sigma is sqrt(floor² + the median's error² + the faint stars' excess scatter²),
    # 0.04-0.06 px: flagged in 20 of 20 noise draws (a 0.2 px motion: in 15 of 20 with no floor)
    g = np.linspace(25.0, 175.0, 7)
    xs, ys = (a.ravel() + 0.3 for a in np.meshgrid(g, g))
    fluxes = np.r_[3e5, np.linspace(2000.0, 4000.0, 48)]
    offsets = np.tile([0.3, -0.1], (49, 1))
    offsets[0] += [0.3, 0.0]
    faint_largest = []
    for seed in range(5):
        pp = _pair_with_offsets(offsets, xs, ys, fluxes, sky=10.0, seed=seed)
        moved, motion, _, _ = sfft_method.astrometric_outliers(pp, nsigma=5.0, floor=0.03, offset=0.5)
        assert moved.tolist() == [True] + [False] * 48, seed
        # the motion is measured to the faint stars' median error (~1.25 * 0.1 px / sqrt(48) = 0.02 px)
        assert motion[0] == pytest.approx([0.3, 0.0], abs=0.06), seed
        faint_largest.append(np.hypot(*motion[1:].T).max())
        # the fixed 0.5 px rule alone misses it
        assert not sfft_method.astrometric_outliers(pp, nsigma=None, floor=0.03, offset=0.5)[0].any()
    assert min(faint_largest) > 0.2


def test_the_moved_star_test_keeps_three_stars():
    # four precise stars, two of which moved by 1 px: one is set aside, then three are left and
    # the test stops (a kernel needs stars to be fitted on)
    offsets = np.array([[0.0, 0.0], [0.01, 0.0], [1.0, 0.0], [0.0, 1.0]])
    pp = _pair_with_offsets(offsets, XS6[:4], YS6[:4], (4e5, 1e5, 5e4, 5e4))
    moved = sfft_method.astrometric_outliers(pp, nsigma=5.0, floor=0.03, offset=0.5)[0]
    assert moved.sum() == 1 and not moved[:2].any()


def test_many_stars_with_a_real_scatter_keep_all_but_the_moved_ones():
    # 100 stars (more than the leave-one-out limit: each is tested against all) with a real
    # registration scatter of 0.05 px, three of them moved by 0.4 px (under the 0.5 px cap): the
    # scatter is measured beyond the centroid errors, and only the three are found
    g = np.linspace(20.0, 380.0, 10)
    xs, ys = (a.ravel() + 0.3 for a in np.meshgrid(g, g))
    offsets = np.random.default_rng(3).normal(0.0, 0.05, (100, 2))
    offsets[[7, 42, 77]] += [0.4, 0.0]
    pp = _pair_with_offsets(offsets, xs, ys, np.linspace(2e4, 1e5, 100), sky=10.0, seed=1, shape=(400, 400))
    moved, motion, sx, sy = sfft_method.astrometric_outliers(pp, nsigma=5.0, floor=0.03, offset=None)
    assert np.flatnonzero(moved).tolist() == [7, 42, 77]
    assert sx == pytest.approx(0.05, rel=0.25) and sy == pytest.approx(0.05, rel=0.25)


def _perturbed_stars(seed: int):
    """36 Gaussian stars (FWHM 4.9 px, the DECam reference's) and the same stars through a kernel
    wrong by a per-star flux fraction, shift and size drawn from N(0, 0.02), N(0, 0.05 px),
    N(0, 0.3 px²): (C, D, V, xs, ys, truth), D with white noise of 5 ADU and truth the moments
    each star's error should give (flux, -dx, -dy, size)."""
    rng = np.random.default_rng(seed)
    shape, s2 = (200, 200), (4.9 / 2.3548) ** 2
    g = np.arange(25.0, 180.0, 30.0)
    xs, ys = (a.ravel() + rng.uniform(-0.5, 0.5, a.size) for a in np.meshgrid(g, g))
    n = xs.size
    flux = 2e4 * 20 ** rng.uniform(0, 1, n)
    truth = np.c_[rng.normal(0, 0.02, n), rng.normal(0, 0.05, (n, 2)), rng.normal(0, 0.3, n)]
    yy, xx = np.indices(shape)

    def star(x, y, var, f):
        return f / (2 * np.pi * var) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * var))

    C, P = np.zeros(shape), np.zeros(shape)
    for x, y, f, (df, mx, my, ds) in zip(xs, ys, flux, truth):
        C += star(x, y, s2, f)
        P += star(x - mx, y - my, s2 + ds, f * (1 + df))
    D = P - C + rng.normal(0, 5.0, shape)
    return C, D, np.full(shape, 25.0), xs, ys, truth


def test_kernel_error_measures_the_moments_of_a_known_kernel_error():
    C, D, V, xs, ys, truth = _perturbed_stars(3)
    scatter, moments, errors = sfft_method.kernel_error(D, V, C, xs, ys, bad=np.zeros(D.shape, bool), radius=9.8)
    assert np.isfinite(moments).all() and moments.shape == (36, 6)
    # each star's error: to first order the moments; the second-order terms (size² / sigma⁴ ~ 2 %,
    # shift x size) and central differences (they underestimate a 2.1 px Gaussian's derivatives
    # by a few per cent) leave up to ~0.01 in flux, 0.02 px in shift and 0.15 px² in size
    assert np.abs(moments[:, 0] - truth[:, 0]).max() < 0.012
    assert np.abs(moments[:, 1:3] - truth[:, 1:3]).max() < 0.025
    assert np.abs(moments[:, 3] - truth[:, 3]).max() < 0.15
    # the fits are precise (bright stars): errors well under the spread
    rms = np.sqrt((truth**2).mean(axis=0))
    assert np.all(np.median(errors[:, :4], axis=0) < 0.1 * rms)
    # the scatter over the stars is the rms of the errors (measured within 2 % flux, 7-11 % shift
    # and size; 15 % allowed), and none for the ellipticity terms the kernel did not have
    assert scatter[:4] == pytest.approx(rms, rel=0.15)
    assert np.all(scatter[4:] < 0.02)
    # a star with a masked pixel near it, or too near the edge, is not used
    bad = np.zeros(D.shape, bool)
    bad[int(ys[0]), int(xs[0]) + 3] = True
    _, m, _ = sfft_method.kernel_error(D, V, C, np.r_[xs, 5.0], np.r_[ys, 100.0], bad=bad, radius=9.8)
    assert np.isnan(m[0]).all() and np.isnan(m[-1]).all() and np.isfinite(m[1:-1]).all()


def test_excess_scatter_is_the_spread_beyond_the_measurement_errors():
    rng = np.random.default_rng(2)
    e = rng.uniform(0.5, 2.0, 4000)
    # estimates that scatter by their errors alone: no excess (0, or the estimator's noise: its
    # standard error is ~0.03 for 4000 estimates of errors ~1)
    assert sfft_method.excess_scatter(rng.normal(0, e), e) < 0.15
    # an extra scatter of 1 is found within 5 % (4000 estimates: ~2 %)
    assert sfft_method.excess_scatter(rng.normal(0, np.hypot(e, 1.0)), e) == pytest.approx(1.0, rel=0.05)
    assert sfft_method.excess_scatter(np.zeros(3), np.ones(3)) == 0.0


def test_common_flux_is_the_light_of_both_epochs():
    # a steady source, one that faded, a transient, noise
    sci = np.array([[5.0, 0.0, 3.0, -1.0]])
    ref = np.array([[5.0, 4.0, 0.0, 2.0]])
    # D = M - (convolved part); with the reference convolved, M is the science part
    assert sfft_method.common_flux(sci - ref, sci, "REF").tolist() == [[5.0, 0.0, 0.0, 0.0]]
    # with the science convolved, M = -(reference part)
    assert sfft_method.common_flux(sci - ref, -ref, "SCI").tolist() == [[5.0, 0.0, 0.0, 0.0]]


def test_kernel_error_variance_is_the_sum_of_the_terms():
    C, *_ = _perturbed_stars(4)
    B = sfft_method.moment_images(C)
    s = np.array([0.02, 0.05, 0.04, 0.3, 0.1, 0.05])
    assert np.allclose(sfft_method.kernel_error_variance(C, s), np.tensordot(s**2, B**2, axes=1))
    assert np.allclose(sfft_method.kernel_error_variance(C, np.r_[0.1, np.zeros(5)]), (0.1 * C) ** 2)


def test_kernel_error_term_keeps_the_transients_when_the_kernel_is_right(sfft_run):
    # the same pair with the term on: the kernel fits these Gaussian stars, so the measured scatter
    # is small, and the transients (not in the common flux) keep their score
    pair, h = sfft_run
    on = subtract_pair(pair, {**SFFT, "sfft": {"kernel_error": True}})
    hdr = on[0].header
    assert hdr["KERNERR"] is True and hdr["KERRNSTR"] >= 10
    assert h[0].header["KERNERR"] is False and h[0].header["KERRSIZ"] == 0
    # measured on this pair: flux 3.2 %, size 0.23 px² (sfft's degree-2 kernel, fitted without
    # weights, misses the faint stars a little); far below the DECam frames' 0.44-0.56 px²
    assert hdr["KERRFLX"] < 0.06 and hdr["KERRSIZ"] < 0.4
    xs, ys = TRANSIENTS[:, 0].astype(int), TRANSIENTS[:, 1].astype(int)
    off_peak, on_peak = (
        np.array([np.nanmax(hh["SCORR"].data[y - 2 : y + 3, x - 2 : x + 3]) for x, y in zip(xs, ys)]) for hh in (h, on)
    )
    # S/N ~ 35-40: every transient stays far above the threshold; away from stars the score is
    # unchanged (measured ratios > 0.999), next to a star it pays the star's kernel error
    # (measured: two within 10 px of a star brighter than 10^4 ADU, 34 -> 25 and 35 -> 27)
    assert np.all(on_peak > 20)
    sx, sy, sf = pair["stars"]
    near = cKDTree(np.c_[sx, sy][sf > 1e4]).query(TRANSIENTS[:, :2])[0] < 12
    assert np.all(on_peak[~near] >= 0.99 * off_peak[~near])
    assert (~near).sum() >= 8


def test_relative_width_measures_the_stars_widths_in_either_order():
    # six isolated Gaussian stars (S/N ~150-1500) of known widths: sigma_R² - sigma_N² (px²) comes
    # back within 3.5 times its stated error in each of 5 noise draws and each order, and the
    # error is that of the stars' noise (~0.003 px² here: the scatter over the draws agrees)
    for fwhm_s, fwhm_r in ((3.0, 4.0), (4.0, 3.0), (4.0, 4.0)):
        truth = (fwhm_r**2 - fwhm_s**2) / (8 * math.log(2))
        got = []
        for seed in range(5):
            pp = _pair_with_offsets(np.zeros((6, 2)), sky=10.0, seed=seed, fwhm_s=fwhm_s, fwhm_r=fwhm_r)
            width, err, n = sfft_method.relative_width(pp, radius=2 * max(fwhm_s, fwhm_r))
            assert n == 6
            assert abs(width - truth) < 3.5 * err < 0.1, (fwhm_s, fwhm_r, seed, width, err)
            got.append(width)
        assert np.std(got) < 3 * err


def test_convolution_sides_follow_the_narrower_image_and_try_both_when_unsure():
    rule = {"nsigma": 3.0, "floor": 1 / 12}
    deep_ref = {"noise_sci": 10.0, "noise_ref": 3.0}  # a deep reference, the usual case
    deep_sci = {"noise_sci": 3.0, "noise_ref": 10.0}
    cases = [
        # (FWHM sci, ref), noises, sides
        ((4.0, 3.0), deep_ref, ("REF",)),  # the reference is narrower and less noisy: it is convolved
        ((3.0, 4.0), deep_sci, ("SCI",)),  # the same with the roles swapped
        ((3.0, 4.0), deep_ref, ("REF", "SCI")),  # the narrower image is the noisier: both tried
        ((4.0, 3.0), deep_sci, ("REF", "SCI")),
        ((4.0, 4.0), deep_ref, ("REF", "SCI")),  # the same width: both tried
        ((4.0, 4.04), deep_sci, ("REF", "SCI")),  # 1 % in FWHM: a kernel of 0.06 px², under a pixel's 1/12 px²
    ]
    for (fwhm_s, fwhm_r), noises, sides in cases:
        pp = _pair_with_offsets(np.zeros((6, 2)), sky=10.0, seed=1, fwhm_s=fwhm_s, fwhm_r=fwhm_r)
        width, err, _ = sfft_method.relative_width(pp, radius=2 * max(fwhm_s, fwhm_r))
        assert sfft_method.convolution_sides(width, err, **rule, **noises) == sides, (fwhm_s, fwhm_r, noises)
    # the measurement's error decides near the floor: 0.2 px² is clear at an error of 0.03, not of 0.05
    assert sfft_method.convolution_sides(-0.2, 0.03, **rule, **deep_ref) == ("REF",)
    assert sfft_method.convolution_sides(-0.2, 0.05, **rule, **deep_ref) == ("REF", "SCI")


def test_random_effects_mean_takes_in_the_real_scatter():
    rng = np.random.default_rng(3)
    # errors that explain the spread: the weighted mean and its error 1/sqrt(sum w)
    e = np.full(400, 0.1)
    m = 0.5 + rng.normal(0, 0.1, e.size)
    mu, err = sfft_method.random_effects_mean(m, e)
    assert mu == pytest.approx(0.5, abs=4 * 0.1 / 20) and err == pytest.approx(0.1 / 20, rel=0.1)
    # a real scatter of 0.3 beyond errors of 0.1: the mean's error is sqrt(0.1² + 0.3²) / sqrt(n)
    m = 0.5 + rng.normal(0, math.hypot(0.1, 0.3), e.size)
    mu, err = sfft_method.random_effects_mean(m, e)
    assert err == pytest.approx(math.hypot(0.1, 0.3) / 20, rel=0.1)
    assert math.isnan(sfft_method.random_effects_mean(np.zeros(0), np.zeros(0))[0])


def test_direction_with_equal_widths_is_the_one_with_the_smaller_star_residuals():
    # equal Gaussian widths: both directions run and the header says which and why; the star
    # chi2 of each difference is recorded, and the kept one is the smaller
    pytest.importorskip("sfft")
    pair = make_pair(seed=13, nstars=160, fwhm_sci=4.0, fwhm_ref=4.0)
    hdr = subtract_pair(pair, SFFT)[0].header
    assert abs(hdr["CONVDW"]) < 3 * hdr["CONVDWE"] + 1 / 12 and hdr["CONVDWN"] >= 10
    m = re.fullmatch(r"sig2 R-S [-+]\d\.\d{3}\+-\d\.\d{3} px2; chi2 R (\S+) S (\S+)", hdr["CONVWHY"])
    assert m, hdr["CONVWHY"]
    chi2 = {"REF": float(m.group(1)), "SCI": float(m.group(2))}
    assert hdr["CONVD"] == min(chi2, key=chi2.get)


@pytest.mark.parametrize("side", ["sci", "ref"])
def test_the_telescope_file_may_set_the_convolved_image(side):
    # subtract.sfft.convolve: one sfft run, the side asked for, whatever the widths say
    pytest.importorskip("sfft")
    pair = make_pair(seed=13, nstars=160, fwhm_sci=4.0, fwhm_ref=4.0)
    hdr = subtract_pair(pair, {**SFFT, "sfft": {"convolve": side}})[0].header
    assert hdr["CONVD"] == side.upper() and hdr["CONVWHY"].startswith(f"subtract.sfft.convolve {side};")
    assert "chi2" not in hdr["CONVWHY"]


def _with_star_saturated_in_the_reference(pair: dict, saturation: float) -> dict:
    """The pair with a bright star at (128, 128) in both frames, above ``saturation`` in the
    (sharper, deeper) reference only, whose pixels are clipped there."""
    from helpers import RATIO, render

    for key, psf, ratio in (("sci", pair["psf_sci"], 1.0), ("ref", pair["psf_ref"], RATIO)):
        img = pair[key]
        x, y = img.wcs.world_to_pixel_values(*pair["sci"].wcs.pixel_to_world_values(128.0, 128.0))
        star = render(img.data.shape, [float(x)], [float(y)], [ratio * 4e5], psf)
        img.data[:] = np.minimum(img.data + star, saturation)
    return pair


def test_a_saturated_reference_star_does_not_bend_the_kernel_elsewhere():
    # A star saturated in the reference only (7 pixels clipped at 3e4 ADU; the science's peak
    # ~2.2e4) is masked in both frames, so the convolved reference lacks its core's light within
    # a kernel half width of the mask: those pixels are left out of the kernel fit. Measured,
    # 40 px and more from the star, |D / sqrt(VAR)| rms 1.077 against 1.044 for the same pair
    # without the saturated star; with those pixels in the fit 1.144 (up to 24 sigma at 40-80 px).
    # Tolerance 0.05: half the damage the ring does.
    pytest.importorskip("sfft")
    saturation = 3e4
    info = dataclasses.replace(INFO, saturation=saturation)
    z = {}
    for label in ("plain", "saturated"):
        pair = make_pair(seed=11, nstars=160)
        if label == "saturated":
            pair = _with_star_saturated_in_the_reference(pair, saturation)
        hdul = sub.subtract_images(pair["sci"], pair["ref"], pair["psf_sci"], pair["psf_ref"], info, info, SFFT)
        z[label] = hdul["DIFF"].data / np.sqrt(hdul["VAR"].data)
    yy, xx = np.indices(z["plain"].shape)
    far = (np.hypot(xx - 128, yy - 128) >= 40) & np.isfinite(z["plain"]) & np.isfinite(z["saturated"])
    rms = {k: float(np.sqrt(np.mean(v[far] ** 2))) for k, v in z.items()}
    assert rms["saturated"] < rms["plain"] + 0.05, rms
