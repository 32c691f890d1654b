"""Benchmark of rbflow alignment + ZOGY subtraction + detection on synthetic pairs (not a test).

Prints, per image size: wall time of the alignment alone, of the whole subtraction (alignment
included) and of detection; the ratio of the measured difference noise (two noise realisations,
robust std of (D1 - D2)/sqrt(2)) to the predicted sqrt(VAR); SCORR normalisation; the fraction of
bright unsaturated stars leaving a >= 5 sigma SCORR residual; and false candidates above 5 sigma.
The science PSF varies across the field (FWHM 3.5 -> 4.5 px left to right), the reference WCS is
off by (0.3, -0.2) px and the flux ratio is 1.6.

Usage: ``python bench/subtract.py [--tile PX] [--slope FWHM_RANGE] [size ...]`` (default: 1024 2048,
tile 512, FWHM range 1.0 px).
Peers (sfft, properimage, HOTPANTS) are not installed in this environment, so none is compared.
"""

from __future__ import annotations

import math
import time

import numpy as np
from astropy.wcs import WCS
from scipy.spatial import cKDTree
from scipy.special import erf

from rbflow.detect import FLAGS, detect
from rbflow.frames import FrameInfo
from rbflow.io import Image
from rbflow.subtract import align, subtract_images


class GaussPSF:
    """Pixel-integrated Gaussian PSF whose FWHM varies linearly with x."""

    def __init__(self, fwhm: float, slope: float = 0.0, x0: float = 0.0):
        self.f0, self.slope, self.x0 = fwhm, slope, x0

    def fwhm(self, x: float, y: float) -> float:
        return self.f0 + self.slope * (x - self.x0)

    def stamp(self, x: float, y: float, size: int, *, centred: bool = False) -> np.ndarray:
        s = self.fwhm(x, y) / 2.3548200450309493
        h = size // 2
        dx, dy = (0.0, 0.0) if centred else (x - round(x), y - round(y))
        u = np.arange(-h, h + 1, dtype=float)
        ex = erf((u - dx + 0.5) / (math.sqrt(2) * s)) - erf((u - dx - 0.5) / (math.sqrt(2) * s))
        ey = erf((u - dy + 0.5) / (math.sqrt(2) * s)) - erf((u - dy - 0.5) / (math.sqrt(2) * s))
        p = np.outer(ey, ex)
        return p / p.sum()


def tan_wcs(shape: tuple[int, int], shift: tuple[float, float] = (0.0, 0.0)) -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [shape[1] / 2 + 1 + shift[0], shape[0] / 2 + 1 + shift[1]]
    w.wcs.cd = np.array([[-1.0, 0.0], [0.0, 1.0]]) / 3600
    return w


def render(shape, xs, ys, fluxes, psf, size=31):
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


def scene(n: int, seed: int = 0, slope: float = 1.0):
    rng = np.random.default_rng(seed)
    shape = (n, n)
    nstars = int(2500 * (n / 1024) ** 2)
    xs, ys = rng.uniform(-10, n + 10, nstars), rng.uniform(-10, n + 10, nstars)
    fl = 300 * (2e5 / 300) ** (rng.uniform(0, 1, nstars) ** 2.5)
    nt = int(60 * (n / 1024) ** 2)
    tr = np.c_[rng.uniform(30, n - 30, nt), rng.uniform(30, n - 30, nt), 10 ** rng.uniform(2.8, 4.3, nt)]
    psf_s = GaussPSF(4.0, slope=slope / n, x0=n / 2)
    psf_r = GaussPSF(3.0)
    wsci, wref_true, wref = tan_wcs(shape), tan_wcs(shape, (0.37, -0.21)), tan_wcs(shape, (0.67, -0.41))
    xr, yr = wref_true.world_to_pixel_values(*wsci.pixel_to_world_values(xs, ys))
    ms = render(shape, np.r_[xs, tr[:, 0]], np.r_[ys, tr[:, 1]], np.r_[fl, tr[:, 2]], psf_s)
    mr = render(shape, xr, yr, 1.6 * fl, psf_r)
    return shape, ms, mr, wsci, wref, psf_s, psf_r, tr, (xs, ys, fl)


