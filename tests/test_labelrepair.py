"""Label repair (rbflow.labelrepair): folds by frame, confident learning, repaired cubes, flipped labels found."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TRAIN_CFG as CFG
from helpers import make_cube

from rbflow.datacube import load_datacube
from rbflow.errors import InputError
from rbflow.io import read_table
from rbflow.labelrepair import find_label_issues, frame_folds, repair_cube, run_label_repair

torch.set_num_threads(2)


def test_frame_folds_keep_frames_whole_and_balance_counts():
    frames = np.array([f"f{i % 9}" for i in range(900)] + ["big"] * 300)
    fold = frame_folds(frames, folds=3, seed=0)
    for f in np.unique(frames):
        assert len(set(fold[frames == f])) == 1
    counts = np.bincount(fold)
    assert counts.max() - counts.min() <= 100  # greedy by size: at most one ordinary frame apart
    np.testing.assert_array_equal(fold, frame_folds(frames, folds=3, seed=0))
    with pytest.raises(InputError, match="folds"):
        frame_folds(np.array(["a", "b"]), folds=3, seed=0)


def test_confident_learning_on_known_probabilities():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 1, 0])
    p = np.array([0.9, 0.8, 0.95, 0.7, 0.1, 0.2, 0.05, 0.3, 0.05, 0.97])
    issue, conf = find_label_issues(y, p)
    # thresholds: t_real = mean P(real | y=1) = 0.68, t_bogus = mean P(bogus | y=0) = 0.676; the
    # real labelled bogus (0.97) and the bogus labelled real (0.05) are the only confident disagreements
    np.testing.assert_array_equal(issue, [0, 0, 0, 0, 0, 0, 0, 0, 1, 1])
    np.testing.assert_allclose(conf[[0, 4, 8, 9]], [0.9, 0.9, 0.05, 0.03])
    with pytest.raises(ValueError, match="both classes"):
        find_label_issues(np.ones(3), np.ones(3))


def test_repair_cube_drops_or_flips_and_lists_the_changes(tmp_path):
    cube = make_cube(tmp_path / "c.npz", 40, seed=1, n_frames=4)
    issue = np.zeros(40, bool)
    issue[[3, 7]] = True
    meta = repair_cube(cube, tmp_path / "drop.npz", issue, mode="drop")
    src, dropped = load_datacube(cube), load_datacube(tmp_path / "drop.npz")
    assert len(dropped["y"]) == 38 and meta["label_repair"]["changed"] == [str(src["ids"][3]), str(src["ids"][7])]
    repair_cube(cube, tmp_path / "flip.npz", issue, mode="flip")
    flipped = load_datacube(tmp_path / "flip.npz")
    np.testing.assert_array_equal(flipped["y"], np.where(issue, 1 - src["y"], src["y"]))
    meta = repair_cube(cube, tmp_path / "weight.npz", issue, mode="weight", weight=0.2)
    weighted = load_datacube(tmp_path / "weight.npz")
    np.testing.assert_array_equal(weighted["y"], src["y"])  # every stamp kept with its label
    assert meta["label_repair"]["weight"] == 0.2 and len(meta["label_repair"]["changed"]) == 2
    with pytest.raises(ValueError, match="mode"):
        repair_cube(cube, tmp_path / "x.npz", issue, mode="reweight")
    with pytest.raises(ValueError, match="weight must be"):
        repair_cube(cube, tmp_path / "x.npz", issue, mode="weight", weight=1.5)
    with pytest.raises(ValueError, match="entries"):
        repair_cube(cube, tmp_path / "x.npz", issue[:5])


def test_out_of_fold_pass_finds_most_flipped_labels(tmp_path):
    cube = make_cube(tmp_path / "clean.npz", 900, seed=4, n_frames=9)
    data = dict(np.load(cube))
    rng = np.random.default_rng(0)
    flipped = np.zeros(900, bool)
    flipped[rng.choice(900, 90, replace=False)] = True  # 10 %
    data["y"] = np.where(flipped, 1 - data["y"], data["y"])
    np.savez(tmp_path / "noisy.npz", **data)
    table = run_label_repair(tmp_path / "noisy.npz", tmp_path / "out", {**CFG, "epochs": 4}, folds=3, seed=2)
    assert table["issue"][0] and np.all(np.diff(table["self_confidence"][table["issue"]]) >= 0)  # issues first
    index = {str(i): k for k, i in enumerate(data["ids"])}
    found = np.zeros(900, bool)
    found[[index[str(i)] for i in table["id"][table["issue"]]]] = True
    recall = (found & flipped).sum() / flipped.sum()
    precision = (found & flipped).sum() / max(found.sum(), 1)
    # measured recall 0.74 (67 issues, all flipped: precision 1.00) with these seeds and 2 threads;
    # the missed flips are mostly faint reals the fold models call bogus too. A pass flagging at
    # random would have precision 0.10; the margins absorb run-to-run changes of thread counts.
    assert recall > 0.6 and precision > 0.8, (recall, precision)
    repaired = load_datacube(tmp_path / "out" / "datacube_repaired.npz")
    assert len(repaired["y"]) == 900 - found.sum()
    assert len(read_table(tmp_path / "out" / "label_issues.ecsv")) == 900


def test_cli_label_repair_and_the_scanning_page_queue(tmp_path):
    """`rbflow label-repair CUBE RESULTS/labelrepair` writes the table the page's mislabel queue reads."""
    from astropy.table import Table
    from helpers import SCAN_IMAGE as IMAGE
    from helpers import results_folder

    from rbflow.cli import main
    from rbflow.io import write_table
    from rbflow.scan import create_app

    cube = make_cube(tmp_path / "cube.npz", 160, seed=6, n_frames=8)
    args = ["label-repair", str(cube), str(tmp_path / "rep"), "--folds", "2", "--epochs", "1", "--seed", "1"]
    assert main([*args, "--mode", "weight", "--weight", "0.2"]) == 0
    table = read_table(tmp_path / "rep" / "label_issues.ecsv")
    assert len(table) == 160 and np.isfinite(table["p_oof"]).all() and set(table["fold"]) == {0, 1}
    repaired = load_datacube(tmp_path / "rep" / "datacube_repaired.npz")
    assert len(repaired["y"]) == 160 and repaired["meta"]["label_repair"]["weight"] == 0.2
    assert sorted(repaired["meta"]["label_repair"]["changed"]) == sorted(table["id"][table["issue"]])

    results, labels = results_folder(tmp_path / "scan", n=8)
    y = np.array([1, 0, 1, 0, 1, 0, 1])  # the folders' labels of IMAGE_0..6 (IMAGE_7 is unsorted)
    p_oof = np.array([0.9, 0.1, 0.05, 0.2, 0.7, 0.97, 0.8])  # IMAGE_2 and IMAGE_5 disagree
    issue, conf = find_label_issues(y, p_oof)
    ids = [f"{IMAGE}_{i}" for i in range(7)]
    write_table(
        Table(
            {
                "id": ids,
                "label": np.where(y == 1, "true", "false"),
                "p_oof": p_oof,
                "self_confidence": conf,
                "issue": issue,
            }
        ),
        results / "labelrepair" / "label_issues.ecsv",
    )
    listed = create_app(results, user="ada").test_client().get("/api/candidates?queue=mislabel").get_json()
    order = [c["id"] for c in listed["candidates"]]
    assert order[:2] == [ids[5], ids[2]]  # issues first, least self-confident first (0.03 < 0.05)
    assert "confident-learning label issue" in listed["candidates"][0]["why"]
    assert order[-1] == f"{IMAGE}_7" and listed["candidates"][-1]["why"] == "no score for this queue"
