"""Real frames: the DECam telescope file through reference stacking, psf, subtract, detect and cutouts.

The ten DECam cut-outs live outside the repository (../shared/data/decam-sfft/, see its README);
the test is skipped when they are absent. It runs Snakemake in a temporary working directory
that sees them at the same relative path as the repository does. The default subtraction
(``subtract.method: auto``) runs sfft on these frames (their PSF models hold 3-4 and 7 stars),
so the test also needs sfft.

Frame DEC-OBS18d holds real satellite/asteroid trails (and only 3 PSF stars): its difference is
not pure noise, so the noise-ratio and per-frame comparisons leave it out (its numbers count in
the totals).
"""

from __future__ import annotations

import copy
import importlib.util
import subprocess

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from helpers import REPO, SNAKEMAKE, file_quality, make_workdir

from rbflow.config import load_telescope
from rbflow.detect import FLAGS, run_detect
from rbflow.quality import difference_quality
from rbflow.subtract import run_subtract

DATA = REPO.parent / "shared" / "data" / "decam-sfft"
SCIENCE = [f"DEC-OBS18{c}" for c in "abcde"]
#: Frames with real trails across the field (see the module docstring).
TRAILS = {"DEC-OBS18d"}
#: Frames where the galaxy at (131, 129), whose transient faded, is one of the alignment stars.
GALAXY_ALIGNED = {"DEC-OBS18a", "DEC-OBS18e"}

pytestmark = [
    pytest.mark.skipif(
        not DATA.is_dir(), reason=f"DECam test frames not found in {DATA} (see the project's shared data README)"
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("sfft") is None,
        reason='sfft not installed: the default subtraction of these frames needs it (pip install "rbflow[sfft]")',
    ),
]


