"""`cp devices`: the cameras, microphones and speakers the installed node types can open here."""

from __future__ import annotations

import json

import typer

from cpcli.cli.output import err_console, out_console
from cpcli.cli.reports import DEVICE_KINDS, devices_table, no_devices_line
from cpcli.node import DeviceInfo
from cpcli.registry import Registry, load_registry

Listed = dict[str, list[tuple[DeviceInfo, tuple[str, ...]]]]  # kind -> (device, node types that open it)


def list_devices(registry: Registry) -> tuple[Listed, list[str]]:
    """Ask every node type for its devices; a plugin that fails becomes a one-line warning."""
    warnings = [f"node type {name} could not be loaded: {why}" for name, why in registry.broken.items()]
    found: dict[tuple[str, str, str], tuple[DeviceInfo, list[str]]] = {}
    for node_type in registry.types.values():
        try:
            devices = list(node_type.cls.devices())
        except Exception as err:  # plugin code: its failure must not hide the other node types' devices
            why = str(err).splitlines()[0] if str(err) else "no message"
            warnings.append(f"node type {node_type.name} could not list its devices: {type(err).__name__}: {why}")
            continue
        for device in devices:
            if not isinstance(device, DeviceInfo):
                warnings.append(f"node type {node_type.name} listed a {type(device).__name__}, not a DeviceInfo")
                continue
            found.setdefault((device.kind, device.device, device.name), (device, []))[1].append(node_type.name)
    listed: Listed = {kind: [] for kind in DEVICE_KINDS}
    for device, types in found.values():
        listed.setdefault(device.kind, []).append((device, tuple(types)))
    return listed, warnings


def devices_command(
    as_json: bool = typer.Option(False, "--json", help="Print as JSON, for scripts."),
) -> int:
    """List the cameras and microphones (and speakers) this machine can open, with what to put in a recipe."""
    listed, warnings = list_devices(load_registry())
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
