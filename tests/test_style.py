"""Formatting and lint are a tool's job: ruff and snakefmt, configured in pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed: pip install -c constraints.txt -e '.[test]'")
    return found


@pytest.mark.parametrize(
    "args",
    [["ruff", "check", "."], ["ruff", "format", "--check", "."]],
    ids=["ruff-check", "ruff-format"],
)
def test_python_is_formatted_and_lint_free(repo, args):
    proc = subprocess.run([_tool(args[0]), *args[1:]], cwd=repo, capture_output=True, text=True)
    assert proc.returncode == 0, f"run `{' '.join(args[:-1])} --fix .`:\n{proc.stdout}{proc.stderr}"


def test_workflow_is_snakefmt_formatted(repo):
    files = ["Snakefile", *sorted(str(p.relative_to(repo)) for p in (repo / "workflow" / "rules").glob("*.smk"))]
    proc = subprocess.run(
        [_tool("snakefmt"), "--config", "pyproject.toml", "--check", *files], cwd=repo, capture_output=True, text=True
    )
    assert proc.returncode == 0, f"run `snakefmt --config pyproject.toml Snakefile workflow/rules`:\n{proc.stderr}"
