"""How sure the model is, and how far a stamp lies from what it was trained on.

Two numbers per stamp, next to P(real):

- **MC-dropout spread** (Gal & Ghahramani 2016): the dropout layer before the logit is left on at
  inference and the stamp is passed ``passes`` times with a seeded generator; the mean and standard
  deviation of the calibrated P(real) over the passes are reported. BatchNorm stays in eval mode.
  The convolutions before the head are deterministic then, so they run once and only the head
  (dropout and the linear logit) runs ``passes`` times.
- **Out-of-distribution score** (Sun, Ming, Zhu & Li 2022, "Out-of-distribution detection with deep
  nearest neighbors", on an early layer's output as Abdelzad et al. 2019, "Detecting
  out-of-distribution inputs in deep neural networks using an early-layer output", propose): the
  Euclidean distance of the stamp's L2-normalised *first-block* features to its ``k``-th nearest
  neighbour among the training stamps'; and its quantile among the scores of the validation
  frames' stamps (0.5: typical of a new frame of the training sky, 0.99: farther than 99 % of
  them; references stored before this calibration count against the training stamps' own
  leave-one-out distances, which flagged 4 % of the demo's test stamps at 0.99). The features are the
  per-channel spatial mean and maximum of the first convolution block's output (the pooling the
  classifier head applies to the last block): 16 filters of 3 x 3 pixels over SCI, REF and DIFF
  on the demo's network, which respond to the stamp's pixel statistics (noise, PSF sharpness, the
  balance of the channels) before the deeper blocks learn to ignore what does not tell real from
  bogus, and what changes between surveys is mostly of that kind.

Why the first block rather than every block pooled together (the score before): measured with
``bench/uncertainty.py`` on the 86 real ZTF development packets (cut and normalised as ``rbflow
alerts score`` does) against held-out synthetic stamps, per-stamp AUROC, on three networks: the
demo's (commit 135842c; against its test frames' stamps) 0.78 against 0.72 for all blocks, the
control (test frames against held-out stamps of the training frames) 0.65 for both; the starter
model (against its training stamps' own leave-one-out distances, before its retrain at 5cd8b53;
0.87 after it, 0.79 after its retrain at 898df2f, 0.81 after 3e167ef, 0.80 after 852e08f, 0.81 after 2fd7d87 and after e47068c) 0.87 against 0.74; the tests'
small network (against fresh synthetic stamps) 0.92 against 0.91. The block was picked on the ZTF
packets (as Abdelzad et al. pick their layer on held-out OOD data), so the demo's 0.78 is
optimistic; the two other networks confirm the direction. With the demo model's reference and the
quantiles counted against the training stamps' leave-one-out distances (before the calibration
below), ``ood_quantile >= 0.99`` flagged 50 % of the packets and 4 % of its test stamps (31 % and
3 % with every block pooled); counted against the validation frames, 13 % and 0.2 %. Most of it comes from the per-channel maxima (the brightest 3 x 3 pattern in
the stamp): the packets' candidates are fainter against their noise than the demo's (median DIFF
maximum 5 sigma, against 20, the clip value, for the demo's test stamps).

What it does not catch: stamp by stamp, the packets are not out of distribution at AUROC 0.9 for
the demo's network, with this score nor with any other per-stamp score fitted on the training
stamps alone that ``bench/uncertainty.py`` compares (deep kNN per block, multi-layer Mahalanobis,
Gram-matrix deviations, ViM, the maximum softmax probability, kNN on per-channel input
statistics: 0.48-0.75). Discounting the background (the stored score's normal score minus that of
the first block pooled over the background annulus, the likelihood ratio of Ren et al. 2019)
reaches 0.87 with the control at 0.53, but it discounts a shift of the whole stamp as well: on the
tests' network the packets against fresh synthetic stamps fall from 0.92 to 0.52, so it is not
stored. A supervised linear probe tells them apart (0.97), but the same probe
tells the demo's own test frames from its training frames at 0.83-0.88: any two sets of frames
differ that way. What differs: the packets' backgrounds are clean white noise, like the densest
kind of training stamp (the first block's kNN pooled over the background annulus alone ranks the
packets *more* typical than the demo's test stamps, AUROC 0.31; over the centre, 0.77); their DIFF
noise is white in every packet (RMS autocorrelation at lags 1-2: 0.04 median, 95 % below 0.08)
where the demo's varies from stamp to stamp (0.09 median, 95 % below 0.89), so they sit at the
clean end of the training spread, not outside it; their candidates are what the alert stream
selects (bright variable stars with flipped negative differences, nuclear transients), fainter
in DIFF, with a broader PSF (Gaussian fits to the central sources above 6 sigma: FWHM 3.9 px
median over 22 packets, 3.3 px over 400 of the demo's real test stamps). A packet of a clean
hostless transient looks like an injection to every layer and scores as typical. A set of packets
is told apart as a set (a batch MMD^2 test, measured in an earlier session: 0.19 against
0.02-0.06 for the demo's own validation and test sets).
**A set of stamps** is told apart where single stamps are not: :meth:`KnnOOD.batch_shift` compares
the mean quantile of a set (one image's candidates, a night's alerts) with 0.5, in units of what new
frames of the training sky give (``1 / (12 n)`` for ``n`` uniform quantiles, plus the spread of the
validation frames' means beyond that); ``rbflow.infer`` writes it in the table's meta and warns
from z = 3. Measured on the demo model retrained at commit d2fbffc (its test AUC 0.9960; per-stamp
AUROC of the packets against its test stamps 0.79, test frames against validation frames 0.49):
the 86 ZTF packets as one set, mean quantile 0.78, z 4.6; random sets of 40 of them z >= 3 in 99 %
of draws, of 20 in 72 %, of 10 in 33 %; the demo's test frames z -0.06 and -0.23, its training
frames -2.0 to -5.3 (closer than new frames, as they should be). The candidates of the demo's
observed frames (the apply path: every detection, not the datacube's mix) give -5.6 to +2.6 over
its 12 frames (test frames 1.5 and 1.9, validation frames 0.6 and 2.6): a set of another mix of
candidates than the training set's moves z by up to ~2.5 on its own, so z = 3 is a margin of about
1.5 below the real packets' 4.6 rather than a clean gap. Stamp by stamp,
``ood_quantile >= 0.95`` holds 51 % of the packets and 3.7-5.7 % of the test frames' stamps
(4.7 % pooled; 5 % by construction). The frames' spread (0.053) rests on the demo's two validation
frames: a reference calibrated on a single validation frame gives no z.
Read a high score as "unlike the training stamps in what the network sees" (a crowded field, an
artefact the simulation never made, a candidate fainter or shaped unlike any trained on), not as
"from another survey".

The reference (the first-block features of at most 4000 training-frame stamps, their leave-one-out
distances, ``k`` and the feature columns) is computed once at training time and written next to the
model (:data:`OOD_FILE`, named with its SHA-256 in ``model.json``'s ``ood`` entry), so inference
never reads the training datacube. A reference written before the score moved to the first block
(every block's features) is restricted to the first block's columns when read (its leave-one-out
distances recomputed: 0.3 CPU-s for 4000 stamps). The starter model's reference was cut down so and
calibrated on its validation frames, regenerated from its recorded config and seed: against them
the ZTF packets score AUROC 0.70 (0.81 against its training stamps' own distances), and as a set
z 1.7, since its frames are each another randomised camera (its validation frames' means spread by
0.11 beyond sampling noise; the demo's by 0.05). Measured on the starter retrained at commit
f8330b1 (ZOGY's tiles fit their broader PSF on their stars; it transfers to the packets at AUROC
0.984); that of e47068c gave 0.69, 0.81, z 1.5 and 0.13, that of 2fd7d87 gave 0.71, 0.81, z 1.5 and 0.14, that of 852e08f gave 0.70, 0.80, z 1.5 and 0.13, that of 3e167ef (its sky has coma and halos) gave 0.70, 0.81, z 1.8 and 0.11, that of
898df2f before it 0.68, 0.79, z 1.7 and 0.10, that of 5cd8b53 0.73, 0.87, z 1.8 and 0.125, and
the one before that 0.75, z 2.0 and 0.12.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rbflow.errors import InputError
from rbflow.io import atomic_path, file_sha256, made_by

__all__ = [
    "OOD_FILE",
    "OOD_K",
    "OOD_METHOD",
    "SHIFT_Z",
    "UNCERTAINTY_COLUMNS",
    "network_features",
    "first_block_columns",
    "mc_dropout",
    "KnnOOD",
    "fit_reference",
    "reference_ood",
    "model_reference",
]

log = logging.getLogger(__name__)

#: Columns added to the infer tables: (name, description).
UNCERTAINTY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("p_real_mc", "mean calibrated P(real) over the MC-dropout passes"),
    ("p_real_std", "standard deviation of P(real) over the MC-dropout passes"),
    (
        "ood_score",
        "distance of the L2-normalised first-block network features to the k-th nearest training stamp's",
    ),
    (
        "ood_quantile",
        "fraction of the validation frames' stamps with a smaller ood_score (references stored without them: "
        "of the training stamps' leave-one-out scores)",
    ),
)
#: File of the OOD reference (a NumPy ``.npz`` archive, read without pickle), written by
#: :func:`rbflow.train.train` next to ``model.pt``; named like it so the two travel together.
OOD_FILE = "model.ood"
#: Neighbour whose distance is the OOD score.
OOD_K = 10
#: The OOD score's method, as model.json's ``ood`` entry names it.
OOD_METHOD = (
    "distance to the k-th nearest training stamp of the L2-normalised mean+max features of the first "
    "convolution block (Sun et al. 2022; early layer: Abdelzad et al. 2019)"
)
#: A set of stamps whose mean OOD quantile lies this many of its null standard deviations above 0.5
#: (:meth:`KnnOOD.batch_shift`) is reported as unlike the training sky (one-sided, p ~ 0.0013
#: for a normal null).
SHIFT_Z = 3.0
#: At most this many training stamps are used as the OOD reference (seeded subsample).
_MAX_REFERENCE = 4000
#: Stamps scored against the reference per matrix product (bounds the memory to ~16 MB).
_CHUNK = 1024


def network_features(model: Any, X: np.ndarray, *, batch_size: int = 512) -> np.ndarray:
    """Per-channel spatial mean and maximum of every convolution block's output, L2-normalised.

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
        float32 ``(N, F)`` unit-length features, ``F`` = twice the sum of the block widths (a stamp
        whose features are all 0 keeps a zero vector).

    Raises
    ------
    InputError
        The model has no ``features`` stack with ReLU activations.
    """
    import torch

    relus = _stack_modules(model, torch.nn.ReLU, "ReLU blocks")
    layers: list[torch.Tensor] = []

    def pool(_module: Any, _inputs: Any, output: torch.Tensor) -> None:
        layers.append(torch.cat([output.mean(dim=(2, 3)), output.amax(dim=(2, 3))], dim=1))

    hooks = [m.register_forward_hook(pool) for m in relus]
    out = []
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(X), batch_size):
                layers.clear()
                model(torch.as_tensor(np.ascontiguousarray(X[i : i + batch_size]), dtype=torch.float32))
                out.append(torch.cat(layers, dim=1).double().numpy())
    finally:
        for hook in hooks:
            hook.remove()
    width = 2 * sum(int(m.out_channels) for m in model.features.modules() if isinstance(m, torch.nn.Conv2d))
    return _unit(np.concatenate(out) if out else np.zeros((0, width)))


def first_block_columns(model: Any) -> tuple[int, int]:
    """The columns of :func:`network_features` that hold the first convolution block's mean and maximum.

    Parameters
    ----------
    model : torch.nn.Module
        An :mod:`rbflow.model` network.

    Returns
    -------
    tuple of int
        ``(start, stop)``: ``(0, 2 * C)`` for a first convolution of ``C`` output channels (its
        channel means, then its channel maxima).

    Raises
    ------
    InputError
        The model has no ``features`` stack with a convolution.
    """
    import torch

    return 0, 2 * int(_stack_modules(model, torch.nn.Conv2d, "convolutions")[0].out_channels)


def _stack_modules(model: Any, kind: type, what: str) -> list[Any]:
    """The modules of type ``kind`` in the network's ``features`` stack, in order; InputError when none."""
    stack = getattr(model, "features", None)
    found = [m for m in stack.modules() if isinstance(m, kind)] if stack is not None else []
    if not found:
        raise InputError(
            f"model {type(model).__name__} has no 'features' stack with {what}: OOD scores need an rbflow.model network"
        )
    return found


