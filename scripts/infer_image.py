"""Snakemake script of rule infer_image: P(real) of every candidate of one image."""

from rbflow.infer import infer_cutouts
from rbflow.runner import call_in_job

sm = snakemake  # noqa: F821 - injected by Snakemake
call_in_job(
    sm,
    infer_cutouts,
    cutout_dir=sm.input.cutouts,
    model_path=sm.input.model,
    out_table=sm.output.table,
    out_dat=sm.output.compat,
    out_kept=sm.output.kept,
    threshold=sm.params.threshold,
)
