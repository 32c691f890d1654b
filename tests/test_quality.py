"""Tests of rbflow.quality (the real-frame measures of issue 15) on images with known content."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rbflow import quality


def gauss(shape, x, y, sigma, flux):
    yy, xx = np.indices(shape)
    return flux * np.exp(-0.5 * ((xx - x) ** 2 + (yy - y) ** 2) / sigma**2) / (2 * math.pi * sigma**2)


def test_pure_noise_has_unit_ratio_and_no_blob():
    rng = np.random.default_rng(3)
    diff = rng.normal(0, 7.0, (256, 256))
    # std / robust std of 65536 Gaussian draws: 1 +- 0.005
    assert quality.noise_ratio(diff) == pytest.approx(1.0, abs=0.02)
    assert quality.robust_std(diff) == pytest.approx(7.0, rel=0.02)
    # ~50000 smoothed pixels (~5600 independent 3x3 boxes) beyond 5 sigma: expected 0.003
    assert quality.blobs(diff) == (0, 0)


def test_blobs_and_bright_star_residuals_are_counted():
    rng = np.random.default_rng(4)
    shape, noise, fwhm = (200, 200), 5.0, 4.0
    sigma = fwhm / 2.3548
    sci = rng.normal(0, noise, shape)
    stars = [(50.0, 50.0), (150.0, 60.0), (100.0, 150.0)]
    for x, y in stars:  # aperture S/N ~ 1000: bright
        sci += gauss(shape, x, y, sigma, 5e4)
    sci += gauss(shape, 150.0, 150.0, sigma, 300.0)  # S/N ~ 5: not bright
    diff = rng.normal(0, noise, shape)
    diff += gauss(shape, 50.0, 50.0, sigma, 2000.0)  # a residual at one bright star (peak ~20 sigma)
    diff -= gauss(shape, 30.0, 170.0, sigma, 2000.0)  # a negative blob elsewhere
    diff[:8] = np.nan  # masked rows are ignored
    var = np.full(shape, noise**2)
    xs, ys = quality.bright_stars(sci, fwhm)
    assert sorted(zip(xs, ys)) == sorted(stars)
    hit, peak = quality.bright_residuals(diff, var, xs, ys, fwhm)
    assert hit == 1 and peak < 5  # the median star has none
    assert quality.blobs(diff) == (1, 1)
    q = quality.difference_quality(diff, var, sci, fwhm)
    assert q["bright_n"] == 3 and q["bright_hit"] == 1 and q["bright_frac"] == pytest.approx(1 / 3)
    assert q["noise"] > 1.05  # the two blobs are tails
