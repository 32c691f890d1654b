"""Snakemake script of rule starter: install the trained model as the package's starter model."""

from pathlib import Path

from rbflow.infer import install_starter
from rbflow.runner import call_in_job

sm = snakemake  # noqa: F821 - injected by Snakemake
call_in_job(
    sm,
    install_starter,
    model_dir=Path(sm.input.pt).parent,
    dest=Path(sm.output.pt).parent,
    command=sm.params.command,
    config=sm.params.config,
    seed=sm.params.seed,
    git_commit=sm.params.git_commit,
    benchmark=sm.params.benchmark,
)
