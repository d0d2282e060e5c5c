"""Cluster scale (issue 4): 16 workers found over mDNS, a 64-node recipe across them, manager CPU idle.

Run as root, as a plain script (not a pytest test):

    python benchmarks/cluster_scale.py              # about 75 s
    python benchmarks/cluster_scale.py --json
    python benchmarks/cluster_scale.py --workers 4  # smoke run: figures printed, no verdict
    python benchmarks/cluster_scale.py --wait-quiet 60  # first wait (<= 60 s) for a machine < 20 % busy

The lab is `tests/lab.py`'s `Lab` (network namespaces on one bridge, 198.18.0.0/24; nothing
leaves them) and `tests/cluster.py`'s `ClusterLab` (`python -m cpcli ...` inside a host, output
in a log file). Host 1 runs `cp manager --no-local-worker`, hosts 2..17 one `cp worker` each with
`--interface` = its lab address and no `--manager` (mDNS). Default `ClusterTiming` throughout.
The lab (namespaces, every process in them) is torn down on every exit path, SIGTERM included.
All times are this machine's monotonic clock, which every namespace shares.

1. join: from just before the 16 worker processes are launched until a `cp status --json` on
   host 1 lists all 16 `ready`; the figure is when that call returned. Each worker's log is read
   every 20 ms: when it printed "found manager" (mDNS done) and "joined manager" (registered), and
   the CPU time it had used by then. `cp status` is launched once every log says "joined" (and
   again until it lists them all): polling it from the launch would take 0.4-0.5 CPU s per call
   from the workers it is timing, on a 2-core machine. So the figure is an upper bound: the last
   "joined manager" line + one `cp status` (both printed).
2. 64 nodes: per worker `cam` (test_video 64x48 at 10 Hz) -> `gray` (grayscale) -> `sink`
   (discard), and `remote` (discard) reading the next worker's `cam` (data across hosts).
   `cp run --duration 5s --json` is launched on host 1; launch -> session start =
   manifest `clock.start_cluster_ns` - launch; launch -> last sink's first sample = that +
   the largest `first_in_ns` of the 32 sinks (session time: the nodes stamp in cluster time and
   START carries the manager's start). Where the time goes: the session folder's creation (RUN
   reached the manager), the workers' "starting" / "recording" lines, each node process's start
   (/proc starttime), when its CPU went flat until the start (done starting: imports, setup,
   wiring), and the CPU every process used until the session started. Node processes are forked
   by each worker's node launcher (`python -m cpcli.runtime.zygote`, started at its first
   session): its CPU (the imports every node shares) is counted on a line of its own.
3. manager CPU idle: after the join (and 3 s of settling), the manager process's user+system
   time over `--idle-window` seconds (psutil, by its pid: `ip netns exec` execs, so the Popen
   pid is the manager itself), as % of one core, split by thread. Measured before step 2.
4. floor (`--no-floor` skips it): the same 4 nodes on one worker alone, and one more worker
   joining alone, on the then idle machine: one laptop's share of the work in a real lab.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import _common as c
import psutil

sys.path.insert(0, str(c.REPO))  # tests/ is not a package on the path when run as a script
from tests.cluster import PORT, ClusterLab, Proc  # noqa: E402
from tests.lab import Lab  # noqa: E402

WORKERS = 16  # the figure; the targets hold for this many
NODES_PER_WORKER = 4
TARGET_JOIN_S = 3.0  # issue: 16 workers discovered within 3 s of starting
TARGET_RUN_S = 5.0  # issue: a 64-node recipe running (first sample at every sink) within 5 s
TARGET_MANAGER_CPU_PCT = 5.0  # issue: manager CPU while 16 workers heartbeat idle, % of one core
VIDEO = (64, 48, 10.0)  # width, height, rate_hz of each source: start-up is measured, not throughput
RUN_DURATION_S = 5  # the session's --duration (counted from its start)
LOG_POLL_S = 0.02  # how often worker logs are read: the resolution of the per-worker times
SCAN_S = 0.1  # how often node processes are looked for and their CPU read during the run
JOIN_LIMIT_S = 90.0  # launch -> all joined, at most (far beyond any target: something is broken)
RUN_LIMIT_S = 180.0  # `cp run` launch -> exit, at most (its nodes' ready timeout is 30 s)
STATUS_LIMIT_S = 30.0  # one `cp status`
SETTLED_CPU_S = 0.02  # a node process that used less than this until the start was done starting
SETTLE_S = 3.0  # after the join, before the idle window: registration work and the status calls end
DEFAULT_IDLE_WINDOW_S = 20.0
STOP_GRACE_S = 10.0  # our cluster processes after SIGTERM, before the lab's teardown kills them
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- small readers ---------------------------------------------------------------------------------


class LogWatch:
    """When each needle first appeared in a growing log file (monotonic seconds), read incrementally."""

    def __init__(self, path: Path, needles: tuple[str, ...]) -> None:
        self.path, self.needles = path, needles
        self.seen: dict[str, float] = {}
        self._offset = 0
        self._partial = b""

    def poll(self, now: float) -> None:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                chunk = fh.read()
        except FileNotFoundError:
            return
        self._offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            text = line.decode(errors="replace")
            for needle in self.needles:
                if needle not in self.seen and needle in text:
                    self.seen[needle] = now


def _boot_offset_s() -> float:
    """CLOCK_BOOTTIME - CLOCK_MONOTONIC: turns /proc starttime (since boot) into monotonic seconds."""
    return time.clock_gettime(time.CLOCK_BOOTTIME) - time.monotonic()


def _proc_times(pid: int) -> tuple[float, float] | None:
    """(start, cpu): monotonic start time and user+system seconds of process `pid`, from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # proc(5) fields 14 utime, 15 stime, 22 starttime: indexes 11, 12, 19 counting from field 3 (state)
    return int(stat[19]) / CLK_TCK - _boot_offset_s(), (int(stat[11]) + int(stat[12])) / CLK_TCK