def _unit(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float32."""
    feats = np.asarray(features, dtype=np.float64)
    norm = np.linalg.norm(feats, axis=1, keepdims=True)
    return (feats / np.where(norm > 0, norm, 1.0)).astype(np.float32)


def mc_dropout(
    model: Any, meta: dict[str, Any], X: np.ndarray, *, passes: int, seed: int, batch_size: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and spread of the calibrated P(real) with the dropout layers switched on.

    Parameters
    ----------
    model : torch.nn.Module
        An :mod:`rbflow.model` network (its dropout is in its ``head``); left in eval mode on return.
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
    InputError
        The model has no ``head`` module.
    """
    import torch

    if passes < 2:
        raise ValueError(f"MC dropout needs at least 2 passes, got {passes}")
    head = getattr(model, "head", None)
    if not isinstance(head, torch.nn.Module):
        raise InputError(f"model {type(model).__name__} has no 'head' module: MC dropout needs an rbflow.model network")
    inv_t = 1.0 / float(meta.get("temperature", 1.0))
    dropouts = [m for m in head.modules() if isinstance(m, torch.nn.Dropout)]
    if not dropouts or all(m.p == 0 for m in dropouts):
        log.warning("the model has no active dropout layer: MC-dropout spread is 0 for every stamp")
    # the layers before the head are deterministic in eval mode: run them once, and only the head
    # (where the dropout is) once per pass
    inputs: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(X), batch_size):
                model(torch.as_tensor(np.ascontiguousarray(X[i : i + batch_size]), dtype=torch.float32))
    finally:
        hook.remove()
    out = np.empty((passes, len(X)))
    for m in dropouts:
        m.train()
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            for k in range(passes):
                start = 0
                for h in inputs:
                    out[k, start : start + len(h)] = torch.sigmoid(head(h).reshape(-1) * inv_t).double().numpy()
                    start += len(h)
    finally:
        model.eval()
    return out.mean(axis=0), out.std(axis=0)


