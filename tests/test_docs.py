"""Documentation stays true: config/README.md documents every configuration key, as the schemas say."""

from __future__ import annotations

import runpy


def test_config_reference_is_up_to_date(repo):
    reference = runpy.run_path(str(repo / "docs" / "config_reference.py"))
    text = (repo / "config" / "README.md").read_text()
    assert text.endswith(reference["tables"]()), "config/README.md is stale: run python docs/config_reference.py"


def test_every_schema_key_has_a_description(repo):
    reference = runpy.run_path(str(repo / "docs" / "config_reference.py"))
    for row in reference["tables"]().splitlines():
        if row.startswith("| `"):
            assert row.split(" | ")[2].strip(), f"schema key without description: {row}"
