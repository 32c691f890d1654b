"""Bad input gets a clear error and loses nothing (issue 9), at the level of the function each rule calls.

Every case asserts the exception type (an :mod:`rbflow.errors` class), that the message names the
file at fault and says the fix (a key phrase), and that nothing was half-written: an output folder
holding another frame's result is byte-identical afterwards, with no new or temporary file.
Zero-row candidate tables must give typed empty outputs at every downstream stage.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from astropy.io import fits
from astropy.table import Table
from helpers import REPO, synthetic_stamps

from rbflow.config import load_config, load_telescope
from rbflow.crossmatch import run_crossmatch
from rbflow.cutouts import CHANNELS, write_cutouts
from rbflow.datacube import NORMALISATION, build_datacube
from rbflow.detect import empty_table
from rbflow.errors import ConfigError, InputError
from rbflow.frames import frame_info, frames_of
from rbflow.infer import infer_cutouts, load_model
from rbflow.io import read_image, write_table
from rbflow.model import ModelConfig, build_model
from rbflow.psf import PSFModel, moffat_epsf, run_psf
from rbflow.sky import simulate_frame
from rbflow.subtract import run_subtract
from rbflow.validate import FrameCheckError, check_frame, run_validate, write_bad_frames

SEED = 7
SIZE = 31  # cutout side of the tiny telescope


# --------------------------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> dict:
    """The validated tiny telescope (256 x 256 synthetic frames)."""
    return load_telescope(REPO / "tests/data/telescopes/tiny.yaml")


@pytest.fixture(scope="module")
def frames(tiny, tmp_path_factory) -> dict[str, Path]:
    """Good tiny frames: two of field fld00 (reference, epoch 1) and the reference of field fld01."""
    root = tmp_path_factory.mktemp("frames")
    out = {}
    for name in ("fld00_r_ref", "fld00_r_e1", "fld01_g_ref"):
        hdu, _ = simulate_frame(tiny, name, seed=SEED)
        hdu.writeto(root / f"{name}.fits")
        out[name] = root / f"{name}.fits"
    return out


@pytest.fixture(scope="module")
def psf_file(tmp_path_factory) -> Path:
    """A Moffat PSF model of a tiny frame (what the psf stage writes)."""
    path = tmp_path_factory.mktemp("psf") / "psf.fits"
    cube = moffat_epsf(2.8, size=25, oversampling=3)[None]
    PSFModel(
        cube, oversampling=3, size=25, shape=(256, 256), grid=(1, 1), n_stars=[10], sources=["cell"], name="psf"
    ).write(path)
    return path


@pytest.fixture
def out(tmp_path) -> Path:
    """An output folder already holding another frame's results (which must survive any failure)."""
    folder = tmp_path / "out"
    (folder / "other").mkdir(parents=True)
    (folder / "other.fits").write_bytes(b"another frame's result")
    (folder / "other" / "table.ecsv").write_text("# another frame's table\n")
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def fails_cleanly(call: Callable[[], object], error: type[Exception], names: str, fix: str, folder: Path) -> Exception:
    """Run ``call``; check the error type, that the message names ``names`` and says ``fix``, and that
    ``folder`` is unchanged (no output, no temporary file)."""
    before = snapshot(folder)
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert names in message, message
    assert fix in message, message
    assert snapshot(folder) == before
    return info.value


def write_image(path: Path, data: np.ndarray, header: fits.Header | None = None) -> Path:
    fits.PrimaryHDU(data, header=header).writeto(path)
    return path


def write_cutout(path: Path, stamp: np.ndarray, *, cid: str, image: str) -> None:
    """One cutout file as rbflow.cutouts writes it: primary header + SCI, REF, DIFF, SCORR HDUs."""
    header = fits.Header({"ID": cid, "IMAGE": image, "X": 15.0, "Y": 15.0, "MAG": 20.0, "SNR": 10.0, "FLAGS": 0})
    hdus = [fits.PrimaryHDU(header=header)]
    hdus += [fits.ImageHDU(plane.astype(np.float32), name=name) for name, plane in zip(CHANNELS, [*stamp, stamp[2]])]
    path.parent.mkdir(parents=True, exist_ok=True)
    fits.HDUList(hdus).writeto(path)


