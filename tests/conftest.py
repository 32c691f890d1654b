"""Shared fixtures: paths of the repository and a validated demo telescope."""

from __future__ import annotations

import copy
import subprocess
import sys
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


SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile")]
#: Arguments that select the tiny test telescope (tests/data/telescopes/tiny.yaml).
TINY = [
    "--configfile",
    str(REPO / "tests/data/config.test.yaml"),
    "--config",
    f"telescope_dir={REPO}/tests/data/telescopes",
]


def make_workdir(path: Path) -> Path:
    """A fresh Snakemake working directory that sees the repository's config/."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config").symlink_to(REPO / "config")
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """Working directory of one complete local run of the tiny workflow (shared by the tests that read it)."""
    work = make_workdir(tmp_path_factory.mktemp("tiny") / "work")
    proc = subprocess.run([*SNAKEMAKE, "--cores", "2", *TINY], cwd=work, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return work
