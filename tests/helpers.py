"""Helpers shared by the test modules: synthetic data with known truth, and the tiny workflow's command.

One place for what several test modules use (test modules never import each other). Import as
``from helpers import ...`` (pytest puts ``tests/`` on ``sys.path`` for ``tests/conftest.py``);
``tests/conftest.py`` holds the fixtures. Sections:

* the repository and the tiny test workflow (``SNAKEMAKE + TINY``);
* a synthetic detector (gain 2 e-/ADU, read noise 5 e-) shared by both image simulators;
* science/reference pairs with Gaussian PSFs and known fluxes (subtraction, detection, SFFT);
* frames of Moffat stars with a spatially varying FWHM (PSF, injection);
* real/bogus stamps, cutout files and datacubes (datacube, training, inference, import).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from filelock import FileLock
from scipy.special import erf

from rbflow.crossmatch import label_cutouts
from rbflow.cutouts import CHANNELS, write_cutouts
from rbflow.datacube import NORMALISATION, normalise
from rbflow.frames import FrameInfo
from rbflow.io import Image, write_table
from rbflow.quality import difference_quality
from rbflow.subtract import subtract_images

# --- the repository and the tiny test workflow -------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
#: Snakemake of the repository's Snakefile, run with the test's Python.
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile")]
#: Arguments that select the tiny test telescope (tests/data/telescopes/tiny.yaml).
TINY = [
    "--configfile",
    str(REPO / "tests/data/config.test.yaml"),
    "--config",
    f"telescope_dir={REPO}/tests/data/telescopes",
]


def make_workdir(path: Path) -> Path:
    """A fresh Snakemake working directory that sees the repository's config/."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config").symlink_to(REPO / "config")
    return path


# --- synthetic detector --------------------------------------------------------------------------

GAIN, RN = 2.0, 5.0  # e-/ADU, e-

# --- science/reference pairs (Gaussian PSFs, known fluxes and flux ratio) ------------------------

RATIO = 1.6  # true F_r / F_n of every pair
PAIR_INFO = FrameInfo(
    gain=GAIN, read_noise=RN, saturation=1e9, filter="r", exptime=30.0, date="", zeropoint=25.0, fwhm_guess=None
)
PAIR_CFG = {"method": "zogy", "tile": 512, "overlap": 32, "refine_astrometry": True}
PAIR_DET = {"threshold": 5.0, "min_pixels": 3}