def header_of(path: Path, *, wcs: bool = True) -> fits.Header:
    """Header of a good frame (frame facts, and its WCS unless ``wcs`` is False)."""
    header = fits.getheader(path)
    for key in ("NAXIS", "NAXIS1", "NAXIS2", "BITPIX", "SIMPLE", "EXTEND"):
        header.remove(key, ignore_missing=True)
    if not wcs:
        for key in list(header):
            if key[:5] in ("CTYPE", "CRVAL", "CRPIX", "CUNIT", "WCSAX", "RADES") or key.startswith("CD"):
                header.remove(key)
    return header


# --------------------------------------------------------------------------------------------
# FITS frames: truncated / corrupt, no image HDU, wrong dtype, all-NaN or constant
# --------------------------------------------------------------------------------------------


def _truncated_data(good: Path, path: Path) -> None:
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _truncated_header(good: Path, path: Path) -> None:
    path.write_bytes(good.read_bytes()[:1000])


def _garbage(good: Path, path: Path) -> None:
    path.write_bytes(b"\x00\x17not a FITS file" * 300)


def _empty_file(good: Path, path: Path) -> None:
    path.write_bytes(b"")


def _table_only(good: Path, path: Path) -> None:
    col = fits.Column("flux", "E", array=np.arange(5, dtype=np.float32))
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns([col])]).writeto(path)


def _cube(good: Path, path: Path) -> None:
    write_image(path, np.random.default_rng(1).normal(size=(3, 64, 64)).astype(np.float32))


def _all_nan(good: Path, path: Path) -> None:
    write_image(path, np.full((64, 64), np.nan, np.float32), header_of(good))


def _constant(good: Path, path: Path) -> None:
    write_image(path, np.full((64, 64), 120.0, np.float32), header_of(good))


BAD_FRAMES = [
    # id, how the file is broken, what the message says is wrong, the fix it names
    ("truncated-data", _truncated_data, "is not a readable FITS file", "copy it again from the source"),
    ("truncated-header", _truncated_header, "is not a readable FITS file", "copy it again from the source"),
    ("corrupt-bytes", _garbage, "is not a readable FITS file", "copy it again from the source"),
    ("empty-file", _empty_file, "is not a readable FITS file", "copy it again from the source"),
    ("no-image-hdu", _table_only, "has no 2-D image HDU", "give the file holding the frame's pixels"),
    ("3d-cube", _cube, "has no 2-D image HDU", "give the file holding the frame's pixels"),
    ("all-nan", _all_nan, "has no finite pixel", "remove it"),
    ("constant", _constant, "is constant", "remove it"),
]


@pytest.mark.parametrize("maker, problem, fix", [c[1:] for c in BAD_FRAMES], ids=[c[0] for c in BAD_FRAMES])
def test_bad_frame_fails_the_psf_stage_cleanly(maker, problem, fix, frames, tiny, tmp_path, out):
    bad = tmp_path / "bad.fits"
    maker(frames["fld00_r_e1"], bad)
    exc = fails_cleanly(lambda: run_psf(bad, out / "bad.fits", out / "bad.png", tiny), InputError, f"'{bad}'", fix, out)
    assert problem in str(exc)


@pytest.mark.parametrize("maker, problem, fix", [c[1:] for c in BAD_FRAMES], ids=[c[0] for c in BAD_FRAMES])
def test_bad_frame_fails_the_read_check(maker, problem, fix, frames, tiny, tmp_path):
    bad = tmp_path / "bad.fits"
    maker(frames["fld00_r_e1"], bad)
    with pytest.raises(FrameCheckError) as info:
        check_frame(bad, tiny)
    assert info.value.check == "read" and info.value.path == str(bad)
    assert problem in str(info.value) and fix in str(info.value)


