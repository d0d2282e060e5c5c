"""Archive files on disk: hashed append-only sinks, MP4 video segments and WAV audio segments."""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import struct
import time
from abc import abstractmethod
from typing import Any

import numpy as np

from cpcli.archive.files import CsvSink, FileRecord, FileSink, PortFiles, StreamWriter, exists_error, file_record
from cpcli.errors import ArchiveError

DEFAULT_FPS = 30.0  # an MP4's frame rate before two frames have shown the real one
VIDEO_FOURCCS = ("avc1", "mp4v")  # H.264 where this OpenCV build can encode it, else MPEG-4 part 2
VIDEO_TIMESTAMPS = ("index", "t_ns", "local_ns", "segment", "frame_in_segment")
PARTIAL_DIR = ".partial"  # video segments being written; moved out when closed (playable)
AUDIO_TIMESTAMPS = ("index", "t_ns", "local_ns", "segment", "frame_offset", "frames")
WAVE_PCM, WAVE_FLOAT = 1, 3  # WAVE format tags




class _Segments(StreamWriter):
    """What video and audio share: numbered segments `<port>-NNNN.<ext>` and `<port>.timestamps.csv`."""

    def __init__(self, files: PortFiles, segment_s: float, header: tuple[str, ...]) -> None:
        self._files, self._segment_s, self._header = files, segment_s, header
        self._timestamps: CsvSink | None = None
        self._number = -1  # the open (or last) segment
        self._records: list[FileRecord] = []
        self._closed_bytes = 0

    @property
    def bytes_written(self) -> int:
        return self._closed_bytes + (self._timestamps.bytes_written if self._timestamps else 0)

    def flush(self) -> None:
        if self._timestamps is not None:
            self._timestamps.flush()

    def close(self) -> list[FileRecord]:
        self._close_segment()
        if self._timestamps is not None:
            self._records.append(self._timestamps.close())
        return list(self._records)

    @abstractmethod
    def _close_segment(self) -> None:
        """Finish the open segment, if any, and `_keep()` its record."""

    def _keep(self, record: FileRecord) -> None:
        self._records.append(record)
        self._closed_bytes += record.bytes

    def _stamp(self, row: tuple[int, ...]) -> None:
        if self._timestamps is None:
            self._timestamps = self._files.csv(f"{self._files.port}.timestamps.csv", "timestamps", self._header)
        self._timestamps.write_row(row)


