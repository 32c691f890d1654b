"""Tests of rbflow.survey: PS1 references from a local stand-in of the STScI services, checked against the demo sky's truth.

The fake service answers ``ps1filenames.py`` with the listing table as PS1 writes it and
``fitscut.cgi`` with FITS cutouts rendered from the demo field's true star catalogue at PS1's
0.25 arcsec/px: two sky cells split at the frame's centre declination (so the reference is a
mosaic), stacks and warps in linear counts (fitscut.cgi converts the full sky-cell stacks' asinh
luptitudes to linear flux and drops BSOFTEN/BOFFSET: PS1 image documentation), stacks at
zeropoint 25 + 2.5 log10(EXPTIME), warps with their own exposure and ``FPA.ZP``, and mask images
flagging blank pixels outside each cell and a saturated blob.
"""

from __future__ import annotations

import io
import json
import math
import re
import runpy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from fakeservice import FakeService
from helpers import CLEAN_SKY

from rbflow import sky
from rbflow.config import check_schema, load_telescope
from rbflow.errors import ConfigError, InputError
from rbflow.frames import frames_of
from rbflow.io import read_image

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "config" / "telescopes" / "demo.yaml"
SEED = 12345
SKY = dict(fields=1, epochs=1, size=[256, 256], stars=3000, **CLEAN_SKY, wcs_error=0.0, distortion_residual=0.0)
A = 2.5 / math.log(10.0)
FWHM_ARCSEC = 1.2
#: Exposure (s) and FPA.ZP of the stacks and the three warps.
STACK = (1000.0, 25.0)
WARPS = ((45.0, 24.90), (40.0, 25.05), (50.0, 24.97))
#: A saturated (masked) blob in sky cell 0 and every warp: (ra offset, dec offset) from the frame centre (arcsec), radius (arcsec).
BLOB = (-60.0, -60.0, 6.0)


@pytest.fixture(scope="module")
def science(tmp_path_factory):
    """The science frame (demo fld00_r_e1, true WCS in its header) written to disk, and its stars."""
    tel = load_telescope(DEMO)
    tel["sky"] = dict(SKY)
    check_schema(tel["sky"], "sky.schema.yaml", "test sky block")
    hdu, truth = sky.simulate_frame(tel, "fld00_r_e1", seed=SEED)
    path = tmp_path_factory.mktemp("sci") / "sci.fits"
    hdu.writeto(path)
    del tel["sky"]
    tel.update(name="cam")
    stars = truth[truth["kind"] == "star"]
    return tel, path, stars, WCS(hdu.header)


def _files(centre_dec: float, bands=("r",)) -> dict[str, dict]:
    """The fake PS1 files per band: two stack cells (split at centre_dec), their masks, three warps of cell 0 and their masks."""
    files = {}
    for b in bands:
        for cell in (0, 1):
            base = f"/rings.v3.skycell/1333/05{cell}/rings.v3.skycell.1333.05{cell}"
            files[f"{base}.stk.{b}.unconv.fits"] = dict(
                cell=cell, kind="stack", exptime=STACK[0], zp=STACK[1], mask=False, band=b
            )
            files[f"{base}.stk.{b}.unconv.mask.fits"] = dict(cell=cell, kind="stack.mask", mask=True, band=b)
        base = "/rings.v3.skycell/1333/050/rings.v3.skycell.1333.050"
        for k, (exptime, zp) in enumerate(WARPS):
            files[f"{base}.wrp.{b}.5536{k}_40591.fits"] = dict(
                cell=None, kind="warp", exptime=exptime, zp=zp, mask=False, k=k, band=b
            )
            files[f"{base}.wrp.{b}.5536{k}_40591.mask.fits"] = dict(cell=None, kind="warp.mask", mask=True, k=k, band=b)
    for f in files.values():
        f["centre_dec"] = centre_dec
    return files


def _in_cell(cell, dec, centre_dec):
    return dec < centre_dec + 0.001 if cell == 0 else dec >= centre_dec - 0.001