def observe(model, sky, gain, rn, rng):
    var = (model + sky) / gain + (rn / gain) ** 2
    return (model + sky + rng.normal(0, 1, model.shape) * np.sqrt(var)).astype(np.float32)


def main(sizes: list[int], *, tile: int = 512, slope: float = 1.0) -> None:
    info = FrameInfo(gain=2.0, read_noise=5.0, saturation=1e9, filter="r", exptime=30.0, date="",
                     zeropoint=25.0, fwhm_guess=None)
    cfg = {"method": "zogy", "tile": tile, "overlap": 32, "refine_astrometry": True}
    for n in sizes:
        shape, ms, mr, wsci, wref, psf_s, psf_r, tr, stars = scene(n, slope=slope)
        out = []
        for k in range(2):
            rng = np.random.default_rng(100 + k)
            sci = Image(observe(ms, 300.0, 2.0, 5.0, rng), wsci.to_header(), wsci)
            ref = Image(observe(mr, 500.0, 2.0, 5.0, rng), wref.to_header(), wref)
            t0 = time.perf_counter()
            align(sci, ref, refine=True, fwhm_sci=4.0)
            t1 = time.perf_counter()
            hdul = subtract_images(sci, ref, psf_s, psf_r, info, info, cfg)
            t2 = time.perf_counter()
            cands = detect(hdul, psf_s, info, {"threshold": 5.0, "min_pixels": 3}, image_name="b", cutout_size=31)
            t3 = time.perf_counter()
            out.append((hdul, cands, t1 - t0, t2 - t1, t3 - t2))
        (h1, c1, ta, ts, td), (h2, *_rest) = out
        d = (h1["DIFF"].data - h2["DIFF"].data) / math.sqrt(2)
        ok = np.isfinite(d)
        rob = 1.4826 * np.median(np.abs(d[ok] - np.median(d[ok])))
        pred = np.median(np.sqrt(h1["VAR"].data[ok]))
        xs, ys, fl = stars
        sig = h1[0].header["SIGMAN"]
        peak = fl / (2 * math.pi * (psf_s.fwhm(xs, ys) / 2.3548) ** 2)
        inside = (xs > 15) & (xs < n - 15) & (ys > 15) & (ys < n - 15)
        bright = inside & (peak > 50 * sig)
        sc = np.nan_to_num(h1["SCORR"].data)
        resid = [np.abs(sc[int(y) - 4 : int(y) + 5, int(x) - 4 : int(x) + 5]).max() >= 5
                 for x, y in zip(xs[bright], ys[bright])]
        dist, _ = cKDTree(tr[:, :2]).query(np.c_[c1["x"], c1["y"]])
        false = dist > 2
        hdr = h1[0].header
        print(f"size {n}x{n}, tile {tile}, science FWHM {4 - slope / 2:.2f}->{4 + slope / 2:.2f} px: "
              f"align {ta:.2f} s, subtract incl. align {ts:.2f} s (excl. ~{ts - ta:.2f} s), detect {td:.2f} s")
        print(f"  flux ratio {hdr['FLXRATIO']:.4f} +- {hdr['FLXRERR']:.4f} (truth 1.6), "
              f"align rms {hdr['ALIGNRMS']:.3f} px "
              f"over {hdr['NSTARS']} stars, tiles {hdr['NTILES']}")
        print(f"  difference noise / prediction (two realisations): {rob / pred:.3f}; "
              f"SCORRNRM {hdr['SCORRNRM']:.3f}, "
              f"DIFFNRM {hdr['DIFFNRM']:.3f}")
        print(f"  bright stars with >=5 sigma SCORR residual: {sum(resid)}/{len(resid)} "
              f"({100 * np.mean(resid):.1f} %)")
        print(f"  candidates {len(c1)}, false (no transient within 2 px) {false.sum()}, of which NEAR_BRIGHT "
              f"{int(((c1['flags'][false] & FLAGS['NEAR_BRIGHT']) != 0).sum())}; transients recovered "
              f"{int((cKDTree(np.c_[c1['x'], c1['y']]).query(tr[:, :2])[0] < 2).sum())}/{len(tr)}")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sizes", nargs="*", type=int, default=[1024, 2048])
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--slope", type=float, default=1.0, help="science FWHM change across the frame (px)")
    args = ap.parse_args()
    main(args.sizes, tile=args.tile, slope=args.slope)
