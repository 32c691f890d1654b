"""Tests of rbflow.avro: compiled decoders give fastavro's records, on real and crafted packets."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import fastavro
import pytest

from rbflow.alerts import RUBIN_MAJORS
from rbflow.avro import blocks, codec_of, compile_decoder, read_header

DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ztf-alerts-dev"
needs_dev = pytest.mark.skipif(not DEV.is_dir(), reason=f"ZTF development packets not found at {DEV}")

ZTF_TOP = {"schemavsn", "objectId", "candid", "candidate", "cutoutScience", "cutoutTemplate", "cutoutDifference"}
ZTF_CANDIDATE = {"candid", "jd", "fid", "isdiffpos", "ra", "dec", "magpsf", "rb", "drb", "xpos", "ypos"}
RUBIN_TOP = {"diaSourceId", "alertId", "diaSource", "cutoutScience", "cutoutTemplate", "cutoutDifference"}
RUBIN_SOURCE = {"diaSourceId", "diaObjectId", "ssObjectId", "midpointMjdTai", "ra", "dec", "band", "psfFlux"}
FASTAVRO = fastavro.schemaless_reader  # the reference; decoders compiled under `no_fallback` cannot call it


@pytest.fixture
def no_fallback(monkeypatch):
    """Decoders compiled in the test have no fastavro to fall back on: the expressions must match."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the compiled decoder fell back to fastavro")

    monkeypatch.setattr(fastavro, "schemaless_reader", refuse)


def same(a: Any, b: Any) -> bool:
    """Equal values of equal types, NaN equal to NaN (fastavro's float32s are Python floats too)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


def project(writer: dict, top: set[str], sub: str, subfields: set[str]) -> dict:
    """The writer schema with only ``top`` fields, and only ``subfields`` in the record ``sub``."""
    proj = json.loads(json.dumps(writer))
    proj["fields"] = [f for f in proj["fields"] if f["name"] in top]
    for f in proj["fields"]:
        if f["name"] == sub:
            record = f["type"] if isinstance(f["type"], dict) else next(t for t in f["type"] if isinstance(t, dict))
            record["fields"] = [g for g in record["fields"] if g["name"] in subfields]
    return proj


def decompressed_blocks(data: bytes) -> list[tuple[int, bytes]]:
    """(record count, decompressed records) of every block of an Avro container file."""
    meta, sync, pos = read_header(data)
    return list(blocks(data, pos, sync, codec=codec_of(meta)))


def assert_decodes_as_fastavro(data: bytes, proj: dict) -> int:
    """Every record of an Avro file decoded by the compiled decoder equals fastavro's; returns the count."""
    writer = fastavro.parse_schema(json.loads(read_header(data)[0][b"avro.schema"]))
    reader = fastavro.parse_schema(proj)
    decode = compile_decoder(writer, reader)
    assert decode is not None
    n = 0
    for count, block in decompressed_blocks(data):
        stream, at = io.BytesIO(block), 0
        for _ in range(count):
            record, at = decode(block, at)
            assert same(FASTAVRO(stream, writer, reader), record)
            assert at == stream.tell()  # the next record starts where fastavro's does
            n += 1
        assert at == len(block)
    return n


@needs_dev
def test_every_dev_packet_decodes_as_fastavro_reads_it(no_fallback):
    n = 0
    for path in sorted(DEV.glob("*.avro")):
        data = path.read_bytes()
        writer = json.loads(read_header(data)[0][b"avro.schema"])
        n += assert_decodes_as_fastavro(data, project(writer, ZTF_TOP, "candidate", ZTF_CANDIDATE))
    assert n == 86


def test_rubin_sample_packets_decode_as_fastavro_reads_them(no_fallback):
    packet = pytest.importorskip("lsst.alert.packet.schema")
    root = Path(packet.get_schema_root())
    samples = [p for p in root.glob("*/*/sample_data/fakeAlert.avro") if int(p.parts[-4]) in RUBIN_MAJORS]
    assert len(samples) >= 5
    for path in samples:
        data = path.read_bytes()
        writer = json.loads(read_header(data)[0][b"avro.schema"])
        assert assert_decodes_as_fastavro(data, project(writer, RUBIN_TOP, "diaSource", RUBIN_SOURCE)) >= 1


