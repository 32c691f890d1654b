"""Helpers of the reliability tests: run the tiny workflow, interrupt it, and fingerprint its outputs.

Kept out of a ``conftest.py`` on purpose: a second ``conftest.py`` here would shadow
``tests/conftest.py`` for every module collected after it. The repository paths and the tiny
workflow's command come from ``tests/helpers.py``.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from fnmatch import fnmatch
from pathlib import Path

from helpers import SNAKEMAKE, TINY

#: The command a user runs, and runs again after an interruption (README: "Interrupted runs").
TINY_RUN = [*SNAKEMAKE, "--cores", "2", *TINY]

#: Folders whose every file must be byte-identical between two runs of the same config and seed.
COMPARED = ("results", "resources")
#: Files under COMPARED left out of the comparison (glob on the path relative to the working
#: directory -> reason). Empty: every FITS, ECSV, PNG, ONNX, JSON, NPZ and ``model.pt`` is
#: deterministic. Not compared at all (outside COMPARED): ``logs/`` (time stamps, durations),
#: ``benchmarks/`` (run times, memory), ``.snakemake/`` (Snakemake's own metadata and logs).
EXCLUDED: dict[str, str] = {}


def output_hashes(work: Path) -> dict[str, str]:
    """SHA-256 of every file under ``results/`` and ``resources/`` of ``work`` but :data:`EXCLUDED`.

    Parameters
    ----------
    work : pathlib.Path
        Working directory of a run.

    Returns
    -------
    dict
        Path relative to ``work`` -> hex digest.
    """
    out = {}
    for top in COMPARED:
        for path in sorted((work / top).rglob("*")):
            rel = path.relative_to(work).as_posix()
            if path.is_file() and not any(fnmatch(rel, pattern) for pattern in EXCLUDED):
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def assert_same_outputs(got: dict[str, str], want: dict[str, str]) -> None:
    """Assert two :func:`output_hashes` are equal, naming the files that differ."""
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    differ = sorted(k for k in set(got) & set(want) if got[k] != want[k])
    assert not (missing or extra or differ), f"missing {missing[:10]}, extra {extra[:10]}, differ {differ[:20]}"


def run_tiny(work: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run :data:`TINY_RUN` (plus ``args``) in ``work`` to its end."""
    return subprocess.run([*TINY_RUN, *args], cwd=work, capture_output=True, text=True, timeout=timeout)


def start_tiny(work: Path, log: Path, *args: str) -> subprocess.Popen:
    """Start :data:`TINY_RUN` in ``work`` in a session of its own, output to ``log``.

    Its own session (process group) lets a test send Ctrl-C to Snakemake and its jobs at once, as a
    terminal does; SIGINT is restored to its default in case the tests run with it ignored (a
    background job of a non-interactive shell).
    """
    with open(log, "w") as fh:
        return subprocess.Popen(
            [*TINY_RUN, *args],
            cwd=work,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )


def wait_for(
    condition: Callable[[], bool], proc: subprocess.Popen, log: Path, *, timeout: float, poll: float = 0.005
) -> None:
    """Poll ``condition`` until it holds; fail if ``proc`` ends first or ``timeout`` seconds pass.

    On failure the run started by :func:`start_tiny` (output in ``log``) is killed with its jobs, so
    that no Snakemake outlives the test, and the end of its log is shown.
    """
    end = time.monotonic() + timeout
    try:
        while not condition():
            if proc.poll() is not None:
                raise AssertionError(
                    f"the run ended (status {proc.returncode}) before the awaited moment:\n{log.read_text()[-3000:]}"
                )
            if time.monotonic() > end:
                raise AssertionError(f"the awaited moment did not come in {timeout} s")
            time.sleep(poll)
    except BaseException:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        raise


_JOB = re.compile(r"^(?:local)?rule (\w+):\n((?:[ \t]+\S.*\n)+)", re.MULTILINE)
_FINISHED = re.compile(r"^Finished jobid: (\d+)", re.MULTILINE)


def finished_outputs(log_text: str) -> dict[str, str]:
    """Outputs of the jobs a Snakemake log reports finished: path -> rule.

    Parameters
    ----------
    log_text : str
        Snakemake's own output (the job blocks with ``output:`` and ``jobid:`` lines).
    """
    outputs: dict[str, tuple[str, list[str]]] = {}
    for rule, body in _JOB.findall(log_text):
        fields = dict(line.strip().split(": ", 1) for line in body.splitlines() if ": " in line)
        if "jobid" in fields:
            outputs[fields["jobid"]] = (rule, fields["output"].split(", ") if "output" in fields else [])
    return {path: outputs[j][0] for j in _FINISHED.findall(log_text) for path in outputs[j][1]}


def mtimes(work: Path, paths: list[str]) -> dict[str, int]:
    """Modification times (ns) of ``paths`` relative to ``work``."""
    return {p: (work / p).stat().st_mtime_ns for p in paths}
