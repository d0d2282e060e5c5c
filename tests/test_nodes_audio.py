"""Tests of audio_level on real audio blocks, including blocks from test_audio."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from cpcli.node import Clock, Node, NodeContext, NodeError, Sample
from nodes import synthetic
from nodes.audio import AudioLevel

SINE_RMS_DBFS = -3.0103  # 20*log10(1/sqrt(2)): a full-scale sine
T_NS = 5_000_000_000


def started(node: Node) -> Node:
    node.setup(NodeContext(node_id="x", clock=Clock()))
    return node


def level(block: Any, rate_hz: float | None = 48000.0) -> Sample:
    node = started(AudioLevel())
    out = node.step({"mic": Sample(block, t_ns=T_NS, rate_hz=rate_hz)})
    node.teardown()
    node.teardown()
    assert isinstance(out, Sample)
    return out


def sine(amplitude: float = 1.0, frames: int = 4800, channels: int = 1) -> np.ndarray:
    n = np.arange(frames)
    wave = amplitude * np.sin(2 * np.pi * 1000.0 * n / 48000)  # 100 whole periods
    return np.repeat(wave[:, None], channels, axis=1)


def test_full_scale_float_sine_reads_minus_3_dbfs_rms() -> None:
    row = level(sine(1.0).astype(np.float32)).value
    assert row["rms_dbfs"] == pytest.approx(SINE_RMS_DBFS, abs=0.01)
    assert row["peak_dbfs"] == pytest.approx(0.0, abs=0.01)
    assert row["clipped"] is True  # it reaches 1.0


def test_half_scale_sine_reads_6_db_lower_and_does_not_clip() -> None:
    row = level(sine(0.5)).value
    assert row["rms_dbfs"] == pytest.approx(SINE_RMS_DBFS - 6.0206, abs=0.01)
    assert row["peak_dbfs"] == pytest.approx(-6.0206, abs=0.01)
    assert row["clipped"] is False


def test_int16_sine_is_scaled_by_the_int16_full_scale() -> None:
    block = np.rint(sine(32767 / 32768) * 32768).astype(np.int16)
    row = level(block).value
    assert row["rms_dbfs"] == pytest.approx(SINE_RMS_DBFS, abs=0.01)
    assert row["peak_dbfs"] == pytest.approx(0.0, abs=0.01)
    assert row["clipped"] is True  # 32767 is as far as int16 goes


def test_int16_below_full_scale_does_not_clip() -> None:
    block = np.rint(sine(0.25) * 32768).astype(np.int16)
    row = level(block).value
    assert row["rms_dbfs"] == pytest.approx(SINE_RMS_DBFS - 12.04, abs=0.01)
    assert row["clipped"] is False


def test_int16_negative_full_scale_clips_without_overflow() -> None:
    block = np.zeros((100, 2), np.int16)
    block[10, 1] = -32768
    row = level(block).value
    assert row["clipped"] is True
    assert row["peak_dbfs"] == 0.0


def test_int32_blocks_are_scaled_by_their_full_scale() -> None:
    block = np.rint(sine(0.5) * 2**31).astype(np.int32)
    row = level(block).value
    assert row["rms_dbfs"] == pytest.approx(SINE_RMS_DBFS - 6.0206, abs=0.01)
    assert row["clipped"] is False


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16, np.int32])
def test_silence_reads_the_floor_instead_of_minus_infinity(dtype: Any) -> None:
    row = level(np.zeros((1024, 2), dtype)).value
    assert row == {"rms_dbfs": -120.0, "peak_dbfs": -120.0, "clipped": False}


def test_a_whisper_below_the_floor_reads_the_floor() -> None:
    row = level(np.full((64, 1), 1e-9)).value
    assert row["rms_dbfs"] == -120.0 and row["peak_dbfs"] == -120.0


def test_a_float_sample_past_full_scale_clips() -> None:
    block = sine(0.3)
    block[100, 0] = -1.2
    row = level(block).value
    assert row["clipped"] is True
    assert row["peak_dbfs"] == pytest.approx(20 * np.log10(1.2), abs=1e-9)


def test_level_covers_every_channel() -> None:
    block = np.zeros((480, 2), np.float32)
    block[:, 1] = sine(1.0, frames=480)[:, 0]
    row = level(block).value
    assert row["rms_dbfs"] == pytest.approx(SINE_RMS_DBFS - 3.0103, abs=0.01)  # half the power
    assert row["peak_dbfs"] == pytest.approx(0.0, abs=0.01)


def test_one_dimensional_block_is_one_channel() -> None:
    assert level(sine(0.5)[:, 0]).value == level(sine(0.5)).value


def test_level_keeps_capture_time_and_reports_the_block_rate() -> None:
    out = level(sine(0.5, frames=480), rate_hz=48000.0)
    assert out.t_ns == T_NS
    assert out.rate_hz == 100.0
    assert level(sine(0.5), rate_hz=None).rate_hz is None


def test_level_row_is_plain_json_able_scalars() -> None:
    row = level(sine(0.5)).value
    assert list(row) == ["rms_dbfs", "peak_dbfs", "clipped"]
    assert type(row["rms_dbfs"]) is float and type(row["peak_dbfs"]) is float
    assert type(row["clipped"]) is bool


def test_level_of_test_audio_blocks_matches_the_tone() -> None:
    source = started(
        synthetic.TestAudio(
            samplerate=48000, blocksize=4800, frequency_hz=1000.0, amplitude=0.5, channels=2, dtype="int16"
        )
    )
    node = started(AudioLevel())
    for _ in range(3):
        block = source.step({})
        assert isinstance(block, Sample)
        out = node.step({"test_audio": block})
        assert isinstance(out, Sample)
        assert out.t_ns == block.t_ns
        assert out.value["rms_dbfs"] == pytest.approx(SINE_RMS_DBFS - 6.0206, abs=0.01)
        assert out.value["clipped"] is False
    source.teardown()
    node.teardown()


def test_an_empty_block_yields_nothing() -> None:
    node = started(AudioLevel())
    assert node.step({"mic": Sample(np.zeros((0, 1), np.float32))}) is None


@pytest.mark.parametrize(
    "block",
    [
        np.zeros((16, 2, 2), np.float32),
        np.zeros((), np.float32),
        np.zeros((16, 1), np.uint8),
        np.zeros((16, 1), np.complex64),
        np.zeros((16, 1), bool),
        [0.0, 0.1],
        {"rms_dbfs": 0.0},
    ],
    ids=repr,
)
def test_level_rejects_what_is_not_an_audio_block(block: Any) -> None:
    node = started(AudioLevel())
    with pytest.raises(NodeError, match="audio_level node 'x' expects an audio block"):
        node.step({"mic": Sample(block)})


def test_level_error_names_the_shape_and_dtype_received() -> None:
    node = started(AudioLevel())
    with pytest.raises(NodeError, match=r"shape \(16, 2, 2\) and dtype float32"):
        node.step({"mic": Sample(np.zeros((16, 2, 2), np.float32))})


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_level_rejects_non_finite_samples(bad: float) -> None:
    block = np.zeros((16, 1), np.float32)
    block[3] = bad
    node = started(AudioLevel())
    with pytest.raises(NodeError, match="NaN or infinite"):
        node.step({"mic": Sample(block)})


def test_level_rejects_a_wrong_number_of_inputs() -> None:
    node = started(AudioLevel())
    block = Sample(sine(0.5))
    with pytest.raises(NodeError, match="exactly one input, got 2"):
        node.step({"a": block, "b": block})


def test_audio_level_declares_one_input_and_a_level_port() -> None:
    assert AudioLevel.outputs == ("level",)
    assert AudioLevel.input_count == 1
