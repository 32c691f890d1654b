"""Tests of rbflow.checkinfer: test-split predictions, operating points, outputs and errors."""

from __future__ import annotations

import json
import math
import runpy
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from astropy.io import fits
from astropy.table import Table
from helpers import synthetic_stamps

from rbflow.checkinfer import FILES, evaluate_test_split, kind_table, run_checkinfer
from rbflow.datacube import NORMALISATION, normalise
from rbflow.errors import InputError
from rbflow.train import train

torch.set_num_threads(2)

CFG = {"widths": [8, 16, 32], "epochs": 2, "batch_size": 64, "lr": 0.01, "patience": 3, "device": "cpu"}
N, N_FRAMES, PSF_FWHM = 500, 6, 3.0


#: Truth kinds of the synthetic false stamps, by index (the trues sit on their injected source).
FALSE_KINDS = ["star", "cosmic_ray", "ref:bleed", ""]


def _write_cube(
    path: Path, X: np.ndarray, y: np.ndarray, frames: np.ndarray, mag: np.ndarray, truth_kind: np.ndarray
) -> Path:
    meta = {
        "cutout_size": 31,
        "stamp_size": 31,
        "crop": None,
        "channels": ["SCI", "REF", "DIFF"],
        "normalisation": NORMALISATION,
    }
    images = np.array([f"{f}_sim0" for f in frames])
    np.savez(
        path,
        X=normalise(X),
        y=y,
        ids=np.array([f"{im}_{i}" for i, im in enumerate(images)]),
        image=images,
        frame=frames,
        mag=mag,
        snr=np.linspace(3, 60, len(y)),
        truth_kind=truth_kind,
        channels=np.array(meta["channels"]),
        meta=np.asarray(json.dumps(meta)),
    )
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model on synthetic stamps, plus cutout files, injection truth and a crossmatch table."""
    root = tmp_path_factory.mktemp("checkinfer")
    X, y = synthetic_stamps(N, seed=5)
    frames = np.array([f"f{i % N_FRAMES:02d}" for i in range(N)])
    mag = np.where(y == 1, np.random.default_rng(1).uniform(18.0, 22.0, N), np.nan)
    kinds = np.where(y == 1, "injected", np.array(FALSE_KINDS)[(np.arange(N) // N_FRAMES) % len(FALSE_KINDS)])
    cube = _write_cube(root / "cube.npz", X, y, frames, mag, kinds)
    meta = train(cube, root / "model", CFG, seed=3, checkpoint_dir=root / "ckpt")
    # cutout files of the test frames (FWHM 1.0x the PSF for trues, 2.0x for falses) and truth tables
    test = np.isin(frames, meta["split"]["test"])
    for i in np.flatnonzero(test):
        sub = "true" if y[i] else "false"
        hdus = [
            fits.PrimaryHDU(
                header=fits.Header({"ID": f"{frames[i]}_sim0_{i}", "FWHM": PSF_FWHM * (1.0 if y[i] else 2.0)})
            )
        ]
        hdus += [fits.ImageHDU(X[i, c], name=name) for c, name in enumerate(("SCI", "REF", "DIFF"))]
        (root / "training" / sub).mkdir(parents=True, exist_ok=True)
        fits.HDUList(hdus).writeto(root / "training" / sub / f"{frames[i]}_sim0_{i}.fits")
    (root / "sim" / "inject").mkdir(parents=True)
    for f in meta["split"]["test"]:
        Table({"psf_fwhm": [PSF_FWHM, PSF_FWHM]}).write(root / "sim" / "inject" / f"{f}_sim0.ecsv")
    xm = Table(
        {
            "mag": [18.2, 19.0, 21.7, 21.9],
            "detected": [True, True, True, False],
            "image": [f"{meta['split']['test'][0]}_sim0"] * 3 + [f"{meta['split']['train'][0]}_sim0"],
        }
    )
    xm.write(root / "crossmatch.ecsv")
    return root, meta, frames, y


def test_predictions_are_test_split_only(trained):
    root, meta, frames, y = trained
    table = evaluate_test_split(root / "cube.npz", root / "model" / "model.pt")
    assert set(table["frame"]) == set(meta["split"]["test"])
    assert not set(table["frame"]) & (set(meta["split"]["train"]) | set(meta["split"]["val"]))
    assert len(table) == np.isin(frames, meta["split"]["test"]).sum()
    assert np.array_equal(table["y"], y[np.isin(frames, meta["split"]["test"])])
    assert np.allclose(table["label0"] + table["label1"], 1.0)
    assert np.all(np.isnan(table["mag"][table["y"] == 0]))


def test_run_checkinfer_outputs_and_consistency(trained, tmp_path):
    root, meta, _, _ = trained
    out = tmp_path / "out"
    summary = run_checkinfer(
        root / "cube.npz",
        root / "model" / "model.pt",
        out,
        cutout_dirs=[root / "training" / "true", root / "training" / "false"],
        truth_paths=sorted((root / "sim" / "inject").glob("*.ecsv")),
        crossmatch_paths=[root / "crossmatch.ecsv"],
    )
    for name in FILES.values():
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["threshold"] == {"value": meta["threshold"], "source": "model.json"}
    # hand computation from the written predictions
    pred = Table.read(out / "test_predictions.ecsv")
    yt, p, t = np.asarray(pred["y"]), np.asarray(pred["label1"]), meta["threshold"]
    at = summary["at_threshold"]
    assert at["fn"] == np.sum((yt == 1) & (p < t)) and at["fp"] == np.sum((yt == 0) & (p >= t))
    assert at["tp"] + at["fn"] == summary["counts"]["n_true"] == yt.sum()
    assert math.isclose(at["fnr"], np.mean(p[yt == 1] < t)) and math.isclose(at["fpr"], np.mean(p[yt == 0] >= t))
    assert math.isclose(at["accuracy"], np.mean((p >= t) == yt))
    # the MCC and accuracy at the threshold equal the bootstrap block's point values
    assert math.isclose(at["mcc"], summary["bootstrap"]["mcc"]["value"], abs_tol=1e-12)
    assert math.isclose(at["accuracy"], summary["bootstrap"]["accuracy"]["value"])
    # the FNR-1 % threshold is the largest with at most 1 % of trues below it
    t1 = summary["fnr_1pct"]["threshold"]
    assert np.mean(p[yt == 1] < t1) <= 0.01 and np.mean(p[yt == 1] <= t1) > 0.01
    t2 = summary["fpr_1pct"]["threshold"]
    assert np.mean(p[yt == 0] >= t2) <= 0.01 and np.mean(p[yt == 0] >= np.nextafter(t2, -1)) > 0.01
    eff = summary["efficiency"]["0.5"]
    assert eff["n_kept"] == np.sum((yt == 1) & (p >= 0.5)) and eff["n_injected"] == yt.sum()
    assert "fwhm_ratio.png" in summary["files"]
    # every test candidate has a cutout (FWHM in its header) and a truth table of its image
    assert summary["counts"]["n_fwhm_ratio"] == summary["counts"]["n"]
    # the per-kind table, by hand from the predictions: every kind of the cube, both labels where present
    kinds = Table.read(out / "kinds.ecsv")
    kinds["kind"] = np.asarray(kinds["kind"].filled("")).astype(str)  # ECSV reads '' back as masked
    pk = np.asarray(np.ma.filled(pred["truth_kind"], "")).astype(str)
    assert set(zip(kinds["kind"], kinds["label"])) == {("injected", "true")} | {(k, "false") for k in FALSE_KINDS}
    for row in kinds:
        sel = (pk == row["kind"]) & (yt == (row["label"] == "true"))
        assert row["n"] == sel.sum() and row["n_kept"] == np.sum(p[sel] >= t)
        assert math.isclose(row["median_p_real"], np.median(p[sel])) and math.isclose(
            row["frac_kept"], np.mean(p[sel] >= t)
        )
    assert list(kinds["label"]) == ["false"] * len(FALSE_KINDS) + ["true"]
    assert list(kinds["frac_kept"][:-1]) == sorted(kinds["frac_kept"][:-1], reverse=True)  # most kept bogus first
    assert [r["kind"] for r in summary["kinds"]] == list(kinds["kind"])
    page = (out / "kinds.html").read_text()
    assert "ref:bleed" in page and "(none)" in page and page.count("<tr") == len(kinds) + 1


def test_threshold_argument_and_skipped_fwhm(trained, tmp_path, caplog):
    root, _, _, _ = trained
    with caplog.at_level("WARNING", logger="rbflow.checkinfer"):
        summary = run_checkinfer(root / "cube.npz", root / "model" / "model.pt", tmp_path, threshold=0.3)
    assert summary["threshold"] == {"value": 0.3, "source": "argument"}
    # without cutouts and truth tables the FWHM-ratio plot is still written (it is a declared output), empty
    assert (tmp_path / FILES["fwhm_ratio"]).stat().st_size > 0 and summary["counts"]["n_fwhm_ratio"] == 0
    assert "FWHM ratio plot empty" in caplog.text
    with pytest.raises(InputError, match="cutout folder .*nowhere.* does not exist"):
        run_checkinfer(root / "cube.npz", root / "model" / "model.pt", tmp_path, cutout_dirs=[root / "nowhere"])


def test_errors(trained, tmp_path):
    root, meta, frames, y = trained
    cube = np.load(root / "cube.npz")
    model = root / "model" / "model.pt"
    # no stamp of the test frames
    other = {k: cube[k] for k in cube.files}
    other["frame"] = np.array([f"x{f}" for f in frames])
    np.savez(tmp_path / "other.npz", **other)
    with pytest.raises(InputError, match="holds no stamp of the test frames"):
        evaluate_test_split(tmp_path / "other.npz", model)
    # a single class in the test frames
    single = {k: cube[k] for k in cube.files}
    single["y"] = np.where(np.isin(frames, meta["split"]["test"]), 1, y)
    np.savez(tmp_path / "single.npz", **single)
    with pytest.raises(InputError, match="only true stamps"):
        run_checkinfer(tmp_path / "single.npz", model, tmp_path / "out")
    # a model.json without a split
    (tmp_path / "m").mkdir()
    shutil.copy(model, tmp_path / "m" / "model.pt")
    bad = {**meta, "split": {}}
    (tmp_path / "m" / "model.json").write_text(json.dumps(bad))
    with pytest.raises(InputError, match="no test frames"):
        evaluate_test_split(root / "cube.npz", tmp_path / "m" / "model.pt")


def test_checkinfer_script_wiring(trained, tmp_path):
    """scripts/checkinfer_plots.py passes every file the rule declares to run_checkinfer."""
    root, _, _, _ = trained
    out = tmp_path / "plots" / "checkinfer"
    sm = SimpleNamespace(
        input=SimpleNamespace(
            datacube=str(root / "cube.npz"),
            model=str(root / "model" / "model.pt"),
            cutouts=[str(root / "training" / "true"), str(root / "training" / "false")],
            truth=[str(p) for p in sorted((root / "sim" / "inject").glob("*.ecsv"))],
            crossmatch=[str(root / "crossmatch.ecsv")],
        ),
        output=SimpleNamespace(summary=str(out / "summary.json")),
        params=SimpleNamespace(threshold=0.4, thresholds=[0.5], seed=1),
        threads=2,
        log=[str(tmp_path / "checkinfer.log")],
        rule="checkinfer_plots",
        wildcards={"telescope": "t"},
    )
    runpy.run_path(
        str(Path(__file__).resolve().parents[1] / "scripts" / "checkinfer_plots.py"), init_globals={"snakemake": sm}
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["threshold"]["value"] == 0.4 and list(summary["efficiency"]) == ["0.5"]
    assert summary["counts"]["n_fwhm_ratio"] == summary["counts"]["n"]
    assert "checkinfer:" in (tmp_path / "checkinfer.log").read_text()


def test_kind_table_on_known_scores():
    table = Table(
        {
            "truth_kind": ["star", "star", "", "injected", "ref:bleed", "star"],
            "y": [0, 0, 0, 1, 0, 1],
            "label1": [0.9, 0.1, 0.2, 0.8, 0.6, 0.3],
        }
    )
    kinds = kind_table(table, 0.5)
    # bogus rows, most kept first (ties by kind), then real rows, least kept first
    assert list(zip(kinds["kind"], kinds["label"])) == [
        ("ref:bleed", "false"),
        ("star", "false"),
        ("", "false"),
        ("star", "true"),
        ("injected", "true"),
    ]
    assert list(kinds["n"]) == [1, 2, 1, 1, 1] and list(kinds["n_kept"]) == [1, 1, 0, 0, 1]
    np.testing.assert_allclose(kinds["median_p_real"], [0.6, 0.5, 0.2, 0.3, 0.8])
    np.testing.assert_allclose(kinds["frac_kept"], [1.0, 0.5, 0.0, 0.0, 1.0])
    assert kinds.meta["threshold"] == 0.5
    empty = kind_table(table[:0], 0.5)
    assert len(empty) == 0 and empty["frac_kept"].dtype == float
