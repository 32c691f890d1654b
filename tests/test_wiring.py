"""Wiring of every Snakemake script: the rule's input, output, params, threads and log reach the rbflow call.

The scripts are found from the ``script:`` directives of ``workflow/rules/*.smk``, the rbflow function a
script calls from the script's own code (``ast``): nothing here names a rule, a script or a function.
Each script runs (``runpy``) with a stand-in ``snakemake`` object built from its rule's declarations
(the names of ``unpack(f)`` inputs are read from the dict that ``f`` returns in the .smk files), the
glue of ``rbflow.runner`` wrapped and the stage function replaced by a recorder. The test asserts:

* the script routes through the glue, which calls the stage function and writes the rule's log;
* the arguments bind to the stage function's signature;
* every declared output and input reaches the call (the path itself, a folder above it, or the file it
  is a companion of: ``model.json`` travels with ``model.pt``), every
  param reaches it (except rerun triggers, :data:`RERUN_TRIGGERS`), and a function that takes
  ``threads`` gets ``snakemake.threads``; a rule reserving more than one thread must pass them on;
* no path reaches the call that the rule does not declare, and no script reads ``snakemake.config``
  (a setting the script needs is a param, so that editing it reruns the rule).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import runpy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO

RULES_DIR = REPO / "workflow" / "rules"
SCRIPTS_DIR = REPO / "scripts"
GLUE_MODULE = "rbflow.runner"
#: Params that exist to rerun a rule when something Snakemake cannot see changes; no function takes them.
RERUN_TRIGGERS = {
    "relabelled": "digest of a person's moves between training/true and false (rule datacube)",
    "listing": "digest of the alert folder's listing: a packet added in a subfolder reruns the rule (rule alerts_score)",
}
#: snakemake.threads of the stand-in: a count no rule declares, so that its arrival is recognisable.
THREADS = 7

_RULE = re.compile(r"^([ \t]*)(?:rule|checkpoint) (\w+):[ \t]*$")
_DIRECTIVE = re.compile(r"^    (\w+):[ \t]*(.*)$")


# --- the rules: parsed from the .smk files --------------------------------------------------------


@dataclass
class Item:
    """One declared input/output/log/param: its name (None = positional) and its path pattern or token."""

    name: str | None
    value: str | None  # the declared path pattern; None when a function computes it


@dataclass
class Rule:
    name: str
    smk: Path
    script: Path
    threads: int | None
    items: dict[str, list[Item]] = field(default_factory=dict)
    open_kinds: set[str] = field(default_factory=set)  # kinds whose names could not be read statically


def _path_of(node: ast.AST) -> str | None:
    """The path pattern an expression of a rule declares: a string, an f-string, or a wrapper's first argument."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(
            v.value if isinstance(v, ast.Constant) else "{" + ast.unparse(v.value) + "}" for v in node.values
        )
    if isinstance(node, ast.Call) and node.args:  # report(...), directory(...), expand(...), per_image(...)
        return _path_of(node.args[0])
    return None


def _input_functions() -> dict[str, ast.FunctionDef]:
    """The top-level functions of the .smk files (plain Python between Snakemake directives)."""
    out = {}
    for smk in sorted(RULES_DIR.glob("*.smk")):
        text = smk.read_text() + "\nEND\n"
        for block in re.findall(r"^def \w+\(.*?(?=^\S)", text, flags=re.MULTILINE | re.DOTALL):
            fn = ast.parse(block).body[0]
            out[fn.name] = fn
    return out


def _unpacked(fn: ast.FunctionDef) -> list[Item] | None:
    """Items of the dict an input function returns (dict literals and ``d["key"] = ...`` in its body)."""
    items: dict[str, str | None] = {}
    for node in ast.walk(fn):
        if isinstance(node, ast.Dict) and node.keys and all(isinstance(k, ast.Constant) for k in node.keys):
            items.update({k.value: _path_of(v) for k, v in zip(node.keys, node.values)})
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Subscript):
            key = node.targets[0].slice
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                items[key.value] = _path_of(node.value)
    return [Item(k, v) for k, v in items.items()] or None


def _directives(lines: list[str]) -> dict[str, str]:
    """Directive name -> its source text, for the lines of one rule's body."""
    out: dict[str, list[str]] = {}
    current = None
    for line in lines:
        m = _DIRECTIVE.match(line)
        if m:
            current = m.group(1)
            out[current] = [m.group(2)] if m.group(2) else []
        elif current and (line.startswith("        ") or not line.strip()):
            out[current].append(line)
        else:
            current = None
    return {k: "\n".join(v) for k, v in out.items()}


