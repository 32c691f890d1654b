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


# Modules (or the tiny_run group) whose tests take minutes, longest first: under pytest-xdist they
# start first, so that no worker is left with one of them at the end (CI: ``-n auto`` on 2 cores).
_SLOW_FIRST = (
    "tiny_run",
    "tests/reliability/test_interrupt.py",
    "tests/test_starter.py",
    "tests/test_workflow.py",
    "tests/test_realpsf_subtract.py",
    "tests/test_decam.py",
)
# Modules that run whole in the tiny_run group: some of their tests use tiny_run, and all of them a
# machine-wide resource (the one-node SLURM cluster) that two workers must not start at once.
_WHOLE_IN_TINY_RUN = ("tests/test_cluster.py",)
# Modules that use tiny_run but form a group of their own: their three interrupted runs behind the
# tiny_run group would leave the other worker idle; a worker that takes them makes its own tiny_run.
_OWN_GROUP = ("tests/reliability/test_interrupt.py",)


def _group(item: pytest.Item) -> str:
    """The pytest-xdist group of a test: ``tiny_run`` for the tests sharing that run, else its module."""
    module = item.nodeid.split("::", 1)[0]
    if module in _WHOLE_IN_TINY_RUN:
        return "tiny_run"
    if module in _OWN_GROUP:
        return module
    return "tiny_run" if "tiny_run" in getattr(item, "fixturenames", ()) else module


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items) -> None:
    """Keep the fast lane free of Snakemake runs; group and order the tests for pytest-xdist.

    A test that uses ``tiny_run`` runs the tiny workflow: without the ``workflow`` (or ``cluster``)
    marker the fast lane (``-m "not workflow and not cluster"``) would start it.

    Under ``--dist loadgroup`` (pyproject.toml) a worker runs a whole group: a module, so that its
    module-scoped fixtures are built once, or every test of ``tiny_run``, so that the run is made
    once. The slow groups come first (``_SLOW_FIRST``), each group's tests in their own order.
    """
    unmarked = [
        item.nodeid
        for item in items
        if "tiny_run" in getattr(item, "fixturenames", ())
        and not (item.get_closest_marker("workflow") or item.get_closest_marker("cluster"))
    ]
    if unmarked:
        raise pytest.UsageError(f"tests using tiny_run without @pytest.mark.workflow (or cluster): {unmarked}")
    rank = {name: i for i, name in enumerate(_SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(_group(item), len(rank)))  # stable: modules stay in order
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_group(item)))
