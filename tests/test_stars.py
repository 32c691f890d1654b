"""Tests of rbflow.stars against known truth: windowed centroids of Gaussian and Moffat stars, the star finder."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import erf

from rbflow.stars import FWHM_TO_SIGMA, find_stars, grow_mask, windowed_centroids


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


def test_grow_mask_grows_by_the_given_pixels():
    m = np.zeros((11, 11), bool)
    assert not grow_mask(m, 3).any()
    m[5, 5] = True
    g = grow_mask(m, 2)
    yy, xx = np.mgrid[0:11, 0:11]
    assert np.array_equal(g, np.abs(yy - 5) + np.abs(xx - 5) <= 2)