def parse_rules() -> list[Rule]:
    """Every rule and checkpoint of workflow/rules/*.smk that runs a script."""
    functions = _input_functions()
    rules = []
    for smk in sorted(RULES_DIR.glob("*.smk")):
        lines = smk.read_text().splitlines()
        # (a rule may sit indented in an `if` block: its body is read relative to its own indentation)
        starts = [(i, m.group(2), len(m.group(1))) for i, line in enumerate(lines) if (m := _RULE.match(line))]
        for k, (start, name, indent) in enumerate(starts):
            end = starts[k + 1][0] if k + 1 < len(starts) else len(lines)
            body = []
            for line in lines[start + 1 : end]:
                if line.strip() and len(line) - len(line.lstrip()) <= indent:
                    break
                body.append(line[indent:])
            directives = _directives(body)
            if "script" not in directives:
                continue
            script = (smk.parent / ast.literal_eval(directives["script"].strip())).resolve()
            threads = directives.get("threads", "").strip()
            rule = Rule(name, smk, script, int(threads) if threads.isdigit() else None)
            for kind in ("input", "output", "log", "params"):
                rule.items[kind] = []
                if kind not in directives:
                    continue
                call = ast.parse(f"_(\n{directives[kind]}\n)", mode="eval").body
                for arg in call.args:
                    unpack = isinstance(arg, ast.Call) and ast.unparse(arg.func) == "unpack"
                    if unpack:
                        fn = functions.get(ast.unparse(arg.args[0]))
                        found = _unpacked(fn) if fn else None
                        if found is None:
                            rule.open_kinds.add(kind)
                        rule.items[kind] += found or []
                    else:
                        rule.items[kind].append(Item(None, _path_of(arg)))
                for kw in call.keywords:
                    rule.items[kind].append(Item(kw.arg, _path_of(kw.value)))
            rules.append(rule)
    return rules


RULES = parse_rules()


# --- the scripts: which rbflow function they call, through which glue ------------------------------


@dataclass
class Calls:
    glue: str  # name of the glue function in rbflow.runner
    module: str  # module of the stage function
    func: str  # its name there


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def script_calls(script: Path) -> Calls:
    """The glue and the stage function a script calls, read from its code (clear failures otherwise)."""
    tree = ast.parse(script.read_text(), filename=str(script))
    imported: dict[str, tuple[str, str]] = {}  # local name -> (module, name)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "rbflow":
            for alias in node.names:
                imported[alias.asname or alias.name] = (node.module, alias.name)
    stages = {k: v for k, v in imported.items() if v[0] != GLUE_MODULE}
    if not stages:
        pytest.fail(f"{_rel(script)} calls nothing of rbflow: a script is a call of one rbflow function")
    glue_calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and imported.get(node.func.id, ("",))[0] == GLUE_MODULE
    ]
    if not glue_calls:
        pytest.fail(
            f"{_rel(script)} calls {sorted(stages)} without the glue of {GLUE_MODULE}: "
            "logging and one-line errors would not reach the rule's log"
        )
    call = glue_calls[0]
    target = call.args[1] if len(call.args) > 1 else None
    if not (isinstance(target, ast.Name) and target.id in stages):
        pytest.fail(
            f"{_rel(script)}: the glue call's second argument must be the rbflow function "
            f"imported by the script (one of {sorted(stages)}), got {ast.unparse(target) if target else 'nothing'}"
        )
    module, func = stages[target.id]
    return Calls(imported[call.func.id][1], module, func)


# --- the stand-in snakemake object ------------------------------------------------------------------


class Registry:
    """Numbers handed out for probes converted with int()/float(), to recognise them in the call."""

    def __init__(self) -> None:
        self.numbers: dict[float, str] = {}

    def number(self, token: str) -> int:
        for value, tok in self.numbers.items():
            if tok == token:
                return int(value)
        value = 900_001 + len(self.numbers)
        self.numbers[value] = token
        return value


class Probe(str):
    """A declared path handed to a script: a string that also iterates as a one-element list (a list input)."""

    registry: Registry

    def __iter__(self):
        return iter([str(self)])

    def __int__(self) -> int:
        return self.registry.number(str(self))


