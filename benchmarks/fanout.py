"""CPU per frame of a fan-out recipe (issue 9): 4 cameras 640x480@30, 3 consumers each, shm vs TCP.

Run as a plain script (not a pytest test):

    python benchmarks/fanout.py            # 20 s windows; discard and mixed consumers, shm and TCP: ~2 min
    python benchmarks/fanout.py --quick    # 5 s windows
    python benchmarks/fanout.py --json

The recipe: `cam0..cam3: test_video {640x480, rate_hz: 30, precomputed: 8}` (frames drawn once, so
the sources cost only what publishing costs), each read by 3 consumers with `sync: latest`:
`discard` x3 (the data plane alone) or `discard` x2 + `grayscale` (mixed: one consumer does real
work). Each recipe runs through `run_session` twice, with same-host shared memory (the default)
and with `RunOptions(shared_memory=False)` (every hop over TCP loopback, as between machines),
in ABBA order so background load hits both alike.

CPU = user + system seconds of every node process (psutil, the children of this process: all
their threads, ZeroMQ's I/O threads included), read after a 1.5 s warm-up and again just before
the session is told to stop; frames = samples received by the consumers over the same window
(from the nodes' live stats). The supervisor (this process) is reported apart: it does the same
work on both paths. Drops come from the manifest: consumers' `dropped_in`, sources' `dropped_out`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common as c
import psutil
from throughput import code_version, machine, provenance

from cpcli.recipe import parse_recipe
from cpcli.registry import load_registry
from cpcli.runtime.session import Progress, RunOptions, StopControl, run_session

CAMERAS = 4
CONSUMERS = 3
WIDTH, HEIGHT, RATE_HZ = 640, 480, 30
DEFAULT_WINDOW_S = 20.0
QUICK_WINDOW_S = 5.0
WARMUP_S = 1.5  # after the session starts: imports, first slots and codecs are not what we measure
TARGET_RATIO = 0.5  # issue: shm CPU per frame <= 0.5x the TCP path's
KINDS = {"discard": ("discard",) * CONSUMERS, "mixed": ("discard", "discard", "grayscale")}
# Frames below the shared-memory threshold (64 KiB) go inline through ZeroMQ on both paths: this
# run shows what a frame costs when no payload is copied at all (wake-ups, syscalls, Python).
CONTROL_SIZE = (80, 60)


def recipe_text(kind: str, width: int = WIDTH, height: int = HEIGHT) -> str:
    lines = [f"name: fanout_{kind}", "nodes:"]
    for i in range(CAMERAS):
        lines.append(f"  cam{i}: {{type: test_video, params: {{width: {width}, height: {height}, "
                     f"rate_hz: {RATE_HZ}, precomputed: 8}}}}")
        for j, node_type in enumerate(KINDS[kind]):
            lines.append(f"  c{i}_{j}: {{type: {node_type}, inputs: [cam{i}], sync: latest}}")
    return "\n".join(lines) + "\n"


@dataclass
class Window:
    """What the progress callback saw between the two snapshots."""

    t0: float = 0.0
    t1: float = 0.0
    cpu0: dict[str, tuple[float, float]] = field(default_factory=dict)  # node id -> (main, others) seconds
    cpu1: dict[str, tuple[float, float]] = field(default_factory=dict)
    frames0: int = 0
    frames1: int = 0
    sent0: int = 0
    sent1: int = 0
    sup0: float = 0.0
    sup1: float = 0.0
    machine0: c.LoadSnapshot | None = None
    machine1: c.LoadSnapshot | None = None


def _node_cpu(progress: Progress) -> dict[str, tuple[float, float]]:
    """(main thread, other threads) user+sys seconds per node process (by the pid the supervisor
    reports); the other threads are ZeroMQ's I/O and reaper threads and pyzmq's zero-copy GC."""
    out = {}
    for node_id, status in progress.nodes.items():
        if status.pid is None:
            continue
        with contextlib.suppress(psutil.Error):
            threads = psutil.Process(status.pid).threads()
            main = sum(t.user_time + t.system_time for t in threads if t.id == status.pid)
            other = sum(t.user_time + t.system_time for t in threads if t.id != status.pid)
            out[node_id] = (main, other)
    return out


def _counts(progress: Progress) -> tuple[int, int]:
    """(frames received by consumers, frames sent by cameras) from the live stats."""
    received = sum(sum(s.stats.samples_in.values()) for n, s in progress.nodes.items() if not n.startswith("cam"))
    sent = sum(s.stats.samples_out for n, s in progress.nodes.items() if n.startswith("cam"))
    return received, sent


def run_one(work: Path, kind: str, shared_memory: bool, window_s: float,
            size: tuple[int, int] = (WIDTH, HEIGHT)) -> dict[str, Any]:
    registry = load_registry()
    recipe = parse_recipe(recipe_text(kind, *size), registry)
    stop = StopControl()
    win = Window()
    me = psutil.Process()

    def on_progress(progress: Progress) -> None:
        if progress.phase != "running" or stop.requested.is_set():
            return
        if not win.cpu0 and progress.elapsed_s >= WARMUP_S:
            win.t0, win.cpu0, win.machine0 = time.monotonic(), _node_cpu(progress), c.Load.snapshot()
            win.frames0, win.sent0 = _counts(progress)
            t = me.cpu_times()
            win.sup0 = t.user + t.system
        elif win.cpu0 and time.monotonic() - win.t0 >= window_s:
            win.t1, win.cpu1, win.machine1 = time.monotonic(), _node_cpu(progress), c.Load.snapshot()
            win.frames1, win.sent1 = _counts(progress)
            t = me.cpu_times()
            win.sup1 = t.user + t.system
            stop.requested.set()  # just after the snapshot: the stop itself is not measured

    options = RunOptions(out_dir=work / "sessions", duration_s=WARMUP_S + window_s + 30.0,  # a cap, never reached
                         shared_memory=shared_memory)
    result = run_session(recipe, registry, options, stop, on_progress)
    if result.failures:
        raise SystemExit(f"fanout {kind}: session failed: {result.failures} (logs in {result.logs_dir})")
    if not win.cpu1:
        raise SystemExit(f"fanout {kind}: the measuring window never closed")
    nodes = result.manifest["nodes"]
    zero = (0.0, 0.0)
    main = {n: win.cpu1[n][0] - win.cpu0.get(n, zero)[0] for n in win.cpu1}
    other = {n: win.cpu1[n][1] - win.cpu0.get(n, zero)[1] for n in win.cpu1}
    cams = sum(main[n] + other[n] for n in main if n.startswith("cam"))
    consumers = sum(main[n] + other[n] for n in main if not n.startswith("cam"))
    frames = win.frames1 - win.frames0
    sent = win.sent1 - win.sent0
    wall = win.t1 - win.t0
    consumer_stats = [v["stats"] for n, v in nodes.items() if not n.startswith("cam")]
    assert win.machine0 is not None and win.machine1 is not None
    return {
        "kind": kind, "size": f"{size[0]}x{size[1]}", "transport": "shm" if shared_memory else "tcp",
        "window_s": wall,
        "cpu_s": cams + consumers, "cpu_cams_s": cams, "cpu_consumers_s": consumers,
        "cpu_supervisor_s": win.sup1 - win.sup0,
        "cpu_cams_main_s": sum(v for n, v in main.items() if n.startswith("cam")),
        "cpu_cams_threads_s": sum(v for n, v in other.items() if n.startswith("cam")),
        "cpu_consumers_main_s": sum(v for n, v in main.items() if not n.startswith("cam")),
        "cpu_consumers_threads_s": sum(v for n, v in other.items() if not n.startswith("cam")),
        "frames_delivered": frames, "frames_sent": sent,
        "cpu_ms_per_frame": 1000.0 * (cams + consumers) / frames if frames else float("nan"),
        "cpu_pct_of_machine": 100.0 * (cams + consumers) / (wall * (psutil.cpu_count() or 1)),
        "delivered_fps": frames / wall if wall else 0.0,
        "dropped_in": sum(sum(s["dropped_in"].values()) for s in consumer_stats),
        "skipped_in": sum(sum(s["skipped_in"].values()) for s in consumer_stats),
        "dropped_out": sum(int(v["stats"].get("dropped_out", 0)) for n, v in nodes.items() if n.startswith("cam")),
        "samples_out": sum(int(v["stats"]["samples_out"]) for n, v in nodes.items() if n.startswith("cam")),
        "samples_in": sum(sum(s["samples_in"].values()) for s in consumer_stats),
        "latency_p50_ms": c.median(float(s["latency_ms"]["p50"]) for s in consumer_stats),
        "load": c.load_between(win.machine0, win.machine1, psutil.cpu_count() or 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=float, default=DEFAULT_WINDOW_S, help="seconds measured per session")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_WINDOW_S:g} s windows")
    parser.add_argument("--kinds", default="discard,mixed", help="consumer sets to run: discard, mixed")
    parser.add_argument("--repeat", type=int, default=1, help="ABBA pairs per kind (medians shown)")
    parser.add_argument("--no-control", action="store_true",
                        help=f"skip the control run with {CONTROL_SIZE[0]}x{CONTROL_SIZE[1]} frames")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                        help="before each repeat, wait up to S seconds for the machine to be under 20%% busy")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    window = QUICK_WINDOW_S if args.quick else args.window
    kinds = [k for k in args.kinds.split(",") if k]
    if any(k not in KINDS for k in kinds) or not kinds:
        parser.error(f"--kinds: choose from {', '.join(KINDS)}")
    if not 0 < window <= 120 or not 1 <= args.repeat <= 5:
        parser.error("--window in (0, 120], --repeat in 1..5")
    busy = c.begin_run()
    code = code_version()
    runs: list[dict[str, Any]] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cpcli-bench-fanout-") as tmp:
        step = 0
        for rep in range(args.repeat):
            for kind in kinds:
                order = (True, False) if step % 2 == 0 else (False, True)  # ABBA
                step += 1
                for shared in order:
                    if args.wait_quiet > 0:
                        c.log(f"  machine {c.wait_quiet(args.wait_quiet):.0f}% busy before this session")
                    c.log(f"[{rep + 1}/{args.repeat}] {kind}, {'shm' if shared else 'tcp'}: "
                          f"{CAMERAS} cameras x {CONSUMERS} consumers, {window:g} s window ...")
                    runs.append(run_one(Path(tmp), kind, shared, window))
        if not args.no_control:
            c.log(f"control: discard, {CONTROL_SIZE[0]}x{CONTROL_SIZE[1]} frames (inline on both paths), "
                  f"{window:g} s window ...")
            runs.append(run_one(Path(tmp), "discard", True, window, CONTROL_SIZE))
    elapsed = time.monotonic() - started
    code["changed_during_run"] = code_version()["sources_sha256"] != code["sources_sha256"]
    summary = []
    for kind in kinds:
        sel = {t: [r for r in runs if r["kind"] == kind and r["transport"] == t and r["size"] == f"{WIDTH}x{HEIGHT}"]
               for t in ("shm", "tcp")}
        shm_ms = c.median(r["cpu_ms_per_frame"] for r in sel["shm"])
        tcp_ms = c.median(r["cpu_ms_per_frame"] for r in sel["tcp"])
        summary.append({"kind": kind, "shm_ms_per_frame": shm_ms, "tcp_ms_per_frame": tcp_ms,
                        "ratio": c.ratio(shm_ms, tcp_ms), "met": c.ratio(shm_ms, tcp_ms) <= TARGET_RATIO})
    info = machine()
    if args.json:
        print(json.dumps({"machine": info, "code": code, "busy_before_pct": busy, "elapsed_s": elapsed,
                          "window_s": window, "runs": runs, "summary": summary}, indent=2))
        return 0
    print(provenance(info, busy, code))
    print(f"{CAMERAS} x test_video {WIDTH}x{HEIGHT}@{RATE_HZ} (precomputed frames), {CONSUMERS} consumers each "
          f"(sync: latest), {runs[0]['window_s']:.0f} s windows; CPU = user+sys of the "
          f"{CAMERAS * (CONSUMERS + 1)} node processes; frames = frames received by consumers; "
          "main/thr = ms per delivered frame in the nodes' main threads / in their other threads (ZeroMQ's I/O "
          "threads; in `mixed` also OpenCV's worker threads of grayscale)\n")
    head = ["consumers", "frames of", "path", "CPU s", "frames", "fps", "CPU ms/frame", "cams main/thr",
            "consumers main/thr", "% of machine", "supervisor s", "dropped", "skipped", "pool drops", "p50 ms",
            "others' load %"]

    def per_frame(r: dict[str, Any], key: str) -> str:
        return f"{1000 * r[key] / r['frames_delivered']:.3f}" if r["frames_delivered"] else "-"

    rows = [[r["kind"], r["size"], r["transport"], f"{r['cpu_s']:.2f}", r["frames_delivered"],
             f"{r['delivered_fps']:.0f}", f"{r['cpu_ms_per_frame']:.3f}",
             f"{per_frame(r, 'cpu_cams_main_s')} / {per_frame(r, 'cpu_cams_threads_s')}",
             f"{per_frame(r, 'cpu_consumers_main_s')} / {per_frame(r, 'cpu_consumers_threads_s')}",
             f"{r['cpu_pct_of_machine']:.0f}", f"{r['cpu_supervisor_s']:.2f}", r["dropped_in"], r["skipped_in"],
             r["dropped_out"], f"{r['latency_p50_ms']:.2f}", f"{r['load']['others_pct']:.0f}"] for r in runs]
    print(c.table(head, rows))
    print()
    for s in summary:
        print(c.verdict(s["met"], f"{s['kind']}: CPU per delivered frame shm / tcp <= {TARGET_RATIO}: "
                                  f"{s['ratio']:.2f} ({s['shm_ms_per_frame']:.3f} vs {s['tcp_ms_per_frame']:.3f} ms)"))
    control = [r for r in runs if r["size"] != f"{WIDTH}x{HEIGHT}"]
    for s in summary:
        if control and s["kind"] == "discard":
            floor = control[0]["cpu_ms_per_frame"]
            print(f"floor   discard: a frame that copies nothing ({control[0]['size']}, control run) costs "
                  f"{floor:.3f} ms = {c.ratio(floor, s['tcp_ms_per_frame']):.2f}x the TCP path's 640x480 frame: "
                  "the lowest ratio shared memory could reach with today's per-frame overhead")
    print(f"\n(total {elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
