"""The media checks of `cp inspect`: WAV segments against their timestamps and clipping, MP4 frames against theirs."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from cpcli.archive.media import PARTIAL_DIR
from cpcli.archive.report import AudioCheck, Findings, VideoCheck
from cpcli.archive.rows import Rows
from cpcli.archive.streams import SEGMENT_NAME, RecordedStream

CLIP_LEVEL = 0.999  # an audio sample at this share of full scale or above counts as clipped
CLIP_PROBLEM_SHARE = 0.001  # more clipped samples than this share is a problem, fewer a warning
CRASH_TAIL_S = 2.0  # a killed run may lose this much: the last flush interval (1 s) and an open segment (1 s)
DECODE_FRAMES_MAX = 9000  # frames decoded per video stream (5 min at 30 fps); the rest counted from MP4 headers
CLIP_CHUNK_SAMPLES = 1 << 22  # audio scanned in pieces: bounded memory for hour-long recordings
WAV_FORMATS = {(1, 16): ("<i2", "int16"), (1, 32): ("<i4", "int32"), (3, 32): ("<f4", "float32"),
               (3, 64): ("<f8", "float64")}  # (format tag, bits) -> numpy dtype, name
WAVE_EXTENSIBLE = 0xFFFE


@dataclass(frozen=True)
class _Wav:
    """The layout of a WAV file, as its RIFF header gives it."""

    tag: int
    channels: int
    rate: int
    bits: int
    align: int
    offset: int  # of the samples
    data_bytes: int  # as the header says
    file_bytes: int


def _wav_header(path: Path) -> _Wav:
    """The layout of a WAV file from its RIFF chunks. Raises ValueError naming what is wrong."""
    with path.open("rb") as fh:
        head = fh.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            raise ValueError("no RIFF/WAVE header")
        fmt: tuple[int, int, int, int, int] | None = None
        while len(chunk := fh.read(8)) == 8:
            chunk_id, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if chunk_id == b"data":
                if fmt is None or fmt[4] <= 0:
                    raise ValueError("no usable fmt chunk before the data")
                return _Wav(*fmt, fh.tell(), size, path.stat().st_size)
            body = fh.read(size + (size & 1))
            if chunk_id == b"fmt ":
                if len(body) < 16:
                    raise ValueError("a short fmt chunk")
                tag, channels, rate, _, align, bits = struct.unpack("<HHIIHH", body[:16])
                if tag == WAVE_EXTENSIBLE and len(body) >= 26:
                    tag = struct.unpack("<H", body[24:26])[0]
                fmt = (tag, channels, rate, bits, align)
    raise ValueError("no data chunk")


def _clipped(path: Path, wav: _Wav, dtype: str, frames: int) -> int:
    """Samples at CLIP_LEVEL of full scale or beyond, read through a memory map a piece at a time."""
    count = frames * wav.channels
    if count == 0:
        return 0
    level = CLIP_LEVEL * (1.0 if dtype[1] == "f" else float(2 ** (wav.bits - 1)))
    data = np.memmap(path, dtype=np.dtype(dtype), mode="r", offset=wav.offset, shape=(count,))
    try:
        return sum(int(np.count_nonzero((part >= level) | (part <= -level)))
                   for part in (data[i : i + CLIP_CHUNK_SAMPLES] for i in range(0, count, CLIP_CHUNK_SAMPLES)))
    finally:
        del data


def _segments(stream: RecordedStream, column: npt.NDArray[np.int64], weights: npt.NDArray[np.int64] | None
              ) -> tuple[dict[int, str], dict[int, int], list[int]]:
    """Segment files by number, timestamp rows (or frames) per segment, and every number, in order."""
    files = {int(m["number"]): rel for rel in stream.data if (m := SEGMENT_NAME.match(rel.rsplit("/", 1)[-1]))}
    per_segment: dict[int, int] = {}
    if len(column):
        unique, inverse = np.unique(column, return_inverse=True)
        sums = np.bincount(inverse, weights=weights) if weights is not None else np.bincount(inverse)
        per_segment = {int(u): int(s) for u, s in zip(unique, sums, strict=True)}
    return files, per_segment, sorted(set(files) | set(per_segment))


class _Tail:
    """Reports a mismatch as a problem, unless cp run was killed and the segment lies in the last
    CRASH_TAIL_S of the stream, where a crash may take what was not flushed yet."""

    def __init__(self, findings: Findings, name: str, has_manifest: bool, rows: Rows) -> None:
        self.findings, self.name, self.has_manifest = findings, name, has_manifest
        segment, t = rows.np("segment"), rows.np("t_ns")
        self.last_t: dict[int, int] = {}
        for number, t_ns in zip(segment.tolist(), t.tolist(), strict=True):
            self.last_t[number] = max(t_ns, self.last_t.get(number, t_ns))
        self.end_t = int(t.max()) if len(t) else 0

    def __call__(self, number: int, what: str) -> None:
        last = self.last_t.get(number)
        in_tail = (number > max(self.last_t, default=-1)) if last is None else \
            last >= self.end_t - CRASH_TAIL_S * 1e9
        if not self.has_manifest and in_tail:
            self.findings.warning(self.name, f"{what} (at the end, cut short when cp run was killed)")
        else:
            self.findings.problem(self.name, what)


def check_audio(root: Path, stream: RecordedStream, rows: Rows, has_manifest: bool, findings: Findings
                ) -> AudioCheck:
    """Frames in each WAV segment against its timestamp rows, the audio format, and the clipped samples."""
    files, in_timestamps, numbers = _segments(stream, rows.np("segment"), rows.np("frames"))
    report = _Tail(findings, stream.name, has_manifest, rows)
    frames_wav = clipped = samples = 0
    layouts: set[tuple[int, int, str]] = set()
    for number in numbers:
        rel = files.get(number, f"{stream.worker}/{stream.node}/{stream.port}-{number:04d}.wav")
        path, listed = root / rel, in_timestamps.get(number, 0)
        if not path.is_file():
            if number not in files:
                report(number, f"timestamps refer to {rel}, which is not there ({listed} frames lost)")
            continue
        try:
            wav = _wav_header(path)
        except (OSError, ValueError) as err:
            report(number, f"{rel} is not a readable WAV file ({err})")
            continue
        dtype, format_name = WAV_FORMATS.get((wav.tag, wav.bits), ("", ""))
        if not dtype:
            findings.problem(stream.name, f"{rel}: WAV format {wav.tag} with {wav.bits} bits is not one cpcli writes")
            continue
        available = max(0, wav.file_bytes - wav.offset)
        if wav.data_bytes > available:
            report(number, f"{rel} is truncated: its header promises {wav.data_bytes} bytes of audio, "
                           f"the file holds {available}")
        frames = min(wav.data_bytes, available) // wav.align
        if frames != listed:
            report(number, f"{rel} holds {frames} frames, its timestamps list {listed}")
        frames_wav += frames
        clipped += _clipped(path, wav, dtype, frames)
        samples += frames * wav.channels
        layouts.add((wav.rate, wav.channels, format_name))
    if len(layouts) > 1:
        findings.warning(stream.name, f"the audio format changes between segments: {sorted(layouts)}")
    share = clipped / samples if samples else 0.0
    if clipped:
        (findings.problem if share > CLIP_PROBLEM_SHARE else findings.warning)(
            stream.name, f"{share:.2%} of audio samples are clipped ({clipped} at |x| >= {CLIP_LEVEL:g} of full scale)")
    rate, channels, format_name = sorted(layouts)[0] if layouts else (None, None, "")
    return AudioCheck(rate, channels, format_name, frames_wav, int(rows.np("frames").sum()), clipped, share)


def _count_frames(path: Path, decode: bool, limit: int) -> tuple[int | None, float]:
    """(frames decoded, or from the header; None if OpenCV cannot open it) and the MP4's frame rate."""
    import cv2  # here: only inspecting video needs OpenCV

    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            return None, 0.0
        fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
        if not decode:
            return int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), fps
        count = 0
        while count < limit and capture.grab():
            count += 1
        return count, fps
    finally:
        capture.release()


