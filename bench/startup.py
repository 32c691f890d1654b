"""Start-up cost of a workflow job: the import time of each stage module, and over a run's job mix (prints; not a test).

Every job of the DAG is a fresh Python process that imports ``rbflow.runner`` and the stage module its
script calls, before any work. For each module this measures, in fresh processes (median of
``--repeats`` after one warm-up that writes the bytecode caches):

* ``import``: the import time of ``rbflow`` and the module as ``python -X importtime -c "import rbflow.X"``
  reports it (sum of the cumulative times of the top-level ``rbflow`` entries), with ``--detail`` the
  heaviest packages it pulls in;
* ``process`` and ``CPU``: the wall and the CPU (user + system) time of ``python -c "import rbflow.runner,
  rbflow.X"``, interpreter start-up included (what a job pays before its work; on a loaded machine the
  CPU time is the steadier figure).

``--compare DIR`` measures another source tree (a ``src`` folder, e.g. a checkout of the code before a
change) in the same run, interleaved with this one so that both see the same machine load, and prints
the ratios. The per-job overhead multiplies each rule's process CPU time by its job count: from a
Snakemake log or ``snakemake -n`` output holding the "Job stats" table (``--job-stats FILE``), or from a
dry run in a working directory (``--dry-run DIR``). Rules map to modules through their ``script:``
directives and the scripts' imports (each tree's own ``workflow/rules``).

Usage::

    python bench/startup.py [--compare /work/baseline/src] [--job-stats demo.log | --dry-run WORKDIR]
                            [--repeats 5] [--detail] [module ...]
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
SRC = HERE / "src"
GLUE = "rbflow.runner"
_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)$")


def _env(src: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(src)}


def exists(src: Path, module: str) -> bool:
    """Whether ``module`` (``rbflow.x``) is a file of the tree."""
    rel = Path(*module.split("."))
    return (src / rel).with_suffix(".py").is_file() or (src / rel / "__init__.py").is_file()


def import_time(python: str, src: Path, module: str) -> tuple[float, dict[str, float]]:
    """Import time (s) of rbflow and ``module`` in a fresh process, and the time spent in each package it pulled in."""
    proc = subprocess.run(
        [python, "-X", "importtime", "-c", f"import {module}"], env=_env(src), capture_output=True, text=True
    )
    if proc.returncode:
        raise RuntimeError(f"import {module} from {src} failed:\n{proc.stderr[-2000:]}")
    # entries are printed when their import ends: a module's imports come before its own line
    total, packages, pending = 0.0, {}, {}
    for line in proc.stderr.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        own, cumulative, name = int(m.group(1)) * 1e-6, int(m.group(2)) * 1e-6, m.group(4)
        top = name.split(".")[0]
        pending[top] = pending.get(top, 0.0) + own
        if m.group(3):
            continue
        if top == "rbflow":
            total += cumulative
            for p, t in pending.items():
                packages[p] = packages.get(p, 0.0) + t
        pending = {}
    return total, packages


def process_time(python: str, src: Path, module: str) -> tuple[float, float]:
    """Wall and CPU (user + system) time (s) of a fresh process importing the glue and ``module``.

    Interpreter start-up included: what a job pays before its work. The CPU time is what the process
    costs the machine, and is less disturbed by other load than the wall time.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run([python, "-c", f"import {GLUE}, {module}"], env=_env(src), check=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def script_modules(repo: Path) -> dict[str, str]:
    """Rule -> the rbflow module its script calls (from workflow/rules/*.smk and the scripts' imports)."""
    out = {}
    for smk in sorted((repo / "workflow" / "rules").glob("*.smk")):
        rule = None
        for line in smk.read_text().splitlines():
            if m := re.match(r"^(?:rule|checkpoint) (\w+):", line):
                rule = m.group(1)
            elif rule and (m := re.match(r"^\s+\"(.+\.py)\"\s*$", line)):
                script = (smk.parent / m.group(1)).resolve()
                if script.is_file():
                    for node in ast.walk(ast.parse(script.read_text())):
                        module = node.module if isinstance(node, ast.ImportFrom) else None
                        if module and module.startswith("rbflow.") and module != GLUE:
                            out[rule] = module
    return out


def job_stats(text: str) -> dict[str, int]:
    """Rule -> job count, from Snakemake's "Job stats" table."""
    m = re.search(r"^job\s+count\n-+\s+-+\n(.*?)^total\s+\d+", text, flags=re.MULTILINE | re.DOTALL)
    if not m:
        raise SystemExit("no 'Job stats' table (job / count ... total) in the given text")
    return {rule: int(n) for rule, n in re.findall(r"^(\w+)\s+(\d+)$", m.group(1), flags=re.MULTILINE)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("modules", nargs="*", help="modules (default: those the scripts call, the glue and rbflow.cli)")
    ap.add_argument("--compare", type=Path, help="another source tree (a src folder) measured in the same run")
    ap.add_argument("--repeats", type=int, default=5, help="fresh processes per measurement (median)")
    ap.add_argument("--python", default=sys.executable, help="interpreter of the jobs")
    ap.add_argument("--job-stats", type=Path, help="Snakemake log or dry-run output with the Job stats table")
    ap.add_argument("--dry-run", type=Path, help="working directory for `snakemake -n --quiet rules`")
    ap.add_argument("--detail", action="store_true", help="the heaviest packages each module pulls in")
    args = ap.parse_args(argv)

    trees = {"this": SRC} | ({"compare": args.compare.resolve()} if args.compare else {})
    rule_modules = {name: script_modules(src.parent) for name, src in trees.items()}
    modules = args.modules or sorted({*rule_modules["this"].values(), GLUE, "rbflow.cli"})
    print(f"python {args.python}; trees: " + ", ".join(f"{k} = {v}" for k, v in trees.items()))
    print(f"median of {args.repeats} fresh processes (after one warm-up), seconds; import and process are wall times")
    print(
        f"PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', '')!r}; load average {os.getloadavg()}\n"
    )

    imp: dict[tuple[str, str], float] = {}
    proc: dict[tuple[str, str], float] = {}
    cpu: dict[tuple[str, str], float] = {}
    heavy: dict[tuple[str, str], dict[str, float]] = {}
    for module in modules:
        present = {name: src for name, src in trees.items() if exists(src, module)}
        for src in present.values():  # warm-up: bytecode caches
            import_time(args.python, src, module)
        runs: dict[str, list] = {name: [] for name in present}
        walls: dict[str, list] = {name: [] for name in present}
        for _ in range(args.repeats):  # interleaved: both trees see the same load
            for name, src in present.items():
                runs[name].append(import_time(args.python, src, module))
                walls[name].append(process_time(args.python, src, module))
        for name in present:
            times = [t for t, _ in runs[name]]
            imp[name, module] = statistics.median(times)
            proc[name, module] = statistics.median(w for w, _ in walls[name])
            cpu[name, module] = statistics.median(c for _, c in walls[name])
            heavy[name, module] = runs[name][times.index(sorted(times)[len(times) // 2])][1]

    def cell(name: str, module: str, table: dict) -> str:
        return f"{table[name, module]:8.3f}" if (name, module) in table else f"{'absent':>8}"

    def ratio(module: str, table: dict) -> str:
        if ("compare", module) in table and ("this", module) in table:
            return f"{table['this', module] / table['compare', module]:6.2f}"
        return f"{'':>6}"

    head = f"{'module':22} {'import':>8}" + (f" {'compare':>8} {'ratio':>6}" if args.compare else "")
    head += f" {'process':>8}" + (f" {'compare':>8} {'ratio':>6}" if args.compare else "")
    head += f" {'CPU':>8}" + (f" {'compare':>8} {'ratio':>6}" if args.compare else "")
    print(head)
    for module in modules:
        row = f"{module:22} {cell('this', module, imp)}"
        if args.compare:
            row += f" {cell('compare', module, imp)} {ratio(module, imp)}"
        row += f" {cell('this', module, proc)}"
        if args.compare:
            row += f" {cell('compare', module, proc)} {ratio(module, proc)}"
        row += f" {cell('this', module, cpu)}"
        if args.compare:
            row += f" {cell('compare', module, cpu)} {ratio(module, cpu)}"
        print(row, flush=True)
    if args.detail:
        print("\nheaviest packages pulled in (import s spent in their own modules, median run)")
        for module in modules:
            for name in trees:
                if (name, module) in heavy:
                    top = sorted(heavy[name, module].items(), key=lambda kv: -kv[1])[:6]
                    print(f"{module:22} {name:8} " + ", ".join(f"{p} {t:.2f}" for p, t in top))

    if args.job_stats or args.dry_run:
        if args.job_stats:
            text = args.job_stats.read_text()
        else:
            cmd = [args.python, "-m", "snakemake", "--snakefile", str(HERE / "Snakefile"), "-n", "--quiet", "rules"]
            text = subprocess.run(cmd, cwd=args.dry_run, capture_output=True, text=True, check=True).stdout
        counts = job_stats(text)
        print(f"\nper-job overhead over the job mix ({sum(counts.values())} jobs): CPU seconds of the job processes")
        print(f"{'rule':18} {'jobs':>5} {'module':20} " + " ".join(f"{name:>9}" for name in trees))
        totals = dict.fromkeys(trees, 0.0)
        for rule, n in counts.items():
            cells = []
            # a rule renamed in one tree runs the module the other tree's rule of that name runs
            shown = next((rule_modules[name][rule] for name in trees if rule in rule_modules[name]), None)
            for name in trees:
                module = rule_modules[name].get(rule, shown)
                if module and (name, module) not in cpu and exists(trees[name], module):
                    cpu[name, module] = statistics.median(
                        process_time(args.python, trees[name], module)[1] for _ in range(args.repeats)
                    )
                cost = n * cpu[name, module] if module and (name, module) in cpu else 0.0
                totals[name] += cost
                cells.append(f"{cost:9.1f}" if module else f"{'no script':>9}")
            print(f"{rule:18} {n:5d} {shown or '-':20} " + " ".join(cells))
        line = " ".join(f"{t:9.1f}" for t in totals.values())
        print(f"{'total':18} {sum(counts.values()):5d} {'':20} {line}  (CPU-s)")
        print(f"load average at the end {os.getloadavg()}")
        if args.compare and totals["compare"]:
            print(f"ratio this/compare: {totals['this'] / totals['compare']:.2f}")


if __name__ == "__main__":
    main()
