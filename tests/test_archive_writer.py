"""Tests of cpcli.archive.writer: the per-node recorder, its files, flushing, drops and crashes."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from cpcli.archive.writer import FileRecord, NodeRecorder, RecordingError, classify
from cpcli.errors import ArchiveError

REPO = Path(__file__).resolve().parents[1]
START_NS = 5_000_000_000  # cluster time of session start: files hold t_ns - START_NS
MS = 1_000_000
LOCAL_NS = 9_000_000_000_000  # the recording machine's monotonic clock (any value)


@pytest.fixture
def recorders(tmp_path: Path) -> Iterator[list[NodeRecorder]]:
    """Recorders made by a test; each is stopped (its thread ended) when the test ends."""
    made: list[NodeRecorder] = []
    yield made
    for recorder in made:
        with contextlib.suppress(ArchiveError):
            recorder.stop(timeout_s=5)
    assert not [t for t in threading.enumerate() if t.name.startswith("cpcli-recorder")]


def _recorder(made: list[NodeRecorder], session: Path, **kwargs: object) -> NodeRecorder:
    recorder = NodeRecorder(session, "local", "node", start_ns=START_NS, **kwargs)  # type: ignore[arg-type]
    made.append(recorder)
    return recorder


def _rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))


def _check_records(session: Path, records: list[FileRecord]) -> None:
    on_disk = sorted(p.relative_to(session).as_posix() for p in session.rglob("*") if p.is_file())
    assert sorted(r.path for r in records) == on_disk
    for record in records:
        data = (session / record.path).read_bytes()
        assert (record.bytes, record.sha256) == (len(data), hashlib.sha256(data).hexdigest()), record.path


def test_classify_names_each_kind_and_refuses_what_cannot_be_recorded() -> None:
    assert classify(np.zeros((4, 6, 3), np.uint8)) == "video"
    assert classify(np.zeros((4, 6), np.uint8)) == "video"
    assert classify(np.zeros((480, 2), np.float32)) == "audio"
    assert classify(np.zeros((480, 1), np.int32)) == "audio"
    assert classify(np.zeros(480, np.int16)) == "audio"
    assert classify(np.zeros(480, np.float64)) == "audio"
    assert classify({"level": np.float32(0.5), "n": np.int64(3), "ok": True, "name": "a", "x": None}) == "table"
    assert classify({"nested": {"a": 1}}) == "events"
    assert classify({}) == "events"
    assert classify([1, 2.5, "x"]) == "events"
    assert classify(np.zeros((4, 6, 4), np.uint8)) == "events"  # BGRA is not video: recorded as a list
    assert classify(np.arange(3, dtype=np.int64)) == "events"
    with pytest.raises(ArchiveError, match="type set"):
        classify({1, 2})
    with pytest.raises(ArchiveError, match="bytes"):
        classify({"raw": [b"\x00"]})


def test_tables_and_events_are_written_and_readable(tmp_path: Path, recorders: list[NodeRecorder]) -> None:
    recorder = _recorder(recorders, tmp_path)
    recorder.start()
    recorder.record("level", 0, START_NS + 10 * MS, {"db": -3.25, "clip": False, "note": None}, None, LOCAL_NS + 1)
    row = {"db": np.float32(0.1), "clip": np.bool_(True), "note": "a,b"}
    recorder.record("level", 1, START_NS + 20 * MS, row, None, LOCAL_NS + 2)
    onset = {"peaks": np.array([1, 2]), "score": np.float64(0.5)}
    recorder.record("onsets", 7, START_NS + 30 * MS, onset, None, local_ns=LOCAL_NS + 3)
    records = recorder.stop()

    node = tmp_path / "local" / "node"
    assert _rows(node / "level.csv") == [
        ["index", "t_ns", "local_ns", "db", "clip", "note"],
        ["0", str(10 * MS), str(LOCAL_NS + 1), "-3.25", "false", ""],
        ["1", str(20 * MS), str(LOCAL_NS + 2), "0.1", "true", "a,b"],
    ]
    lines = (node / "onsets.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"index": 7, "t_ns": 30 * MS, "local_ns": LOCAL_NS + 3, "value": {"peaks": [1, 2], "score": 0.5}}
    ]
    assert {(r.path, r.kind) for r in records} == {
        ("local/node/level.csv", "table"),
        ("local/node/onsets.jsonl", "events"),
    }
    _check_records(tmp_path, records)
    stats = recorder.stats
    assert (stats.backlog, stats.written, stats.dropped) == (0, 3, 0)
    assert stats.bytes == sum(r.bytes for r in records)


def test_new_columns_start_a_new_part_and_lose_nothing(tmp_path: Path, recorders: list[NodeRecorder]) -> None:
    recorder = _recorder(recorders, tmp_path)
    recorder.start()
    recorder.record("t", 0, START_NS, {"a": 1, "b": 2}, None, local_ns=LOCAL_NS)
    recorder.record("t", 1, START_NS, {"b": 3, "a": 4}, None, local_ns=LOCAL_NS)  # same columns, other order
    recorder.record("t", 2, START_NS, {"a": 5, "c": 6.5}, None, local_ns=LOCAL_NS)  # a new column
    recorder.record("t", 3, START_NS, {"b": 7}, None, local_ns=LOCAL_NS)  # fewer columns: the rest empty
    recorder.record("t", 4, START_NS, {"t_ns": 8, "local_ns": 9}, None, local_ns=LOCAL_NS)  # reserved names
    records = recorder.stop()

    node = tmp_path / "local" / "node"
    local = str(LOCAL_NS)
    assert _rows(node / "t.csv") == [
        ["index", "t_ns", "local_ns", "a", "b"],
        ["0", "0", local, "1", "2"],
        ["1", "0", local, "4", "3"],
    ]
    assert _rows(node / "t-0001.csv") == [
        ["index", "t_ns", "local_ns", "a", "b", "c"],
        ["2", "0", local, "5", "", "6.5"],
        ["3", "0", local, "", "7", ""],
    ]
    assert _rows(node / "t-0002.csv") == [
        ["index", "t_ns", "local_ns", "a", "b", "c", "value_t_ns", "value_local_ns"],
        ["4", "0", local, "", "", "", "8", "9"],
    ]
    assert [r.path for r in records] == ["local/node/t-0001.csv", "local/node/t-0002.csv", "local/node/t.csv"]
    _check_records(tmp_path, records)


def test_rows_reach_the_disk_within_a_second_while_running(tmp_path: Path, recorders: list[NodeRecorder]) -> None:
    recorder = _recorder(recorders, tmp_path, flush_interval_s=1.0)
    recorder.start()
    path = tmp_path / "local" / "node" / "t.csv"
    begun = time.monotonic()
    for i in range(5):
        recorder.record("t", i, START_NS, {"i": i}, None, local_ns=LOCAL_NS)
    while time.monotonic() - begun < 3 and not (path.exists() and len(_rows(path)) == 6):
        time.sleep(0.02)
    waited_s = time.monotonic() - begun
    assert len(_rows(path)) == 6, "rows were not flushed while the recorder ran idle"
    assert waited_s < 1.5
    recorder.stop()


def test_every_kind_gets_files_whose_sha256_matches_the_disk(tmp_path: Path, recorders: list[NodeRecorder]) -> None:
    recorder = _recorder(recorders, tmp_path, video_segment_s=0.5)
    recorder.start()
    for i in range(12):
        t_ns = START_NS + i * 100 * MS
        recorder.record("video", i, t_ns, np.full((24, 32, 3), i * 10, np.uint8), 10.0, local_ns=LOCAL_NS)
        recorder.record("mic", i, t_ns, np.full((800, 1), i, np.int16), 8000.0, local_ns=LOCAL_NS)
        recorder.record("level", i, t_ns, {"i": i}, None, local_ns=LOCAL_NS)
        recorder.record("level", i, t_ns, {"i": [i]}, None, local_ns=LOCAL_NS)  # not a table row: an event beside
    records = recorder.stop()
    kinds = {r.path.rsplit("/", 1)[1]: r.kind for r in records}
    assert kinds == {
        "level.csv": "table",
        "level.jsonl": "events",
        "mic-0000.wav": "audio",
        "mic-0001.wav": "audio",
        "mic-0002.wav": "audio",
        "mic.timestamps.csv": "timestamps",
        "video-0000.mp4": "video",
        "video-0001.mp4": "video",
        "video-0002.mp4": "video",
        "video.timestamps.csv": "timestamps",
    }
    _check_records(tmp_path, records)
    assert recorder.stats.written == 48
    assert recorder.stop() == records  # idempotent


def test_every_kind_keeps_the_local_clock_it_was_given_beside_t_ns(
    tmp_path: Path, recorders: list[NodeRecorder]
) -> None:
    recorder = _recorder(recorders, tmp_path, video_segment_s=0.5)
    recorder.start()
    sent = [(START_NS + i * 100 * MS, LOCAL_NS + i * 100 * MS + 7 * i) for i in range(8)]  # a drifting machine
    for i, (t_ns, local_ns) in enumerate(sent):
        recorder.record("video", i, t_ns, np.full((24, 32), i * 10, np.uint8), 10.0, local_ns)
        recorder.record("mic", i, t_ns, np.zeros((800, 2), np.float32), 8000.0, local_ns=local_ns)
        recorder.record("level", i, t_ns, {"i": i, "local_ns": -i}, None, local_ns=local_ns)
        recorder.record("onsets", i, t_ns, [i], None, local_ns=local_ns)
    recorder.stop()
    node = tmp_path / "local" / "node"
    want = [[str(i), str(t_ns - START_NS), str(local_ns)] for i, (t_ns, local_ns) in enumerate(sent)]
    for name in ("video.timestamps.csv", "mic.timestamps.csv", "level.csv"):
        rows = _rows(node / name)
        assert rows[0][:3] == ["index", "t_ns", "local_ns"], name
        assert [row[:3] for row in rows[1:]] == want, name
    assert _rows(node / "level.csv")[1] == ["0", "0", str(LOCAL_NS), "0", "0"]  # the row's own local_ns: value_
    assert _rows(node / "level.csv")[0][3:] == ["i", "value_local_ns"]
    events = [json.loads(line) for line in (node / "onsets.jsonl").read_text().splitlines()]
    assert [[str(e["index"]), str(e["t_ns"]), str(e["local_ns"])] for e in events] == want
    assert all(isinstance(e["local_ns"], int) for e in events)


def test_audio_without_a_sample_rate_fails_the_recording_and_keeps_the_rest(
    tmp_path: Path, recorders: list[NodeRecorder]
) -> None:
    recorder = _recorder(recorders, tmp_path)
    recorder.start()
    recorder.record("level", 0, START_NS, {"x": 1}, None, local_ns=LOCAL_NS)
    recorder.record("mic", 0, START_NS, np.zeros((480, 1), np.float32), None, local_ns=LOCAL_NS)
    deadline = time.monotonic() + 5
    with pytest.raises(ArchiveError, match="port mic of node node sends audio without a sample rate"):  # noqa: PT012
        while time.monotonic() < deadline:
            recorder.record("level", 1, START_NS, {"x": 2}, None, local_ns=LOCAL_NS)
            time.sleep(0.01)
    with pytest.raises(RecordingError, match=r"return Sample\(block, rate_hz=samplerate\)") as caught:
        recorder.stop()
    assert [r.path for r in caught.value.files] == ["local/node/level.csv"]


def test_an_unrecordable_value_is_an_error_naming_its_type(tmp_path: Path, recorders: list[NodeRecorder]) -> None:
    recorder = _recorder(recorders, tmp_path)
    recorder.start()
    recorder.record("out", 0, START_NS, object(), None, local_ns=LOCAL_NS)
    with pytest.raises(RecordingError, match="port out of node node: cannot record a value of type object"):
        recorder.stop()
    assert recorder.stats.dropped == 1


def test_video_then_audio_on_one_port_is_an_error(tmp_path: Path, recorders: list[NodeRecorder]) -> None:
    recorder = _recorder(recorders, tmp_path)
    recorder.start()
    recorder.record("out", 0, START_NS, np.zeros((8, 8), np.uint8), 10.0, local_ns=LOCAL_NS)
    recorder.record("out", 1, START_NS, np.zeros((8, 1), np.float32), 8000.0, local_ns=LOCAL_NS)
    with pytest.raises(RecordingError, match="port out of node node sends audio after video"):
        recorder.stop()


def test_a_full_queue_counts_drops_instead_of_blocking(
    tmp_path: Path, recorders: list[NodeRecorder], caplog: pytest.LogCaptureFixture
) -> None:
    recorder = _recorder(recorders, tmp_path, queue_size=4)
    frame = np.zeros((48, 64, 3), np.uint8)
    begun = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="cpcli.archive"):
        for i in range(200):  # nothing drains the queue yet
            recorder.record("video", i, START_NS + i * MS, frame, 30.0, local_ns=LOCAL_NS)
    assert time.monotonic() - begun < 0.5
    stats = recorder.stats
    assert (stats.backlog, stats.dropped, stats.written) == (4, 196, 0)
    drop_lines = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert drop_lines == [
        "recorder of node node dropped 1 samples (1 in all): its queue of 4 was full or it had stopped"
    ]  # once a second, not once a sample
    with caplog.at_level(logging.WARNING, logger="cpcli.archive"):
        recorder.start()
        recorder.stop()
    stats = recorder.stats
    assert (stats.backlog, stats.dropped, stats.written) == (0, 196, 4)
    assert [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()][1:] == [
        "recorder of node node dropped 195 samples (196 in all): its queue of 4 was full or it had stopped"
    ]  # the rest, reported when the recorder stops


def test_stop_is_idempotent_and_a_recorder_never_started_writes_nothing(
    tmp_path: Path, recorders: list[NodeRecorder]
) -> None:
    idle = _recorder(recorders, tmp_path)
    assert idle.stop() == [] and idle.stop() == []
    assert not (tmp_path / "local").exists()
    recorder = _recorder(recorders, tmp_path)
    recorder.start()
    recorder.record("t", 0, START_NS, {"a": 1}, None, local_ns=LOCAL_NS)
    first = recorder.stop()
    recorder.record("t", 1, START_NS, {"a": 2}, None, local_ns=LOCAL_NS)  # too late: counted, not lost silently
    assert recorder.stop() == first and len(first) == 1
    assert recorder.stats.dropped == 1


CHILD = """
import sys, time
import numpy as np
from pathlib import Path
from cpcli.archive.writer import NodeRecorder
start = time.monotonic_ns()
recorder = NodeRecorder(Path(sys.argv[1]), "local", "src", start_ns=start, video_segment_s=0.25)
recorder.start()
print(start, flush=True)
i = 0
while True:
    t = time.monotonic_ns()
    recorder.record("video", i, t, np.full((48, 64, 3), i % 200, np.uint8), 20.0, local_ns=t)
    recorder.record("level", i, t, {"i": i, "x": i * 0.5}, None, local_ns=t)
    recorder.record("mic", i, t, np.full((400, 1), i, np.int16), 8000.0, local_ns=t)
    i += 1
    time.sleep(0.05)
