"""Tests of the synthetic sources test_video and test_audio, stepped directly."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from cpcli.node import Clock, Node, NodeConfigError, NodeContext, Sample
from nodes import synthetic

NS_PER_S = 1_000_000_000


def started(node: Node, clock: Clock | None = None) -> Node:
    node.setup(NodeContext(node_id="x", clock=clock or Clock()))
    return node


def step(node: Node) -> Sample:
    out = node.step({})
    assert isinstance(out, Sample)
    return out


def stamp(sample: Sample) -> int:
    assert isinstance(sample.t_ns, int)
    return sample.t_ns


def horizontal_shift(before: np.ndarray, after: np.ndarray) -> int:
    """How many pixels to the right `after` shows `before`'s pattern, judged below the number."""
    rows = slice(before.shape[0] // 2, None)
    for shift in range(1, before.shape[1]):
        if np.array_equal(np.roll(before, shift, axis=1)[rows], after[rows]):
            return shift
    return 0


# --- test_video ---------------------------------------------------------------------------------


def test_test_video_frames_are_bgr_uint8_of_the_configured_size() -> None:
    node = started(synthetic.TestVideo(width=320, height=240))
    sample = step(node)
    assert sample.value.shape == (240, 320, 3)
    assert sample.value.dtype == np.uint8
    assert sample.rate_hz == 30.0
    node.teardown()


def test_test_video_stamps_each_frame_with_the_clock_at_capture() -> None:
    clock = Clock()
    node = started(synthetic.TestVideo(width=64, height=48), clock)
    before = clock.now_ns()
    stamps = [stamp(step(node)) for _ in range(5)]
    after = clock.now_ns()
    assert before <= stamps[0] and stamps == sorted(stamps) and stamps[-1] <= after
    node.teardown()


def test_test_video_rate_hz_comes_from_the_param_and_zero_means_unpaced() -> None:
    assert synthetic.TestVideo(rate_hz=12.5).rate_hz == 12.5
    node = started(synthetic.TestVideo(width=64, height=48, rate_hz=0))
    assert node.rate_hz == 0
    assert step(node).rate_hz is None
    node.teardown()


def test_test_video_pattern_moves_right_every_frame() -> None:
    node = started(synthetic.TestVideo(width=320, height=240))
    frames = [step(node).value for _ in range(4)]
    shifts = [horizontal_shift(a, b) for a, b in zip(frames, frames[1:], strict=False)]
    assert shifts[0] > 0
    assert shifts == [shifts[0]] * 3  # steady motion
    node.teardown()


def test_test_video_draws_the_frame_number_so_frames_differ_in_the_corner() -> None:
    node = started(synthetic.TestVideo(width=320, height=240))
    first, second = step(node).value, step(node).value
    corner = (slice(0, 30), slice(0, 60))
    assert (first[corner] == 255).all(axis=2).any()  # white digits ...
    assert (first[corner] == 0).all(axis=2).any()  # ... on black
    assert not np.array_equal(first[corner], second[corner])
    node.teardown()


def test_test_video_returns_a_fresh_array_each_frame() -> None:
    node = started(synthetic.TestVideo(width=64, height=48))
    first = step(node).value
    kept = first.copy()
    second = step(node).value
    assert first is not second and not np.shares_memory(first, second)
    second[:] = 7  # a consumer scribbling on its frame changes nothing else
    assert np.array_equal(first, kept)
    assert not np.array_equal(step(node).value, second)
    node.teardown()


def test_test_video_precomputed_cycles_through_frames_drawn_in_setup() -> None:
    node = started(synthetic.TestVideo(width=64, height=48, precomputed=3))
    frames = [step(node).value for _ in range(7)]
    assert frames[3] is frames[0] and frames[4] is frames[1] and frames[6] is frames[0]
    assert not np.array_equal(frames[0], frames[1]) and not np.array_equal(frames[1], frames[2])
    assert not frames[0].flags.writeable  # shared frames cannot be changed by a consumer
    node.teardown()


def test_test_video_precomputed_frames_match_live_frames() -> None:
    cached = started(synthetic.TestVideo(width=64, height=48, precomputed=2))
    live = started(synthetic.TestVideo(width=64, height=48))
    for _ in range(2):
        assert np.array_equal(step(cached).value, step(live).value)
    cached.teardown()
    live.teardown()


def test_test_video_teardown_twice_is_harmless() -> None:
    node = started(synthetic.TestVideo(width=64, height=48, precomputed=2))
    node.teardown()
    node.teardown()


def test_test_video_smallest_and_odd_sizes_work() -> None:
    for width, height in [(16, 16), (17, 31), (1000, 16)]:
        node = started(synthetic.TestVideo(width=width, height=height))
        assert step(node).value.shape == (height, width, 3)
        assert step(node).value.shape == (height, width, 3)
        node.teardown()


@pytest.mark.parametrize(
    "params",
    [
        {"width": 15},
        {"width": 7681},
        {"height": 15},
        {"height": 4321},
        {"width": 64.0},
        {"width": True},
        {"height": "480"},
        {"rate_hz": -1.0},
        {"rate_hz": math.inf},
        {"rate_hz": math.nan},
        {"rate_hz": "30"},
        {"precomputed": -1},
        {"precomputed": 1.5},
        {"width": 7680, "height": 4320, "precomputed": 100},  # 9.3 GiB of frames
        {"precomputed": 8, "copy": "yes"},
        {"copy": True},  # copies precomputed frames: none asked for
    ],
)
def test_test_video_rejects_bad_params(params: dict[str, Any]) -> None:
    with pytest.raises(NodeConfigError, match="test_video"):
        synthetic.TestVideo(**params)


def test_test_video_is_a_source_with_one_video_port() -> None:
    assert synthetic.TestVideo.outputs == ("video",)
    assert synthetic.TestVideo.input_count == 0
    assert synthetic.TestVideo.__doc__ and synthetic.TestVideo.__doc__.splitlines()[0].strip()


# --- test_audio ---------------------------------------------------------------------------------


def test_test_audio_blocks_have_the_configured_shape_dtype_and_rate() -> None:
    node = started(synthetic.TestAudio(samplerate=16000, channels=2, blocksize=160))
    assert node.rate_hz == 100.0
    sample = step(node)
    assert sample.value.shape == (160, 2)
    assert sample.value.dtype == np.float32
    assert sample.rate_hz == 16000
    node.teardown()


def test_test_audio_sine_is_continuous_across_blocks() -> None:
    samplerate, blocksize, frequency, amplitude = 44100, 441, 997.0, 0.8
    node = started(
        synthetic.TestAudio(
            samplerate=samplerate, blocksize=blocksize, frequency_hz=frequency, amplitude=amplitude
        )
    )
    signal = np.concatenate([step(node).value[:, 0] for _ in range(50)])
    n = np.arange(signal.size)
    reference = amplitude * np.sin(2 * np.pi * frequency * n / samplerate)
    np.testing.assert_allclose(signal, reference, rtol=0, atol=1e-6)
    node.teardown()


def test_test_audio_channels_carry_the_same_tone() -> None:
    node = started(synthetic.TestAudio(channels=3, blocksize=256))
    block = step(node).value
    assert np.array_equal(block[:, 0], block[:, 1]) and np.array_equal(block[:, 0], block[:, 2])
    assert np.abs(block).max() > 0.4
    node.teardown()


def test_test_audio_stamps_follow_an_ideal_sound_card_clock_exactly() -> None:
    samplerate, blocksize = 44100, 1000  # a block lasts 22675736.96 ns: not a whole number
    clock = Clock()
    node = started(synthetic.TestAudio(samplerate=samplerate, blocksize=blocksize), clock)
    block_ns = blocksize * NS_PER_S // samplerate
    before = clock.now_ns()
    stamps = [stamp(step(node)) for _ in range(201)]
    after = clock.now_ns()
    t0 = stamps[0]
    assert before - block_ns <= t0 <= after - block_ns  # the first block ended at the first step
    for index, t_ns in enumerate(stamps):
        assert t_ns == t0 + index * blocksize * NS_PER_S // samplerate
    assert stamps[200] - t0 == 4_535_147_392  # 200 blocks = 200000 frames, no rounding drift
    node.teardown()


def test_test_audio_int16_is_scaled_to_full_scale() -> None:
    node = started(
        synthetic.TestAudio(
            samplerate=48000, blocksize=4800, frequency_hz=1000.0, amplitude=1.0, dtype="int16"
        )
    )
    block = step(node).value
    assert block.dtype == np.int16 and block.shape == (4800, 1)
    assert block.max() == 32767 and block.min() == -32767
    n = np.arange(4800)
    reference = np.rint(32767 * np.sin(2 * np.pi * 1000.0 * n / 48000))
    assert np.abs(block[:, 0].astype(np.int64) - reference).max() <= 1
    node.teardown()


def test_test_audio_returns_a_fresh_block_each_step() -> None:
    node = started(synthetic.TestAudio(blocksize=64))
    first = step(node).value
    second = step(node).value
    assert not np.shares_memory(first, second)
    node.teardown()
    node.teardown()


@pytest.mark.parametrize(
    "params",
    [
        {"samplerate": 0},
        {"samplerate": 48000.0},
        {"channels": 0},
        {"channels": 65},
        {"blocksize": 0},
        {"blocksize": 2**21},
        {"frequency_hz": 0.0},
        {"frequency_hz": -440.0},
        {"frequency_hz": 24000.0},  # Nyquist at 48 kHz
        {"samplerate": 8000, "frequency_hz": 5000.0},
        {"frequency_hz": math.nan},
        {"amplitude": -0.1},
        {"amplitude": 1.5},
        {"amplitude": math.nan},
        {"dtype": "float64"},
        {"dtype": "int32"},
    ],
)
def test_test_audio_rejects_bad_params(params: dict[str, Any]) -> None:
    with pytest.raises(NodeConfigError, match="test_audio"):
        synthetic.TestAudio(**params)


def test_test_audio_is_a_source_with_one_audio_port() -> None:
    assert synthetic.TestAudio.outputs == ("audio",)
    assert synthetic.TestAudio.input_count == 0
