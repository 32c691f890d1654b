"""Snakemake script of rule cutouts: stamps of every candidate of one image."""

from rbflow.cutouts import write_cutouts
from rbflow.runner import call_in_job

sm = snakemake  # noqa: F821 - injected by Snakemake
call_in_job(
    sm,
    write_cutouts,
    subtract_path=sm.input.diff,
    candidates_path=sm.input.candidates,
    out_dir=sm.output[0],
    size=sm.params.cutout["size"],
    png=sm.params.cutout["png"],
)
