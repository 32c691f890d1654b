"""Training the real/bogus CNN: frame-grouped split, augmentation, exact resume, calibration, metrics.

The plain loop of :func:`train` follows the pytorch/examples style: a shuffled mini-batch loop with
random dihedral augmentation (the 8 flips/rotations of the square), class-weighted binary
cross-entropy, AdamW with a OneCycle learning-rate schedule, and early stopping on the validation
loss. After each epoch a checkpoint (model, optimiser, scheduler, epoch, best loss and weights,
history, every RNG state, config) is written to ``checkpoint_dir``, outside the outputs, so that a
killed job resumes where it stopped and ends with the same weights as an uninterrupted run.

Decisions recorded in ``model.json``
------------------------------------
* Split: frames (the ``frame`` array of the datacube) are shuffled with a seed derived from ``seed``
  and cut into test, validation and training sets; no stamp of a test frame is trained on.
* Calibration: a temperature ``T`` (P(real) = sigmoid(logit / T)) minimises the validation NLL.
* Suggested threshold: the calibrated P(real) maximising the Matthews correlation (MCC) on the
  validation set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from astropy.table import Table
from scipy.stats import rankdata
from torch import nn
from tqdm import tqdm

from rbflow import __version__
from rbflow.datacube import load_datacube
from rbflow.errors import InputError
from rbflow.io import atomic_path, write_table
from rbflow.model import ModelConfig, build_model, count_parameters
from rbflow.seeds import derive

__all__ = [
    "TRAIN_DEFAULTS",
    "SNR_BINS",
    "train",
    "split_frames",
    "dihedral",
    "fit_temperature",
    "expected_calibration_error",
    "roc_auc",
    "binary_metrics",
    "best_mcc_threshold",
    "export_onnx",
    "resolve_device",
]

log = logging.getLogger(__name__)

#: Defaults of the ``train`` config block (as in src/rbflow/schemas/config.schema.yaml).
TRAIN_DEFAULTS: dict[str, Any] = {
    "architecture": "compact",
    "widths": [16, 32, 64],
    "epochs": 20,
    "batch_size": 256,
    "lr": 0.003,
    "weight_decay": 1e-4,
    "patience": 5,
    "val_frac": 0.15,
    "test_frac": 0.2,
    "device": "auto",
}

#: S/N bin edges of the per-bin test metrics.
SNR_BINS = (0.0, 5.0, 10.0, 20.0, 50.0, math.inf)
_ECE_BINS = 15
_BOOTSTRAP = 200


def resolve_device(name: str) -> torch.device:
    """``'auto'`` -> CUDA when available, else CPU; ``'cpu'``/``'cuda'`` as given (CUDA must exist)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("key 'train.device' is 'cuda' but no CUDA device is visible: set it to 'auto' or 'cpu'")
    return torch.device(name)


def split_frames(
    frames: np.ndarray, y: np.ndarray, *, val_frac: float, test_frac: float, seed: int
) -> dict[str, list[str]]:
    """Split the frames into train/val/test sets, seeded; every set gets both classes when possible.

    Parameters
    ----------
    frames : numpy.ndarray of str
        Frame of each stamp.
    y : numpy.ndarray of int
        Label of each stamp (1 = real).
    val_frac, test_frac : float
        Fractions of the frames held out (at least one frame each).
    seed : int
        Seed of the shuffle.

    Returns
    -------
    dict
        ``{"train": [...], "val": [...], "test": [...]}`` sorted frame names.

    Raises
    ------
    InputError
        Fewer than 3 frames.
    """
    names = np.unique(frames)
    if len(names) < 3:
        raise InputError(
            f"the datacube holds stamps of {len(names)} frame(s); a frame-grouped train/val/test split needs "
            "at least 3: add frames (or injection realizations of more frames)"
        )
    n_test = max(1, round(test_frac * len(names)))
    n_val = max(1, round(val_frac * len(names)))
    if n_test + n_val >= len(names):
        n_test, n_val = 1, 1
    rng = np.random.default_rng(seed)
    for _attempt in range(100):
        order = rng.permutation(names)
        sets = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
        if all(len(np.unique(y[np.isin(frames, f)])) == 2 for f in sets.values()):
            break
    else:
        log.warning("no frame split in 100 tries gives both classes to every set; metrics may be undefined")
    return {k: sorted(str(f) for f in v) for k, v in sets.items()}


