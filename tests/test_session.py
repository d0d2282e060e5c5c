"""End to end on one machine: a recipe becomes processes that step, record and stop cleanly."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest

from cpcli.recipe import load_recipe
from cpcli.registry import Registry
from cpcli.runtime.session import Progress, RunOptions, StopControl, run_session
from cpcli.runtime.timing import Timing
from tests.conftest import ROOT, write_recipe

FAST = Timing(stats_interval_s=0.2, drain_timeout_s=1.0, exit_timeout_s=2.0, ready_timeout_s=20.0)


def run(recipe_path: Path, registry: Registry, tmp_path: Path, duration_s: float = 1.5, timing: Timing = FAST,
        stop: StopControl | None = None):  # type: ignore[no-untyped-def]
    recipe = load_recipe(recipe_path, registry)
    options = RunOptions(out_dir=tmp_path / "sessions", duration_s=duration_s, timing=timing, worker="lab")
    return run_session(recipe, registry, options, stop or StopControl())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_demo_recipe_records_every_stream_and_lists_it_in_the_manifest(registry: Registry, tmp_path: Path) -> None:
    result = run(ROOT / "recipes" / "demo.yaml", registry, tmp_path, duration_s=2.0)
    manifest = json.loads((result.session_dir / "manifest.json").read_text())
    assert manifest == result.manifest
    assert {"session", "recipe", "start_utc", "duration_ns", "cpcli_version", "workers", "nodes"} <= set(manifest)
    assert manifest["status"] == "complete" and not result.failures
    assert manifest["start_utc"].endswith("Z") and 1.8e9 < manifest["duration_ns"] < 3e9
    assert (result.session_dir / "recipe.yaml").read_text() == (ROOT / "recipes" / "demo.yaml").read_text()
    for node_id in ("cam", "motion", "mic", "level"):
        node = manifest["nodes"][node_id]
        assert node["worker"] == "lab" and node["state"] == "done"
        assert node["files"], f"{node_id} recorded nothing"
        for entry in node["files"]:
            path = result.session_dir / entry["path"]
            assert entry["path"].startswith(f"lab/{node_id}/")
            assert path.stat().st_size == entry["bytes"] and sha256(path) == entry["sha256"]
    assert manifest["nodes"]["gray"]["files"] == []
    cam, gray = manifest["nodes"]["cam"]["stats"], manifest["nodes"]["gray"]["stats"]
    assert 45 <= cam["samples_out"] <= 75 and 25 < cam["rate_hz"] < 35
    assert gray["samples_in"] == {"cam": cam["samples_out"]}, "a frame was lost between processes"
    assert gray["dropped_in"] == {"cam": 0}
    with open(result.session_dir / "lab" / "motion" / "motion.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["index", "t_ns", "local_ns", "motion"]
    assert [int(r["index"]) for r in rows] == list(range(len(rows)))
    times = [int(r["t_ns"]) for r in rows]
    assert times == sorted(times) and 0 <= times[0] < 1e9
    events = [json.loads(line)["event"] for line in (result.session_dir / "events.jsonl").read_text().splitlines()]
    assert events[0] == "session_starting" and "session_started" in events and events[-1] == "session_stopped"


def test_first_samples_are_not_lost_because_sources_wait_for_subscribers(registry: Registry, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, """
name: first
nodes:
  count: {type: counter, params: {rate_hz: 0, limit: 200}}
  check: {type: seq_check, inputs: [count], sync: all, record: true}
""")
    result = run(recipe, registry, tmp_path, duration_s=1.5)
    with open(result.session_dir / "lab" / "check" / "seen.csv", newline="") as fh:
        seqs = [int(r["count_seq"]) for r in csv.DictReader(fh)]
    assert seqs[:5] == [0, 1, 2, 3, 4], "the first samples never arrived"
    assert seqs == sorted(seqs), "samples arrived out of order"
    stats = result.manifest["nodes"]["check"]["stats"]
    assert stats["samples_in"]["count"] + stats["dropped_in"]["count"] == 200


def test_slow_consumer_drops_are_counted_never_hidden(registry: Registry, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, """
name: slow
nodes:
  count: {type: counter, params: {rate_hz: 0}}
  sink: {type: slow, params: {delay_ms: 20}, inputs: [count], sync: all}
""")
    result = run(recipe, registry, tmp_path, duration_s=1.5)
    sent = result.manifest["nodes"]["count"]["stats"]["samples_out"]
    stats = result.manifest["nodes"]["sink"]["stats"]
    assert sent > 1000
    lost = stats["dropped_in"]["count"]
    assert lost > 0
    assert stats["samples_in"]["count"] + lost <= sent


def test_latest_policy_skips_stale_samples_and_says_how_many(registry: Registry, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, """
name: latest
nodes:
  count: {type: counter, params: {rate_hz: 500}}
  sink: {type: slow, params: {delay_ms: 20}, inputs: [count]}
""")
    result = run(recipe, registry, tmp_path, duration_s=1.5)
    stats = result.manifest["nodes"]["sink"]["stats"]
    assert stats["skipped_in"]["count"] > 0
    assert stats["dropped_in"]["count"] == 0


def test_aligned_policy_pairs_samples_within_tolerance(registry: Registry, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, """
name: aligned
nodes:
  fast: {type: counter, params: {rate_hz: 100}}
  slow: {type: counter, params: {rate_hz: 10}}
  pair: {type: seq_check, inputs: [fast, slow], sync: aligned, tolerance_ms: 6, record: true}
