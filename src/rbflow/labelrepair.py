"""Finding and repairing likely label errors of a datacube (confident learning, out-of-fold).

Automatic labels from crossmatching are noisy (a transient next to a cosmic ray, an injection on a
star residual). :func:`out_of_fold` trains one model per group of frames on the other frames
(:func:`rbflow.train.train`) and predicts the held-out stamps, so every stamp gets a P(real) from a
model that never saw it. :func:`find_label_issues` then applies confident learning (Northcutt,
Jiang & Chuang 2021): with per-class thresholds ``t_j`` = the mean out-of-fold probability of class
``j`` over the stamps labelled ``j``, a stamp whose probability of the *other* class reaches that
class's threshold (and exceeds its own class's margin) is a likely label error; issues are ranked by
the self-confidence (the out-of-fold probability of the given label), lowest first.
:func:`repair_cube` writes a datacube without them (``drop``), with their labels flipped
(``flip``), or with them kept but down-weighted in the training loss (``weight``: the datacube's
meta carries the weight, which :func:`rbflow.train.stamp_weights` applies), listing the candidates
it changed in its meta.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from astropy.table import Table

from rbflow.datacube import load_datacube, write_datacube
from rbflow.errors import InputError
from rbflow.io import made_by, write_table
from rbflow.seeds import derive

__all__ = [
    "MODES",
    "DEFAULT_WEIGHT",
    "frame_folds",
    "out_of_fold",
    "find_label_issues",
    "repair_cube",
    "run_label_repair",
]

log = logging.getLogger(__name__)

#: What :func:`repair_cube` does to the likely label errors.
MODES = ("drop", "flip", "weight")
#: Default loss weight of a likely label error in mode ``weight`` (a tenth of a clean stamp's).
DEFAULT_WEIGHT = 0.1


def frame_folds(frames: np.ndarray, *, folds: int, seed: int) -> np.ndarray:
    """Assign whole frames to ``folds`` groups of similar stamp counts.

    Parameters
    ----------
    frames : numpy.ndarray
        Frame of each stamp.
    folds : int
        Number of folds (>= 2, <= number of frames).
    seed : int
        Seed of the frame order.

    Returns
    -------
    numpy.ndarray
        int ``(N,)`` fold of each stamp.

    Raises
    ------
    InputError
        Fewer frames than folds, or ``folds`` < 2.
    """
    names, counts = np.unique(np.asarray(frames).astype(str), return_counts=True)
    if folds < 2 or len(names) < folds:
        raise InputError(
            f"label repair needs 2 <= folds <= frames, got {folds} folds for {len(names)} frames: lower --folds"
        )
    order = np.random.default_rng(seed).permutation(len(names))
    order = order[np.argsort(-counts[order], kind="stable")]
    load = np.zeros(folds)
    fold_of: dict[str, int] = {}
    for i in order:
        k = int(np.argmin(load))
        fold_of[str(names[i])] = k
        load[k] += counts[i]
    return np.array([fold_of[str(f)] for f in np.asarray(frames).astype(str)], dtype=np.int64)


def out_of_fold(
    cube_path: str | os.PathLike, work_dir: str | os.PathLike, cfg: dict[str, Any], *, folds: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold P(real) of every stamp of a datacube (one model per fold, trained on the others).

    Parameters
    ----------
    cube_path : path-like
        Datacube of :func:`rbflow.datacube.build_datacube`.
    work_dir : path-like
        Folder of the fold datacubes and models (``fold{k}/``).
    cfg : dict
        ``train`` config block given to :func:`rbflow.train.train`.
    folds : int
        Number of frame groups.
    seed : int
        Seed of the folds and of each fold's training.

    Returns
    -------
    p_oof : numpy.ndarray
        float64 ``(N,)`` calibrated P(real) from the model that did not see the stamp.
    fold : numpy.ndarray
        int ``(N,)`` fold of each stamp.

    Raises
    ------
    InputError
        Unreadable datacube, too few frames, or a fold's training frames with a single class.
    """
    from rbflow.infer import load_model, predict
    from rbflow.train import train

    cube = load_datacube(cube_path)
    work_dir = Path(work_dir)
    fold = frame_folds(cube["frame"], folds=folds, seed=derive(seed, "labelrepair", "folds"))
    p_oof = np.full(len(cube["y"]), np.nan)
    for k in range(folds):
        fit, held = fold != k, fold == k
        sub = work_dir / f"fold{k}"
        write_datacube(
            sub / "datacube.npz",
            cube["X"][fit],
            cube["y"][fit],
            **{name: cube[name][fit] for name in ("ids", "image", "frame", "mag", "snr", "truth_kind")},
            channels=[str(c) for c in cube["channels"]],
            meta={**cube["meta"], "label_repair_fold": k, "source_cube": str(cube_path)},
        )
        train(
            sub / "datacube.npz", sub / "model", cfg, seed=derive(seed, "labelrepair", k), checkpoint_dir=sub / "ckpt"
        )
        model, meta = load_model(sub / "model" / "model.pt")
        p_oof[held] = predict(model, meta, cube["X"][held])
        log.info("label repair: fold %d/%d predicted %d held-out stamps", k + 1, folds, int(held.sum()))
    return p_oof, fold


