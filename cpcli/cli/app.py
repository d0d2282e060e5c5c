"""The root Typer app: version, help, and every command."""

from __future__ import annotations

import typer

from cpcli import __version__
from cpcli.cli import cluster, collect, devices, inspect, mark, monitor, nodes, run, token
from cpcli.cli.output import out_console

app = typer.Typer(
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


app.command("run")(run.run_command)
app.command("validate")(run.validate_command)
app.command("nodes")(nodes.nodes_command)
app.command("inspect")(inspect.inspect_command)
app.command("devices")(devices.devices_command)
app.command("manager")(cluster.manager_command)
app.command("worker")(cluster.worker_command)
app.command("status")(cluster.status_command)
app.command("mark")(mark.mark_command)
app.command("monitor")(monitor.monitor_command)
app.command("collect")(collect.collect_command)
app.command("token")(token.token_command)
