"""Tests of rbflow.crossmatch: matching geometry, outputs, and the labelled training folders."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from astropy.table import Table
from astropy.wcs import WCS
from numpy.testing import assert_allclose

from rbflow import sky
from rbflow.crossmatch import (
    REF_PREFIX,
    RETIRED,
    crossmatch,
    label_cutouts,
    read_catalogue,
    relabel_digest,
    run_crossmatch,
    truth_kinds,
)
from rbflow.cutouts import MANIFEST
from rbflow.datacube import labelled_files
from rbflow.errors import InputError
from rbflow.io import write_table

RADIUS = 2.0


def _wcs() -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [64.5, 64.5]
    w.wcs.cd = [[-1.0e-4, 0.0], [0.0, 1.0e-4]]  # 0.36 arcsec/px
    return w


def _with_sky(table: Table, wcs: WCS | None = None) -> Table:
    table["ra"], table["dec"] = (wcs or _wcs()).pixel_to_world_values(table["x"], table["y"])
    return table


def _injected() -> Table:
    xy = [(20, 20), (50, 50), (51.5, 50), (80, 80), (100, 20)]
    return _with_sky(
        Table(
            {
                "id": [f"inj{i}" for i in range(len(xy))],
                "image": ["img_sim0"] * len(xy),
                "frame": ["img"] * len(xy),
                "x": [float(p[0]) for p in xy],
                "y": [float(p[1]) for p in xy],
                "mag": [18.0, 19.0, 19.5, 20.0, 23.0],
                "filter": ["r"] * len(xy),
            }
        )
    )


def _candidates() -> Table:
    # C0 true; C1 shared by inj1 + inj2; C2 nearest of inj3; C3 second of inj3; C4 nothing;
    # C5 catalogue source; C6 same place as inj4 but another image.
    xy = [(20.5, 20), (50.8, 50), (80.3, 80), (81.5, 80.5), (110, 110), (10, 100), (100, 20)]
    n = len(xy)
    return _with_sky(
        Table(
            {
                "id": [f"img_sim0_{i}" for i in range(n)],
                "image": ["img_sim0"] * (n - 1) + ["other"],
                "x": [float(p[0]) for p in xy],
                "y": [float(p[1]) for p in xy],
                "mag": np.arange(n) + 18.1,
                "mag_err": np.full(n, 0.05),
                "snr": np.arange(n) + 10.0,
            }
        )
    )


def _catalogue() -> Table:
    ra, dec = _wcs().pixel_to_world_values([10.5, 200.0], [100.0, 200.0])  # 0.5 px from C5; one far away
    return Table({"ra": ra, "dec": dec})


@pytest.mark.parametrize("wcs", [_wcs(), None], ids=["wcs", "pixel-scale-fit"])
def test_known_geometry(wcs):
    per, labels = crossmatch(_candidates(), _injected(), radius=RADIUS, catalogues=[_catalogue()], wcs=wcs)
    assert list(per["detected"]) == [True, True, True, True, False]
    assert list(per["cand_id"]) == ["img_sim0_0", "img_sim0_1", "img_sim0_1", "img_sim0_2", ""]
    # Separations are exact geometry; 1e-9 px is float noise.
    assert_allclose(per["sep"][:4], [0.5, 0.8, 0.7, 0.3], atol=1e-9)
    assert np.isnan(per["sep"][4]) and np.isnan(per["mag_meas"][4])
    assert_allclose(per["mag_meas"][:4], [18.1, 19.1, 19.1, 20.1])
    assert list(per["ambiguous"]) == [False, True, True, True, False]
    assert "inj2" in per["note"][1] and "img_sim0_3" in per["note"][3]
    assert list(per["n_cand"]) == [1, 1, 1, 2, 0]

    assert list(labels["label"]) == ["true", "true", "true", "unsorted", "false", "true", "false"]
    assert list(labels["match_kind"]) == ["injected", "injected", "injected", "injected", "", "catalogue", ""]
    assert list(labels["ambiguous"]) == [False, True, False, True, False, False, False]
    assert "2 injected sources" in labels["note"][1]
    assert "not its nearest" in labels["note"][3]
    # Sky-separation path: 0.5 px via a fitted pixel scale; 1e-3 px covers the TAN projection's curvature.
    assert_allclose(labels["sep"][5], 0.5, atol=1e-3)
    assert_allclose(labels["mag_inj"][:4], [18.0, 19.5, 20.0, 20.0])


def test_empty_inputs_are_typed():
    cands = _candidates()[:0]
    per, labels = crossmatch(cands, _injected(), radius=RADIUS)
    assert len(per) == 5 and not per["detected"].any() and per["cand_id"].dtype.kind == "U"
    assert len(labels) == 0 and labels["label"].dtype.kind == "U"
    per, labels = crossmatch(_candidates(), _injected()[:0], radius=RADIUS)
    assert len(per) == 0 and list(labels["label"]) == ["false"] * 7
    with pytest.raises(ValueError, match="radius"):
        crossmatch(cands, _injected(), radius=0.0)
    with pytest.raises(InputError, match="pixel scale"):
        crossmatch(_candidates()[:1], _injected()[:0], radius=RADIUS, catalogues=[_catalogue()])


@pytest.mark.parametrize("unmatched", ["false", "unsorted"])
def test_run_crossmatch_outputs(tmp_path, unmatched):
    write_table(_candidates(), tmp_path / "cands.ecsv")
    write_table(_injected(), tmp_path / "inj.ecsv")
    _catalogue().write(tmp_path / "known.csv", format="ascii.csv")
    out = tmp_path / "xm"
    per, labels = run_crossmatch(
        tmp_path / "cands.ecsv",
        tmp_path / "inj.ecsv",
        out / "img_sim0.ecsv",
        out / "img_sim0.dat",
        out / "img_sim0.per_candidate.ecsv",
        radius=RADIUS,
        catalogues=[str(tmp_path / "known.csv")],
        label_unmatched=unmatched,
    )
    assert list(labels["label"]) == ["true", "true", "true", "unsorted", unmatched, "true", unmatched]
    back = Table.read(out / "img_sim0.per_candidate.ecsv")
    assert list(back["label"]) == list(labels["label"])
    assert Table.read(out / "img_sim0.ecsv")["detected"].sum() == 4
    # the older tool's crossmatch.dat (columns checked in test_legacy.py)
    dat = Table.read(out / "img_sim0.dat", format="ascii.commented_header")
    assert "0-based" in (out / "img_sim0.dat").read_text().splitlines()[1]
    first, last = dat[0], dat[-1]
    assert (first["filename"], first["Xpos"], first["Ypos"], first["mag"]) == ("img_sim0", 20.0, 20.0, 18.0)
    assert (first["Nmatches"], first["closest_candID"], first["mag_meas"], first["sep"]) == (1, "img_sim0_0", 18.1, 0.5)
    assert last["Nmatches"] == 0 and last["closest_candID"] == "None"
    assert np.isnan([last["mag_meas"], last["sep"]]).all()
    with pytest.raises(ValueError, match="label_unmatched"):
        run_crossmatch(
            tmp_path / "cands.ecsv",
            tmp_path / "inj.ecsv",
            out / "a",
            out / "b",
            out / "c",
            radius=RADIUS,
            label_unmatched="maybe",
        )


def test_catalogue_errors(tmp_path):
    Table({"ra": [1.0], "de": [2.0]}).write(tmp_path / "bad.ecsv", format="ascii.ecsv")
    with pytest.raises(InputError, match="bad.ecsv.*lacks column.*dec"):
        read_catalogue(tmp_path / "bad.ecsv")
    with pytest.raises(InputError, match="missing.csv' does not exist"):
        read_catalogue(tmp_path / "missing.csv")
    (tmp_path / "junk.ecsv").write_text("not a table\n\x00")
    with pytest.raises(InputError, match="junk.ecsv.*not a readable"):
        read_catalogue(tmp_path / "junk.ecsv")
    (tmp_path / "ok.csv").write_text("ra,dec,name\n150.0,2.0,sn1\n")
    assert len(read_catalogue(tmp_path / "ok.csv")) == 1


def _cutout_dir(root, image: str, n: int, *, x0: float = 10.0):
    folder = root / "cutouts" / image
    folder.mkdir(parents=True, exist_ok=True)
    ids = [f"{image}_{i}" for i in range(n)]
    for i in ids:
        (folder / f"{i}.fits").write_bytes(b"FITS " + i.encode() + f" {x0}".encode())
        (folder / f"{i}.png").write_bytes(b"PNG " + i.encode())
    xs = [x0 + 20.0 * k for k in range(n)]
    Table({"id": ids, "image": [image] * n, "x": xs, "y": xs, "file": [f"{i}.fits" for i in ids]}).write(
        folder / MANIFEST, overwrite=True
    )
    return folder


def test_label_cutouts_person_choice_wins(tmp_path, caplog):
    d0 = _cutout_dir(tmp_path, "a_sim0", 3)
    d1 = _cutout_dir(tmp_path, "b_sim0", 2)
    labels = tmp_path / "labels.ecsv"
    ids = ["a_sim0_0", "a_sim0_1", "a_sim0_2", "b_sim0_0"]
    Table({"id": ids, "label": ["true", "false", "unsorted", "false"]}).write(labels)
    train = tmp_path / "training"
    with caplog.at_level(logging.WARNING, logger="rbflow.crossmatch"):
        out = label_cutouts([labels], [d0, d1], train)
    assert "1 cutouts have no label" in caplog.text  # b_sim0_1
    assert sorted(p.name for p in (train / "true").iterdir()) == ["a_sim0_0.fits", "a_sim0_0.png"]
    assert sorted(p.name for p in (train / "false").iterdir()) == [
        "a_sim0_1.fits",
        "a_sim0_1.png",
        "b_sim0_0.fits",
        "b_sim0_0.png",
    ]
    assert (train / "unsorted" / "a_sim0_2.fits").exists()
    assert set(out["action"]) <= {"linked", "copied"}
    assert (train / "false" / "b_sim0_0.fits").read_bytes() == b"FITS b_sim0_0 10.0"
    assert relabel_digest(train) == "auto"  # nothing moved since labelling

    (train / "false" / "a_sim0_1.fits").rename(train / "true" / "a_sim0_1.fits")  # a person's decision
    moved = relabel_digest(train)
    assert moved.startswith("moved:") and moved == relabel_digest(train)  # stable
    # The cutouts stage reruns and rewrites the file (new inode, new content).
    (d0 / "a_sim0_1.fits").unlink()
    (d0 / "a_sim0_1.fits").write_bytes(b"FITS new")
    out = label_cutouts([labels], [d0, d1], train)
    assert (train / "true" / "a_sim0_1.fits").read_bytes() == b"FITS new"  # refreshed where the person put it
    assert not (train / "false" / "a_sim0_1.fits").exists()
    row = out[out["id"] == "a_sim0_1"][0]
    assert (row["label_auto"], row["label_folder"], row["action"], row["refreshed"]) == ("false", "true", "kept", True)
    assert out["refreshed"].sum() == 1
    saved = Table.read(train / "labels.ecsv")
    assert list(saved.colnames[:4]) == ["id", "key", "label_auto", "label_folder"]
    assert saved[saved["id"] == "a_sim0_1"]["label_folder"][0] == "true"
    assert relabel_digest(train) == "auto"  # the relabelling recorded the person's choice
    # Moving a file into unsorted/ also changes the true/false listing.
    (train / "true" / "a_sim0_0.fits").rename(train / "unsorted" / "a_sim0_0.fits")
    assert relabel_digest(train).startswith("moved:")


def test_label_cutouts_errors(tmp_path):
    d0 = _cutout_dir(tmp_path, "a_sim0", 1)
    with pytest.raises(InputError, match="does not exist"):
        label_cutouts([tmp_path / "none.ecsv"], [d0], tmp_path / "training")
    Table({"id": ["a_sim0_0"], "label": ["maybe"]}).write(tmp_path / "l.ecsv")
    with pytest.raises(InputError, match="'maybe'.*true, false, unsorted"):
        label_cutouts([tmp_path / "l.ecsv"], [d0], tmp_path / "training")
    assert relabel_digest(tmp_path / "nothing") == "auto"  # nothing labelled yet


def test_label_cutouts_follows_new_labels_unless_a_person_moved_the_same_candidate(tmp_path, caplog):
    d0 = _cutout_dir(tmp_path, "a_sim0", 3)
    labels = tmp_path / "labels.ecsv"
    Table({"id": ["a_sim0_0", "a_sim0_1", "a_sim0_2"], "label": ["true", "false", "false"]}).write(labels)
    train = tmp_path / "training"
    label_cutouts([labels], [d0], train)
    (train / "false" / "a_sim0_1.fits").rename(train / "true" / "a_sim0_1.fits")  # a person's decision
    # The crossmatch changes its mind about a_sim0_2 (same candidate): nobody moved it, it follows.
    Table({"id": ["a_sim0_0", "a_sim0_1", "a_sim0_2"], "label": ["true", "false", "true"]}).write(
        labels, overwrite=True
    )
    out = label_cutouts([labels], [d0], train)
    assert (train / "true" / "a_sim0_2.fits").exists() and not (train / "false" / "a_sim0_2.fits").exists()
    assert (train / "true" / "a_sim0_2.png").exists()
    assert (train / "true" / "a_sim0_1.fits").exists()  # the person's move stands
    assert dict(zip(out["id"], out["action"]))["a_sim0_2"] == "relabelled"
    # Upstream rerun (new injections): the ids now name other candidates, at other positions.
    d0 = _cutout_dir(tmp_path, "a_sim0", 3, x0=13.0)
    Table({"id": ["a_sim0_0", "a_sim0_1", "a_sim0_2"], "label": ["false", "false", "false"]}).write(
        labels, overwrite=True
    )
    with caplog.at_level(logging.WARNING, logger="rbflow.crossmatch"):
        out = label_cutouts([labels], [d0], train)
    assert "1 files a person had moved now hold other candidates" in caplog.text
    assert sorted(p.name for p in (train / "true").iterdir()) == []
    assert all(out["label_folder"] == "false")
    assert (train / "false" / "a_sim0_1.fits").read_bytes() == b"FITS a_sim0_1 13.0"
    assert relabel_digest(train) == "auto"


# --- truth kinds: what a candidate sits on in the truth tables of its frames ------------------------


def _ref_wcs() -> WCS:
    """The reference frame: shifted, rotated by 10 deg and with pixels twice as large as the science frame's."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [40.5, 70.5]
    c, s = np.cos(np.radians(10.0)), np.sin(np.radians(10.0))
    w.wcs.cd = 2.0e-4 * np.array([[-c, s], [s, c]])  # 0.72 arcsec/px
    return w


