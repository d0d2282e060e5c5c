"""`cp collect` (issue 7): 1 GiB over 3 workers in the namespace lab vs a raw TCP copy, and its peak memory.

Run as a plain script, as root (not a pytest test):

    sudo python benchmarks/collect.py               # 1 GiB: about 1 minute
    sudo python benchmarks/collect.py --mib 192     # a quick look
    sudo python benchmarks/collect.py --rate 333mbit   # a 1 Gbit/s LAN shared by the 3 workers
    sudo python benchmarks/collect.py --json

The lab (tests/lab.py): `cp manager` on host 1, `cp worker` w2, w3, w4 on hosts 2-4, each holding a
third of the bytes in one recorded file of a crafted finished session (worker.json and the
manager's manifest.json with each file's sha256, as a real session leaves them).

- ours: `cp collect SESSION --json` on host 1, in a process that reports its own peak RSS. Its
  transfer time is the `transfer_s` it reports: from its first request for a file to the last
  part verified and fsynced, the span the raw reader times, so the ratio compares moving bytes
  with moving bytes. Its whole wall time (interpreter start, imports, the manager's status, the
  parts' listings) is printed too. A last `cp collect` of the same session must transfer nothing.
- raw: on each worker host a Python server `socket.sendfile()`s the same file to one reader on
  host 1 that writes what it receives to disk and fsyncs, three connections in parallel; timed
  in the reader from the first connect to the last fsync.
- Rounds (default 3): raw, then ours, each into a fresh folder deleted after the round, so every
  run finds memory in the same state. On this VM the raw copy's writes into the page cache cost
  2-3x more when they land in guest memory never touched before (the host backs it on first
  touch) than in memory freed by an earlier run: a raw run right after another's files were
  deleted is its best case. The ratio is taken of the medians; best against best is printed too.

Until session 7 the transfer time was the wall time minus a second, no-op run's: that no-op run
re-hashes the collected files, which the first run does not, and since `cp collect` writes past
the page cache (O_DIRECT) it reads them back from disk, so the difference is no longer a time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import _common as c

sys.path.insert(0, str(c.REPO))  # tests/ is not a package on the path when run as a script
from tests.cluster import PORT, ClusterLab  # noqa: E402
from tests.lab import Lab  # noqa: E402

TARGET_RATIO = 0.8
TARGET_PEAK_MB = 200.0
SESSION = "2026-01-01T00-00-00_collect-bench"
WORKERS = {"w2": 2, "w3": 3, "w4": 4}
RAW_PORT = 7600

COLLECT = """\
import resource, sys, time
from cpcli.cli import run_cli
t0 = time.monotonic()
code = run_cli(sys.argv[1:])
u = resource.getrusage(resource.RUSAGE_SELF)
print(f"BENCH {time.monotonic() - t0:.4f} {u.ru_maxrss} {u.ru_utime + u.ru_stime:.3f}", file=sys.stderr)
sys.exit(code)
"""
SENDER = """\
import socket, sys
path, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
with socket.create_server((host, port)) as server:
    print("ready", flush=True)
    conn, _ = server.accept()
    with conn, open(path, "rb") as fh:
        conn.sendfile(fh)
"""
READER = """\
import os, socket, sys, threading, time
jobs = [a.split("=", 1) for a in sys.argv[1:]]
def pull(address, out):
    host, port = address.rsplit(":", 1)
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    with socket.create_connection((host, int(port))) as sock, open(out, "wb") as fh:
        while n := sock.recv_into(buf):
            fh.write(view[:n])
        fh.flush()
        os.fsync(fh.fileno())
