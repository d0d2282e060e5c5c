"""The root Typer app: version, help, and every command."""

from __future__ import annotations

import importlib
from typing import Any

import typer
from typer.core import TyperGroup

from cpcli import __version__
from cpcli.cli.output import out_console

# Each command's module loads only when that command runs (`cp worker` needs none of the monitor,
# collect or recipe-running code): 0.1-0.2 s less start-up for every `cp` command.
COMMANDS = {
    "run": ("cpcli.cli.run", "run_command"),
    "validate": ("cpcli.cli.run", "validate_command"),
    "nodes": ("cpcli.cli.nodes", "nodes_command"),
    "inspect": ("cpcli.cli.inspect", "inspect_command"),
    "devices": ("cpcli.cli.devices", "devices_command"),
    "manager": ("cpcli.cli.cluster", "manager_command"),
    "worker": ("cpcli.cli.cluster", "worker_command"),
    "status": ("cpcli.cli.cluster", "status_command"),
    "mark": ("cpcli.cli.mark", "mark_command"),
    "monitor": ("cpcli.cli.monitor", "monitor_command"),
    "collect": ("cpcli.cli.collect", "collect_command"),
    "token": ("cpcli.cli.token", "token_command"),
}
_SETTINGS: dict[str, Any] = {
    "add_completion": False,
    "pretty_exceptions_enable": False,
    "rich_markup_mode": None,
    "context_settings": {"help_option_names": ["-h", "--help"]},
}


class _LazyGroup(TyperGroup):
    """The root group: lists every command, imports one only when it is asked for."""

    def list_commands(self, ctx: Any) -> list[str]:  # ctx: typer's click Context (it vendors click)
        return list(COMMANDS)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        spec = COMMANDS.get(cmd_name)
        if spec is None:
            return None
        function = getattr(importlib.import_module(spec[0]), spec[1])
        single = typer.Typer(**_SETTINGS)
        single.command(cmd_name)(function)
        return typer.main.get_command(single)


app = typer.Typer(
    cls=_LazyGroup,
    name="cp",
    help="cpcli: record cameras, microphones and processing nodes across lab machines on one clock.\n\n"
    "Any other `cp ...` (for example `cp a.txt b.txt`) is the system's file copy, unchanged.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        out_console.print(f"cpcli {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """cpcli: record cameras, microphones and processing nodes across lab machines on one clock."""