def _science_truth() -> Table:
    """Science frame (pixels of _wcs()): points, a trail (segment) and a ghost (extent)."""
    nan = np.nan
    rows = [
        # id, kind, x, y, x1, y1, extent
        ("star1", "star", 30.0, 30.0, nan, nan, 0.0),
        ("cr0", "cosmic_ray", 60.0, 30.0, nan, nan, 0.0),
        ("sat0", "satellite", 10.0, 90.0, 120.0, 90.0, 0.0),
        ("star2", "star", 90.0, 91.0, nan, nan, 0.0),
        ("gh0", "ghost", 100.0, 50.0, nan, nan, 8.0),
        ("hot0", "hot_pixel", 101.0, 52.0, nan, nan, 0.0),
        ("ast0", "asteroid", 40.0, 60.0, nan, nan, 0.0),
    ]
    t = Table(rows=rows, names=("id", "kind", "x", "y", "x1", "y1", "extent"))
    _with_sky(t)
    t["ra1"], t["dec1"] = _wcs().pixel_to_world_values(t["x1"], t["y1"])
    return t


def _reference_truth() -> Table:
    """Reference frame (pixels of _ref_wcs()), built from science-frame positions through the sky."""
    nan = np.nan
    rows = [
        # id, kind, science x, y, x1, y1, extent in reference pixels
        ("star1", "star", 30.0, 30.0, nan, nan, 0.0),  # the science frame's star1: left out
        ("bl0", "bleed", 70.0, 110.0, 70.0, 125.0, 0.0),
        ("star9", "star", 15.0, 60.0, nan, nan, 0.0),  # a star only the reference has
        ("gh9", "ghost", 20.0, 120.0, nan, nan, 4.0),  # 4 reference px = 8 science px
    ]
    t = Table(rows=rows, names=("id", "kind", "x", "y", "x1", "y1", "extent"))
    sci, ref = _wcs(), _ref_wcs()
    t["ra"], t["dec"] = sci.pixel_to_world_values(t["x"], t["y"])
    t["ra1"], t["dec1"] = sci.pixel_to_world_values(t["x1"], t["y1"])
    t["x"], t["y"] = ref.world_to_pixel_values(t["ra"], t["dec"])
    t["x1"], t["y1"] = ref.world_to_pixel_values(t["ra1"], t["dec1"])
    return t


