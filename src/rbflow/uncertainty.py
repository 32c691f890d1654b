"""How sure the model is, and how far a stamp lies from what it was trained on.

Two numbers per stamp, next to P(real):

- **MC-dropout spread** (Gal & Ghahramani 2016): the dropout layer before the logit is left on at
  inference and the stamp is passed ``passes`` times with a seeded generator; the mean and standard
  deviation of the calibrated P(real) over the passes are reported. BatchNorm stays in eval mode.
- **Out-of-distribution score** (Lee et al. 2018): the Mahalanobis distance of the network's
  features to the nearest class mean of the training stamps, with a shared, slightly shrunk
  covariance; and its quantile among the training stamps' own distances (0.5: typical, 0.99:
  farther than 99 % of them). The features are the per-channel mean and standard deviation of
  every convolution block's output (Lee et al.'s feature ensemble over layers): on synthetic stamps
  the early blocks see shifts (a wider PSF, an extended host) that the last pooled features
  average away (tests/test_uncertainty.py).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rbflow.errors import InputError

__all__ = ["network_features", "mc_dropout", "MahalanobisOOD", "reference_ood", "UNCERTAINTY_COLUMNS"]

log = logging.getLogger(__name__)

#: Columns added to the infer tables: (name, description).
UNCERTAINTY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("p_real_mc", "mean calibrated P(real) over the MC-dropout passes"),
    ("p_real_std", "standard deviation of P(real) over the MC-dropout passes"),
    ("ood_score", "Mahalanobis distance of the network features to the nearest training class mean"),
    ("ood_quantile", "fraction of the training stamps with a smaller ood_score"),
)
#: Covariance shrinkage towards its mean variance (fraction): keeps the precision finite for
#: features that are constant on the training set (dead ReLU channels).
_SHRINK = 0.05
#: At most this many training stamps are used to fit the OOD reference (seeded subsample).
_MAX_REFERENCE = 4000


def network_features(model: Any, X: np.ndarray, *, batch_size: int = 512) -> np.ndarray:
    """Per-channel spatial mean and standard deviation of every convolution block's output.

    Parameters
    ----------
    model : torch.nn.Module
        An :mod:`rbflow.model` network, with a ``features`` convolution stack (used in eval mode).
    X : numpy.ndarray
        ``(N, C, H, W)`` normalised stamps.
    batch_size : int, optional
        Stamps per forward pass.

    Returns
    -------
    numpy.ndarray
        float64 ``(N, F)`` features, ``F`` = twice the sum of the block widths.

    Raises
    ------
    InputError
        The model has no ``features`` stack with ReLU activations.
    """
    import torch

    stack = getattr(model, "features", None)
    relus = [m for m in stack.modules() if isinstance(m, torch.nn.ReLU)] if stack is not None else []
    if not relus:
        raise InputError(
            f"model {type(model).__name__} has no 'features' stack with ReLU blocks: OOD scores need an "
            "rbflow.model network"
        )
    layers: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, o, store=layers: store.append(o)) for m in relus]
    out = []
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(X), batch_size):
                layers.clear()
                model(torch.as_tensor(np.ascontiguousarray(X[i : i + batch_size]), dtype=torch.float32))
                stats = [s for o in layers for s in (o.mean(dim=(2, 3)), o.std(dim=(2, 3)))]
                out.append(torch.cat(stats, dim=1).double().numpy())
    finally:
        for hook in hooks:
            hook.remove()
    width = 2 * sum(int(m.out_channels) for m in stack.modules() if isinstance(m, torch.nn.Conv2d))
    return np.concatenate(out) if out else np.zeros((0, width))


def mc_dropout(
    model: Any, meta: dict[str, Any], X: np.ndarray, *, passes: int, seed: int, batch_size: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and spread of the calibrated P(real) with the dropout layers switched on.

    Parameters
    ----------
    model : torch.nn.Module
        An :mod:`rbflow.model` network; left in eval mode on return.
    meta : dict
        model.json content (temperature).
    X : numpy.ndarray
        ``(N, C, H, W)`` normalised stamps.
    passes : int
        Number of stochastic passes (>= 2).
    seed : int
        Seed of the dropout masks (the result is the same for the same seed, stamps and threads).
    batch_size : int, optional
        Stamps per forward pass.

    Returns
    -------
    mean, std : numpy.ndarray
        float64 ``(N,)``: mean and standard deviation (ddof 0) of P(real) over the passes.

    Raises
    ------
    ValueError
        ``passes`` < 2.
    """
    import torch

    if passes < 2:
        raise ValueError(f"MC dropout needs at least 2 passes, got {passes}")
    inv_t = 1.0 / float(meta.get("temperature", 1.0))
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    if not dropouts or all(m.p == 0 for m in dropouts):
        log.warning("the model has no active dropout layer: MC-dropout spread is 0 for every stamp")
    model.eval()
    for m in dropouts:
        m.train()
    out = np.empty((passes, len(X)))
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            for k in range(passes):
                for i in range(0, len(X), batch_size):
                    xb = torch.as_tensor(np.ascontiguousarray(X[i : i + batch_size]), dtype=torch.float32)
                    out[k, i : i + len(xb)] = torch.sigmoid(model(xb) * inv_t).double().numpy()
    finally:
        model.eval()
    return out.mean(axis=0), out.std(axis=0)


