"""Snakemake script of rule psf: build the PSF model of one frame."""

from rbflow.psf import run_psf
from rbflow.runner import call_in_job

sm = snakemake  # noqa: F821 - injected by Snakemake
call_in_job(
    sm, run_psf, frame_path=sm.input.frame, out_fits=sm.output.psf, out_png=sm.output.png, telescope=sm.params.telescope
)