def _service(stars: Table, centre: tuple[float, float], mags: dict | None = None):
    """The fake STScI services; ``mags``: each band's star magnitudes (default r: the catalogue's)."""
    mags = mags or {"r": np.asarray(stars["mag"])}
    files = _files(centre[1], tuple(mags))

    def listing(q):
        ra, dec = float(q["ra"]), float(q["dec"])
        lines = ["projcell subcell ra dec filter mjd type filename shortname badflag"]
        for name, f in files.items():
            if f["kind"] != q["type"] or q["filters"] != f["band"]:
                continue
            if f["cell"] is not None and not _in_cell(f["cell"], dec, f["centre_dec"]):
                continue
            short = name.rsplit("/", 1)[1]
            lines.append(f"1333 5{f['cell'] or 0} {ra:.6f} {dec:.6f} {f['band']} 0 {f['kind']} {name} {short} 0")
        return 200, "text/plain", ("\n".join(lines) + "\n").encode()

    def cutout(q):
        f = files[q["red"]]
        ra0, dec0, size = float(q["ra"]), float(q["dec"]), int(q["size"])
        header = _tan(ra0, dec0, size, 0.25)
        wcs = WCS(header)
        yy, xx = np.mgrid[0:size, 0:size]
        ra_p, dec_p = wcs.all_pix2world(xx, yy, 0)
        blank = np.zeros((size, size), bool) if f["cell"] is None else ~_in_cell(f["cell"], dec_p, f["centre_dec"])
        d_ra = (ra_p - centre[0]) * math.cos(math.radians(centre[1])) * 3600 - BLOB[0]
        blob = np.hypot(d_ra, (dec_p - centre[1]) * 3600 - BLOB[1]) < BLOB[2]
        if f["mask"]:
            data = np.where(blank, 8, 0) | np.where(blob, 32, 0) | 4096  # 4096: informational
            return 200, "application/fits", _fits_bytes(data.astype(np.int16), header)
        zp = f["zp"] + 2.5 * math.log10(f["exptime"])
        image = _render(stars, wcs, size, zp, 0.25, seed=f.get("k", 7), mag=mags[f["band"]])
        image[blob] = 10 ** (0.4 * (zp - 12.0))  # a saturated star's core, masked
        image[blank] = 0.0
        header["EXPTIME"] = f["exptime"]
        if f["kind"] == "warp":
            header["HIERARCH FPA.ZP"] = f["zp"]
        return 200, "application/fits", _fits_bytes(image.astype(np.float32), header)

    return {"/cgi-bin/ps1filenames.py": listing, "/cgi-bin/fitscut.cgi": cutout}


def _render(
    stars: Table, wcs: WCS, size: int, zp: float, scale: float, *, seed: int, mag: np.ndarray | None = None
) -> np.ndarray:
    """Gaussian stars (FWHM_ARCSEC) of the catalogue (or magnitudes ``mag``) on a size x size grid of ``scale`` arcsec/px, plus faint noise."""
    sig = FWHM_ARCSEC / 2.3548 / scale
    image = np.zeros((size, size))
    x, y = wcs.all_world2pix(stars["ra"], stars["dec"], 0)
    flux = 10 ** (-0.4 * (np.asarray(stars["mag"] if mag is None else mag) - zp))
    half = int(math.ceil(6 * sig))
    for xi, yi, fi in zip(x, y, flux, strict=True):
        ix, iy = int(round(xi)), int(round(yi))
        x0, x1, y0, y1 = max(ix - half, 0), min(ix + half + 1, size), max(iy - half, 0), min(iy + half + 1, size)
        if x0 >= x1 or y0 >= y1:
            continue
        gx, gy = np.meshgrid(np.arange(x0, x1), np.arange(y0, y1))
        image[y0:y1, x0:x1] += fi / (2 * math.pi * sig**2) * np.exp(-((gx - xi) ** 2 + (gy - yi) ** 2) / (2 * sig**2))
    # sky noise: a r = 21 star has S/N ~ 100 in a 5 arcsec aperture
    return image + np.random.default_rng(seed).normal(0.0, 2e-3 * 10 ** (0.4 * (zp - 25.0)), image.shape)


def _tan(ra0: float, dec0: float, size: int, scale: float) -> fits.Header:
    header = fits.Header()
    header.update(
        CTYPE1="RA---TAN", CTYPE2="DEC--TAN", CRVAL1=ra0, CRVAL2=dec0, CRPIX1=(size + 1) / 2, CRPIX2=(size + 1) / 2
    )
    header.update(CD1_1=-scale / 3600, CD2_2=scale / 3600, CD1_2=0.0, CD2_1=0.0)
    return header


