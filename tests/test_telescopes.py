"""The shipped telescope files: one per alias of the older tool, valid, documented and usable.

The twelve aliases are the folders of the older tool's ``gmadet/config/`` (dcorre/gmadet). Every
file must validate, name itself after its file, give each filter a zeropoint or a header card,
name header keys that a FITS header can hold, and let ``rbflow.frames.frame_info`` collect the
frame facts from a header that carries those keys. One Snakemake dry run plans the real
telescopes together on empty placeholder frames at the paths their files name.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from astropy.io import fits
from helpers import REPO, SNAKEMAKE, make_workdir

from rbflow.config import load_telescope
from rbflow.errors import InputError
from rbflow.frames import frame_info

TEL_DIR = REPO / "config" / "telescopes"

#: Telescope aliases served by the older tool (folders of dcorre/gmadet gmadet/config/).
GMADET_ALIASES = [
    "FRAM-Auger",
    "FRAM-CTA-N",
    "IRIS",
    "KAIT",
    "Lisniky-AZT8",
    "OAJ-T80",
    "PS1",
    "TCA",
    "TCH",
    "TRE",
    "UBAI-T60N",
    "UBAI-T60S",
]

SHIPPED = sorted(TEL_DIR.glob("*.yaml"))
#: Header keys an ordinary FITS card can hold (8 characters of A-Z, 0-9, '-' and '_').
FITS_KEY = re.compile(r"[A-Z0-9_-]{1,8}")
#: The part of config/README.md written by hand (the generated reference follows the marker).
MARKER = "<!-- generated from src/rbflow/schemas by docs/config_reference.py: do not edit below -->"


def _load(name: str) -> dict:
    return load_telescope(TEL_DIR / f"{name}.yaml")


def test_every_gmadet_alias_has_a_telescope_file():
    stems = {p.stem for p in SHIPPED}
    missing = [a for a in GMADET_ALIASES if a not in stems]
    assert not missing, f"no config/telescopes/<alias>.yaml for {missing}"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_file_validates_and_names_itself(path):
    tel = load_telescope(path)  # raises ConfigError on any schema problem or a name/file mismatch
    assert tel["name"] == path.stem
    assert ("sky" in tel) != ("frames" in tel), "a telescope is either synthetic (sky) or real (frames)"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_filter_has_a_zeropoint_or_header_card(path):
    tel = load_telescope(path)
    stray = sorted(set(tel["zeropoints"]) - set(tel["filters"]))
    assert not stray, f"zeropoints for filters not in 'filters' (a typo?): {stray}"
    for band in tel["filters"]:
        zp = tel["zeropoints"].get(band)
        if zp is None:
            assert tel["header"]["zeropoint"], f"filter {band!r}: no zeropoint and no header key"
        else:
            assert 15.0 < zp < 40.0, f"filter {band!r}: zeropoint {zp} is not a magnitude for 1 ADU"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_header_keys_fit_a_fits_card_and_facts_are_plausible(path):
    tel = load_telescope(path)
    for fact, key in tel["header"].items():
        assert FITS_KEY.fullmatch(key), f"header.{fact} = {key!r} is not a FITS keyword"
    if tel["pixel_scale"] is not None:  # null: read from each frame's WCS
        assert 0.05 <= tel["pixel_scale"] <= 20.0
    if tel["gain"] is not None:
        assert 0.1 <= tel["gain"] <= 30.0
    if tel["read_noise"] is not None:
        assert 0.0 <= tel["read_noise"] <= 50.0
    if tel["saturation"] is not None:
        assert 1e3 <= tel["saturation"] <= 1e7


def _header_for(tel: dict) -> fits.Header:
    """A header carrying every card the telescope file sends rbflow to read."""
    keys = tel["header"]
    hdr = fits.Header()
    hdr[keys["filter"]] = tel["filters"][0]
    hdr[keys["exptime"]] = 60.0
    hdr[keys["date"]] = "2020-01-01T00:00:00"
    hdr[keys["zeropoint"]] = 24.5
    hdr[keys["gain"]] = 1.7
    hdr[keys["read_noise"]] = 9.0
    hdr[keys["saturation"]] = 45000.0
    return hdr


@pytest.mark.parametrize("alias", GMADET_ALIASES)
def test_frame_facts_come_from_file_then_header(alias):
    tel = _load(alias)
    hdr = _header_for(tel)
    info = frame_info(hdr, tel, path=f"{alias}.fits")
    for fact, header_value in (("gain", 1.7), ("read_noise", 9.0), ("saturation", 45000.0)):
        expected = tel[fact] if tel[fact] is not None else header_value
        assert getattr(info, fact) == pytest.approx(expected), fact
    assert info.exptime == 60.0  # read through header.exptime (EXPOSURE for the FRAMs)
    assert info.filter == tel["filters"][0]
    zp = tel["zeropoints"].get(tel["filters"][0])
    assert info.zeropoint == pytest.approx(zp if zp is not None else 24.5)
    # a fact the file leaves to the header is an error naming the key when the card is missing
    for fact in ("gain", "read_noise", "saturation"):
        if tel[fact] is None:
            del hdr[tel["header"][fact]]
            with pytest.raises(InputError, match=re.escape(tel["header"][fact])):
                frame_info(hdr, tel, path=f"{alias}.fits")
            break


def test_config_readme_cites_every_real_telescope(repo):
    """The hand-written part of config/README.md says where each real telescope's numbers come from."""
    text = (repo / "config" / "README.md").read_text()
    assert MARKER in text
    hand = text.split(MARKER)[0]
    assert "## Where the real telescopes' numbers come from" in hand
    for alias in GMADET_ALIASES:
        assert f"`{alias}`" in hand, f"config/README.md does not document {alias}"


