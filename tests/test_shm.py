"""Same-host data through shared memory: intact frames, no reordering, counted drops, no leaks."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cpcli.recipe import load_recipe
from cpcli.registry import Registry
from cpcli.runtime.session import RunOptions, StopControl, run_session
from cpcli.runtime.timing import Timing
from cpcli.transport import shm
from tests.conftest import _owned_by_another_live_process, write_recipe

FAST = Timing(stats_interval_s=0.2, drain_timeout_s=2.0, exit_timeout_s=3.0)


def segments() -> set[str]:
    """Our segments: those of other runs on this machine are not ours to judge."""
    return {p.name for p in shm.SHM_DIR.glob(f"{shm.PREFIX}_*") if not _owned_by_another_live_process(p.name)}


def _run(tmp_path: Path, registry: Registry, text: str, duration_s: float = 2.0, **options: object):  # type: ignore[no-untyped-def]
    tmp_path.mkdir(parents=True, exist_ok=True)
    recipe = load_recipe(write_recipe(tmp_path, text), registry)
    run_options = RunOptions(out_dir=tmp_path / "s", duration_s=duration_s, timing=FAST, worker="lab", **options)  # type: ignore[arg-type]
    return run_session(recipe, registry, run_options, StopControl())


def _rows(result, node: str) -> list[dict[str, str]]:  # type: ignore[no-untyped-def]
    with open(result.session_dir / "lab" / node / "check.csv", newline="") as fh:
        return list(csv.DictReader(fh))


PATTERN = """
name: integrity
nodes:
  src: {{type: pattern, params: {{width: 640, height: 480, rate_hz: 0}}}}
  fast: {{type: verify, inputs: [src], record: true, sync: {sync}}}
  slow: {{type: verify, params: {{delay_ms: 15}}, inputs: [src], record: true, sync: {sync}}}
"""


@pytest.mark.parametrize("sync", ["latest", "all"])
def test_every_frame_read_from_shared_memory_is_intact_and_in_order(sync: str, registry: Registry,
                                                                     tmp_path: Path) -> None:
    before = segments()
    result = _run(tmp_path, registry, PATTERN.format(sync=sync))
    assert not result.failures
    sent = result.manifest["nodes"]["src"]["stats"]["samples_out"]
    for node in ("fast", "slow"):
        rows = _rows(result, node)
        assert len(rows) > 20
        assert all(r["ok"] == "true" for r in rows), f"{node} saw a torn or overwritten frame"
        seqs = [int(r["seq"]) for r in rows]
        assert seqs == sorted(set(seqs)), "reordered or repeated"
        assert all(int(r["n"]) == int(r["seq"]) for r in rows)
        stats = result.manifest["nodes"][node]["stats"]
        if sync == "all":  # backpressure: the source waits, nothing is lost
            assert stats["dropped_in"] == {"src": 0}
            assert seqs == list(range(len(seqs)))
        assert stats["samples_in"]["src"] + stats["dropped_in"]["src"] + (
            stats["skipped_in"]["src"] - (0 if sync == "all" else 0)) >= len(rows)
    if sync == "all":
        assert len(_rows(result, "slow")) == sent, "a sync: all reader missed a sample"
    assert segments() == before, "shared memory leaked"


def test_shared_memory_and_tcp_deliver_the_same_frames(registry: Registry, tmp_path: Path) -> None:
    text = """
name: same
nodes:
  src: {type: test_video, params: {width: 320, height: 240, rate_hz: 50}}
  check: {type: verify, inputs: [src], sync: all}
  gray: {type: grayscale, inputs: [src], sync: all, record: true}
