"""Tests of rbflow.reference (stacking one epoch into a reference) against known truth, and of the frame lists."""

from __future__ import annotations

import math
import runpy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from scipy.special import erf

from rbflow.config import check_schema
from rbflow.errors import ConfigError, InputError
from rbflow.frames import frames_of
from rbflow.reference import stack_reference

SHAPE = (128, 128)
GAIN, RN, SAT, SIGMA, FWHM = 4.0, 10.0, 40000.0, 10.0, 3.5
FLUX = 2.0e4  # ADU, every star of the first frame
# (integer shift of the frame on the sky (px), flux scale of the frame, background level (ADU))
FRAMES = [((0, 0), 1.0, 0.0), ((3, -2), 0.8, 50.0), ((-4, 5), 1.1, -20.0), ((2, 6), 1.0, 10.0)]
REPO = Path(__file__).resolve().parents[1]


def _telescope(**frames) -> dict:
    tel = {"name": "synth", "pixel_scale": 1.0, "filters": ["r"], "zeropoints": {"r": 25.0}}
    if frames:
        tel["frames"] = frames
    return check_schema(tel, "telescope.schema.yaml", "test telescope")


def _stars(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A 4x4 grid of stars 28 px apart (no blends), with random sub-pixel positions."""
    g = np.arange(22.0, 110.0, 28.0)
    xs, ys = np.meshgrid(g, g)
    return xs.ravel() + rng.uniform(-0.5, 0.5, g.size**2), ys.ravel() + rng.uniform(-0.5, 0.5, g.size**2)


def _render(xs: np.ndarray, ys: np.ndarray, flux: float) -> np.ndarray:
    s = FWHM / 2.3548200450309493 * math.sqrt(2)
    u = np.arange(SHAPE[1], dtype=float)
    v = np.arange(SHAPE[0], dtype=float)
    img = np.zeros(SHAPE)
    for x, y in zip(xs, ys):
        ex = erf((u - x + 0.5) / s) - erf((u - x - 0.5) / s)
        ey = erf((v - y + 0.5) / s) - erf((v - y - 0.5) / s)
        img += flux * np.outer(ey, ex) / 4.0
    return img


def _write_frames(tmp_path, *, seed: int = 3, cosmic: bool = False, saturate: bool = False) -> list:
    """Frames of one field with integer sky shifts, flux scales and background offsets; sky noise SIGMA."""
    rng = np.random.default_rng(seed)
    xs, ys = _stars(rng)
    paths = []
    for k, ((dx, dy), scale, bkg) in enumerate(FRAMES):
        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        w.wcs.crval = [150.0, 2.0]
        w.wcs.crpix = [SHAPE[1] / 2 + 1 + dx, SHAPE[0] / 2 + 1 + dy]
        w.wcs.cd = np.array([[-1.0, 0.0], [0.0, 1.0]]) / 3600
        data = _render(xs + dx, ys + dy, FLUX * scale) + bkg + rng.normal(0, SIGMA, SHAPE)
        if cosmic and k == 1:
            data[60 + dy, 70 + dx] += 3000.0
        if saturate and k == 2:
            data[30 + dy, 40 + dx] = SAT + 1
        hdr = w.to_header()
        hdr.update(GAIN=GAIN, RDNOISE=RN, SATURATE=SAT, FILTER="r", EXPTIME=60.0, FWHM=FWHM)
        path = tmp_path / f"f{k}.fits"
        fits.PrimaryHDU(data.astype(np.float32), hdr).writeto(path)
        paths.append(path)
    return paths, xs, ys


def test_stack_recovers_flux_background_and_noise(tmp_path):
    paths, xs, ys = _write_frames(tmp_path)
    out = tmp_path / "ref.fits"
    res = stack_reference(paths, out, _telescope())
    # flux scales to the first frame are 1/scale; the median ratio of ~16 stars at S/N ~300
    # is good to ~0.5 %
    np.testing.assert_allclose(res["scales"], [1 / s for _, s, _ in FRAMES], rtol=0.01)
    # offsets: clipped median of frame - first frame, ~SIGMA*sqrt(2)/sqrt(1e4 px) = 0.15 ADU
    np.testing.assert_allclose(res["offsets"], [b for _, _, b in FRAMES], atol=1.0)
    with fits.open(out) as hdul:
        data, hdr = hdul[0].data, hdul[0].header
        ncomb = hdul["NCOMB"].data
        wcs = WCS(hdr)
    assert data.dtype.kind == "f" and data.dtype.itemsize == 4 and data.shape == SHAPE
    # integer shifts are resampled (nearly) exactly: where the 4 equal-noise frames overlap the
    # stack has SIGMA/2 (+-5 % for the clipped estimate over ~1e4 pixels)
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    sky = (ncomb == 4) & (np.min([np.hypot(xx - x, yy - y) for x, y in zip(xs, ys)], axis=0) > 12)
    assert np.std(data[sky]) == pytest.approx(SIGMA / 2, rel=0.05)
    # aperture flux (r = 10 px ~ 3 FWHM holds > 99.9 % of the Gaussian) equals the first frame's
    # star flux: within 2 % (noise ~0.3 % per star)
    fluxes = [data[np.hypot(xx - x, yy - y) < 10].sum() for x, y in zip(xs, ys)]
    assert np.nanmedian(fluxes) == pytest.approx(FLUX, rel=0.02)
    # the WCS of the first frame is kept; pixels the shifted frames do not cover have fewer frames
    assert wcs.wcs.crpix[0] == pytest.approx(SHAPE[1] / 2 + 1)
    assert ncomb.max() == 4 and ncomb.min() >= 1
    # noise cards: equal weights, scales ~1 => gain ~4 g, read noise ~2 rn (scales 0.8-1.25 move
    # them by < 10 %)
    assert hdr["GAIN"] == pytest.approx(4 * GAIN, rel=0.1)
    assert hdr["RDNOISE"] == pytest.approx(2 * RN, rel=0.1)
    assert hdr["MAGZP"] == 25.0 and hdr["NCOMBINE"] == 4 and hdr["TEXPTIME"] == 240.0
    assert hdr["IMCMB002"] == "f1.fits"


def test_stack_rejects_cosmic_rays_and_keeps_saturation(tmp_path):
    paths, _, _ = _write_frames(tmp_path, cosmic=True, saturate=True)
    out = tmp_path / "ref.fits"
    res = stack_reference(paths, out, _telescope())
    data = fits.getdata(out)
    # a 3000 ADU hit in one of 4 frames would add ~700 ADU to the mean: rejected, the pixel is sky
    assert abs(data[60, 70]) < 5 * SIGMA
    # a pixel saturated in one frame is set to the stack's saturation level, which later stages mask
    assert data[30, 40] == pytest.approx(res["saturation"])
    assert res["saturation"] == pytest.approx(min(s * (SAT - b) for s, b in zip(res["scales"], res["offsets"])))


def test_median_and_single_frame(tmp_path):
    paths, _, _ = _write_frames(tmp_path)
    res = stack_reference(paths, tmp_path / "med.fits", _telescope(), combine="median", clip=None)
    # median efficiency 2/pi: gain 4 g (2/pi) within the 10 % the flux scales move it
    assert res["gain"] == pytest.approx(4 * GAIN * 2 / math.pi, rel=0.1)
    one = stack_reference(paths[:1], tmp_path / "one.fits", _telescope())
    assert one["gain"] == pytest.approx(GAIN) and one["read_noise"] == pytest.approx(RN)
    np.testing.assert_array_equal(fits.getdata(tmp_path / "one.fits"), fits.getdata(paths[0]))


def test_stack_errors(tmp_path):
    with pytest.raises(InputError, match="no frame to stack"):
        stack_reference([], tmp_path / "ref.fits", _telescope())
    paths, _, _ = _write_frames(tmp_path)
    with pytest.raises(InputError, match="combine 'sum' is not one of mean, median"):
        stack_reference(paths, tmp_path / "ref.fits", _telescope(), combine="sum")


def test_frames_of_a_stacked_or_single_reference(tmp_path, monkeypatch):
    paths, _, _ = _write_frames(tmp_path)
    monkeypatch.chdir(tmp_path)
    stacked = frames_of(_telescope(science=["f3.fits"], reference=["f[0-2].fits"]))
    assert [f.name for f in stacked] == ["synth_ref", "f3"]
    assert stacked[0].path == "resources/synth/reference/synth_ref.fits"
    assert stacked[0].inputs == ("f0.fits", "f1.fits", "f2.fits")
    assert stacked[1].reference == "synth_ref"
    # a science glob that also matches the stacked frames does not subtract them
    assert [f.name for f in frames_of(_telescope(science=["f*.fits"], reference=["f[01].fits"]))] == [
        "synth_ref",
        "f2",
        "f3",
    ]
    single = frames_of(_telescope(science=["f*.fits"], reference="f0.fits"))
    assert [(f.name, f.reference, f.inputs) for f in single][:2] == [("f0", None, ()), ("f1", "f0", ())]
    with pytest.raises(ConfigError, match="key 'frames.reference' entry 'nope\\*.fits' matches no file"):
        frames_of(_telescope(science=["f*.fits"], reference=["nope*.fits"]))
    # two files that map to one frame name are refused, not silently merged
    (tmp_path / "f3.b.fits").write_bytes((tmp_path / "f3.fits").read_bytes())
    (tmp_path / "f3_b.fits").write_bytes((tmp_path / "f3.fits").read_bytes())
    with pytest.raises(ConfigError, match="'f3.b.fits' and 'f3_b.fits' both get the frame name 'f3_b'.*rename one"):
        frames_of(_telescope(science=["f3*.fits"], reference=["f[01].fits"]))


def test_reference_script_wiring(tmp_path):
    paths, _, _ = _write_frames(tmp_path)
    out = tmp_path / "resources" / "ref.fits"
    tel = _telescope(science=["x"], reference=["y"])
    sm = SimpleNamespace(
        input=SimpleNamespace(frames=[str(p) for p in paths[:2]]),
        output=[str(out)],
        params=SimpleNamespace(telescope=tel, stack=tel["frames"]["stack"], skip_bad=False),
        log=[str(tmp_path / "ref.log")],
        rule="reference",
        wildcards={"telescope": "synth", "frame": "synth_ref"},
    )
    runpy.run_path(str(REPO / "scripts" / "reference.py"), init_globals={"snakemake": sm})
    assert fits.getheader(out)["NCOMBINE"] == 2
    assert "stack: 2 frames" in (tmp_path / "ref.log").read_text()
