"""Snakemake script of rule label: sort the injected images' cutouts into training/true, false, unsorted."""

from pathlib import Path

from rbflow.crossmatch import label_cutouts
from rbflow.runner import call_in_job

sm = snakemake  # noqa: F821 - injected by Snakemake
call_in_job(
    sm,
    label_cutouts,
    per_candidate_paths=list(sm.input.per_candidate),
    cutout_dirs=list(sm.input.cutouts),
    training_dir=Path(sm.output[0]).parent,
)
