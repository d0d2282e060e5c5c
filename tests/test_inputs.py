"""Input policies decide when a node steps and with which samples."""

from __future__ import annotations

import pytest

from cpcli.node import Sample
from cpcli.runtime.inputs import InputSet


def s(t_ms: float, seq: int = 0) -> Sample:
    return Sample(seq, t_ns=int(t_ms * 1e6), seq=seq)


def test_latest_waits_for_every_input_then_steps_on_each_new_sample() -> None:
    inputs = InputSet(["a", "b"])
    inputs.add("a", s(1, 0))
    assert inputs.take() is None and not inputs.ready()
    inputs.add("b", s(2, 0))
    taken = inputs.take()
    assert taken is not None and taken[1] == {"a", "b"}
    assert inputs.take() is None
    inputs.add("a", s(3, 1))
    inputs.add("a", s(4, 2))
    values, fresh = inputs.take()  # type: ignore[misc]
    assert values["a"].seq == 2 and values["b"].seq == 0 and fresh == {"a"}
    assert inputs.skipped == {"a": 1, "b": 0}


def test_all_hands_out_every_sample_in_order_one_per_input() -> None:
    inputs = InputSet(["a"], "all")
    for i in range(5):
        inputs.add("a", s(i, i))
    assert [inputs.take()[0]["a"].seq for _ in range(5)] == [0, 1, 2, 3, 4]  # type: ignore[index]
    assert inputs.take() is None


def test_all_counts_overflow_when_the_node_cannot_keep_up() -> None:
    inputs = InputSet(["a"], "all", queue_limit=3)
    for i in range(5):
        inputs.add("a", s(i, i))
    assert inputs.overflowed == {"a": 2}
    assert inputs.take()[0]["a"].seq == 2  # type: ignore[index]
    assert not inputs.has_room("a") or inputs.pending() < 3


def test_aligned_pairs_samples_within_tolerance_and_skips_the_rest() -> None:
    inputs = InputSet(["fast", "slow"], "aligned", tolerance_ms=5)
    for t in (0, 10, 20, 30, 40):
        inputs.add("fast", s(t, t))
    inputs.add("slow", s(21, 1))
    values, _ = inputs.take()  # type: ignore[misc]
    assert values["fast"].seq == 20 and values["slow"].seq == 1
    assert inputs.skipped == {"fast": 2, "slow": 0}
    inputs.add("slow", s(50, 2))  # nothing within 5 ms of 50 yet
    assert inputs.take() is None
    assert inputs.skipped["fast"] == 4
    inputs.add("fast", s(52, 52))
    values, _ = inputs.take()  # type: ignore[misc]
    assert (values["fast"].seq, values["slow"].seq) == (52, 2)


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError):
        InputSet(["a"], "sometimes")
