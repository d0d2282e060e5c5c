"""Node statistics: the latency percentiles a node reports."""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest

from cpcli.runtime.stats import LATENCY_WINDOW, LatencyMeter

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("count", [1, 2, 3, 10, 1000, LATENCY_WINDOW, LATENCY_WINDOW + 500])
def test_latency_percentiles_are_numpys_over_the_window(count: int) -> None:
    rng = random.Random(count)
    values = [rng.randint(0, 50_000_000) for _ in range(count)]
    meter = LatencyMeter()
    for value in values:
        meter.add(value)
    p50, p99 = np.percentile(np.array(values[-LATENCY_WINDOW:]), [50, 99]) / 1e6
    assert meter.percentiles_ms() == {"p50": round(p50, 3), "p99": round(p99, 3)}


def test_no_latency_yet_reports_zero() -> None:
    assert LatencyMeter().percentiles_ms() == {"p50": 0.0, "p99": 0.0}


def test_percentiles_do_not_load_numpy_ma() -> None:
    # np.percentile loads numpy.ma on first use: 0.1 CPU s in every node process, mid-session.
    code = ("import sys; from cpcli.runtime.stats import LatencyMeter; m = LatencyMeter(); "
            "[m.add(i) for i in range(100)]; m.percentiles_ms(); print('numpy.ma' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert out.stdout.strip() == "False"