@dataclass
class MahalanobisOOD:
    """Class-conditional Mahalanobis distance with a shared covariance (Lee et al. 2018).

    Attributes
    ----------
    means : numpy.ndarray
        ``(K, F)`` class means of the reference features.
    precision : numpy.ndarray
        ``(F, F)`` inverse of the shrunk shared covariance.
    reference : numpy.ndarray
        Sorted distances of the reference stamps themselves (for :meth:`quantile`).
    """

    means: np.ndarray
    precision: np.ndarray
    reference: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray) -> MahalanobisOOD:
        """Fit class means and the shared covariance.

        Parameters
        ----------
        features : numpy.ndarray
            ``(N, F)`` reference features (N > F is not required: the covariance is shrunk).
        labels : numpy.ndarray
            ``(N,)`` class of each reference stamp.

        Returns
        -------
        MahalanobisOOD

        Raises
        ------
        ValueError
            Fewer than 2 reference stamps.
        """
        features = np.asarray(features, dtype=np.float64)
        labels = np.asarray(labels)
        if len(features) < 2:
            raise ValueError(f"the OOD reference needs at least 2 stamps, got {len(features)}")
        classes = np.unique(labels)
        means = np.stack([features[labels == c].mean(axis=0) for c in classes])
        centred = features - means[np.searchsorted(classes, labels)]
        cov = centred.T @ centred / len(features)
        mean_var = max(float(np.trace(cov)) / cov.shape[0], 1e-12)
        cov = (1 - _SHRINK) * cov + _SHRINK * mean_var * np.eye(cov.shape[0])
        ood = cls(means=means, precision=np.linalg.inv(cov), reference=np.zeros(0))
        ood.reference = np.sort(ood.score(features))
        return ood

    def score(self, features: np.ndarray) -> np.ndarray:
        """Distance to the nearest class mean (in units of the shared covariance), ``(N,)`` float64."""
        features = np.asarray(features, dtype=np.float64)
        d2 = np.stack([np.einsum("nf,fg,ng->n", features - m, self.precision, features - m) for m in self.means])
        return np.sqrt(np.maximum(d2.min(axis=0), 0.0))

    def quantile(self, scores: np.ndarray) -> np.ndarray:
        """Fraction of the reference stamps with a smaller distance, ``(N,)`` in [0, 1]."""
        return np.searchsorted(self.reference, np.asarray(scores, dtype=np.float64)) / max(len(self.reference), 1)


def reference_ood(model: Any, cube_path: str | os.PathLike, *, seed: int) -> MahalanobisOOD:
    """Fit the OOD reference on the network features of a datacube's stamps.

    Parameters
    ----------
    model : torch.nn.Module
        The trained network.
    cube_path : path-like
        The datacube the model was trained on (its stamps are already normalised and cropped).
    seed : int
        Seed of the subsample (at most 4000 stamps are used).

    Returns
    -------
    MahalanobisOOD

    Raises
    ------
    InputError
        The datacube is unreadable, or its stamps do not fit the model.
    """
    from rbflow.datacube import load_datacube

    cube = load_datacube(cube_path)
    X, y = cube["X"], cube["y"]
    if len(X) > _MAX_REFERENCE:
        keep = np.sort(np.random.default_rng(seed).choice(len(X), _MAX_REFERENCE, replace=False))
        X, y = X[keep], y[keep]
    try:
        feats = network_features(model, X)
    except RuntimeError as exc:
        raise InputError(
            f"datacube '{Path(cube_path)}' stamps {X.shape[1:]} do not fit the model ({str(exc).splitlines()[0]}): "
            "give the datacube the model was trained on"
        ) from exc
    return MahalanobisOOD.fit(feats, y)
