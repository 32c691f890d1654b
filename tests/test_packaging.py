"""The install files agree with each other and with the README's set-up commands."""

from __future__ import annotations

import re

import tomllib
import yaml

# conda-forge names of PyPI packages whose names differ
CONDA_NAMES = {"torch": "pytorch"}


def _req_name(spec: str) -> str:
    return re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0].lower()


def test_conda_env_mirrors_pyproject(repo):
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((repo / "envs" / "rbflow.yaml").read_text())
    conda = {}
    for dep in env["dependencies"]:
        if isinstance(dep, str):
            conda[_req_name(dep)] = dep
    for spec in project["dependencies"]:
        name = CONDA_NAMES.get(_req_name(spec), _req_name(spec))
        assert name in conda, f"{spec!r} of pyproject.toml is missing from envs/rbflow.yaml"
        assert conda[name].replace("pytorch", "torch") == spec, f"versions differ: {spec!r} vs {conda[name]!r}"
    pypi_names = {CONDA_NAMES.get(_req_name(s), _req_name(s)) for s in project["dependencies"]}
    extra = set(conda) - pypi_names - {"python", "pip"}
    assert not extra, f"envs/rbflow.yaml has packages pyproject.toml lacks: {sorted(extra)}"


def test_torch_is_pinned_for_installs(repo):
    assert "torch==2.13.0" in (repo / "constraints.txt").read_text().split()


def test_readme_commands_match_ci(repo):
    readme = (repo / "README.md").read_text()
    block = re.search(r"<!-- setup -->\s*```(?:bash|console)?\n(.*?)```", readme, re.S)
    assert block, "README.md must keep its set-up block after the '<!-- setup -->' marker"
    commands = [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2, f"README set-up must be exactly two commands, found {commands}"
    install_and_demo, tests = commands
    ci = (repo / ".ci" / "run").read_text()
    assert 'pip install -c constraints.txt -e ".[test,sfft]"' in install_and_demo
    assert 'pip install -c constraints.txt -e ".[test,sfft]"' in ci
    assert "snakemake" in install_and_demo
    assert tests.strip() in ci, f"the README test command {tests!r} is not what .ci/run runs"
