"""Command-line interface: ``rbflow convert``, ``rbflow import``, ``rbflow train`` and ``rbflow infer``.

The commands call the same library functions as the workflow's rules, so a model trained by the
workflow can be applied to any folder of cutouts by hand (the older tool's ``cnn_infer``)::

    rbflow infer results/demo/obs/cutouts/fld00_r_e1 --model results/demo/model/model.pt
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rbflow import __version__, alerts
from rbflow.errors import RbflowError

__all__ = ["main", "build_parser"]

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``rbflow`` command."""
    parser = argparse.ArgumentParser(prog="rbflow", description="Real/bogus CNN for image-subtraction candidates.")
    parser.add_argument("--version", action="version", version=f"rbflow {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    conv = sub.add_parser("convert", help="build a datacube from labelled cutouts (true/, false/)")
    conv.add_argument("training_dir", type=Path, help="folder holding true/ and false/ cutouts")
    conv.add_argument("out", type=Path, help="datacube to write (.npz)")
    conv.add_argument("--channels", nargs="+", default=["SCI", "REF", "DIFF"], help="channels, in order")
    conv.add_argument("--crop", type=int, default=None, help="odd stamp size to crop to (pixels)")
    conv.add_argument("--frac-true", type=float, default=None, help="fraction of trues after class balancing")
    conv.add_argument("--seed", type=int, default=0, help="seed of the class balancing")

    imp = sub.add_parser(
        "import", help="build a datacube from the older tool's or O'TRAIN's labelled stamps (true/, false/)"
    )
    imp.add_argument("folder", type=Path, help="folder holding true/ and false/ stamps (e.g. candidates_training)")
    imp.add_argument("out", type=Path, help="datacube to write (.npz)")
    imp.add_argument("--channels", nargs="+", default=None, help="channels, in order (default: those all stamps have)")
    imp.add_argument("--crop", type=int, default=None, help="odd stamp size to crop to (default: largest odd shared)")
    imp.add_argument("--frac-true", type=float, default=None, help="fraction of trues after class balancing")
    imp.add_argument("--seed", type=int, default=0, help="seed of the class balancing")

    tr = sub.add_parser("train", help="train, calibrate and evaluate a model on a datacube")
    tr.add_argument("cube", type=Path, help="datacube (.npz) from 'rbflow convert' or 'rbflow import'")
    tr.add_argument("outdir", type=Path, help="folder for model.pt, model.json, model.onnx, metrics, plots")
    tr.add_argument("--config", type=Path, default=None, help="YAML run config; its 'train' block is used")
    tr.add_argument("--architecture", default=None, help="model architecture (overrides the config)")
    tr.add_argument("--epochs", type=int, default=None, help="maximum epochs (overrides the config)")
    tr.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="device (overrides the config)")
    tr.add_argument("--seed", type=int, default=0, help="global seed")
    tr.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=None,
        help="resume checkpoints (default: OUTDIR.checkpoint next to OUTDIR)",
    )

    inf = sub.add_parser("infer", help="classify a folder of cutouts (the older tool's cnn_infer)")
    inf.add_argument("cutout_dir", type=Path, help="folder of {id}.fits cutouts")
    inf.add_argument("--model", type=Path, required=True, help="model.pt (model.json next to it)")
    inf.add_argument("--threshold", type=float, default=None, help="P(real) threshold of the kept list")
    inf.add_argument(
        "--out",
        type=Path,
        default=Path("infer_results.ecsv"),
        help="output ECSV; FILE.dat (the older tool's infer_results.dat) and FILE_kept.ecsv are written next to it",
    )
    inf.add_argument("--batch-size", type=int, default=1024, help="stamps per forward pass")
    alerts.add_cli(sub)
    return parser


def _train_cfg(args: argparse.Namespace) -> dict:
    cfg: dict = {}
    if args.config is not None:
        from rbflow.config import load_yaml

        cfg = dict(load_yaml(args.config, "run config").get("train", {}))
    for key in ("architecture", "epochs", "device"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    return cfg


def main(argv: list[str] | None = None) -> int:
    """Run the ``rbflow`` command; return the exit status (2 on bad input, with a one-line message).

    Parameters
    ----------
    argv : list of str, optional
        Arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        0 on success.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "convert":
            from rbflow.datacube import build_datacube

            build_datacube(
                args.training_dir,
                args.out,
                channels=args.channels,
                crop=args.crop,
                frac_true=args.frac_true,
                seed=args.seed,
            )
        elif args.command == "import":
            from rbflow.legacy import import_cutouts

            import_cutouts(
                args.folder,
                args.out,
                channels=args.channels,
                crop=args.crop,
                frac_true=args.frac_true,
                seed=args.seed,
            )
        elif args.command == "train":
            from rbflow.train import train

            ckpt = args.checkpoint_dir or args.outdir.with_name(args.outdir.name + ".checkpoint")
            train(args.cube, args.outdir, _train_cfg(args), seed=args.seed, checkpoint_dir=ckpt)
        elif args.command == "alerts":
            alerts.run_cli(args)
        else:
            from rbflow.infer import infer_cutouts

            out = args.out
            infer_cutouts(
                args.cutout_dir,
                args.model,
                out,
                out_dat=out.with_suffix(".dat"),
                out_kept=out.with_name(out.stem + "_kept.ecsv"),
                threshold=args.threshold,
                batch_size=args.batch_size,
            )
    except RbflowError as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
