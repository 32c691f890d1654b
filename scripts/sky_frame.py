"""Snakemake script of rule sky_frame: one frame of the synthetic sky."""

from rbflow.runner import call_in_job
from rbflow.sky import write_frame

sm = snakemake  # noqa: F821 - injected by Snakemake
call_in_job(
    sm,
    write_frame,
    telescope=sm.params.telescope,
    frame=sm.wildcards.frame,
    out_fits=sm.output.fits,
    out_truth=sm.output.truth,
    seed=sm.params.seed,
)