def test_missing_frame_names_the_path_and_the_config(tiny, tmp_path, out):
    missing = tmp_path / "nosuch.fits"
    fails_cleanly(
        lambda: run_psf(missing, out / "x.fits", out / "x.png", tiny),
        InputError,
        f"'{missing}' does not exist",
        "check the frame paths in the telescope file",
        out,
    )


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.uint8, np.float64])
def test_integer_and_double_frames_are_read_as_float32(dtype, tmp_path):
    data = np.random.default_rng(2).uniform(10, 200, (32, 32)).astype(dtype)
    image = read_image(write_image(tmp_path / "f.fits", data))
    assert image.data.dtype == np.float32
    np.testing.assert_allclose(image.data, data.astype(np.float32))


def test_a_table_hdu_asked_for_as_image_is_refused(tmp_path):
    """Wrong dtype: the named HDU holds a table (records), not pixels."""
    path = tmp_path / "f.fits"
    col = fits.Column("flux", "E", array=np.arange(5, dtype=np.float32))
    fits.HDUList(
        [fits.PrimaryHDU(np.ones((4, 4), np.float32)), fits.BinTableHDU.from_columns([col], name="CAT")]
    ).writeto(path)
    with pytest.raises(
        InputError,
        match=r"'.*f\.fits' has no 2-D image HDU named 'CAT' \(its HDUs: .*'CAT'.*\): give the file.*frames\.hdu",
    ):
        read_image(path, hdu="CAT")


# --------------------------------------------------------------------------------------------
# WCS: missing, nonsense, reference not overlapping
# --------------------------------------------------------------------------------------------


def _with_header(good: Path, path: Path, **cards: float) -> Path:
    header = header_of(good)
    header.update(cards)
    return write_image(path, fits.getdata(good), header)


def test_no_wcs_fails_the_subtraction_naming_the_frame(frames, tiny, psf_file, tmp_path, out):
    good = frames["fld00_r_e1"]
    sci = write_image(tmp_path / "nowcs.fits", fits.getdata(good), header_of(good, wcs=False))
    fails_cleanly(
        lambda: run_subtract(sci, frames["fld00_r_ref"], psf_file, psf_file, out / "d.fits", tiny),
        InputError,
        f"'{sci}' has no celestial WCS",
        "solve its astrometry first",
        out,
    )
    with pytest.raises(FrameCheckError, match="has no celestial WCS") as info:
        check_frame(sci, tiny)
    assert info.value.check == "wcs"


def test_unparsable_wcs_fails_on_reading(frames, tiny, psf_file, tmp_path, out):
    sci = _with_header(frames["fld00_r_e1"], tmp_path / "cd0.fits", CD1_1=0.0, CD1_2=0.0, CD2_1=0.0, CD2_2=0.0)
    fails_cleanly(
        lambda: run_subtract(sci, frames["fld00_r_ref"], psf_file, psf_file, out / "d.fits", tiny),
        InputError,
        f"'{sci}' has a WCS that astropy cannot parse",
        "fix its header",
        out,
    )


def test_wcs_with_a_wrong_pixel_scale_fails_the_wcs_check(frames, tiny, tmp_path):
    sci = _with_header(frames["fld00_r_e1"], tmp_path / "scale.fits", CD1_1=-0.01, CD2_2=0.01, CD1_2=0.0, CD2_1=0.0)
    with pytest.raises(FrameCheckError, match=r"WCS pixel scale is 36 arcsec/px.*solve its astrometry again") as info:
        check_frame(sci, tiny)
    assert info.value.check == "wcs" and str(sci) in str(info.value)


def test_reference_not_overlapping_fails_the_overlap_check(frames, tiny, tmp_path):
    ref = run_validate(frames["fld01_g_ref"], tmp_path / "ref.json", tiny, frame="fld01_g_ref")
    assert ref["ok"]
    with pytest.raises(FrameCheckError, match=r"only 0% of it lies on its reference") as info:
        check_frame(frames["fld00_r_e1"], tiny, reference=ref)
    assert info.value.check == "overlap"
    assert str(frames["fld00_r_e1"]) in str(info.value) and str(frames["fld01_g_ref"]) in str(info.value)
    assert "check that the frame belongs to the reference's field" in str(info.value)