def _placeholder_frames(work: Path, aliases: list[str]) -> None:
    """Empty files at the paths/globs the telescope files name (enough for a dry run)."""
    for alias in aliases:
        frames = _load(alias)["frames"]
        refs = frames["reference"] if isinstance(frames["reference"], list) else [frames["reference"]]
        for i, pattern in enumerate([*refs, *frames["science"]]):
            path = work / pattern.replace("*", f"placeholder{i}").replace("?", "x")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()


@pytest.mark.workflow
def test_dry_run_plans_every_real_telescope(tmp_path):
    """`snakemake -n` parses every real telescope file and plans its reference, PSF and subtraction jobs."""
    work = make_workdir(tmp_path / "work")
    _placeholder_frames(work, GMADET_ALIASES)
    proc = subprocess.run(
        [*SNAKEMAKE, "-n", "run", "--config", f"telescopes=[{','.join(GMADET_ALIASES)}]"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout + proc.stderr
    for alias in GMADET_ALIASES:
        assert f"results/{alias}/obs/subtract/" in out, alias
        assert f"resources/{alias}/reference/{alias}_ref.fits" in out, alias


def test_a_null_pixel_scale_is_read_from_the_wcs(tmp_path):
    from astropy.wcs import WCS

    from rbflow.errors import ConfigError
    from rbflow.frames import pixel_scale_of

    tel = load_telescope(REPO / "config/telescopes/UBAI-T60N.yaml")
    assert tel["pixel_scale"] is None
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.cd = [[-0.62 / 3600, 0.0], [0.0, 0.62 / 3600]]
    assert pixel_scale_of(tel, wcs) == pytest.approx(0.62, rel=1e-9)
    with pytest.raises(InputError, match="f.fits.*'pixel_scale: null'.*solve its astrometry"):
        pixel_scale_of(tel, None, path="f.fits")
    assert pixel_scale_of(dict(tel, pixel_scale=0.5), None) == 0.5
    # the embedded sky renders frames: it needs a number
    demo = (REPO / "config/telescopes/demo.yaml").read_text().replace("pixel_scale:", "pixel_scale: null #", 1)
    (tmp_path / "demo.yaml").write_text(demo)
    with pytest.raises(ConfigError, match="embedded sky needs 'pixel_scale'"):
        load_telescope(tmp_path / "demo.yaml")
