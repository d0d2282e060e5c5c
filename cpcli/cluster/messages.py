"""The cluster's control plane: commands between manager, workers and `cp` clients, validated on arrival.

Every message is `[command, msgpack body]` on a DEALER -> ROUTER connection. A message that opens a
conversation (REGISTER, RUN, ATTACH, STATUS) carries the protocol version in `v`; a peer speaking
another version is refused with a reason. Each command names the fields it needs and their types,
checked by `check()`: a malformed message is dropped and logged, never trusted.
"""

from __future__ import annotations

import math
import re
from typing import Any

from cpcli.errors import TransportError
from cpcli.transport.protocol import PROTOCOL_VERSION

# worker -> manager
# Names of managers, workers and clusters: they name folders and mDNS labels (30 + '@' + 30 + '-N' fit 63 bytes)
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,29}")
HOST_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}")  # an IPv4 address or a host name
HEX_TOKEN_RE = re.compile(r"[0-9a-f]{32}")  # a session's client token (secrets.token_hex(16))
MAX_CLOCK_VALUE = 2**62  # nanoseconds (146 years) or ppb: anything larger is not a clock's
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
MARK = b"MARK"  # put an event (label, meta) into the running session at the cluster time it arrives
# manager -> client
ACCEPTED = b"ACCEPTED"  # the session is being prepared, in this folder
PROGRESS = b"PROGRESS"  # phase, elapsed time, every node's state and statistics
RESULT = b"RESULT"  # the session ended: its manifest and failures
STATUS_REPLY = b"STATUS_REPLY"
MARKED = b"MARKED"  # the event went in, at this session time
# `cp collect` -> an archive server (each worker's, and the manager's for its session records)
SESSIONS = b"SESSIONS"  # the sessions this machine holds
SESSION_LIST = b"SESSION_LIST"  # ... as [{name, start_utc, status, workers, bytes}]
PART = b"PART"  # this machine's part of a session: its record and every file with its sha256
PART_REPLY = b"PART_REPLY"
FETCH = b"FETCH"  # one chunk of one file: (path, offset, size), size at most the server's chunk size
CHUNK = b"CHUNK"  # its header (path, offset, size), followed by a frame of raw bytes
SEAL = b"SEAL"  # a large file: (path), answered with a seal to fetch its chunks beside Curve (cluster/sealed.py)
SEAL_REPLY = b"SEAL_REPLY"  # ... the data port, a ticket id, an AES key and a MAC key for that file only
DELETE_PART = b"DELETE_PART"  # `cp collect --delete-remote`: delete this worker's part, as verified (see below)
DELETED = b"DELETED"  # ... done: the files and bytes deleted, and how many entries not in the part stayed

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
    MARK: {"v": int, "label": str, "meta": dict},
    MARKED: {"session": str, "t_ns": int},
    SESSIONS: {"v": int},
    SESSION_LIST: {"owner": str, "sessions": list},
    PART: {"v": int, "session": str},
    PART_REPLY: {"session": str, "owner": str, "files": list, "record": dict},
    FETCH: {"session": str, "path": str, "offset": int, "size": int},
    CHUNK: {"path": str, "offset": int, "size": int},
    SEAL: {"v": int, "session": str, "path": str},
    SEAL_REPLY: {"port": int, "ticket": bytes, "key": bytes, "mac": bytes},
    # count and listing: the part's file count and `archive_server.listing_digest` of its paths and
    # sha256s as verified by the client (a digest, so a part of 100,000 files fits in one message);
    # probe: a file the client made in its collected folder, which the server must not see in its own
    DELETE_PART: {"v": int, "session": str, "count": int, "listing": str, "probe": str},
    DELETED: {"session": str, "files": int, "bytes": int, "kept": int},
}
# Fields a receiver reads when present (None standing for absent): a wrong type is as malformed as a
# missing required field, or `dict(body.get("resources") or {})` would end the receiver's loop.
OPTIONAL: dict[bytes, _Fields] = {
    REGISTER: {"resources": dict, "devices": list, "archive_port": int, "archive_data_port": int},
    BEAT: {"resources": dict, "clock": dict},
    WELCOME: {"known_sessions": list},
    REFUSED: {"hint": str, "reregister": bool},
    FAILED: {"hint": str},
    STATE: {"error": str, "files": list, "clock": list},
    RUN: {"session_name": str, "on_worker_lost": str, "timing": dict},
    PROGRESS: {"lost": list},
    RESULT: {"failures": dict, "error": str, "interrupted": bool, "lost": dict},
    ATTACH: {"token": str},
    ACCEPTED: {"client_token": str},
}
COMMANDS = frozenset(SCHEMAS)