def dihedral(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Apply one of the 8 dihedral transforms per stamp.

    Parameters
    ----------
    x : torch.Tensor
        ``(N, C, H, W)`` square stamps.
    k : torch.Tensor
        ``(N,)`` integers in [0, 8): rotation by ``k % 4`` quarter turns, then a left-right flip if ``k >= 4``.

    Returns
    -------
    torch.Tensor
    """
    out = torch.empty_like(x)
    for t in range(8):
        sel = k == t
        if sel.any():
            v = torch.rot90(x[sel], t % 4, dims=(2, 3))
            out[sel] = torch.flip(v, dims=(3,)) if t >= 4 else v
    return out


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half); NaN when a class is absent."""
    n_pos = int((y == 1).sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(p)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def expected_calibration_error(y: np.ndarray, p: np.ndarray, *, bins: int = _ECE_BINS) -> float:
    """Expected calibration error of P(real) ``p`` in ``bins`` equal-width bins (NaN when empty)."""
    if len(y) == 0:
        return float("nan")
    idx = np.minimum((p * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            ece += sel.mean() * abs(p[sel].mean() - y[sel].mean())
    return float(ece)


def _mcc(y: np.ndarray, pred: np.ndarray) -> float:
    tp = float(((pred == 1) & (y == 1)).sum())
    tn = float(((pred == 0) & (y == 0)).sum())
    fp = float(((pred == 1) & (y == 0)).sum())
    fn = float(((pred == 0) & (y == 1)).sum())
    den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / den if den > 0 else 0.0


def best_mcc_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """Threshold on P(real) maximising the MCC (nearest 0.5 among ties; 0.5 when a class is absent)."""
    if len(np.unique(y)) < 2:
        return 0.5
    grid = np.unique(np.concatenate([np.linspace(0.01, 0.99, 99), np.quantile(p, np.linspace(0, 1, 201))]))
    grid = grid[(grid > 0) & (grid < 1)]
    scores = np.array([_mcc(y, (p >= t).astype(int)) for t in grid])
    # among equally good thresholds (a plateau when the classes separate), take the one nearest 0.5
    best = grid[scores >= scores.max() - 1e-12]
    return float(best[np.argmin(np.abs(best - 0.5))])


def _point_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    pos, neg = p[y == 1], p[y == 0]
    nan = float("nan")
    # FNR at FPR = 1 %: threshold at the 99th percentile of the bogus scores, and vice versa
    fnr = float((pos < np.quantile(neg, 0.99)).mean()) if len(neg) and len(pos) else nan
    fpr = float((neg >= np.quantile(pos, 0.01)).mean()) if len(neg) and len(pos) else nan
    pred = (p >= threshold).astype(int)
    return {
        "roc_auc": roc_auc(y, p),
        "fnr_at_fpr1": fnr,
        "fpr_at_fnr1": fpr,
        "accuracy": float((pred == y).mean()) if len(y) else nan,
        "mcc": _mcc(y, pred) if len(y) else nan,
        "ece": expected_calibration_error(y, p),
    }


def binary_metrics(
    y: np.ndarray, p: np.ndarray, *, threshold: float, seed: int, n_boot: int = _BOOTSTRAP
) -> dict[str, dict[str, float]]:
    """Test metrics with bootstrap 95 % intervals.

    Parameters
    ----------
    y : numpy.ndarray
        Labels (1 = real).
    p : numpy.ndarray
        Calibrated P(real).
    threshold : float
        Threshold of accuracy and MCC.
    seed : int
        Seed of the bootstrap.
    n_boot : int, optional
        Number of bootstrap resamples.

    Returns
    -------
    dict
        ``{metric: {"value", "lo", "hi"}}`` for roc_auc, fnr_at_fpr1, fpr_at_fnr1, accuracy, mcc, ece,
        plus ``{"n": ..., "n_true": ...}`` under ``"counts"``.
    """
    point = _point_metrics(y, p, threshold)
    rng = np.random.default_rng(seed)
    boots: dict[str, list[float]] = {k: [] for k in point}
    if len(y):
        for _ in range(n_boot):
            i = rng.integers(0, len(y), len(y))
            for k, v in _point_metrics(y[i], p[i], threshold).items():
                boots[k].append(v)
    out: dict[str, dict[str, float]] = {}
    for k, v in point.items():
        b = np.asarray(boots[k], dtype=float)
        b = b[np.isfinite(b)]
        lo, hi = np.quantile(b, [0.025, 0.975]) if len(b) else (math.nan, math.nan)
        out[k] = {"value": v, "lo": float(lo), "hi": float(hi)}
    out["counts"] = {"n": int(len(y)), "n_true": int((y == 1).sum())}
    return out


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Temperature ``T`` minimising the NLL of ``sigmoid(logits / T)`` (1.0 when a class is absent)."""
    if len(np.unique(y)) < 2:
        return 1.0
    z = torch.as_tensor(logits, dtype=torch.float64)
    t = torch.as_tensor(y, dtype=torch.float64)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(z / log_t.exp(), t)
        loss.backward()
        return loss

    opt.step(closure)
    return float(np.clip(log_t.exp().item(), 0.05, 20.0))


class _CalibratedProbability(nn.Module):
    """A trained model followed by temperature scaling and the sigmoid (what ONNX exports)."""

    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        self.model = model
        self.register_buffer("inv_t", torch.tensor(1.0 / temperature))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(x) * self.inv_t)


def export_onnx(model: nn.Module, temperature: float, sample_shape: tuple[int, int, int], path: str | Path) -> None:
    """Export ``model`` + temperature + sigmoid to ONNX: input ``x`` (N, C, H, W) normalised, output ``p_real`` (N,).

    Uses the TorchScript exporter (``dynamo=False``): the torch.export-based one needs ``onnxscript``,
    which rbflow does not depend on. The batch axis is dynamic.
    """
    wrapped = _CalibratedProbability(model, temperature).cpu().eval()
    dummy = torch.zeros((2, *sample_shape), dtype=torch.float32)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # the TorchScript exporter is deprecated in favour of the dynamo one (which needs onnxscript)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            wrapped,
            (dummy,),
            str(tmp),
            dynamo=False,
            input_names=["x"],
            output_names=["p_real"],
            dynamic_axes={"x": {0: "batch"}, "p_real": {0: "batch"}},
            opset_version=17,
        )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _rng_states(gen: torch.Generator) -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "generator": gen.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def _set_rng_states(states: dict[str, Any], gen: torch.Generator) -> None:
    gen.set_state(states["generator"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def _torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` atomically, with bytes that depend on ``obj`` only.

    Given a file name, torch names the zip archive's top folder after it (here the random name of
    the temporary file), so two identical saves would differ; through an open file the folder is
    always ``archive``.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)


def _save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write the end-of-epoch checkpoint (one function, so that tests can interrupt training here)."""
    _torch_save(state, path)


def _predict_logits(model: nn.Module, X: torch.Tensor, device: torch.device, batch: int) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(X), batch):
            out.append(model(X[i : i + batch].to(device)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def _weighted_loss(logits: torch.Tensor, y: torch.Tensor, class_w: torch.Tensor) -> torch.Tensor:
    w = class_w[y.long()]
    return (nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none") * w).sum() / w.sum()


def _plot_history(history: Table, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.6), layout="constrained")
    ax = fig.subplots(1, 3)
    ax[0].plot(history["epoch"], history["train_loss"], label="train")
    ax[0].plot(history["epoch"], history["val_loss"], label="validation")
    ax[0].set(xlabel="epoch", ylabel="weighted BCE loss", title="loss")
    ax[0].legend()
    ax[1].plot(history["epoch"], history["train_acc"], label="train")
    ax[1].plot(history["epoch"], history["val_acc"], label="validation")
    ax[1].set(xlabel="epoch", ylabel="accuracy (P >= 0.5)", title="accuracy")
    ax[1].legend()
    ax[2].plot(history["epoch"], history["lr"])
    ax[2].set(xlabel="epoch", ylabel="learning rate (end of epoch)", title="learning rate")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")


def _jsonable(obj: Any) -> Any:
    """Replace NaN/inf floats by None so that the JSON is strict."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _write_json(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n")


def train(
    datacube_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: dict[str, Any],
    *,
    seed: int,
    checkpoint_dir: str | os.PathLike,
) -> dict[str, Any]:
    """Train, calibrate and evaluate a model on a datacube; write the model and its report.

    Parameters
    ----------
    datacube_path : path-like
        Datacube from :func:`rbflow.datacube.build_datacube`.
    out_dir : path-like
        Output folder: model.pt (state_dict), model.json, model.onnx, history.ecsv, metrics.json,
        training.png.
    cfg : dict
        The ``train`` config block (missing keys take :data:`TRAIN_DEFAULTS`).
    seed : int
        Global seed; the split, initial weights, shuffling and augmentation derive from it.
    checkpoint_dir : path-like
        Folder of ``checkpoint.pt``, kept outside ``out_dir``. An existing checkpoint with the same
        config and datacube is resumed; delete the folder to start over.

    Returns
    -------
    dict
        The content of model.json.

    Raises
    ------
    InputError
        Unreadable datacube, fewer than 3 frames, or an unusable device.
    """
    cfg = {**TRAIN_DEFAULTS, **cfg}
    unknown = set(cfg) - set(TRAIN_DEFAULTS)
    if unknown:
        raise InputError(f"train config has unknown keys {sorted(unknown)}: allowed are {sorted(TRAIN_DEFAULTS)}")
    datacube_path, out_dir, checkpoint_dir = Path(datacube_path), Path(out_dir), Path(checkpoint_dir)
    cube = load_datacube(datacube_path)
    cube_hash = _sha256(datacube_path)
    device = resolve_device(cfg["device"])
    X_all = torch.from_numpy(cube["X"])
    y_all = cube["y"].astype(np.int64)
    frames = cube["frame"]
    split = split_frames(
        frames, y_all, val_frac=cfg["val_frac"], test_frac=cfg["test_frac"], seed=derive(seed, "train", "split")
    )
    idx = {k: np.flatnonzero(np.isin(frames, v)) for k, v in split.items()}
    log.info(
        "split by frame: train %d stamps (%d frames), val %d (%d), test %d (%d)",
        *(x for k in ("train", "val", "test") for x in (len(idx[k]), len(split[k]))),
    )
    Xtr = X_all[idx["train"]].to(device)
    ytr = torch.from_numpy(y_all[idx["train"]]).float().to(device)
    Xva, yva = X_all[idx["val"]], y_all[idx["val"]]
    n_pos = float(ytr.sum())
    n_neg = float(len(ytr) - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise InputError(f"datacube '{datacube_path}': the training frames hold a single class; add labelled stamps")
    # class weights: each class weighs half of the loss
    class_w = torch.tensor([len(ytr) / (2 * n_neg), len(ytr) / (2 * n_pos)], device=device)

    mcfg = ModelConfig(
        architecture=cfg["architecture"],
        in_channels=int(X_all.shape[1]),
        stamp_size=int(X_all.shape[-1]),
        widths=list(cfg["widths"]),
    )
    torch.manual_seed(derive(seed, "train", "init"))
    np.random.seed(derive(seed, "train", "numpy") % 2**32)
    random.seed(derive(seed, "train", "python"))
    model = build_model(mcfg).to(device)
    gen = torch.Generator().manual_seed(derive(seed, "train", "batches"))
    bs = int(cfg["batch_size"])
    steps = max(1, math.ceil(len(Xtr) / bs))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=cfg["epochs"] * steps)
    # what a checkpoint must match to be resumed (JSON round trip: tuples and lists compare equal)
    identity = {"config": cfg, "seed": seed, "datacube_sha256": cube_hash, "model": mcfg.to_dict()}
    identity = json.loads(json.dumps(identity))

    ckpt_path = checkpoint_dir / "checkpoint.pt"
    start, best_loss, bad, best_state, rows = 0, math.inf, 0, None, []
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ck["identity"] == identity:
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            start, best_loss, bad = ck["epoch"], ck["best_loss"], ck["bad_epochs"]
            best_state, rows = ck["best_state"], ck["history"]
            _set_rng_states(ck["rng"], gen)
            log.info("resuming from %s after epoch %d", ckpt_path, start)
        else:
            log.warning("checkpoint %s is for another config or datacube: starting over", ckpt_path)

    tty = sys.stderr.isatty()
    for epoch in range(start, cfg["epochs"]):
        if bad >= cfg["patience"]:
            break
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(len(Xtr), generator=gen)
        k_all = torch.randint(0, 8, (len(Xtr),), generator=gen).to(device)
        tot_loss, tot_ok = 0.0, 0
        with tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg['epochs']}", disable=not tty, leave=False) as bar:
            for s in range(steps):
                b = perm[s * bs : (s + 1) * bs].to(device)
                xb = dihedral(Xtr[b], k_all[b])
                yb = ytr[b]
                logits = model(xb)
                loss = _weighted_loss(logits, yb, class_w)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                tot_loss += loss.item() * len(b)
                tot_ok += int(((logits > 0).float() == yb).sum())
                bar.update(1)
        val_logits = _predict_logits(model, Xva, device, 4 * bs)
        vt = torch.from_numpy(val_logits)
        val_loss = float(_weighted_loss(vt, torch.from_numpy(yva).float(), class_w.cpu()))
        row = {
            "epoch": epoch + 1,
            "train_loss": tot_loss / len(Xtr),
            "train_acc": tot_ok / len(Xtr),
            "val_loss": val_loss,
            "val_acc": float(((val_logits > 0) == yva).mean()),
            "lr": sched.get_last_lr()[0],
        }
        # the epoch's wall time goes to the log only: outputs depend on the config and seed alone
        seconds = time.perf_counter() - t0
        rows.append(row)
        if val_loss < best_loss:
            best_loss, bad = val_loss, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
        log.info(
            "epoch %d/%d: train loss %.4f acc %.4f | val loss %.4f acc %.4f | lr %.2e | %.1f s%s",
            row["epoch"],
            cfg["epochs"],
            row["train_loss"],
            row["train_acc"],
            val_loss,
            row["val_acc"],
            row["lr"],
            seconds,
            " *" if bad == 0 else "",
        )
        _save_checkpoint(
            {
                "identity": identity,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "epoch": epoch + 1,
                "best_loss": best_loss,
                "bad_epochs": bad,
                "best_state": best_state,
                "history": rows,
                "rng": _rng_states(gen),
            },
            ckpt_path,
        )
    if bad >= cfg["patience"]:
        log.info("early stop: validation loss has not improved for %d epochs", bad)

    model.load_state_dict(best_state)
    val_logits = _predict_logits(model, Xva, device, 4 * bs)
    temperature = fit_temperature(val_logits, yva)
    p_val_raw = 1 / (1 + np.exp(-val_logits.astype(np.float64)))
    p_val = 1 / (1 + np.exp(-val_logits.astype(np.float64) / temperature))
    threshold = best_mcc_threshold(yva, p_val)
    test_logits = _predict_logits(model, X_all[idx["test"]], device, 4 * bs)
    yte = y_all[idx["test"]]
    p_test_raw = 1 / (1 + np.exp(-test_logits.astype(np.float64)))
    p_test = 1 / (1 + np.exp(-test_logits.astype(np.float64) / temperature))
    calibration = {
        "temperature": temperature,
        "ece_val_before": expected_calibration_error(yva, p_val_raw),
        "ece_val_after": expected_calibration_error(yva, p_val),
        "ece_test_before": expected_calibration_error(yte, p_test_raw),
        "ece_test_after": expected_calibration_error(yte, p_test),
    }
    boot_seed = derive(seed, "train", "bootstrap")
    snr = cube["snr"][idx["test"]]
    by_snr = []
    for lo, hi in zip(SNR_BINS[:-1], SNR_BINS[1:]):
        sel = (snr >= lo) & (snr < hi)
        in_bin = binary_metrics(yte[sel], p_test[sel], threshold=threshold, seed=boot_seed)
        by_snr.append({"snr_min": lo, "snr_max": hi, **in_bin})
    metrics = {
        "split": "test",
        "threshold": threshold,
        "test": binary_metrics(yte, p_test, threshold=threshold, seed=boot_seed),
        "by_snr": by_snr,
        "calibration": calibration,
        "bootstrap_resamples": _BOOTSTRAP,
        "rbflow_version": __version__,
    }
    history = Table(rows=[[r[k] for k in rows[0]] for r in rows], names=list(rows[0]))
    history.meta.update({"made_by": "rbflow.train.train", "datacube": str(datacube_path)})

    out_dir.mkdir(parents=True, exist_ok=True)
    model.cpu().eval()
    _torch_save(model.state_dict(), out_dir / "model.pt")
    export_onnx(model, temperature, tuple(X_all.shape[1:]), out_dir / "model.onnx")
    write_table(history, out_dir / "history.ecsv")
    _write_json(metrics, out_dir / "metrics.json")
    _plot_history(history, out_dir / "training.png")
    meta = {
        "model": mcfg.to_dict(),
        "stamp_size": mcfg.stamp_size,
        "cutout_size": cube["meta"].get("cutout_size", mcfg.stamp_size),
        "crop": cube["meta"].get("crop"),
        "channels": [str(c) for c in cube["channels"]],
        "normalisation": cube["meta"].get("normalisation"),
        "output": "one logit per stamp; P(real) = sigmoid(logit / temperature)",
        "temperature": temperature,
        "threshold": threshold,
        "threshold_rule": "maximum MCC of the calibrated P(real) on the validation frames",
        "training": {**cfg, "seed": seed, "device_used": str(device), "epochs_run": len(rows)},
        "parameters": count_parameters(model),
        "datacube": {
            "path": str(datacube_path),
            "sha256": cube_hash,
            "meta": {k: v for k, v in cube["meta"].items() if k != "skipped"},
        },
        "split": split,
        "split_counts": {k: int(len(v)) for k, v in idx.items()},
        "metrics": {"test": metrics["test"], "calibration": calibration},
        "rbflow_version": __version__,
    }
    _write_json(meta, out_dir / "model.json")
    log.info(
        "model written to %s: test AUC %.4f, FNR@FPR1%% %.3f, T = %.2f, threshold %.3f",
        out_dir,
        metrics["test"]["roc_auc"]["value"],
        metrics["test"]["fnr_at_fpr1"]["value"],
        temperature,
        threshold,
    )
    return json.loads(json.dumps(_jsonable(meta)))
