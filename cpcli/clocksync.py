"""Estimating a worker's clock against the manager's: NTP-style probes, lowest round trips, a drift fit.

A probe carries four timestamps: t1 (worker sends), t2 (manager receives), t3 (manager answers),
t4 (worker receives); t1 and t4 on the worker's monotonic clock, t2 and t3 on the manager's. Its
round trip is (t4 - t1) - (t3 - t2) and its offset estimate ((t2 - t1) + (t3 - t4)) / 2, wrong by at
most half the round trip (when all the delay was on one side). So of each burst only the probe
with the lowest round trip is kept, and the offset and drift are fitted over a sliding window of
those, weighting short round trips most and rejecting outliers (a probe delayed on one side only).
The uncertainty reported is half the best round trip in the window: a bound, not a guess.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from cpcli.clock import ClockMapping

WINDOW_S = 30.0  # burst minima older than this leave the fit: drift changes with temperature
MIN_FIT_SPAN_S = 2.0  # below this time span a drift fit is noise: offset only
MAX_DRIFT_PPB = 500_000.0  # 500 ppm: far beyond any crystal; a fit above it is rejected
OUTLIER_MADS = 4.0  # residuals beyond this many median absolute deviations leave the fit
HORIZON_S = 1.0  # a mapping serves until the next burst: its uncertainty is bounded over this far ahead


@dataclass(frozen=True)
class Probe:
    t1: int  # local send
    t2: int  # remote receive
    t3: int  # remote send
    t4: int  # local receive

    @property
    def rtt_ns(self) -> int:
        return (self.t4 - self.t1) - (self.t3 - self.t2)

    @property
    def offset_ns(self) -> float:
        """Remote minus local, at the probe's local midpoint."""
        return ((self.t2 - self.t1) + (self.t3 - self.t4)) / 2

    @property
    def mid_ns(self) -> int:
        return (self.t1 + self.t4) // 2

    @property
    def valid(self) -> bool:
        return self.t4 >= self.t1 and self.t3 >= self.t2 and self.rtt_ns >= 0


class OffsetEstimator:
    """Offset and drift of a local clock against a remote one, from bursts of probes."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self._window_ns = int(window_s * 1e9)
        self._points: deque[Probe] = deque()  # the best probe of each burst, oldest first
        self.bursts = 0
        self.rejected = 0  # probes that could not be true (negative round trip, reversed times)

    def add_burst(self, probes: list[Probe]) -> Probe | None:
        """Keep the burst's lowest-round-trip probe; returns it (None when no probe was usable)."""
        usable = [p for p in probes if p.valid]
        self.rejected += len(probes) - len(usable)
        if not usable:
            return None
        best = min(usable, key=lambda p: p.rtt_ns)
        self._points.append(best)
        self.bursts += 1
        while self._points and best.mid_ns - self._points[0].mid_ns > self._window_ns:
            self._points.popleft()
        return best

    @property
    def points(self) -> list[Probe]:
        return list(self._points)

    def estimate(self) -> ClockMapping | None:
        """The current mapping local -> remote, or None before the first burst."""
        points = list(self._points)
        if not points:
            return None
        best_rtt = min(p.rtt_ns for p in points)
        uncertainty = (best_rtt + 1) // 2
        newest = points[-1].mid_ns
        span = newest - points[0].mid_ns
        if len(points) < 3 or span < MIN_FIT_SPAN_S * 1e9:
            best = min(points, key=lambda p: p.rtt_ns)
            return ClockMapping(round(best.offset_ns), uncertainty, 0.0, best.mid_ns)
        fit = _robust_line(points, newest)
        if fit is None:
            best = min(points, key=lambda p: p.rtt_ns)
            return ClockMapping(round(best.offset_ns), uncertainty, 0.0, best.mid_ns)
        intercept, slope, kept = fit
        bound = max(_line_bound(kept, newest, at_s) for at_s in (0.0, HORIZON_S))
        return ClockMapping(round(intercept), max(uncertainty, math.ceil(bound)), slope * 1e9, newest)


def _line_bound(points: list[Probe], ref_ns: int, at_s: float) -> float:
    """Worst error of the weighted fit at ref + at_s: each probe is off by at most half its round trip.

    The fitted value is a linear combination sum(c_i * offset_i) that reproduces any true line exactly,
    so its error is sum(c_i * e_i) with |e_i| <= rtt_i / 2.
    """
    weights = [1.0 / (max(p.rtt_ns, 1_000) ** 2) for p in points]
    xs = [(p.mid_ns - ref_ns) / 1e9 for p in points]
    total = sum(weights)
    mx = sum(w * x for w, x in zip(weights, xs, strict=True)) / total
    sxx = sum(w * (x - mx) ** 2 for w, x in zip(weights, xs, strict=True))
    return sum(abs(w / total + w * (x - mx) * (at_s - mx) / sxx) * p.rtt_ns / 2
               for w, x, p in zip(weights, xs, points, strict=True))


def _robust_line(points: list[Probe], ref_ns: int) -> tuple[float, float, list[Probe]] | None:
    """Weighted least squares of offset against local time (at ref_ns), refitted without outliers."""
    keep = list(points)
    for _ in range(3):  # fit, drop outliers, fit again: converges in two passes in practice
        fit = _weighted_fit(keep, ref_ns)
        if fit is None:
            return None
        intercept, slope = fit
        fitted = keep
        residuals = [abs(p.offset_ns - (intercept + slope * (p.mid_ns - ref_ns))) for p in keep]
        spread = _median(residuals) * 1.4826  # MAD as a standard deviation
        limit = max(OUTLIER_MADS * spread, 2_000.0)  # never tighter than 2 us: probe jitter itself
        inliers = [p for p, r in zip(keep, residuals, strict=True) if r <= limit]
        if len(inliers) == len(keep) or len(inliers) < 3:
            break
        keep = inliers
    if abs(slope) * 1e9 > MAX_DRIFT_PPB:
        return None
    return intercept, slope, fitted


def _weighted_fit(points: list[Probe], ref_ns: int) -> tuple[float, float] | None:
    """Offset = a + b * (t - ref), weights 1/rtt^2: a probe's error bound is half its round trip."""
    weights = [1.0 / (max(p.rtt_ns, 1_000) ** 2) for p in points]
    xs = [(p.mid_ns - ref_ns) / 1e9 for p in points]  # seconds: keeps the sums well conditioned
    ys = [p.offset_ns for p in points]
    total = sum(weights)
    mx = sum(w * x for w, x in zip(weights, xs, strict=True)) / total
    my = sum(w * y for w, y in zip(weights, ys, strict=True)) / total
    sxx = sum(w * (x - mx) ** 2 for w, x in zip(weights, xs, strict=True))
    if sxx <= 0 or not math.isfinite(sxx):
        return None
    sxy = sum(w * (x - mx) * (y - my) for w, x, y in zip(weights, xs, ys, strict=True))
    slope_per_s = sxy / sxx
    intercept = my - slope_per_s * mx
    return intercept, slope_per_s / 1e9


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
