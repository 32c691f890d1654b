"""Tests of rbflow.train and rbflow.model: learning a separable problem, exact resume, outputs."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from astropy.table import Table
from helpers import TRAIN_CFG as CFG
from helpers import make_cube

import rbflow.train as rtrain
from rbflow.cli import main
from rbflow.config import schema_defaults
from rbflow.datacube import NORMALISATION
from rbflow.errors import InputError
from rbflow.infer import load_model
from rbflow.train import dihedral, split_frames, stamp_weights, train, train_config, weighted_loss

torch.set_num_threads(2)


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
    for name in ("model.pt", "model.json", "model.onnx", "history.ecsv", "metrics.json", "training.png", "model.ood"):
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

    saved = rtrain.save_checkpoint
    calls = []

    def save_then_die(path, **state):
        saved(path, **state)
        calls.append(1)
        if len(calls) == 1:
            raise Killed

    monkeypatch.setattr(rtrain, "save_checkpoint", save_then_die)
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


def test_config_defaults_are_the_schema_s():
    assert train_config({}) == schema_defaults("config.schema.yaml", "train")
    assert train_config({"epochs": 2})["epochs"] == 2
    with pytest.raises(InputError, match=r"unknown keys \['epoch'\]"):
        train_config({"epoch": 2})


def test_fine_tune_starts_from_init(trained, tmp_path):
    root, _ = trained
    init_pt = root / "model" / "model.pt"
    cube = make_cube(tmp_path / "cube2.npz", 300, seed=5, n_frames=6)
    meta = train(
        cube, tmp_path / "ft", {**CFG, "epochs": 1}, seed=2, checkpoint_dir=tmp_path / "ck", init=root / "model"
    )
    init = meta["init"]
    assert init["path"] == str(init_pt) and init["sha256"] == hashlib.sha256(init_pt.read_bytes()).hexdigest()
    assert json.loads((tmp_path / "ft" / "model.json").read_text())["init"] == init
    # the validation loss before fine-tuning is the init model's class-weighted loss on the new validation frames
    model, _ = load_model(init_pt)
    data = np.load(cube)
    y, frames = data["y"], data["frame"]
    val, trn = np.isin(frames, meta["split"]["val"]), np.isin(frames, meta["split"]["train"])
    with torch.no_grad():
        logits = model(torch.from_numpy(data["X"][val]))
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, torch.from_numpy(y[val]).float(), reduction="none"
    ).numpy()
    n_pos = y[trn].sum()
    w = np.where(y[val] == 1, trn.sum() / (2 * n_pos), trn.sum() / (2 * (trn.sum() - n_pos)))
    # float32 convolutions in batches of another size: agreement to ~1e-6 relative
    assert init["val_loss_before"] == pytest.approx((bce * w).sum() / w.sum(), rel=1e-5)
    # a model trained on the same kind of stamps starts far below a fresh model's loss (~ln 2 = 0.69)
    assert init["val_loss_before"] < 0.3
    # a fresh training records no init
    assert json.loads((root / "model" / "model.json").read_text())["init"] is None


def _variant(cube: Path, path: Path, *, channels: list[int] | None = None, size: int | None = None) -> Path:
    """Copy of a datacube with a subset of its channels or stamps cropped to ``size`` pixels."""
    data = dict(np.load(cube))
    meta = json.loads(str(data["meta"]))
    if channels is not None:
        data["X"] = data["X"][:, channels]
        data["channels"] = data["channels"][channels]
        meta["channels"] = [str(c) for c in data["channels"]]
    if size is not None:
        cut = (data["X"].shape[-1] - size) // 2
        data["X"] = np.ascontiguousarray(data["X"][..., cut : cut + size, cut : cut + size])
        meta["stamp_size"] = size
    data["meta"] = np.asarray(json.dumps(meta))
    np.savez(path, **data)
    return path


def test_fine_tune_refuses_a_mismatch(trained, tmp_path):
    root, _ = trained
    cube = make_cube(tmp_path / "cube.npz", 60, seed=1, n_frames=6)
    kw = {"seed": 0, "checkpoint_dir": tmp_path / "ck", "init": root / "model"}
    json_name = re.escape(str(root / "model" / "model.json"))
    with pytest.raises(InputError, match=rf"'{json_name}' does not fit.*widths \[8, 16, 32\] \(key 'train.widths'"):
        train(cube, tmp_path / "out", {**CFG, "widths": [16, 32, 64]}, **kw)
    with pytest.raises(InputError, match=r"architecture 'compact' \(key 'train.architecture' is 'vgg'\)"):
        train(cube, tmp_path / "out", {**CFG, "architecture": "vgg"}, **kw)
    two = _variant(cube, tmp_path / "two.npz", channels=[0, 2])
    with pytest.raises(InputError, match=r"channels \['SCI', 'REF', 'DIFF'\] \(the datacube's are \['SCI', 'DIFF'\]\)"):
        train(two, tmp_path / "out", CFG, **kw)
    small = _variant(cube, tmp_path / "small.npz", size=21)
    with pytest.raises(InputError, match=r"stamp size 31 px \(the datacube's is 21 px\)"):
        train(small, tmp_path / "out", CFG, **kw)
    with pytest.raises(InputError, match="does not exist"):
        train(cube, tmp_path / "out", CFG, **{**kw, "init": tmp_path / "none" / "model.pt"})
    assert not (tmp_path / "out").exists() and not (tmp_path / "ck").exists()


def test_cli_train_options(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(rtrain, "train", lambda *a, **k: calls.append((a, k)))
    assert main(["train", "c.npz", str(tmp_path / "out"), "--init", "m"]) == 0
    (cube, out, cfg), kw = calls[-1]
    # the CLI's seed default is the workflow's (the schema's)
    assert kw["seed"] == schema_defaults("config.schema.yaml")["seed"] and kw["init"] == Path("m") and cfg == {}
    assert kw["checkpoint_dir"] == tmp_path / "out.checkpoint"
    (tmp_path / "run.yaml").write_text("seed: 5\ntrain:\n  epochs: 2\n  lr: 0.01\n")
    assert main(["train", "c.npz", "o", "--config", str(tmp_path / "run.yaml"), "--epochs", "3"]) == 0
    (_, _, cfg), kw = calls[-1]
    assert kw["seed"] == 5 and cfg == {"epochs": 3, "lr": 0.01} and kw["init"] is None
    assert main(["train", "c.npz", "o", "--config", str(tmp_path / "run.yaml"), "--seed", "9"]) == 0
    assert calls[-1][1]["seed"] == 9


def test_stamp_weights_scale_the_loss_of_single_stamps():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    y = torch.tensor([1.0, 0.0, 0.0, 1.0])
    class_w = torch.tensor([1.5, 0.75])
    # a stamp of weight 0 is as if absent; weight 1 everywhere is the plain class-weighted loss
    zero = weighted_loss(logits, y, class_w, stamp_w=torch.tensor([1.0, 1.0, 0.0, 1.0]))
    torch.testing.assert_close(zero, weighted_loss(logits[[0, 1, 3]], y[[0, 1, 3]], class_w))
    ones = weighted_loss(logits, y, class_w, stamp_w=torch.ones(4))
    torch.testing.assert_close(ones, weighted_loss(logits, y, class_w))


def test_training_down_weights_the_label_repair_issues(tmp_path):
    from rbflow.datacube import load_datacube
    from rbflow.labelrepair import repair_cube

    cube = make_cube(tmp_path / "cube.npz", 300, seed=5, n_frames=6)
    issue = np.zeros(300, bool)
    issue[::10] = True  # 30 stamps
    repair_cube(cube, tmp_path / "weighted.npz", issue, mode="weight", weight=0.25)
    w = stamp_weights(load_datacube(tmp_path / "weighted.npz"))
    np.testing.assert_array_equal(w, np.where(issue, 0.25, 1.0))
    assert (stamp_weights(load_datacube(cube)) == 1).all()
    meta = train(tmp_path / "weighted.npz", tmp_path / "m", {**CFG, "epochs": 1}, seed=1, checkpoint_dir=tmp_path / "c")
    record = meta["label_repair"]
    ids = load_datacube(cube)["ids"].astype(str)
    assert record["mode"] == "weight" and record["weight"] == 0.25 and record["changed"] == list(ids[issue])
    train_frames = np.isin(load_datacube(cube)["frame"].astype(str), meta["split"]["train"])
    assert record["down_weighted_in_training"] == int((issue & train_frames).sum()) > 0
