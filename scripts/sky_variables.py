"""Snakemake script of rule sky_variables: the synthetic sky's catalogue of real variables and transients."""

from rbflow.runner import call_in_job
from rbflow.sky import write_variables_catalogue

sm = snakemake  # noqa: F821 - injected by Snakemake
call_in_job(sm, write_variables_catalogue, telescope=sm.params.telescope, out=sm.output[0], seed=sm.params.seed)
