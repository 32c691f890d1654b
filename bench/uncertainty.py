"""Uncertainty and OOD score of a trained run: error rate per uncertainty decile, OOD AUROCs, infer time (prints).

Usage: ``python bench/uncertainty.py RESULTS_DIR [--ztf DIR] [--passes 20] [--seed 0] [--threads 2]``

``RESULTS_DIR`` is a run's ``results/{telescope}`` with ``model/model.pt`` (``model.json`` beside it) and
``training/datacube.npz``; the held-out test stamps are those of the test frames named in model.json's
``split``. The script prints:

1. the test stamps cut into deciles of their MC-dropout spread (rbflow.uncertainty.mc_dropout): each
   decile's spread range and the model's error rate at its threshold;
2. with ``--ztf``, the AUROC of each candidate OOD score for alert packets (read with rbflow.alerts,
   cut to the model's stamp size and normalised as ``rbflow alerts score`` does) against the test
   stamps, and for the test stamps against held-out training-frame stamps (near 0.5: the score does
   not flag the model's own kind of data), side by side, all fitted on the same reference (4000
   training-frame stamps, as rbflow.train picks them):

   - the stored score (deep kNN, k=10, on the L2-normalised mean+max features of the first
     convolution block, Sun et al. 2022 on an early layer as Abdelzad et al. 2019:
     rbflow.uncertainty.fit_reference);
   - the score stored before: the same on all blocks' mean+max features together;
   - the class-mean Mahalanobis distance on block mean/std features that rbflow used before;
   - deep kNN per block (mean+max, and the channel-correlation matrix of the block's output),
     each block's distance standardised on the reference's own leave-one-out distances and the
     standardised distances averaged;
   - multi-layer Mahalanobis (Lee et al. 2018): per block, the distance of the channel means to the
     nearest class mean under the shared covariance, standardised on the reference and summed;
   - Gram-matrix deviations (Sastry & Oore 2020): per block and order p = 1..5, the row sums of the
     p-th order Gram matrix, their min/max over the reference stamps of the predicted class, the
     relative deviation outside that range, normalised per block by its mean on a held-out quarter
     of the reference and summed;

   - ViM (Wang et al. 2022, "ViM: out-of-distribution with virtual-logit matching"): the norm of the
     head's input features off their principal subspace (half the dimensions, origin at the point
     the logit maps to 0), scaled to the mean |logit| on the reference, as a virtual logit next to
     the logits (z, 0); the score is its softmax probability;
   - 1 - the maximum softmax probability (Hendrycks & Gimpel 2017) of the calibrated P(real);
   - kNN (k=10) on per-channel input statistics of the stamp (fractions beyond +-3 sigma, clipped
     standard deviation, lag-1 and lag-2 autocorrelations, kurtosis, centre mean, and the SCI-DIFF
     and REF-DIFF correlations), each mapped to a normal score by its rank among the reference's;
   - background-corrected: the stored score's normal score (its rank among the reference's
     leave-one-out scores) minus that of the first block's kNN with the pooling restricted to the
     background annulus (radius > 8 px): the likelihood ratio of Ren et al. 2019 ("Likelihood
     ratios for out-of-distribution detection"), kNN distances standing for densities; it discounts
     what is unusual in the whole stamp, so a shift of the whole stamp (another survey's noise
     everywhere) scores as typical: not stored; and the maximum of the two normal scores;

   then what differs: the first block's kNN with its pooling restricted to the centre (radius 6 px,
   where the candidate is) and to the background annulus (radius > 8 px), and the spread of the
   DIFF's background noise autocorrelation (pixels within 3 sigma, away from any pixel beyond);
   and, as a ceiling for these unsupervised scores, a supervised linear probe (L2-regularised
   logistic regression on standardised block features, 5-fold cross-validated, seeded) trained to
   tell the packets from the test stamps, and the same probe telling the test stamps from held-out
   training-frame stamps: whether the network's features carry the difference at all (a probe sees
   the packets; no stored score may), and how far apart two sets of the demo's own frames already are;
3. the CPU time of the stored OOD score (features and neighbour search) on the test stamps against
   the plain P(real) pass on them; and the wall and CPU time of ``infer_cutouts`` on the first
   observed cutout folder (best of 2 after a warm-up), with the OOD reference fitted from the
   datacube in the job (the cost before the reference was stored) and read from the model's
   ``model.ood`` (a copy of the model with the reference written as train writes it), in the same
   process, and their ratio.
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
from rbflow.uncertainty import OOD_FILE, KnnOOD, first_block_columns, mc_dropout, network_features


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


def _block_stats(model: torch.nn.Module, X: np.ndarray, *, orders: int = 5) -> dict[str, list[np.ndarray]]:
    """Per block (ReLU output): channel mean+max, upper-triangle channel correlations, Gram row sums per order."""
    relus = [m for m in model.features.modules() if isinstance(m, torch.nn.ReLU)]
    out: dict[str, list[list[np.ndarray]]] = {"meanmax": [], "mean": [], "corr": [], "gram": []}
    for key in out:
        out[key] = [[] for _ in relus]
    for i in range(0, len(X), 512):
        store: list[torch.Tensor] = []
        hooks = [m.register_forward_hook(lambda _m, _i, o, s=store: s.append(o.detach().clone())) for m in relus]
        with torch.no_grad():
            model(torch.as_tensor(np.ascontiguousarray(X[i : i + 512])))
        for h in hooks:
            h.remove()
        for b, o in enumerate(store):
            f = o.reshape(o.shape[0], o.shape[1], -1).double()
            out["mean"][b].append(f.mean(2).numpy())
            out["meanmax"][b].append(torch.cat([f.mean(2), f.amax(2)], 1).numpy())
            g = f @ f.transpose(1, 2) / f.shape[2]
            d = torch.sqrt(torch.diagonal(g, dim1=1, dim2=2).clamp_min(1e-12))
            iu = np.triu_indices(f.shape[1], 1)
            out["corr"][b].append((g / d[:, :, None] / d[:, None, :]).numpy()[:, iu[0], iu[1]])
            rows = []
            for p in range(1, orders + 1):
                r = (f**p @ (f**p).transpose(1, 2)).sum(2)
                rows.append((r.sign() * r.abs() ** (1 / p)).numpy())
            out["gram"][b].append(np.concatenate(rows, 1))
    return {k: [np.concatenate(v) for v in blocks] for k, blocks in out.items()}


def _unit(f: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(f, axis=1, keepdims=True)
    return (f / np.where(n > 0, n, 1.0)).astype(np.float32)


def _euclid_knn(ref: KnnOOD, x: np.ndarray) -> np.ndarray:
    """Euclidean distance of rows ``x`` to their ``ref.k``-th nearest row of ``ref.reference`` (not unit vectors)."""
    r = ref.reference.astype(np.float64)
    d2 = (x**2).sum(1)[:, None] + (r**2).sum(1)[None] - 2 * x @ r.T
    return np.sqrt(np.maximum(np.partition(d2, ref.k - 1, axis=1)[:, ref.k - 1], 0))


def _knn_per_block(ref: list[np.ndarray], sets: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    """Deep kNN (k=10) per block on unit features, standardised on the reference's leave-one-out distances, averaged."""
    total = {k: 0.0 for k in sets}
    for b, r in enumerate(ref):
        knn = KnnOOD.fit(_unit(r))
        mu, sd = knn.reference_scores.mean(), knn.reference_scores.std()
        for k, v in sets.items():
            total[k] = total[k] + (knn.score(_unit(v[b])) - mu) / sd / len(ref)
    return total


