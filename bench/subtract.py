"""Benchmark of rbflow's subtraction against its peers on synthetic pairs (not a test).

For each image size, on the same pair and in one process, prints the wall time of:

* rbflow ZOGY (``subtract.method: zogy``): alignment alone, subtraction with and without it;
  and without its kernels fitted on the stars (``subtract.fit_kernel`` off: the PSF models
  alone, which are exact here);
* rbflow sfft (``subtract.method: sfft``, alignment included);
* sfft's ``Customized_Packet`` called directly (numpy backend, 2 threads, whole frame; not above
  ``--sfft-direct-max`` px, as it needs ~5 GB per 1024² of frame);
* properimage's ZOGY ``subtract`` (not above ``--properimage-max`` px: 75-100 s per 1024²);

the peers run on rbflow's aligned, background-subtracted frames (so their times exclude the
alignment) and their ratio to rbflow ZOGY's subtraction without alignment. For every method,
on two noise realisations of the pair: the difference-image noise relative to the prediction,
robust std of D1 over robust std of (D1 - D2)/sqrt(2) (1.00 when noise-limited), in star-free
pixels and around bright stars; and the false candidates above 5 sigma of one detection applied
to every D alike (D convolved with a Gaussian of the science FWHM over the local rms of the same
filter applied to (D1 - D2)/sqrt(2), peaks of either sign more than 2 px from an injected
transient), with the transients recovered. rbflow's own candidates (``rbflow.detect`` on its SCORR) are listed too.

The science PSF varies across the field (FWHM 3.5 -> 4.5 px left to right), the reference is
sharper (3 px), its WCS is off by (0.3, -0.2) px, the flux ratio is 1.6.

Usage: ``python bench/subtract.py [--tile PX] [--slope PX] [--sfft-method-max PX]
[--sfft-direct-max PX] [--properimage-max PX] [size ...]`` (default sizes 1024 2048). Peers that are not installed are
reported as such; ``bash bench/setup_peers.sh`` makes an environment with them.
"""

from __future__ import annotations

import contextlib
import io
import math
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.special import erf

from rbflow.align import align
from rbflow.detect import detect
from rbflow.frames import FrameInfo
from rbflow.io import Image
from rbflow.subtract import prepare_pair, subtract_images

FWHM_REF = 3.0
FWHM_SCI = 4.0
#: Threads of the subtraction (the rule's ``threads``; the sfft direct call below also uses 2).
THREADS = 2
INFO = FrameInfo(
    gain=2.0, read_noise=5.0, saturation=1e9, filter="r", exptime=30.0, date="", zeropoint=25.0, fwhm_guess=None
)


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
    psf_s = GaussPSF(FWHM_SCI, slope=slope / n, x0=n / 2)
    psf_r = GaussPSF(FWHM_REF)
    wsci, wref_true, wref = tan_wcs(shape), tan_wcs(shape, (0.37, -0.21)), tan_wcs(shape, (0.67, -0.41))
    xr, yr = wref_true.world_to_pixel_values(*wsci.pixel_to_world_values(xs, ys))
    ms = render(shape, np.r_[xs, tr[:, 0]], np.r_[ys, tr[:, 1]], np.r_[fl, tr[:, 2]], psf_s)
    mr = render(shape, xr, yr, 1.6 * fl, psf_r)
    return shape, ms, mr, wsci, wref, psf_s, psf_r, tr, (xs, ys, fl)


