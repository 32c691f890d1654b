"""Tests of rbflow.alerts on real ZTF packets (../shared/data/ztf-alerts-dev) and Rubin sample packets."""

from __future__ import annotations

import csv
import gzip
import io
import json
import runpy
import subprocess
import tarfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import fastavro
import numpy as np
import pytest
import torch
from astropy.io import fits
from astropy.utils.exceptions import AstropyWarning
from helpers import make_cube
from numpy.testing import assert_allclose, assert_array_equal

from rbflow.alerts import (
    ALERT_SIZE,
    RUBIN_MAJORS,
    import_alerts,
    read_alerts,
    read_fits_image,
    score_alerts,
)
from rbflow.cli import main
from rbflow.datacube import crop_stamps, load_datacube, normalise
from rbflow.errors import InputError
from rbflow.infer import predict_onnx
from rbflow.train import train

torch.set_num_threads(2)

DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ztf-alerts-dev"
needs_dev = pytest.mark.skipif(not DEV.is_dir(), reason=f"ZTF development packets not found at {DEV}")
CUTOUTS = ("cutoutScience", "cutoutTemplate", "cutoutDifference")


def dev_files() -> list[Path]:
    return sorted(DEV.glob("*.avro"))


def read_records(path: Path) -> tuple[dict, list[dict]]:
    with open(path, "rb") as fh:
        reader = fastavro.reader(fh)
        return reader.writer_schema, list(reader)


def astropy_image(stamp_data: bytes) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)  # ZTF's SIMPLE card is not right-aligned
        with fits.open(io.BytesIO(gzip.decompress(stamp_data))) as hdul:
            return np.asarray(hdul[0].data, dtype=np.float32)


def same_schema_files() -> tuple[dict, list[Path], list[dict]]:
    """The largest group of dev packets sharing one writer schema, and their records."""
    groups: dict[str, list[Path]] = {}
    for f in dev_files():
        with open(f, "rb") as fh:
            groups.setdefault(fastavro.reader(fh).metadata["avro.schema"], []).append(f)
    files = max(groups.values(), key=len)
    schema = read_records(files[0])[0]
    return schema, files, [r for f in files for r in read_records(f)[1]]