class ParamProbe(dict):
    """A declared param: a dict whose every key is another probe; it carries its token through dict()/tuple()."""

    def __init__(self, token: str, registry: Registry, reads: list[str] | None = None) -> None:
        super().__init__({token: token})
        self.token, self.registry, self.reads = token, registry, reads

    def __missing__(self, key: Any) -> ParamProbe:
        if self.reads is not None:
            self.reads.append(f"{self.token}[{key!r}]")
        return ParamProbe(f"{self.token}[{key!r}]", self.registry, self.reads)

    def get(self, key: Any, default: Any = None) -> Any:
        return self[key]

    def __int__(self) -> int:
        return self.registry.number(self.token)

    def __float__(self) -> float:
        return float(self.registry.number(self.token))

    def __index__(self) -> int:
        return self.registry.number(self.token)


class Slots:
    """Stand-in of snakemake.io.Namedlist: named and positional access, iteration, ``get``."""

    def __init__(self, kind: str, items: list[tuple[str | None, Any]], *, open_names: bool, make: Any) -> None:
        self._kind, self._items, self._open, self._make = kind, list(items), open_names, make

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        for key, value in self._items:
            if key == name:
                return value
        if self._open:
            value = self._make(f"{self._kind}.{name}")
            self._items.append((name, value))
            return value
        declared = [k for k, _ in self._items if k]
        raise AttributeError(f"the rule declares no {self._kind} named {name!r} (declared: {declared})")

    def __getitem__(self, index: int | str) -> Any:
        return getattr(self, index) if isinstance(index, str) else self._items[index][1]

    def get(self, name: str, default: Any = None) -> Any:
        return next((v for k, v in self._items if k == name), default)

    def keys(self) -> list[str]:
        return [k for k, _ in self._items if k]

    def __iter__(self):
        return iter([v for _, v in self._items])

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class StandIn:
    """What the script sees as ``snakemake`` (the attributes snakemake.script.Snakemake has)."""

    input: Slots
    output: Slots
    params: Slots
    wildcards: Slots
    log: Slots
    config: ParamProbe
    threads: int
    rule: str
    resources: Slots
    scriptdir: str
    bench_iteration: None = None


def stand_in(rule: Rule, log_path: Path, registry: Registry, config_reads: list[str]) -> StandIn:
    Probe.registry = registry

    def paths(kind: str) -> Slots:
        items = [
            (it.name, Probe(it.value or f"stand-in/{kind}/{it.name or i}"))
            for i, it in enumerate(rule.items.get(kind, []))
        ]
        return Slots(kind, items, open_names=kind in rule.open_kinds, make=Probe)

    params = Slots(
        "params",
        [(it.name, ParamProbe(f"params.{it.name}", registry)) for it in rule.items["params"]],
        open_names=False,
        make=None,
    )
    return StandIn(
        input=paths("input"),
        output=paths("output"),
        params=params,
        wildcards=Slots("wildcards", [], open_names=True, make=lambda t: Probe(t.replace(".", "-"))),
        log=Slots("log", [(None, str(log_path))], open_names=False, make=None),
        config=ParamProbe("config", registry, config_reads),
        threads=THREADS,
        rule=rule.name,
        resources=Slots("resources", [], open_names=True, make=lambda t: ParamProbe(t, registry)),
        scriptdir=str(rule.script.parent),
    )


def leaves(value: Any, registry: Registry) -> list[str]:
    """The strings an argument carries (paths as strings, params as tokens, numbers of probes as tokens)."""
    if isinstance(value, ParamProbe):
        return [value.token]
    if isinstance(value, (str, Path)):
        return [str(value)]
    if isinstance(value, dict):
        return [s for v in value.values() for s in leaves(v, registry)]
    if isinstance(value, (list, tuple, set, frozenset)):
        return [s for v in value for s in leaves(v, registry)]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value in registry.numbers:
        return [registry.numbers[value]]
    return []


def _companion(path: str, other: str) -> bool:
    """``path`` is a companion file of ``other``: the same folder and stem (``model.json`` of ``model.pt``)."""
    a, b = Path(path), Path(other)
    return a.suffix != "" and b.suffix != "" and a.parent == b.parent and a.stem == b.stem


def _reaches(path: str, others: list[str], *, up: bool = True) -> bool:
    """``path`` is one of ``others``, lies in a folder among them or is a companion file of one (``up``),
    or is a folder above one of them."""
    if up:
        return any(path == s or path.startswith(s.rstrip("/") + "/") or _companion(path, s) for s in others if s)
    return any(path == s or s.startswith(path.rstrip("/") + "/") for s in others if s)