""")
    result = run(recipe, registry, tmp_path, duration_s=1.5)
    with open(result.session_dir / "lab" / "pair" / "seen.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) >= 5
    for row in rows:
        assert abs(int(row["fast_t_ns"]) - int(row["slow_t_ns"])) <= 6_000_000
    assert result.manifest["nodes"]["pair"]["stats"]["skipped_in"]["fast"] > 0


def test_node_failing_in_setup_stops_the_run_with_its_id_and_message(registry: Registry, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, """
name: broken
nodes:
  dev: {type: fail_setup}
  cam: {type: test_video, params: {rate_hz: 30}, record: true}
""")
    result = run(recipe, registry, tmp_path, duration_s=10)
    assert "dev" in result.failures
    assert "test device 7 could not be opened" in result.failures["dev"]
    assert result.manifest["status"] == "failed"
    log = (result.logs_dir / "dev.log").read_text()
    assert "Traceback" in log and "DeviceError" in log
    assert result.duration_s < 5


def test_node_failing_in_step_keeps_what_was_recorded(registry: Registry, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, """
name: failstep
nodes:
  count: {type: counter, params: {rate_hz: 50}, record: true}
  boom: {type: fail_step, params: {after: 10}, inputs: [count]}
""")
    result = run(recipe, registry, tmp_path, duration_s=10)
    assert "ZeroDivisionError: the test node divided by zero on purpose" in result.failures["boom"]
    assert "(in step)" in result.failures["boom"]
    rows = (result.session_dir / "lab" / "count" / "count.csv").read_text().splitlines()
    assert len(rows) > 10
    assert result.manifest["nodes"]["count"]["files"][0]["bytes"] > 0
    assert "ZeroDivisionError" in (result.logs_dir / "boom.log").read_text()


def test_stop_request_ends_the_session_in_order(registry: Registry, tmp_path: Path) -> None:
    stop = StopControl()

    def stop_after_a_second(progress: Progress) -> None:
        if progress.phase == "running" and progress.elapsed_s >= 1.0:
            stop.requested.set()

    recipe = load_recipe(ROOT / "recipes" / "demo.yaml", registry)
    options = RunOptions(out_dir=tmp_path / "sessions", duration_s=20, timing=FAST, worker="lab")
    result = run_session(recipe, registry, options, stop, stop_after_a_second)
    assert result.interrupted and not result.failures
    assert 1.0 <= result.duration_s < 3.0
    assert all(n["state"] == "done" for n in result.manifest["nodes"].values())


def test_a_node_that_ignores_stop_is_terminated_and_named(registry: Registry, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, """
name: stubborn
nodes:
  hung: {type: stubborn, params: {block_s: 60}}
""")
    timing = Timing(drain_timeout_s=0.5, exit_timeout_s=1.0)
    result = run(recipe, registry, tmp_path, duration_s=0.5, timing=timing)
    assert "hung" in result.failures
    assert result.manifest["nodes"]["hung"]["state"] == "failed"


def test_existing_session_name_is_refused_and_nothing_is_overwritten(registry: Registry, tmp_path: Path) -> None:
    from cpcli.errors import ArchiveError

    existing = tmp_path / "sessions" / "mine"
    existing.mkdir(parents=True)
    (existing / "data.csv").write_text("precious")
    recipe = load_recipe(ROOT / "recipes" / "demo.yaml", registry)
    options = RunOptions(out_dir=tmp_path / "sessions", session_name="mine", duration_s=1)
    with pytest.raises(ArchiveError, match="already exists"):
        run_session(recipe, registry, options, StopControl())
    assert (existing / "data.csv").read_text() == "precious"


def test_recording_stops_cleanly_when_the_disk_gets_too_full(registry: Registry, tmp_path: Path) -> None:
    import shutil

    from cpcli.units import Size

    free = shutil.disk_usage(tmp_path).free
    recipe = load_recipe(ROOT / "recipes" / "demo.yaml", registry)
    margin = Size(bytes=free - 64 * 2**20)  # 64 MiB of room: the filler below takes it

    def fill_the_disk(progress: Progress) -> None:
        filler = tmp_path / "filler.bin"
        if progress.phase == "running" and progress.elapsed_s > 0.5 and not filler.exists():
            with open(filler, "wb") as fh:
                fh.truncate(0)
                fh.write(b"\0" * (128 * 2**20))
                fh.flush()

    options = RunOptions(out_dir=tmp_path / "sessions", duration_s=20, timing=FAST, worker="lab", min_free=margin)
    result = run_session(recipe, registry, options, StopControl(), fill_the_disk)
    assert result.error is not None and "almost full" in result.error
    assert result.duration_s < 5
    assert result.manifest["status"] == "failed" and result.manifest["error"] == result.error
    for node in ("cam", "motion", "mic", "level"):
        assert result.manifest["nodes"][node]["state"] == "done"
        for entry in result.manifest["nodes"][node]["files"]:
            assert (result.session_dir / entry["path"]).stat().st_size == entry["bytes"]
    (tmp_path / "filler.bin").unlink()


def test_a_recording_that_would_start_below_the_margin_is_refused(registry: Registry, tmp_path: Path) -> None:
    from cpcli.errors import ArchiveError
    from cpcli.units import Size

    recipe = load_recipe(ROOT / "recipes" / "demo.yaml", registry)
    options = RunOptions(out_dir=tmp_path / "sessions", duration_s=1, min_free=Size(percent=100))
    with pytest.raises(ArchiveError, match="recording needs at least"):
        run_session(recipe, registry, options, StopControl())
    assert not (tmp_path / "sessions").exists()