def _kth_distance(features: np.ndarray, reference: np.ndarray, k: int) -> np.ndarray:
    """Euclidean distance of unit vectors to their ``k``-th nearest reference vector (1-based)."""
    out = np.empty(len(features))
    for i in range(0, len(features), _CHUNK):
        sim = np.asarray(features[i : i + _CHUNK], dtype=np.float32) @ reference.T
        kth = -np.partition(-sim, k - 1, axis=1)[:, k - 1]
        out[i : i + len(sim)] = np.sqrt(np.maximum(2.0 - 2.0 * kth.astype(np.float64), 0.0))
    return out


@dataclass
class KnnOOD:
    """Deep nearest-neighbour OOD score (Sun et al. 2022) against a reference set of features.

    Attributes
    ----------
    reference : numpy.ndarray
        float32 ``(M, F)`` unit-length features of the reference (training) stamps: the columns
        ``columns`` of :func:`network_features`, scaled to unit length again.
    k : int
        The neighbour whose distance is the score.
    reference_scores : numpy.ndarray
        Sorted leave-one-out scores of the reference stamps themselves (for :meth:`quantile`).
    columns : tuple of int or None
        ``(start, stop)`` of the :func:`network_features` columns the score uses (None: all of them).
    heldout_scores : numpy.ndarray or None
        Sorted scores of stamps of held-out frames (the validation frames), set by
        :meth:`calibrate`: :meth:`quantile` counts against them when present. None for a
        reference written before (its quantile counts against ``reference_scores``).
    frame_spread : float
        Between-frame standard deviation of a frame's mean quantile, measured on the held-out
        frames beyond their sampling noise (:meth:`calibrate`); NaN when unknown (fewer than two
        held-out frames, or no calibration): :meth:`batch_shift` then gives no z.
    """

    reference: np.ndarray
    k: int
    reference_scores: np.ndarray
    columns: tuple[int, int] | None = None
    heldout_scores: np.ndarray | None = None
    frame_spread: float = float("nan")

    @classmethod
    def fit(cls, features: np.ndarray, *, k: int = OOD_K, columns: tuple[int, int] | None = None) -> KnnOOD:
        """Keep the reference features and their leave-one-out score distribution.

        Parameters
        ----------
        features : numpy.ndarray
            ``(M, F)`` features of :func:`network_features`.
        k : int, optional
            Neighbour rank (>= 1).
        columns : tuple of int, optional
            ``(start, stop)``: score on these columns only (e.g. :func:`first_block_columns`), scaled
            to unit length again; None: on all of them.

        Returns
        -------
        KnnOOD

        Raises
        ------
        ValueError
            ``k`` < 1, fewer than ``k + 1`` reference stamps, or ``columns`` outside the features.
        """
        features = np.asarray(features)
        if columns is not None:
            start, stop = (int(c) for c in columns)
            if not 0 <= start < stop <= features.shape[1]:
                raise ValueError(f"OOD columns {columns} outside the {features.shape[1]} feature columns")
            columns = (start, stop)
            features = features[:, start:stop]
        reference = np.ascontiguousarray(_unit(features) if columns is not None else features, dtype=np.float32)
        if k < 1 or len(reference) < k + 1:
            raise ValueError(f"the OOD reference needs k >= 1 and more than k stamps, got k={k}, {len(reference)}")
        # each reference stamp is its own nearest neighbour: its k-th other neighbour is rank k + 1
        own = np.sort(_kth_distance(reference, reference, k + 1))
        return cls(reference=reference, k=int(k), reference_scores=own, columns=columns)

    def restrict(self, columns: tuple[int, int]) -> KnnOOD:
        """The same reference scored on the columns ``columns`` of its features only (leave-one-out refitted).

        Parameters
        ----------
        columns : tuple of int
            ``(start, stop)`` of :func:`network_features`' columns.

        Returns
        -------
        KnnOOD

        Raises
        ------
        ValueError
            The reference is already restricted to columns, or ``columns`` lies outside its features.
        """
        if self.columns is not None:
            raise ValueError(f"the OOD reference already uses columns {self.columns} only")
        return KnnOOD.fit(self.reference, k=self.k, columns=columns)

    def _select(self, features: np.ndarray) -> np.ndarray:
        if self.columns is None:
            return np.asarray(features, dtype=np.float32)
        return _unit(np.asarray(features)[:, self.columns[0] : self.columns[1]])

    def score(self, features: np.ndarray) -> np.ndarray:
        """Distance to the ``k``-th nearest reference stamp, ``(N,)`` float64 in [0, 2].

        ``features`` are :func:`network_features` rows (all columns: the reference's are taken).
        """
        return _kth_distance(self._select(features), self.reference, self.k)

    def calibrate(self, scores: np.ndarray, frames: np.ndarray) -> KnnOOD:
        """The same reference with its quantiles counted against held-out frames' stamps.

        The training stamps' own leave-one-out distances understate how far a new frame's stamps
        lie (a training stamp's neighbours include stamps of its own frame: on the demo model
        ``ood_quantile >= 0.99`` held 4 % of the test frames' stamps instead of 1 %); scores of
        stamps of frames the reference never saw are the right null.

        Parameters
        ----------
        scores : numpy.ndarray
            ``(N,)`` :meth:`score` of the held-out stamps.
        frames : numpy.ndarray
            ``(N,)`` frame of each stamp: the spread of the frames' mean quantiles beyond their
            sampling noise (``1 / (12 n)`` for ``n`` uniform quantiles) is ``frame_spread``.

        Returns
        -------
        KnnOOD

        Raises
        ------
        ValueError
            No held-out stamps, or ``frames`` not one per score.
        """
        scores, frames = np.asarray(scores, dtype=np.float64), np.asarray(frames)
        if len(scores) == 0 or frames.shape != scores.shape:
            raise ValueError(f"calibration needs one frame per held-out score, got {scores.shape} and {frames.shape}")
        out = dataclasses.replace(self, heldout_scores=np.sort(scores))
        q = out.quantile(scores)
        _, index, counts = np.unique(frames, return_inverse=True, return_counts=True)
        spread = float("nan")
        if len(counts) >= 2:
            means = np.bincount(index, weights=q) / counts
            noise = float(np.mean(1.0 / (12.0 * counts)))
            spread = math.sqrt(max(float(np.var(means, ddof=1)) - noise, 0.0))
        return dataclasses.replace(out, frame_spread=spread)

    def quantile(self, scores: np.ndarray) -> np.ndarray:
        """Fraction of the held-out stamps (else the reference stamps) with a smaller score, ``(N,)`` in [0, 1]."""
        null = self.reference_scores if self.heldout_scores is None else self.heldout_scores
        return np.searchsorted(null, np.asarray(scores, dtype=np.float64)) / max(len(null), 1)

    def batch_shift(self, quantiles: np.ndarray) -> tuple[float, float]:
        """Whether a set of stamps, as a set, lies farther from the training stamps than new frames do.

        One stamp from another survey often looks like some training stamp (a clean transient
        looks like an injection); a set of them still sits high in the held-out quantiles. The
        mean of ``n`` calibrated quantiles of one frame like the held-out ones is 0.5 with a
        variance of ``1 / (12 n)`` (uniform quantiles) plus the frames' own spread
        ``frame_spread**2``; ``z`` is the mean's distance from 0.5 in that unit.

        Parameters
        ----------
        quantiles : numpy.ndarray
            :meth:`quantile` of the set's scores (NaN ignored).

        Returns
        -------
        tuple of float
            ``(mean quantile, z)``; z is NaN without a calibration on two or more held-out frames,
            both NaN for an empty set.
        """
        q = np.asarray(quantiles, dtype=np.float64)
        q = q[np.isfinite(q)]
        if len(q) == 0:
            return float("nan"), float("nan")
        mean = float(q.mean())
        if not math.isfinite(self.frame_spread):  # NaN unless calibrated on two or more frames
            return mean, float("nan")
        return mean, (mean - 0.5) / math.sqrt(1.0 / (12.0 * len(q)) + self.frame_spread**2)

    def save(self, path: str | os.PathLike) -> None:
        """Write the reference to an ``.npz`` file (atomically; read back without pickle by :meth:`load`)."""
        extra = {} if self.columns is None else {"columns": np.array(self.columns, dtype=np.int64)}
        if self.heldout_scores is not None:
            extra.update(heldout_scores=self.heldout_scores, frame_spread=np.float64(self.frame_spread))
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(
                fh,
                reference=self.reference,
                k=np.int64(self.k),
                reference_scores=self.reference_scores,
                made_by=np.str_(made_by("rbflow.uncertainty.KnnOOD.save")),
                **extra,
            )

    @classmethod
    def load(cls, path: str | os.PathLike) -> KnnOOD:
        """Read a reference written by :meth:`save` (one without ``columns``: scored on all columns).

        Raises
        ------
        InputError
            The file is missing, unreadable or lacks an array.
        """
        try:
            with np.load(path, allow_pickle=False) as npz:
                columns = tuple(int(c) for c in npz["columns"]) if "columns" in npz.files else None
                held = "heldout_scores" in npz.files
                return cls(
                    reference=npz["reference"].astype(np.float32),
                    k=int(npz["k"]),
                    reference_scores=npz["reference_scores"].astype(np.float64),
                    columns=columns,
                    heldout_scores=npz["heldout_scores"].astype(np.float64) if held else None,
                    frame_spread=float(npz["frame_spread"]) if held else float("nan"),
                )
        except (OSError, KeyError, ValueError) as exc:
            raise InputError(
                f"OOD reference '{path}' cannot be read ({exc}): keep the files of one training together or retrain"
            ) from exc