t0 = time.monotonic()
threads = [threading.Thread(target=pull, args=job) for job in jobs]
for t in threads: t.start()
for t in threads: t.join()
print(f"{time.monotonic() - t0:.4f}")
"""


def _write_file(path: Path, size: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    block = os.urandom(1 << 20)
    with open(path, "wb") as fh:
        for i in range(size // len(block)):
            chunk = block[:-8] + i.to_bytes(8, "big")  # no two blocks alike
            fh.write(chunk)
            digest.update(chunk)
    return digest.hexdigest()


def craft_session(cluster: ClusterLab, lab: Lab, per_worker: int) -> dict[str, Path]:
    """A finished session as workers and manager leave it; returns each worker's big file."""
    nodes: dict[str, Any] = {}
    files: list[dict[str, Any]] = []
    sources = {}
    for worker, host in WORKERS.items():
        rel = f"{worker}/blob/blob.bin"
        path = cluster.data(worker) / SESSION / rel
        record = {"path": rel, "kind": "data", "bytes": per_worker, "sha256": _write_file(path, per_worker)}
        (cluster.data(worker) / SESSION / worker / "worker.json").write_text(json.dumps(
            {"worker": worker, "host": lab.ip(host), "session": SESSION, "phase": "finished",
             "nodes": {f"blob_{worker}": {"files": [record]}}, "files": []}))
        nodes[f"blob_{worker}"] = {"type": "blob", "worker": worker, "files": [record], "stats": {}}
        files.append(record)
        sources[worker] = path
    manager_dir = cluster.data("m1") / SESSION
    manager_dir.mkdir(parents=True)
    (manager_dir / "manifest.json").write_text(json.dumps(
        {"session": SESSION, "recipe": "collect-bench", "start_utc": "2026-01-01T00:00:00.000000Z",
         "status": "complete", "workers": {w: {"host": lab.ip(h), "files": []} for w, h in WORKERS.items()},
         "nodes": nodes, "files": files}))
    return sources


def run_collect(cluster: ClusterLab, lab: Lab, address: str, out: Path) -> tuple[float, float, float, dict[str, Any]]:
    proc = lab.python(1, COLLECT, ["collect", SESSION, "--out", str(out), "--json", "--manager", address],
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cluster.env)
    stdout, stderr = proc.communicate(timeout=600)
    line = next(x for x in stderr.splitlines() if x.startswith("BENCH "))
    _, seconds, maxrss_kb, cpu_s = line.split()
    if proc.returncode != 0:
        raise SystemExit(f"cp collect failed ({proc.returncode}):\n{stdout}\n{stderr}")
    return float(seconds), int(maxrss_kb) / 1024, float(cpu_s), json.loads(stdout)


