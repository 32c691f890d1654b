"""The module layers of docs/architecture.md hold in the code: downward imports only, no private names, no cycle.

The layer order and the module -> layer table are read from the "Layers" section of
``docs/architecture.md``, so the page and this test cannot drift apart. Every import of every module of
``src/rbflow`` counts, at module level and inside functions (a deferred import is still a dependency).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import REPO

DOC = REPO / "docs" / "architecture.md"
PACKAGE = REPO / "src" / "rbflow"
WHERE = "the table of section 'Layers' in docs/architecture.md"


@dataclass(frozen=True)
class Import:
    """One rbflow name used by a module: the module it comes from and the name (None: the module itself)."""

    source: str  # importing module
    target: str  # imported rbflow module
    name: str | None
    line: int


def read_layers(text: str) -> tuple[list[str], dict[str, str]]:
    """The layer order (bottom first) and module -> layer, from the 'Layers' section of the page."""
    m = re.search(r"^## Layers\n(.*?)(?=^## |\Z)", text, flags=re.MULTILINE | re.DOTALL)
    assert m, "docs/architecture.md has no '## Layers' section"
    section = m.group(1)
    order_line = re.search(r"^Bottom to top: (.+)$", section, flags=re.MULTILINE)
    assert order_line, "the Layers section lacks its line 'Bottom to top: leaf → ... → glue.'"
    order = [w.strip(" *.") for w in order_line.group(1).split("→")]
    table = dict(re.findall(r"^\| `(rbflow(?:\.\w+)*)` \| (\w+) \|", section, flags=re.MULTILINE))
    unknown = {mod: layer for mod, layer in table.items() if layer not in order}
    assert table and not unknown, f"rows with a layer not in {order}: {unknown}"
    return order, table


def module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: Path) -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    return {module_name(p, package): p for p in sorted(package.rglob("*.py"))}


def imports(package: Path) -> list[Import]:
    """Every use of an rbflow module or name by another: ``import``, ``from ... import`` (also relative,
    also inside functions) and ``alias._name`` attribute access on an imported rbflow module."""
    known = modules(package)
    root = package.name
    out = []
    for source, path in known.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_pkg = path.name == "__init__.py"
        aliases: dict[str, str] = {}  # local name -> rbflow module
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == root:
                        out.append(Import(source, a.name, None, node.lineno))
                        if a.asname:
                            aliases[a.asname] = a.name
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = source.split(".") if is_pkg else source.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                if module.split(".")[0] != root:
                    continue
                for a in node.names:
                    sub = f"{module}.{a.name}"
                    if sub in known:  # from rbflow import subtract: the module itself
                        out.append(Import(source, sub, None, node.lineno))
                        aliases[a.asname or a.name] = sub
                    else:
                        out.append(Import(source, module, a.name, node.lineno))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                out.append(Import(source, aliases[node.value.id], node.attr, node.lineno))
    return out


def _private(name: str | None) -> bool:
    return bool(name) and name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def layer_violations(package: Path, order: list[str], table: dict[str, str]) -> list[str]:
    rank = {layer: i for i, layer in enumerate(order)}
    out = []
    for imp in imports(package):
        if imp.target == imp.source or imp.source not in table or imp.target not in table:
            continue
        low, high = table[imp.source], table[imp.target]
        if rank[high] > rank[low]:
            out.append(f"{imp.source} ({low}) imports {imp.target} ({high}) at line {imp.line}")
    return sorted(set(out))


def private_imports(package: Path) -> list[str]:
    return sorted(
        {
            f"{imp.source} uses {imp.target}.{imp.name} at line {imp.line}"
            for imp in imports(package)
            if imp.target != imp.source and _private(imp.name)
        }
    )


def cycles(package: Path) -> list[list[str]]:
    """Import cycles between modules (strongly connected components of more than one module)."""
    graph: dict[str, set[str]] = {m: set() for m in modules(package)}
    for imp in imports(package):
        if imp.target in graph and imp.target != imp.source:
            graph[imp.source].add(imp.target)
    # the package's __init__ is imported by every submodule first: an edge into it is no cycle
    root = package.name
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v] - {root}:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return sorted(found)


ORDER, TABLE = read_layers(DOC.read_text())


def test_layer_picture_is_the_documented_one():
    assert ORDER == ["leaf", "imaging", "stages", "ML", "diagnostics", "glue"]


def test_every_module_has_a_layer():
    missing = sorted(set(modules(PACKAGE)) - set(TABLE))
    assert not missing, "modules without a layer: " + ", ".join(
        f"{m} (add a row '| `{m}` | <layer> | <concept> |' to {WHERE})" for m in missing
    )


def test_every_layer_row_names_a_module():
    stale = sorted(set(TABLE) - set(modules(PACKAGE)))
    assert not stale, f"rows of {WHERE} naming no module of src/rbflow (rename or remove them): {stale}"


def test_lower_layers_never_import_upper_ones():
    bad = layer_violations(PACKAGE, ORDER, TABLE)
    assert not bad, "upward imports (move the shared code down a layer):\n  " + "\n  ".join(bad)


def test_no_private_name_crosses_modules():
    bad = private_imports(PACKAGE)
    assert not bad, "private names used across modules (make them public or move them):\n  " + "\n  ".join(bad)


def test_no_import_cycle():
    found = cycles(PACKAGE)
    assert not found, f"import cycles: {found}"


def test_the_checks_catch_what_they_forbid(tmp_path):
    pkg = tmp_path / "rbflow"
    pkg.mkdir()
    files = {
        "__init__.py": '__version__ = "0"\n',
        "io.py": "from rbflow import __version__\n",
        "psf.py": "def f():\n    from rbflow.train import fit\n",  # deferred upward import
        "train.py": "from rbflow import psf\n\nfit = psf._grid\n",  # private name through an alias
        "detect.py": "from .subtract import _centroids\n",  # relative private import
        "subtract.py": "import rbflow.detect\n",  # cycle detect <-> subtract
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    order, table = read_layers(
        "## Layers\nBottom to top: **leaf → imaging → stages → ML**.\n\n| module | layer |\n|---|---|\n"
        + "".join(
            f"| `{m}` | {layer} |\n"
            for m, layer in [
                ("rbflow", "leaf"),
                ("rbflow.io", "leaf"),
                ("rbflow.psf", "imaging"),
                ("rbflow.detect", "stages"),
                ("rbflow.subtract", "stages"),
                ("rbflow.train", "ML"),
            ]
        )
    )
    assert layer_violations(pkg, order, table) == ["rbflow.psf (imaging) imports rbflow.train (ML) at line 2"]
    assert private_imports(pkg) == [
        "rbflow.detect uses rbflow.subtract._centroids at line 1",
        "rbflow.train uses rbflow.psf._grid at line 3",
    ]
    assert cycles(pkg) == [["rbflow.detect", "rbflow.subtract"], ["rbflow.psf", "rbflow.train"]]
    with pytest.raises(AssertionError, match="layer not in"):
        read_layers("## Layers\nBottom to top: leaf → ML.\n\n| `rbflow.x` | glue |\n")
