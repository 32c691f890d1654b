"""Tests of rbflow.checksim: efficiency intervals, logistic fit, limiting magnitude and the plots."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from numpy.testing import assert_allclose
from scipy.special import erf

from rbflow.checksim import (
    efficiency,
    expected_snr,
    fit_logistic,
    frame_limits,
    gaussian_nea,
    image_offsets,
    limiting_mag,
    logistic,
    run_checksim,
)
from rbflow.errors import InputError
from rbflow.io import write_table
from rbflow.seeds import derive


def _draw(n: int, m50: float, width: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mags = rng.uniform(m50 - 3.0, m50 + 3.0, n)
    return mags, rng.random(n) < logistic(mags, m50, width)


def _fisher_sigma(mags: np.ndarray, m50: float, width: float) -> np.ndarray:
    """1-sigma errors of (m50, width) from the Fisher information of the logistic model at the truth."""
    p = logistic(mags, m50, width)
    grad = np.stack([np.full_like(mags, 1.0 / width), (mags - m50) / width**2])  # d eta / d(m50, w)
    info = (grad * p * (1 - p)) @ grad.T
    return np.sqrt(np.diag(np.linalg.inv(info)))


@pytest.mark.parametrize("m50,width", [(21.5, 0.3), (19.0, 0.15)])
def test_logistic_fit_recovers_truth(m50, width):
    mags, det = _draw(3000, m50, width, derive(42, "checksim", m50))
    fit_m50, fit_w = fit_logistic(mags, det)
    sigma = _fisher_sigma(mags, m50, width)
    # The MLE is unbiased to first order with the Fisher errors (~0.01 mag here); 4 sigma keeps the
    # seeded test far from a chance failure while still catching a wrong sign or scale of the model.
    assert abs(fit_m50 - m50) < 4 * sigma[0]
    assert abs(fit_w - width) < 4 * sigma[1]
    assert sigma[0] < 0.03 and sigma[1] < 0.03  # the test has the power to see a 0.1 mag error


def test_logistic_fit_degenerate(caplog):
    with caplog.at_level(logging.WARNING, logger="rbflow.checksim"):
        assert all(math.isnan(v) for v in fit_logistic(np.array([20.0, 21.0]), np.array([True, True])))
    assert "impossible" in caplog.text


def test_efficiency_wilson_intervals():
    mags = np.r_[np.full(10, 20.1), np.full(4, 20.6)]
    det = np.r_[np.arange(10) < 5, np.zeros(4, bool)]
    eff = efficiency(mags, det, np.array([20.0, 20.5, 21.0, 21.5]))
    assert list(eff["n"]) == [10, 4, 0] and list(eff["n_det"]) == [5, 0, 0]
    # Wilson score, z = 1: k=5, n=10 -> 0.5 -/+ sqrt(0.0275)/1.1; k=0, n=4 -> [0, 2 * 0.125/1.25].
    assert_allclose(eff["eff"][:2], [0.5, 0.0])
    assert_allclose(eff["eff_lo"][:2], [0.5 - math.sqrt(0.0275) / 1.1, 0.0], atol=1e-12)
    assert_allclose(eff["eff_hi"][:2], [0.5 + math.sqrt(0.0275) / 1.1, 0.2], atol=1e-12)
    assert np.isnan(eff["eff"][2])


def test_limiting_mag():
    # sigma = 1 px Gaussian: NEA = 4 pi; noise = 10 * sqrt(4 pi) ADU; 5 sigma flux -> ZP - 2.5 log10(5 * noise).
    expected = 25.0 - 2.5 * math.log10(5 * 10.0 * math.sqrt(4 * math.pi))
    nea = gaussian_nea(2.0 * math.sqrt(2.0 * math.log(2.0)))
    assert_allclose(nea, 4 * math.pi, rtol=1e-12)
    assert_allclose(limiting_mag(nea, 10.0, 25.0), expected, rtol=1e-12)
    # correlated noise: the flux error, hence the limiting flux, scales with FLXECORR
    assert_allclose(limiting_mag(nea, 10.0, 25.0, flux_err_corr=1.2), expected - 2.5 * math.log10(1.2), rtol=1e-12)
    assert limiting_mag(gaussian_nea(4.0), 10.0, 25.0) < limiting_mag(gaussian_nea(2.0), 10.0, 25.0)
    with pytest.raises(ValueError, match="NEA"):
        limiting_mag(0.0, 10.0, 25.0)


def _gauss_stamp(sigma: float, size: int = 41) -> np.ndarray:
    u = np.arange(size) - size // 2
    e = erf((u + 0.5) / (sigma * math.sqrt(2))) - erf((u - 0.5) / (sigma * math.sqrt(2)))
    p = np.outer(e, e)
    return p / p.sum()


def test_frame_limits_use_the_psf_of_the_difference_and_its_noise_factor(tmp_path):
    # a difference image whose PSF (sigma 2.5 px) is broader than the science PSF (FWHM 4 px,
    # sigma 1.7 px), with uniform noise 12 ADU and FLXECORR 1.15, in two tiles
    sigma_d, noise, corr, zp = 2.5, 12.0, 1.15, 30.0
    prim = fits.PrimaryHDU()
    prim.header["FLXECORR"] = corr
    psfd = fits.ImageHDU(np.stack([_gauss_stamp(sigma_d)] * 2).astype(np.float32), name="PSFD")
    psfd.header["NTILES"] = 2
    for k, (x, y) in enumerate([(64, 64), (192, 64)]):
        psfd.header[f"TCX{k}"], psfd.header[f"TCY{k}"] = x, y
    var = fits.ImageHDU(np.full((128, 256), noise**2, np.float32), name="VAR")
    fits.HDUList([prim, var, psfd]).writeto(tmp_path / "s.fits")
    n = 5
    write_table(
        Table({"filter": ["r"] * n, "psf_fwhm": [4.0] * n, "zeropoint": [zp] * n, "mag": [20.0] * n}),
        tmp_path / "c.ecsv",
    )
    lim = frame_limits([tmp_path / "c.ecsv"], [tmp_path / "s.fits"])["r"]
    # the limit is the flux whose expected S/N (what the detection reaches) is 5
    flux = 10 ** (-0.4 * (lim - zp))
    assert_allclose(expected_snr(tmp_path / "s.fits", np.array([100.0]), np.array([60.0]), np.array([flux])), 5.0)
    # and, analytically, 5 noise sqrt(NEA) FLXECORR with the NEA of a pixel-integrated Gaussian,
    # 4 pi (sigma² + 1/12) to 0.1 %: 0.002 mag
    analytic = zp - 2.5 * math.log10(5 * noise * corr * math.sqrt(4 * math.pi * (sigma_d**2 + 1 / 12)))
    assert lim == pytest.approx(analytic, abs=0.002)
    # the old limit (a Gaussian of the science FWHM, no FLXECORR) was too deep by the NEA and noise factor
    old = limiting_mag(gaussian_nea(4.0), noise, zp)
    assert old - lim == pytest.approx(
        2.5 * math.log10(corr * math.sqrt(sigma_d**2 + 1 / 12) / (4.0 * 0.4246609)), abs=0.002
    )


def _subtraction(path, noise: float, sigma_d: float = 2.0) -> None:
    """A subtraction MEF of uniform noise (ADU) and a Gaussian PSF of D, FLXECORR 1."""
    psfd = fits.ImageHDU(_gauss_stamp(sigma_d)[None].astype(np.float32), name="PSFD")
    psfd.header.update(NTILES=1, TCX0=64, TCY0=64)
    var = fits.ImageHDU(np.full((128, 128), noise**2, np.float32), name="VAR")
    fits.HDUList([fits.PrimaryHDU(), var, psfd]).writeto(path)


def test_each_image_is_compared_with_its_own_limit(tmp_path):
    # Three r images 0.6 mag apart in depth, each detecting its isolated sources at its own limit
    # (width 0.15 mag) and its sources on hosts 0.5 mag shallower (which the fit leaves out): image
    # by image the offset is the fit's error only (500 isolated sources uniform over 2.4 mag:
    # Fisher error of m50 ~0.02 mag; 0.06 is 3 sigma).
    zp, cms, subs = 30.0, [], []
    for k, noise in enumerate((8.0, 14.0, 24.0)):
        subs.append(tmp_path / f"s{k}.fits")
        _subtraction(subs[-1], noise)
        nea = 4 * math.pi * (2.0**2 + 1 / 12)
        limit = limiting_mag(nea, noise, zp)
        rng = np.random.default_rng(derive(11, k))
        n = 600
        on_host = np.arange(n) < 100
        mags = rng.uniform(limit - 1.2, limit + 1.2, n)
        det = rng.random(n) < logistic(mags, np.where(on_host, limit - 0.5, limit), 0.15)
        table = Table(
            {"filter": ["r"] * n, "zeropoint": [zp] * n, "mag": mags, "detected": det, "on_host": on_host,
             "mag_meas": np.where(det, mags, np.nan), "snr": np.where(det, 5.0, np.nan)}
        )  # fmt: skip
        cms.append(tmp_path / f"c{k}.ecsv")
        write_table(table, cms[-1])
    per_image = image_offsets(cms, subs)
    assert len(per_image) == 3 and set(per_image["band"]) == {"r"} and list(per_image["n"]) == [500] * 3
    assert np.all(np.abs(per_image["offset"]) < 0.06)
    summary = run_checksim(cms, tmp_path / "plots", subtract_paths=subs)
    r = summary["bands"]["r"]
    assert r["n_images_fitted"] == 3 and abs(r["limit_minus_m50_median"]) < 0.06
    assert r["limiting_mag"] == pytest.approx(float(np.median(per_image["limiting_mag"])))
    saved = Table.read(tmp_path / "plots" / "limits.ecsv")
    assert_allclose(saved["offset"], per_image["offset"])


def _crossmatch_table(band: str, m50: float, seed: int, n: int = 600) -> Table:
    mags, det = _draw(n, m50, 0.25, seed)
    rng = np.random.default_rng(seed + 1)
    meas = np.where(det, mags + 0.02 + rng.normal(0, 0.05, n), np.nan)
    snr = np.where(det, 10 ** (-0.4 * (mags - m50)) * 5.0, np.nan)
    return Table(
        {"id": np.arange(n), "mag": mags, "filter": np.full(n, band), "detected": det, "mag_meas": meas, "snr": snr}
    )


def test_run_checksim(tmp_path):
    paths = []
    for _k, (band, m50) in enumerate([("g", 21.0), ("r", 21.6)]):
        paths.append(tmp_path / f"{band}.ecsv")
        write_table(_crossmatch_table(band, m50, derive(7, band)), paths[-1])
    out = tmp_path / "plots"
    summary = run_checksim(paths, out, limiting={"g": 21.3, "r": 21.9})
    for name in ("hist_mag.png", "efficiency.png", "mag_bias.png", "snr_mag.png", "efficiency.ecsv", "summary.json"):
        assert (out / name).stat().st_size > 0
    saved = json.loads((out / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    bands = saved["bands"]
    assert set(bands) == {"all", "g", "r"} and bands["all"]["n_injected"] == 1200
    # 600 draws per band: Fisher error of m50 ~ 0.03 mag; 0.12 mag is 4 sigma.
    assert abs(bands["g"]["m50"] - 21.0) < 0.12 and abs(bands["r"]["m50"] - 21.6) < 0.12
    assert_allclose(bands["g"]["m90"], bands["g"]["m50"] - bands["g"]["width"] * math.log(9.0))
    assert bands["r"]["limiting_mag"] == 21.9
    # Injected bias 0.02 mag, scatter 0.05 mag: the bin medians with >= 30 sources are within 0.05 mag.
    bias = [b for b in bands["all"]["bias"] if b["n"] >= 30]
    assert bias and all(abs(b["bias"] - 0.02) < 0.05 for b in bias)
    eff = Table.read(out / "efficiency.ecsv")
    assert set(eff["band"]) == {"all", "g", "r"}


def test_run_checksim_empty_and_errors(tmp_path, caplog):
    empty = _crossmatch_table("r", 21.0, 1)[:0]
    write_table(empty, tmp_path / "e.ecsv")
    with caplog.at_level(logging.WARNING, logger="rbflow.checksim"):
        summary = run_checksim([tmp_path / "e.ecsv"], tmp_path / "plots")
    assert "no injected source" in caplog.text
    assert summary["bands"]["all"]["n_injected"] == 0 and summary["bands"]["all"]["m50"] is None
    assert (tmp_path / "plots" / "efficiency.png").exists()
    write_table(Table({"mag": [20.0]}), tmp_path / "bad.ecsv")
    with pytest.raises(InputError, match="bad.ecsv.*lacks column.*detected"):
        run_checksim([tmp_path / "bad.ecsv"], tmp_path / "plots")


def test_expected_snr_is_the_optimal_psf_snr(tmp_path):
    from astropy.io import fits

    from rbflow.checksim import expected_snr

    yy, xx = np.mgrid[-7:8, -7:8]
    p = np.exp(-(xx**2 + yy**2) / (2 * 1.5**2))
    p /= p.sum()
    var = np.full((64, 64), 4.0, np.float32)
    var[40:, :] = np.nan  # masked half
    psfd = fits.ImageHDU(p[None].astype(np.float32), name="PSFD")
    psfd.header.update(NTILES=1, TCX0=31.5, TCY0=31.5)
    prim = fits.PrimaryHDU()
    prim.header["FLXECORR"] = 1.25
    path = tmp_path / "sub.fits"
    fits.HDUList([prim, fits.ImageHDU(var, name="VAR"), psfd]).writeto(path)
    snr = expected_snr(path, np.array([20.0, 50.0, 2.0]), np.array([20.0, 20.0, 45.0]), np.array([100.0, 100.0, 100.0]))
    # f sqrt(sum P^2 / V) / FLXECORR; a Gaussian's sum P^2 = 1 / (4 pi sigma^2)
    expected = 100.0 * math.sqrt(1.0 / (4 * math.pi * 1.5**2) / 4.0) / 1.25
    assert snr[0] == pytest.approx(expected, rel=1e-3)
    assert snr[1] == pytest.approx(expected, rel=1e-3)
    assert snr[2] == 0.0  # masked footprint: nothing can be expected there