class VideoSegments(_Segments):
    """MP4 segments `<port>-NNNN.mp4` of at most `segment_s` each, and `<port>.timestamps.csv`.

    A segment ends when its frames span `segment_s`, when a frame of another size or color
    arrives, or when it has been open `segment_s` on the local clock at a flush (a stalled
    stream), so a crash loses at most the segment being written. MP4 encoders crop odd sizes,
    so an odd height or width is padded by repeating the last row or column.
    """

    def __init__(self, files: PortFiles, segment_s: float, logger: logging.Logger) -> None:
        super().__init__(files, segment_s, VIDEO_TIMESTAMPS)
        self._log = logger
        self._writer: Any = None  # the open cv2.VideoWriter
        self._shape: tuple[int, ...] = ()
        self._first_t_ns = self._opened_t_ns = self._last_t_ns = 0
        self._opened_s = 0.0
        self._frames = 0  # in the open segment
        self._seen = 0  # frames of the whole stream, for the frame-rate estimate
        self._fourcc: str | None = None

    def write(self, index: int, t_ns: int, local_ns: int, value: Any, rate_hz: float | None) -> None:
        frame = np.ascontiguousarray(value)
        height, width = frame.shape[:2]
        if height % 2 or width % 2:
            if self._seen == 0:
                self._log.info("%s: %dx%d frames padded to an even size", self._files.where, width, height)
            frame = np.pad(frame, ((0, height % 2), (0, width % 2), *((0, 0),) * (frame.ndim - 2)), "edge")
        if self._seen == 0:
            self._first_t_ns = t_ns
        self._seen += 1
        self._last_t_ns = t_ns
        if self._writer is None or frame.shape != self._shape or t_ns - self._opened_t_ns >= self._segment_s * 1e9:
            self._close_segment()
            self._open_segment(frame.shape, t_ns, rate_hz)
        self._writer.write(frame)
        self._stamp((index, t_ns, local_ns, self._number, self._frames))
        self._frames += 1

    def flush(self) -> None:
        if self._writer is not None and time.monotonic() - self._opened_s >= self._segment_s:
            self._close_segment()
        super().flush()

    def _fps(self, rate_hz: float | None) -> float:
        if rate_hz is not None and math.isfinite(rate_hz) and rate_hz > 0:
            return float(rate_hz)
        if self._seen >= 2 and self._last_t_ns > self._first_t_ns:
            return (self._seen - 1) * 1e9 / (self._last_t_ns - self._first_t_ns)
        return DEFAULT_FPS

    def _open_segment(self, shape: tuple[int, ...], t_ns: int, rate_hz: float | None) -> None:
        import cv2  # here, not at import: `cp` must start fast

        self._number += 1
        name = self._files.segment(self._number, "mp4")
        path, rel = self._files.path(name), self._files.rel(name)
        if path.exists():
            raise exists_error(rel)
        # An MP4 is playable only once closed, so a segment is written under PARTIAL_DIR and moved
        # into place when it closes: after a crash every .mp4 plays; the open one stays there.
        partial = path.parent / PARTIAL_DIR / name
        partial.parent.mkdir(exist_ok=True)
        fps, size = self._fps(rate_hz), (shape[1], shape[0])
        # MPEG-4 time bases are fractions with terms below 65536: a measured rate such as 120.123456
        # has none, so it is written as the nearest rate that has one (the timestamps stay exact).
        rates = dict.fromkeys((fps, round(fps, 2), round(fps, 1), float(round(fps))))
        for fourcc, rate in itertools.product((self._fourcc,) if self._fourcc else VIDEO_FOURCCS, rates):
            writer = cv2.VideoWriter(str(partial), cv2.VideoWriter.fourcc(*fourcc), rate, size, len(shape) == 3)
            if writer.isOpened():
                if self._fourcc is None:
                    self._log.info("%s: video as MP4 (%s)", self._files.where, fourcc)
                self._fourcc, self._writer = fourcc, writer
                break
            writer.release()
        else:
            partial.unlink(missing_ok=True)
            raise ArchiveError(
                f"OpenCV could not open {rel} for writing ({size[0]}x{size[1]} at {fps:.3g} fps)",
                hint="check the disk and that this OpenCV build can write MP4",
            )
        self._shape, self._opened_t_ns, self._opened_s, self._frames = shape, t_ns, time.monotonic(), 0

    def _close_segment(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.release()
            if self._timestamps is not None:  # a segment that shows up whole has its rows on disk too,
                self._timestamps.push()  # even if the process is killed before the next flush
            name = self._files.segment(self._number, "mp4")
            path = self._files.path(name)
            os.replace(path.parent / PARTIAL_DIR / name, path)
            with contextlib.suppress(OSError):
                (path.parent / PARTIAL_DIR).rmdir()  # only when empty
            self._keep(file_record(path, self._files.rel(name), "video"))


def _wav_format(dtype: np.dtype[Any]) -> tuple[int, int, str]:
    """(format tag, bits per sample, little-endian numpy dtype) of the WAV holding `dtype` samples."""
    if dtype.kind == "f":
        return WAVE_FLOAT, 32, "<f4"
    if dtype.kind == "i" and dtype.itemsize in (2, 4):
        return WAVE_PCM, dtype.itemsize * 8, f"<i{dtype.itemsize}"
    raise ArchiveError(f"audio of type {dtype} cannot be written to WAV", hint="send float32, int16 or int32")


class _WavFile:
    """One WAV segment: header first, sizes patched in at every flush so a crash leaves a valid file."""

    def __init__(self, sink: FileSink, tag: int, bits: int, channels: int, rate: int) -> None:
        self.sink, self.layout = sink, (tag, bits, channels, rate)
        self.frames = self._header_frames = 0
        sink.write(self._header())
        sink.push()  # a file on disk is always a valid WAV

    def _header(self) -> bytes:
        tag, bits, channels, rate = self.layout
        align = channels * bits // 8
        data_bytes = self.frames * align
        fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * align, align, bits)
        if tag != WAVE_PCM:  # other formats carry cbSize and a fact chunk
            fmt += struct.pack("<H", 0)
        fact = b"" if tag == WAVE_PCM else b"fact" + struct.pack("<II", 4, self.frames)
        chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt + fact + b"data" + struct.pack("<I", data_bytes)
        return b"RIFF" + struct.pack("<I", 4 + len(chunks) + data_bytes) + b"WAVE" + chunks

    def append(self, data: bytes, frames: int) -> None:
        self.sink.write(data)
        self.frames += frames

    def flush(self) -> None:
        if self.frames != self._header_frames:
            self.sink.patch(0, self._header())
            self._header_frames = self.frames
        self.sink.flush()

    def close(self) -> FileRecord:
        self.flush()
        return self.sink.close()


class WavSegments(_Segments):
    """WAV segments `<port>-NNNN.wav` of about `segment_s` of audio each, and `<port>.timestamps.csv`.

    int16 blocks become 16-bit PCM, int32 32-bit PCM, float32/float64 32-bit IEEE float. A block
    is never split; a new segment starts when one is full or the channels, type or rate change.
    """

    def __init__(self, files: PortFiles, segment_s: float) -> None:
        super().__init__(files, segment_s, AUDIO_TIMESTAMPS)
        self._wav: _WavFile | None = None

    @property
    def bytes_written(self) -> int:
        return super().bytes_written + (self._wav.sink.bytes_written if self._wav else 0)

    def write(self, index: int, t_ns: int, local_ns: int, value: Any, rate_hz: float | None) -> None:
        if rate_hz is None or not math.isfinite(rate_hz) or rate_hz < 1:
            rate = "without a sample rate" if rate_hz is None else f"at a sample rate of {rate_hz} Hz"
            raise ArchiveError(
                f"{self._files.where} sends audio {rate}", hint="return Sample(block, rate_hz=samplerate)"
            )
        block = value.reshape(-1, 1) if value.ndim == 1 else value
        tag, bits, dtype = _wav_format(block.dtype)
        layout = (tag, bits, block.shape[1], round(rate_hz))
        wav = self._wav
        if wav is None or wav.layout != layout or wav.frames >= max(1, round(rate_hz * self._segment_s)):
            self._close_segment()
            self._number += 1
            wav = self._wav = _WavFile(self._files.sink(self._files.segment(self._number, "wav"), "audio"), *layout)
        offset = wav.frames
        wav.append(np.ascontiguousarray(block, dtype=dtype).tobytes(), block.shape[0])
        self._stamp((index, t_ns, local_ns, self._number, offset, block.shape[0]))

    def flush(self) -> None:
        if self._wav is not None:
            self._wav.flush()
        super().flush()

    def _close_segment(self) -> None:
        if self._wav is not None:
            wav, self._wav = self._wav, None
            self._keep(wav.close())
