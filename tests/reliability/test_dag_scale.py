"""Scale of the DAG: a survey of 2,000 frames plans (``snakemake -n``) with the expected jobs.

The survey is the demo telescope with 400 fields x (1 reference + 4 epochs) and one injection
realization per science frame (18,408 jobs). No time is asserted: ``bench/dag.py`` measures the
dry run (and the SLURM submissions the groups make of it); docs/cluster.md gives the figures.
"""

from __future__ import annotations

import importlib.util

import pytest
from helpers import REPO

# bench/dag.py holds the survey and the parsing of the dry run (bench/ is not a package)
_spec = importlib.util.spec_from_file_location("rbflow_bench_dag", REPO / "bench/dag.py")
bench_dag = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_dag)

FIELDS, EPOCHS, REALIZATIONS = 400, 4, 1


@pytest.mark.workflow
def test_dag_of_2000_frames_builds_with_the_expected_jobs(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "config").symlink_to(REPO / "config")
    config = bench_dag.write_survey(tmp_path, FIELDS, EPOCHS, REALIZATIONS)
    text, _, _ = bench_dag.dry_run(work, ["--quiet", "rules", *config])
    stats = bench_dag.job_stats(text)
    assert stats["sky_frame"] == FIELDS * (EPOCHS + 1) == 2000
    assert stats == bench_dag.expected_jobs(FIELDS, EPOCHS, REALIZATIONS)
    assert sum(stats.values()) == 18408
