"""Alert throughput, end to end and per stage, on the ZTF development packets (prints; not a test).

Usage: ``python bench/alerts.py [--n 10000] [--model MODEL.pt] [--threads 1] [--repeats 3] [--codec null] [--workers 2]``

The 86 development packets (``../shared/data/ztf-alerts-dev``) are repeated into one multi-alert Avro
file of ``--n`` alerts in a temporary folder. Every figure is CPU time per alert (``time.process_time``:
all threads of this process, best of ``--repeats`` after a warm-up), which other load on a shared
machine inflates far less than wall-clock time, next to a peer run in the same process:

* ``end to end``: :func:`rbflow.alerts.score_alerts` (read the Avro file, decode three gzip-FITS
  cutouts per alert, place, crop to the model's stamp size, normalise, infer, write the table) with
  each inference engine, with ``workers`` 1 (decoding in a thread beside inference) and ``--workers``
  (default 2: decoding processes, inference in the parent). CPU time there is the parent's and its
  worker processes' (``resource.getrusage``, RUSAGE_SELF + RUSAGE_CHILDREN), start-up of the workers
  included (printed apart: a fixed cost per call); the wall-clock rates of both are printed side by
  side, with their ratio, and the load average (a loaded machine makes wall clock noise);
* per stage: Avro records (the fields rbflow reads by :func:`rbflow.avro.compile_decoder`, peer
  ``fastavro.schemaless_reader`` with the same projection; fastavro's file reader with the projection
  and with all fields), inflating the cutouts (ISA-L,
  peer zlib), parsing them (:func:`rbflow.alerts.read_fits_image`, peer ``astropy.io.fits``), all of
  reading (:func:`rbflow.alerts.iter_alerts`), normalisation (:func:`rbflow.datacube.normalise`, peer
  the same definition with ``numpy.nanmedian``) and inference (torch, ONNX Runtime).

The rate on two cores is ``2 x 1000 / (end-to-end CPU-ms per alert)``: what two cores give when the
pipeline keeps both busy, which worker processes do (one process is bound by the GIL: decoding,
Avro and Python, runs beside inference but not beside itself; see the wall rates on an idle machine).
A further stage reads the same alerts as single-alert files in a ``.tar.gz`` (ZTF's nightly archives).

Without ``--model``, an untrained ``compact`` network of 31 px (the demo telescope's stamp size) is
used, with its ONNX export: inference cost does not depend on the weights.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import resource
import tarfile
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import fastavro
import numpy as np
import torch
from astropy.io import fits
from astropy.utils.exceptions import AstropyWarning
from isal import isal_zlib

from rbflow.alerts import iter_alerts, read_fits_image, score_alerts
from rbflow.avro import blocks, codec_of, compile_decoder, read_header
from rbflow.datacube import NORMALISATION, crop_stamps, normalise
from rbflow.infer import load_model, predict
from rbflow.model import ModelConfig, build_model
from rbflow.train import export_onnx

DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ztf-alerts-dev"
CUTOUTS = ("cutoutScience", "cutoutTemplate", "cutoutDifference")
READ_FIELDS = {"schemavsn", "objectId", "candid", "candidate", *CUTOUTS}


def cpu_ms(func: Callable[[], object], n: int, repeats: int) -> float:
    """CPU milliseconds (all threads) per item of ``func`` (``n`` items), best of ``repeats`` after a warm-up."""
    func()
    times = []
    for _ in range(repeats):
        t = time.process_time()
        func()
        times.append(time.process_time() - t)
    return 1e3 * min(times) / n


def cpu_wall(func: Callable[[], object]) -> tuple[float, float, float]:
    """CPU time (s) of ``func`` in this process and its waited-for children, of it the children's, wall time (s)."""

    def used() -> tuple[float, float]:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime

    (me0, kids0), t = used(), time.perf_counter()
    func()
    wall = time.perf_counter() - t
    me1, kids1 = used()
    return me1 - me0 + kids1 - kids0, kids1 - kids0, wall