"""


def test_kill_9_loses_at_most_the_last_second(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, env=env)
    try:
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], 15)
        assert ready, "the recording process did not start"
        start_ns = int(child.stdout.readline())
        time.sleep(1.5)
        killed_ns = time.monotonic_ns() - start_ns
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=10)
    kept_ns = killed_ns - 1_300 * MS  # everything up to ~1 s before the kill (+ scheduling slack)
    node = tmp_path / "local" / "src"

    level = node.joinpath("level.csv").read_text()
    assert level.endswith("\n")  # no half rows
    rows = list(csv.DictReader(level.splitlines()))
    assert [int(r["i"]) for r in rows] == list(range(len(rows)))
    assert int(rows[-1]["t_ns"]) >= kept_ns

    stamps = list(csv.DictReader(node.joinpath("video.timestamps.csv").read_text().splitlines()))
    assert int(stamps[-1]["t_ns"]) >= kept_ns
    by_segment: dict[int, int] = {}
    for row in stamps:
        by_segment[int(row["segment"])] = by_segment.get(int(row["segment"]), 0) + 1
    newest = max(int(p.stem.split("-")[1]) for p in node.glob("video-*.mp4"))
    assert all(int(r["segment"]) < newest for r in stamps if int(r["t_ns"]) <= kept_ns)
    for number in range(newest):  # every closed segment decodes, frames matching its timestamps
        capture = cv2.VideoCapture(str(node / f"video-{number:04d}.mp4"))
        frames = 0
        while capture.read()[0]:
            frames += 1
        capture.release()
        assert frames > 0
        if number + 1 in by_segment:  # its rows are all flushed
            assert frames == by_segment[number], number

    for path in sorted(node.glob("mic-*.wav")):  # even the open segment has a valid header
        with wave.open(str(path), "rb") as w:
            assert w.getnframes() * 2 == path.stat().st_size - 44


def test_a_backlog_of_big_frames_is_bounded_by_bytes_and_counted(tmp_path: Path) -> None:
    import numpy as np

    recorder = NodeRecorder(tmp_path, "lab", "cam", start_ns=0, queue_max_bytes=3 * 640 * 480 * 3)
    frame = np.zeros((480, 640, 3), dtype=np.uint8)
    for i in range(40):  # the writer thread has not started: nothing leaves the queue
        recorder.record("video", i, i * 33_000_000, frame, 30.0, local_ns=LOCAL_NS)
    stats = recorder.stats
    assert stats.backlog == 3 and stats.dropped == 37
    recorder.stop()
