"""Start and stop latency of `cp run`: launch -> first sample at a consumer, stop -> files final.

Run as a plain script (not a pytest test):

    python benchmarks/startup.py             # 5 runs of each measurement, about 1 minute
    python benchmarks/startup.py --runs 3    # fewer
    python benchmarks/startup.py --json      # the results as JSON on stdout

Every run is `python -m cpcli run recipes/demo.yaml` from this checkout, as a user would start it
(a fresh interpreter: imports, recipe check, node processes, wiring, start).

- start: launch -> the first sample received by any consumer (a node with inputs). The launch
  instant is `time.monotonic_ns()` just before the process is created; the session's cluster
  clock is this machine's monotonic clock, so launch -> first sample =
  (manifest clock.start_cluster_ns - launch_ns) + min(first_in_ns over consumers).
- stop: SIGTERM (to the `cp run` process only) -> that process has exited; it writes the
  manifest before it exits, and we then check the manifest's status and that every file it
  lists exists with the size it records.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from throughput import code_version  # the sibling script: same fingerprint of the runtime measured

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "demo.yaml"
DEFAULT_RUNS = 5
RUN_DURATION_S = 4  # the timed run's --duration
RUN_LIMIT_S = 60.0  # a run that takes longer than this is broken: kill it and fail
STARTED_TIMEOUT_S = 30.0  # launch -> "session_started" in events.jsonl, at most
RECORD_BEFORE_STOP_S = 2.0  # let the session record a little before stopping it
EVENTS_POLL_S = 0.01  # how often to look for "session_started" (the resolution of nothing measured)
TARGET_S = 1.0  # issue: start and stop each within 1 s
CHIMERAPY = {"start": "1.0-1.5 s", "stop": "6-8 s"}  # reference numbers quoted in the issue


@dataclass
class StartRun:
    launch_to_session_start_s: float  # process launch -> the session clock's zero
    launch_to_first_sample_s: float  # process launch -> first sample at a consumer
    first_consumer: str
    process_s: float  # the whole `cp run --duration 4` process
    exit_code: int


@dataclass
class StopRun:
    sigterm_to_exit_s: float  # SIGTERM -> process exited, manifest and files final
    status: str
    files_checked: int
    files_missing: int
    exit_code: int


def _command(out: Path, session: str, duration_s: float | None) -> list[str]:
    cmd = [sys.executable, "-m", "cpcli", "run", str(RECIPE), "--out", str(out), "--session", session]
    if duration_s is not None:
        cmd += ["--duration", f"{duration_s:g}"]
    return cmd


def _launch(cmd: list[str], log: Path) -> tuple[subprocess.Popen[bytes], int]:
    with open(log, "wb") as fh:
        launch_ns = time.monotonic_ns()
        proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT)
    return proc, launch_ns


def _wait(proc: subprocess.Popen[bytes], timeout_s: float, log: Path) -> int:
    """Wait for our child; a stuck one is killed by its pid and reported."""
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise SystemExit(f"`cp run` (pid {proc.pid}) did not exit within {timeout_s:.0f} s; log: {log}") from None


def _manifest(session_dir: Path, log: Path) -> dict[str, Any]:
    path = session_dir / "manifest.json"
    if not path.exists():
        raise SystemExit(f"no manifest in {session_dir}; log:\n{log.read_text(errors='replace')[-2000:]}")
    return json.loads(path.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def measure_start(work: Path, index: int) -> StartRun:
    session = f"start-{index}"
    log = work / f"{session}.log"
    proc, launch_ns = _launch(_command(work, session, RUN_DURATION_S), log)
    code = _wait(proc, RUN_LIMIT_S, log)
    process_s = (time.monotonic_ns() - launch_ns) / 1e9
    manifest = _manifest(work / session, log)
    start_ns = int(manifest["clock"]["start_cluster_ns"])
    firsts = {n: v["stats"].get("first_in_ns") for n, v in manifest["nodes"].items() if v.get("inputs")}
    firsts = {n: t for n, t in firsts.items() if t is not None}
    if not firsts:
        raise SystemExit(f"no consumer received a sample in {work / session}; log: {log}")
    consumer = min(firsts, key=lambda n: firsts[n])
    return StartRun(launch_to_session_start_s=(start_ns - launch_ns) / 1e9,
                    launch_to_first_sample_s=(start_ns - launch_ns + firsts[consumer]) / 1e9,
                    first_consumer=consumer, process_s=process_s, exit_code=code)


def _started(events: Path) -> bool:
    try:
        return '"session_started"' in events.read_text(encoding="utf-8")
    except FileNotFoundError:
        return False


def measure_stop(work: Path, index: int) -> StopRun:
    session = f"stop-{index}"
    log = work / f"{session}.log"
    session_dir = work / session
    proc, _ = _launch(_command(work, session, None), log)
    try:
        deadline = time.monotonic() + STARTED_TIMEOUT_S
        while not _started(session_dir / "events.jsonl"):
            if proc.poll() is not None:
                raise SystemExit(f"`cp run` exited ({proc.returncode}) before the session started; log: {log}")
            if time.monotonic() > deadline:
                raise SystemExit(f"no session_started within {STARTED_TIMEOUT_S:.0f} s; log: {log}")
            time.sleep(EVENTS_POLL_S)
        time.sleep(RECORD_BEFORE_STOP_S)
        stop_ns = time.monotonic_ns()
        proc.send_signal(signal.SIGTERM)  # our child only, by its pid
        code = _wait(proc, RUN_LIMIT_S, log)
        stopped_s = (time.monotonic_ns() - stop_ns) / 1e9
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    manifest = _manifest(session_dir, log)
    records = list(manifest.get("files", []))
    for node in manifest["nodes"].values():
        records += node.get("files", [])
    missing = 0
    for record in records:
        path = session_dir / record["path"]
        if not path.is_file() or path.stat().st_size != int(record["bytes"]):
            missing += 1
    return StopRun(sigterm_to_exit_s=stopped_s, status=str(manifest.get("status")),
                   files_checked=len(records), files_missing=missing, exit_code=code)


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "max": max(values), "min": min(values)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="runs of each measurement")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if not 1 <= args.runs <= 50:
        parser.error("--runs must be in 1..50")
    starts: list[StartRun] = []
    stops: list[StopRun] = []
    with tempfile.TemporaryDirectory(prefix="cpcli-startup-") as tmp:
        work = Path(tmp)
        for i in range(args.runs):
            print(f"start run {i + 1}/{args.runs} ...", file=sys.stderr, flush=True)
            starts.append(measure_start(work, i))
        for i in range(args.runs):
            print(f"stop run {i + 1}/{args.runs} ...", file=sys.stderr, flush=True)
            stops.append(measure_stop(work, i))
    code = code_version()
    start = _summary([r.launch_to_first_sample_s for r in starts])
    session_start = _summary([r.launch_to_session_start_s for r in starts])
    stop = _summary([r.sigterm_to_exit_s for r in stops])
    problems = [f"stop run {i}: status {r.status}, {r.files_missing}/{r.files_checked} files missing or "
                f"short, exit code {r.exit_code}" for i, r in enumerate(stops)
                if r.status != "complete" or r.files_missing or r.exit_code != 0]
    problems += [f"start run {i}: exit code {r.exit_code}" for i, r in enumerate(starts) if r.exit_code != 0]
    result = {"recipe": str(RECIPE.relative_to(REPO)), "runs": args.runs, "cpus": os.cpu_count(), "code": code,
              "start_s": start, "launch_to_session_start_s": session_start, "stop_s": stop,
              "target_s": TARGET_S, "start_met": start["median"] <= TARGET_S, "stop_met": stop["median"] <= TARGET_S,
              "chimerapy": CHIMERAPY, "problems": problems,
              "start_runs": [asdict(r) for r in starts], "stop_runs": [asdict(r) for r in stops]}
    if args.json:
        print(json.dumps(result, indent=2))
        return 1 if problems else 0
    print(f"`cp run {result['recipe']}`, {args.runs} runs each, {os.cpu_count()} cpu; "
          f"commit {code['commit']}, cpcli+nodes sources sha256 {code['sources_sha256']}\n")
    rows = [
        ("launch -> first sample at a consumer", start, CHIMERAPY["start"]),
        ("  (launch -> session start)", session_start, ""),
        ("stop (SIGTERM) -> files final, exited", stop, CHIMERAPY["stop"]),
    ]
    print(f"| {'measure':38} | median s | max s | target | met | ChimeraPy (issue) |")
    print(f"|{'-' * 40}|----------|-------|--------|-----|-------------------|")
    for name, s, ref in rows:
        target = f"<= {TARGET_S:g}" if ref else ""
        met = ("yes" if s["median"] <= TARGET_S else "NO") if ref else ""
        print(f"| {name:38} | {s['median']:8.3f} | {s['max']:5.3f} | {target:6} | {met:3} | {ref:17} |")
    print("\nper run, start (s):", ", ".join(f"{r.launch_to_first_sample_s:.3f} ({r.first_consumer})"
                                           for r in starts))
    print("per run, stop (s): ", ", ".join(f"{r.sigterm_to_exit_s:.3f}" for r in stops))
    print("whole `--duration 4` process (s):", ", ".join(f"{r.process_s:.2f}" for r in starts))
    print("stop runs: manifest status", ", ".join(sorted({r.status for r in stops})),
          f"; {sum(r.files_checked for r in stops)} listed files checked, "
          f"{sum(r.files_missing for r in stops)} missing or short")
    for problem in problems:
        print("PROBLEM:", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
