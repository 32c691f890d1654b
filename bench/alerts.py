"""Alert throughput, end to end and per stage, on the ZTF development packets (prints; not a test).

Usage: ``python bench/alerts.py [--n 10000] [--model MODEL.pt] [--threads 2] [--repeats 3] [--codec null]``

The 86 development packets (``../shared/data/ztf-alerts-dev``) are repeated into one multi-alert Avro
file of ``--n`` alerts in a temporary folder. Printed, in alerts/s (best of ``--repeats``, robust to
other load on the machine):

* ``end to end``: :func:`rbflow.alerts.score_alerts` (read the Avro file, decode three gzip-FITS
  cutouts per alert, place, crop to the model's stamp size, normalise, infer, write the table), and
  its CPU time per alert (all threads: a measure that other load on a shared machine inflates less);
* per stage: Avro records (all fields: fastavro; the fields rbflow uses: rbflow's projection), cutout
  decoding (:func:`rbflow.alerts.read_fits_image` and its peer, ``astropy.io.fits`` on the
  decompressed bytes), normalisation (:func:`rbflow.datacube.normalise`) and inference
  (:func:`rbflow.infer.predict`).

Without ``--model``, an untrained ``compact`` network of 31 px (the demo telescope's stamp size) is
used: inference cost does not depend on the weights.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import fastavro
import numpy as np
import torch
from astropy.io import fits
from astropy.utils.exceptions import AstropyWarning

from rbflow.alerts import ALERT_SIZE, iter_alerts, read_fits_image, score_alerts
from rbflow.datacube import NORMALISATION, crop_stamps, normalise
from rbflow.infer import load_model, predict
from rbflow.model import ModelConfig, build_model

DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ztf-alerts-dev"
CUTOUTS = ("cutoutScience", "cutoutTemplate", "cutoutDifference")


def _best_rate(func: Callable[[], object], n: int, repeats: int) -> float:
    """Items per second of ``func`` (``n`` items), best of ``repeats`` runs after a warm-up."""
    func()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        func()
        times.append(time.perf_counter() - t)
    return n / min(times)


def untrained_model(folder: Path, *, stamp_size: int, seed: int = 0) -> Path:
    """Write ``model.pt`` + ``model.json`` of an untrained compact network (for timing only)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(stamp_size=stamp_size)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(build_model(cfg).state_dict(), folder / "model.pt")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10000, help="alerts in the timed file")
    parser.add_argument("--model", type=Path, default=None, help="model.pt (default: untrained compact, 31 px)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the 2-core target)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (best kept)")
    parser.add_argument("--codec", choices=["null", "deflate", "snappy"], default="null", help="Avro codec")
    args = parser.parse_args()
    if not DEV.is_dir():
        raise SystemExit(f"development packets not found at {DEV}")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        avro = multiply_packets(args.n, tmp / "alerts.avro", codec=args.codec)
        model_path = args.model or untrained_model(tmp / "model", stamp_size=31)
        model, meta = load_model(model_path)
        stamp = int(meta["stamp_size"])
        print(
            f"{args.n} alerts ({avro.stat().st_size / 2**20:.0f} MiB, codec {args.codec}), model {stamp} px, "
            f"{args.threads} torch threads"
        )

        n = args.n
        rates: dict[str, float] = {}
        cpu = []

        def end_to_end() -> None:
            c = time.process_time()
            score_alerts([avro], model_path, tmp / "out.ecsv", progress=False)
            cpu.append(time.process_time() - c)

        rates["end to end (score_alerts)"] = _best_rate(end_to_end, n, args.repeats)
        cpu_ms = 1e3 * min(cpu) / n

        def full_read() -> None:
            with open(avro, "rb") as fh:
                for _ in fastavro.reader(fh):
                    pass

        rates["Avro, all fields (fastavro)"] = _best_rate(full_read, n, args.repeats)
        with open(avro, "rb") as fh:
            blobs = [r[c]["stampData"] for r in fastavro.reader(fh) for c in CUTOUTS][: 3 * 2000]
        raws = [gzip.decompress(b) for b in blobs]

        def astropy_decode() -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", AstropyWarning)  # ZTF's SIMPLE card is not right-aligned
                for r in raws:
                    with fits.open(io.BytesIO(r)) as hdul:
                        np.asarray(hdul[0].data, dtype=np.float32)

        def rbflow_decode() -> None:
            for b in blobs:
                read_fits_image(b)

        def gunzip_only() -> None:
            for b in blobs:
                gzip.decompress(b)

        rates["cutouts: gunzip only"] = _best_rate(gunzip_only, len(blobs) // 3, args.repeats)
        rates["cutouts: gunzip + read_fits_image"] = _best_rate(rbflow_decode, len(blobs) // 3, args.repeats)
        rates["cutouts: astropy.io.fits (peer, no gunzip)"] = _best_rate(astropy_decode, len(raws) // 3, 1)

        def read_decode() -> None:
            for _ in iter_alerts([avro], failures=[]):
                pass

        rates["read + decode + place (iter_alerts)"] = _best_rate(read_decode, n, args.repeats)
        X = np.stack([a.stamps for _, a in zip(range(4096), iter_alerts([avro], failures=[]))])
        Xc = crop_stamps(X, stamp)
        rates["normalise (datacube.normalise)"] = _best_rate(lambda: normalise(Xc), len(Xc), args.repeats)
        Xn = normalise(Xc)
        rates["inference (predict)"] = _best_rate(lambda: predict(model, meta, Xn), len(Xn), args.repeats)
    width = max(map(len, rates))
    for name, rate in rates.items():
        print(f"{name:<{width}}  {rate:10,.0f} alerts/s")
    print(
        f"end to end: {cpu_ms:.3f} CPU-ms per alert (all threads), i.e. at most {2e3 / cpu_ms:,.0f} alerts/s on two "
        f"cores used fully; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores during the run"
    )
    print(
        f"(a Rubin night of 10 million alerts end to end: {1e7 / rates['end to end (score_alerts)'] / 3600:.2f} h; "
        f"{ALERT_SIZE}-px alerts)"
    )


if __name__ == "__main__":
    main()
