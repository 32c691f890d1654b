"""Tests of rbflow.legacy: importing the older tool's labelled stamps, and its text tables both ways."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from astropy.io import ascii, fits
from astropy.table import Table
from helpers import synthetic_stamps, write_cutout
from numpy.testing import assert_allclose

from rbflow.cli import main
from rbflow.crossmatch import crossmatch, write_dat
from rbflow.datacube import load_datacube, normalise
from rbflow.errors import InputError
from rbflow.infer import infer_cutouts, write_infer_dat
from rbflow.inject import _write_list
from rbflow.legacy import (
    import_cutouts,
    read_crossmatch_dat,
    read_infer_results_dat,
    read_simulated_objects_list,
)
from rbflow.train import train

torch.set_num_threads(2)

N = 40
N_IMAGES = 5
CFG = {"widths": [8, 16], "epochs": 2, "batch_size": 32, "lr": 0.01, "patience": 2, "device": "cpu"}
#: Column layouts of gmadet (gmadet/cnn/sim.py, gmadet/cli checksim, gmadet/cnn/infer.py) and O'TRAIN.
LIST_COLUMNS = ["idx", "filename", "Xpos", "Ypos", "RA", "Dec", "mag", "filter", "count_ADU"]
CROSSMATCH_COLUMNS = LIST_COLUMNS + ["filename2", "Nmatches", "closest_candID", "all_candIDs", "edge"]
INFER_COLUMNS = [
    "filename",
    "RA",
    "Dec",
    "originalFile",
    "Xpos",
    "Ypos",
    "mag",
    "magerr",
    "FWHM",
    "FWHMPSF",
    "candID",
    "cand_ID",
    "label0",
    "label1",
]


def gmadet_stamp(path: Path, data: np.ndarray, *, candid: int, file: str, edge: str = "False", **keys) -> None:
    """Write one stamp as gmadet's checksim does: a single image + the candidate's keys in its header."""
    hdr = fits.Header()
    cards = dict(
        MAG=19.5,
        MAGERR=0.05,
        FWHM=3.1,
        FWHMPSF=3.0,
        FILTER="r",
        RA=150.0,
        DEC=2.0,
        XPOS=100.0,
        YPOS=200.0,
        FILE=file,
        CANDID=candid,
        EDGE=edge,
    )
    for key, value in {**cards, **keys}.items():
        hdr[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    fits.PrimaryHDU(data.astype(np.float32), header=hdr).writeto(path)


def otrain_stamp(path: Path, planes: dict[str, np.ndarray], *, candid: str, image: str) -> None:
    """Write one O'TRAIN-style multi-extension stamp: keys in the primary header, FILTER in DIFF's."""
    hdr = fits.Header()
    for key, value in dict(CANDID=candid, MAG=20.0, MAGERR=0.1, FWHM=3.0, FILE=f"/data/{image}.fits").items():
        hdr[key] = value
    hdus = [fits.PrimaryHDU(header=hdr)]
    for name, plane in planes.items():
        hdus.append(fits.ImageHDU(plane.astype(np.float32), name=name))
        if name == "DIFF":
            hdus[-1].header["FILTER"] = "g"
    path.parent.mkdir(parents=True, exist_ok=True)
    fits.HDUList(hdus).writeto(path)


@pytest.fixture(scope="module")
def gmadet_folder(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """``candidates_training/{true,false}`` of 32 px DIFF stamps, as gmadet writes them, over 5 images."""
    root = tmp_path_factory.mktemp("gmadet") / "candidates_training"
    X, y = synthetic_stamps(N, size=33, seed=3)
    diff = X[:, 2, :32, :32]  # even stamps; the source sits on pixel 16 = H // 2, as Cutout2D puts it
    for i, (stamp, label) in enumerate(zip(diff, y)):
        gmadet_stamp(
            root / ("true" if label else "false") / f"candidate_{i}.fits",
            stamp,
            candid=i,
            file=f"/data/gmadet_results/ima{i % N_IMAGES}_sub.fits",
            MAG=18.0 + i / 10,
        )
    return root, diff, y


@pytest.fixture(scope="module")
def imported(gmadet_folder, tmp_path_factory) -> tuple[Path, dict]:
    root, _, _ = gmadet_folder
    out = tmp_path_factory.mktemp("cube") / "cube.npz"
    return out, import_cutouts(root, out)


@pytest.fixture(scope="module")
def model(imported, tmp_path_factory) -> tuple[Path, dict]:
    cube, _ = imported
    root = tmp_path_factory.mktemp("model")
    meta = train(cube, root / "model", CFG, seed=1, checkpoint_dir=root / "ckpt")
    return root / "model", meta


def test_import_older_tool_folder(gmadet_folder, imported):
    root, diff, y = gmadet_folder
    out, meta = imported
    cube = load_datacube(out)
    assert cube["X"].shape == (N, 1, 31, 31) and cube["X"].dtype == np.float32
    assert list(cube["channels"]) == ["DIFF"] and meta["channels"] == ["DIFF"]
    # true/ first, then false/, each sorted by file name
    order = sorted((i for i in range(N) if y[i]), key=lambda i: f"candidate_{i}.fits")
    order += sorted((i for i in range(N) if not y[i]), key=lambda i: f"candidate_{i}.fits")
    assert list(cube["ids"]) == [str(i) for i in order] and list(cube["y"]) == [int(y[i]) for i in order]
    assert_allclose(cube["mag"], [18.0 + i / 10 for i in order])
    assert_allclose(cube["snr"], 2.5 / np.log(10) / 0.05)
    assert list(cube["image"][:1]) == [f"ima{order[0] % N_IMAGES}_sub"] and len(set(cube["frame"])) == N_IMAGES
    # cropped around pixel 16 of the even stamps: the 31 px stamp is the 32 px one without its first row/column
    assert_allclose(cube["X"][0, 0], normalise(diff[order[0], 1:, 1:]))
    assert meta["cutout_size"] == 32 and meta["stamp_size"] == 31 and meta["crop"] == 31
    assert meta["source"] == f"imported from {root}, format older-tool"
    assert meta["imported_from"]["filters"] == ["r"] and meta["counts"]["skipped"] == 0


def test_trained_model_records_channels(model):
    model_dir, meta = model
    saved = json.loads((model_dir / "model.json").read_text())
    assert saved["model"]["in_channels"] == 1 and saved["channels"] == ["DIFF"]
    assert saved["stamp_size"] == 31 and saved["cutout_size"] == 32
    assert "imported from" in saved["datacube"]["meta"]["source"] and meta["channels"] == ["DIFF"]


def test_infer_with_an_imported_model(model, gmadet_folder, tmp_path):
    model_dir, _ = model
    root, _, _ = gmadet_folder
    # the older tool's single-image stamps: refused, naming the file and what to do
    with pytest.raises(InputError, match=r"candidate_\d+\.fits' is a single-image FITS file.*rbflow import"):
        infer_cutouts(root / "true", model_dir / "model.pt", tmp_path / "a.ecsv")
    # rbflow cutouts (SCI, REF, DIFF, SCORR): the DIFF-only model reads their DIFF
    X, _ = synthetic_stamps(6, seed=8)
    for i, stamp in enumerate(X):
        write_cutout(tmp_path / "ok" / f"img_{i}.fits", stamp, cid=f"img_{i}", image="img")
    table = infer_cutouts(tmp_path / "ok", model_dir / "model.pt", tmp_path / "b.ecsv")
    assert len(table) == 6 and np.all((table["label1"] >= 0) & (table["label1"] <= 1))
    # cutouts without the model's channel, or of another size: refused, naming the file and the fix
    no_diff = tmp_path / "no_diff" / "img_0.fits"
    no_diff.parent.mkdir()
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(X[0, 0], name="SCI")]).writeto(no_diff)
    with pytest.raises(InputError, match=r"img_0\.fits' has no DIFF HDU.*model trained without it"):
        infer_cutouts(no_diff.parent, model_dir / "model.pt", tmp_path / "c.ecsv")
    big = synthetic_stamps(1, size=41, seed=9)[0][0]
    write_cutout(tmp_path / "big" / "img_0.fits", big, cid="img_0", image="img")
    with pytest.raises(InputError, match=r"cutouts are 41 px \(first cutout '.*img_0\.fits'\).*size 32"):
        infer_cutouts(tmp_path / "big", model_dir / "model.pt", tmp_path / "d.ecsv")


def test_import_otrain_folder(tmp_path, caplog):
    X, y = synthetic_stamps(8, size=35, seed=4)
    root = tmp_path / "otrain"
    for i, (stamp, label) in enumerate(zip(X, y)):
        planes = {"SCI": stamp[0], "REF": stamp[1], "DIFF": stamp[2]}
        if i == 0:
            planes = {"DIFF": stamp[2][1:-1, 1:-1], "SCI": stamp[0][1:-1, 1:-1]}  # 33 px, no REF
        folder = root / ("true" if label else "false")
        otrain_stamp(folder / f"c{i}.fits", planes, candid=f"cand{i}", image=f"im{i % 3}")
    with caplog.at_level(logging.WARNING):
        meta = import_cutouts(root, tmp_path / "a.npz")
    cube = load_datacube(tmp_path / "a.npz")
    # the channels every file has, in rbflow's order; all cropped to the smallest (odd) size
    assert meta["channels"] == ["SCI", "DIFF"] and cube["X"].shape == (8, 2, 33, 33)
    assert "cropped around their centre to 33 px" in caplog.text
    assert meta["source"] == f"imported from {root}, format O'TRAIN" and meta["imported_from"]["filters"] == ["g"]
    assert sorted(cube["ids"]) == sorted(f"cand{i}" for i in range(8)) and set(cube["frame"]) == {"im0", "im1", "im2"}
    i = list(cube["ids"]).index("cand3")
    assert_allclose(cube["X"][i, 1], normalise(X[3, 2, 1:-1, 1:-1]))
    # asked channels, in the order asked; a channel a file lacks is an error naming the file
    meta = import_cutouts(root, tmp_path / "b.npz", channels=["DIFF", "SCI"], crop=21)
    assert load_datacube(tmp_path / "b.npz")["X"].shape == (8, 2, 21, 21) and meta["channels"] == ["DIFF", "SCI"]
    with pytest.raises(InputError, match=r"c0\.fits' has no \['REF'\] image"):
        import_cutouts(root, tmp_path / "c.npz", channels=["SCI", "REF", "DIFF"])
    with pytest.raises(InputError, match="crop = 34 must be odd"):
        import_cutouts(root, tmp_path / "d.npz", crop=34)


def test_import_skips_edge_and_nan_stamps_and_refuses_corrupt_files(tmp_path):
    X, y = synthetic_stamps(6, size=33, seed=5)
    root = tmp_path / "f"
    for i, (stamp, label) in enumerate(zip(X, y)):
        gmadet_stamp(
            root / ("true" if label else "false") / f"candidate_{i}.fits",
            stamp[2, :32, :32],
            candid=i,
            file=f"ima{i}.fits",
        )
    gmadet_stamp(root / "true" / "edge.fits", X[0, 2, :20, :32], candid=90, file="ima0.fits", edge="True")
    gmadet_stamp(root / "false" / "nan.fits", np.full((32, 32), np.nan), candid=91, file="ima0.fits")
    gmadet_stamp(root / "false" / "bare.fits", X[1, 2, :32, :32], candid=92, file="", MAG="", MAGERR="")
    meta = import_cutouts(root, tmp_path / "a.npz")
    cube = load_datacube(tmp_path / "a.npz")
    assert len(cube["y"]) == 7 and set(meta["skipped"]) == {"true/edge.fits", "false/nan.fits"}
    assert "EDGE" in meta["skipped"]["true/edge.fits"] and "NaN-only" in meta["skipped"]["false/nan.fits"]
    bare = list(cube["ids"]).index("92")
    assert np.isnan(cube["mag"][bare]) and np.isnan(cube["snr"][bare]) and cube["image"][bare] == ""
    assert cube["frame"][bare] == "false/bare" and meta["imported_from"]["stamps_without_frame"] == 1
    (root / "false" / "broken.fits").write_bytes(b"SIMPLE  =  not a FITS file" * 10)
    with pytest.raises(InputError, match=r"broken\.fits' is not a readable FITS file"):
        import_cutouts(root, tmp_path / "b.npz")
    assert main(["import", str(root), str(tmp_path / "c.npz")]) == 2
    with pytest.raises(InputError, match="has no stamp"):
        import_cutouts(root / "true", tmp_path / "d.npz")


def test_cli_import_then_train(gmadet_folder, tmp_path):
    root, _, _ = gmadet_folder
    assert main(["import", str(root), str(tmp_path / "cube.npz"), "--crop", "25"]) == 0
    cube = load_datacube(tmp_path / "cube.npz")
    assert cube["X"].shape == (N, 1, 25, 25) and cube["meta"]["crop"] == 25
    (tmp_path / "run.yaml").write_text("train: {widths: [8], epochs: 1, batch_size: 32, device: cpu}\n")
    assert (
        main(["train", str(tmp_path / "cube.npz"), str(tmp_path / "model"), "--config", str(tmp_path / "run.yaml")])
        == 0
    )
    saved = json.loads((tmp_path / "model" / "model.json").read_text())
    assert saved["channels"] == ["DIFF"] and saved["model"]["in_channels"] == 1 and saved["stamp_size"] == 25


def test_simulated_objects_list_round_trip(tmp_path):
    truth = Table(
        {
            "image": ["f_sim1", "f_sim1"],
            "x": [10.25, 200.5],
            "y": [30.125, 4.0],
            "ra": [150.123456789, 150.2],
            "dec": [2.000001, -2.5],
            "mag": [18.25, 21.5],
            "filter": ["r", "r"],
            "flux": [12345.6, 88.0],
        }
    )
    _write_list(truth, tmp_path / "simulated_objects.list")
    back = read_simulated_objects_list(tmp_path / "simulated_objects.list")
    assert back.colnames == LIST_COLUMNS and ascii.read(tmp_path / "simulated_objects.list").colnames == LIST_COLUMNS
    assert list(back["idx"]) == [0, 1] and list(back["filename"]) == ["f_sim1", "f_sim1"]
    assert_allclose(back["Xpos"], truth["x"], atol=1e-3) and assert_allclose(back["Ypos"], truth["y"], atol=1e-3)
    assert_allclose(back["RA"], truth["ra"], atol=1e-8) and assert_allclose(back["Dec"], truth["dec"], atol=1e-8)
    assert_allclose(back["mag"], truth["mag"]) and assert_allclose(back["count_ADU"], truth["flux"], rtol=1e-5)
    assert list(back["filter"]) == ["r", "r"]
    _write_list(truth[:0], tmp_path / "empty.list")
    assert len(read_simulated_objects_list(tmp_path / "empty.list")) == 0


def test_crossmatch_dat_round_trip(tmp_path):
    inj = Table(
        {
            "id": ["i0", "i1", "i2"],
            "image": ["img_sim0"] * 3,
            "x": [20.0, 50.0, 90.0],
            "y": [20.0, 50.0, 90.0],
            "ra": [150.0, 150.01, 150.02],
            "dec": [2.0, 2.01, 2.02],
            "mag": [18.0, 19.5, 23.0],
            "filter": ["r"] * 3,
            "flux": [1e4, 2e3, 50.0],
        }
    )
    cand = Table(
        {
            "id": ["img_sim0_0", "img_sim0_1", "img_sim0_2"],
            "image": ["img_sim0"] * 3,
            "x": [20.5, 50.5, 49.0],
            "y": [20.0, 50.0, 50.5],
            "mag": [18.1, 19.4, 20.0],
            "mag_err": [0.01, 0.05, 0.1],
            "snr": [100.0, 20.0, 10.0],
        }
    )
    per, _ = crossmatch(cand, inj, radius=2.0)
    write_dat(per, tmp_path / "crossmatch.dat")
    back = read_crossmatch_dat(tmp_path / "crossmatch.dat")
    assert back.colnames == CROSSMATCH_COLUMNS + ["mag_meas", "sep"]
    assert ascii.read(tmp_path / "crossmatch.dat").colnames == back.colnames
    assert list(back["idx"]) == [0, 1, 2] and list(back["Nmatches"]) == [1, 2, 0]
    assert list(back["closest_candID"]) == ["img_sim0_0", "img_sim0_1", "None"]
    assert list(back["all_candIDs"]) == ["img_sim0_0", "img_sim0_1,img_sim0_2", "None"]
    assert list(back["edge"]) == ["N", "N", "None"] and list(back["filename2"]) == ["img_sim0"] * 3
    assert_allclose(back["mag"], inj["mag"]) and assert_allclose(back["RA"], inj["ra"])
    assert_allclose(back["Xpos"], inj["x"]) and assert_allclose(back["mag_meas"][:2], [18.1, 19.4])
    assert np.isnan(back["mag_meas"][2]) and np.isnan(back["sep"][2])


def test_infer_results_dat_round_trip(tmp_path):
    table = Table(
        {
            "id": ["a_0", "a_1"],
            "image": ["a", "a"],
            "x": [1.5, 2.25],
            "y": [3.0, 4.0],
            "ra": [10.0, 10.5],
            "dec": [-5.0, -5.5],
            "mag": [19.0, np.nan],
            "mag_err": [0.1, np.nan],
            "fwhm": [3.0, 2.5],
        }
    )
    p_real = np.array([0.987654321, 1e-9])
    table["label0"], table["label1"] = 1 - p_real, p_real
    write_infer_dat(table, ["cut/a_0.fits", "cut/a_1.fits"], tmp_path / "infer_results.dat")
    back = read_infer_results_dat(tmp_path / "infer_results.dat")
    assert back.colnames == INFER_COLUMNS and ascii.read(tmp_path / "infer_results.dat").colnames == INFER_COLUMNS
    assert list(back["candID"]) == list(back["cand_ID"]) == ["a_0", "a_1"]
    assert list(back["filename"]) == ["cut/a_0.fits", "cut/a_1.fits"] and list(back["originalFile"]) == ["a", "a"]
    assert_allclose(back["label1"], p_real, rtol=1e-7) and assert_allclose(back["label0"], 1 - p_real, rtol=1e-7)
    assert_allclose(back["Xpos"], table["x"]) and assert_allclose(back["RA"], table["ra"])
    assert np.isnan(back["mag"][1]) and np.all(np.isnan(back["FWHMPSF"]))


def test_reads_the_older_tools_own_files(tmp_path):
    # as gmadet's cnn_infer writes it (candID only, integer ids)
    Table(
        {
            "filename": ["c/candidate_0.fits"],
            "RA": [1.0],
            "Dec": [2.0],
            "originalFile": ["i.fits"],
            "Xpos": [5.0],
            "Ypos": [6.0],
            "mag": [19.0],
            "magerr": [0.1],
            "FWHM": [3.0],
            "FWHMPSF": [3.0],
            "candID": [0],
            "label0": [0.25],
            "label1": [0.75],
        }
    ).write(tmp_path / "infer_results.dat", format="ascii.commented_header")
    back = read_infer_results_dat(tmp_path / "infer_results.dat")
    assert list(back["cand_ID"]) == [0] and back["label1"][0] == 0.75
    # an older gmadet list (no idx, filter, count_ADU) is still a list
    Table({"filename": ["a.fits"], "Xpos": [1.0], "Ypos": [2.0], "RA": [3.0], "Dec": [4.0], "mag": [20.0]}).write(
        tmp_path / "old.list", format="ascii.commented_header"
    )
    assert len(read_simulated_objects_list(tmp_path / "old.list")) == 1
    (tmp_path / "bad.dat").write_text("# filename label0\nx.fits 0.5\n")
    with pytest.raises(InputError, match=r"bad\.dat' lacks column\(s\) \['label1'\]"):
        read_infer_results_dat(tmp_path / "bad.dat")
    with pytest.raises(InputError, match=r"nothing\.dat' does not exist"):
        read_crossmatch_dat(tmp_path / "nothing.dat")
