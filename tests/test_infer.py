"""Tests of rbflow.infer and rbflow.cli: model loading and checks, ONNX, folder inference, the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from astropy.table import Table
from helpers import make_cube, synthetic_stamps, write_cutout, write_training
from numpy.testing import assert_allclose

from rbflow.cli import main
from rbflow.datacube import build_datacube, load_datacube, normalise
from rbflow.errors import InputError
from rbflow.infer import (
    centre_crop,
    check_compatible,
    infer_cutouts,
    load_model,
    predict,
    predict_onnx,
    score_triplets,
)
from rbflow.train import train

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    cube = make_cube(root / "cube.npz", 600, seed=21, n_frames=6)
    cfg = {"widths": [8, 16, 32], "epochs": 2, "batch_size": 64, "lr": 0.01, "device": "cpu"}
    train(cube, root / "model", cfg, seed=2, checkpoint_dir=root / "ckpt")
    return root / "model"


@pytest.fixture(scope="module")
def cutouts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cutouts") / "img0"
    X, y = synthetic_stamps(40, seed=99)
    X[3, :, :6] = np.nan  # a stamp crossing the frame edge
    for i, stamp in enumerate(X):
        write_cutout(folder / f"img0_{i}.fits", stamp, cid=f"img0_{i}", image="img0")
    return folder, X, y


def test_load_model(model_dir):
    model, meta = load_model(model_dir / "model.pt")
    assert not model.training and meta["channels"] == ["SCI", "REF", "DIFF"] and meta["stamp_size"] == 31


def test_refuses_pickle_and_corrupt_files(model_dir, tmp_path):
    shutil.copy(model_dir / "model.json", tmp_path / "model.json")
    model, _ = load_model(model_dir / "model.pt")
    torch.save(model, tmp_path / "model.pt")  # a whole pickled module, not a state_dict
    with pytest.raises(InputError, match="pickled Python objects"):
        load_model(tmp_path / "model.pt")
    (tmp_path / "model.pt").write_bytes((model_dir / "model.pt").read_bytes()[:500])
    with pytest.raises(InputError, match="corrupt"):
        load_model(tmp_path / "model.pt")
    (tmp_path / "model.pt").write_bytes((model_dir / "model.pt").read_bytes())
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(InputError, match="model.json' is not valid"):
        load_model(tmp_path / "model.pt")
    with pytest.raises(InputError, match="does not exist"):
        load_model(tmp_path / "missing.pt")


def test_check_compatible(model_dir):
    _, meta = load_model(model_dir / "model.pt")
    check_compatible(meta, ["SCI", "REF", "DIFF", "SCORR"], 31)
    with pytest.raises(InputError, match="lack \\['REF'\\]"):
        check_compatible(meta, ["SCI", "DIFF"], 31)
    with pytest.raises(InputError, match="expects stamps of 31 px.*cutouts are 21 px"):
        check_compatible(meta, ["SCI", "REF", "DIFF"], 21)


def test_size_mismatch_in_folder(model_dir, tmp_path):
    X, _ = synthetic_stamps(2, size=21, seed=1)
    write_cutout(tmp_path / "c" / "a_0.fits", X[0], cid="a_0", image="a")
    with pytest.raises(InputError, match="cutouts are 21 px"):
        infer_cutouts(tmp_path / "c", model_dir / "model.pt", tmp_path / "out.ecsv")


def test_onnx_matches_torch(model_dir):
    model, meta = load_model(model_dir / "model.pt")
    X = normalise(synthetic_stamps(64, seed=5)[0])
    # float32 forward passes of the same graph in two runtimes agree to rounding (~1e-7 on P)
    assert_allclose(predict_onnx(model_dir / "model.onnx", X), predict(model, meta, X), atol=1e-5)


def test_infer_folder(model_dir, cutouts, tmp_path):
    folder, X, y = cutouts
    table = infer_cutouts(
        folder,
        model_dir / "model.pt",
        tmp_path / "r.ecsv",
        out_dat=tmp_path / "r.dat",
        out_kept=tmp_path / "r_kept.ecsv",
        threshold=0.5,
    )
    model, meta = load_model(model_dir / "model.pt")
    order = [int(i.split("_")[1]) for i in table["id"]]
    assert_allclose(table["label1"], predict(model, meta, normalise(X[order])), atol=1e-6)
    assert_allclose(table["label0"] + table["label1"], 1.0)
    assert ((table["label1"] >= 0.5) == y[order]).mean() > 0.9  # separable problem, a 2-epoch model
    back = Table.read(tmp_path / "r.ecsv")
    assert back.meta["threshold"] == 0.5 and {"x", "y", "ra", "dec", "mag", "snr", "flags"} <= set(back.colnames)
    dat = Table.read(tmp_path / "r.dat", format="ascii.commented_header")  # the older tool's infer_results.dat
    assert dat.colnames[0] == "filename" and dat.colnames[-2:] == ["label0", "label1"]
    assert dat["filename"][0].endswith(".fits")
    assert_allclose(dat["label1"], table["label1"], atol=1e-8)
    assert len(Table.read(tmp_path / "r_kept.ecsv")) == int((table["label1"] >= 0.5).sum())


def test_manifest_columns(model_dir, cutouts, tmp_path):
    folder, _, _ = cutouts
    local = tmp_path / "img0"
    shutil.copytree(folder, local)
    ids = [f"img0_{i}" for i in range(40)]
    Table({"id": ids, "scorr_peak": np.arange(40.0)}).write(local / "cutouts.ecsv")
    table = infer_cutouts(local, model_dir / "model.pt", tmp_path / "r.ecsv")
    uncertainty = ["p_real_mc", "p_real_std", "ood_score", "ood_quantile"]  # rbflow.uncertainty
    assert list(table.colnames) == ["id", "scorr_peak", "label0", "label1", *uncertainty]
    assert all(float(s) == float(i.split("_")[1]) for i, s in zip(table["id"], table["scorr_peak"]))


def test_empty_folder(model_dir, tmp_path, caplog):
    (tmp_path / "empty").mkdir()
    table = infer_cutouts(
        tmp_path / "empty",
        model_dir / "model.pt",
        tmp_path / "e.ecsv",
        out_dat=tmp_path / "e.dat",
        out_kept=tmp_path / "e_kept.ecsv",
    )
    assert len(table) == 0 and table["label1"].dtype == np.float64
    assert len(Table.read(tmp_path / "e.ecsv")) == 0 and "holds no cutout" in caplog.text
    assert len(Table.read(tmp_path / "e_kept.ecsv")) == 0


def test_cli_infer_equals_library(model_dir, cutouts, tmp_path):
    folder, _, _ = cutouts
    lib = infer_cutouts(folder, model_dir / "model.pt", tmp_path / "lib.ecsv")
    args = ["infer", str(folder), "--model", str(model_dir / "model.pt"), "--out", str(tmp_path / "cli.ecsv")]
    assert main(args) == 0
    cli = Table.read(tmp_path / "cli.ecsv")
    assert list(cli["id"]) == list(lib["id"]) and np.array_equal(cli["label1"], lib["label1"])
    _, meta = load_model(model_dir / "model.pt")
    kept = Table.read(tmp_path / "cli_kept.ecsv")
    assert len(kept) == int((lib["label1"] >= meta["threshold"]).sum())
    assert (tmp_path / "cli.dat").exists()


def test_cli_errors_and_help(tmp_path, capsys):
    assert main(["infer", str(tmp_path), "--model", str(tmp_path / "none.pt"), "--out", str(tmp_path / "o.ecsv")]) == 2
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "infer" in capsys.readouterr().out


def test_cli_convert_and_train(tmp_path):
    write_training(tmp_path / "training", 60, seed=8)
    assert main(["convert", str(tmp_path / "training"), str(tmp_path / "cube.npz"), "--crop", "21"]) == 0
    assert main(["train", str(tmp_path / "cube.npz"), str(tmp_path / "model"), "--epochs", "1", "--device", "cpu"]) == 0
    meta = json.loads((tmp_path / "model" / "model.json").read_text())
    assert meta["stamp_size"] == 21 and meta["cutout_size"] == 31 and meta["crop"] == 21
    assert (tmp_path / "model.checkpoint" / "checkpoint.pt").exists()
    # 31 px cutouts are cropped to the model's 21 px as the datacube was
    table = infer_cutouts(tmp_path / "training" / "true", tmp_path / "model" / "model.pt", tmp_path / "t.ecsv")
    assert len(table) == len(list((tmp_path / "training" / "true").glob("*.fits")))


def test_console_script():
    exe = Path(sys.executable).with_name("rbflow")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    assert all(cmd in out for cmd in ("convert", "train", "infer"))


def embed(X: np.ndarray, h: int, w: int, *, fill: float) -> np.ndarray:
    """``(N, C, S, S)`` stamps placed in ``(N, C, h, w)`` arrays so that stamp pixel ``S // 2`` lands on
    ``(h // 2, w // 2)``; the rest is ``fill``."""
    s = X.shape[-1]
    out = np.full((*X.shape[:2], h, w), fill, dtype=np.float32)
    r0, c0 = h // 2 - s // 2, w // 2 - s // 2
    out[..., r0 : r0 + s, c0 : c0 + s] = X
    return out


def test_centre_crop_convention():
    # the crop keeps the pixel (H // 2, W // 2) in its centre: odd and even sides, as datacube.crop_stamps
    x = np.arange(8 * 9).reshape(8, 9)
    crop = centre_crop(x, 3)
    assert crop.shape == (3, 3) and crop[1, 1] == x[4, 4]
    from rbflow.datacube import crop_stamps

    sq = np.arange(10 * 10).reshape(10, 10)
    assert np.array_equal(centre_crop(sq, 5), crop_stamps(sq, 5))


def test_score_triplets_equals_infer_path(model_dir, cutouts, tmp_path):
    # the same P(real) as the folder path (read, normalise, predict) on the same cutouts, NaN edge stamp included
    folder, X, _ = cutouts
    table = infer_cutouts(folder, model_dir / "model.pt", tmp_path / "r.ecsv", mc_passes=2)
    order = [int(i.split("_")[1]) for i in table["id"]]
    p = score_triplets(model_dir / "model.pt", X[:, 0], X[:, 1], X[:, 2])
    assert_allclose(p[order], table["label1"], atol=1e-6, rtol=0)
    assert np.isfinite(p[3])  # the stamp with NaN columns


def test_score_triplets_equals_datacube(model_dir, tmp_path):
    # a datacube's own stamps (normalised by build_datacube, as training sees them) score as their raw pixels do
    X, y = write_training(tmp_path / "training", 40, seed=13)
    build_datacube(
        tmp_path / "training", tmp_path / "cube.npz", channels=["SCI", "REF", "DIFF"], crop=None, frac_true=None, seed=0
    )
    cube = load_datacube(tmp_path / "cube.npz")
    model, meta = load_model(model_dir / "model.pt")
    index = [int(i.rsplit("_", 1)[1]) for i in cube["ids"]]
    raw = X[index]
    p = score_triplets((model, meta), raw[:, 0], raw[:, 1], raw[:, 2])
    assert_allclose(p, predict(model, meta, cube["X"]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(31, 31), (40, 40), (41, 36), (63, 63)])
def test_score_triplets_centre_crops_any_size(model_dir, cutouts, shape):
    # larger stamps, odd or even sides: only the centred model-size crop counts (the rest is garbage here,
    # so an off-by-one crop changes P)
    _, X, _ = cutouts
    big = embed(X, *shape, fill=1e4)
    expected = score_triplets(model_dir, X[:, 0], X[:, 1], X[:, 2])
    assert_allclose(score_triplets(model_dir, big[:, 0], big[:, 1], big[:, 2]), expected, atol=1e-6, rtol=0)
    if shape != (31, 31):
        shifted = np.roll(big, 1, axis=-1)
        assert np.abs(score_triplets(model_dir, shifted[:, 0], shifted[:, 1], shifted[:, 2]) - expected).max() > 1e-3


def test_score_triplets_refuses_bad_input(model_dir, cutouts):
    _, X, _ = cutouts
    model, meta = load_model(model_dir / "model.pt")
    scorr = {**meta, "channels": ["SCI", "REF", "SCORR"]}
    with pytest.raises(InputError, match="SCORR"):
        score_triplets((model, scorr), X[:, 0], X[:, 1], X[:, 2])
    with pytest.raises(InputError, match="one shape"):
        score_triplets((model, meta), X[:, 0], X[:, 1], X[:5, 2])
    with pytest.raises(InputError, match="one shape"):
        score_triplets((model, meta), X[0, 0], X[0, 1], X[0, 2])
    small = X[:, :, 1:-1, 1:-1]
    with pytest.raises(InputError, match="smaller than the model's 31"):
        score_triplets((model, meta), small[:, 0], small[:, 1], small[:, 2])
    with pytest.raises(InputError, match="normalisation"):
        score_triplets((model, {**meta, "normalisation": {"name": "minmax"}}), X[:, 0], X[:, 1], X[:, 2])
    with pytest.raises(InputError, match="does not exist"):
        score_triplets(model_dir / "none.pt", X[:, 0], X[:, 1], X[:, 2])
