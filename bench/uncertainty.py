"""Does the MC-dropout spread say where the model errs? Error rate per uncertainty decile (prints; not a test).

Usage: ``python bench/uncertainty.py RESULTS_DIR [--passes 20] [--seed 0] [--threads 2]``

``RESULTS_DIR`` is a run's ``results/{telescope}`` with ``model/model.pt``, ``training/datacube.npz`` and
``plots/checkinfer/test_predictions.ecsv`` (the held-out test frames' ids). The test stamps are sorted by
their MC-dropout spread (rbflow.uncertainty.mc_dropout) and cut into deciles; the script prints each
decile's spread range and the error rate of the model at its threshold, then the time one
``infer_cutouts`` call spends on the new columns for the first observed cutout folder.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rbflow.datacube import load_datacube
from rbflow.infer import infer_cutouts, load_model, predict
from rbflow.io import read_table
from rbflow.uncertainty import mc_dropout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--passes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    res = args.results
    model, meta = load_model(res / "model" / "model.pt")
    cube = load_datacube(res / "training" / "datacube.npz")
    test = np.asarray(read_table(res / "plots" / "checkinfer" / "test_predictions.ecsv")["id"]).astype(str)
    sel = np.isin(cube["ids"].astype(str), test)
    X, y = cube["X"][sel], cube["y"][sel]
    p = predict(model, meta, X)
    _, std = mc_dropout(model, meta, X, passes=args.passes, seed=args.seed)
    err = (p >= meta["threshold"]) != (y == 1)
    print(f"{len(y)} test stamps, {int(err.sum())} errors at threshold {meta['threshold']:.3f}")
    for k, chunk in enumerate(np.array_split(np.argsort(std, kind="stable"), 10)):
        print(
            f"decile {k + 1:2d}: spread {std[chunk].min():.4f}-{std[chunk].max():.4f}  error rate {err[chunk].mean():.3f}"
        )
    folder = next(iter(sorted((res / "obs" / "cutouts").iterdir())), None)
    if folder is not None:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            table = infer_cutouts(folder, res / "model" / "model.pt", Path(tmp) / "t.ecsv", mc_passes=args.passes)
            print(f"infer_cutouts on {folder.name}: {len(table)} cutouts in {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    main()