def test_reference_not_overlapping_fails_the_subtraction_naming_both_files(frames, tiny, psf_file, out):
    sci, ref = frames["fld00_r_e1"], frames["fld01_g_ref"]
    exc = fails_cleanly(
        lambda: run_subtract(sci, ref, psf_file, psf_file, out / "d.fits", tiny),
        InputError,
        f"'{sci}'",
        "check that the frames are of one field",
        out,
    )
    assert f"'{ref}'" in str(exc)


def test_reference_not_overlapping_is_reported_as_such_without_warnings(frames, tiny, psf_file, out):
    sci, ref = frames["fld00_r_e1"], frames["fld01_g_ref"]
    fails_cleanly(
        lambda: run_subtract(sci, ref, psf_file, psf_file, out / "d.fits", tiny),
        InputError,
        f"'{sci}' does not overlap reference '{ref}'",
        "of one field",
        out,
    )


def test_bad_frame_of_a_stacked_reference_stops_or_is_left_out(frames, tiny, tmp_path, out):
    from rbflow.reference import run_reference

    broken = tmp_path / "epoch_b.fits"
    _truncated_data(frames["fld00_r_ref"], broken)
    epoch = [str(frames["fld00_r_ref"]), str(broken), str(frames["fld00_r_e1"])]
    stack = {"combine": "mean", "clip": 5.0, "refine_astrometry": True, "smooth_astrometry": True, "scale": True}
    fails_cleanly(
        lambda: run_reference(frames=epoch, out_fits=str(out / "ref.fits"), telescope=tiny, stack=stack),
        InputError,
        f"'{broken}' is not a readable FITS file",
        "copy it again from the source",
        out,
    )
    result = run_reference(frames=epoch, out_fits=str(out / "ref.fits"), telescope=tiny, stack=stack, skip_bad=True)
    assert result["n"] == 2
    header = fits.getheader(out / "ref.fits")
    assert [header["IMCMB001"], header["IMCMB002"]] == ["fld00_r_ref.fits", "fld00_r_e1.fits"]
    all_bad = [str(broken), str(broken)]
    fails_cleanly(
        lambda: run_reference(
            frames=all_bad, out_fits=str(out / "ref2.fits"), telescope=tiny, stack=stack, skip_bad=True
        ),
        InputError,
        "every frame of the reference epoch is bad",
        "fix or replace the files",
        out,
    )


def test_a_good_pair_passes_every_check(frames, tiny, tmp_path):
    ref = run_validate(frames["fld00_r_ref"], tmp_path / "ref.json", tiny, frame="fld00_r_ref")
    sci = run_validate(
        frames["fld00_r_e1"], tmp_path / "sci.json", tiny, frame="fld00_r_e1", reference_status=tmp_path / "ref.json"
    )
    assert ref["ok"] and sci["ok"] and len(sci["stars"]) >= 3
    assert len(write_bad_frames([tmp_path / "ref.json", tmp_path / "sci.json"], tmp_path / "bad.ecsv")) == 0


# --------------------------------------------------------------------------------------------
# Stars: no usable PSF star, saturated everywhere, too few matched stars for the flux ratio
# --------------------------------------------------------------------------------------------


def _noise_frame(good: Path, path: Path, level: float = 100.0) -> Path:
    data = np.random.default_rng(3).normal(level, 5.0, (256, 256)).astype(np.float32)
    return write_image(path, data, header_of(good))


def test_frame_without_stars_fails_the_psf_stage(frames, tiny, tmp_path, out):
    bad = _noise_frame(frames["fld00_r_e1"], tmp_path / "nostar.fits")
    fails_cleanly(
        lambda: run_psf(bad, out / "p.fits", out / "p.png", tiny),
        InputError,
        f"'{bad}': no usable PSF star",
        "set 'psf.analytic_fallback: true'",
        out,
    )
    with pytest.raises(FrameCheckError, match="no usable PSF star") as info:
        check_frame(bad, tiny)
    assert info.value.check == "psf stars"


