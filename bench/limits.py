"""Where the demo's detection limit goes: completeness against the 5-sigma limits (not a test).

Reads a finished (or partly finished) simulation run: every
``results/<telescope>/sim/crossmatch/<image>.ecsv`` with its ``sim/subtract/<image>.fits``. Per
band it prints

* ``m50``: the 50 % completeness magnitude of the injected sources (``rbflow.checksim.fit_logistic``);
* the 5-sigma limit as ``checksim`` computed it before issue 15 (a Gaussian of the science PSF's
  FWHM, noise-equivalent area ``4 pi sigma**2``, per-pixel noise the median ``sqrt(VAR)``), median
  over the images;
* the 5-sigma limit as ``checksim`` computes it now (``rbflow.checksim.limiting_mag`` with the
  difference image's own PSF, noise-equivalent area ``1 / sum(PSFD**2)``, and the correlated-noise
  factor ``FLXECORR`` the detection applies), median over the images;
* the detection fraction of isolated sources against their expected S/N
  (``rbflow.checksim.expected_snr``), and the expected S/N where it crosses 50 %.

Usage: ``PYTHONPATH=src python bench/limits.py [RUN_DIR] [--telescope demo]`` (RUN_DIR holds
``results/``; default the working directory).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from rbflow.checksim import expected_snr, fit_logistic, gaussian_nea, limiting_mag
from rbflow.io import read_table

SNR_BINS = (3, 4, 4.5, 5, 5.5, 6, 7, 10, np.inf)


def image_rows(cm_path: Path, sub_path: Path) -> Table:
    """Injected sources of one image with detection, expected S/N and the image's two limits."""
    t = read_table(cm_path)
    with fits.open(sub_path, memmap=False) as hdul:
        var = np.asarray(hdul["VAR"].data, float)
        psfd = np.asarray(hdul["PSFD"].data, float)
        corr = float(hdul[0].header.get("FLXECORR", 1.0))
    sigma = float(np.sqrt(np.nanmedian(var[np.isfinite(var) & (var > 0)])))
    fwhm, zp = float(np.nanmedian(t["psf_fwhm"])), float(np.nanmedian(t["zeropoint"]))
    nea_d = float(np.median([1.0 / np.sum(p**2) for p in psfd]))
    return Table(
        {
            "band": np.asarray(t["filter"], str),
            "image": np.asarray(t["image"], str),
            "mag": np.asarray(t["mag"], float),
            "detected": np.asarray(t["detected"], bool),
            "on_host": np.asarray(t["on_host"], bool),
            "snr": expected_snr(sub_path, np.asarray(t["x"]), np.asarray(t["y"]), np.asarray(t["flux"])),
            "lim": np.full(len(t), limiting_mag(gaussian_nea(fwhm), sigma, zp)),
            "lim_d": np.full(len(t), limiting_mag(nea_d, sigma, zp, flux_err_corr=corr)),
            "nea_g": np.full(len(t), gaussian_nea(fwhm)),
            "nea_d": np.full(len(t), nea_d),
            "corr": np.full(len(t), corr),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", nargs="?", type=Path, default=Path("."))
    parser.add_argument("--telescope", default="demo")
    args = parser.parse_args()
    sim = args.run_dir / "results" / args.telescope / "sim"
    tables = []
    for cm in sorted((sim / "crossmatch").glob("*_sim*.ecsv")):
        if cm.name.endswith(".labels.ecsv"):
            continue
        sub = sim / "subtract" / f"{cm.stem}.fits"
        if sub.exists():
            tables.append(image_rows(cm, sub))
    if not tables:
        raise SystemExit(f"no crossmatch table with its subtraction under {sim}")
    from astropy.table import vstack

    rows = vstack(tables)
    for band in sorted(set(rows["band"])):
        b = rows[rows["band"] == band]
        per_image = b[np.unique(b["image"], return_index=True)[1]]
        m50, _ = fit_logistic(b["mag"], b["detected"])
        lim, lim_d = float(np.median(per_image["lim"])), float(np.median(per_image["lim_d"]))
        print(
            f"{band}: {len(per_image)} images, {len(b)} sources; m50 {m50:.2f}; "
            f"old limit (Gaussian NEA) {lim:.2f} (m50 {lim - m50:+.2f} brighter); "
            f"checksim's limit (PSF of D, FLXECORR) {lim_d:.2f} (m50 {lim_d - m50:+.2f} brighter)"
        )
        print(
            f"   noise-equivalent area: Gaussian of the FWHM {np.median(per_image['nea_g']):.1f} px2, "
            f"PSF of D {np.median(per_image['nea_d']):.1f} px2 (x{np.median(per_image['nea_d'] / per_image['nea_g']):.2f}"
            f" = {1.25 * np.log10(np.median(per_image['nea_d'] / per_image['nea_g'])):.2f} mag); "
            f"FLXECORR {np.median(per_image['corr']):.3f} ({2.5 * np.log10(np.median(per_image['corr'])):.2f} mag)"
        )
        iso = b[~b["on_host"] & (b["snr"] > 0)]
        for lo, hi in zip(SNR_BINS[:-1], SNR_BINS[1:]):
            s = iso[(iso["snr"] >= lo) & (iso["snr"] < hi)]
            if len(s):
                print(
                    f"   expected S/N {lo:>4}-{hi:<4}: {len(s):4d} isolated sources, {s['detected'].mean():4.0%} detected"
                )
        s50, _ = fit_logistic(-np.asarray(iso["snr"]), iso["detected"])
        print(f"   50 % of the isolated sources detected at expected S/N {-s50:.2f} (threshold 5)")


if __name__ == "__main__":
    main()
