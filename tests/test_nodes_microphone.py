"""microphone and speaker through real PortAudio, against a private PulseAudio null sink."""

from __future__ import annotations

import csv
import ctypes
import ctypes.util
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cpcli.node import Clock, DeviceError, NodeConfigError, NodeContext, Sample
from cpcli.recipe import load_recipe
from cpcli.registry import Registry
from cpcli.runtime.session import RunOptions, SessionResult, StopControl, run_session
from cpcli.runtime.timing import Timing
from nodes.microphone import QUEUE_S, Microphone
from nodes.speaker import Speaker
from tests.conftest import ROOT, write_recipe
from tests.pulse import Pulse, dominant_hz, pulse, write_tone

__all__ = ["pulse"]  # the fixture, imported for the tests below

RATE = 48000
BLOCK = 1024
BLOCK_NS = BLOCK * 1_000_000_000 / RATE
UNSHARE = ("unshare", "--mount", "--propagation", "private")  # a mount namespace: what we hide stays hidden there
FAST = Timing(stats_interval_s=0.2, drain_timeout_s=1.0, exit_timeout_s=3.0, ready_timeout_s=20.0)


def context(node_id: str = "mic") -> NodeContext:
    return NodeContext(node_id=node_id, clock=Clock())


def record(mic: Microphone, seconds: float) -> list[Sample]:
    """Step a set-up microphone for `seconds`, keeping what it returns."""
    samples: list[Sample] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        out = mic.step({})
        if out is not None:
            assert isinstance(out, Sample)
            samples.append(out)
    return samples


def loud_span(signal_: np.ndarray, threshold: float) -> tuple[int, int]:
    """First and one-past-last frame whose magnitude exceeds threshold."""
    loud = np.flatnonzero(np.abs(signal_.reshape(len(signal_), -1)[:, 0]) > threshold)
    assert loud.size, "the tone never arrived"
    return int(loud[0]), int(loud[-1]) + 1


def run(recipe_text: str, registry: Registry, tmp_path: Path, duration_s: float) -> SessionResult:
    recipe = load_recipe(write_recipe(tmp_path, recipe_text), registry)
    options = RunOptions(out_dir=tmp_path / "sessions", duration_s=duration_s, timing=FAST, worker="lab")
    return run_session(recipe, registry, options, StopControl())


