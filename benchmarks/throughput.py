"""Data-plane benchmark: cpcli's test_video -> discard against a raw pyzmq PUB/SUB baseline.

Run as a plain script (not a pytest test):

    python benchmarks/throughput.py              # 5 s per run, about 1.5 minutes
    python benchmarks/throughput.py --quick      # 1.5 s per run, a smoke run
    python benchmarks/throughput.py --repeat 3   # interleaved repeats, medians (about 5 minutes)
    python benchmarks/throughput.py --json       # the results as JSON on stdout
    sudo python benchmarks/throughput.py --security --duration 3 --repeat 3   # data encryption's cost (below)

Every number comes from this one run. "Ours" is a real session (`run_session`: a supervisor in
this process, one OS process per node), once with same-host shared memory (the default) and once
with it off (TCP, the path between machines); the manifest's stats give frames sent by the
source and received by the sink, gaps, and capture->step latency. "Raw" is the least a Python
program can do with the same library: two spawned processes, PUB -> SUB over tcp://127.0.0.1,
the same 8 frames cycled, the same high-water marks, a zero-copy multipart send and a
`np.frombuffer` on receive.

`--security` (as root) measures instead what a cluster session's data security costs between two
machines: 1080p frames from a publisher in one network namespace to a subscriber in another
(crosshost.py's lab and its two sides, unchanged but for the keys), at the maximum rate and at
30 fps, four ways in the same run, interleaved: raw pyzmq; ours without keys (a session on one
machine); ours with `encrypt_data: false` (PLAIN: members only, frames in the clear); ours with
the default, Curve encryption. Every row is also given as a ratio against the raw pyzmq runs of
the same repeat.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import multiprocessing as mp
import os
import platform
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import _common as common
import numpy as np
import zmq
from zmq.utils import z85

from cpcli.clock import Clock
from cpcli.node import NodeContext
from cpcli.recipe import load_recipe
from cpcli.registry import load_registry
from cpcli.runtime import security
from cpcli.runtime.session import RunOptions, StopControl, run_session
from cpcli.transport.curve import Credentials, DataSecurity
from cpcli.transport.pubsub import DATA_HWM
from nodes.synthetic import TestVideo

PRECOMPUTED = 8  # frames drawn once and cycled, in both ours and raw: the source costs nothing
SIZES = {"640x480": (640, 480), "1080p": (1920, 1080)}
LATENCY_RATE_HZ = 30.0
DEFAULT_DURATION_S = 5.0
QUICK_DURATION_S = 1.5
HANDSHAKE_TIMEOUT_S = 20.0  # a spawned process imports numpy and zmq: seconds, not minutes
END_GRACE_S = 10.0  # after the publisher's last frame, the longest the subscriber may drain
RAW_TOPIC = b"src/video"
RAW_HEADER = struct.Struct("<QqHHB")  # seq, t_ns (monotonic), height, width, channels
DRAIN_IDLE_S = 0.3  # after the publisher's last frame, this long without a message means drained
TARGET_THROUGHPUT_RATIO = 0.8  # issue: >= 0.8x raw frames/s at 1080p
TARGET_LATENCY_RATIO = 1.3  # issue: p50 within 1.3x raw at 30 fps 640x480
SECURE_MODES = ("raw", "none", "plain", "curve")  # raw pyzmq; ours: no keys, encrypt_data false, encrypted
SECURE_SIZE = "1080p"
SECURE_LATENCY_DURATION_S = 3.0
TRANSPORTS = ("shm", "tcp")  # ours with shared memory (same-host default) and without (TCP, as between machines)
BUSY_WARN_PCT = 15.0  # CPU already busy above this before we start: other work skews every number


@dataclass
class Measure:
    """One run of one side (ours or raw) of one case."""

    fps: float  # frames received at the sink per second of sending
    sent: int  # frames the source published (PUB drops what does not fit the high-water marks)
    received: int
    dropped: int  # sequence gaps the receiver saw (a subset of sent - received)
    skipped: int  # received but not stepped on (ours, sync latest)
    duration_s: float
    p50_ms: float
    p99_ms: float
    stop_s: float = 0.0  # ours: duration over -> every node finished and the manifest written

    @property
    def loss_pct(self) -> float:
        return 100.0 * (self.sent - self.received) / self.sent if self.sent else 0.0


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class Case:
    """One case, measured `repeat` times on both sides (interleaved)."""

    name: str
    size: str
    rate_hz: float  # 0 = as fast as possible
    sync: str
    transport: str  # ours: "shm" (same-host default) or "tcp" (shared memory off: the path between machines)
    frame_bytes: int
    ours: list[Measure]
    raw: list[Measure]

    def med(self, side: str, attr: str) -> float:
        runs: list[Measure] = getattr(self, side)
        return _median([float(getattr(m, attr)) for m in runs])

    def fps_ratios(self) -> list[float]:
        return [_ratio(o.fps, r.fps) for o, r in zip(self.ours, self.raw, strict=True)]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for side in ("ours", "raw"):
            for entry, m in zip(out[side], getattr(self, side), strict=True):
                entry["loss_pct"] = m.loss_pct
        out["median"] = {side: {a: self.med(side, a) for a in ("fps", "loss_pct", "p50_ms", "p99_ms")}
                         for side in ("ours", "raw")}
        out["fps_ratio"] = _ratio(self.med("ours", "fps"), self.med("raw", "fps"))
        out["p50_ratio"] = _ratio(self.med("ours", "p50_ms"), self.med("raw", "p50_ms"))
        return out


def precomputed_frames(width: int, height: int, count: int = PRECOMPUTED) -> tuple[np.ndarray, ...]:
    """The very frames test_video cycles with `precomputed: count`."""
    node = TestVideo(width=width, height=height, rate_hz=0, precomputed=count)
    node.setup(NodeContext(node_id="bench", clock=Clock()))
    frames = node._frames  # noqa: SLF001 - a benchmark wants the identical pixels
    return frames


# -- ours ----------------------------------------------------------------------------------------

RECIPE = """\
name: bench_{size}_{sync}_{rate}_{transport}
nodes:
  src:
    type: test_video
    params: {{width: {width}, height: {height}, rate_hz: {rate_hz}, precomputed: {precomputed}, copy: {copy}}}
  sink:
    type: discard
    inputs: [src]
    sync: {sync}
