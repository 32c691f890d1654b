"""Shared fixtures: the repository, a validated demo telescope, one run of the tiny workflow.

Helpers that are not fixtures (synthetic data, the tiny workflow's command) live in ``helpers.py``.
"""

from __future__ import annotations

import copy
import os
import subprocess
from pathlib import Path

import pytest
from filelock import FileLock
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
    """Working directory of one complete local run of the tiny workflow (shared by the tests that read it).

    Under pytest-xdist the test workers share one run: the first worker to need it runs it under a
    file lock in the session's common temporary folder, the others wait for it and read it (a failed
    run is recorded there, so that it fails every worker's tests without being run again).
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # each worker's basetemp is a folder of the session's one
    shared = root / "tiny-shared"
    work, done, failed = shared / "work", shared / "done", shared / "failed.txt"
    with FileLock(str(root / "tiny-shared.lock")):
        if not done.exists() and not failed.exists():
            make_workdir(work)
            try:
                proc = subprocess.run(
                    [*SNAKEMAKE, "--cores", "2", *TINY], cwd=work, capture_output=True, text=True, timeout=1200
                )
                error = proc.stdout[-4000:] + proc.stderr[-4000:] if proc.returncode else ""
            except subprocess.TimeoutExpired as exc:
                error = f"timed out after {exc.timeout} s"
            (failed if error else done).write_text(error)
    if failed.exists():
        pytest.fail(
            f"the tiny workflow run failed (the shared run, perhaps in another test worker):\n{failed.read_text()}"
        )
    return work


#: Modules that take minutes, run first so that a worker is not left with one of them at the end
#: (pytest-xdist hands out whole modules in collection order: ``--dist loadfile --no-loadscope-reorder``).
#: Measured in CI, serial: the interrupt test (with the tiny run) ~580 s, the SLURM cluster ~400 s,
#: the starter ~370 s, the real-PSF subtraction ~135 s, the DECam frames ~120 s.
_SLOW_FIRST = ("test_interrupt.py", "test_cluster.py", "test_starter.py", "test_realpsf_subtract.py", "test_decam.py")


def pytest_collection_modifyitems(config, items) -> None:
    """Keep the fast lane (``-m "not workflow and not cluster"``) free of Snakemake runs.

    A test that uses ``tiny_run`` runs the tiny workflow: without the ``workflow`` (or ``cluster``)
    marker the fast lane would start it. The slowest modules (``_SLOW_FIRST``) are put first.
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
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
