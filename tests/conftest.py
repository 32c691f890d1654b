"""Shared fixtures: paths of the repository and a validated demo telescope."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from rbflow.config import load_telescope

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo() -> Path:
    """Root of the repository."""
    return REPO


@pytest.fixture(scope="session")
def _demo_telescope() -> dict:
    return load_telescope(REPO / "config" / "telescopes" / "demo.yaml")


@pytest.fixture
def demo_telescope(_demo_telescope) -> dict:
    """A fresh copy of the validated demo telescope configuration."""
    return copy.deepcopy(_demo_telescope)
