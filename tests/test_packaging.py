"""The install files agree with each other and with the README's set-up commands; a non-editable
install of rbflow works on its own (trains from a cube, plans the workflow of a checkout)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import tomllib
import yaml
from astropy.io import fits

# conda-forge names of PyPI packages whose names differ
CONDA_NAMES = {"torch": "pytorch", "isal": "python-isal"}


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
        assert conda[name].replace(name, _req_name(spec), 1) == spec, f"versions differ: {spec!r} vs {conda[name]!r}"
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


def _stamp_file(path: Path, *, real: bool, frame: str, cand: str, rng: np.random.Generator) -> None:
    """One stamp of the older tool's layout: SCI, REF, DIFF image HDUs, candidate keys in the primary header."""
    yy, xx = np.mgrid[:32, :32]
    star = 400.0 * np.exp(-((xx - 16) ** 2 + (yy - 16) ** 2) / (2 * 1.5**2))
    sky = rng.normal(100.0, 5.0, (3, 32, 32)).astype(np.float32)
    sci, ref, diff = sky[0] + star * (1.0 if real else 0.5), sky[1] + star * 0.5, sky[2] - 100.0
    if real:
        diff = diff + 0.5 * star  # a point source on the difference
    else:
        diff = diff + 0.5 * np.roll(star, 2, axis=1) - 0.5 * np.roll(star, -2, axis=1)  # a dipole
    header = fits.Header({"CANDID": cand, "FRAME": frame, "IMAGE": frame, "MAG": 20.0, "SNR": 20.0})
    hdus = [fits.PrimaryHDU(header=header)]
    hdus += [fits.ImageHDU(np.asarray(d, np.float32), name=n) for n, d in zip(("SCI", "REF", "DIFF"), (sci, ref, diff))]
    fits.HDUList(hdus).writeto(path)


@pytest.fixture(scope="module")
def installed(tmp_path_factory, repo) -> Path:
    """A fresh venv holding a non-editable install of rbflow, built from a copy of the sources.

    The venv sees the dependencies of the running interpreter's environment through a ``.pth``
    line (not as a site dir, so that environment's editable rbflow is not loaded), and the install
    uses neither the network nor build isolation (``--no-deps --no-build-isolation``).
    """
    root = tmp_path_factory.mktemp("installed")
    src = root / "source"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, src / name)
    shutil.copytree(repo / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(site) / "_deps_of_the_test_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    proc = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--ignore-installed",
            "-q",
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=_clean_env(),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return venv


def _clean_env() -> dict[str, str]:
    """The environment without PYTHONPATH (which would put a source tree before the install)."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


@pytest.mark.workflow
def test_installed_package_loads_its_schemas_and_trains(installed, tmp_path):
    python, rbflow = installed / "bin" / "python", installed / "bin" / "rbflow"
    probe = (
        "import rbflow, rbflow.config as c, rbflow.infer as i; print(rbflow.__file__); "
        "print(c.schema_defaults('config.schema.yaml', 'train')['epochs']); "
        "print(i.load_model(i.starter_model_path())[1]['provenance']['seed'], i.STARTER_DIR)"
    )
    proc = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=_clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    where, epochs, _, starter = proc.stdout.split()
    assert Path(where).is_relative_to(installed), f"rbflow was imported from {where}, not from the install"
    assert int(epochs) >= 1
    assert Path(starter).is_relative_to(installed), "the starter model does not ship with the package"
    assert all((Path(starter) / name).stat().st_size > 0 for name in ("model.onnx", "model.ood"))

    rng = np.random.default_rng(5)
    for label in ("true", "false"):
        (tmp_path / "stamps" / label).mkdir(parents=True)
        for k in range(60):
            frame = f"f{k % 6}"
            _stamp_file(
                tmp_path / "stamps" / label / f"{label}{k}.fits",
                real=label == "true",
                frame=frame,
                cand=f"{label}{k}",
                rng=rng,
            )
    for args in (
        ["import", "stamps", "cube.npz"],
        ["train", "cube.npz", "model", "--epochs", "2", "--device", "cpu", "--seed", "3"],
    ):
        proc = subprocess.run(
            [str(rbflow), *args], capture_output=True, text=True, cwd=tmp_path, env=_clean_env(), timeout=600
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("model.pt", "model.json", "model.onnx", "history.ecsv", "training.png"):
        assert (tmp_path / "model" / name).stat().st_size > 0, name
    metrics = json.loads((tmp_path / "model" / "metrics.json").read_text(), parse_constant=_refuse)
    assert metrics


def _refuse(name: str) -> None:
    raise AssertionError(f"metrics.json holds {name}: not strict JSON")


@pytest.mark.workflow
def test_installed_package_plans_the_workflow_in_a_checkout(installed, repo, tmp_path):
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    shutil.copy(repo / "Snakefile", checkout)
    for folder in ("workflow", "scripts", "config", "envs"):
        shutil.copytree(repo / folder, checkout / folder, ignore=shutil.ignore_patterns("__pycache__"))
    # no src/ in the checkout: the Snakefile and the scripts import the installed rbflow
    proc = subprocess.run(
        [str(installed / "bin" / "python"), "-m", "snakemake", "-n", "--quiet", "rules"],
        capture_output=True,
        text=True,
        cwd=checkout,
        env=_clean_env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    for rule in ("sky_frame", "psf", "inject", "subtract", "label", "datacube", "train_model", "infer_image"):
        assert any(line.split()[:1] == [rule] for line in out.splitlines()), (rule, out[-2000:])