"""


def run_ours(work: Path, width: int, height: int, rate_hz: float, sync: str, transport: str,
             duration_s: float, copy: bool = False) -> Measure:
    """One real session, test_video -> discard, measured from the sink's manifest stats.

    The source cycles PRECOMPUTED frames; with `copy` it copies each into the buffer it is sent from."""
    size = f"{width}x{height}"
    path = work / f"bench_{size}_{sync}_{int(rate_hz)}_{transport}_{copy}.yaml"
    path.write_text(RECIPE.format(size=size, sync=sync, rate=int(rate_hz), transport=transport, width=width,
                                  height=height, rate_hz=rate_hz, precomputed=PRECOMPUTED,
                                  copy=str(copy).lower()), encoding="utf-8")
    registry = load_registry()
    recipe = load_recipe(path, registry)
    options = RunOptions(out_dir=work / "sessions", duration_s=duration_s, shared_memory=transport == "shm")
    result = run_session(recipe, registry, options, StopControl())
    if result.failures:
        raise SystemExit(f"ours {size} {sync}: session failed: {result.failures} (logs in {result.logs_dir})")
    stats = result.manifest["nodes"]["sink"]["stats"]
    received = int(stats["samples_in"].get("src", 0))
    duration = result.duration_s or duration_s
    return Measure(fps=received / duration, sent=int(result.manifest["nodes"]["src"]["stats"]["samples_out"]),
                   received=received, dropped=int(stats["dropped_in"].get("src", 0)),
                   skipped=int(stats["skipped_in"].get("src", 0)), duration_s=duration,
                   p50_ms=float(stats["latency_ms"]["p50"]), p99_ms=float(stats["latency_ms"]["p99"]),
                   stop_s=_stop_s(result.session_dir, result.manifest["duration_ns"]))


def _stop_s(session_dir: Path, duration_ns: int) -> float:
    """Seconds from the end of the recording to `session_stopped` (all nodes done, files closed)."""
    for text in (session_dir / "events.jsonl").read_text(encoding="utf-8").splitlines():
        event = json.loads(text)
        if event.get("event") == "session_stopped":
            return (int(event["t_ns"]) - duration_ns) / 1e9
    return float("nan")


# -- raw pyzmq -----------------------------------------------------------------------------------


def raw_publisher(width: int, height: int, rate_hz: float, duration_s: float, conn: Connection) -> None:
    """XPUB bound on loopback; starts once it sees the subscription, sends for `duration_s`."""
    frames = precomputed_frames(width, height)
    context = zmq.Context()
    sock = context.socket(zmq.XPUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, DATA_HWM)
    try:
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        conn.send(f"tcp://127.0.0.1:{port}")
        if not sock.poll(int(HANDSHAKE_TIMEOUT_S * 1000)):  # the subscription message is the handshake
            conn.send({"error": "no subscriber within the handshake timeout"})
            return
        sock.recv()
        period_ns = int(1e9 / rate_hz) if rate_hz > 0 else 0
        h, w, c = frames[0].shape
        sent = 0
        start = time.monotonic_ns()
        end = start + int(duration_s * 1e9)
        next_ns = start
        while (now := time.monotonic_ns()) < end:
            if period_ns:
                if now < next_ns:
                    time.sleep((next_ns - now) / 1e9)  # pacing to 30 fps, not synchronization
                next_ns += period_ns
            frame = frames[sent % len(frames)]
            header = RAW_HEADER.pack(sent, time.monotonic_ns(), h, w, c)
            sock.send_multipart([RAW_TOPIC, header, frame.data], copy=False)
            sent += 1
        send_s = (time.monotonic_ns() - start) / 1e9
        conn.send({"sent": sent, "send_s": send_s})
        conn.recv()  # keep the socket open until the subscriber has drained
    finally:
        sock.close(linger=0)
        context.term()


def raw_subscriber(endpoint: str, duration_s: float, conn: Connection) -> None:
    """SUB connected to the publisher; counts frames, gaps and send->receive latency until drained."""
    context = zmq.Context()
    sock = context.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, DATA_HWM)
    sock.setsockopt(zmq.SUBSCRIBE, RAW_TOPIC)
    sock.connect(endpoint)
    received = dropped = 0
    next_seq = 0
    latencies: list[int] = []
    checksum = 0
    deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S + duration_s + END_GRACE_S
    finished = False  # the parent said the publisher sent its last frame
    ended = False
    try:
        while not ended and time.monotonic() < deadline:
            if not finished and conn.poll(0):
                finished = bool(conn.recv())
            if not sock.poll(int(DRAIN_IDLE_S * 1000) if finished else 50):
                ended = finished  # publisher done and nothing more arrives: drained
                continue
            while True:
                try:
                    parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                now = time.monotonic_ns()
                seq, t_ns, h, w, c = RAW_HEADER.unpack(parts[1].bytes)
                frame = np.frombuffer(parts[2].buffer, dtype=np.uint8).reshape(h, w, c)
                checksum ^= int(frame[0, 0, 0])  # touch the frame, as a node would
                latencies.append(now - t_ns)
                if seq > next_seq:
                    dropped += seq - next_seq
                next_seq = seq + 1
                received += 1
        p50, p99 = (np.percentile(np.array(latencies), [50, 99]) / 1e6) if latencies else (0.0, 0.0)
        conn.send({"received": received, "dropped": dropped, "ended": ended,
                   "p50_ms": float(p50), "p99_ms": float(p99)})
    finally:
        sock.close(linger=0)
        context.term()


def run_raw(width: int, height: int, rate_hz: float, duration_s: float) -> Measure:
    """The baseline in two spawned processes; joined (then terminated if stuck) by pid."""
    ctx = mp.get_context("spawn")
    pub_end, pub_conn = ctx.Pipe()
    sub_end, sub_conn = ctx.Pipe()
    pub = ctx.Process(target=raw_publisher, args=(width, height, rate_hz, duration_s, pub_conn), daemon=True)
    pub.start()
    sub: mp.process.BaseProcess | None = None
    limit_s = HANDSHAKE_TIMEOUT_S + duration_s + END_GRACE_S
    try:
        if not pub_end.poll(HANDSHAKE_TIMEOUT_S):
            raise SystemExit("raw publisher did not bind in time")
        endpoint = pub_end.recv()
        sub = ctx.Process(target=raw_subscriber, args=(endpoint, duration_s, sub_conn), daemon=True)
        sub.start()
        if not pub_end.poll(limit_s):
            raise SystemExit("raw publisher did not finish in time")
        pub_result = pub_end.recv()
        if "error" in pub_result:
            raise SystemExit(f"raw publisher: {pub_result['error']}")
        sub_end.send(True)  # the publisher is done: drain what is in flight, then report
        if not sub_end.poll(limit_s):
            raise SystemExit("raw subscriber did not finish in time")
        sub_result = sub_end.recv()
        pub_end.send("done")
    finally:
        for proc in (sub, pub):
            if proc is None:
                continue
            proc.join(5)
            if proc.is_alive():
                print(f"raw benchmark process {proc.pid} did not exit; terminating it", file=sys.stderr)
                proc.terminate()
                proc.join(5)
    if not sub_result["ended"]:
        print("warning: raw subscriber did not drain before its deadline", file=sys.stderr)
    send_s = float(pub_result["send_s"])
    return Measure(fps=sub_result["received"] / send_s, sent=int(pub_result["sent"]), received=sub_result["received"],
                   dropped=sub_result["dropped"], skipped=0, duration_s=send_s,
                   p50_ms=sub_result["p50_ms"], p99_ms=sub_result["p99_ms"])


# -- data security between two namespace hosts (--security) ----------------------------------------


def security_role(args: argparse.Namespace) -> None:
    """One side of a pair, inside its namespace: crosshost.py's code, with the keys from our environment.

    The keys come the way a node process gets them (CP_DATA_SECURITY); crosshost.py's sides build
    their Publisher and Subscriber themselves, so those are handed the keys here and nothing else
    of the measured code differs between the rows.
    """
    import crosshost

    from cpcli.transport import pubsub, subscriber

    sec = security.take(os.environ)
    if sec is not None:
        pubsub.Publisher = functools.partial(pubsub.Publisher, security=sec)  # type: ignore[misc]
        subscriber.Subscriber = functools.partial(subscriber.Subscriber, security=sec)  # type: ignore[misc]
    impl = "raw" if args.impl == "raw" else "ours"
    if args.role == "pub":
        w, h = (int(x) for x in args.size.split("x"))
        crosshost.role_pub(impl, w, h, args.rate, args.duration)
    else:
        crosshost.role_sub(impl, args.endpoint, args.duration)


def _security_for(mode: str, creds: Credentials) -> DataSecurity | None:
    return None if mode in ("raw", "none") else DataSecurity(creds, mode == "curve", "bench")


def run_secure_pair(ns_a: str, ns_b: str, mode: str, creds: Credentials, width: int, height: int, rate_hz: float,
                    duration_s: float) -> Any:
    """crosshost.run_pair with this script's sides, each given the mode's keys in its environment."""
    import crosshost

    env = dict(os.environ)
    security.give(env, _security_for(mode, creds))
    return crosshost.run_pair(ns_a, ns_b, mode, width, height, rate_hz, duration_s, script=__file__, env=env)


def run_security(duration_s: float, repeat: int) -> dict[str, Any]:
    """Every mode at max rate and at 30 fps, `repeat` times interleaved, in a namespace lab deleted on every exit."""
    import crosshost

    secret = z85.encode(os.urandom(32))  # throwaway keys: nothing is written to the config folder
    creds = Credentials("bench", zmq.curve_public(secret), os.urandom(16))
    w, h = SIZES[SECURE_SIZE]
    runs: dict[str, dict[str, list[Any]]] = {}
    loads: list[dict[str, Any]] = []
    lab = common.Netns("s")
    try:
        ns_a, ns_b = lab.add("a"), lab.add("b")
        lab.veth(ns_a, f"{crosshost.ADDR_A}/{crosshost.PREFIX_LEN}", ns_b, f"{crosshost.ADDR_B}/{crosshost.PREFIX_LEN}")
        for rep in range(repeat):
            for kind, rate_hz, seconds in (("max", 0.0, duration_s),
                                           ("30fps", LATENCY_RATE_HZ, min(duration_s, SECURE_LATENCY_DURATION_S))):
                load = common.Load().start()
                for mode in SECURE_MODES if rep % 2 == 0 else SECURE_MODES[::-1]:
                    common.log(f"[{rep + 1}/{repeat}] {SECURE_SIZE} {kind} {mode} ...")
                    runs.setdefault(kind, {}).setdefault(mode, []).append(
                        run_secure_pair(ns_a, ns_b, mode, creds, w, h, rate_hz, seconds))
                loads.append({"phase": f"{kind}, repeat {rep + 1}", **load.stop()})
    finally:
        cleanup = common.close_lab(lab)
    return {"runs": runs, "loads": loads, "cleanup": cleanup, "duration_s": duration_s, "repeat": repeat}


def security_ratios(result: dict[str, Any], kind: str, mode: str) -> list[float]:
    """Per repeat: this mode's frames/s over raw pyzmq's in the same repeat."""
    runs = result["runs"].get(kind, {})
    return [common.ratio(o.fps, r.fps) for o, r in zip(runs.get(mode, []), runs.get("raw", []), strict=False)]


def render_security(result: dict[str, Any]) -> str:
    from crosshost import ADDR_A, ADDR_B

    w, h = SIZES[SECURE_SIZE]
    names = {"raw": "raw pyzmq", "none": "ours, no keys", "plain": "ours, encrypt_data: false (PLAIN)",
             "curve": "ours, encrypted (Curve, default)"}
    head = ["case", "impl", "fps", "range", "MB/s", "x raw", "x raw range", "loss %", "p50/p99 ms"]
    rows = []
    for kind in ("max", "30fps"):
        for mode in SECURE_MODES:
            rs = result["runs"].get(kind, {}).get(mode, [])
            if not rs:
                continue
            fps = common.median(r.fps for r in rs)
            ratios = security_ratios(result, kind, mode)
            loss = common.median(100.0 * (r.sent - r.received) / r.sent if r.sent else 0.0 for r in rs)
            p50, p99 = (common.median(getattr(r, a) for r in rs) for a in ("p50_ms", "p99_ms"))
            rows.append([f"{SECURE_SIZE} {'max rate' if kind == 'max' else f'@{LATENCY_RATE_HZ:g} fps'}",
                         names[mode], f"{fps:.1f}", common.spread([r.fps for r in rs], "{:.0f}"),
                         f"{fps * w * h * 3 / 1e6:.0f}", f"{common.median(ratios):.2f}",
                         common.spread(ratios, "{:.2f}"), f"{loss:.1f}", f"{p50:.2f} / {p99:.2f}"])
    out = [f"{ADDR_A} (namespace A, publisher) -> {ADDR_B} (namespace B, subscriber) over a veth pair; "
           f"{result['duration_s']:g} s per max-rate run, medians of {result['repeat']} interleaved repeats "
           f"(range = min-max); x raw = frames/s over raw pyzmq's in the same repeat; loss = (sent - received) / sent",
           "", common.table(head, rows), ""]
    out += [common.describe_load(load["phase"], load) for load in result["loads"]]
    curve, plain = (common.median(security_ratios(result, "max", m)) for m in ("curve", "plain"))
    out += ["", f"1080p across hosts, max rate: encryption on {curve:.2f}x raw pyzmq, off (PLAIN) {plain:.2f}x raw; "
                f"encryption keeps {common.ratio(curve, plain):.2f} of the unencrypted frames/s", result["cleanup"]]
    return "\n".join(out)


# -- the run -------------------------------------------------------------------------------------


def run_all(duration_s: float, repeat: int, log: Any, only: str | None = None) -> list[Case]:
    """Every case `repeat` times; raw and ours interleaved so background load hits both alike."""
    cases: dict[str, Case] = {}

    def case(size: str, rate_hz: float, sync: str, transport: str) -> Case:
        w, h = SIZES[size]
        speed = "max" if rate_hz == 0 else f"@{rate_hz:g}fps"
        name = f"{size} {speed} {sync} {transport}"
        return cases.setdefault(name, Case(name, size, rate_hz, sync, transport, w * h * 3, [], []))

    with tempfile.TemporaryDirectory(prefix="cpcli-bench-") as tmp:
        work = Path(tmp)
        for rep in range(repeat):
            tag = f"[{rep + 1}/{repeat}] " if repeat > 1 else ""
            for rate_hz, syncs in ((0.0, ("latest", "all")), (LATENCY_RATE_HZ, ("latest",))):
                if only is not None and only != ("throughput" if rate_hz == 0 else "latency"):
                    continue
                speed = "max rate" if rate_hz == 0 else f"{rate_hz:g} fps"
                for size, (w, h) in SIZES.items():
                    steps = ["raw"] + [f"{sync} {t}" for t in TRANSPORTS for sync in syncs]
                    raw: Measure | None = None
                    for step in steps if rep % 2 == 0 else steps[::-1]:
                        log(f"{tag}{size} {speed}: {'raw pyzmq' if step == 'raw' else 'ours ' + step} ...")
                        if step == "raw":
                            raw = run_raw(w, h, rate_hz, duration_s)
                        else:
                            sync, transport = step.split()
                            case(size, rate_hz, sync, transport).ours.append(
                                run_ours(work, w, h, rate_hz, sync, transport, duration_s))
                    assert raw is not None
                    for sync in syncs:
                        for transport in TRANSPORTS:
                            case(size, rate_hz, sync, transport).raw.append(raw)
    return list(cases.values())


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def targets(cases: list[Case]) -> list[dict[str, Any]]:
    """The issue's targets, for the default same-host path (shm) and for TCP (between machines)."""
    by_name = {c.name: c for c in cases}
    out = []
    for transport in TRANSPORTS:
        for sync in ("latest", "all"):
            c = by_name.get(f"1080p max {sync} {transport}")
            if c is None:
                continue
            ratio = _ratio(c.med("ours", "fps"), c.med("raw", "fps"))
            out.append({"target": f"throughput 1080p, sync {sync}, {transport}: ours/raw fps >= "
                                  f"{TARGET_THROUGHPUT_RATIO}", "transport": transport,
                        "value": ratio, "met": ratio >= TARGET_THROUGHPUT_RATIO})
        c = by_name.get(f"640x480 @{LATENCY_RATE_HZ:g}fps latest {transport}")
        if c is None:
            continue
        ratio = _ratio(c.med("ours", "p50_ms"), c.med("raw", "p50_ms"))
        out.append({"target": f"latency 640x480 @{LATENCY_RATE_HZ:g}fps, {transport}: ours/raw p50 <= "
                              f"{TARGET_LATENCY_RATIO}", "transport": transport,
                    "value": ratio, "met": ratio <= TARGET_LATENCY_RATIO})
    return out


