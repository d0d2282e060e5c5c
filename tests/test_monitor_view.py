"""`cp monitor`'s renderables: real snapshots rendered at 80 and 160 columns, what a user must see."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console

from cpcli.cli.display import progress_view
from cpcli.monitor.state import TypeInfo, UiState
from cpcli.monitor.tracker import Tracker
from cpcli.monitor.view import MonitorView, NodesTable, WorkersTable, plain_view
from cpcli.runtime.plan import NodeState, NodeStatus
from cpcli.runtime.session import Progress
from cpcli.runtime.stats import NodeStats

pytestmark = pytest.mark.timeout(30)

TYPES = {"test_video": TypeInfo(("video",), {"rate_hz": 30.0}), "grayscale": TypeInfo(("video",)),
         "test_audio": TypeInfo(("audio",), {"samplerate": 48000, "blocksize": 1024}),
         "audio_level": TypeInfo(("level",)), "motion": TypeInfo(("motion",))}
T0 = 1000.0  # monotonic seconds of the first status reply
SESSION = "2026-11-25T14-03-12_study"


def _worker(name: str, host: str, state: str = "running", offset_ns: int = 12_345) -> dict[str, Any]:
    return {"name": name, "host": host, "state": state, "cpu_percent": 41.0, "cpu_count": 2,
            "memory_total": 8_000_000_000, "memory_available": 3_500_000_000, "disk_free": 120_000_000_000,
            "last_heartbeat_s": 4.1 if state == "lost" else 0.3,
            "clock": {"offset_ns": offset_ns, "drift_ppm": 1.25, "uncertainty_ns": 48_000}}


def status(elapsed_s: float, lost: bool = False, gray_dropped: int = 0) -> dict[str, Any]:
    """A status reply as the manager sends it: cam on lab-02 at 30 frames/s, the rest on the manager's worker."""
    frames = int(30 * elapsed_s)
    return {
        "manager": {"name": "m1", "cluster": "default", "address": "198.18.0.1:7425", "version": "0.1.0",
                    "uptime_s": 300.0, "local_worker": "m1"},
        "workers": [_worker("lab-02", "198.18.0.2", "lost" if lost else "running"),
                    _worker("m1", "198.18.0.1", offset_ns=0)],
        "session": {
            "name": SESSION, "phase": "running", "dir": "/data/s", "recipe": "study",
            "elapsed_s": elapsed_s, "lost": ["lab-02"] if lost else [],
            "nodes": {
                "cam": {"type": "test_video", "worker": "lab-02", "state": "lost" if lost else "running",
                        "params": {"width": 640, "height": 480, "rate_hz": 30}, "endpoint": "tcp://198.18.0.2:40001",
                        "stats": {"samples_out": frames, "rate_hz": 30.0, "record_bytes": 900_000 * int(elapsed_s),
                                  "record_backlog": 2}},
                "gray": {"type": "grayscale", "worker": "m1", "state": "running", "endpoint": "tcp://198.18.0.1:40002",
                         "params": {}, "stats": {"samples_out": frames - gray_dropped, "rate_hz": 30.0,
                                                 "samples_in": {"cam": frames - gray_dropped},
                                                 "dropped_in": {"cam": gray_dropped},
                                                 "latency_ms": {"p50": 1.4, "p99": 3.9}, "record_bytes": 450_000}},
                "mic": {"type": "test_audio", "worker": "m1", "state": "running", "params": {},
                        "endpoint": "tcp://198.18.0.1:40003",
                        "stats": {"samples_out": int(46.875 * elapsed_s), "rate_hz": 46.875}},
                "level": {"type": "audio_level", "worker": "m1", "state": "running", "params": {},
                          "endpoint": "tcp://198.18.0.1:40004",
                          "stats": {"samples_out": int(46.875 * elapsed_s), "rate_hz": 46.875,
                                    "samples_in": {"mic": int(46.875 * elapsed_s)}, "dropped_in": {"mic": 0},
                                    "latency_ms": {"p50": 0.9, "p99": 2.0}, "record_bytes": 20_000}},
            }},
        "events": [
            {"t_ns": 0, "event": "session_started", "session": SESSION, "start_utc": "2026-11-25T14:03:12Z"},
            {"t_ns": 4_200_000_000, "event": "mark", "session": SESSION, "label": "stimulus_on", "meta": {"trial": 3}},
        ],
    }


