"""dora-rs benchmark sink (run by `dora run` inside benchmarks/shm.py's throwaway venv, never by cpcli).

Counts frames on input `frame`, reads one byte of each through a zero-copy numpy view, and
checks sequence numbers: unique frames, duplicates, reordered (a number lower than one already
seen) and latency (monotonic now - the source's stamp; same host, same clock). Writes JSON to
RESULT when the input closes or the dataflow stops.
"""

import json
import os
import time

import numpy as np
from dora import Node

MAX_SEQ = 1 << 22  # far more than a benchmark run sends

node = Node()
seen = np.zeros(MAX_SEQ, dtype=bool)
received = duplicates = reordered = 0
highest = -1
latencies = []
checksum = 0
for event in node:
    kind = event["type"]
    if kind == "INPUT":
        now = time.monotonic_ns()
        meta = event["metadata"]
        seq, t_ns = int(meta["seq"]), int(meta["t"])
        view = event["value"].to_numpy(zero_copy_only=True)
        checksum ^= int(view[0])  # touch the frame, as a node would
        received += 1
        if seen[seq]:
            duplicates += 1
        seen[seq] = True
        if seq < highest:
            reordered += 1
        highest = max(highest, seq)
        latencies.append(now - t_ns)
    elif kind in ("STOP", "INPUT_CLOSED", "ERROR"):
        break
lat = np.array(latencies, dtype=np.int64) if latencies else np.zeros(1, dtype=np.int64)
p50, p99 = np.percentile(lat, [50, 99]) / 1e6
with open(os.environ["RESULT"], "w", encoding="utf-8") as out:
    json.dump({"received": received, "unique": int(seen.sum()), "duplicates": duplicates,
               "reordered": reordered, "p50_ms": float(p50), "p99_ms": float(p99)}, out)
