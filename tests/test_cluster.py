"""The workflow on a real one-node SLURM cluster, through the `slurm` workflow profile.

`tests/cluster/slurm.sh start` installs (apt) and starts munge, MariaDB, slurmdbd, slurmctld and
slurmd on this machine; it needs root on Debian, so the tests skip elsewhere. The tiny test
workflow then runs through `--workflow-profile workflow/profiles/slurm` (plus the fast status
checks of `tests/cluster/profile`) while the same target runs locally, and the checks read SLURM's
own accounting (`sacct`): every rule ran inside a SLURM job holding its declared resources, one job
made to fail once was retried, and the outputs equal the local run's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from helpers import SNAKEMAKE, TINY, make_workdir

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[1]
SLURM_SH = REPO / "tests" / "cluster" / "slurm.sh"
# The whole tiny workflow: per-field group jobs (frames to crossmatch) and single jobs for the
# rest (sky_variables, label, datacube, train_model, infer_image, plots). ("run" stops after
# detection: the frame groups only, about half the time.)
TARGET = "all"
# CPUs per group job, so that both fields' group jobs share the 2-CPU CI node at once; rule
# threads above it are capped to it (Snakemake's --cores in cluster mode).
CORES = 1
# Rule whose script fails on its first start anywhere (see FAIL_ONCE); its group job is retried.
FAIL_RULE = "sky_frame"
# A rule script run by Snakemake is `.snakemake/scripts/tmpXXXX.<script>.py`: this
# sitecustomize, on the jobs' PYTHONPATH, makes the first one of FAIL_RULE exit 3 (no test hook
# in the rules or the package is needed).
FAIL_ONCE = """\
import os
import sys

