"""Snakemake script of rule datacube: the normalised datacube from the labelled cutout folders."""

from pathlib import Path

from rbflow.datacube import build_datacube
from rbflow.runner import call_in_job

sm = snakemake  # noqa: F821 - injected by Snakemake
cfg = sm.params.convert
call_in_job(
    sm,
    build_datacube,
    training_dir=Path(sm.input.labels).parent,
    out_npz=sm.output[0],
    channels=list(cfg["channels"]),
    crop=cfg["crop"],
    frac_true=cfg["frac_true"],
    seed=sm.params.seed,
)
