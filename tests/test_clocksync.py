"""The clock estimator's maths on synthetic probes with a known offset, drift, jitter and outliers."""

from __future__ import annotations

import random

import pytest

from cpcli.clock import ClockMapping
from cpcli.clocksync import OffsetEstimator, Probe

OFFSET_NS = 1_000_000_000_000  # the worker runs 1000 s behind the manager
BASE_RTT_NS = 80_000  # 80 us: a quiet LAN


def _probe(local_send: int, offset: float, drift_ppb: float, out_ns: int, back_ns: int, turn_ns: int = 20_000
           ) -> Probe:
    """A probe through a path of known delays: remote = local + offset + drift * local."""
    def remote(local: int) -> int:
        return round(local + offset + drift_ppb * local / 1e9)

    t1 = local_send
    t2 = remote(t1 + out_ns)
    t3 = t2 + turn_ns
    t4 = t1 + out_ns + round(turn_ns * (1 - drift_ppb / 1e9)) + back_ns
    return Probe(t1, t2, t3, t4)


def _run(estimator: OffsetEstimator, seconds: int, drift_ppb: float, rng: random.Random, burst: int = 8,
         outliers: float = 0.0) -> None:
    for second in range(seconds):
        probes = []
        for i in range(burst):
            out = back = BASE_RTT_NS // 2
            out += int(rng.expovariate(1 / 15_000))  # queueing jitter, one-sided by nature
            back += int(rng.expovariate(1 / 15_000))
            if rng.random() < outliers:  # a probe delayed on one side only (a busy manager, a retransmit)
                out += rng.randrange(1_000_000, 20_000_000)
            probes.append(_probe(second * 1_000_000_000 + i * 1_000_000, OFFSET_NS, drift_ppb, out, back))
        estimator.add_burst(probes)


def _error_ns(mapping: ClockMapping, local_ns: int, drift_ppb: float) -> float:
    truth = local_ns + OFFSET_NS + drift_ppb * local_ns / 1e9
    return mapping.to_cluster_ns(local_ns) - truth


def test_one_symmetric_probe_gives_the_offset_exactly() -> None:
    estimator = OffsetEstimator()
    estimator.add_burst([_probe(5_000_000, OFFSET_NS, 0.0, 40_000, 40_000)])
    mapping = estimator.estimate()
    assert mapping is not None
    assert mapping.offset_ns == OFFSET_NS and mapping.uncertainty_ns == 40_000 and mapping.drift_ppb == 0.0


def test_asymmetry_error_stays_within_the_reported_uncertainty() -> None:
    estimator = OffsetEstimator()
    estimator.add_burst([_probe(0, OFFSET_NS, 0.0, 10_000, 150_000)])  # all the delay on the way back
    mapping = estimator.estimate()
    assert mapping is not None
    assert abs(_error_ns(mapping, 0, 0.0)) <= mapping.uncertainty_ns


def test_the_lowest_round_trip_of_a_burst_is_kept() -> None:
    estimator = OffsetEstimator()
    best = estimator.add_burst([_probe(0, OFFSET_NS, 0.0, 5_000_000, 40_000),
                                _probe(1_000_000, OFFSET_NS, 0.0, 40_000, 40_000),
                                _probe(2_000_000, OFFSET_NS, 0.0, 40_000, 3_000_000)])
    assert best is not None and best.t1 == 1_000_000


@pytest.mark.parametrize("drift_ppb", [0.0, 20_000.0, -50_000.0])  # 0, +20 ppm, -50 ppm: laptop crystals
def test_offset_and_drift_with_jitter(drift_ppb: float) -> None:
    estimator = OffsetEstimator()
    _run(estimator, 30, drift_ppb, random.Random(1))
    mapping = estimator.estimate()
    assert mapping is not None
    assert abs(mapping.drift_ppb - drift_ppb) < 1_000  # within 1 ppm
    for local in (25_000_000_000, 29_000_000_000, 31_000_000_000):  # inside the window and just past it
        assert abs(_error_ns(mapping, local, drift_ppb)) < 20_000  # 20 us with 15 us jitter per direction
    assert mapping.uncertainty_ns <= BASE_RTT_NS


def test_asymmetric_outliers_do_not_bend_the_fit() -> None:
    clean, noisy = OffsetEstimator(), OffsetEstimator()
    _run(clean, 30, 10_000.0, random.Random(2))
    _run(noisy, 30, 10_000.0, random.Random(2), burst=2, outliers=0.6)  # most bursts hold a delayed probe
    mapping = noisy.estimate()
    assert mapping is not None
    assert abs(_error_ns(mapping, 29_500_000_000, 10_000.0)) < 50_000
    assert abs(mapping.drift_ppb - 10_000.0) < 5_000


def test_impossible_probes_are_rejected() -> None:
    estimator = OffsetEstimator()
    assert estimator.add_burst([Probe(10, 5, 4, 20), Probe(10, 5, 6, 8)]) is None
    assert estimator.rejected == 2 and estimator.estimate() is None


def test_the_window_forgets_old_bursts() -> None:
    estimator = OffsetEstimator(window_s=5)
    _run(estimator, 20, 0.0, random.Random(3))
    assert len(estimator.points) <= 6


def test_mapping_round_trips_and_serializes() -> None:
    mapping = ClockMapping(OFFSET_NS, 30_000, 25_000.0, 7_000_000_000)
    for local in (0, 7_000_000_000, 3_600_000_000_000):
        assert abs(mapping.to_local_ns(mapping.to_cluster_ns(local)) - local) <= 1
    assert ClockMapping.from_dict(mapping.to_dict()) == mapping


def test_clock_warnings_name_the_worker_and_its_uncertainty() -> None:
    from cpcli.cluster.session_record import clock_warnings

    workers = {"lab-02": {"finished": True, "clock": {"measured": True, "max_uncertainty_ns": 2_500_000}},
               "lab-03": {"finished": True, "clock": {"measured": True, "max_uncertainty_ns": 40_000}},
               "lab-04": {"finished": True, "clock": {"measured": False}}}
    assert clock_warnings(workers) == [
        "worker lab-02: clock uncertainty reached 2.50 ms (above 1 ms): its timestamps may be off by that much",
        "worker lab-04: its clock was never aligned to the manager's"]
    assert clock_warnings(workers, threshold_ns=5_000_000) == [
        "worker lab-04: its clock was never aligned to the manager's"]
