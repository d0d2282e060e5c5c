"""Same-host data plane (issue 9): ours vs a bare one-copy shared-memory ring vs dora-rs 1.1.0.

Run as a plain script (not a pytest test):

    python benchmarks/shm.py               # 3 s per run, 3 interleaved repeats: about 3 minutes
    python benchmarks/shm.py --quick       # 1.5 s per run, one repeat: about 1 minute
    python benchmarks/shm.py --no-dora     # without the dora-rs column
    python benchmarks/shm.py --json        # the results as JSON on stdout

Every number comes from this one run, 1920x1080x3 and 640x480x3 uint8 frames, node -> node:

- ours: a real session (`run_session`) of `test_video {rate_hz: 0, precomputed: 8, copy: true}` ->
  `discard` with `sync: latest` and `sync: all`, same-host shared memory on (the default);
  frames/s = the sink's `samples_in` / recording seconds (the code of throughput.py, reused). The
  source copies each precomputed frame into the shared-memory slot it is sent from
  (`ctx.output_buffer`): one copy per frame, as the ring's producer makes.
- ours shared: `test_video {precomputed: 8}` -> `discard`, `sync: latest`: the 8 frames are
  constants (`ctx.constant`), written to shared memory once and then only referenced, as a
  camera that decodes into a lent slot hands over a frame it never copies. This is the data
  plane's own cost, with no write of the frame at all; it is not comparable with the one-copy
  ring for frames/s (shown for what it is), and is the latency the transport adds.
- ring: the least one-copy shared-memory transport two Python processes can do: a /dev/shm file
  of --ring-slots slots (default 8); the producer `np.copyto`s each of the same 8 precomputed frames into the
  next free slot and writes its sequence number into a FIFO; the consumer reads the number,
  checks the slot's sequence counter, touches one byte of a numpy view and hands the slot back
  through a second FIFO (credit-based: the producer never overwrites an unreleased slot).
- dora-rs 1.1.0, when available: installed from PyPI into a throwaway venv under /tmp (never a
  project dependency); `dora run` of a two-node Python dataflow (benchmarks/dora_bench/), the
  source sending pyarrow frames as fast as it can, the sink counting frames, losses and
  reordering by sequence number. It runs inside a network namespace of its own with only
  loopback (and zenoh multicast scouting off), so nothing it opens can reach the network.
  Default pool (8 MB) and a 64 MB pool (`DORA_NODE_SHM_POOL_SIZE`), as in the issue.
- raw pyzmq: PUB -> SUB over loopback TCP, the same 8 precomputed frames sent zero-copy
  (throughput.py's baseline): what two Python processes get from ZeroMQ alone, no shared memory.
- latency at 30 frames/s: ours (the sink's capture -> step p50), the ring and dora
  (source stamp -> consumer sees it); and, to split the hand-off from the copy, 16x16 frames
  through the ring (a pipe wake-up) and through raw pyzmq (a ZeroMQ TCP hop: what carries our
  slot references).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import multiprocessing as mp
import os
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import _common as c
import numpy as np
import psutil
from throughput import code_version, machine, precomputed_frames, provenance, run_ours, run_raw

SIZES = {"1080p": (1920, 1080), "640x480": (640, 480)}
HOP_SIZE = "16x16"  # tiny frames at 30 fps: what the hand-off alone costs (ring: a pipe; raw pyzmq: a TCP hop)
DEFAULT_DURATION_S = 3.0
QUICK_DURATION_S = 1.5
DEFAULT_REPEAT = 3
LATENCY_RATE_HZ = 30.0
LATENCY_DURATION_S = 3.0  # about 90 frames per latency run
RING_SLOTS = 8
RING_HEADER_BYTES = 4096  # per slot (seq, t_ns) int64 pairs; slots start page-aligned after it
HANDSHAKE_TIMEOUT_S = 30.0
RUN_LIMIT_S = 60.0  # on top of the run's duration: a process still going then is broken
TARGET_RATIO = {"1080p": 0.8, "640x480": 0.4}  # issue: ours >= this x the bare ring
TARGET_P50_MS = {"1080p": 0.8, "640x480": 0.4}  # issue: latency p50 at 30 fps
DORA_VERSION = "1.1.0"
DORA_POOLS = {"dora 8MB": None, "dora 64MB": 64 * 1024 * 1024}  # None: dora's default pool (8 MB)
DORA_DEFAULT_POOL_MB = 8
DORA_INSTALL_TIMEOUT_S = 600
DORA_BENCH = c.BENCH_DIR / "dora_bench"
SYSTEMS = ("ring", "ours latest", "ours all", "ours shared", "raw pyzmq", *DORA_POOLS)
DRAWN_SYSTEMS = ("ours latest", "ours all")  # one write per frame: what the ring is compared with


@dataclass
class Run:
    """One measurement of one system at one size."""

    fps: float
    sent: int
    received: int
    duration_s: float
    p50_ms: float
    p99_ms: float
    lost: int = 0  # sent and never received (dora: unique frames missing; ours: sequence gaps)
    skipped: int = 0  # ours `latest`: received or referenced but replaced before a step (by policy)
    reordered: int = 0  # arrived after a higher sequence number
    bad: int = 0  # ring: a slot whose sequence counter did not match (torn or overwritten)


@dataclass
class Results:
    throughput: dict[str, dict[str, list[Run]]] = field(default_factory=dict)  # size -> system -> runs
    latency: dict[str, dict[str, list[Run]]] = field(default_factory=dict)
    dora: str = "not tried"
    loads: list[dict[str, Any]] = field(default_factory=list)

    def add(self, kind: str, size: str, system: str, run: Run) -> None:
        getattr(self, kind).setdefault(size, {}).setdefault(system, []).append(run)


# -- the bare ring -----------------------------------------------------------------------------

_SEQ = struct.Struct("<q")


def _ring_layout(width: int, height: int, slots: int) -> tuple[int, int, int]:
    nbytes = width * height * 3
    stride = (nbytes + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
    return nbytes, stride, RING_HEADER_BYTES + slots * stride


def _ring_map(path: str, width: int, height: int, slots: int) -> tuple[mmap.mmap, np.ndarray, list[np.ndarray]]:
    nbytes, stride, size = _ring_layout(width, height, slots)
    fd = os.open(path, os.O_RDWR)
    try:
        mm = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    header = np.frombuffer(mm, dtype=np.int64, count=2 * slots)
    views = [np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=RING_HEADER_BYTES + i * stride)
             .reshape(height, width, 3) for i in range(slots)]
    return mm, header, views


def ring_producer(path: str, ready_fifo: str, free_fifo: str, width: int, height: int, slots: int,
                  rate_hz: float, duration_s: float, conn: Connection) -> None:
    """Copy each frame into the next free slot (the one copy), then announce its number."""
    frames = precomputed_frames(width, height)
    _mm, header, views = _ring_map(path, width, height, slots)
    ready = os.open(ready_fifo, os.O_WRONLY)  # blocks until the consumer opened its end
    free = os.open(free_fifo, os.O_RDONLY)
    credits, sent, aborted = slots, 0, False
    period_ns = int(1e9 / rate_hz) if rate_hz > 0 else 0
    start = time.monotonic_ns()
    end = start + int(duration_s * 1e9)
    next_ns = start
    try:
        while (now := time.monotonic_ns()) < end and not aborted:
            if period_ns:
                if now < next_ns:
                    time.sleep((next_ns - now) / 1e9)  # pacing, not synchronization
                next_ns += period_ns
            while credits == 0:  # every slot unreleased: wait for the consumer to hand one back
                if not select.select([free], [], [], 1.0)[0]:
                    if time.monotonic_ns() > end + int(RUN_LIMIT_S * 1e9):
                        aborted = True
                        break
                    continue
                data = os.read(free, 8 * slots)
                if not data:
                    aborted = True
                    break
                credits += len(data) // 8
            if aborted:
                break
            slot = sent % slots
            header[2 * slot + 1] = time.monotonic_ns()  # capture time of this frame
            header[2 * slot] = sent
            np.copyto(views[slot], frames[sent % len(frames)])
            os.write(ready, _SEQ.pack(sent))
            credits -= 1
            sent += 1
        send_s = (time.monotonic_ns() - start) / 1e9
    finally:
        os.close(ready)  # end of stream: the consumer drains and reports
    conn.send({"sent": sent, "send_s": send_s, "aborted": aborted})
    os.close(free)


def ring_consumer(path: str, ready_fifo: str, free_fifo: str, width: int, height: int, slots: int,
                  conn: Connection) -> None:
    """Read each announced slot in place (a view, one byte touched), then release it."""
    _mm, header, views = _ring_map(path, width, height, slots)
    ready = os.open(ready_fifo, os.O_RDONLY)
    free = os.open(free_fifo, os.O_WRONLY)
    received = bad = reordered = lost = 0
    next_seq = 0
    latencies: list[int] = []
    checksum = 0
    pending = b""
    deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S + RUN_LIMIT_S * 2
    while time.monotonic() < deadline:
        if not select.select([ready], [], [], 1.0)[0]:
            continue
        data = os.read(ready, 8 * slots)
        if not data:
            break  # the producer closed: every frame announced was read
        now = time.monotonic_ns()
        pending += data
        count = len(pending) // 8
        seqs = struct.unpack(f"<{count}q", pending[: 8 * count])
        pending = pending[8 * count:]
        for seq in seqs:
            slot = seq % slots
            if int(header[2 * slot]) != seq:
                bad += 1  # overwritten before we read it: must never happen with credits
            if seq < next_seq:
                reordered += 1
            elif seq > next_seq:
                lost += seq - next_seq
            next_seq = max(next_seq, seq + 1)
            latencies.append(now - int(header[2 * slot + 1]))
            checksum ^= int(views[slot][0, 0, 0])
            received += 1
        with contextlib.suppress(BrokenPipeError):  # the producer may have finished already
            os.write(free, bytes(8 * count))  # release these slots
    os.close(free)
    os.close(ready)
    p50, p99 = (np.percentile(np.array(latencies), [50, 99]) / 1e6) if latencies else (0.0, 0.0)
    conn.send({"received": received, "bad": bad, "reordered": reordered, "lost": lost,
               "p50_ms": float(p50), "p99_ms": float(p99)})


def run_ring(width: int, height: int, rate_hz: float, duration_s: float, slots: int = RING_SLOTS) -> Run:
    """The ring in two spawned processes; its file and FIFOs removed, its processes joined by pid."""
    ctx = mp.get_context("spawn")
    tmp = Path(tempfile.mkdtemp(prefix="cpb-ring-"))
    shm_path = Path("/dev/shm") / f"{c.NS_PREFIX}{os.getpid()}_ring"
    ready_fifo, free_fifo = tmp / "ready", tmp / "free"
    procs: list[mp.process.BaseProcess] = []
    try:
        os.mkfifo(ready_fifo)
        os.mkfifo(free_fifo)
        fd = os.open(shm_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(fd, _ring_layout(width, height, slots)[2])
        os.close(fd)
        pub_end, pub_conn = ctx.Pipe()
        sub_end, sub_conn = ctx.Pipe()
        procs.append(ctx.Process(target=ring_consumer, daemon=True, args=(
            str(shm_path), str(ready_fifo), str(free_fifo), width, height, slots, sub_conn)))
        procs.append(ctx.Process(target=ring_producer, daemon=True, args=(
            str(shm_path), str(ready_fifo), str(free_fifo), width, height, slots, rate_hz, duration_s, pub_conn)))
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S + duration_s + RUN_LIMIT_S
        got: dict[int, dict[str, Any]] = {}
        while len(got) < 2 and time.monotonic() < deadline:
            for i, end in enumerate((pub_end, sub_end)):
                if i not in got and end.poll(0.05):
                    got[i] = end.recv()
            if any(not p.is_alive() and p.exitcode != 0 for p in procs):
                raise RuntimeError("a ring benchmark process failed (see its traceback above)")
        if len(got) < 2:
            raise RuntimeError("ring benchmark processes did not finish in time")
        pub, sub = got[0], got[1]
    finally:
        for proc in procs:
            proc.join(5)
            if proc.is_alive() and proc.pid is not None:
                c.log(f"ring process {proc.pid} did not exit: ending it")
                c.end_processes([proc.pid])
        with contextlib.suppress(OSError):
            shm_path.unlink()
        shutil.rmtree(tmp, ignore_errors=True)
    if pub["aborted"]:
        raise RuntimeError("ring producer aborted (the consumer stopped releasing slots)")
    return Run(fps=sub["received"] / pub["send_s"], sent=pub["sent"], received=sub["received"],
               duration_s=pub["send_s"], p50_ms=sub["p50_ms"], p99_ms=sub["p99_ms"],
               lost=pub["sent"] - sub["received"], reordered=sub["reordered"], bad=sub["bad"])


# -- ours --------------------------------------------------------------------------------------


def run_cpcli(work: Path, width: int, height: int, rate_hz: float, system: str, duration_s: float) -> Run:
    shared = system == "ours shared"
    sync = "latest" if shared else system.split()[1]
    m = run_ours(work, width, height, rate_hz, sync, "shm", duration_s, copy=not shared)
    return Run(fps=m.fps, sent=m.sent, received=m.received, duration_s=m.duration_s, p50_ms=m.p50_ms,
               p99_ms=m.p99_ms, lost=m.dropped, skipped=m.skipped)


# -- dora-rs -----------------------------------------------------------------------------------


class Dora:
    """dora-rs in a throwaway venv, run inside a loopback-only network namespace of our own."""

    def __init__(self, venv: Path, fresh: bool) -> None:
        self.venv = venv
        self.fresh = fresh
        self.netns = c.Netns("d")
        self.ns: str | None = None
        self.work = Path(tempfile.mkdtemp(prefix="cpb-dora-"))
        self.leaked_segments = 0  # /dev/shm/*.zenoh files still there after a run (we remove them)

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    def prepare(self) -> str:
        """Install (or reuse) dora-rs and make the namespace; returns a description."""
        if self.fresh:
            self._remove_venv()
        if not self._version_ok():
            self._remove_venv()
            c.log(f"dora-rs: creating {self.venv} and installing dora-rs=={DORA_VERSION} from PyPI ...")
            subprocess.run([sys.executable, "-m", "venv", str(self.venv)], check=True, capture_output=True,
                           timeout=120)
            pip = subprocess.run([str(self.bin / "pip"), "install", "-q", f"dora-rs=={DORA_VERSION}",
                                  f"dora-rs-cli=={DORA_VERSION}"], capture_output=True, text=True,
                                 timeout=DORA_INSTALL_TIMEOUT_S)
            if pip.returncode != 0:
                tail = (pip.stderr or pip.stdout).strip().splitlines()[-1:] or ["?"]
                raise RuntimeError(f"pip install failed: {tail[0]}")
            if not self._version_ok():
                raise RuntimeError(f"`dora --version` is not {DORA_VERSION} after the install")
        self.ns = self.netns.add("dora")
        return f"dora-cli {DORA_VERSION} in {self.venv}, run in namespace {self.ns} (loopback only)"

    def _remove_venv(self) -> None:
        """Delete the venv, but only one that is a venv (never a folder given by mistake)."""
        if not self.venv.exists():
            return
        if not (self.venv / "pyvenv.cfg").is_file():
            raise RuntimeError(f"{self.venv} exists and is not a venv: refusing to replace it")
        shutil.rmtree(self.venv)

    def _version_ok(self) -> bool:
        try:
            out = subprocess.run([str(self.bin / "dora"), "--version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return False
        return out.returncode == 0 and DORA_VERSION in out.stdout

    def run(self, width: int, height: int, rate_hz: float, duration_s: float, pool_bytes: int | None) -> Run:
        assert self.ns is not None
        run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=self.work))
        common = {"W": str(width), "H": str(height), "DURATION_S": str(duration_s), "RATE_HZ": str(rate_hz)}
        dataflow = {"nodes": [
            {"id": "source", "path": str(DORA_BENCH / "source.py"), "outputs": ["frame"],
             "env": {**common, "RESULT": str(run_dir / "source.json")}},
            {"id": "sink", "path": str(DORA_BENCH / "sink.py"), "inputs": {"frame": "source/frame"},
             "env": {**common, "RESULT": str(run_dir / "sink.json")}},
        ]}
        (run_dir / "dataflow.yml").write_text(json.dumps(dataflow, indent=1), encoding="utf-8")  # JSON is YAML
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DORA_", "VIRTUAL_ENV", "PYTHON"))}
        env.update(PATH=f"{self.bin}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(self.venv),
                   DORA_ZENOH_MULTICAST="off", RUST_LOG="error")
        if pool_bytes is not None:
            env["DORA_NODE_SHM_POOL_SIZE"] = str(pool_bytes)
        cmd = [*c.Netns.exec_prefix(self.ns), str(self.bin / "dora"), "run", str(run_dir / "dataflow.yml"),
               "--stop-after", f"{int(duration_s + 30)}s"]
        limit = duration_s + RUN_LIMIT_S
        shm_before = set(os.listdir("/dev/shm"))
        with open(run_dir / "dora.log", "wb") as log:
            proc = subprocess.Popen(cmd, cwd=run_dir, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            tree: set[int] = set()
            deadline = time.monotonic() + limit
            try:
                while proc.poll() is None and time.monotonic() < deadline:
                    with contextlib.suppress(psutil.Error):  # remember the nodes, to end them by pid
                        tree.update(p.pid for p in psutil.Process(proc.pid).children(recursive=True))
                    time.sleep(0.2)
            finally:
                if proc.poll() is None:
                    over = "over its limit" if time.monotonic() >= deadline else "interrupted"
                    c.log(f"dora run (pid {proc.pid}) still running ({over}): ending it and its nodes")
                    c.end_processes([proc.pid, *tree])
                    proc.wait(10)
                leftover = [p for p in tree if psutil.pid_exists(p)]
                if leftover:
                    c.end_processes(leftover)
                for name in set(os.listdir("/dev/shm")) - shm_before:  # zenoh segments dora left behind
                    if name.endswith(".zenoh"):
                        self.leaked_segments += 1
                        with contextlib.suppress(OSError):
                            os.unlink(Path("/dev/shm") / name)
        try:
            src = json.loads((run_dir / "source.json").read_text())
            sink = json.loads((run_dir / "sink.json").read_text())
        except (OSError, ValueError) as err:
            tail = (run_dir / "dora.log").read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"no result from the dataflow ({err}); log: {' | '.join(tail)}") from err
        return Run(fps=sink["received"] / src["send_s"], sent=src["sent"], received=sink["received"],
                   duration_s=src["send_s"], p50_ms=sink["p50_ms"], p99_ms=sink["p99_ms"],
                   lost=src["sent"] - sink["unique"], reordered=sink["reordered"])

    def close(self) -> list[str]:
        shutil.rmtree(self.work, ignore_errors=True)
        return self.netns.close()


# -- the run -----------------------------------------------------------------------------------


def quiet(args: argparse.Namespace) -> None:
    if args.wait_quiet > 0:
        busy = c.wait_quiet(args.wait_quiet)
        c.log(f"  machine {busy:.0f}% busy before this repeat")


def measure(args: argparse.Namespace, results: Results, dora: Dora | None) -> None:
    duration = args.duration
    with tempfile.TemporaryDirectory(prefix="cpcli-bench-shm-") as tmp:
        work = Path(tmp)

        def one(kind: str, size: str, system: str, rate_hz: float, dur: float) -> None:
            w, h = SIZES[size] if size in SIZES else (int(x) for x in size.split("x"))
            c.log(f"  {kind} {size} {system} ...")
            try:
                if system == "ring":
                    run = run_ring(w, h, rate_hz, dur, args.ring_slots)
                elif system == "raw pyzmq":
                    m = run_raw(w, h, rate_hz, dur)
                    run = Run(fps=m.fps, sent=m.sent, received=m.received, duration_s=m.duration_s,
                              p50_ms=m.p50_ms, p99_ms=m.p99_ms, lost=m.sent - m.received)
                elif system.startswith("ours"):
                    run = run_cpcli(work, w, h, rate_hz, system, dur)
                else:
                    assert dora is not None
                    run = dora.run(w, h, rate_hz, dur, DORA_POOLS[system])
            except RuntimeError as err:
                if not system.startswith("dora"):
                    raise
                c.log(f"  dora-rs run failed: {err}")
                results.dora += f"; a run failed ({err})"
                return
            results.add(kind, size, system, run)

        systems = [s for s in SYSTEMS if dora is not None or not s.startswith("dora")]
        for rep in range(args.repeat):
            quiet(args)
            c.log(f"[{rep + 1}/{args.repeat}] max rate, {duration:g} s per run")
            load = c.Load().start()
            for size in SIZES:
                order = systems if rep % 2 == 0 else systems[::-1]  # interleaved: load hits all alike
                for system in order:
                    one("throughput", size, system, 0.0, duration)
            results.loads.append({"phase": f"max rate, repeat {rep + 1}", **load.stop()})
        lat_systems = ["ring", "ours latest", "ours shared", "raw pyzmq"] + (["dora 8MB"] if dora is not None else [])
        lat_repeat = min(args.repeat, 2)
        for rep in range(lat_repeat):
            quiet(args)
            c.log(f"[{rep + 1}/{lat_repeat}] {LATENCY_RATE_HZ:g} fps, {args.latency_duration:g} s per run")
            load = c.Load().start()
            for size in SIZES:
                order = lat_systems if rep % 2 == 0 else lat_systems[::-1]
                for system in order:
                    if system.startswith("dora") and rep > 0:
                        continue  # a reference column: once is enough
                    one("latency", size, system, LATENCY_RATE_HZ, args.latency_duration)
            for system in ("ring", "raw pyzmq"):  # the notification alone: a pipe vs a ZeroMQ TCP hop
                one("latency", HOP_SIZE, system, LATENCY_RATE_HZ, args.latency_duration)
            results.loads.append({"phase": f"{LATENCY_RATE_HZ:g} fps, repeat {rep + 1}", **load.stop()})


def _med(runs: list[Run], attr: str) -> float:
    return c.median(float(getattr(r, attr)) for r in runs)


def _ratios(runs: list[Run], base: list[Run]) -> list[float]:
    return [c.ratio(a.fps, b.fps) for a, b in zip(runs, base, strict=False)]


def targets(results: Results) -> list[dict[str, Any]]:
    out = []
    for size, goal in TARGET_RATIO.items():
        runs = results.throughput.get(size, {})
        ring = runs.get("ring", [])
        for system in DRAWN_SYSTEMS:
            ours = runs.get(system, [])
            if not ours or not ring:
                continue
            value = c.ratio(_med(ours, "fps"), _med(ring, "fps"))
            out.append({"target": f"{size} {system} frames/s >= {goal}x bare ring", "value": value,
                        "spread": c.spread(_ratios(ours, ring), "{:.2f}"), "met": value >= goal, "unit": "x"})
    for size, goal in TARGET_P50_MS.items():
        for system, what in (("ours shared", "frames in shared memory, no copy"),
                             ("ours latest", "each frame copied once, like the ring")):
            ours = results.latency.get(size, {}).get(system, [])
            if ours:
                value = _med(ours, "p50_ms")
                out.append({"target": f"{size} latency p50 at {LATENCY_RATE_HZ:g} fps <= {goal} ms ({system}: {what})",
                            "value": value, "spread": c.spread([r.p50_ms for r in ours], "{:.2f}"),
                            "met": value <= goal, "unit": " ms"})
    return out


def render(results: Results, args: argparse.Namespace) -> str:
    out = [f"max rate: {args.duration:g} s per run, medians of {args.repeat} interleaved repeats (range = "
           "min-max over repeats); uint8 BGR frames: ring = 8 precomputed frames, one copy each into its slot; "
           "ours latest/all = the same, copied into the slot they are sent from; ours shared = 8 precomputed "
           "frames in shared memory, referenced (no write: not comparable with the ring); fps = frames received "
           "by the consumer / seconds of sending; lost = sent - received (ours: sequence gaps); skipped = ours "
           "`latest` only, replaced before a step (by policy); reord = arrived after a higher sequence number", ""]
    head = ["size", "system", "fps", "range", "MB/s", "x ring", "x ring range", "lost %", "skipped",
            "reord", "p50/p99 ms at max rate"]
    rows = []
    for size, (w, h) in SIZES.items():
        runs = results.throughput.get(size, {})
        ring = runs.get("ring", [])
        ring_fps = _med(ring, "fps") if ring else float("nan")
        for system in SYSTEMS:
            rs = runs.get(system)
            if not rs:
                continue
            fps = _med(rs, "fps")
            lost_pct = c.median(100.0 * r.lost / r.sent if r.sent else 0.0 for r in rs)
            rows.append([size, system, f"{fps:.0f}", c.spread([r.fps for r in rs]), f"{fps * w * h * 3 / 1e6:.0f}",
                         f"{c.ratio(fps, ring_fps):.2f}", c.spread(_ratios(rs, ring), "{:.2f}"),
                         f"{lost_pct:.1f}", f"{_med(rs, 'skipped'):.0f}", f"{_med(rs, 'reordered'):.0f}",
                         f"{_med(rs, 'p50_ms'):.2f} / {_med(rs, 'p99_ms'):.2f}"])
    out.append(c.table(head, rows))
    out += ["", f"latency at {LATENCY_RATE_HZ:g} frames/s ({args.latency_duration:g} s per run; ours = the sink's "
            "capture -> step, the capture stamped before the frame is copied (ours latest) or handed over (ours "
            "shared); ring, dora and raw pyzmq = stamp before the copy/send -> consumer sees it; "
            f"{HOP_SIZE} = the hand-off alone: a pipe (ring) or a ZeroMQ TCP hop (raw pyzmq), as our slot "
            "references travel)", ""]
    head = ["size", "system", "runs", "p50 ms", "p50 range", "p99 ms", "fps", "lost"]
    rows = []
    for size in [*SIZES, HOP_SIZE]:
        for system, rs in results.latency.get(size, {}).items():
            rows.append([size, system, str(len(rs)), f"{_med(rs, 'p50_ms'):.2f}",
                         c.spread([r.p50_ms for r in rs], "{:.2f}"), f"{_med(rs, 'p99_ms'):.2f}",
                         f"{_med(rs, 'fps'):.1f}", f"{_med(rs, 'lost'):.0f}"])
    out.append(c.table(head, rows))
    bad = sum(r.bad for size in results.throughput.values() for r in size.get("ring", []))
    out += ["", f"ring integrity: {bad} slots read with a wrong sequence counter (must be 0)",
            f"dora-rs: {results.dora}; pools: default = {DORA_DEFAULT_POOL_MB} MB per node "
            "(dora's built-in default), 64 MB via DORA_NODE_SHM_POOL_SIZE", ""]
    for load in results.loads:
        out.append(c.describe_load(load["phase"], load))
    out.append("")
    for t in targets(results):
        out.append(c.verdict(t["met"], f"{t['target']}: {t['value']:.2f}{t['unit']} (repeats {t['spread']})"))
    dora_rows = results.throughput.get("1080p", {})
    for system in DORA_POOLS:
        if dora_rows.get(system) and dora_rows.get("ours all"):
            value = c.ratio(_med(dora_rows["ours all"], "fps"), _med(dora_rows[system], "fps"))
            out.append(f"info    1080p ours all / {system}: {value:.2f}x")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=DEFAULT_DURATION_S, help="seconds per max-rate run")
    parser.add_argument("--latency-duration", type=float, default=LATENCY_DURATION_S,
                        help=f"seconds per {LATENCY_RATE_HZ:g} fps run")
    parser.add_argument("--repeat", type=int, default=DEFAULT_REPEAT, help="interleaved repeats (medians shown)")
    parser.add_argument("--quick", action="store_true", help="1.5 s per run, one repeat")
    parser.add_argument("--no-dora", action="store_true", help="skip the dora-rs column")
    parser.add_argument("--ring-slots", type=int, default=RING_SLOTS, help="slots of the bare ring")
    parser.add_argument("--dora-venv", type=Path,
                        default=Path(tempfile.gettempdir()) / f"cpcli-bench-dora-{DORA_VERSION}",
                        help=f"throwaway venv for dora-rs (reused if it already holds dora-rs {DORA_VERSION})")
    parser.add_argument("--fresh-dora-venv", action="store_true", help="recreate the dora venv")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                        help="before each repeat, wait up to S seconds for the machine to be under 20%% busy")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.latency_duration, args.repeat = QUICK_DURATION_S, 2.0, 1
    if not 0 < args.duration <= 60 or not 0 < args.latency_duration <= 60:
        parser.error("durations must be in (0, 60] seconds")
    if not 1 <= args.repeat <= 10:
        parser.error("--repeat must be in 1..10")
    busy = c.begin_run()
    code = code_version()
    results = Results()
    dora: Dora | None = None
    started = time.monotonic()
    load = c.Load().start()
    try:
        if not args.no_dora:
            dora = Dora(args.dora_venv, args.fresh_dora_venv)
            try:
                results.dora = dora.prepare()
            except (RuntimeError, OSError, subprocess.SubprocessError) as err:
                results.dora = f"unavailable ({err})"
                c.log(f"dora-rs: unavailable ({err})")
                dora.close()
                dora = None
        else:
            results.dora = "skipped (--no-dora)"
        measure(args, results, dora)
    finally:
        if dora is not None:
            results.dora += f"; /dev/shm segments left by dora after its runs (removed by us): {dora.leaked_segments}"
            left = dora.close()
            if left:
                c.log(f"ERROR: network namespaces left behind: {left}")
    total = load.stop()
    elapsed = time.monotonic() - started
    code["changed_during_run"] = code_version()["sources_sha256"] != code["sources_sha256"]
    info = machine()
    if args.json:
        print(json.dumps({"machine": info, "code": code, "busy_before_pct": busy, "load": total,
                          "elapsed_s": elapsed, "dora": results.dora,
                          "args": {k: str(v) for k, v in vars(args).items()},
                          "throughput": {s: {k: [asdict(r) for r in v] for k, v in d.items()}
                                         for s, d in results.throughput.items()},
                          "latency": {s: {k: [asdict(r) for r in v] for k, v in d.items()}
                                      for s, d in results.latency.items()},
                          "loads": results.loads, "targets": targets(results)}, indent=2))
        return 0
    print(provenance(info, busy, code))
    print(render(results, args))
    print(c.describe_load("whole run", total))
    print(f"\n(total {elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