# --- the test ---------------------------------------------------------------------------------------


def test_every_script_runs_in_a_rule():
    used = {r.script for r in RULES}
    orphans = sorted(p.name for p in SCRIPTS_DIR.glob("*.py") if p.resolve() not in used)
    assert RULES, f"no rule with a script: directive under {RULES_DIR}"
    assert not orphans, f"scripts no rule runs (delete them or add their rule): {orphans}"


@pytest.mark.parametrize("rule", RULES, ids=[f"{r.name}-{r.script.name}" for r in RULES])
def test_script_maps_the_rule_onto_its_rbflow_call(rule, tmp_path, monkeypatch):
    where = f"rule {rule.name} ({rule.smk.relative_to(REPO)}) -> {rule.script.relative_to(REPO)}"
    assert rule.script.is_file(), f"{where}: the script does not exist"
    calls = script_calls(rule.script)
    module = importlib.import_module(calls.module)
    real = getattr(module, calls.func)
    glue_module = importlib.import_module(GLUE_MODULE)
    real_glue = getattr(glue_module, calls.glue)
    recorded: list[inspect.BoundArguments] = []
    in_glue: list[bool] = []

    def recorder(*args: Any, **kwargs: Any) -> None:
        try:
            recorded.append(inspect.signature(real).bind(*args, **kwargs))
        except TypeError as exc:
            pytest.fail(f"{where}: the arguments do not fit {calls.module}.{calls.func}: {exc}")
        assert in_glue, f"{where}: {calls.func} was called outside the glue {GLUE_MODULE}.{calls.glue}"

    def glue(*args: Any, **kwargs: Any) -> Any:
        in_glue.append(True)
        return real_glue(*args, **kwargs)

    monkeypatch.setattr(module, calls.func, recorder)
    monkeypatch.setattr(glue_module, calls.glue, glue)
    registry, config_reads = Registry(), []
    log_path = tmp_path / "logs" / f"{rule.name}.log"
    sm = stand_in(rule, log_path, registry, config_reads)
    runpy.run_path(str(rule.script), init_globals={"snakemake": sm}, run_name="__main__")

    assert len(recorded) == 1, f"{where}: {calls.func} called {len(recorded)} times (want once, through the glue)"
    assert log_path.is_file() and f"rule {rule.name}" in log_path.read_text(), (
        f"{where}: the glue did not write the rule's log {log_path}"
    )
    arguments = recorded[0].arguments
    call = f"{calls.func}({', '.join(arguments)})"
    got = {name: leaves(value, registry) for name, value in arguments.items()}
    every = [s for v in got.values() for s in v]
    problems = [f"reads snakemake.config {config_reads}: pass the setting as a param"] if config_reads else []
    for kind, slots in (("output", sm.output), ("input", sm.input)):
        for i, item in enumerate(rule.items[kind]):
            if not _reaches(str(slots[i]), every):
                problems.append(f"{kind} {item.name or i} ({slots[i]}) does not reach {call}")
    for item in rule.items["params"]:
        token = f"params.{item.name}"
        if item.name not in RERUN_TRIGGERS and not any(s == token or s.startswith(token + "[") for s in every):
            problems.append(f"param {item.name} does not reach {call}")
    if "threads" in inspect.signature(real).parameters:
        if arguments.get("threads") != THREADS:
            problems.append(f"{calls.func} takes threads: pass snakemake.threads")
    elif rule.threads is None or rule.threads > 1:
        problems.append(f"the rule reserves {rule.threads or 'several'} threads but {calls.func} takes no threads")
    declared = [str(p) for p in [*sm.input, *sm.output]]
    for name, strings in got.items():
        for s in strings:
            if "/" in s and not s.startswith(("params.", "config")) and not _reaches(s, declared, up=False):
                problems.append(f"argument {name}={s!r} is a path the rule does not declare")
    assert not problems, f"{where}:\n  " + "\n  ".join(problems)


def test_a_script_that_calls_nothing_of_rbflow_fails_clearly(tmp_path):
    script = tmp_path / "empty.py"
    script.write_text("from pathlib import Path\n\nsm = snakemake  # noqa: F821\nPath(sm.output[0]).touch()\n")
    with pytest.raises(pytest.fail.Exception, match="calls nothing of rbflow"):
        script_calls(script)
