"""The public node API: what a node author imports, and nothing else."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from cpcli.clock import Clock
from cpcli.errors import CpError, DeviceError, NodeConfigError, NodeError

if TYPE_CHECKING:  # annotations only: importing the node API (`cp worker`) skips numpy
    import numpy as np

__all__ = [
    "Clock",
    "CpError",
    "DeviceError",
    "DeviceInfo",
    "Inputs",
    "Node",
    "NodeConfigError",
    "NodeContext",
    "NodeError",
    "Outputs",
    "Sample",
]


@dataclass(frozen=True)
class Sample:
    """A value with its capture time on the cluster clock.

    Args:
        value: a numpy array (video frame HxW/HxWx3 uint8, audio block frames x channels),
            a flat dict of scalars (a table row) or any JSON-able value (an event).
        t_ns: capture time in cluster nanoseconds (`ctx.clock.now_ns()` or a device's time
            mapped with `ctx.clock.to_cluster_ns`); None stamps it when `step()` returns.
        rate_hz: the rate of the data inside the value where it has one: an audio block's
            sample rate, a video stream's nominal frame rate. Recorders need it (WAV, MP4).
        seq: the publisher's sequence number; set by the runtime on received samples.
    """

    value: Any
    t_ns: int | None = None
    rate_hz: float | None = None
    seq: int = -1


@dataclass(frozen=True)
class DeviceInfo:
    """A device a node type can open on this machine, as `cp devices` lists it.

    Args:
        kind: "camera", "microphone" or "speaker".
        device: what to write in the recipe's `device:` param to open it.
        name: a human-readable name.
        details: what a user chooses settings by (resolution and rate, channels, sample rate).
    """

    kind: str
    device: str
    name: str
    details: Mapping[str, Any] = field(default_factory=dict)


Inputs = Mapping[str, Sample]
"""What `step()` receives: one Sample per input, keyed as the recipe names it (`cam`, `cam.video`)."""

Outputs = Mapping[str, Any] | Sample | Any | None
"""What `step()` returns: {port: value or Sample}, a bare value for a one-output node, or None."""


class _Lender(Protocol):
    """Where a running node's output buffers come from (the runtime's publisher)."""

    def lend(self, port: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray: ...

    def constant(self, value: np.ndarray) -> np.ndarray: ...


@dataclass
class NodeContext:
    """What the runtime gives a node in `setup()`.

    Args:
        node_id: the node's id in the recipe.
        clock: cluster time; stamp captures with `clock.now_ns()`.
        logger: writes to the node's log file in the session folder.
        worker: the name of the machine the node runs on.
        data_dir: the node's own folder in the session, for files a node writes itself.
        info: facts a node reports about itself, JSON-able (a camera's actual resolution and
            frame rate, a microphone's overflow count); the runtime shows them live and keeps
            the last values in the manifest under the node's `info`. `info["lost"]` counts
            samples the node itself lost (device overflows, full queues): it adds to the node's
            drops (`stats.source_lost`).
    """

    node_id: str
    clock: Clock
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("cpcli.node"))
    worker: str = "local"
    data_dir: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)
    _lender: _Lender | None = field(default=None, repr=False, compare=False)

    def output_buffer(self, port: str, shape: int | tuple[int, ...], dtype: Any = "uint8") -> np.ndarray:
        """A writable array to build this step's value of output `port` in (e.g. `cap.read(buffer)`,
        `cv2.cvtColor(frame, code, dst=buffer)`).

        Returned from this `step()` (as the value, or in a `Sample`), it is sent and recorded without
        a copy: readers on this machine read it in shared memory, where it was built. One not
        returned is taken back when `step()` returns. Do not keep it (a slot is lent again only
        once nothing refers to its array, so a kept buffer costs the pool a slot), and never write
        to one you returned: readers may be reading it. Its contents start undefined.

        Raises:
            NodeError: `port` is not one of the node's outputs, or the shape or dtype is not one.
        """
        import numpy as np

        dims = (shape,) if isinstance(shape, int) else tuple(shape)
        try:
            kind = np.dtype(dtype)
        except TypeError as err:
            raise NodeError(f"output_buffer({port!r}): {dtype!r} is not a numpy dtype") from err
        if kind.hasobject or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
            raise NodeError(f"output_buffer({port!r}): shape {shape!r} of {kind} is not an array of plain numbers",
                            hint="give a tuple of sizes (e.g. (480, 640, 3)) and a numeric dtype")
        if self._lender is None:
            return np.empty(dims, kind)
        try:
            return self._lender.lend(port, dims, kind)
        except CpError as err:
            raise NodeError(f"output_buffer: {err.message}") from None

    def constant(self, value: np.ndarray) -> np.ndarray:
        """A read-only copy of `value` to return from `step()` as often as the node likes (a still
        image, precomputed frames): it is written to shared memory once and then sent without a
        copy each time. Make constants in `setup()`."""
        if self._lender is None:
            import numpy as np

            array: np.ndarray = np.array(value, copy=True, order="C")
            array.flags.writeable = False
            return array
        return self._lender.constant(value)


class Node:
    """Base class of every node type.

    Subclasses take their recipe `params:` as keyword-only `__init__` arguments (validate
    them there and raise `NodeConfigError`; acquire nothing), acquire devices in `setup()`,
    produce outputs in `step()` and release in `teardown()`.

    Input arrays are read-only views on the transport's buffers and stay valid only during
    the `step()` that receives them: copy what you keep. A returned value belongs to the
    runtime (it is sent and recorded without a copy): never change it afterwards. A node with
    one output that returns a table row whose only column is named like its port should wrap
    the row in `Sample` so it is not read as {port: value}.

    Class attributes:
        outputs: the output port names; a node with one port may return a bare value.
        input_count: how many inputs the node takes: 0 for a source, 1 for a node that
            transforms one stream, None for any number of at least one.
        rate_hz: for sources (no inputs), how often `step()` is called; 0 or None means as
            fast as `step()` returns. An instance may set it in `__init__` from a param.
    """

    outputs: ClassVar[tuple[str, ...]] = ("out",)
    input_count: ClassVar[int | None] = None
    rate_hz: float | None = None

    @classmethod
    def devices(cls) -> list[DeviceInfo]:
        """The devices this node type can open here, for `cp devices` (quick: no long probing)."""
        return []

    def setup(self, ctx: NodeContext) -> None:
        """Acquire devices and resources; called once in the node's own process."""

    def step(self, inputs: Inputs) -> Outputs:
        """Produce outputs from inputs (sources get an empty mapping)."""
        raise NotImplementedError(f"{type(self).__name__}.step() is not written")

    def teardown(self) -> None:
        """Release what `setup()` acquired; called only after a successful `setup()`."""