#: Candidates (science pixels) and the kind each sits on, with both truth tables (radius 2 px).
KIND_CASES = [
    ((30.5, 30.0), "star"),  # reference star1 is the same object: the science row stands for it
    ((61.0, 31.0), "cosmic_ray"),  # 1.41 px
    ((64.0, 30.0), ""),  # 4 px from the cosmic ray
    ((50.0, 91.5), "satellite"),  # 1.5 px from the trail's segment, 40 px from its ends
    ((125.0, 90.0), ""),  # 5 px beyond the trail's end
    ((90.0, 91.2), "star"),  # on the trail too (1.2 px), but 0.2 px from the star
    ((100.0, 59.0), "ghost"),  # 9 px from the ghost's centre, 1 px beyond its extent of 8
    ((100.0, 61.0), ""),  # 3 px beyond the extent
    ((100.0, 52.0), "ghost"),  # inside the ghost (distance 0) beats the hot pixel 1 px away
    ((71.0, 118.0), REF_PREFIX + "bleed"),  # 1 px from the reference's bleed trail
    ((71.0, 128.0), ""),  # 3.2 px from the bleed's end
    ((15.5, 60.0), REF_PREFIX + "star"),
    ((20.0, 129.5), REF_PREFIX + "ghost"),  # 9.5 px: 1.5 px beyond 8 science px (4 reference px)
    ((40.0, 60.5), "asteroid"),
    ((np.nan, np.nan), ""),  # a candidate without a position sits on nothing
]


