"""Training the real/bogus CNN: frame-grouped split, augmentation, exact resume, calibration, metrics.

:func:`train` is a plain loop in the pytorch/examples style, written as short named pieces:
:func:`split_data` (frame-grouped split, class weights), :func:`seeded_model` (fresh or fine-tuned
from ``init``), :func:`train_one_epoch` (shuffled mini-batches with random dihedral augmentation,
the 8 flips/rotations of the square; class-weighted binary cross-entropy; AdamW with a OneCycle
learning-rate schedule), :func:`evaluate` (validation loss and accuracy), early stopping on the
validation loss, :func:`save_checkpoint` / :func:`resume` (model, optimiser, scheduler, epoch, best
loss and weights, history, every RNG state, config: a killed job resumes where it stopped and ends
with the same weights as an uninterrupted run; the checkpoint lives in ``checkpoint_dir``, outside
the outputs), :func:`calibrate`, :func:`held_out_metrics` and :func:`write_artefacts`.

Decisions recorded in ``model.json``
------------------------------------
* Split: frames (the ``frame`` array of the datacube) are shuffled with a seed derived from ``seed``
  and cut into test, validation and training sets; no stamp of a test frame is trained on.
* Calibration: a temperature ``T`` (P(real) = sigmoid(logit / T)) minimises the validation NLL.
* Suggested threshold: the calibrated P(real) maximising the Matthews correlation (MCC) on the
  validation set.
* Label repair: a datacube from :func:`rbflow.labelrepair.repair_cube` with mode ``weight``
  down-weights its likely label errors in the training loss (:func:`stamp_weights`); model.json's
  ``label_repair`` lists them.
* OOD reference: the first convolution block's features of (at most 4000 of) the training stamps are written to
  ``model.ood`` (:mod:`rbflow.uncertainty`), so inference scores OOD without the datacube.
* Fine-tuning: with ``init``, training starts from that model's weights (same architecture,
  widths, stamp size and channels); its path, SHA-256 and validation loss before fine-tuning are
  recorded under ``init``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from astropy.table import Table
from torch import nn
from tqdm import tqdm

from rbflow import __version__
from rbflow.config import schema_defaults
from rbflow.datacube import load_datacube
from rbflow.errors import InputError
from rbflow.infer import load_model
from rbflow.io import atomic_path, file_sha256, jsonable, made_by, write_figure, write_json, write_table
from rbflow.metrics import BOOTSTRAP_RESAMPLES, best_mcc_threshold, binary_metrics, expected_calibration_error
from rbflow.model import ModelConfig, build_model, count_parameters
from rbflow.seeds import derive
from rbflow.uncertainty import OOD_FILE, OOD_METHOD, KnnOOD, fit_reference

__all__ = [
    "SNR_BINS",
    "train",
    "train_config",
    "TrainingData",
    "split_data",
    "split_frames",
    "InitModel",
    "load_init",
    "seeded_model",
    "dihedral",
    "stamp_weights",
    "weighted_loss",
    "predict_logits",
    "train_one_epoch",
    "evaluate",
    "Progress",
    "save_checkpoint",
    "resume",
    "Calibration",
    "calibrate",
    "fit_temperature",
    "held_out_metrics",
    "describe_model",
    "write_artefacts",
    "export_onnx",
    "resolve_device",
]

log = logging.getLogger(__name__)

#: S/N bin edges of the per-bin test metrics.
SNR_BINS = (0.0, 5.0, 10.0, 20.0, 50.0, math.inf)


def train_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The ``train`` config block with the schema's defaults filled in.

    Parameters
    ----------
    cfg : dict
        Keys of the ``train`` block of ``config.schema.yaml`` (any subset).

    Returns
    -------
    dict
        Every key of the block, in the schema's order.

    Raises
    ------
    InputError
        A key the schema does not define.
    """
    defaults = schema_defaults("config.schema.yaml", "train")
    unknown = set(cfg) - set(defaults)
    if unknown:
        raise InputError(f"train config has unknown keys {sorted(unknown)}: allowed are {sorted(defaults)}")
    return {**defaults, **cfg}


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


