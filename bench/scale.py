"""Peak memory of the per-frame chain on one large frame pair against a 4 GB budget (not a test).

A demo-like telescope (config/telescopes/demo.yaml, one field, one epoch, frames of SIZE² pixels,
the demo's star and galaxy densities) is written to a working folder; then every stage runs in a
child process of its own under ``/usr/bin/time -v``, calling the function its Snakemake script
calls, with the same inputs and outputs as the workflow:

    sky (reference, science) -> psf (reference, science) -> inject -> subtract -> detect -> cutouts

and the peak resident set size (RSS) of each child is printed against the budget. The sky stages
only make the inputs (a real survey reads its frames); they are listed for completeness.

Usage: ``python bench/scale.py [--size 4096] [--budget-gb 4] [--work DIR]`` (default: a temporary
folder, removed at the end). ``/usr/bin/time`` comes with Debian's ``time`` package
(``apt-get install -y time``).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
NAME = "scale"
SEED = 20261124
REF, SCI = "fld00_r_ref", "fld00_r_e1"
IMAGE = f"{SCI}_sim0"
STAGES = ("sky_ref", "sky_sci", "psf_ref", "psf_sci", "inject", "subtract", "detect", "cutouts")
_RSS = re.compile(r"Maximum resident set size \(kbytes\): (\d+)")
_WALL = re.compile(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)")
_NOTE = re.compile(r"^note: (.*)$", re.MULTILINE)


def _telescope(work: Path, size: int) -> dict[str, Any]:
    """The demo telescope with one field, one epoch and frames of ``size``² (validated)."""
    from rbflow.config import load_telescope

    path = work / f"{NAME}.yaml"
    if not path.exists():
        tel = yaml.safe_load((REPO / "config/telescopes/demo.yaml").read_text())
        tel["name"] = NAME
        tel["sky"].update({"fields": 1, "epochs": 1, "size": [size, size]})
        path.write_text(yaml.safe_dump(tel))
    return load_telescope(path)


def run_stage(stage: str, work: Path, size: int) -> None:
    """Run one stage in this process (the child's side), inputs and outputs under ``work``."""
    import os

    from rbflow.cutouts import write_cutouts
    from rbflow.detect import run_detect
    from rbflow.inject import run_inject
    from rbflow.psf import run_psf
    from rbflow.seeds import derive
    from rbflow.sky import write_frame
    from rbflow.subtract import run_subtract

    tel = _telescope(work, size)
    os.chdir(work)  # frames live under resources/, as in a workflow run
    res, frames = Path("results") / NAME, Path("resources") / NAME / "frames"
    if stage in ("sky_ref", "sky_sci"):
        frame = REF if stage == "sky_ref" else SCI
        truth = Path("resources") / NAME / "truth" / f"{frame}.ecsv"
        write_frame(tel, frame, frames / f"{frame}.fits", truth, seed=SEED)
    elif stage in ("psf_ref", "psf_sci"):
        frame = REF if stage == "psf_ref" else SCI
        run_psf(frames / f"{frame}.fits", res / "psf" / f"{frame}.fits", res / "psf" / f"{frame}.png", tel)
    elif stage == "inject":
        run_inject(
            frames / f"{SCI}.fits",
            res / "psf" / f"{SCI}.fits",
            res / "sim/inject" / f"{IMAGE}.fits",
            res / "sim/inject" / f"{IMAGE}.ecsv",
            res / "sim/inject" / f"{IMAGE}.list",
            tel,
            frame=SCI,
            realization=0,
            seed=derive(SEED, NAME, SCI, "0", "inject"),
            reference_path=frames / f"{REF}.fits",
        )
    elif stage == "subtract":
        run_subtract(
            res / "sim/inject" / f"{IMAGE}.fits",
            frames / f"{REF}.fits",
            res / "psf" / f"{SCI}.fits",
            res / "psf" / f"{REF}.fits",
            res / "sim/subtract" / f"{IMAGE}.fits",
            tel,
        )
    elif stage == "detect":
        run_detect(
            res / "sim/subtract" / f"{IMAGE}.fits",
            res / "psf" / f"{SCI}.fits",
            res / "sim/detect" / f"{IMAGE}.ecsv",
            tel,
            image_name=IMAGE,
        )
    elif stage == "cutouts":
        cands = write_cutouts(
            res / "sim/subtract" / f"{IMAGE}.fits",
            res / "sim/detect" / f"{IMAGE}.ecsv",
            res / "sim/cutouts" / IMAGE,
            size=tel["cutout"]["size"],
            png=tel["cutout"]["png"],
        )
        print(f"note: {len(cands)} candidates cut out", file=sys.stderr)
    else:
        raise ValueError(f"unknown stage {stage!r}: one of {', '.join(STAGES)}")


def measure(stage: str, work: Path, size: int) -> tuple[float, str, str]:
    """Run ``stage`` in a child under ``/usr/bin/time -v``: (peak RSS in MiB, wall time, the child's note)."""
    cmd = ["/usr/bin/time", "-v", sys.executable, __file__, "--stage", stage, "--work", str(work), "--size", str(size)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"stage {stage} failed:\n{proc.stderr[-3000:]}")
    note = _NOTE.search(proc.stderr)
    return int(_RSS.search(proc.stderr).group(1)) / 1024, _WALL.search(proc.stderr).group(1), note[1] if note else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4096, help="frame side (px)")
    parser.add_argument("--budget-gb", type=float, default=4.0, help="peak RSS budget per stage (GB of 1e9 bytes)")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # the child's side
    args = parser.parse_args()
    if args.stage:
        run_stage(args.stage, args.work, args.size)
        return
    with tempfile.TemporaryDirectory(prefix="rbflow-scale-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        budget = args.budget_gb * 1e9 / 2**20  # MiB
        print(f"frame {args.size}x{args.size}, budget {args.budget_gb:g} GB = {budget:.0f} MiB peak RSS per stage")
        print(f"{'stage':<10} {'wall':>9} {'peak RSS':>12} {'of budget':>10}")
        worst = 0.0
        for stage in STAGES:
            rss, wall, note = measure(stage, work, args.size)
            chain = stage not in ("sky_ref", "sky_sci")
            worst = max(worst, rss) if chain else worst
            verdict = ("ok" if rss <= budget else "OVER") if chain else "(input)"
            print(f"{stage:<10} {wall:>9} {rss:>8.0f} MiB {100 * rss / budget:>9.0f}% {verdict} {note}", flush=True)
        print(f"largest stage of the chain: {worst:.0f} MiB ({'within' if worst <= budget else 'OVER'} the budget)")


if __name__ == "__main__":
    main()
