"""Tests of the sky's domain randomisation (``sky.randomise``) and its hard reals (issue 16).

The randomised sky must be reproducible (same seed, same bytes), leave today's sky untouched when
off, draw every field inside its stated ranges, keep its headers truthful, and make the sampling
change behave as a pixel-scale change would (seeing and galaxy sizes in pixels, counts per pixel).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest

from rbflow import sky
from rbflow.config import check_schema, load_telescope, schema_defaults
from rbflow.errors import ConfigError
from rbflow.frames import frame_info, frames_of

DEMO = Path(__file__).resolve().parents[1] / "config" / "telescopes" / "demo.yaml"
SEED = 7
#: The transient scene as it was before the hard reals (pins the frames the hashes below were made from).
OLD_SCENE = {"transient_mags": [17.0, 20.0], "transient_nuclear_fraction": 0.0, "transient_host_bias": 0.0}
#: sha256 of data, header (less RBFLOWV) and truth columns of two frames of ``small()``, computed with
#: randomise off when the randomisation and the artefact zoo were merged (429528f; the zoo renders
#: satellite trails itself and adds truth geometry columns, so main before both differs): any change
#: to the sky with randomise off changes these. The last bits of the floats depend on the CPU (the
#: numeric libraries pick their kernels by instruction set), so each frame has one hash per machine
#: kind, each computed at 429528f: the first on the machine of the merge, the second on an x86-64
#: with AVX2 but no AVX-512 (where numpy's OpenBLAS reports Haswell kernels).
MAIN_HASHES = {
    "fld00_r_ref": (
        "dc995a0b7df34f52f9420b10a0ade2714a9a9712250018335477257ca697594e",
        "d7d06ea7c1896d6a1ac894a7129aeeb4c649d1897edc1b402fc6c75fabb192b8",
    ),
    "fld01_g_e1": (
        "99e2f4dd40a7491c9f78dcdf6f7a03126b74d4d5a202bd82f9f2f4017fbeb73d",
        "7cb54017f92de7b20d8b9088be2bbd02bbe074da5d15b53c97bb6128ab011513",
    ),
}


def small(*, randomise: dict | None = None, **sky_block) -> dict:
    """The demo telescope with a 2-field, 1-epoch, 128^2 sky (a randomised one has ``read_noise: null``)."""
    tel = load_telescope(DEMO)
    tel["sky"] = {"fields": 2, "epochs": 1, "size": [128, 128], "stars": 6000, "transients": 4, "variables": 3}
    tel["sky"].update(sky_block)
    if randomise is not None:
        tel["sky"]["randomise"] = {"enabled": True, **randomise}
        tel["read_noise"] = None
    check_schema(tel["sky"], "sky.schema.yaml", "test sky block")
    return tel


def frame_hash(tel: dict, frame: str) -> str:
    hdu, truth = sky.simulate_frame(tel, frame, seed=SEED)
    h = hashlib.sha256(hdu.data.tobytes())
    for card in hdu.header.cards:
        if card.keyword != "RBFLOWV":  # the version string changes with every commit
            h.update(str(card).encode())
    for col in truth.colnames:
        h.update(np.ascontiguousarray(truth[col]).tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("frame", sorted(MAIN_HASHES))
def test_randomise_off_is_byte_identical_to_main(frame):
    assert frame_hash(small(**OLD_SCENE), frame) in MAIN_HASHES[frame]


def test_randomised_sky_is_byte_identical_for_a_seed_and_differs_between_seeds():
    first = frame_hash(small(randomise={}), "fld01_g_e1")
    assert frame_hash(small(randomise={}), "fld01_g_e1") == first
    assert first != frame_hash(small(), "fld01_g_e1")  # randomised at all
    a, b = (sky.simulate_frame(small(randomise={}), "fld01_g_e1", seed=s)[0] for s in (SEED, SEED + 1))
    assert a.header["PIXSCEFF"] != b.header["PIXSCEFF"]  # another seed, another camera


def test_draws_stay_in_their_ranges_and_cover_them():
    ranges = schema_defaults("sky.schema.yaml", "randomise")
    tel = small(randomise={}, fields=60)
    draws = [sky.field_randomisation(tel, f"fld{i:02d}", seed=SEED) for i in range(60)]
    seeing = 0.5 * sum(tel["sky"]["seeing"])
    sampling = np.array([seeing / d["pixel_scale"] for d in draws])
    lo, hi = ranges["sampling"]
    assert lo <= sampling.min() and sampling.max() <= hi
    # 60 log-uniform draws: the lowest and highest lie within 15 % of the range's log width of its ends
    # unless something is off (chance of failing < 2 x 0.85^60 = 1e-4).
    assert np.log(sampling.min() / lo) < 0.15 * np.log(hi / lo) and np.log(hi / sampling.max()) < 0.15 * np.log(hi / lo)
    # Uniform keys: 60 draws span > 70 % of the range (fails with probability ~60 x 0.7^59 = 4e-8);
    # log-uniform ones the same in log.
    for key, log in (
        ("zeropoint_offset", False),
        ("sky_offset", False),
        ("moffat_beta", False),
        ("psf_coma", False),
        ("exptime_scale", True),
        ("read_noise", True),
        ("star_density", True),
        ("artefact_scale", True),
    ):
        values = np.array([d[key] for d in draws])
        lo, hi = ranges[key]
        assert lo <= values.min() and values.max() <= hi, key
        span = np.log(values.max() / values.min()) / np.log(hi / lo) if log else np.ptp(values) / (hi - lo)
        assert span > 0.7, key
    # Fields differ from each other; the draw of a field does not depend on the number of fields.
    assert len({d["pixel_scale"] for d in draws}) == 60
    assert sky.field_randomisation(small(randomise={}), "fld01", seed=SEED) == draws[1]


def test_randomise_off_gives_the_sky_blocks_values():
    tel = small()
    d = sky.field_randomisation(tel, "fld00", seed=SEED)
    assert d["pixel_scale"] == tel["pixel_scale"] and d["read_noise"] == tel["read_noise"]
    assert d["exptime_scale"] == 1 and d["artefact_scale"] == 1 and d["star_density"] == 1
    assert d["zeropoint_offset"] == 0 and d["sky_offset"] == 0
    for key in ("moffat_beta", "psf_variation", "psf_ellipticity", "psf_halo_fraction", "wcs_error"):
        assert d[key] == tel["sky"][key]
    assert sky.frame_conditions(tel, "fld00_r_e1", seed=SEED).artefact_scale == 1.0


def test_conditions_and_headers_follow_the_fields_draw():
    tel = small(randomise={})
    for spec in frames_of(tel):
        d = sky.field_randomisation(tel, spec.field, seed=SEED)
        cond = sky.frame_conditions(tel, spec.name, seed=SEED)
        s = tel["sky"]
        ref = spec.reference is None
        exptime = (s["ref_exptime"] if ref else s["exptime"]) * d["exptime_scale"]
        assert cond.exptime == pytest.approx(exptime, rel=1e-12)
        seeing_lo, seeing_hi = (s["ref_seeing"],) * 2 if ref else s["seeing"]
        assert seeing_lo / d["pixel_scale"] <= cond.seeing <= seeing_hi / d["pixel_scale"]
        # Sky per pixel: the sky brightness (offset) over the effective pixel's area at this zeropoint.
        mu = s["sky_brightness"][spec.filter] + d["sky_offset"]
        assert cond.sky == pytest.approx(d["pixel_scale"] ** 2 * 10 ** (-0.4 * (mu - cond.zeropoint)), rel=1e-12)
        zp_max = s["zeropoint"][spec.filter] + d["zeropoint_offset"] + 2.5 * math.log10(exptime)
        assert abs(cond.zeropoint - zp_max) <= (0 if ref else 5 * s["zeropoint_scatter"])
        assert (cond.read_noise, cond.beta, cond.coma, cond.artefact_scale) == (
            d["read_noise"],
            d["moffat_beta"],
            d["psf_coma"],
            d["artefact_scale"],
        )
        assert cond.distortion[0, 0] == d["distortion_residual"] and cond.wcs_error == d["wcs_error"]
    # The stages read each frame's own facts from its header (read_noise is null in the telescope).
    hdu, _ = sky.simulate_frame(tel, "fld01_g_e1", seed=SEED)
    cond = sky.frame_conditions(tel, "fld01_g_e1", seed=SEED)
    info = frame_info(hdu.header, tel, path="fld01_g_e1")
    assert info.read_noise == pytest.approx(cond.read_noise) and info.zeropoint == pytest.approx(cond.zeropoint)
    assert info.fwhm_guess == pytest.approx(cond.seeing) and info.gain == tel["gain"]
    assert hdu.header["RANDOMIS"] and hdu.header["PIXSCEFF"] == pytest.approx(cond.pixel_scale)
    assert hdu.header["ARTSCALE"] == pytest.approx(cond.artefact_scale)


def test_read_noise_of_a_flat_frame_is_the_drawn_one():
    """A frame with no sky and no sources has the drawn read noise (e-) as its pixel RMS × gain."""
    tel = small(
        randomise={"read_noise": [15.0, 15.0], "sky_offset": [30.0, 30.0], "artefact_scale": [0.0, 0.0]},
        stars=0,
        galaxies=0,
        variables=0,
        transients=0,
        cosmic_rays=0,
        hot_pixels=0,
        bad_columns=0,
        flat_residual=0.0,
        satellite_rate=0.0,
    )
    hdu, _ = sky.simulate_frame(tel, "fld00_r_e1", seed=SEED)
    # 128^2 pixels: the RMS is within 4 % (3.4 sigma of its 1/sqrt(2N) relative error) of 15 e-.
    assert np.std(hdu.data) * tel["gain"] == pytest.approx(15.0, rel=0.04)
    assert hdu.header["RDNOISE"] == pytest.approx(15.0, rel=1e-12)


def test_sampling_acts_as_a_pixel_scale_change():
    """Coarse sampling (big effective pixel): more stars and galaxies per frame, smaller ones, narrower seeing."""
    dense = {"stars": 30000, "galaxies": 20000}  # enough of each in the finely sampled field
    fine = small(randomise={"sampling": [6.0, 6.0], "star_density": [1.0, 1.0]}, size=[256, 256], **dense)
    coarse = small(randomise={"sampling": [1.5, 1.5], "star_density": [1.0, 1.0]}, size=[256, 256], **dense)
    f, c = (sky.field_scene(t, "fld00", seed=SEED).objects for t in (fine, coarse))
    ratio = (6.0 / 1.5) ** 2  # counts per pixel go as the pixel's area
    for kind in ("star", "galaxy"):
        n_f, n_c = np.sum(f["kind"] == kind), np.sum(c["kind"] == kind)
        # Poisson counts: the ratio is within 5 sigma of 16 (n_f is ~800 stars, ~500 galaxies).
        assert n_c / n_f == pytest.approx(ratio, rel=5 * math.sqrt(1 / n_f + 1 / n_c)), kind
    assert np.median(c["r_eff"][c["kind"] == "galaxy"]) < np.median(f["r_eff"][f["kind"] == "galaxy"]) / 3
    cf, cc = (sky.frame_conditions(t, "fld00_r_e1", seed=SEED) for t in (fine, coarse))
    assert cf.seeing / cc.seeing == pytest.approx(4.0)  # same arcsec seeing draw, 4x the pixel scale
    assert cc.sky / cf.sky == pytest.approx(16.0)


def test_star_density_multiplies_the_star_count():
    base, crowded = (small(randomise={"star_density": [k, k], "sampling": [3.0, 3.0]}) for k in (1.0, 3.0))
    n = [np.sum(sky.field_scene(t, "fld00", seed=SEED).objects["kind"] == "star") for t in (base, crowded)]
    assert n[1] / n[0] == pytest.approx(3.0, rel=5 * math.sqrt(1 / n[0] + 1 / n[1]))


def test_field_star_density_scales_each_fields_stars_and_leaves_the_others():
    def stars(tel, field):
        return np.sum(sky.field_scene(tel, field, seed=SEED).objects["kind"] == "star")

    plain, sparse = small(), small(field_star_density=[1.0, 0.1])
    assert stars(sparse, "fld00") == stars(plain, "fld00")
    n = stars(plain, "fld01"), stars(sparse, "fld01")
    assert n[1] / n[0] == pytest.approx(0.1, rel=5 * math.sqrt(1 / n[0] + 1 / max(n[1], 1)))
    # on top of a randomised draw
    fixed = {"star_density": [2.0, 2.0], "sampling": [3.0, 3.0]}
    drawn, both = small(randomise=fixed), small(randomise=fixed, field_star_density=[0.5])
    assert stars(both, "fld00") == pytest.approx(
        stars(small(randomise=dict(fixed, star_density=[1.0, 1.0])), "fld00"), rel=0.2
    )
    assert stars(both, "fld00") < stars(drawn, "fld00")


def test_nuclear_transients_sit_on_their_hosts_core_and_hosts_are_bright():
    tel = small(fields=1, epochs=2, size=[512, 512], transients=400, transient_nuclear_fraction=0.5)
    obj = sky.field_scene(tel, "fld00", seed=SEED).objects
    gal = obj[obj["kind"] == "galaxy"]
    tr = obj[(obj["kind"] == "transient") & (obj["host"] != "")]
    host = gal[np.searchsorted(gal["id"], tr["host"])]
    assert list(host["id"]) == list(tr["host"])
    sep = np.hypot((tr["ra"] - host["ra"]) * math.cos(math.radians(tr["dec"][0])), tr["dec"] - host["dec"]) * 3600
    frac = sep / host["r_eff"]
    nuclear = frac < 0.1 + 1e-9
    # Nuclear ones within 0.1 r_eff, the others 0.3-1.5 r_eff out (along the ellipse: at least 0.3 q r_eff).
    assert np.all(frac[~nuclear] >= 0.3 * host["q"][~nuclear] - 1e-9) and np.all(frac <= 1.5 + 1e-9)
    # Half of 240 host transients at the nucleus: 120 ± 8 (binomial); allow 5 sigma.
    assert abs(nuclear.sum() - 0.5 * len(tr)) < 5 * math.sqrt(0.25 * len(tr))
    # Hosts chosen by flux: their median magnitude is much brighter than the candidate hosts' median.
    ok = gal[gal["mags"][:, 0] < 21.5]
    assert np.median(host["mags"][:, 0]) < np.median(ok["mags"][:, 0]) - 1.5
    # With no bias, host magnitudes follow the candidates' distribution (medians within 0.5 mag).
    unbiased = small(fields=1, epochs=2, size=[512, 512], transients=400, transient_host_bias=0.0)
    flat = sky.field_scene(unbiased, "fld00", seed=SEED).objects
    tr0 = flat[(flat["kind"] == "transient") & (flat["host"] != "")]
    g0 = flat[flat["kind"] == "galaxy"]
    assert abs(np.median(g0["mags"][np.searchsorted(g0["id"], tr0["host"]), 0]) - np.median(ok["mags"][:, 0])) < 0.5


def test_transients_reach_the_detection_limit_by_default():
    assert schema_defaults("sky.schema.yaml")["transient_mags"][1] >= 21.0


def test_drawn_read_noise_with_a_fixed_telescope_read_noise_is_a_config_error():
    tel = small(randomise={})
    tel["read_noise"] = 8.0
    with pytest.raises(ConfigError, match="read_noise: null"):
        sky.frame_conditions(tel, "fld00_r_e1", seed=SEED)
    # randomise.read_noise: null keeps the telescope's value instead.
    tel["sky"]["randomise"]["read_noise"] = None
    assert sky.frame_conditions(tel, "fld00_r_e1", seed=SEED).read_noise == 8.0


def test_shipped_randomised_telescope_is_valid_and_randomised():
    tel = load_telescope(DEMO.parent / "randomised.yaml")
    assert tel["sky"]["randomise"]["enabled"] and tel["read_noise"] is None
    conds = [sky.frame_conditions(tel, s.name, seed=SEED) for s in frames_of(tel) if s.reference is not None]
    assert len({round(c.pixel_scale, 9) for c in conds}) == tel["sky"]["fields"]
