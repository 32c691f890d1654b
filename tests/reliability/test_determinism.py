"""Determinism: the same config and seed give byte-identical outputs, model weights included (CPU).

Here the training twice, checkpoint included. The whole tiny workflow run a second time, in a fresh
working directory, is ``tests/reliability/test_interrupt.py``: interrupted three ways and resumed,
it must end with the SHA-256 of every file under ``results/`` and ``resources/`` equal to the shared
run ``tiny_run`` (tests/conftest.py), the training checkpoint compared by value
(``reliability_runs.EXCLUDED`` lists what is left out and why: nothing at present; ``logs/`` and
``benchmarks/`` hold times and are not compared). A second uninterrupted run took 2.5 min of CI and
showed nothing that one did not.
"""

from __future__ import annotations

from helpers import make_cube

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
