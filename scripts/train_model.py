"""Snakemake script of rule train_model: train, calibrate and evaluate the CNN."""

from pathlib import Path

from rbflow.runner import call_in_job
from rbflow.train import train

sm = snakemake  # noqa: F821 - injected by Snakemake
call_in_job(
    sm,
    train,
    datacube_path=sm.input[0],
    out_dir=Path(sm.output.model).parent,
    cfg=dict(sm.params.train),
    seed=sm.params.seed,
    checkpoint_dir=sm.params.checkpoint_dir,
    threads=sm.threads,
)
