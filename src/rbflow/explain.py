"""Where the network looks: one explanation map per stamp.

Two methods, both on the evidence for the predicted class (the logit of P(real) when it is
positive, minus the logit otherwise, so that a bogus stamp shows what made it bogus):

- ``"gradcam"`` (Selvaraju et al. 2017): the activations of the last convolution block weighted by
  the spatial mean of their gradients, rectified, upsampled (bilinear) to the stamp size;
- ``"saliency"`` (Simonyan et al. 2014): the absolute input gradient, maximum over channels, at full
  resolution.

Each map is scaled to [0, 1] by its own maximum (all zero when the map is flat). :func:`explain_cutouts`
returns the maps of N cutout files, for the scanning page, checkinfer's galleries and the report.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["METHODS", "explanation_maps", "explain_cutouts"]

log = logging.getLogger(__name__)

#: Explanation methods.
METHODS = ("gradcam", "saliency")


def explanation_maps(model: Any, X: np.ndarray, *, method: str = "gradcam", batch_size: int = 256) -> np.ndarray:
    """Explanation maps of normalised stamps.

    Parameters
    ----------
    model : torch.nn.Module
        An :mod:`rbflow.model` network (its ``features`` module is the convolution stack); used
        in eval mode.
    X : numpy.ndarray
        ``(N, C, H, W)`` normalised stamps.
    method : {'gradcam', 'saliency'}
        See the module docstring.
    batch_size : int, optional
        Stamps per pass.

    Returns
    -------
    numpy.ndarray
        float32 ``(N, H, W)`` maps in [0, 1].

    Raises
    ------
    ValueError
        Unknown ``method``.
    """
    import torch
    import torch.nn.functional as F

    if method not in METHODS:
        raise ValueError(f"explanation method {method!r} is unknown: use one of {', '.join(METHODS)}")
    model.eval()
    out = np.zeros((len(X), X.shape[-2], X.shape[-1]), np.float32)
    for i in range(0, len(X), batch_size):
        xb = torch.as_tensor(np.ascontiguousarray(X[i : i + batch_size]), dtype=torch.float32).requires_grad_(True)
        if method == "saliency":
            logits = model(xb)
            (logits * torch.sign(logits.detach())).sum().backward()
            maps = xb.grad.abs().amax(dim=1)
        else:
            acts: list[torch.Tensor] = []
            hook = model.features.register_forward_hook(lambda _m, _i, o, store=acts: store.append(o))
            try:
                logits = model(xb)
            finally:
                hook.remove()
            (grads,) = torch.autograd.grad((logits * torch.sign(logits.detach())).sum(), acts[0])
            cam = F.relu((grads.mean(dim=(2, 3), keepdim=True) * acts[0]).sum(dim=1, keepdim=True))
            maps = F.interpolate(cam, size=X.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        maps = maps.detach().double().numpy()
        peak = maps.reshape(len(maps), -1).max(axis=1)[:, None, None]
        out[i : i + len(maps)] = np.where(peak > 0, maps / np.where(peak > 0, peak, 1.0), 0.0)
    return out


def explain_cutouts(
    model_path: str | os.PathLike, files: Sequence[str | os.PathLike], *, method: str = "gradcam"
) -> np.ndarray:
    """Explanation maps of N cutout files (read, cropped and normalised as inference does).

    Parameters
    ----------
    model_path : path-like
        ``model.pt`` with its ``model.json``.
    files : sequence of path-like
        Cutout FITS files.
    method : {'gradcam', 'saliency'}
        See the module docstring.

    Returns
    -------
    numpy.ndarray
        float32 ``(N, S, S)`` maps in [0, 1] on the model's stamp grid (the central crop of the
        cutouts when the model was trained on cropped stamps).

    Raises
    ------
    InputError
        Bad model files, or cutouts the model cannot take.
    """
    from rbflow.datacube import crop_stamps, normalise, read_stamp
    from rbflow.infer import check_compatible, load_model

    model, meta = load_model(model_path)
    channels = list(meta["channels"])
    stamps = []
    for path in files:
        stamp, _ = read_stamp(path, channels, require_finite=False)
        check_compatible(meta, channels, stamp.shape[-1], source=str(path))
        stamps.append(crop_stamps(stamp, int(meta["stamp_size"])))
    size = int(meta["stamp_size"])
    if not stamps:
        return np.zeros((0, size, size), np.float32)
    return explanation_maps(model, normalise(np.stack(stamps)), method=method)
