"""Uncertainty, OOD score and explanation maps (rbflow.uncertainty, rbflow.explain) and their infer columns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SCAN_IMAGE as IMAGE
from helpers import TRAIN_CFG as CFG
from helpers import make_cube, results_folder, synthetic_stamps

from rbflow.datacube import normalise
from rbflow.errors import InputError
from rbflow.explain import explain_cutouts, explanation_maps
from rbflow.infer import infer_cutouts, load_model, predict
from rbflow.train import train
from rbflow.uncertainty import (
    OOD_FILE,
    KnnOOD,
    first_block_columns,
    mc_dropout,
    model_reference,
    network_features,
    reference_ood,
)

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


def _copy_model(src, dest, *, ood: bool, **changes):
    """A copy of a trained model folder, with or without its OOD reference, model.json entries changed."""
    dest.mkdir()
    meta = json.loads((src / "model.json").read_text())
    meta.update(changes)
    if not ood:
        meta.pop("ood")
    (dest / "model.json").write_text(json.dumps(meta))
    (dest / "model.pt").write_bytes((src / "model.pt").read_bytes())
    if ood:
        (dest / OOD_FILE).write_bytes((src / OOD_FILE).read_bytes())
    return dest / "model.pt"


def test_training_stores_the_ood_reference_and_infer_reads_no_datacube(trained, tmp_path, monkeypatch):
    root, model, meta = trained
    entry = meta["ood"]
    assert entry["file"] == OOD_FILE and entry["k"] == 10 and "Sun et al. 2022" in entry["method"]
    assert "first convolution block" in entry["method"]
    stored = model_reference(root / "model" / "model.pt", meta)
    # the score's features: the first block's channel means and maxima (8 channels in the tests' network)
    assert stored.columns == first_block_columns(model) == (0, 2 * CFG["widths"][0])
    assert stored.reference.shape[1] == 2 * CFG["widths"][0]
    # the reference is the training frames' stamps only (the test frames stay held out)
    assert len(stored.reference) == meta["split_counts"]["train"] == len(stored.reference_scores)
    np.testing.assert_allclose(np.linalg.norm(stored.reference, axis=1), 1, rtol=1e-5)
    results, _ = results_folder(tmp_path)
    import rbflow.datacube

    def no_cube(*_a, **_k):
        raise AssertionError("infer read a datacube")

    monkeypatch.setattr(rbflow.datacube, "load_datacube", no_cube)
    t = infer_cutouts(results / "sim" / "cutouts" / IMAGE, root / "model" / "model.pt", tmp_path / "t.ecsv")
    assert np.isfinite(t["ood_score"]).all()


def test_model_without_stored_reference_gives_nan_ood_with_a_log_line(trained, tmp_path, caplog):
    root, _, _ = trained
    results, _ = results_folder(tmp_path)
    old = _copy_model(root / "model", tmp_path / "m", ood=False, datacube={"path": str(root / "cube.npz")})
    cutouts = results / "sim" / "cutouts" / IMAGE
    t = infer_cutouts(cutouts, old, tmp_path / "t.ecsv")
    assert np.isnan(t["ood_score"]).all() and np.isnan(t["ood_quantile"]).all()
    assert np.isfinite(t["p_real_std"]).all()
    assert "no stored OOD reference" in caplog.text and "retrain" in caplog.text
    # an old model stays usable with its datacube given: the same score as a stored reference of it
    given = infer_cutouts(cutouts, old, tmp_path / "g.ecsv", reference_cube=root / "cube.npz")
    assert np.isfinite(given["ood_score"]).all()


def test_a_reference_of_another_training_is_refused(trained, tmp_path):
    root, _, _ = trained
    bad = _copy_model(root / "model", tmp_path / "m", ood=True)
    KnnOOD.fit(np.eye(12, dtype=np.float32), k=2).save(tmp_path / "m" / OOD_FILE)
    results, _ = results_folder(tmp_path)
    with pytest.raises(InputError, match="SHA-256 differs"):
        infer_cutouts(results / "sim" / "cutouts" / IMAGE, bad, tmp_path / "t.ecsv")
    (tmp_path / "m" / OOD_FILE).unlink()
    with pytest.raises(InputError, match="missing"):
        infer_cutouts(results / "sim" / "cutouts" / IMAGE, bad, tmp_path / "t.ecsv")


def test_a_reference_of_every_block_is_restricted_to_the_first_on_reading(trained, tmp_path):
    """References stored before the score moved to the first block (all columns) stay usable, restricted."""
    from rbflow.io import file_sha256

    root, model, meta = trained
    path = _copy_model(root / "model", tmp_path / "m", ood=True)
    X = normalise(synthetic_stamps(200, seed=31)[0])
    KnnOOD.fit(network_features(model, X)).save(tmp_path / "m" / OOD_FILE)
    old = {**meta, "ood": {**meta["ood"], "sha256": file_sha256(tmp_path / "m" / OOD_FILE)}}
    reference = model_reference(path, old)
    fresh = KnnOOD.fit(network_features(model, X), columns=first_block_columns(model))
    assert reference.columns == fresh.columns == (0, 16)
    np.testing.assert_allclose(reference.reference, fresh.reference, rtol=0, atol=1e-6)
    np.testing.assert_allclose(reference.reference_scores, fresh.reference_scores, rtol=0, atol=1e-6)
    with pytest.raises(InputError, match="model.widths"):
        model_reference(path, {k: v for k, v in old.items() if k != "model"})


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
    # measured 0.92 for these seeds (0.95 with every block pooled; median quantile of the fresh stamps
    # 0.53); 0.85 fails a score
    # that does not see the shift (0.5)
    assert auc > 0.85, auc
    assert np.median(reference.quantile(inside)) < 0.8  # fresh in-distribution stamps look typical


ZTF_DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ztf-alerts-dev"


@pytest.mark.skipif(not ZTF_DEV.is_dir(), reason=f"ZTF development packets not found at {ZTF_DEV}")
def test_ood_score_flags_real_ztf_alerts_against_held_out_stamps(trained):
    """Real ZTF packets (63 px, cut to the model's 31 px as rbflow.alerts does) are out of distribution
    for a model trained on synthetic stamps; fresh synthetic stamps are not."""
    from rbflow.alerts import read_alerts
    from rbflow.datacube import crop_stamps

    root, model, meta = trained
    reference = model_reference(root / "model" / "model.pt", meta)
    _, raw, _ = read_alerts([ZTF_DEV])
    ztf = reference.score(network_features(model, normalise(crop_stamps(raw, 31))))
    fresh = reference.score(network_features(model, normalise(synthetic_stamps(300, seed=98)[0])))
    auc = _auc(fresh, ztf)
    # measured 0.92 for these seeds (0.91 with every block's features pooled, the score before); a score
    # blind to the shift gives 0.5, an inverted one (the class-mean Mahalanobis distance ranking faint
    # stamps typical) less; 0.8 leaves room for thread counts
    assert auc > 0.8, auc
    # the control: fresh stamps of the training generator against the training stamps' own leave-one-out
    # scores are at chance (measured 0.51; 300 against 480 stamps: standard error ~0.02)
    control = _auc(reference.reference_scores, fresh)
    assert 0.4 < control < 0.6, control
    # as a set, the 86 packets lie far above new frames of the training sky (measured: mean quantile 0.91,
    # z 13.3, 78 % of them beyond the validation stamps' 0.95 quantile; rbflow.infer warns from z 3)
    assert reference.batch_shift(reference.quantile(ztf))[1] > 3
    assert abs(reference.batch_shift(reference.quantile(fresh))[1]) < 3


@pytest.mark.skipif(not ZTF_DEV.is_dir(), reason=f"ZTF development packets not found at {ZTF_DEV}")
def test_first_block_score_flags_real_ztf_alerts_for_the_starter_model():
    """The shipped starter model: its stored reference (the first block's features of its training stamps,
    its quantiles counted against its validation frames) ranks the real packets farther than the training
    stamps, and the packets as a set far from new frames of its training sky."""
    from rbflow.alerts import read_alerts
    from rbflow.datacube import crop_stamps
    from rbflow.infer import starter_model_path

    model, meta = load_model(starter_model_path())
    reference = model_reference(starter_model_path(), meta)
    assert reference.columns == first_block_columns(model) == (0, 32) and reference.heldout_scores is not None
    _, raw, _ = read_alerts([ZTF_DEV])
    feats = network_features(model, normalise(crop_stamps(raw, int(meta["stamp_size"]))))
    scores = reference.score(feats)
    assert np.isfinite(scores).all()
    # against the training stamps' own leave-one-out distances: measured 0.808 on the starter retrained at
    # f8330b1 (0.806 on the one of e47068c, 0.806 on the one of 2fd7d87, 0.805 on the one of 852e08f, 0.812 on the one of 3e167ef, 0.791 on the one of 898df2f, 0.872 on the one before it, 0.743 there with every block's
    # features pooled, the score stored before) with 2 threads; the computation is deterministic up to
    # float32 rounding of the forward pass. The bound is re-measured at each retrain, not carried over
    # (the 898df2f retrain's sky with coma moved it from 0.87 to 0.79; why, in the features, is not
    # measured). 0.75 fails a blind score (0.5; standard error ~0.03 for 86 packets) by 8 standard
    # errors, and, barely, the old model's pooled score
    assert _auc(reference.reference_scores, scores) > 0.75
    # against the validation frames' stamps (new frames of the training sky), the honest null: measured
    # 0.696 (0.694, 0.710, 0.700, 0.699, 0.682, 0.727 and 0.746 on the seven starters before). 0.65 fails a blind score by 5
    # standard errors
    assert _auc(reference.heldout_scores, scores) > 0.65
    # as a set the packets sit above new frames (mean quantile 0.69), but the starter's frames are each
    # another randomised camera: its validation frames' means spread by 0.11, and the set's z is 1.7
    # (1.5, 1.5, 1.5, 1.8, 1.7 and 1.8 before), under the warning's 3 (the demo model, one camera: 4.6). 1 fails a set at
    # the null's centre
    assert reference.batch_shift(reference.quantile(scores))[1] > 1


def test_knn_score_on_known_geometry(tmp_path):
    # reference: 8 unit vectors, 4 at angle 0 and 4 at 90 degrees in the plane of the first two axes
    ref = np.zeros((8, 3), np.float32)
    ref[:4, 0] = 1
    ref[4:, 1] = 1
    ood = KnnOOD.fit(ref, k=2)
    # each reference vector's 2nd other neighbour is an identical one: leave-one-out distance 0
    np.testing.assert_allclose(ood.reference_scores, 0, atol=1e-6)
    # 45 degrees from both groups: chord length 2 sin(22.5 deg); orthogonal to all: sqrt(2)
    diag = np.array([[np.sqrt(0.5), np.sqrt(0.5), 0]], np.float32)
    np.testing.assert_allclose(ood.score(diag), [2 * np.sin(np.pi / 8)], rtol=1e-5)
    np.testing.assert_allclose(ood.score(np.array([[0, 0, 1.0]])), [np.sqrt(2)], rtol=1e-6)
    assert ood.quantile(np.array([0.5]))[0] == 1.0
    ood.save(tmp_path / "r.npz")
    back = KnnOOD.load(tmp_path / "r.npz")
    assert back.k == 2 and np.array_equal(back.reference, ood.reference) and back.columns is None
    # on columns 1-2 only, rescaled to unit length: the large column 0 is ignored, and the groups are
    # (1, 0) and (0, 1) there again
    wide = np.concatenate([np.full((8, 1), 5.0, np.float32), ref], axis=1)
    sub = KnnOOD.fit(wide, k=2, columns=(1, 3))
    assert sub.columns == (1, 3) and sub.reference.shape == (8, 2)
    np.testing.assert_allclose(sub.score(np.array([[-7.0, 0.0, 3.0, 0.0]])), [0.0], atol=1e-6)
    np.testing.assert_allclose(sub.score(np.array([[9.0, 2.0, 2.0, 0.0]])), [2 * np.sin(np.pi / 8)], rtol=1e-5)
    sub.save(tmp_path / "s.npz")
    assert KnnOOD.load(tmp_path / "s.npz").columns == (1, 3)
    restricted = KnnOOD.fit(wide, k=2).restrict((1, 3))
    np.testing.assert_array_equal(restricted.reference, sub.reference)
    with pytest.raises(ValueError, match="already uses columns"):
        sub.restrict((1, 2))
    with pytest.raises(ValueError, match="outside"):
        KnnOOD.fit(wide, k=2, columns=(2, 9))
    with pytest.raises(ValueError, match="more than k"):
        KnnOOD.fit(ref[:2], k=2)
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    with pytest.raises(InputError, match="cannot be read"):
        KnnOOD.load(tmp_path / "bad.npz")


def test_calibration_and_batch_shift_on_known_truth(tmp_path):
    ref = KnnOOD.fit(np.eye(12, dtype=np.float32), k=2)
    rng = np.random.default_rng(0)
    n = 400
    # two held-out frames whose scores do not overlap: frame a's quantiles are uniform on [0, 0.5),
    # b's on [0.5, 1): their means 0.25 and 0.75, variance (ddof 1) 0.125, of which 1 / (12 n) is the
    # sampling noise of a mean of n uniform quantiles
    scores = np.concatenate([rng.uniform(0, 1, n), rng.uniform(1, 2, n)])
    frames = np.repeat(["a", "b"], n)
    split = ref.calibrate(scores, frames)
    assert np.array_equal(split.heldout_scores, np.sort(scores)) and split.reference is ref.reference
    assert split.frame_spread == pytest.approx(np.sqrt(0.125 - 1 / (12 * n)), rel=0.02)
    np.testing.assert_allclose(split.quantile(np.array([-1.0, 1.0, 5.0])), [0.0, 0.5, 1.0])
    # frames drawn alike: no spread beyond the sampling noise (a few thousandths at most, by chance)
    alike = ref.calibrate(rng.normal(size=8 * n), np.repeat(list("abcdefgh"), n))
    assert alike.frame_spread < 0.01
    # a set's mean quantile in units of its null standard deviation (1 / (12 n) plus the frames' spread)
    q = np.full(86, 0.8)
    mean, z = split.batch_shift(q)
    assert mean == pytest.approx(0.8) and z == pytest.approx(0.3 / np.sqrt(1 / (12 * 86) + split.frame_spread**2))
    mean, z = alike.batch_shift(np.r_[q, np.nan])  # NaN (no score) ignored
    assert mean == pytest.approx(0.8) and z > 8
    assert alike.batch_shift(np.full(40, 0.5))[1] == pytest.approx(0.0)
    assert np.isnan(alike.batch_shift(np.array([]))).all()
    # not calibrated, or on one held-out frame: no null for a set, so no z
    assert np.isnan(ref.batch_shift(q)[1]) and not np.isnan(ref.batch_shift(q)[0])
    assert np.isnan(ref.calibrate(scores, np.repeat("a", 2 * n)).batch_shift(q)[1])
    with pytest.raises(ValueError, match="one frame per"):
        ref.calibrate(scores, frames[:10])
    # stored and read back; a reference stored without a calibration counts against its own scores
    split.save(tmp_path / "c.npz")
    back = KnnOOD.load(tmp_path / "c.npz")
    assert np.array_equal(back.heldout_scores, split.heldout_scores) and back.frame_spread == split.frame_spread
    ref.save(tmp_path / "r.npz")
    plain = KnnOOD.load(tmp_path / "r.npz")
    assert plain.heldout_scores is None and np.isnan(plain.frame_spread)


def test_stored_quantiles_count_against_the_validation_frames(trained, tmp_path, caplog):
    root, model, meta = trained
    stored = model_reference(root / "model" / "model.pt", meta)
    assert len(stored.heldout_scores) == meta["split_counts"]["val"]
    assert "validation-frame stamps" in meta["ood"]["quantile"]
    # fresh stamps of the training generator (new frames of the training sky) are flagged at the
    # nominal rate: 5 % beyond the 0.95 quantile (300 stamps: binomial standard error 1.3 %)
    X, _ = synthetic_stamps(300, seed=97)
    fresh = stored.quantile(stored.score(network_features(model, normalise(X))))
    assert 0.01 < np.mean(fresh >= 0.95) < 0.11, np.mean(fresh >= 0.95)
    # as sets: fresh stamps sit at the held-out frames' mean, the same stamps on an extended host far
    # above it (measured z -0.6 and 26 for 300 stamps, -1.0 and 7.5 for the first 30; seeds 97-99:
    # fresh -1.6 to 0.8, hosts 7.5 to 26)
    yy, xx = np.mgrid[:31, :31]
    host = 30 * np.exp(-((yy - 15) ** 2 + (xx - 15) ** 2) / (2 * 6.0**2))
    hosted = stored.quantile(
        stored.score(network_features(model, normalise(X + host * np.array([1, 1, 0])[:, None, None])))
    )
    assert abs(stored.batch_shift(fresh)[1]) < 3 and abs(stored.batch_shift(fresh[:30])[1]) < 3
    assert stored.batch_shift(hosted[:30])[1] > 3
    # infer reports the set's mean quantile and z in the table's meta (tests/helpers' image: fresh stamps)
    results, _ = results_folder(tmp_path)
    t = infer_cutouts(results / "sim" / "cutouts" / IMAGE, root / "model" / "model.pt", tmp_path / "t.ecsv")
    assert t.meta["ood_mean_quantile"] == pytest.approx(np.mean(t["ood_quantile"]))
    assert "z >= 3" in t.meta["ood_shift"]


def test_ood_features_have_unit_length(trained):
    _, model, _ = trained
    X = normalise(synthetic_stamps(50, seed=12)[0])
    f = network_features(model, X)
    np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1, rtol=1e-5)
    assert f.dtype == np.float32 and f.shape == (50, 2 * sum(CFG["widths"]))


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