SCHEMA = {
    "type": "record",
    "name": "t.packet",
    "fields": [
        {"name": "flag", "type": "boolean"},
        {"name": "count", "type": "int"},
        {"name": "id", "type": "long"},
        {"name": "mag", "type": ["null", "float"]},
        {"name": "jd", "type": "double"},
        {"name": "label", "type": "string"},
        {"name": "note", "type": ["null", "string"]},
        {"name": "band", "type": {"type": "enum", "name": "t.band", "symbols": ["g", "r", "i"]}},
        {"name": "tag", "type": {"type": "fixed", "name": "t.tag", "size": 3}},
        {
            "name": "history",
            "type": [
                "null",
                {
                    "type": "array",
                    "items": {
                        "type": "record",
                        "name": "t.epoch",
                        "fields": [
                            {"name": "jd", "type": "double"},
                            {"name": "file", "type": ["null", "string"]},
                            {"name": "blob", "type": "bytes"},
                        ],
                    },
                },
            ],
        },
        {"name": "extra", "type": {"type": "map", "values": ["null", "long"]}},
        {"name": "source", "type": {"type": "record", "name": "t.source", "fields": [{"name": "x", "type": "double"}]}},
        {"name": "again", "type": "t.band"},
        {
            "name": "cutout",
            "type": [
                "null",
                {
                    "type": "record",
                    "name": "t.cutout",
                    "fields": [{"name": "fileName", "type": "string"}, {"name": "stampData", "type": "bytes"}],
                },
            ],
        },
    ],
}


def record(i: int, *, note_length: int = 12) -> dict:
    return {
        "flag": i % 2 == 0,
        "count": -i * 1000,
        "id": 2**62 + i,
        "mag": None if i % 3 == 0 else 18.25 + i,
        "jd": 2460000.5 + i / 7,
        "label": "é" * i,
        "note": None if i % 2 else "n" * note_length,
        "band": "gri"[i % 3],
        "tag": b"ab" + bytes([i % 256]),
        "history": None
        if i == 1
        else [{"jd": 1.5 * k, "file": None if k % 2 else "f" * (k * 45), "blob": b"\0" * k * 50} for k in range(i)],
        "extra": {f"k{k}": None if k % 2 else k for k in range(i)},
        "source": {"x": -0.5 * i},
        "again": "gri"[(i + 1) % 3],
        "cutout": None if i == 2 else {"fileName": f"c{i}.fits.gz", "stampData": bytes(range(256)) * (i + 1)},
    }


def encode(records: list[dict]) -> bytes:
    parsed = fastavro.parse_schema(SCHEMA)
    out = io.BytesIO()
    for r in records:
        fastavro.schemaless_writer(out, parsed, r)
    return out.getvalue()


def decode_all(block: bytes, n: int, reader_schema: dict) -> list[tuple[dict, dict]]:
    """(compiled, fastavro) record pairs of ``n`` records encoded back to back."""
    writer, reader = fastavro.parse_schema(SCHEMA), fastavro.parse_schema(reader_schema)
    decode = compile_decoder(writer, reader)
    assert decode is not None
    stream, at, pairs = io.BytesIO(block), 0, []
    for _ in range(n):
        record, at = decode(block, at)
        pairs.append((record, FASTAVRO(stream, writer, reader)))
        assert at == stream.tell()
    assert at == len(block)
    return pairs


@pytest.mark.parametrize(
    "fields",
    [
        [f["name"] for f in SCHEMA["fields"] if f["name"] not in ("history", "extra")],  # all but arrays and maps
        ["id", "cutout"],  # the history and the map skipped between wanted fields
        ["mag", "note", "band", "source", "again"],
    ],
)
def test_every_type_decodes_as_fastavro_reads_it(fields, no_fallback):
    records = [record(i) for i in range(7)]  # strings of at most 180 bytes: matched by the expressions
    for compiled, expected in decode_all(encode(records), len(records), project(SCHEMA, set(fields), "", set())):
        assert same(expected, compiled)


