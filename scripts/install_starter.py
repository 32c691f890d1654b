"""Snakemake script of rule starter: install the trained model as the package's starter model."""

import csv
from pathlib import Path

from rbflow.infer import install_starter
from rbflow.runner import call_in_job

sm = snakemake  # noqa: F821 - injected by Snakemake


def training_time(benchmark: Path) -> float | None:
    """Wall time (s) of the training job from its Snakemake benchmark file; None when it is missing."""
    if not benchmark.exists():
        return None
    with benchmark.open() as fh:
        return float(next(csv.DictReader(fh, delimiter="\t"))["s"])


call_in_job(
    sm,
    install_starter,
    model_dir=Path(sm.input.pt).parent,
    dest=Path(sm.output.pt).parent,
    command=sm.params.command,
    config=dict(sm.params.config),
    seed=sm.params.seed,
    git_commit=sm.params.git_commit,
    training_time_s=training_time(Path(sm.params.benchmark)),
)
