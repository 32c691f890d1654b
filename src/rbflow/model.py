"""The real/bogus CNN: a configuration dataclass and the architectures it can build.

Every model takes normalised stamps of shape ``(N, C, H, W)`` (see
:func:`rbflow.datacube.normalise`) and returns **one logit per stamp**, shape ``(N,)``:
``sigmoid(logit / T)`` is P(real), with ``T`` the temperature fitted after training
(:mod:`rbflow.train`). The configuration round-trips through ``model.json``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from rbflow.errors import ConfigError

__all__ = ["ModelConfig", "build_model", "ARCHITECTURES", "count_parameters"]

log = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    """What is needed to rebuild a model before loading its weights.

    Attributes
    ----------
    architecture : str
        A key of :data:`ARCHITECTURES`.
    in_channels : int
        Number of stamp channels (e.g. 3 for SCI, REF, DIFF).
    stamp_size : int
        Stamp side (pixels, odd).
    widths : list of int
        Convolution widths, one per block.
    dropout : float
        Dropout probability before the final linear layer.
    """

    architecture: str = "compact"
    in_channels: int = 3
    stamp_size: int = 31
    widths: list[int] = field(default_factory=lambda: [16, 32, 64])
    dropout: float = 0.2

    def __post_init__(self) -> None:
        self.widths = [int(w) for w in self.widths]
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(
                f"model architecture {self.architecture!r} is unknown: key 'train.architecture' must be one of "
                f"{sorted(ARCHITECTURES)}"
            )
        if self.in_channels < 1 or not self.widths or min(self.widths) < 1:
            raise ConfigError("model config: 'in_channels' and every entry of 'train.widths' must be >= 1")
        if self.stamp_size < 5 or self.stamp_size % 2 == 0:
            raise ConfigError(f"model config: stamp size must be odd and >= 5 pixels, got {self.stamp_size}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model config: dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON-serialisable)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Rebuild from :meth:`to_dict` output (unknown keys are an error)."""
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"model config has unknown keys {sorted(unknown)}: was it written by a newer rbflow?")
        return cls(**data)

    def to_json(self) -> str:
        """JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))


def _conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class _Net(nn.Module):
    """Convolution blocks, global average + max pooling, dropout, one linear logit."""

    def __init__(self, features: nn.Sequential, width: int, dropout: float):
        super().__init__()
        self.features = features
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return self.head(pooled).squeeze(1)


def _compact(cfg: ModelConfig) -> nn.Module:
    """One 3x3 convolution (BatchNorm, ReLU) per width, 2x2 max pooling between blocks."""
    layers: list[nn.Module] = []
    c = cfg.in_channels
    for i, w in enumerate(cfg.widths):
        layers += _conv_bn(c, w)
        if i < len(cfg.widths) - 1:
            layers.append(nn.MaxPool2d(2))
        c = w
    return _Net(nn.Sequential(*layers), c, cfg.dropout)


def _vgg(cfg: ModelConfig) -> nn.Module:
    """Two 3x3 convolutions (BatchNorm, ReLU) per width, 2x2 max pooling between blocks (slower, deeper)."""
    layers: list[nn.Module] = []
    c = cfg.in_channels
    for i, w in enumerate(cfg.widths):
        layers += _conv_bn(c, w) + _conv_bn(w, w)
        if i < len(cfg.widths) - 1:
            layers.append(nn.MaxPool2d(2))
        c = w
    return _Net(nn.Sequential(*layers), c, cfg.dropout)


#: Architecture name -> builder. 'compact' is the default; 'vgg' doubles the convolutions per block.
ARCHITECTURES: dict[str, Callable[[ModelConfig], nn.Module]] = {"compact": _compact, "vgg": _vgg}


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build the network described by ``cfg`` (random initial weights; seed torch first).

    Parameters
    ----------
    cfg : ModelConfig
        Architecture, channels, stamp size, widths, dropout.

    Returns
    -------
    torch.nn.Module
        Maps ``(N, C, H, W)`` float32 normalised stamps to ``(N,)`` logits.
    """
    model = ARCHITECTURES[cfg.architecture](cfg)
    log.debug("built %s model with %d parameters", cfg.architecture, count_parameters(model))
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
