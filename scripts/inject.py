"""Snakemake script of rule inject: one injection realization of one frame."""

from rbflow.inject import run_inject
from rbflow.runner import call_in_job

sm = snakemake  # noqa: F821 - injected by Snakemake
call_in_job(
    sm,
    run_inject,
    frame_path=sm.input.frame,
    psf_path=sm.input.psf,
    reference_path=sm.input.reference,
    out_fits=sm.output.fits,
    out_table=sm.output.table,
    out_list=sm.output.compat,
    telescope=sm.params.telescope,
    frame=sm.wildcards.frame,
    realization=int(sm.wildcards.realization),
    seed=sm.params.seed,
)
