"""Accuracy and speed of rbflow.psf on demo-sky frames (prints; not a test).

For each frame: the wall and CPU time of :func:`rbflow.psf.build_psf`, and at the frame centre
and four corners (``--corner`` px from the edges) the FWHM of the model against the FWHM of the
true pixel-integrated PSF (both as the diameter of the area above half maximum, on a 1/8 px grid)
and the max |model - truth| / peak of the truth on a 25 px stamp. Then, on isolated unsaturated
15-17.5 mag stars, the max |star - fitted PSF| / peak with the model and, as the photon-noise
floor, with the true PSF (flux and local sky fitted at the true position in both cases).

The truth is rendered by ``rbflow.sky._psf_stamps``, the function that draws the stars.

Usage: ``python bench/psf.py [--seed 1] [--corner 60] [--artefacts] [frame ...]``
(default frames: fld00_r_ref fld00_r_e1 fld01_g_e2; artefacts off unless ``--artefacts``).

``python bench/psf.py --decam DIR`` builds the PSF of the real DECam cut-outs in ``DIR``
(``../shared/data/decam-sfft``; no truth there): per frame the PSF stars per cell, how each
cell's ePSF was made and the median model FWHM against the header's ``FWHM`` (the survey
pipeline's, on the full CCD).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from rbflow.config import load_telescope
from rbflow.frames import frame_hdu, frame_info
from rbflow.io import Image, read_image
from rbflow.psf import build_psf
from rbflow.sky import _moffat_alphas, _moffat_grid, _psf_stamps, frame_conditions, simulate_frame

REPO = Path(__file__).resolve().parents[1]
SIZE = 25
FINE = 8  # sub-pixel steps per pixel of the FWHM grid


def true_stamp(cond, x: float, y: float, *, centred: bool = False) -> np.ndarray:
    """True pixel-integrated PSF at (x, y) on a SIZE stamp, laid out like PSFModel.stamp."""
    fw, ell, th = (np.atleast_1d(v) for v in cond.psf_at(x, y))
    dx, dy = (0.0, 0.0) if centred else (x - np.round(x), y - np.round(y))
    st = _psf_stamps(np.array([dx]), np.array([dy]), fw, ell, th, cond.beta, SIZE // 2)[0]
    return st / st.sum()


def area_fwhm(fine: np.ndarray) -> float:
    """Diameter (px) of the circle with the area above half maximum of a 1/FINE px grid."""
    return float(2 * np.sqrt(np.count_nonzero(fine >= fine.max() / 2) / FINE**2 / np.pi))


def true_fwhm(cond, x: float, y: float, *, sub: int = 10) -> float:
    """FWHM of the true pixel-integrated PSF at (x, y), measured like PSFModel.fwhm."""
    fw, ell, th = cond.psf_at(x, y)
    aa, ab = _moffat_alphas(np.atleast_1d(fw), np.atleast_1d(ell), cond.beta)
    off = np.arange(-8 * FINE, 8 * FINE + 1) / FINE
    s = (np.arange(sub) + 0.5) / sub - 0.5
    u = (off[:, None] + s[None, :]).ravel()  # pixel integral: mean over sub x sub samples
    prof = _moffat_grid(u[None, :], u[:, None], np.cos(th), np.sin(th), aa[0], ab[0], cond.beta)
    n = off.size
    return area_fwhm(prof.reshape(n, sub, n, sub).mean(axis=(1, 3)))


def fit_residual(data: np.ndarray, x: float, y: float, psf: np.ndarray, sky_var: float, gain: float) -> float:
    """Max |star - (flux * psf + sky)| / (flux * peak) within 2 FWHM-ish (r <= 5 px), weighted LSQ fit."""
    h = SIZE // 2
    ix, iy = int(round(x)), int(round(y))
    cut = data[iy - h : iy + h + 1, ix - h : ix + h + 1].astype(float)
    a = np.column_stack([psf.ravel(), np.ones(psf.size)])
    w = 1 / (sky_var + np.maximum(cut.ravel() - np.median(cut), 0) / gain)
    coef = np.linalg.lstsq(a * np.sqrt(w)[:, None], cut.ravel() * np.sqrt(w), rcond=None)[0]
    res = cut - (coef[0] * psf + coef[1])
    return float(np.abs(res).max() / (coef[0] * psf.max()))


def bench_frame(tel: dict, frame: str, *, seed: int, corner: float) -> None:
    hdu, truth = simulate_frame(tel, frame, seed=seed)
    cond = frame_conditions(tel, frame, seed=seed)
    info = frame_info(hdu.header, tel)
    image = Image(hdu.data, hdu.header, None, None)
    t0, c0 = time.perf_counter(), time.process_time()
    model = build_psf(image, info, tel["psf"], pixel_scale=tel["pixel_scale"], name=frame)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    ny, nx = hdu.data.shape
    print(
        f"\n{frame}: seeing {cond.seeing:.2f} px, build_psf {wall:.2f} s wall, {cpu:.2f} s CPU, "
        f"stars per cell {list(model.n_stars)}"
    )
    t0 = time.perf_counter()
    for _ in range(100):
        model.fwhm(300.3, 700.7)
    print(f"  PSFModel.fwhm: {(time.perf_counter() - t0) * 10:.2f} ms per call")
    print("  position        FWHM model    true   error   max|model-true|/peak")
    for label, (x, y) in {
        "centre": ((nx - 1) / 2, (ny - 1) / 2),
        "lower-left": (corner, corner),
        "lower-right": (nx - 1 - corner, corner),
        "upper-left": (corner, ny - 1 - corner),
        "upper-right": (nx - 1 - corner, ny - 1 - corner),
    }.items():
        x, y = x + 0.3, y - 0.2  # a sub-pixel offset exercises the resampling too
        f_model, f_true = model.fwhm(x, y), true_fwhm(cond, x, y)
        ref = true_stamp(cond, x, y)
        res = np.abs(model.stamp(x, y, SIZE) - ref).max() / ref.max()
        print(
            f"  {label:13s}  {f_model:6.3f}   {f_true:6.3f}  {100 * (f_model / f_true - 1):+5.1f} %   "
            f"{100 * res:5.2f} %"
        )

    stars = truth[(truth["kind"] == "star") & ~truth["saturated"] & (truth["mag"] > 15) & (truth["mag"] < 17.5)]
    h = SIZE // 2 + 2
    inside = (stars["x"] > h) & (stars["x"] < nx - 1 - h) & (stars["y"] > h) & (stars["y"] < ny - 1 - h)
    stars = stars[inside]
    allxy = np.column_stack([truth["x"], truth["y"]])
    bright = truth["mag"] < np.asarray(stars["mag"])[:, None] + 5  # neighbours within 5 mag
    res_model, res_true = [], []
    sky_var = float(np.median(hdu.data)) / info.gain + (info.read_noise / info.gain) ** 2
    for k, row in enumerate(stars):
        d = np.hypot(allxy[:, 0] - row["x"], allxy[:, 1] - row["y"])
        if np.count_nonzero((d < 15) & bright[k]) > 1:
            continue
        x, y = float(row["x"]), float(row["y"])
        res_model.append(fit_residual(hdu.data, x, y, model.stamp(x, y, SIZE), sky_var, info.gain))
        res_true.append(fit_residual(hdu.data, x, y, true_stamp(cond, x, y), sky_var, info.gain))
    if res_model:
        rm, rt = 100 * np.array(res_model), 100 * np.array(res_true)
        print(
            f"  {rm.size} isolated 15-17.5 mag stars, max|star - fit|/peak: model median {np.median(rm):.2f} % "
            f"(max {rm.max():.2f} %), true PSF (noise floor) median {np.median(rt):.2f} % (max {rt.max():.2f} %)"
        )


def bench_decam(folder: Path) -> None:
    """PSF stars, cell sources and median FWHM of the model against the header FWHM of real DECam frames."""
    tel = load_telescope(REPO / "config" / "telescopes" / "decam.yaml")
    for path in sorted(folder.glob("DEC-OBS*.fits")):
        image = read_image(path, hdu=frame_hdu(tel))
        info = frame_info(image.header, tel, path=path)
        model = build_psf(image, info, tel["psf"], pixel_scale=tel["pixel_scale"], name=path.name)
        fw = float(np.median(model.cell_fwhm))
        head = float(image.header["FWHM"])
        print(
            f"{path.name}: stars per cell {list(model.n_stars)} ({sorted(set(model.sources))}), "
            f"FWHM model {fw:.2f} px, header {head:.2f} px ({100 * (fw / head - 1):+.1f} %)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("frames", nargs="*", default=["fld00_r_ref", "fld00_r_e1", "fld01_g_e2"])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--corner", type=float, default=60.0, help="distance of the corner probes from the edges (px)")
    parser.add_argument(
        "--artefacts", action="store_true", help="keep cosmic rays, hot pixels, bad columns, satellites"
    )
    parser.add_argument("--decam", type=Path, help="folder of the real DECam cut-outs (instead of demo frames)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.decam:
        bench_decam(args.decam)
        return
    tel = load_telescope(REPO / "config" / "telescopes" / "demo.yaml")
    if not args.artefacts:
        for key in ("cosmic_rays", "hot_pixels", "bad_columns", "satellite_rate"):
            tel["sky"][key] = 0
    for frame in args.frames:
        bench_frame(tel, frame, seed=args.seed, corner=args.corner)


if __name__ == "__main__":
    main()
