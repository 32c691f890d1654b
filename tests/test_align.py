"""Tests of rbflow.align against known truth: affine fits, star matching, alignment of a shifted and rotated pair."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from astropy.wcs import WCS
from scipy.special import erf

from rbflow.align import MASK_BITS, align, fit_affine, fit_smooth, match_stars, pixel_map
from rbflow.errors import InputError
from rbflow.io import Image


def tan_wcs(shape, *, shift=(0.0, 0.0), rot_deg=0.0) -> WCS:
    """TAN WCS of 1 arcsec pixels; ``shift`` moves CRPIX (px), ``rot_deg`` rotates the pixel axes."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [shape[1] / 2 + 1 + shift[0], shape[0] / 2 + 1 + shift[1]]
    c, s = math.cos(math.radians(rot_deg)), math.sin(math.radians(rot_deg))
    w.wcs.cd = np.array([[-c, s], [s, c]]) / 3600
    return w


def render(shape, xs, ys, fluxes, fwhm):
    """Pixel-integrated Gaussian stars."""
    s = fwhm / 2.3548200450309493 * math.sqrt(2)
    img = np.zeros(shape)
    u, v = np.arange(shape[1], dtype=float), np.arange(shape[0], dtype=float)
    for x, y, f in zip(xs, ys, fluxes):
        ex = erf((u - x + 0.5) / s) - erf((u - x - 0.5) / s)
        ey = erf((v - y + 0.5) / s) - erf((v - y - 0.5) / s)
        img += f * np.outer(ey, ex) / 4
    return img


def distortion(x, y, shape, amplitude=0.15):
    """A smooth distortion no WCS holds (px): a sinusoid of ~0.7-1 cycle per frame in each axis."""
    u, v = np.asarray(x) / shape[1], np.asarray(y) / shape[0]
    return amplitude * np.sin(2 * np.pi * (0.8 * u - 0.6 * v) + 0.4), amplitude * np.sin(
        2 * np.pi * (0.5 * u + 0.9 * v) + 2.0
    )


def make_pair(
    *,
    true_shift=(0.37, -0.21),
    true_rot=0.0,
    header_error=(0.0, 0.0),
    seed=1,
    shape=(256, 256),
    n=150,
    distorted=False,
):
    """A star field seen by the science and a reference whose true WCS is shifted/rotated by a known
    amount; the reference's header WCS is wrong by ``header_error`` px. With ``distorted`` the
    reference's stars are also moved by :func:`distortion` of their position, which no header holds."""
    rng = np.random.default_rng(seed)
    wsci = tan_wcs(shape)
    wref_true = tan_wcs(shape, shift=true_shift, rot_deg=true_rot)
    wref = tan_wcs(shape, shift=(true_shift[0] + header_error[0], true_shift[1] + header_error[1]), rot_deg=true_rot)
    xs, ys = rng.uniform(-10, shape[1] + 10, n), rng.uniform(-10, shape[0] + 10, n)
    fl = 300.0 * (2e5 / 300.0) ** (rng.uniform(0, 1, n) ** 2.5)
    xr, yr = wref_true.world_to_pixel_values(*wsci.pixel_to_world_values(xs, ys))
    if distorted:
        dx, dy = distortion(xr, yr, shape)
        xr, yr = xr + dx, yr + dy
    sci = render(shape, xs, ys, fl, 4.0) + 300 + rng.normal(0, 10.0, shape)
    ref = render(shape, xr, yr, 1.6 * fl, 3.0) + 500 + rng.normal(0, 12.0, shape)
    return (
        Image(sci.astype(np.float32), wsci.to_header(), wsci, Path("sci.fits")),
        Image(ref.astype(np.float32), wref.to_header(), wref, Path("ref.fits")),
        wref_true,
    )