def write_avro(path: Path, schema: dict, records: list[dict], *, codec: str = "null") -> Path:
    with open(path, "wb") as fh:
        fastavro.writer(fh, fastavro.parse_schema(schema), records, codec=codec)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A small model trained on synthetic 31-px stamps (model.pt, model.json, model.onnx)."""
    root = tmp_path_factory.mktemp("alerts_model")
    cube = make_cube(root / "cube.npz", 400, seed=31, n_frames=5)
    cfg = {"widths": [8, 16, 32], "epochs": 1, "batch_size": 64, "lr": 0.01, "device": "cpu"}
    train(cube, root / "model", cfg, seed=3, checkpoint_dir=root / "ckpt")
    return root / "model"


# ------------------------------------------------------------------------------------------ decoding


def test_read_fits_image_scaled_integers_and_extension_match_astropy():
    rng = np.random.default_rng(0)
    raw = rng.integers(-3000, 3000, (21, 17)).astype(np.int16)
    raw[3, 4] = -32768
    hdu = fits.PrimaryHDU(raw)
    hdu.header["BSCALE"] = 0.5
    hdu.header["BZERO"] = 100.0
    hdu.header["BLANK"] = -32768
    buf = io.BytesIO()
    hdu.writeto(buf)
    ours = read_fits_image(gzip.compress(buf.getvalue()))
    with fits.open(io.BytesIO(buf.getvalue())) as hdul:
        ref = np.asarray(hdul[0].data, dtype=np.float32)
    # int16 * 0.5 + 100 is exact in float32; BLANK -> NaN as astropy
    assert_array_equal(ours, ref)
    assert np.isnan(ours[3, 4])
    # an empty primary HDU and the image in the first extension (as Rubin's cutouts may be)
    image = rng.normal(size=(30, 30)).astype(">f8")
    buf = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(image)]).writeto(buf)
    assert_array_equal(read_fits_image(buf.getvalue()), image.astype(np.float32))


def test_read_fits_image_errors_say_what():
    with pytest.raises(ValueError, match="not a FITS file"):
        read_fits_image(gzip.compress(b"hello, this is not FITS"))
    with pytest.raises(ValueError, match="not valid gzip"):
        read_fits_image(b"\x1f\x8b" + b"garbage" * 10)
    buf = io.BytesIO()
    fits.PrimaryHDU(np.zeros((10, 10), np.float32)).writeto(buf)
    with pytest.raises(ValueError, match="truncated"):
        read_fits_image(buf.getvalue()[:2900])


@needs_dev
def test_every_dev_packet_reads_and_its_stamps_equal_astropy():
    table, stamps, failures = read_alerts([DEV], negative="keep")
    assert failures == []
    assert len(table) == len(dev_files()) == 86
    assert stamps.shape == (86, 3, ALERT_SIZE, ALERT_SIZE)
    by_candid = {int(c): i for i, c in enumerate(table["candid"])}
    for f in dev_files():
        _, (record,) = read_records(f)
        i = by_candid[record["candid"]]
        for ch, name in enumerate(CUTOUTS):
            ref = astropy_image(record[name]["stampData"])
            assert_array_equal(read_fits_image(record[name]["stampData"]), ref)
            # the stamps: astropy's pixels, with ZTF's -FLT_MAX "no data" template pixels as NaN
            ref[np.abs(ref) >= np.finfo(np.float32).max] = np.nan
            assert_array_equal(stamps[i, ch], ref)


@needs_dev
def test_identifiers_and_scores_round_trip_into_the_table():
    table, _, _ = read_alerts([DEV])
    with open(DEV / "alerts.csv", newline="") as fh:
        truth = {int(r["candid"]): r for r in csv.DictReader(fh)}
    assert set(table["candid"].tolist()) == set(truth)
    for row in table:
        t = truth[int(row["candid"])]
        assert row["objectId"] == t["objectId"]
        assert row["isdiffpos"] == t["isdiffpos"]
        assert row["rb"] == pytest.approx(float(t["rb"]), rel=1e-7)  # float32 in the packet
        assert row["drb"] == pytest.approx(float(t["drb"]), rel=1e-7)
        assert Path(row["source"]).name == t["file"]
        assert row["survey"] == "ztf" and row["schema"].startswith("ztf.alert ")
    for f in dev_files()[:5]:
        _, (record,) = read_records(f)
        row = table[table["candid"] == record["candid"]][0]
        cand = record["candidate"]
        assert (row["ra"], row["dec"], row["jd"], row["magpsf"]) == (
            cand["ra"],
            cand["dec"],
            cand["jd"],
            cand["magpsf"],
        )
        assert row["filter"] == {1: "g", 2: "r", 3: "i"}[cand["fid"]]


@needs_dev
def test_negative_differences_are_flipped_or_kept_or_skipped():
    flip, xf, _ = read_alerts([DEV], negative="flip")
    keep, xk, _ = read_alerts([DEV], negative="keep")
    neg = np.asarray(flip["isdiffpos"]) == "f"
    assert neg.sum() == flip["diff_flipped"].sum() > 0
    assert not keep["diff_flipped"].any()
    assert_array_equal(xf[neg, 2], -xk[neg, 2])
    assert_array_equal(xf[~neg], xk[~neg])
    assert_array_equal(xf[:, :2], xk[:, :2])
    skip, _, skipped = read_alerts([DEV], negative="skip")
    assert len(skip) == (~neg).sum() and len(skipped) == neg.sum()
    assert all("negative difference" in f.reason for f in skipped)


@needs_dev
def test_edge_cutouts_are_padded_on_the_frame_side(tmp_path):
    schema, (record,) = read_records(dev_files()[0])
    full = {name: astropy_image(record[name]["stampData"]) for name in CUTOUTS}
    for name in CUTOUTS:  # the candidate 20 px from the frame's left edge: 11 columns missing
        buf = io.BytesIO()
        fits.PrimaryHDU(full[name][:, 11:]).writeto(buf)
        record[name]["stampData"] = gzip.compress(buf.getvalue())
    record["candidate"]["xpos"] = 20.0
    table, stamps, failures = read_alerts([write_avro(tmp_path / "edge.avro", schema, [record])], negative="keep")
    assert failures == [] and table["edge"][0]
    assert np.isnan(stamps[0, :, :, :11]).all()
    for ch, name in enumerate(CUTOUTS):
        assert_array_equal(stamps[0, ch, :, 11:], full[name][:, 11:])
    record["candidate"]["xpos"] = 3050.0  # near the right edge: the missing columns are on the right
    _, stamps, _ = read_alerts([write_avro(tmp_path / "edge2.avro", schema, [record])], negative="keep")
    assert np.isnan(stamps[0, :, :, -11:]).all()
    assert_array_equal(stamps[0, 0, :, :-11], full["cutoutScience"][:, 11:])


# ------------------------------------------------------------------------------------------- formats


@needs_dev
def test_same_table_from_avro_files_multi_alert_file_snappy_tar_gz_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema, files, records = same_schema_files()
    single = tmp_path / "single"
    single.mkdir()
    for f in files:
        (single / f.name).write_bytes(f.read_bytes())
    multi = write_avro(tmp_path / "multi.avro", schema, records)
    snappy = write_avro(tmp_path / "snappy.avro", schema, records, codec="snappy")
    deflate = write_avro(tmp_path / "deflate.avro", schema, records, codec="deflate")
    with tarfile.open(tmp_path / "night.tar.gz", "w:gz") as tar:
        for f in files:
            tar.add(f, arcname=f"night/{f.name}")
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "dump.parquet")

    ref, ref_stamps, _ = read_alerts([single])
    assert len(ref) == len(files) > 10
    for path in (multi, snappy, deflate, tmp_path / "night.tar.gz", tmp_path / "dump.parquet"):
        table, stamps, failures = read_alerts([path])
        assert failures == [], path
        for name in ref.colnames:
            if name not in ("source", "index", "schema"):
                assert_array_equal(table[name], ref[name], err_msg=f"{path.name}: {name}")
        assert_array_equal(stamps, ref_stamps)
    tar_table, _, _ = read_alerts([tmp_path / "night.tar.gz"])
    assert tar_table["source"][0] == f"{tmp_path / 'night.tar.gz'}:night/{files[0].name}"
    assert not any(p.suffix == ".avro" for p in tmp_path.rglob("night/*"))  # streamed, nothing extracted


# ---------------------------------------------------------------------------------------------- Rubin


def rubin_samples() -> list[Path]:
    from lsst.alert.packet.schema import get_schema_root

    root = Path(get_schema_root())
    return sorted(p for p in root.glob("*/*/sample_data/fakeAlert.avro") if int(p.parts[-4]) in RUBIN_MAJORS) + sorted(
        p for p in root.glob("*/*/sample_data/fakeAlert.avro") if int(p.parts[-4]) not in RUBIN_MAJORS
    )


def fits_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    fits.PrimaryHDU(image.astype(np.float32)).writeto(buf)
    return buf.getvalue()


def test_rubin_sample_packets_read_with_their_schema_version(tmp_path):
    pytest.importorskip("lsst.alert.packet")
    samples = rubin_samples()
    served = [p for p in samples if int(p.parts[-4]) in RUBIN_MAJORS]
    assert len(served) >= 5
    rng = np.random.default_rng(1)
    sci, ref, diff = (rng.normal(size=(30, 30)).astype(np.float32) for _ in range(3))
    for path in samples:
        version = f"lsst.v{path.parts[-4]}_{path.parts[-3]}.alert"
        schema, records = read_records(path)
        assert schema["name"] == version
        # the samples carry no cutouts: reported by file and candid, not lost
        table, _, failures = read_alerts([path])
        assert len(table) == 0 and len(failures) == len(records)
        if int(path.parts[-4]) not in RUBIN_MAJORS:
            assert "is not read" in failures[0].reason and version in failures[0].reason
            continue
        assert "no cutoutScience" in failures[0].reason and failures[0].candid is not None
        record = records[0]
        record["cutoutScience"], record["cutoutTemplate"], record["cutoutDifference"] = map(
            fits_bytes, (sci, ref, diff)
        )
        table, stamps, failures = read_alerts(
            [write_avro(tmp_path / f"{path.parts[-4]}_{path.parts[-3]}.avro", schema, [record])]
        )
        assert failures == []
        src = record["diaSource"]
        assert table["schema"][0] == version and table["survey"][0] == "rubin"
        assert table["candid"][0] == src["diaSourceId"]
        assert table["ra"][0] == src["ra"] and table["dec"][0] == src["dec"]
        assert table["jd"][0] == pytest.approx(src["midpointMjdTai"] + 2400000.5, abs=1e-9)
        assert table["reliability"][0] == pytest.approx(src.get("reliability") or np.nan, nan_ok=True)
        # a 30-px stamp: its pixel 15 on the grid's centre pixel 31, NaN around
        expected_diff = -diff if table["diff_flipped"][0] else diff
        assert_array_equal(stamps[0, 0, 16:46, 16:46], sci)
        assert_array_equal(stamps[0, 2, 16:46, 16:46], expected_diff)
        assert np.isnan(stamps[0, :, :16]).all()


# -------------------------------------------------------------------------------------------- scoring


def broken_inputs(tmp_path: Path) -> tuple[list[Path], dict[str, int]]:
    """Dev packets plus a truncated file, a packet without cutouts and one with a non-FITS cutout."""
    schema, files, records = same_schema_files()
    folder = tmp_path / "stream"
    folder.mkdir()
    good = files[:6]
    for f in good:
        (folder / f.name).write_bytes(f.read_bytes())
    data = write_avro(tmp_path / "multi.avro", schema, records[6:10]).read_bytes()
    (folder / "truncated.avro").write_bytes(data[: len(data) // 2])
    nocut = dict(records[10], cutoutScience=None)
    write_avro(folder / "nocutout.avro", schema, [nocut])
    notfits = dict(records[11])
    notfits["cutoutDifference"] = {"fileName": "x.fits.gz", "stampData": gzip.compress(b"PNG not a FITS file" * 10)}
    write_avro(folder / "notfits.avro", schema, [notfits])
    return [folder], {"good": len(good), "nocut": records[10]["candid"], "notfits": records[11]["candid"]}


@needs_dev
def test_broken_packets_are_reported_by_file_and_candid_and_the_others_scored(tmp_path, model_dir, caplog):
    paths, info = broken_inputs(tmp_path)
    table = score_alerts(paths, model_dir / "model.pt", tmp_path / "scores.ecsv", progress=False)
    # the alerts of the truncated file before the cut are scored; the rest is one failure
    n_before = int(sum(Path(s).name == "truncated.avro" for s in table["source"]))
    assert 0 < n_before < 4
    assert len(table) == info["good"] + n_before
    reasons = {Path(f["source"]).name: f for f in table.meta["failures"]}
    assert table.meta["n_failures"] == 3
    assert f"unreadable after {n_before} alert(s) (last candid" in reasons["truncated.avro"]["reason"]
    assert reasons["nocutout.avro"]["candid"] == info["nocut"]
    assert "no cutoutScience" in reasons["nocutout.avro"]["reason"]
    assert reasons["notfits.avro"]["candid"] == info["notfits"]
    assert "cutoutDifference: the cutout is not a FITS file" in reasons["notfits.avro"]["reason"]
    assert f"'{paths[0] / 'nocutout.avro'}' candid {info['nocut']}: the packet has no cutoutScience" in caplog.text
    assert "3 packet(s) skipped" in caplog.text


@needs_dev
def test_worker_processes_give_the_same_table_kept_packets_and_failures(tmp_path, model_dir):
    """A multi-alert file large enough to be split between two worker processes, with broken packets."""
    paths, info = broken_inputs(tmp_path)
    schema, _, records = same_schema_files()
    # 18 MB: more than twice a decoding task (8 MiB), so its blocks are shared out between the workers
    per_alert = write_avro(tmp_path / "probe.avro", schema, records).stat().st_size / len(records)
    n = int(18e6 / per_alert)
    night = [dict(records[i % len(records)]) for i in range(n)]
    night[n - 40] = dict(night[n - 40], cutoutScience=None, candid=1)
    night[n - 3] = dict(night[n - 3], candid=2, cutoutTemplate={"fileName": "x", "stampData": b"not FITS"})
    big = write_avro(tmp_path / "night.avro", schema, night)
    assert big.stat().st_size > 16 * 2**20
    tables = {}
    for workers in (1, 2):
        tables[workers] = score_alerts(
            [big, *paths], model_dir / "model.pt", tmp_path / f"w{workers}.ecsv", workers=workers, threshold=0.5,
            kept_dir=tmp_path / f"kept{workers}", engine="onnx",
        )  # fmt: skip
    one, two = tables[1], tables[2]
    assert one.meta["workers"] == 0 and two.meta["workers"] == 2
    for name in one.colnames:
        if one[name].dtype.kind == "f":
            assert_allclose(two[name], one[name], atol=1e-6, err_msg=name)  # the workers score in their own batches
        else:
            assert_array_equal(two[name], one[name], err_msg=name)
    assert two.meta["failures"] == one.meta["failures"]
    # the broken packets of the split file: reported by file and candid, every other alert scored, in order
    in_big = two[two["source"] == str(big)]
    assert list(in_big["index"]) == [i for i in range(n) if i not in (n - 40, n - 3)]
    failed = {f["candid"]: f["reason"] for f in two.meta["failures"] if f["source"] == str(big)}
    assert set(failed) == {1, 2}
    assert "the packet has no cutoutScience" in failed[1]
    assert "cutoutTemplate: the cutout is not a FITS file" in failed[2]
    n_truncated = int(sum(Path(s).name == "truncated.avro" for s in two["source"]))
    assert two.meta["n_failures"] == 3 + 2 and len(two) == len(in_big) + info["good"] + n_truncated
    for f in (tmp_path / "kept1").iterdir():  # the big file re-written (a new sync marker), the others copied
        assert read_records(tmp_path / "kept2" / f.name) == read_records(f)
        if f.name != big.name:
            assert (tmp_path / "kept2" / f.name).read_bytes() == f.read_bytes()
    assert sorted(p.name for p in (tmp_path / "kept2").iterdir()) == sorted(
        p.name for p in (tmp_path / "kept1").iterdir()
    )


@needs_dev
def test_cli_scores_agree_with_onnx_and_kept_packets_are_unchanged(tmp_path, model_dir):
    out, kept = tmp_path / "alerts.ecsv", tmp_path / "kept"
    assert main(["alerts", "score", str(DEV), "--model", str(model_dir / "model.pt"), "--out", str(out),
                 "--kept-dir", str(kept), "--threshold", "0.5", "--workers", "2"]) == 0  # fmt: skip
    from astropy.table import Table

    table = Table.read(out)
    assert len(table) == 86 and table.meta["crop"].startswith("central 31 px")
    assert table.meta["workers"] == 0  # 6 MB of packets: one decoding task, in a thread (no process started)
    _, stamps, _ = read_alerts([DEV])
    p_onnx = predict_onnx(model_dir / "model.onnx", normalise(crop_stamps(stamps, 31)))
    # float32 network, two runtimes: they agree to ~1e-7; 1e-5 leaves room for kernel differences
    assert_allclose(table["label1"], p_onnx, atol=1e-5)
    assert_allclose(table["label0"] + table["label1"], 1.0)
    assert_array_equal(table["kept"], table["label1"] >= 0.5)
    names = sorted(p.name for p in kept.iterdir())
    assert names == sorted(Path(s).name for s in table["source"][table["kept"]])
    for name in names:
        assert (kept / name).read_bytes() == (DEV / name).read_bytes()


@needs_dev
def test_cli_without_a_model_scores_with_the_starter_model(tmp_path):
    from astropy.table import Table

    from rbflow.infer import score_triplets, starter_model_path

    out = tmp_path / "alerts.ecsv"
    assert main(["alerts", "score", str(DEV), "--out", str(out), "--engine", "torch"]) == 0
    table = Table.read(out)
    assert table.meta["model"] == str(starter_model_path())
    _, stamps, _ = read_alerts([DEV])
    # the same stamps through the public triplet scorer and the starter model: the same P(real)
    assert_allclose(table["label1"], score_triplets(None, *(stamps[:, c] for c in range(3))), atol=1e-6)


@needs_dev
def test_engines_torch_and_onnx_give_the_same_scores(tmp_path, model_dir):
    files = dev_files()[:12]
    tables = {
        engine: score_alerts(files, model_dir / "model.pt", tmp_path / f"{engine}.ecsv", engine=engine, threads=1)
        for engine in ("torch", "onnx", "auto")
    }
    assert {e: t.meta["engine"] for e, t in tables.items()} == {"torch": "torch", "onnx": "onnx", "auto": "onnx"}
    # float32 network, two runtimes: they agree to ~1e-7; 1e-5 leaves room for kernel differences
    assert_allclose(tables["onnx"]["label1"], tables["torch"]["label1"], atol=1e-5)
    assert_array_equal(tables["auto"]["label1"], tables["onnx"]["label1"])
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("model.pt", "model.json"):
        (bare / name).write_bytes((model_dir / name).read_bytes())
    assert score_alerts(files, bare / "model.pt", tmp_path / "b.ecsv").meta["engine"] == "torch"  # auto, no ONNX
    with pytest.raises(InputError, match="needs model.onnx next to"):
        score_alerts(files, bare / "model.pt", tmp_path / "c.ecsv", engine="onnx")
    with pytest.raises(InputError, match="engine 'tensorrt' is unknown"):
        score_alerts(files, model_dir / "model.pt", tmp_path / "d.ecsv", engine="tensorrt")


@needs_dev
def test_multi_alert_kept_file_keeps_schema_and_kept_records(tmp_path, model_dir):
    schema, _, records = same_schema_files()
    multi = write_avro(tmp_path / "multi.avro", schema, records, codec="deflate")
    table = score_alerts(
        [multi], model_dir / "model.pt", tmp_path / "t.ecsv", kept_dir=tmp_path / "kept", threshold=0.5
    )
    with open(tmp_path / "kept" / "multi.avro", "rb") as fh:
        reader = fastavro.reader(fh)
        kept = list(reader)
        assert reader.writer_schema == schema and reader.codec == "deflate"
    assert [r["candid"] for r in kept] == list(table["candid"][table["kept"]])
    assert 0 < len(kept) < len(records)
    # the same from a Parquet dump (kept rows) and a .tar.gz of single-alert files (members' bytes)
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, files, _ = same_schema_files()
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "dump.parquet")
    with tarfile.open(tmp_path / "night.tgz", "w:gz") as tar:
        for f in files:
            tar.add(f, arcname=f"night/{f.name}")
    for path in (tmp_path / "dump.parquet", tmp_path / "night.tgz"):
        out = tmp_path / f"kept_{path.suffix}"
        t = score_alerts([path], model_dir / "model.pt", tmp_path / "t2.ecsv", kept_dir=out, threshold=0.5)
        assert list(t["candid"][t["kept"]]) == [r["candid"] for r in kept]
    assert pq.read_table(tmp_path / "kept_.parquet" / "dump.parquet").column("candid").to_pylist() == [
        r["candid"] for r in kept
    ]
    for f in (tmp_path / "kept_.tgz").iterdir():
        assert f.read_bytes() == (DEV / f.name).read_bytes()
    assert len(list((tmp_path / "kept_.tgz").iterdir())) == len(kept)


def test_model_larger_than_the_alerts_is_refused_by_name(tmp_path, model_dir):
    meta = json.loads((model_dir / "model.json").read_text())
    big = tmp_path / "big"
    big.mkdir()
    (big / "model.pt").write_bytes((model_dir / "model.pt").read_bytes())
    meta["stamp_size"] = 65
    (big / "model.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"model '.*big/model.pt' takes 65-px stamps, larger than the 63-px"):
        score_alerts([tmp_path], big / "model.pt", tmp_path / "x.ecsv")
    meta["stamp_size"] = 31
    meta["channels"] = ["SCI", "REF", "DIFF", "SCORR"]
    (big / "model.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"needs channels .* lack \['SCORR'\]"):
        score_alerts([tmp_path], big / "model.pt", tmp_path / "x.ecsv")


# --------------------------------------------------------------------------------------------- import


@needs_dev
def test_import_weak_labels_groups_by_object(tmp_path):
    out = tmp_path / "cube.npz"
    assert main(["alerts", "import", str(DEV), "--score-column", "drb", "--bogus-below", "0.1", "--real-above",
                 "0.99", "--out", str(out), "--crop", "31"]) == 0  # fmt: skip
    cube = load_datacube(out)
    with open(DEV / "alerts.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    real = {r["candid"] for r in rows if float(r["drb"]) > 0.99}
    bogus = {r["candid"] for r in rows if float(r["drb"]) < 0.1}
    assert set(cube["ids"][cube["y"] == 1]) == real and set(cube["ids"][cube["y"] == 0]) == bogus
    assert cube["X"].shape == (len(real) + len(bogus), 3, 31, 31)
    obj = {r["candid"]: r["objectId"] for r in rows}
    assert [obj[i] for i in cube["ids"]] == list(cube["frame"])  # rbflow.train splits by frame = objectId
    assert cube["meta"]["group_by"].startswith("objectId")
    _, stamps, _ = read_alerts([DEV])
    table, _, _ = read_alerts([DEV])
    order = [list(table["candid"].astype(str)).index(i) for i in cube["ids"]]
    assert_array_equal(cube["X"], normalise(crop_stamps(stamps[order], 31)))


@needs_dev
def test_import_from_a_labels_csv_and_its_errors(tmp_path):
    table, _, _ = read_alerts([DEV])
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "candid,label\n" + "".join(f"{c},{'real' if i % 2 else 'bogus'}\n" for i, c in enumerate(table["candid"][:20]))
    )
    meta = import_alerts([DEV], tmp_path / "cube.npz", labels_csv=labels)
    assert meta["counts"] == {"true": 10, "false": 10, "unlabelled": 66, "skipped": 0}
    with pytest.raises(InputError, match="either from a CSV"):
        import_alerts([DEV], tmp_path / "c.npz")
    with pytest.raises(InputError, match="score column 'nope'"):
        import_alerts([DEV], tmp_path / "c.npz", score_column="nope", bogus_below=0.1, real_above=0.9)
    labels.write_text("candid,label\n1,maybe\n")
    with pytest.raises(InputError, match="line 2: label 'maybe'"):
        import_alerts([DEV], tmp_path / "c.npz", labels_csv=labels)


# ------------------------------------------------------------------------------------------- workflow


@needs_dev
def test_workflow_script_gives_the_cli_scores(tmp_path, model_dir):
    """The rule's script (stand-in snakemake object) writes the same table as the library call."""
    from astropy.table import Table

    folder = tmp_path / "packets"
    folder.mkdir()
    for f in dev_files()[:8]:
        (folder / f.name).write_bytes(f.read_bytes())
    alerts_cfg = {"folder": str(folder), "model": None, "threshold": 0.5, "negative": "flip", "keep_packets": True}
    sm = SimpleNamespace(
        input=SimpleNamespace(folder=str(folder), model=str(model_dir / "model.pt")),
        output=SimpleNamespace(table=str(tmp_path / "wf" / "alerts.ecsv"), kept=str(tmp_path / "wf" / "kept")),
        params=SimpleNamespace(alerts=alerts_cfg),
        threads=2,
        log=[str(tmp_path / "score.log")],
        rule="alerts_score",
        wildcards={},
    )
    runpy.run_path(
        str(Path(__file__).resolve().parents[1] / "scripts" / "alerts_score.py"), init_globals={"snakemake": sm}
    )
    ref = score_alerts([folder], model_dir / "model.pt", tmp_path / "ref.ecsv", threshold=0.5)
    assert_allclose(Table.read(tmp_path / "wf" / "alerts.ecsv")["label1"], ref["label1"], atol=1e-12)


