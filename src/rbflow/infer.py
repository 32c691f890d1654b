"""Applying a trained model to cutouts: P(real) per candidate, kept list at a threshold.

``model.pt`` holds only a ``state_dict`` (loaded with ``weights_only=True``: no pickle is executed);
``model.json`` next to it says how to rebuild the network and how to feed it (stamp size, channel
order, normalisation, temperature, suggested threshold).
"""

from __future__ import annotations

import json
import logging
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
from rbflow.uncertainty import UNCERTAINTY_COLUMNS, mc_dropout, model_reference, network_features, reference_ood

__all__ = [
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
    if meta.get("normalisation") not in (None, NORMALISATION):
        raise InputError(
            f"the model was trained with normalisation {meta['normalisation']}, this rbflow applies "
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
) -> dict[str, np.ndarray]:
    """The :data:`UNCERTAINTY_COLUMNS` of normalised stamps ``X``.

    The OOD reference is the one stored with the model at training time
    (:func:`rbflow.uncertainty.model_reference`); ``cube``, when given, replaces it with one fitted
    on that datacube (models trained before references were stored). Without either, the OOD
    columns are NaN (logged).
    """
    mean, std = mc_dropout(model, meta, X, passes=mc_passes, seed=seed)
    reference = reference_ood(model, cube, seed=seed) if cube is not None else model_reference(model_path, meta)
    if reference is None:
        ood = quantile = np.full(len(X), np.nan)
    else:
        ood = reference.score(network_features(model, X))
        quantile = reference.quantile(ood)
    return {"p_real_mc": mean, "p_real_std": std, "ood_score": ood, "ood_quantile": quantile}


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
    model_path: str | os.PathLike,
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
    model_path : path-like
        ``model.pt`` (with ``model.json`` next to it).
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
        extra = _uncertainty(model, meta, X, mc_passes=mc_passes, seed=seed, model_path=model_path, cube=reference_cube)
        for name, values in extra.items():
            table[name] = values
        names = [str(p) for p in files]
    table.meta.update(
        {
            "made_by": "rbflow.infer.infer_cutouts",
            "cutout_dir": str(cutout_dir),
            "model": str(model_path),
            "temperature": meta.get("temperature", 1.0),
            "threshold": threshold,
            "columns": "label0 = P(bogus), label1 = P(real), calibrated; "
            + "; ".join(f"{name} = {text}" for name, text in UNCERTAINTY_COLUMNS),
            "mc_passes": mc_passes,
            "seed": seed,
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
