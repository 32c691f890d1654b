"""Snakemake script of rule detect: candidates of one difference image."""

from rbflow.detect import run_detect
from rbflow.runner import call_in_job

sm = snakemake  # noqa: F821 - injected by Snakemake
call_in_job(
    sm,
    run_detect,
    subtract_path=sm.input.diff,
    sci_psf_path=sm.input.psf,
    out_table=sm.output[0],
    telescope=sm.params.telescope,
    image_name=sm.wildcards.image,
)
