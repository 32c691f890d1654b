"""Snakemake script of rule apply_summary: what the apply path kept, per frame."""

from rbflow.apply import summarise_apply
from rbflow.runner import call_in_job

sm = snakemake  # noqa: F821 - injected by Snakemake
call_in_job(
    sm,
    summarise_apply,
    infer_paths=list(sm.input.infer),
    kept_paths=list(sm.input.kept),
    out_json=sm.output.summary,
    out_png=sm.output.plot,
    catalogues=list(sm.input.catalogues),
    radius_arcsec=sm.params.radius_arcsec,
    radius_px=sm.params.radius_px,
)