def _legacy_service(stars: Table):
    """Answer of the Legacy Surveys viewer's fits-cutout: a one-band cube in nanomaggies, a blank (0) strip at the top."""

    def cutout(q):
        assert q["layer"] == "ls-dr10" and float(q["pixscale"]) == 0.262 and q["bands"] == "r"
        size = int(q["size"])
        header = _tan(float(q["ra"]), float(q["dec"]), size, 0.262)
        image = _render(stars, WCS(header), size, 22.5, 0.262, seed=11)
        image[int(0.9 * size) :] = 0.0
        return 200, "application/fits", _fits_bytes(image[None].astype(np.float32), header)

    return {"/viewer/fits-cutout": cutout}


def _fits_bytes(data: np.ndarray, header: fits.Header) -> bytes:
    buf = io.BytesIO()
    fits.PrimaryHDU(data, header).writeto(buf)
    return buf.getvalue()


def _settings(url: str, cache: Path, **over) -> dict:
    tel = {
        "name": "cam",
        "pixel_scale": 1.01,
        "filters": ["r"],
        "frames": {"science": ["x"], "reference": {"survey": "ps1", "url": url, "cache": str(cache), **over}},
    }
    check_schema(tel, "telescope.schema.yaml", "test telescope")
    return tel["frames"]["reference"]


