"""The devices (cameras, microphones, speakers) that the installed node types can open here."""

from __future__ import annotations

from collections.abc import Iterable

from cpcli.node import DeviceInfo
from cpcli.registry import Registry

Listed = dict[str, list[tuple[DeviceInfo, tuple[str, ...]]]]  # kind -> (device, node types that open it)


def list_devices(registry: Registry, kinds: Iterable[str] = ()) -> tuple[Listed, list[str]]:
    """Ask every node type for its devices; a plugin that fails becomes a one-line warning.

    `kinds` are listed even when no device of theirs was found (with an empty list).
    """
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
    listed: Listed = {kind: [] for kind in kinds}
    for device, types in found.values():
        listed.setdefault(device.kind, []).append((device, tuple(types)))
    return listed, warnings
