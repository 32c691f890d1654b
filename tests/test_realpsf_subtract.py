"""Subtraction on a synthetic few-star frame with a known non-Moffat PSF (issue 15).

The ``realpsf`` test telescope (tests/data/telescopes/realpsf.yaml) renders the real PSF's hard
parts: few stars, a halo, coma, undersampled cores and a PSF that changes on small scales;
:func:`rbflow.sky.psf_stamp` gives the true PSF anywhere. The PSF models are built by
:func:`rbflow.psf.run_psf` and the pair is subtracted with the default method ('auto').

The targets of issue 15 are not met on this frame (measured numbers in the xfail reasons); the
tests are strict xfails so that they turn into failures to promote once the PSF models and the
subtraction reach them.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from rbflow import sky
from rbflow.config import load_telescope
from rbflow.psf import PSFModel, run_psf
from rbflow.quality import difference_quality
from rbflow.subtract import run_subtract

REALPSF = Path(__file__).resolve().parent / "data" / "telescopes" / "realpsf.yaml"
SEED = 7
FRAMES = ("fld00_r_ref", "fld00_r_e1")
#: Positions (px) where the PSF model is compared with the truth: centre and two off-centre points.
POSITIONS = ((127.0, 127.0), (60.0, 200.0), (200.0, 60.0))


@pytest.fixture(scope="module")
def realpsf_run(tmp_path_factory):
    tel = load_telescope(REALPSF)
    root = tmp_path_factory.mktemp("realpsf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the PSF stage warns about the few stars, as it should
        for frame in FRAMES:
            sky.write_frame(tel, frame, root / f"{frame}.fits", root / f"{frame}.ecsv", seed=SEED)
            run_psf(root / f"{frame}.fits", root / f"{frame}.psf.fits", root / f"{frame}.psf.png", tel)
        ref, sci = (root / f"{f}" for f in FRAMES)
        run_subtract(
            f"{sci}.fits", f"{ref}.fits", f"{sci}.psf.fits", f"{ref}.psf.fits", root / "sub.fits", tel, threads=1
        )
    return tel, root


def test_auto_takes_zogy_when_the_models_hold_enough_stars(realpsf_run):
    _, root = realpsf_run
    hdr = fits.getheader(root / "sub.fits")
    # 15-20 PSF stars per model (the stage's own min_stars is 4; the count follows the star finder's
    # shape cuts): enough for the rule, yet see below
    assert hdr["METHOD"] == "zogy"
    m = re.fullmatch(r"zogy: PSF stars per cell sci (\d+), ref (\d+) >= 8", hdr["METHAUTO"])
    assert m and min(int(m.group(1)), int(m.group(2))) >= 8, hdr["METHAUTO"]


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="measured: science model's centroid 1.45 px off the truth (coma: asymmetric core), its largest "
    "pixel error 13-24 % of the peak; reference model (1.6 px seeing, undersampled) 9-23 % (peak 0.151 vs 0.196)",
)
def test_psf_models_match_the_true_psf(realpsf_run):
    tel, root = realpsf_run
    g = np.arange(-15, 16)
    for frame in FRAMES:
        model = PSFModel.read(root / f"{frame}.psf.fits")
        cond = sky.frame_conditions(tel, frame, seed=SEED)
        for x, y in POSITIONS:
            truth = sky.psf_stamp(cond, x, y, half=15)
            got = model.stamp(x, y, 31)
            # target: within 5 % of the peak per pixel (a 5 % core error leaves < 5 sigma at a
            # 100 sigma star), centroid within 0.1 px
            assert np.abs(got - truth).max() < 0.05 * truth.max(), (frame, x, y)
            centroid = (got.sum(axis=0) * g).sum(), (got.sum(axis=1) * g).sum()
            assert np.hypot(*centroid) < 0.1, (frame, x, y)


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="measured: zogy (auto's choice) leaves a >= 5 sigma residual at 71 of 72 stars > 100 sigma, noise "
    "ratio 9.3; sfft 71/72 and 10.9. Not the PSF's ripple: with psf_ripple 0 (a PSF varying smoothly) zogy 62/64, "
    "sfft 62/64, sfft with kernel_error 60/64. Of the 64 peaks > 100 sigma 13 are variables (25 per field), 3 a "
    "cosmic ray, hot pixel or transient, 48 within 2 px of no catalogued source; on these 1.6-2 px FWHM cores "
    "sfft's kernel leaves a pattern of period 2 px at bright stars (D alternates by ~100 ADU between neighbouring "
    "rows; undersampled, the delta-function basis is unconstrained at the Nyquist frequency) and zogy's science "
    "PSF model is 0.2-0.5 px off centre",
)
def test_bright_star_residuals_meet_the_target(realpsf_run):
    _, root = realpsf_run
    with fits.open(root / "sub.fits") as h:
        q = difference_quality(
            h["DIFF"].data.astype(float),
            h["VAR"].data.astype(float),
            h["SCI"].data.astype(float),
            h[0].header["FWHMSCI"],
        )
    assert q["bright_n"] >= 20  # the test has stars to judge by
    # issue 15's targets
    assert q["bright_frac"] <= 0.05
    assert q["noise"] <= 1.15
