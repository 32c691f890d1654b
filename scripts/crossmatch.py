"""Snakemake script of rule crossmatch: candidates of one image vs its injected sources and known variables."""

from rbflow.crossmatch import run_crossmatch
from rbflow.runner import call_in_job

sm = snakemake  # noqa: F821 - injected by Snakemake
cfg = sm.params.crossmatch
call_in_job(
    sm,
    run_crossmatch,
    candidates_path=sm.input.candidates,
    injected_path=sm.input.injected,
    out_table=sm.output.table,
    out_dat=sm.output.compat,
    out_per_candidate=sm.output.per_candidate,
    radius=cfg["radius"],
    catalogues=list(sm.input.catalogues),
    label_unmatched=cfg["label_unmatched"],
    truth_path=sm.input.get("truth"),  # synthetic telescopes only
    reference_truth_path=sm.input.get("reference_truth"),
)
