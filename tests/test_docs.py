"""Documentation stays true: every configuration key is documented with its unit in config/README.md."""

from __future__ import annotations

import yaml


def _keys(schema: dict, prefix: str = ""):
    for key, sub in schema.get("properties", {}).items():
        yield prefix + key
        yield from _keys(sub, prefix + key + ".")


def test_every_schema_key_is_documented(repo):
    text = (repo / "config" / "README.md").read_text()
    for name in ("config", "telescope", "sky"):
        schema = yaml.safe_load((repo / "workflow" / "schemas" / f"{name}.schema.yaml").read_text())
        for key in _keys(schema):
            assert f"`{key}`" in text, f"config/README.md does not document key '{key}' of {name}.schema.yaml"
            assert "description" in _lookup(schema, key), f"schema key '{key}' has no description"


def _lookup(schema: dict, dotted: str) -> dict:
    for part in dotted.split("."):
        schema = schema["properties"][part]
    return schema
