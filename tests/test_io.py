"""Reading frames with clear errors, and atomic writes that never leave half a file."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from rbflow.errors import InputError
from rbflow.frames import frame_info
from rbflow.io import atomic_path, read_image, read_table, write_fits, write_table


def _frame(tmp_path, data=None, header=None, name="f.fits"):
    data = np.random.default_rng(1).normal(100, 5, (32, 32)).astype("f8") if data is None else data
    path = tmp_path / name
    fits.PrimaryHDU(data, header=header).writeto(path)
    return path


def test_read_image_converts_to_float32_and_has_no_wcs(tmp_path):
    img = read_image(_frame(tmp_path))
    assert img.data.dtype == np.float32
    assert img.wcs is None
    with pytest.raises(InputError, match=r"'.*f\.fits' has no celestial WCS.*refine_astrometry"):
        img.require_wcs()


def test_truncated_fits_names_file(tmp_path):
    path = _frame(tmp_path)
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(InputError, match=r"image '.*f\.fits' is not a readable FITS file.*truncated"):
        read_image(path)


def test_no_image_hdu_nan_and_constant_frames(tmp_path):
    path = tmp_path / "table.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU(Table({"a": [1, 2]}))]).writeto(path)
    with pytest.raises(InputError, match="has no 2-D image HDU"):
        read_image(path)
    with pytest.raises(InputError, match="has no finite pixel"):
        read_image(_frame(tmp_path, np.full((8, 8), np.nan), name="nan.fits"))
    with pytest.raises(InputError, match=r"is constant \(3\.0\)"):
        read_image(_frame(tmp_path, np.full((8, 8), 3.0), name="const.fits"))
    with pytest.raises(InputError, match="does not exist"):
        read_image(tmp_path / "missing.fits")


def test_atomic_write_keeps_previous_file_on_failure(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_fits_and_table_roundtrip_with_version(tmp_path):
    from rbflow import __version__

    write_fits(fits.PrimaryHDU(np.ones((4, 4), "f4")), tmp_path / "a.fits")
    assert fits.getheader(tmp_path / "a.fits")["RBFLOWV"] == __version__
    write_table(Table({"x": [1.0]}), tmp_path / "t.ecsv")
    assert read_table(tmp_path / "t.ecsv").meta["rbflow_version"] == __version__
    (tmp_path / "bad.ecsv").write_text("# %ECSV 1.0\n# ---\n# datatype: [garbage\n")
    with pytest.raises(InputError, match=r"'.*bad\.ecsv' is not a readable ECSV table"):
        read_table(tmp_path / "bad.ecsv")


def test_frame_info_reads_header_and_names_missing_zeropoint(demo_telescope):
    header = fits.Header({"FILTER": "r", "EXPTIME": 30.0, "MAGZP": 27.9, "SEEING": 2.1})
    info = frame_info(header, demo_telescope, path="x.fits")
    assert (info.gain, info.zeropoint, info.filter, info.fwhm_guess) == (6.2, 27.9, "r", 2.1)
    del header["MAGZP"]
    with pytest.raises(InputError, match=r"frame 'x.fits': no zeropoint for filter 'r'.*'MAGZP' header card"):
        frame_info(header, demo_telescope, path="x.fits")
    demo_telescope["gain"] = None
    header["MAGZP"] = 27.9
    with pytest.raises(InputError, match=r"'gain' \(e-/ADU\) is not set .* header key 'GAIN' is missing"):
        frame_info(header, demo_telescope, path="x.fits")
