"""Exceptions raised by rbflow for bad input.

Every message names the file (or config key) at fault and says how to fix it.
"""

__all__ = ["RbflowError", "InputError", "ConfigError"]


class RbflowError(Exception):
    """Base class of rbflow's own errors."""


class InputError(RbflowError):
    """An input file is missing, unreadable or not what the stage needs."""


class ConfigError(RbflowError):
    """A configuration or telescope file is invalid."""
