"""A small synthetic results folder for the scanning tests: real cutouts, labelled through the folder contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from rbflow.crossmatch import label_cutouts
from rbflow.cutouts import CHANNELS, write_cutouts
from rbflow.io import write_table

SIZE = 31
IMAGE = "fld00_r_e1_sim0"


def _wcs() -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [100.5, 100.5]
    w.wcs.cd = [[-1.0e-4, 0.0], [0.0, 1.0e-4]]
    return w


def results_folder(root: Path, n: int = 8, *, seed: int = 3) -> tuple[Path, Table]:
    """``root/results`` with ``training/{true,false,unsorted}`` of ``n`` candidates (even: true, odd: false).

    Reals are Gaussian blobs in SCI and DIFF; bogus are single hot pixels; the last one is left unsorted.
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ny = nx = 200
    xy = [(40.0 + 40 * (i % 4), 40.0 + 40 * (i // 4)) for i in range(n)]
    yy, xx = np.mgrid[0:ny, 0:nx]
    planes = {name: rng.normal(0, 1, (ny, nx)) + (100.0 if name in ("SCI", "REF") else 0.0) for name in CHANNELS}
    for i, (x, y) in enumerate(xy):
        if i % 2 == 0:
            blob = 50 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.5**2))
            planes["SCI"] += blob
            planes["DIFF"] += blob
            planes["SCORR"] += blob / 5
        else:
            planes["SCI"][int(y), int(x)] += 80
            planes["DIFF"][int(y), int(x)] += 80
    header = _wcs().to_header()
    header["FILTER"] = "r"
    hdus = [fits.PrimaryHDU()] + [
        fits.ImageHDU(planes[name].astype(np.float32), header=header, name=name) for name in CHANNELS
    ]
    results = root / "results"
    mef = root / f"{IMAGE}.fits"
    fits.HDUList(hdus).writeto(mef)
    ra, dec = _wcs().pixel_to_world_values([p[0] for p in xy], [p[1] for p in xy])
    cands = Table(
        {
            "id": [f"{IMAGE}_{i}" for i in range(n)],
            "image": [IMAGE] * n,
            "x": [p[0] for p in xy],
            "y": [p[1] for p in xy],
            "ra": ra,
            "dec": dec,
            "mag": np.linspace(18, 21, n),
            "mag_err": np.full(n, 0.05),
            "snr": np.linspace(40, 5, n),
            "fwhm": np.full(n, 3.5),
            "flags": np.array([4 if i == 3 else 0 for i in range(n)], dtype=np.int64),
        }
    )
    write_table(cands, root / "cands.ecsv")
    cut = results / "sim" / "cutouts" / IMAGE
    write_cutouts(mef, root / "cands.ecsv", cut, size=SIZE, png=True)
    labels = Table(
        {
            "id": cands["id"],
            "label": ["unsorted" if i == n - 1 else ("true" if i % 2 == 0 else "false") for i in range(n)],
        }
    )
    write_table(labels, root / "labels.ecsv")
    label_cutouts([root / "labels.ecsv"], [cut], results / "training")
    return results, labels
