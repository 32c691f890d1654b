"""Tests of rbflow.model: config round trip, every architecture's output shape, errors."""

from __future__ import annotations

import json

import pytest
import torch

from rbflow.errors import ConfigError
from rbflow.model import ARCHITECTURES, ModelConfig, build_model, count_parameters


def test_config_round_trip():
    cfg = ModelConfig(architecture="vgg", in_channels=4, stamp_size=21, widths=(8, 16), dropout=0.1)
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("size", [21, 31, 63])
def test_logits_shape(arch, size):
    torch.manual_seed(0)
    model = build_model(ModelConfig(architecture=arch, in_channels=3, stamp_size=size)).eval()
    with torch.no_grad():
        out = model(torch.randn(5, 3, size, size))
    assert out.shape == (5,) and torch.isfinite(out).all()
    assert count_parameters(model) < 200_000  # small enough for 2 CPU cores


def test_bad_configs():
    with pytest.raises(ConfigError, match="train.architecture"):
        ModelConfig(architecture="resnet152")
    with pytest.raises(ConfigError, match="odd"):
        ModelConfig(stamp_size=30)
    with pytest.raises(ConfigError, match="unknown keys"):
        ModelConfig.from_dict({"architecture": "compact", "depth": 3})