def render(cases: list[Case], duration_s: float, repeat: int) -> str:
    head = ["case", "ours fps", "raw fps", "ratio", "ours MB/s", "raw MB/s", "ours loss%", "raw loss%",
            "skipped", "ours p50/p99 ms", "raw p50/p99 ms", "p50 ratio", "ours stop s"]
    if repeat > 1:
        head.insert(4, "ratio range")
    rows = []
    for c in cases:
        ours_fps, raw_fps = c.med("ours", "fps"), c.med("raw", "fps")
        row = [
            c.name, f"{ours_fps:.1f}", f"{raw_fps:.1f}", f"{_ratio(ours_fps, raw_fps):.2f}",
            f"{ours_fps * c.frame_bytes / 1e6:.0f}", f"{raw_fps * c.frame_bytes / 1e6:.0f}",
            f"{c.med('ours', 'loss_pct'):.1f}", f"{c.med('raw', 'loss_pct'):.1f}", f"{c.med('ours', 'skipped'):.0f}",
            f"{c.med('ours', 'p50_ms'):.2f} / {c.med('ours', 'p99_ms'):.2f}",
            f"{c.med('raw', 'p50_ms'):.2f} / {c.med('raw', 'p99_ms'):.2f}",
            f"{_ratio(c.med('ours', 'p50_ms'), c.med('raw', 'p50_ms')):.2f}", f"{c.med('ours', 'stop_s'):.2f}",
        ]
        if repeat > 1:
            ratios = c.fps_ratios()
            row.insert(4, f"{min(ratios):.2f}-{max(ratios):.2f}")
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(v).ljust(wd) if i == 0 else str(v).rjust(wd)
                                 for i, (v, wd) in enumerate(zip(cells, widths, strict=True))) + " |"

    median = f"medians of {repeat} interleaved runs; " if repeat > 1 else ""
    out = [f"{duration_s:g} s per run; {median}{PRECOMPUTED} precomputed uint8 BGR frames cycled; "
           f"HWM {DATA_HWM}; fps = frames received at the sink / seconds of sending;",
           "loss = (sent - received) / sent: a free-running source outruns a TCP reader and PUB drops at the HWM;",
           "transport: shm = ours on one host (shared memory, the default), tcp = ours with shared memory off "
           "(the path between machines); raw is pyzmq over TCP loopback in both rows",
           "", line(head), "|" + "|".join("-" * (wd + 2) for wd in widths) + "|"]
    out += [line(r) for r in rows]
    out.append("")
    for t in targets(cases):
        note = "  (default same-host path)" if t["transport"] == "shm" else "  (shared memory off: TCP)"
        out.append(f"{'MET    ' if t['met'] else 'NOT MET'} {t['target']}: {t['value']:.2f}{note}")
    return "\n".join(out)