def test_fit_affine_recovers_a_rotation_scale_and_shift_despite_outliers():
    rng = np.random.default_rng(2)
    p = rng.uniform(0, 1000, (60, 2))
    ang = math.radians(0.5)
    a = 1.001 * np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
    b = np.array([3.2, -1.7])
    q = p @ a.T + b + rng.normal(0, 0.02, p.shape)
    q[:5] += 5.0  # five mismatches
    aff, inliers = fit_affine(p, q, np.ones(len(p)))
    assert not inliers[:5].any() and inliers[5:].all()
    # 55 points of 0.02 px noise over 1000 px: the matrix is known to ~1e-5, the shift to ~0.01 px
    assert np.allclose(aff[:, :2], a, atol=1e-4)
    assert np.allclose(aff[:, 2], b, atol=0.03)


def test_fit_affine_of_few_points_is_a_shift():
    p = np.array([[10.0, 10.0], [50.0, 80.0], [90.0, 20.0]])
    aff, inliers = fit_affine(p, p + [0.5, -0.25], np.ones(3))
    assert np.allclose(aff, [[1, 0, 0.5], [0, 1, -0.25]]) and inliers.all()


def test_match_stars_finds_pairs_under_a_common_offset():
    rng = np.random.default_rng(4)
    sci = {"x": rng.uniform(0, 500, 40), "y": rng.uniform(0, 500, 40)}
    perm = rng.permutation(40)
    ref = {"x": sci["x"][perm] + 6.0, "y": sci["y"][perm] - 4.0}
    i, j = match_stars(sci, ref, radius=10.0)
    assert len(i) >= 38  # a star may meet another within 10 px before the offset is known
    assert np.array_equal(perm[j], i)


def test_pixel_map_follows_the_wcs_and_the_affine_correction():
    w = tan_wcs((100, 100))
    to_ref = pixel_map(w, tan_wcs((100, 100), shift=(2.0, -1.0)))
    rx, ry = to_ref(np.array([10.0, 50.0]), np.array([20.0, 70.0]))
    assert np.allclose(rx, [12.0, 52.0], atol=1e-6) and np.allclose(ry, [19.0, 69.0], atol=1e-6)
    to_ref = pixel_map(w, w, np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]]))
    assert np.allclose(to_ref(10.0, 20.0), (10.5, 20.0), atol=1e-6)


@pytest.mark.parametrize("rot", [0.0, 0.5])
def test_align_refines_a_wrong_wcs_to_the_star_positions(rot):
    # the reference header is 1.5 px off in x (and the frames rotated by `rot` degrees): the affine
    # refinement brings the star offsets to ~0.02 px (S/N > 30 stars); 0.1 px is the spec
    sci, ref, wref_true = make_pair(header_error=(1.5, 0.0), true_rot=rot)
    aligned, mask, info = align(sci, ref, refine=True, fwhm_sci=4.0, fwhm_ref=3.0)
    assert info["refined"] and info["nstars"] >= 8
    assert info["rms"] < 0.1
    # the fitted map agrees with the true one to 0.05 px inside the frame
    true_map = pixel_map(sci.wcs, wref_true)
    g = np.linspace(20, 235, 5)
    gx, gy = np.meshgrid(g, g)
    assert np.allclose(np.c_[info["to_ref"](gx, gy)], np.c_[true_map(gx, gy)], atol=0.05)
    assert aligned.shape == sci.data.shape and mask.dtype == np.uint8
    # the reference's valid footprint ends ~1.5 px + grow from the edge it was shifted out of
    assert (mask & MASK_BITS["REF_BAD"]).any()


def test_align_without_refinement_reports_the_offset():
    sci, ref, _ = make_pair(header_error=(1.5, 0.0))
    _, _, info = align(sci, ref, refine=False, fwhm_sci=4.0, fwhm_ref=3.0)
    assert not info["refined"] and info["affine"] is None
    # the header's CRPIX is 1.5 px too large, so the WCS maps each star 1.5 px right of where the
    # reference shows it: the aligned reference stars lie at -1.5 px; centroids to ~0.02 px
    assert info["dx"] == pytest.approx(-1.5, abs=0.1) and info["dy"] == pytest.approx(0.0, abs=0.1)