def check(command: bytes, body: dict[str, Any]) -> None:
    """Raise TransportError unless `body` has every field `command` needs, of the right type.

    The version comes first: a peer of another release may name its fields differently, and deserves
    to hear that rather than which field it lacks. Optional fields are checked when present. What
    the manager computes with (a RUN's timing and duration, a worker's clock) must be numbers, a
    MARK's meta plain values (it goes into events.jsonl), and the session reports a REGISTER carries
    valid STATE bodies.
    """
    schema = SCHEMAS.get(command)
    if schema is None:
        raise TransportError(f"unknown command {command[:32]!r}")
    version = body.get("v")
    if "v" in schema and type(version) is int and version != PROTOCOL_VERSION:
        raise VersionMismatch(version)
    for name, kind in schema.items():
        if name not in body:
            raise TransportError(f"{command.decode()} without {name!r}")
        _check_type(command, name, body[name], kind)
    for name, kind in OPTIONAL.get(command, {}).items():
        if body.get(name) is not None:
            _check_type(command, name, body[name], kind)
    if command == RUN:
        duration = body["options"].get("duration_s")
        if duration is not None and not _is_number(duration):
            raise TransportError(f"RUN option 'duration_s' is a {type(duration).__name__}")
        if not all(_is_number(v) for v in dict(body.get("timing") or {}).values()):
            raise TransportError("RUN field 'timing' holds something other than numbers")
    elif command == REGISTER:
        if not NAME_RE.fullmatch(body["name"]):  # it becomes a folder name in sessions: no '/', no '..'
            raise TransportError(f"REGISTER with worker name {body['name'][:40]!r}, which is not a name")
        if not HOST_RE.fullmatch(body["host"]):  # shown, and dialled by cp collect
            raise TransportError(f"REGISTER with host {body['host'][:40]!r}, which is not an address")
        for field_name in ("archive_port", "archive_data_port"):
            port = body.get(field_name)
            if port is not None and not 0 < port < 65536:
                raise TransportError(f"REGISTER with {field_name.replace('_', ' ')} {port}, which is not a TCP port")
        for report in body["sessions"]:  # what it still runs: STATE reports, taken in as if just sent
            if isinstance(report, dict):
                try:
                    check(STATE, report)
                except TransportError as err:
                    raise TransportError(f"REGISTER with a malformed session report ({err.message})") from err
    elif command == BEAT and not all(_is_number(v) and math.isfinite(v) and abs(v) < MAX_CLOCK_VALUE
                                     for v in dict(body.get("clock") or {}).values()):
        raise TransportError("BEAT field 'clock' holds something other than finite numbers of a clock's size")
    elif command == ATTACH and not HEX_TOKEN_RE.fullmatch(str(body.get("token") or "0" * 32)):
        raise TransportError("ATTACH field 'token' is not a session token")
    elif command == MARK and not all(isinstance(k, str) and (v is None or isinstance(v, (str, int, float)))
                                     for k, v in body["meta"].items()):
        raise TransportError("MARK field 'meta' holds something other than names and plain values")


def _check_type(command: bytes, name: str, value: Any, kind: type | tuple[type, ...]) -> None:
    if isinstance(value, bool) and kind is int or not isinstance(value, kind):
        raise TransportError(f"{command.decode()} field {name!r} is a {type(value).__name__}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class VersionMismatch(TransportError):
    """The peer speaks another protocol version (a different cpcli release)."""

    def __init__(self, theirs: int) -> None:
        super().__init__(f"it speaks control protocol {theirs}, this cpcli speaks {PROTOCOL_VERSION}",
                         hint="install the same cpcli version on every machine of the cluster")
        self.theirs = theirs