def _kind_candidates(cases=KIND_CASES) -> Table:
    xy = np.array([c[0] for c in cases], dtype=float)
    return Table({"id": [f"img_sim0_{i}" for i in range(len(cases))], "x": xy[:, 0], "y": xy[:, 1]})


def test_truth_kinds_of_points_segments_extents_and_the_reference():
    kinds = truth_kinds(_kind_candidates(), _science_truth(), radius=RADIUS, reference=_reference_truth())
    assert list(kinds) == [c[1] for c in KIND_CASES]
    # without the reference table its kinds are gone and nothing else changes
    alone = truth_kinds(_kind_candidates(), _science_truth(), radius=RADIUS)
    assert list(alone) == ["" if c[1].startswith(REF_PREFIX) else c[1] for c in KIND_CASES]
    # a larger radius reaches the points 3-4 px away
    wide = truth_kinds(_kind_candidates(), _science_truth(), radius=4.5, reference=_reference_truth())
    assert (wide[2], wide[7], wide[10]) == ("cosmic_ray", "ghost", REF_PREFIX + "bleed")


def test_truth_kinds_reads_tables_without_the_geometry_columns():
    """Truth tables of older versions (no x1, y1, ra1, dec1, extent): every row is a point of extent 0."""
    old_sci = _science_truth()
    old_sci.remove_columns(["x1", "y1", "ra1", "dec1", "extent"])
    old_ref = _reference_truth()
    old_ref.remove_columns(["x1", "y1", "ra1", "dec1", "extent"])
    kinds = truth_kinds(_kind_candidates(), old_sci, radius=RADIUS, reference=old_ref)
    expected = [c[1] for c in KIND_CASES]
    # the trail is its first end, the ghost its centre, the bleed its first end (110): now all too far
    for i, now in ((3, ""), (6, ""), (8, "hot_pixel"), (9, ""), (12, "")):
        expected[i] = now
    assert list(kinds) == expected
    # NaN geometry reads the same as absent geometry
    nan_sci = _science_truth()
    for col in ("x1", "y1", "extent"):
        nan_sci[col] = np.nan
    assert list(truth_kinds(_kind_candidates(), nan_sci, radius=RADIUS)) == list(
        truth_kinds(_kind_candidates(), old_sci, radius=RADIUS)
    )