def fit_reference(
    model: Any,
    X: np.ndarray,
    *,
    seed: int,
    k: int = OOD_K,
    heldout: tuple[np.ndarray, np.ndarray] | None = None,
) -> KnnOOD:
    """Fit the OOD reference on (a seeded subsample of at most 4000 of) the stamps ``X``.

    Parameters
    ----------
    model : torch.nn.Module
        The trained network.
    X : numpy.ndarray
        ``(N, C, H, W)`` normalised training stamps.
    seed : int
        Seed of the subsample.
    k : int, optional
        Neighbour rank of the score.
    heldout : tuple of numpy.ndarray, optional
        ``(X, frames)``: normalised stamps of held-out frames (the validation frames) and each
        one's frame, to calibrate the quantiles on (:meth:`KnnOOD.calibrate`).

    Returns
    -------
    KnnOOD
        Scoring the first convolution block's features (:func:`first_block_columns`).
    """
    if len(X) > _MAX_REFERENCE:
        X = X[np.sort(np.random.default_rng(seed).choice(len(X), _MAX_REFERENCE, replace=False))]
    reference = KnnOOD.fit(network_features(model, X), k=k, columns=first_block_columns(model))
    if heldout is None or len(heldout[0]) == 0:
        return reference
    return reference.calibrate(reference.score(network_features(model, heldout[0])), heldout[1])