@dataclass
class TrainingData:
    """The datacube's stamps split by frame, as the loop uses them.

    Attributes
    ----------
    X_train, y_train : torch.Tensor
        Training stamps and labels (float, 1 = real), on the training device.
    X_val, X_test : torch.Tensor
        Validation and test stamps, on the CPU (moved batch by batch).
    y_val, y_test : numpy.ndarray
        Validation and test labels (int64).
    frame_val : numpy.ndarray
        Frame of each validation stamp (str).
    snr_test : numpy.ndarray
        S/N of the test stamps.
    frames : dict
        ``{"train", "val", "test"}`` -> sorted frame names (:func:`split_frames`).
    counts : dict
        Stamps per set.
    class_weights : torch.Tensor
        Loss weight of a bogus and of a real stamp, so that each class weighs half of the loss.
    w_train : torch.Tensor
        Loss weight of each training stamp (1, or the down-weight of a likely label error; see
        :func:`stamp_weights`), on the training device.
    """

    X_train: torch.Tensor
    y_train: torch.Tensor
    X_val: torch.Tensor
    y_val: np.ndarray
    frame_val: np.ndarray
    X_test: torch.Tensor
    y_test: np.ndarray
    snr_test: np.ndarray
    frames: dict[str, list[str]]
    counts: dict[str, int]
    class_weights: torch.Tensor
    w_train: torch.Tensor


def stamp_weights(cube: dict[str, Any]) -> np.ndarray:
    """Per-stamp loss weights of a datacube: the down-weight of its likely label errors, else 1.

    A datacube written by :func:`rbflow.labelrepair.repair_cube` with mode ``weight`` lists the
    candidates found as likely label errors (``meta['label_repair']['changed']``) and their weight
    (``meta['label_repair']['weight']``); any other datacube weighs every stamp 1.

    Parameters
    ----------
    cube : dict
        From :func:`rbflow.datacube.load_datacube`.

    Returns
    -------
    numpy.ndarray
        float32 ``(N,)`` weights in [0, 1].
    """
    repair = cube["meta"].get("label_repair") or {}
    w = np.ones(len(cube["y"]), np.float32)
    if repair.get("mode") == "weight":
        w[np.isin(cube["ids"].astype(str), [str(i) for i in repair["changed"]])] = float(repair["weight"])
    return w


