"""Applying a trained model to cutouts: P(real) per candidate, kept list at a threshold.

``model.pt`` holds only a ``state_dict`` (loaded with ``weights_only=True``: no pickle is executed);
``model.json`` next to it says how to rebuild the network and how to feed it (stamp size, channel
order, normalisation, temperature, suggested threshold).

The starter model (:data:`STARTER_DIR`, shipped with the package, made by ``snakemake --configfile
config/starter.yaml starter``) is used when no model is given. :func:`score_triplets` scores raw
science/reference/difference stamps made by any pipeline.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from astropy.table import Table, join
from torch import nn

from rbflow import __version__
from rbflow.datacube import NORMALISATION, crop_stamps, normalise, read_stamp
from rbflow.errors import ConfigError, InputError
from rbflow.io import read_table, write_table
from rbflow.model import ModelConfig, build_model
from rbflow.uncertainty import (
    SHIFT_Z,
    UNCERTAINTY_COLUMNS,
    mc_dropout,
    model_reference,
    network_features,
    reference_ood,
)

__all__ = [
    "STARTER_DIR",
    "TRIPLET_CHANNELS",
    "starter_model_path",
    "resolve_model",
    "install_starter",
    "score_triplets",
    "centre_crop",
    "load_model",
    "check_compatible",
    "predict",
    "predict_onnx",
    "infer_cutouts",
    "write_infer_dat",
    "CANDIDATE_COLUMNS",
    "INFER_DAT_COLUMNS",
]

log = logging.getLogger(__name__)

#: Folder of the starter model shipped with the package (model.pt, model.json, model.onnx).
STARTER_DIR = Path(__file__).resolve().parent / "models" / "starter"
#: The channels :func:`score_triplets` takes, in its argument order.
TRIPLET_CHANNELS = ("SCI", "REF", "DIFF")

#: Candidate columns taken from the cutout headers when there is no manifest: (name, header key, dtype).
CANDIDATE_COLUMNS: tuple[tuple[str, str, type], ...] = (
    ("id", "ID", str),
    ("image", "IMAGE", str),
    ("frame", "FRAME", str),
    ("x", "X", float),
    ("y", "Y", float),
    ("ra", "RA", float),
    ("dec", "DEC", float),
    ("mag", "MAG", float),
    ("mag_err", "MAGERR", float),
    ("snr", "SNR", float),
    ("filter", "FILTER", str),
    ("fwhm", "FWHM", float),
    ("flags", "FLAGS", int),
)


def load_model(model_path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Load ``model.pt`` (weights only) and its ``model.json``; return the model in eval mode.

    Parameters
    ----------
    model_path : path-like
        The ``model.pt`` written by :func:`rbflow.train.train`; ``model.json`` must sit next to it.

    Returns
    -------
    model : torch.nn.Module
        On the CPU, in eval mode.
    meta : dict
        Content of model.json.

    Raises
    ------
    InputError
        Missing/corrupt files, a file needing pickle (not a plain state_dict), or weights that do not
        fit the architecture described in model.json.
    """
    model_path = Path(model_path)
    json_path = model_path.with_suffix(".json")
    for p in (model_path, json_path):
        if not p.exists():
            raise InputError(f"model file '{p}' does not exist: train a model first (rbflow train) or fix the path")
    try:
        meta = json.loads(json_path.read_text())
        cfg = ModelConfig.from_dict(meta["model"])
    except (ValueError, KeyError, TypeError, ConfigError) as exc:
        raise InputError(f"model description '{json_path}' is not valid ({exc}): retrain or restore it") from exc
    try:
        state = torch.load(model_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for pickled objects, RuntimeError/EOFError for corrupt zips
        raise InputError(
            f"model file '{model_path}' cannot be loaded as plain weights ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}): it is corrupt or holds pickled Python objects, "
            "which rbflow refuses to run; use the model.pt written by 'rbflow train'"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(
            f"model file '{model_path}' is not a state_dict of tensors: use the model.pt from 'rbflow train'"
        )
    model = build_model(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise InputError(
            f"model file '{model_path}' does not match the architecture in '{json_path}' "
            f"({str(exc).splitlines()[0]}): keep the two files of one training together"
        ) from exc
    return model.eval(), meta


def starter_model_path() -> Path:
    """The ``model.pt`` of the starter model shipped with rbflow.

    Returns
    -------
    pathlib.Path
        ``STARTER_DIR / "model.pt"`` (``model.json`` and ``model.onnx`` beside it).

    Raises
    ------
    InputError
        The installed package has no starter model (a checkout where it was never trained).
    """
    path = STARTER_DIR / "model.pt"
    if not path.exists() or not path.with_suffix(".json").exists():
        raise InputError(
            f"the starter model '{path}' is not installed: make it with 'snakemake starter --configfile "
            "config/starter.yaml', reinstall rbflow, or give a model (--model)"
        )
    return path


def resolve_model(model: str | os.PathLike | None) -> Path:
    """The ``model.pt`` a user means: the starter model, a model folder or a ``model.pt``.

    Parameters
    ----------
    model : path-like or None
        None or the word ``"starter"``: the starter model (:func:`starter_model_path`); a folder: its
        ``model.pt``; otherwise the ``model.pt`` itself (``./starter`` names a folder called starter).

    Returns
    -------
    pathlib.Path
        The ``model.pt`` (its existence is checked by :func:`load_model`).
    """
    if model is None or (isinstance(model, str) and model == "starter"):
        return starter_model_path()
    path = Path(model)
    return path / "model.pt" if path.is_dir() else path


def install_starter(
    model_dir: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    command: str,
    config: dict[str, Any],
    seed: int,
    git_commit: str,
    benchmark: str | os.PathLike | None,
) -> dict[str, Any]:
    """Copy a trained model into the starter folder, with its provenance in ``model.json``.

    Parameters
    ----------
    model_dir : path-like
        Folder of a training (:func:`rbflow.train.train`): model.pt, model.json, model.onnx and
        model.ood (the OOD score's reference, :data:`rbflow.uncertainty.OOD_FILE`).
    dest : path-like
        The starter folder (:data:`STARTER_DIR` in the workflow's ``starter`` rule); each file is
        written atomically.
    command : str
        The command that made the model.
    config : dict
        The run configuration it was made with (telescope file, ``convert``, ``train``, ``seed``).
    seed : int
        The global seed.
    git_commit : str
        The commit of the code (with ``-dirty`` when the checkout had changes).
    benchmark : path-like or None
        Snakemake benchmark file (TSV) of the training job: its ``s`` column, the job's wall time
        (s), is recorded as ``training_time_s`` (None when the file is missing or not given).

    Returns
    -------
    dict
        The provenance, stored as ``model.json``'s ``provenance``: command, config, seed, git_commit,
        training_time_s, metrics (test ``roc_auc``, ``fnr_at_fpr1`` with their intervals,
        ``threshold``, ``n_test``), made_by.

    Raises
    ------
    InputError
        A file of the training is missing.
    """
    import shutil

    from rbflow.io import atomic_path, made_by, write_json

    model_dir, dest = Path(model_dir), Path(dest)
    for name in ("model.pt", "model.json", "model.onnx", "model.ood"):
        if not (model_dir / name).exists():
            raise InputError(f"'{model_dir / name}' does not exist: train the model first (snakemake ... train)")
    meta = json.loads((model_dir / "model.json").read_text())
    test = meta["metrics"]["test"]
    training_time_s = None
    if benchmark is not None and Path(benchmark).exists():
        import csv

        with open(benchmark, newline="") as fh:
            training_time_s = float(next(csv.DictReader(fh, delimiter="\t"))["s"])
    provenance = {
        "command": command,
        "config": config,
        "seed": seed,
        "git_commit": git_commit,
        "training_time_s": training_time_s,
        "metrics": {
            "split": "test frames of the training's frame split (model.json 'split')",
            "roc_auc": test["roc_auc"],
            "fnr_at_fpr1": test["fnr_at_fpr1"],
            "threshold": meta["threshold"],
            "n_test": meta["split_counts"]["test"],
        },
        "made_by": made_by("rbflow.infer.install_starter"),
    }
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("model.pt", "model.onnx", "model.ood"):
        with atomic_path(dest / name) as tmp:
            shutil.copyfile(model_dir / name, tmp)
    write_json({**meta, "provenance": provenance}, dest / "model.json")
    log.info("starter model installed in %s: test AUC %.4f", dest, test["roc_auc"]["value"])
    return provenance


def _as_model(model: Any) -> tuple[nn.Module, dict[str, Any], str]:
    """(module, meta, name) of a model given as None, a path or a loaded ``(module, meta)`` pair."""
    if isinstance(model, tuple):
        if len(model) != 2 or not isinstance(model[0], nn.Module) or not isinstance(model[1], dict):
            raise InputError("model must be a path, None (the starter model) or the (module, meta) pair of load_model")
        return model[0], model[1], "the given (module, meta) model"
    path = resolve_model(model)
    module, meta = load_model(path)
    return module, meta, str(path)


def centre_crop(x: np.ndarray, size: int) -> np.ndarray:
    """Central ``size`` x ``size`` crop of ``(..., H, W)`` stamps, H and W odd or even.

    The centre is pixel ``(H // 2, W // 2)`` (0-based row, column): the middle pixel of an odd side,
    and on an even side the pixel just above the middle, where a source lands in a stamp cut
    around it with astropy's ``Cutout2D`` (the convention of :func:`rbflow.datacube.crop_stamps`,
    of rbflow's own cutouts, centred on the candidate's pixel, and of :mod:`rbflow.alerts`). The
    crop keeps rows ``H // 2 - size // 2`` to ``H // 2 + size // 2`` (likewise columns).

    Parameters
    ----------
    x : numpy.ndarray
        Stamps, shape ``(..., H, W)`` with ``H, W >= size``.
    size : int
        Odd crop side (pixels).

    Returns
    -------
    numpy.ndarray
        A view of shape ``(..., size, size)``.
    """
    h, w = x.shape[-2:]
    r0, c0 = h // 2 - size // 2, w // 2 - size // 2
    return x[..., r0 : r0 + size, c0 : c0 + size]


def score_triplets(
    model: str | os.PathLike | tuple[nn.Module, dict[str, Any]] | None,
    sci: np.ndarray,
    ref: np.ndarray,
    diff: np.ndarray,
    *,
    batch_size: int = 1024,
) -> np.ndarray:
    """Calibrated P(real) of raw science/reference/difference stamps made by any pipeline.

    Each stamp is centre-cropped to the model's stamp size (:func:`centre_crop`: the candidate must
    sit on pixel ``(H // 2, W // 2)``), the channels are stacked in the model's order and
    normalised by :func:`rbflow.datacube.normalise` (the normalisation of training, per stamp and
    channel, after the crop), then scored by :func:`predict`. Pixel values are in any consistent
    unit (ADU, e-): the normalisation removes the median and the robust scale of each stamp. The
    reference must be aligned to the science stamp and the difference positive for a brightening
    (multiply a negative difference by -1 first, as :mod:`rbflow.alerts` does).

    Parameters
    ----------
    model : path-like, (torch.nn.Module, dict) or None
        None or ``"starter"``: the starter model shipped with rbflow; a ``model.pt`` or its folder;
        or the ``(module, meta)`` pair returned by :func:`load_model`.
    sci, ref, diff : numpy.ndarray
        Float arrays of shape ``(N, H, W)``, all three the same shape, ``H`` and ``W`` (odd or even)
        at least the model's stamp size; NaN marks invalid pixels (they become 0 after
        normalisation, as in training).
    batch_size : int, optional
        Stamps per forward pass.

    Returns
    -------
    numpy.ndarray
        float64 ``(N,)`` P(real) = sigmoid(logit / temperature).

    Raises
    ------
    InputError
        Arrays not 3-D, of different shapes or smaller than the model's stamps; a model needing a
        channel other than SCI, REF, DIFF (e.g. SCORR), or trained with another normalisation; a
        model that cannot be loaded.
    """
    net, meta, name = _as_model(model)
    channels = [str(c) for c in meta["channels"]]
    other = [c for c in channels if c not in TRIPLET_CHANNELS]
    if other:
        raise InputError(
            f"model {name} needs channels {channels}; score_triplets gives only {list(TRIPLET_CHANNELS)}, not "
            f"{other}: score with a model trained on SCI, REF and DIFF (key 'convert.channels'), e.g. the starter"
        )
    _check_normalisation(meta, f"model {name}")
    arrays = {"sci": np.asarray(sci), "ref": np.asarray(ref), "diff": np.asarray(diff)}
    shapes = {k: a.shape for k, a in arrays.items()}
    if any(len(s) != 3 for s in shapes.values()) or len(set(shapes.values())) != 1:
        raise InputError(f"sci, ref and diff must be (N, H, W) arrays of one shape, got {shapes}")
    size = int(meta["stamp_size"])
    n, h, w = shapes["sci"]
    if min(h, w) < size:
        raise InputError(
            f"stamps of {h} x {w} px are smaller than the model's {size} x {size} px: cut larger stamps around "
            "the candidates (the model does not pad)"
        )
    by_channel = dict(zip(TRIPLET_CHANNELS, arrays.values()))
    X = np.stack([centre_crop(by_channel[c], size) for c in channels], axis=1)
    return predict(net, meta, normalise(X), batch_size=batch_size)


def check_compatible(meta: dict[str, Any], channels: list[str], size: int, *, source: str | None = None) -> None:
    """Check that cutouts with ``channels`` of ``size`` px can be fed to the model described by ``meta``.

    A model trained on cropped stamps accepts cutouts of its datacube's cutout size (they are cropped
    the same way); no other size is accepted (no silent resampling).

    Parameters
    ----------
    meta : dict
        model.json content.
    channels : list of str
        Channels available in the cutouts.
    size : int
        Cutout side (pixels).
    source : str, optional
        The cutout file checked, named in the messages.

    Raises
    ------
    InputError
        A channel of the model is missing, or the size differs.
    """
    named = "" if source is None else f" (first cutout '{source}')"
    missing = [c for c in meta["channels"] if c not in channels]
    if missing:
        raise InputError(
            f"the model needs channels {meta['channels']} but the cutouts{named} lack {missing}: remake the "
            "cutouts with these channels or use a model trained on the available ones"
        )
    allowed = {int(meta["stamp_size"]), int(meta.get("cutout_size", meta["stamp_size"]))}
    if size not in allowed:
        raise InputError(
            f"the model expects stamps of {meta['stamp_size']} px (cutouts of {meta.get('cutout_size')} px), "
            f"the cutouts are {size} px{named}: remake the cutouts with size {meta.get('cutout_size')} or retrain"
        )
    _check_normalisation(meta, "the model")


def _check_normalisation(meta: dict[str, Any], which: str) -> None:
    """Refuse a model (``which`` names it in the message) trained with another normalisation than this rbflow's."""
    if meta.get("normalisation") not in (None, NORMALISATION):
        raise InputError(
            f"{which} was trained with normalisation {meta['normalisation']}, this rbflow applies "
            f"{NORMALISATION}: retrain the model with this rbflow version"
        )


def predict(model: nn.Module, meta: dict[str, Any], X: np.ndarray, *, batch_size: int = 1024) -> np.ndarray:
    """Calibrated P(real) of normalised stamps.

    Parameters
    ----------
    model : torch.nn.Module
        From :func:`load_model`.
    meta : dict
        model.json content (for the temperature).
    X : numpy.ndarray
        ``(N, C, H, W)`` stamps already passed through :func:`rbflow.datacube.normalise` (and cropped).
    batch_size : int, optional
        Stamps per forward pass.

    Returns
    -------
    numpy.ndarray
        float64 ``(N,)`` P(real) = sigmoid(logit / temperature). The model is switched to the
        channels-last memory format (faster on CPU; same results).
    """
    model.eval()
    inv_t = 1.0 / float(meta.get("temperature", 1.0))
    device = next(model.parameters()).device
    # channels-last tensors run the small convolutions faster on CPU (oneDNN); results are the same
    model.to(memory_format=torch.channels_last)
    out = [np.zeros(0)]
    with torch.no_grad():
        for i in range(0, len(X), batch_size):
            xb = torch.as_tensor(np.ascontiguousarray(X[i : i + batch_size]), dtype=torch.float32, device=device)
            xb = xb.contiguous(memory_format=torch.channels_last)
            out.append(torch.sigmoid(model(xb) * inv_t).double().cpu().numpy())
    return np.concatenate(out)


def predict_onnx(onnx_path: str | os.PathLike, X: np.ndarray) -> np.ndarray:
    """Calibrated P(real) of normalised stamps with the exported ``model.onnx`` (onnxruntime, CPU).

    Parameters
    ----------
    onnx_path : path-like
        ``model.onnx`` written by :func:`rbflow.train.train` (temperature and sigmoid included).
    X : numpy.ndarray
        ``(N, C, H, W)`` normalised stamps.

    Returns
    -------
    numpy.ndarray
        float64 ``(N,)`` P(real).
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (p,) = session.run(["p_real"], {"x": np.ascontiguousarray(X, dtype=np.float32)})
    return p.astype(np.float64)


def _empty_candidates() -> Table:
    extra = ["label0", "label1", *(name for name, _ in UNCERTAINTY_COLUMNS)]
    return Table(
        names=[c for c, _, _ in CANDIDATE_COLUMNS] + extra,
        dtype=[t for _, _, t in CANDIDATE_COLUMNS] + [float] * len(extra),
    )


def _uncertainty(
    model: nn.Module,
    meta: dict[str, Any],
    X: np.ndarray,
    *,
    mc_passes: int,
    seed: int,
    model_path: str | os.PathLike,
    cube: str | os.PathLike | None,
) -> tuple[dict[str, np.ndarray], tuple[float, float]]:
    """The :data:`UNCERTAINTY_COLUMNS` of normalised stamps ``X``, and the set's ``(mean quantile, z)``.

    The OOD reference is the one stored with the model at training time
    (:func:`rbflow.uncertainty.model_reference`); ``cube``, when given, replaces it with one fitted
    on that datacube (models trained before references were stored). Without either, the OOD
    columns are NaN (logged). The pair is :meth:`rbflow.uncertainty.KnnOOD.batch_shift` of the
    stamps as one set.
    """
    mean, std = mc_dropout(model, meta, X, passes=mc_passes, seed=seed)
    reference = reference_ood(model, cube, seed=seed) if cube is not None else model_reference(model_path, meta)
    if reference is None:
        ood = quantile = np.full(len(X), np.nan)
        shift = (math.nan, math.nan)
    else:
        ood = reference.score(network_features(model, X))
        quantile = reference.quantile(ood)
        shift = reference.batch_shift(quantile)
    return {"p_real_mc": mean, "p_real_std": std, "ood_score": ood, "ood_quantile": quantile}, shift


def _header_row(header: Any, stem: str) -> list[Any]:
    row: list[Any] = []
    for name, key, kind in CANDIDATE_COLUMNS:
        value = header.get(key, stem if name == "id" else None)
        try:
            row.append(kind(value))
        except (TypeError, ValueError):
            row.append(float("nan") if kind is float else kind())
    return row


#: ``infer_results.dat`` columns: (gmadet name, rbflow column, kind). gmadet's ``cnn_infer`` names the
#: candidate id ``candID`` (read by its ``checkinfer``), O'TRAIN's ``cand_ID`` (read by gmadet's
#: ``filter_candidates``): both are written.
INFER_DAT_COLUMNS: tuple[tuple[str, str, type], ...] = (
    ("RA", "ra", float),
    ("Dec", "dec", float),
    ("originalFile", "image", str),
    ("Xpos", "x", float),
    ("Ypos", "y", float),
    ("mag", "mag", float),
    ("magerr", "mag_err", float),
    ("FWHM", "fwhm", float),
    ("FWHMPSF", "psf_fwhm", float),
    ("candID", "id", str),
    ("cand_ID", "id", str),
    ("label0", "label0", float),
    ("label1", "label1", float),
)


def write_infer_dat(table: Table, filenames: list[str], path: str | os.PathLike) -> None:
    """Write the older tool's ``infer_results.dat``, read by :func:`rbflow.legacy.read_infer_results_dat`.

    An ``ascii.commented_header`` table with the columns of gmadet's and O'TRAIN's ``cnn_infer``:
    ``filename`` (the cutout file) then :data:`INFER_DAT_COLUMNS`; a value the candidates do not have
    (e.g. ``FWHMPSF``) is ``nan`` (``None`` for text). Xpos, Ypos are 0-based pixels (a comment line
    says so).

    Parameters
    ----------
    table : astropy.table.Table
        Output of :func:`infer_cutouts` (candidate columns, label0, label1).
    filenames : list of str
        Cutout file of each row.
    path : path-like
        Destination.
    """
    cols: dict[str, np.ndarray] = {"filename": np.asarray(filenames, dtype=str)}
    for name, col, kind in INFER_DAT_COLUMNS:
        if col not in table.colnames:
            cols[name] = np.full(len(table), np.nan if kind is float else "None")
        elif kind is float:
            cols[name] = np.ma.filled(np.ma.asarray(table[col], dtype=float), np.nan)
        else:
            cols[name] = np.ma.filled(np.ma.asarray(table[col]).astype(str), "None")
    dat = Table(cols)
    dat.meta["comments"] = [
        f"infer_results.dat written by rbflow {__version__}: label0 = P(bogus), label1 = P(real), calibrated",
        "Xpos Ypos are 0-based pixel coordinates (centre of the first pixel = 0), x = column, y = row",
    ]
    formats = {"RA": "%.8f", "Dec": "%.8f", "Xpos": "%.3f", "Ypos": "%.3f", "label0": "%.8g", "label1": "%.8g"}
    write_table(dat, path, format="ascii.commented_header", formats=formats)


def infer_cutouts(
    cutout_dir: str | os.PathLike,
    model_path: str | os.PathLike | None,
    out_table: str | os.PathLike,
    *,
    out_dat: str | os.PathLike | None = None,
    out_kept: str | os.PathLike | None = None,
    threshold: float | None = None,
    batch_size: int = 1024,
    mc_passes: int = 20,
    seed: int = 0,
    reference_cube: str | os.PathLike | None = None,
) -> Table:
    """Classify every ``{id}.fits`` cutout of a folder, with its uncertainty and OOD score.

    Parameters
    ----------
    cutout_dir : path-like
        Folder of cutout files (and optionally the ``cutouts.ecsv`` manifest, whose columns are used
        for the candidates when present; otherwise the cutout headers are).
    model_path : path-like or None
        ``model.pt`` (with ``model.json`` next to it) or its folder; None (or ``"starter"``): the
        starter model shipped with rbflow (:func:`starter_model_path`), said in the log and in the
        table's meta (``starter_model``).
    out_table : path-like
        ECSV: candidate columns + ``label0`` (P(bogus)) and ``label1`` (P(real)), one row per cutout,
        then the columns of :data:`rbflow.uncertainty.UNCERTAINTY_COLUMNS` (``p_real_mc``,
        ``p_real_std``: MC-dropout mean and spread; ``ood_score``, ``ood_quantile``: nearest-neighbour
        distance of the network features to the training stamps', NaN when the model has no stored
        OOD reference and no ``reference_cube`` is given).
    out_dat : path-like, optional
        The older tool's ``infer_results.dat`` (see :func:`write_infer_dat`).
    out_kept : path-like, optional
        ECSV of the rows with ``label1 >= threshold``.
    threshold : float, optional
        Threshold of the kept list; default: model.json's suggested threshold.
    batch_size : int, optional
        Stamps per forward pass.
    mc_passes : int, optional
        MC-dropout passes (>= 2) of ``p_real_mc`` and ``p_real_std``.
    seed : int, optional
        Seed of the dropout masks and of a ``reference_cube``'s subsample (same seed, same columns).
    reference_cube : path-like, optional
        Fit the OOD reference on this datacube instead of using the one stored with the model
        (for models trained before rbflow stored one; reads the whole datacube).

    Returns
    -------
    astropy.table.Table
        The table written to ``out_table`` (typed and empty, with a warning, when there is no cutout).

    Raises
    ------
    InputError
        Missing folder, unreadable cutout, cutouts incompatible with the model, bad model files.
    """
    cutout_dir = Path(cutout_dir)
    if not cutout_dir.is_dir():
        raise InputError(f"cutout folder '{cutout_dir}' does not exist: run the cutouts stage first")
    starter = model_path is None or (isinstance(model_path, str) and model_path == "starter")
    model_path = resolve_model(model_path)
    if starter:
        log.info("no model given: using rbflow's starter model %s", model_path)
    model, meta = load_model(model_path)
    threshold = float(meta["threshold"] if threshold is None else threshold)
    channels = list(meta["channels"])
    files = sorted(cutout_dir.glob("*.fits"))
    stamps, rows = [], []
    for path in files:
        stamp, header = read_stamp(path, channels, require_finite=False)
        if not stamps:
            check_compatible(meta, channels, stamp.shape[-1], source=str(path))
        elif stamp.shape != stamps[0].shape:
            raise InputError(
                f"cutout '{path}' is {stamp.shape[-1]} px, '{files[0]}' {stamps[0].shape[-1]} px: remake the cutouts"
            )
        stamps.append(stamp)
        rows.append(_header_row(header, path.stem))
    if not files:
        log.warning("cutout folder '%s' holds no cutout: writing empty outputs", cutout_dir)
        table = _empty_candidates()
        names = []
        shift = (math.nan, math.nan)
    else:
        X = np.stack(stamps)
        if X.shape[-1] != meta["stamp_size"]:
            X = crop_stamps(X, int(meta["stamp_size"]))
        X = normalise(X)
        p_real = predict(model, meta, X, batch_size=batch_size)
        table = Table(rows=rows, names=[c for c, _, _ in CANDIDATE_COLUMNS], dtype=[t for _, _, t in CANDIDATE_COLUMNS])
        manifest_path = cutout_dir / "cutouts.ecsv"
        if manifest_path.exists():
            manifest = read_table(manifest_path)
            if "id" not in manifest.colnames:
                raise InputError(f"manifest '{manifest_path}' has no 'id' column: remake the cutouts")
            manifest["id"] = manifest["id"].astype(str)
            order = Table({"id": table["id"], "_row": np.arange(len(table))})
            table = join(order, manifest, keys="id", join_type="left")
            table.sort("_row")
            table.remove_column("_row")
        table["label0"] = 1.0 - p_real
        table["label1"] = p_real
        extra, shift = _uncertainty(
            model, meta, X, mc_passes=mc_passes, seed=seed, model_path=model_path, cube=reference_cube
        )
        for name, values in extra.items():
            table[name] = values
        names = [str(p) for p in files]
        if shift[1] >= SHIFT_Z:
            log.warning(
                "%s: as a set, these %d candidates lie farther from the training stamps than new frames of the "
                "training sky do (mean ood_quantile %.3f, z = %.1f): the model may not transfer to them; label "
                "some (rbflow scan) and fine-tune (rbflow train --init)",
                cutout_dir,
                len(files),
                *shift,
            )
    table.meta.update(
        {
            "made_by": "rbflow.infer.infer_cutouts",
            "cutout_dir": str(cutout_dir),
            "model": str(model_path),
            "starter_model": starter,
            "temperature": meta.get("temperature", 1.0),
            "threshold": threshold,
            "columns": "label0 = P(bogus), label1 = P(real), calibrated; "
            + "; ".join(f"{name} = {text}" for name, text in UNCERTAINTY_COLUMNS),
            "mc_passes": mc_passes,
            "seed": seed,
            "ood_mean_quantile": shift[0],
            "ood_shift_z": shift[1],
            "ood_shift": "mean ood_quantile of these candidates and its distance z from 0.5 in units of the "
            f"spread of new frames' means (rbflow.uncertainty.KnnOOD.batch_shift); z >= {SHIFT_Z:g}: unlike "
            "the training sky as a set",
            "rbflow_version": __version__,
        }
    )
    write_table(table, out_table)
    if out_dat is not None:
        write_infer_dat(table, names, out_dat)
    if out_kept is not None:
        kept = table[table["label1"] >= threshold]
        write_table(kept, out_kept)
    n_kept = int((table["label1"] >= threshold).sum())
    log.info("%s: %d cutouts, %d with P(real) >= %.3f", cutout_dir, len(table), n_kept, threshold)
    return table