def observe(model, sky, gain, rn, rng):
    var = (model + sky) / gain + (rn / gain) ** 2
    return (model + sky + rng.normal(0, 1, model.shape) * np.sqrt(var)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Peers: each takes rbflow's prepared pair (aligned, background-subtracted) and returns D
# --------------------------------------------------------------------------------------------


def sfft_direct(pp) -> np.ndarray:
    """sfft ``Customized_Packet`` on the whole frame, reference convolved (D = N - K * R)."""
    from sfft.CustomizedPacket import Customized_Packet

    kerhw = int(np.clip(math.ceil(2.0 * max(pp.fwhm_s, pp.fwhm_r)), 2, 20))
    with tempfile.TemporaryDirectory() as tmp:
        ref, sci = Path(tmp) / "ref.fits", Path(tmp) / "sci.fits"
        fits.PrimaryHDU(pp.R).writeto(ref)
        fits.PrimaryHDU(pp.N).writeto(sci)
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, diff = Customized_Packet.CP(
                str(ref),
                str(sci),
                str(ref),
                str(sci),
                "REF",
                kerhw,
                KerPolyOrder=2,
                BGPolyOrder=2,
                ConstPhotRatio=True,
                BACKEND_4SUBTRACT="Numpy",
                NUM_CPU_THREADS_4SUBTRACT=2,
                NUMBA_CACHE=True,
                VERBOSE_LEVEL=0,
            )
    return np.asarray(diff).T


def warm_sfft() -> None:
    """Load sfft's numba functions once, before any timing: the first sfft call of a process
    compiles them (20-50 s) or loads numba's on-disk cache (~1.5 s CPU), whichever method calls
    first would pay it (measured on a 256² DECam pair in fresh processes with a warm cache: the
    method and the direct call take 2.3 s CPU each when second, 4.0 and 3.6 s when first)."""
    from rbflow.sfft_method import require_sfft

    require_sfft()
    from types import SimpleNamespace

    rng = np.random.default_rng(0)
    noise = rng.normal(0, 1, (2, 128, 128)).astype(np.float32)
    sfft_direct(SimpleNamespace(N=noise[0], R=noise[1], fwhm_s=2.0, fwhm_r=2.0))


def properimage_zogy(pp) -> np.ndarray:
    """properimage's ``subtract`` (ZOGY with its own PSF estimates); the real part of its D."""
    from properimage.operations import subtract

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = subtract(ref=pp.R.astype(np.float64), new=pp.N.astype(np.float64), align=False, fitted_psf=False)
    return np.real(out[0])


PEERS: dict[str, tuple[str, Callable[[Any], np.ndarray]]] = {
    "sfft Customized_Packet": ("sfft.CustomizedPacket", sfft_direct),
    "properimage ZOGY": ("properimage.operations", properimage_zogy),
}


def installed(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def rstd(v: np.ndarray) -> float:
    v = v[np.isfinite(v)]
    return float(1.4826 * np.median(np.abs(v - np.median(v))))


def regions(shape, stars, tr, psf_s, sigma: float, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Star-free pixels (> 3 FWHM from any star above 0.5 sigma peak and from transients) and the
    pixels within 1.5 FWHM of bright stars (peak > 50 sigma)."""
    xs, ys, fl = stars
    fw = psf_s.fwhm(xs, ys)
    peak = fl / (2 * math.pi * (fw / 2.3548) ** 2)
    inside = (xs >= 0) & (xs < shape[1] - 0.5) & (ys >= 0) & (ys < shape[0] - 0.5)

    def near(x, y, r):
        seeds = np.ones(shape, bool)
        seeds[np.rint(y).astype(int), np.rint(x).astype(int)] = False
        return ndimage.distance_transform_edt(seeds) <= r

    faint = inside & (peak > 0.5 * sigma)
    free = ~near(np.r_[xs[faint], tr[:, 0]], np.r_[ys[faint], tr[:, 1]], 3 * FWHM_SCI) & valid
    bright = inside & (peak > 50 * sigma)
    star = near(xs[bright], ys[bright], 1.5 * FWHM_SCI) & valid
    return free, star


def false_candidates(D: np.ndarray, E: np.ndarray, tr: np.ndarray, valid: np.ndarray) -> tuple[int, int]:
    """(false, recovered) peaks above 5 sigma of D filtered with a Gaussian of the science FWHM.

    The noise of the filtered D is measured locally on the filtered noise image E = (D1 - D2)/sqrt(2)
    (rms over a Gaussian window of 3 FWHM), so source Poisson noise and correlated noise are
    accounted for alike for every method and only subtraction residuals remain."""
    sig = FWHM_SCI / 2.3548

    def filt(a):
        return ndimage.gaussian_filter(np.where(valid, np.nan_to_num(a), 0.0), sig)

    snr = filt(D) / np.sqrt(ndimage.gaussian_filter(filt(E) ** 2, 3 * FWHM_SCI))
    peaks = []
    for sign in (1, -1):
        m = sign * snr
        pk = (m == ndimage.maximum_filter(m, size=5)) & (m >= 5) & valid
        peaks.append(np.c_[np.nonzero(pk)[1], np.nonzero(pk)[0]])
    pts = np.concatenate(peaks)
    if not len(pts):
        return 0, 0
    false = int((cKDTree(tr[:, :2]).query(pts)[0] > 2).sum())
    recovered = int((cKDTree(peaks[0]).query(tr[:, :2])[0] <= 2).sum()) if len(peaks[0]) else 0
    return false, recovered


def describe(name, d1, d2, free, star, tr, valid, secs, ref_secs, note=""):
    e = (d1 - d2) / math.sqrt(2)
    nf, ns = rstd(d1[free]) / rstd(e[free]), rstd(d1[star]) / rstd(e[star])
    false, rec = false_candidates(d1, e, tr, valid)
    ratio = f"{secs / ref_secs:5.1f}x" if ref_secs else "  -  "
    print(
        f"  {name:<28s} {secs:7.2f} s {ratio}   noise/pred free {nf:5.3f} stars {ns:5.3f}   "
        f"false >5sig {false:4d}, transients {rec}/{len(tr)}{note}"
    )


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main(
    sizes: list[int], *, tile: int, slope: float, sfft_method_max: int, sfft_direct_max: int, properimage_max: int
) -> None:
    zcfg = {"method": "zogy", "tile": tile, "overlap": 32, "refine_astrometry": True}
    scfg = {**zcfg, "method": "sfft", "sfft": {"tile": 1024, "overlap": 64}}
    have_sfft = installed("sfft.CustomizedPacket")
    if have_sfft:
        warm_sfft()
    for n in sizes:
        shape, ms, mr, wsci, wref, psf_s, psf_r, tr, stars = scene(n, slope=slope)
        pairs = []
        for k in range(2):
            rng = np.random.default_rng(100 + k)
            pairs.append(
                (
                    Image(observe(ms, 300.0, 2.0, 5.0, rng), wsci.to_header(), wsci),
                    Image(observe(mr, 500.0, 2.0, 5.0, rng), wref.to_header(), wref),
                )
            )
        res: dict[str, list] = {}
        t_align, t_zogy = [], []
        for sci, ref in pairs:
            t0 = time.perf_counter()
            align(sci, ref, refine=True, fwhm_sci=FWHM_SCI)
            t1 = time.perf_counter()
            h = subtract_images(sci, ref, psf_s, psf_r, INFO, INFO, zcfg, threads=THREADS)
            t2 = time.perf_counter()
            t_align.append(t1 - t0)
            t_zogy.append(t2 - t1)
            res.setdefault("rbflow zogy", []).append(h)
        ta, tz = min(t_align), min(t_zogy)
        h1 = res["rbflow zogy"][0]
        valid = (h1["MASK"].data == 0) & np.isfinite(h1["DIFF"].data)
        valid[:16], valid[-16:], valid[:, :16], valid[:, -16:] = False, False, False, False
        free, star = regions(shape, stars, tr, psf_s, h1[0].header["SIGMAN"], valid)
        print(
            f"size {n}x{n}: science FWHM {FWHM_SCI - slope / 2:.2f}->{FWHM_SCI + slope / 2:.2f} px, reference "
            f"{FWHM_REF} px, {len(stars[0])} stars, {len(tr)} transients; star-free px {free.sum()}, "
            f"bright-star px {star.sum()}"
        )
        print(
            f"  rbflow zogy: align {ta:.2f} s, subtraction {tz - ta:.2f} s without alignment, {tz:.2f} s with it "
            f"(min of 2 runs; tile {tile}, {h1[0].header['NTILES']} tiles)"
        )
        print(
            f"  {'method':<28s} {'time':>9s} {'/rbflow':>6s}   (times of peers exclude the alignment, "
            "ratios are to rbflow zogy without alignment)"
        )
        d = [h["DIFF"].data for h in res["rbflow zogy"]]
        describe(
            "rbflow zogy (no alignment)",
            d[0],
            d[1],
            free,
            star,
            tr,
            valid,
            tz - ta,
            tz - ta,
            own_candidates(res["rbflow zogy"][0], psf_s, tr),
        )
        hm, tm = timed_subtractions(pairs, psf_s, psf_r, {**zcfg, "fit_kernel": False})
        describe(
            "rbflow zogy, models only",
            hm[0]["DIFF"].data,
            hm[1]["DIFF"].data,
            free,
            star,
            tr,
            valid,
            tm - ta,
            tz - ta,
            own_candidates(hm[0], psf_s, tr) + f"; kernels fitted in {h1[0].header['KERNFIT']} tiles with them",
        )
        if n > sfft_method_max:
            print(f"  {'rbflow sfft':<28s} skipped above {sfft_method_max} px (see --help)")
        elif have_sfft:
            hs, ts = timed_subtractions(pairs, psf_s, psf_r, scfg)
            describe(
                "rbflow sfft (with alignment)",
                hs[0]["DIFF"].data,
                hs[1]["DIFF"].data,
                free,
                star,
                tr,
                valid,
                ts,
                tz - ta,
                own_candidates(hs[0], psf_s, tr) + f"; {hs[0][0].header['NTILES']} tiles",
            )
        else:
            print(f'  {"rbflow sfft":<28s} not installed (pip install "rbflow[sfft]")')
        pps = [prepare_pair(sci, ref, psf_s, psf_r, INFO, INFO, zcfg, threads=THREADS) for sci, ref in pairs]
        for name, (module, run) in PEERS.items():
            limit = sfft_direct_max if name.startswith("sfft") else properimage_max
            if not installed(module):
                print(f"  {name:<28s} not installed (bash bench/setup_peers.sh)")
                continue
            if n > limit:
                print(f"  {name:<28s} skipped above {limit} px (see --help)")
                continue
            ds, tp = [], []
            for pp in pps:
                t0 = time.perf_counter()
                ds.append(run(pp))
                tp.append(time.perf_counter() - t0)
            describe(name, ds[0], ds[1], free, star, tr, valid, min(tp), tz - ta)


def timed_subtractions(pairs, psf_s, psf_r, cfg: dict[str, Any]) -> tuple[list, float]:
    """``subtract_images`` (alignment included) of each (science, reference) pair with ``cfg``:
    the outputs and the shortest wall time."""
    hdus, times = [], []
    for sci, ref in pairs:
        t0 = time.perf_counter()
        hdus.append(subtract_images(sci, ref, psf_s, psf_r, INFO, INFO, cfg, threads=THREADS))
        times.append(time.perf_counter() - t0)
    return hdus, min(times)


def own_candidates(h, psf_s, tr) -> str:
    """rbflow's own detection on its SCORR: false candidates and transients recovered."""
    cands = detect(h, psf_s, INFO, {"threshold": 5.0, "min_pixels": 1}, image_name="b", cutout_size=31, negative=True)
    if not len(cands):
        return "; own SCORR: no candidate"
    pts = np.c_[cands["x"], cands["y"]]
    false = int((cKDTree(tr[:, :2]).query(pts)[0] > 2).sum())
    rec = int((cKDTree(pts).query(tr[:, :2])[0] <= 2).sum())
    return f"; own SCORR: false {false}, transients {rec}/{len(tr)}"


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sizes", nargs="*", type=int, default=[1024, 2048])
    ap.add_argument("--tile", type=int, default=512, help="rbflow ZOGY tile spacing (px)")
    ap.add_argument("--slope", type=float, default=1.0, help="science FWHM change across the frame (px)")
    ap.add_argument(
        "--sfft-method-max",
        type=int,
        default=100_000,
        help="largest frame (px) for rbflow's sfft method (10-35 s per 1024² tile)",
    )
    ap.add_argument(
        "--sfft-direct-max",
        type=int,
        default=1024,
        help="largest frame (px) for sfft on the whole frame (~5 GB per 1024²)",
    )
    ap.add_argument(
        "--properimage-max", type=int, default=1024, help="largest frame (px) for properimage (75-100 s per 1024²)"
    )
    args = ap.parse_args()
    main(
        args.sizes,
        tile=args.tile,
        slope=args.slope,
        sfft_method_max=args.sfft_method_max,
        sfft_direct_max=args.sfft_direct_max,
        properimage_max=args.properimage_max,
    )
