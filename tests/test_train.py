"""Tests of rbflow.train and rbflow.model: learning a separable problem, exact resume, outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from astropy.table import Table
from helpers import make_cube

import rbflow.train as rtrain
from rbflow.datacube import NORMALISATION
from rbflow.errors import InputError
from rbflow.train import binary_metrics, dihedral, roc_auc, split_frames, train

torch.set_num_threads(2)

CFG = {"widths": [8, 16, 32], "epochs": 3, "batch_size": 64, "lr": 0.01, "patience": 3, "device": "cpu"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    cube = make_cube(root / "cube.npz", 1000, seed=11)
    meta = train(cube, root / "model", CFG, seed=7, checkpoint_dir=root / "ckpt")
    return root, meta


def test_learns_separable_problem(trained):
    root, meta = trained
    metrics = json.loads((root / "model" / "metrics.json").read_text())
    # the synthetic reals and bogus differ by construction (blob vs noise/dipole/cosmic ray): a CNN
    # separates them almost perfectly; 0.99 leaves room for the tiny training budget
    assert metrics["test"]["roc_auc"]["value"] > 0.99
    assert metrics["test"]["roc_auc"]["lo"] <= metrics["test"]["roc_auc"]["value"] <= metrics["test"]["roc_auc"]["hi"]
    assert {"fnr_at_fpr1", "fpr_at_fnr1", "accuracy", "mcc", "ece"} <= set(metrics["test"])
    assert len(metrics["by_snr"]) == 5
    assert 0 < meta["threshold"] < 1 and meta["temperature"] > 0
    # no frame in two sets
    s = meta["split"]
    assert not (set(s["train"]) & set(s["test"])) and not (set(s["val"]) & set(s["test"]))
    assert not (set(s["train"]) & set(s["val"]))
    for name in ("model.pt", "model.json", "model.onnx", "history.ecsv", "metrics.json", "training.png"):
        assert (root / "model" / name).stat().st_size > 0
    hist = Table.read(root / "model" / "history.ecsv")
    assert list(hist["epoch"]) == list(range(1, len(hist) + 1))
    state = torch.load(root / "model" / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert meta["channels"] == ["SCI", "REF", "DIFF"] and meta["normalisation"] == NORMALISATION
    assert meta["rbflow_version"]


def test_resume_gives_identical_weights(tmp_path, monkeypatch):
    cube = make_cube(tmp_path / "cube.npz", 300, seed=3, n_frames=6)
    cfg = {**CFG, "epochs": 3, "patience": 5}
    train(cube, tmp_path / "full", cfg, seed=1, checkpoint_dir=tmp_path / "ck_full")

    class Killed(Exception):
        pass

    saved = rtrain._save_checkpoint
    calls = []

    def save_then_die(state, path):
        saved(state, path)
        calls.append(1)
        if len(calls) == 1:
            raise Killed

    monkeypatch.setattr(rtrain, "_save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train(cube, tmp_path / "resumed", cfg, seed=1, checkpoint_dir=tmp_path / "ck_res")
    assert not (tmp_path / "resumed" / "model.pt").exists()
    meta = train(cube, tmp_path / "resumed", cfg, seed=1, checkpoint_dir=tmp_path / "ck_res")
    assert len(calls) == 3 and meta["training"]["epochs_run"] == 3
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "model.pt", weights_only=True)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    h_full = Table.read(tmp_path / "full" / "history.ecsv")
    h_res = Table.read(tmp_path / "resumed" / "history.ecsv")
    assert np.array_equal(h_full["val_loss"], h_res["val_loss"])


def test_split_grouped_by_frame():
    frames = np.repeat([f"f{i}" for i in range(10)], 5)
    y = np.tile([0, 1, 0, 1, 1], 10)
    a = split_frames(frames, y, val_frac=0.15, test_frac=0.2, seed=4)
    assert a == split_frames(frames, y, val_frac=0.15, test_frac=0.2, seed=4)
    assert a != split_frames(frames, y, val_frac=0.15, test_frac=0.2, seed=5)
    assert (len(a["test"]), len(a["val"]), len(a["train"])) == (2, 2, 6)
    with pytest.raises(InputError, match="at least 3"):
        split_frames(np.array(["a", "b"]), np.array([0, 1]), val_frac=0.1, test_frac=0.1, seed=0)


def test_dihedral_group():
    x = torch.arange(2 * 3 * 3, dtype=torch.float32).reshape(1, 2, 3, 3).repeat(8, 1, 1, 1)
    out = dihedral(x, torch.arange(8))
    # the 8 transforms of an asymmetric stamp are all different, and k=0 is the identity
    assert torch.equal(out[0], x[0])
    assert len({tuple(o.flatten().tolist()) for o in out}) == 8


def test_metrics_known_values():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    assert roc_auc(y, np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9])) == 1.0
    assert roc_auc(y, np.array([0.6, 0.7, 0.8, 0.9, 0.1, 0.2, 0.3, 0.4])) == 0.0
    assert roc_auc(y, np.full(8, 0.5)) == 0.5
    m = binary_metrics(y, np.array([0.1, 0.2, 0.3, 0.7, 0.6, 0.7, 0.8, 0.9]), threshold=0.5, seed=0, n_boot=50)
    assert m["accuracy"]["value"] == 7 / 8
    assert m["roc_auc"]["value"] == pytest.approx(14.5 / 16)  # the 0.7 vs 0.7 pair counts half
