"""What a worker tells the manager about its machine, and which address it uses by default."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import psutil

from cpcli.errors import CpError

INTERFACE_ENV = "CP_INTERFACE"
_ROUTE_PROBE = ("192.0.2.1", 9)  # TEST-NET-1: only the routing table is consulted, nothing is sent


def default_interface(given: str | None) -> str:
    """The address to use: `--interface`, else `CP_INTERFACE`, else the one of the default route."""
    if given:
        return given
    if os.environ.get(INTERFACE_ENV):
        return os.environ[INTERFACE_ENV]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(_ROUTE_PROBE)  # UDP connect sends no packet
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"  # no network at all: this machine only


def address_towards(host: str) -> str:
    """This machine's address on the route to `host` (what a peer there can reach us at)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((host, 9))
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def resources(data_dir: Path) -> dict[str, Any]:
    """CPU, memory and free disk now (cheap: no blocking sample)."""
    memory = psutil.virtual_memory()
    where = data_dir if data_dir.exists() else Path(data_dir.anchor or ".")
    try:
        free = psutil.disk_usage(str(where)).free
    except OSError:
        free = 0
    return {"cpu_percent": psutil.cpu_percent(None), "cpu_count": os.cpu_count() or 1,
            "memory_total": memory.total, "memory_available": memory.available, "disk_free": free}


def parse_address(text: str) -> tuple[str, int]:
    """`HOST:PORT` as given to --manager; raises ValueError with what is wrong."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--manager {text!r} is not HOST:PORT")
    return host, int(port)


def manager_address(text: str) -> tuple[str, int]:
    """`--manager HOST:PORT` checked before any socket uses it: a port, and a host this machine can resolve.

    Raises:
        CpError: naming what is wrong (ZeroMQ would otherwise retry an unresolvable name forever).
    """
    try:
        host, port = parse_address(text)
    except ValueError as err:
        raise CpError(str(err), hint="write it as HOST:PORT, e.g. --manager 192.168.1.10:7425") from err
    try:
        socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
    except (OSError, UnicodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else type(err).__name__
        raise CpError(f"--manager {text}: {host} is neither an IPv4 address nor a host name this machine can "
                      f"resolve ({reason})", hint="give the address `cp manager` prints when it starts, or leave "
                      "--manager out to find the manager over mDNS") from err
    return host, port
