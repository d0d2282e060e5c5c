"""The monitor's tracker and judgments: current rates, what is wrong and why, events, peak hold, subscriptions."""

from __future__ import annotations

import numpy as np
import pytest

from cpcli.monitor.health import Report, current_rate, event_view, nominal_rate
from cpcli.monitor.state import FramePreview, LevelPreview
from cpcli.monitor.tracker import CLIP_SHOW_S, HOLD_S, Tracker
from tests.test_monitor_view import SESSION, T0, TYPES, status

pytestmark = pytest.mark.timeout(30)


def test_current_rate_comes_from_the_nodes_own_meter_not_from_when_reports_arrived() -> None:
    # a 25 Hz node whose reports reach us with up to 0.4 s of jitter
    arrivals = [0.0, 0.9, 1.2, 2.4, 2.6, 3.9]
    reports = []
    for i, t in enumerate(arrivals):
        count = 100 + int(12.5 * i)
        span_s = (count - 1) / 25.0
        reports.append(Report(T0 + t, count, round((count - 1) / span_s, 3)))
    assert current_rate(reports, T0 + 4.0) == pytest.approx(25.0, rel=1e-3)


def test_current_rate_sees_a_slowdown_the_average_hides() -> None:
    # 60 s at 30 Hz, then 3 s at 15 Hz: the node's own average is still about 29 Hz
    reports, count, t_ns = [], 1, 0
    for second in range(64):
        hz = 30 if second < 60 else 15
        count += hz
        t_ns = t_ns + 1_000_000_000
        reports.append(Report(T0 + second, count, round((count - 1) * 1e9 / t_ns, 3)))
    assert reports[-1].rate_hz > 28
    assert current_rate(reports, T0 + 63.2) == pytest.approx(15.0, rel=0.05)


def test_current_rate_is_zero_when_the_count_stops_and_unknown_with_one_report() -> None:
    reports = [Report(T0, 10, 10.0), Report(T0 + 1, 20, 10.0)]
    assert current_rate(reports, T0 + 10) == 0.0
    assert current_rate(reports[:1], T0 + 1) is None


def test_nominal_rate_from_params_and_defaults() -> None:
    assert nominal_rate({"rate_hz": 15}) == 15.0
    assert nominal_rate({"fps": 25.0}) == 25.0
    assert nominal_rate({}, {"rate_hz": 30.0}) == 30.0
    assert nominal_rate({"rate_hz": 0}) is None  # free-running: no nominal rate
    assert nominal_rate({"blocksize": 480}, {"samplerate": 48000, "blocksize": 1024}) == 100.0
    assert nominal_rate({}) is None


def test_slow_node_is_flagged_with_its_rates() -> None:
    tracker = Tracker(TYPES)
    for i in range(10):
        reply = status(10.0 + i * 0.5)
        cam = reply["session"]["nodes"]["cam"]
        cam["params"]["rate_hz"] = 60  # asked for 60, gets 30
        tracker.update(reply, T0 + i * 0.5)
    cam_view = next(n for n in tracker.snapshot(T0 + 4.6).nodes if n.id == "cam")
    assert cam_view.nominal_hz == 60.0 and cam_view.rate_hz == pytest.approx(30.0, rel=0.05)
    assert cam_view.problems[0].text == "slow: 30.0 of 60 Hz"


def test_nominal_rate_needs_the_recipe_params() -> None:
    tracker = Tracker(TYPES)
    reply = status(10.0)
    del reply["session"]["nodes"]["cam"]["params"]  # a manager that does not send them
    tracker.update(reply, T0)
    assert next(n for n in tracker.snapshot(T0).nodes if n.id == "cam").nominal_hz is None


def test_events_are_kept_once_each_in_order() -> None:
    tracker = Tracker(TYPES)
    first = status(5.0)
    tracker.update(first, T0)
    later = status(6.0)
    later["events"].append({"t_ns": 5_000_000_000, "event": "worker_lost", "session": SESSION, "worker": "lab-02",
                            "nodes": ["cam"]})
    tracker.update(later, T0 + 1)
    texts = [e.text for e in tracker.snapshot(T0 + 1).events]
    assert texts == ["session started start_utc=2026-11-25T14:03:12Z", "mark stimulus_on trial=3",
                     "worker lab-02 lost (cam)"]
    assert tracker.snapshot(T0 + 1).events[-1].severity == "error"


