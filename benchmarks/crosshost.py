"""Across hosts (issue 9): our TCP data plane vs raw pyzmq between two network namespaces.

Run as a plain script, as root (not a pytest test):

    python benchmarks/crosshost.py            # 4 s per run, 3 interleaved repeats: about 1.5 minutes
    python benchmarks/crosshost.py --quick    # 1.5 s per run, one repeat
    python benchmarks/crosshost.py --json

The lab: two network namespaces of our own joined by a veth pair, 198.18.0.1/24 (A, the
publisher's "host") and 198.18.0.2/24 (B, the subscriber's); nothing else is reachable from them.
Each side is its own process started with `ip netns exec NS python benchmarks/crosshost.py
--role ...`. The namespaces (and the veth with them) are deleted on every exit path, and the run
checks that `ip netns list` no longer shows them.

- raw: XPUB bound on 198.18.0.1 in A, SUB in B; the same 8 precomputed frames cycled,
  `send_multipart([topic, header, frame], copy=False)`, `recv_multipart(copy=False)` +
  `np.frombuffer`, SNDHWM/RCVHWM = DATA_HWM (the code of throughput.py's raw baseline).
- ours: `cpcli.transport.pubsub.Publisher` bound on 198.18.0.1 with no shared-memory plan (so
  the TCP path a remote subscriber gets), publishing in the driver's free-run pattern (bursts of
  FREE_RUN_BURST_S, then `handle_subscriptions()` and a yield); `Subscriber` in B with no
  shared memory, `receive()` until empty after each poll, one byte of each frame read, `release()`.
  The cluster (manager/worker) does not exist yet, so this is the transport without the driver.
- Both start when the publisher's XPUB has seen the subscription (no sleeps); the subscriber is
  told when the publisher is done and drains until 0.3 s pass without a message.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import select
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import IO, Any

import _common as c
import numpy as np
import zmq

SIZES = {"1080p": (1920, 1080), "640x480": (640, 480)}
ADDR_A, ADDR_B = "198.18.0.1", "198.18.0.2"
PREFIX_LEN = 24
DEFAULT_DURATION_S = 4.0
QUICK_DURATION_S = 1.5
DEFAULT_REPEAT = 3
LATENCY_RATE_HZ = 30.0
LATENCY_DURATION_S = 3.0
HANDSHAKE_TIMEOUT_S = 30.0
DRAIN_IDLE_S = 0.3
RUN_LIMIT_S = 60.0
TARGET_RATIO = 0.8  # issue: across hosts the TCP path keeps >= 0.8x raw pyzmq
RAW_TOPIC = b"src/video"
RAW_HEADER = struct.Struct("<QqHHB")  # seq, t_ns (monotonic), height, width, channels


# -- the two sides (each runs inside its namespace) ------------------------------------------------


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _stdin_line(timeout_s: float) -> str | None:
    if select.select([sys.stdin], [], [], timeout_s)[0]:
        return sys.stdin.readline().strip()
    return None


def _frames(width: int, height: int) -> tuple[np.ndarray, ...]:
    from throughput import precomputed_frames  # test_video's own frames (imports cv2: only in the children)

    return precomputed_frames(width, height)


def role_pub(impl: str, width: int, height: int, rate_hz: float, duration_s: float) -> None:
    from cpcli.transport.pubsub import DATA_HWM, Publisher

    frames = _frames(width, height)
    context = zmq.Context()
    period_ns = int(1e9 / rate_hz) if rate_hz > 0 else 0
    sent = 0
    try:
        if impl == "raw":
            sock = context.socket(zmq.XPUB)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, DATA_HWM)
            port = sock.bind_to_random_port(f"tcp://{ADDR_A}")
            _emit({"endpoint": f"tcp://{ADDR_A}:{port}"})
            if not sock.poll(int(HANDSHAKE_TIMEOUT_S * 1000)):
                _emit({"error": "no subscriber within the handshake timeout"})
                return
            sock.recv()  # the subscription: the handshake
            h, w, ch = frames[0].shape
            start = time.monotonic_ns()
            end = start + int(duration_s * 1e9)
            next_ns = start
            while (now := time.monotonic_ns()) < end:
                if period_ns:
                    if now < next_ns:
                        time.sleep((next_ns - now) / 1e9)
                    next_ns += period_ns
                header = RAW_HEADER.pack(sent, time.monotonic_ns(), h, w, ch)
                sock.send_multipart([RAW_TOPIC, header, frames[sent % len(frames)].data], copy=False)
                sent += 1
        else:
            from cpcli.runtime.driver import FREE_RUN_BURST_S

            pub = Publisher(context, "src", ("video",), host=ADDR_A)  # no share_memory(): the TCP path
            sock = pub.socket
            _emit({"endpoint": pub.endpoint})
            deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
            while pub.subscribers("video") < 1:  # the XPUB subscription count is the handshake
                if time.monotonic() > deadline:
                    _emit({"error": "no subscriber within the handshake timeout"})
                    return
                sock.poll(100)
                pub.handle_subscriptions()
            start = time.monotonic_ns()
            end = start + int(duration_s * 1e9)
            next_ns = start
            burst_ns = int(FREE_RUN_BURST_S * 1e9)
            while (now := time.monotonic_ns()) < end:
                if period_ns:  # paced: one step, then a look at subscriptions (as the driver does)
                    if now < next_ns:
                        time.sleep((next_ns - now) / 1e9)
                    next_ns += period_ns
                    pub.publish("video", frames[sent % len(frames)], time.monotonic_ns())
                    sent += 1
                    pub.handle_subscriptions()
                    continue
                burst_end = now + burst_ns  # free-running: the driver's bursts
                while True:
                    pub.publish("video", frames[sent % len(frames)], time.monotonic_ns())
                    sent += 1
                    if time.monotonic_ns() >= burst_end:
                        break
                pub.handle_subscriptions()
                os.sched_yield()
        send_s = (time.monotonic_ns() - start) / 1e9
        _emit({"sent": sent, "send_s": send_s})
        _stdin_line(HANDSHAKE_TIMEOUT_S + RUN_LIMIT_S)  # keep the socket open until the subscriber drained
        if impl != "raw":
            pub.close()
    finally:
        context.destroy(linger=0)


def role_sub(impl: str, endpoint: str, duration_s: float) -> None:
    from cpcli.transport.pubsub import DATA_HWM, topic_for
    from cpcli.transport.subscriber import Subscriber

    context = zmq.Context()
    received = dropped = 0
    next_seq = 0
    latencies: list[int] = []
    checksum = 0
    finished = ended = False
    deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S + duration_s + RUN_LIMIT_S
    try:
        if impl == "raw":
            sock = context.socket(zmq.SUB)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, DATA_HWM)
            sock.setsockopt(zmq.SUBSCRIBE, RAW_TOPIC)
            sock.connect(endpoint)
            sub = None
        else:
            sub = Subscriber(context, "sink.src", endpoint, topic_for("src", "video"), logging.getLogger("bench"))
            sock = sub.socket
        _emit({"connected": True})
        while not ended and time.monotonic() < deadline:
            if not finished and select.select([sys.stdin], [], [], 0)[0]:
                finished = sys.stdin.readline().strip() == "finished"
            if not sock.poll(int(DRAIN_IDLE_S * 1000) if finished else 50):
                ended = finished
                continue
            if sub is None:
                while True:
                    try:
                        parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    now = time.monotonic_ns()
                    seq, t_ns, h, w, ch = RAW_HEADER.unpack(parts[1].bytes)
                    frame = np.frombuffer(parts[2].buffer, dtype=np.uint8).reshape(h, w, ch)
                    checksum ^= int(frame[0, 0, 0])
                    latencies.append(now - t_ns)
                    if seq > next_seq:
                        dropped += seq - next_seq
                    next_seq = seq + 1
                    received += 1
            else:
                while (sample := sub.receive()) is not None:
                    now = time.monotonic_ns()
                    checksum ^= int(sample.value[0, 0, 0])
                    if sample.t_ns is not None:
                        latencies.append(now - sample.t_ns)
                    sub.release(sample)
        if sub is not None:
            received, dropped = sub.received, sub.dropped
            sub.close()
        p50, p99 = (np.percentile(np.array(latencies), [50, 99]) / 1e6) if latencies else (0.0, 0.0)
        _emit({"received": received, "dropped": dropped, "ended": ended, "p50_ms": float(p50),
               "p99_ms": float(p99)})
    finally:
        context.destroy(linger=0)


# -- the parent ------------------------------------------------------------------------------------


@dataclass
class Run:
    fps: float
    sent: int
    received: int
    dropped: int
    duration_s: float
    p50_ms: float
    p99_ms: float


@dataclass
class Results:
    runs: dict[str, dict[str, dict[str, list[Run]]]] = field(default_factory=dict)  # kind -> size -> impl -> runs
    loads: list[dict[str, Any]] = field(default_factory=list)

    def add(self, kind: str, size: str, impl: str, run: Run) -> None:
        self.runs.setdefault(kind, {}).setdefault(size, {}).setdefault(impl, []).append(run)


class Lines:
    """Whole lines from a child's stdout pipe, read with a timeout (no hidden buffering)."""

    def __init__(self, proc: subprocess.Popen[bytes], what: str) -> None:
        assert proc.stdout is not None
        self.proc, self.what, self.fd, self.buf = proc, what, proc.stdout.fileno(), b""

    def json(self, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise RuntimeError(f"{self.what}: nothing within {timeout_s:.0f} s")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise RuntimeError(f"{self.what}: exited (code {self.proc.wait(5)}) without a result")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        data: dict[str, Any] = json.loads(line)
        if "error" in data:
            raise RuntimeError(f"{self.what}: {data['error']}")
        return data


def _send(stream: IO[bytes] | None, text: str) -> None:
    if stream is not None:
        with contextlib.suppress(BrokenPipeError):
            stream.write(text.encode() + b"\n")
            stream.flush()


def run_pair(ns_a: str, ns_b: str, impl: str, width: int, height: int, rate_hz: float, duration_s: float,
             script: str = __file__, env: dict[str, str] | None = None) -> Run:
    """One publisher in `ns_a`, one subscriber in `ns_b`: `script --role pub|sub --impl IMPL` (this file's
    sides, or another script's that takes the same options), with `env` (default: ours)."""
    base = [sys.executable, os.path.abspath(script), "--role"]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        pub = subprocess.Popen([*c.Netns.exec_prefix(ns_a), *base, "pub", "--impl", impl, "--size", f"{width}x{height}",
                                "--rate", str(rate_hz), "--duration", str(duration_s)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, env=env)
        procs.append(pub)
        pub_lines = Lines(pub, f"{impl} publisher")
        endpoint = pub_lines.json(HANDSHAKE_TIMEOUT_S)["endpoint"]
        sub = subprocess.Popen([*c.Netns.exec_prefix(ns_b), *base, "sub", "--impl", impl, "--endpoint", endpoint,
                                "--duration", str(duration_s)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, env=env)
        procs.append(sub)
        sub_lines = Lines(sub, f"{impl} subscriber")
        sub_lines.json(HANDSHAKE_TIMEOUT_S)
        pub_result = pub_lines.json(HANDSHAKE_TIMEOUT_S + duration_s + RUN_LIMIT_S)
        _send(sub.stdin, "finished")
        sub_result = sub_lines.json(RUN_LIMIT_S)
        _send(pub.stdin, "done")
        for proc in procs:
            proc.wait(15)
    finally:
        alive = [p.pid for p in procs if p.poll() is None]
        if alive:
            c.log(f"benchmark processes {alive} still running: ending them")
            c.end_processes(alive)
        for proc in procs:
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
    if not sub_result.get("ended"):
        c.log(f"warning: {impl} subscriber did not drain before its deadline")
    send_s = float(pub_result["send_s"])
    return Run(fps=sub_result["received"] / send_s, sent=pub_result["sent"], received=sub_result["received"],
               dropped=sub_result["dropped"], duration_s=send_s, p50_ms=sub_result["p50_ms"],
               p99_ms=sub_result["p99_ms"])


def quiet(args: argparse.Namespace) -> None:
    if args.wait_quiet > 0:
        busy = c.wait_quiet(args.wait_quiet)
        c.log(f"  machine {busy:.0f}% busy before this repeat")


def measure(args: argparse.Namespace, ns_a: str, ns_b: str, results: Results) -> None:
    impls = ("raw", "ours")
    for rep in range(args.repeat):
        quiet(args)
        c.log(f"[{rep + 1}/{args.repeat}] max rate, {args.duration:g} s per run")
        load = c.Load().start()
        for size, (w, h) in SIZES.items():
            for impl in impls if rep % 2 == 0 else impls[::-1]:
                c.log(f"  {size} {impl} ...")
                results.add("max", size, impl, run_pair(ns_a, ns_b, impl, w, h, 0.0, args.duration))
        results.loads.append({"phase": f"max rate, repeat {rep + 1}", **load.stop()})
    lat_repeat = min(2, args.repeat)
    for rep in range(lat_repeat):
        quiet(args)
        c.log(f"[{rep + 1}/{lat_repeat}] {LATENCY_RATE_HZ:g} fps, {args.latency_duration:g} s per run")
        load = c.Load().start()
        for size, (w, h) in SIZES.items():
            for impl in impls if rep % 2 == 0 else impls[::-1]:
                c.log(f"  {size} {impl} ...")
                results.add("latency", size, impl,
                            run_pair(ns_a, ns_b, impl, w, h, LATENCY_RATE_HZ, args.latency_duration))
        results.loads.append({"phase": f"{LATENCY_RATE_HZ:g} fps, repeat {rep + 1}", **load.stop()})


def _med(runs: list[Run], attr: str) -> float:
    return c.median(float(getattr(r, attr)) for r in runs)


def targets(results: Results) -> list[dict[str, Any]]:
    out = []
    for size in SIZES:
        runs = results.runs.get("max", {}).get(size, {})
        if runs.get("ours") and runs.get("raw"):
            value = c.ratio(_med(runs["ours"], "fps"), _med(runs["raw"], "fps"))
            ratios = [c.ratio(o.fps, r.fps) for o, r in zip(runs["ours"], runs["raw"], strict=False)]
            out.append({"target": f"{size} across namespaces: ours / raw pyzmq frames/s >= {TARGET_RATIO}",
                        "value": value, "spread": c.spread(ratios, "{:.2f}"), "met": value >= TARGET_RATIO})
    return out


def render(results: Results, args: argparse.Namespace) -> str:
    out = [f"{ADDR_A} (namespace A, publisher) -> {ADDR_B} (namespace B, subscriber) over a veth pair; "
           f"max rate: {args.duration:g} s per run, medians of {args.repeat} interleaved repeats (range = "
           "min-max); fps = frames received / seconds of sending; loss = (sent - received) / sent: PUB drops "
           "at the high-water mark when the reader falls behind", ""]
    head = ["case", "impl", "fps", "range", "MB/s", "ours/raw", "ratio range", "loss %", "p50/p99 ms"]
    rows = []
    for kind in ("max", "latency"):
        for size, (w, h) in SIZES.items():
            runs = results.runs.get(kind, {}).get(size, {})
            raw = runs.get("raw", [])
            for impl in ("raw", "ours"):
                rs = runs.get(impl)
                if not rs:
                    continue
                fps = _med(rs, "fps")
                ratios = [c.ratio(o.fps, r.fps) for o, r in zip(rs, raw, strict=False)]
                loss = c.median(100.0 * (r.sent - r.received) / r.sent if r.sent else 0.0 for r in rs)
                name = f"{size} {'max rate' if kind == 'max' else f'@{LATENCY_RATE_HZ:g} fps'}"
                rows.append([name, impl, f"{fps:.1f}", c.spread([r.fps for r in rs], "{:.0f}"),
                             f"{fps * w * h * 3 / 1e6:.0f}", f"{c.ratio(fps, _med(raw, 'fps')):.2f}" if raw else "-",
                             c.spread(ratios, "{:.2f}") if raw else "-", f"{loss:.1f}",
                             f"{_med(rs, 'p50_ms'):.2f} / {_med(rs, 'p99_ms'):.2f}"])
    out.append(c.table(head, rows))
    out.append("")
    for load in results.loads:
        out.append(c.describe_load(load["phase"], load))
    out.append("")
    for t in targets(results):
        out.append(c.verdict(t["met"], f"{t['target']}: {t['value']:.2f} (repeats {t['spread']})"))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=DEFAULT_DURATION_S, help="seconds per max-rate run")
    parser.add_argument("--latency-duration", type=float, default=LATENCY_DURATION_S)
    parser.add_argument("--repeat", type=int, default=DEFAULT_REPEAT)
    parser.add_argument("--quick", action="store_true", help="1.5 s per run, one repeat")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                        help="before each repeat, wait up to S seconds for the machine to be under 20%% busy")
    parser.add_argument("--json", action="store_true")
    # the two sides, run by the parent inside the namespaces
    parser.add_argument("--role", choices=("pub", "sub"), help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=("raw", "ours"), help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "pub":
        w, h = (int(x) for x in args.size.split("x"))
        role_pub(args.impl, w, h, args.rate, args.duration)
        return 0
    if args.role == "sub":
        role_sub(args.impl, args.endpoint, args.duration)
        return 0
    if args.quick:
        args.duration, args.latency_duration, args.repeat = QUICK_DURATION_S, 2.0, 1
    if not 0 < args.duration <= 60 or not 0 < args.latency_duration <= 60 or not 1 <= args.repeat <= 10:
        parser.error("durations in (0, 60] s, --repeat in 1..10")
    if os.geteuid() != 0:
        parser.error("needs root to create network namespaces (ip netns add)")
    from throughput import code_version, machine, provenance

    busy = c.begin_run()
    code = code_version()
    results = Results()
    lab = c.Netns("x")
    started = time.monotonic()
    load = c.Load().start()
    try:
        ns_a, ns_b = lab.add("a"), lab.add("b")
        lab.veth(ns_a, f"{ADDR_A}/{PREFIX_LEN}", ns_b, f"{ADDR_B}/{PREFIX_LEN}")
        measure(args, ns_a, ns_b, results)
    finally:
        cleanup = c.close_lab(lab)
    total = load.stop()
    elapsed = time.monotonic() - started
    code["changed_during_run"] = code_version()["sources_sha256"] != code["sources_sha256"]
    info = machine()
    if args.json:
        print(json.dumps({"machine": info, "code": code, "busy_before_pct": busy, "load": total, "elapsed_s": elapsed,
                          "cleanup": cleanup,
                          "runs": {k: {s: {i: [asdict(r) for r in rs] for i, rs in d.items()} for s, d in v.items()}
                                   for k, v in results.runs.items()},
                          "loads": results.loads, "targets": targets(results)}, indent=2))
        return 0
    print(provenance(info, busy, code))
    print(render(results, args))
    print(c.describe_load("whole run", total))
    print(cleanup)
    print(f"\n(total {elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
