"""Background estimators compared on known truth and on real frames (prints; not a test).

rbflow's estimator (:func:`rbflow.background.background`: clipped mesh medians, a plane, outlier
meshes replaced, bicubic spline to the edges) against the one the PSF stage used before it,
photutils' ``Background2D`` (clipped mesh medians, 3x3 median filter of the meshes, spline), with
the same mesh size and clipping.

* Demo sky (``rbflow.sky``) without flat-field residuals, so that the true sky is exactly
  ``FrameConditions.sky_map()`` (a level with a gradient): rms and max of (estimate - truth) in
  units of the true sky noise, over the frame, its outer 32 px and the rest; frames of 256 and
  1024 px, three frames, two seeds each.
* Real DECam frames (``shared/data/decam-sfft``; no truth): medians of (frame - estimate) in
  32 px boxes of empty sky (pixels more than 2.5 sigma above either estimate, grown by 5 px,
  left out), in units of the noise: their rms over the frame, the edge boxes and the rest.

Usage: ``python bench/background.py [--decam DIR]``.
"""

from __future__ import annotations

import argparse
import copy
import glob
import math
import time
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits
from scipy import ndimage

from rbflow import sky
from rbflow.background import background
from rbflow.config import load_telescope
from rbflow.frames import frame_info

ROOT = Path(__file__).resolve().parents[1]


def rbflow_estimate(data: np.ndarray, bad: np.ndarray) -> tuple[np.ndarray, float]:
    bkg, rms = background(data, bad)
    return bkg.astype(float), rms


def photutils_estimate(data: np.ndarray, bad: np.ndarray) -> tuple[np.ndarray, float]:
    from astropy.stats import SigmaClip
    from photutils.background import Background2D, MedianBackground, StdBackgroundRMS

    box = int(max(16, min(64, min(data.shape) // 4)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = Background2D(
            np.where(np.isfinite(data), data, 0.0),
            box,
            mask=bad,
            filter_size=3,
            exclude_percentile=50.0,
            sigma_clip=SigmaClip(sigma=3.0, maxiters=5),
            bkg_estimator=MedianBackground(),
            bkg_rms_estimator=StdBackgroundRMS(),
        )
    return np.asarray(b.background, float), float(np.median(b.background_rms))


ESTIMATORS = {"rbflow": rbflow_estimate, "photutils": photutils_estimate}


def demo() -> None:
    tel0 = load_telescope(ROOT / "config" / "telescopes" / "demo.yaml")
    print("demo sky, no flat residual; errors in units of the true sky noise (mean over 6 frames)")
    print("  size  estimator   cpu s   rms    edge   inner   max")
    for size in (256, 1024):
        rows: dict[str, list[list[float]]] = {k: [] for k in ESTIMATORS}
        for frame in ("fld00_r_ref", "fld00_r_e1", "fld01_g_e2"):
            for seed in (1, 2):
                tel = copy.deepcopy(tel0)
                tel["sky"]["size"] = [size, size]
                tel["sky"]["flat_residual"] = 0.0
                hdu, _ = sky.simulate_frame(tel, frame, seed=seed)
                cond = sky.frame_conditions(tel, frame, seed=seed)
                info = frame_info(hdu.header, tel)
                data = hdu.data.astype(np.float32)
                bad = ~np.isfinite(data) | (data >= info.saturation)
                sig = math.sqrt(cond.sky * info.gain + info.read_noise**2) / info.gain
                edge = np.ones(data.shape, bool)
                edge[32:-32, 32:-32] = False
                for name, estimate in ESTIMATORS.items():
                    t0 = time.process_time()
                    bkg, _ = estimate(data, bad)
                    cpu = time.process_time() - t0
                    e = (bkg - cond.sky_map()) / sig
                    rms = lambda a: float(np.sqrt(np.mean(a**2)))  # noqa: E731
                    rows[name].append([cpu, rms(e), rms(e[edge]), rms(e[~edge]), float(np.abs(e).max())])
        for name, r in rows.items():
            m = np.mean(r, axis=0)
            print(f"  {size:4d}  {name:10s} {m[0]:6.3f}  {m[1]:5.3f}  {m[2]:5.3f}  {m[3]:5.3f}  {m[4]:5.3f}")


def decam(folder: Path) -> None:
    paths = sorted(glob.glob(str(folder / "*.fits")))
    if not paths:
        print(f"no DECam frames in {folder}")
        return
    print("DECam frames: 32 px box medians of empty sky after subtraction, in units of the noise")
    print("  frame                  estimator   rms    edge   inner   max")
    for p in paths:
        data = fits.getdata(p).astype(np.float32)
        hdr = fits.getheader(p)
        bad = ~np.isfinite(data) | (data >= float(hdr.get("SATURATE", np.inf)))
        out = {n: f(data, bad) for n, f in ESTIMATORS.items()}
        sig = float(np.median([s for _, s in out.values()]))
        src = np.zeros(data.shape, bool)
        for b, s in out.values():
            src |= np.nan_to_num(data - b) > 2.5 * s
        empty = ~ndimage.binary_dilation(src | bad, iterations=5)
        k = 32
        ny, nx = (data.shape[0] // k) * k, (data.shape[1] // k) * k
        for name, (b, _) in out.items():
            r = np.where(empty, data - b, np.nan)[:ny, :nx]
            cells = r.reshape(ny // k, k, nx // k, k).transpose(0, 2, 1, 3).reshape(ny // k, nx // k, -1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                med = np.nanmedian(cells, axis=2) / sig
            edge = np.zeros(med.shape, bool)
            edge[[0, -1], :] = True
            edge[:, [0, -1]] = True
            q = lambda a: float(np.sqrt(np.nanmean(a**2)))  # noqa: E731
            print(
                f"  {Path(p).name:22s} {name:10s} {q(med):5.3f}  {q(med[edge]):5.3f}  {q(med[~edge]):5.3f}  "
                f"{float(np.nanmax(np.abs(med))):5.3f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decam", type=Path, default=ROOT.parent / "shared" / "data" / "decam-sfft")
    args = parser.parse_args()
    demo()
    decam(args.decam)


if __name__ == "__main__":
    main()
