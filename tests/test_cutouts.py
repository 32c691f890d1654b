"""Tests of rbflow.cutouts: stamp geometry, edge padding, previews, manifest and empty input."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from numpy.testing import assert_allclose, assert_array_equal

from rbflow.cutouts import CHANNELS, EDGE, MANIFEST, read_cutout, write_cutouts
from rbflow.errors import InputError
from rbflow.io import write_table

NY, NX = 128, 160
SIZE = 15


def _wcs() -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [80.5, 64.5]
    w.wcs.cd = [[-1.0e-4, 0.0], [0.0, 1.0e-4]]
    return w


@pytest.fixture
def mef(tmp_path):
    """A subtraction MEF whose pixel values encode their position: value = 1000 * y + x (+ offset per channel)."""
    yy, xx = np.mgrid[0:NY, 0:NX]
    base = (1000.0 * yy + xx).astype(np.float32)
    header = _wcs().to_header()
    header["FILTER"] = "r"
    hdus = [fits.PrimaryHDU()]
    for k, name in enumerate([*CHANNELS, "VAR"]):
        hdus.append(fits.ImageHDU(base + 1.0e6 * k, header=header, name=name))
    hdus.append(fits.ImageHDU(np.zeros((NY, NX), np.uint8), name="MASK"))
    path = tmp_path / "img_sim0.fits"
    fits.HDUList(hdus).writeto(path)
    return path


def _candidates(xy: list[tuple[float, float]], flags: list[int] | None = None) -> Table:
    n = len(xy)
    w = _wcs()
    x = np.array([p[0] for p in xy], dtype=float)
    y = np.array([p[1] for p in xy], dtype=float)
    ra, dec = w.pixel_to_world_values(x, y)
    return Table(
        {
            "id": np.array([f"img_sim0_{i}" for i in range(n)], dtype=str),
            "image": np.full(n, "img_sim0"),
            "x": x,
            "y": y,
            "ra": ra,
            "dec": dec,
            "flux": np.full(n, 100.0),
            "flux_err": np.full(n, 10.0),
            "mag": np.full(n, 20.0),
            "mag_err": np.full(n, 0.1),
            "snr": np.full(n, 10.0),
            "scorr_peak": np.full(n, 8.0),
            "fwhm": np.full(n, 3.0),
            "ellipticity": np.zeros(n),
            "dist_bright_star": np.full(n, 50.0),
            "flags": np.array(flags if flags is not None else [0] * n, dtype=np.int64),
        }
    )


def test_sizes_centring_header_and_wcs(mef, tmp_path):
    cands = _candidates([(40.4, 60.6), (100.5, 30.2), (80.0, 64.0)], flags=[2, 0, 16])
    write_table(cands, tmp_path / "c.ecsv")
    out = tmp_path / "cut" / "img_sim0"
    manifest = write_cutouts(mef, tmp_path / "c.ecsv", out, size=SIZE, png=True)
    assert_array_equal(manifest["flags"], [2, 0, 16])  # interior stamps: flags untouched
    assert list(manifest["file"]) == [f"img_sim0_{i}.fits" for i in range(3)]
    assert (out / MANIFEST).exists()
    on_disk = Table.read(out / MANIFEST)
    assert_array_equal(on_disk["xpix0"], manifest["xpix0"])
    # Nearest pixel to the sub-pixel centroid (x.5 rounds up).
    for row, (xc, yc) in zip(manifest, [(40, 61), (101, 30), (80, 64)]):
        header, stamps = read_cutout(out / row["file"])
        assert set(stamps) == set(CHANNELS)
        for k, name in enumerate(CHANNELS):
            assert stamps[name].shape == (SIZE, SIZE)
            assert stamps[name].dtype == np.float32
            # Centre pixel value encodes the frame pixel it came from: exact integers in float32.
            assert stamps[name][SIZE // 2, SIZE // 2] == 1000 * yc + xc + 1.0e6 * k
        assert (header["XPIX0"], header["YPIX0"]) == (xc - SIZE // 2, yc - SIZE // 2)
        assert header["ID"] == row["id"] and header["FRAME"] == "img" and header["IMAGE"] == "img_sim0"
        assert header["FILTER"] == "r" and header["FILLVAL"] == "NaN"
        assert header["FLAGS"] == row["flags"]
        assert (out / row["file"]).with_suffix(".png").exists()
    with fits.open(out / "img_sim0_0.fits") as hdul:
        hdul.verify("exception")  # a standard-conforming file
        # The stamp WCS is the frame WCS shifted to the stamp origin (1e-9 deg is numerical noise).
        stamp_wcs = WCS(hdul["DIFF"].header)
        assert_allclose(
            stamp_wcs.pixel_to_world_values(3.0, 4.0),
            _wcs().pixel_to_world_values(3.0 + hdul[0].header["XPIX0"], 4.0 + hdul[0].header["YPIX0"]),
            atol=1e-9,
        )


def test_edge_candidates_padded_with_nan_and_flagged(mef, tmp_path):
    cands = _candidates([(2.2, 70.0), (NX - 1.0, NY - 3.0), (-20.0, 5.0)], flags=[0, 4, 0])
    write_table(cands, tmp_path / "c.ecsv")
    manifest = write_cutouts(mef, tmp_path / "c.ecsv", tmp_path / "cut", size=SIZE, png=False)
    assert_array_equal(manifest["flags"], [EDGE, 4 | EDGE, EDGE])
    half = SIZE // 2
    _, s0 = read_cutout(tmp_path / "cut" / "img_sim0_0.fits")
    # x = 2 is the centre: stamp columns 0..half-3 lie left of the frame.
    assert np.isnan(s0["SCI"][:, : half - 2]).all()
    assert np.isfinite(s0["SCI"][:, half - 2 :]).all()
    assert s0["SCI"][half, half - 2] == 1000 * 70 + 0
    h1, s1 = read_cutout(tmp_path / "cut" / "img_sim0_1.fits")
    assert h1["FLAGS"] == 4 | EDGE
    assert np.isnan(s1["REF"][:, half + 1 :]).all() and np.isnan(s1["REF"][half + 3 :, :]).all()
    assert np.isfinite(s1["REF"][: half + 3, : half + 1]).all()
    _, s2 = read_cutout(tmp_path / "cut" / "img_sim0_2.fits")
    assert np.isnan(s2["DIFF"]).all()  # entirely outside: kept, all NaN
    assert not list((tmp_path / "cut").glob("*.png"))


def test_empty_candidates_give_empty_typed_manifest(mef, tmp_path, caplog):
    write_table(_candidates([]), tmp_path / "c.ecsv")
    with caplog.at_level(logging.WARNING, logger="rbflow.cutouts"):
        manifest = write_cutouts(mef, tmp_path / "c.ecsv", tmp_path / "cut", size=SIZE, png=True)
    assert "empty" in caplog.text
    assert len(manifest) == 0
    assert [p.name for p in (tmp_path / "cut").iterdir()] == [MANIFEST]
    back = Table.read(tmp_path / "cut" / MANIFEST)
    assert back["x"].dtype.kind == "f" and back["flags"].dtype.kind == "i" and "file" in back.colnames


def test_rerun_replaces_folder_atomically(mef, tmp_path):
    out = tmp_path / "cut"
    write_table(_candidates([(50.0, 50.0), (60.0, 60.0)]), tmp_path / "c.ecsv")
    write_cutouts(mef, tmp_path / "c.ecsv", out, size=SIZE, png=False)
    write_table(_candidates([(50.0, 50.0)]), tmp_path / "c.ecsv")
    write_cutouts(mef, tmp_path / "c.ecsv", out, size=SIZE, png=False)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "img_sim0_0.fits"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.ecsv", "cut", "img_sim0.fits"]  # no leftovers


def test_errors(mef, tmp_path):
    write_table(_candidates([(50.0, 50.0)]), tmp_path / "c.ecsv")
    with pytest.raises(ValueError, match="odd"):
        write_cutouts(mef, tmp_path / "c.ecsv", tmp_path / "cut", size=16, png=False)
    with pytest.raises(InputError, match="does not exist"):
        write_cutouts(tmp_path / "nope.fits", tmp_path / "c.ecsv", tmp_path / "cut", size=SIZE, png=False)
    bad = _candidates([(50.0, 50.0)])
    bad.remove_column("snr")
    write_table(bad, tmp_path / "bad.ecsv")
    with pytest.raises(InputError, match="lacks column.*snr"):
        write_cutouts(mef, tmp_path / "bad.ecsv", tmp_path / "cut", size=SIZE, png=False)
    short = tmp_path / "short.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.ones((8, 8), np.float32), name="SCI")]).writeto(short)
    with pytest.raises(InputError, match="lacks HDU.*REF"):
        write_cutouts(short, tmp_path / "c.ecsv", tmp_path / "cut", size=SIZE, png=False)
    with pytest.raises(InputError, match="rerun the cutouts stage"):
        read_cutout(tmp_path / "missing.fits")
    assert not (tmp_path / "cut").exists()
