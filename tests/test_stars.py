"""Tests of rbflow.stars against known truth: windowed centroids of Gaussian and Moffat stars, the star finder."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import erf

from rbflow.stars import (
    FWHM_TO_SIGMA,
    estimate_fwhm,
    find_stars,
    grow_disc,
    grow_mask,
    windowed_centroids,
    windowed_offsets,
)


def gaussian_star(shape, x, y, fwhm, flux):
    """Pixel-integrated circular Gaussian of ``flux`` ADU centred at (x, y)."""
    s = fwhm * FWHM_TO_SIGMA * math.sqrt(2)
    u = np.arange(shape[1], dtype=float)
    v = np.arange(shape[0], dtype=float)
    ex = erf((u - x + 0.5) / s) - erf((u - x - 0.5) / s)
    ey = erf((v - y + 0.5) / s) - erf((v - y - 0.5) / s)
    return flux * np.outer(ey, ex) / 4


def moffat_star(shape, x, y, fwhm, flux, beta=2.5, sub=5):
    """Moffat of ``flux`` ADU centred at (x, y), integrated over pixels by ``sub`` x ``sub`` samples."""
    alpha = fwhm / (2 * math.sqrt(2 ** (1 / beta) - 1))
    off = (np.arange(sub) + 0.5) / sub - 0.5
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    img = np.zeros(shape)
    for oy in off:
        for ox in off:
            r2 = ((xx + ox - x) ** 2 + (yy + oy - y) ** 2) / alpha**2
            img += (beta - 1) / (math.pi * alpha**2) * (1 + r2) ** (-beta)
    return flux * img / sub**2


@pytest.mark.parametrize("profile", [gaussian_star, moffat_star])
def test_windowed_centroids_recover_subpixel_positions_without_noise(profile):
    # noiseless symmetric stars: the windowed centroid's fixed point is the centre; the residual
    # is the pixel sampling of the window at FWHM 2.5 px (< 0.01 px), 0.01 px is the bound
    shape = (41, 41)
    rng = np.random.default_rng(1)
    for _ in range(8):
        x, y = 20 + rng.uniform(-0.5, 0.5, 2)
        img = profile(shape, x, y, 2.5, 1e4)
        xc, yc = windowed_centroids(img, np.array([20.0]), np.array([20.0]), 2.5 * FWHM_TO_SIGMA)
        assert xc[0] == pytest.approx(x, abs=0.01) and yc[0] == pytest.approx(y, abs=0.01)


def test_windowed_centroid_scatter_follows_the_photon_noise():
    # Gaussian star of S/N ~ 100 (flux 1e4 ADU, sky noise 10 ADU, FWHM 4 px): the centroid error of
    # an optimal window is ~ FWHM / (2.35 S/N) ~ 0.02 px per axis; 200 trials measure the rms to
    # ~5 %, so the rms must lie within 0.01-0.04 px and the mean within 4 standard errors of truth
    rng = np.random.default_rng(7)
    shape = (41, 41)
    x, y = 20.3, 19.8
    clean = gaussian_star(shape, x, y, 4.0, 1e4)
    xs, ys = [], []
    for _ in range(200):
        img = clean + rng.normal(0, 10.0, shape)
        xc, yc = windowed_centroids(img, np.array([20.0]), np.array([20.0]), 4.0 * FWHM_TO_SIGMA)
        xs.append(xc[0] - x)
        ys.append(yc[0] - y)
    for d in (np.array(xs), np.array(ys)):
        assert 0.01 < d.std() < 0.04
        assert abs(d.mean()) < 4 * d.std() / math.sqrt(d.size)


def test_windowed_centroids_subtract_a_local_sky():
    shape = (41, 41)
    img = gaussian_star(shape, 20.4, 19.7, 3.0, 1e4) + 50.0
    xc, yc = windowed_centroids(img, np.array([20.0]), np.array([20.0]), 3.0 * FWHM_TO_SIGMA, sky=np.array([50.0]))
    assert xc[0] == pytest.approx(20.4, abs=0.01) and yc[0] == pytest.approx(19.7, abs=0.01)


def test_windowed_centroids_of_nothing_are_empty():
    xc, yc = windowed_centroids(np.zeros((10, 10)), np.zeros(0), np.zeros(0), 1.0)
    assert xc.size == 0 and yc.size == 0


def coma_stamp(x, y, size, *, fwhm=2.5, coma=0.0):
    """Unit-sum stamp (centred on pixel (round(x), round(y))) of a Gaussian star whose light centroid
    is at (x, y), with a fraction ``coma`` of the light in a copy one FWHM away along +x+y."""
    h, u = size // 2, fwhm / math.sqrt(2)
    cx, cy = h + x - round(x), h + y - round(y)
    st = (1 - coma) * gaussian_star((size, size), cx - coma * u, cy - coma * u, fwhm, 1.0)
    st += coma * gaussian_star((size, size), cx + (1 - coma) * u, cy + (1 - coma) * u, fwhm, 1.0)
    return st / st.sum()


def test_windowed_offsets_are_zero_for_a_symmetric_psf_and_those_of_the_centroids_otherwise():
    # the offset is the windowed centroid of the model's star less its position: 0 (to the
    # iteration's 1e-3 px) for a symmetric star at any pixel phase; for a star with 8 % coma it is
    # what windowed_centroids measures on the same star in a frame (the same iteration on a stamp:
    # to 1e-9 px), towards the core (against the coma), by a few hundredths of a pixel
    xs, ys = np.array([100.0, 100.3, 100.5, 99.8]), np.array([50.0, 50.6, 50.5, 49.7])
    sw = 2.5 * FWHM_TO_SIGMA
    dx, dy = windowed_offsets(coma_stamp, xs, ys, sw)
    assert np.abs(dx).max() < 1e-3 and np.abs(dy).max() < 1e-3

    def coma(x, y, size):
        return coma_stamp(x, y, size, coma=0.08)

    dx, dy = windowed_offsets(coma, xs, ys, sw)
    frame = np.zeros((120, 200))
    for x, y in zip(xs[:1], ys[:1]):
        frame[int(y) - 12 : int(y) + 13, int(x) - 12 : int(x) + 13] += coma(x, y, 25)
    xc, yc = windowed_centroids(frame, xs[:1], ys[:1], sw)
    assert xc[0] - xs[0] == pytest.approx(dx[0], abs=1e-9) and yc[0] - ys[0] == pytest.approx(dy[0], abs=1e-9)
    assert np.all((dx < -0.01) & (dx > -0.2)) and np.allclose(dx, dy, atol=2e-3)
    assert windowed_offsets(coma, np.zeros(0), np.zeros(0), sw)[0].size == 0


def test_find_stars_finds_isolated_stars_and_skips_close_pairs_and_masked_ones():
    rng = np.random.default_rng(3)
    shape = (200, 200)
    fwhm, sigma = 3.0, 5.0
    img = rng.normal(0, sigma, shape)
    isolated = [(40.3, 50.6), (150.2, 40.1), (100.7, 150.4), (160.5, 160.2)]
    for x, y in isolated:
        img += gaussian_star(shape, x, y, fwhm, 2e4)
    pair = [(60.0, 120.0), (67.0, 121.0)]  # two peaks 7 px apart (< 3 FWHM): neither is isolated
    for x, y in pair:
        img += gaussian_star(shape, x, y, fwhm, 2e4)
    masked = (120.4, 90.3)
    img += gaussian_star(shape, *masked, fwhm, 2e4)
    bad = np.zeros(shape, bool)
    bad[91, 122] = True  # a bad pixel next to the star: it is not used
    found = find_stars(img, sigma, bad, fwhm=fwhm, snr_min=30.0)
    got = sorted(zip(found["x"], found["y"]))
    assert len(got) == len(isolated)
    for (x, y), (xf, yf) in zip(sorted(isolated), got):
        # S/N ~ 500 stars: windowed centroids to ~0.005 px; 0.05 px is 10x that
        assert xf == pytest.approx(x, abs=0.05) and yf == pytest.approx(y, abs=0.05)
    assert np.all(np.diff(found["snr"]) <= 0)  # brightest first
    # matched-filter peak S/N of a Gaussian star: flux / (sigma sqrt(4 pi) s), s = FWHM * FWHM_TO_SIGMA,
    # reduced by the pixel integration and the sub-pixel phase (< 10 %)
    expected = 2e4 / (sigma * math.sqrt(4 * math.pi) * fwhm * FWHM_TO_SIGMA)
    assert np.all((found["snr"] > 0.85 * expected) & (found["snr"] < 1.02 * expected))


def star_scene(fwhm, seed):
    """Noise (sigma 5 ADU) with Moffat stars, one- and two-pixel spikes and trails on a grid 8 FWHM apart.

    Stars: S/N (of a Gaussian of the FWHM, matched filter) 10-500 log-uniform, random sub-pixel
    centres. Spikes (hot pixels and cosmic rays): 20-1000 sigma, half of them with a second pixel
    of half that. Trails: 3-6 FWHM long at random angles, matched-filter S/N 20-200 per FWHM.
    """
    rng = np.random.default_rng(seed)
    shape, sigma = (400, 400), 5.0
    img = rng.normal(0, sigma, shape)
    step = int(8 * fwhm)
    cells = [(x, y) for x in range(step, 400 - step, step) for y in range(step, 400 - step, step)]
    rng.shuffle(cells)
    n_star, n_spike = len(cells) // 2, len(cells) // 4
    unit = sigma * math.sqrt(4 * math.pi) * fwhm * FWHM_TO_SIGMA  # flux (ADU) per unit of S/N
    stars, spikes, trails = [], [], []
    for x, y in cells[:n_star]:
        x, y, snr = x + rng.uniform(-0.5, 0.5), y + rng.uniform(-0.5, 0.5), 10 ** rng.uniform(1, 2.7)
        img += moffat_star(shape, x, y, fwhm, snr * unit, sub=3)
        stars.append((x, y, snr))
    for x, y in cells[n_star : n_star + n_spike]:
        amp = 10 ** rng.uniform(1.3, 3) * sigma
        img[y, x] += amp
        if rng.random() < 0.5:
            img[y, x + 1] += 0.5 * amp
        spikes.append((x, y))
    for x, y in cells[n_star + n_spike :]:
        length, angle, snr = rng.uniform(3, 6) * fwhm, rng.uniform(0, math.pi), 10 ** rng.uniform(1.3, 2.3)
        along = np.linspace(-length / 2, length / 2, int(3 * length) + 1)
        for t in along:
            img += gaussian_star(shape, x + t * math.cos(angle), y + t * math.sin(angle), fwhm, snr * unit / 3)
        trails.append((x, y, length))
    return img, sigma, stars, spikes, trails


@pytest.mark.parametrize("fwhm", [2.5, 4.5])
def test_find_stars_keeps_moffat_stars_and_rejects_spikes_and_trails(fwhm):
    img, sigma, stars, spikes, trails = star_scene(fwhm, seed=7)
    found = find_stars(img, sigma, np.zeros(img.shape, bool), fwhm=fwhm, snr_min=10.0, max_stars=10**6, isolated=False)
    xy = np.column_stack([found["x"], found["y"]])

    def near(x, y, r):
        return np.hypot(xy[:, 0] - x, xy[:, 1] - y) < r

    # every star of S/N >= 20 is found within 1.5 px (fainter Moffat stars may fall below the
    # snr_min of the Gaussian matched filter: their wings hold flux it does not see)
    bright = [s for s in stars if s[2] >= 20]
    assert len(bright) >= 20
    assert all(near(x, y, 1.5).any() for x, y, _ in bright)
    # no detection within 2 FWHM of a spike or within half a trail's length + 1 FWHM of its centre:
    # their sharpness (1.1-2.4 noiseless, sky-noise errors 0.05-0.3) and roundness (> 0.54
    # measured) are outside the ranges
    assert not any(near(x, y, 2 * fwhm).any() for x, y in spikes)
    assert not any(near(x, y, length / 2 + fwhm).any() for x, y, length in trails)
    # the kept stars' shapes: bright ones (S/N > 50) have sharpness 0.4-0.6 (noiseless Moffat:
    # 0.59 at FWHM 2.5 px, 0.43 at 4.5 px; scatter measured 0.02-0.04, bound 0.1) and roundness
    # near 0 (median 0.01-0.02 measured)
    bright = found["snr"] > 50
    assert np.median(found["sharpness"][bright]) == pytest.approx(0.5, abs=0.1)
    assert np.std(found["sharpness"][bright]) < 0.1
    assert np.median(found["roundness"][bright]) < 0.05


def test_find_stars_without_shape_cuts_keeps_the_spikes():
    # the cuts, not the detection, reject them: with open ranges the spikes are found
    img, sigma, _, spikes, _ = star_scene(3.0, seed=8)
    found = find_stars(
        img,
        sigma,
        np.zeros(img.shape, bool),
        fwhm=3.0,
        snr_min=10.0,
        max_stars=10**6,
        isolated=False,
        sharpness=(-np.inf, np.inf),
        max_roundness=np.inf,
    )
    hits = [np.hypot(found["x"] - x, found["y"] - y).min() < 1.5 for x, y in spikes]
    assert np.mean(hits) > 0.8


@pytest.mark.parametrize("fwhm", [2.5, 4.0, 6.0])
def test_estimate_fwhm_within_15_percent(fwhm):
    rng = np.random.default_rng(4)
    shape = (200, 200)
    img = rng.normal(0, 5.0, shape)
    pos = [
        (40.0 + 40 * i + rng.uniform(-0.5, 0.5), 40.0 + 40 * j + rng.uniform(-0.5, 0.5))
        for i in range(4)
        for j in range(4)
    ]
    for x, y in pos:
        img += moffat_star(shape, x, y, fwhm, 5e4, sub=3)
    x, y = np.array(pos).T
    # pixel counting on undersampled profiles: ~10 % coarse (see the docstring); 15 % bounds it
    assert estimate_fwhm(img, x, y) == pytest.approx(fwhm, rel=0.15)
    assert estimate_fwhm(img, np.zeros(0), np.zeros(0)) is None


def test_grow_mask_grows_by_the_given_pixels():
    m = np.zeros((11, 11), bool)
    assert not grow_mask(m, 3).any()
    m[5, 5] = True
    g = grow_mask(m, 2)
    yy, xx = np.mgrid[0:11, 0:11]
    assert np.array_equal(g, np.abs(yy - 5) + np.abs(xx - 5) <= 2)


def test_grow_disc_reaches_the_radius_in_every_direction():
    m = np.zeros((11, 11), bool)
    assert not grow_disc(m, 3).any()
    m[5, 5] = True
    yy, xx = np.mgrid[0:11, 0:11]
    g = grow_disc(m, 3)
    assert np.array_equal(g, (yy - 5) ** 2 + (xx - 5) ** 2 <= 9)
    assert g[7, 7] and not grow_mask(m, 3)[7, 7]  # 2.8 px along the diagonal: the diamond misses it
