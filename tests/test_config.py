"""Configuration and telescope-file validation: defaults, and messages naming file, key and fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rbflow.config import load_config, load_telescope
from rbflow.errors import ConfigError


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_shipped_config_and_telescopes_validate(repo):
    config = yaml.safe_load((repo / "config" / "config.yaml").read_text())
    config["telescope_dir"] = str(repo / "config" / "telescopes")
    load_config(config)
    demo = config["_telescopes"]["demo"]
    assert demo["psf"]["oversampling"] == 2  # default filled in from the schema
    assert demo["sky"]["size"] == [1024, 1024]
    for path in (repo / "config" / "telescopes").glob("*.yaml"):
        if path.stem != "TEMPLATE":
            load_telescope(path)


def test_unknown_key_names_file_and_allowed_keys(tmp_path, repo):
    data = yaml.safe_load((repo / "config" / "telescopes" / "demo.yaml").read_text())
    data["psf"]["gird"] = [3, 3]
    path = _write(tmp_path / "demo.yaml", data)
    with pytest.raises(
        ConfigError, match=r"telescope file '.*demo\.yaml'.*unknown key\(s\) 'gird' at psf.*allowed keys: .*grid"
    ):
        load_telescope(path)


def test_wrong_type_names_key_and_description(tmp_path, repo):
    data = yaml.safe_load((repo / "config" / "telescopes" / "demo.yaml").read_text())
    data["gain"] = "six"
    path = _write(tmp_path / "demo.yaml", data)
    with pytest.raises(ConfigError, match=r"key 'gain': 'six' is not of type 'number', 'null' — Gain \(e-/ADU\)"):
        load_telescope(path)


def test_sky_block_is_validated(tmp_path, repo):
    data = yaml.safe_load((repo / "config" / "telescopes" / "demo.yaml").read_text())
    data["sky"]["fields"] = 0
    path = _write(tmp_path / "demo.yaml", data)
    with pytest.raises(ConfigError, match=r"\(block 'sky'\): key 'fields': 0 is less than the minimum of 1"):
        load_telescope(path)


def test_name_must_match_file(tmp_path, repo):
    data = yaml.safe_load((repo / "config" / "telescopes" / "demo.yaml").read_text())
    path = _write(tmp_path / "other.yaml", data)
    with pytest.raises(ConfigError, match="key 'name' is 'demo' but must equal the file name 'other'"):
        load_telescope(path)


def test_missing_telescope_file_lists_available(tmp_path, repo):
    config = {"telescopes": ["nosuch"], "telescope_dir": str(repo / "config" / "telescopes")}
    with pytest.raises(ConfigError, match=r"names 'nosuch' but .*nosuch\.yaml' does not exist; available: .*demo"):
        load_config(config)


def test_wrong_config_key_and_enum(repo):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'epoch' at train"):
        load_config({"train": {"epoch": 3}, "telescope_dir": str(repo / "config" / "telescopes")})
    with pytest.raises(ConfigError, match=r"key 'convert.channels.0'.*allowed: SCI, REF, DIFF, SCORR"):
        load_config({"convert": {"channels": ["DIF"]}, "telescope_dir": str(repo / "config" / "telescopes")})


def test_yaml_syntax_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"telescope file '.*bad\.yaml' is not valid YAML"):
        load_telescope(path)


def test_real_telescope_needs_frames_or_sky(tmp_path):
    path = _write(tmp_path / "cam.yaml", {"name": "cam", "pixel_scale": 0.5, "filters": ["r"]})
    with pytest.raises(ConfigError, match="give either 'frames' \\(real frames\\) or 'sky'"):
        load_telescope(path)
