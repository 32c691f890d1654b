"""Throughput and accuracy of the CNN architectures on synthetic stamps (prints; not a test).

Usage: ``python bench/cnn.py [--threads 2] [--n-train 10000] [--epochs 5] [--repeats 3] [--no-accuracy] [--starter]``

Throughputs are the best of ``--repeats`` runs (robust to other load on the machine):

* inference: stamps/s of ``rbflow.infer.predict`` (eval, no_grad, batch 1024) and of ONNX Runtime;
* training: stamps/s of optimisation steps (batch 256, augmentation included) -> time of
  50,000 stamps x 20 epochs;
* ``--starter``: the shipped starter model end to end on raw 63-px triplets
  (``rbflow.infer.score_triplets``: crop, normalisation, forward pass) and its forward pass alone,
  as ratios to the forward pass of a fresh ``compact`` model measured in the same run (its peer:
  the ratio does not depend on the machine's load) and to the 5,000 stamps/s floor;
* accuracy: each architecture trained by ``rbflow.train.train`` on the same harder synthetic set
  (reals of S/N 1-8), test ROC AUC and FNR at FPR = 1 %.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from rbflow.datacube import NORMALISATION, normalise
from rbflow.infer import load_model, predict, predict_onnx, score_triplets, starter_model_path
from rbflow.model import ARCHITECTURES, ModelConfig, build_model, count_parameters
from rbflow.train import dihedral, export_onnx, train

# the synthetic real/bogus stamps of the tests (tests/helpers.py; tests/ is not a package)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import synthetic_stamps  # noqa: E402


def _best_rate(func: Callable[[], object], n: int, repeats: int) -> float:
    """Items per second of ``func`` (``n`` items), best of ``repeats`` runs after a warm-up (robust to other load)."""
    func()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        func()
        times.append(time.perf_counter() - t)
    return n / min(times)


def _throughput(arch: str, widths: list[int], tmp: Path, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_model(ModelConfig(architecture=arch, widths=widths))
    X = normalise(synthetic_stamps(4096, seed=1)[0])
    meta = {"temperature": 1.0}
    infer = _best_rate(lambda: predict(model.eval(), meta, X), len(X), repeats)
    export_onnx(model.eval(), 1.0, X.shape[1:], tmp / f"{arch}.onnx")
    onnx = _best_rate(lambda: predict_onnx(tmp / f"{arch}.onnx", X), len(X), repeats)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(X[:256]), torch.from_numpy((np.arange(256) % 2).astype(np.float32))
    steps = 10

    def fit() -> None:
        for _ in range(steps):
            xb = dihedral(xt, torch.randint(0, 8, (256,)))
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(xb), yt)
            opt.zero_grad()
            loss.backward()
            opt.step()

    train_rate = _best_rate(fit, steps * 256, repeats)
    return {"parameters": count_parameters(model), "infer_per_s": infer, "onnx_per_s": onnx, "train_per_s": train_rate}


def _starter(repeats: int) -> dict[str, float]:
    """Stamps/s (wall) and stamps per CPU-second of the three, best of ``repeats`` interleaved rounds."""
    raw = synthetic_stamps(4096, size=63, seed=2)[0]
    model, meta = load_model(starter_model_path())
    X = normalise(raw[..., 16:47, 16:47])
    torch.manual_seed(0)
    peer = build_model(ModelConfig()).eval()
    runs = {
        "peer": lambda: predict(peer, {"temperature": 1.0}, X),
        "forward": lambda: predict(model, meta, X),
        "triplets": lambda: score_triplets((model, meta), *raw.transpose(1, 0, 2, 3)),
    }
    wall = {k: [] for k in runs}
    cpu = {k: [] for k in runs}
    for func in runs.values():
        func()  # warm-up
    for _ in range(repeats):  # interleaved: a burst of load on the machine hits the three alike
        for key, func in runs.items():
            t, c = time.perf_counter(), time.process_time()
            func()
            wall[key].append(time.perf_counter() - t)
            cpu[key].append(time.process_time() - c)
    out = {f"{k}_per_s": len(X) / min(v) for k, v in wall.items()}
    out.update({f"{k}_per_cpu_s": len(X) / min(v) for k, v in cpu.items()})
    return out


def _accuracy(arch: str, widths: list[int], n: int, epochs: int, tmp: Path) -> dict[str, float]:
    X, y = synthetic_stamps(n, snr=(1.0, 8.0), seed=123)
    frames = np.array([f"f{i % 20:02d}" for i in range(n)])
    meta = {
        "cutout_size": 31,
        "stamp_size": 31,
        "crop": None,
        "channels": ["SCI", "REF", "DIFF"],
        "normalisation": NORMALISATION,
    }
    cube = tmp / "cube.npz"
    if not cube.exists():
        np.savez(
            cube,
            X=normalise(X),
            y=y,
            ids=frames,
            image=frames,
            frame=frames,
            mag=np.full(n, np.nan),
            snr=np.full(n, 10.0),
            channels=np.array(meta["channels"]),
            meta=np.asarray(json.dumps(meta)),
        )
    cfg = {"architecture": arch, "widths": widths, "epochs": epochs, "device": "cpu"}
    t = time.perf_counter()
    out = train(cube, tmp / f"model_{arch}", cfg, seed=1, checkpoint_dir=tmp / f"ckpt_{arch}")
    test = out["metrics"]["test"]
    return {
        "train_s": time.perf_counter() - t,
        "auc": test["roc_auc"]["value"],
        "fnr_at_fpr1": test["fnr_at_fpr1"]["value"],
        "accuracy": test["accuracy"]["value"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-train", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--repeats", type=int, default=3, help="throughput: best of this many runs")
    parser.add_argument("--no-accuracy", action="store_true", help="throughput only (skip the training runs)")
    parser.add_argument("--starter", action="store_true", help="the starter model's throughput only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    if args.starter:
        r = _starter(args.repeats)
        print(
            f"starter: score_triplets (63 px raw) {r['triplets_per_s']:7.0f}/s ({r['triplets_per_cpu_s']:7.0f} per "
            f"CPU-s), forward {r['forward_per_s']:7.0f}/s ({r['forward_per_cpu_s']:7.0f}); fresh compact peer "
            f"{r['peer_per_s']:7.0f}/s ({r['peer_per_cpu_s']:7.0f}) | ratios to the peer (wall, CPU): score_triplets "
            f"{r['triplets_per_s'] / r['peer_per_s']:.2f}, {r['triplets_per_cpu_s'] / r['peer_per_cpu_s']:.2f}; "
            f"forward {r['forward_per_s'] / r['peer_per_s']:.2f}, {r['forward_per_cpu_s'] / r['peer_per_cpu_s']:.2f}"
        )
        return
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for arch in sorted(ARCHITECTURES):
            r = _throughput(arch, args.widths, tmp, args.repeats)
            print(
                f"{arch:8s} params {r['parameters']:7d} | inference torch {r['infer_per_s']:7.0f}/s, onnx "
                f"{r['onnx_per_s']:7.0f}/s | training {r['train_per_s']:6.0f}/s -> 50k x 20 epochs "
                f"{50000 * 20 / r['train_per_s'] / 60:5.1f} min"
            )
        for arch in [] if args.no_accuracy else sorted(ARCHITECTURES):
            a = _accuracy(arch, args.widths, args.n_train, args.epochs, tmp)
            print(
                f"{arch:8s} {args.n_train} stamps (S/N 1-8) x {args.epochs} epochs: {a['train_s']:6.1f} s | "
                f"test AUC {a['auc']:.4f}, FNR@FPR1% {a['fnr_at_fpr1']:.3f}, accuracy {a['accuracy']:.3f}"
            )


if __name__ == "__main__":
    main()
