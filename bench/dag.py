"""Time of the dry run (``snakemake -n``) for a survey of many frames, with and without SLURM groups (not a test).

A demo-like telescope (config/telescopes/demo.yaml) with FIELDS fields x (1 reference + EPOCHS
epochs) frames and REALIZATIONS injections per science frame is written to a temporary working
folder; then

* ``snakemake -n --quiet rules`` plans every job of the default target (``all``);
* ``snakemake --workflow-profile workflow/profiles/slurm -n`` plans the same jobs as SLURM
  submissions: group jobs (the per-frame chain of a field is one job) plus the ungrouped jobs.

For each: the jobs (or submissions), the wall time and the CPU time of the Snakemake process.
Nothing runs and nothing is submitted (the SLURM plugin must be installed for the second).

Usage: ``python bench/dag.py [--fields 400] [--epochs 4] [--realizations 3]`` (default: 2,000
frames, the demo's 3 realizations).
"""

from __future__ import annotations

import argparse
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
NAME = "survey"


def write_survey(folder: Path, fields: int, epochs: int, realizations: int) -> list[str]:
    """Write ``folder/telescopes/survey.yaml`` and return the ``--config`` arguments selecting it."""
    tel = yaml.safe_load((REPO / "config/telescopes/demo.yaml").read_text())
    tel["name"] = NAME
    tel["sky"].update({"fields": fields, "epochs": epochs})
    tel["inject"]["realizations"] = realizations
    tel["crossmatch"]["catalogues"] = [f"resources/{NAME}/catalogues/variables.ecsv"]
    (folder / "telescopes").mkdir(parents=True)
    (folder / "telescopes" / f"{NAME}.yaml").write_text(yaml.safe_dump(tel))
    return ["--config", f"telescopes=[{NAME}]", f"telescope_dir={folder / 'telescopes'}"]


def expected_jobs(fields: int, epochs: int, realizations: int) -> dict[str, int]:
    """Jobs of each rule that ``all`` needs, from a fresh working folder."""
    frames, science = fields * (epochs + 1), fields * epochs
    per_image = science * (realizations + 1)  # injected and observed images
    counts = {
        "sky_frame": frames,
        "psf": frames,
        "inject": science * realizations,
        "subtract": per_image,
        "detect": per_image,
        "cutouts_image": per_image,
        "crossmatch": science * realizations,
        "infer_image": science,
    }
    single = [
        "sky_variables",
        "label",
        "checksim_plots",
        "datacube",
        "train_model",
        "checkinfer_plots",
        "apply_summary",
        "all",
    ]
    return counts | dict.fromkeys(single, 1)


def dry_run(work: Path, args: list[str]) -> tuple[str, float, float]:
    """Run a Snakemake dry run in ``work``: (its output, wall seconds, CPU seconds)."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "-n", *args]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"dry run failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return proc.stdout + proc.stderr, wall, cpu


def job_stats(text: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run (last one printed), rule -> count."""
    table = text.rsplit("Job stats:", 1)[1]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.MULTILINE) if m[1] != "total"}


def submissions(text: str) -> dict[str, int]:
    """What a cluster dry run would submit: group jobs per group, and single jobs ('all' excluded)."""
    out: dict[str, int] = {}
    for group in re.findall(r"\] Group job (\w+) ", text):
        out[f"group {group}"] = out.get(f"group {group}", 0) + 1
    for rule in re.findall(r"^rule (\w+):$", text, re.MULTILINE):
        if rule != "all":
            out[rule] = out.get(rule, 0) + 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fields", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--realizations", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rbflow-dag-") as tmp:
        work = Path(tmp) / "work"
        work.mkdir()
        (work / "config").symlink_to(REPO / "config")
        config = write_survey(Path(tmp), args.fields, args.epochs, args.realizations)
        frames = args.fields * (args.epochs + 1)
        print(
            f"{frames} frames ({args.fields} fields x {args.epochs + 1}), "
            f"{args.realizations} realizations per science frame"
        )
        text, wall, cpu = dry_run(work, ["--quiet", "rules", *config])
        stats = job_stats(text)
        assert stats == expected_jobs(args.fields, args.epochs, args.realizations), stats
        print(
            f"local dry run: {sum(stats.values())} jobs in {wall:.1f} s wall, {cpu:.1f} s CPU "
            f"({1000 * cpu / sum(stats.values()):.2f} ms CPU per job)"
        )
        text, wall, cpu = dry_run(work, ["--workflow-profile", str(REPO / "workflow/profiles/slurm"), *config])
        subs = submissions(text)
        detail = ", ".join(f"{k} {v}" for k, v in sorted(subs.items()))
        print(
            f"slurm profile dry run: {sum(subs.values())} SLURM jobs ({detail}) in {wall:.1f} s wall, {cpu:.1f} s CPU"
        )


if __name__ == "__main__":
    main()
