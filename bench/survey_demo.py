"""The demo with a Pan-STARRS1 survey reference against the demo with its own deep reference (not a test).

What a run of the demo telescope does when each science frame is subtracted against a reference
made by the ``survey_reference`` rule (``frames.reference: {survey: ps1}``, :mod:`rbflow.survey`)
instead of the demo's own deep reference frame: candidates per frame, label balance, injection
recovery and the classifier's test metrics, side by side.

Data
----
The demo sky (``config/telescopes/demo.yaml``, the run's global seed) and a local stand-in of the
STScI PS1 image services on 127.0.0.1 (``tests/fakeservice.py``) answering ``ps1filenames.py``
(the listing table as PS1 writes it) and ``fitscut.cgi`` (linear FITS cutouts of stacks and of
their masks) for every demo field in its band. The PS1 sky of a field is rendered from the demo
field's *static* scene (:func:`rbflow.sky.field_scene`: stars and Sérsic galaxies as the demo
draws them, variable stars at their reference-epoch magnitude, no transient, no artefact) on one
projection cell per field (a TAN grid at the field centre, north up, :data:`PS1_SCALE` arcsec/px)
cut into two sky cells that overlap by :data:`CELL_OVERLAP` px at the field's centre row (so a
reference is a mosaic), with PS1-like properties per band (:data:`PS1`; Chambers et al. 2016,
arXiv:1612.05560: stack 5-sigma point-source depth, median stack seeing, single-exposure time;
about 12 exposures per band in a 3pi stack):

* a Moffat PSF (beta :data:`MOFFAT_BETA`) of the band's median stack FWHM, the same over the cell;
* counts at zeropoint ``25 + 2.5 log10(EXPTIME)`` (PS1 stack convention), sky subtracted;
* Gaussian sky noise setting the band's 5-sigma depth, plus the sources' photon noise (gain 1);
* pixels above :data:`SATURATION` counts in one exposure are NaN and flagged SAT (32) in the
  mask, as in a stack whose every input saturated there; pixels outside a sky cell are 0 and
  flagged BLANK (8).

The stacks' magnitudes are the demo's own (no colour term between the demo's r, g and PS1's):
what differs from the demo's reference is depth, pixel scale (resampling 0.25 -> 1.01 arcsec/px),
PSF (1.2-1.3 arcsec Moffat, sharper than the demo reference's 1.8 arcsec), noise and masks.

Arms
----
``own``
    The demo as it is (``snakemake --cores 2`` on ``telescopes: [demo]``); by default a finished
    run given with ``--own`` (e.g. the lead's run of main), else run here.
``ps1``
    A telescope ``psdemo`` (written into the run folder): ``demo.yaml`` without its ``sky`` block,
    its science frames ``resources/demo/frames/*_e*.fits`` (the demo's, made first, or copied from
    ``--frames-from``), ``frames.reference: {survey: ps1, url: <the local service>}``. The frames,
    injections, subtraction, detection, labels, training and test split follow the demo's: only the
    reference differs. One thing does too: a telescope with delivered frames has no truth tables,
    so the few candidates on the demo's asteroids (labelled true through the truth in the ``own``
    arm, ``match_kind == 'truth'``) are labelled false here; the table gives their number.

``--fields N`` runs a reduced demo (the first N fields) for both arms (the ``own`` arm then runs here).

Output: a table per arm (one column each), also written as ``compare.json`` in the run folder.

Usage::

    PYTHONPATH=src python bench/survey_demo.py --run /tmp/srv --own /path/to/finished/demo/run \\
        [--frames-from /path/to/finished/demo/run] [--fields N] [--cores 2]
    PYTHONPATH=src python bench/survey_demo.py --run /tmp/srv --own DIR --compare-only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import yaml
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from rbflow import sky
from rbflow.config import load_telescope
from rbflow.seeds import derive

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from fakeservice import FakeService  # noqa: E402 - the tests' local HTTP service, reused by path

#: PS1 pixel scale (arcsec/px) of stacks and warps.
PS1_SCALE = 0.25
#: Per band: single-exposure time (s), stack 5-sigma point-source depth (mag), median stack FWHM
#: (arcsec) (Chambers et al. 2016, Tables 2 and 11); stacks combine :data:`N_EXPOSURES` exposures.
PS1 = {
    "g": (43.0, 23.3, 1.31),
    "r": (40.0, 23.2, 1.19),
    "i": (45.0, 23.1, 1.11),
    "z": (30.0, 22.3, 1.07),
    "y": (30.0, 21.4, 1.02),
}
N_EXPOSURES = 12
#: Moffat beta of the PS1-like PSF.
MOFFAT_BETA = 3.0
#: Counts (e-, gain 1) of one exposure's pixel above which it saturates: a 1.2 arcsec r = 14 mag star's peak.
SATURATION = 6.0e4
#: Rows the two sky cells of a field share.
CELL_OVERLAP = 16
#: Margin (arcsec) of a field's projection cell around the cutouts rbflow asks for (pointing offsets).
CELL_MARGIN = 90.0
#: PS1 mask bits used.
BLANK, SAT = 8, 32


def _tan(ra0: float, dec0: float, crpix: tuple[float, float], scale: float) -> fits.Header:
    header = fits.Header()
    header.update(CTYPE1="RA---TAN", CTYPE2="DEC--TAN", CRVAL1=ra0, CRVAL2=dec0, CRPIX1=crpix[0], CRPIX2=crpix[1])
    header.update(CD1_1=-scale / 3600, CD2_2=scale / 3600, CD1_2=0.0, CD2_1=0.0)
    return header


def _moffat(dx: float, dy: float, fwhm: float, half: int) -> np.ndarray:
    """Unit-sum Moffat stamp (2h+1)^2 of FWHM ``fwhm`` px, centred (dx, dy) px off the central pixel."""
    alpha = fwhm / (2 * math.sqrt(2 ** (1 / MOFFAT_BETA) - 1))
    g = np.arange(-half, half + 1)
    r2 = (g[None, :] - dx) ** 2 + (g[:, None] - dy) ** 2
    stamp = (1 + r2 / alpha**2) ** -MOFFAT_BETA
    return stamp / stamp.sum()


def _add(image: np.ndarray, stamp: np.ndarray, ix: int, iy: int) -> None:
    h = stamp.shape[0] // 2
    ny, nx = image.shape
    x0, x1, y0, y1 = ix - h, ix + h + 1, iy - h, iy + h + 1
    cx0, cy0 = max(x0, 0), max(y0, 0)
    cx1, cy1 = min(x1, nx), min(y1, ny)
    if cx0 < cx1 and cy0 < cy1:
        image[cy0:cy1, cx0:cx1] += stamp[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]


def _sersic(dx, dy, r_eff, n, q, pa_px, half: int) -> np.ndarray:
    """Unit-sum Sérsic stamp (px units; 2x2 subsampled), the demo's parametrisation (rbflow.sky)."""
    sub = np.array([-0.25, 0.25])
    grid = (np.arange(-half, half + 1)[:, None] + sub[None, :]).ravel()
    gx, gy = grid[None, :] - dx, grid[:, None] - dy
    c, s = math.cos(pa_px), math.sin(pa_px)
    u, v = gx * c + gy * s, gy * c - gx * s
    r = np.sqrt(u**2 + (v / q) ** 2) / r_eff
    b = 2 * n - 1 / 3 + 4 / (405 * n) + 46 / (25515 * n**2)  # Ciotti & Bertin (1999), as rbflow.sky
    prof = np.exp(-b * (np.maximum(r, 1e-3) ** (1 / n) - 1))
    s2 = 2 * half + 1
    prof = prof.reshape(s2, 2, s2, 2).mean(axis=(1, 3))
    return prof / prof.sum()


