"""Apply-path summary: counts per frame and known reals, on hand-made inference tables."""

from __future__ import annotations

import json
import runpy
from types import SimpleNamespace

import numpy as np
import pytest
from astropy.table import Table

from rbflow.apply import summarise_apply
from rbflow.errors import ConfigError


def _infer(path, ra, dec, p):
    table = Table({"id": [f"c{i}" for i in range(len(ra))], "ra": ra, "dec": dec, "label1": p})
    table.write(path)
    table[np.asarray(p) >= 0.5].write(path.with_name(f"{path.stem}_kept.ecsv"))


def test_counts_and_known_reals(tmp_path):
    arcsec = 1 / 3600
    # catalogue: two known reals; the first is found and kept, the second found but rejected
    Table({"ra": [10.0, 10.01], "dec": [0.0, 0.0]}).write(tmp_path / "known.ecsv")
    _infer(tmp_path / "a.ecsv", [10.0 + 0.5 * arcsec, 10.01, 10.02, 10.03], [0.0, 0.0, 0.0, 0.0], [0.9, 0.2, 0.8, 0.1])
    _infer(tmp_path / "b.ecsv", [10.05], [0.0], [0.1])
    out = summarise_apply(
        [tmp_path / "a.ecsv", tmp_path / "b.ecsv"],
        [tmp_path / "a_kept.ecsv", tmp_path / "b_kept.ecsv"],
        tmp_path / "s.json",
        tmp_path / "s.png",
        catalogues=[tmp_path / "known.ecsv"],
        radius_arcsec=2.0,
    )
    a = out["frames"]["a"]
    assert (a["n_candidates"], a["n_kept"], a["reduction"]) == (4, 2, 2.0)
    assert (a["known_detected"], a["known_kept"], a["kept_known"], a["kept_other"]) == (2, 1, 1, 1)
    assert out["frames"]["b"]["reduction"] is None  # nothing kept
    assert out["total"]["n_candidates"] == 5 and out["total"]["survivors_known_fraction"] == 0.5
    assert json.loads((tmp_path / "s.json").read_text())["total"] == out["total"]  # strict JSON: None as null
    assert (tmp_path / "s.png").stat().st_size > 0


def test_without_catalogues_counts_only(tmp_path):
    _infer(tmp_path / "a.ecsv", [1.0, 2.0], [0.0, 0.0], [0.9, 0.1])
    out = summarise_apply(
        [tmp_path / "a.ecsv"], [tmp_path / "a_kept.ecsv"], tmp_path / "s.json", tmp_path / "s.png", radius_arcsec=2.0
    )
    assert out["total"]["known_detected"] == 0 and out["total"]["kept_other"] == 1


def test_radius_in_pixels_uses_each_frames_scale(tmp_path):
    # a telescope whose pixel scale is read from the WCS: the radius (px) becomes arcsec per frame
    arcsec = 1 / 3600
    x = np.array([0.0, 100.0, 0.0, 50.0])
    y = np.array([0.0, 0.0, 100.0, 50.0])
    ra, dec = 10.0 + x * 0.5 * arcsec, y * 0.5 * arcsec  # 0.5 arcsec/px
    # the known real is 3 px (1.5 arcsec) from candidate c3
    Table({"ra": [10.0 + 53.0 * 0.5 * arcsec], "dec": [25.0 * arcsec]}).write(tmp_path / "known.ecsv")
    table = Table(
        {"id": [f"c{i}" for i in range(4)], "x": x, "y": y, "ra": ra, "dec": dec, "label1": [0.1, 0.1, 0.1, 0.9]}
    )
    table.write(tmp_path / "a.ecsv")
    table[table["label1"] >= 0.5].write(tmp_path / "a_kept.ecsv")
    kw = dict(catalogues=[tmp_path / "known.ecsv"], radius_arcsec=None)
    near = summarise_apply(
        [tmp_path / "a.ecsv"], [tmp_path / "a_kept.ecsv"], tmp_path / "s.json", tmp_path / "s.png", radius_px=4.0, **kw
    )
    far = summarise_apply(
        [tmp_path / "a.ecsv"], [tmp_path / "a_kept.ecsv"], tmp_path / "s.json", tmp_path / "s.png", radius_px=2.0, **kw
    )
    assert near["frames"]["a"]["known_detected"] == 1 and far["frames"]["a"]["known_detected"] == 0


def test_one_kept_list_per_table(tmp_path):
    _infer(tmp_path / "a.ecsv", [1.0, 2.0], [0.0, 0.0], [0.9, 0.1])
    with pytest.raises(ConfigError, match="1 inference tables but 0 kept lists"):
        summarise_apply([tmp_path / "a.ecsv"], [], tmp_path / "s.json", tmp_path / "s.png", radius_arcsec=2.0)
    assert not (tmp_path / "s.json").exists()


def test_apply_summary_script_wiring(tmp_path, repo):
    # the rule's declared inputs reach summarise_apply: kept lists come from input.kept, not from beside each table
    _infer(tmp_path / "a.ecsv", [1.0, 2.0], [0.0, 0.0], [0.9, 0.1])
    Table({"id": ["c0", "c1"], "ra": [1.0, 2.0], "dec": [0.0, 0.0], "label1": [0.9, 0.1]}).write(tmp_path / "k.ecsv")
    sm = SimpleNamespace(
        input=SimpleNamespace(infer=[str(tmp_path / "a.ecsv")], kept=[str(tmp_path / "k.ecsv")], catalogues=[]),
        output=SimpleNamespace(summary=str(tmp_path / "s.json"), plot=str(tmp_path / "s.png")),
        params=SimpleNamespace(radius_arcsec=2.0, radius_px=None),
        log=[str(tmp_path / "apply.log")],
        rule="apply_summary",
        wildcards={"telescope": "t"},
    )
    runpy.run_path(str(repo / "scripts" / "apply_summary.py"), init_globals={"snakemake": sm})
    assert json.loads((tmp_path / "s.json").read_text())["frames"]["a"]["n_kept"] == 2
    assert "rule apply_summary" in (tmp_path / "apply.log").read_text()
