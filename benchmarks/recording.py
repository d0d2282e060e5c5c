"""Recording load: 4 cameras at 640x480@30 and one 48 kHz microphone, all recorded, on this machine.

Prints drops (must be 0), the largest writer backlog seen (must stay bounded), CPU % of the
node processes and bytes/s written. `python benchmarks/recording.py [--duration 60] [--json]`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from cpcli.recipe import parse_recipe
from cpcli.registry import load_registry
from cpcli.runtime.session import Progress, RunOptions, StopControl, run_session

CAMERAS = 4
RECIPE = "name: recording-load\nnodes:\n" + "".join(
    f"  cam{i}: {{type: test_video, params: {{width: 640, height: 480, rate_hz: 30}}, record: true}}\n"
    for i in range(CAMERAS)
) + "  mic: {type: test_audio, params: {samplerate: 48000, channels: 1, blocksize: 1024}, record: true}\n"


class Sampler:
    """Watches the session through its progress callback: backlog peaks and node CPU time."""

    def __init__(self) -> None:
        self.max_backlog: dict[str, int] = {}
        self.cpu_s = 0.0
        self.wall_s = 0.0
        self._first: tuple[float, float] | None = None
        self._me = psutil.Process()

    def _node_cpu(self) -> float:
        total = 0.0
        for child in self._me.children(recursive=True):
            try:
                times = child.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                continue
        return total

    def __call__(self, progress: Progress) -> None:
        for node_id, status in progress.nodes.items():
            backlog = status.stats.record_backlog
            self.max_backlog[node_id] = max(self.max_backlog.get(node_id, 0), backlog)
        if progress.phase != "running":
            return
        now, cpu = time.monotonic(), self._node_cpu()
        if self._first is None and progress.elapsed_s > 1.0:  # after start-up costs (imports, codecs)
            self._first = (now, cpu)
        elif self._first is not None:
            self.wall_s, self.cpu_s = now - self._first[0], cpu - self._first[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds to record (default 60)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    registry = load_registry()
    sampler = Sampler()
    with tempfile.TemporaryDirectory(prefix="cpcli-recording-") as tmp:
        result = run_session(parse_recipe(RECIPE, registry), registry,
                             RunOptions(out_dir=Path(tmp), duration_s=args.duration), StopControl(), sampler)
        nodes = result.manifest["nodes"]
        files = [f for n in nodes.values() for f in n["files"]]
        written = sum(int(f["bytes"]) for f in files)
    drops = {n: v["stats"]["record_dropped"] + v["stats"]["dropped_out"] for n, v in nodes.items()}
    figures: dict[str, Any] = {
        "duration_s": round(result.duration_s, 1),
        "cpu_count": os.cpu_count(),
        "node_cpu_percent_of_one_core": round(100 * sampler.cpu_s / sampler.wall_s, 1) if sampler.wall_s else None,
        "bytes_per_s": round(written / result.duration_s) if result.duration_s else 0,
        "files": len(files),
        "drops": drops,
        "max_writer_backlog": sampler.max_backlog,
        "frames": {n: v["stats"]["samples_out"] for n, v in nodes.items()},
        "failures": result.failures,
    }
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(f"recorded {figures['duration_s']} s: {CAMERAS} cameras 640x480@30 + 48 kHz audio, all recorded")
        print(f"node CPU: {figures['node_cpu_percent_of_one_core']} % of one core "
              f"(machine has {figures['cpu_count']} cores)")
        print(f"written: {figures['bytes_per_s'] / 1e6:.2f} MB/s in {figures['files']} files")
        for node_id in nodes:
            print(f"  {node_id:5s} samples {figures['frames'][node_id]:6d}  drops {drops[node_id]}  "
                  f"max backlog {sampler.max_backlog.get(node_id, 0)}")
        ok = not any(drops.values()) and not result.failures
        print("MET    " if ok else "NOT MET", "drops == 0 with every stream recorded")
    return 0 if not any(drops.values()) and not result.failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
