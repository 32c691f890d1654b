"""Interruptions: a run stopped three ways and resumed with the README's commands ends as an uninterrupted one.

One working directory of the tiny telescope goes through four invocations of the same command:

1. Ctrl-C (SIGINT to Snakemake and its jobs, as a terminal sends it) once the first detection of an
   injected image is written, in the middle of the per-frame stages;
2. the command again with ``--rerun-incomplete``; SIGKILL of the training job's Python process once
   its first checkpoint is written (a job killed by the system, e.g. out of memory);
3. the same (training resumes); SIGKILL of Snakemake and all its jobs at the next checkpoint (a
   crashed node or ``kill -9``): the working directory stays locked;
4. ``--unlock``, then the command with ``--rerun-incomplete``.

These are the commands of the README ("Interrupted runs").

The outputs must then be byte-identical to the uninterrupted run ``tiny_run`` (model weights
included: training resumes exactly; the training checkpoint, resume state rather than an output,
is compared by value), and the outputs of the jobs finished before step 1 must not have been
recomputed.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from helpers import make_workdir
from reliability_runs import (
    assert_same_outputs,
    finished_outputs,
    mtimes,
    output_hashes,
    run_tiny,
    start_tiny,
    wait_for,
)

pytestmark = pytest.mark.workflow

CHECKPOINT = "results/tiny/checkpoints/checkpoint.pt"
TRAIN_LOG = "logs/tiny/model/train.log"
RERUN = "--rerun-incomplete"
_RESUMED = re.compile(r"resuming from \S+ after epoch (\d+)")


def _training_job(proc: subprocess.Popen) -> psutil.Process | None:
    """The Python process running the train_model script under Snakemake ``proc``, if any."""
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            cmdline = child.cmdline()
        except psutil.Error:  # ended (or a zombie) since it was listed
            continue
        if cmdline and Path(cmdline[0]).name.startswith("python") and cmdline[-1].endswith(".train_model.py"):
            return child
    return None


def _epochs(log_text: str) -> list[int]:
    """Epochs a train log reports trained."""
    return [int(e) for e in re.findall(r"epoch (\d+)/\d+:", log_text)]


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> dict[str, Any]:
    """Run the four steps of the module docstring; return the working directory and what each step left."""
    work = make_workdir(tmp_path_factory.mktemp("interrupt") / "work")
    logs = work.parent
    ckpt = work / CHECKPOINT
    out: dict[str, Any] = {"work": work}

    # 1. Ctrl-C in the middle of the per-frame stages
    proc = start_tiny(work, logs / "1.log")
    wait_for(lambda: any((work / "results/tiny/sim/detect").glob("*.ecsv")), proc, logs / "1.log", timeout=600)
    os.killpg(proc.pid, signal.SIGINT)
    out["rc1"] = proc.wait(timeout=300)
    finished = finished_outputs((logs / "1.log").read_text())
    out["finished"] = finished
    out["mtimes1"] = mtimes(work, sorted(finished))

    # 2. the command again (--rerun-incomplete); SIGKILL of the training job at its first checkpoint
    proc = start_tiny(work, logs / "2.log", RERUN)
    job: list[psutil.Process] = []

    def first_checkpoint() -> bool:
        if not job:  # find the job first, so that the kill follows the checkpoint within milliseconds
            found = _training_job(proc)
            job.extend([found] if found else [])
            return False
        return ckpt.exists()

    wait_for(first_checkpoint, proc, logs / "2.log", timeout=600)
    job[0].kill()
    out["rc2"] = proc.wait(timeout=300)
    out["log2"] = (work / TRAIN_LOG).read_text()

    # 3. the same; SIGKILL of Snakemake and its jobs at the next checkpoint
    before = ckpt.stat().st_mtime_ns
    proc = start_tiny(work, logs / "3.log", RERUN)
    wait_for(lambda: ckpt.stat().st_mtime_ns != before, proc, logs / "3.log", timeout=600)
    os.killpg(proc.pid, signal.SIGKILL)
    out["rc3"] = proc.wait(timeout=60)
    out["log3"] = (work / TRAIN_LOG).read_text()
    out["locked"] = run_tiny(work, RERUN)

    # 4. unlock, rerun what is incomplete
    out["unlock"] = run_tiny(work, "--unlock")
    out["final"] = run_tiny(work, RERUN)
    out["log4"] = (work / TRAIN_LOG).read_text()
    return out


def test_ctrl_c_keeps_finished_outputs_and_reruns_only_the_rest(interrupted):
    work, finished = interrupted["work"], interrupted["finished"]
    assert interrupted["rc1"] != 0
    rules = set(finished.values())
    assert {"sky_frame", "psf"} <= rules and "train_model" not in rules, rules
    assert interrupted["final"].returncode == 0, interrupted["final"].stderr[-3000:]
    # the jobs that had finished before Ctrl-C ran once: their outputs were never rewritten
    assert mtimes(work, sorted(finished)) == interrupted["mtimes1"]


def test_killed_training_job_resumes_from_its_checkpoint(interrupted):
    assert interrupted["rc2"] != 0
    trained_before_kill = _epochs(interrupted["log2"])
    assert trained_before_kill and trained_before_kill[0] == 1 and "resuming" not in interrupted["log2"]
    # step 3 resumed after the checkpoint step 2 left, and was killed at the checkpoint after it
    k3 = int(_RESUMED.search(interrupted["log3"]).group(1))
    assert k3 >= 1 and _epochs(interrupted["log3"])[0] == k3 + 1
    assert interrupted["rc3"] == -signal.SIGKILL


def test_killed_snakemake_needs_unlock_then_resumes(interrupted):
    locked = interrupted["locked"]
    assert locked.returncode != 0 and "--unlock" in locked.stdout + locked.stderr
    assert interrupted["unlock"].returncode == 0
    assert interrupted["final"].returncode == 0, interrupted["final"].stderr[-3000:]
    k3 = int(_RESUMED.search(interrupted["log3"]).group(1))
    k4 = int(_RESUMED.search(interrupted["log4"]).group(1))
    assert k4 > k3
    assert "model written" in interrupted["log4"]


def test_interrupted_run_ends_identical_to_an_uninterrupted_one(interrupted, tiny_run):
    assert interrupted["final"].returncode == 0, interrupted["final"].stderr[-3000:]
    work = interrupted["work"]

    def outputs(run: Path) -> dict[str, str]:
        return {k: v for k, v in output_hashes(run).items() if k != CHECKPOINT}

    want = outputs(tiny_run)
    assert "results/tiny/model/model.pt" in want and len(want) > 1000
    assert_same_outputs(outputs(work), want)
    # The checkpoint is the training's resume state, not an output: after a resume its values are
    # the same but its bytes are not, as pickle writes a repeated string once when it is the same
    # object (dictionary keys of the code) and again when it is an equal one (keys read back from
    # the previous checkpoint).
    a, b = (torch.load(run / CHECKPOINT, weights_only=True) for run in (work, tiny_run))
    assert (a["epoch"], a["history"], a["identity"]) == (b["epoch"], b["history"], b["identity"])
    for key in ("model", "best_state"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in b[key]), key


def test_docs_give_the_commands_used_here():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### Interrupted runs", 1)[1].split("\n#", 1)[0]
    assert "--unlock" in section and "--rerun-incomplete" in section