def _cpu_s(pid: int) -> float:
    times = _proc_times(pid)
    return times[1] if times else float("nan")


def _children(pid: int) -> list[int]:
    """Child pids of process `pid`, from /proc (cheap: no scan of every process, unlike psutil)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError, ValueError):
            found += [int(x) for x in task.read_text().split()]
    return found


def _node_of(pid: int) -> str:
    """The node id of a node process (`python -m cpcli.runtime.driver ... --node ID ...`), or ''."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").split()  # forked: one string
        return argv[argv.index(b"--node") + 1].decode()
    return ""


def _is_zygote(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return b"cpcli.runtime.zygote" in Path(f"/proc/{pid}/cmdline").read_bytes()
    return False


def _read_json(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


# -- 1. join ---------------------------------------------------------------------------------------


@dataclass
class WorkerJoin:
    name: str
    host: str
    found_s: float | None  # launch -> its "found manager" line (mDNS answered)
    joined_s: float | None  # launch -> its "joined manager" line (registered)
    cpu_s: float  # its CPU time when the joined line was seen


@dataclass
class StatusCall:
    launched_s: float
    returned_s: float
    ready: int
    exit_code: int


@dataclass
class JoinResult:
    launch_spread_s: float  # time to launch all the worker processes
    all_ready_s: float | None  # launch -> the `cp status` call listing all of them ready returned
    all_ready_call_launched_s: float | None
    last_joined_s: float | None
    workers: list[WorkerJoin]
    status_calls: list[StatusCall]
    load: dict[str, float]  # launch -> all ready: this benchmark (the lab) vs everything else


def _status_ready(path: Path, names: set[str]) -> int:
    try:
        status = _read_json(path)
    except (OSError, ValueError):
        return -1
    return sum(1 for w in status.get("workers", []) if w.get("name") in names and w.get("state") == "ready")


def measure_join(lab: Lab, cluster: ClusterLab, work: Path, names: list[str], hosts: list[int], address: str
                 ) -> tuple[JoinResult, list[Proc]]:
    """Launch a worker named names[i] on lab host hosts[i] each, and time them until all are ready."""
    load = c.Load().start()
    t0 = time.monotonic()
    procs = [cluster.worker(host, name, wait=False) for host, name in zip(hosts, names, strict=True)]
    launched = time.monotonic() - t0
    watches = {name: LogWatch(proc.log, ("found manager", "joined manager")) for name, proc in zip(names, procs,
                                                                                                    strict=True)}
    cpu: dict[str, float] = {}
    calls: list[StatusCall] = []
    status: subprocess.Popen[Any] | None = None
    status_out = work / "status.json"
    status_launched = 0.0
    all_ready: StatusCall | None = None
    deadline = t0 + JOIN_LIMIT_S
    try:
        while all_ready is None:
            now = time.monotonic()
            if now > deadline:
                missing = [n for n, w in watches.items() if "joined manager" not in w.seen]
                raise RuntimeError(f"not all workers ready within {JOIN_LIMIT_S:g} s; not joined: {missing}; "
                                   f"logs in {work / 'logs'}")
            for name, proc in zip(names, procs, strict=True):
                watch = watches[name]
                watch.poll(now - t0)
                if "joined manager" in watch.seen and name not in cpu:
                    cpu[name] = _cpu_s(proc.pid)
                if proc.popen.poll() is not None:
                    raise RuntimeError(f"worker {name} exited ({proc.popen.returncode}):\n{proc.text()}")
            if status is None and len(cpu) == len(names):  # every worker says it joined: confirm
                with open(status_out, "wb") as out:
                    status_launched = time.monotonic() - t0
                    status = lab.run(1, [sys.executable, "-m", "cpcli", "status", "--json", "--manager", address],
                                     stdout=out, stderr=subprocess.DEVNULL, env=cluster.env, cwd=work)
            elif status is not None and status.poll() is not None:
                call = StatusCall(status_launched, time.monotonic() - t0,
                                  _status_ready(status_out, set(names)), status.returncode)
                calls.append(call)
                status = None
                if call.ready == len(names):
                    all_ready = call
            elif status is not None and time.monotonic() - t0 - status_launched > STATUS_LIMIT_S:
                raise RuntimeError(f"`cp status` did not return within {STATUS_LIMIT_S:g} s")
            time.sleep(LOG_POLL_S)
    finally:
        if status is not None and status.poll() is None:  # ours, by its pid
            status.kill()
            status.wait(5)
    machine = load.stop()
    joins = [WorkerJoin(name, lab.ip(host), watches[name].seen.get("found manager"),
                        watches[name].seen.get("joined manager"), cpu.get(name, float("nan")))
             for host, name in zip(hosts, names, strict=True)]
    joined = [j.joined_s for j in joins if j.joined_s is not None]
    return JoinResult(launched, all_ready.returned_s, all_ready.launched_s, max(joined) if joined else None,
                      joins, calls, machine), procs


# -- 3. manager idle -------------------------------------------------------------------------------


@dataclass
class IdleResult:
    window_s: float
    manager_pct: float  # % of one core
    manager_threads_pct: dict[str, float]
    workers_pct_each: float  # mean over the workers, % of one core
    workers_pct_max: float
    machine: dict[str, float]
    ready_after: int  # workers still `ready` in a `cp status` after the window
    lost_lines: int  # "lost" announcements in the manager's log during the window


def _threads(pid: int) -> dict[str, float]:
    """CPU seconds per thread kind of process `pid`: main, ZeroMQ (ZMQbg/*), other Python threads."""
    out: dict[str, float] = {}
    with contextlib.suppress(psutil.Error):
        for thread in psutil.Process(pid).threads():
            try:
                comm = Path(f"/proc/{pid}/task/{thread.id}/comm").read_text().strip()
            except OSError:
                comm = "?"
            kind = "main" if thread.id == pid else "zmq I/O" if comm.startswith("ZMQbg") else \
                "other threads (zeroconf, clock probes)"
            out[kind] = out.get(kind, 0.0) + thread.user_time + thread.system_time
    return out


def measure_idle(cluster: ClusterLab, manager: Proc, workers: list[Proc], address: str, window_s: float,
                 names: list[str]) -> IdleResult:
    c.log(f"3. manager CPU while {len(workers)} workers heartbeat idle: {SETTLE_S:g} s settle + {window_s:g} s ...")
    time.sleep(SETTLE_S)
    log_before = len(manager.text())
    threads_a = _threads(manager.pid)
    load = c.Load().start()
    t_a = time.monotonic()
    mgr_a = _cpu_s(manager.pid)
    wk_a = [_cpu_s(w.pid) for w in workers]
    time.sleep(window_s)
    t_b = time.monotonic()
    mgr_b = _cpu_s(manager.pid)
    wk_b = [_cpu_s(w.pid) for w in workers]
    machine = load.stop()
    threads_b = _threads(manager.pid)
    wall = t_b - t_a
    per_worker = [100.0 * (b - a) / wall for a, b in zip(wk_a, wk_b, strict=True)]
    status = cluster.status(1, address)
    ready = sum(1 for w in status["workers"] if w["name"] in names and w["state"] == "ready")
    return IdleResult(wall, 100.0 * (mgr_b - mgr_a) / wall,
                      {k: 100.0 * (threads_b.get(k, 0.0) - v) / wall for k, v in threads_a.items()},
                      sum(per_worker) / len(per_worker), max(per_worker), machine, ready,
                      manager.text()[log_before:].count(" lost ("))


# -- 2. the 64-node recipe -------------------------------------------------------------------------


def recipe_text(names: list[str]) -> str:
    width, height, rate_hz = VIDEO
    lines = ["name: cluster-scale", "nodes:"]
    for i, worker in enumerate(names):
        k, upstream = f"{i + 1:02d}", f"cam_{(i + 1) % len(names) + 1:02d}"
        lines += [f"  cam_{k}:", "    type: test_video", f"    worker: {worker}",
                  f"    params: {{width: {width}, height: {height}, rate_hz: {rate_hz:g}}}",
                  f"  gray_{k}:", "    type: grayscale", f"    worker: {worker}", f"    inputs: [cam_{k}]",
                  f"  sink_{k}:", "    type: discard", f"    worker: {worker}", f"    inputs: [gray_{k}]",
                  f"  remote_{k}:", "    type: discard", f"    worker: {worker}", f"    inputs: [{upstream}]"]
    return "\n".join(lines) + "\n"


@dataclass
class NodeStart:
    node: str
    type: str
    worker: str
    spawned_s: float | None  # launch -> its process started
    cpu_to_start_s: float | None  # its CPU until the session started
    first_in_s: float | None  # session time (manager's start = 0) of its first sample; None for sources


@dataclass
class RunResult:
    exit_code: int
    status: str
    session_dir: str
    nodes: int
    sinks: int
    run_received_s: float | None  # launch -> the session folder exists on the manager (RUN handled)
    prepare_seen_s: dict[str, float]  # launch -> each worker's "starting N nodes" line
    recording_seen_s: dict[str, float]  # launch -> each worker's "recording" line (START handled)
    session_started_s: float  # launch -> manifest clock.start_cluster_ns
    last_sink: str
    last_sink_first_in_s: float  # its first_in_ns (session time)
    launch_to_last_sink_s: float  # session_started_s + last_sink_first_in_s
    sinks_without_sample: list[str]
    dropped_in: int
    drops: dict[str, dict[str, int]]  # node -> input -> samples lost (sequence gaps), where any
    node_cpu_to_start_s: float  # sum over node processes
    zygote_cpu_to_start_s: float  # sum over the workers' node launchers (they fork the node processes)
    worker_cpu_to_start_s: float  # the worker processes' own CPU, launch -> session start
    manager_cpu_to_start_s: float
    cp_run_cpu_to_start_s: float  # the `cp run` process (client)
    bench_cpu_to_start_s: float  # this benchmark's own process (log reading, /proc sampling)
    load: dict[str, float]  # launch -> the first worker's "recording" line (about the session start)
    settled_s: list[float]  # launch -> each node process's CPU went flat until the start (done starting)
    nodes_detail: list[NodeStart] = field(default_factory=list)


def measure_run(lab: Lab, cluster: ClusterLab, work: Path, manager: Proc, workers: list[Proc], names: list[str],
                address: str) -> RunResult:
    recipe = cluster.recipe(recipe_text(names), "cluster-scale.yaml")
    run_out, run_err = work / "run.json", work / "logs" / "cp-run.log"
    watches = {n: LogWatch(w.log, (": starting ", ": recording")) for n, w in zip(names, workers, strict=True)}
    worker_pids = {w.pid: n for n, w in zip(names, workers, strict=True)}
    spawned: dict[int, tuple[str, float]] = {}  # node process pid -> (node id, monotonic start)
    zygotes: set[int] = set()  # each worker's node launcher (`python -m cpcli.runtime.zygote`)
    cpu_at: dict[int, list[tuple[float, float]]] = {}  # pid -> (monotonic, cpu s) samples
    own_at: list[tuple[float, ...]] = []  # (monotonic, CPU s of: workers, manager, cp run, this process)
    load_to_start: dict[str, float] = {}
    with open(run_out, "wb") as out, open(run_err, "wb") as err:
        launch_ns = time.monotonic_ns()
        load = c.Load().start()
        run = lab.run(1, [sys.executable, "-m", "cpcli", "run", str(recipe), "--duration", f"{RUN_DURATION_S}s",
                          "--json", "--manager", address], stdout=out, stderr=err, env=cluster.env, cwd=work)
    launch = launch_ns / 1e9
    own_at.append((launch, sum(_cpu_s(p) for p in worker_pids), _cpu_s(manager.pid), 0.0, time.process_time()))
    deadline = launch + RUN_LIMIT_S
    next_scan = 0.0
    try:
        while run.poll() is None:
            now = time.monotonic()
            if now > deadline:
                raise RuntimeError(f"`cp run` did not end within {RUN_LIMIT_S:g} s; see {run_err}")
            for watch in watches.values():
                watch.poll(now - launch)
            if not load_to_start and any(": recording" in w.seen for w in watches.values()):
                load_to_start = load.stop()
            if now >= next_scan:
                next_scan = now + SCAN_S
                for pid in [*worker_pids, *zygotes]:
                    for child in _children(pid):
                        if child in zygotes:
                            continue
                        if pid in worker_pids and _is_zygote(child):
                            zygotes.add(child)
                            continue
                        known = spawned.get(child)
                        if known and known[0]:
                            continue
                        if (times := _proc_times(child)) is not None:  # no id yet: forked, not exec'd yet
                            spawned[child] = (_node_of(child), times[0])
                for pid in [*spawned, *zygotes]:
                    if (times := _proc_times(pid)) is not None:
                        cpu_at.setdefault(pid, []).append((now, times[1]))
                own_at.append((now, sum(_cpu_s(p) for p in worker_pids), _cpu_s(manager.pid), _cpu_s(run.pid),
                               time.process_time()))
            time.sleep(LOG_POLL_S)
        code = run.wait(5)
    finally:
        if run.poll() is None:  # ours, by its pid
            run.kill()
            run.wait(5)
    try:
        result = _read_json(run_out)
    except (OSError, ValueError) as error:
        raise RuntimeError(f"`cp run` exited {code} without a JSON result ({error}); see {run_err}") from error
    session_dir = Path(str(result["session_dir"]))
    manifest = _read_json(session_dir / "manifest.json")
    start_ns = manifest["clock"]["start_cluster_ns"]
    if start_ns is None:
        raise RuntimeError(f"the session never started: {manifest.get('error')}; see {session_dir}")
    start = start_ns / 1e9
    wall_minus_mono = time.time() - time.monotonic()
    received = (session_dir / "recipe.yaml").stat().st_mtime - wall_minus_mono - launch
    pid_of = {node_id: pid for pid, (node_id, _) in spawned.items() if node_id}
    nodes = manifest["nodes"]
    detail: list[NodeStart] = []
    sinks: dict[str, float | None] = {}
    settled: list[float] = []
    for name in names:
        for node_id in [n for n, v in nodes.items() if v["worker"] == name]:
            v = nodes[node_id]
            node_pid = pid_of.get(node_id)
            before = [(t, cpu) for t, cpu in cpu_at.get(node_pid, []) if t <= start] if node_pid else []
            if before:  # the first sample from which its CPU stays flat until the start: done starting
                settled.append(next(t for t, cpu in before if before[-1][1] - cpu <= SETTLED_CPU_S) - launch)
            first = v["stats"].get("first_in_ns")
            detail.append(NodeStart(node_id, v["type"], name, spawned[node_pid][1] - launch if node_pid else None,
                                    before[-1][1] if before else None, None if first is None else first / 1e9))
            if v["type"] == "discard":
                sinks[node_id] = None if first is None else first / 1e9
    got = {n: t for n, t in sinks.items() if t is not None}
    last = max(got, key=lambda n: got[n]) if got else ""
    at_start = [s for s in own_at if s[0] <= start] or own_at[:1]
    first_s, last_s = own_at[0], at_start[-1]
    return RunResult(
        exit_code=code, status=str(manifest.get("status")), session_dir=str(session_dir), nodes=len(nodes),
        sinks=len(sinks), run_received_s=received,
        prepare_seen_s={n: w.seen[": starting "] for n, w in watches.items() if ": starting " in w.seen},
        recording_seen_s={n: w.seen[": recording"] for n, w in watches.items() if ": recording" in w.seen},
        session_started_s=start - launch, last_sink=last,
        last_sink_first_in_s=got.get(last, float("nan")),
        launch_to_last_sink_s=start - launch + got.get(last, float("nan")),
        sinks_without_sample=sorted(n for n, t in sinks.items() if t is None),
        dropped_in=sum(sum(v["stats"].get("dropped_in", {}).values()) for v in nodes.values()),
        drops={n: dict(v["stats"]["dropped_in"]) for n, v in nodes.items()
               if any(v["stats"].get("dropped_in", {}).values())},
        node_cpu_to_start_s=sum(d.cpu_to_start_s or 0.0 for d in detail),
        zygote_cpu_to_start_s=sum(before[-1][1] for z in zygotes
                                  if (before := [(t, cpu) for t, cpu in cpu_at.get(z, []) if t <= start])),
        worker_cpu_to_start_s=last_s[1] - first_s[1], manager_cpu_to_start_s=last_s[2] - first_s[2],
        cp_run_cpu_to_start_s=last_s[3], bench_cpu_to_start_s=last_s[4] - first_s[4],
        load=load_to_start, settled_s=settled,
        nodes_detail=detail)


# -- report ----------------------------------------------------------------------------------------


def _s(value: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if value is None or value != value else fmt.format(value)


def _minmax(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if values else "-"


def targets(join: JoinResult, run: RunResult | None, idle: IdleResult | None, n: int) -> list[dict[str, Any]]:
    out = [{"target": f"{n} workers (mDNS) listed ready by `cp status` within {TARGET_JOIN_S:g} s of launch",
            "value_s": join.all_ready_s, "met": join.all_ready_s is not None and join.all_ready_s <= TARGET_JOIN_S}]
    if run is not None:
        value = run.launch_to_last_sink_s if not run.sinks_without_sample else float("inf")
        out.append({"target": f"{run.nodes}-node recipe: `cp run` launch -> first sample at every sink (all "
                              f"{run.sinks}) within {TARGET_RUN_S:g} s", "value_s": value,
                    "met": value <= TARGET_RUN_S})
    if idle is not None:
        out.append({"target": f"manager CPU with {n} workers heartbeating idle < {TARGET_MANAGER_CPU_PCT:g} % of "
                              "one core", "value_pct": idle.manager_pct,
                    "met": idle.manager_pct < TARGET_MANAGER_CPU_PCT})
    return out


def render(join: JoinResult, run: RunResult | None, idle: IdleResult | None, n: int) -> str:
    out = [f"lab: manager m1 on 198.18.0.1 (--no-local-worker), {n} workers on 198.18.0.2-{n + 1}, each `cp worker "
           "--interface <its address>` with no --manager (mDNS); default ClusterTiming (beat 0.75 s)", ""]
    out.append(f"1. join: {n} worker processes launched in {join.launch_spread_s:.2f} s; times from the first launch")
    rows = [[j.name, j.host, _s(j.found_s), _s(j.joined_s), _s(j.cpu_s)] for j in join.workers]
    out.append(c.table(["worker", "host", "found manager s", "joined s", "its CPU s by then"], rows))
    found = [j.found_s for j in join.workers if j.found_s is not None]
    joined = [j.joined_s for j in join.workers if j.joined_s is not None]
    cpu = [j.cpu_s for j in join.workers if j.cpu_s == j.cpu_s]
    ncpu = os.cpu_count() or 1
    out.append(f"found manager (mDNS answered) {_minmax(found)} s; joined {_minmax(joined)} s; each worker used "
               f"{_minmax(cpu)} CPU s to get there, {sum(cpu):.1f} CPU s in all = {sum(cpu) / ncpu:.1f} s of this "
               f"machine's {ncpu} cores")
    calls = ", ".join(f"{k.launched_s:.2f}->{k.returned_s:.2f} s: {k.ready} ready" for k in join.status_calls)
    out.append(f"`cp status --json` (launched once every log said joined; launched->returned, ready): {calls}")
    out.append(c.describe_load("machine from launch to all ready", join.load))
    out.append("")
    if run is not None:
        width, height, rate_hz = VIDEO
        out.append(f"2. {run.nodes} nodes ({NODES_PER_WORKER} per worker: test_video {width}x{height}@{rate_hz:g} "
                   f"-> grayscale -> discard, + discard of the next worker's video); manifest status {run.status}, "
                   f"`cp run` exit {run.exit_code}, dropped_in {run.dropped_in}"
                   + (f" ({', '.join(f'{n} {d}' for n, d in sorted(run.drops.items()))})" if run.drops else ""))
        spawns = [d.spawned_s for d in run.nodes_detail if d.spawned_s is not None]
        prep, rec = list(run.prepare_seen_s.values()), list(run.recording_seen_s.values())
        steps = [
            ("RUN reached the manager (session folder created)", _s(run.run_received_s)),
            ("workers' \"session ...: starting ...\" lines (PREPARE handled)", _minmax(prep)),
            (f"node processes started ({len(spawns)} seen)", _minmax(spawns)),
            ("node processes done starting (their CPU flat from then until the start)", _minmax(run.settled_s)),
            ("session_started (manifest clock.start_cluster_ns)", _s(run.session_started_s)),
            ("workers' \"recording\" lines (START handled)", _minmax(rec)),
            (f"last sink's first sample ({run.last_sink}: +{_s(run.last_sink_first_in_s, '{:.3f}')} s session time)",
             _s(run.launch_to_last_sink_s)),
        ]
        out.append(c.table(["after `cp run` launch", "s"], steps))
        by_type: dict[str, list[float]] = {}
        for d in run.nodes_detail:
            if d.cpu_to_start_s is not None:
                by_type.setdefault(d.type, []).append(d.cpu_to_start_s)
        per_type = ", ".join(f"{t} {sum(v) / len(v):.2f}" for t, v in sorted(by_type.items()))
        total = run.node_cpu_to_start_s + run.zygote_cpu_to_start_s + run.worker_cpu_to_start_s + \
            run.manager_cpu_to_start_s + run.cp_run_cpu_to_start_s
        out.append(f"CPU from launch to session start: node processes {run.node_cpu_to_start_s:.1f} s (mean per "
                   f"process: {per_type}), node launchers (zygotes) {run.zygote_cpu_to_start_s:.1f} s, "
                   f"workers {run.worker_cpu_to_start_s:.1f} s, manager "
                   f"{run.manager_cpu_to_start_s:.2f} s, cp run {run.cp_run_cpu_to_start_s:.2f} s; {total:.1f} CPU s "
                   f"= {total / ncpu:.1f} s of {ncpu} cores (and this benchmark's sampling "
                   f"{run.bench_cpu_to_start_s:.2f} s)")
        if run.load:
            out.append(c.describe_load("machine from launch to the first \"recording\" line", run.load))
        if run.sinks_without_sample:
            out.append(f"sinks that never received a sample: {', '.join(run.sinks_without_sample)}")
        out.append("")
    if idle is not None:
        threads = ", ".join(f"{k} {v:.2f} %" for k, v in sorted(idle.manager_threads_pct.items()))
        out.append(f"3. idle, {idle.window_s:.1f} s window: manager {idle.manager_pct:.2f} % of one core ({threads}); "
                   f"workers {idle.workers_pct_each:.2f} % each on average (max {idle.workers_pct_max:.2f} %); "
                   f"{idle.ready_after}/{n} workers ready after it, {idle.lost_lines} lost in between")
        out.append(c.describe_load("   machine during the window", idle.machine))
        out.append("")
    verdicts = targets(join, run, idle, n)
    for t in verdicts:
        value = f"{t['value_pct']:.2f} %" if "value_pct" in t else _s(t["value_s"]) + " s"
        line = f"{t['target']}: {value}"
        out.append(c.verdict(t["met"], line) if n == WORKERS else f"(no verdict: {n} workers, not {WORKERS}) {line}")
    if join.last_joined_s is not None:
        out.append(f"        (last worker's \"joined manager\" line: {join.last_joined_s:.2f} s; the `cp status` "
                   f"call that saw all {n} ready was launched at {_s(join.all_ready_call_launched_s)} s)")
    return "\n".join(out)


def render_floor(join: JoinResult, run: RunResult) -> str:
    """One machine's share: what a lab of real laptops (one worker each) would see, on an idle machine here."""
    solo = join.workers[0]
    worker = run.nodes_detail[0].worker if run.nodes_detail else "?"
    spawns = [d.spawned_s for d in run.nodes_detail if d.spawned_s is not None]
    return "\n".join([
        "",
        "floor, one worker alone on the now idle machine (a real lab has one worker per laptop):",
        f"  join of {solo.name}: found manager {_s(solo.found_s)} s, joined {_s(solo.joined_s)} s, ready in "
        f"`cp status` by {_s(join.all_ready_s)} s; its CPU by then {_s(solo.cpu_s)} s",
        f"  {run.nodes} nodes on {worker}: RUN at the manager {_s(run.run_received_s)} s, node processes started "
        f"{_minmax(spawns)} s, done starting {_minmax(run.settled_s)} s, session_started "
        f"{run.session_started_s:.2f} s, last sink's first sample {run.launch_to_last_sink_s:.2f} s "
        f"({run.last_sink}); node CPU to the start {run.node_cpu_to_start_s:.2f} s",
    ])


def quiet(max_wait_s: float) -> None:
    if max_wait_s > 0:
        c.log(f"   machine {c.wait_quiet(max_wait_s):.0f}% busy before this phase")


def _stop(procs: list[Proc]) -> None:
    """SIGTERM our cluster processes together (by pid), so the lab's one-by-one teardown finds them gone."""
    for proc in procs:
        if proc.popen.poll() is None:
            proc.popen.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(max(0.1, deadline - time.monotonic()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=WORKERS, help=f"workers (the targets are for {WORKERS})")
    parser.add_argument("--idle-window", type=float, default=DEFAULT_IDLE_WINDOW_S, help="seconds of idle sampling")
    parser.add_argument("--no-floor", action="store_true",
                        help="skip the floor runs (one worker alone: its join, its 4 nodes)")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                        help="before the join and before the run, wait up to S s for the machine to be < 20%% busy")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, sessions)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not 1 <= args.workers <= 64 or not 1 <= args.idle_window <= 300:
        parser.error("--workers in 1..64, --idle-window in 1..300 s")
    if os.geteuid() != 0 or shutil.which("ip") is None:
        parser.error("needs root and iproute2 to build the namespace lab (ip netns add)")
    from throughput import code_version, machine, provenance

    busy = c.begin_run()
    code = code_version()
    work = Path(tempfile.mkdtemp(prefix="cpcli-cluster-scale-"))
    names = [f"w{i + 1:02d}" for i in range(args.workers)]
    address = f"198.18.0.1:{PORT}"
    started = time.monotonic()
    run: RunResult | None = None
    idle: IdleResult | None = None
    floor_run: RunResult | None = None
    floor_join: JoinResult | None = None
    failed = True
    try:
        with Lab(hosts=args.workers + 1) as lab:
            c.log(f"lab of {args.workers + 1} hosts built in {lab.build_s:.1f} s; work folder {work}")
            cluster = ClusterLab(lab, work)
            manager = cluster.manager(1, "m1", "--no-local-worker")
            workers: list[Proc] = []
            try:
                quiet(args.wait_quiet)
                c.log(f"1. launching {len(names)} workers (mDNS, no --manager) ...")
                hosts = list(range(2, len(names) + 2))
                join, workers = measure_join(lab, cluster, work, names, hosts, address)
                idle = measure_idle(cluster, manager, workers, address, args.idle_window, names)
                quiet(args.wait_quiet)
                c.log(f"2. `cp run` of {len(names) * NODES_PER_WORKER} nodes on {len(names)} workers ...")
                run = measure_run(lab, cluster, work, manager, workers, names, address)
                if not args.no_floor:
                    quiet(args.wait_quiet)
                    c.log(f"floor: `cp run` of {NODES_PER_WORKER} nodes on worker {names[0]} alone ...")
                    floor_run = measure_run(lab, cluster, work, manager, workers[:1], names[:1], address)
                    quiet(args.wait_quiet)
                    solo = f"w{len(names) + 1:02d}"
                    c.log(f"floor: one more worker ({solo}) joining alone ...")
                    floor_join, extra = measure_join(lab, cluster, work, [solo], [lab.add_host().index], address)
                    workers += extra
            finally:
                _stop([*workers, manager])
        c.log(f"lab torn down in {lab.teardown_s:.1f} s (namespaces deleted, none left in `ip netns list`)")
        failed = False
    finally:
        if args.keep or failed:
            c.log(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    code["changed_during_run"] = code_version()["sources_sha256"] != code["sources_sha256"]
    info = machine()
    elapsed = time.monotonic() - started
    if args.json:
        print(json.dumps({"machine": info, "code": code, "busy_before_pct": busy, "elapsed_s": elapsed,
                          "workers": args.workers, "join": asdict(join), "run": asdict(run) if run else None,
                          "idle": asdict(idle) if idle else None, "targets": targets(join, run, idle, args.workers),
                          "floor": {"join": asdict(floor_join) if floor_join else None,
                                    "run": asdict(floor_run) if floor_run else None}},
                         indent=2))
        return 0
    print(provenance(info, busy, code))
    print(render(join, run, idle, args.workers))
    if floor_join is not None and floor_run is not None:
        print(render_floor(floor_join, floor_run))
    print(f"\n(total {elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