def test_saturated_frame_fails_the_psf_stage_and_the_saturation_check(frames, tiny, tmp_path, out):
    bad = _noise_frame(frames["fld00_r_e1"], tmp_path / "saturated.fits", level=60000.0)
    fails_cleanly(
        lambda: run_psf(bad, out / "p.fits", out / "p.png", tiny),
        InputError,
        f"'{bad}': every pixel is saturated",
        "remove the frame, or fix 'saturation'",
        out,
    )
    with pytest.raises(FrameCheckError, match=r"100% of its pixels are at or above the saturation level") as info:
        check_frame(bad, tiny)
    assert info.value.check == "saturation" and "remove the frame" in str(info.value)


def test_too_few_matched_stars_fail_the_flux_ratio(frames, tiny, psf_file, tmp_path, out):
    ref = _noise_frame(frames["fld00_r_ref"], tmp_path / "starless_ref.fits")
    sci = frames["fld00_r_e1"]
    exc = fails_cleanly(
        lambda: run_subtract(sci, ref, psf_file, psf_file, out / "d.fits", tiny),
        InputError,
        "cannot fit the flux ratio",
        "needs at least 3 unsaturated isolated stars",
        out,
    )
    assert f"'{sci}'" in str(exc) and f"'{ref}'" in str(exc)


def test_too_few_matched_stars_fail_the_matched_stars_check(frames, tiny, tmp_path):
    ref = run_validate(frames["fld00_r_ref"], tmp_path / "ref.json", tiny, frame="fld00_r_ref")
    ref["stars"] = ref["stars"][:2]
    with pytest.raises(FrameCheckError, match=r"only [0-2] of its stars have a star of its reference") as info:
        check_frame(frames["fld00_r_e1"], tiny, reference=ref)
    assert info.value.check == "matched stars" and "remove the frame" in str(info.value)


def test_bad_reference_makes_its_science_frames_bad(frames, tiny, tmp_path):
    broken = tmp_path / "ref.fits"
    _truncated_data(frames["fld00_r_ref"], broken)
    ref = run_validate(broken, tmp_path / "ref.json", tiny, frame="fld00_r_ref")
    sci = run_validate(
        frames["fld00_r_e1"], tmp_path / "sci.json", tiny, frame="fld00_r_e1", reference_status=tmp_path / "ref.json"
    )
    assert not ref["ok"] and not sci["ok"] and sci["check"] == "reference" and sci["file"] == str(broken)
    table = write_bad_frames([tmp_path / "ref.json", tmp_path / "sci.json"], tmp_path / "bad.ecsv")
    assert list(table["frame"]) == ["fld00_r_ref", "fld00_r_e1"]
    assert list(table["stage"]) == ["read", "reference"]
    assert all("copy it again from the source" in m for m in table["message"])
    assert Table.read(tmp_path / "bad.ecsv").colnames == ["frame", "stage", "file", "message"]


# --------------------------------------------------------------------------------------------
# Zero candidates: typed empty outputs at every downstream stage
# --------------------------------------------------------------------------------------------


@pytest.fixture
def no_candidates(tmp_path) -> Path:
    path = tmp_path / "detect" / "img_sim0.ecsv"
    write_table(empty_table("img_sim0"), path)
    return path


def test_detect_empty_table_is_typed():
    table = empty_table("img")
    assert len(table) == 0
    assert table["x"].dtype == np.float64 and table["flags"].dtype == np.int32 and table["id"].dtype.kind == "U"
    assert str(table["ra"].unit) == "deg"


def test_no_candidate_gives_an_empty_cutout_folder_with_a_typed_listing(no_candidates, tmp_path):
    folder = tmp_path / "cutouts" / "img_sim0"
    manifest = write_cutouts(tmp_path / "unused.fits", no_candidates, folder, size=SIZE, png=True)
    assert len(manifest) == 0 and {"id", "x", "file", "xpix0"} <= set(manifest.colnames)
    assert sorted(p.name for p in folder.iterdir()) == ["cutouts.ecsv"]
    listing = Table.read(folder / "cutouts.ecsv")
    assert len(listing) == 0 and listing["x"].dtype == np.float64 and listing["xpix0"].dtype == np.int64
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]


