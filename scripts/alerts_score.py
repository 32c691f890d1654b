"""Snakemake script of rule alerts_score: P(real) of every alert packet in the configured folder."""

from rbflow.alerts import score_alerts
from rbflow.runner import call_in_job

sm = snakemake  # noqa: F821 - injected by Snakemake
call_in_job(
    sm,
    score_alerts,
    paths=[sm.input.folder],
    model_path=sm.input.model,
    out_table=sm.output.table,
    kept_dir=sm.output.kept if sm.params.alerts["keep_packets"] else None,
    threshold=sm.params.alerts["threshold"],
    negative=sm.params.alerts["negative"],
    progress=False,
    threads=sm.threads,  # inference threads when this process infers (torch, or a single decoding task)
    workers=sm.threads,  # decoding (and, with ONNX, scoring) processes
)