def test_align_names_a_frame_without_wcs():
    sci, ref, _ = make_pair()
    bare = Image(ref.data, ref.header, None, Path("nowcs_ref.fits"))
    with pytest.raises(InputError, match=r"nowcs_ref\.fits.*no celestial WCS"):
        align(sci, bare, refine=True)


def test_align_of_frames_that_do_not_overlap_is_an_input_error():
    sci, ref, _ = make_pair()
    far = tan_wcs(ref.data.shape)
    far.wcs.crval = [151.0, 2.0]
    with pytest.raises(InputError, match="does not overlap"):
        align(sci, Image(ref.data, far.to_header(), far, Path("far.fits")), refine=True)


def test_fit_smooth_recovers_a_smooth_offset_field_and_leaves_noise_alone():
    rng = np.random.default_rng(5)
    shape = (1024, 1024)
    p = rng.uniform(0, 1023, (300, 2))
    sigma = np.full(300, 0.02)
    true = np.c_[distortion(p[:, 0], p[:, 1], shape)]
    smooth, kept, cv = fit_smooth(p, true + rng.normal(0, 0.02, p.shape), sigma, shape)
    assert smooth is not None and cv["intervals"] >= 2 and kept.all()
    # a 0.15 px sinusoid of ~1 cycle per frame from 300 stars of 0.02 px noise: the cross-validated
    # rms falls from ~0.15 to near the noise (measured 0.031); the surface follows the truth to
    # 0.02 px rms on a grid inside the frame (measured 0.009 px), against 0.15 px before
    assert cv["rms_affine"] > 0.1 and cv["rms_smooth"] < 0.04
    g = np.linspace(30, 990, 15)
    gx, gy = np.meshgrid(g, g)
    fx, fy = smooth(gx, gy)
    tx, ty = distortion(gx, gy, shape)
    assert math.sqrt(np.mean((fx - tx) ** 2 + (fy - ty) ** 2)) < 0.02
    # offsets that are centroid noise alone keep the affine: no map predicts held-out noise
    none, kept, cv = fit_smooth(p, rng.normal(0, 0.02, p.shape), sigma, shape)
    assert none is None and kept.all() and cv["intervals"] == 0
    # too few stars for the coarsest surface (16 coefficients, 2 stars each): not tried
    few, _, cv = fit_smooth(p[:30], true[:30], sigma[:30], shape)
    assert few is None and math.isnan(cv["rms_smooth"])


def test_align_follows_a_distortion_the_wcs_lacks():
    # the reference's stars are moved by a 0.15 px sinusoid (about one cycle per frame) that neither
    # header holds: an affine leaves ~0.1 px rms, the smooth map brings it to the centroids' noise
    shape = (512, 512)
    sci, ref, wref_true = make_pair(shape=shape, n=700, distorted=True, seed=3)
    _, _, affine_only = align(sci, ref, refine=True, smooth=False, fwhm_sci=4.0, fwhm_ref=3.0)
    _, _, info = align(sci, ref, refine=True, smooth=True, fwhm_sci=4.0, fwhm_ref=3.0)
    assert affine_only["smooth"] is None and info["smooth"] is not None and info["nstars"] >= 40
    assert affine_only["rms"] > 0.08 and info["rms"] < 0.5 * affine_only["rms"]
    # the fitted map agrees with the true one (WCS plus distortion) to 0.05 px inside the frame
    true_map = pixel_map(sci.wcs, wref_true)
    g = np.linspace(40, 470, 6)
    gx, gy = np.meshgrid(g, g)
    rx, ry = true_map(gx, gy)
    dx, dy = distortion(rx, ry, shape)
    fx, fy = info["to_ref"](gx, gy)
    assert np.allclose(fx, rx + dx, atol=0.05) and np.allclose(fy, ry + dy, atol=0.05)
    # and a pair without distortion keeps the affine alone
    sci, ref, _ = make_pair(shape=shape, n=700, seed=3)
    _, _, info = align(sci, ref, refine=True, smooth=True, fwhm_sci=4.0, fwhm_ref=3.0)
    assert info["smooth"] is None and info["cv"]["rms_affine"] < 0.05
