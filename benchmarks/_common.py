"""Helpers shared by the issue-9 benchmarks (shm.py, fanout.py, crosshost.py): not a benchmark.

- `Load`: how busy the machine was during a measurement, split into our own process tree (this
  process and every child it waited for) and everyone else (other engineers' test suites).
- `Netns`: network namespaces created (and always deleted) by a benchmark.
- table rendering, medians and spreads, MET/NOT MET lines, and a SIGTERM handler that turns a
  termination into SystemExit so every `finally` (namespaces, child processes) runs.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
NS_PREFIX = "cpb"  # every namespace and veth we create starts with it, plus our pid


# -- load ------------------------------------------------------------------------------------------


def _proc_stat() -> tuple[int, int]:
    """(total, idle) jiffies of all CPUs since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields[:8]), idle  # user..steal; guest time is already inside user


def _own_cpu_s() -> float:
    """CPU seconds of this process and of every descendant that has been waited for."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _live_children_cpu_s() -> float:
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            t = child.cpu_times()
            total += t.user + t.system
    return total


@dataclass
class LoadSnapshot:
    wall: float
    total: int
    idle: int
    own: float


class Load:
    """Share of the whole machine (all CPUs = 100 %) that was busy between start() and stop()."""

    def __init__(self) -> None:
        self.ncpu = os.cpu_count() or 1
        self._start: LoadSnapshot | None = None

    @staticmethod
    def snapshot() -> LoadSnapshot:
        total, idle = _proc_stat()
        return LoadSnapshot(time.monotonic(), total, idle, _own_cpu_s() + _live_children_cpu_s())

    def start(self) -> Load:
        self._start = self.snapshot()
        return self

    def stop(self) -> dict[str, float]:
        assert self._start is not None
        end = self.snapshot()
        return load_between(self._start, end, self.ncpu)


def load_between(a: LoadSnapshot, b: LoadSnapshot, ncpu: int) -> dict[str, float]:
    total = b.total - a.total
    busy_pct = 100.0 * (total - (b.idle - a.idle)) / total if total > 0 else float("nan")
    wall = max(1e-9, b.wall - a.wall)
    ours_pct = min(100.0, 100.0 * (b.own - a.own) / (wall * ncpu))
    return {"busy_pct": busy_pct, "ours_pct": ours_pct, "others_pct": max(0.0, busy_pct - ours_pct),
            "wall_s": wall}


def background_busy(window_s: float = 1.0) -> float:
    """How busy the machine is right now (before we start), all CPUs = 100 %."""
    load = Load().start()
    time.sleep(window_s)
    return load.stop()["busy_pct"]


def describe_load(label: str, load: dict[str, float]) -> str:
    return (f"{label}: machine {load['busy_pct']:.0f}% busy over {load['wall_s']:.0f} s "
            f"(this benchmark {load['ours_pct']:.0f}%, everything else {load['others_pct']:.0f}%; "
            f"100% = all {os.cpu_count()} CPUs)")


# -- numbers and tables ----------------------------------------------------------------------------


def median(values: Iterable[float]) -> float:
    vals = [v for v in values if v == v]  # drop NaN
    return statistics.median(vals) if vals else float("nan")


def spread(values: Sequence[float], fmt: str = "{:.0f}") -> str:
    vals = [v for v in values if v == v]
    if not vals:
        return "-"
    if len(vals) == 1:
        return fmt.format(vals[0])
    return f"{fmt.format(min(vals))}-{fmt.format(max(vals))}"


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *cells, strict=True)]

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w)
                                 for i, (v, w) in enumerate(zip(values, widths, strict=True))) + " |"

    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells])


def verdict(met: bool, text: str) -> str:
    return f"{'MET    ' if met else 'NOT MET'} {text}"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def begin_run(busy_warning_pct: float = 15.0) -> float:
    """Make SIGTERM clean up like Ctrl-C, and say when the machine is already busy; returns how busy."""
    terminate_on_sigterm()
    busy = background_busy()
    if busy > busy_warning_pct:
        log(f"warning: the machine is {busy:.0f}% busy before we start: results will be noisy")
    return busy


def terminate_on_sigterm() -> None:
    """SIGTERM raises SystemExit in the main thread, so `finally` blocks clean up."""
    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def end_processes(pids: Iterable[int], grace_s: float = 3.0) -> list[int]:
    """SIGTERM, then SIGKILL, the given pids (ours, by pid); returns the ones that needed killing."""
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            proc.terminate()
            procs.append(proc)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace_s)
    return [p.pid for p in alive]


# -- network namespaces ----------------------------------------------------------------------------


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip() or result.returncode}")
    return result


def netns_list() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


class Netns:
    """Namespaces this benchmark creates; `close()` deletes every one of them (call it in finally)."""

    def __init__(self, tag: str) -> None:
        self.tag = f"{NS_PREFIX}{os.getpid()}{tag}"  # unique per benchmark process
        self.names: list[str] = []

    def add(self, suffix: str) -> str:
        name = f"{self.tag}{suffix}"
        _ip("netns", "add", name)
        self.names.append(name)
        _ip("-n", name, "link", "set", "lo", "up")
        return name

    def veth(self, ns_a: str, addr_a: str, ns_b: str, addr_b: str) -> tuple[str, str]:
        """A veth pair joining two of our namespaces, addressed and up."""
        short = f"{NS_PREFIX}{os.getpid() % 100000}"
        a, b = f"{short}a", f"{short}b"  # <= 15 characters, unique per benchmark process
        _ip("link", "add", a, "netns", ns_a, "type", "veth", "peer", "name", b, "netns", ns_b)
        for ns, dev, addr in ((ns_a, a, addr_a), (ns_b, b, addr_b)):
            _ip("-n", ns, "addr", "add", addr, "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
        return a, b

    @staticmethod
    def exec_prefix(name: str) -> list[str]:
        return ["ip", "netns", "exec", name]

    def close(self) -> list[str]:
        """Delete our namespaces (their veths go with them); returns the ones still listed after."""
        for name in reversed(self.names):
            for pid in _ip("netns", "pids", name, check=False).stdout.split():
                log(f"process {pid} still in namespace {name}: ending it")
                end_processes([int(pid)])
            _ip("netns", "del", name, check=False)
        left = [n for n in netns_list() if n in self.names]
        self.names = left
        return left


def wait_quiet(max_wait_s: float, threshold_pct: float = 20.0, window_s: float = 1.0) -> float:
    """Wait (at most max_wait_s) until the machine is below threshold_pct busy; returns the last reading."""
    deadline = time.monotonic() + max_wait_s
    busy = background_busy(window_s)
    while busy > threshold_pct and time.monotonic() < deadline:
        busy = background_busy(window_s)
    return busy


def close_lab(lab: Any) -> str:
    """Delete a benchmark's namespaces; the line saying they are gone (or which are left)."""
    names = list(lab.names)
    left = lab.close()
    still = [n for n in netns_list() if n in names]
    cleanup = (f"namespaces {', '.join(names)} deleted; `ip netns list` shows none of them"
               if not left and not still else f"ERROR: namespaces left behind: {left or still}")
    log(cleanup)
    return cleanup