@pytest.fixture(scope="module")
def decam_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("decam")
    (root / "shared").symlink_to(REPO.parent / "shared")
    work = make_workdir(root / "work")
    targets = [f"results/decam/obs/cutouts/{name}_mini" for name in SCIENCE]
    proc = subprocess.run(
        [*SNAKEMAKE, "--cores", "2", *targets, "--configfile", str(REPO / "tests/data/config.decam.yaml")],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return work


@pytest.mark.workflow
def test_stacked_reference(decam_run):
    hdr = fits.getheader(decam_run / "resources/decam/reference/decam_ref.fits")
    assert hdr["NCOMBINE"] == 5 and hdr["IMCMB001"] == "DEC-OBS04a.mini.fits"
    assert hdr["CTYPE1"] == "RA---TPV"
    # 5 frames of gain ~3.98: inverse-variance weights are unequal (sky noise 11-16 % apart), so
    # the effective gain is a little below 5 x 3.98 = 19.9
    assert 17.0 < hdr["GAIN"] < 20.0
    assert hdr["ESATUR"] < 42411  # the lowest input ESATUR, scaled


@pytest.mark.workflow
def test_psf_matches_header_seeing(decam_run):
    for name in SCIENCE:
        measured = fits.getheader(decam_run / f"results/decam/psf/{name}_mini.fits")["FWHMMED"]
        header = fits.getheader(DATA / f"{name}.mini.fits")["FWHM"]
        # the header FWHM is the survey pipeline's median (SExtractor-like, measured on the full
        # CCD); the ePSF of the 256 px cut-out measured 3-8 % narrower (3.5-3.9 vs 3.6-4.2 px)
        assert measured == pytest.approx(header, rel=0.12), name


@pytest.mark.workflow
def test_difference_noise_and_candidates(decam_run):
    total = 0
    for name in SCIENCE:
        hdr = fits.getheader(decam_run / f"results/decam/obs/subtract/{name}_mini.fits")
        # measured noise / predicted noise of D and S_corr (decorrelated sfft): 0.93-0.95 and
        # 0.96-1.15 on these frames; a wrong gain, saturation or alignment would put them far off 1
        assert 0.75 < hdr["DIFFNRM"] < 1.2, name
        assert 0.75 < hdr["SCORRNRM"] < 1.4, name
        cands = Table.read(decam_run / f"results/decam/obs/detect/{name}_mini.ecsv")
        # 0-10 candidates per 256 px frame: a few cosmic rays, moving objects and bright-star residuals
        assert len(cands) <= 20, name
        assert np.all(np.diff(cands["snr"]) <= 0)
        if len(cands):
            folder = decam_run / f"results/decam/obs/cutouts/{name}_mini"
            assert (folder / f"{cands['id'][0]}.fits").exists() and (folder / f"{cands['id'][0]}.png").exists()
        total += len(cands)
    assert total >= 1  # trails and cosmic rays are there to be found


#: The dashed trail across frame DEC-OBS18d (by eye on its difference image): dashes from
#: (35, 190) to (101, 168), 7-35 px apart.
DASHED = ((35.0, 190.0), (101.0, 168.0))


@pytest.mark.workflow
def test_the_dashed_trail_is_flagged_a_streak_and_nothing_else(decam_run):
    # Measured (bench/realpair.py's auto run of the same frames): 4 of frame d's 8 candidates on
    # the trail, all 4 flagged STREAK by the collinear rule (rbflow.detect), no other candidate of
    # the 5 frames flagged. The trail's dashes leave no line on the score map, so the rule for
    # continuous trails did not flag them.
    (ax, ay), (bx, by) = DASHED
    length = np.hypot(bx - ax, by - ay)
    for name in SCIENCE:
        cands = Table.read(decam_run / f"results/decam/obs/detect/{name}_mini.ecsv")
        t = ((cands["x"] - ax) * (bx - ax) + (cands["y"] - ay) * (by - ay)) / length
        across = np.abs((cands["x"] - ax) * (by - ay) - (cands["y"] - ay) * (bx - ax)) / length
        on = (across < 3) & (t > -5) & (t < length + 5)
        flagged = (cands["flags"] & FLAGS["STREAK"]) != 0
        if name in TRAILS:
            assert on.sum() >= 4 and flagged[on].all(), cands[on]["x", "y", "flags"]
        assert not flagged[~on].any(), (name, cands[flagged & ~on]["x", "y", "flags"])


@pytest.fixture(scope="module")
def zogy_run(decam_run):
    """The same pairs subtracted with subtract.method zogy (the workflow's PSF models and reference)."""
    tel = copy.deepcopy(load_telescope(REPO / "config" / "telescopes" / "decam.yaml"))
    tel["subtract"]["method"] = "zogy"
    out = {}
    for name in SCIENCE:
        sub = decam_run / f"zogy/{name}_mini.fits"
        psf = decam_run / f"results/decam/psf/{name}_mini.fits"
        run_subtract(
            DATA / f"{name}.mini.fits",
            decam_run / "resources/decam/reference/decam_ref.fits",
            psf,
            decam_run / "results/decam/psf/decam_ref.fits",
            sub,
            tel,
        )
        run_detect(sub, psf, decam_run / f"zogy/{name}_mini.ecsv", tel, image_name=f"{name}_mini")
        out[name] = sub
    return out


def _quality(path) -> dict:
    q = file_quality(path)
    q["cands"] = len(Table.read(str(path).replace("/subtract/", "/detect/").replace(".fits", ".ecsv")))
    return q


@pytest.mark.workflow
def test_default_subtraction_is_clean_on_real_frames(decam_run, zogy_run):
    default = {n: _quality(decam_run / f"results/decam/obs/subtract/{n}_mini.fits") for n in SCIENCE}
    zogy = {n: _quality(zogy_run[n]) for n in SCIENCE}
    for name in SCIENCE:
        hdr = fits.getheader(decam_run / f"results/decam/obs/subtract/{name}_mini.fits")
        # 'auto' sees 3-4 science and 7 reference PSF stars (< 8): sfft, and says so
        assert hdr["METHOD"] == "sfft" and hdr["DECORR"] is True, name
        assert hdr["METHAUTO"].startswith("sfft: PSF stars per cell sci "), name
        # the single frames' stars are 1.9-2.7 px² narrower (sigma²) than the stacked reference's,
        # and noisier: sfft runs both ways and keeps the one with the smaller residuals at the
        # stars, the stack convolved (star chi2 1.9-3.7 against 4.7-8.9 with the frame convolved)
        assert hdr["CONVD"] == "REF" and 1.5 < hdr["CONVDW"] < 3.0 and "chi2" in hdr["CONVWHY"], name
    clean = [n for n in SCIENCE if n not in TRAILS]
    for name in clean:
        d, z = default[name], zogy[name]
        # issue 15's target; measured 1.03-1.09 (the frame convolved: 1.13-1.14); DEC-OBS18d with trails 1.05
        assert d["noise"] <= 1.15, (name, d)
        # candidates 0-2 (zogy 0-3). With the analytic prior of these few-star PSF models
        # (rbflow.psf) zogy's noise is 1.13-1.20 and its blobs 10-16; before it 1.53-1.73, 49-60
        # blobs and 15-26 candidates. What zogy still misses is the bright stars (below).
        assert d["cands"] <= z["cands"], (name, d, z)
    # totals over the five frames: candidates 13 (zogy 14; 112 before the prior), blobs 60 (zogy 73;
    # 270 before the prior)
    assert sum(q["cands"] for q in default.values()) <= 20
    # bright stars (> 100 sigma, 18 in the five frames): before the astrometric-noise term and the
    # kernel fit without stars that moved, all 18 kept a >= 5 sigma residual within 2 FWHM (sfft
    # called directly too, median largest 9.8 sigma); with them 9 of 18, median largest 4.3 sigma
    # (zogy 29.7). With the measured kernel-error variance (subtract.sfft.kernel_error) 1 of 18,
    # median largest 2.0 sigma: (104, 233) in DEC-OBS18b at 5.2 sigma, the degree-2 kernel missing
    # its offset from the brightest star. Those were with the single frame convolved (the sharper
    # image); with the stacked reference convolved (the direction with the smaller star chi2,
    # above) 0 of 18, median largest 2.0 sigma (1.8-2.4 per frame); without the kernel-error
    # variance 2 of 18 (the frame convolved: 8 of 18). Issue 15's target is <= 5 %: 0 of 18.
    hits = sum(q["bright_hit"] for q in default.values())
    assert sum(q["bright_n"] for q in default.values()) == 18
    assert hits == 0
    peak = np.median([q["bright_peak"] for q in default.values()])
    # median 2.0 sigma; zogy 15.0 (29.7 before the few-star PSF models' prior), all 18 >= 5 sigma
    assert peak < 3.0 and peak < 0.25 * np.median([q["bright_peak"] for q in zogy.values()])
    for name in SCIENCE:
        hdr = fits.getheader(decam_run / f"results/decam/obs/subtract/{name}_mini.fits")
        # ZOGY's astrometric noise of the stars that did not move: measured x 0.13-0.16, y 0.06-0.08 px
        assert hdr["ASTNOISE"] is True and 0.02 < hdr["ASTSIGX"] < 0.2 and 0.0 < hdr["ASTSIGY"] < 0.2, name
        # the kernel error, measured at the 4-5 stars: size scatter 0.36-0.44 px², flux 4.3-8.6 %
        # (the frame convolved: 0.44-0.56 px², 1.8-2.7 %; the fainter stars' flux moments take up
        # part of their size mismatch, -0.4 to -0.5 px²). A kernel that matched the stars would
        # give ~0: the estimate takes out the fits' noise
        assert hdr["KERNERR"] is True and hdr["KERRNSTR"] >= 4, name
        assert 0.2 < hdr["KERRSIZ"] < 1.0 and 0.02 < hdr["KERRFLX"] < 0.15, name
        # stars left out of the kernel fit: only the galaxy whose transient faded (an alignment
        # star in DEC-OBS18a and e; its motion 1.2-1.4 px, 8-10 sigma), not the brightest star
        assert hdr["NMOVERS"] == (1 if name in GALAXY_ALIGNED else 0), name
    # VAR near the bright stars now predicts DIFF there: DIFF/sqrt(VAR) within 2 FWHM of the four
    # bright stars has std 0.83-0.95 per frame (without the term: tails to 5-6 sigma)
    for name in SCIENCE:
        with fits.open(decam_run / f"results/decam/obs/subtract/{name}_mini.fits") as h:
            s = h["DIFF"].data / np.sqrt(h["VAR"].data)
            fwhm = h[0].header["FWHMSCI"]
        yy, xx = np.indices(s.shape)
        near = np.zeros(s.shape, bool)
        for x, y in ((100, 73), (57, 180), (178, 202), (104, 233)):
            near |= (xx - x) ** 2 + (yy - y) ** 2 <= (2 * fwhm) ** 2
        z = s[near & np.isfinite(s)]
        assert 0.6 < np.std(z) < 1.2, name


@pytest.fixture(scope="module")
def stacked_pair(decam_run, tmp_path_factory):
    """The five OBS18 frames stacked (the telescope's frames.stack) against the workflow's OBS04 reference."""
    from rbflow.psf import run_psf
    from rbflow.reference import run_reference

    tel = load_telescope(REPO / "config" / "telescopes" / "decam.yaml")
    work = tmp_path_factory.mktemp("stacked")
    frames = [str(DATA / f"{name}.mini.fits") for name in SCIENCE]
    run_reference(frames=frames, out_fits=str(work / "stackB.fits"), telescope=tel, stack=tel["frames"]["stack"])
    run_psf(work / "stackB.fits", work / "stackB.psf.fits", work / "stackB.psf.png", tel)
    ref = decam_run / "resources/decam/reference/decam_ref.fits"
    run_subtract(
        work / "stackB.fits",
        ref,
        work / "stackB.psf.fits",
        decam_run / "results/decam/psf/decam_ref.fits",
        work / "stackB-stackA.fits",
        tel,
    )
    return work / "stackB-stackA.fits"


@pytest.mark.workflow
def test_stacked_epochs_leave_only_the_real_transient(stacked_pair):
    with fits.open(stacked_pair) as h:
        hdr = h[0].header
        diff, var, sci = (h[n].data.astype(float) for n in ("DIFF", "VAR", "SCI"))
    assert hdr["METHOD"] == "sfft"
    q = difference_quality(diff, var, sci, hdr["FWHMSCI"])
    # measured 1.13 (before: 1.12); blobs 4/8 (before 5/8)
    assert q["noise"] <= 1.15
    assert q["blobs_pos"] + q["blobs_neg"] <= 14
    # 5 bright sources, one of them the galaxy at (131, 129) whose transient faded between the
    # epochs (a 27 sigma negative point source 1.5 px off its centre): the only residual left
    # (before: 5 of 5). The galaxy stays out of the kernel fit: with the PSF models of 6 alignment
    # stars it was one of them and was left out as a mover (NMOVERS 1); with the few-star models'
    # prior (rbflow.psf; FWHM 3.65 and 4.82 px against 3.73 and 4.93) the alignment takes 5 stars
    # without it (NMOVERS 0). No star besides it keeps a residual either way.
    assert q["bright_n"] == 5 and q["bright_hit"] == 1
    assert hdr["NMOVERS"] <= 1
    s = diff / np.sqrt(var)
    # the faded transient stays a detection (-12.7; -13.1 before the kernel-error term, -13.6 before
    # the astrometric one): it is in one epoch only, so not in the common flux the term scales
    assert np.nanmin(s[120:140, 120:140]) < -10
    # DIFF/sqrt(VAR) within 2 FWHM of the four stars (galaxy left out): std 2.83, robust std 1.35,
    # 33 of 708 pixels beyond 5 before the astrometric term; with it and the kernel error 0.68,
    # 0.59 and 0: the astrometric variance is somewhat high here (its sigma_x, 0.14 px, holds the
    # proper-motion star the kernel follows), near 1 on single frames (std 0.81-0.96)
    yy, xx = np.indices(s.shape)
    near = np.zeros(s.shape, bool)
    for x, y in ((100, 73), (57, 180), (178, 202), (104, 233)):
        near |= (xx - x) ** 2 + (yy - y) ** 2 <= (2 * hdr["FWHMSCI"]) ** 2
    z = s[near & np.isfinite(s)]
    assert 0.5 < 1.4826 * np.median(np.abs(z - np.median(z))) < 1.3
    assert (np.abs(z) > 5).sum() <= 3