def run_raw(cluster: ClusterLab, lab: Lab, sources: dict[str, Path], out: Path) -> float:
    senders = []
    jobs = []
    for i, (worker, host) in enumerate(WORKERS.items()):
        port = RAW_PORT + i
        sender = lab.python(host, SENDER, [str(sources[worker]), lab.ip(host), str(port)],
                            stdout=subprocess.PIPE, text=True)
        assert sender.stdout is not None and sender.stdout.readline().strip() == "ready"
        senders.append(sender)
        jobs.append(f"{lab.ip(host)}:{port}={out / f'{worker}.bin'}")
    out.mkdir(parents=True, exist_ok=True)
    reader = lab.python(1, READER, jobs, stdout=subprocess.PIPE, text=True)
    stdout, _ = reader.communicate(timeout=600)
    for sender in senders:
        sender.wait(30)
    for worker in WORKERS:
        if (out / f"{worker}.bin").stat().st_size != sources[worker].stat().st_size:
            raise SystemExit(f"the raw copy of {worker} is incomplete")
    return float(stdout.strip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=1024, help="total MiB over the 3 workers")
    parser.add_argument("--rounds", type=int, default=3, help="raw and ours, alternately, this many times")
    parser.add_argument("--rate", help="shape each worker's link (tc tbf), e.g. 333mbit: a 1 Gbit/s LAN shared by 3")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    c.terminate_on_sigterm()
    busy = c.begin_run()
    per_worker = (args.mib // len(WORKERS)) << 20
    total = per_worker * len(WORKERS)
    work = Path(tempfile.mkdtemp(prefix="cpcli-bench-collect-"))
    raw_s: list[float] = []
    ours: list[dict[str, Any]] = []
    try:
        with Lab(hosts=4) as lab:
            cluster = ClusterLab(lab, work)
            address = f"{lab.ip(1)}:{PORT}"
            sources = craft_session(cluster, lab, per_worker)
            for host in WORKERS.values() if args.rate else ():
                shaper = lab.run(host, ["tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", args.rate,
                                        "burst", "1mb", "latency", "100ms"])
                if shaper.wait(10) != 0:
                    raise SystemExit(f"tc could not shape host {host} to {args.rate}")
            cluster.manager(1, "m1", "--no-local-worker")
            for worker, host in WORKERS.items():
                cluster.worker(host, worker, "--manager", address)
            for round_ in range(args.rounds):
                raw_s.append(run_raw(cluster, lab, sources, work / "raw"))
                shutil.rmtree(work / "raw")
                wall_s, peak_mb, cpu_s, result = run_collect(cluster, lab, address, work / "out")
                if not result["complete"] or result["transferred_bytes"] < total:
                    raise SystemExit(f"cp collect did not complete: {result}")
                ours.append({"wall_s": wall_s, "transfer_s": float(result["transfer_s"]), "peak_mb": peak_mb,
                             "cpu_s": cpu_s})
                if round_ < args.rounds - 1:
                    shutil.rmtree(work / "out")
            noop_s, _, noop_cpu_s, again = run_collect(cluster, lab, address, work / "out")
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    if again["transferred_bytes"] != 0:
        raise SystemExit(f"a second cp collect moved bytes again: {again}")
    transfer = [o["transfer_s"] for o in ours]
    ratio = statistics.median(raw_s) / statistics.median(transfer)
    best = min(raw_s) / min(transfer)
    peak = max(o["peak_mb"] for o in ours)
    report = {"bytes": total, "workers": len(WORKERS), "rate": args.rate, "rounds": args.rounds,
              "raw_s": raw_s, "collect_transfer_s": transfer, "collect_wall_s": [o["wall_s"] for o in ours],
              "collect_cpu_s": [o["cpu_s"] for o in ours], "collect_noop_wall_s": noop_s,
              "collect_noop_cpu_s": noop_cpu_s, "ratio": ratio, "ratio_best": best, "peak_rss_MB": peak,
              "busy_before_pct": busy}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    rows = [[f"round {i + 1}", f"{raw:.2f}", f"{o['transfer_s']:.2f}", f"{o['wall_s']:.2f}",
             f"{raw / o['transfer_s']:.2f}"] for i, (raw, o) in enumerate(zip(raw_s, ours, strict=True))]
    rows.append(["median", f"{statistics.median(raw_s):.2f}", f"{statistics.median(transfer):.2f}",
                 f"{statistics.median(o['wall_s'] for o in ours):.2f}", f"{ratio:.2f}"])
    print(c.table(["", "raw sendfile s", "cp collect transfer s", "cp collect wall s", "ratio"], rows))
    shaped = f", each worker's link shaped to {args.rate}" if args.rate else ""
    collected_mbps = total / statistics.median(transfer) / 1e6
    print(f"{total / 2**20:.0f} MiB over {len(WORKERS)} workers{shaped}: {collected_mbps:.0f} MB/s collected, "
          f"{total / statistics.median(raw_s) / 1e6:.0f} MB/s raw (medians); peak RSS of cp collect "
          f"{peak:.0f} MB; its CPU {statistics.median(o['cpu_s'] for o in ours):.2f} s; a last run moving nothing "
          f"{noop_s:.2f} s (it re-hashes every file) on {os.cpu_count()} CPUs shared with the 3 workers")
    print(c.verdict(ratio >= TARGET_RATIO, f"ratio ours/raw {ratio:.2f} of the medians (target >= {TARGET_RATIO}); "
                                           f"best against best {best:.2f}"))
    print(c.verdict(peak <= TARGET_PEAK_MB, f"peak memory {peak:.0f} MB (target <= {TARGET_PEAK_MB:.0f})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