def test_strings_too_long_for_the_expressions_are_read_by_fastavro():
    # a wanted 300-byte string, then a skipped history with a 270-byte string (k = 6): fastavro reads them
    records = [record(8, note_length=300), record(7)]
    wanted = project(SCHEMA, {"note", "id", "cutout"}, "", set())
    pairs = decode_all(encode(records), 2, wanted)
    assert pairs[0][0]["note"] == "n" * 300
    assert all(same(expected, compiled) for compiled, expected in pairs)


def test_a_block_written_with_its_byte_size_is_jumped():
    # an array block with a negative count is followed by its size in bytes (Avro spec, "Arrays")
    schema = {
        "type": "record",
        "name": "t.sized",
        "fields": [{"name": "a", "type": {"type": "array", "items": "string"}}, {"name": "b", "type": "long"}],
    }
    items = b"".join(b"\x06abc" for _ in range(3))
    block = b"\x05" + bytes([len(items) * 2]) + items + b"\x00" + b"\x54"  # count -3, size, items, end; b = 42
    decode = compile_decoder(fastavro.parse_schema(schema), fastavro.parse_schema(project(schema, {"b"}, "", set())))
    assert decode is not None
    assert decode(block, 0) == ({"b": 42}, len(block))


def test_broken_records_raise_fastavros_error():
    block = encode([record(3)])
    writer = fastavro.parse_schema(SCHEMA)
    reader = fastavro.parse_schema(project(SCHEMA, {"id", "cutout"}, "", set()))
    decode = compile_decoder(writer, reader)
    assert decode is not None
    with pytest.raises(EOFError):  # what fastavro raises for a record cut short
        decode(block[: len(block) // 2], 0)
    with pytest.raises(EOFError):
        FASTAVRO(io.BytesIO(block[: len(block) // 2]), writer, reader)


def test_schemas_the_compiler_leaves_to_fastavro():
    writer = fastavro.parse_schema(SCHEMA)
    # a wanted array, a promoted type, a logical type
    assert compile_decoder(writer, fastavro.parse_schema(project(SCHEMA, {"history"}, "", set()))) is None
    promoted = project(SCHEMA, {"count"}, "", set())
    promoted["fields"][0]["type"] = "long"
    assert compile_decoder(writer, fastavro.parse_schema(promoted)) is None
    timed = {
        "type": "record",
        "name": "t.timed",
        "fields": [{"name": "t", "type": {"type": "long", "logicalType": "timestamp-micros"}}],
    }
    assert compile_decoder(fastavro.parse_schema(timed), fastavro.parse_schema(timed)) is None


@pytest.mark.parametrize("codec", ["null", "deflate", "snappy"])
def test_blocks_walks_the_container_and_refuses_broken_blocks(codec):
    schema = {"type": "record", "name": "r", "fields": [{"name": "i", "type": "long"}]}
    buf = io.BytesIO()
    fastavro.writer(buf, schema, ({"i": i} for i in range(250)), codec=codec, sync_interval=64)
    data = buf.getvalue()
    meta, sync, pos = read_header(data)
    assert meta[b"avro.codec"].decode() == codec
    walked = list(blocks(data, pos, sync, codec=codec))
    assert len(walked) > 1 and sum(count for count, _ in walked) == 250
    values = []
    for count, block in walked:
        stream = io.BytesIO(block)
        values += [FASTAVRO(stream, schema)["i"] for _ in range(count)]
        assert stream.tell() == len(block)
    assert values == list(range(250))
    # a walk that stops at a block boundary gives the blocks before it
    first_end = pos + len(data[pos:]) - len(data[pos:].split(sync, 1)[1])
    assert len(list(blocks(data, pos, sync, first_end, codec=codec))) == 1
    with pytest.raises(EOFError, match="truncated"):
        list(blocks(data[:-5], pos, sync, codec=codec))
    broken = data[: first_end - 1] + bytes([data[first_end - 1] ^ 0xFF]) + data[first_end:]
    with pytest.raises(ValueError, match="sync marker"):
        list(blocks(broken, pos, sync, codec=codec))