_script = sys.argv[0] if sys.argv else ""
if "/.snakemake/scripts/" in _script and _script.endswith(".{rule}.py"):
    try:
        _fd = os.open({marker!r}, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        pass
    else:
        os.write(_fd, os.environ.get("SLURM_JOB_ID", "none").encode())
        os.close(_fd)
        sys.stderr.write("test_cluster: injected failure of {rule}\\n")
        sys.exit(3)
"""


@dataclass(frozen=True)
class SlurmJob:
    """One SLURM job of a run: `sacct`'s record, and the rules its SLURM log shows it ran."""

    jobid: str
    comment: str
    state: str
    cpus: int
    mem_mb: int
    minutes: int
    rules: frozenset[str]
    log: str


@dataclass(frozen=True)
class Runs:
    """The workflow run through SLURM and the same target run locally."""

    slurm: Path
    local: Path
    log: str
    jobs: list[SlurmJob]
    marker: Path


def _cluster_ready() -> bool:
    if shutil.which("sinfo") is None:
        return False
    proc = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    return proc.returncode == 0 and any(s in proc.stdout for s in ("idle", "mix", "alloc"))


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running one-node cluster; stopped afterwards if this fixture started it."""
    if os.geteuid() != 0:
        pytest.skip("the SLURM cluster test needs root (it installs and starts daemons)")
    if not Path("/etc/debian_version").exists() or shutil.which("apt-get") is None:
        pytest.skip("the SLURM cluster test needs Debian (apt-get)")
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        pytest.fail("snakemake-executor-plugin-slurm is missing: pip install -e '.[test]'")
    was_up = _cluster_ready()
    proc = subprocess.run(["bash", str(SLURM_SH), "start"], capture_output=True, text=True, timeout=300)
    if proc.returncode == 2:
        pytest.skip(f"cannot set up SLURM here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, f"{SLURM_SH} start failed:\n{proc.stdout}\n{proc.stderr}"
    yield
    if not was_up:
        subprocess.run(["bash", str(SLURM_SH), "stop"], capture_output=True, text=True, timeout=120)


def test_starting_a_running_cluster_changes_nothing(slurm_cluster):
    before = subprocess.run(["bash", str(SLURM_SH), "status"], capture_output=True, text=True).stdout
    proc = subprocess.run(["bash", str(SLURM_SH), "start"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert not re.search(r"installing|starting|stopping|writing", proc.stderr), proc.stderr
    assert subprocess.run(["bash", str(SLURM_SH), "status"], capture_output=True, text=True).stdout == before
    assert "slurmdbd: running" in before and re.search(r"\b(idle|mix|alloc)\b", before), before


#: mem_mb of rules whose memory is an input function (common.smk), for the tiny telescope (ZOGY).
MEM_FUNCTIONS = {"subtract_mem_mb": 3000}


def _declared_resources() -> dict[str, tuple[int, int, int]]:
    """(threads, mem_mb, runtime) of every rule with a `resources:` block, read from the rule files."""
    declared = {}
    for smk in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        for block in re.split(r"^rule ", smk.read_text(), flags=re.M)[1:]:
            name = block.split(":", 1)[0].strip()
            mem, runtime = re.search(r"mem_mb=(\d+|\w+)", block), re.search(r"runtime=(\d+)", block)
            if mem and runtime:
                threads = re.search(r"^\s+threads:\s*(\d+)", block, flags=re.M)
                mem_mb = int(mem.group(1)) if mem.group(1).isdigit() else MEM_FUNCTIONS[mem.group(1)]
                declared[name] = (int(threads.group(1)) if threads else 1, mem_mb, int(runtime.group(1)))
    return declared


def _minutes(limit: str) -> int:
    days, _, hms = limit.rpartition("-")
    h, m, s = (int(v) for v in hms.split(":"))
    return int(days or 0) * 1440 + h * 60 + m + (s > 0)


def _mem_mb(reqmem: str) -> int:
    value, unit = float(reqmem[:-1]), reqmem[-1]
    return int(value * {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024**2}[unit])


def _slurm_log(workdir: Path, jobid: str) -> str:
    """What a job printed: the plugin points sbatch --output to `.snakemake/slurm_logs/.../<jobid>.log`."""
    logs = list((workdir / ".snakemake" / "slurm_logs").rglob(f"{jobid}.log"))
    assert len(logs) == 1, f"SLURM job {jobid}: log files {logs}"
    return logs[0].read_text()


def _sacct(workdir: Path, start: str) -> list[SlurmJob]:
    """The jobs submitted from `workdir` since `start`, once all of them have ended."""
    fields = "JobID,WorkDir,Comment,State,ReqCPUS,ReqMem,Timelimit"
    for _ in range(30):  # records reach slurmdbd a moment after a job ends
        out = subprocess.run(
            ["sacct", "-X", "-n", "-P", "-S", start, "-E", "now", "-o", fields],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        rows = [line.split("|") for line in out.splitlines() if line]
        rows = [row for row in rows if Path(row[1]) == workdir]
        if rows and all(row[3] not in ("PENDING", "RUNNING", "COMPLETING") for row in rows):
            break
        time.sleep(1)
    else:
        raise AssertionError(f"SLURM jobs of {workdir} did not end: {rows}")
    jobs = []
    for jid, _, comment, state, cpus, mem, limit in rows:
        log = _slurm_log(workdir, jid)
        rules = frozenset(re.findall(r"^\s*(?:local)?rule (\w+):$", log, flags=re.M))
        jobs.append(SlurmJob(jid, comment, state.split()[0], int(cpus), _mem_mb(mem), _minutes(limit), rules, log))
    return jobs


def _cancel_leftovers(workdir: Path) -> None:
    out = subprocess.run(["squeue", "-h", "-o", "%i|%Z"], capture_output=True, text=True).stdout
    ids = [line.split("|")[0] for line in out.splitlines() if line.endswith(f"|{workdir}")]
    if ids:
        subprocess.run(["scancel", *ids], check=False)


@pytest.fixture(scope="module")
def runs(slurm_cluster, tiny_run, tmp_path_factory) -> Runs:
    """Run TARGET through SLURM (one job failing once); the local run is the shared `tiny_run`."""
    base = tmp_path_factory.mktemp("cluster")
    slurm_dir, local_dir, hook = make_workdir(base / "slurm"), tiny_run, base / "hook"
    hook.mkdir()
    marker = base / "failed-once"
    (hook / "sitecustomize.py").write_text(FAIL_ONCE.format(rule=FAIL_RULE, marker=str(marker)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))}
    start = time.strftime("%Y-%m-%dT%H:%M:%S")
    # a wrong status setup makes Snakemake poll forever and ignore SIGTERM: timeout -k kills it
    cmd = [
        "timeout",
        "-k",
        "10",
        "600",
        *SNAKEMAKE,
        "--workflow-profile",
        str(REPO / "workflow/profiles/slurm"),
        "--profile",
        str(REPO / "tests/cluster/profile"),
        "--cores",
        str(CORES),
        *TINY,
        "--",
        TARGET,
    ]
    try:
        proc = subprocess.run(cmd, cwd=slurm_dir, env=env, capture_output=True, text=True)
    finally:
        _cancel_leftovers(slurm_dir)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"SLURM run failed (rc {proc.returncode}):\n{log[-6000:]}"
    return Runs(slurm_dir, local_dir, log, _sacct(slurm_dir, start), marker)


def test_every_rule_ran_as_a_slurm_job_with_its_declared_resources(runs):
    declared = _declared_resources()
    done = [j for j in runs.jobs if j.state == "COMPLETED"]
    assert done, runs.jobs
    covered = set()
    for job in done:
        rules = job.rules & set(declared)
        assert rules, f"SLURM job {job.jobid} ran no rule of the workflow:\n{job.log[-2000:]}"
        covered |= rules
        threads = max(declared[r][0] for r in rules)
        mem = max(declared[r][1] for r in rules)
        runtime = max(declared[r][2] for r in rules)
        assert job.cpus == min(threads, CORES), (job, rules)
        # one job runs alone: exactly its rule's values; a group job holds at least its
        # largest member's memory and time (Snakemake sums runtime over sequential layers)
        (rule,) = rules if len(rules) == 1 else (None,)
        if rule and (job.comment == f"rule_{rule}" or job.comment.startswith(f"rule_{rule}_wildcards_")):
            assert (job.mem_mb, job.minutes) == (mem, runtime), (job, rules)
        else:
            assert job.mem_mb >= mem and job.minutes >= runtime, (job, rules)
    ran = {r for r in declared if f"rule {r}:" in runs.log}
    assert {"sky_frame", "psf", "subtract", "detect"} <= ran
    assert ran <= covered, f"rules that ran outside SLURM: {ran - covered}"
    # per-field grouping: 2 fields, 2 group jobs (plus the retried one), not one job per rule
    frame_jobs = [j for j in done if "sky_frame" in j.rules]
    assert len(frame_jobs) == 2, frame_jobs
    assert all({"psf", "subtract", "detect"} <= j.rules for j in frame_jobs), frame_jobs


def test_a_failed_job_is_retried_and_the_workflow_completes(runs):
    failed = [j for j in runs.jobs if j.state != "COMPLETED"]
    assert runs.marker.exists(), "the injected failure did not happen"
    assert [j.jobid for j in failed] == [runs.marker.read_text()], runs.jobs
    assert failed[0].state == "FAILED"
    assert f"injected failure of {FAIL_RULE}" in failed[0].log
    # the same group (same comment) was submitted again and completed
    assert any(j.comment == failed[0].comment and j.state == "COMPLETED" for j in runs.jobs)
    assert "Trying to restart job" in runs.log


def _assert_same_data(a, b, what: str) -> None:
    # same code, seeds, inputs and thread counts (CORES in both runs): bit-identical values
    if a.dtype.names:  # FITS table HDU: field by field (NaN compares equal only per field)
        for name in a.dtype.names:
            _assert_same_data(np.asarray(a[name]), np.asarray(b[name]), f"{what}:{name}")
    else:
        np.testing.assert_array_equal(a, b, err_msg=what)


def test_outputs_equal_a_local_run(runs):
    def outputs(suffix: str) -> list[Path]:
        return sorted(
            p.relative_to(runs.local) for d in ("resources", "results") for p in (runs.local / d).rglob(f"*{suffix}")
        )

    fits_files, tables, cubes = outputs(".fits"), outputs(".ecsv"), outputs(".npz")
    assert len(fits_files) > 20 and tables
    assert [p for p in fits_files + tables + cubes if not (runs.slurm / p).exists()] == []
    # the trained model and its probabilities: same candidates; the numbers are not compared
    # (history.ecsv holds wall times, and training need not be bit-reproducible across hosts)
    trained = [p for p in tables if {"model", "infer"} & set(p.parts)]
    for rel in trained:
        if "infer" in rel.parts and not rel.name.endswith("_kept.ecsv"):
            loc, clu = Table.read(runs.local / rel), Table.read(runs.slurm / rel)
            np.testing.assert_array_equal(loc["id"], clu["id"], err_msg=str(rel))
    tables = [p for p in tables if p not in trained]
    for rel in cubes:
        with np.load(runs.local / rel) as loc, np.load(runs.slurm / rel) as clu:
            assert sorted(loc.files) == sorted(clu.files), rel
            for name in loc.files:
                _assert_same_data(loc[name], clu[name], f"{rel}:{name}")
    for rel in fits_files:
        with fits.open(runs.local / rel) as loc, fits.open(runs.slurm / rel) as clu:
            assert [h.name for h in loc] == [h.name for h in clu], rel
            for hl, hc in zip(loc, clu):
                if hl.data is not None:
                    _assert_same_data(np.asarray(hl.data), np.asarray(hc.data), f"{rel}[{hl.name}]")
    for rel in tables:
        loc, clu = Table.read(runs.local / rel), Table.read(runs.slurm / rel)
        assert loc.colnames == clu.colnames and len(loc) == len(clu), rel
        for name in loc.colnames:
            _assert_same_data(np.asarray(loc[name]), np.asarray(clu[name]), f"{rel}:{name}")
