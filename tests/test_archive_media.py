"""Tests of cpcli.archive.media: hashed sinks, MP4 segments decoded by OpenCV, WAV segments."""

from __future__ import annotations

import csv
import hashlib
import logging
import struct
import wave
from pathlib import Path

import cv2
import numpy as np
import pytest

from cpcli.archive.files import FileRecord, FileSink, PortFiles
from cpcli.archive.media import AUDIO_TIMESTAMPS, VIDEO_TIMESTAMPS, VideoSegments, WavSegments
from cpcli.errors import ArchiveError

LOG = logging.getLogger("test.archive.media")
MS = 1_000_000
LOCAL_NS = 9_000_000_000_000  # the recording machine's monotonic clock at t_ns = 0


def _files(tmp_path: Path, port: str) -> PortFiles:
    return PortFiles(tmp_path, "local/node", "node", port)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _check_records(tmp_path: Path, records: list[FileRecord]) -> None:
    for record in records:
        data = (tmp_path / Path(record.path).name).read_bytes()
        assert record.path.startswith("local/node/")
        assert record.bytes == len(data)
        assert record.sha256 == hashlib.sha256(data).hexdigest()


def _decode(path: Path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames


def _fill(i: int) -> int:
    return (i * 23) % 200 + 20


def test_file_sink_hashes_what_it_wrote_and_patches_by_reading_back(tmp_path: Path) -> None:
    sink = FileSink(tmp_path / "a.bin", "local/node/a.bin", "events")
    sink.write(b"hello ")
    sink.flush()
    assert (tmp_path / "a.bin").read_bytes() == b"hello "
    sink.write(b"world")
    sink.patch(0, b"J")
    record = sink.close()
    assert sink.close() == record
    assert (tmp_path / "a.bin").read_bytes() == b"Jello world"
    assert record == FileRecord("local/node/a.bin", "events", 11, hashlib.sha256(b"Jello world").hexdigest())


def test_file_sink_never_overwrites_a_recording(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"old")
    with pytest.raises(ArchiveError, match="a.bin already exists"):
        FileSink(tmp_path / "a.bin", "local/node/a.bin", "events")
    assert (tmp_path / "a.bin").read_bytes() == b"old"


def test_video_segments_decode_with_right_counts_sizes_and_timestamps(tmp_path: Path) -> None:
    writer = VideoSegments(_files(tmp_path, "video"), 0.5, LOG)
    for i in range(35):  # 3.5 s at 10 fps
        writer.write(i, i * 100 * MS, LOCAL_NS + i * 100 * MS, np.full((48, 64, 3), _fill(i), np.uint8), None)
    records = writer.close()

    segments = sorted(tmp_path.glob("video-*.mp4"))
    assert [p.name for p in segments] == [f"video-{n:04d}.mp4" for n in range(7)]
    decoded = [_decode(p) for p in segments]
    assert [len(frames) for frames in decoded] == [5] * 7
    flat = [frame for frames in decoded for frame in frames]
    assert all(frame.shape == (48, 64, 3) for frame in flat)
    assert [round(float(frame.mean())) for frame in flat] == pytest.approx(
        [_fill(i) for i in range(35)], abs=4
    )
    second = cv2.VideoCapture(str(segments[1]))
    assert second.get(cv2.CAP_PROP_FPS) == pytest.approx(10, rel=0.05)  # estimated from the timestamps
    second.release()

    rows = _rows(tmp_path / "video.timestamps.csv")
    assert tuple(rows[0]) == VIDEO_TIMESTAMPS == ("index", "t_ns", "local_ns", "segment", "frame_in_segment")
    assert [
        (int(r["index"]), int(r["t_ns"]), int(r["local_ns"]), int(r["segment"]), int(r["frame_in_segment"]))
        for r in rows
    ] == [(i, i * 100 * MS, LOCAL_NS + i * 100 * MS, i // 5, i % 5) for i in range(35)]
    assert sorted(r.kind for r in records) == ["timestamps"] + ["video"] * 7
    _check_records(tmp_path, records)


def test_a_closed_segment_has_its_timestamp_rows_on_disk_before_any_flush(tmp_path: Path) -> None:
    """A crash right after a segment closed must not leave an .mp4 whose frames have no rows."""
    writer = VideoSegments(_files(tmp_path, "video"), 0.5, LOG)
    for i in range(12):  # segments 0 and 1 close at frames 5 and 10; nobody calls flush()
        writer.write(i, i * 100 * MS, LOCAL_NS + i * 100 * MS, np.full((48, 64, 3), _fill(i), np.uint8), None)
    closed = sorted(tmp_path.glob("video-*.mp4"))
    assert [p.name for p in closed] == ["video-0000.mp4", "video-0001.mp4"]
    on_disk = _rows(tmp_path / "video.timestamps.csv")  # read as a crash would leave it
    for number, path in enumerate(closed):
        assert sum(1 for r in on_disk if int(r["segment"]) == number) == len(_decode(path)) == 5
    writer.close()


def test_grayscale_video_uses_the_rate_given_and_decodes(tmp_path: Path) -> None:
    writer = VideoSegments(_files(tmp_path, "gray"), 1.0, LOG)
    for i in range(6):
        writer.write(i, i * 40 * MS, LOCAL_NS + i * 40 * MS, np.full((32, 48), _fill(i), np.uint8), 25.0)
    records = writer.close()
    capture = cv2.VideoCapture(str(tmp_path / "gray-0000.mp4"))
    assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(25)
    capture.release()
    frames = _decode(tmp_path / "gray-0000.mp4")
    assert len(frames) == 6
    assert frames[0].shape[:2] == (32, 48)
    assert float(frames[3].mean()) == pytest.approx(_fill(3), abs=4)
    _check_records(tmp_path, records)


@pytest.mark.parametrize("rate_hz", [120.123456, 1234.5678])
def test_a_rate_with_no_mpeg4_time_base_is_written_at_the_nearest_one(tmp_path: Path, rate_hz: float) -> None:
    writer = VideoSegments(_files(tmp_path, "odd"), 1.0, LOG)  # e.g. a rate measured from the first frames
    for i in range(4):
        writer.write(i, i * MS, LOCAL_NS + i * MS, np.full((32, 48, 3), _fill(i), np.uint8), rate_hz)
    records = writer.close()
    capture = cv2.VideoCapture(str(tmp_path / "odd-0000.mp4"))
    assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(rate_hz, rel=1e-3)
    capture.release()
    assert len(_decode(tmp_path / "odd-0000.mp4")) == 4
    _check_records(tmp_path, records)


def test_a_new_frame_size_starts_a_new_segment_and_odd_sizes_are_padded(tmp_path: Path) -> None:
    writer = VideoSegments(_files(tmp_path, "video"), 10.0, LOG)
    for i in range(3):
        writer.write(i, i * MS, LOCAL_NS + i * MS, np.zeros((48, 64, 3), np.uint8), 30.0)
    for i in range(3, 5):
        writer.write(i, i * MS, LOCAL_NS + i * MS, np.zeros((25, 33, 3), np.uint8), 30.0)
    writer.close()
    assert [f.shape for f in _decode(tmp_path / "video-0000.mp4")] == [(48, 64, 3)] * 3
    assert [f.shape for f in _decode(tmp_path / "video-0001.mp4")] == [(26, 34, 3)] * 2
    rows = _rows(tmp_path / "video.timestamps.csv")
    assert [(r["segment"], r["frame_in_segment"]) for r in rows] == [
        ("0", "0"),
        ("0", "1"),
        ("0", "2"),
        ("1", "0"),
        ("1", "1"),
    ]


def test_a_video_file_that_cannot_be_opened_is_named(tmp_path: Path) -> None:
    writer = VideoSegments(_files(tmp_path, "video"), 1.0, LOG)
    with pytest.raises(ArchiveError, match="local/node/video-0000.mp4"):
        writer.write(0, 0, LOCAL_NS, np.zeros((2, 70000), np.uint8), 30.0)  # wider than any MP4 encoder takes
    writer.close()
    assert not (tmp_path / "video-0000.mp4").exists()


def test_wav_int16_segments_read_back_with_stdlib_wave(tmp_path: Path) -> None:
    writer = WavSegments(_files(tmp_path, "mic"), 0.5)
    rng = np.random.default_rng(1)
    blocks = [rng.integers(-32768, 32767, (1000, 2), dtype=np.int16) for _ in range(10)]
    for i, block in enumerate(blocks):
        writer.write(i, i * 125 * MS, LOCAL_NS + i * 125 * MS, block, 8000.0)
    records = writer.close()

    assert sorted(p.name for p in tmp_path.glob("mic-*.wav")) == [
        "mic-0000.wav",
        "mic-0001.wav",
        "mic-0002.wav",
    ]
    data = b""
    for n in range(3):
        with wave.open(str(tmp_path / f"mic-{n:04d}.wav"), "rb") as w:
            assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (2, 2, 8000)
            assert w.getnframes() == (4000 if n < 2 else 2000)
            data += w.readframes(w.getnframes())
    assert data == np.concatenate(blocks).tobytes()
    rows = _rows(tmp_path / "mic.timestamps.csv")
    assert tuple(rows[0]) == AUDIO_TIMESTAMPS == ("index", "t_ns", "local_ns", "segment", "frame_offset", "frames")
    assert [(r["segment"], r["frame_offset"], r["frames"]) for r in rows] == [
        (str(i // 4), str(i % 4 * 1000), "1000") for i in range(10)
    ]
    assert [int(r["local_ns"]) - int(r["t_ns"]) for r in rows] == [LOCAL_NS] * 10
    _check_records(tmp_path, records)


def _read_float_wav(path: Path) -> tuple[dict[str, int], np.ndarray]:
    raw = path.read_bytes()
    assert raw[:4] == b"RIFF" and raw[8:12] == b"WAVE"
    assert struct.unpack("<I", raw[4:8])[0] == len(raw) - 8
    chunks: dict[bytes, bytes] = {}
    pos = 12
    while pos < len(raw):
        name, size = raw[pos : pos + 4], struct.unpack("<I", raw[pos + 4 : pos + 8])[0]
        chunks[name] = raw[pos + 8 : pos + 8 + size]
        pos += 8 + size
    tag, channels, rate, byte_rate, align, bits = struct.unpack("<HHIIHH", chunks[b"fmt "][:16])
    fields = {
        "tag": tag,
        "channels": channels,
        "rate": rate,
        "byte_rate": byte_rate,
        "align": align,
        "bits": bits,
        "fact": struct.unpack("<I", chunks[b"fact"])[0],
    }
    return fields, np.frombuffer(chunks[b"data"], "<f4").reshape(-1, channels)


def test_wav_float32_and_float64_become_ieee_float_wav(tmp_path: Path) -> None:
    writer = WavSegments(_files(tmp_path, "mic"), 1.0)
    tone = np.sin(np.arange(4800) / 10.0).astype(np.float64).reshape(-1, 1)
    writer.write(0, 0, LOCAL_NS, tone[:2400].astype(np.float32), 48000.0)
    writer.write(1, 50 * MS, LOCAL_NS + 50 * MS, tone[2400:, 0], 48000.0)  # 1-D float64: one channel
    records = writer.close()
    fields, samples = _read_float_wav(tmp_path / "mic-0000.wav")
    assert fields == {
        "tag": 3,
        "channels": 1,
        "rate": 48000,
        "byte_rate": 192000,
        "align": 4,
        "bits": 32,
        "fact": 4800,
    }
    np.testing.assert_array_equal(samples, tone.astype(np.float32))
    _check_records(tmp_path, records)


def test_wav_header_is_valid_after_each_flush_and_channel_change_starts_a_segment(tmp_path: Path) -> None:
    writer = WavSegments(_files(tmp_path, "mic"), 10.0)
    writer.write(0, 0, LOCAL_NS, np.zeros((480, 1), np.int16), 48000.0)
    writer.flush()
    with wave.open(str(tmp_path / "mic-0000.wav"), "rb") as w:  # what a crash would leave
        assert w.getnframes() == 480
    writer.write(1, 10 * MS, LOCAL_NS + 10 * MS, np.zeros((480, 2), np.int32), 48000.0)
    writer.close()
    with wave.open(str(tmp_path / "mic-0001.wav"), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getnframes()) == (2, 4, 480)


def test_audio_without_a_sample_rate_is_refused(tmp_path: Path) -> None:
    writer = WavSegments(_files(tmp_path, "mic"), 1.0)
    with pytest.raises(
        ArchiveError,
        match="port mic of node node sends audio without a sample rate; "
        r"return Sample\(block, rate_hz=samplerate\)",
    ):
        writer.write(0, 0, LOCAL_NS, np.zeros((480, 1), np.float32), None)
    assert writer.close() == []
