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


def test_readme_snakemake_commands_parse_as_meant(repo):
    """Each ``snakemake`` line of the README parses with Snakemake's own parser as a reader means it:
    ``--configfile`` and ``--config`` take several values, so a target written after them is read as
    a config file (``snakemake --configfile config/starter.yaml starter`` failed with "No such file or
    directory: 'starter'")."""
    import shlex

    from snakemake.cli import get_argument_parser

    parser = get_argument_parser()
    lines = [
        line.split("#")[0].strip()
        for line in (repo / "README.md").read_text().splitlines()
        if line.strip().startswith(".venv/bin/snakemake ")
    ]
    assert len(lines) >= 5
    for line in lines:
        args = parser.parse_args(shlex.split(line)[1:])
        for path in args.configfile or []:
            assert path.suffix in (".yaml", ".yml") and (repo / path).is_file(), (line, path)
        for item in args.config or []:
            assert "=" in item, (line, item)
