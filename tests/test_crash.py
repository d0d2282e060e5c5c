"""Crash safety: kill -9 of the whole `cp run` process group loses at most the last second."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
import wave
from pathlib import Path

import cv2
import pytest

from tests.conftest import ROOT

RECORD_S = 8.0
LOSS_ALLOWED_S = 1.5  # the last second, plus the flush that was under way


def _last_t_ns(path: Path) -> int:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows, f"{path} is empty"
    assert [int(r["index"]) for r in rows] == sorted(int(r["index"]) for r in rows)
    return int(rows[-1]["t_ns"])


@pytest.mark.timeout(60)
def test_kill_9_of_the_process_group_loses_at_most_the_last_second(tmp_path: Path) -> None:
    out = tmp_path / "sessions"
    proc = subprocess.Popen([sys.executable, "-m", "cpcli", "run", str(ROOT / "recipes" / "demo.yaml"),
                             "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        started = None
        while started is None and time.monotonic() < deadline:
            events = list(out.glob("*/events.jsonl"))
            if events and "session_started" in events[0].read_text():
                started = time.monotonic()
            time.sleep(0.02)
        assert started is not None, "the session never started"
        time.sleep(RECORD_S)
        elapsed_ns = int((time.monotonic() - started) * 1e9)
        os.killpg(proc.pid, signal.SIGKILL)  # every node dies at once: nothing closes in order
        proc.wait(5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    session = next(out.glob("*/"))
    assert not (session / "manifest.json").exists()
    node_dir = next(session.glob("*/cam")).parent

    # Video: every .mp4 left plays, and its frames match the timestamp rows of closed segments.
    segments = sorted((node_dir / "cam").glob("video-*.mp4"))
    assert len(segments) >= RECORD_S - 2
    decoded: dict[int, int] = {}
    for path in segments:
        capture = cv2.VideoCapture(str(path))
        frames = 0
        while capture.read()[0]:
            frames += 1
        capture.release()
        assert frames > 0, f"{path.name} does not decode"
        decoded[int(path.stem.split("-")[1])] = frames
    with open(node_dir / "cam" / "video.timestamps.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for number, frames in decoded.items():
        assert sum(1 for r in rows if int(r["segment"]) == number) == frames
    last_closed = max(int(r["t_ns"]) for r in rows if int(r["segment"]) in decoded)
    assert last_closed >= elapsed_ns - LOSS_ALLOWED_S * 1e9 - 1e9  # one segment may be open

    # Tables and audio timestamps reach the disk at least every second.
    for table in (node_dir / "motion" / "motion.csv", node_dir / "level" / "level.csv",
                  node_dir / "mic" / "audio.timestamps.csv"):
        assert _last_t_ns(table) >= elapsed_ns - LOSS_ALLOWED_S * 1e9, table.name

    # Audio: every WAV segment has a valid header that covers what was written.
    total = 0
    for path in sorted((node_dir / "mic").glob("audio-*.wav")):
        with open(path, "rb") as fh:
            header = fh.read(44)
        assert header[:4] == b"RIFF" and header[8:12] == b"WAVE"
        if int.from_bytes(header[20:22], "little") == 1:
            with wave.open(str(path)) as wav:
                total += wav.getnframes()
        else:
            total += int.from_bytes(header[40:44], "little") // 4
    assert total >= (elapsed_ns / 1e9 - LOSS_ALLOWED_S) * 48000
