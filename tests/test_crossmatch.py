"""Tests of rbflow.crossmatch: matching geometry, outputs, and the labelled training folders."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from astropy.table import Table
from astropy.wcs import WCS
from numpy.testing import assert_allclose

from rbflow.crossmatch import crossmatch, label_cutouts, read_catalogue, relabel_digest, run_crossmatch
from rbflow.cutouts import MANIFEST
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


def _with_sky(table: Table) -> Table:
    table["ra"], table["dec"] = _wcs().pixel_to_world_values(table["x"], table["y"])
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