def test_no_candidate_crossmatches_as_every_source_missed(no_candidates, tmp_path):
    injected = Table({"id": [0, 1], "x": [10.0, 50.0], "y": [20.0, 60.0], "mag": [18.0, 19.0]})
    write_table(injected, tmp_path / "inject.ecsv")
    per, labels = run_crossmatch(
        no_candidates,
        tmp_path / "inject.ecsv",
        tmp_path / "x.ecsv",
        tmp_path / "x.dat",
        tmp_path / "x.per_candidate.ecsv",
        radius=2.0,
    )
    assert len(per) == 2 and len(labels) == 0
    assert Table.read(tmp_path / "x.per_candidate.ecsv").colnames == labels.colnames
    assert (tmp_path / "x.dat").exists()


def test_zero_candidates_flow_through_every_stage(no_candidates, model, tmp_path, out):
    """detect -> cutouts -> crossmatch -> label -> datacube / infer, each on the previous stage's empty output."""
    from rbflow.crossmatch import label_cutouts

    folder = tmp_path / "cutouts" / "img_sim0"
    write_cutouts(tmp_path / "unused.fits", no_candidates, folder, size=SIZE, png=True)
    write_table(Table({"id": [0], "x": [10.0], "y": [20.0], "mag": [18.0]}), tmp_path / "inject.ecsv")
    run_crossmatch(
        no_candidates,
        tmp_path / "inject.ecsv",
        tmp_path / "x.ecsv",
        tmp_path / "x.dat",
        tmp_path / "x.per_candidate.ecsv",
        radius=2.0,
    )
    training = tmp_path / "training"
    labels = label_cutouts([tmp_path / "x.per_candidate.ecsv"], [folder], training)
    assert len(labels) == 0 and len(Table.read(training / "labels.ecsv")) == 0
    fails_cleanly(
        lambda: build_datacube(
            training, out / "datacube.npz", channels=["SCI", "REF", "DIFF"], crop=None, frac_true=None, seed=1
        ),
        InputError,
        f"training folder '{training / 'true'}' has no cutout",
        "label some candidates real",
        out,
    )
    table = infer_cutouts(folder, model, out / "img.ecsv", out_kept=out / "img_kept.ecsv")
    assert len(table) == 0 and len(Table.read(out / "img_kept.ecsv")) == 0


def test_datacube_with_an_empty_class_is_a_clear_error(tmp_path, out):
    training = tmp_path / "training"
    X, _ = synthetic_stamps(4, size=SIZE, seed=2)
    for i, stamp in enumerate(X):
        write_cutout(training / "true" / f"img_sim0_{i}.fits", stamp, cid=f"img_sim0_{i}", image="img_sim0")
    (training / "false").mkdir()
    fails_cleanly(
        lambda: build_datacube(
            training, out / "datacube.npz", channels=["SCI", "REF", "DIFF"], crop=None, frac_true=None, seed=1
        ),
        InputError,
        f"training folder '{training / 'false'}' has no cutout",
        "label some candidates bogus",
        out,
    )


def test_inference_of_an_empty_cutout_folder_is_a_typed_empty_table(model, tmp_path, out):
    folder = tmp_path / "cutouts" / "img"
    folder.mkdir(parents=True)
    table = infer_cutouts(folder, model, out / "img.ecsv", out_dat=out / "img.dat", out_kept=out / "img_kept.ecsv")
    assert len(table) == 0 and {"id", "label0", "label1"} <= set(table.colnames)
    assert table["label1"].dtype == np.float64
    written = Table.read(out / "img.ecsv")
    assert len(written) == 0 and written.colnames == table.colnames
    assert len(Table.read(out / "img_kept.ecsv")) == 0


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def _run_config(tmp_path: Path, **keys) -> dict:
    return {"telescopes": ["tiny"], "telescope_dir": str(REPO / "tests/data/telescopes"), **keys}


