"""Previews for `cp monitor`: a small picture of a node's outputs, made only while someone watches.

A port's preview travels on its own topic `~node/port` of the node's publisher, at most
PREVIEW_HZ times a second: a video frame shrunk to fit PREVIEW_SIZE by plain striding (no resampling
library in the hot path), an audio block's level (RMS and the peak since the last preview, per
channel, in dBFS, and whether it clipped), the latest table row or event as it is. Nobody
subscribed: nothing is computed, one dictionary lookup per sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PREVIEW_MARK = b"~"
PREVIEW_HZ = 2.0
PREVIEW_INTERVAL_NS = int(1e9 / PREVIEW_HZ)
PREVIEW_SIZE = (36, 64)  # rows, columns: a thumbnail of half-block characters, 32 x 64 cells at most
CLIP_LEVEL = 0.999  # a sample at this share of full scale counts as clipping
SILENCE_DB = -120.0


def preview_topic(topic: bytes) -> bytes:
    return PREVIEW_MARK + topic


@dataclass
class PreviewState:
    """Per port: when the last preview went, and the audio peak since."""

    last_ns: int = -(1 << 62)
    peak: list[float] = field(default_factory=list)
    clipped: bool = False


def _full_scale(dtype: np.dtype[Any]) -> float:
    return float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else 1.0


def is_video(value: Any) -> bool:
    return (isinstance(value, np.ndarray) and value.dtype == np.uint8
            and (value.ndim == 2 or (value.ndim == 3 and value.shape[2] in (1, 3))))


def is_audio(value: Any) -> bool:
    return isinstance(value, np.ndarray) and not is_video(value) and value.ndim == 2 and value.shape[0] > 0 \
        and (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer))


def accumulate(state: PreviewState, value: Any) -> None:
    """Audio between previews: keep each channel's peak and whether it clipped."""
    if not is_audio(value):
        return
    scale = _full_scale(value.dtype)
    peaks = (np.abs(value).max(axis=0) / scale).tolist()
    state.peak = [max(a, b) for a, b in zip(state.peak, peaks, strict=False)] if len(state.peak) == len(peaks) \
        else peaks
    state.clipped = state.clipped or max(peaks, default=0.0) >= CLIP_LEVEL


def make(value: Any, state: PreviewState) -> np.ndarray | dict[str, Any] | Any:
    """The preview of one sample: a small frame, an audio level, or the value itself (rows, events)."""
    if is_video(value):
        rows, cols = value.shape[:2]
        step = max(1, math.ceil(rows / PREVIEW_SIZE[0]), math.ceil(cols / PREVIEW_SIZE[1]))
        return np.ascontiguousarray(value[::step, ::step])
    if is_audio(value):
        scale = _full_scale(value.dtype)
        rms = np.sqrt(np.mean((value.astype(np.float64) / scale) ** 2, axis=0)).tolist()
        level = {"rms_db": [_db(r) for r in rms], "peak_db": [_db(p) for p in state.peak],
                 "clipped": state.clipped, "channels": len(rms)}
        state.peak, state.clipped = [], False
        return level
    return value


def _db(share: float) -> float:
    return round(20 * math.log10(share), 1) if share > 0 else SILENCE_DB
