"""dora-rs benchmark source (run by `dora run` inside benchmarks/shm.py's throwaway venv, never by cpcli).

Sends FRAMES precomputed uint8 frames of H x W x 3 (as pyarrow arrays, the way a dora Python node
sends a numpy frame) on output `frame`, as fast as possible (RATE_HZ=0) or paced, for DURATION_S
seconds; each message carries its sequence number and `time.monotonic_ns()` in the metadata.
Writes {"sent", "send_s"} as JSON to RESULT.
"""

import json
import os
import time

import numpy as np
import pyarrow as pa
from dora import Node

W, H = int(os.environ["W"]), int(os.environ["H"])
DURATION_S = float(os.environ["DURATION_S"])
RATE_HZ = float(os.environ.get("RATE_HZ", "0"))
FRAMES = int(os.environ.get("FRAMES", "8"))

frames = [pa.array(np.full(W * H * 3, 17 * i + 1, dtype=np.uint8)) for i in range(FRAMES)]
node = Node()
period_ns = int(1e9 / RATE_HZ) if RATE_HZ > 0 else 0
sent = 0
start = time.monotonic_ns()
end = start + int(DURATION_S * 1e9)
next_ns = start
while (now := time.monotonic_ns()) < end:
    if period_ns:
        if now < next_ns:
            time.sleep((next_ns - now) / 1e9)
        next_ns += period_ns
    node.send_output("frame", frames[sent % FRAMES], {"seq": sent, "t": time.monotonic_ns()})
    sent += 1
send_s = (time.monotonic_ns() - start) / 1e9
with open(os.environ["RESULT"], "w", encoding="utf-8") as out:
    json.dump({"sent": sent, "send_s": send_s}, out)
