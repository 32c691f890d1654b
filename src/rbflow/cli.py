"""Command-line interface: ``rbflow`` and its commands.

``convert``, ``import``, ``train``, ``infer``, ``alerts``, ``scan``, ``label-repair`` and ``psf-halo``.

The commands call the same library functions as the workflow's rules, so a model trained by the
workflow can be applied to any folder of cutouts by hand (the older tool's ``cnn_infer``)::

    rbflow infer results/demo/obs/cutouts/fld00_r_e1 --model results/demo/model/model.pt

Without ``--model``, ``infer`` uses rbflow's starter model (:func:`rbflow.infer.starter_model_path`);
``train --init starter`` fine-tunes it.

Defaults come from ``config.schema.yaml`` (:func:`rbflow.config.schema_defaults`), as in the workflow.
Each command is a subparser made by an ``_add_<command>`` function, whose ``func`` default is the
function that runs it; heavy modules (torch, matplotlib) are imported only there.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from rbflow import __version__
from rbflow.errors import RbflowError

__all__ = ["main", "build_parser"]

log = logging.getLogger(__name__)


def _add_convert(sub: Any, defaults: dict[str, Any]) -> None:
    conv = sub.add_parser("convert", help="build a datacube from labelled cutouts (true/, false/)")
    conv.add_argument("training_dir", type=Path, help="folder holding true/ and false/ cutouts")
    conv.add_argument("out", type=Path, help="datacube to write (.npz)")
    conv.add_argument("--channels", nargs="+", default=defaults["convert"]["channels"], help="channels, in order")
    conv.add_argument(
        "--crop", type=int, default=defaults["convert"]["crop"], help="odd stamp size to crop to (pixels)"
    )
    conv.add_argument(
        "--frac-true", type=float, default=defaults["convert"]["frac_true"], help="fraction of trues after balancing"
    )
    conv.add_argument("--seed", type=int, default=defaults["seed"], help="seed of the class balancing")
    conv.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> None:
    from rbflow.datacube import build_datacube

    build_datacube(
        args.training_dir, args.out, channels=args.channels, crop=args.crop, frac_true=args.frac_true, seed=args.seed
    )


def _add_import(sub: Any, defaults: dict[str, Any]) -> None:
    imp = sub.add_parser(
        "import", help="build a datacube from the older tool's or O'TRAIN's labelled stamps (true/, false/)"
    )
    imp.add_argument("folder", type=Path, help="folder holding true/ and false/ stamps (e.g. candidates_training)")
    imp.add_argument("out", type=Path, help="datacube to write (.npz)")
    imp.add_argument("--channels", nargs="+", default=None, help="channels, in order (default: those all stamps have)")
    imp.add_argument("--crop", type=int, default=None, help="odd stamp size to crop to (default: largest odd shared)")
    imp.add_argument(
        "--frac-true", type=float, default=defaults["convert"]["frac_true"], help="fraction of trues after balancing"
    )
    imp.add_argument("--seed", type=int, default=defaults["seed"], help="seed of the class balancing")
    imp.set_defaults(func=_run_import)


def _run_import(args: argparse.Namespace) -> None:
    from rbflow.legacy import import_cutouts

    import_cutouts(
        args.folder, args.out, channels=args.channels, crop=args.crop, frac_true=args.frac_true, seed=args.seed
    )


def _add_train(sub: Any, defaults: dict[str, Any]) -> None:
    tr = sub.add_parser("train", help="train (or fine-tune), calibrate and evaluate a model on a datacube")
    tr.add_argument("cube", type=Path, help="datacube (.npz) from 'rbflow convert' or 'rbflow import'")
    tr.add_argument("outdir", type=Path, help="folder for model.pt, model.json, model.onnx, metrics, plots")
    tr.add_argument("--config", type=Path, default=None, help="YAML run config; its 'train' block and 'seed' are used")
    tr.add_argument(
        "--architecture", default=None, help=f"model architecture (default {defaults['train']['architecture']!r})"
    )
    tr.add_argument("--epochs", type=int, default=None, help=f"maximum epochs (default {defaults['train']['epochs']})")
    tr.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default=None,
        help=f"device (default {defaults['train']['device']!r})",
    )
    tr.add_argument(
        "--seed", type=int, default=None, help=f"global seed (default: the config's 'seed', else {defaults['seed']})"
    )
    tr.add_argument(
        "--init",
        default=None,
        metavar="MODEL",
        help="fine-tune: start from this model (folder or model.pt, with model.json beside it; 'starter': "
        "rbflow's starter model, ./starter for a folder of that name)",
    )
    tr.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=None,
        help="resume checkpoints (default: OUTDIR.checkpoint next to OUTDIR)",
    )
    tr.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> None:
    from rbflow.config import schema_defaults
    from rbflow.train import train

    config: dict[str, Any] = {}
    if args.config is not None:
        from rbflow.config import load_yaml

        config = load_yaml(args.config, "run config")
    cfg = dict(config.get("train", {}))
    for key in ("architecture", "epochs", "device"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    seed = (
        args.seed if args.seed is not None else int(config.get("seed", schema_defaults("config.schema.yaml")["seed"]))
    )
    ckpt = args.checkpoint_dir or args.outdir.with_name(args.outdir.name + ".checkpoint")
    init = None
    if args.init is not None:
        from rbflow.infer import resolve_model

        init = resolve_model(args.init)
    train(args.cube, args.outdir, cfg, seed=seed, checkpoint_dir=ckpt, init=init)


def _add_infer(sub: Any, defaults: dict[str, Any]) -> None:
    inf = sub.add_parser("infer", help="classify a folder of cutouts (the older tool's cnn_infer)")
    inf.add_argument("cutout_dir", type=Path, help="folder of {id}.fits cutouts")
    inf.add_argument(
        "--model",
        type=Path,
        default=None,
        help="model.pt (model.json next to it) or its folder (default: rbflow's starter model)",
    )
    inf.add_argument(
        "--threshold",
        type=float,
        default=defaults["infer"]["threshold"],
        help="P(real) threshold of the kept list (default: the model's)",
    )
    inf.add_argument(
        "--out",
        type=Path,
        default=Path("infer_results.ecsv"),
        help="output ECSV; FILE.dat (the older tool's infer_results.dat) and FILE_kept.ecsv are written next to it",
    )
    inf.add_argument("--batch-size", type=int, default=1024, help="stamps per forward pass")
    inf.set_defaults(func=_run_infer)


def _run_infer(args: argparse.Namespace) -> None:
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


def _add_alerts(sub: Any, defaults: dict[str, Any]) -> None:
    alerts = sub.add_parser("alerts", help="score survey alert packets (ZTF, Rubin) or build a datacube from them")
    act = alerts.add_subparsers(dest="alerts_command", required=True, metavar="ACTION")
    sc = act.add_parser("score", help="P(real) of every alert; table and, optionally, the kept packets")
    sc.add_argument("paths", nargs="+", type=Path, help="Avro files, .tar.gz archives, Parquet files or folders")
    sc.add_argument(
        "--model", default=None, help="model.pt (model.json next to it), or 'starter'; default: the starter model"
    )
    sc.add_argument("--out", type=Path, default=Path("alerts.ecsv"), help="output table (ECSV)")
    sc.add_argument("--kept-dir", type=Path, default=None, help="folder receiving the kept packets, unchanged")
    sc.add_argument("--threshold", type=float, default=None, help="P(real) threshold (default: the model's)")
    sc.add_argument("--negative", default="flip", help="negative differences (isdiffpos f): flip, keep or skip")
    sc.add_argument("--batch-size", type=int, default=256, help="alerts per forward pass")
    sc.add_argument(
        "--engine",
        choices=("auto", "onnx", "torch"),
        default="auto",
        help="inference runtime: ONNX Runtime when model.onnx and onnxruntime are there (auto), or forced",
    )
    sc.add_argument("--threads", type=int, default=None, help="CPU threads of inference (default: the runtime's)")
    sc.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes decoding the packets beside inference (default: the CPU cores this job may use; 1: a thread)",
    )
    sc.set_defaults(func=_run_alerts_score)
    im = act.add_parser("import", help="build a datacube (.npz) from labelled alert packets, grouped by objectId")
    im.add_argument("paths", nargs="+", type=Path, help="Avro files, .tar.gz archives, Parquet files or folders")
    im.add_argument("--out", type=Path, required=True, help="datacube to write (.npz)")
    im.add_argument("--labels", type=Path, default=None, help="CSV with columns candid, label")
    im.add_argument("--score-column", default=None, help="weak labels from this score (drb, rb, reliability)")
    im.add_argument("--bogus-below", type=float, default=None, help="score below which an alert is bogus")
    im.add_argument("--real-above", type=float, default=None, help="score above which an alert is real")
    im.add_argument("--crop", type=int, default=None, help="odd stamp size to crop to (pixels)")
    im.add_argument("--negative", default="flip", help="negative differences (isdiffpos f): flip, keep or skip")
    im.set_defaults(func=_run_alerts_import)


def _run_alerts_score(args: argparse.Namespace) -> None:
    from rbflow.alerts import score_alerts
    from rbflow.infer import resolve_model

    score_alerts(
        args.paths,
        resolve_model(args.model),
        args.out,
        kept_dir=args.kept_dir,
        threshold=args.threshold,
        negative=args.negative,
        batch_size=args.batch_size,
        engine=args.engine,
        threads=args.threads,
        workers=_cores() if args.workers is None else args.workers,
    )


def _cores() -> int:
    """CPU cores this process may run on (its affinity: a batch job's allocation, not the node's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _run_alerts_import(args: argparse.Namespace) -> None:
    from rbflow.alerts import import_alerts

    import_alerts(
        args.paths,
        args.out,
        labels_csv=args.labels,
        score_column=args.score_column,
        bogus_below=args.bogus_below,
        real_above=args.real_above,
        crop=args.crop,
        negative=args.negative,
    )


def _add_scan(sub: Any, defaults: dict[str, Any]) -> None:
    import getpass

    scan = sub.add_parser("scan", help="label candidates on a local web page (http://127.0.0.1:PORT/)")
    scan.add_argument("results_dir", type=Path, help="results folder of a run (results/<telescope>, with training/)")
    scan.add_argument("--port", type=int, default=8765, help="TCP port on 127.0.0.1 (0: any free port)")
    scan.add_argument("--user", default=getpass.getuser(), help="name recorded with each decision")
    scan.add_argument("--model", type=Path, default=None, help="model.pt (default: RESULTS_DIR/model/model.pt)")
    scan.add_argument("--seed", type=int, default=0, help="seed of the MC-dropout masks and OOD reference")
    scan.set_defaults(func=_run_scan)


def _run_scan(args: argparse.Namespace) -> None:
    from rbflow.scan import serve

    serve(args.results_dir, port=args.port, user=args.user, model_path=args.model, seed=args.seed)


def _add_label_repair(sub: Any, defaults: dict[str, Any]) -> None:
    rep = sub.add_parser("label-repair", help="find likely label errors (out-of-fold) and write a repaired datacube")
    rep.add_argument("cube", type=Path, help="datacube (.npz)")
    rep.add_argument(
        "outdir", type=Path, help="folder for label_issues.ecsv and datacube_repaired.npz (RESULTS_DIR/labelrepair)"
    )
    rep.add_argument("--config", type=Path, default=None, help="YAML run config; its 'train' block is used")
    rep.add_argument("--epochs", type=int, default=None, help="maximum epochs per fold (overrides the config)")
    rep.add_argument("--folds", type=int, default=5, help="number of frame groups")
    rep.add_argument(
        "--mode",
        choices=["drop", "flip", "weight"],
        default="drop",
        help="what the repaired cube does to them (weight: kept, down-weighted in training by --weight)",
    )
    rep.add_argument("--weight", type=float, default=0.1, help="loss weight of the issues with --mode weight")
    rep.add_argument("--seed", type=int, default=defaults["seed"], help="seed of the folds and trainings")
    rep.set_defaults(func=_run_label_repair)


def _run_label_repair(args: argparse.Namespace) -> None:
    from rbflow.config import load_yaml
    from rbflow.labelrepair import run_label_repair

    cfg = dict(load_yaml(args.config, "run config").get("train", {})) if args.config is not None else {}
    if args.epochs is not None:
        cfg["epochs"] = args.epochs
    run_label_repair(args.cube, args.outdir, cfg, folds=args.folds, seed=args.seed, mode=args.mode, weight=args.weight)


def _add_psf_halo(sub: Any, defaults: dict[str, Any]) -> None:
    halo = sub.add_parser(
        "psf-halo", help="measure a telescope's PSF halo from many of its frames, for its psf.halo (few-star frames)"
    )
    halo.add_argument("telescope", type=Path, help="telescope file (config/telescopes/<name>.yaml)")
    halo.add_argument("frames", type=Path, nargs="+", help="frames of that telescope (FITS; the more the better)")
    halo.set_defaults(func=_run_psf_halo)


def _run_psf_halo(args: argparse.Namespace) -> None:
    from rbflow.config import load_telescope
    from rbflow.psf import measure_halo

    (fraction, ratio), table = measure_halo(args.frames, load_telescope(args.telescope))
    for col in ("fwhm", "beta", "fraction", "ratio"):
        table[col].format = ".3f"
    table.pprint_all()
    n = int(table["used"].sum())
    print(f"\nfrom {n} of {len(table)} frames; in {args.telescope}, under psf:\n  halo: [{fraction:.3f}, {ratio:.3f}]")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``rbflow`` command (defaults from ``config.schema.yaml``).

    Returns
    -------
    argparse.ArgumentParser
        Each subcommand sets ``func``, the function that runs it with the parsed arguments.
    """
    from rbflow.config import schema_defaults

    defaults = schema_defaults("config.schema.yaml")
    parser = argparse.ArgumentParser(prog="rbflow", description="Real/bogus CNN for image-subtraction candidates.")
    parser.add_argument("--version", action="version", version=f"rbflow {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _add_convert,
        _add_import,
        _add_train,
        _add_infer,
        _add_alerts,
        _add_scan,
        _add_label_repair,
        _add_psf_halo,
    ):
        add(sub, defaults)
    return parser


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
        args.func(args)
    except RbflowError as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
