"""Snakemake script of rule survey_reference: a science frame's reference from a survey's images."""

from rbflow.runner import call_in_job
from rbflow.survey import survey_reference

sm = snakemake  # noqa: F821 - injected by Snakemake
call_in_job(
    sm,
    survey_reference,
    science=sm.input.frame,
    out_path=sm.output[0],
    telescope=sm.params.telescope,
    settings=sm.params.settings,
)
