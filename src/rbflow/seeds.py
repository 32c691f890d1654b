"""Stable seeds derived from the global seed and names (frame, realization, stage)."""

from __future__ import annotations

import hashlib

__all__ = ["derive"]


def derive(seed: int, *names: object) -> int:
    """Derive a reproducible 63-bit seed from ``seed`` and any number of names.

    Parameters
    ----------
    seed : int
        The global seed of the run.
    *names : object
        Anything whose ``str`` identifies the purpose (frame name, realization, stage).

    Returns
    -------
    int
        A seed in [0, 2**63), the same on every machine and Python version.
    """
    text = "\x1f".join([str(seed), *map(str, names)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1
