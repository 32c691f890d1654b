"""Glue between Snakemake's ``snakemake`` object and rbflow functions.

Scripts under ``scripts/`` call :func:`call_in_job` so that logging and tracebacks of every job end up in
the rule's ``log:`` file, and rbflow's own errors are shown as one clear line.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rbflow import __version__
from rbflow.errors import RbflowError

__all__ = ["call_in_job", "job_logging"]


@contextmanager
def job_logging(log_path: str | None, *, level: int = logging.INFO) -> Iterator[logging.Logger]:
    """Route the ``rbflow`` loggers to ``log_path`` (and stderr) for the duration of a job.

    Parameters
    ----------
    log_path : str or None
        The rule's log file; None logs to stderr only.
    level : int, optional
        Logging level.

    Yields
    ------
    logging.Logger
        The ``rbflow`` package logger.
    """
    logger = logging.getLogger("rbflow")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    old_level = logger.level
    logger.setLevel(level)
    try:
        yield logger
    finally:
        for h in handlers:
            logger.removeHandler(h)
            h.close()
        logger.setLevel(old_level)


def call_in_job(snakemake: Any, func: Callable[..., Any], /, **kwargs: Any) -> Any:
    """Call ``func(**kwargs)`` inside the job's logging context.

    (In rbflow "run" names the ``run`` target and the stage entries ``run_*``; this is the glue every
    script calls.)

    Parameters
    ----------
    snakemake : snakemake.script.Snakemake
        The object Snakemake injects into scripts (``log``, ``rule``, ``wildcards`` are used).
    func : callable
        The rbflow function doing the work.
    **kwargs
        Its arguments.

    Returns
    -------
    Any
        What ``func`` returns.

    Raises
    ------
    SystemExit
        With status 1 after logging an :class:`~rbflow.errors.RbflowError` as one line.
    """
    log_path = snakemake.log[0] if len(snakemake.log) else None
    with job_logging(log_path) as logger:
        logger.info("rbflow %s: rule %s, wildcards %s", __version__, snakemake.rule, dict(snakemake.wildcards))
        try:
            return func(**kwargs)
        except RbflowError as exc:
            logger.error("%s", exc)
            raise SystemExit(f"rbflow error in rule {snakemake.rule}: {exc}") from None
        except Exception:
            logger.exception("unexpected failure in rule %s", snakemake.rule)
            raise
