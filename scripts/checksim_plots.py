"""Snakemake script of rule checksim_plots: injection-recovery statistics and plots."""

from pathlib import Path

from rbflow.checksim import run_checksim
from rbflow.runner import call_in_job

sm = snakemake  # noqa: F821 - injected by Snakemake
call_in_job(
    sm,
    run_checksim,
    crossmatch_paths=list(sm.input.crossmatch),
    subtract_paths=list(sm.input.subtract),
    out_dir=Path(sm.output.summary).parent,
)