def test_truth_kinds_errors():
    cands = _kind_candidates()
    with pytest.raises(ValueError, match="radius"):
        truth_kinds(cands, _science_truth(), radius=0.0)
    bad = _reference_truth()
    bad.remove_column("ra")
    with pytest.raises(InputError, match="reference truth table lacks column.*ra"):
        truth_kinds(cands, _science_truth(), radius=RADIUS, reference=bad)
    with pytest.raises(InputError, match="fewer than 3 rows"):
        truth_kinds(cands, _science_truth()[:2], radius=RADIUS, reference=_reference_truth())
    assert truth_kinds(cands[:0], _science_truth(), radius=RADIUS).shape == (0,)
    assert list(truth_kinds(cands, _science_truth()[:0], radius=RADIUS)) == [""] * len(cands)


def _kind_run(tmp_path, monkeypatch, real_kinds, *, reference=True):
    """run_crossmatch on KIND_CASES plus an injected source and a catalogue source, with the truth tables."""
    monkeypatch.setattr(sky, "REAL_KINDS", real_kinds)
    cands = _with_sky(_kind_candidates(KIND_CASES[:-1] + [((20.0, 20.0), "injected"), ((10.0, 10.0), "catalogue")]))
    n = len(cands)
    cands["mag"], cands["mag_err"], cands["snr"] = np.full(n, 20.0), np.full(n, 0.1), np.full(n, 10.0)
    inj = _with_sky(Table({"id": ["inj0"], "x": [20.3], "y": [20.0], "mag": [19.0]}))
    ra, dec = _wcs().pixel_to_world_values([10.0], [10.5])
    Table({"ra": ra, "dec": dec}).write(tmp_path / "known.ecsv", format="ascii.ecsv", overwrite=True)
    write_table(cands, tmp_path / "cands.ecsv")
    write_table(inj, tmp_path / "inj.ecsv")
    write_table(_science_truth(), tmp_path / "sci_truth.ecsv")
    write_table(_reference_truth(), tmp_path / "ref_truth.ecsv")
    out = tmp_path / "xm"
    _, labels = run_crossmatch(
        tmp_path / "cands.ecsv",
        tmp_path / "inj.ecsv",
        out / "t.ecsv",
        out / "t.dat",
        out / "t.per_candidate.ecsv",
        radius=RADIUS,
        catalogues=[str(tmp_path / "known.ecsv")],
        truth_path=tmp_path / "sci_truth.ecsv",
        reference_truth_path=tmp_path / "ref_truth.ecsv" if reference else None,
    )
    back = Table.read(out / "t.per_candidate.ecsv")
    for col in ("truth_kind", "match_kind"):  # ECSV reads '' back as masked
        back[col] = np.asarray(np.ma.filled(back[col], "")).astype(str)
    assert list(back["truth_kind"]) == list(labels["truth_kind"])
    return labels, back


