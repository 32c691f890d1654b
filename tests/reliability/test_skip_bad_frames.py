"""One bad frame does not lose the night: `on_bad_frame: stop` fails naming the file, `skip` goes on without it.

Each test runs Snakemake on the tiny telescope (tests/data/telescopes/tiny.yaml) in a fresh working
directory whose frames are written in-process first (rbflow.sky), some of them broken on purpose.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from astropy.io import fits
from astropy.table import Table
from helpers import REPO, SNAKEMAKE, TINY

from rbflow.config import load_telescope
from rbflow.frames import frames_of
from rbflow.sky import write_frame

pytestmark = pytest.mark.workflow

SEED = 20261124  # config/config.yaml's seed: the frames are those the sky_frame rule would write
BAD = "fld00_r_e2"  # truncated: the read check fails
NO_WCS = "fld01_g_e1"  # WCS cards removed: the wcs check fails


def _workdir(tmp_path: Path, broken: dict[str, str]) -> Path:
    """A working directory with the tiny telescope's frames written, the frames of ``broken`` broken.

    ``broken`` maps a frame name to ``"truncate"`` or ``"no_wcs"``.
    """
    work = tmp_path / "work"
    work.mkdir()
    (work / "config").symlink_to(REPO / "config")
    tel = load_telescope(REPO / "tests/data/telescopes/tiny.yaml")
    for spec in frames_of(tel):
        path = work / spec.path
        write_frame(tel, spec.name, path, work / "resources/tiny/truth" / f"{spec.name}.ecsv", seed=SEED)
        how = broken.get(spec.name)
        if how == "truncate":
            path.write_bytes(path.read_bytes()[:4000])
        elif how == "no_wcs":
            with fits.open(path, mode="update") as hdul:
                for key in (
                    "CTYPE1",
                    "CTYPE2",
                    "CRVAL1",
                    "CRVAL2",
                    "CRPIX1",
                    "CRPIX2",
                    "CD1_1",
                    "CD1_2",
                    "CD2_1",
                    "CD2_2",
                    "CUNIT1",
                    "CUNIT2",
                    "WCSAXES",
                    "RADESYS",
                ):
                    hdul[0].header.remove(key, ignore_missing=True)
    return work


def _snakemake(work: Path, *targets: str, config: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run Snakemake on ``targets``; ``config`` adds key=value entries to the tiny telescope's."""
    return subprocess.run(
        [*SNAKEMAKE, *targets, "--cores", "2", *TINY, *config], cwd=work, capture_output=True, text=True, timeout=600
    )


def _temporary_files(root: Path) -> list[Path]:
    """Leftovers of interrupted atomic writes (rbflow.io.atomic_path, rbflow.cutouts)."""
    return [p for p in root.rglob(".*") if ".tmp" in p.name or ".old-" in p.name]


def test_stop_fails_naming_the_file_and_keeps_other_outputs(tmp_path):
    work = _workdir(tmp_path, {BAD: "truncate"})
    good = [f"results/tiny/psf/{name}.fits" for name in ("fld00_r_ref", "fld00_r_e1", "fld01_g_ref")]
    proc = _snakemake(work, *good)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = {p: (work / p).read_bytes() for p in good}

    proc = _snakemake(work, "sim")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"resources/tiny/frames/{BAD}.fits' is not a readable FITS file" in out, out[-3000:]
    assert "copy it again from the source" in out
    assert "copy it again" in (work / f"logs/tiny/psf/{BAD}.log").read_text()
    assert not (work / f"results/tiny/psf/{BAD}.fits").exists()
    assert {p: (work / p).read_bytes() for p in good} == before  # other frames' outputs intact
    assert not _temporary_files(work / "results")
    assert not (work / "results/tiny/bad_frames.ecsv").exists()  # stop: no validation in the DAG


def test_skip_lists_bad_frames_and_runs_the_aggregates_on_the_others(tmp_path):
    work = _workdir(tmp_path, {BAD: "truncate", NO_WCS: "no_wcs"})
    proc = _snakemake(work, "checksim", config=("on_bad_frame=skip",))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    bad = Table.read(work / "results/tiny/bad_frames.ecsv")
    assert sorted(bad["frame"]) == sorted([BAD, NO_WCS])
    reasons = {row["frame"]: row for row in bad}
    assert reasons[BAD]["stage"] == "read" and reasons[BAD]["file"].endswith(f"{BAD}.fits")
    assert "not a readable FITS file" in reasons[BAD]["message"] and "copy it again" in reasons[BAD]["message"]
    assert reasons[NO_WCS]["stage"] == "wcs" and f"{NO_WCS}.fits" in reasons[NO_WCS]["message"]
    assert "solve its astrometry" in reasons[NO_WCS]["message"]
    status = json.loads((work / "results/tiny/validate/fld00_r_e1.json").read_text())
    assert status["ok"] and len(status["stars"]) >= 3

    # the aggregates ran on the good frames only
    labels = Table.read(work / "results/tiny/training/labels.ecsv")
    frames = {str(cid).split("_sim")[0] for cid in labels["id"]}  # ids are {frame}_sim{k}_{n}
    assert frames == {"fld00_r_e1", "fld01_g_e2"}
    summary = json.loads((work / "results/tiny/plots/checksim/summary.json").read_text())
    assert summary
    for name in (BAD, NO_WCS):
        assert not (work / f"results/tiny/psf/{name}.fits").exists()
        assert not list((work / "results/tiny/sim").rglob(f"{name}_sim*"))
    assert not _temporary_files(work / "results")