def find_label_issues(y: np.ndarray, p_real: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Likely label errors by confident learning (per-class thresholds on out-of-fold probabilities).

    Parameters
    ----------
    y : numpy.ndarray
        Given labels (1 = real).
    p_real : numpy.ndarray
        Out-of-fold P(real).

    Returns
    -------
    issue : numpy.ndarray
        bool ``(N,)``: the stamp confidently belongs to the other class.
    self_confidence : numpy.ndarray
        float ``(N,)``: out-of-fold probability of the given label (rank issues by it, lowest first).

    Raises
    ------
    ValueError
        A class is absent, or the arrays differ in length.
    """
    y = np.asarray(y).astype(np.int64)
    p = np.asarray(p_real, dtype=np.float64)
    if len(y) != len(p) or not ((y == 1).any() and (y == 0).any()):
        raise ValueError("find_label_issues needs labels of both classes and one probability per label")
    prob = np.column_stack([1.0 - p, p])
    thresholds = np.array([prob[y == j, j].mean() for j in (0, 1)])
    above = prob >= thresholds
    # the confident class: the one above its threshold, the more probable one when both are
    confident = np.where(above.all(axis=1), prob.argmax(axis=1), np.where(above[:, 1], 1, 0))
    issue = above.any(axis=1) & (confident != y)
    return issue, prob[np.arange(len(y)), y]


def repair_cube(
    cube_path: str | os.PathLike,
    out_path: str | os.PathLike,
    issue: np.ndarray,
    *,
    mode: str = "drop",
    weight: float = DEFAULT_WEIGHT,
) -> dict[str, Any]:
    """Write a datacube with the likely label errors dropped, flipped or down-weighted.

    Parameters
    ----------
    cube_path : path-like
        Source datacube.
    out_path : path-like
        Repaired datacube (written atomically).
    issue : numpy.ndarray
        bool ``(N,)`` from :func:`find_label_issues`.
    mode : {'drop', 'flip', 'weight'}
        Remove the stamps, give them the other label, or keep them with loss weight ``weight``.
    weight : float, optional
        Loss weight of the issues in mode ``weight``, in [0, 1].

    Returns
    -------
    dict
        The repaired datacube's meta; ``label_repair`` lists the changed candidate ids.

    Raises
    ------
    ValueError
        Unknown mode, ``weight`` outside [0, 1], or ``issue`` of another length.
    """
    if mode not in MODES:
        raise ValueError(f"label repair mode {mode!r} must be one of {', '.join(MODES)}")
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"label repair weight must be in [0, 1], got {weight}")
    cube = load_datacube(cube_path)
    issue = np.asarray(issue, dtype=bool)
    if len(issue) != len(cube["y"]):
        raise ValueError(f"issue mask has {len(issue)} entries, datacube '{cube_path}' {len(cube['y'])} stamps")
    keep = ~issue if mode == "drop" else np.ones(len(issue), dtype=bool)
    y = np.where(issue, 1 - cube["y"], cube["y"]) if mode == "flip" else cube["y"]
    meta = {
        **cube["meta"],
        "label_repair": {
            "made_by": made_by("rbflow.labelrepair.repair_cube"),
            "source": str(cube_path),
            "mode": mode,
            **({"weight": float(weight)} if mode == "weight" else {}),
            "changed": [str(i) for i in cube["ids"][issue]],
        },
    }
    write_datacube(
        out_path,
        cube["X"][keep],
        y[keep],
        **{name: cube[name][keep] for name in ("ids", "image", "frame", "mag", "snr", "truth_kind")},
        channels=[str(c) for c in cube["channels"]],
        meta=meta,
    )
    log.info("label repair (%s): %d of %d stamps changed, written to %s", mode, int(issue.sum()), len(issue), out_path)
    return meta


def run_label_repair(
    cube_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: dict[str, Any],
    *,
    folds: int = 5,
    seed: int,
    mode: str = "drop",
    weight: float = DEFAULT_WEIGHT,
) -> Table:
    """Out-of-fold pass, label issues and repaired datacube of one datacube.

    Parameters
    ----------
    cube_path : path-like
        Datacube to check.
    out_dir : path-like
        Writes ``label_issues.ecsv`` (one row per stamp: id, image, frame, label, p_oof,
        self_confidence, issue, fold; issues first, lowest self-confidence first; read by the
        scanning page's "likely label errors" queue), ``datacube_repaired.npz`` and the fold models.
    cfg : dict
        ``train`` config block of each fold's training.
    folds : int, optional
        Number of frame groups.
    seed : int
        Seed of the folds and trainings.
    mode : {'drop', 'flip', 'weight'}
        What the repaired datacube does to the issues.
    weight : float, optional
        Loss weight of the issues in mode ``weight``.

    Returns
    -------
    astropy.table.Table
        The table written to ``label_issues.ecsv``.

    Raises
    ------
    InputError
        See :func:`out_of_fold`.
    """
    if mode not in MODES:
        raise ValueError(f"label repair mode {mode!r} must be one of {', '.join(MODES)}")
    out_dir = Path(out_dir)
    cube = load_datacube(cube_path)
    p_oof, fold = out_of_fold(cube_path, out_dir / "folds", cfg, folds=folds, seed=seed)
    issue, conf = find_label_issues(cube["y"], p_oof)
    table = Table(
        {
            "id": cube["ids"].astype(str),
            "image": cube["image"].astype(str),
            "frame": cube["frame"].astype(str),
            "label": np.where(cube["y"] == 1, "true", "false"),
            "p_oof": p_oof,
            "self_confidence": conf,
            "issue": issue,
            "fold": fold,
        },
        meta={
            "made_by": made_by("rbflow.labelrepair.run_label_repair"),
            "datacube": str(cube_path),
            "folds": folds,
            "seed": seed,
            "method": "confident learning on out-of-fold P(real) (Northcutt et al. 2021)",
        },
    )
    table = table[np.lexsort((conf, ~issue))]
    write_table(table, out_dir / "label_issues.ecsv")
    repair_cube(cube_path, out_dir / "datacube_repaired.npz", issue, mode=mode, weight=weight)
    log.info("label repair: %d likely label errors among %d stamps", int(issue.sum()), len(issue))
    return table
