"""Snakemake script of rule validate_frame: check one frame and write its status."""

from rbflow.runner import call_in_job
from rbflow.validate import run_validate

sm = snakemake  # noqa: F821 - injected by Snakemake
call_in_job(
    sm,
    run_validate,
    frame_path=sm.input.frame,
    out_status=sm.output[0],
    telescope=sm.params.telescope,
    frame=sm.wildcards.frame,
    reference_status=sm.input.get("reference"),
)
