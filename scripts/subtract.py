"""Snakemake script of rule subtract: ZOGY (or sfft) subtraction of one image."""

from rbflow.runner import call_in_job
from rbflow.subtract import run_subtract

sm = snakemake  # noqa: F821 - injected by Snakemake
call_in_job(
    sm,
    run_subtract,
    sci_path=sm.input.sci,
    ref_path=sm.input.ref,
    sci_psf_path=sm.input.sci_psf,
    ref_psf_path=sm.input.ref_psf,
    out_path=sm.output[0],
    telescope=sm.params.telescope,
    threads=sm.threads,
)
