"""Monitor cost (issue 6): a 16-node session on 2 workers, with and without `cp monitor` attached, in one run.

Run as root, as a plain script (not a pytest test):

    python benchmarks/monitor.py                 # about 1 min 40 s
    python benchmarks/monitor.py --quick         # 6 s windows: about 1 min
    python benchmarks/monitor.py --json
    python benchmarks/monitor.py --width 320 --height 240   # a smaller load

The lab is `tests/lab.py`'s `Lab` (network namespaces on one bridge, 198.18.0.0/24; nothing leaves
them) and `tests/cluster.py`'s `ClusterLab`: host 1 runs `cp manager --no-local-worker`, hosts 2
and 3 one `cp worker` each, host 4 is the experimenter's laptop running `cp monitor` in a pseudo
terminal of 120 x 40 (its output read and thrown away, as a terminal would draw it).

Recipe, per worker X (Y = the other): `cam_X1`, `cam_X2` (test_video WxH at FPS, 8 precomputed
frames), `view_X1`, `view_X2` (discard, one per camera, same host: shared memory), `remote_X`
(discard of `cam_Y1`: across hosts, TCP), `small_X` (resize of `cam_X2` to 160x120, recorded),
`tone_X` (test_audio 48 kHz, 1024-sample blocks) and `level_X` (audio_level, recorded): 8 nodes,
16 in all, 4 of them 640x480 cameras at 30 frames/s. The 640x480 streams are not recorded: four
MP4 encoders at 640x480@30 do not fit two vCPUs beside everything else; the data plane is what
the issue asks about.

One session, four windows of `--window` seconds, in this order: A no monitor; B `cp monitor`
attached (refresh 4 Hz, previews on, started `--settle` seconds before the window); C the same
monitor with previews off (`p`: it unsubscribes, the nodes stop making them); D no monitor (`q`).
Attached (B) is compared with the mean of A and D, so a drift of the machine over the run cancels.

- frames/s: sum of `samples_in` of the 8 consumers of the cameras (expected 8 x FPS), slope of a
  least-squares fit over a status poll every 0.5 s (a helper on host 1 calls `cluster_status`
  twice a second in every window, so its cost is in all four alike). The nodes report every 0.5 s,
  so a poll sees counts up to about 1 s old: over 20 s that leaves about +-1 % of noise in this
  figure. The sources' frames/s are exact (their meters give the time of their last frame:
  (count - 1) / rate_hz after the first), and so are the two `resize` consumers' (one output per
  frame they take: expected 2 x FPS). Drops: growth of
  `dropped_in` + `dropped_out` + `source_lost` + `record_dropped` of all nodes over the window
  (`skipped_in` under `sync: latest` is by policy and shown apart).
- CPU: user+system time of the manager process, of the monitor process (all threads) and of all
  node processes (children of the workers), from /proc, as % of one core.
- traffic: bytes received on host 4's eth0 (`ip -s link`), i.e. status replies + previews +
  TCP; preview traffic = B - C (the same monitor with previews off).
- others busy %: the machine used by everything that is not this benchmark's process tree during
  the window (all CPUs = 100 %). The 2 vCPUs are shared: a window with others busy is disturbed
  (sources fall behind their rate, consumers skip) whatever the monitor does.

Targets (issue 6): frames/s and drops unchanged within 2 %, manager CPU + <= 5 % of a core,
monitor <= 15 % of a core at 4 Hz, previews <= 100 KB/s.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import pty
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import _common as c
import psutil

sys.path.insert(0, str(c.REPO))  # tests/ is not a package on the path when run as a script
from tests.cluster import PORT, ClusterLab, Proc  # noqa: E402
from tests.lab import Lab  # noqa: E402

TARGET_FPS_DIFF_PCT = 2.0
TARGET_MANAGER_PCT = 5.0
TARGET_MONITOR_PCT = 15.0
TARGET_PREVIEW_KBPS = 100.0
POLL_S = 0.5  # the helper's status poll, in every window: as often as the nodes report
COLS, ROWS = 120, 40
CONSUMERS = ("view_a1", "view_a2", "remote_a", "small_a", "view_b1", "view_b2", "remote_b", "small_b")

POLLER = """
import json, sys, time
from cpcli.cluster.client import cluster_status
from cpcli.cluster.locate import locate
from cpcli.cluster.timing import ClusterTiming
address, period = sys.argv[1], float(sys.argv[2])
timing, next_t = ClusterTiming(), time.monotonic()
credentials = locate(address, None, None, 1.0, required=True).credentials(None)  # the manager's keys on its host
while True:
    try:
        session = cluster_status(address, timing, credentials).get("session") or {}
    except Exception as err:  # noqa: BLE001 - a benchmark helper: say it and go on
        print(json.dumps({"t": time.monotonic(), "error": str(err)}), flush=True)
        session = {}
    nodes = {}
    for node, data in (session.get("nodes") or {}).items():
        s = data.get("stats") or {}
        lost = sum((s.get("dropped_in") or {}).values()) + s.get("dropped_out", 0) + s.get("source_lost", 0) \\
            + s.get("record_dropped", 0)
        nodes[node] = [s.get("samples_out", 0), sum((s.get("samples_in") or {}).values()), lost,
                       sum((s.get("skipped_in") or {}).values()), s.get("rate_hz", 0.0)]
    print(json.dumps({"t": time.monotonic(), "nodes": nodes}), flush=True)
    next_t += period
    time.sleep(max(0.0, next_t - time.monotonic()))