def background_busy(window_s: float = 1.0) -> float:
    """Share of all CPUs busy (anyone's) over a short window before we start, from /proc/stat."""
    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    try:
        total0, idle0 = sample()
        time.sleep(window_s)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return float("nan")
    total = total1 - total0
    return 100.0 * (total - (idle1 - idle0)) / total if total else float("nan")


def code_version() -> dict[str, Any]:
    """The commit and a fingerprint of the runtime's sources actually imported (others edit the tree)."""
    import cpcli
    import nodes

    digest = hashlib.sha256()
    for package in (cpcli, nodes):
        root = Path(str(package.__file__)).resolve().parent
        for path in sorted(root.rglob("*.py")):
            digest.update(f"{package.__name__}/{path.relative_to(root).as_posix()}".encode())
            digest.update(path.read_bytes())
    repo = Path(cpcli.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "not a git checkout"
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "cpcli", "nodes"], cwd=repo,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "unknown", True
    return {"path": str(repo), "commit": commit, "runtime_modified": dirty,
            "sources_sha256": digest.hexdigest()[:12]}


def provenance(info: dict[str, Any], busy: float, code: dict[str, Any]) -> str:
    """The two lines every benchmark prints first: the machine, and exactly which code it measured."""
    return (f"machine: {info['nproc']} cpu, {info['cpu']}, Python {info['python']}, pyzmq {info['pyzmq']}, "
            f"libzmq {info['libzmq']}; {busy:.0f}% busy before the run\n"
            f"code: {code['path']} commit {code['commit']}"
            f"{' + uncommitted runtime changes' if code['runtime_modified'] else ''}, cpcli+nodes sources sha256 "
            f"{code['sources_sha256']}{' (CHANGED DURING THE RUN)' if code.get('changed_during_run') else ''}")


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                cpu = text.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(), "platform": platform.platform()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=DEFAULT_DURATION_S, help="seconds per run")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_DURATION_S} s per run (smoke run)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per case, interleaved; medians are shown")
    parser.add_argument("--only", choices=("throughput", "latency"), help="run only these cases")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--security", action="store_true", help="as root: 1080p between two network namespaces, "
                        "data encryption on vs off vs raw pyzmq (instead of the cases above)")
    # one side of a --security pair, run by the parent inside a namespace
    parser.add_argument("--role", choices=("pub", "sub"), help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=SECURE_MODES, help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role is not None:
        security_role(args)
        return 0
    duration_s = QUICK_DURATION_S if args.quick else args.duration
    if not 0 < duration_s <= 120:
        parser.error("--duration must be in (0, 120] seconds")
    if not 1 <= args.repeat <= 20:
        parser.error("--repeat must be in 1..20")
    logging.basicConfig(level=logging.WARNING)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if args.security:
        return main_security(args, duration_s)
    busy = background_busy()
    if busy > BUSY_WARN_PCT:
        log(f"warning: the machine is {busy:.0f}% busy before we start: results will be noisy")
    code = code_version()
    started = time.monotonic()
    cases = run_all(duration_s, args.repeat, log, args.only)
    elapsed = time.monotonic() - started
    info = machine()
    code["changed_during_run"] = code_version()["sources_sha256"] != code["sources_sha256"]
    if code["changed_during_run"]:
        log("warning: the runtime's sources changed during the run: cases measured different code")
    if args.json:
        print(json.dumps({"machine": info, "code": code, "duration_s": duration_s, "repeat": args.repeat,
                          "background_busy_pct": busy, "elapsed_s": elapsed,
                          "cases": [c.to_dict() for c in cases], "targets": targets(cases)}, indent=2))
    else:
        print(provenance(info, busy, code))
        print(render(cases, duration_s, args.repeat))
        print(f"\n(total {elapsed:.0f} s)")
    return 0


def main_security(args: argparse.Namespace, duration_s: float) -> int:
    if os.geteuid() != 0:
        raise SystemExit("--security needs root to create network namespaces (ip netns add)")
    busy = common.begin_run(BUSY_WARN_PCT)
    code = code_version()
    started = time.monotonic()
    total = common.Load().start()
    result = run_security(duration_s, args.repeat)
    whole = total.stop()
    code["changed_during_run"] = code_version()["sources_sha256"] != code["sources_sha256"]
    if args.json:
        print(json.dumps({"machine": machine(), "code": code, "busy_before_pct": busy, "load": whole,
                          "elapsed_s": time.monotonic() - started, "cleanup": result["cleanup"],
                          "runs": {k: {m: [asdict(r) for r in rs] for m, rs in v.items()}
                                   for k, v in result["runs"].items()},
                          "x_raw": {k: {m: security_ratios(result, k, m) for m in v}
                                    for k, v in result["runs"].items()},
                          "loads": result["loads"]}, indent=2))
        return 0
    print(provenance(machine(), busy, code))
    print(render_security(result))
    print(common.describe_load("whole run", whole))
    print(f"\n(total {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
