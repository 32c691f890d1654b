"""What fine-tuning on a few dozen alert labels does: cross-validation over objects (prints; not a test).

Usage::

    python bench/alerts_finetune.py --init results/demo/model [--folds 5] [--epochs 30] [--seed 0]
        [--packets ../shared/data/ztf-alerts-dev] [--bogus-below 0.1] [--real-above 0.99]

The development packets are labelled by ZTF's own deep real/bogus score (weak labels: ``drb <
--bogus-below`` bogus, ``drb > --real-above`` real, the rest left out) and imported with
:func:`rbflow.alerts.import_alerts` (stamps cropped to the init model's size). The objects are dealt
into ``--folds`` folds (seeded, both classes in every fold when possible); for each fold, the other
folds form a datacube and

* ``zero-shot``: the init model, unchanged, scores the held-out fold;
* ``scratch``: :func:`rbflow.train.train` from random weights on the other folds;
* ``fine-tune``: :func:`rbflow.train.train` with ``init=`` the init model's folder.

Printed per method: ROC AUC over the pooled held-out predictions (every alert scored once, by a
model that never saw its object), accuracy at P(real) = 0.5, and the per-fold AUC range. The
``fine-tune`` rows need ``rbflow.train.train(..., init=MODEL_DIR)`` (``rbflow train --init``); with
an rbflow whose ``train`` lacks ``init`` they are reported as not run.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from rbflow.alerts import import_alerts
from rbflow.datacube import load_datacube, write_datacube
from rbflow.infer import load_model, predict
from rbflow.metrics import roc_auc
from rbflow.train import train

DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ztf-alerts-dev"


def object_folds(objects: np.ndarray, y: np.ndarray, k: int, *, seed: int) -> np.ndarray:
    """Fold number of each stamp: objects dealt at random, reals and bogus objects separately."""
    rng = np.random.default_rng(seed)
    fold_of: dict[str, int] = {}
    for label in (1, 0):
        names = rng.permutation(np.unique(objects[y == label]))
        offset = int(rng.integers(k))
        for i, name in enumerate(names):
            fold_of.setdefault(str(name), (i + offset) % k)
    return np.array([fold_of[str(o)] for o in objects])


def fold_cube(cube: dict, keep: np.ndarray, path: Path) -> Path:
    """Write the stamps ``keep`` of ``cube`` as a datacube."""
    write_datacube(
        path,
        cube["X"][keep],
        cube["y"][keep],
        ids=cube["ids"][keep],
        image=cube["image"][keep],
        frame=cube["frame"][keep],
        mag=cube["mag"][keep],
        snr=cube["snr"][keep],
        channels=list(cube["channels"]),
        meta=cube["meta"],
    )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", type=Path, required=True, help="folder of the model to start from (model.pt, .json)")
    parser.add_argument("--packets", type=Path, default=DEV, help="alert packets (files or folder)")
    parser.add_argument("--folds", type=int, default=5, help="folds over objects")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs per fold")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--bogus-below", type=float, default=0.1, help="drb below which an alert is bogus")
    parser.add_argument("--real-above", type=float, default=0.99, help="drb above which an alert is real")
    parser.add_argument("--seed", type=int, default=0, help="seed of the folds and of training")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    init_model, init_meta = load_model(args.init / "model.pt")
    size = int(init_meta["stamp_size"])
    can_init = "init" in inspect.signature(train).parameters
    cfg = {"epochs": args.epochs, "batch_size": 16, "lr": args.lr, "patience": args.epochs, "device": "cpu"}
    cfg["widths"] = list(init_meta["model"]["widths"])
    cfg["architecture"] = init_meta["model"]["architecture"]

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        import_alerts(
            [args.packets],
            tmp / "all.npz",
            score_column="drb",
            bogus_below=args.bogus_below,
            real_above=args.real_above,
            crop=size,
        )
        cube = load_datacube(tmp / "all.npz")
        y = cube["y"]
        folds = object_folds(cube["frame"], y, args.folds, seed=args.seed)
        print(
            f"{len(y)} labelled alerts ({int(y.sum())} real, {int((y == 0).sum())} bogus) of "
            f"{len(np.unique(cube['frame']))} objects, {args.folds} folds over objects, init model {args.init} "
            f"({size} px)"
        )
        methods = ["zero-shot", "scratch"] + (["fine-tune"] if can_init else [])
        pooled = {m: np.full(len(y), np.nan) for m in methods}
        per_fold: dict[str, list[float]] = {m: [] for m in methods}
        for k in range(args.folds):
            test, rest = folds == k, folds != k
            assert not set(cube["frame"][test]) & set(cube["frame"][rest])  # one object, one side
            train_cube = fold_cube(cube, rest, tmp / f"fold{k}.npz")
            for method in methods:
                if method == "zero-shot":
                    model, meta = init_model, init_meta
                else:
                    out = tmp / f"{method}{k}"
                    kwargs = {"init": args.init} if method == "fine-tune" else {}
                    train(train_cube, out, cfg, seed=args.seed + k, checkpoint_dir=tmp / f"ckpt_{method}{k}", **kwargs)
                    model, meta = load_model(out / "model.pt")
                p = predict(model, meta, cube["X"][test])
                pooled[method][test] = p
                if len(np.unique(y[test])) == 2:
                    per_fold[method].append(roc_auc(y[test], p))
    print(f"{'method':<10} {'AUC':>6} {'acc@0.5':>8} {'fold AUC min-max':>18}")
    for method in methods:
        p = pooled[method]
        folds_auc = per_fold[method]
        span = f"{min(folds_auc):.3f}-{max(folds_auc):.3f}" if folds_auc else "n/a"
        print(f"{method:<10} {roc_auc(y, p):6.3f} {np.mean((p >= 0.5) == y):8.3f} {span:>18}")
    if not can_init:
        print("fine-tune: not run, this rbflow's train() has no 'init' argument (rbflow train --init)")


if __name__ == "__main__":
    main()