"""


def recipe(width: int, height: int, fps: float) -> str:
    lines = ["name: monitor-bench", "nodes:"]
    for x, y in (("a", "b"), ("b", "a")):
        video = f"{{width: {width}, height: {height}, rate_hz: {fps:g}, precomputed: 8}}"
        lines += [
            f"  cam_{x}1: {{type: test_video, worker: w{x}, params: {video}}}",
            f"  cam_{x}2: {{type: test_video, worker: w{x}, params: {video}}}",
            f"  view_{x}1: {{type: discard, worker: w{x}, inputs: [cam_{x}1]}}",
            f"  view_{x}2: {{type: discard, worker: w{x}, inputs: [cam_{x}2]}}",
            f"  remote_{x}: {{type: discard, worker: w{x}, inputs: [cam_{y}1]}}",
            f"  small_{x}: {{type: resize, worker: w{x}, inputs: [cam_{x}2], params: {{width: 160, height: 120}},"
            " record: true}",
            f"  tone_{x}: {{type: test_audio, worker: w{x}, params: {{samplerate: 48000, blocksize: 1024}}}}",
            f"  level_{x}: {{type: audio_level, worker: w{x}, inputs: [tone_{x}], record: true}}",
        ]
    return "\n".join(lines) + "\n"


# -- readers -----------------------------------------------------------------------------------------


class Lines:
    """Every JSON line a helper process prints, kept with nothing else (a thread reads its stdout)."""

    def __init__(self, popen: subprocess.Popen[str]) -> None:
        self.rows: list[dict[str, Any]] = []
        self._popen = popen
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._popen.stdout is not None
        for line in self._popen.stdout:
            with contextlib.suppress(ValueError):
                self.rows.append(json.loads(line))

    def join(self) -> None:
        self._thread.join(5)


class Terminal:
    """A pseudo terminal of COLS x ROWS whose output is read and dropped, like a screen would show it."""

    def __init__(self) -> None:
        self.master, self.slave = pty.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
        self.bytes_out = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._stop.is_set():
            if select.select([self.master], [], [], 0.2)[0]:
                try:
                    self.bytes_out += len(os.read(self.master, 65536))
                except OSError:  # the other end is closed
                    return

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)


def cpu_s(pid: int) -> float:
    with contextlib.suppress(psutil.Error):
        t = psutil.Process(pid).cpu_times()
        return float(t.user + t.system)
    return float("nan")


def tree_cpu_s(pids: list[int]) -> float:
    """CPU seconds of the children (node processes) of the given processes."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    t = child.cpu_times()
                    total += t.user + t.system
    return total