def reference_ood(model: Any, cube_path: str | os.PathLike, *, seed: int) -> KnnOOD:
    """Fit the OOD reference on a datacube's stamps (for models trained before the reference was stored).

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
    KnnOOD

    Raises
    ------
    InputError
        The datacube is unreadable, or its stamps do not fit the model.
    """
    from rbflow.datacube import load_datacube

    X = load_datacube(cube_path)["X"]
    try:
        return fit_reference(model, X, seed=seed)
    except RuntimeError as exc:
        raise InputError(
            f"datacube '{Path(cube_path)}' stamps {X.shape[1:]} do not fit the model ({str(exc).splitlines()[0]}): "
            "give the datacube the model was trained on"
        ) from exc


def model_reference(model_path: str | os.PathLike, meta: dict[str, Any]) -> KnnOOD | None:
    """The OOD reference stored with a model at training time, or None (logged) when it has none.

    A reference stored with every block's features (written before the score used the first block
    only) is restricted to the first block's columns (``2 * meta['model']['widths'][0]``: the first
    convolution's width, for every :mod:`rbflow.model` architecture).

    Parameters
    ----------
    model_path : path-like
        The ``model.pt``; the reference is the file ``meta['ood']['file']`` next to it.
    meta : dict
        model.json content.

    Returns
    -------
    KnnOOD or None
        None for a model trained before references were stored.

    Raises
    ------
    InputError
        The reference named in model.json is missing, unreadable or not the one of this training
        (its SHA-256 differs), or model.json lacks the model's widths for an unrestricted reference.
    """
    entry = meta.get("ood")
    if not entry:
        log.warning(
            "model '%s' has no stored OOD reference (trained before rbflow stored one): ood_score and "
            "ood_quantile are NaN; retrain the model, or give the training datacube as reference_cube",
            model_path,
        )
        return None
    path = Path(model_path).parent / entry["file"]
    if not path.is_file():
        raise InputError(
            f"OOD reference '{path}' named in model.json is missing: keep the files of one training together"
        )
    if file_sha256(path) != entry["sha256"]:
        raise InputError(
            f"OOD reference '{path}' is not the one model.json names (SHA-256 differs): keep the files of one "
            "training together or retrain"
        )
    reference = KnnOOD.load(path)
    if reference.columns is not None:
        return reference
    try:
        width = int(meta["model"]["widths"][0])
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise InputError(
            f"model.json of '{model_path}' names no 'model.widths' ({exc!r}): the stored OOD reference cannot be "
            "restricted to the first block; keep the model's own model.json or retrain"
        ) from exc
    log.info("OOD reference '%s' holds every block's features: scoring on the first block's", path)
    return reference.restrict((0, 2 * width))
