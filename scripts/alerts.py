"""Snakemake script of rule alerts_score: P(real) of every alert packet of a folder."""

from rbflow.alerts import score_alerts
from rbflow.runner import run

sm = snakemake  # noqa: F821 - injected by Snakemake
run(
    sm,
    score_alerts,
    paths=[sm.input.folder],
    model_path=sm.input.model,
    out_table=sm.output.table,
    kept_dir=sm.output.kept if sm.params.alerts["keep_packets"] else None,
    threshold=sm.params.alerts["threshold"],
    negative=sm.params.alerts["negative"],
    progress=False,
)