def _frame() -> np.ndarray:
    """A 36 x 64 blue-green-red preview: blue on the left half, red on the right."""
    frame = np.zeros((36, 64, 3), np.uint8)
    frame[:, :32, 0] = 255
    frame[:, 32:, 2] = 255
    return frame


def tracked(lost: bool = False, dropping: bool = False) -> tuple[Tracker, float]:
    tracker = Tracker(TYPES)
    now = T0
    for i in range(12):  # six seconds of replies, twice a second
        now = T0 + i * 0.5
        tracker.update(status(6.0 + i * 0.5, lost=lost and i == 11, gray_dropped=3 * i if dropping else 0), now)
    tracker.add_preview("cam", "video", _frame(), now)
    tracker.add_preview("mic", "audio", {"rms_db": [-18.0], "peak_db": [-0.1], "clipped": True, "channels": 1}, now)
    tracker.add_preview("level", "level", {"rms_dbfs": -18.03, "peak_dbfs": -0.1, "clipped": True}, now)
    return tracker, now


def render(renderable: Any, width: int, height: int = 40, color: str | None = "truecolor") -> str:
    console = Console(file=io.StringIO(), width=width, height=height, color_system=color,  # type: ignore[arg-type]
                      legacy_windows=False, force_terminal=color is not None)
    console.print(renderable)
    return console.file.getvalue()  # type: ignore[attr-defined,no-any-return]


def plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


@pytest.mark.parametrize("width", [80, 160])
def test_screen_shows_workers_nodes_rates_and_previews(width: int) -> None:
    tracker, now = tracked()
    out = render(MonitorView(tracker.snapshot(now + 0.1)), width, 40)
    text = plain(out)
    lines = text.splitlines()
    assert len(lines) <= 40 and all(len(line) <= width for line in lines)
    for needle in ("cluster default", "manager m1 at 198.18.0.1:7425", "session 2026-11-25T14-03-12_study running",
                   "lab-02", "198.18.0.2", "+0.012 ms ±48 us", "cam", "gray", "mic", "level", "stimulus_on trial=3",
                   "q ", "quit"):
        assert needle in text, needle
    cam = next(line for line in lines if line.lstrip().startswith("cam "))
    assert "30.0/30" in cam  # actual against nominal (the recipe's rate_hz)
    mic = next(line for line in lines if line.lstrip().startswith("mic "))
    assert "46.9/46.9" in mic  # test_audio's default: 48000 / 1024 blocks a second
    assert "1.4/3.9" in text  # latency p50/p99 of gray
    assert "▀" in text and "cam/video" in text  # the thumbnail, in half blocks
    assert "\x1b[38;2;255;0;0m" in out or "38;2;255;0;0" in out  # true colour: red (from blue-green-red order)
    assert "CLIP" in text and "|" in text  # the audio meter's clip mark and held peak
    assert "rms_dbfs" in text  # a table row's latest values


def test_160_columns_show_more_columns_than_80() -> None:
    tracker, now = tracked()
    wide = plain(render(MonitorView(tracker.snapshot(now)), 160))
    narrow = plain(render(MonitorView(tracker.snapshot(now)), 80))
    assert "test_video" in wide and "mem free" in wide and "drift" in wide
    assert "ppm" not in narrow and "out " not in narrow  # dropped for room
    assert "clock offset" in narrow and "state" in narrow


def test_lost_worker_is_red_with_its_nodes() -> None:
    tracker, now = tracked(lost=True)
    out = render(WorkersTable(tracker.snapshot(now).workers), 100)
    row = next(line for line in out.splitlines() if "lab-02" in line)
    assert "lost" in plain(row)
    assert "\x1b[31m" in row or "\x1b[1;31m" in row or "38;5;9" in row or ";31m" in row  # red
    nodes = plain(render(NodesTable(tracker.snapshot(now).nodes), 120))
    assert "worker lab-02 lost" in nodes