def test_run_crossmatch_tags_truth_kinds_and_matches_asteroids(tmp_path, monkeypatch):
    labels, back = _kind_run(tmp_path, monkeypatch, ("variable", "transient", "asteroid"))
    expected = [c[1] for c in KIND_CASES[:-1]] + ["injected", "catalogue"]
    assert list(back["truth_kind"]) == expected
    asteroid = expected.index("asteroid")
    # the asteroid is real through the truth (a known solar-system object); the rest matched nothing
    assert back["label"][asteroid] == "true" and back["match_kind"][asteroid] == "truth"
    assert list(back["label"][-2:]) == ["true", "true"]
    assert list(back["match_kind"][-2:]) == ["injected", "catalogue"]
    others = [i for i in range(len(expected) - 2) if i != asteroid]
    assert set(back["label"][others]) == {"false"} and set(back["match_kind"][others]) == {""}
    assert back.meta["truth"] == [str(tmp_path / "sci_truth.ecsv"), str(tmp_path / "ref_truth.ecsv")]


def test_run_crossmatch_asteroids_stay_false_until_the_sky_calls_them_real(tmp_path, monkeypatch):
    _, back = _kind_run(tmp_path, monkeypatch, ("variable", "transient"), reference=False)
    asteroid = list(back["truth_kind"]).index("asteroid")
    assert (back["label"][asteroid], back["match_kind"][asteroid]) == ("false", "")
    assert REF_PREFIX + "bleed" not in set(back["truth_kind"])  # no reference table given
    with pytest.raises(ValueError, match="needs the science frame's truth table"):
        run_crossmatch(
            tmp_path / "cands.ecsv",
            tmp_path / "inj.ecsv",
            tmp_path / "a",
            tmp_path / "b",
            tmp_path / "c",
            radius=RADIUS,
            reference_truth_path=tmp_path / "ref_truth.ecsv",
        )
    broken = _science_truth()
    broken.remove_column("kind")
    write_table(broken, tmp_path / "broken.ecsv")
    with pytest.raises(InputError, match="broken.ecsv.*lacks column.*kind"):
        run_crossmatch(
            tmp_path / "cands.ecsv",
            tmp_path / "inj.ecsv",
            tmp_path / "a",
            tmp_path / "b",
            tmp_path / "c",
            radius=RADIUS,
            truth_path=tmp_path / "broken.ecsv",
        )


