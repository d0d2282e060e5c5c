"""`cp run` and `cp validate`: a recipe checked, or run to a recorded session."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import typer
from rich.live import Live

from cpcli.cli.cluster import timing_from_env, token_option
from cpcli.cli.display import nodes_table, progress_view, summary_lines
from cpcli.cli.output import err_console, out_console
from cpcli.cluster.client import RemoteRun
from cpcli.cluster.locate import locate
from cpcli.errors import CpError, RecipeError
from cpcli.recipe import Recipe, load_recipe
from cpcli.registry import load_registry
from cpcli.runtime.session import Progress, RunOptions, SessionResult, StopControl, local_worker_name, run_session
from cpcli.transport.curve import Credentials
from cpcli.units import parse_duration, parse_size

EXIT_INTERRUPTED = 130


@contextmanager
def _stop_on_signals(stop: StopControl, interrupted: list[bool]) -> Iterator[None]:
    """Ctrl-C stops in order (a second one forces); SIGTERM stops in order."""

    def on_sigint(_signum: int, _frame: FrameType | None) -> None:
        interrupted[0] = True
        if stop.requested.is_set():
            stop.forced.set()
        else:
            stop.requested.set()

    def on_sigterm(_signum: int, _frame: FrameType | None) -> None:
        stop.requested.set()

    old_int = signal.signal(signal.SIGINT, on_sigint)
    old_term = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


class _Reporter:
    """Live progress on a terminal; a line per phase elsewhere (logs, CI)."""

    def __init__(self, live: Live | None, quiet: bool) -> None:
        self._live = live
        self._quiet = quiet
        self._phase = ""

    def __call__(self, progress: Progress) -> None:
        if self._live is not None:
            self._live.update(progress_view(progress))
        elif not self._quiet and progress.phase != self._phase:
            messages = {"starting": f"starting {len(progress.nodes)} nodes in {progress.session_dir}",
                        "running": "recording; stop with Ctrl-C", "stopping": "stopping: closing recordings"}
            if progress.phase in messages:
                err_console.print(messages[progress.phase])
        self._phase = progress.phase


def run_command(
    recipe: Path = typer.Argument(..., metavar="RECIPE", help="The recipe YAML file."),
    duration: str = typer.Option(None, "--duration", "-d", help="Stop after this long: 30, 30s, 5m, 1h."),
    out: Path = typer.Option(None, "--out", "-o", help="Folder that holds session folders (runs here; default "
                             "sessions). On a cluster the manager's --data decides."),
    session: str = typer.Option(None, "--session", help="Session folder name (default: UTC time + recipe name)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON, for scripts."),
    min_free: str = typer.Option("1GiB", "--min-free", help="Stop recording cleanly below this free space: 1GiB, 2%."),
    manager: str = typer.Option(None, "--manager", help="Run on the cluster of this manager (HOST:PORT)."),
    local: bool = typer.Option(False, "--local", help="Run here only, even when a manager is found."),
    interface: str = typer.Option(None, "--interface", help="Look for a manager over mDNS on this IPv4 address."),
    cluster: str = typer.Option(None, "--cluster", help="The cluster to run on, when several managers answer."),
    token: str = token_option(),
    no_encrypt_data: bool = typer.Option(False, "--no-encrypt-data", help="Send node data between machines "
                                         "unencrypted (still members only): faster on a trusted wired network."),
) -> int:
    """Run a recipe and record it; stops on Ctrl-C or after --duration.

    On a cluster when a manager is found (--manager, one running on this machine, or mDNS on
    --interface / CP_INTERFACE), else here with an embedded manager and worker.
    """
    duration_s = parse_duration(duration) if duration is not None else None
    margin = parse_size(min_free)
    registry = load_registry()
    loaded = load_recipe(recipe, registry)
    stop, interrupted = StopControl(), [False]
    options = RunOptions(out_dir=out or Path("sessions"), session_name=session, duration_s=duration_s,
                         min_free=margin, encrypt_data=loaded.encrypt_data and not no_encrypt_data)
    timing = timing_from_env()
    ref = None if local else locate(manager, interface, cluster, min(timing.discovery_s, 1.5), required=False)
    address = None if ref is None else ref.address
    credentials = None if ref is None else ref.credentials(token)
    if address is not None and out is not None:
        raise CpError(f"--out {out} applies to runs on this machine, but a manager was found at {address}: the "
                      "cluster records into the manager's and workers' --data folders",
                      hint="drop --out, or pass --local to run here only")
    if address is None:
        _check_local_placement(loaded, options)
    live = Live(console=err_console, refresh_per_second=4, transient=True) if (
        err_console.is_terminal and not as_json) else None
    reporter = _Reporter(live, as_json)

    def execute() -> SessionResult:
        if address is None or credentials is None:
            return run_session(loaded, registry, options, stop, reporter)
        if not as_json:
            err_console.print(f"running on the cluster of the manager at {address}", markup=False)
        assert ref is not None
        found = ref

        def keys_now() -> Credentials:  # read again at each reconnection: a token rotated meanwhile applies
            return found.credentials(token)

        return RemoteRun(address, loaded, registry, options, stop, timing, keys_now, reporter,
                         lambda line: err_console.print(line, markup=False)).run()

    with _stop_on_signals(stop, interrupted):
        if live is not None:
            with live:
                result = execute()
        else:
            result = execute()
    if as_json:
        out_console.print_json(json.dumps(_json_result(result.session_dir, result.manifest, result.failures,
                                                       result.interrupted, result.error)))
    else:
        out_console.print(nodes_table(result.nodes))
        for line in summary_lines(result):
            out_console.print(line, markup=False)
    for node_id, message in result.failures.items():
        worker = str(result.manifest.get("nodes", {}).get(node_id, {}).get("worker", ""))
        on = f" on worker {worker}" if address is not None and worker else ""
        err_console.print("[red]error:[/red] ", end="")
        err_console.print(f"node {node_id} failed: {message}; full traceback in "
                          f"{result.logs_dir / (node_id + '.log')}{on}", markup=False)
    for warning in result.manifest.get("warnings") or []:
        err_console.print("[yellow]warning:[/yellow] ", end="")
        err_console.print(str(warning), markup=False)
    lost = result.manifest.get("lost_workers") or {}
    unfinished = {w: v for w, v in lost.items() if not v.get("finished")}
    for worker, what in lost.items():
        nodes = [n for n, v in result.manifest["nodes"].items() if v.get("worker") == worker]
        back = (f", rejoined at {what['rejoined_at_ns'] / 1e9:.1f} s" if what.get("rejoined_at_ns") is not None
                else "")
        kept = "its recordings are complete" if what.get("finished") else \
            "its nodes kept recording there; their files stay on that machine until `cp collect`"
        fed = sorted(n for n, v in result.manifest["nodes"].items()
                     if any(i.get("worker") == worker for i in (v.get("inputs_lost") or {}).values()))
        gap = f"; {', '.join(fed)} received nothing from it after that" if fed else ""
        err_console.print("[yellow]warning:[/yellow] ", end="")
        err_console.print(f"worker {worker} ({', '.join(nodes)}) was lost at {what['lost_at_ns'] / 1e9:.1f} s"
                          f"{back}; {kept}{gap}", markup=False)
    if unfinished and not (result.failures or result.error):
        return 1
    if result.error:
        err_console.print("[red]error:[/red] ", end="")
        err_console.print(result.error, markup=False)
    if result.failures or result.error:
        return 1
    return EXIT_INTERRUPTED if interrupted[0] else 0


def _check_local_placement(recipe: Recipe, options: RunOptions) -> None:
    """Running here: a node placed on another machine needs the cluster, which was not found."""
    here = options.worker or local_worker_name()
    away = [f"{n.id} (worker {n.worker})" for n in recipe.nodes if n.worker and n.worker != here]
    if away:
        raise CpError(f"nodes {', '.join(away)} are placed on other machines, but no manager was found",
                      hint="start `cp manager` and `cp worker`, then pass --manager HOST:PORT or --interface IP "
                           "(or set CP_INTERFACE) so cp run can find it")


def _json_result(session_dir: Path, manifest: dict[str, Any], failures: dict[str, str],
                 interrupted: bool, error: str | None) -> dict[str, Any]:
    return {"session_dir": str(session_dir), "manifest": str(session_dir / "manifest.json"),
            "status": "interrupted" if interrupted and not failures and not error else manifest.get("status"),
            "duration_ns": manifest["duration_ns"], "failures": failures, "error": error,
            "nodes": {n: {"state": v["state"], "stats": v["stats"], "files": len(v["files"])}
                      for n, v in manifest["nodes"].items()}}


def validate_command(
    recipe: Path = typer.Argument(..., metavar="RECIPE", help="The recipe YAML file."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON, for scripts."),
) -> int:
    """Check a recipe completely without starting anything."""
    registry = load_registry()
    try:
        loaded = load_recipe(recipe, registry)
    except RecipeError as err:
        if not as_json:
            raise
        out_console.print_json(json.dumps({"valid": False, "problems": err.problems}))
        return 1
    sources = [n for n in loaded.nodes if not n.inputs]
    recorded = [n.id for n in loaded.nodes if n.record]
    if as_json:
        out_console.print_json(json.dumps({
            "valid": True, "recipe": loaded.name, "nodes": [n.id for n in loaded.nodes],
            "sources": [n.id for n in sources], "edges": len(loaded.edges), "recorded": recorded}))
        return 0
    out_console.print(
        f"{recipe}: recipe {loaded.name!r} is valid: {len(loaded.nodes)} nodes ({len(sources)} sources), "
        f"{len(loaded.edges)} edges, recording {', '.join(recorded) or 'nothing'}", markup=False)
    return 0
