"""Snakemake script of checkpoint bad_frames: the table of frames that failed a check."""

from rbflow.runner import call_in_job
from rbflow.validate import write_bad_frames

sm = snakemake  # noqa: F821 - injected by Snakemake
call_in_job(sm, write_bad_frames, status_paths=list(sm.input), out_table=sm.output[0])
