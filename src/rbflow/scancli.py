"""The ``rbflow scan`` and ``rbflow label-repair`` subcommands (registered by :mod:`rbflow.cli`)."""

from __future__ import annotations

import argparse
import getpass
from pathlib import Path

__all__ = ["add_commands"]


def _scan(args: argparse.Namespace) -> None:
    from rbflow.scan import serve

    serve(args.results_dir, port=args.port, user=args.user, model_path=args.model, seed=args.seed)


def _label_repair(args: argparse.Namespace) -> None:
    from rbflow.config import load_yaml
    from rbflow.labelrepair import run_label_repair

    cfg = dict(load_yaml(args.config, "run config").get("train", {})) if args.config is not None else {}
    if args.epochs is not None:
        cfg["epochs"] = args.epochs
    run_label_repair(args.cube, args.outdir, cfg, folds=args.folds, seed=args.seed, mode=args.mode)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``scan`` and ``label-repair`` to the subcommands of the ``rbflow`` parser.

    Each sets ``handler``, a function of the parsed arguments that :func:`rbflow.cli.main` calls.

    Parameters
    ----------
    sub : argparse._SubParsersAction
        The ``add_subparsers`` object of the ``rbflow`` parser.
    """
    scan = sub.add_parser("scan", help="label candidates on a local web page (http://127.0.0.1:PORT/)")
    scan.add_argument("results_dir", type=Path, help="results folder of a run (results/<telescope>, with training/)")
    scan.add_argument("--port", type=int, default=8765, help="TCP port on 127.0.0.1 (0: any free port)")
    scan.add_argument("--user", default=getpass.getuser(), help="name recorded with each decision")
    scan.add_argument("--model", type=Path, default=None, help="model.pt (default: RESULTS_DIR/model/model.pt)")
    scan.add_argument("--seed", type=int, default=0, help="seed of the MC-dropout masks and OOD reference")
    scan.set_defaults(handler=_scan)

    rep = sub.add_parser("label-repair", help="find likely label errors (out-of-fold) and write a repaired datacube")
    rep.add_argument("cube", type=Path, help="datacube (.npz)")
    rep.add_argument(
        "outdir", type=Path, help="folder for label_issues.ecsv and datacube_repaired.npz (RESULTS_DIR/labelrepair)"
    )
    rep.add_argument("--config", type=Path, default=None, help="YAML run config; its 'train' block is used")
    rep.add_argument("--epochs", type=int, default=None, help="maximum epochs per fold (overrides the config)")
    rep.add_argument("--folds", type=int, default=5, help="number of frame groups")
    rep.add_argument("--mode", choices=["drop", "flip"], default="drop", help="what the repaired cube does to them")
    rep.add_argument("--seed", type=int, default=0, help="seed of the folds and trainings")
    rep.set_defaults(handler=_label_repair)
