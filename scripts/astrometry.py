"""Snakemake script of rule astrometry: calibrate one frame's WCS against a reference catalogue."""

from rbflow.astrometry import run_astrometry
from rbflow.runner import call_in_job

sm = snakemake  # noqa: F821 - injected by Snakemake
call_in_job(
    sm,
    run_astrometry,
    frame=sm.input.frame,
    out_fits=sm.output[0],
    telescope=sm.params.telescope,
    settings=sm.params.settings,
    skip_bad=sm.params.skip_bad,
)
