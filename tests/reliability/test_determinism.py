"""Determinism: the same config and seed give byte-identical outputs, model weights included (CPU).

The workflow test runs the tiny telescope a second time in a fresh working directory and compares
the SHA-256 of every file under ``results/`` and ``resources/`` with the shared run ``tiny_run``
(tests/conftest.py); ``reliability_runs.EXCLUDED`` lists what is left out and why (nothing under
those folders at present; ``logs/`` and ``benchmarks/`` hold times and are not compared).
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_cube, make_workdir
from reliability_runs import assert_same_outputs, output_hashes, run_tiny

from rbflow.train import train


def test_training_twice_writes_identical_bytes(tmp_path):
    cube = make_cube(tmp_path / "cube.npz", 240, seed=5, n_frames=6)
    cfg = {"widths": [4, 8, 8], "epochs": 2, "batch_size": 64, "patience": 3, "device": "cpu"}
    for run in ("a", "b"):
        train(cube, tmp_path / run / "model", cfg, seed=3, checkpoint_dir=tmp_path / run / "ckpt")
    names = [
        "model/model.pt",
        "model/model.json",
        "model/model.onnx",
        "model/history.ecsv",
        "model/metrics.json",
        "model/training.png",
        "ckpt/checkpoint.pt",
    ]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


@pytest.mark.workflow
def test_two_runs_of_the_tiny_workflow_give_identical_outputs(tiny_run, tmp_path):
    work = make_workdir(tmp_path / "work")
    proc = run_tiny(work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    want, got = output_hashes(tiny_run), output_hashes(work)
    assert "results/tiny/model/model.pt" in want and len(want) > 1000
    assert_same_outputs(got, want)
    a = torch.load(tiny_run / "results/tiny/model/model.pt", weights_only=True)
    b = torch.load(work / "results/tiny/model/model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
