"""Faults of a cluster session in the namespace lab: a worker killed, a cable pulled, the manager restarted."""

from __future__ import annotations

import csv
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import PORT, ClusterLab, Proc
from tests.lab import Lab, lab

__all__ = ["lab"]

pytestmark = pytest.mark.timeout(150)

FPS = 20
TWO_CAMERAS = f"""\
name: two-cameras
nodes:
  cam_a:
    type: test_video
    worker: w2
    params: {{width: 96, height: 64, rate_hz: {FPS}}}
    record: true
  cam_b:
    type: test_video
    worker: w3
    params: {{width: 96, height: 64, rate_hz: {FPS}}}
    record: true
  gray_b:
    type: grayscale
    worker: w2
    inputs: [cam_b]
    record: true
"""
ONE_CAMERA = f"""\
name: one-camera
nodes:
  cam:
    type: test_video
    worker: w2
    params: {{width: 96, height: 64, rate_hz: {FPS}}}
    record: true
"""


def _timestamps(path: Path) -> list[int]:
    with open(path, newline="") as fh:
        return [int(row["t_ns"]) for row in csv.DictReader(fh)]


def _run(cluster: ClusterLab, host: int, recipe: Path, duration: str, manager: str) -> Proc:
    return cluster.start(host, ["run", str(recipe), "--duration", duration, "--json", "--manager", manager], "run")


def _result(run: Proc, timeout_s: float) -> dict[str, Any]:
    code = run.wait(timeout_s)
    text = run.text()
    start = text.index("{")
    result = json.loads(text[start:text.rindex("}") + 1])
    result["exit_code"] = code
    return result


def _wait_state(cluster: ClusterLab, host: int, address: str, worker: str, state: str, timeout_s: float) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:  # bounded by timeout_s
        status = cluster.status(host, address)
        if any(w["name"] == worker and w["state"] == state for w in status["workers"]):
            return time.monotonic()
        time.sleep(0.1)
    raise AssertionError(f"worker {worker} not {state} within {timeout_s:g} s: {status}")


def _check_continuous(path: Path, at_least: int) -> None:
    """Every frame of a recording is there: no gap above 2 frame periods in its timestamps."""
    stamps = _timestamps(path)
    assert len(stamps) >= at_least, (len(stamps), at_least)
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    assert max(gaps) < 2.5e9 / FPS, max(gaps)


