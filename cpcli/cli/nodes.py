"""`cp nodes`: the node types installed here, with their parameters."""

from __future__ import annotations

import json

import typer

from cpcli.cli.display import node_types_table
from cpcli.cli.output import err_console, out_console
from cpcli.registry import load_registry


def nodes_command(
    as_json: bool = typer.Option(False, "--json", help="Print as JSON, for scripts."),
) -> int:
    """List the node types installed here (built-in and plugins) with their parameters."""
    registry = load_registry()
    if as_json:
        data = {
            "types": {
                t.name: {"doc": t.doc, "origin": t.origin, "outputs": list(t.outputs), "params": [
                    {"name": p.name, "type": p.type_name, "required": p.required,
                     "default": None if p.required else p.default} for p in t.params]}
                for t in registry.types.values()
            },
            "broken": registry.broken,
        }
        out_console.print_json(json.dumps(data, default=repr))
        return 0
    out_console.print(node_types_table(registry))
    for name, why in registry.broken.items():
        err_console.print(f"[yellow]warning:[/yellow] node type {name} could not be loaded: {why}")
    return 0