class GaussPSF:
    """Pixel-integrated circular Gaussian whose FWHM may vary linearly with x (the PSFModel duck type)."""

    def __init__(self, fwhm: float, *, slope: float = 0.0, x0: float = 0.0):
        self.f0, self.slope, self.x0 = fwhm, slope, x0

    def fwhm(self, x, y):
        return self.f0 + self.slope * (x - self.x0)

    def stamp(self, x, y, size, *, centred=False):
        s = self.fwhm(x, y) / 2.3548200450309493 * math.sqrt(2)
        dx, dy = (0.0, 0.0) if centred else (x - round(x), y - round(y))
        u = np.arange(-(size // 2), size // 2 + 1, dtype=float)
        ex = erf((u - dx + 0.5) / s) - erf((u - dx - 0.5) / s)
        ey = erf((u - dy + 0.5) / s) - erf((u - dy - 0.5) / s)
        p = np.outer(ey, ex)
        return p / p.sum()


class CountedPSF(GaussPSF):
    """A GaussPSF that says how many stars made each cell of its model (as rbflow.psf.PSFModel)."""

    def __init__(self, fwhm: float, n_stars, sources=None):
        super().__init__(fwhm)
        self.n_stars = np.asarray(n_stars)
        self.sources = sources or ["cell"] * self.n_stars.size
        side = int(round(self.n_stars.size**0.5))
        self.grid = (side, side)


def tan_wcs(shape, shift=(0.0, 0.0), rotation=0.0) -> WCS:
    """A 1"/px TAN WCS centred on the frame, its reference pixel moved by ``shift`` px, its axes
    turned by ``rotation`` degrees."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [shape[1] / 2 + 1 + shift[0], shape[0] / 2 + 1 + shift[1]]
    c, s = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
    w.wcs.cd = np.array([[-1.0, 0.0], [0.0, 1.0]]) @ np.array([[c, -s], [s, c]]) / 3600
    return w


def render(shape, xs, ys, fluxes, psf, size=31) -> np.ndarray:
    img = np.zeros(shape)
    h = size // 2
    for x, y, f in zip(xs, ys, fluxes):
        ix, iy = int(round(x)), int(round(y))
        y0, x0 = iy - h, ix - h
        sy0, sx0 = max(0, -y0), max(0, -x0)
        sy1, sx1 = size - max(0, y0 + size - shape[0]), size - max(0, x0 + size - shape[1])
        if sy1 > sy0 and sx1 > sx0:
            img[y0 + sy0 : y0 + sy1, x0 + sx0 : x0 + sx1] += f * psf.stamp(x, y, size)[sy0:sy1, sx0:sx1]
    return img


def make_pair(
    shape=(256, 256),
    *,
    seed=1,
    nstars=120,
    fwhm_sci=4.0,
    fwhm_ref=3.0,
    slope=0.0,
    wcs_error=(0.0, 0.0),
    rotation=0.0,
    transients=None,
    ref_only=None,
):
    """Science/reference pair of the same star field with known PSFs, fluxes and noise.

    The reference is offset by (0.37, -0.21) px and turned by ``rotation`` degrees (so it must be
    resampled), and its header WCS is further wrong by ``wcs_error`` px. ``transients`` (x, y, flux) are added to the science only,
    ``ref_only`` (x, y, flux in science units) to the reference only. Sky 300/500 e-... ADU,
    gain 2 e-/ADU, read noise 5 e-.
    """
    rng = np.random.default_rng(seed)
    wsci = tan_wcs(shape)
    wref_true = tan_wcs(shape, (0.37, -0.21), rotation)
    wref = tan_wcs(shape, (0.37 + wcs_error[0], -0.21 + wcs_error[1]), rotation)
    xs, ys = rng.uniform(-10, shape[1] + 10, nstars), rng.uniform(-10, shape[0] + 10, nstars)
    fl = 300.0 * (2e5 / 300.0) ** (rng.uniform(0, 1, nstars) ** 2.5)
    psf_s = GaussPSF(fwhm_sci, slope=slope, x0=shape[1] / 2)
    psf_r = GaussPSF(fwhm_ref)
    ms = render(shape, xs, ys, fl, psf_s)
    if transients is not None and len(transients):
        ms += render(shape, transients[:, 0], transients[:, 1], transients[:, 2], psf_s)
    xr, yr = wref_true.world_to_pixel_values(*wsci.pixel_to_world_values(xs, ys))
    mr = render(shape, xr, yr, RATIO * fl, psf_r)
    if ref_only is not None and len(ref_only):
        xo, yo = wref_true.world_to_pixel_values(*wsci.pixel_to_world_values(ref_only[:, 0], ref_only[:, 1]))
        mr += render(shape, xo, yo, RATIO * ref_only[:, 2], psf_r)

    def observe(model, sky):
        var = (model + sky) / GAIN + (RN / GAIN) ** 2
        return (model + sky + rng.normal(0, 1, shape) * np.sqrt(var)).astype(np.float32)

    hs = wsci.to_header()
    hs["MAGZP"] = 25.0
    sci = Image(observe(ms, 300.0), hs, wsci, None)
    ref = Image(observe(mr, 500.0), wref.to_header(), wref, None)
    return {"sci": sci, "ref": ref, "psf_sci": psf_s, "psf_ref": psf_r, "stars": (xs, ys, fl)}


def subtract_pair(pair: dict, cfg: dict = PAIR_CFG):
    """``rbflow.subtract.subtract_images`` of a :func:`make_pair` pair (MEF HDUList)."""
    return subtract_images(pair["sci"], pair["ref"], pair["psf_sci"], pair["psf_ref"], PAIR_INFO, PAIR_INFO, cfg)


# --- frames of Moffat stars with a spatially varying FWHM ----------------------------------------

MOFFAT_BETA = 3.0
STAR_SKY = 200.0  # ADU
STAR_SHAPE = (384, 384)


def true_fwhm(x, y, shape=STAR_SHAPE):
    """Moffat FWHM (px, before pixel integration): 3.2 px at (0, 0) rising to 4.1 px at the far corner.

    A 28 % change across the frame, like the 4.0-5.0 px gradient measured in the library evaluation.
    """
    ny, nx = shape
    return 3.2 + 0.6 * x / nx + 0.3 * y / ny


def moffat_pixels(dx, dy, fwhm, beta=MOFFAT_BETA, sub=7):
    """Unit-flux Moffat integrated over pixels centred at offsets (dx, dy) (7x7 sub-pixel sums)."""
    alpha = fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1))
    s = (np.arange(sub) + 0.5) / sub - 0.5
    ux = dx[..., None, None] + s[None, :]
    uy = dy[..., None, None] + s[:, None]
    prof = (beta - 1) / (np.pi * alpha**2) * (1 + (ux * ux + uy * uy) / alpha**2) ** (-beta)
    return prof.mean(axis=(-1, -2))


def star_frame(shape=STAR_SHAPE, *, spacing=28, seed=1, flux_range=(4.0, 5.5), galaxies=0, stars=None):
    """Frame with stars on a jittered lattice (or at ``stars`` = (x, y, flux)), sky, Poisson and read noise.

    Returns the float32 data, a header with a TAN WCS and frame facts, and the star truth (x, y, flux).
    """
    rng = np.random.default_rng(seed)
    ny, nx = shape
    img = np.zeros(shape)
    if stars is None:
        gy, gx = np.mgrid[
            spacing / 2 + 5 : ny - spacing / 2 - 4 : spacing, spacing / 2 + 5 : nx - spacing / 2 - 4 : spacing
        ]
        xs = gx.ravel() + rng.uniform(-4, 4, gx.size)
        ys = gy.ravel() + rng.uniform(-4, 4, gy.size)
        fl = 10 ** rng.uniform(*flux_range, gx.size)
    else:
        xs, ys, fl = (np.asarray(v, float) for v in stars)
    half = 15
    g = np.arange(-half, half + 1)
    for x, y, f in zip(xs, ys, fl):
        x0, y0 = int(round(x)), int(round(y))
        st = f * moffat_pixels(
            g[None, :] + x0 - x + 0 * g[:, None], g[:, None] + y0 - y + 0 * g[None, :], true_fwhm(x, y, shape)
        )
        r0, r1, c0, c1 = max(0, y0 - half), min(ny, y0 + half + 1), max(0, x0 - half), min(nx, x0 + half + 1)
        img[r0:r1, c0:c1] += st[r0 - y0 + half : r1 - y0 + half, c0 - x0 + half : c1 - x0 + half]
    yy, xx = np.mgrid[0:ny, 0:nx]
    for _ in range(galaxies):
        gx_, gy_ = rng.uniform(40, nx - 40), rng.uniform(40, ny - 40)
        r = np.hypot(xx - gx_, (yy - gy_) * 1.4)
        img += 30000 * np.exp(-r / 4.0) / (2 * np.pi * 16)
    electrons = rng.poisson((img + STAR_SKY) * GAIN).astype(float) + rng.normal(0, 5.0, shape)
    data = (electrons / GAIN).astype(np.float32)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [nx / 2, ny / 2]
    w.wcs.cdelt = [-1 / 3600, 1 / 3600]
    hdr = w.to_header()
    hdr.update(GAIN=GAIN, RDNOISE=5.0, SATURATE=60000.0, FILTER="r", MAGZP=28.0, EXPTIME=30.0, SEEING=3.5)
    return data, hdr, (xs, ys, fl)


# --- real/bogus stamps, cutout files, datacubes -------------------------------------------------


def synthetic_stamps(
    n: int,
    *,
    size: int = 31,
    fwhm: float = 3.0,
    frac_true: float = 0.5,
    snr: tuple[float, float] = (5.0, 60.0),
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Raw SCI, REF, DIFF stamps of a known real/bogus problem, for tests and benchmarks.

    Reals are a Gaussian PSF (S/N uniform in ``snr``) in SCI and DIFF, on a faint host in SCI and REF half of the
    time. Bogus stamps are, in equal parts, pure noise, a subtraction dipole of a star present in
    SCI and REF, and a cosmic ray (one to three hot pixels in SCI and DIFF). Noise sigma is 1 (ADU)
    around a sky of 100 (SCI, REF) or 0 (DIFF).

    Parameters
    ----------
    n : int
        Number of stamps.
    size : int, optional
        Stamp side (pixels, odd).
    fwhm : float, optional
        PSF FWHM (pixels).
    frac_true : float, optional
        Fraction of reals.
    snr : tuple of float, optional
        Range of the reals' S/N (the dipoles and cosmic rays scale with it too).
    seed : int
        Seed of everything random.

    Returns
    -------
    X : numpy.ndarray
        float32 ``(n, 3, size, size)`` raw stamps (channels SCI, REF, DIFF).
    y : numpy.ndarray
        int64 ``(n,)`` labels, 1 = real.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    sigma = fwhm / 2.3548

    def blob(dx: np.ndarray, dy: np.ndarray, s: float = sigma) -> np.ndarray:
        g = np.exp(-((xx - dx[:, None, None]) ** 2 + (yy - dy[:, None, None]) ** 2) / (2 * s**2))
        return g / g.sum(axis=(1, 2), keepdims=True)

    y = (rng.random(n) < frac_true).astype(np.int64)
    X = rng.normal(0.0, 1.0, (n, 3, size, size)).astype(np.float32)
    X[:, :2] += 100.0
    # a source of total flux F in a Gaussian PSF has S/N ~ F / (sqrt(4 pi) sigma) on unit noise
    flux = rng.uniform(*snr, n) * np.sqrt(4 * np.pi) * sigma
    dx, dy = rng.uniform(-1, 1, n), rng.uniform(-1, 1, n)
    psf = blob(dx, dy)
    host = blob(dx + rng.normal(0, 2, n), dy + rng.normal(0, 2, n), 3 * sigma) * (rng.random(n) < 0.5)[:, None, None]
    host = host * rng.uniform(50, 400, n)[:, None, None]
    kind = rng.integers(0, 3, n)
    real = y == 1
    X[real, 0] += (flux[:, None, None] * psf + host)[real]
    X[real, 1] += host[real]
    X[real, 2] += (flux[:, None, None] * psf)[real]
    dipole = (~real) & (kind == 1)
    shift = rng.uniform(0.5, 1.5, n) * np.sign(rng.normal(size=n))
    star = 5 * flux[:, None, None] * psf
    X[dipole, 0] += star[dipole]
    X[dipole, 1] += star[dipole]
    X[dipole, 2] += (star - 5 * flux[:, None, None] * blob(dx + shift, dy))[dipole]
    cosmic = np.flatnonzero((~real) & (kind == 2))
    for i in cosmic:
        for _ in range(rng.integers(1, 4)):
            r, c = size // 2 + rng.integers(-2, 3, 2)
            amp = rng.uniform(20, 200)
            X[i, 0, r, c] += amp
            X[i, 2, r, c] += amp
    return X, y


def write_cutout(path: Path, stamp: np.ndarray, *, cid: str, image: str, snr: float = 10.0, mag: float = 20.0) -> None:
    """Write one cutout file as rbflow.cutouts does (primary header + SCI, REF, DIFF, SCORR HDUs)."""
    hdr = fits.Header()
    for key, value in dict(
        ID=cid,
        IMAGE=image,
        FRAME=image.split("_sim")[0],
        X=15.0,
        Y=15.0,
        RA=10.0,
        DEC=-5.0,
        MAG=mag,
        MAGERR=0.1,
        SNR=snr,
        FILTER="r",
        FWHM=3.0,
        FLAGS=0,
    ).items():
        hdr[key] = value
    hdus = [fits.PrimaryHDU(header=hdr)]
    for name, plane in zip(["SCI", "REF", "DIFF", "SCORR"], [*stamp, stamp[2]]):
        hdus.append(fits.ImageHDU(plane.astype(np.float32), name=name))
    path.parent.mkdir(parents=True, exist_ok=True)
    fits.HDUList(hdus).writeto(path)


def write_training(
    root: Path, n: int, *, seed: int, n_frames: int = 6, size: int = 31
) -> tuple[np.ndarray, np.ndarray]:
    """Write ``n`` synthetic labelled cutouts spread over ``n_frames`` frames under ``root/{true,false}``."""
    X, y = synthetic_stamps(n, size=size, seed=seed)
    for i, (stamp, label) in enumerate(zip(X, y)):
        image = f"f{i % n_frames:02d}_sim0"
        write_cutout(
            root / ("true" if label else "false") / f"{image}_{i}.fits",
            stamp,
            cid=f"{image}_{i}",
            image=image,
            snr=5.0 + i % 40,
        )
    return X, y


#: Every artefact and flat/sky structure of the embedded sky off: a frame is sky + objects + noise.
CLEAN_SKY = dict(
    cosmic_rays=0,
    hot_pixels=0,
    bad_columns=0,
    satellite_rate=0.0,
    flat_residual=0.0,
    sky_gradient=0.0,
    galaxies=0,
    variables=0,
    transients=0,
)


#: A small, fast training configuration for the tests.
TRAIN_CFG = {"widths": [8, 16, 32], "epochs": 3, "batch_size": 64, "lr": 0.01, "patience": 3, "device": "cpu"}


def make_cube(path: Path, n: int, *, seed: int, n_frames: int = 10) -> Path:
    """Write a datacube of ``n`` synthetic stamps (as build_datacube would) over ``n_frames`` frames."""
    X, y = synthetic_stamps(n, seed=seed)
    frames = np.array([f"f{i % n_frames:02d}" for i in range(n)])
    meta = {
        "cutout_size": 31,
        "stamp_size": 31,
        "crop": None,
        "channels": ["SCI", "REF", "DIFF"],
        "normalisation": NORMALISATION,
    }
    np.savez(
        path,
        X=normalise(X),
        y=y,
        ids=np.array([f"{f}_{i}" for i, f in enumerate(frames)]),
        image=frames,
        frame=frames,
        mag=np.full(n, np.nan),
        snr=np.linspace(3, 60, n),
        channels=np.array(meta["channels"]),
        meta=np.asarray(json.dumps(meta)),
    )
    return path


#: The lock file held around apt-get, by :func:`chromium_binary` and ``tests/cluster/slurm.sh`` alike:
#: the same rule as the script's ``${RBFLOW_APT_LOCK:-${TMPDIR:-/tmp}/rbflow-apt.lock}`` (tempfile's
#: also reads TEMP and TMP, which would name another file, and then nothing would be locked).
APT_LOCK = os.environ.get("RBFLOW_APT_LOCK") or os.path.join(os.environ.get("TMPDIR") or "/tmp", "rbflow-apt.lock")


def chromium_binary() -> str:
    """Path of the chromium binary, installed with apt when missing and running as root."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(
            "the report test needs a headless browser: as root on Debian run "
            "`apt-get install -y --no-install-recommends chromium` (the test does it itself when run as root)"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    # one apt at a time: the cluster test's tests/cluster/slurm.sh may be installing SLURM in another
    # test worker (pytest-xdist); both take this lock file with flock(2)
    with FileLock(APT_LOCK):
        proc = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode != 0:  # stale package lists: refresh them once
            subprocess.run(["apt-get", "update"], capture_output=True, text=True, env=env, timeout=600)
            proc = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    found = shutil.which("chromium")
    if proc.returncode != 0 or found is None:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
        pytest.skip(f"cannot install chromium with apt-get: {lines[-1]}")
    return found


# A small synthetic results folder for the scanning tests: real cutouts, labelled through the folder contract.
SCAN_SIZE = 31
SCAN_IMAGE = "fld00_r_e1_sim0"


def scan_wcs() -> WCS:
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
    header = scan_wcs().to_header()
    header["FILTER"] = "r"
    hdus = [fits.PrimaryHDU()] + [
        fits.ImageHDU(planes[name].astype(np.float32), header=header, name=name) for name in CHANNELS
    ]
    results = root / "results"
    mef = root / f"{SCAN_IMAGE}.fits"
    fits.HDUList(hdus).writeto(mef)
    ra, dec = scan_wcs().pixel_to_world_values([p[0] for p in xy], [p[1] for p in xy])
    cands = Table(
        {
            "id": [f"{SCAN_IMAGE}_{i}" for i in range(n)],
            "image": [SCAN_IMAGE] * n,
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
    cut = results / "sim" / "cutouts" / SCAN_IMAGE
    write_cutouts(mef, root / "cands.ecsv", cut, size=SCAN_SIZE, png=True)
    labels = Table(
        {
            "id": cands["id"],
            "label": ["unsorted" if i == n - 1 else ("true" if i % 2 == 0 else "false") for i in range(n)],
        }
    )
    write_table(labels, root / "labels.ecsv")
    label_cutouts([root / "labels.ecsv"], [cut], results / "training")
    return results, labels


def file_quality(path: Path | str) -> dict:
    """:func:`rbflow.quality.difference_quality` of a subtraction file (its DIFF, VAR and SCI planes, FWHMSCI)."""
    with fits.open(path) as h:
        return difference_quality(
            h["DIFF"].data.astype(float),
            h["VAR"].data.astype(float),
            h["SCI"].data.astype(float),
            h[0].header["FWHMSCI"],
        )


def static_demo_frames(root: Path, frames: tuple[str, ...], *, psf: bool = True, **sky_settings) -> dict:
    """The demo telescope on its static sky (no variables, transients, cosmic rays, bad pixels,
    satellites or bogus zoo: every residual at a star is the subtraction's), ``sky_settings``
    on top; ``frames`` written to ``root`` with the demo seed, with their PSF models unless
    ``psf`` is false. Returns the telescope."""
    import warnings

    import yaml

    from rbflow import sky
    from rbflow.config import load_telescope
    from rbflow.psf import run_psf

    raw = yaml.safe_load((REPO / "config/telescopes/demo.yaml").read_text())
    del raw["sky"]["artefacts"]  # the schema's default: off
    raw["sky"].update(variables=0, transients=0, cosmic_rays=0, hot_pixels=0, bad_columns=0, satellite_rate=0.0)
    raw["sky"].update(sky_settings)
    (root / "demo.yaml").write_text(yaml.safe_dump(raw))
    tel = load_telescope(root / "demo.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the PSF stage warns about borrowing cells, as it should
        for frame in frames:
            sky.write_frame(tel, frame, root / f"{frame}.fits", root / f"{frame}.ecsv", seed=20261124)  # config.yaml's
            if psf:
                run_psf(root / f"{frame}.fits", root / f"{frame}.psf.fits", root / f"{frame}.psf.png", tel)
    return tel