def spawn_workers(n: int) -> None:
    """Start and stop ``n`` worker processes as score_alerts does (spawn, rbflow.alerts imported in each)."""
    import multiprocessing
    import sys
    import types

    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        # each worker imports what it decodes with, as score_alerts's do
        pool = multiprocessing.get_context("spawn").Pool(
            n, initializer=importlib.import_module, initargs=("rbflow.alerts",)
        )
    finally:
        sys.modules["__main__"] = main
    pool.map(abs, range(n))  # every worker started and ready
    pool.close()
    pool.join()


def single_alert_archive(n: int, out: Path) -> Path:
    """A ``.tar.gz`` of ``n`` single-alert Avro files (the development packets repeated), as ZTF's nightly archives."""
    files = sorted(DEV.glob("*.avro"))
    with tarfile.open(out, "w:gz", compresslevel=1) as tar:
        for i in range(n):
            f = files[i % len(files)]
            tar.add(f, arcname=f"night/{i:06d}_{f.name}")
    return out


def untrained_model(folder: Path, *, stamp_size: int, seed: int = 0) -> Path:
    """Write ``model.pt`` + ``model.json`` + ``model.onnx`` of an untrained compact network (for timing only)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(stamp_size=stamp_size)
    folder.mkdir(parents=True, exist_ok=True)
    model = build_model(cfg).eval()
    torch.save(model.state_dict(), folder / "model.pt")
    export_onnx(model, 1.0, (3, stamp_size, stamp_size), folder / "model.onnx")
    meta = {
        "model": cfg.to_dict(),
        "channels": ["SCI", "REF", "DIFF"],
        "stamp_size": stamp_size,
        "cutout_size": stamp_size,
        "normalisation": NORMALISATION,
        "temperature": 1.0,
        "threshold": 0.5,
    }
    (folder / "model.json").write_text(json.dumps(meta))
    return folder / "model.pt"


def multiply_packets(n: int, out: Path, *, codec: str) -> Path:
    """One Avro file of ``n`` alerts: the development packets repeated (same schema)."""
    files = sorted(DEV.glob("*.avro"))
    with open(files[0], "rb") as fh:
        schema = fastavro.reader(fh).writer_schema
    records = []
    for f in files:
        with open(f, "rb") as fh:
            records += list(fastavro.reader(fh))
    with open(out, "wb") as fh:
        fastavro.writer(fh, fastavro.parse_schema(schema), (records[i % len(records)] for i in range(n)), codec=codec)
    return out


def avro_blocks(data: bytes) -> list[tuple[int, bytes]]:
    """(record count, records) of every block of an Avro file, decompressed."""
    meta, sync, pos = read_header(data)
    return list(blocks(data, pos, sync, codec=codec_of(meta)))


def nanmedian_normalise(x: np.ndarray) -> np.ndarray:
    """The normalisation with numpy.nanmedian (rbflow's before 2026-12; the peer of normalise)."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(x, axis=(-2, -1), keepdims=True)
        mad = np.nanmedian(np.abs(x - med), axis=(-2, -1), keepdims=True)
        scale = np.maximum(NORMALISATION["mad_factor"] * np.nan_to_num(mad), NORMALISATION["scale_floor"])
        out = np.clip((x - med) / scale, -NORMALISATION["clip"], NORMALISATION["clip"])
    return np.nan_to_num(out, nan=0.0).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10000, help="alerts in the timed file")
    parser.add_argument("--model", type=Path, default=None, help="model.pt (default: untrained compact, 31 px)")
    parser.add_argument("--threads", type=int, default=1, help="inference threads (decoding takes one more)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (best kept)")
    parser.add_argument("--codec", choices=["null", "deflate", "snappy"], default="null", help="Avro codec")
    parser.add_argument("--workers", type=int, default=2, help="decoding processes of the second end-to-end run")
    args = parser.parse_args()
    if not DEV.is_dir():
        raise SystemExit(f"development packets not found at {DEV}")
    torch.set_num_threads(args.threads)
    rows: list[tuple[str, float, str, float | None]] = []  # stage, CPU-ms/alert, peer, peer CPU-ms/alert
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        n = args.n
        avro = multiply_packets(n, tmp / "alerts.avro", codec=args.codec)
        model_path = args.model or untrained_model(tmp / "model", stamp_size=31)
        model, meta = load_model(model_path)
        stamp = int(meta["stamp_size"])
        engines = ["torch", "onnx"] if model_path.with_name("model.onnx").exists() else ["torch"]
        print(
            f"{n} alerts ({avro.stat().st_size / 2**20:.0f} MiB, codec {args.codec}), model {stamp} px, "
            f"{args.threads} inference thread(s); decoding: 1 thread (workers 1) or {args.workers} processes"
        )
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the start", flush=True)
        e2e: dict[tuple[str, int], tuple[float, float, float]] = {}  # CPU s, of it the workers', wall s
        for engine in engines:
            for workers in (1, args.workers):

                def run(engine: str = engine, workers: int = workers) -> None:
                    score_alerts(
                        [avro], model_path, tmp / "out.ecsv", progress=False, threads=args.threads, engine=engine,
                        workers=workers,
                    )  # fmt: skip

                if workers == 1:
                    run()  # warm-up
                e2e[engine, workers] = min((cpu_wall(run) for _ in range(args.repeats)), key=lambda r: r[0])
        startup, _, startup_wall = cpu_wall(lambda: spawn_workers(args.workers))  # of starting the workers

        data = avro.read_bytes()

        def full_read() -> None:
            for _ in fastavro.reader(io.BytesIO(data)):
                pass

        schema = fastavro.reader(io.BytesIO(data)).writer_schema
        reader_schema = fastavro.parse_schema(
            {**schema, "fields": [f for f in schema["fields"] if f["name"] in READ_FIELDS]}
        )

        def fields_read() -> None:
            for _ in fastavro.reader(io.BytesIO(data), reader_schema=reader_schema):
                pass

        decode = compile_decoder(fastavro.parse_schema(schema), reader_schema)
        if decode is None:
            raise SystemExit("the packets' schema does not compile (rbflow.avro.compile_decoder)")
        records = [(count, block) for count, block in avro_blocks(data)]

        def compiled_read() -> None:
            for count, block in records:
                at = 0
                for _ in range(count):
                    _, at = decode(block, at)

        def fastavro_read() -> None:
            for count, block in records:
                stream = io.BytesIO(block)
                for _ in range(count):
                    fastavro.schemaless_reader(stream, schema, reader_schema)

        rows.append(
            (
                "Avro, fields rbflow reads",
                cpu_ms(compiled_read, n, args.repeats),
                "fastavro",
                cpu_ms(fastavro_read, n, 1),
            )
        )
        rows.append(
            ("  fastavro, same fields, files", cpu_ms(fields_read, n, 1), "all fields", cpu_ms(full_read, n, 1))
        )
        m = min(n, 2000)
        blobs = [r[c]["stampData"] for _, r in zip(range(m), fastavro.reader(io.BytesIO(data))) for c in CUTOUTS]
        raws = [isal_zlib.decompress(b, 31) for b in blobs]
        rows.append(
            (
                "inflate 3 cutouts (isal_zlib)",
                cpu_ms(lambda: [isal_zlib.decompress(b, 31) for b in blobs], m, args.repeats),
                "zlib",
                cpu_ms(lambda: [zlib.decompress(b, 31) for b in blobs], m, args.repeats),
            )
        )

        def astropy_decode() -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", AstropyWarning)  # ZTF's SIMPLE card is not right-aligned
                for r in raws:
                    with fits.open(io.BytesIO(r)) as hdul:
                        np.asarray(hdul[0].data, dtype=np.float32)

        rows.append(
            (
                "parse 3 FITS (read_fits_image)",
                cpu_ms(lambda: [read_fits_image(r) for r in raws], m, args.repeats),
                "astropy.io.fits",
                cpu_ms(astropy_decode, m, 1),
            )
        )

        def read_decode() -> None:
            for _ in iter_alerts([avro], failures=[]):
                pass

        rows.append(("all of reading (iter_alerts)", cpu_ms(read_decode, n, args.repeats), "", None))
        night = single_alert_archive(min(n, 2000), tmp / "night.tar.gz")

        def read_night() -> None:
            for _ in iter_alerts([night], failures=[]):
                pass

        rows.append(("  same, single-alert files .tar.gz", cpu_ms(read_night, min(n, 2000), args.repeats), "", None))
        X = crop_stamps(np.stack([a.stamps for _, a in zip(range(4096), iter_alerts([avro], failures=[]))]), stamp)
        rows.append(
            (
                "normalise",
                cpu_ms(lambda: normalise(X), len(X), args.repeats),
                "np.nanmedian",
                cpu_ms(lambda: nanmedian_normalise(X), len(X), args.repeats),
            )
        )
        Xn = normalise(X)
        onnx_ms = None
        if "onnx" in engines:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
            session = ort.InferenceSession(str(model_path.with_name("model.onnx")), options)

            def onnx_run() -> None:
                for i in range(0, len(Xn), 256):
                    session.run(["p_real"], {"x": Xn[i : i + 256]})

            onnx_ms = cpu_ms(onnx_run, len(Xn), args.repeats)
        rows.append(
            (
                "inference (torch, batch 256)",
                cpu_ms(lambda: predict(model, meta, Xn, batch_size=256), len(Xn), args.repeats),
                "ONNX Runtime",
                onnx_ms,
            )  # fmt: skip
        )
    print(f"{'stage':<32} {'CPU-ms/alert':>12}   {'peer':<16} {'CPU-ms/alert':>12}")
    for stage, ms, peer, peer_ms in rows:
        print(f"{stage:<32} {ms:12.3f}   {peer:<16} {'' if peer_ms is None else f'{peer_ms:12.3f}'}")
    for engine in engines:
        ms1, _, wall1 = (1e3 * e2e[engine, 1][0] / n, 0.0, e2e[engine, 1][2])
        msw, ms_children, wallw = (1e3 * e2e[engine, args.workers][0] / n, 1e3 * e2e[engine, args.workers][1] / n,
                                   e2e[engine, args.workers][2])  # fmt: skip
        print(
            f"end to end, engine {engine:<5} workers 1: {ms1:.3f} CPU-ms per alert -> {2e3 / ms1:,.0f} alerts/s on two "
            f"cores kept busy ({1e7 * ms1 / 2e3 / 3600:.2f} h for a 10-million-alert night); wall {n / wall1:,.0f} alerts/s"
        )
        print(
            f"end to end, engine {engine:<5} workers {args.workers}: {msw:.3f} CPU-ms per alert ({ms_children:.3f} in the "
            f"workers, {1e3 * startup / n:.3f} of it their start-up) -> {2e3 / msw:,.0f} alerts/s on two cores kept busy; "
            f"wall {n / wallw:,.0f} alerts/s, {wall1 / wallw:.2f} x workers 1 ({n / max(wallw - startup_wall, 1e-9):,.0f} "
            f"alerts/s and {wall1 / max(wallw - startup_wall, 1e-9):.2f} x once the workers are up)"
        )
    print(
        f"starting {args.workers} worker processes: {startup:.2f} CPU-s in all, {startup_wall:.1f} s wall (a fixed cost per call; "
        f"{1e3 * startup / 1e7:.5f} ms per alert over a 10-million-alert night)"
    )
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the end")


if __name__ == "__main__":
    main()
