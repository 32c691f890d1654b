"""Subtraction on real frames: rbflow's methods against sfft called directly (not a test).

On the ten DECam cut-outs of ``../shared/data/decam-sfft/`` with ``config/telescopes/decam.yaml``:
the five OBS04 frames are stacked into the reference (``rbflow.reference.run_reference``, the
telescope's ``frames.stack`` settings), and so are the five OBS18 frames; then, for each pair

* each single OBS18 frame against the stacked OBS04 reference (what ``snakemake`` runs), and
* the stacked OBS18 epoch against the stacked OBS04 epoch,

every method subtracts the same pair:

* rbflow ``zogy``, rbflow ``sfft`` (decorrelated) and rbflow ``auto`` (the default: zogy or sfft
  chosen per pair from the PSF models; the choice is printed, with the image sfft convolved and
  why (``rbflow.sfft_method.convolution_sides``), the number of stars that
  moved (``subtract.sfft.moved_star_sigma``) and the measured kernel error when
  ``subtract.sfft.kernel_error`` is on, as in ``decam.yaml``) (``rbflow.subtract.run_subtract``
  with ``subtract.method`` set, alignment included; PSF models by ``rbflow.psf.run_psf``);
* sfft's ``Customized_Packet`` called directly on the pair rbflow aligned (the ``SCI`` and
  ``REF`` planes of rbflow's zogy output: background-subtracted science, reference resampled
  onto it and scaled to its flux; masked pixels set to 0), the sharper frame convolved,
  kernel half width 2 FWHM of the broader PSF (2-20 px), kernel and background polynomials of
  degree 2, constant photometric ratio.

and the bench prints, per pair and method (the measures of :mod:`rbflow.quality`):

``noise``
    std of DIFF over its robust std (1.4826 MAD), over the finite pixels (1.00 for Gaussian
    noise; artefacts raise it).
``blobs``
    connected regions of the 3x3-box-smoothed DIFF beyond +-5 times its own robust std, 16 px
    border cut (positive / negative).
``bright``, ``peak``
    stars of the science frame (16 px border cut) brighter than 100 sigma (aperture of radius 1 FWHM, background
    noise only) with a >= 5 sigma pixel of the smoothed DIFF within 2 FWHM, over such stars;
    sigma is the smoothed DIFF's robust std scaled by the square root of the local variance
    (rbflow's ``VAR`` plane, with the stars' own photon noise) over its median, so a star's
    photon noise alone is not a residual; ``peak`` is the median of the largest
    |significance| within 2 FWHM of these stars.
``cands``
    candidates of ``rbflow.detect.run_detect`` on the DIFF file (rbflow methods only: the
    direct call makes no score image).
``time``
    wall time of the subtraction (s): ``run_subtract`` for rbflow (reading, alignment and
    writing included), the ``Customized_Packet`` call for sfft.

Only public entry points are used (``run_reference``, ``run_psf``, ``run_subtract``,
``run_detect``) on files written to a temporary folder, so the bench survives refactors of the
subtraction's internals. The first sfft call compiles its numba kernels (cached afterwards):
run twice for steady times.

Usage: ``PYTHONPATH=src python bench/realpair.py [--data DIR]``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import logging
import math
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from rbflow.config import load_telescope
from rbflow.detect import run_detect
from rbflow.psf import run_psf
from rbflow.quality import difference_quality
from rbflow.reference import run_reference
from rbflow.subtract import run_subtract

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "decam-sfft"


def sfft_direct(sci: np.ndarray, ref: np.ndarray, fwhm_s: float, fwhm_r: float) -> tuple[np.ndarray, float]:
    """sfft ``Customized_Packet`` on the aligned pair, the sharper frame convolved: (DIFF, seconds)."""
    import numba
    from sfft.CustomizedPacket import Customized_Packet

    bad = ~np.isfinite(sci) | ~np.isfinite(ref)
    conv_side = "REF" if fwhm_r <= fwhm_s else "SCI"
    kerhw = int(np.clip(math.ceil(2.0 * max(fwhm_s, fwhm_r)), 2, 20))
    set_threads = numba.set_num_threads
    with tempfile.TemporaryDirectory(prefix="realpair-sfft-") as tmp:
        paths = {}
        for name, data in (("ref", ref), ("sci", sci)):
            paths[name] = str(Path(tmp) / f"{name}.fits")
            fits.PrimaryHDU(np.where(bad, 0.0, data).astype(np.float32)).writeto(paths[name])
        t0 = time.perf_counter()
        try:
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _, diff = Customized_Packet.CP(
                    paths["ref"],
                    paths["sci"],
                    paths["ref"],
                    paths["sci"],
                    conv_side,
                    kerhw,
                    KerPolyOrder=2,
                    BGPolyOrder=2,
                    ConstPhotRatio=True,
                    BACKEND_4SUBTRACT="Numpy",
                    NUM_CPU_THREADS_4SUBTRACT=2,
                    NUMBA_CACHE=True,
                    VERBOSE_LEVEL=0,
                )
        finally:
            numba.set_num_threads = set_threads  # sfft 1.7.3 assigns an int to it
        seconds = time.perf_counter() - t0
    diff = np.asarray(diff, np.float64).T
    diff[bad] = np.nan
    return diff, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="folder of the DECam cut-outs")
    parser.add_argument(
        "--keep", type=Path, help="write the stacks, PSF models and subtractions here (else a temporary folder)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("NUMBA_CACHE_DIR", str(Path.home() / ".cache" / "rbflow" / "numba"))
    warnings.simplefilter("ignore")
    telescope = load_telescope(REPO / "config" / "telescopes" / "decam.yaml")
    epoch_a = sorted(str(p) for p in args.data.glob("DEC-OBS04?.mini.fits"))
    epoch_b = sorted(str(p) for p in args.data.glob("DEC-OBS18?.mini.fits"))
    if len(epoch_a) != 5 or len(epoch_b) != 5:
        raise SystemExit(f"expected 5 DEC-OBS04 and 5 DEC-OBS18 frames in {args.data}")
    with tempfile.TemporaryDirectory(prefix="realpair-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        stack = telescope["frames"]["stack"]
        run_reference(frames=epoch_a, out_fits=str(work / "stackA.fits"), telescope=telescope, stack=stack)
        run_reference(frames=epoch_b, out_fits=str(work / "stackB.fits"), telescope=telescope, stack=stack)
        frames = {Path(p).name.split(".")[0]: p for p in epoch_b}
        frames.update({"stackA": str(work / "stackA.fits"), "stackB": str(work / "stackB.fits")})
        for name, path in frames.items():
            run_psf(path, work / f"{name}.psf.fits", work / f"{name}.psf.png", telescope)
        pairs = [(name, "stackA") for name in frames if name.startswith("DEC")] + [("stackB", "stackA")]
        methods = ("rbflow zogy", "rbflow sfft", "rbflow auto", "sfft direct")
        rows: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
        for sci, ref in pairs:
            for method in ("zogy", "sfft", "auto"):
                tel = copy.deepcopy(telescope)
                tel["subtract"]["method"] = method
                out = work / f"{sci}-{method}.fits"
                t0 = time.perf_counter()
                run_subtract(frames[sci], frames[ref], work / f"{sci}.psf.fits", work / f"{ref}.psf.fits", out, tel)
                seconds = time.perf_counter() - t0
                run_detect(out, work / f"{sci}.psf.fits", work / f"{sci}-{method}.ecsv", tel, image_name=sci)
                with fits.open(out) as hdul:
                    diff = hdul["DIFF"].data.astype(np.float64)
                    var = hdul["VAR"].data.astype(np.float64)
                    sci_plane = hdul["SCI"].data.astype(np.float64)
                    ref_plane = hdul["REF"].data.astype(np.float64)
                    fwhm_s, fwhm_r = float(hdul[0].header["FWHMSCI"]), float(hdul[0].header["FWHMREF"])
                    why = str(hdul[0].header.get("METHAUTO", ""))
                    if "CONVD" in hdul[0].header:
                        why += f"; {hdul[0].header['CONVD']} convolved ({hdul[0].header['CONVWHY']})"
                    if "NMOVERS" in hdul[0].header:
                        why += f"; {hdul[0].header['NMOVERS']} moved star(s) left out of the kernel fit"
                    if hdul[0].header.get("KERNERR"):
                        why += (
                            f"; kernel error from {hdul[0].header['KERRNSTR']} stars: size "
                            f"{hdul[0].header['KERRSIZ']:.2f} px², flux {hdul[0].header['KERRFLX']:.3f}"
                        )
                cands = len(Table.read(work / f"{sci}-{method}.ecsv", format="ascii.ecsv"))
                rows[f"rbflow {method}"].append(
                    {
                        "pair": f"{sci}-{ref}",
                        **difference_quality(diff, var, sci_plane, fwhm_s),
                        "cands": cands,
                        "time": seconds,
                    }
                )
                if method == "auto":
                    print(f"{sci} against {ref}: auto ran {why}", flush=True)
                if method == "zogy":
                    direct, seconds = sfft_direct(sci_plane, ref_plane, fwhm_s, fwhm_r)
                    rows["sfft direct"].append(
                        {
                            "pair": f"{sci}-{ref}",
                            **difference_quality(direct, var, sci_plane, fwhm_s),
                            "cands": None,
                            "time": seconds,
                        }
                    )
                    print(f"{sci} against {ref}: FWHM science {fwhm_s:.2f} px, reference {fwhm_r:.2f} px", flush=True)
    report(rows)


def report(rows: dict[str, list[dict[str, float]]]) -> None:
    """Print every pair, then totals over the single frames."""
    head = (
        f"{'pair':<20s} {'method':<12s} {'noise':>6s} {'blobs +/-':>10s} {'bright':>7s} {'peak':>6s} "
        f"{'cands':>6s} {'time s':>7s}"
    )
    print(head)
    print("-" * len(head))
    n_pairs = len(next(iter(rows.values())))
    for i in range(n_pairs):
        for method, rs in rows.items():
            r = rs[i]
            cands = "-" if r["cands"] is None else str(r["cands"])
            print(
                f"{r['pair']:<20s} {method:<12s} {r['noise']:6.2f} {r['blobs_pos']:>4d}/{r['blobs_neg']:<4d}"
                f"  {r['bright_hit']:>3d}/{r['bright_n']:<3d} {r['bright_peak']:6.1f} {cands:>6s} {r['time']:7.1f}"
            )
    print("-" * len(head))
    for method, rs in rows.items():
        single = [r for r in rs if not r["pair"].startswith("stack")]
        cands = "-" if single[0]["cands"] is None else str(sum(r["cands"] for r in single))
        hit, n = sum(r["bright_hit"] for r in single), sum(r["bright_n"] for r in single)
        print(
            f"{'5 single frames':<20s} {method:<12s} {np.mean([r['noise'] for r in single]):6.2f} "
            f"{sum(r['blobs_pos'] for r in single):>4d}/{sum(r['blobs_neg'] for r in single):<4d}"
            f"  {hit:>3d}/{n:<3d} {np.median([r['bright_peak'] for r in single]):6.1f} {cands:>6s} "
            f"{np.mean([r['time'] for r in single]):7.1f}"
        )
    print(
        "noise: std/robust std (mean over the frames); blobs: +/- regions beyond 5 sigma; bright: stars > 100 sigma "
        "with a >= 5 sigma residual within 2 FWHM; peak: median of their largest |residual| (sigma); time: mean"
    )


if __name__ == "__main__":
    main()