class Ps1Sky:
    """The PS1 stand-in's sky: one projection cell per demo field, rendered on first use.

    Parameters
    ----------
    demo : dict
        The demo telescope (with its ``sky`` block).
    seed : int
        The run's global seed (the demo scene's and this sky's noise).
    cells : {1, 2}, optional
        Sky cells per field: one covering every frame, or two split at the field's centre row
        (each reference is then a mosaic; twice the reprojection time).
    """

    def __init__(self, demo: dict, *, seed: int, cells: int = 1):
        self.demo, self.seed, self.n_cells = demo, seed, cells
        self.fields = [f"fld{i:02d}" for i in range(demo["sky"]["fields"])]
        self.scenes = {f: sky.field_scene(demo, f, seed=seed) for f in self.fields}
        nx, ny = demo["sky"]["size"]
        diag = math.hypot(nx, ny) * demo["pixel_scale"]
        self.size = int(math.ceil((diag + 10.0 + 2 * CELL_MARGIN) / PS1_SCALE))
        self.cells: dict[str, tuple[np.ndarray, np.ndarray, fits.Header]] = {}
        self.lock = threading.Lock()
        self.files = {}
        for i, f in enumerate(self.fields):
            band = self.scenes[f].filter
            for cell in range(cells):
                base = f"/rings.v3.skycell/{1400 + i}/0{4 + cell}4/rings.v3.skycell.{1400 + i}.0{4 + cell}4"
                self.files[f"{base}.stk.{band}.unconv.fits"] = (f, cell, "stack")
                self.files[f"{base}.stk.{band}.unconv.mask.fits"] = (f, cell, "stack.mask")

    def header(self, field: str) -> fits.Header:
        scene = self.scenes[field]
        h = _tan(scene.ra_c, scene.dec_c, ((self.size + 1) / 2, (self.size + 1) / 2), PS1_SCALE)
        h["EXPTIME"] = N_EXPOSURES * PS1[scene.filter][0]
        return h

    def rows(self, cell: int) -> slice:
        """Rows (0-based) of sky cell 0 (south, or all) or 1 (north) in the projection cell."""
        if self.n_cells == 1:
            return slice(0, self.size)
        mid = self.size // 2
        return slice(0, mid + CELL_OVERLAP // 2) if cell == 0 else slice(mid - CELL_OVERLAP // 2, self.size)

    def render(self, field: str) -> tuple[np.ndarray, np.ndarray, fits.Header]:
        """The field's projection cell: stack counts (NaN where saturated), mask bits, header."""
        with self.lock:
            if field not in self.cells:
                self.cells[field] = self._render(field)
            return self.cells[field]

    def _render(self, field: str) -> tuple[np.ndarray, np.ndarray, fits.Header]:
        scene = self.scenes[field]
        t_exp, depth, fwhm_arcsec = PS1[scene.filter]
        header = self.header(field)
        exptime = header["EXPTIME"]
        zp = 25.0 + 2.5 * math.log10(exptime)
        fwhm = fwhm_arcsec / PS1_SCALE
        wcs = WCS(header)
        obj = scene.objects
        mag = np.asarray(obj["mags"][:, 0], dtype=float)  # the reference epoch: variables at their mean, no transient
        keep = np.isfinite(mag) & (np.asarray(obj["kind"]) != "transient")
        x, y = wcs.all_world2pix(np.asarray(obj["ra"]), np.asarray(obj["dec"]), 0)
        flux = 10 ** (-0.4 * (mag - zp))
        model = np.zeros((self.size, self.size))
        is_gal = np.asarray(obj["kind"]) == "galaxy"
        psf_half = int(math.ceil(4 * fwhm))
        for k in np.flatnonzero(keep):
            ix, iy = int(round(x[k])), int(round(y[k]))
            if not (-300 < ix < self.size + 300 and -300 < iy < self.size + 300):
                continue
            if is_gal[k]:
                r_eff = obj["r_eff"][k] / PS1_SCALE
                half = int(np.clip(math.ceil(3 * r_eff * math.sqrt(obj["sersic_n"][k]) + 3 * fwhm), 8, 256))
                prof = _sersic(
                    x[k] - ix,
                    y[k] - iy,
                    r_eff,
                    obj["sersic_n"][k],
                    obj["q"][k],
                    math.radians(obj["pa"][k] + 90.0),
                    half,
                )
                from scipy.signal import fftconvolve

                stamp = np.clip(fftconvolve(prof, _moffat(0.0, 0.0, fwhm, psf_half), mode="same"), 0, None)
                stamp /= stamp.sum()
            else:
                half = 24 if mag[k] > 18 else (48 if mag[k] > 14 else 160)
                stamp = _moffat(x[k] - ix, y[k] - iy, fwhm, half)
            _add(model, stamp * flux[k], ix, iy)
        rng = np.random.default_rng(derive(self.seed, field, "ps1"))
        nea = 1.0 / np.sum(_moffat(0.0, 0.0, fwhm, 4 * psf_half) ** 2)  # noise-equivalent area (px)
        sky_sigma = 10 ** (-0.4 * (depth - zp)) / (5.0 * math.sqrt(nea))
        image = model + rng.standard_normal(model.shape) * np.sqrt(sky_sigma**2 + np.clip(model, 0, None))
        saturated = model * (t_exp / exptime) > SATURATION
        image[saturated] = np.nan
        mask = np.where(saturated, SAT, 0).astype(np.int16)
        return image.astype(np.float32), mask, header

    def field_at(self, ra: float, dec: float) -> tuple[str, float, float] | None:
        """The field whose projection cell holds (ra, dec) deg, and its pixel position there."""
        for f in self.fields:
            x, y = WCS(self.header(f)).all_world2pix([[ra, dec]], 0)[0]
            if -0.5 <= x < self.size - 0.5 and -0.5 <= y < self.size - 0.5:
                return f, float(x), float(y)
        return None

    def routes(self) -> dict:
        """The fake STScI routes: ``/cgi-bin/ps1filenames.py`` and ``/cgi-bin/fitscut.cgi``."""

        def listing(q):
            lines = ["projcell subcell ra dec filter mjd type filename shortname badflag"]
            ra, dec = float(q["ra"]), float(q["dec"])
            where = self.field_at(ra, dec)
            if where is not None:
                field, _, y = where
                for name, (f, cell, kind) in self.files.items():
                    band = self.scenes[f].filter
                    rows = self.rows(cell)
                    if (
                        f != field
                        or kind != q["type"]
                        or band != q["filters"]
                        or not rows.start - 0.5 <= y < rows.stop - 0.5
                    ):
                        continue
                    proj, sub = name.split("/")[2:4]
                    short = name.rsplit("/", 1)[1]
                    lines.append(f"{proj} {sub} {ra:.6f} {dec:.6f} {band} 0 {kind} {name} {short} 0")
            return 200, "text/plain", ("\n".join(lines) + "\n").encode()

        def cutout(q):
            if q.get("red") not in self.files:
                return 404, "text/plain", b"no such file"
            field, cell, kind = self.files[q["red"]]
            image, mask, header = self.render(field)
            size = int(q["size"])
            x0, y0 = WCS(header).all_world2pix([[float(q["ra"]), float(q["dec"])]], 0)[0]
            lo_x, lo_y = int(round(x0 - (size - 1) / 2)), int(round(y0 - (size - 1) / 2))
            rows = self.rows(cell)
            src_y0, src_y1 = max(lo_y, rows.start), min(lo_y + size, rows.stop)
            src_x0, src_x1 = max(lo_x, 0), min(lo_x + size, self.size)
            out_header = header.copy()
            out_header["CRPIX1"] -= lo_x
            out_header["CRPIX2"] -= lo_y
            if kind == "stack.mask":
                del out_header["EXPTIME"]
                data = np.full((size, size), BLANK, np.int16)
                source = mask
            else:
                data = np.zeros((size, size), np.float32)
                source = image
            if src_x0 < src_x1 and src_y0 < src_y1:
                data[src_y0 - lo_y : src_y1 - lo_y, src_x0 - lo_x : src_x1 - lo_x] = source[
                    src_y0:src_y1, src_x0:src_x1
                ]
            buf = _fits(data, out_header)
            return 200, "application/fits", buf

        return {"/cgi-bin/ps1filenames.py": listing, "/cgi-bin/fitscut.cgi": cutout}


def _fits(data: np.ndarray, header: fits.Header) -> bytes:
    import io

    buf = io.BytesIO()
    fits.PrimaryHDU(data, header).writeto(buf)
    return buf.getvalue()


# --- the two arms ------------------------------------------------------------------------------


def _snakemake(run: Path, telescope: str, targets: list[str], log_name: str, *, cores: int) -> None:
    """Dry run, then run, the workflow in ``run`` for one telescope; the log goes to ``run/log_name``."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    base = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(run), "--cores", str(cores)]
    base += ["--config", f"telescopes=[{telescope}]"]
    dry = subprocess.run([*base, "-n", "--", *targets], env=env, capture_output=True, text=True)
    if dry.returncode != 0:
        raise SystemExit(f"snakemake dry run for {telescope} failed:\n{dry.stdout[-3000:]}{dry.stderr[-3000:]}")
    print(f"{telescope}: dry run ok; running (log {run / log_name})", flush=True)
    with open(run / log_name, "w") as log:
        done = subprocess.run([*base, "--", *targets], env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"snakemake for {telescope} failed: see {run / log_name}")


def prepare(run: Path, *, fields: int | None, frames_from: Path | None) -> tuple[dict, dict]:
    """The run folder: config, the demo telescope (``fields`` reduced), the demo frames copied from ``frames_from``."""
    demo_file = yaml.safe_load((REPO / "config" / "telescopes" / "demo.yaml").read_text())
    if fields:
        demo_file["sky"]["fields"] = fields
    (run / "telescopes").mkdir(parents=True, exist_ok=True)
    (run / "telescopes" / "demo.yaml").write_text(yaml.safe_dump(demo_file, sort_keys=False))
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config.update(telescopes=["demo"], telescope_dir=str(run / "telescopes"))
    (run / "config").mkdir(exist_ok=True)
    (run / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    demo = load_telescope(run / "telescopes" / "demo.yaml")
    if frames_from is not None:
        n = demo["sky"]["fields"]
        for sub in ("frames", "truth"):
            (run / "resources" / "demo" / sub).mkdir(parents=True, exist_ok=True)
            for path in sorted((frames_from / "resources" / "demo" / sub).glob("fld*")):
                if int(path.name[3:5]) < n and not (run / "resources" / "demo" / sub / path.name).exists():
                    shutil.copy2(path, run / "resources" / "demo" / sub / path.name)
        (run / "resources" / "demo" / "catalogues").mkdir(parents=True, exist_ok=True)
        cat = run / "resources" / "demo" / "catalogues" / "variables.ecsv"
        if not cat.exists():
            shutil.copy2(frames_from / "resources" / "demo" / "catalogues" / "variables.ecsv", cat)
    return demo_file, config


def psdemo_file(demo_file: dict, url: str) -> dict:
    """The ``psdemo`` telescope: the demo's instrument and stages, its science frames, a PS1 reference."""
    tel = {k: v for k, v in demo_file.items() if k not in ("sky", "description")}
    tel["name"] = "psdemo"
    tel["description"] = "The demo telescope's science frames with Pan-STARRS1 stack references (bench/survey_demo.py)."
    tel["frames"] = {
        "science": ["resources/demo/frames/fld*_e*.fits"],
        "reference": {"survey": "ps1", "url": url, "cache": "resources/ps1-cache", "timeout": 900.0},
    }
    return tel


# --- the comparison ----------------------------------------------------------------------------


def _table_len(path: Path) -> int:
    return len(Table.read(path, format="ascii.ecsv"))


#: What an observed candidate sits on in the demo's truth tables (rbflow.crossmatch.truth_kinds), grouped.
KIND_GROUPS = ("transient", "variable", "star", "galaxy", "science artefact", "reference artefact", "nothing")


def _candidates_on(root: Path, res: Path, frames: list[str], *, reference: bool) -> dict[str, int]:
    """Observed candidates of all frames by what they sit on (science truth; the own reference's truth too)."""
    from rbflow.crossmatch import truth_kinds

    counts = dict.fromkeys(KIND_GROUPS, 0)
    truth_dir = root / "resources" / "demo" / "truth"
    for frame in frames:
        cands = Table.read(res / "obs" / "detect" / f"{frame}.ecsv", format="ascii.ecsv")
        truth = Table.read(truth_dir / f"{frame}.ecsv", format="ascii.ecsv")
        ref = Table.read(truth_dir / f"{frame.rsplit('_', 1)[0]}_ref.ecsv", format="ascii.ecsv") if reference else None
        for kind in truth_kinds(cands, truth, radius=2.0, reference=ref):
            kind = str(kind)
            group = kind if kind in KIND_GROUPS else "nothing" if not kind else "science artefact"
            counts["reference artefact" if kind.startswith("ref:") else group] += 1
    return counts


def summarise(root: Path, telescope: str) -> dict:
    """Candidates, labels, injection recovery and test metrics of a finished run (``root``: its working folder)."""
    res = root / "results" / telescope
    out: dict = {}
    obs = {p.stem: _table_len(p) for p in sorted((res / "obs" / "detect").glob("*.ecsv"))}
    sim: dict[str, list[int]] = {}
    for p in sorted((res / "sim" / "detect").glob("*.ecsv")):
        sim.setdefault(p.stem.rsplit("_sim", 1)[0], []).append(_table_len(p))
    out["obs_candidates"] = obs
    out["obs_on"] = _candidates_on(root, res, list(obs), reference=telescope == "demo")
    out["sim_candidates"] = {f: float(np.mean(v)) for f, v in sim.items()}
    out["labels"], out["recovery"], out["test"], out["threshold"] = {}, {}, {}, None  # absent while running
    if (res / "training" / "labels.ecsv").exists():
        labels = Table.read(res / "training" / "labels.ecsv", format="ascii.ecsv")
        auto = np.asarray(labels["label_auto"]).astype(str)
        kind = np.asarray(np.ma.filled(labels["truth_kind"], "")).astype(str)
        out["labels"] = {k: int((auto == k).sum()) for k in ("true", "false", "unsorted")}
        out["labels"]["true_by_truth"] = int(((auto == "true") & (kind == "asteroid")).sum())
    if (res / "plots" / "checksim" / "summary.json").exists():
        summary = json.loads((res / "plots" / "checksim" / "summary.json").read_text())["bands"]
        keys = ("n_injected", "n_detected", "m50", "m90", "limiting_mag")
        out["recovery"] = {b: {k: summary[b][k] for k in keys} for b in summary}
    if (res / "model" / "metrics.json").exists():
        metrics = json.loads((res / "model" / "metrics.json").read_text())
        test = metrics["test"]
        out["test"] = {k: test[k] for k in ("roc_auc", "fnr_at_fpr1", "fpr_at_fnr1", "accuracy", "mcc", "counts")}
        out["threshold"] = metrics["threshold"]
    return out


def _fmt(v) -> str:
    if isinstance(v, dict) and "value" in v:
        return f"{v['value']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]"
    if v is None:
        return "-"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def table(arms: dict[str, dict]) -> str:
    """The comparison as aligned text: one row per quantity, one column per arm."""
    names = list(arms)
    rows: list[tuple[str, ...]] = [("", *names)]
    frames = sorted(set().union(*(a["obs_candidates"] for a in arms.values())))

    def cands(arm: dict, frame: str) -> str:
        obs, sim = arm["obs_candidates"].get(frame), arm["sim_candidates"].get(frame)
        return f"{_fmt(obs)} / {'-' if sim is None else f'{sim:.0f}'}"

    for f in frames:
        rows.append((f"candidates {f} (obs / sim mean)", *(cands(arms[n], f) for n in names)))
    tot = [sum(a["obs_candidates"].values()) for a in arms.values()]
    rows.append(("candidates, all frames (obs)", *map(str, tot)))
    for k in KIND_GROUPS:
        rows.append((f"  of which on {k}", *(str(arms[n]["obs_on"][k]) for n in names)))
    sim = [sum(a["sim_candidates"].values()) for a in arms.values()]
    rows.append(("candidates per realization, all frames (sim)", *(f"{v:.1f}" for v in sim)))
    for k in ("true", "false", "unsorted", "true_by_truth"):
        rows.append((f"labels {k}", *(_fmt(arms[n]["labels"].get(k)) for n in names)))
    bands = sorted(set().union(*(a["recovery"] for a in arms.values())))
    for b in bands:
        for k in ("n_injected", "n_detected", "m50", "m90", "limiting_mag"):
            rows.append((f"recovery {b} {k}", *(_fmt(arms[n]["recovery"].get(b, {}).get(k)) for n in names)))
    for k in ("roc_auc", "fnr_at_fpr1", "fpr_at_fnr1", "accuracy", "mcc"):
        rows.append((f"test {k} [95 % CI]", *(_fmt(arms[n]["test"].get(k)) for n in names)))
    counts = [a["test"].get("counts") for a in arms.values()]
    rows.append(("test stamps (real)", *(f"{c['n']} ({c['n_true']})" if c else "-" for c in counts)))
    rows.append(("threshold", *(_fmt(arms[n]["threshold"]) for n in names)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="working folder of the bench's runs")
    parser.add_argument("--own", type=Path, help="working folder of a finished demo run (the own-reference arm)")
    parser.add_argument("--frames-from", type=Path, help="working folder whose resources/demo frames to reuse")
    parser.add_argument("--fields", type=int, help="reduced demo: the first N fields (both arms run here)")
    parser.add_argument("--cells", type=int, default=1, choices=(1, 2), help="PS1 sky cells per field")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--compare-only", action="store_true", help="only compare finished runs")
    args = parser.parse_args(argv)
    run = args.run.resolve()
    run.mkdir(parents=True, exist_ok=True)
    if args.fields and args.own:
        parser.error("--fields runs both arms here: leave out --own")
    own = args.own.resolve() if args.own else run
    demo_file, config = prepare(run, fields=args.fields, frames_from=args.frames_from)
    if not args.compare_only:
        demo = load_telescope(run / "telescopes" / "demo.yaml")
        from rbflow.frames import frames_of

        frames = [f.path for f in frames_of(demo) if f.reference is not None]
        targets = [] if args.own is None else [*frames, "resources/demo/catalogues/variables.ecsv"]
        _snakemake(run, "demo", targets, "snakemake_demo.log", cores=args.cores)
        ps1 = Ps1Sky(demo, seed=config["seed"], cells=args.cells)
        with FakeService(ps1.routes()) as service:
            tel = psdemo_file(demo_file, f"{service.url}/cgi-bin")
            (run / "telescopes" / "psdemo.yaml").write_text(yaml.safe_dump(tel, sort_keys=False))
            _snakemake(run, "psdemo", [], "snakemake_psdemo.log", cores=args.cores)
    arms = {"own reference": summarise(own, "demo"), "PS1 stack reference": summarise(run, "psdemo")}
    (run / "compare.json").write_text(json.dumps(arms, indent=1))
    print(f"demo sky, seed {config['seed']}: own = {own}, ps1 = {run} (fake PS1 service rendered from the demo scene)")
    print(table(arms))


if __name__ == "__main__":
    main()
