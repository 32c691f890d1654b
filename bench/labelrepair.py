"""Label repair on synthetic stamps with a known fraction of flipped labels (prints; not a test).

Usage: ``python bench/labelrepair.py [--n 2000] [--flip 0.05 0.10] [--folds 4] [--epochs 6] [--weight 0.1] [--threads 2]``

For each flip fraction: a datacube of ``--n`` synthetic stamps (tests/helpers.py synthetic_stamps, reals
of S/N 3-30, 12 frames) gets that fraction of its labels flipped at random; rbflow.labelrepair finds
likely label errors out of fold; the script prints the recall and precision of the flipped stamps,
then the ROC AUC on an independent, correctly labelled test set (4000 stamps) of models trained on
the clean, the flipped, the repaired (issues dropped) and the down-weighted (issues kept with loss
weight ``--weight``, rbflow.train.stamp_weights) datacubes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from rbflow.datacube import NORMALISATION, normalise, write_datacube
from rbflow.infer import load_model, predict
from rbflow.labelrepair import repair_cube, run_label_repair
from rbflow.train import train

# the synthetic real/bogus stamps of the tests (tests/helpers.py; tests/ is not a package)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import synthetic_stamps  # noqa: E402


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC by the rank-sum formula (ties count half)."""
    pos, neg = p[y == 1], p[y == 0]
    return float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())


def _cube(path: Path, X: np.ndarray, y: np.ndarray, frames: np.ndarray) -> Path:
    ids = np.array([f"c{i:05d}" for i in range(len(y))])
    meta = {"cutout_size": 31, "stamp_size": 31, "crop": None, "channels": ["SCI", "REF", "DIFF"]}
    write_datacube(
        path,
        X,
        y,
        ids=ids,
        image=frames,
        frame=frames,
        mag=np.full(len(y), np.nan),
        snr=np.full(len(y), np.nan),
        channels=meta["channels"],
        meta={**meta, "normalisation": NORMALISATION},
    )
    return path


def _test_auc(cube: Path, work: Path, cfg: dict, Xt: np.ndarray, yt: np.ndarray, seed: int) -> float:
    train(cube, work / "model", cfg, seed=seed, checkpoint_dir=work / "ckpt")
    model, meta = load_model(work / "model" / "model.pt")
    return _auc(yt, predict(model, meta, Xt))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--flip", type=float, nargs="+", default=[0.05, 0.10])
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--weight", type=float, default=0.1, help="loss weight of the issues (mode weight)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    cfg = {"widths": [8, 16, 32], "epochs": args.epochs, "batch_size": 64, "lr": 0.01, "patience": 3, "device": "cpu"}
    X, y = synthetic_stamps(args.n, snr=(3.0, 30.0), seed=args.seed)
    X = normalise(X)
    frames = np.array([f"f{i % 12:02d}" for i in range(args.n)])
    Xt, yt = synthetic_stamps(4000, snr=(3.0, 30.0), seed=args.seed + 1000)
    Xt = normalise(Xt)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        clean_auc = _test_auc(_cube(root / "clean.npz", X, y, frames), root / "clean", cfg, Xt, yt, args.seed)
        for frac in args.flip:
            rng = np.random.default_rng(args.seed + int(frac * 1000))
            flipped = np.zeros(args.n, bool)
            flipped[rng.choice(args.n, int(round(frac * args.n)), replace=False)] = True
            noisy = _cube(root / f"noisy{frac}.npz", X, np.where(flipped, 1 - y, y), frames)
            table = run_label_repair(noisy, root / f"repair{frac}", cfg, folds=args.folds, seed=args.seed)
            order = np.argsort([int(i[1:]) for i in table["id"]])
            issue = np.asarray(table["issue"])[order]
            found = int((issue & flipped).sum())
            weighted = root / f"weighted{frac}.npz"
            repair_cube(noisy, weighted, issue, mode="weight", weight=args.weight)
            row = {
                "flip_fraction": frac,
                "flipped": int(flipped.sum()),
                "issues": int(issue.sum()),
                "recall": found / max(int(flipped.sum()), 1),
                "precision": found / max(int(issue.sum()), 1),
                "test_auc_clean": clean_auc,
                "test_auc_flipped": _test_auc(noisy, root / f"noisy{frac}", cfg, Xt, yt, args.seed),
                "test_auc_repaired": _test_auc(
                    root / f"repair{frac}" / "datacube_repaired.npz", root / f"rep{frac}", cfg, Xt, yt, args.seed
                ),
                "test_auc_weighted": _test_auc(weighted, root / f"w{frac}", cfg, Xt, yt, args.seed),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {"n": args.n, "folds": args.folds, "epochs": args.epochs, "weight": args.weight, "results": rows}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