def check_video(root: Path, stream: RecordedStream, rows: Rows, has_manifest: bool, budget: int,
                findings: Findings) -> tuple[VideoCheck, float | None]:
    """Decode the last segment (where a crash strikes) then the others from the start, within `budget` frames."""
    files, in_timestamps, numbers = _segments(stream, rows.np("segment"), None)
    report = _Tail(findings, stream.name, has_manifest, rows)
    decoded = by_header = 0
    fps: float | None = None
    for number in numbers[-1:] + numbers[:-1]:
        rel = files.get(number, f"{stream.worker}/{stream.node}/{stream.port}-{number:04d}.mp4")
        path, listed = root / rel, in_timestamps.get(number, 0)
        if not path.is_file():
            if number not in files:
                partial = path.parent / PARTIAL_DIR / path.name
                why = f"was never closed (only {PARTIAL_DIR}/{path.name}, not playable)" if partial.is_file() \
                    else "is not there"
                report(number, f"timestamps refer to {rel}, which {why}: {listed} frames lost")
            continue
        decode = listed <= budget
        count, segment_fps = _count_frames(path, decode, limit=max(budget, listed) + 1)
        if count is None:
            report(number, f"{rel} cannot be decoded ({listed} frames lost)")
            continue
        fps = fps or segment_fps or None
        if decode:
            budget -= count
            decoded += count
        else:
            by_header += count
        if count != listed:
            report(number, f"{rel} has {count} {'decodable frames' if decode else 'frames by its header'}, "
                           f"its timestamps list {listed}")
    return VideoCheck(len(numbers), decoded, by_header, int(len(rows.np("segment")))), fps
