"""Snakemake script of rule checkinfer_plots: threshold diagnostics on the model's test frames."""

from pathlib import Path

from rbflow.checkinfer import run_checkinfer
from rbflow.runner import call_in_job

sm = snakemake  # noqa: F821 - injected by Snakemake
call_in_job(
    sm,
    run_checkinfer,
    datacube_path=sm.input.datacube,
    model_path=sm.input.model,
    out_dir=Path(sm.output.summary).parent,
    threshold=sm.params.threshold,
    thresholds=tuple(sm.params.thresholds),
    cutout_dirs=list(sm.input.cutouts),
    truth_paths=list(sm.input.truth),
    crossmatch_paths=list(sm.input.crossmatch),
    seed=sm.params.seed,
    threads=sm.threads,
)