def read_recording(node_dir: Path) -> tuple[np.ndarray, list[dict[str, str]], int]:
    """The int16 WAV segments of a recorded audio port, joined; its timestamp rows; its sample rate."""
    with open(node_dir / "audio.timestamps.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    parts, rates = [], set()
    for number, path in enumerate(sorted(node_dir.glob("audio-*.wav"))):
        with wave.open(str(path), "rb") as wav:  # the standard library reads what we wrote
            assert wav.getsampwidth() == 2 and wav.getnchannels() == 1
            rates.add(wav.getframerate())
            parts.append(np.frombuffer(wav.readframes(wav.getnframes()), "<i2"))
        mine = [r for r in rows if int(r["segment"]) == number]
        offsets = np.cumsum([0] + [int(r["frames"]) for r in mine])
        assert [int(r["frame_offset"]) for r in mine] == offsets[:-1].tolist(), f"rows misplaced in {path.name}"
        assert offsets[-1] == len(parts[-1]), f"{path.name} and its timestamp rows disagree"
    assert len(rates) == 1
    return np.concatenate(parts), rows, rates.pop()


def test_microphone_records_a_tone_with_adc_timestamps(pulse: Pulse, tmp_path: Path) -> None:
    tone = write_tone(tmp_path / "tone.wav", 1000.0, 1.5)
    mic = Microphone(samplerate=RATE, channels=1, blocksize=BLOCK)
    ctx = context()
    before_ns = ctx.clock.now_ns()
    mic.setup(ctx)
    player = pulse.play(tone)
    try:
        samples = record(mic, 2.4)
    finally:
        player.wait(10)
        mic.teardown()
        mic.teardown()  # harmless twice
    assert player.returncode == 0, player.stderr.read() if player.stderr else ""
    assert all(s.value.shape == (BLOCK, 1) and s.value.dtype == np.float32 for s in samples)
    assert all(s.rate_hz == RATE for s in samples)
    audio = np.concatenate([s.value for s in samples])
    start, end = loud_span(audio, 0.25)
    assert dominant_hz(audio[start:end], RATE) == pytest.approx(1000.0, abs=5.0)
    assert (end - start) / RATE == pytest.approx(1.5, abs=0.05), "the tone's length changed on the way"
    times = np.array([s.t_ns for s in samples], dtype=np.int64)
    steps = np.diff(times)
    assert before_ns < times[0] < ctx.clock.now_ns()
    assert np.all(steps > 0.5 * BLOCK_NS) and np.all(steps < 1.5 * BLOCK_NS), "a gap or a jump in ADC times"
    span_ns = times[-1] - times[0]
    assert span_ns == pytest.approx((len(samples) - 1) * BLOCK_NS, rel=0.01), "timestamps and sample count disagree"
    # Where the tone starts in the blocks and where it starts by the timestamps are the same instant.
    tone_block = start // BLOCK
    tone_t_ns = times[tone_block] + (start - tone_block * BLOCK) * 1e9 / RATE
    assert times[0] < tone_t_ns < times[-1]
    assert mic.overflows == 0 and mic.blocks_dropped == 0
    assert ctx.info["overflows"] == 0 and ctx.info["samplerate"] == RATE


@pytest.mark.parametrize("dtype, full_scale", [("int16", 32768), ("int32", 2**31)])
def test_microphone_delivers_integer_stereo_blocks(pulse: Pulse, tmp_path: Path, dtype: str, full_scale: int
                                                   ) -> None:
    tone = write_tone(tmp_path / "tone.wav", 500.0, 1.0)
    mic = Microphone(samplerate=44100, channels=2, blocksize=441, dtype=dtype, latency="high")
    mic.setup(context())
    player = pulse.play(tone)
    try:
        samples = record(mic, 1.2)
    finally:
        player.wait(10)
        mic.teardown()
    audio = np.concatenate([s.value for s in samples])
    assert audio.dtype == np.dtype(dtype) and audio.shape[1] == 2
    assert np.array_equal(audio[:, 0], audio[:, 1]), "a mono tone reaches both channels alike"
    start, end = loud_span(audio / full_scale, 0.25)
    assert dominant_hz(audio[start:end], 44100) == pytest.approx(500.0, abs=5.0)


def test_recorded_session_keeps_the_tone_and_one_timestamp_row_per_block(
        pulse: Pulse, registry: Registry, tmp_path: Path) -> None:
    player = pulse.play(write_tone(tmp_path / "tone.wav", 1000.0, 8.0))
    try:
        result = run("""
name: mic-tone
nodes:
  mic: {type: microphone, params: {dtype: int16, blocksize: 1024}, record: true}
  level: {type: audio_level, inputs: [mic], sync: all, record: true}
""", registry, tmp_path, duration_s=2.0)
    finally:
        player.kill()
        player.wait(5)
    assert not result.failures and result.manifest["status"] == "complete", result.failures
    node_dir = result.session_dir / "lab" / "mic"
    audio, rows, rate = read_recording(node_dir)
    assert rate == RATE
    assert len(audio) == sum(int(r["frames"]) for r in rows), "WAV frames and timestamp rows disagree"
    assert [int(r["index"]) for r in rows] == list(range(len(rows)))
    assert {int(r["frames"]) for r in rows} == {BLOCK}
    assert len(audio) / RATE == pytest.approx(2.0, abs=0.5)
    start, end = loud_span(audio / 32768, 0.25)
    assert (end - start) / RATE > 1.0
    assert dominant_hz(audio[start:end], RATE) == pytest.approx(1000.0, abs=5.0)
    times = np.array([int(r["t_ns"]) for r in rows], dtype=np.int64)
    assert np.all(np.diff(times) > 0.5 * BLOCK_NS) and np.all(np.diff(times) < 1.5 * BLOCK_NS)
    assert times[-1] - times[0] == pytest.approx((len(rows) - 1) * BLOCK_NS, rel=0.01)
    mic = result.manifest["nodes"]["mic"]
    assert mic["info"]["overflows"] == 0 and mic["info"]["blocks_dropped"] == 0
    assert mic["stats"]["samples_out"] == len(rows)
    with open(result.session_dir / "lab" / "level" / "level.csv", newline="") as fh:
        levels = [float(r["rms_dbfs"]) for r in csv.DictReader(fh)]
    assert len(levels) == len(rows)
    tone_db = 20 * np.log10(0.5 / np.sqrt(2))  # -9.03 dBFS: the tone's amplitude is 0.5
    assert sum(abs(db - tone_db) < 0.5 for db in levels) > len(levels) // 2


def test_speaker_plays_its_input_into_the_sink(pulse: Pulse, registry: Registry, tmp_path: Path) -> None:
    result = run("""
name: feedback
nodes:
  tone: {type: test_audio, params: {frequency_hz: 700, amplitude: 0.5, channels: 1, blocksize: 480}}
  out: {type: speaker, inputs: [tone], sync: all}
  mic: {type: microphone, params: {dtype: int16}, record: true}
""", registry, tmp_path, duration_s=2.5)
    assert not result.failures and result.manifest["status"] == "complete", result.failures
    audio, _, rate = read_recording(result.session_dir / "lab" / "mic")
    start, end = loud_span(audio / 32768, 0.25)
    assert (end - start) / rate > 1.0, "the speaker played less than a second"
    assert dominant_hz(audio[start:end], rate) == pytest.approx(700.0, abs=5.0)
    out = result.manifest["nodes"]["out"]
    assert out["info"]["samplerate"] == RATE and out["info"]["channels"] == 1
    assert out["info"]["blocks_dropped"] == 0 and isinstance(out["info"]["underflows"], int)


def test_speaker_converts_int16_mono_to_the_streams_channels(pulse: Pulse) -> None:
    speaker = Speaker(samplerate=RATE, channels=2)
    speaker.setup(context("out"))
    mic = Microphone(samplerate=RATE, channels=2, blocksize=BLOCK)
    mic.setup(context())
    t = np.arange(RATE // 10) / RATE
    block = (0.5 * 32767 * np.sin(2 * np.pi * 300.0 * t)).astype(np.int16)  # 1-D: mono
    try:
        mic.step({})
        for _ in range(15):  # 1.5 s of audio, faster than real time: the queue holds it
            assert speaker.step({"tone": Sample(block, rate_hz=RATE)}) is None
        samples = record(mic, 1.8)
    finally:
        speaker.teardown()
        speaker.teardown()
        mic.teardown()
    audio = np.concatenate([s.value for s in samples])
    start, end = loud_span(audio, 0.25)
    assert np.allclose(audio[start:end, 0], audio[start:end, 1], atol=1e-3)
    assert dominant_hz(audio[start:end], RATE) == pytest.approx(300.0, abs=5.0)
    assert speaker.blocks_dropped == 0


def test_devices_lists_the_pulse_inputs_and_outputs(pulse: Pulse) -> None:
    inputs, outputs = Microphone.devices(), Speaker.devices()
    assert "default" in {d.name for d in inputs} and "default" in {d.name for d in outputs}
    for info in inputs:
        assert info.kind == "microphone" and info.device.isdigit()
        assert info.details["channels"] > 0 and info.details["default_samplerate"] > 0
        assert info.details["hostapi"] == "ALSA"
    assert {d.kind for d in outputs} == {"speaker"}
    by_name = next(d for d in inputs if d.name == "default")
    mic = Microphone(device=int(by_name.device), blocksize=256)  # what `cp devices` shows opens that device
    ctx = context()
    mic.setup(ctx)
    mic.teardown()
    assert ctx.info["device"] == "default" and ctx.info["device_index"] == int(by_name.device)


def test_unknown_device_names_the_devices_that_are_there(pulse: Pulse) -> None:
    with pytest.raises(DeviceError) as err:
        Microphone(device="Yeti").setup(context())
    assert err.value.message.startswith("microphone 'Yeti' not found; inputs here: ")
    assert "'default'" in err.value.message and "cp devices" in str(err.value)
    with pytest.raises(DeviceError, match="speaker 'Yeti' not found; outputs here: .*'default'"):
        Speaker(device="Yeti").setup(context("out"))
    with pytest.raises(DeviceError, match="microphone 999 is not an input device; inputs here: "):
        Microphone(device=999).setup(context())


def test_unsupported_settings_are_a_device_error_saying_what_the_device_offers(pulse: Pulse) -> None:
    with pytest.raises(DeviceError, match="could not record 64 channel.*offers up to"):
        Microphone(device="default", channels=64, samplerate=RATE).setup(context())


def test_blocks_that_step_had_no_room_for_are_counted_logged_and_leave_a_gap(
        pulse: Pulse, caplog: pytest.LogCaptureFixture) -> None:
    mic = Microphone(blocksize=BLOCK)
    ctx = context()
    mic.setup(ctx)
    try:
        samples = record(mic, 0.2)
        time.sleep(QUEUE_S + 0.6)  # a step that long: the queue holds QUEUE_S of audio, the rest is lost
        with caplog.at_level(logging.WARNING, logger=ctx.logger.name):
            samples += record(mic, 0.5)
            mic.teardown()
    finally:
        mic.teardown()
    assert 10 <= mic.blocks_dropped <= 40 and ctx.info["blocks_dropped"] == mic.blocks_dropped
    assert mic.overflows == 0
    # logged while recording; the callback can lose one more block while the full queue is being drained,
    # so the running count may trail by one, and the summary at teardown always gives the total
    assert re.search(r"\d+ block\(s\) dropped, \d+ in all: step\(\) fell", caplog.text)
    assert f"0 input overflow(s) and {mic.blocks_dropped} dropped block(s) in all" in caplog.text
    steps = np.diff([s.t_ns for s in samples])
    gaps = np.flatnonzero(steps > 1.5 * BLOCK_NS)
    assert len(gaps) == 1, "the lost blocks leave one gap, and nothing else does"
    assert steps[gaps[0]] == pytest.approx((mic.blocks_dropped + 1) * BLOCK_NS, abs=BLOCK_NS / 2)
    assert np.all(np.abs(np.delete(steps, gaps) - BLOCK_NS) < BLOCK_NS / 10)


def test_microphone_that_stops_sending_raises_device_error(pulse: Pulse) -> None:
    mic = Microphone(blocksize=BLOCK)
    mic.setup(context())
    try:
        assert record(mic, 0.3), "no audio before the server was stopped"
        os.kill(pulse.pid, signal.SIGSTOP)  # the sound server freezes: no more blocks
        try:
            deadline = time.monotonic() + 10
            with pytest.raises(DeviceError, match="stopped sending audio"):
                while time.monotonic() < deadline:
                    mic.step({})
        finally:
            os.kill(pulse.pid, signal.SIGCONT)
    finally:
        mic.teardown()


@pytest.mark.parametrize("params, message", [
    ({"samplerate": 0}, "samplerate must be an integer"),
    ({"samplerate": 44100.0}, "samplerate must be an integer"),
    ({"channels": 0}, "channels must be an integer in 1..64"),
    ({"blocksize": -1}, "blocksize"),
    ({"dtype": "float64"}, "dtype must be one of float32, int16, int32"),
    ({"latency": "lowest"}, "latency must be 'low', 'high' or seconds"),
    ({"latency": 0}, "latency must be"),
    ({"device": -1}, "device must be an index"),
    ({"device": ""}, "device must be an index"),
    ({"device": True}, "device must be an index"),
])
def test_bad_microphone_params_are_rejected_before_any_device_is_touched(params: dict[str, Any], message: str
                                                                         ) -> None:
    with pytest.raises(NodeConfigError, match=message):
        Microphone(**params)


@pytest.mark.parametrize("params, message", [
    ({"samplerate": -1}, "samplerate"),
    ({"channels": 65}, "channels"),
    ({"latency": "none"}, "latency"),
])
def test_bad_speaker_params_are_rejected(params: dict[str, Any], message: str) -> None:
    with pytest.raises(NodeConfigError, match=message):
        Speaker(**params)


def test_nodes_load_without_sounddevice_and_say_what_to_install_when_portaudio_is_missing(tmp_path: Path) -> None:
    """Hide the PortAudio library in a private mount namespace (root only), as on a machine without it."""
    name = ctypes.util.find_library("portaudio")  # as sounddevice finds it; loading it initializes nothing
    if name is not None:
        ctypes.CDLL(name)  # so its file shows in our memory map
    library = next((line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
                    if "libportaudio" in line), None)
    if library is None or os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root, unshare and a loaded libportaudio to hide it")
    probe = subprocess.run([*UNSHARE, "true"], capture_output=True, text=True, timeout=10)
    if probe.returncode:
        pytest.skip(f"cannot make a private mount namespace here: {probe.stderr.strip()}")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    script = """
import sys
from cpcli.node import Clock, DeviceError, NodeContext
from nodes.microphone import QUEUE_S, Microphone
from nodes.speaker import Speaker
assert "sounddevice" not in sys.modules, "importing the node module loaded sounddevice"
assert Microphone.devices() == [] and Speaker.devices() == []
for node in (Microphone(), Speaker()):
    try:
        node.setup(NodeContext(node_id="x", clock=Clock()))
    except DeviceError as err:
        print(err)
"""
    hide = f"mount --bind {empty} {library} && exec {sys.executable} -c '{script}'"
    done = subprocess.run([*UNSHARE, "sh", "-c", hide], cwd=ROOT, capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2, done.stdout
    assert lines[0].startswith("microphone needs the PortAudio library, which could not be loaded")
    assert lines[1].startswith("speaker needs the PortAudio library")
    assert all("apt install libportaudio2" in line for line in lines)
