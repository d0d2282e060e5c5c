"""`cp devices`: the cameras, microphones and speakers the installed node types can open here."""

from __future__ import annotations

import json

import typer

from cpcli.cli.output import err_console, out_console
from cpcli.cli.reports import DEVICE_KINDS, devices_table, no_devices_line
from cpcli.devices import list_devices
from cpcli.registry import load_registry


def devices_command(
    as_json: bool = typer.Option(False, "--json", help="Print as JSON, for scripts."),
) -> int:
    """List the cameras and microphones (and speakers) this machine can open, with what to put in a recipe."""
    listed, warnings = list_devices(load_registry(), DEVICE_KINDS)
    if as_json:
        out_console.print_json(json.dumps({
            "devices": [{"kind": d.kind, "device": d.device, "name": d.name, "details": dict(d.details),
                         "types": list(types)} for devices in listed.values() for d, types in devices],
            "none_found": [kind for kind, devices in listed.items() if not devices], "warnings": warnings,
        }, default=str))
        return 0
    for kind, devices in listed.items():
        out_console.print(devices_table(kind, devices) if devices else no_devices_line(kind), markup=False)
    for warning in warnings:
        err_console.print("[yellow]warning:[/yellow] ", end="")
        err_console.print(warning, markup=False)
    return 0