def rx_bytes(netns: str) -> int:
    out = subprocess.run(["ip", "-n", netns, "-s", "-j", "link", "show", "eth0"], capture_output=True, text=True,
                         timeout=10, check=True).stdout
    return int(json.loads(out)[0]["stats64"]["rx"]["bytes"])


# -- windows ------------------------------------------------------------------------------------------


@dataclass
class Window:
    name: str
    start: float
    end: float
    manager_cpu_pct: float
    nodes_cpu_pct: float
    monitor_cpu_pct: float | None
    rx_kbps: float | None
    terminal_kbps: float | None
    fps: float = float("nan")
    sources_fps: float = float("nan")
    resize_fps: float = float("nan")  # the two `small_X` consumers, exactly (their own meters)
    per_consumer: dict[str, float] | None = None  # each consumer's fitted frames/s
    others_pct: float = float("nan")  # the machine used by everything else (other people's work), all CPUs = 100
    lost: int = 0
    skipped: int = 0


def measure(name: str, seconds: float, manager: Proc, workers: list[Proc], monitor: subprocess.Popen[Any] | None,
            terminal: Terminal | None, netns: str) -> Window:
    load = c.Load().start()
    start = time.monotonic()
    m0, n0 = cpu_s(manager.pid), tree_cpu_s([w.pid for w in workers])
    mon0 = cpu_s(monitor.pid) if monitor else 0.0
    rx0, out0 = rx_bytes(netns), terminal.bytes_out if terminal else 0
    time.sleep(seconds)
    end = time.monotonic()
    wall = end - start
    window = Window(name, start, end, 100 * (cpu_s(manager.pid) - m0) / wall,
                    100 * (tree_cpu_s([w.pid for w in workers]) - n0) / wall,
                    100 * (cpu_s(monitor.pid) - mon0) / wall if monitor else None,
                    (rx_bytes(netns) - rx0) / wall / 1000 if monitor else None,
                    (terminal.bytes_out - out0) / wall / 1000 if terminal else None)
    window.others_pct = load.stop()["others_pct"]
    return window


def _slope(points: list[tuple[float, float]]) -> float:
    n = len(points)
    if n < 2:
        return float("nan")
    mt, mv = sum(t for t, _ in points) / n, sum(v for _, v in points) / n
    den = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (v - mv) for t, v in points) / den if den else float("nan")


def _source_rate(first: list[float], last: list[float]) -> float:
    """Outputs/s of a node between two reports, exactly: its meter gives the time of its last step,
    (count - 1) / rate_hz after its first (a source, or a consumer that outputs once per input)."""
    (n0, r0), (n1, r1) = (first[0], first[4]), (last[0], last[4])
    if not (r0 > 0 and r1 > 0 and n1 > n0 > 1):
        return float("nan")
    return (n1 - n0) / ((n1 - 1) / r1 - (n0 - 1) / r0)


