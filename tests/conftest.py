"""Shared fixtures: the repository, a validated demo telescope, one run of the tiny workflow.

Helpers that are not fixtures (synthetic data, the tiny workflow's command) live in ``helpers.py``.
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import pytest
from helpers import REPO, SNAKEMAKE, TINY, make_workdir

from rbflow.config import load_telescope


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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """Working directory of one complete local run of the tiny workflow (shared by the tests that read it)."""
    work = make_workdir(tmp_path_factory.mktemp("tiny") / "work")
    proc = subprocess.run([*SNAKEMAKE, "--cores", "2", *TINY], cwd=work, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return work


def pytest_collection_modifyitems(config, items) -> None:
    """Keep the fast lane (``-m "not workflow and not cluster"``) free of Snakemake runs.

    A test that uses ``tiny_run`` runs the tiny workflow: without the ``workflow`` (or ``cluster``)
    marker the fast lane would start it.
    """
    unmarked = [
        item.nodeid
        for item in items
        if "tiny_run" in getattr(item, "fixturenames", ())
        and not (item.get_closest_marker("workflow") or item.get_closest_marker("cluster"))
    ]
    if unmarked:
        raise pytest.UsageError(f"tests using tiny_run without @pytest.mark.workflow (or cluster): {unmarked}")
