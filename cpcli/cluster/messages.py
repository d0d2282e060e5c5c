"""The cluster's control plane: commands between manager, workers and `cp` clients, validated on arrival.

Every message is `[command, msgpack body]` on a DEALER -> ROUTER connection. A message that opens a
conversation (REGISTER, RUN, ATTACH, STATUS) carries the protocol version in `v`; a peer speaking
another version is refused with a reason. Each command names the fields it needs and their types,
checked by `check()`: a malformed message is dropped and logged, never trusted.
"""

from __future__ import annotations

from typing import Any

from cpcli.errors import TransportError
from cpcli.transport.protocol import PROTOCOL_VERSION

# worker -> manager
REGISTER = b"REGISTER"  # name, host, version, node types, devices, resources; sessions it still runs
BEAT = b"BEAT"  # both ways (and client -> manager): I am alive; a worker adds its resources
PREPARED = b"PREPARED"  # the worker's nodes are built: where each publisher listens
READY = b"READY"  # the worker's nodes are wired and set up
STATE = b"STATE"  # node states and statistics of the session, periodically and at the end
NODE_ENDED = b"NODE_ENDED"  # a node finished: how many samples it sent per port (for downstream workers)
FAILED = b"FAILED"  # the worker could not prepare its part of the session
# manager -> worker
WELCOME = b"WELCOME"  # registered
REFUSED = b"REFUSED"  # not registered (name taken, other protocol), or a request refused: why
PREPARE = b"PREPARE"  # the nodes of a session placed on this worker
CONNECT = b"CONNECT"  # their wiring, once every worker's publishers are bound
START = b"START"  # the session starts now
STOP = b"STOP"  # stop the session in order (sources now, the rest drains)
ENDED = b"ENDED"  # an upstream node on another worker finished
# client -> manager
RUN = b"RUN"  # run this recipe
ATTACH = b"ATTACH"  # follow a running session (after the manager came back)
STATUS = b"STATUS"  # the cluster now
# manager -> client
ACCEPTED = b"ACCEPTED"  # the session is being prepared, in this folder
PROGRESS = b"PROGRESS"  # phase, elapsed time, every node's state and statistics
RESULT = b"RESULT"  # the session ended: its manifest and failures
STATUS_REPLY = b"STATUS_REPLY"

_Fields = dict[str, type | tuple[type, ...]]
SCHEMAS: dict[bytes, _Fields] = {
    REGISTER: {"v": int, "name": str, "instance": str, "host": str, "version": str, "node_types": list,
               "sessions": list},
    BEAT: {},
    PREPARED: {"session": str, "bound": dict},
    READY: {"session": str},
    STATE: {"session": str, "phase": str, "nodes": dict},
    NODE_ENDED: {"session": str, "node": str, "sent": dict},
    FAILED: {"session": str, "message": str},
    WELCOME: {"v": int, "manager": str, "cluster": str},
    REFUSED: {"message": str},
    PREPARE: {"session": str, "nodes": list, "timing": dict, "options": dict},
    CONNECT: {"session": str, "wiring": dict},
    START: {"session": str},
    STOP: {"session": str},
    ENDED: {"session": str, "source": str, "sent": dict},
    RUN: {"v": int, "recipe": str, "recipe_text": str, "nodes": list, "options": dict},
    ATTACH: {"v": int, "session": str},
    STATUS: {"v": int},
    ACCEPTED: {"session": str, "session_dir": str},
    PROGRESS: {"session": str, "phase": str, "elapsed_s": (int, float), "nodes": dict},
    RESULT: {"session": str, "manifest": dict},
    STATUS_REPLY: {"manager": dict, "workers": list},
}
COMMANDS = frozenset(SCHEMAS)


def check(command: bytes, body: dict[str, Any]) -> None:
    """Raise TransportError unless `body` has every field `command` needs, of the right type."""
    schema = SCHEMAS.get(command)
    if schema is None:
        raise TransportError(f"unknown command {command[:32]!r}")
    for name, kind in schema.items():
        if name not in body:
            raise TransportError(f"{command.decode()} without {name!r}")
        value = body[name]
        if isinstance(value, bool) and kind is int or not isinstance(value, kind):
            raise TransportError(f"{command.decode()} field {name!r} is a {type(value).__name__}")
    if "v" in schema and body["v"] != PROTOCOL_VERSION:
        raise VersionMismatch(int(body["v"]))


class VersionMismatch(TransportError):
    """The peer speaks another protocol version (a different cpcli release)."""

    def __init__(self, theirs: int) -> None:
        super().__init__(f"it speaks control protocol {theirs}, this cpcli speaks {PROTOCOL_VERSION}",
                         hint="install the same cpcli version on every machine of the cluster")
        self.theirs = theirs
