"""Audio measures on one stream of blocks: audio_level."""

from __future__ import annotations

import math

from cpcli.lazy import numpy as np
from cpcli.node import Inputs, Node, NodeContext, NodeError, Outputs, Sample

FLOOR_DBFS = -120.0  # stands for silence: below any real converter's noise, and CSV/JSON have no -inf
BLOCK_KINDS = "a (frames x channels) or 1-D array of floats in -1..1 or of signed integers"


def _dbfs(value: float) -> float:
    return max(FLOOR_DBFS, 20.0 * math.log10(value)) if value > 0 else FLOOR_DBFS


class AudioLevel(Node):
    """RMS and peak level of each audio block in dBFS, and whether it clipped, as a table row.

    The row is {"rms_dbfs", "peak_dbfs", "clipped"} over all channels: a full-scale sine reads
    -3.01 dBFS RMS, silence reads -120 dBFS. Float blocks are full scale at 1.0, integer blocks
    at their type's range (int16: 32768); a block clips when a sample reaches full scale.
    """

    outputs = ("level",)
    input_count = 1

    def __init__(self) -> None:
        self._where = "audio_level"

    def setup(self, ctx: NodeContext) -> None:
        self._where = f"audio_level node {ctx.node_id!r}"

    def step(self, inputs: Inputs) -> Outputs:
        if len(inputs) != 1:
            names = ", ".join(inputs) or "none"
            raise NodeError(f"{self._where} takes exactly one input, got {len(inputs)}: {names}")
        sample = next(iter(inputs.values()))
        block = sample.value
        if not isinstance(block, np.ndarray):
            raise NodeError(
                f"{self._where} expects an audio block ({BLOCK_KINDS}), got a {type(block).__name__}"
            )
        if block.ndim not in (1, 2) or not (
            np.issubdtype(block.dtype, np.floating) or np.issubdtype(block.dtype, np.signedinteger)
        ):
            raise NodeError(
                f"{self._where} expects an audio block ({BLOCK_KINDS}), "
                f"got an array of shape {block.shape} and dtype {block.dtype}"
            )
        if block.size == 0:
            return None  # an empty block has no level
        high, low = block.max(), block.min()
        if np.issubdtype(block.dtype, np.floating):
            full_scale = 1.0
            if not (math.isfinite(high) and math.isfinite(low)):
                raise NodeError(f"{self._where} received an audio block with NaN or infinite samples")
            clipped = bool(high >= 1.0 or low <= -1.0)
        else:
            info = np.iinfo(block.dtype)
            full_scale = float(-int(info.min))  # int16: 32768, so 32767 reads just below 0 dBFS
            clipped = bool(high >= info.max or low <= info.min)
        flat = block.reshape(-1).astype(np.float64)
        rms = math.sqrt(float(flat @ flat) / flat.size) / full_scale
        peak = max(float(high), -float(low)) / full_scale
        row = {"rms_dbfs": _dbfs(rms), "peak_dbfs": _dbfs(peak), "clipped": clipped}
        frames = block.shape[0]
        # Rows come once per block: their rate is the block rate, not the sample rate.
        rate_hz = sample.rate_hz / frames if sample.rate_hz else None
        return Sample(row, t_ns=sample.t_ns, rate_hz=rate_hz)