def test_label_cutouts_keeps_the_truth_kind_when_a_person_moves_a_cutout(tmp_path):
    d0 = _cutout_dir(tmp_path, "a_sim0", 3)
    labels = tmp_path / "labels.ecsv"
    Table(
        {
            "id": ["a_sim0_0", "a_sim0_1", "a_sim0_2"],
            "label": ["true", "false", "false"],
            "truth_kind": ["injected", "ref:bleed", ""],
        }
    ).write(labels)
    train = tmp_path / "training"
    out = label_cutouts([labels], [d0], train)
    assert list(out["truth_kind"]) == ["injected", "ref:bleed", ""]
    (train / "false" / "a_sim0_1.fits").rename(train / "true" / "a_sim0_1.fits")  # a person: real after all
    label_cutouts([labels], [d0], train)
    saved = Table.read(train / "labels.ecsv")
    row = saved[saved["id"] == "a_sim0_1"][0]
    assert (row["label_folder"], row["truth_kind"]) == ("true", "ref:bleed")
    assert np.ma.is_masked(saved["truth_kind"][saved["id"] == "a_sim0_2"][0])  # '' comes back masked
    assert list(Table.read(train / "labels.ecsv")["truth_kind"].filled("")) == ["injected", "ref:bleed", ""]
    # per-candidate tables of older versions have no truth_kind: '' throughout
    Table({"id": ["a_sim0_0", "a_sim0_1", "a_sim0_2"], "label": ["true", "false", "false"]}).write(
        labels, overwrite=True
    )
    assert list(label_cutouts([labels], [d0], train)["truth_kind"]) == ["", "", ""]


