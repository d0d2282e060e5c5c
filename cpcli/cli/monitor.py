"""`cp monitor`: the live terminal view of the cluster's workers, nodes, previews and events."""

from __future__ import annotations

import typer

from cpcli.cli.cluster import say, timing_from_env, token_option
from cpcli.cli.monitor_live import Monitor, find_manager, stdin_fd
from cpcli.cli.output import out_console
from cpcli.monitor.state import TypeInfo
from cpcli.registry import load_registry


def monitor_command(
    manager: str = typer.Option(None, "--manager", help="HOST:PORT of the manager (default: find it)."),
    interface: str = typer.Option(None, "--interface", help="IPv4 address to search for the manager on."),
    cluster: str = typer.Option(None, "--cluster", help="The cluster to watch, when several managers answer."),
    refresh_hz: float = typer.Option(4.0, "--refresh-hz", min=2.0, max=10.0, help="Screen updates a second (2-10)."),
    wait: bool = typer.Option(False, "--wait", help="Wait for a manager to appear instead of exiting."),
    token: str = token_option(),
) -> int:
    """Watch the cluster live: workers, nodes (rates, drops, latency, recording), previews and events.

    Keys: q quits (the session goes on), m marks the session, p turns previews on and off,
    arrows or tab select a node to show its preview larger.
    """
    timing = timing_from_env()
    address, credentials, first = find_manager(manager, interface, cluster, timing, wait, say, token)
    types = {name: TypeInfo(t.outputs, {p.name: p.default for p in t.params if not p.required})
             for name, t in load_registry().types.items()}
    return Monitor(address, timing, types, refresh_hz, out_console, credentials, first, stdin_fd()).run()