def test_events_of_an_earlier_session_are_not_shown() -> None:
    tracker = Tracker(TYPES)
    reply = status(5.0)
    reply["events"].insert(0, {"t_ns": 9_000_000_000, "event": "mark", "session": "earlier", "label": "old"})
    tracker.update(reply, T0)
    assert [e.text for e in tracker.snapshot(T0).events] == ["session started start_utc=2026-11-25T14:03:12Z",
                                                             "mark stimulus_on trial=3"]


def test_event_lines() -> None:
    failed = event_view({"t_ns": 2_500_000_000, "event": "node_failed", "node": "gray", "worker": "lab-03",
                         "error": "ValueError: bad frame"})
    assert (failed.t_s, failed.text, failed.severity) == (2.5, "node gray failed on lab-03: ValueError: bad frame",
                                                          "error")
    assert event_view({"t_ns": 0, "event": "mark", "label": "go", "meta": {}}).text == "mark go"


def test_audio_meter_holds_its_peak_and_shows_a_clip_for_a_while() -> None:
    tracker = Tracker(TYPES)
    tracker.update(status(5.0), T0)
    tracker.add_preview("mic", "audio", {"rms_db": [-20.0], "peak_db": [-1.0], "clipped": True, "channels": 1}, T0)
    tracker.add_preview("mic", "audio", {"rms_db": [-30.0], "peak_db": [-25.0], "clipped": False, "channels": 1},
                        T0 + 0.5)
    level = tracker.snapshot(T0 + 0.5).previews[0].content
    assert isinstance(level, LevelPreview) and level.peak_db == (-1.0,) and level.clipped
    tracker.add_preview("mic", "audio", {"rms_db": [-30.0], "peak_db": [-25.0], "clipped": False, "channels": 1},
                        T0 + HOLD_S + 0.5)
    later = tracker.snapshot(T0 + CLIP_SHOW_S + 0.1).previews[0].content
    assert isinstance(later, LevelPreview) and later.peak_db == (-25.0,) and not later.clipped


def test_frames_turn_from_blue_green_red_to_rgb_and_grayscale_to_three_channels() -> None:
    tracker = Tracker(TYPES)
    tracker.update(status(5.0), T0)
    bgr = np.zeros((4, 6, 3), np.uint8)
    bgr[..., 0] = 200  # blue
    tracker.add_preview("cam", "video", bgr, T0)
    tracker.add_preview("gray", "video", np.full((4, 6), 7, np.uint8), T0)
    cam, gray = tracker.snapshot(T0).previews
    assert isinstance(cam.content, FramePreview) and cam.content.rgb[0, 0].tolist() == [0, 0, 200]
    assert isinstance(gray.content, FramePreview) and gray.content.rgb.shape == (4, 6, 3)


def test_preview_ports_follow_the_session_and_node_states() -> None:
    tracker = Tracker(TYPES)
    reply = status(5.0)
    reply["session"]["nodes"]["gray"]["state"] = "done"
    del reply["session"]["nodes"]["mic"]["endpoint"]
    tracker.update(reply, T0)
    assert tracker.preview_ports() == {"tcp://198.18.0.2:40001": (("cam", "video"),),
                                       "tcp://198.18.0.1:40004": (("level", "level"),)}
    tracker.add_preview("cam", "video", np.zeros((4, 4), np.uint8), T0)
    other = status(1.0)
    other["session"]["name"] = "another"
    tracker.update(other, T0 + 1)
    assert tracker.snapshot(T0 + 1).previews == ()  # a new session: the old previews are gone


def test_disk_time_left_at_the_current_recording_rate() -> None:
    tracker = Tracker(TYPES)
    for i in range(8):
        tracker.update(status(5.0 + i), T0 + i)
    session = tracker.snapshot(T0 + 7).session
    assert session is not None and session.disk is not None
    assert session.disk.worker == "lab-02"  # cam records 0.9 MB/s there; m1 records nothing new
    assert session.record_rate_bps == pytest.approx(900_000, rel=0.01)
    assert session.disk.time_left_s == pytest.approx(120e9 / 900_000, rel=0.01)
