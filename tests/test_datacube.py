"""Tests of rbflow.datacube: normalisation, datacube building, bad cutouts, class balancing."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from helpers import synthetic_stamps, write_cutout, write_training
from numpy.testing import assert_allclose

from rbflow.datacube import (
    NORMALISATION,
    build_datacube,
    listing_digest,
    load_datacube,
    normalise,
)
from rbflow.errors import InputError

CHANNELS = ["SCI", "REF", "DIFF"]


def test_normalise_robust_to_nan_and_outliers():
    rng = np.random.default_rng(0)
    x = rng.normal(50.0, 3.0, (2, 3, 31, 31)).astype(np.float32)
    x[0, 0, :5] = np.nan  # a stamp crossing the frame edge
    x[1, 2, 15, 15] = 1e6  # a cosmic ray
    x[1, 1] = np.nan  # a channel entirely off the frame
    z = normalise(x)
    assert z.dtype == np.float32 and np.isfinite(z).all()
    assert (z[0, 0, :5] == 0).all() and (z[1, 1] == 0).all()
    assert z[1, 2, 15, 15] == NORMALISATION["clip"]
    # median 0 and robust sigma 1 per plane; 961 Gaussian pixels give the MAD to ~4 % (1 sigma), so 15 %
    good = z[0, 1]
    assert abs(np.median(good)) < 0.1
    assert_allclose(1.4826 * np.median(np.abs(good - np.median(good))), 1.0, rtol=0.15)
    assert np.isfinite(normalise(np.full((3, 31, 31), 7.0))).all()  # constant plane: MAD 0 -> floored scale


def test_build_datacube(tmp_path):
    X, y = write_training(tmp_path / "training", 40, seed=1)
    write_cutout(tmp_path / "training" / "unsorted" / "u.fits", X[0], cid="u", image="f00_sim0")
    meta = build_datacube(
        tmp_path / "training", tmp_path / "cube.npz", channels=CHANNELS, crop=None, frac_true=None, seed=0
    )
    cube = load_datacube(tmp_path / "cube.npz")
    assert cube["X"].shape == (40, 3, 31, 31) and cube["X"].dtype == np.float32
    assert cube["y"].sum() == y.sum() and meta["counts"] == {
        "true": int(y.sum()),
        "false": int(40 - y.sum()),
        "skipped": 0,
        "dropped_by_balance": 0,
    }
    assert list(cube["channels"]) == CHANNELS and cube["meta"]["normalisation"] == NORMALISATION
    assert set(cube["frame"]) == {f"f{i:02d}" for i in range(6)}
    # stamps are stored normalised, in folder order (true first, then false, sorted by name)
    first_true = sorted((tmp_path / "training" / "true").glob("*.fits"))[0]
    i = int(first_true.stem.split("_")[-1])
    assert cube["ids"][0] == first_true.stem
    assert_allclose(cube["X"][0], normalise(X[i]), atol=1e-6)
    assert json.loads(json.dumps(meta)) == cube["meta"]


def test_crop(tmp_path):
    write_training(tmp_path / "t", 10, seed=2)
    build_datacube(tmp_path / "t", tmp_path / "c.npz", channels=["DIFF"], crop=21, frac_true=None, seed=0)
    cube = load_datacube(tmp_path / "c.npz")
    assert cube["X"].shape[1:] == (1, 21, 21) and cube["meta"]["cutout_size"] == 31
    with pytest.raises(InputError, match="convert.crop"):
        build_datacube(tmp_path / "t", tmp_path / "c.npz", channels=["DIFF"], crop=41, frac_true=None, seed=0)


def test_bad_cutouts_skipped(tmp_path, caplog):
    root = tmp_path / "training"
    X, y = write_training(root, 12, seed=3)
    (root / "false" / "corrupt.fits").write_bytes(b"SIMPLE  =   not a fits file")
    write_cutout(root / "false" / "small.fits", X[0][:, :21, :21], cid="small", image="f00_sim0")
    nan = X[1].copy()
    nan[2] = np.nan
    write_cutout(root / "true" / "nan.fits", nan, cid="nan", image="f00_sim0")
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(X[0][0], name="SCI")]).writeto(root / "true" / "nochan.fits")
    with caplog.at_level(logging.WARNING, logger="rbflow"):
        meta = build_datacube(root, tmp_path / "c.npz", channels=CHANNELS, crop=None, frac_true=None, seed=0)
    assert meta["counts"]["skipped"] == 4 and meta["counts"]["true"] + meta["counts"]["false"] == 12
    reasons = meta["skipped"]
    assert "not a readable FITS" in reasons["false/corrupt.fits"]
    assert "21 px wide" in reasons["false/small.fits"]
    assert "no finite pixel" in reasons["true/nan.fits"]
    assert "no REF HDU" in reasons["true/nochan.fits"]
    assert "corrupt.fits" in caplog.text


def test_empty_class(tmp_path):
    X, _ = synthetic_stamps(3, seed=4)
    for i in range(3):
        write_cutout(tmp_path / "t" / "false" / f"b{i}.fits", X[i], cid=f"b{i}", image="f00")
    with pytest.raises(InputError, match=r"true' has no cutout"):
        build_datacube(tmp_path / "t", tmp_path / "c.npz", channels=CHANNELS, crop=None, frac_true=None, seed=0)
    (tmp_path / "t" / "true").mkdir()
    (tmp_path / "t" / "true" / "bad.fits").write_bytes(b"junk")
    with pytest.raises(InputError, match="no usable cutout"):
        build_datacube(tmp_path / "t", tmp_path / "c.npz", channels=CHANNELS, crop=None, frac_true=None, seed=0)
    assert not (tmp_path / "c.npz").exists()


def test_frac_true_balancing(tmp_path):
    _, y = write_training(tmp_path / "t", 40, seed=5)
    n_true, n_false = int(y.sum()), int(40 - y.sum())
    kw = dict(channels=["DIFF"], crop=None, frac_true=0.25)
    a = build_datacube(tmp_path / "t", tmp_path / "a.npz", seed=1, **kw)
    build_datacube(tmp_path / "t", tmp_path / "b.npz", seed=1, **kw)
    build_datacube(tmp_path / "t", tmp_path / "c.npz", seed=2, **kw)
    # trues are the majority to drop at 25 %: keep round(0.25 / 0.75 * n_false) of them, all falses
    assert a["counts"]["false"] == n_false and a["counts"]["true"] == round(n_false / 3)
    ids = {k: set(load_datacube(tmp_path / f"{k}.npz")["ids"]) for k in "abc"}
    assert ids["a"] == ids["b"] and ids["a"] != ids["c"]
    assert a["counts"]["dropped_by_balance"] == n_true - a["counts"]["true"]


def test_listing_digest_follows_relabelling(tmp_path):
    write_training(tmp_path / "t", 6, seed=6)
    before = listing_digest(tmp_path / "t")
    moved = sorted((tmp_path / "t" / "true").glob("*.fits"))[0]
    moved.rename(tmp_path / "t" / "false" / moved.name)
    assert listing_digest(tmp_path / "t") != before
    meta = build_datacube(tmp_path / "t", tmp_path / "c.npz", channels=["DIFF"], crop=None, frac_true=None, seed=0)
    assert meta["file_list_sha256"] == listing_digest(tmp_path / "t")


def test_truth_kind_round_trip_and_old_cubes(tmp_path):
    """truth_kind comes from labels.ecsv by candidate id; a person's move changes the label, not the kind."""
    root = tmp_path / "t"
    write_training(root, 12, seed=7)
    files = sorted((root / "true").glob("*.fits")) + sorted((root / "false").glob("*.fits"))
    ids = [p.stem for p in files]
    kinds = ["injected" if p.parent.name == "true" else ("ref:bleed" if k % 2 else "") for k, p in enumerate(files)]
    # labels.ecsv as label_cutouts writes it; one candidate is missing from it
    Table({"id": ids[:-1], "label_auto": [p.parent.name for p in files[:-1]], "truth_kind": kinds[:-1]}).write(
        root / "labels.ecsv"
    )
    moved = files[0]  # a person calls a true stamp bogus
    moved.rename(root / "false" / moved.name)
    build_datacube(root, tmp_path / "c.npz", channels=["DIFF"], crop=None, frac_true=None, seed=0)
    cube = load_datacube(tmp_path / "c.npz")
    got = dict(zip(cube["ids"], cube["truth_kind"]))
    assert got == {**dict(zip(ids[:-1], kinds[:-1])), ids[-1]: ""}
    assert cube["y"][list(cube["ids"]).index(moved.stem)] == 0 and got[moved.stem] == "injected"
    # without labels.ecsv every kind is unknown
    (root / "labels.ecsv").unlink()
    build_datacube(root, tmp_path / "d.npz", channels=["DIFF"], crop=None, frac_true=None, seed=0)
    assert set(load_datacube(tmp_path / "d.npz")["truth_kind"]) == {""}
    # a datacube of an older rbflow (no truth_kind array) still loads, with '' kinds
    with np.load(tmp_path / "c.npz") as npz:
        old = {k: npz[k] for k in npz.files if k != "truth_kind"}
    np.savez(tmp_path / "old.npz", **old)
    cube = load_datacube(tmp_path / "old.npz")
    assert cube["truth_kind"].shape == cube["y"].shape and set(cube["truth_kind"]) == {""}
