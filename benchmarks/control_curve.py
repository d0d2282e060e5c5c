"""What CurveZMQ costs the control plane (issue 8): heartbeats and connection set-up, keyed vs keyless, same run.

Run as a plain script (not a pytest test), loopback only:

    python benchmarks/control_curve.py              # about 40 s
    python benchmarks/control_curve.py --json

A manager-side process runs our `Router` (with the cluster's keys and its gatekeeper, or with the
keyless `--insecure` credentials) and answers every BEAT with a BEAT, as the manager does. This
process runs `WORKERS` `Dealer`s that beat at `RATE_HZ` each (far above the real 1.3 Hz, so the
cost is measurable), for `--duration` seconds per mode, modes interleaved over `--repeat` rounds.
Reported: the router process's CPU per 1000 beats answered, its CPU % at the real beat rate of a
16-worker cluster (extrapolated), and the time from a new Dealer's connect to its first answer
(a handshake with the gatekeeper's check, vs a bare ZMTP greeting).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cpcli.cluster import keys  # noqa: E402
from cpcli.cluster import messages as m  # noqa: E402
from cpcli.cluster.channel import Dealer, Router  # noqa: E402
from cpcli.transport.curve import Credentials  # noqa: E402

WORKERS = 16
RATE_HZ = 50.0  # beats per second per dealer in the measurement
REAL_BEAT_HZ = 1 / 0.75  # ClusterTiming's default beat
CONNECTS = 40  # new connections timed per mode and round
ANSWER_TIMEOUT_S = 5.0


def serve(mode: str, port_file: str) -> None:
    """The router side: answer every BEAT until stdin closes."""
    import logging
    import select
    creds = Credentials.demo("bench") if mode == "insecure" else keys.manager_keys("bench", create=False)
    assert creds is not None
    context: zmq.Context[Any] = zmq.Context()
    router = Router(context, "127.0.0.1", 0, logging.getLogger("bench"), lambda: creds, as_manager=True)
    Path(port_file).write_text(str(router.port))
    answered = 0
    try:
        while not select.select([sys.stdin], [], [], 0)[0]:
            if router.socket.poll(50):
                while (message := router.receive()) is not None:
                    router.send(message[0], m.BEAT, {})
                    answered += 1
    finally:
        router.close()
        context.term()
        print(answered, flush=True)


def measure(mode: str, duration_s: float) -> dict[str, float]:
    import logging
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        server = subprocess.Popen([sys.executable, __file__, "--serve", mode, "--port-file", str(port_file)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 20
            while not port_file.exists() or not port_file.read_text():
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the router process did not start")
                time.sleep(0.02)
            address = f"127.0.0.1:{port_file.read_text()}"
            creds = Credentials.demo("bench") if mode == "insecure" else keys.member_credentials("bench", None)
            context: zmq.Context[Any] = zmq.Context()
            log = logging.getLogger("bench")
            # connection set-up: connect -> first answer, one new dealer at a time
            setups = []
            for _ in range(CONNECTS):
                dealer = Dealer(context, address, "w", log, creds)
                started = time.perf_counter()
                while not dealer.send(m.BEAT, {}):
                    if time.perf_counter() - started > ANSWER_TIMEOUT_S:
                        raise RuntimeError(f"{mode}: no connection")
                    time.sleep(0.0002)
                if not dealer.socket.poll(int(ANSWER_TIMEOUT_S * 1000)):
                    raise RuntimeError(f"{mode}: no answer")
                dealer.receive()
                setups.append((time.perf_counter() - started) * 1000)
                dealer.close()
            # steady beating
            dealers = [Dealer(context, address, f"w{i}", log, creds) for i in range(WORKERS)]
            for dealer in dealers:
                while not dealer.send(m.BEAT, {}):
                    time.sleep(0.001)
            proc = psutil.Process(server.pid)
            time.sleep(0.5)
            cpu0, t0 = proc.cpu_times(), time.monotonic()
            sent = 0
            interval = 1 / RATE_HZ
            next_tick = time.monotonic()
            end = t0 + duration_s
            while time.monotonic() < end:
                for dealer in dealers:
                    dealer.send(m.BEAT, {})
                    while dealer.receive() is not None:
                        pass
                sent += len(dealers)
                next_tick += interval
                time.sleep(max(0.0, next_tick - time.monotonic()))
            cpu1, t1 = proc.cpu_times(), time.monotonic()
            for dealer in dealers:
                dealer.close()
            context.term()
        finally:
            if server.stdin:
                server.stdin.close()
            server.wait(20)
    cpu_s = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    per_1000 = cpu_s / sent * 1000 * 1000  # ms of CPU per 1000 beats
    return {"beats": sent, "cpu_ms_per_1000_beats": per_1000,
            "cpu_percent_16_workers_real_rate": per_1000 / 1000 * 16 * REAL_BEAT_HZ / 10,
            "setup_ms_p50": statistics.median(setups), "setup_ms_p90": sorted(setups)[int(len(setups) * 0.9)],
            "window_s": t1 - t0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=6.0, help="seconds of beating per mode and round")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve", choices=("curve", "insecure"), help=argparse.SUPPRESS)
    parser.add_argument("--port-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port_file)
        return 0
    if not 1 <= args.duration <= 60 or not 1 <= args.repeat <= 10:
        parser.error("--duration in [1, 60] s, --repeat in 1..10")
    with tempfile.TemporaryDirectory() as config:
        os.environ["XDG_CONFIG_HOME"] = config
        keys.manager_keys("bench", create=True)
        results: dict[str, list[dict[str, float]]] = {"insecure": [], "curve": []}
        for _ in range(args.repeat):
            for mode in ("insecure", "curve"):
                results[mode].append(measure(mode, args.duration))
    summary = {mode: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for mode, runs in results.items()}
    if args.json:
        print(json.dumps({"rounds": results, "median": summary}, indent=1))
        return 0
    print(f"machine: {os.cpu_count()} cpu, Python {sys.version.split()[0]}, pyzmq {zmq.pyzmq_version()}, "
          f"libzmq {zmq.zmq_version()}; {WORKERS} dealers x {RATE_HZ:g} beats/s, {args.duration:g} s x "
          f"{args.repeat} rounds, medians")
    print(f"| {'mode':10} | CPU ms / 1000 beats | CPU % of a core, 16 workers at 1.33 Hz | connect -> first answer "
          "p50 / p90 ms |")
    print("|------------|---------------------|-----------------------------------------|"
          "-------------------------------|")
    for mode, s in summary.items():
        print(f"| {mode:10} | {s['cpu_ms_per_1000_beats']:19.1f} | {s['cpu_percent_16_workers_real_rate']:39.3f} | "
              f"{s['setup_ms_p50']:15.2f} / {s['setup_ms_p90']:.2f} |")
    ratio = summary["curve"]["cpu_ms_per_1000_beats"] / summary["insecure"]["cpu_ms_per_1000_beats"]
    print(f"Curve costs {ratio:.2f}x the router CPU per heartbeat of the keyless control plane")
    return 0


if __name__ == "__main__":
    sys.exit(main())
