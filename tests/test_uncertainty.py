"""Uncertainty, OOD score and explanation maps (rbflow.uncertainty, rbflow.explain) and their infer columns."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import SCAN_IMAGE as IMAGE
from helpers import TRAIN_CFG as CFG
from helpers import make_cube, results_folder, synthetic_stamps

from rbflow.datacube import normalise
from rbflow.explain import explain_cutouts, explanation_maps
from rbflow.infer import infer_cutouts, load_model, predict
from rbflow.train import train
from rbflow.uncertainty import MahalanobisOOD, mc_dropout, network_features, reference_ood

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("unc")
    cube = make_cube(root / "cube.npz", 800, seed=21)
    train(cube, root / "model", {**CFG, "epochs": 4}, seed=3, checkpoint_dir=root / "ckpt")
    model, meta = load_model(root / "model" / "model.pt")
    return root, model, meta


def _auc(neg: np.ndarray, pos: np.ndarray) -> float:
    """Probability that a random ``pos`` scores above a random ``neg`` (ties count half)."""
    return float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())


def test_infer_adds_finite_seeded_uncertainty_and_ood_columns(trained, tmp_path):
    root, model, meta = trained
    results, _ = results_folder(tmp_path)
    cutouts = results / "sim" / "cutouts" / IMAGE
    model_path = root / "model" / "model.pt"
    a = infer_cutouts(cutouts, model_path, tmp_path / "a.ecsv", seed=0)
    b = infer_cutouts(cutouts, model_path, tmp_path / "b.ecsv", seed=0)
    c = infer_cutouts(cutouts, model_path, tmp_path / "c.ecsv", seed=1)
    for name in ("p_real_mc", "p_real_std", "ood_score", "ood_quantile"):
        assert np.isfinite(a[name]).all(), name
        np.testing.assert_array_equal(a[name], b[name])  # same seed, same threads: bit-identical
    assert not np.array_equal(a["p_real_std"], c["p_real_std"])  # the seed drives the dropout masks
    assert (a["p_real_std"] > 0).any() and ((a["ood_quantile"] >= 0) & (a["ood_quantile"] <= 1)).all()
    # the existing columns keep their values: label1 is the plain calibrated P(real)
    from rbflow.datacube import read_stamp

    X = np.stack([read_stamp(cutouts / f"{i}.fits", meta["channels"])[0] for i in a["id"]])
    np.testing.assert_allclose(a["label1"], predict(model, meta, normalise(X)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(a["label0"], 1 - a["label1"])
    assert "p_real_std" in a.meta["columns"]


def test_missing_reference_cube_gives_nan_ood_with_a_warning(trained, tmp_path, caplog):
    root, _, _ = trained
    results, _ = results_folder(tmp_path)
    meta = json.loads((root / "model" / "model.json").read_text())
    meta["datacube"]["path"] = str(tmp_path / "gone.npz")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
    (tmp_path / "m" / "model.pt").write_bytes((root / "model" / "model.pt").read_bytes())
    t = infer_cutouts(results / "sim" / "cutouts" / IMAGE, tmp_path / "m" / "model.pt", tmp_path / "t.ecsv")
    assert np.isnan(t["ood_score"]).all() and np.isfinite(t["p_real_std"]).all()
    assert "no OOD reference datacube" in caplog.text


def test_ood_score_separates_stamps_unlike_the_training_set(trained):
    root, model, _ = trained
    reference = reference_ood(model, root / "cube.npz", seed=0)
    X, _ = synthetic_stamps(300, seed=99)
    inside = reference.score(network_features(model, normalise(X)))
    # out of distribution: the same stamps on an extended host (a Gaussian galaxy of sigma 6 px and
    # peak 30 sigma in SCI and REF, absent from every training stamp)
    yy, xx = np.mgrid[:31, :31]
    host = 30 * np.exp(-((yy - 15) ** 2 + (xx - 15) ** 2) / (2 * 6.0**2))
    outside = reference.score(network_features(model, normalise(X + host * np.array([1, 1, 0])[:, None, None])))
    auc = _auc(inside, outside)
    # measured 1.00 for these seeds (0.80 with the last block's pooled features only); 0.9 fails a
    # score that does not see the shift (0.5)
    assert auc > 0.9, auc
    assert np.median(reference.quantile(inside)) < 0.8  # fresh in-distribution stamps look typical


def test_mahalanobis_on_known_gaussians():
    rng = np.random.default_rng(0)
    feats = rng.normal(0, 1, (4000, 3)) * [1, 2, 4]
    ood = MahalanobisOOD.fit(feats, np.zeros(4000))
    # a point 3 sigma along each axis is sqrt(27) = 5.2 sigmas away; shrinkage (5 %) and sampling
    # change the covariance by a few per cent
    np.testing.assert_allclose(ood.score(np.array([[3.0, 6.0, 12.0]])), [np.sqrt(27)], rtol=0.08)
    assert ood.quantile(np.array([0.0]))[0] == 0.0 and ood.quantile(np.array([100.0]))[0] == 1.0
    with pytest.raises(ValueError, match="at least 2"):
        MahalanobisOOD.fit(feats[:1], np.zeros(1))


def test_mc_dropout_is_seeded_and_leaves_eval_mode(trained):
    _, model, meta = trained
    X = normalise(synthetic_stamps(50, seed=5)[0])
    m1, s1 = mc_dropout(model, meta, X, passes=10, seed=4)
    m2, s2 = mc_dropout(model, meta, X, passes=10, seed=4)
    np.testing.assert_array_equal(m1, m2)
    np.testing.assert_array_equal(s1, s2)
    assert not model.training and not any(m.training for m in model.modules())
    # the mean over dropout masks stays near the deterministic P(real) (dropout 0.2 before one linear layer)
    assert np.abs(m1 - predict(model, meta, X)).mean() < 0.1
    with pytest.raises(ValueError, match="at least 2"):
        mc_dropout(model, meta, X, passes=1, seed=0)


@pytest.mark.parametrize("method", ["gradcam", "saliency"])
def test_explanation_maps_look_at_the_source(trained, method):
    _, model, _ = trained
    X, y = synthetic_stamps(200, seed=8, snr=(20.0, 60.0))
    maps = explanation_maps(model, normalise(X), method=method)
    assert maps.shape == (200, 31, 31) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    yy, xx = np.mgrid[:31, :31]
    centre = np.hypot(yy - 15, xx - 15) <= 5  # 81 of 961 pixels (8 %)
    share = (maps[y == 1] * centre).sum(axis=(1, 2)) / np.maximum(maps[y == 1].sum(axis=(1, 2)), 1e-12)
    # reals are a PSF at the centre: the map's weight there is several times the area share
    # (measured medians 0.23 saliency, > 0.25 Grad-CAM); 0.15 is twice the share of a flat map
    assert np.median(share) > 0.15, np.median(share)
    with pytest.raises(ValueError, match="unknown"):
        explanation_maps(model, normalise(X[:2]), method="lime")


def test_explain_cutouts_and_the_page_show_maps(trained, tmp_path):
    root, _, _ = trained
    results, _ = results_folder(tmp_path)
    files = sorted((results / "training" / "true").glob("*.fits"))
    maps = explain_cutouts(root / "model" / "model.pt", files)
    assert maps.shape == (len(files), 31, 31) and np.isfinite(maps).all()
    from rbflow.scan import create_app

    client = create_app(results, user="ada", model_path=root / "model" / "model.pt").test_client()
    r = client.get(f"/api/explain?id={files[0].stem}")
    assert r.status_code == 200 and r.mimetype == "image/png"
    listed = client.get("/api/candidates?queue=uncertain").get_json()
    assert listed["explain"] and all(np.isfinite(c["p_real"]) and "±" in c["why"] for c in listed["candidates"])