def test_label_cutouts_retires_the_files_of_candidates_a_rerun_no_longer_makes(tmp_path):
    d0 = _cutout_dir(tmp_path, "a_sim0", 3)
    labels = tmp_path / "labels.ecsv"
    Table({"id": ["a_sim0_0", "a_sim0_1", "a_sim0_2"], "label": ["true", "false", "false"]}).write(labels)
    train = tmp_path / "training"
    label_cutouts([labels], [d0], train)
    (train / "false" / "a_sim0_2.fits").rename(train / "true" / "a_sim0_2.fits")  # a person's move
    # the rerun makes two candidates only: the third one's files leave the label folders, kept aside
    Table({"id": ["a_sim0_0", "a_sim0_1"], "label": ["true", "false"]}).write(labels, overwrite=True)
    out = label_cutouts([labels], [d0], train)
    assert list(out["id"]) == ["a_sim0_0", "a_sim0_1"]
    assert sorted(p.name for p in (train / "true").glob("*.fits")) == ["a_sim0_0.fits"]
    assert sorted(p.name for p in (train / "false").glob("*.fits")) == ["a_sim0_1.fits"]
    assert sorted(p.name for p in (train / RETIRED).iterdir()) == sorted(
        p.name for p in d0.iterdir() if p.stem == "a_sim0_2" and p.suffix in (".fits", ".png")
    )
    # what a datacube is built from
    assert [(y, p.name) for y, p in labelled_files(train)] == [(1, "a_sim0_0.fits"), (0, "a_sim0_1.fits")]


@pytest.mark.workflow
def test_tiny_run_tags_truth_kinds_through_to_the_datacube(tiny_run):
    """The tiny synthetic run: every candidate has a truth kind, labels.ecsv and the datacube carry it."""
    res = tiny_run / "results" / "tiny"
    known = set(sky.TRUTH_KINDS)
    tagged = {}
    for path in sorted((res / "sim" / "crossmatch").glob("*.per_candidate.ecsv")):
        table = Table.read(path)
        kind = np.asarray(np.ma.filled(table["truth_kind"], "")).astype(str)
        match = np.asarray(np.ma.filled(table["match_kind"], "")).astype(str)
        matched = match != ""
        assert np.array_equal(kind[matched & (match != "truth")], match[matched & (match != "truth")]), path
        assert set(kind[match == "truth"]) <= {"asteroid"}, path
        rest = {k.removeprefix(REF_PREFIX) for k in kind[~matched]} - {""}
        assert rest <= known, (path, rest - known)
        tagged.update(zip(np.asarray(table["id"]).astype(str), kind))
    # the tiny sky's cosmic rays, hot pixels, stars... leave bogus candidates with a kind
    assert sum(1 for k in tagged.values() if k not in ("", "injected", "catalogue")) >= 3
    labels = Table.read(res / "training" / "labels.ecsv")
    saved = dict(zip(labels["id"], np.asarray(np.ma.filled(labels["truth_kind"], "")).astype(str)))
    assert {i: saved[i] for i in saved} == {i: tagged[i] for i in saved}
    cube = np.load(res / "training" / "datacube.npz")
    assert {i: k for i, k in zip(cube["ids"].astype(str), cube["truth_kind"].astype(str))} == {
        i: saved[i] for i in cube["ids"].astype(str)
    }
    kinds = Table.read(res / "plots" / "checkinfer" / "kinds.ecsv")
    assert ("injected", "true") in set(zip(np.ma.filled(kinds["kind"], ""), kinds["label"]))