def test_worker_killed_is_lost_quickly_and_the_others_keep_recording(lab: Lab, tmp_path: Path) -> None:
    lab.add_host()
    cluster = ClusterLab(lab, tmp_path)
    address = f"{lab.ip(1)}:{PORT}"
    manager = cluster.manager(1, "m1", "--no-local-worker")
    cluster.worker(2, "w2", "--manager", address)
    w3 = cluster.worker(3, "w3", "--manager", address)
    run = _run(cluster, 1, cluster.recipe(TWO_CAMERAS), "8s", address)
    w3.wait_for(": recording", 20)
    time.sleep(2.0)
    killed = time.monotonic()
    os.kill(w3.pid, signal.SIGKILL)  # the worker only: its node processes notice and close their files
    lost = _wait_state(cluster, 1, address, "w3", "lost", 6)
    assert lost - killed <= 3.0 + 0.6, lost - killed  # 3 missed beats, plus one status round trip
    manager.wait_for("worker w3 lost", 2)
    result = _result(run, 40)
    assert result["exit_code"] == 1  # the session is incomplete: one machine's part did not report
    manifest = json.loads((Path(result["session_dir"]) / "manifest.json").read_text())
    assert manifest["status"] == "incomplete"
    assert set(manifest["lost_workers"]) == {"w3"}
    assert 1.5e9 < manifest["lost_workers"]["w3"]["lost_at_ns"] < 7e9
    assert manifest["nodes"]["cam_b"]["state"] == "lost"
    cam_a = manifest["nodes"]["cam_a"]
    assert cam_a["state"] == "done" and cam_a["stats"]["samples_out"] >= 7 * FPS
    assert cam_a["stats"]["dropped_out"] == 0 and cam_a["stats"]["record_dropped"] == 0
    # the downstream node of the lost source kept running and reports what it received: no drops
    gray_b = manifest["nodes"]["gray_b"]
    assert gray_b["state"] == "done" and gray_b["stats"]["dropped_in"] == {"cam_b": 0}
    lost_at = manifest["lost_workers"]["w3"]["lost_at_ns"]
    assert gray_b["inputs_lost"] == {"cam_b": {"worker": "w3", "lost_at_ns": lost_at}}
    assert "worker w3 (cam_b) was lost at" in run.text()
    session = result["session_dir"].rsplit("/", 1)[1]
    _check_continuous(cluster.data("w2") / session / "w2" / "cam_a" / "video.timestamps.csv", 7 * FPS)
    # the killed worker's node closed its recording when its worker died: what it recorded is readable
    cam_b_dir = cluster.data("w3") / session / "w3" / "cam_b"
    assert len(_timestamps(cam_b_dir / "video.timestamps.csv")) >= 2 * FPS
    assert (cam_b_dir / "node.json").exists()
    events = [json.loads(line) for line in (Path(result["session_dir"]) / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "worker_lost" and e["worker"] == "w3" and e["nodes"] == ["cam_b"] for e in events)


def test_worker_cut_off_keeps_recording_and_rejoins(lab: Lab, tmp_path: Path) -> None:
    cluster = ClusterLab(lab, tmp_path)
    address = f"{lab.ip(1)}:{PORT}"
    manager = cluster.manager(1, "m1", "--no-local-worker")
    worker = cluster.worker(2, "w2", "--manager", address)
    run = _run(cluster, 1, cluster.recipe(ONE_CAMERA), "18s", address)
    worker.wait_for(": recording", 20)
    time.sleep(2.0)
    lab.link_down(2)
    cut = time.monotonic()
    manager.wait_for("worker w2 lost", 4)
    assert time.monotonic() - cut <= 3.5
    worker.wait_for("lost the manager", 5)
    time.sleep(max(0.0, 10.0 - (time.monotonic() - cut)))
    lab.link_up(2)
    worker.wait_for("rejoined manager m1", 10)
    result = _result(run, 40)
    assert result["exit_code"] == 0, result
    manifest = json.loads((Path(result["session_dir"]) / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    lost = manifest["lost_workers"]["w2"]
    assert lost["finished"] and lost["rejoined_at_ns"] - lost["lost_at_ns"] >= 7e9
    cam = manifest["nodes"]["cam"]
    assert cam["state"] == "done" and cam["stats"]["samples_out"] >= 17 * FPS
    session = result["session_dir"].rsplit("/", 1)[1]
    _check_continuous(cluster.data("w2") / session / "w2" / "cam" / "video.timestamps.csv", 17 * FPS)
    assert len(cam["files"]) >= 10  # the manager got the worker's full file list when it came back


def test_manager_killed_and_restarted_mid_session_loses_nothing(lab: Lab, tmp_path: Path) -> None:
    cluster = ClusterLab(lab, tmp_path)
    address = f"{lab.ip(1)}:{PORT}"
    manager = cluster.manager(1, "m1", "--no-local-worker")
    worker = cluster.worker(2, "w2", "--manager", address)
    run = _run(cluster, 1, cluster.recipe(ONE_CAMERA), "14s", address)
    worker.wait_for(": recording", 20)
    time.sleep(2.0)
    os.kill(manager.pid, signal.SIGKILL)
    worker.wait_for("lost the manager", 5)
    run.wait_for("lost the manager", 5)
    time.sleep(2.0)
    restarted = cluster.manager(1, "m1", "--no-local-worker")
    restarted.wait_for("following session", 5)
    worker.wait_for("rejoined manager m1", 10)
    run.wait_for("the manager is back", 15)
    result = _result(run, 40)
    assert result["exit_code"] == 0, result
    session_dir = Path(result["session_dir"])
    manifest = json.loads((session_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete", manifest
    cam = manifest["nodes"]["cam"]
    assert cam["stats"]["samples_out"] >= 13 * FPS
    _check_continuous(cluster.data("w2") / session_dir.name / "w2" / "cam" / "video.timestamps.csv", 13 * FPS)
    events = [json.loads(line)["event"] for line in (session_dir / "events.jsonl").read_text().splitlines()]
    assert "manager_restarted" in events and events[-1] == "session_stopped"
    # the clock estimate went on through the restart: no step, no gap after it
    clock = manifest["workers"]["w2"]["clock"]
    assert clock["measured"] and clock["max_uncertainty_ns"] < 1_000_000
    times = [row[0] for row in clock["history"]]
    offsets = [row[1] for row in clock["history"]]
    assert times[-1] > 12e9 and max(offsets) - min(offsets) < 200_000


def test_worker_back_after_the_end_completes_the_manifest(lab: Lab, tmp_path: Path) -> None:
    cluster = ClusterLab(lab, tmp_path)
    address = f"{lab.ip(1)}:{PORT}"
    manager = cluster.manager(1, "m1", "--no-local-worker")
    worker = cluster.worker(2, "w2", "--manager", address)
    run = _run(cluster, 1, cluster.recipe(ONE_CAMERA), "6s", address)
    worker.wait_for(": recording", 20)
    time.sleep(1.0)
    lab.link_down(2)
    result = _result(run, 30)  # the session ends while w2 is cut off: it finishes on its own
    assert result["exit_code"] == 1
    session_dir = Path(result["session_dir"])
    manifest = json.loads((session_dir / "manifest.json").read_text())
    assert manifest["status"] == "incomplete" and not manifest["lost_workers"]["w2"]["finished"]
    worker.wait_for(": finished", 10)
    lab.link_up(2)
    manager.wait_for("worker w2 reported its recordings after the end; manifest updated (complete)", 15)
    manifest = json.loads((session_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["lost_workers"]["w2"]["finished"]
    cam = manifest["nodes"]["cam"]
    assert cam["state"] == "done" and cam["stats"]["samples_out"] >= 5 * FPS and len(cam["files"]) >= 6
    _check_continuous(cluster.data("w2") / session_dir.name / "w2" / "cam" / "video.timestamps.csv", 5 * FPS)