def _aperture(data: np.ndarray, x: np.ndarray, y: np.ndarray, r: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Aperture sums and first-moment centroids (px) of a small image around each position."""
    flux, cx, cy = (np.full(len(x), np.nan) for _ in range(3))
    for k, (xi, yi) in enumerate(zip(x, y, strict=True)):
        ix, iy = int(round(xi)), int(round(yi))
        sl = data[iy - 6 : iy + 7, ix - 6 : ix + 7]
        if sl.shape != (13, 13) or not np.isfinite(sl).all():
            continue
        gy, gx = np.mgrid[iy - 6 : iy + 7, ix - 6 : ix + 7]
        inside = np.hypot(gx - xi, gy - yi) <= r
        flux[k] = sl[inside].sum()
        cx[k] = (sl[inside] * gx[inside]).sum() / flux[k]
        cy[k] = (sl[inside] * gy[inside]).sum() / flux[k]
    return flux, cx, cy


def _check_against_truth(ref, stars: Table) -> np.ndarray:
    """Flux scale within 1 % and positions within 0.05 px: medians over bright isolated stars of the reference.

    Returns each star's magnitude error (mag).
    """
    x, y, mag = np.asarray(stars["x"]), np.asarray(stars["y"]), np.asarray(stars["mag"])
    dist = np.hypot(x[:, None] - x[None], y[:, None] - y[None]) + np.eye(len(x)) * 1e9
    isolated = np.min(np.where(mag[None] < mag[:, None] + 5, dist, 1e9), axis=1) > 10
    use = (mag < 21.0) & isolated & (x > 10) & (x < 245) & (y > 10) & (y < 245)
    flux, cx, cy = _aperture(ref.data, x[use], y[use], 5.0)
    ok = np.isfinite(flux) & (flux > 0)
    assert ok.sum() >= 10
    dmag = ref.header["MAGZP"] - 2.5 * np.log10(flux[ok]) - mag[use][ok]
    # flux scale within 1 %: the median over >= 10 stars of S/N > 100 (r < 21 in a deep survey)
    assert abs(np.median(dmag)) < 0.01, np.median(dmag)
    # astrometry within 0.05 px: the median centroid offset from the true position
    assert abs(np.median(cx[ok] - x[use][ok])) < 0.05
    assert abs(np.median(cy[ok] - y[use][ok])) < 0.05
    return dmag


@pytest.mark.parametrize("mode", ["stack", "individual"])
def test_reference_matches_truth_and_rerun_downloads_nothing(science, tmp_path, mode):
    tel, path, stars, wcs = science
    centre = tuple(float(v) for v in wcs.all_pix2world([[127.5, 127.5]], 0)[0])
    from rbflow.survey import survey_reference

    with FakeService(_service(stars, centre)) as service:
        settings = _settings(f"{service.url}/cgi-bin", tmp_path / "cache", mode=mode)
        out = tmp_path / "ref.fits"
        result = survey_reference(path, out, tel, settings=settings)
        n_requests = sum(service.requests.values())
        assert n_requests > 0
        survey_reference(path, tmp_path / "ref2.fits", tel, settings=settings)
        assert sum(service.requests.values()) == n_requests  # the rerun downloaded nothing
    assert result["n"] == (2 if mode == "stack" else 3)
    ref = read_image(out)
    _check_against_truth(ref, stars)
    # the saturated blob is masked in every survey image: no reference pixel there
    bx, by = wcs.all_world2pix(
        [centre[0] + BLOB[0] / 3600 / math.cos(math.radians(centre[1]))], [centre[1] + BLOB[1] / 3600], 0
    )
    assert not np.isfinite(ref.data[int(round(by[0])), int(round(bx[0]))])
    # cards the later stages read
    for key in ("GAIN", "RDNOISE", "SATURATE", "EXPTIME", "FILTER"):
        assert key in ref.header
    assert ref.header["SURVEY"] == "ps1" and ref.header["SURVMODE"] == mode
    assert np.nanmax(ref.data) < ref.header["SATURATE"]
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert len(index) == n_requests and all(len(e["sha256"]) == 64 for e in index.values())
    # a cached file changed behind the index's back is refused, not used
    cached = tmp_path / "cache" / next(iter(index.values()))["file"]
    cached.write_bytes(cached.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(InputError, match="no longer matches the sha256"):
        survey_reference(path, tmp_path / "ref3.fits", tel, settings=settings)


def test_later_stages_read_the_survey_facts_not_the_telescope_file(science, tmp_path):
    """A survey reference's gain, read noise, saturation and zeropoint come from its header, not the telescope file.

    The telescope file describes its own detector (demo: gain 6.2 e-/ADU, saturation 50,000 ADU); a PS1
    stack is in counts at zeropoint 25 + 2.5 log10(EXPTIME) whose stars peak far above 50,000: read with
    the telescope's saturation, every star brighter than ~17.5 mag of a PS1 reference was masked as saturated
    in the demo run of bench/survey_demo.py (its variable stars were lost). The science frame keeps the
    telescope's facts.
    """
    tel, path, stars, wcs = science
    centre = tuple(float(v) for v in wcs.all_pix2world([[127.5, 127.5]], 0)[0])
    from rbflow.frames import frame_info
    from rbflow.survey import survey_reference

    with FakeService(_service(stars, centre)) as service:
        settings = _settings(f"{service.url}/cgi-bin", tmp_path / "cache")
        survey_reference(path, tmp_path / "ref.fits", tel, settings=settings)
    header = fits.getheader(tmp_path / "ref.fits")
    fixed = {**tel, "zeropoints": {"r": 20.0}}  # a telescope with a fixed zeropoint per filter
    info = frame_info(header, fixed)
    assert np.nanmax(fits.getdata(tmp_path / "ref.fits")) > tel["saturation"]  # the bug's premise
    assert info.saturation == header["SATURATE"] and info.gain == header["GAIN"] == 1.0
    assert info.read_noise == header["RDNOISE"] and info.zeropoint == header["MAGZP"] > 30.0
    sci = frame_info(fits.getheader(path), fixed)
    assert (sci.saturation, sci.gain, sci.read_noise, sci.zeropoint) == (50000.0, 6.2, 8.0, 20.0)


def test_service_failures_are_clear_and_lose_nothing(science, tmp_path):
    tel, path, stars, wcs = science
    centre = tuple(float(v) for v in wcs.all_pix2world([[127.5, 127.5]], 0)[0])
    from rbflow.survey import survey_reference

    with FakeService(_service(stars, centre), hang_s=2.0) as service:
        cache = tmp_path / "cache"
        # 1 s for the hanging service (it answers after 2 s); a generous timeout elsewhere, so that a
        # slow, loaded machine is not taken for a hang
        settings = _settings(f"{service.url}/cgi-bin", cache, timeout=60.0)
        hang = _settings(f"{service.url}/cgi-bin", cache, timeout=1.0)
        for fail, message in (("500", "HTTP 500"), ("hang", "no answer within 1 s"), ("empty", "empty answer")):
            service.fail = fail
            with pytest.raises(InputError, match=message) as err:
                survey_reference(path, tmp_path / "ref.fits", tel, settings=hang if fail == "hang" else settings)
            text = str(err.value)
            assert service.url in text and str(cache) in text and "by hand" in text
            assert not (tmp_path / "ref.fits").exists()
            assert not cache.exists() or not [p for p in cache.iterdir() if p.name != "index.json"]
        # a cutout failing after the listing was fetched keeps the listing
        service.fail = None
        routes = dict(service.routes)
        service.routes["/cgi-bin/fitscut.cgi"] = lambda q: (500, "text/plain", b"down")
        with pytest.raises(InputError, match="PS1 cutout: the service answered HTTP 500"):
            survey_reference(path, tmp_path / "ref.fits", tel, settings=settings)
        kept = sorted(p.name for p in cache.iterdir())
        assert any("ps1filenames" in name or "filters" in name for name in kept), kept
        service.routes.update(routes)
        listing_requests = service.requests["/cgi-bin/ps1filenames.py"]
        survey_reference(path, tmp_path / "ref.fits", tel, settings=settings)
        assert service.requests["/cgi-bin/ps1filenames.py"] == listing_requests  # listings came from the cache


def test_band_mapping_and_frames(science, tmp_path, monkeypatch):
    tel, path, stars, wcs = science
    from rbflow.survey import survey_reference

    with pytest.raises(InputError, match="ps1 has no filter 'U'.*frames.reference.filters"):
        survey_reference(
            path, tmp_path / "ref.fits", tel, settings=_settings("http://127.0.0.1:9", tmp_path, filters={"r": "U"})
        )
    # a colour term needing a band the survey lacks
    term = dict(base="r", colour=["u", "r"], coefficients=[0.0, 0.1], range=[0, 1], scatter=0.01, citation="test")
    with pytest.raises(InputError, match="needs ps1 band.*u"):
        survey_reference(
            path,
            tmp_path / "ref.fits",
            tel,
            settings=_settings("http://127.0.0.1:9", tmp_path, filters={"r": "U"}, colour_terms={"U": term}),
        )
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.fits").write_bytes(b"")
    (tmp_path / "b.fits").write_bytes(b"")
    cam = {**tel, "frames": {"science": ["*.fits"], "reference": {"survey": "ps1"}}}
    check_schema(cam, "telescope.schema.yaml", "test telescope")
    frames = [(f.name, f.path, f.reference, f.inputs) for f in frames_of(cam)]
    assert frames == [
        ("a_ps1", "resources/cam/survey/a_ps1.fits", None, ("a.fits",)),
        ("a", "a.fits", "a_ps1", ()),
        ("b_ps1", "resources/cam/survey/b_ps1.fits", None, ("b.fits",)),
        ("b", "b.fits", "b_ps1", ()),
    ]
    with pytest.raises(ConfigError, match="survey"):
        check_schema(
            {**tel, "frames": {"science": ["*.fits"], "reference": {"survey": "dss"}}}, "telescope.schema.yaml", "t"
        )


def test_script_wiring(science, tmp_path):
    tel, path, stars, wcs = science
    centre = tuple(float(v) for v in wcs.all_pix2world([[127.5, 127.5]], 0)[0])
    with FakeService(_service(stars, centre)) as service:
        out = tmp_path / "ref.fits"
        sm = SimpleNamespace(
            input=SimpleNamespace(frame=str(path)),
            output=[str(out)],
            params=SimpleNamespace(telescope=tel, settings=_settings(f"{service.url}/cgi-bin", tmp_path / "cache")),
            log=[str(tmp_path / "survey.log")],
            rule="survey_reference",
            wildcards={"telescope": "cam", "frame": "sci_ps1"},
        )
        runpy.run_path(str(REPO / "scripts" / "survey_reference.py"), init_globals={"snakemake": sm})
    assert fits.getheader(out)["SURVEY"] == "ps1"
    assert "survey reference: 2 ps1 stack image(s)" in (tmp_path / "survey.log").read_text()


def test_legacysurvey_reference(science, tmp_path):
    tel, path, stars, wcs = science
    from rbflow.survey import survey_reference

    with FakeService(_legacy_service(stars)) as service:
        settings = _settings(f"{service.url}/viewer", tmp_path / "cache", survey="legacysurvey")
        result = survey_reference(path, tmp_path / "ref.fits", tel, settings=settings)
        survey_reference(path, tmp_path / "ref.fits", tel, settings=settings)
        # 'decals' is the same viewer service: the same cutout, from the cache
        decals = _settings(f"{service.url}/viewer", tmp_path / "cache", survey="decals")
        survey_reference(path, tmp_path / "decals.fits", tel, settings=decals)
        assert sum(service.requests.values()) == 1
    assert fits.getheader(tmp_path / "decals.fits")["SURVEY"] == "decals"
    assert result["n"] == 1 and result["zeropoint"] == 22.5
    ref = read_image(tmp_path / "ref.fits")
    _check_against_truth(ref, stars)
    assert ref.header["SURVEY"] == "legacysurvey"
    with pytest.raises(InputError, match="serves coadds only"):
        survey_reference(path, tmp_path / "x.fits", tel, settings={**settings, "mode": "individual"})


def test_full_skycell_stack_is_linearised(tmp_path):
    """A full sky-cell stack (asinh luptitudes, BSOFTEN/BOFFSET) comes back as the linear counts it encodes."""
    from rbflow.survey import read_ps1

    linear = np.array([[0.0, 1.0, 10.0], [100.0, 1e3, 1e4], [-5.0, 3.0, 5e4]])
    soften, offset = 2.5, 0.3
    header = _tan(150.0, 2.0, 3, 0.25)
    header.update(EXPTIME=620.0, BSOFTEN=soften, BOFFSET=offset)
    (tmp_path / "stk.fits").write_bytes(_fits_bytes(A * np.arcsinh((linear - offset) / (2 * soften)), header))
    image = read_ps1(tmp_path / "stk.fits", kind="stack")
    assert np.allclose(image.data, linear, rtol=1e-9, atol=1e-9)
    assert image.zeropoint == pytest.approx(25.0 + 2.5 * math.log10(620.0))


def test_a_file_filled_by_hand_is_taken(tmp_path):
    from rbflow.download import cached_fetch

    with FakeService({"/f": lambda q: (200, "text/plain", b"served")}) as service:
        service.fail = "500"
        with pytest.raises(InputError, match="save it as '([^']+)'") as err:
            cached_fetch(f"{service.url}/f?x=1", tmp_path, what="test file")
        target = Path(re.search(r"save it as '([^']+)'", str(err.value)).group(1))
        target.write_bytes(b"by hand")
        before = sum(service.requests.values())
        assert cached_fetch(f"{service.url}/f?x=1", tmp_path).read_bytes() == b"by hand"
        assert sum(service.requests.values()) == before
    index = json.loads((tmp_path / "index.json").read_text())
    assert index[f"{service.url}/f?x=1"]["bytes"] == 7


#: Fake SkyMapper exposures: (unique_image_id, image_type, ZPAPPROX, sky level ADU); the short one is not used.
SKYMAPPER = (("20150412103355-12", "main", 28.71, 180.0), ("20160308112021-07", "main", 28.83, 240.0))
SKYMAPPER_SHORT = ("20150412103120-12", "short", 25.40, 12.0)


def _skymapper_service(stars: Table):
    """SkyMapper DR4 SIAP: ``query`` answers the CSV listing, ``get_image`` ADU cutouts with sky, ZPAPPROX, SATURATE."""
    images = {i: (zp, sky) for i, _, zp, sky in (*SKYMAPPER, SKYMAPPER_SHORT)}

    def query(q):
        assert q["FORMAT"] == "image/fits" and q["RESPONSEFORMAT"] == "CSV" and q["INTERSECT"] == "overlaps"
        lines = ["unique_image_id,band,image_type,exptime,zpapprox,mean_fwhm,get_image"]
        for image_id, kind, zp, _ in (*SKYMAPPER, SKYMAPPER_SHORT):
            exptime = 100 if kind == "main" else 5
            lines.append(f"{image_id},{q['BAND']},{kind},{exptime},{zp},2.1,https://x/get_image?IMAGE={image_id}")
        return 200, "text/csv", ("\n".join(lines) + "\n").encode()

    def get_image(q):
        assert q["FORMAT"] == "fits" and float(q["SIZE"]) <= 0.17
        zp, sky = images[q["IMAGE"]]
        ra, dec = (float(v) for v in q["POS"].split(","))
        size = int(round(float(q["SIZE"]) * 3600 / 0.496))
        header = _tan(ra, dec, size, 0.496)
        image = _render(stars, WCS(header), size, zp, 0.496, seed=int(q["IMAGE"][-2:])) + sky
        header.update(ZPAPPROX=zp, EXPTIME=100.0, SATURATE=60000.0)
        return 200, "application/fits", _fits_bytes(image.astype(np.float32), header)

    return {"/siap/dr4/query": query, "/siap/dr4/get_image": get_image}


def _hips2fits_service(stars: Table, zeropoint: float):
    """CDS hips2fits: a TAN image of the requested size and field, in units of ``zeropoint``, blank (NaN) west of the centre + 100 arcsec."""

    def hips2fits(q):
        assert q["hips"] == "CDS/P/Test/r" and q["projection"] == "TAN" and q["coordsys"] == "icrs"
        assert q["format"] == "fits" and q["width"] == q["height"] and float(q["rotation_angle"]) == 0.0
        size = int(q["width"])
        scale = float(q["fov"]) * 3600 / size
        header = _tan(float(q["ra"]), float(q["dec"]), size, scale)
        image = _render(stars, WCS(header), size, zeropoint, scale, seed=5)
        image[:, int(size / 2 + 100 / scale) :] = np.nan  # outside the HiPS's coverage
        return 200, "application/fits", _fits_bytes(image.astype(np.float32), header)

    return {"/hips-image-services/hips2fits": hips2fits}


def test_skymapper_reference(science, tmp_path):
    tel, path, stars, wcs = science
    from rbflow.survey import survey_reference

    with FakeService(_skymapper_service(stars)) as service:
        settings = _settings(f"{service.url}/siap/dr4", tmp_path / "cache", survey="skymapper", mode="individual")
        result = survey_reference(path, tmp_path / "ref.fits", tel, settings=settings)
        n_requests = sum(service.requests.values())
        survey_reference(path, tmp_path / "ref.fits", tel, settings=settings)
        assert sum(service.requests.values()) == n_requests == 3  # one query, two main exposures; rerun: none
    assert result["n"] == 2 and result["zeropoint"] == SKYMAPPER[0][2]
    ref = read_image(tmp_path / "ref.fits")
    _check_against_truth(ref, stars)
    assert ref.header["SURVEY"] == "skymapper" and ref.header["SRVIM002"] == f"skymapper_{SKYMAPPER[1][0]}"
    with pytest.raises(InputError, match="single exposures only"):
        survey_reference(path, tmp_path / "x.fits", tel, settings={**settings, "mode": "stack"})


def test_hips2fits_reference(science, tmp_path):
    tel, path, stars, wcs = science
    from rbflow.survey import survey_reference

    with FakeService(_hips2fits_service(stars, 27.3)) as service:
        url = f"{service.url}/hips-image-services/hips2fits"
        settings = _settings(url, tmp_path / "cache", survey="hips2fits", hips={"r": "CDS/P/Test/r"})
        with pytest.raises(InputError, match="needs 'frames.reference.pixscale'"):
            survey_reference(path, tmp_path / "ref.fits", tel, settings=settings)
        settings.update(pixscale=0.4, zeropoint=27.3)
        result = survey_reference(path, tmp_path / "ref.fits", tel, settings=settings)
        survey_reference(path, tmp_path / "ref.fits", tel, settings=settings)
        assert sum(service.requests.values()) == 1
    assert result["n"] == 1 and result["zeropoint"] == 27.3
    ref = read_image(tmp_path / "ref.fits")
    _check_against_truth(ref, stars)
    # the blank part of the HiPS is blank in the reference
    x_edge = wcs.all_world2pix([[ref.header["CRVAL1"], ref.header["CRVAL2"]]], 0)[0][0]
    assert not np.isfinite(ref.data[128, 250]) and np.isfinite(ref.data[128, 5])
    assert x_edge > 0


@pytest.mark.parametrize(
    ("survey", "over"),
    [
        ("legacysurvey", {}),
        ("skymapper", {"mode": "individual"}),
        ("hips2fits", {"hips": {"r": "CDS/P/Test/r"}, "pixscale": 0.4, "zeropoint": 27.3}),
    ],
)
def test_other_survey_failures_are_clear(science, tmp_path, survey, over):
    tel, path, stars, wcs = science
    from rbflow.survey import survey_reference

    routes = {
        "legacysurvey": lambda: _legacy_service(stars),
        "skymapper": lambda: _skymapper_service(stars),
        "hips2fits": lambda: _hips2fits_service(stars, 27.3),
    }[survey]()
    base = {"legacysurvey": "/viewer", "skymapper": "/siap/dr4", "hips2fits": "/hips-image-services/hips2fits"}
    with FakeService(routes, hang_s=2.0) as service:
        cache = tmp_path / "cache"
        for fail, message in (("500", "HTTP 500"), ("hang", "no answer within 1 s"), ("empty", "empty answer")):
            service.fail = fail
            timeout = 1.0 if fail == "hang" else 60.0
            settings = _settings(f"{service.url}{base[survey]}", cache, survey=survey, timeout=timeout, **over)
            with pytest.raises(InputError, match=message) as err:
                survey_reference(path, tmp_path / "ref.fits", tel, settings=settings)
            text = str(err.value)
            assert service.url in text and str(cache) in text and "by hand" in text
            assert not (tmp_path / "ref.fits").exists()
            assert not cache.exists() or not [p for p in cache.iterdir() if p.name != "index.json"]


def test_colour_term_makes_a_filter_the_survey_lacks(science, tmp_path):
    """A V frame from PS1 g and r through Tonry et al. (2012)'s term: stars of g-r from 0 to 1.4 come out at their V.

    The truth follows the term exactly (V = r + 0.005 + 0.462 (g-r) + 0.013 (g-r)^2), so the check is of rbflow's
    pixel-by-pixel application: the median within 1 % (as every survey) and every bright isolated star within
    0.02 mag (the colour measured on smoothed images, blends of stars of other colours aside), where r alone is
    off by up to 0.67 mag.
    """
    tel, path, stars, wcs = science
    from rbflow.survey import COLOUR_TERMS, survey_reference

    term = COLOUR_TERMS["ps1"]["V"]
    colour = np.random.default_rng(SEED).uniform(0.0, 1.4, len(stars))
    r = np.asarray(stars["mag"]) - term.offset(colour)
    vpath = tmp_path / "sci_V.fits"
    with fits.open(path) as hdul:
        hdul[0].header["FILTER"] = "V"
        hdul.writeto(vpath)
    centre = tuple(float(v) for v in wcs.all_pix2world([[127.5, 127.5]], 0)[0])
    with FakeService(_service(stars, centre, mags={"g": r + colour, "r": r})) as service:
        settings = _settings(f"{service.url}/cgi-bin", tmp_path / "cache")
        result = survey_reference(vpath, tmp_path / "ref.fits", tel, settings=settings)
    assert result["n"] == 4 and result["colour_term"] == "V = r + 0.005 + 0.462 (g-r) + 0.013 (g-r)^2"
    ref = read_image(tmp_path / "ref.fits")
    dmag = _check_against_truth(ref, stars)
    assert np.max(np.abs(dmag - np.median(dmag))) < 0.02, np.sort(np.abs(dmag))[-5:]
    assert ref.header["SURVBAND"] == "r,g" and ref.header["SURVCREF"].startswith("Tonry et al. 2012")
    assert ref.header["SURVCSIG"] == 0.012 and 0.0 < ref.header["SURVCMED"] < 1.4


def test_colour_term_lookup():
    from rbflow.survey import COLOUR_TERMS, colour_term

    given = {
        "base": "g",
        "colour": ["g", "r"],
        "coefficients": [-0.02, 0.6],
        "range": [0.0, 1.2],
        "scatter": 0.02,
        "citation": "a made-up term for this test",
    }
    term = colour_term("skymapper", "B", {"colour_terms": {"B": given}})
    assert term.citation == given["citation"] and term.colour == ("g", "r") and term.colour_range == (0.0, 1.2)
    assert np.allclose(term.offset(np.array([0.0, 1.0])), [-0.02, 0.58])
    assert term.formula("B") == "B = g - 0.020 + 0.600 (g-r)"
    assert colour_term("skymapper", "V", {"colour_terms": {"B": given}}) is None  # no built-in one for SkyMapper
    assert colour_term("ps1", "I", {}) is COLOUR_TERMS["ps1"]["I"]
    # the built-in V reproduces Tonry et al. (2012) Table 6 at g-r = 0.5: V - r = 0.005 + 0.231 + 0.00325
    assert abs(COLOUR_TERMS["ps1"]["V"].offset(0.5) - 0.23925) < 1e-12