def _lee_mahalanobis(
    ref: list[np.ndarray], y_ref: np.ndarray, sets: dict[str, list[np.ndarray]]
) -> dict[str, np.ndarray]:
    """Lee et al. 2018: per block, distance to the nearest class mean (shared covariance, 5 % shrinkage), standardised, summed."""
    total = {k: 0.0 for k in sets}
    for b, f in enumerate(ref):
        classes = np.unique(y_ref)
        means = np.stack([f[y_ref == c].mean(axis=0) for c in classes])
        centred = f - means[np.searchsorted(classes, y_ref)]
        cov = centred.T @ centred / len(f)
        prec = np.linalg.inv(0.95 * cov + 0.05 * np.trace(cov) / len(cov) * np.eye(len(cov)))

        def score(g: np.ndarray, means=means, prec=prec) -> np.ndarray:
            return np.sqrt(np.min([np.sum(((g - m) @ prec) * (g - m), axis=1) for m in means], axis=0))

        own = score(f)
        for k, v in sets.items():
            total[k] = total[k] + (score(v[b]) - own.mean()) / own.std()
    return total


def _gram_deviation(
    ref: list[np.ndarray], pred_ref: np.ndarray, sets: dict[str, list[np.ndarray]], preds: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Sastry & Oore 2020: relative deviation of the Gram row sums outside the reference's per-class range."""
    n_fit = 3 * len(pred_ref) // 4  # min/max on three quarters, the normaliser on the last quarter
    total = {k: 0.0 for k in sets}
    for b, f in enumerate(ref):
        bounds = {c: (f[:n_fit][pred_ref[:n_fit] == c].min(0), f[:n_fit][pred_ref[:n_fit] == c].max(0)) for c in (0, 1)}

        def dev(g: np.ndarray, pred: np.ndarray, bounds=bounds) -> np.ndarray:
            out = np.empty(len(g))
            for c, (lo, hi) in bounds.items():
                m = pred == c
                out[m] = (
                    np.maximum(lo - g[m], 0) / (np.abs(lo) + 1e-6) + np.maximum(g[m] - hi, 0) / (np.abs(hi) + 1e-6)
                ).sum(1)
            return out

        norm = dev(f[n_fit:], pred_ref[n_fit:]).mean() + 1e-12
        for k, v in sets.items():
            total[k] = total[k] + dev(v[b], preds[k]) / norm
    return total


def _vim(model: torch.nn.Module, meta: dict, ref: np.ndarray, sets: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """ViM (Wang et al. 2022) for a one-logit head: softmax probability of the virtual logit next to (z, 0)."""
    head_in: list[np.ndarray] = []
    hook = model.head.register_forward_pre_hook(lambda _m, args: head_in.append(args[0].double().numpy()))

    def feats(X: np.ndarray) -> np.ndarray:
        head_in.clear()
        with torch.no_grad():
            for i in range(0, len(X), 512):
                model(torch.as_tensor(np.ascontiguousarray(X[i : i + 512])))
        return np.concatenate(head_in)

    try:
        f_ref = feats(ref)
        f_sets = {k: feats(v) for k, v in sets.items()}
    finally:
        hook.remove()
    linear = model.head[-1]
    w = linear.weight.detach().double().numpy()
    b = linear.bias.detach().double().numpy()
    origin = -np.linalg.pinv(w) @ b
    ev, vec = np.linalg.eigh(np.cov((f_ref - origin).T))
    minor = vec[:, np.argsort(ev)[::-1][f_ref.shape[1] // 2 :]]
    inv_t = 1.0 / float(meta.get("temperature", 1.0))

    def residual(f: np.ndarray) -> np.ndarray:
        return np.linalg.norm((f - origin) @ minor, axis=1)

    alpha = np.abs((f_ref @ w.T + b).ravel() * inv_t).mean() / residual(f_ref).mean()

    def score(f: np.ndarray) -> np.ndarray:
        z = (f @ w.T + b).ravel() * inv_t
        logits = np.stack([z, np.zeros_like(z), alpha * residual(f)], axis=1)
        top = logits.max(axis=1, keepdims=True)
        return np.exp(logits[:, 2] - top[:, 0]) / np.exp(logits - top).sum(axis=1)

    return {k: score(f) for k, f in f_sets.items()}


def _input_stats(X: np.ndarray) -> np.ndarray:
    """Per-channel pixel statistics of normalised stamps (N, 3 * 9 + 2): tails, spread, noise correlation, centre."""
    out = []
    p = X.astype(np.float64)
    for c in range(p.shape[1]):
        plane = p[:, c]
        clipped = np.clip(plane, -3, 3)
        clipped = clipped - clipped.mean(axis=(1, 2), keepdims=True)
        var = (clipped**2).mean(axis=(1, 2)) + 1e-12
        out += [
            (plane > 3).mean(axis=(1, 2)),
            (plane < -3).mean(axis=(1, 2)),
            np.sqrt(var),
            (clipped[:, :, 1:] * clipped[:, :, :-1]).mean(axis=(1, 2)) / var,
            (clipped[:, 1:] * clipped[:, :-1]).mean(axis=(1, 2)) / var,
            (clipped[:, :, 2:] * clipped[:, :, :-2]).mean(axis=(1, 2)) / var,
            (clipped[:, 2:] * clipped[:, :-2]).mean(axis=(1, 2)) / var,
            (clipped**4).mean(axis=(1, 2)) / var**2,
            plane[:, 13:18, 13:18].mean(axis=(1, 2)),
        ]
    flat = np.clip(p, -3, 3).reshape(len(p), p.shape[1], -1)
    flat = flat - flat.mean(axis=2, keepdims=True)
    norm = np.sqrt((flat**2).sum(axis=2)) + 1e-12
    for i, j in ((0, 2), (1, 2)):
        out.append((flat[:, i] * flat[:, j]).sum(axis=1) / norm[:, i] / norm[:, j])
    return np.stack(out, axis=1)


def _rank_normal(ref: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Each column of ``x`` mapped to the normal score of its mid-rank among ``ref``'s column."""
    from scipy.stats import norm

    out = np.empty_like(x, dtype=np.float64)
    for j in range(x.shape[1]):
        r = np.sort(ref[:, j])
        q = (np.searchsorted(r, x[:, j], side="left") + np.searchsorted(r, x[:, j], side="right")) / (2 * len(r))
        out[:, j] = norm.ppf(np.clip(q, 0.5 / len(r), 1 - 0.5 / len(r)))
    return out


def _normal_score(reference_scores: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Normal score of ``x`` by its rank among the sorted leave-one-out ``reference_scores``."""
    from scipy.stats import norm

    n = len(reference_scores)
    return norm.ppf((np.searchsorted(reference_scores, x) + 0.5) / (n + 1))


def _first_block_regions(model: torch.nn.Module, X: np.ndarray) -> dict[str, np.ndarray]:
    """The first block's channel mean+max pooled over the centre (r <= 6 px) and the background annulus (r > 8 px)."""
    first = model.features[:3]  # convolution, BatchNorm, ReLU
    size = X.shape[-1]
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size // 2, xx - size // 2)
    masks = {"centre": torch.as_tensor(r <= 6), "background": torch.as_tensor(r > 8)}
    out: dict[str, list[np.ndarray]] = {k: [] for k in masks}
    with torch.no_grad():
        for i in range(0, len(X), 512):
            h = first(torch.as_tensor(np.ascontiguousarray(X[i : i + 512]))).double()
            for k, m in masks.items():
                v = h[:, :, m]
                out[k].append(torch.cat([v.mean(2), v.amax(2)], 1).numpy())
    return {k: _unit(np.concatenate(v)) for k, v in out.items()}


def _background_whiteness(X: np.ndarray) -> np.ndarray:
    """RMS of the DIFF background's lag-1 and lag-2 autocorrelations (pixels within 3 sigma, away from any beyond)."""
    from scipy.ndimage import binary_dilation

    p = X[:, 2].astype(np.float64)
    good = ~binary_dilation((np.abs(p) > 3) | (p == 0), structure=np.ones((1, 3, 3), bool))
    n = np.maximum(good.sum(axis=(1, 2)), 1)
    q = np.where(good, p, 0.0)
    q = np.where(good, p - (q.sum(axis=(1, 2)) / n)[:, None, None], 0.0)
    var = (q * q).sum(axis=(1, 2)) / n + 1e-12
    rho = []
    for dy, dx in ((0, 1), (1, 0), (0, 2), (2, 0)):
        a, b = q[:, dy:, dx:], q[:, : q.shape[1] - dy, : q.shape[2] - dx]
        g = good[:, dy:, dx:] & good[:, : q.shape[1] - dy, : q.shape[2] - dx]
        rho.append((a * b * g).sum(axis=(1, 2)) / np.maximum(g.sum(axis=(1, 2)), 1) / var)
    return np.sqrt(np.mean(np.square(rho), axis=0))


def _probe_auroc(pos: np.ndarray, neg: np.ndarray, *, seed: int, folds: int = 5) -> float:
    """Cross-validated AUROC of an L2-regularised (1e-2) logistic regression telling ``pos`` from ``neg`` rows."""
    X = np.concatenate([pos, neg]).astype(np.float64)
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    X = (X - X.mean(axis=0)) / (X.std(axis=0) + 1e-9)
    fold = np.random.default_rng(seed).permutation(len(X)) % folds
    out = np.empty(len(X))
    for f in range(folds):
        fit = fold != f
        Xt, yt = torch.from_numpy(X[fit]), torch.from_numpy(y[fit])
        w = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=200)
        weight = (len(yt) - yt.sum()) / yt.sum()  # balanced classes

        def closure(Xt=Xt, yt=yt, w=w, b=b, opt=opt, weight=weight) -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(Xt @ w + b, yt, pos_weight=weight)
            loss = loss + 1e-2 * (w**2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            out[~fit] = (torch.from_numpy(X[~fit]) @ w + b).numpy()
    return _auroc(out[y == 0], out[y == 1])


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
    ref_feats = network_features(model, cube["X"][ref_idx])
    knn = KnnOOD.fit(ref_feats, columns=first_block_columns(model))  # the stored score, as fit_reference fits it
    pooled = KnnOOD.fit(ref_feats)  # the score stored before: every block
    # the stored score's cost at inference against the plain P(real) pass, on the test stamps
    cpu = {}
    for name, run in (
        ("P(real)", lambda: predict(model, meta, X)),
        ("OOD score", lambda: knn.quantile(knn.score(network_features(model, X)))),
    ):
        run()  # warm-up
        c0 = time.process_time()
        run()
        cpu[name] = time.process_time() - c0
    print(
        f"\nstored OOD score on {len(X)} test stamps: {cpu['OOD score']:.2f} CPU-s, P(real) {cpu['P(real)']:.2f} CPU-s "
        f"(ratio {cpu['OOD score'] / cpu['P(real)']:.2f})"
    )
    if args.ztf is not None:
        from rbflow.alerts import read_alerts

        _, raw, _ = read_alerts([args.ztf])
        sets = {
            "ztf": normalise(crop_stamps(raw, int(meta["stamp_size"]))).astype(np.float32),
            "test": X,
            "held-out train": cube["X"][held_idx],
        }
        ref_X, y_ref = cube["X"][ref_idx], cube["y"][ref_idx]
        stats = {k: _block_stats(model, v) for k, v in {"ref": ref_X, **sets}.items()}
        preds = {k: (predict(model, meta, v) >= meta["threshold"]).astype(int) for k, v in sets.items()}
        pred_ref = (predict(model, meta, ref_X) >= meta["threshold"]).astype(int)

        def per(key: str) -> dict[str, list[np.ndarray]]:
            return {k: stats[k][key] for k in sets}

        feats = {k: network_features(model, v) for k, v in sets.items()}
        p_sets = {k: predict(model, meta, v) for k, v in sets.items()}
        stats_ref = _input_stats(ref_X)
        inp_ref = _rank_normal(stats_ref, stats_ref)
        inp = KnnOOD(reference=inp_ref.astype(np.float32), k=10, reference_scores=np.zeros(1))
        scores = {
            "stored now: kNN k=10, first block's mean+max (Sun et al. 2022; Abdelzad et al. 2019)": {
                k: knn.score(f) for k, f in feats.items()
            },
            "stored before: kNN k=10, all blocks' mean+max (Sun et al. 2022)": {
                k: pooled.score(f) for k, f in feats.items()
            },
            "before: Mahalanobis, class means, block mean/std": _mahalanobis_before(model, ref_X, y_ref, sets),
            "kNN per block, mean+max, standardised, averaged": _knn_per_block(stats["ref"]["meanmax"], per("meanmax")),
            "kNN per block, channel correlations (Gram), averaged": _knn_per_block(stats["ref"]["corr"], per("corr")),
            "multi-layer Mahalanobis (Lee et al. 2018), block means": _lee_mahalanobis(
                stats["ref"]["mean"], y_ref, per("mean")
            ),
            "Gram deviations p=1..5 (Sastry & Oore 2020)": _gram_deviation(
                stats["ref"]["gram"], pred_ref, per("gram"), preds
            ),
            "ViM, head features, half the dimensions (Wang et al. 2022)": _vim(model, meta, ref_X, sets),
            "1 - max softmax probability (Hendrycks & Gimpel 2017)": {
                k: 1 - np.maximum(p, 1 - p) for k, p in p_sets.items()
            },
            "kNN k=10 on per-channel input statistics (rank-normal scores)": {
                k: _euclid_knn(inp, _rank_normal(stats_ref, _input_stats(v))) for k, v in sets.items()
            },
        }
        # background-corrected (the likelihood ratio of Ren et al. 2019 with kNN distances for densities):
        # the stored score's normal score minus that of the first block pooled over the background annulus
        regions = {k: _first_block_regions(model, v) for k, v in {"ref": ref_X, **sets}.items()}
        bg = KnnOOD.fit(regions["ref"]["background"])
        z_all = {k: _normal_score(knn.reference_scores, v) for k, v in scores[next(iter(scores))].items()}
        z_bg = {k: _normal_score(bg.reference_scores, bg.score(regions[k]["background"])) for k in sets}
        corrected = {k: z_all[k] - z_bg[k] for k in sets}
        scores["background-corrected: z(stored) - z(first block over the background) (Ren et al. 2019)"] = corrected
        scores["max of z(stored) and the background-corrected score"] = {
            k: np.maximum(z_all[k], corrected[k]) for k in sets
        }
        print(
            f"\nOOD AUROC: {len(raw)} packets of {args.ztf}, {len(X)} test stamps, {len(held_idx)} held-out training-frame stamps"
        )
        print("| score | packets vs test | test vs held-out train |\n|---|---|---|")
        for name, s in scores.items():
            print(f"| {name} | {_auroc(s['test'], s['ztf']):.3f} | {_auroc(s['held-out train'], s['test']):.3f} |")
        whiteness = {k: _background_whiteness(v) for k, v in sets.items()}
        print("\nwhat differs (same AUROCs):\n| where | packets vs test | test vs held-out train |\n|---|---|---|")
        for region in ("centre", "background"):
            rk = KnnOOD.fit(regions["ref"][region])
            s = {k: rk.score(regions[k][region]) for k in sets}
            print(
                f"| first block kNN, pooled over the {region} | {_auroc(s['test'], s['ztf']):.3f} "
                f"| {_auroc(s['held-out train'], s['test']):.3f} |"
            )
        print(
            f"| DIFF background autocorrelation, RMS of lags 1-2 (low: white) | {_auroc(whiteness['test'], whiteness['ztf']):.3f} "
            f"| {_auroc(whiteness['held-out train'], whiteness['test']):.3f} |"
        )
        for k, v in whiteness.items():
            print(f"  DIFF background autocorrelation RMS, {k}: 5/50/95 % {np.percentile(v, [5, 50, 95]).round(3)}")
        print("\nsupervised linear probe (5-fold CV AUROC; a ceiling, not a stored score):")
        print("| features | packets vs test | test vs held-out train |\n|---|---|---|")
        for key, label in (("meanmax", "all blocks' mean+max"), ("corr", "all blocks' channel correlations")):
            f = {k: np.concatenate(stats[k][key], axis=1) for k in sets}
            print(
                f"| {label} | {_probe_auroc(f['ztf'], f['test'], seed=args.seed):.3f} "
                f"| {_probe_auroc(f['test'], f['held-out train'], seed=args.seed):.3f} |"
            )

    obs = res / "obs" / "cutouts"
    folder = next(iter(sorted(d for d in obs.iterdir() if d.is_dir())), None) if obs.is_dir() else None
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
