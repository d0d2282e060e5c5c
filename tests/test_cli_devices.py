"""`cp devices` as a user runs it: the installed node types' devices, grouped by kind, never a traceback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cpcli.cli import is_ours
from tests.conftest import cp

PLUGIN_DEVICES = Path(__file__).resolve().parent / "plugin_devices"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(PLUGIN_DEVICES), os.environ.get("PYTHONPATH"))
                                                   if p)}


def test_devices_of_every_node_type_are_listed_by_kind_with_the_recipe_values() -> None:
    result = cp("devices", env=ENV)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.index("cameras") < out.index("microphones") < out.index("speakers")
    for text in ("Test camera 0", "/dev/video9", "devtest_camera", "resolution=640x480", "Test USB mic",
                 "Test speaker"):
        assert text in out
    assert "no cameras found" not in out and "no microphones found" not in out


def test_a_failing_plugin_is_a_one_line_warning_and_the_others_still_list() -> None:
    result = cp("devices", env=ENV)
    assert result.returncode == 0
    lines = result.stderr.splitlines()
    assert "warning: node type devtest_fails could not list its devices: RuntimeError: the test bus is down" in lines
    assert any(line.startswith("warning: node type devtest_missing could not be loaded: AttributeError")
               for line in lines)
    assert "Traceback" not in result.stderr and "second line" not in result.stderr
    assert "Test camera 0" in result.stdout


def test_devices_json_merges_node_types_that_open_the_same_device() -> None:
    result = cp("devices", "--json", env=ENV)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    by_name = {d["name"]: d for d in data["devices"]}
    assert by_name["Test USB mic"] == {"kind": "microphone", "device": "Test USB mic", "name": "Test USB mic",
                                       "details": {"channels": 2, "samplerate": 48000},
                                       "types": ["devtest_headset", "devtest_microphone"]}
    assert by_name["Test camera 0"]["device"] == "0" and by_name["Test speaker"]["kind"] == "speaker"
    assert data["none_found"] == []
    assert any("devtest_fails" in w for w in data["warnings"])


def test_kinds_without_devices_are_said_clearly_on_this_machine() -> None:
    """With the built-in nodes only: every camera/microphone kind is listed or named as not found."""
    listing = cp("devices", "--json")
    assert listing.returncode == 0, listing.stderr
    data = json.loads(listing.stdout)
    found = {d["kind"] for d in data["devices"]}
    assert {"camera", "microphone"} <= found | set(data["none_found"])
    result = cp("devices")
    assert result.returncode == 0 and "Traceback" not in result.stderr
    for kind in data["none_found"]:
        assert f"no {kind}s found; " in result.stdout  # with a hint what to try
    for line in result.stderr.splitlines():
        assert line.startswith("warning: "), line


def test_devices_is_ours_unless_it_names_a_file_being_copied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    monkeypatch.chdir(tmp_path)
    assert is_ours(["devices"]) and is_ours(["devices", "--json"])
    (tmp_path / "devices").write_text("list")
    (tmp_path / "dst").mkdir()
    assert not is_ours(["devices", "dst/"])
    assert is_ours(["devices", "--json"])