def fill(window: Window, rows: list[dict[str, Any]]) -> None:
    """Frames/s (fit) and drops of the window from the status polls taken during it."""
    inside = [r for r in rows if window.start <= r["t"] <= window.end and r.get("nodes")]
    if len(inside) < 2:
        return

    def total(row: dict[str, Any], nodes: tuple[str, ...] | None, field: int) -> float:
        return float(sum(v[field] for k, v in row["nodes"].items() if nodes is None or k in nodes))

    cams = [n for n in inside[0]["nodes"] if n.startswith("cam_")]
    window.fps = _slope([(r["t"], total(r, CONSUMERS, 1)) for r in inside])
    window.per_consumer = {n: round(_slope([(r["t"], total(r, (n,), 1)) for r in inside]), 2) for n in CONSUMERS}
    window.sources_fps = sum(_source_rate(inside[0]["nodes"][n], inside[-1]["nodes"][n]) for n in cams)
    window.resize_fps = sum(_source_rate(inside[0]["nodes"][n], inside[-1]["nodes"][n]) for n in ("small_a", "small_b"))
    window.lost = int(total(inside[-1], None, 2) - total(inside[0], None, 2))
    window.skipped = int(total(inside[-1], None, 3) - total(inside[0], None, 3))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from throughput import code_version, machine  # the sibling script: the same provenance lines

    busy = c.begin_run()
    code = code_version()
    work = Path(tempfile.mkdtemp(prefix="cpcli-bench-monitor-"))
    windows: list[Window] = []
    try:
        with Lab(hosts=4) as lab:
            cluster = ClusterLab(lab, work)
            address = f"{lab.ip(1)}:{PORT}"
            manager = cluster.manager(1, "m1", "--no-local-worker")
            workers = [cluster.worker(2, "wa", "--manager", address), cluster.worker(3, "wb", "--manager", address)]
            path = cluster.recipe(recipe(args.width, args.height, args.fps))
            cluster.start(1, ["run", str(path), "--manager", address], "run")
            for w in workers:
                w.wait_for(": recording", 60)
            poller = lab.python(1, POLLER, [address, str(POLL_S)], stdout=subprocess.PIPE, text=True,
                                env=cluster.env)
            polls = Lines(poller)
            time.sleep(args.settle)
            netns = lab.host(4).netns
            c.log(f"window A: no monitor ({args.window:g} s)")
            windows.append(measure("A no monitor", args.window, manager, workers, None, None, netns))
            terminal = Terminal()
            env = {k: v for k, v in cluster.env.items() if k not in ("COLUMNS", "LINES")}
            env.update(TERM="xterm-256color", COLORTERM="truecolor")
            monitor = lab.run(4, [sys.executable, "-m", "cpcli", "monitor", "--manager", address, "--refresh-hz",
                                  str(args.refresh_hz)], stdin=terminal.slave, stdout=terminal.slave,
                              stderr=terminal.slave, env=env, cwd=work)
            try:
                time.sleep(args.settle)
                c.log(f"window B: cp monitor attached, previews on ({args.window:g} s)")
                windows.append(measure("B monitor", args.window, manager, workers, monitor, terminal, netns))
                terminal.type(b"p")
                time.sleep(args.settle / 2)
                c.log(f"window C: cp monitor attached, previews off ({args.window:g} s)")
                windows.append(measure("C previews off", args.window, manager, workers, monitor, terminal, netns))
                terminal.type(b"q")
                exit_code = monitor.wait(10)
                if exit_code != 0:
                    c.log(f"warning: cp monitor exited with {exit_code}")
            finally:
                if monitor.poll() is None:
                    monitor.kill()
                    monitor.wait(5)
                terminal.close()
            time.sleep(args.settle / 2)
            c.log(f"window D: no monitor ({args.window:g} s)")
            windows.append(measure("D no monitor", args.window, manager, workers, None, None, netns))
            poller.kill()
            poller.wait(5)
            polls.join()
            for w in windows:
                fill(w, polls.rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    code["changed_during_run"] = code_version()["sources_sha256"] != code["sources_sha256"]
    return {"machine": machine(), "code": code, "busy_before_pct": busy, "width": args.width,
            "height": args.height, "fps": args.fps, "refresh_hz": args.refresh_hz, "window_s": args.window,
            "windows": [asdict(w) for w in windows]}


def report(result: dict[str, Any]) -> None:
    from throughput import provenance

    ws = [Window(**w) for w in result["windows"]]
    print(provenance(result["machine"], result["busy_before_pct"], result["code"]))
    print(f"4 cameras {result['width']}x{result['height']}@{result['fps']:g}, 16 nodes on 2 workers; "
          f"monitor at {result['refresh_hz']:g} Hz in 120x40; windows of {result['window_s']:g} s")
    print(f"expected: consumers {8 * result['fps']:g} frames/s (a fit: about +-1 % of noise), sources "
          f"{4 * result['fps']:g} (exact), the two resize consumers {2 * result['fps']:g} (exact)\n")

    def fmt(v: float | None, f: str = "{:.1f}") -> str:
        return "-" if v is None or v != v else f.format(v)

    print(c.table(["window", "frames/s", "sources fps", "resize fps", "lost", "skipped", "manager %", "nodes %",
                   "monitor %", "rx KB/s", "terminal KB/s", "others busy %"],
                  [[w.name, fmt(w.fps), fmt(w.sources_fps), fmt(w.resize_fps, "{:.2f}"), w.lost, w.skipped,
                    fmt(w.manager_cpu_pct),
                    fmt(w.nodes_cpu_pct), fmt(w.monitor_cpu_pct), fmt(w.rx_kbps), fmt(w.terminal_kbps),
                    fmt(w.others_pct, "{:.0f}")] for w in ws]))
    if len(ws) != 4:
        return
    a, b, cw, d = ws
    base_fps = (a.fps + d.fps) / 2
    fps_diff = 100 * (b.fps - base_fps) / base_fps if base_fps else float("nan")
    base_sources = (a.sources_fps + d.sources_fps) / 2
    sources_diff = 100 * (b.sources_fps - base_sources) / base_sources if base_sources else float("nan")
    manager_plus = b.manager_cpu_pct - (a.manager_cpu_pct + d.manager_cpu_pct) / 2
    preview_kbps = (b.rx_kbps or 0.0) - (cw.rx_kbps or 0.0)
    nodes_plus = b.nodes_cpu_pct - (a.nodes_cpu_pct + d.nodes_cpu_pct) / 2
    print()
    base_resize = (a.resize_fps + d.resize_fps) / 2
    resize_diff = 100 * (b.resize_fps - base_resize) / base_resize if base_resize else float("nan")
    print(c.verdict(abs(sources_diff) <= TARGET_FPS_DIFF_PCT and abs(resize_diff) <= TARGET_FPS_DIFF_PCT
                    and b.lost <= max(a.lost, d.lost) and b.skipped <= max(a.skipped, d.skipped),
                    f"data plane with the monitor: sources {b.sources_fps:.1f} vs {base_sources:.1f} frames/s "
                    f"({sources_diff:+.2f} %), resize consumers {b.resize_fps:.2f} vs {base_resize:.2f} "
                    f"({resize_diff:+.2f} %), lost {b.lost} vs {a.lost}/{d.lost}, skipped {b.skipped} vs "
                    f"{a.skipped}/{d.skipped} (target within {TARGET_FPS_DIFF_PCT:g} %)"))
    print(f"        consumers received {b.fps:.1f} vs {base_fps:.1f} frames/s ({fps_diff:+.2f} %; a fit over "
          "reports up to 1 s old: about +-1 % of noise, see the docstring)")
    print(c.verdict(manager_plus <= TARGET_MANAGER_PCT,
                    f"manager CPU +{manager_plus:.1f} % of a core with the monitor polling at "
                    f"{result['refresh_hz']:g} Hz (target <= {TARGET_MANAGER_PCT:g} %)"))
    print(c.verdict((b.monitor_cpu_pct or 0.0) <= TARGET_MONITOR_PCT,
                    f"monitor CPU {b.monitor_cpu_pct:.1f} % of a core with previews, {cw.monitor_cpu_pct:.1f} % "
                    f"without (target <= {TARGET_MONITOR_PCT:g} %)"))
    print(c.verdict(preview_kbps <= TARGET_PREVIEW_KBPS,
                    f"preview traffic {preview_kbps:.1f} KB/s (monitor host received {b.rx_kbps:.1f} KB/s with "
                    f"previews, {cw.rx_kbps:.1f} KB/s without: status replies) (target <= {TARGET_PREVIEW_KBPS:g})"))
    print(f"node processes: {nodes_plus:+.1f} % of a core with previews on (making them), "
          f"{cw.nodes_cpu_pct - (a.nodes_cpu_pct + d.nodes_cpu_pct) / 2:+.1f} % with previews off")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--window", type=float, default=20.0, help="seconds per window (default 20)")
    parser.add_argument("--settle", type=float, default=4.0, help="seconds before a window after a change")
    parser.add_argument("--quick", action="store_true", help="6 s windows")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--refresh-hz", type=float, default=4.0)
    parser.add_argument("--wait-quiet", type=float, default=0.0, help="first wait up to S s for a quiet machine")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.window = 6.0
    if os.geteuid() != 0:
        c.log("benchmarks/monitor.py needs root (network namespaces)")
        return 2
    if args.wait_quiet:
        c.wait_quiet(args.wait_quiet)
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
