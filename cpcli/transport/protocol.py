"""Wire format: data messages `[topic, header, payload]` and control messages `[command, body]`."""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING, Any, NamedTuple

import msgpack

if TYPE_CHECKING:
    import numpy as np

from cpcli.errors import TransportError

PROTOCOL_VERSION = 1

# Control commands, node driver <-> host supervisor (uppercase bytes, defined once here).
HELLO = b"HELLO"  # driver -> supervisor: I am up, send my configuration
CONFIG = b"CONFIG"  # supervisor -> driver: node spec and session settings
BOUND = b"BOUND"  # driver -> supervisor: node built, publisher bound at endpoint
CONNECT = b"CONNECT"  # supervisor -> driver: upstream endpoints and expected subscribers
READY = b"READY"  # driver -> supervisor: set up, subscribed, every subscriber seen
START = b"START"  # supervisor -> driver: the session starts now (sources begin)
STATS = b"STATS"  # driver -> supervisor: periodic statistics
STOP = b"STOP"  # supervisor -> driver: sources stop; others drain, then finish
ERROR = b"ERROR"  # driver -> supervisor: the node failed
DONE = b"DONE"  # driver -> supervisor: finished, files final, statistics attached
ENDED = b"ENDED"  # supervisor -> driver: an upstream node finished; how many samples it sent per port
CLOCK = b"CLOCK"  # supervisor -> driver: a newer mapping of this machine's clock onto cluster time
COMMANDS = frozenset({HELLO, CONFIG, BOUND, CONNECT, READY, START, STATS, STOP, ERROR, DONE, ENDED, CLOCK})

# Data message kinds (header field "k").
KIND_ARRAY = "nd"  # payload is the raw buffer of a C-contiguous numpy array
KIND_OBJECT = "obj"  # payload is msgpack of plain data
KIND_END = "eos"  # end of stream: the publisher sends nothing more on this topic
KIND_SHM = "shm"  # no payload: the array lies in the publisher's shared-memory slot (same host)
KIND_SHM_OBJECT = "shmo"  # no payload: msgpack of plain data too large to go inline lies in a slot
SHM_KINDS = (KIND_SHM, KIND_SHM_OBJECT)

MAX_HEADER_BYTES = 4096  # headers are a handful of fields; anything larger is not ours


class Header(NamedTuple):
    """What travels beside a payload: sequence number, capture time, and how to read the payload.

    A named tuple, not a frozen dataclass: one is made per message, and this is the cheap immutable kind."""

    seq: int
    t_ns: int
    kind: str
    dtype: str = ""
    shape: tuple[int, ...] = ()
    rate_hz: float | None = None
    slot: int = -1  # KIND_SHM: which slot of the publisher's pool
    generation: int = 0  # KIND_SHM: the slot's generation when written; a different one is stale


def _plain(value: Any) -> Any:
    """msgpack hook: numpy scalars and small arrays become plain numbers and lists."""
    np = sys.modules.get("numpy")  # not imported: then no value here is a numpy one (control-plane
    if np is not None and isinstance(value, np.generic):  # processes start faster without it)
        return value.item()
    if np is not None and isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not plain data")


def pack_object(value: Any) -> bytes:
    """Serialize plain data (dicts, lists, numbers, strings, numpy scalars); never pickle."""
    try:
        return msgpack.packb(value, default=_plain, use_bin_type=True)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError) as err:
        raise TransportError(
            f"a {type(value).__name__} cannot be sent between nodes ({err})",
            hint="return a numpy array, a dict of numbers/strings, or other JSON-able data",
        ) from err


def unpack_object(payload: bytes | memoryview) -> Any:
    return msgpack.unpackb(payload, raw=False, strict_map_key=False)


def encode_header(header: Header) -> bytes:
    fields: dict[str, Any] = {"s": header.seq, "t": header.t_ns, "k": header.kind}
    if header.kind in (KIND_ARRAY, *SHM_KINDS):
        fields["d"] = header.dtype
        fields["sh"] = list(header.shape)
    if header.kind in SHM_KINDS:
        fields["sl"] = header.slot
        fields["g"] = header.generation
    if header.rate_hz is not None:
        fields["r"] = header.rate_hz
    return msgpack.packb(fields)  # type: ignore[no-any-return]


def decode_header(raw: bytes | memoryview) -> Header:
    """Read a data header; anything malformed raises TransportError (never trusted blindly)."""
    if len(raw) > MAX_HEADER_BYTES:
        raise TransportError(f"data header of {len(raw)} bytes is too large")
    try:
        fields = msgpack.unpackb(raw, raw=False)
        kind = fields["k"]
        rate = fields.get("r")
        if kind in (KIND_ARRAY, *SHM_KINDS):
            return Header(
                int(fields["s"]), int(fields["t"]), kind, str(fields["d"]), tuple(int(n) for n in fields["sh"]),
                None if rate is None else float(rate),
                int(fields.get("sl", -1)), int(fields.get("g", 0)),
            )
        if kind in (KIND_OBJECT, KIND_END):
            return Header(int(fields["s"]), int(fields["t"]), kind, rate_hz=None if rate is None else float(rate))
    except (msgpack.UnpackException, ValueError, KeyError, TypeError) as err:
        raise TransportError(f"malformed data header ({err})") from err
    raise TransportError(f"unknown data kind {kind!r}")


def array_from_payload(header: Header, payload: memoryview | bytes) -> np.ndarray:
    """A read-only numpy view on a received buffer: no copy."""
    import numpy as np

    try:
        dtype = np.dtype(header.dtype)
        if dtype.hasobject:
            raise TypeError("object arrays are not plain data")
        expected = math.prod(header.shape) * dtype.itemsize
        if len(payload) != expected:
            raise ValueError(f"payload has {len(payload)} bytes, header says {expected}")
        array = np.frombuffer(payload, dtype=dtype).reshape(header.shape)
        array.flags.writeable = False  # inputs are shared views: a node must copy to change them
        return array
    except (TypeError, ValueError) as err:
        raise TransportError(f"malformed array payload ({err})") from err


def pack_control(command: bytes, body: dict[str, Any] | None = None) -> list[bytes]:
    return [command, pack_object(body or {})]


def unpack_control(frames: list[bytes]) -> tuple[bytes, dict[str, Any]]:
    """Validate a control message `[command, msgpack body]`."""
    if len(frames) != 2 or frames[0] not in COMMANDS:
        raise TransportError(f"malformed control message ({len(frames)} frames)")
    try:
        body = unpack_object(frames[1])
    except (msgpack.UnpackException, ValueError) as err:
        raise TransportError(f"malformed control body ({err})") from err
    if not isinstance(body, dict):
        raise TransportError("control body is not a mapping")
    return frames[0], body


def topic_for(node_id: str, port: str) -> bytes:
    """The ZeroMQ topic of a node's output port."""
    return f"{node_id}/{port}".encode()
