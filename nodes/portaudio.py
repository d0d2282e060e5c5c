"""PortAudio through sounddevice, shared by the microphone and speaker nodes.

`sounddevice` is imported only inside functions: without the PortAudio library `cp` still
works, and only these nodes fail, saying what to install.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

from cpcli.node import (
    DeviceError,
    DeviceInfo,
    NodeConfigError,
)

NS_PER_S = 1_000_000_000
DTYPES = ("float32", "int16", "int32")  # what PortAudio delivers natively and WAV stores as recorded
LATENCIES = ("low", "high")  # PortAudio's named latencies; a number is seconds
MAX_LATENCY_S = 10.0  # beyond this a "latency" is a typo, not a buffer size
MAX_CHANNELS = 64
MAX_SAMPLERATE = 384_000  # the highest rate of studio interfaces
MAX_BLOCKSIZE = 1 << 20
QUEUE_S = 2.0  # audio held between PortAudio's thread and step(): rides out a slow step without loss
MIN_QUEUE_BLOCKS = 8
POLL_S = 0.2  # longest step() waits for a block, so the runtime stays responsive to stop
FIRST_BLOCK_TIMEOUT_S = 5.0  # an idle PulseAudio sink takes up to 2 s to deliver the first block
STALL_S = 2.0  # no block for this long (plus two blocks' duration) while running: the device is gone
CLOCK_READINGS = 8  # (stream time, monotonic) readings per anchor; the tightest one sets the offset
CLOCK_JUMP_NS = 50_000_000  # a callback's own clock reading this far off the anchor: re-anchor (NTP steps >= 128 ms)
CLOCK_LOG_NS = 1_000_000  # a re-anchor that moves the offset more than this is logged
SMOOTHING = 32  # a block's time moves 1/32 of the way from the sample count to its ADC time: ADC jitter
# (ms through PulseAudio) shrinks 32-fold, a sound card clock's drift (ppm) is still followed
RESYNC_NS = NS_PER_S  # sample count and ADC time this far apart: trust the ADC time (a gap PortAudio missed)
LOG_EVERY_S = 5.0  # repeated overflows/underflows are logged at most this often, with their count
PREFILL_S = 0.05  # the speaker starts (and restarts after an underflow) once this much audio waits
INT_FULL_SCALE = {"int16": 32768.0, "int32": 2147483648.0}
PORTAUDIO_HINT = (
    "install PortAudio: apt install libportaudio2 (Debian/Ubuntu), dnf install portaudio (Fedora), "
    "brew install portaudio (macOS)"
)


def load_sounddevice(what: str) -> Any:
    """The sounddevice module, or a DeviceError saying what to install."""
    try:
        import sounddevice
    except OSError as err:  # sounddevice is there, the PortAudio library it loads is not
        raise DeviceError(f"{what} needs the PortAudio library, which could not be loaded: {err}",
                          hint=PORTAUDIO_HINT) from err
    except ImportError as err:
        raise DeviceError(f"{what} needs the Python package sounddevice: {err}",
                          hint="pip install sounddevice") from err
    return sounddevice


def check_int(what: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise NodeConfigError(f"{what} must be an integer in {low}..{high}, got {value!r}")
    return value


def check_device(what: str, device: object) -> int | str | None:
    if device is None or (isinstance(device, int) and not isinstance(device, bool) and device >= 0):
        return device
    if isinstance(device, str) and device.strip():
        return device.strip()
    raise NodeConfigError(f"{what} device must be an index (0, 1, ...), part of a device's name, or "
                          f"empty for the default, got {device!r}; `cp devices` lists them")


def check_latency(what: str, latency: object) -> str | float:
    if latency in LATENCIES:
        return str(latency)
    if isinstance(latency, (int, float)) and not isinstance(latency, bool) and 0 < latency <= MAX_LATENCY_S:
        return float(latency)
    raise NodeConfigError(f"{what} latency must be 'low', 'high' or seconds in (0, {MAX_LATENCY_S:g}], "
                          f"got {latency!r}")


def to_ns(seconds: float) -> int:
    """PortAudio seconds (often ~1.8e9: the wall clock) to integer ns, without float rounding of the whole."""
    whole = math.floor(seconds)
    return whole * NS_PER_S + round((seconds - whole) * NS_PER_S)


def abandon_stream(sd: Any, stream: Any) -> None:
    """Close a stream on the way out of a failed setup, keeping the error that got us here."""
    if stream is not None:
        with contextlib.suppress(sd.PortAudioError):
            stream.abort()
        with contextlib.suppress(sd.PortAudioError):
            stream.close()


def find_device(sd: Any, device: int | str | None, direction: str, who: str) -> tuple[int, dict[str, Any]]:
    """Resolve `device` (index, name part, None for the default) to one input or output device."""
    key = f"max_{direction}_channels"
    usable = [(i, d) for i, d in enumerate(sd.query_devices()) if d[key] > 0]
    listing = ", ".join(f"{i} {d['name']!r}" for i, d in usable) or "none"
    here = f"{direction}s here: {listing}"
    hint = "set device: to an index or part of a name; `cp devices` lists them"
    if device is None:
        default = sd.default.device[0 if direction == "input" else 1]
        for i, d in usable:
            if i == default:
                return i, d
        raise DeviceError(f"{who}: this machine has no default {direction} device; {here}", hint=hint)
    if isinstance(device, int) or device.isdigit():
        for i, d in usable:
            if i == int(device):
                return i, d
        raise DeviceError(f"{who} {device} is not an {direction} device; {here}", hint=hint)
    wanted = device.casefold()
    exact = [(i, d) for i, d in usable if d["name"].casefold() == wanted]
    matches = exact or [(i, d) for i, d in usable if wanted in d["name"].casefold()]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise DeviceError(f"{who} {device!r} not found; {here}", hint=hint)
    names = ", ".join(f"{i} {d['name']!r}" for i, d in matches)
    raise DeviceError(f"{who} {device!r} matches several {direction}s: {names}", hint="use the index or a longer name")


def device_infos(cls_what: str, direction: str) -> list[DeviceInfo]:
    """The devices of one direction for `cp devices`; nothing if PortAudio is missing or fails."""
    try:
        sd = load_sounddevice(cls_what)
    except DeviceError:
        return []
    key = f"max_{direction}_channels"
    try:
        return [
            DeviceInfo(kind=cls_what, device=str(i), name=d["name"],
                       details={"channels": d[key], "default_samplerate": d["default_samplerate"],
                                "hostapi": sd.query_hostapis(d["hostapi"])["name"]})
            for i, d in enumerate(sd.query_devices()) if d[key] > 0
        ]
    except sd.PortAudioError:
        return []


class Throttle:
    """Counts recurring trouble and says when to log it: the first time, then at most every LOG_EVERY_S."""

    def __init__(self) -> None:
        self.count = self._logged = 0
        self._next_s = 0.0

    def add(self, n: int = 1) -> int:
        """Count n more; returns how many to report now (0: stay quiet for the moment)."""
        self.count += n
        now = time.monotonic()
        if self.count == self._logged or now < self._next_s:
            return 0
        news, self._logged, self._next_s = self.count - self._logged, self.count, now + LOG_EVERY_S
        return news
