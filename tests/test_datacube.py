"""Tests of rbflow.datacube: normalisation, datacube building, bad cutouts, class balancing."""

from __future__ import annotations

import json
import logging
import warnings

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


def _nanmedian_normalise(x: np.ndarray) -> np.ndarray:
    """The normalisation's definition written with numpy.nanmedian (the reference normalise must equal)."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN planes
        med = np.nanmedian(x, axis=(-2, -1), keepdims=True)
        mad = np.nanmedian(np.abs(x - med), axis=(-2, -1), keepdims=True)
        scale = np.maximum(NORMALISATION["mad_factor"] * np.nan_to_num(mad), NORMALISATION["scale_floor"])
        out = np.clip((x - med) / scale, -NORMALISATION["clip"], NORMALISATION["clip"])
    return np.nan_to_num(out, nan=0.0).astype(np.float32)


@pytest.mark.parametrize("size", [1, 4, 21, 31, 63])
def test_normalise_equals_nanmedian_definition(size):
    # bit for bit: odd and even counts of valid pixels (NaN holes), ties, all-NaN and constant planes,
    # infinities; sizes on both sides of numpy's 600-pixel switch between its two nanmedian methods
    rng = np.random.default_rng(size)
    x = rng.normal(rng.uniform(-100, 100, (6, 3, 1, 1)), rng.uniform(0.01, 100, (6, 3, 1, 1)), (6, 3, size, size))
    x = x.astype(np.float32)
    x[0][rng.random((3, size, size)) < 0.4] = np.nan
    x[1, 0] = np.nan
    x[1, 1] = 7.0
    x[2] = np.round(x[2])
    x[3, :, : size // 2 + 1] = np.nan
    x[4][rng.random((3, size, size)) < 0.2] = np.inf
    x[4][rng.random((3, size, size)) < 0.2] = -np.inf
    z = normalise(x)
    assert z.dtype == np.float32 and z.shape == x.shape
    np.testing.assert_array_equal(z, _nanmedian_normalise(x))
    np.testing.assert_array_equal(normalise(x[5, 0]), z[5, 0])  # any leading shape, (H, W) included


def test_normalise_planes_holding_flt_max():
    # ZTF templates mark missing pixels with -FLT_MAX: such planes normalise without overflow warnings
    # (pytest turns warnings into errors), the sentinel pixels end at -clip, the others as without them
    big = np.finfo(np.float32).max
    rng = np.random.default_rng(3)
    x = rng.normal(10.0, 2.0, (3, 31, 31)).astype(np.float32)
    x[1] = 5.0  # constant: MAD 0, floored scale 1e-6, so that (x - med) / scale overflows for FLT_MAX
    x[0, :3], x[1, 0, 0], x[2, :20], x[2, 20:] = -big, big, big, -big
    z = normalise(x)
    clip = NORMALISATION["clip"]
    assert np.isfinite(z).all()
    assert (z[0, :3] == -clip).all() and z[1, 0, 0] == clip and (z[1].ravel()[1:] == 0).all()
    # 620 pixels at +FLT_MAX, 341 at -FLT_MAX: median +FLT_MAX, MAD 0 (|-FLT_MAX - FLT_MAX| = inf counts as large)
    assert (z[2, :20] == 0).all() and (z[2, 20:] == -clip).all()
    assert 0 < np.abs(z[0, 3:]).max() < clip  # the plane's other pixels stay normalised, unclipped


def test_normalise_many_planes_equals_definition():
    # more planes than normalise treats at once (4096): the chunks join without a seam
    rng = np.random.default_rng(7)
    x = rng.normal(5.0, 2.0, (1500, 3, 5, 5)).astype(np.float32)
    x[rng.random(x.shape) < 0.1] = np.nan
    np.testing.assert_array_equal(normalise(x), _nanmedian_normalise(x))
