"""A cluster on one machine (loopback): `cp manager` found by `cp run` and `cp status` with no address."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, cp, write_recipe

pytestmark = pytest.mark.timeout(90)

DEMO = str(ROOT / "recipes" / "demo.yaml")


@dataclass
class LocalManager:
    proc: subprocess.Popen[str]
    address: str
    data: Path
    log: Path

    def text(self) -> str:
        return self.log.read_text()


def _wait_for(log: Path, pattern: str, timeout_s: float) -> re.Match[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:  # bounded by timeout_s
        found = re.search(pattern, log.read_text())
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no {pattern!r} within {timeout_s:g} s:\n{log.read_text()}")


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[LocalManager]:
    data, log = tmp_path / "data", tmp_path / "manager.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cpcli", "manager", "--name", "m1", "--interface",
                                 "127.0.0.1", "--port", "0", "--data", str(data)], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, cwd=tmp_path,
                                start_new_session=True)
    try:
        address = _wait_for(log, r"listening on (127\.0\.0\.1:\d+)", 15).group(1)
        _wait_for(log, "joined manager m1", 10)
        yield LocalManager(proc, address, data, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def test_run_and_status_find_the_manager_of_this_machine(manager: LocalManager, tmp_path: Path) -> None:
    status = cp("status", "--json", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["manager"]["address"] == manager.address and data["session"] is None
    assert [w["name"] for w in data["workers"]] == ["m1"] and data["workers"][0]["state"] == "ready"
    plain = cp("status", cwd=tmp_path)
    assert plain.returncode == 0 and "manager m1 of cluster default" in plain.stdout
    assert re.search(r"m1\s+│\s+127\.0\.0\.1\s+│\s+ready", plain.stdout), plain.stdout
    run = cp("run", DEMO, "--duration", "2s", cwd=tmp_path, timeout=60)
    assert run.returncode == 0, run.stderr
    assert f"running on the cluster of the manager at {manager.address}" in run.stderr
    sessions = list(manager.data.glob("*_demo"))
    assert len(sessions) == 1 and f"session folder: {sessions[0]}" in run.stdout
    manifest = json.loads((sessions[0] / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["manager"]["name"] == "m1"
    assert {n["worker"] for n in manifest["nodes"].values()} == {"m1"}
    assert all((manager.data / sessions[0].name / f["path"]).exists() for f in manifest["files"])
    assert not (tmp_path / "sessions").exists()  # nothing recorded where cp run was started
    inspect = cp("inspect", str(sessions[0]), cwd=tmp_path)
    assert inspect.returncode == 0, inspect.stdout + inspect.stderr
    after = json.loads(cp("status", "--json", cwd=tmp_path).stdout)
    seen = [(e["event"], e["session"]) for e in after["events"]]
    assert ("session_started", sessions[0].name) in seen and seen[-1] == ("session_stopped", sessions[0].name)


def test_out_refuses_a_cluster_run_and_local_runs_here(manager: LocalManager, tmp_path: Path) -> None:
    refused = cp("run", DEMO, "--duration", "1s", "--out", str(tmp_path / "mine"), cwd=tmp_path)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert f"--out {tmp_path / 'mine'} applies to runs on this machine, but a manager was found at " \
           f"{manager.address}" in refused.stderr and "pass --local" in refused.stderr
    assert not list(manager.data.glob("*_demo")) and not (tmp_path / "mine").exists()
    local = cp("run", DEMO, "--duration", "1s", "--out", str(tmp_path / "mine"), "--local", cwd=tmp_path)
    assert local.returncode == 0, local.stderr
    assert len(list((tmp_path / "mine").glob("*_demo/manifest.json"))) == 1
    assert not list(manager.data.glob("*_demo"))


def test_ctrl_c_stops_a_cluster_run_in_order(manager: LocalManager, tmp_path: Path) -> None:
    run = subprocess.Popen([sys.executable, "-m", "cpcli", "run", DEMO, "--json"], cwd=tmp_path, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        _wait_for(manager.log, r"\[local worker\] session \S+: recording", 30)
        time.sleep(1.5)
        run.send_signal(signal.SIGINT)
        out, err = run.communicate(timeout=30)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(5)
    assert run.returncode == 130, err
    result = json.loads(out)
    assert result["status"] == "interrupted"
    manifest = json.loads(Path(result["manifest"]).read_text())
    assert manifest["status"] == "complete" and manifest["duration_ns"] > 1e9
    assert manifest["nodes"]["cam"]["stats"]["samples_out"] >= 30
    events = [json.loads(line)["event"] for line in (Path(result["session_dir"]) / "events.jsonl").open()]
    assert "session_stopping" in events and events[-1] == "session_stopped"


def test_a_second_run_is_refused_while_one_runs(manager: LocalManager, tmp_path: Path) -> None:
    first = subprocess.Popen([sys.executable, "-m", "cpcli", "run", DEMO, "--duration", "6s"], cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        _wait_for(manager.log, r"session \S+: 5 nodes on m1", 20)
        second = cp("run", DEMO, "--duration", "1s", cwd=tmp_path)
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert re.search(r"error: manager at \S+: session \S+_demo is running on this cluster; wait for it",
                         second.stderr), second.stderr
        assert first.wait(40) == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(5)


def test_manager_stops_cleanly_on_ctrl_c(manager: LocalManager) -> None:
    manager.proc.send_signal(signal.SIGINT)
    assert manager.proc.wait(20) == 130
    assert "manager m1 stopped" in manager.text()
    assert "Traceback" not in manager.text()


def test_placement_on_another_machine_needs_a_manager(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, "name: away\nnodes:\n  cam:\n    type: test_video\n    worker: lab-07\n")
    result = cp("run", str(recipe), "--duration", "1s", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "nodes cam (worker lab-07) are placed on other machines, but no manager was found" in result.stderr
    assert not (tmp_path / "sessions").exists()


def test_killed_cp_run_stops_the_session_in_order(manager: LocalManager, tmp_path: Path) -> None:
    run = subprocess.Popen([sys.executable, "-m", "cpcli", "run", DEMO], cwd=tmp_path, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        _wait_for(manager.log, r"\[local worker\] session \S+: recording", 30)
        time.sleep(1.0)
        run.kill()
        run.wait(5)
        killed = time.monotonic()
        name = _wait_for(manager.log, r"session (\S+): complete", 20).group(1)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(5)
    assert time.monotonic() - killed < 3 * 0.75 + 2 + 5  # lost after 3 beats, then the nodes drain and close
    session = manager.data / name
    manifest = json.loads((session / "manifest.json").read_text())
    assert manifest["nodes"]["cam"]["state"] == "done" and manifest["nodes"]["cam"]["stats"]["samples_out"] >= 30
    events = [json.loads(line) for line in (session / "events.jsonl").open()]
    assert any(e["event"] == "client_lost" for e in events)
    assert any(e["event"] == "session_stopping" and "is gone" in e["reason"] for e in events)


def test_mark_goes_into_the_cluster_session(manager: LocalManager, tmp_path: Path) -> None:
    refused = cp("mark", "too_early", cwd=tmp_path)
    assert refused.returncode == 1 and "no session is recording on this cluster" in refused.stderr
    run = subprocess.Popen([sys.executable, "-m", "cpcli", "run", DEMO, "--duration", "4s"], cwd=tmp_path,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        _wait_for(manager.log, r"\[local worker\] session \S+: recording", 30)
        marked = cp("mark", "task_start", "--meta", "block=2", "--json", cwd=tmp_path)
        assert marked.returncode == 0, marked.stderr
        assert run.wait(40) == 0
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(5)
    reply = json.loads(marked.stdout)
    events = [json.loads(line) for line in (manager.data / reply["session"] / "events.jsonl").open()]
    marks = [e for e in events if e["event"] == "mark"]
    assert marks == [{"t_ns": reply["t_ns"], "event": "mark", "label": "task_start", "meta": {"block": 2}}]
    assert 0 < reply["t_ns"] < 4e9


def _launchers(manager: LocalManager) -> list[int]:
    """Pids of the node launchers (zygotes) of the manager's local worker."""
    return [c.pid for c in psutil.Process(manager.proc.pid).children()
            if "cpcli.runtime.zygote" in " ".join(c.cmdline())]


def test_the_worker_keeps_its_node_launcher_and_replaces_a_dead_one(manager: LocalManager, tmp_path: Path) -> None:
    assert _launchers(manager) == []  # started by the first session, not by joining
    first = cp("run", DEMO, "--duration", "1s", cwd=tmp_path, timeout=60)
    assert first.returncode == 0, first.stderr
    launcher = _launchers(manager)
    assert len(launcher) == 1
    second = cp("run", DEMO, "--duration", "1s", cwd=tmp_path, timeout=60)
    assert second.returncode == 0, second.stderr
    assert _launchers(manager) == launcher  # the same one served the next session
    os.kill(launcher[0], signal.SIGKILL)
    third = cp("run", DEMO, "--duration", "1s", cwd=tmp_path, timeout=60)
    assert third.returncode == 0, third.stderr  # a new launcher, the session complete
    replaced = _launchers(manager)
    assert len(replaced) == 1 and replaced != launcher
    assert "had ended; starting a new one" in manager.text()
    sessions = sorted(manager.data.glob("*_demo"))
    assert len(sessions) == 3
    assert all(json.loads((s / "manifest.json").read_text())["status"] == "complete" for s in sessions)
