"""Snakemake script of rule reference: stack the frames of the reference epoch."""

from rbflow.reference import run_reference
from rbflow.runner import run

sm = snakemake  # noqa: F821 - injected by Snakemake
run(
    sm,
    run_reference,
    frames=list(sm.input.frames),
    out_fits=sm.output[0],
    telescope=sm.params.telescope,
    stack=sm.params.stack,
    skip_bad=sm.config["on_bad_frame"] == "skip",
)