@pytest.mark.workflow
@needs_dev
def test_workflow_target_alerts_gives_the_same_scores(tmp_path, model_dir):
    from astropy.table import Table
    from helpers import SNAKEMAKE, make_workdir

    folder = tmp_path / "packets"
    folder.mkdir()
    for f in dev_files()[:8]:
        (folder / f.name).write_bytes(f.read_bytes())
    ref = score_alerts([folder], model_dir / "model.pt", tmp_path / "ref.ecsv", threshold=0.5)
    threshold = float(np.median(ref["label1"]))  # some packets kept, some not
    ref = score_alerts([folder], model_dir / "model.pt", tmp_path / "ref.ecsv", threshold=threshold)
    work = make_workdir(tmp_path / "work")
    cfg = work / "alerts.yaml"
    cfg.write_text(
        f"alerts:\n  folder: {folder}\n  model: {model_dir / 'model.pt'}\n  threshold: {threshold!r}\n"
        "  keep_packets: true\n"
    )
    proc = subprocess.run(
        [*SNAKEMAKE, "--cores", "2", "alerts", "--configfile", str(cfg)],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = Table.read(work / "results" / "alerts" / "alerts.ecsv")
    assert_allclose(table["label1"], ref["label1"], atol=1e-5)
    kept = sorted(p.name for p in (work / "results" / "alerts" / "kept").glob("*.avro"))
    assert kept == sorted(Path(s).name for s in ref["source"][ref["kept"]]) and 0 < len(kept) < 8
