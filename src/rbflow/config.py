"""Loading rbflow's run configuration and telescope files and checking them against their schemas.

The JSON schemas shipped in the package (``rbflow/schemas/``) are the single source of truth: they carry each key's
description, type, unit and default. :func:`check_schema` fills in defaults and, on failure, raises a
:class:`~rbflow.errors.ConfigError` naming the file, the key and what is allowed. (In rbflow "validate" names the
per-frame checks of :mod:`rbflow.validate`, not this.)

``jsonschema`` and ``yaml`` are imported by the functions that use them: a job that only needs
:func:`schema_defaults` of a small block still pays for them, but importing this module does not.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rbflow.errors import ConfigError

if TYPE_CHECKING:
    import jsonschema

__all__ = ["SCHEMA_DIR", "schema", "schema_defaults", "check_schema", "load_yaml", "load_telescope", "load_config"]

log = logging.getLogger(__name__)

#: Folder of the JSON schemas, package data of rbflow (so an installed rbflow validates configs).
SCHEMA_DIR = resources.files("rbflow") / "schemas"


@functools.cache
def _schema_text(schema_name: str) -> str:
    return (SCHEMA_DIR / schema_name).read_text()


def schema(schema_name: str) -> dict[str, Any]:
    """One of rbflow's JSON schemas, parsed (a fresh copy each call).

    Parameters
    ----------
    schema_name : str
        File name in ``SCHEMA_DIR``: ``"config.schema.yaml"``, ``"telescope.schema.yaml"`` or
        ``"sky.schema.yaml"``.

    Returns
    -------
    dict
    """
    import yaml

    return yaml.safe_load(_schema_text(schema_name))


def schema_defaults(schema_name: str, *block: str) -> dict[str, Any]:
    """The defaults a schema gives to the keys of one of its blocks: the one source of defaults.

    Parameters
    ----------
    schema_name : str
        File name in ``SCHEMA_DIR`` (e.g. ``"config.schema.yaml"``).
    *block : str
        Path of property names to the block, e.g. ``("train",)``; none for the top level.

    Returns
    -------
    dict
        What validating an empty block fills in: every key that has a default, with it (nested
        blocks too); keys without a default are absent.
    """
    sub = schema(schema_name)
    for name in block:
        sub = sub["properties"][name]
    data: dict[str, Any] = {}
    for _ in _validator_class()(sub).iter_errors(data):  # filling happens during the walk; required keys stay absent
        pass
    return data


@functools.cache
def _validator_class() -> type:
    """Draft 7 jsonschema validator class extended so that validation fills in ``default`` values."""
    import jsonschema

    validator_class = jsonschema.Draft7Validator
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):  # noqa: ANN001 - jsonschema hook
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def load_yaml(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """Read a YAML mapping, with a clear error when the file is missing or malformed.

    Parameters
    ----------
    path : path-like
        YAML file.
    what : str
        What the file is, for messages (e.g. ``"telescope file"``).

    Returns
    -------
    dict

    Raises
    ------
    ConfigError
        Missing file, YAML syntax error, or a top level that is not a mapping.
    """
    import yaml

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{what} '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} '{path}' is not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} '{path}' must hold a mapping of keys, not {type(data).__name__}")
    return data


def _describe(error: jsonschema.ValidationError) -> str:
    key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    schema = error.schema if isinstance(error.schema, dict) else {}
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        where = key if error.absolute_path else "top level"
        return f"unknown key(s) {', '.join(map(repr, extra))} at {where}; allowed keys: {', '.join(allowed)}"
    hint = schema.get("description")
    msg = f"key '{key}': {error.message}"
    if "enum" in schema:
        msg += f" (allowed: {', '.join(map(str, schema['enum']))})"
    if hint:
        msg += f" — {hint}"
    return msg


def check_schema(data: dict[str, Any], schema_name: str, source: str) -> dict[str, Any]:
    """Check ``data`` in place against a schema of ``SCHEMA_DIR`` and fill in defaults.

    Parameters
    ----------
    data : dict
        Parsed configuration; modified in place (defaults added).
    schema_name : str
        File name in ``SCHEMA_DIR`` (e.g. ``"telescope.schema.yaml"``).
    source : str
        What ``data`` came from, for messages (e.g. ``"telescope file 'config/telescopes/demo.yaml'"``).

    Returns
    -------
    dict
        ``data``, with defaults.

    Raises
    ------
    ConfigError
        Listing every problem found, each with its key.
    """
    errors = sorted(
        _validator_class()(schema(schema_name)).iter_errors(data), key=lambda e: list(map(str, e.absolute_path))
    )
    if errors:
        raise ConfigError(f"{source}: " + "; ".join(_describe(e) for e in errors))
    return data


def load_telescope(path: str | os.PathLike) -> dict[str, Any]:
    """Load one telescope file and check it (and its ``sky`` block, for synthetic telescopes) against its schema.

    Parameters
    ----------
    path : path-like
        ``config/telescopes/<name>.yaml``.

    Returns
    -------
    dict
        The telescope configuration with defaults filled in.

    Raises
    ------
    ConfigError
        Missing/malformed file, invalid keys, or a ``name`` that differs from the file name.
    """
    path = Path(path)
    source = f"telescope file '{path}'"
    tel = check_schema(load_yaml(path, "telescope file"), "telescope.schema.yaml", source)
    if tel["name"] != path.stem:
        raise ConfigError(f"{source}: key 'name' is {tel['name']!r} but must equal the file name {path.stem!r}")
    if "sky" in tel:
        check_schema(tel["sky"], "sky.schema.yaml", f"{source} (block 'sky')")
        if tel["pixel_scale"] is None:
            raise ConfigError(f"{source}: the embedded sky needs 'pixel_scale' in arcsec/pixel, not null")
    elif "frames" not in tel:
        raise ConfigError(f"{source}: give either 'frames' (real frames) or 'sky' (synthetic telescope)")
    return tel


def load_config(config: dict[str, Any], *, source: str = "config/config.yaml") -> dict[str, Any]:
    """Check the run configuration against its schema and load every telescope file it names.

    Parameters
    ----------
    config : dict
        Parsed ``config.yaml`` (as Snakemake's ``config``); modified in place.
    source : str, optional
        Where the configuration came from, for messages.

    Returns
    -------
    dict
        ``config`` with defaults and a ``_telescopes`` mapping of name to checked telescope dict.
    """
    check_schema(config, "config.schema.yaml", f"config '{source}'")
    tel_dir = Path(config["telescope_dir"])
    config["_telescopes"] = {}
    for name in config["telescopes"]:
        path = tel_dir / f"{name}.yaml"
        if not path.exists():
            available = sorted(p.stem for p in tel_dir.glob("*.yaml"))
            raise ConfigError(
                f"config '{source}': key 'telescopes' names {name!r} but '{path}' does not exist; "
                f"available: {', '.join(available) or 'none'} (add a file from config/telescopes/TEMPLATE.yaml)"
            )
        config["_telescopes"][name] = load_telescope(path)
    return config