def test_growing_drops_are_flagged_with_why() -> None:
    tracker, now = tracked(dropping=True)
    snap = tracker.snapshot(now)
    gray = next(n for n in snap.nodes if n.id == "gray")
    assert gray.problems and gray.problems[0].text.startswith("dropping from cam")
    text = plain(render(NodesTable(snap.nodes), 120))
    assert "dropping from cam" in text and "33" in text


def test_80x24_drops_previews_first_and_fits() -> None:
    tracker, now = tracked()
    text = plain(render(MonitorView(tracker.snapshot(now)), 80, 24))
    lines = text.splitlines()
    assert len(lines) <= 24
    assert all(n in text for n in ("cam", "gray", "mic", "level", "lab-02", "quit"))
    tall = plain(render(MonitorView(tracker.snapshot(now)), 80, 16))
    assert len(tall.splitlines()) <= 16
    assert "▀" not in tall  # no room: previews go first
    assert "level" in tall and "quit" in tall


def test_selected_node_preview_is_larger() -> None:
    tracker, now = tracked()
    small = plain(render(MonitorView(tracker.snapshot(now, UiState())), 160, 60))
    big = plain(render(MonitorView(tracker.snapshot(now, UiState(selected="cam"))), 160, 60))
    assert big.count("▀") > small.count("▀")
    assert "▸cam" in big


def test_previews_off_and_unreachable_manager() -> None:
    tracker, now = tracked()
    tracker.unreachable("the manager at 198.18.0.1:7425 did not answer within 2 s", now + 1)
    text = plain(render(MonitorView(tracker.snapshot(now + 4, UiState(previews_on=False))), 120))
    assert "manager unreachable, retrying (3 s)" in text
    assert "▀" not in text and "previews on" in text
    assert "lab-02" in text  # what was last known stays on screen


def test_plain_view_for_a_pipe_has_the_tables_and_every_event() -> None:
    tracker, now = tracked()
    text = render(plain_view(tracker.snapshot(now)), 100, color=None)
    assert "lab-02" in text and "30.0/30" in text and "mark stimulus_on trial=3" in text and "▀" not in text


def test_no_colour_terminal_gets_a_brightness_ramp() -> None:
    tracker, now = tracked()
    text = render(MonitorView(tracker.snapshot(now)), 120, 40, color=None)
    assert "\x1b[" not in text and "▀" not in text and "cam/video" in text


def test_mark_prompt_and_message() -> None:
    tracker, now = tracked()
    text = plain(render(MonitorView(tracker.snapshot(now, UiState(prompt="stim"))), 100, 30))
    assert "mark label: stim" in text.splitlines()[-1]
    text = plain(render(MonitorView(tracker.snapshot(now, UiState(message="marked stim at 1.000 s"))), 100, 30))
    assert "marked stim at 1.000 s" in text.splitlines()[-2]


@pytest.mark.parametrize("width", [80, 160])
def test_cp_run_progress_uses_the_monitor_node_table(width: int) -> None:
    stats = NodeStats(samples_out=300, rate_hz=29.97, samples_in={}, record_bytes=1_200_000)
    gray = NodeStats(samples_out=290, rate_hz=29.9, samples_in={"cam": 290}, dropped_in={"cam": 10},
                     latency_ms={"p50": 1.5, "p99": 4.0})
    nodes = {"cam": NodeStatus("cam", "test_video", NodeState.RUNNING, stats=stats, worker="w2"),
             "gray": NodeStatus("gray", "grayscale", NodeState.RUNNING, stats=gray, worker="w3"),
             "bad": NodeStatus("bad", "motion", NodeState.FAILED, error="ValueError: no frames", worker="w3")}
    text = plain(render(progress_view(Progress(Path("/s/2026_demo"), "running", 10.0, nodes)), width))
    assert "running 2026_demo" in text
    assert "30.0" in text and "1.2 MB" in text and "1.5/4.0" in text
    assert "failed: ValueError: no frames" in text or "failed: ValueError" in text
    assert "worker" in text  # nodes on two workers
    assert all(len(line) <= width for line in text.splitlines())
