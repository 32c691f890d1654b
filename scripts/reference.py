"""Snakemake script of rule reference: stack the frames of the reference epoch."""

from rbflow.reference import run_reference
from rbflow.runner import call_in_job

sm = snakemake  # noqa: F821 - injected by Snakemake
call_in_job(
    sm,
    run_reference,
    frames=list(sm.input.frames),
    out_fits=sm.output[0],
    telescope=sm.params.telescope,
    stack=sm.params.stack,
    skip_bad=sm.params.skip_bad,
)
