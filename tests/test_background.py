"""Tests of rbflow.background against known truth: a sky gradient under noise and stars, clipped statistics."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from astropy.stats import SigmaClip

from rbflow.background import background, backgrounds, clipped_stats


def ramp_sky(shape=(256, 256), *, level=1100.0, slope=0.05):
    """A sky of ``level`` ADU with a ``slope`` (fractional) ramp across the frame."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return level * (1 + slope * (0.6 * xx / (shape[1] - 1) - 0.8 * yy / (shape[0] - 1)))


def test_background_follows_a_gradient_to_the_frame_edges():
    # a 5 % sky ramp of a deep reference (1100 ADU, sigma 13): mesh medians are accurate to
    # ~1.25 sigma / 64 = 0.02 sigma, so 0.1 sigma anywhere (edges included) is 5x that
    rng = np.random.default_rng(4)
    sky = ramp_sky()
    data = (sky + rng.normal(0, 13.0, sky.shape)).astype(np.float32)
    bkg, rms = background(data, np.zeros(sky.shape, bool))
    assert bkg.dtype == np.float32 and bkg.shape == sky.shape
    assert rms == pytest.approx(13.0, rel=0.03)
    assert np.abs(bkg - sky).max() < 0.1 * 13.0


def test_background_ignores_stars_masked_pixels_and_nan():
    # 100 stars (FWHM 3 px, 500-50000 ADU) put 7 % of the pixels above 1 sigma; their faint wings
    # survive the 3-sigma clip and bias the meshes up (by ~0.2 sigma and +2 % in the noise here,
    # as SExtractor's and photutils' clipped medians are), so 0.3 sigma and 5 % are the bounds
    rng = np.random.default_rng(9)
    shape = (256, 320)
    sky = ramp_sky(shape, level=400.0)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    stars = np.zeros(shape)
    for x, y, f in zip(rng.uniform(0, shape[1], 100), rng.uniform(0, shape[0], 100), rng.uniform(500, 5e4, 100)):
        near = (np.abs(xx - x) < 8) & (np.abs(yy - y) < 8)
        stars[near] += f / (2 * np.pi * 1.27**2) * np.exp(-((xx[near] - x) ** 2 + (yy[near] - y) ** 2) / (2 * 1.27**2))
    data = (sky + stars + rng.normal(0, 8.0, shape)).astype(np.float32)
    bad = np.zeros(shape, bool)
    bad[100:140, :] = True  # a masked band: its value must not matter
    data[bad] = 1e6
    data[5, 5] = np.nan
    bkg, rms = background(data, bad)
    assert rms == pytest.approx(8.0, rel=0.05)
    assert np.abs(bkg - sky).max() < 0.3 * 8.0


def test_background_of_a_frame_without_valid_meshes_is_its_median():
    data = np.full((64, 64), 7.0, np.float32)
    bad = np.ones(data.shape, bool)
    bad[0, :10] = False
    bkg, rms = background(data, bad)
    assert np.all(bkg == 7.0) and rms == 0.0


def test_backgrounds_on_threads_equal_one_by_one():
    rng = np.random.default_rng(2)
    images = [(ramp_sky() + rng.normal(0, 5.0, (256, 256))).astype(np.float32) for _ in range(3)]
    bads = [np.zeros(im.shape, bool) for im in images]
    together = backgrounds(images, bads, threads=3)
    for (b, s), im, bad in zip(together, images, bads):
        b1, s1 = background(im, bad)
        assert np.array_equal(b, b1) and s == s1


def test_clipped_mesh_statistics_equal_astropy_sigma_clip():
    rng = np.random.default_rng(5)
    cells = rng.normal(100, 10, (6, 7, 256)).astype(np.float32)
    cells[rng.random(cells.shape) < 0.1] = np.nan
    hot = rng.random(cells.shape) < 0.05
    cells[hot] += rng.exponential(5000, hot.sum()).astype(np.float32)
    cells[0, 0] = np.nan  # empty mesh
    cells[1, 1] = 5.0  # constant mesh
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clipped = SigmaClip(sigma=3.0, maxiters=5)(cells, axis=2, masked=False)
        med, std = np.nanmedian(clipped, axis=2), np.nanstd(clipped, axis=2)
    m, s, n = clipped_stats(cells)
    assert np.array_equal(n, np.isfinite(clipped).sum(axis=2))
    assert np.array_equal(np.isnan(m), np.isnan(med))
    ok = np.isfinite(med)
    # float32 inputs, float64 sums: agreement to 1e-4 ADU on values of ~100 is rounding
    assert np.allclose(m[ok], med[ok], rtol=0, atol=1e-4) and np.allclose(s[ok], std[ok], rtol=0, atol=1e-4)