@pytest.mark.parametrize(
    "keys, names, fix",
    [
        ({"tarin": {"epochs": 3}}, "unknown key(s) 'tarin' at top level", "allowed keys:"),
        ({"train": {"epoch": 3}}, "unknown key(s) 'epoch' at train", "allowed keys:"),
        ({"seed": "abc"}, "key 'seed': 'abc' is not of type 'integer'", "Global random seed"),
        ({"on_bad_frame": "ignore"}, "key 'on_bad_frame': 'ignore' is not one of", "(allowed: stop, skip)"),
    ],
    ids=["unknown-key", "unknown-nested-key", "wrong-type", "wrong-enum"],
)
def test_bad_run_config_names_the_key_and_what_is_allowed(keys, names, fix, tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(_run_config(tmp_path, **keys), source="my/config.yaml")
    assert "config 'my/config.yaml'" in str(info.value)
    assert names in str(info.value) and fix in str(info.value)


def test_missing_telescope_file_lists_the_available_ones(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(_run_config(tmp_path, telescopes=["nosuch"]))
    assert f"'{REPO}/tests/data/telescopes/nosuch.yaml' does not exist" in str(info.value)
    assert "available: realpsf, tiny" in str(info.value) and "TEMPLATE.yaml" in str(info.value)


def test_on_bad_frame_defaults_to_stop(tmp_path):
    assert load_config(_run_config(tmp_path))["on_bad_frame"] == "stop"


def _real_telescope(tmp_path: Path, **frames) -> dict:
    text = (REPO / "config/telescopes/decam.yaml").read_text()
    tel = yaml.safe_load(text)
    tel["frames"] = {"science": [str(tmp_path / "sci*.fits")], "reference": str(tmp_path / "ref.fits"), **frames}
    path = tmp_path / "decam.yaml"
    path.write_text(yaml.safe_dump(tel))
    return load_telescope(path)


def test_frames_missing_on_disk_name_the_pattern(tmp_path):
    tel = _real_telescope(tmp_path)
    with pytest.raises(ConfigError, match=r"'frames.science' entry '.*sci\*\.fits' matches no file; check the path"):
        frames_of(tel)


def test_missing_reference_file_names_the_path(tiny, tmp_path, frames, out):
    (tmp_path / "sci1.fits").write_bytes(frames["fld00_r_e1"].read_bytes())
    tel = _real_telescope(tmp_path)
    ref = next(f for f in frames_of(tel) if f.reference is None)
    fails_cleanly(
        lambda: run_psf(ref.path, out / "p.fits", out / "p.png", tel),
        InputError,
        f"'{tmp_path / 'ref.fits'}' does not exist",
        "check the frame paths in the telescope file",
        out,
    )


def test_zeropoint_neither_in_telescope_file_nor_header(frames, tiny, tmp_path, out):
    header = header_of(frames["fld00_r_e1"])
    del header["MAGZP"]
    bad = write_image(tmp_path / "nozp.fits", fits.getdata(frames["fld00_r_e1"]), header)
    fails_cleanly(
        lambda: run_psf(bad, out / "p.fits", out / "p.png", tiny),
        InputError,
        f"'{bad}': no zeropoint for filter 'r'",
        "add 'zeropoints: {r: ...}' to telescope file 'tiny.yaml'",
        out,
    )
    with pytest.raises(FrameCheckError, match="no zeropoint") as info:
        check_frame(bad, tiny)
    assert info.value.check == "frame facts"


def test_frame_fact_that_is_not_a_number(frames, tiny, tmp_path):
    header = header_of(frames["fld00_r_e1"])
    tel = {**tiny, "gain": None}
    header["GAIN"] = "fast"
    with pytest.raises(InputError, match=r"frame 'f.fits': 'gain' = 'fast' is not a number"):
        frame_info(header, tel, path="f.fits")


# --------------------------------------------------------------------------------------------
# Model files: corrupt, trained on another stamp size or channel set, pickle-bearing
# --------------------------------------------------------------------------------------------


def write_model(folder: Path, *, channels: list[str], stamp_size: int, in_channels: int | None = None) -> Path:
    """An untrained model as rbflow.train writes it: model.pt (state_dict) + model.json."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig(in_channels=in_channels or len(channels), stamp_size=stamp_size, widths=[4, 8])
    torch.manual_seed(0)
    torch.save(build_model(cfg).state_dict(), folder / "model.pt")
    meta = {
        "model": cfg.to_dict(),
        "channels": channels,
        "stamp_size": stamp_size,
        "cutout_size": stamp_size,
        "normalisation": NORMALISATION,
        "threshold": 0.5,
        "temperature": 1.0,
    }
    (folder / "model.json").write_text(json.dumps(meta))
    return folder / "model.pt"


@pytest.fixture
def model(tmp_path) -> Path:
    return write_model(tmp_path / "model", channels=["SCI", "REF", "DIFF"], stamp_size=SIZE)


@pytest.fixture
def cutout_folder(tmp_path) -> Path:
    folder = tmp_path / "cutouts" / "img"
    X, _ = synthetic_stamps(3, size=SIZE, seed=1)
    for i, stamp in enumerate(X):
        write_cutout(folder / f"img_{i}.fits", stamp, cid=f"img_{i}", image="img")
    return folder


def test_corrupt_model_file_is_refused(model, cutout_folder, out):
    model.write_bytes(model.read_bytes()[:300])
    fails_cleanly(
        lambda: infer_cutouts(cutout_folder, model, out / "i.ecsv"),
        InputError,
        f"'{model}' cannot be loaded as plain weights",
        "use the model.pt written by 'rbflow train'",
        out,
    )


class _Payload:
    """Unpickling this would run code (create a file): ``weights_only=True`` must refuse it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_bearing_model_file_is_refused_without_running_it(model, cutout_folder, tmp_path, out):
    marker = tmp_path / "pwned"
    torch.save({"weights": torch.zeros(2), "payload": _Payload(marker)}, model)
    fails_cleanly(
        lambda: infer_cutouts(cutout_folder, model, out / "i.ecsv"),
        InputError,
        f"'{model}'",
        "holds pickled Python objects, which rbflow refuses to run",
        out,
    )
    assert not marker.exists()


def test_model_trained_on_another_stamp_size_is_refused(tmp_path, cutout_folder, out):
    model = write_model(tmp_path / "m21", channels=["SCI", "REF", "DIFF"], stamp_size=21)
    exc = fails_cleanly(
        lambda: infer_cutouts(cutout_folder, model, out / "i.ecsv"),
        InputError,
        "expects stamps of 21 px",
        "remake the cutouts with size 21 or retrain",
        out,
    )
    assert str(cutout_folder) in str(exc)  # names the first cutout checked


def test_model_trained_on_a_channel_the_cutouts_lack_is_refused(tmp_path, cutout_folder, out):
    model = write_model(tmp_path / "mvar", channels=["SCI", "REF", "VAR"], stamp_size=SIZE)
    fails_cleanly(
        lambda: infer_cutouts(cutout_folder, model, out / "i.ecsv"), InputError, "has no VAR HDU", "remake it", out
    )


def test_model_whose_weights_do_not_fit_its_channel_set_is_refused(tmp_path, cutout_folder, out):
    model = write_model(tmp_path / "m2", channels=["SCI", "REF", "DIFF"], stamp_size=SIZE, in_channels=2)
    meta = json.loads(model.with_suffix(".json").read_text())
    meta["model"]["in_channels"] = 3
    model.with_suffix(".json").write_text(json.dumps(meta))
    fails_cleanly(
        lambda: infer_cutouts(cutout_folder, model, out / "i.ecsv"),
        InputError,
        f"'{model}' does not match the architecture",
        "keep the two files of one training together",
        out,
    )


def test_a_good_model_loads(model):
    net, meta = load_model(model)
    assert meta["stamp_size"] == SIZE and not net.training


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "t.ecsv"
    write_table(Table({"a": [1, 2]}), path)
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - whatever astropy raises, the old file must survive
        write_table(Table({"a": np.array([object(), object()], dtype=object)}), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.ecsv"]
