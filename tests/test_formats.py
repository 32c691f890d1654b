"""Frames as archives serve them: compressed files and multi-extension files read to the plain frame.

Built on a real DECam frame (header with a TPV distortion WCS) from ../shared/data/decam-sfft/;
skipped when the shared data are absent. Every variant is written to tmp_path.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from rbflow.config import load_telescope
from rbflow.errors import InputError
from rbflow.frames import frame_hdu
from rbflow.io import read_image, write_fits
from rbflow.validate import FrameCheckError, check_frame

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "decam-sfft"
FRAME = DATA / "DEC-OBS18a.mini.fits"

pytestmark = pytest.mark.skipif(
    not FRAME.is_file(), reason=f"DECam test frame not found at {FRAME} (see the project's shared data README)"
)

#: Cards that describe the HDU (primary vs extension, compression, its name), not the frame.
STRUCTURE = {"SIMPLE", "XTENSION", "PCOUNT", "GCOUNT", "EXTEND", "BITPIX", "INHERIT", "EXTNAME"}


def _plain() -> fits.PrimaryHDU:
    with fits.open(FRAME, memmap=False) as hdul:
        return fits.PrimaryHDU(hdul[0].data.copy(), header=hdul[0].header.copy())


def _assert_same_frame(img, ref) -> None:
    """Same float32 pixels (bit for bit), same frame cards and same WCS as the plain file."""
    assert img.data.dtype == np.float32
    np.testing.assert_array_equal(img.data, ref.data)
    cards = {k: ref.header[k] for k in ref.header if k not in STRUCTURE and k not in ("COMMENT", "HISTORY", "")}
    for key, value in cards.items():
        assert img.header[key] == value, key
    x, y = np.meshgrid([0.0, 127.5, 255.0], [0.0, 127.5, 255.0])
    a = img.wcs.pixel_to_world_values(x, y)
    b = ref.wcs.pixel_to_world_values(x, y)
    np.testing.assert_array_equal(a, b)  # same cards: the same TPV solution to the last bit


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    path = tmp_path_factory.mktemp("formats") / "frame.fits"
    _plain().writeto(path)
    return path, read_image(path)


@pytest.mark.parametrize(
    ("suffix", "compress"), [(".fits.gz", gzip.compress), (".fits.bz2", bz2.compress), (".fits.xz", lzma.compress)]
)
def test_whole_file_compression_reads_as_the_plain_file(plain, tmp_path, suffix, compress):
    path, ref = plain
    packed = tmp_path / f"frame{suffix}"
    packed.write_bytes(compress(path.read_bytes()))
    assert ref.wcs is not None and ref.data.shape == (256, 256)
    _assert_same_frame(read_image(packed), ref)


def test_gzip_found_by_content_whatever_the_name(plain, tmp_path):
    path, ref = plain
    packed = tmp_path / "frame.fits"  # gzipped bytes under a plain name (as some archives serve them)
    packed.write_bytes(gzip.compress(path.read_bytes()))
    _assert_same_frame(read_image(packed), ref)


def test_truncated_gzip_is_a_clear_error(plain, tmp_path):
    path, _ = plain
    packed = tmp_path / "cut.fits.gz"
    packed.write_bytes(gzip.compress(path.read_bytes())[:20000])
    with pytest.raises(InputError, match=r"cut\.fits\.gz.*may be truncated"):
        read_image(packed)


def _tile_compressed(tmp_path: Path, *, weight_first: bool = False) -> Path:
    """fpack-like file: empty primary, the frame and a weight map, both tile-compressed (frame: lossless GZIP_2)."""
    hdu = _plain()
    weight = fits.CompImageHDU(np.arange(hdu.data.size, dtype=np.int32).reshape(hdu.data.shape), name="WGT")
    sci = fits.CompImageHDU(hdu.data, header=hdu.header, compression_type="GZIP_2", quantize_level=0.0)
    sci.name = "SCI"
    path = tmp_path / ("frame_wgt_first.fits.fz" if weight_first else "frame.fits.fz")
    fits.HDUList([fits.PrimaryHDU(), *((weight, sci) if weight_first else (sci, weight))]).writeto(path)
    return path


def test_tile_compressed_reads_as_the_plain_file(plain, tmp_path):
    _, ref = plain
    _assert_same_frame(read_image(_tile_compressed(tmp_path)), ref)  # first 2-D image: extension 1
    path = _tile_compressed(tmp_path, weight_first=True)  # the frame after another compressed image
    _assert_same_frame(read_image(path, hdu="SCI"), ref)
    _assert_same_frame(read_image(path, hdu=2), ref)
    assert read_image(path).data[0, 1] == 1.0  # without the key: the first 2-D image, the weight map


def _mef(tmp_path: Path) -> Path:
    """A multi-extension file as observatories write it: facts in the primary header, INHERIT = T."""
    hdu = _plain()
    header = hdu.header.copy()
    primary = fits.Header()
    for key in ("FILTER", "EXPTIME", "DATE-OBS"):
        primary[key] = header.pop(key)
    header["INHERIT"] = True
    mask = fits.ImageHDU(np.eye(*hdu.data.shape, dtype=np.int16), name="MASK")
    path = tmp_path / "frame_mef.fits"
    fits.HDUList([fits.PrimaryHDU(header=primary), mask, fits.ImageHDU(hdu.data, header=header, name="SCI")]).writeto(
        path
    )
    return path


def test_named_hdu_of_a_multi_extension_file(plain, tmp_path):
    _, ref = plain
    path = _mef(tmp_path)
    img = read_image(path, hdu="SCI")
    _assert_same_frame(img, ref)  # FILTER, EXPTIME, DATE-OBS come back from the primary (INHERIT = T)
    assert img.header["EXTNAME"] == "SCI"
    np.testing.assert_array_equal(read_image(path, hdu=2).data, ref.data)
    assert read_image(path).data.sum() == 256  # without the key: the first 2-D image, the mask


def test_unknown_hdu_names_the_file_and_its_hdus(tmp_path):
    path = _mef(tmp_path)
    with pytest.raises(InputError, match=r"frame_mef\.fits' has no HDU 'IMAGE'.*0 'PRIMARY'.*1 'MASK'.*2 'SCI'"):
        read_image(path, hdu="IMAGE")
    with pytest.raises(InputError, match=r"has no HDU 7.*frames\.hdu"):
        read_image(path, hdu=7)
    with pytest.raises(InputError, match=r"no 2-D image HDU named 0.*frames\.hdu"):
        read_image(path, hdu=0)


def test_files_rbflow_wrote_hold_their_image_in_the_primary(plain, tmp_path):
    _, ref = plain
    path = tmp_path / "stacked.fits"  # a stacked reference or injected image, read with the telescope's hdu
    write_fits(fits.PrimaryHDU(ref.data, header=ref.header), path)
    np.testing.assert_array_equal(read_image(path, hdu="SCI").data, ref.data)


def test_telescope_hdu_key_reaches_the_frame_checks(tmp_path):
    """`frames.hdu` from the telescope file: the validate stage reads the named HDU of an MEF frame."""
    telescope = load_telescope(REPO / "config" / "telescopes" / "decam.yaml")
    assert frame_hdu(telescope) is None  # the default: first 2-D image HDU
    telescope["frames"]["hdu"] = "SCI"
    path = _mef(tmp_path)
    status = check_frame(path, telescope)
    assert status["shape"] == [256, 256] and status["fwhm"] > 2
    telescope["frames"]["hdu"] = "IMAGE"
    with pytest.raises(FrameCheckError, match=r"has no HDU .IMAGE."):
        check_frame(path, telescope)


def _mef_copy(src: Path, dest: Path, *, compress: str | None) -> Path:
    """The frame ``src`` as the image HDU 'SCI' after a weight map, tile-compressed or gzipped as a whole."""
    with fits.open(src, memmap=False) as hdul:
        data, header = hdul[0].data.astype(np.float32), hdul[0].header.copy()
    weight = np.arange(data.size, dtype=np.float32).reshape(data.shape)
    if compress == "fz":
        hdus = [
            fits.PrimaryHDU(),
            fits.CompImageHDU(weight, name="WGT"),
            fits.CompImageHDU(data, header=header, name="SCI", compression_type="GZIP_2", quantize_level=0.0),
        ]
    else:
        hdus = [fits.PrimaryHDU(), fits.ImageHDU(weight, name="WGT"), fits.ImageHDU(data, header=header, name="SCI")]
    fits.HDUList(hdus).writeto(dest)  # astropy gzips a .gz name
    assert compress != "gz" or dest.read_bytes()[:2] == b"\x1f\x8b"
    return dest


def test_every_stage_reads_the_named_hdu_of_archive_frames(tmp_path):
    """frames.hdu through reference stacking, psf, inject and subtract, on .fits.fz and .fits.gz MEF frames."""
    from rbflow.inject import run_inject
    from rbflow.psf import run_psf
    from rbflow.reference import run_reference
    from rbflow.subtract import run_subtract

    telescope = load_telescope(REPO / "config" / "telescopes" / "decam.yaml")
    telescope["frames"]["hdu"] = "SCI"
    refs = [_mef_copy(DATA / f"DEC-OBS04{c}.mini.fits", tmp_path / f"ref{c}.fits.fz", compress="fz") for c in "ab"]
    sci = _mef_copy(FRAME, tmp_path / "sci.fits.gz", compress="gz")
    stack = tmp_path / "stack.fits"  # written by rbflow: its image is in the primary HDU, whatever frames.hdu says
    run_reference(
        frames=[str(p) for p in refs], out_fits=str(stack), telescope=telescope, stack=telescope["frames"]["stack"]
    )
    for path, name in ((stack, "stack"), (sci, "sci")):
        run_psf(path, tmp_path / f"{name}.psf.fits", tmp_path / f"{name}.psf.png", telescope)
    run_inject(
        sci,
        tmp_path / "sci.psf.fits",
        tmp_path / "sim.fits",
        tmp_path / "sim.ecsv",
        tmp_path / "sim.list",
        telescope,
        frame="sci",
        realization=0,
        seed=1,
        reference_path=stack,
    )
    out = tmp_path / "diff.fits"
    run_subtract(tmp_path / "sim.fits", stack, tmp_path / "sci.psf.fits", tmp_path / "stack.psf.fits", out, telescope)
    obs = tmp_path / "obs.fits"  # the observed path: the archive frame itself is the science image
    run_subtract(sci, stack, tmp_path / "sci.psf.fits", tmp_path / "stack.psf.fits", obs, telescope)
    plain = read_image(FRAME).data
    injected = read_image(tmp_path / "sim.fits", hdu="SCI").data
    # inject read the SCI HDU of the gzipped MEF: away from the 20 injected sources, the frame's own pixels.
    assert np.mean(injected == plain) > 0.5 and np.count_nonzero(injected != plain) > 100
    with fits.open(out) as hdul:
        # subtract saw the injected frame (not the weight map): its background-subtracted pixels.
        s = hdul["SCI"].data
        ok = np.isfinite(s)
        assert np.corrcoef(s[ok], injected[ok])[0, 1] > 0.99
        assert np.isfinite(hdul["DIFF"].data).mean() > 0.8
    with fits.open(obs) as hdul:
        s = hdul["SCI"].data
        ok = np.isfinite(s)
        assert np.corrcoef(s[ok], plain[ok])[0, 1] > 0.99
