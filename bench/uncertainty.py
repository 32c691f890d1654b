"""Uncertainty and OOD score of a trained run: error rate per uncertainty decile, OOD AUROCs, infer time (prints).

Usage: ``python bench/uncertainty.py RESULTS_DIR [--ztf DIR] [--passes 20] [--seed 0] [--threads 2]``

``RESULTS_DIR`` is a run's ``results/{telescope}`` with ``model/model.pt`` (``model.json`` beside it) and
``training/datacube.npz``; the held-out test stamps are those of the test frames named in model.json's
``split``. The script prints:

1. the test stamps cut into deciles of their MC-dropout spread (rbflow.uncertainty.mc_dropout): each
   decile's spread range and the model's error rate at its threshold;
2. with ``--ztf``, the AUROC of the OOD score for alert packets (read with rbflow.alerts, cut to the
   model's stamp size and normalised as ``rbflow alerts score`` does) against the test stamps, and
   for the test stamps against held-out training-frame stamps (near 0.5: the score does not flag
   the model's own kind of data), for the stored score (deep kNN on normalised features, reference:
   4000 training-frame stamps, as rbflow.train writes it) and for the class-mean Mahalanobis
   distance on block mean/std features that rbflow used before (same reference stamps);
3. the wall and CPU time of ``infer_cutouts`` on the first observed cutout folder (best of 2 after a
   warm-up), with the OOD reference
   fitted from the datacube in the job (the cost before the reference was stored) and read from the
   model's ``model.ood`` (a copy of the model with the reference written as train writes it), in the
   same process, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rbflow.datacube import crop_stamps, load_datacube, normalise
from rbflow.infer import infer_cutouts, load_model, predict
from rbflow.io import file_sha256
from rbflow.uncertainty import OOD_FILE, KnnOOD, mc_dropout, network_features


def _auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    """Probability that a random ``pos`` scores above a random ``neg`` (ties count half)."""
    return float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())


def _mahalanobis_before(model: torch.nn.Module, ref: np.ndarray, y_ref: np.ndarray, sets: dict) -> dict:
    """The previous score: class-mean Mahalanobis distance, shared covariance shrunk 5 %, block mean/std features."""
    relus = [m for m in model.features.modules() if isinstance(m, torch.nn.ReLU)]

    def feats(X: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(X), 512):
            store: list[torch.Tensor] = []
            hooks = [m.register_forward_hook(lambda _m, _i, o, s=store: s.append(o)) for m in relus]
            with torch.no_grad():
                model(torch.as_tensor(X[i : i + 512]))
            for h in hooks:
                h.remove()
            out.append(torch.cat([t for o in store for t in (o.mean(dim=(2, 3)), o.std(dim=(2, 3)))], 1).double())
        return torch.cat(out).numpy()

    f = feats(ref)
    classes = np.unique(y_ref)
    means = np.stack([f[y_ref == c].mean(axis=0) for c in classes])
    centred = f - means[np.searchsorted(classes, y_ref)]
    cov = centred.T @ centred / len(f)
    cov = 0.95 * cov + 0.05 * np.trace(cov) / len(cov) * np.eye(len(cov))
    prec = np.linalg.inv(cov)

    def score(g: np.ndarray) -> np.ndarray:
        return np.sqrt(np.min([np.sum(((g - m) @ prec) * (g - m), axis=1) for m in means], axis=0))

    return {k: score(feats(v)) for k, v in sets.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--ztf", type=Path, help="folder of alert packets for the OOD AUROC")
    parser.add_argument("--passes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    res = args.results
    model_path = res / "model" / "model.pt"
    model, meta = load_model(model_path)
    cube_path = res / "training" / "datacube.npz"
    cube = load_datacube(cube_path)
    frames = cube["frame"].astype(str)
    test = np.isin(frames, meta["split"]["test"])
    X, y = cube["X"][test], cube["y"][test]
    p = predict(model, meta, X)
    _, std = mc_dropout(model, meta, X, passes=args.passes, seed=args.seed)
    err = (p >= meta["threshold"]) != (y == 1)
    print(
        f"{len(y)} test stamps (frames {meta['split']['test']}), {int(err.sum())} errors at threshold {meta['threshold']:.3f}"
    )
    print("| decile | P(real) spread | stamps | error rate |\n|---|---|---|---|")
    for k, chunk in enumerate(np.array_split(np.argsort(std, kind="stable"), 10)):
        print(f"| {k + 1} | {std[chunk].min():.4f}-{std[chunk].max():.4f} | {len(chunk)} | {err[chunk].mean():.3f} |")

    # the reference as rbflow.train fits it: at most 4000 stamps of the training frames
    train_idx = np.flatnonzero(np.isin(frames, meta["split"]["train"]))
    rng = np.random.default_rng(args.seed)
    pick = rng.permutation(train_idx)
    ref_idx, held_idx = np.sort(pick[:4000]), np.sort(pick[4000:7000])
    knn = KnnOOD.fit(network_features(model, cube["X"][ref_idx]))
    if args.ztf is not None:
        from rbflow.alerts import read_alerts

        _, raw, _ = read_alerts([args.ztf])
        sets = {
            "ztf": normalise(crop_stamps(raw, int(meta["stamp_size"]))),
            "test": X,
            "held-out train": cube["X"][held_idx],
        }
        scores = {
            "before (Mahalanobis, class means)": _mahalanobis_before(
                model, cube["X"][ref_idx], cube["y"][ref_idx], sets
            ),
            "now (kNN, k=10, normalised)": {k: knn.score(network_features(model, v)) for k, v in sets.items()},
        }
        print(
            f"\nOOD AUROC: {len(raw)} packets of {args.ztf}, {len(X)} test stamps, {len(held_idx)} held-out training-frame stamps"
        )
        print("| score | packets vs test | test vs held-out train |\n|---|---|---|")
        for name, s in scores.items():
            print(f"| {name} | {_auroc(s['test'], s['ztf']):.3f} | {_auroc(s['held-out train'], s['test']):.3f} |")

    folder = next(iter(sorted(d for d in (res / "obs" / "cutouts").iterdir() if d.is_dir())), None)
    if folder is not None:
        with tempfile.TemporaryDirectory() as tmp:
            stored = Path(tmp) / "model"
            stored.mkdir()
            shutil.copy(model_path, stored / "model.pt")
            knn.save(stored / OOD_FILE)
            entry = {"file": OOD_FILE, "sha256": file_sha256(stored / OOD_FILE), "k": knn.k}
            (stored / "model.json").write_text(json.dumps({**meta, "ood": entry}))
            n = len(list(folder.glob("*.fits")))
            runs = {
                "reference from the datacube": {"model_path": model_path, "reference_cube": cube_path},
                "stored reference": {"model_path": stored / "model.pt"},
            }
            out = Path(tmp) / "t.ecsv"
            infer_cutouts(folder, out_table=out, mc_passes=args.passes, **runs["stored reference"])  # warm-up
            times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
            for _ in range(2):
                for name, kwargs in runs.items():
                    w0, c0 = time.perf_counter(), time.process_time()
                    infer_cutouts(folder, out_table=out, mc_passes=args.passes, **kwargs)
                    times[name].append((time.perf_counter() - w0, time.process_time() - c0))
            print(
                f"\ninfer_cutouts on {folder.name} ({n} cutouts, {args.passes} MC passes), best of 2 after a warm-up:"
            )
            best = {name: min(t, key=lambda wc: wc[1]) for name, t in times.items()}
            for name, (wall, cpu) in best.items():
                print(f"  {name}: {wall:.2f} s wall, {cpu:.2f} CPU-s")
            ratio = best["stored reference"][1] / best["reference from the datacube"][1]
            print(f"  CPU ratio stored / from the datacube: {ratio:.3f}")


if __name__ == "__main__":
    main()