def split_data(
    cube: dict[str, Any], cfg: dict[str, Any], *, seed: int, device: torch.device, source: str | os.PathLike
) -> TrainingData:
    """Split a loaded datacube by frame and compute the class weights.

    Parameters
    ----------
    cube : dict
        From :func:`rbflow.datacube.load_datacube`.
    cfg : dict
        The full ``train`` block (:func:`train_config`): ``val_frac`` and ``test_frac`` are used.
    seed : int
        Global seed (the split's seed derives from it).
    device : torch.device
        Where the training stamps go.
    source : path-like
        The datacube file, named in errors.

    Returns
    -------
    TrainingData

    Raises
    ------
    InputError
        Fewer than 3 frames, or training frames holding a single class.
    """
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
    ytr = torch.from_numpy(y_all[idx["train"]]).float().to(device)
    n_pos = float(ytr.sum())
    n_neg = float(len(ytr) - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise InputError(f"datacube '{source}': the training frames hold a single class; add labelled stamps")
    return TrainingData(
        X_train=X_all[idx["train"]].to(device),
        y_train=ytr,
        X_val=X_all[idx["val"]],
        y_val=y_all[idx["val"]],
        frame_val=np.asarray(frames, dtype=str)[idx["val"]],
        X_test=X_all[idx["test"]],
        y_test=y_all[idx["test"]],
        snr_test=cube["snr"][idx["test"]],
        frames=split,
        counts={k: int(len(v)) for k, v in idx.items()},
        class_weights=torch.tensor([len(ytr) / (2 * n_neg), len(ytr) / (2 * n_pos)], device=device),
        w_train=torch.from_numpy(stamp_weights(cube)[idx["train"]]).to(device),
    )


@dataclass
class InitModel:
    """A trained model to fine-tune from (see :func:`load_init`).

    Attributes
    ----------
    path : pathlib.Path
        Its ``model.pt``.
    sha256 : str
        SHA-256 of ``model.pt``.
    config : ModelConfig
        Its architecture, from the ``model.json`` beside it.
    state : dict
        Its weights (``state_dict``).
    """

    path: Path
    sha256: str
    config: ModelConfig
    state: dict[str, torch.Tensor]


def load_init(
    init: str | os.PathLike, cfg: dict[str, Any], *, channels: list[str], stamp_size: int, normalisation: Any
) -> InitModel:
    """Load a model to fine-tune from and check that it fits the config and the datacube.

    Parameters
    ----------
    init : path-like
        A model folder (holding ``model.pt``) or a ``model.pt``, with ``model.json`` beside it.
    cfg : dict
        The full ``train`` block: its ``architecture`` and ``widths`` must be the model's.
    channels : list of str
        The datacube's channels, in order: they must be the model's.
    stamp_size : int
        The datacube's stamp side (pixels): it must be the model's.
    normalisation : object
        The datacube's normalisation (its ``meta``): it must be the model's when both record one.

    Returns
    -------
    InitModel

    Raises
    ------
    InputError
        Missing or unreadable files (pickled objects are refused: weights are loaded with
        ``weights_only=True``), or a mismatch, named with both values.
    """
    path = Path(init)
    pt = path / "model.pt" if path.is_dir() else path
    model, meta = load_model(pt)
    mcfg = ModelConfig.from_dict(meta["model"])
    mismatch = []
    if mcfg.architecture != cfg["architecture"]:
        mismatch.append(f"architecture {mcfg.architecture!r} (key 'train.architecture' is {cfg['architecture']!r})")
    if mcfg.widths != [int(w) for w in cfg["widths"]]:
        mismatch.append(f"widths {mcfg.widths} (key 'train.widths' is {list(cfg['widths'])})")
    if mcfg.stamp_size != stamp_size:
        mismatch.append(f"stamp size {mcfg.stamp_size} px (the datacube's is {stamp_size} px)")
    if [str(c) for c in meta.get("channels", [])] != channels or mcfg.in_channels != len(channels):
        mismatch.append(f"channels {meta.get('channels')} (the datacube's are {channels})")
    if None not in (meta.get("normalisation"), normalisation) and meta["normalisation"] != normalisation:
        mismatch.append(f"normalisation {meta['normalisation']} (the datacube's is {normalisation})")
    if mismatch:
        raise InputError(
            f"init model '{pt.with_suffix('.json')}' does not fit this training: {'; '.join(mismatch)}: fine-tune "
            "from a model with the same architecture and widths trained on stamps like these, or train from scratch"
        )
    return InitModel(path=pt, sha256=file_sha256(pt), config=mcfg, state=model.state_dict())


def seeded_model(
    mcfg: ModelConfig, *, seed: int, device: torch.device, state: dict[str, torch.Tensor] | None = None
) -> nn.Module:
    """Seed every global RNG of training, then build the model (fresh, or with the weights ``state``).

    Parameters
    ----------
    mcfg : ModelConfig
        The architecture.
    seed : int
        Global seed: the initial weights, dropout and the numpy/python RNGs derive from it.
    device : torch.device
        Where the model goes.
    state : dict, optional
        Weights to start from (fine-tuning).

    Returns
    -------
    torch.nn.Module
    """
    torch.manual_seed(derive(seed, "train", "init"))
    np.random.seed(derive(seed, "train", "numpy") % 2**32)
    random.seed(derive(seed, "train", "python"))
    model = build_model(mcfg)
    if state is not None:
        model.load_state_dict(state)
    return model.to(device)


def weighted_loss(
    logits: torch.Tensor, y: torch.Tensor, class_w: torch.Tensor, *, stamp_w: torch.Tensor | None = None
) -> torch.Tensor:
    """Class-weighted binary cross-entropy of ``logits`` against labels ``y`` (float, 1 = real).

    Parameters
    ----------
    logits, y : torch.Tensor
        ``(N,)`` logits and labels.
    class_w : torch.Tensor
        Weight of a bogus and of a real stamp.
    stamp_w : torch.Tensor, optional
        ``(N,)`` extra weight of each stamp (:func:`stamp_weights`), multiplied with its class weight.

    Returns
    -------
    torch.Tensor
        The weighted mean loss (a scalar).
    """
    w = class_w[y.long()] if stamp_w is None else class_w[y.long()] * stamp_w
    return (nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none") * w).sum() / w.sum()


def predict_logits(model: nn.Module, X: torch.Tensor, *, device: torch.device, batch_size: int) -> np.ndarray:
    """Logits of ``model`` (in eval mode, without gradients) for the stamps ``X``, in batches.

    Parameters
    ----------
    model : torch.nn.Module
        The model (switched to eval mode).
    X : torch.Tensor
        ``(N, C, H, W)`` normalised stamps.
    device : torch.device
        The model's device.
    batch_size : int
        Stamps per forward pass.

    Returns
    -------
    numpy.ndarray
        ``(N,)`` float32 logits.
    """
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(X), batch_size):
            out.append(model(X[i : i + batch_size].to(device)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def train_one_epoch(
    model: nn.Module,
    data: TrainingData,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    gen: torch.Generator,
    *,
    batch_size: int,
    desc: str,
) -> dict[str, float]:
    """One pass over the training stamps in shuffled mini-batches, each stamp randomly flipped/rotated.

    Parameters
    ----------
    model : torch.nn.Module
        The model (switched to train mode).
    data : TrainingData
        The training stamps and class weights.
    opt, sched : torch optimiser and learning-rate scheduler
        Stepped once per mini-batch.
    gen : torch.Generator
        RNG of the shuffle and the augmentation.
    batch_size : int
        Stamps per mini-batch.
    desc : str
        Label of the progress bar (shown on a terminal only).

    Returns
    -------
    dict
        ``train_loss`` (mean weighted loss per stamp) and ``train_acc`` (fraction with the logit's
        sign right), over the augmented stamps.
    """
    n = len(data.X_train)
    steps = max(1, math.ceil(n / batch_size))
    device = data.X_train.device
    model.train()
    perm = torch.randperm(n, generator=gen)
    k_all = torch.randint(0, 8, (n,), generator=gen).to(device)
    tot_loss, tot_ok = 0.0, 0
    with tqdm(total=steps, desc=desc, disable=not sys.stderr.isatty(), leave=False) as bar:
        for s in range(steps):
            b = perm[s * batch_size : (s + 1) * batch_size].to(device)
            xb = dihedral(data.X_train[b], k_all[b])
            yb = data.y_train[b]
            logits = model(xb)
            loss = weighted_loss(logits, yb, data.class_weights, stamp_w=data.w_train[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot_loss += loss.item() * len(b)
            tot_ok += int(((logits > 0).float() == yb).sum())
            bar.update(1)
    return {"train_loss": tot_loss / n, "train_acc": tot_ok / n}


def evaluate(model: nn.Module, data: TrainingData, *, batch_size: int) -> dict[str, float]:
    """Validation loss (class-weighted as in training) and accuracy (logit > 0) of ``model``.

    Parameters
    ----------
    model : torch.nn.Module
        The model (switched to eval mode).
    data : TrainingData
        The validation stamps and class weights.
    batch_size : int
        Stamps per forward pass.

    Returns
    -------
    dict
        ``val_loss`` and ``val_acc``.
    """
    logits = predict_logits(model, data.X_val, device=data.class_weights.device, batch_size=batch_size)
    loss = weighted_loss(torch.from_numpy(logits), torch.from_numpy(data.y_val).float(), data.class_weights.cpu())
    return {"val_loss": float(loss), "val_acc": float(((logits > 0) == data.y_val).mean())}


@dataclass
class Progress:
    """Where training stands: what a checkpoint holds besides the model, optimiser and RNGs.

    Attributes
    ----------
    epoch : int
        Epochs done.
    best_loss : float
        Lowest validation loss so far.
    bad_epochs : int
        Epochs since it last improved (early stopping at ``patience``).
    best_state : dict or None
        Weights of the best epoch.
    history : list of dict
        One row per epoch (epoch, train_loss, train_acc, val_loss, val_acc, lr).
    """

    epoch: int = 0
    best_loss: float = math.inf
    bad_epochs: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, float]] = field(default_factory=list)

    def record(self, row: dict[str, float], model: nn.Module) -> bool:
        """Add an epoch's row; keep the model's weights when the validation loss improved (returned)."""
        self.epoch = int(row["epoch"])
        self.history.append(row)
        if row["val_loss"] < self.best_loss:
            self.best_loss, self.bad_epochs = row["val_loss"], 0
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return True
        self.bad_epochs += 1
        return False


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


def save_checkpoint(
    path: Path,
    *,
    identity: dict[str, Any],
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    gen: torch.Generator,
    progress: Progress,
) -> None:
    """Write the end-of-epoch checkpoint, atomically.

    Parameters
    ----------
    path : pathlib.Path
        ``checkpoint.pt``.
    identity : dict
        What the checkpoint must match to be resumed (config, seed, datacube and init digests, model).
    model, opt, sched : torch objects
        Their states are saved.
    gen : torch.Generator
        The batch RNG; its state and every global RNG state are saved.
    progress : Progress
        Epoch, best loss and weights, history.
    """
    _torch_save(
        {
            "identity": identity,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "epoch": progress.epoch,
            "best_loss": progress.best_loss,
            "bad_epochs": progress.bad_epochs,
            "best_state": progress.best_state,
            "history": progress.history,
            "rng": _rng_states(gen),
        },
        path,
    )


def resume(
    path: Path,
    identity: dict[str, Any],
    *,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    gen: torch.Generator,
) -> Progress:
    """Restore a checkpoint of the same training into ``model``, ``opt``, ``sched``, ``gen`` and the global RNGs.

    Parameters
    ----------
    path : pathlib.Path
        ``checkpoint.pt`` (loaded with ``weights_only=True``).
    identity : dict
        The present training's identity; a checkpoint with another is ignored (with a warning).
    model, opt, sched, gen : torch objects
        Restored in place.

    Returns
    -------
    Progress
        The checkpoint's progress, or a fresh one when there is no checkpoint of this training.
    """
    if not path.exists():
        return Progress()
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if ck["identity"] != identity:
        log.warning("checkpoint %s is for another config or datacube: starting over", path)
        return Progress()
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    _set_rng_states(ck["rng"], gen)
    log.info("resuming from %s after epoch %d", path, ck["epoch"])
    return Progress(ck["epoch"], ck["best_loss"], ck["bad_epochs"], ck["best_state"], ck["history"])


@dataclass
class Calibration:
    """Temperature scaling and threshold fitted on the validation frames (see :func:`calibrate`).

    Attributes
    ----------
    temperature : float
        ``T`` of P(real) = sigmoid(logit / T).
    threshold : float
        Calibrated P(real) of maximum validation MCC.
    p_test : numpy.ndarray
        Calibrated P(real) of the test stamps.
    report : dict
        ``temperature`` and the ECE of the validation and test stamps before and after scaling.
    """

    temperature: float
    threshold: float
    p_test: np.ndarray
    report: dict[str, float]


def calibrate(model: nn.Module, data: TrainingData, *, batch_size: int) -> Calibration:
    """Fit the temperature and the threshold on the validation stamps; calibrate the test stamps.

    Parameters
    ----------
    model : torch.nn.Module
        The trained model (its best weights).
    data : TrainingData
        Validation and test stamps.
    batch_size : int
        Stamps per forward pass.

    Returns
    -------
    Calibration
    """
    device = data.class_weights.device
    val_logits = predict_logits(model, data.X_val, device=device, batch_size=batch_size).astype(np.float64)
    temperature = fit_temperature(val_logits, data.y_val)
    p_val_raw = 1 / (1 + np.exp(-val_logits))
    p_val = 1 / (1 + np.exp(-val_logits / temperature))
    threshold = best_mcc_threshold(data.y_val, p_val)
    test_logits = predict_logits(model, data.X_test, device=device, batch_size=batch_size).astype(np.float64)
    p_test_raw = 1 / (1 + np.exp(-test_logits))
    p_test = 1 / (1 + np.exp(-test_logits / temperature))
    report = {
        "temperature": temperature,
        "ece_val_before": expected_calibration_error(data.y_val, p_val_raw),
        "ece_val_after": expected_calibration_error(data.y_val, p_val),
        "ece_test_before": expected_calibration_error(data.y_test, p_test_raw),
        "ece_test_after": expected_calibration_error(data.y_test, p_test),
    }
    return Calibration(temperature=temperature, threshold=threshold, p_test=p_test, report=report)


def held_out_metrics(data: TrainingData, cal: Calibration, *, seed: int) -> dict[str, Any]:
    """The content of ``metrics.json``: test metrics overall and per S/N bin, with bootstrap intervals.

    Parameters
    ----------
    data : TrainingData
        Test labels and S/N.
    cal : Calibration
        Test P(real) and the threshold.
    seed : int
        Seed of the bootstrap.

    Returns
    -------
    dict
        split, threshold, test (:func:`rbflow.metrics.binary_metrics`), by_snr (the same per
        :data:`SNR_BINS` bin), calibration, bootstrap_resamples, rbflow_version.
    """
    y, p = data.y_test, cal.p_test
    by_snr = []
    for lo, hi in zip(SNR_BINS[:-1], SNR_BINS[1:]):
        sel = (data.snr_test >= lo) & (data.snr_test < hi)
        by_snr.append(
            {"snr_min": lo, "snr_max": hi, **binary_metrics(y[sel], p[sel], threshold=cal.threshold, seed=seed)}
        )
    return {
        "split": "test",
        "threshold": cal.threshold,
        "test": binary_metrics(y, p, threshold=cal.threshold, seed=seed),
        "by_snr": by_snr,
        "calibration": cal.report,
        "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
        "rbflow_version": __version__,
    }


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
    write_figure(fig, path, dpi=100)


def _label_repair_record(cube: dict[str, Any], data: TrainingData) -> dict[str, Any] | None:
    repair = cube["meta"].get("label_repair")
    if not repair:
        return None
    changed = [str(i) for i in repair.get("changed", [])]
    record = {k: repair[k] for k in ("mode", "weight", "source", "made_by") if k in repair}
    if repair.get("mode") == "weight":
        n = int((data.w_train.cpu().numpy() != 1).sum())
        log.info("label repair: %d of %d training stamps down-weighted to %s", n, len(data.w_train), repair["weight"])
        record["down_weighted_in_training"] = n
    return {**record, "changed": changed}


def describe_model(
    model: nn.Module,
    mcfg: ModelConfig,
    cfg: dict[str, Any],
    *,
    seed: int,
    device: torch.device,
    cube: dict[str, Any],
    datacube_path: Path,
    cube_hash: str,
    data: TrainingData,
    cal: Calibration,
    metrics: dict[str, Any],
    epochs_run: int,
    init: dict[str, Any] | None,
) -> dict[str, Any]:
    """The content of ``model.json``: how to rebuild and feed the model, and how it was made.

    Parameters
    ----------
    model : torch.nn.Module
        The trained model (its parameters are counted).
    mcfg : ModelConfig
        Its architecture.
    cfg : dict
        The full ``train`` block.
    seed : int
        Global seed.
    device : torch.device
        Device trained on.
    cube : dict
        The loaded datacube (channels, meta).
    datacube_path : pathlib.Path
        Its file.
    cube_hash : str
        SHA-256 of the file.
    data : TrainingData
        The split.
    cal : Calibration
        Temperature, threshold, calibration report.
    metrics : dict
        From :func:`held_out_metrics`.
    epochs_run : int
        Epochs trained.
    init : dict or None
        ``{"path", "sha256", "val_loss_before"}`` of the model fine-tuned from, None when trained from scratch.

    Returns
    -------
    dict
        model, stamp_size, cutout_size, crop, channels, normalisation, output, temperature,
        threshold, threshold_rule, training, init, label_repair (None, or how the datacube's likely
        label errors were treated and which training stamps that changed), parameters, datacube,
        split, split_counts, metrics, rbflow_version; :func:`write_artefacts` adds ``ood``.
    """
    return {
        "model": mcfg.to_dict(),
        "stamp_size": mcfg.stamp_size,
        "cutout_size": cube["meta"].get("cutout_size", mcfg.stamp_size),
        "crop": cube["meta"].get("crop"),
        "channels": [str(c) for c in cube["channels"]],
        "normalisation": cube["meta"].get("normalisation"),
        "output": "one logit per stamp; P(real) = sigmoid(logit / temperature)",
        "temperature": cal.temperature,
        "threshold": cal.threshold,
        "threshold_rule": "maximum MCC of the calibrated P(real) on the validation frames",
        "training": {**cfg, "seed": seed, "device_used": str(device), "epochs_run": epochs_run},
        "init": init,
        "label_repair": _label_repair_record(cube, data),
        "parameters": count_parameters(model),
        "datacube": {
            "path": str(datacube_path),
            "sha256": cube_hash,
            "meta": {k: v for k, v in cube["meta"].items() if k != "skipped"},
        },
        "split": data.frames,
        "split_counts": data.counts,
        "metrics": {"test": metrics["test"], "calibration": cal.report},
        "rbflow_version": __version__,
    }


def write_artefacts(
    out_dir: Path,
    *,
    model: nn.Module,
    cal: Calibration,
    metrics: dict[str, Any],
    history: list[dict[str, float]],
    meta: dict[str, Any],
    sample_shape: tuple[int, int, int],
    datacube_path: Path,
    ood: KnnOOD,
) -> None:
    """Write the seven outputs of a training into ``out_dir``, each atomically.

    Parameters
    ----------
    out_dir : pathlib.Path
        Created if needed. Receives model.pt (``state_dict``), model.onnx (with temperature and
        sigmoid), history.ecsv, metrics.json, training.png (learning curves), model.ood (the OOD
        reference of :mod:`rbflow.uncertainty`) and model.json (whose ``ood`` entry names model.ood
        with its SHA-256 and provenance).
    model : torch.nn.Module
        The trained model (moved to the CPU, eval mode).
    cal : Calibration
        Its temperature.
    metrics : dict
        From :func:`held_out_metrics`.
    history : list of dict
        One row per epoch.
    meta : dict
        The content of model.json.
    sample_shape : tuple of int
        ``(C, H, W)`` of one stamp (the ONNX input).
    datacube_path : pathlib.Path
        Recorded in the history's meta.
    ood : rbflow.uncertainty.KnnOOD
        The OOD reference fitted on the training stamps.
    """
    table = Table(rows=[[r[k] for k in history[0]] for r in history], names=list(history[0]))
    table.meta.update({"made_by": made_by("rbflow.train.train"), "datacube": str(datacube_path)})
    out_dir.mkdir(parents=True, exist_ok=True)
    model.cpu().eval()
    _torch_save(model.state_dict(), out_dir / "model.pt")
    export_onnx(model, cal.temperature, sample_shape, out_dir / "model.onnx")
    write_table(table, out_dir / "history.ecsv")
    write_json(metrics, out_dir / "metrics.json")
    _plot_history(table, out_dir / "training.png")
    ood.save(out_dir / OOD_FILE)
    meta["ood"] = {
        "file": OOD_FILE,
        "sha256": file_sha256(out_dir / OOD_FILE),
        "made_by": made_by("rbflow.train.write_artefacts"),
        "method": OOD_METHOD,
        "k": ood.k,
        "stamps": f"{len(ood.reference)} of the {meta['split_counts']['train']} training-frame stamps (seeded)",
        "quantile": (
            "leave-one-out distances of the reference stamps"
            if ood.heldout_scores is None
            else f"the {len(ood.heldout_scores)} validation-frame stamps' scores; between-frame spread of a frame's "
            f"mean quantile {ood.frame_spread:.4f}"
        ),
    }
    write_json(meta, out_dir / "model.json")


def train(
    datacube_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: dict[str, Any],
    *,
    seed: int,
    checkpoint_dir: str | os.PathLike,
    init: str | os.PathLike | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Train (or fine-tune), calibrate and evaluate a model on a datacube; write the model and its report.

    Parameters
    ----------
    datacube_path : path-like
        Datacube from :func:`rbflow.datacube.build_datacube`.
    out_dir : path-like
        Output folder: model.pt (state_dict), model.json, model.onnx, history.ecsv, metrics.json,
        training.png, model.ood (the OOD reference inference reads).
    cfg : dict
        The ``train`` config block (missing keys take the defaults of ``config.schema.yaml``).
    seed : int
        Global seed; the split, initial weights, shuffling and augmentation derive from it.
    checkpoint_dir : path-like
        Folder of ``checkpoint.pt``, kept outside ``out_dir``. An existing checkpoint with the same
        config, datacube and init is resumed; delete the folder to start over.
    init : path-like, optional
        Fine-tune: a model folder or ``model.pt`` (``model.json`` beside it) whose weights training
        starts from (:func:`load_init`); its architecture and widths must be the config's, its
        stamp size and channels the datacube's.
    threads : int, optional
        CPU threads of torch's operators (``torch.set_num_threads``, for the whole process); default:
        torch's own choice (all cores). Results differ between thread counts at the 1e-7 level.

    Returns
    -------
    dict
        The content of model.json.

    Raises
    ------
    InputError
        Unreadable datacube, fewer than 3 frames, an unusable device, or an init model that is
        unreadable or does not fit.
    """
    cfg = train_config(cfg)
    if threads is not None:
        torch.set_num_threads(int(threads))
    datacube_path, out_dir, checkpoint_dir = Path(datacube_path), Path(out_dir), Path(checkpoint_dir)
    cube = load_datacube(datacube_path)
    cube_hash = file_sha256(datacube_path)
    device = resolve_device(cfg["device"])
    channels = [str(c) for c in cube["channels"]]
    shape = tuple(int(n) for n in cube["X"].shape[1:])
    start = None
    if init is not None:
        norm = cube["meta"].get("normalisation")
        start = load_init(init, cfg, channels=channels, stamp_size=shape[-1], normalisation=norm)
    data = split_data(cube, cfg, seed=seed, device=device, source=datacube_path)
    mcfg = ModelConfig(cfg["architecture"], shape[0], shape[-1], list(cfg["widths"])) if start is None else start.config
    model = seeded_model(mcfg, seed=seed, device=device, state=None if start is None else start.state)
    gen = torch.Generator().manual_seed(derive(seed, "train", "batches"))
    bs = int(cfg["batch_size"])
    steps = max(1, math.ceil(len(data.X_train) / bs))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=cfg["epochs"] * steps)
    # what a checkpoint must match to be resumed (JSON round trip: tuples and lists compare equal)
    identity = {"config": cfg, "seed": seed, "datacube_sha256": cube_hash, "model": mcfg.to_dict()}
    init_record = None
    if start is not None:
        identity["init_sha256"] = start.sha256
        before = evaluate(model, data, batch_size=4 * bs)["val_loss"]
        init_record = {"path": str(start.path), "sha256": start.sha256, "val_loss_before": before}
        log.info("fine-tuning from %s (validation loss before: %.4f)", start.path, before)
    identity = json.loads(json.dumps(identity))

    ckpt_path = checkpoint_dir / "checkpoint.pt"
    progress = resume(ckpt_path, identity, model=model, opt=opt, sched=sched, gen=gen)
    for epoch in range(progress.epoch, cfg["epochs"]):
        if progress.bad_epochs >= cfg["patience"]:
            break
        t0 = time.perf_counter()
        desc = f"epoch {epoch + 1}/{cfg['epochs']}"
        fit = train_one_epoch(model, data, opt, sched, gen, batch_size=bs, desc=desc)
        row = {"epoch": epoch + 1, **fit, **evaluate(model, data, batch_size=4 * bs), "lr": sched.get_last_lr()[0]}
        improved = progress.record(row, model)
        # the epoch's wall time goes to the log only: outputs depend on the config and seed alone
        log.info(
            "%s: train loss %.4f acc %.4f | val loss %.4f acc %.4f | lr %.2e | %.1f s%s",
            desc,
            *(row[k] for k in ("train_loss", "train_acc", "val_loss", "val_acc", "lr")),
            time.perf_counter() - t0,
            " *" if improved else "",
        )
        save_checkpoint(ckpt_path, identity=identity, model=model, opt=opt, sched=sched, gen=gen, progress=progress)
    if progress.bad_epochs >= cfg["patience"]:
        log.info("early stop: validation loss has not improved for %d epochs", progress.bad_epochs)

    model.load_state_dict(progress.best_state)
    cal = calibrate(model, data, batch_size=4 * bs)
    model.cpu()
    ood = fit_reference(
        model,
        data.X_train.cpu().numpy(),
        seed=derive(seed, "train", "ood"),
        heldout=(data.X_val.numpy(), data.frame_val),
    )
    metrics = held_out_metrics(data, cal, seed=derive(seed, "train", "bootstrap"))
    meta = describe_model(
        model,
        mcfg,
        cfg,
        seed=seed,
        device=device,
        cube=cube,
        datacube_path=datacube_path,
        cube_hash=cube_hash,
        data=data,
        cal=cal,
        metrics=metrics,
        epochs_run=len(progress.history),
        init=init_record,
    )
    write_artefacts(
        out_dir,
        model=model,
        cal=cal,
        metrics=metrics,
        history=progress.history,
        meta=meta,
        sample_shape=shape,
        datacube_path=datacube_path,
        ood=ood,
    )
    log.info(
        "model written to %s: test AUC %.4f, FNR@FPR1%% %.3f, T = %.2f, threshold %.3f",
        out_dir,
        metrics["test"]["roc_auc"]["value"],
        metrics["test"]["fnr_at_fpr1"]["value"],
        cal.temperature,
        cal.threshold,
    )
    return json.loads(json.dumps(jsonable(meta)))


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
