"""`cp run` as a user runs it: a real process, real signals, exit codes, nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.conftest import ROOT, cp, write_recipe

START_TIMEOUT_S = 20.0


def _launch(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "cpcli", "run", str(ROOT / "recipes" / "demo.yaml"),
                             "--out", str(tmp_path / "sessions"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


def _wait_recording(tmp_path: Path, proc: subprocess.Popen[str]) -> Path:
    """The session folder once every node is running (bounded wait)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        for events in (tmp_path / "sessions").glob("*/events.jsonl"):
            if "session_started" in events.read_text():
                return events.parent
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the session never started")


def test_run_with_duration_prints_summary_and_session_path(tmp_path: Path) -> None:
    result = cp("run", str(ROOT / "recipes" / "demo.yaml"), "--duration", "1.5s", "--out", str(tmp_path / "s"))
    assert result.returncode == 0, result.stderr
    assert "session folder:" in result.stdout and "session complete" in result.stdout
    for node_id in ("cam", "gray", "motion", "mic", "level"):
        assert node_id in result.stdout
    assert "Traceback" not in result.stderr
    assert len(list((tmp_path / "s").glob("*/manifest.json"))) == 1


def test_run_json_output_is_machine_readable(tmp_path: Path) -> None:
    result = cp("run", str(ROOT / "recipes" / "demo.yaml"), "-d", "1", "--out", str(tmp_path / "s"), "--json",
                "--session", "trial-01")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["status"] == "complete" and data["failures"] == {}
    assert Path(data["session_dir"]).name == "trial-01"
    assert data["nodes"]["cam"]["stats"]["samples_out"] > 0


def test_ctrl_c_stops_cleanly_with_exit_130_and_final_files(tmp_path: Path) -> None:
    proc = _launch(tmp_path)
    session = _wait_recording(tmp_path, proc)
    children = psutil.Process(proc.pid).children(recursive=True)  # the zygote and the nodes it forked
    assert sorted(c.cmdline()[c.cmdline().index("--node") + 1] for c in children if "--node" in c.cmdline()) == \
        ["cam", "gray", "level", "mic", "motion"]
    assert len(children) == 6
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=15)
    assert proc.returncode == 130, err
    manifest = json.loads((session / "manifest.json").read_text())
    assert all(node["state"] == "done" for node in manifest["nodes"].values())
    assert manifest["nodes"]["cam"]["files"]
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


def test_sigterm_stops_cleanly_with_exit_0(tmp_path: Path) -> None:
    proc = _launch(tmp_path)
    session = _wait_recording(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert json.loads((session / "manifest.json").read_text())["status"] == "complete"


def test_kill_9_of_cp_run_leaves_no_orphans_and_keeps_recordings(tmp_path: Path) -> None:
    proc = _launch(tmp_path)
    session = _wait_recording(tmp_path, proc)
    children = psutil.Process(proc.pid).children(recursive=True)
    time.sleep(1.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=5)
    gone, alive = psutil.wait_procs(children, timeout=8)
    assert not alive, f"orphans: {[c.pid for c in alive]}"
    # Each node closed its own files and wrote its own record when its supervisor died.
    for node_id in ("cam", "motion", "mic", "level"):
        record = json.loads(next(session.glob(f"*/{node_id}/node.json")).read_text())
        assert record["files"], node_id
        for entry in record["files"]:
            assert (session / entry["path"]).stat().st_size == entry["bytes"]


def test_failing_node_exits_1_naming_node_and_log(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, """
name: broken
nodes:
  dev: {type: fail_setup}
""")
    result = cp("run", str(recipe), "--out", str(tmp_path / "s"), "-d", "10")
    assert result.returncode == 1
    assert "node dev failed: test device 7 could not be opened" in result.stderr
    assert "dev.log" in result.stderr and "Traceback" not in result.stderr


def test_bad_recipe_exits_1_with_one_line_per_problem_and_starts_nothing(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, """
name: bad
nodes:
  cam: {type: test_vidoe}
  gray: {type: grayscale, inputs: [nope]}
""")
    result = cp("run", str(recipe), "--out", str(tmp_path / "s"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "test_vidoe" in result.stderr and "test_video" in result.stderr
    assert "nope" in result.stderr
    assert "recipe.yaml:4" in result.stderr and "recipe.yaml:5" in result.stderr
    assert not (tmp_path / "s").exists()


def test_missing_recipe_file_is_one_clear_line(tmp_path: Path) -> None:
    result = cp("run", str(tmp_path / "missing.yaml"))
    assert result.returncode == 1
    assert "missing.yaml" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_duration_is_one_clear_line(tmp_path: Path) -> None:
    result = cp("run", str(ROOT / "recipes" / "demo.yaml"), "--duration", "ten", "--out", str(tmp_path))
    assert result.returncode == 1
    assert "duration 'ten'" in result.stderr and "30s" in result.stderr


def test_session_name_that_exists_is_refused(tmp_path: Path) -> None:
    (tmp_path / "s" / "taken").mkdir(parents=True)
    result = cp("run", str(ROOT / "recipes" / "demo.yaml"), "--out", str(tmp_path / "s"), "--session", "taken")
    assert result.returncode == 1
    assert "already exists" in result.stderr and "--session" in result.stderr


def test_bad_min_free_is_one_clear_line(tmp_path: Path) -> None:
    result = cp("run", str(ROOT / "recipes" / "demo.yaml"), "--min-free", "lots", "--out", str(tmp_path))
    assert result.returncode == 1
    assert "size 'lots'" in result.stderr and "1GiB" in result.stderr