"""
    shared = _run(tmp_path / "a", registry, text, 1.0)
    tcp = _run(tmp_path / "b", registry, text, 1.0, shared_memory=False)
    for path, result in (("shared memory", shared), ("tcp", tcp)):
        stats = result.manifest["nodes"]["gray"]["stats"]
        assert stats["dropped_in"] == {"src": 0}, path
        assert stats["samples_in"]["src"] == result.manifest["nodes"]["src"]["stats"]["samples_out"]


def test_stale_segments_of_dead_processes_are_removed_at_the_next_start(registry: Registry, tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = shm.SHM_DIR / f"{shm.segment_prefix('0badcafe', 'cam', int(dead.stdout))}_s0"
    stale.write_bytes(b"\0" * 128)
    alive = shm.SHM_DIR / f"{shm.segment_prefix('0badcafe', 'cam', os.getpid())}_s0"
    alive.write_bytes(b"\0" * 128)
    try:
        _run(tmp_path, registry, "name: x\nnodes:\n  c: {type: counter, params: {rate_hz: 10}}\n", 0.3)
        assert not stale.exists(), "a dead process's segment was left behind"
        assert alive.exists(), "a live process's segment was removed"
    finally:
        stale.unlink(missing_ok=True)
        alive.unlink(missing_ok=True)


def test_kill_9_of_a_publishing_node_leaves_no_shared_memory(registry: Registry, tmp_path: Path) -> None:
    before = segments()
    recipe = write_recipe(tmp_path, """
name: killed
nodes:
  src: {type: pattern, params: {rate_hz: 100}}
  sink: {type: verify, inputs: [src]}
""")
    proc = subprocess.Popen([sys.executable, "-m", "cpcli", "run", str(recipe), "--out", str(tmp_path / "s")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while len(segments() - before) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(segments() - before) >= 2, "the pool was never created"
        src = next(c for c in psutil.Process(proc.pid).children(recursive=True) if "src" in c.cmdline())
        src.kill()
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 1 and "node src failed" in err and "signal 9" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert segments() == before


def test_kill_9_of_cp_run_leaves_no_shared_memory(tmp_path: Path, registry: Registry) -> None:
    before = segments()
    recipe = write_recipe(tmp_path, """
name: orphaned
nodes:
  src: {type: pattern, params: {rate_hz: 100}}
  sink: {type: verify, inputs: [src], record: true}
""")
    proc = subprocess.Popen([sys.executable, "-m", "cpcli", "run", str(recipe), "--out", str(tmp_path / "s")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while len(segments() - before) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    children = psutil.Process(proc.pid).children(recursive=True)  # the zygote and its nodes
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(5)
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive
    assert segments() == before
    record = json.loads(next((tmp_path / "s").glob("*/*/sink/node.json")).read_text())
    assert record["files"]


def test_a_sync_all_reader_of_one_port_never_holds_back_another_port(registry: Registry, tmp_path: Path) -> None:
    """Sequence numbers are per port: a slow port's `sync: all` reader must not pin the fast port's slots."""
    text = """
name: ports
nodes:
  src: {type: two_ports, params: {every: 5, rate_hz: 400}}
  fast: {type: verify, inputs: [src.a], record: true, sync: latest}
  slow: {type: verify, inputs: [src.b], record: true, sync: all}
"""
    before = segments()
    result = _run(tmp_path, registry, text, duration_s=2.0)
    assert not result.failures
    stats = result.manifest["nodes"]["src"]["stats"]
    assert stats["dropped_out"] == 0, "the pool ran out of slots for port a"
    for node in ("fast", "slow"):
        rows = _rows(result, node)
        assert rows and all(r["ok"] == "true" for r in rows) and all(int(r["n"]) == int(r["seq"]) for r in rows)
    fast = result.manifest["nodes"]["fast"]["stats"]
    assert fast["dropped_in"] == {"src.a": 0}
    assert len(_rows(result, "fast")) > 0.8 * result.manifest["nodes"]["src"]["stats"]["samples_out"] * 5 / 6
    assert len(_rows(result, "slow")) == result.manifest["nodes"]["slow"]["stats"]["samples_in"]["src.b"]
    assert segments() == before, "shared memory leaked"
